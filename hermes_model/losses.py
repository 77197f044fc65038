"""Hermes losses (spec section 3): masked BCE + adaptive Tversky Dice per task token, and the modality loss.

Shapes: ``logits`` and ``target`` are (B, n, D, H, W); ``task_ids`` is (B, n) long with -1 for the
null (padding) token, whose channel carries no loss. Losses are computed in float32 (float64 logits stay
float64).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

MODALITY_LOSS_WEIGHT = 0.01
_EPS = 1e-6


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, or float64 when it is float64."""
    return t if t.dtype == torch.float64 else t.float()


def _token_weights(task_ids: torch.Tensor) -> torch.Tensor:
    return (task_ids >= 0).float()


def _weighted_mean(per_token: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    # A batch of only null tokens has no loss; clamp avoids 0/0.
    return (per_token * weights).sum() / weights.sum().clamp_min(1.0)


def masked_bce_loss(logits: torch.Tensor, target: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits averaged over voxels per (sample, token), then over the non-null tokens."""
    logits = _wide(logits)
    bce = F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="none")
    return _weighted_mean(bce.flatten(2).mean(-1), _token_weights(task_ids))


def adaptive_dice_loss(logits: torch.Tensor, target: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
    """1 - adaptive Tversky index per (sample, token), averaged over the non-null tokens."""
    prob = torch.sigmoid(_wide(logits)).flatten(2)
    gt = target.to(prob.dtype).flatten(2)
    tp = (prob * gt).sum(-1)
    fp = (prob * (1 - gt)).sum(-1)
    fn = ((1 - prob) * gt).sum(-1)
    alpha = (fp / (fp + fn + _EPS)).clamp(0.2, 0.8)
    dice = tp / (tp + alpha * fp + (1 - alpha) * fn + _EPS)
    return _weighted_mean(1 - dice, _token_weights(task_ids))


def modality_loss(modality_logits: torch.Tensor, modality_ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the modality logits (B, M); ids (B, 1) with -1 (unknown MR) ignored."""
    ids = modality_ids.reshape(-1).long()
    if not bool((ids >= 0).any()):
        return _wide(modality_logits).sum() * 0.0
    return F.cross_entropy(_wide(modality_logits), ids, ignore_index=-1)


@dataclass
class LossTerms:
    total: torch.Tensor
    bce: torch.Tensor
    dice: torch.Tensor
    modality: torch.Tensor

    def as_floats(self) -> dict[str, float]:
        return {k: float(v.detach()) for k, v in vars(self).items()}


def hermes_loss(
    seg_logits: torch.Tensor,
    modality_logits: torch.Tensor,
    target: torch.Tensor,
    task_ids: torch.Tensor,
    modality_ids: torch.Tensor,
    modality_weight: float = MODALITY_LOSS_WEIGHT,
) -> LossTerms:
    """Total loss = BCE + Dice + ``modality_weight`` x modality cross-entropy."""
    if seg_logits.shape != target.shape:
        raise ValueError(f"seg_logits {tuple(seg_logits.shape)} and target {tuple(target.shape)} differ")
    if task_ids.shape != seg_logits.shape[:2]:
        raise ValueError(f"task_ids {tuple(task_ids.shape)} must be (B, n) = {tuple(seg_logits.shape[:2])}")
    bce = masked_bce_loss(seg_logits, target, task_ids)
    dice = adaptive_dice_loss(seg_logits, target, task_ids)
    mod = modality_loss(modality_logits, modality_ids)
    return LossTerms(total=bce + dice + modality_weight * mod, bce=bce, dice=dice, modality=mod)
