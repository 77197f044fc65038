"""Hermes-M: the MedFormer backbone whose attention stages carry a compact 64-token semantic map to
which the task and modality priors are appended (spec section 7). State-dict names match the
published Hermes-M weights. Shared blocks (pre-activation units, prior banks, classifiers) come from
:mod:`hermes_model.blocks`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hermes_model.blocks import (
    HEAD_DIM,
    BasicBlock,
    HierarchyPriorClassifier,
    Mlp,
    ModalityClassifier,
    PreActConv,
    PreNorm,
    PriorBank,
    merge_heads,
    split_heads,
    upsample_like,
)
from hermes_model.hermes_r import Inc
from hermes_model.inputs import check_inputs

MAP_TOKENS = 64
EXPANSION = 4
ATTENTION_NORM_EPS = 1e-5
STEM = 32
DOWN = (64, 128, 256, 320)  # down1..down4
UP = (256, 128, 64, 32)  # up1..up4
ATTENTION_BLOCKS = {"down2": 2, "down3": 4, "down4": 8, "up1": 4, "up2": 2}
FUSION_DIM, FUSION_DEPTH = 320, 2


class DepthwiseSeparableConv(nn.Module):
    """3x3x3 depthwise conv (groups = in) then 1x1x1 pointwise conv; no biases, no norm."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv3d(in_ch, in_ch, 3, padding=1, groups=in_ch, bias=False)
        self.pointwise = nn.Conv3d(in_ch, out_ch, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class PatchMerging(nn.Module):
    """Halve the grid: the 8 sub-grids stacked on channels, InstanceNorm (eps 1e-5), separable conv."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.reduction = DepthwiseSeparableConv(8 * in_ch, out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [x[:, :, i::2, j::2, k::2] for i in range(2) for j in range(2) for k in range(2)]
        return self.reduction(F.instance_norm(torch.cat(parts, dim=1), eps=ATTENTION_NORM_EPS))


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.excitation = nn.Sequential(
            nn.Conv3d(channels, reduced, 1), nn.ReLU(), nn.Conv3d(reduced, channels, 1), nn.Sigmoid()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.excitation(x.mean(dim=(2, 3, 4), keepdim=True))


class MBConv(nn.Module):
    """Inverted residual: expand x4 (1x1), depthwise 3x3x3, squeeze-excitation, project (1x1), + input."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        wide = EXPANSION * channels
        self.expand_proj = PreActConv(channels, wide, kernel_size=1)
        self.depthwise = PreActConv(wide, wide, groups=wide)
        self.se = SqueezeExcitation(wide, channels)
        self.pointwise = PreActConv(wide, channels, kernel_size=1, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pointwise(self.se(self.depthwise(self.expand_proj(x))))


class SemanticMapGeneration(nn.Module):
    """(B, c, D, H, W) -> (B, 64, c): each map token is a softmax-over-voxels weighted sum of features."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.base_proj = nn.Conv3d(channels, channels, 3, padding=1, bias=False)
        self.semantic_proj = nn.Conv3d(channels, MAP_TOKENS, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_proj(x).flatten(2)  # (B, c, N)
        weights = self.semantic_proj(x).flatten(2).softmax(dim=-1)  # (B, 64, N)
        return torch.bmm(weights, base.transpose(1, 2))


def _feature_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, heads*d, D, H, W) with channel = j * heads + head -> (B, heads, N, d)."""
    b, c = x.shape[:2]
    return x.reshape(b, c // heads, heads, -1).permute(0, 2, 3, 1)


def _map_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, M, heads*d) with channel = j * heads + head -> (B, heads, M, d)."""
    b, m, c = x.shape
    return x.reshape(b, m, c // heads, heads).permute(0, 3, 1, 2)


def _merge_map_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, M, d) -> (B, M, d * heads) with channel = j * heads + head."""
    b, h, m, d = x.shape
    return x.permute(0, 2, 3, 1).reshape(b, m, d * h)


class BidirectionAttention(nn.Module):
    """Voxels attend to the map tokens and the map tokens attend to the voxels, sharing one score
    matrix ``q_feat . q_map / sqrt(d)``: softmax over map tokens for the feature update, over voxels for
    the map update. Both directions are plain scaled-dot-product attention (the second with the map
    tokens as queries), so each runs through the fused kernel without materialising the scores."""

    def __init__(self, feat_ch: int, map_dim: int, out_ch: int, heads: int, map_out: bool = True) -> None:
        super().__init__()
        inner = heads * HEAD_DIM
        self.heads = heads
        self.feat_qv = DepthwiseSeparableConv(feat_ch, 2 * inner)
        self.feat_out = DepthwiseSeparableConv(inner, out_ch)
        self.map_qv = nn.Linear(map_dim, 2 * inner, bias=False)
        self.map_out = nn.Linear(inner, map_dim, bias=False) if map_out else None

    def forward(self, feat: torch.Tensor, sem_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q_feat, v_feat = (_feature_heads(t, self.heads) for t in self.feat_qv(feat).chunk(2, dim=1))
        q_map, v_map = (_map_heads(t, self.heads) for t in self.map_qv(sem_map).chunk(2, dim=-1))
        feat_update = F.scaled_dot_product_attention(q_feat, q_map, v_map)  # (B, h, N, d)
        map_update = F.scaled_dot_product_attention(q_map, q_feat, v_feat)  # (B, h, M, d)
        b, h, _, d = feat_update.shape
        feat_update = feat_update.permute(0, 3, 1, 2).reshape(b, d * h, *feat.shape[2:])
        map_update = _merge_map_heads(map_update)
        if self.map_out is not None:
            map_update = self.map_out(map_update)
        return self.feat_out(feat_update), map_update


class BidirectionAttentionBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, map_dim: int, heads: int, map_out: bool = True) -> None:
        super().__init__()
        self.norm2 = nn.LayerNorm(map_dim, eps=ATTENTION_NORM_EPS)
        self.attn = BidirectionAttention(in_ch, map_dim, out_ch, heads, map_out)
        self.shortcut = PreActConv(in_ch, out_ch, kernel_size=1) if in_ch != out_ch else None
        self.feedforward = MBConv(out_ch)

    def forward(self, x: torch.Tensor, sem_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat, map_update = self.attn(F.instance_norm(x, eps=ATTENTION_NORM_EPS), self.norm2(sem_map))
        feat = feat + (x if self.shortcut is None else self.shortcut(x))
        return self.feedforward(feat), map_update + sem_map


class AttentionStack(nn.Module):
    """``blocks`` bidirectional attention blocks; the first may change the feature width."""

    def __init__(self, in_ch: int, out_ch: int, depth: int, last_map_out: bool = True) -> None:
        super().__init__()
        heads = out_ch // HEAD_DIM
        self.blocks = nn.ModuleList(
            BidirectionAttentionBlock(in_ch if i == 0 else out_ch, out_ch, out_ch, heads,
                                      map_out=last_map_out or i < depth - 1)
            for i in range(depth)
        )

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for block in self.blocks:
            x, tokens = block(x, tokens)
        return x, tokens


def _run_with_priors(stack: AttentionStack, x: torch.Tensor, sem_map: torch.Tensor, priors: torch.Tensor):
    """Append the priors to the map tokens, run the stack, split -> (x, map (B, 64, c), priors)."""
    x, tokens = stack(x, torch.cat([sem_map, priors], dim=1))
    return x, tokens[:, :MAP_TOKENS], tokens[:, MAP_TOKENS:]


class ConvDown(nn.Module):
    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.patch_merging = PatchMerging(in_ch, out_ch)
        self.conv_blocks = nn.ModuleList([BasicBlock(out_ch, out_ch), BasicBlock(out_ch, out_ch)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_merging(x)
        for block in self.conv_blocks:
            x = block(x)
        return x


class AttentionDown(nn.Module):
    """Patch merging, semantic map, this stage's priors, bidirectional attention blocks."""

    def __init__(self, in_ch: int, out_ch: int, depth: int, task_slots: int, modality_slots: int) -> None:
        super().__init__()
        self.map_gen = SemanticMapGeneration(out_ch)
        self.prior_selection = PriorBank(out_ch, task_slots, modality_slots)
        self.patch_merging = PatchMerging(in_ch, out_ch)
        self.trans_blocks = AttentionStack(out_ch, out_ch, depth)

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor, modality_ids: torch.Tensor):
        x = self.patch_merging(x)
        return _run_with_priors(self.trans_blocks, x, self.map_gen(x),
                                self.prior_selection.select(task_ids, modality_ids))


class AttentionUp(nn.Module):
    """Upsample, concatenate [upsampled, skip], merge the two maps, append priors, attention blocks."""

    def __init__(self, deep_ch: int, skip_ch: int, out_ch: int, depth: int, task_slots: int,
                 modality_slots: int, last_map_out: bool = True) -> None:
        super().__init__()
        self.map_reduction = nn.Linear(deep_ch + skip_ch, out_ch, bias=False)
        self.prior_selection = PriorBank(out_ch, task_slots, modality_slots)
        self.trans_blocks = AttentionStack(deep_ch + skip_ch, out_ch, depth, last_map_out)

    def forward(self, deep: torch.Tensor, skip: torch.Tensor, deep_map: torch.Tensor, skip_map: torch.Tensor,
                task_ids: torch.Tensor, modality_ids: torch.Tensor):
        x = torch.cat([upsample_like(deep, skip), skip], dim=1)
        sem_map = self.map_reduction(torch.cat([deep_map, skip_map], dim=-1))
        return _run_with_priors(self.trans_blocks, x, sem_map, self.prior_selection.select(task_ids, modality_ids))


class ConvUp(nn.Module):
    def __init__(self, deep_ch: int, skip_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv_blocks = nn.ModuleList([BasicBlock(deep_ch + skip_ch, out_ch), BasicBlock(out_ch, out_ch)])

    def forward(self, deep: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = torch.cat([upsample_like(deep, skip), skip], dim=1)
        for block in self.conv_blocks:
            x = block(x)
        return x


class SelfAttention(nn.Module):
    """Standard multi-head self-attention (channel = head * 32 + j), ``to_qkv`` split as q, k, v."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Linear(dim, 3 * heads * HEAD_DIM, bias=False)
        self.to_out = nn.Linear(heads * HEAD_DIM, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (split_heads(t, self.heads) for t in self.to_qkv(x).chunk(3, dim=-1))
        return self.to_out(merge_heads(F.scaled_dot_product_attention(q, k, v)))


class MapFusion(nn.Module):
    """Project the three encoder maps to 320, run a 2-layer transformer over all 192 tokens, project back."""

    def __init__(self, dims: tuple[int, ...]) -> None:
        super().__init__()
        heads = FUSION_DIM // HEAD_DIM
        self.in_proj = nn.ModuleList(nn.Linear(d, FUSION_DIM, bias=False) for d in dims)
        self.fusion = nn.Module()
        self.fusion.layers = nn.ModuleList(
            nn.ModuleList([PreNorm(FUSION_DIM, SelfAttention(FUSION_DIM, heads)),
                           PreNorm(FUSION_DIM, Mlp(FUSION_DIM, FUSION_DIM, FUSION_DIM))])
            for _ in range(FUSION_DEPTH)
        )
        self.out_proj = nn.ModuleList(nn.Linear(FUSION_DIM, d, bias=False) for d in dims)

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        x = torch.cat([proj(m) for proj, m in zip(self.in_proj, maps, strict=True)], dim=1)
        for attention, mlp in self.fusion.layers:
            x = x + attention(x)
            x = x + mlp(x)
        return [proj(part) for proj, part in zip(self.out_proj, x.split(MAP_TOKENS, dim=1), strict=True)]


class HermesM(nn.Module):
    """Hermes-M.

    ``forward(x, task_ids, modality_ids)``: x (B, 1, D, H, W) with D, H, W divisible by 16; task_ids
    (B, n) long padded with -1; modality_ids (B, 1) long (-1 = unknown MR). Returns
    ``([seg_logits, aux_logits] (each (B, n, D, H, W)), modality_logits (B, modality_slots))`` in train and
    eval; ``aux_logits`` come from the up2 stage (deep supervision), upsampled to the input size.
    """

    def __init__(self, task_slots: int = 72, modality_slots: int = 6) -> None:
        super().__init__()
        self.task_slots, self.modality_slots = task_slots, modality_slots
        slots = (task_slots, modality_slots)
        self.inc = Inc(STEM)
        self.down1 = ConvDown(STEM, DOWN[0])
        self.down2 = AttentionDown(DOWN[0], DOWN[1], ATTENTION_BLOCKS["down2"], *slots)
        self.down3 = AttentionDown(DOWN[1], DOWN[2], ATTENTION_BLOCKS["down3"], *slots)
        self.down4 = AttentionDown(DOWN[2], DOWN[3], ATTENTION_BLOCKS["down4"], *slots)
        self.map_fusion = MapFusion(DOWN[1:])
        self.up1 = AttentionUp(DOWN[3], DOWN[2], UP[0], ATTENTION_BLOCKS["up1"], *slots)
        self.up2 = AttentionUp(UP[0], DOWN[1], UP[1], ATTENTION_BLOCKS["up2"], *slots, last_map_out=False)
        self.up3 = ConvUp(UP[1], DOWN[0], UP[2])
        self.up4 = ConvUp(UP[2], STEM, UP[3])
        prior_dim = sum(DOWN[1:]) + UP[0] + UP[1]
        self.aux_classifier = HierarchyPriorClassifier(prior_dim, UP[1])
        self.out_classifier = HierarchyPriorClassifier(prior_dim, UP[3])
        self.mod_out = ModalityClassifier(prior_dim, modality_slots)

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor, modality_ids: torch.Tensor):
        check_inputs(x, task_ids, modality_ids, self.task_slots, self.modality_slots)
        ids = (task_ids, modality_ids)
        n = task_ids.shape[1]
        x0 = self.inc(x)
        x1 = self.down1(x0)
        x2, map2, p2 = self.down2(x1, *ids)
        x3, map3, p3 = self.down3(x2, *ids)
        x4, map4, p4 = self.down4(x3, *ids)
        map2, map3, map4 = self.map_fusion([map2, map3, map4])
        y, map_up1, p5 = self.up1(x4, x3, map4, map3, *ids)
        y, _, p6 = self.up2(y, x2, map_up1, map2, *ids)
        posteriors = [p2, p3, p4, p5, p6]
        task_tokens = [p[:, :n] for p in posteriors]
        aux = upsample_like(self.aux_classifier(y, task_tokens), x)
        y = self.up4(self.up3(y, x1), x0)
        seg = self.out_classifier(y, task_tokens)
        return [seg, aux], self.mod_out([p[:, n:] for p in posteriors])
