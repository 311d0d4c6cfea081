"""The training loss equals spec section 6 written out literally, per pixel, on a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from .tiny_models import TINY_SIZE, tiny_model
from .training_fixtures import one_thread

pytestmark = pytest.mark.usefixtures(one_thread.__name__)


def spec_loss(patch_logits, image_logits_at_007, masks, labels, size):
    """Spec section 6, literally: for each map, P = softmax upsampled (nearest) to S x S; focal with gamma 2 on the
    one-hot target clamped to [1e-5, 1 - 1e-5] and p_t = sum_c onehot_c P_c + 1e-5, mean over all pixels; dice on
    q = (1 - P_0 + P_1) / 2 per image, mean over the batch; both summed over the maps. Image CE at tau = 0.01 (the
    logits at tau 0.07 scaled by 0.07 / 0.01). Total 2 focal + 2 dice + 0.2 CE."""
    focal_total, dice_total = 0.0, 0.0
    for logits in patch_logits:  # [B, N, 2]
        logits = logits.detach().double().numpy()
        batch, cells, _ = logits.shape
        grid = round(cells**0.5)
        probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        focal_terms, dices = [], []
        for b in range(batch):
            q_sum = m_sum = qm_sum = 0.0
            for y in range(size):
                for x in range(size):
                    cell = (y * grid // size) * grid + (x * grid // size)  # nearest upsampling
                    p_normal, p_anomalous = probs[b, cell]
                    m = float(masks[b, y, x])
                    target = [min(max(1 - m, 1e-5), 1 - 1e-5), min(max(m, 1e-5), 1 - 1e-5)]
                    p_t = target[0] * p_normal + target[1] * p_anomalous + 1e-5
                    focal_terms.append(-((1 - p_t) ** 2) * np.log(p_t))
                    q = (1 - p_normal + p_anomalous) / 2
                    q_sum, m_sum, qm_sum = q_sum + q, m_sum + m, qm_sum + q * m
            dices.append(1 - (2 * qm_sum + 1) / (q_sum + m_sum + 1))
        focal_total += np.mean(focal_terms)
        dice_total += np.mean(dices)
    logits = image_logits_at_007.detach().double().numpy() * 0.07 / 0.01
    log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    image_ce = -np.mean([log_softmax[b, int(labels[b])] for b in range(len(labels))])
    return 2 * focal_total + 2 * dice_total + 0.2 * image_ce, focal_total, dice_total, image_ce


@pytest.mark.parametrize("variant", ["crane", "crane+"])
def test_loss_is_spec_section_6(variant):
    model = tiny_model(variant).train()
    generator = torch.Generator().manual_seed(5)
    pixel_values = torch.randn(2, 3, TINY_SIZE, TINY_SIZE, generator=generator)
    masks = torch.zeros(2, TINY_SIZE, TINY_SIZE)
    masks[0, 10:30, 5:21] = 1
    labels = torch.tensor([1, 0])
    output = model(pixel_values, labels=labels, masks=masks)
    total, focal, dice, image_ce = spec_loss(output.patch_logits, output.image_logits, masks, labels, TINY_SIZE)
    assert len(output.patch_logits) == model.config.num_maps > 1
    assert output.focal_loss.item() == pytest.approx(focal, rel=1e-5)
    assert output.dice_loss.item() == pytest.approx(dice, rel=1e-5)
    assert output.image_loss.item() == pytest.approx(image_ce, rel=1e-5)
    assert output.loss.item() == pytest.approx(total, rel=1e-5)
    output.loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trainable == {"prompt_learner.ctx_normal", "prompt_learner.ctx_anomalous", "prompt_learner.deep_prompts"}
