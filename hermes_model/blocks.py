"""Building blocks shared by the Hermes networks: pre-activation residual units, prior selection,
prior/feature cross-attention and the prior-driven classifiers (spec sections 2 and 7).

Layouts: feature maps are (B, C, D, H, W); token sequences are (B, N, C).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

INSTANCE_NORM_EPS = 1e-4
HEAD_DIM = 32
MODALITY_TOKENS = 10


def instance_norm_relu(x: torch.Tensor) -> torch.Tensor:
    """InstanceNorm3d (eps 1e-4, no affine, no running stats) followed by ReLU."""
    return F.relu(F.instance_norm(x, eps=INSTANCE_NORM_EPS))


class PreActConv(nn.Module):
    """``[IN -> ReLU -> conv]`` (``relu=False``: ``[IN -> conv]``); the norm has no parameters, so the
    state dict holds ``conv.weight``. Defaults: 3x3x3, padding 1, no bias."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, kernel_size: int = 3, groups: int = 1,
                 relu: bool = True) -> None:
        super().__init__()
        self.relu = relu
        self.conv = nn.Conv3d(in_ch, out_ch, kernel_size, stride=stride, padding=kernel_size // 2,
                              groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = instance_norm_relu(x) if self.relu else F.instance_norm(x, eps=INSTANCE_NORM_EPS)
        return self.conv(x)


class BasicBlock(nn.Module):
    """Pre-activation residual block: ``conv2(conv1(x)) + shortcut(x)``."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = PreActConv(in_ch, out_ch, stride)
        self.conv2 = PreActConv(out_ch, out_ch)
        self.shortcut = PreActConv(in_ch, out_ch, stride) if in_ch != out_ch or stride != 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shortcut is None:
            return self.conv2(self.conv1(x)) + x
        # conv1 and the shortcut start from the same normalised activation: compute it once.
        act = instance_norm_relu(x)
        return self.conv2(self.conv1.conv(act)) + self.shortcut.conv(act)


def upsample_like(x: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Trilinear (align_corners=True) resize of ``x`` to ``ref``'s spatial size.

    Computed in ``x``'s dtype, or in ``dtype`` when given (Hermes-R passes float32: the published
    Hermes-R resizes in float32 whatever the input, float64 included; Hermes-M keeps the input's dtype).
    Autocast leaves trilinear resizing alone (it is on none of its CUDA lists, and CPU autocast keeps a
    bf16 input in bf16 as of torch 2.13), so under autocast too the resize runs in the dtype it is given.
    """
    x = x if dtype is None else x.to(dtype)
    return F.interpolate(x, size=ref.shape[2:], mode="trilinear", align_corners=True)


class Mlp(nn.Module):
    """``fc1 -> GELU (exact) -> fc2``."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class PreNorm(nn.Module):
    """``fn(LayerNorm(x))`` with the LayerNorm named ``norm`` (eps 1e-4 as in the reference)."""

    def __init__(self, dim: int, fn: nn.Module, eps: float = 1e-4) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x))


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, heads*d) -> (B, heads, N, d), channel index = head * d + j."""
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, d) -> (B, N, heads*d)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class CrossAttention(nn.Module):
    """Multi-head attention of queries over a separate key/value sequence, head size 32."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        inner = heads * HEAD_DIM
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q = split_heads(self.to_q(query), self.heads)
        k, v = (split_heads(t, self.heads) for t in self.to_kv(context).chunk(2, dim=-1))
        return self.to_out(merge_heads(F.scaled_dot_product_attention(q, k, v)))


class PreNormCrossAttention(nn.Module):
    """``fn(norm1(query), norm2(context))`` (both LayerNorms eps 1e-5)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fn = CrossAttention(dim, heads)

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm1(query), self.norm2(context))


class PriorAttentionBlock(nn.Module):
    """Priors read the features, then the features read the updated priors (spec section 2)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        heads = max(dim // HEAD_DIM, 1)
        self.prior_aggregate_block = PreNormCrossAttention(dim, heads)
        self.prior_ffn = PreNorm(dim, Mlp(dim, 4 * dim, dim))
        self.feat_aggregate_block = PreNormCrossAttention(dim, heads)
        self.feat_ffn = PreNorm(dim, Mlp(dim, 4 * dim, dim))

    def forward(self, feat: torch.Tensor, priors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        priors = priors + self.prior_aggregate_block(priors, feat)
        priors = priors + self.prior_ffn(priors)
        feat = feat + self.feat_aggregate_block(feat, priors)
        feat = feat + self.feat_ffn(feat)
        return feat, priors


class PriorBank(nn.Module):
    """One layer's own task bank (task_slots + 1 rows, the last is the null task) and modality bank
    (modality_slots rows of 10 tokens; id -1 selects the last row)."""

    def __init__(self, dim: int, task_slots: int, modality_slots: int) -> None:
        super().__init__()
        self.task_prior = nn.Parameter(torch.empty(task_slots + 1, dim))
        self.modality_prior = nn.Parameter(torch.empty(modality_slots, MODALITY_TOKENS, dim))
        nn.init.xavier_uniform_(self.task_prior)
        nn.init.xavier_uniform_(self.modality_prior)

    def select(self, task_ids: torch.Tensor, modality_ids: torch.Tensor) -> torch.Tensor:
        """task_ids (B, n), modality_ids (B, 1) -> priors (B, n + 10, dim) as [task tokens, modality tokens]."""
        # Negative ids wrap to the last row by indexing: -1 is the null task / unknown-MR modality row.
        tasks = self.task_prior[task_ids]
        modality = self.modality_prior[modality_ids[:, 0]]
        return torch.cat([tasks, modality], dim=1)


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, D, H, W) -> (B, DHW, C); a free view for channels_last_3d tensors."""
    return x.flatten(2).transpose(1, 2)


def tokens_to_map(tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, DHW, C) -> (B, C, D, H, W) shaped like ``like``."""
    b, c = like.shape[:2]
    return tokens.transpose(1, 2).reshape(b, c, *like.shape[2:])


class PriorFusionLayer(PriorBank):
    """Selects this layer's own priors and lets them attend to and update the feature map."""

    def __init__(self, dim: int, blocks: int, task_slots: int, modality_slots: int) -> None:
        super().__init__(dim, task_slots, modality_slots)
        self.attn_layers = nn.ModuleList(PriorAttentionBlock(dim) for _ in range(blocks))

    def forward(
        self, x: torch.Tensor, task_ids: torch.Tensor, modality_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, dim, D, H, W) -> (updated x, posterior priors (B, n + 10, dim))."""
        priors = self.select(task_ids, modality_ids)
        feat = map_to_tokens(x)
        for block in self.attn_layers:
            feat, priors = block(feat, priors)
        return tokens_to_map(feat, x), priors


class HierarchyPriorClassifier(nn.Module):
    """Turns the task tokens of every fusion layer into one kernel per task; logit = <feature, kernel>."""

    def __init__(self, prior_dim: int, feat_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(prior_dim)
        self.classifier_pred = nn.ModuleList(
            [Mlp(prior_dim, prior_dim, feat_dim), Mlp(feat_dim, feat_dim, feat_dim)]
        )
        _xavier_linears(self)

    def forward(self, feat: torch.Tensor, task_tokens: list[torch.Tensor]) -> torch.Tensor:
        """feat (B, C, D, H, W), task_tokens: per layer (B, n, dim_i) -> logits (B, n, D, H, W)."""
        kernels = self.norm(torch.cat(task_tokens, dim=-1))
        for mlp in self.classifier_pred:
            kernels = mlp(kernels)
        b, c = feat.shape[:2]
        logits = torch.bmm(kernels, feat.reshape(b, c, -1))
        return logits.view(b, -1, *feat.shape[2:])


class ModalityClassifier(nn.Module):
    """Modality logits from the modality tokens of every fusion layer (LayerNorm, token mean, MLP)."""

    def __init__(self, prior_dim: int, modality_slots: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(prior_dim)
        self.classifier = Mlp(prior_dim, prior_dim, modality_slots)
        _xavier_linears(self)

    def forward(self, modality_tokens: list[torch.Tensor]) -> torch.Tensor:
        """modality_tokens: per layer (B, 10, dim_i) -> logits (B, modality_slots)."""
        return self.classifier(self.norm(torch.cat(modality_tokens, dim=-1)).mean(dim=1))


def _xavier_linears(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
