"""Token ids of Crane's prompt texts, from the OpenAI CLIP BPE vocabulary bundled with the package.

The ids are computed once per configuration and stored in ``config.json`` (``prompt_token_ids``), so a saved model
never needs this module's data files again: a folder loaded with ``trust_remote_code=True`` where crane_hf is not
installed reads the ids from its config.
"""

from __future__ import annotations

import os
from functools import lru_cache

CLIP_CONTEXT_LENGTH = 77
CLIP_EOT_TOKEN_ID = 49407
CLIP_SOT_TOKEN_ID = 49406


def bundled_tokenizer_dir() -> str:
    """Folder with the OpenAI CLIP ``vocab.json`` and ``merges.txt`` shipped inside crane_hf."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "resources", "clip_tokenizer")


@lru_cache(maxsize=1)
def load_clip_tokenizer():
    """The real OpenAI CLIP BPE tokenizer (transformers' ``CLIPTokenizer``) from the bundled files."""
    from transformers import CLIPTokenizer

    folder = bundled_tokenizer_dir()
    if not os.path.isfile(os.path.join(folder, "vocab.json")):
        raise FileNotFoundError(
            f"The CLIP tokenizer files are missing from {folder}. They ship with crane_hf; reinstall the package, "
            "or pass `prompt_token_ids` to CraneConfig explicitly."
        )
    return CLIPTokenizer.from_pretrained(folder)


def tokenize_prompts(texts: list[str], context_length: int = CLIP_CONTEXT_LENGTH) -> list[list[int]]:
    """Tokenize prompt texts to ``context_length`` ids: start token, BPE tokens, end token, padded with the end token.

    The official Crane code pads with 0 instead; both give the same text features because the text encoder is causal
    and reads the first end-of-text position.
    """
    tokenizer = load_clip_tokenizer()
    ids = []
    for text in texts:
        tokens = tokenizer(text, add_special_tokens=True)["input_ids"]
        if len(tokens) > context_length:
            raise ValueError(
                f"Prompt {text!r} has {len(tokens)} tokens, more than the text encoder's context length "
                f"{context_length}."
            )
        ids.append(tokens + [CLIP_EOT_TOKEN_ID] * (context_length - len(tokens)))
    return ids
