"""The local training engine (spec section 4): one optimiser step at a time, schedule, EMA, checkpoints.

Shared by the federated clients and the centralized baseline; it knows nothing about Flower.

A batch is a dict with ``image`` (B, 1, D, H, W) float, ``target`` (B, n, D, H, W) binary masks (float or
uint8), ``task_ids`` (B, n) long (-1 = padding token) and ``modality_ids`` (B, 1) long (-1 = unknown MR).
The model maps ``(image, task_ids, modality_ids)`` to ``(seg_logits, modality_logits)`` where
``seg_logits`` is (B, n, D, H, W), or a list ``[main, aux]`` of such maps for deep supervision, and
``modality_logits`` is (B, M).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hermes_model.fileio import atomic_torch_save
from hermes_model.losses import MODALITY_LOSS_WEIGHT, LossTerms, hermes_loss
from hermes_model.optim import OPTIMIZER_CHOICES, build_optimizer, lr_at_iteration, validate_optimizer_args

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp64")
DEEP_SUPERVISION_WEIGHTS = (0.5, 0.5)  # [main, aux]
BATCH_KEYS = ("image", "target", "task_ids", "modality_ids")
CHECKPOINT_FORMAT = "hermes-train-engine-v1"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class EngineConfig:
    """Training hyper-parameters; the defaults are the published recipe.

    ``precision`` "fp64" keeps model and inputs in float64 (for exactness checks); "bf16" runs the
    forward pass under ``torch.autocast(dtype=torch.bfloat16)`` on the
    model's device type; ``grad_clip`` (None = off) clips the total gradient norm before the step;
    ``channels_last`` keeps model and input in ``torch.channels_last_3d``; ``proximal_mu`` > 0 adds the
    FedProx term ``mu / 2 * ||w - w_ref||^2`` once a reference is set on the engine.
    """

    optimizer: str = "lamb"
    lr: float = 2e-3
    weight_decay: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-5
    momentum: float = 0.9
    warmup_epochs: int = 5
    total_epochs: int = 200
    iters_per_epoch: int = 400
    precision: str = "fp32"
    grad_clip: float | None = None
    ema_decay: float = 0.99
    channels_last: bool = False
    proximal_mu: float = 0.0

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        if self.optimizer not in OPTIMIZER_CHOICES:
            raise ValueError(f"optimizer must be one of {OPTIMIZER_CHOICES}, got {self.optimizer!r}")
        validate_optimizer_args(self.lr, self.weight_decay, self.betas, self.eps, self.momentum)
        self._validate_schedule()
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.grad_clip is not None and not (math.isfinite(self.grad_clip) and self.grad_clip > 0):
            raise ValueError(f"grad_clip must be None or a finite number > 0, got {self.grad_clip!r}")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1], got {self.ema_decay!r}")
        if not isinstance(self.channels_last, bool):
            raise ValueError(f"channels_last must be a bool, got {self.channels_last!r}")
        if not (math.isfinite(self.proximal_mu) and self.proximal_mu >= 0):
            raise ValueError(f"proximal_mu must be a finite number >= 0, got {self.proximal_mu!r}")

    def _validate_schedule(self) -> None:
        if not _is_int(self.total_epochs) or self.total_epochs < 1:
            raise ValueError(f"total_epochs must be an int >= 1, got {self.total_epochs!r}")
        if not _is_int(self.warmup_epochs) or not 0 <= self.warmup_epochs <= self.total_epochs:
            raise ValueError(
                f"warmup_epochs must be an int in [0, total_epochs={self.total_epochs}], "
                f"got {self.warmup_epochs!r}"
            )
        if not _is_int(self.iters_per_epoch) or self.iters_per_epoch < 1:
            raise ValueError(f"iters_per_epoch must be an int >= 1, got {self.iters_per_epoch!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (``betas`` as a list), loadable with ``torch.load(weights_only=True)``."""
        data = asdict(self)
        data["betas"] = list(self.betas)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EngineConfig:
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ValueError(f"unknown EngineConfig keys {unknown}; allowed keys are {sorted(allowed)}")
        return cls(**dict(data))


class ModelEMA:
    """Exponential moving average of a model's weights (spec section 4).

    ``update(model, step)`` sets ``ema = alpha * ema + (1 - alpha) * param`` for floating parameters with
    ``alpha = min(1 - 1 / (step + 1), decay)`` (so step 0 copies the weights) and copies every buffer.
    ``module`` is a deep copy of the model in eval mode with ``requires_grad`` False; evaluate it.
    """

    def __init__(self, model: nn.Module, decay: float = 0.99) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay!r}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        self.module.requires_grad_(False)

    def alpha(self, step: int) -> float:
        return min(1.0 - 1.0 / (step + 1), self.decay)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        if not _is_int(step) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        alpha = self.alpha(step)
        ema_params = dict(self.module.named_parameters())
        for name, param in model.named_parameters():
            target = ema_params[name]
            if param.is_floating_point():
                target.mul_(alpha).add_(param.detach(), alpha=1.0 - alpha)
            else:
                target.copy_(param)
        ema_buffers = dict(self.module.named_buffers())
        for name, buffer in model.named_buffers():
            ema_buffers[name].copy_(buffer)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.module.state_dict())

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)


def _resize_target(target: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour downsampling of a (B, n, D, H, W) mask to an integer-factor smaller grid."""
    if tuple(target.shape[2:]) == tuple(spatial):
        return target
    if any(s < 1 or t % s for t, s in zip(target.shape[2:], spatial, strict=True)):
        raise ValueError(
            f"deep-supervision output grid {tuple(spatial)} must divide the target grid "
            f"{tuple(target.shape[2:])} by integer factors"
        )
    return F.interpolate(target.float(), size=tuple(spatial), mode="nearest")


def compute_loss(outputs: Sequence[Any], batch: Mapping[str, torch.Tensor]) -> LossTerms:
    """Hermes loss of a model output ``(seg, modality_logits)`` against ``batch``.

    ``seg`` is (B, n, D, H, W) logits, or a list ``[main, aux]`` for deep supervision: then the
    segmentation terms are ``0.5 * main + 0.5 * aux`` (an aux map on a smaller grid is compared with the
    nearest-neighbour downsampled target) and the modality term (weight 0.01) is counted once.
    """
    if not isinstance(outputs, tuple | list) or len(outputs) != 2:
        raise ValueError("model output must be a pair (seg_logits, modality_logits)")
    seg, modality_logits = outputs
    seg_maps = list(seg) if isinstance(seg, tuple | list) else [seg]
    if len(seg_maps) not in (1, len(DEEP_SUPERVISION_WEIGHTS)):
        raise ValueError(f"seg output must be one tensor or a list [main, aux], got {len(seg_maps)} maps")
    weights = (1.0,) if len(seg_maps) == 1 else DEEP_SUPERVISION_WEIGHTS
    target, task_ids, modality_ids = batch["target"], batch["task_ids"], batch["modality_ids"]
    parts = [
        hermes_loss(s, modality_logits, _resize_target(target, s.shape[2:]), task_ids, modality_ids)
        for s in seg_maps
    ]
    bce = sum(w * p.bce for w, p in zip(weights, parts, strict=True))
    dice = sum(w * p.dice for w, p in zip(weights, parts, strict=True))
    modality = parts[0].modality
    total = bce + dice + MODALITY_LOSS_WEIGHT * modality
    return LossTerms(total=total, bce=bce, dice=dice, modality=modality)


@dataclass
class LossSumGradients:
    """:meth:`TrainEngine.loss_sum_gradients`: parameter name -> gradient of the segmentation sum and of
    the modality sum (zeros where a parameter takes no part), the two counts, the batch's loss terms."""

    segmentation: dict[str, torch.Tensor]
    modality: dict[str, torch.Tensor]
    tokens: int
    known_modality: int
    metrics: dict[str, float]


def _named(params: Mapping[str, torch.Tensor], grads: Sequence[torch.Tensor | None]) -> dict[str, torch.Tensor]:
    pairs = zip(params.items(), grads, strict=True)
    return {name: torch.zeros_like(p) if g is None else g.detach() for (name, p), g in pairs}


def _module_device(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


class TrainEngine:
    """Model + optimiser + EMA + schedule position (``iteration``); one ``train_step`` per batch.

    The learning rate of each step is ``lr_at_iteration(iteration, ...)`` of the config, so the schedule
    resumes exactly from a checkpoint. ``state_dict`` / ``save`` / ``load`` round-trip everything needed
    for a bitwise-identical continuation.
    """

    def __init__(
        self, model: nn.Module, config: EngineConfig | None = None, device: str | torch.device | None = None
    ) -> None:
        self.config = config if config is not None else EngineConfig()
        self.device = torch.device(device) if device is not None else _module_device(model)
        self.model = model.to(self.device, torch.float64 if self.config.precision == "fp64" else None)
        if self.config.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last_3d)
        cfg = self.config
        self.optimizer = build_optimizer(
            [p for p in self.model.parameters() if p.requires_grad],
            cfg.optimizer,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            betas=cfg.betas,
            eps=cfg.eps,
            momentum=cfg.momentum,
        )
        self.ema = ModelEMA(self.model, cfg.ema_decay)
        self.iteration = 0
        self._proximal_reference: dict[str, torch.Tensor] | None = None
        self._warned_no_reference = False

    # ---------------------------------------------------------------- schedule
    def current_lr(self) -> float:
        """Learning rate for the step at the current ``iteration``."""
        cfg = self.config
        return lr_at_iteration(
            self.iteration, cfg.lr, cfg.iters_per_epoch, cfg.warmup_epochs, cfg.total_epochs
        )

    def _apply_lr(self) -> float:
        lr = self.current_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    # ---------------------------------------------------------------- FedProx
    def set_proximal_reference(self, state: Mapping[str, torch.Tensor] | None) -> None:
        """Snapshot the reference weights ``w_ref`` of the FedProx term (None clears it).

        ``state`` maps parameter names (as in ``model.state_dict()``) to tensors; its parameter entries
        are the shared parameters the term runs over, buffers are ignored.
        """
        if state is None:
            self._proximal_reference = None
            return
        params = dict(self.model.named_parameters())
        known = set(self.model.state_dict())
        unknown = sorted(set(state) - known)
        if unknown:
            raise ValueError(f"proximal reference has keys that are not in the model: {unknown[:5]}")
        reference = {}
        for name, value in state.items():
            if name not in params or not params[name].requires_grad:
                continue
            if tuple(value.shape) != tuple(params[name].shape):
                raise ValueError(
                    f"proximal reference {name!r} has shape {tuple(value.shape)}, "
                    f"the model parameter has {tuple(params[name].shape)}"
                )
            reference[name] = value.detach().to(self.device, dtype=params[name].dtype).clone()
        if not reference:
            raise ValueError("proximal reference contains none of the model's trainable parameters")
        self._proximal_reference = reference

    def _proximal_term(self) -> torch.Tensor | None:
        if self.config.proximal_mu <= 0:
            return None
        if self._proximal_reference is None:
            if not self._warned_no_reference:
                logger.warning("proximal_mu=%s but no proximal reference is set", self.config.proximal_mu)
                self._warned_no_reference = True
            return None
        params = dict(self.model.named_parameters())
        reference = self._proximal_reference
        squared = sum((params[n].float() - ref.float()).square().sum() for n, ref in reference.items())
        return 0.5 * self.config.proximal_mu * squared

    # ---------------------------------------------------------------- training
    def _prepare_batch(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        missing = [k for k in BATCH_KEYS if k not in batch]
        if missing:
            raise ValueError(f"batch is missing keys {missing}; required keys are {list(BATCH_KEYS)}")
        image = batch["image"]
        if image.dim() != 5 or image.shape[1] != 1:
            raise ValueError(f"batch['image'] must be (B, 1, D, H, W), got {tuple(image.shape)}")
        dtype = torch.float64 if self.config.precision == "fp64" else torch.float32
        image = image.to(self.device, dtype=dtype, non_blocking=True)
        if self.config.channels_last:
            image = image.contiguous(memory_format=torch.channels_last_3d)
        return {
            "image": image,
            "target": batch["target"].to(self.device, non_blocking=True),
            "task_ids": batch["task_ids"].to(self.device, dtype=torch.long, non_blocking=True),
            "modality_ids": batch["modality_ids"].to(self.device, dtype=torch.long, non_blocking=True),
        }

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.config.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """One optimiser step on ``batch``; returns floats ``loss`` (the Hermes loss), ``bce``, ``dice``,
        ``modality``, ``lr``, plus ``proximal`` when the FedProx term is active and ``grad_norm`` (total
        norm before clipping) when ``grad_clip`` is set. Raises RuntimeError on a non-finite loss (model
        buffers restored to their state before the forward pass) or gradient norm, before any weight
        changes.
        """
        lr = self._apply_lr()
        self.model.train()
        inputs = self._prepare_batch(batch)
        buffers = self._snapshot_buffers()  # e.g. BatchNorm running stats, poisoned by a NaN forward
        with self._autocast():
            outputs = self.model(inputs["image"], inputs["task_ids"], inputs["modality_ids"])
        terms = compute_loss(outputs, inputs)
        loss = terms.total
        metrics = terms.as_floats()
        metrics["loss"] = metrics.pop("total")
        proximal = self._proximal_term()
        if proximal is not None:
            loss = loss + proximal
            metrics["proximal"] = float(proximal.detach())
        if not math.isfinite(float(loss.detach())):
            self._restore_buffers(buffers)
            self._raise_if_nonfinite(float(loss.detach()), "loss")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip is not None:
            params = [p for p in self.model.parameters() if p.grad is not None]
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip))
            self._raise_if_nonfinite(grad_norm, "gradient norm")
            metrics["grad_norm"] = grad_norm
        self.optimizer.step()
        self.ema.update(self.model, self.iteration)
        self.iteration += 1
        metrics["lr"] = lr
        return metrics

    def loss_sum_gradients(self, batch: Mapping[str, torch.Tensor]) -> LossSumGradients:
        """The gradients of the Hermes loss's two sums on ``batch``; no step is taken.

        The loss is ``S / N + w * M / Q``: ``S`` the segmentation terms summed over the batch's non-null
        task tokens (``N`` of them), ``M`` the modality cross-entropy summed over the samples of known
        modality (``Q``), ``w`` the modality weight. The batches of several sites are one batch when their
        sums and counts are added: the union batch's gradient is ``sum dS / sum N + w * sum dM / sum Q``.
        """
        self.model.train()
        inputs = self._prepare_batch(batch)
        with self._autocast():
            outputs = self.model(inputs["image"], inputs["task_ids"], inputs["modality_ids"])
        terms = compute_loss(outputs, inputs)
        tokens = int((inputs["task_ids"] >= 0).sum())
        known = int((inputs["modality_ids"] >= 0).sum())
        loss = float(terms.total.detach())
        if not math.isfinite(loss):
            self._raise_if_nonfinite(loss, "loss")
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        seg_sum = (terms.bce + terms.dice) * max(tokens, 1)
        seg = torch.autograd.grad(seg_sum, list(params.values()), retain_graph=True, allow_unused=True)
        mod = torch.autograd.grad(terms.modality * known, list(params.values()), allow_unused=True)
        metrics = terms.as_floats()
        metrics["loss"] = metrics.pop("total")
        return LossSumGradients(_named(params, seg), _named(params, mod), tokens, known, metrics)

    def _snapshot_buffers(self) -> list[torch.Tensor]:
        return [b.detach().clone() for b in self.model.buffers()]

    @torch.no_grad()
    def _restore_buffers(self, snapshot: list[torch.Tensor]) -> None:
        for buffer, saved in zip(self.model.buffers(), snapshot, strict=True):
            buffer.copy_(saved)

    def _raise_if_nonfinite(self, value: float, what: str) -> None:
        if not math.isfinite(value):
            raise RuntimeError(f"non-finite {what} ({value}) at iteration {self.iteration}; no step taken")

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: plain dicts, tensors, numbers, strings (``weights_only`` safe)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "model": dict(self.model.state_dict()),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "iteration": self.iteration,
            "config": self.config.to_dict(),
            "proximal_reference": self._proximal_reference,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`. The engine keeps its own config (a differing one is logged)."""
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"checkpoint format must be {CHECKPOINT_FORMAT!r}, got {state.get('format')!r}")
        if state["config"] != self.config.to_dict():
            logger.warning("checkpoint config %s differs from the engine's %s", state["config"], self.config)
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        # torch may alias the given tensors as optimiser state: copy so two engines never share moments
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        self.iteration = int(state["iteration"])
        self.set_proximal_reference(state.get("proximal_reference"))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the state atomically (temp file + rename) to ``path``."""
        return atomic_torch_save(path, self.state_dict())

    def load_state(self, path: str | os.PathLike) -> None:
        """Restore this engine from a file written by :meth:`save`."""
        self.load_state_dict(torch.load(path, weights_only=True, map_location=self.device))

    @classmethod
    def load(
        cls, path: str | os.PathLike, model: nn.Module, device: str | torch.device | None = None
    ) -> TrainEngine:
        """A new engine on ``model`` with the config and state saved at ``path``."""
        target = torch.device(device) if device is not None else _module_device(model)
        state = torch.load(path, weights_only=True, map_location=target)
        engine = cls(model, EngineConfig.from_dict(state["config"]), target)
        engine.load_state_dict(state)
        return engine
