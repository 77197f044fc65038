"""The server's optimiser on pseudo-gradients (FedOpt, DiLoCo) and the server's EMA of the global model.

Each round the strategy averages the replies into a target state; the pseudo-gradient is ``sent - target``
and a real ``torch.optim`` optimiser steps the global parameters with it:

- ``sgd``: plain SGD, no momentum; at learning rate 1 the step lands on the target, i.e. FedAvg;
- ``nesterov``: SGD with Nesterov momentum (DiLoCo's outer step);
- ``adam``: Adam with ``tau`` as epsilon (FedAdam);
- ``lamb``: the engine's LAMB with the recipe's hyper-parameters and warm-up + poly schedule on the
  global step count; with sites that return one batch gradient this is centralized training.

The optimiser works on one float64 tensor per state entry (so LAMB's per-tensor trust ratio is the
centralized one). Before each step the parameters are set to the float32 state that was sent and the
pseudo-gradient is formed in float64, where the difference of two float32 values is exact: SGD at
learning rate 1 then returns the target bit for bit (unless a value falls below 2**-29 of what it was).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from hermes_model.exchange import StateLayout
from hermes_model.optim import build_optimizer, lr_at_iteration
from server.state import GlobalState

OUTER_OPTIMIZERS = ("sgd", "nesterov", "adam", "lamb")
DEFAULT_OUTER_LR = {"sgd": 1.0, "nesterov": 0.7, "adam": 1e-2}  # lamb: the recipe's lr and schedule


@dataclass(frozen=True)
class OuterSettings:
    """The server optimiser. ``schedule`` (lamb only): ``lr_at_iteration`` keywords (``iters_per_epoch``,
    ``warmup_epochs``, ``total_epochs``) applied at the global step at which a round starts."""

    kind: str = "sgd"
    lr: float = 1.0
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-3
    weight_decay: float = 0.0
    schedule: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in OUTER_OPTIMIZERS:
            raise ValueError(f"server-optimizer must be one of {list(OUTER_OPTIMIZERS)}, got {self.kind!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"server-lr must be a finite number > 0, got {self.lr!r}")
        if self.kind == "lamb" and not self.schedule:
            raise ValueError("server-optimizer 'lamb' needs the recipe's schedule")

    def lr_at(self, step: int) -> float:
        """The outer learning rate of the round that starts at global step ``step``."""
        return lr_at_iteration(step, self.lr, **self.schedule) if self.kind == "lamb" else self.lr


class OuterOptimizer:
    """One optimiser over the whole global model (backbone and every prior row)."""

    def __init__(self, layout: StateLayout, settings: OuterSettings) -> None:
        self.layout, self.settings = layout, settings
        self.params = {k: torch.zeros(shape, dtype=torch.float64) for k, shape in layout.shapes}
        self.optimizer = self._build(list(self.params.values()))
        self.steps = 0

    def _build(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        s = self.settings
        if s.kind == "sgd":
            return torch.optim.SGD(params, lr=s.lr, momentum=0.0)
        if s.kind == "nesterov":
            return torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, nesterov=True)
        if s.kind == "adam":
            return torch.optim.Adam(params, lr=s.lr, betas=s.betas, eps=s.eps)
        return build_optimizer(params, "lamb", lr=s.lr, weight_decay=s.weight_decay, betas=s.betas, eps=s.eps)

    @torch.no_grad()
    def step(self, sent: GlobalState, gradient: GlobalState | None = None, *, target: GlobalState | None = None,
             global_step: int) -> GlobalState:
        """One outer step from ``sent``: with ``target`` (the mean of the replies) the pseudo-gradient is
        ``sent - target``; else ``gradient`` is used as given. Returns the new float32 state."""
        if (gradient is None) == (target is None):
            raise ValueError("give exactly one of gradient and target")
        sent.load_into(self.layout, self.params)
        grads = {k: torch.zeros_like(p) for k, p in self.params.items()}
        (gradient if gradient is not None else target).load_into(self.layout, grads)
        for name, p in self.params.items():
            p.grad = grads[name] if gradient is not None else grads[name].sub_(p).neg_()
        lr = self.settings.lr_at(global_step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        for p in self.params.values():
            p.grad = None
        self.steps += 1
        return GlobalState.from_state_dict(self.layout, self.params)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.settings.kind, "steps": self.steps, "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != self.settings.kind:
            raise ValueError(f"server optimiser state is for {state.get('kind')!r}, this run uses "
                             f"{self.settings.kind!r}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps = int(state["steps"])


class ServerEMA:
    """The EMA of the global model with the recipe's per-step decay ``alpha(s) = min(1 - 1/(s+1), decay)``:
    a round of global steps ``s0 .. s0+K-1`` decays by the product of their K alphas (round 1, whose first
    step is 0, copies the model)."""

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.state: GlobalState | None = None

    def round_decay(self, first_step: int, steps: int) -> float:
        return math.prod(min(1.0 - 1.0 / (s + 1), self.decay) for s in range(first_step, first_step + steps))

    @torch.no_grad()
    def update(self, model: GlobalState, first_step: int, steps: int) -> None:
        keep = self.round_decay(first_step, steps)
        if self.state is None or keep == 0.0:
            self.state = model.clone()
            return
        for ema, new in zip(self.state.tensors(), model.tensors(), strict=True):
            ema.mul_(keep).add_(new, alpha=1.0 - keep)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "state": None if self.state is None else list(self.state.clone().tensors())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        tensors = state.get("state")
        self.state = None if tensors is None else GlobalState(*(t.clone().float() for t in tensors))
