"""Crane's learned prompts: context vectors, deep prompts, image-conditioned prompts (spec section 4).

The normal and anomalous prompts are "X X ... X object." and "X X ... X damaged object."; the token embeddings
of the placeholders (positions 1..P) are replaced by learned context vectors. Deep prompts P_1..P_n overwrite
hidden positions 1..len before text layers 2..n+1. In training, the image's normalized global embedding can be
inserted as one extra token right after the context (context conditioning), giving per-image text features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .clip_layers import clip_block


class CranePromptLearner(nn.Module):
    """The trainable tensors of Crane: ``ctx_normal``, ``ctx_anomalous`` [P, W] and ``deep_prompts`` [n, len, W]."""

    def __init__(
        self,
        prompt_token_ids: list[list[int]],
        eos_token_id: int,
        prompt_length: int,
        num_deep_prompts: int,
        deep_prompt_length: int,
        width: int,
    ):
        super().__init__()
        self.prompt_length = prompt_length
        self.ctx_normal = nn.Parameter(torch.empty(prompt_length, width))
        self.ctx_anomalous = nn.Parameter(torch.empty(prompt_length, width))
        self.deep_prompts = nn.Parameter(torch.empty(num_deep_prompts, deep_prompt_length, width))
        self.eos_token_id = eos_token_id
        self._token_ids = [list(ids) for ids in prompt_token_ids]
        self.register_buffer(
            "prompt_token_ids",
            torch.empty(len(prompt_token_ids), len(prompt_token_ids[0]), dtype=torch.long),
            persistent=False,
        )
        self.register_buffer("eot_positions", torch.empty(len(prompt_token_ids), dtype=torch.long), persistent=False)
        self.reset_parameters()

    def token_id_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt token ids [2, T] and their first end-of-text positions [2]."""
        ids = torch.tensor(self._token_ids, dtype=torch.long)
        return ids, (ids == self.eos_token_id).int().argmax(dim=-1)

    def positions_used(self, conditioned: bool = False) -> int:
        """How many leading positions reach the end-of-text tokens (+1 with the image token), deep prompts included.

        The text transformer is causal and only the end-of-text hidden states are read, so later positions (the
        padding, most of the 77) change nothing and need not be computed.
        """
        length = len(self._token_ids[0])
        last_eot = max(ids.index(self.eos_token_id) if self.eos_token_id in ids else 0 for ids in self._token_ids)
        used = last_eot + 1 + int(conditioned)
        return min(length, max(used, 1 + self.deep_prompts.shape[1]))

    def reset_parameters(self) -> None:
        """Normal(0, 0.02) prompts, as in the official code, and the token-id buffers."""
        for tensor in (self.ctx_normal, self.ctx_anomalous, self.deep_prompts):
            nn.init.normal_(tensor, std=0.02)
        ids, eot = self.token_id_tensors()
        with torch.no_grad():
            self.prompt_token_ids.copy_(ids)
            self.eot_positions.copy_(eot)

    def prompt_embeddings(
        self, token_embedding: nn.Embedding, image_embeds: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Input embeddings of the two prompts and their end-of-text positions.

        Static: ([2, T, W], [2]). With ``image_embeds`` [B, W] (context conditioning): ([B, 2, T, W], [2]), the
        image token at position P+1, the words shifted right by one and the last position dropped.
        """
        tokens = token_embedding(self.prompt_token_ids)
        prefix, suffix = tokens[:, :1], tokens[:, 1 + self.prompt_length :]
        context = torch.stack([self.ctx_normal, self.ctx_anomalous]).to(tokens.dtype)
        if image_embeds is None:
            return torch.cat([prefix, context, suffix], dim=1), self.eot_positions
        batch = image_embeds.shape[0]
        image_token = image_embeds.to(tokens.dtype)[:, None, None, :].expand(batch, 2, 1, -1)
        embeddings = torch.cat(
            [
                prefix.expand(batch, -1, -1, -1),
                context.expand(batch, -1, -1, -1),
                image_token,
                suffix[:, :-1].expand(batch, -1, -1, -1),
            ],
            dim=2,
        )
        return embeddings, self.eot_positions + 1


def encode_prompts(
    text_model: nn.Module,
    text_projection: nn.Linear,
    embeddings: torch.Tensor,
    eot_positions: torch.Tensor,
    deep_prompts: torch.Tensor,
    deep_prompt_rounding_dtype: torch.dtype | None = None,
    num_positions: int | None = None,
) -> torch.Tensor:
    """L2-normalized text features [..., 2, D] of prompt input embeddings [..., 2, T, W].

    Runs CLIP's text transformer (position embeddings, causal blocks, final LayerNorm) with deep prompts written
    into hidden positions 1..len before layers 2..n+1, then projects the hidden state at the end-of-text token.
    With `deep_prompt_rounding_dtype` (the published code: torch.float16), the deep prompts are rounded through that
    dtype after being repeated for each prompt row, as the published code does, so their gradient is rounded row by
    row and then summed. With `num_positions` (`CranePromptLearner.positions_used`), only the leading positions
    that reach the end-of-text tokens are run: the result is the same (causal attention), at a fraction of the cost.
    """
    if num_positions is not None:
        embeddings = embeddings[..., :num_positions, :]
    leading = embeddings.shape[:-2]
    tokens, width = embeddings.shape[-2:]
    x = embeddings.reshape(-1, tokens, width)
    x = x + text_model.embeddings.position_embedding.weight[:tokens].to(x.dtype)
    num_deep, deep_length = deep_prompts.shape[:2]
    for index, layer in enumerate(text_model.encoder.layers):
        if 1 <= index <= num_deep:
            deep = deep_prompts[index - 1].expand(x.shape[0], -1, -1)
            if deep_prompt_rounding_dtype is not None:
                deep = deep.to(deep_prompt_rounding_dtype)
            x = torch.cat([x[:, :1], deep.to(x.dtype), x[:, 1 + deep_length :]], dim=1)
        x = clip_block(layer, x, is_causal=True)
    x = text_model.final_layer_norm(x)
    rows = torch.arange(x.shape[0], device=x.device)
    eot = eot_positions.to(x.device).repeat(x.shape[0] // eot_positions.shape[0])
    features = text_projection(x[rows, eot])
    return F.normalize(features, dim=-1).reshape(*leading, features.shape[-1])
