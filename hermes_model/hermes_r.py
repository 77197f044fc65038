"""Hermes-R: a pre-activation residual U-Net whose bottom and decoder stages fuse learned task and
modality priors (spec section 2). State-dict names match the published Hermes-R weights."""

from __future__ import annotations

import torch
from torch import nn

from hermes_model.blocks import (
    BasicBlock,
    HierarchyPriorClassifier,
    ModalityClassifier,
    PriorFusionLayer,
    upsample_like,
)
from hermes_model.inputs import check_inputs

NUM_BLOCKS = 2
FUSION_BLOCKS = {"prior_init_fuse_2": 2, "prior_init_fuse_3": 2, "prior_init_fuse_4": 4,
                 "prior_fuse_5": 2, "prior_fuse_6": 2}


class Down(nn.Module):
    """MaxPool3d(2) then residual blocks; ``conv`` index 0 is the pool (published naming)."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        blocks = [BasicBlock(in_ch, out_ch)] + [BasicBlock(out_ch, out_ch) for _ in range(NUM_BLOCKS - 1)]
        self.conv = nn.Sequential(nn.MaxPool3d(2), *blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Up(nn.Module):
    """Upsample the deeper map to the skip's size, concatenate [skip, upsampled], residual blocks."""

    def __init__(self, deep_ch: int, skip_ch: int, out_ch: int) -> None:
        super().__init__()
        blocks = [BasicBlock(deep_ch + skip_ch, out_ch)] + [
            BasicBlock(out_ch, out_ch) for _ in range(NUM_BLOCKS - 1)
        ]
        self.conv = nn.Sequential(*blocks)

    def forward(self, deep: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        # The published Hermes-R resizes in float32 (in a float64 run too: its float64 golden vectors need
        # it); the result joins the skip's dtype.
        merged = torch.cat([skip, upsample_like(deep, skip, torch.float32).to(skip.dtype)], dim=1)
        return self.conv(merged)


class Inc(nn.Module):
    def __init__(self, out_ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(1, out_ch, 3, padding=1, bias=False)
        self.conv2 = BasicBlock(out_ch, out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


class HermesR(nn.Module):
    """Hermes-R.

    Args:
        base_channels: C, the width of the first stage (32 in the published model).
        task_slots: task bank rows excluding the null row (72 published: 71 tasks + 1 spare/null id).
        modality_slots: modality bank rows (6: CT, PET, MR-T1, MR-T2, cine-MR, unknown MR).

    ``forward(x, task_ids, modality_ids)``: x (B, 1, D, H, W) with D, H, W divisible by 16; task_ids
    (B, n) long padded with -1; modality_ids (B, 1) long, -1 = MR of unknown sequence. Returns
    ``(seg_logits (B, n, D, H, W), modality_logits (B, modality_slots))``.
    """

    def __init__(self, base_channels: int = 32, task_slots: int = 72, modality_slots: int = 6) -> None:
        super().__init__()
        c = base_channels
        self.task_slots, self.modality_slots = task_slots, modality_slots
        self.inc = Inc(c)
        self.down1 = Down(c, 2 * c)
        self.down2 = Down(2 * c, 4 * c)
        self.prior_init_fuse_2 = self._fusion("prior_init_fuse_2", 4 * c)
        self.down3 = Down(4 * c, 8 * c)
        self.prior_init_fuse_3 = self._fusion("prior_init_fuse_3", 8 * c)
        self.down4 = Down(8 * c, 10 * c)
        self.prior_init_fuse_4 = self._fusion("prior_init_fuse_4", 10 * c)
        self.up1 = Up(10 * c, 8 * c, 8 * c)
        self.prior_fuse_5 = self._fusion("prior_fuse_5", 8 * c)
        self.up2 = Up(8 * c, 4 * c, 4 * c)
        self.prior_fuse_6 = self._fusion("prior_fuse_6", 4 * c)
        self.up3 = Up(4 * c, 2 * c, 2 * c)
        self.up4 = Up(2 * c, c, c)
        prior_dim = (4 + 8 + 10 + 8 + 4) * c
        self.out = HierarchyPriorClassifier(prior_dim, c)
        self.mod_out = ModalityClassifier(prior_dim, modality_slots)

    def _fusion(self, name: str, dim: int) -> PriorFusionLayer:
        return PriorFusionLayer(dim, FUSION_BLOCKS[name], self.task_slots, self.modality_slots)

    def forward(
        self, x: torch.Tensor, task_ids: torch.Tensor, modality_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        check_inputs(x, task_ids, modality_ids, self.task_slots, self.modality_slots)
        n = task_ids.shape[1]
        x0 = self.inc(x)
        x1 = self.down1(x0)
        x2, p2 = self.prior_init_fuse_2(self.down2(x1), task_ids, modality_ids)
        x3, p3 = self.prior_init_fuse_3(self.down3(x2), task_ids, modality_ids)
        x4, p4 = self.prior_init_fuse_4(self.down4(x3), task_ids, modality_ids)
        y, p5 = self.prior_fuse_5(self.up1(x4, x3), task_ids, modality_ids)
        y, p6 = self.prior_fuse_6(self.up2(y, x2), task_ids, modality_ids)
        y = self.up4(self.up3(y, x1), x0)
        posteriors = [p2, p3, p4, p5, p6]
        seg = self.out(y, [p[:, :n] for p in posteriors])
        modality = self.mod_out([p[:, n:] for p in posteriors])
        return seg, modality
