"""The server's configuration: one pydantic model, filled from the Flower run config or a yaml file.

Run-config keys are the field names with ``-`` instead of ``_`` (``num-server-rounds``, ``min-sites``,
...). Everything is validated here, before any work starts.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from hermes_model.factory import model_arguments
from hermes_model.plans import (
    RECIPE_INTERPOLATION,
    RECIPE_MARGIN,
    RECIPE_PATCH,
    RECIPE_SPACING,
    Plans,
    parse_xyz_setting,
)
from server.outer import DEFAULT_OUTER_LR, OuterSettings

logger = logging.getLogger(__name__)

STRATEGIES = ("fedavg", "fedprox")


def local_update_problem(local_update: str, local_iterations: int, strategy: str) -> str | None:
    """Why sites cannot train this way, or None: a ``gradient`` reply is the gradient of one batch of the
    plain loss, so it needs one local iteration and no proximal term."""
    if local_update == "gradient" and (local_iterations != 1 or strategy != "fedavg"):
        return (f"local-update 'gradient' takes one batch per round: it needs local-iterations 1 (got "
                f"{local_iterations}) and strategy fedavg (got {strategy!r})")
    return None
WEIGHTINGS = ("samples", "uniform")

# Settings that must not change when a run is resumed (they change what a round computes).
FIXED_ON_RESUME = (
    "strategy",
    "proximal_mu",
    "weighting",
    "wire_dtype",
    "seed",
    "local_iterations",
    "sites_per_round",
    "local_update",
    "keep_local_state",
    "server_optimizer",
    "server_lr",
    "server_momentum",
    "beta1",
    "beta2",
    "tau",
    "optimizer",
    "lr",
    "weight_decay",
    "warmup_epochs",
    "total_epochs",
    "iters_per_epoch",
    "target_spacing",
    "patch_size",
    "train_margin",
    "interpolation",
)
AUTO = "auto"
# the recipe's warm-up share: 5 of 200 epochs
RECIPE_WARMUP_FRACTION = 5 / 200


class ServerConfig(BaseModel):
    """Settings of one federated run (field ``x_y`` is run-config key ``x-y``).

    Attributes:
        num_server_rounds: rounds to run in total (a resumed run continues up to this number).
        min_sites: connected sites required before round 1 (waited for at most ``start_timeout_s``).
        min_sites_per_round: valid replies a round needs; fewer and the round keeps the previous model.
        sites_per_round: sites sampled per round (0 = every connected site).
        start_timeout_s / round_timeout_s / query_timeout_s: bounded waits, in seconds.
        poll_interval_s: how often the server looks for connected sites and for replies.
        evaluate_every: federated evaluation every N rounds (0 = never; the last round always if > 0).
        strategy: the sites' local steps: ``fedavg`` (default) or ``fedprox`` (needs ``proximal_mu`` > 0).
        weighting: ``samples`` (weight = num-examples) or ``uniform``.
        wire_dtype: ``float32`` (lossless) or ``float16`` for the arrays sent to sites.
        reply_codec: ``none`` (plain arrays) or ``xor-zstd``: sites code their train replies losslessly
            against what they received: 20-43 % fewer bytes to upload, for ~1 CPU-second per reply at the
            site and 0.35 s at the server at the published size (README: pays on uplinks slower than
            roughly 300 Mbit/s).
        local_update: ``steps`` (default: the sites train ``local_iterations`` optimiser steps and reply
            their weights) or ``gradient`` (each site replies the gradient of one batch, as sums the server
            combines into the gradient of the union of the batches; needs ``local_iterations`` 1: with
            ``server_optimizer`` lamb this is centralized training on the pooled batches).
        keep_local_state: each site keeps its optimiser state (LAMB moments) between rounds on its disk,
            per run (default); false: every round starts from fresh moments.
        server_optimizer: what the server does with the mean of the replies (``server.outer``): ``nesterov``
            (default: DiLoCo's outer step, ``server_momentum``; the closest to centralized training in
            ``benchmarks/federated_vs_centralized.py``), ``sgd`` (at ``server_lr`` 1: FedAvg), ``adam``
            (FedAdam: ``beta1``, ``beta2``, ``tau``) or ``lamb`` (the recipe's LAMB, learning rate ``lr`` and
            schedule on the global step).
        server_lr: the server optimiser's learning rate; ``"auto"``: sgd 1, nesterov 0.7, adam 0.01, lamb
            ``lr``.
        evaluate_ema: evaluate (and hand over as ``final_model.pt``) the server's EMA of the global model
            (the recipe's decay per global step), not the raw weights.
        evaluate_raw: with ``evaluate_ema``, the last round also evaluates the raw weights, so that the
            report shows both.
        run_dir: checkpoints and metrics go here; resume: continue from its latest checkpoint.
        keep_checkpoints: round checkpoints kept on disk (0 = all).
        model, base_channels, modality_slots: the network (``build_model`` arguments).
        task_slots: rows of the task prior bank; 0 (default) sizes it at the start from the catalog and the
            datasets the sites declare, plus ``spare_task_slots`` rows for sites that join later.
        spare_task_slots: the spare rows of an automatically sized bank.
        initial_weights: ``""`` = random with ``seed``; else a path to the published Hermes-R checkpoint
            or one of ours.
        catalog: task catalog yaml (``""`` = the bundled one, or the one inside ``initial_weights``).
        optimizer, lr, weight_decay: the training-engine settings the server fixes for every site.
        warmup_epochs, total_epochs, iters_per_epoch: the learning-rate schedule (warm-up, then poly decay
            to 0 at ``total_epochs x iters_per_epoch`` steps). ``"auto"`` (default) fits it to the run: an
            epoch is a round (``local_iterations`` steps), the decay ends with the last round, and the
            warm-up is the recipe's share (5 of 200 epochs, rounded down). An explicit schedule is checked
            against the run's length (:meth:`schedule_problems`).
        target_spacing, patch_size, train_margin, interpolation: the federation's plan
            (:class:`hermes_model.plans.Plans`; spacing and patch one number or ``"x,y,z"``); the recipe's
            values by default.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_server_rounds: int = Field(3, ge=1)
    min_sites: int = Field(1, ge=1)
    min_sites_per_round: int = Field(1, ge=1)
    sites_per_round: int = Field(0, ge=0)
    start_timeout_s: float = Field(600.0, gt=0)
    round_timeout_s: float = Field(24 * 3600.0, gt=0)
    query_timeout_s: float = Field(600.0, gt=0)
    poll_interval_s: float = Field(0.5, gt=0)
    local_iterations: int = Field(400, ge=1)
    evaluate_every: int = Field(1, ge=0)
    strategy: Literal["fedavg", "fedprox"] = "fedavg"
    proximal_mu: float = Field(0.0, ge=0, allow_inf_nan=False)
    weighting: Literal["samples", "uniform"] = "samples"
    wire_dtype: Literal["float32", "float16"] = "float32"
    reply_codec: Literal["none", "xor-zstd"] = "none"
    local_update: Literal["steps", "gradient"] = "steps"
    keep_local_state: bool = True
    server_optimizer: Literal["sgd", "nesterov", "adam", "lamb"] = "nesterov"
    server_lr: float | Literal["auto"] = AUTO
    server_momentum: float = Field(0.9, ge=0, lt=1)
    evaluate_ema: bool = True
    evaluate_raw: bool = True
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0, allow_inf_nan=False)
    run_dir: str = "runs/hermes-server"
    resume: bool = False
    keep_checkpoints: int = Field(2, ge=0)
    model: str = "hermes-r"
    base_channels: int = Field(32, ge=1)
    task_slots: int = Field(0, ge=0)
    spare_task_slots: int = Field(8, ge=0)
    modality_slots: int = Field(6, ge=2)
    initial_weights: str = ""
    catalog: str = ""
    seed: int = 0
    optimizer: str = "lamb"
    lr: float = 2e-3
    weight_decay: float = 1e-5
    warmup_epochs: int | Literal["auto"] = AUTO
    total_epochs: int | Literal["auto"] = AUTO
    iters_per_epoch: int | Literal["auto"] = AUTO
    target_spacing: float | str = RECIPE_SPACING[0]
    patch_size: int | str = RECIPE_PATCH[0]
    train_margin: int = Field(RECIPE_MARGIN, ge=0)
    interpolation: Literal["bspline", "linear"] = RECIPE_INTERPOLATION

    @model_validator(mode="after")
    def _check(self) -> ServerConfig:
        if self.strategy == "fedprox" and self.proximal_mu <= 0:
            raise ValueError(f"strategy 'fedprox' needs proximal-mu > 0, got proximal-mu={self.proximal_mu}")
        if self.strategy != "fedprox" and self.proximal_mu != 0:
            raise ValueError(
                f"proximal-mu={self.proximal_mu} is only used by strategy 'fedprox' (got strategy="
                f"{self.strategy!r}); allowed strategies: {list(STRATEGIES)}"
            )
        if self.server_lr != AUTO and not 0 < self.server_lr < float("inf"):
            raise ValueError(f"server-lr must be 'auto' or a finite number > 0, got {self.server_lr!r}")
        problem = local_update_problem(self.local_update, self.local_iterations, self.strategy)
        if problem:
            raise ValueError(problem)
        if self.sites_per_round and self.min_sites_per_round > self.sites_per_round:
            raise ValueError(
                f"min-sites-per-round={self.min_sites_per_round} exceeds "
                f"sites-per-round={self.sites_per_round}"
            )
        self.engine_config()  # validates optimizer / lr / schedule with the engine's own checks
        self.plans()
        problems = self.schedule_problems()
        if problems["error"]:
            raise ValueError(problems["error"])
        return self

    # -- derived -----------------------------------------------------------------------------------
    def schedule(self) -> dict[str, int]:
        """``warmup_epochs``, ``total_epochs`` and ``iters_per_epoch`` with ``"auto"`` resolved (class doc)."""
        total = self.num_server_rounds if self.total_epochs == AUTO else self.total_epochs
        warmup = int(total * RECIPE_WARMUP_FRACTION) if self.warmup_epochs == AUTO else self.warmup_epochs
        iters = self.local_iterations if self.iters_per_epoch == AUTO else self.iters_per_epoch
        return {"warmup_epochs": warmup, "total_epochs": total, "iters_per_epoch": iters}

    @property
    def run_steps(self) -> int:
        """Optimiser steps a site takes over the whole run (the schedule position after the last round)."""
        return self.num_server_rounds * self.local_iterations

    def schedule_problems(self) -> dict[str, str | None]:
        """``{"error": ..., "warning": ...}`` about an explicit schedule that does not fit the run: an error
        when the run ends inside the warm-up (the learning rate would stay near 0), a warning when it ends
        before half of the decay (the learning rate would still be high at the end)."""
        sched = self.schedule()
        warmup_steps = sched["warmup_epochs"] * sched["iters_per_epoch"]
        total_steps = sched["total_epochs"] * sched["iters_per_epoch"]
        error = warning = None
        if warmup_steps and self.run_steps <= warmup_steps:
            error = (f"the schedule does not fit the run: its {self.run_steps} steps (num-server-rounds "
                     f"{self.num_server_rounds} x local-iterations {self.local_iterations}) end inside the warm-up "
                     f"of {warmup_steps} steps, so the learning rate never leaves it; leave warmup-epochs, "
                     "total-epochs and iters-per-epoch at 'auto' to fit the schedule to the run")
        elif self.run_steps < total_steps / 2:
            warning = (f"the run ends at step {self.run_steps} of a {total_steps}-step schedule: the learning rate "
                       "is still high when it ends; 'auto' schedule settings fit the schedule to the run")
        return {"error": error, "warning": warning}

    def describe_schedule(self) -> str:
        """The schedule in words, for the log."""
        sched = self.schedule()
        warmup = sched["warmup_epochs"] * sched["iters_per_epoch"]
        total = sched["total_epochs"] * sched["iters_per_epoch"]
        auto = "fitted to the run" if AUTO in (self.warmup_epochs, self.total_epochs, self.iters_per_epoch) else \
            "explicit"
        return (f"learning rate {self.lr:g} ({self.optimizer}): warm-up {warmup} steps, then poly decay to 0 at step "
                f"{total}; the run takes {self.run_steps} steps per site ({self.num_server_rounds} rounds x "
                f"{self.local_iterations}) [{auto}]")

    def outer_settings(self) -> OuterSettings:
        """The server optimiser (``server.outer``) these settings describe."""
        kind = self.server_optimizer
        default_lr = self.lr if kind == "lamb" else DEFAULT_OUTER_LR[kind]
        lr = default_lr if self.server_lr == AUTO else float(self.server_lr)
        if kind == "lamb":
            from hermes_model.engine import EngineConfig

            recipe = EngineConfig(**self.engine_config())
            return OuterSettings(kind, lr, weight_decay=recipe.weight_decay, betas=recipe.betas, eps=recipe.eps,
                                 schedule=self.schedule())
        return OuterSettings(kind, lr, momentum=self.server_momentum, betas=(self.beta1, self.beta2), eps=self.tau)

    def engine_config(self) -> dict[str, Any]:
        """The ``EngineConfig`` fields the server fixes for every site (validated by the engine)."""
        from hermes_model.engine import EngineConfig

        fields = {"optimizer": self.optimizer, "lr": self.lr, "weight_decay": self.weight_decay, **self.schedule()}
        EngineConfig(**fields)
        return fields

    def plans(self) -> Plans:
        """The federation's plan from the plan settings (the model is added once it is built)."""
        return Plans(
            target_spacing=parse_xyz_setting(self.target_spacing, "target-spacing"),
            patch_size=parse_xyz_setting(self.patch_size, "patch-size"),
            train_margin=self.train_margin,
            interpolation=self.interpolation,
        )

    def model_kwargs(self, task_slots: int | None = None) -> dict[str, Any]:
        """``build_model`` keyword arguments (without the name); only those the chosen model takes.

        ``task_slots``: the bank size decided at the start when the config's is 0 (automatic).
        """
        slots = task_slots if task_slots is not None else self.task_slots
        if not slots:
            raise ValueError("task-slots is 0 (sized at the start from the sites' datasets): pass the decided size")
        candidates = {
            "base_channels": self.base_channels,
            "task_slots": slots,
            "modality_slots": self.modality_slots,
        }
        accepted = model_arguments(self.model)
        return {k: v for k, v in candidates.items() if k in accepted}

    def resume_conflicts(self, saved: Mapping[str, Any]) -> list[str]:
        """Settings in :data:`FIXED_ON_RESUME` that differ from ``saved`` (a :meth:`model_dump`)."""
        return [
            f"{_key(k)}: checkpoint has {saved[k]!r}, now {getattr(self, k)!r}"
            for k in FIXED_ON_RESUME
            if k in saved and saved[k] != getattr(self, k)
        ]

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any], **overrides: Any) -> ServerConfig:
        """Build from a Flower run config (dashed keys). Keys the server does not know are left to the
        ClientApp; a key close to a server key is reported as a likely typo (warning)."""
        known = {_key(name): name for name in cls.model_fields}
        values: dict[str, Any] = {}
        for key, value in run_config.items():
            if key in known:
                values[known[key]] = value
            else:
                close = difflib.get_close_matches(key, known, n=1, cutoff=0.85)
                if close:
                    logger.warning(
                        "run-config key %r is not a server setting; did you mean %r?", key, close[0]
                    )
        values.update(overrides)
        return _validated(cls, values, "run config")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **overrides: Any) -> ServerConfig:
        """Load a yaml file whose keys are the run-config keys (dashed) or field names."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"server config file {str(path)!r} does not exist")
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(raw, Mapping):
            raise ValueError(f"server config {str(path)!r} must be a mapping, got {type(raw).__name__}")
        values = {str(k).replace("-", "_"): v for k, v in raw.items()}
        values.update(overrides)
        return _validated(cls, values, str(path))

    def evaluates(self, server_round: int) -> bool:
        """Whether ``server_round`` ends with an evaluation (every ``evaluate_every`` rounds and the last)."""
        every = self.evaluate_every
        return bool(every) and (server_round % every == 0 or server_round == self.num_server_rounds)

    def evaluates_raw(self, server_round: int) -> bool:
        """Whether ``server_round`` also evaluates the raw weights beside the EMA (the last round)."""
        last = server_round == self.num_server_rounds
        return self.evaluate_ema and self.evaluate_raw and last and self.evaluates(server_round)

    def to_run_config(self) -> dict[str, Any]:
        """Dashed keys, as ``[tool.flwr.app.config]`` / ``--run-config`` want them."""
        return {_key(k): v for k, v in self.model_dump().items()}


def _key(field_name: str) -> str:
    return field_name.replace("_", "-")


def _validated(cls: type[ServerConfig], values: dict[str, Any], source: str) -> ServerConfig:
    try:
        return cls(**values)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = ".".join(_key(str(p)) for p in err["loc"]) or "config"
            extra = ""
            if err["type"] == "extra_forbidden":
                extra = f"; allowed keys: {sorted(_key(k) for k in cls.model_fields)}"
            problems.append(f"{loc}: {err['msg']} (got {err.get('input')!r}){extra}")
        raise ValueError(f"invalid server config ({source}):\n  - " + "\n  - ".join(problems)) from None
