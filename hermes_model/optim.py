"""Optimisers and the learning-rate schedule of the Hermes training recipe (spec section 4).

The recipe uses NVIDIA apex ``FusedLAMB`` with its defaults (bias correction, decoupled weight decay,
gradient averaging, global gradient-norm scaling to 1.0, trust ratio only where weight decay is set).
apex is a CUDA-only optional extra: when it is importable and the parameters live on CUDA we use it,
otherwise :class:`ApexLamb` reproduces the same update in plain PyTorch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

import torch
from pytorch_optimizer import Lamb

logger = logging.getLogger(__name__)

OPTIMIZER_CHOICES = ("lamb", "adamw", "sgd")


class ApexLamb(Lamb):
    """LAMB with the exact update of apex ``FusedLAMB`` (``csrc/multi_tensor_lamb.cu``), on any device.

    ``pytorch_optimizer.Lamb`` (v4.1) cannot be configured to match apex, because it: clamps the weight
    norm at 10; divides by ``update_norm + eps`` in the trust ratio; applies decoupled weight decay to
    the weights directly instead of adding ``wd * p`` to the update before the trust ratio; has no
    bias correction of the second moment; applies the trust ratio to every tensor (NVLAMB behaviour);
    and scales gradients by ``max_norm / (norm + eps)``. This subclass keeps its argument validation and
    state initialisation (``exp_avg`` / ``exp_avg_sq``) and replaces :meth:`step` with apex's formula.
    Per step, with ``G`` the L2 norm of all gradients of all groups together:

    - ``g = grad / (G / max_grad_norm)`` if ``G > max_grad_norm`` else ``grad`` (``max_grad_norm <= 0``
      disables the scaling);
    - ``m = beta1 m + (1 - beta1) g`` (``1`` instead of ``1 - beta1`` without grad averaging),
      ``v = beta2 v + (1 - beta2) g^2``;
    - ``u = (m / bc1) / (sqrt(v / bc2) + eps) + wd p`` with ``bc_i = 1 - beta_i^step`` (or 1);
    - ``ratio = ||p|| / ||u||`` (``||p||`` before the step) when ``wd != 0`` or ``use_nvlamb``, and 1 when
      either norm is 0; ``p -= lr * ratio * u``.

    Gradients are not modified in place (apex overwrites them with the update).
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        bias_correction: bool = True,
        grad_averaging: bool = True,
        max_grad_norm: float = 1.0,
        use_nvlamb: bool = False,
    ) -> None:
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            weight_decay=weight_decay,
            weight_decouple=True,
            grad_averaging=grad_averaging,
            max_grad_norm=max_grad_norm,
            eps=eps,
            foreach=False,
            bias_correction=bias_correction,
        )
        self.use_nvlamb = use_nvlamb

    def __str__(self) -> str:
        return "ApexLamb"

    def _grad_scale_divisor(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """``G / max_grad_norm`` when the global gradient norm ``G`` exceeds it, else 1 (a 0-dim tensor)."""
        device = grads[0].device
        norms = torch.stack([n.to(device) for n in torch._foreach_norm(grads)])
        global_norm = torch.linalg.vector_norm(norms)
        max_norm = float(self.defaults["max_grad_norm"])
        if max_norm <= 0.0:
            return torch.ones_like(global_norm)
        return torch.where(global_norm > max_norm, global_norm / max_norm, torch.ones_like(global_norm))

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return loss
        divisor = self._grad_scale_divisor(grads)
        for group in self.param_groups:
            self.init_group(group)
            group["step"] += 1
            by_device: dict[torch.device, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_device.setdefault(p.device, []).append(p)
            for device, params in by_device.items():
                self._update_params(params, group, divisor.to(device))
        return loss

    def _update_params(self, params: list[torch.Tensor], group: dict[str, Any], divisor: torch.Tensor) -> None:
        """apex's update for ``params`` (one device) with multi-tensor (``torch._foreach_*``) kernels:
        the same arithmetic as a per-tensor loop, without its per-tensor Python and dispatch cost."""
        beta1, beta2 = group["betas"]
        step = group["step"]
        bias1, bias2 = (1 - beta1**step, 1 - beta2**step) if group["bias_correction"] else (1.0, 1.0)
        beta3 = 1 - beta1 if group["grad_averaging"] else 1.0
        decay = group["weight_decay"]
        exp_avgs = [self.state[p]["exp_avg"] for p in params]
        exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in params]

        param_norms = torch._foreach_norm(params)
        grads = torch._foreach_div([p.grad for p in params], divisor)
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, grads, alpha=beta3)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        updates = torch._foreach_div(exp_avgs, bias1)
        denominators = torch._foreach_div(exp_avg_sqs, bias2)
        torch._foreach_sqrt_(denominators)
        torch._foreach_add_(denominators, group["eps"])
        torch._foreach_div_(updates, denominators)
        if decay != 0:
            torch._foreach_add_(updates, params, alpha=decay)
        if self.use_nvlamb or decay != 0:
            param_norm = torch.stack(param_norms)
            update_norm = torch.stack(torch._foreach_norm(updates))
            usable = (param_norm != 0) & (update_norm != 0)
            ratios = torch.where(usable, param_norm / update_norm, torch.ones_like(param_norm))
            torch._foreach_mul_(updates, list(ratios.unbind()))
        torch._foreach_add_(params, updates, alpha=-group["lr"])


def _all_on_cuda(params: list[Any]) -> bool:
    tensors: list[torch.Tensor] = []
    for item in params:
        tensors.extend(item["params"] if isinstance(item, dict) else [item])
    return bool(tensors) and all(t.is_cuda for t in tensors)


def _apex_fused_lamb(params: list[Any], **kwargs: Any) -> torch.optim.Optimizer | None:
    """apex ``FusedLAMB`` when apex and its CUDA extensions are present, else None."""
    try:
        from apex.optimizers import FusedLAMB  # optional CUDA-only extra, never required
    except ImportError:
        return None
    try:
        return FusedLAMB(params, adam_w_mode=True, set_grad_none=True, **kwargs)
    except RuntimeError as err:  # apex without its compiled CUDA extensions
        logger.warning("apex FusedLAMB unavailable (%s); using ApexLamb", err)
        return None


def validate_optimizer_args(
    lr: float, weight_decay: float, betas: tuple[float, float], eps: float, momentum: float
) -> None:
    """Raise ValueError naming the first out-of-range optimiser hyper-parameter."""
    if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")


def build_optimizer(
    params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
    name: str = "lamb",
    lr: float = 2e-3,
    weight_decay: float = 1e-5,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-5,
    momentum: float = 0.9,
    *,
    max_grad_norm: float = 1.0,
    use_apex: bool = True,
) -> torch.optim.Optimizer:
    """Build the optimiser ``name`` (one of ``OPTIMIZER_CHOICES``) over ``params`` (tensors or groups).

    ``lamb``: apex ``FusedLAMB`` when ``use_apex``, apex imports and every parameter is on CUDA, else
    :class:`ApexLamb` (same update; ``max_grad_norm`` is its global gradient-norm scaling).
    ``adamw``: ``torch.optim.AdamW``. ``sgd``: ``torch.optim.SGD`` with ``momentum``. ``betas`` and
    ``eps`` apply to lamb/adamw, ``momentum`` to sgd, ``weight_decay`` to all three.
    """
    if name not in OPTIMIZER_CHOICES:
        raise ValueError(f"optimizer name must be one of {OPTIMIZER_CHOICES}, got {name!r}")
    betas = tuple(betas)
    validate_optimizer_args(lr, weight_decay, betas, eps, momentum)
    params = list(params)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    lamb_kwargs = dict(
        lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
        bias_correction=True, grad_averaging=True, use_nvlamb=False,
    )  # apex FusedLAMB defaults of the recipe
    if use_apex and _all_on_cuda(params):
        fused = _apex_fused_lamb(params, **lamb_kwargs)
        if fused is not None:
            return fused
    return ApexLamb(params, **lamb_kwargs)


def lr_at(epoch: int, base_lr: float, warmup_epochs: int = 5, total_epochs: int = 200) -> float:
    """Learning rate of the recipe at an integer ``epoch``.

    Warm-up ``base_lr * exp(10 * (epoch / warmup_epochs - 1))`` for ``epoch < warmup_epochs``, then poly
    decay ``base_lr * (1 - epoch / total_epochs) ** 0.9``, 0 at and after ``total_epochs``.
    ``warmup_epochs = 0`` means no warm-up.
    """
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
    if not (math.isfinite(base_lr) and base_lr >= 0):
        raise ValueError(f"base_lr must be a finite number >= 0, got {base_lr!r}")
    if not isinstance(total_epochs, int) or total_epochs < 1:
        raise ValueError(f"total_epochs must be an int >= 1, got {total_epochs!r}")
    if not isinstance(warmup_epochs, int) or not 0 <= warmup_epochs <= total_epochs:
        raise ValueError(
            f"warmup_epochs must be an int in [0, total_epochs={total_epochs}], got {warmup_epochs!r}"
        )
    if epoch < warmup_epochs:
        return base_lr * math.exp(10.0 * (epoch / warmup_epochs - 1.0))
    if epoch >= total_epochs:
        return 0.0
    return base_lr * (1.0 - epoch / total_epochs) ** 0.9


def lr_at_iteration(
    iteration: int,
    base_lr: float,
    iters_per_epoch: int = 400,
    warmup_epochs: int = 5,
    total_epochs: int = 200,
) -> float:
    """:func:`lr_at` for the epoch ``iteration // iters_per_epoch`` (the schedule position)."""
    if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
        raise ValueError(f"iteration must be an int >= 0, got {iteration!r}")
    if isinstance(iters_per_epoch, bool) or not isinstance(iters_per_epoch, int) or iters_per_epoch < 1:
        raise ValueError(f"iters_per_epoch must be an int >= 1, got {iters_per_epoch!r}")
    return lr_at(iteration // iters_per_epoch, base_lr, warmup_epochs, total_epochs)
