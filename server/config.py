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

logger = logging.getLogger(__name__)

STRATEGIES = ("fedavg", "fedprox", "fedadam")
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
    "server_lr",
    "beta1",
    "beta2",
    "tau",
    "optimizer",
    "lr",
    "weight_decay",
    "warmup_epochs",
    "total_epochs",
    "iters_per_epoch",
)


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
        strategy: ``fedavg`` (default), ``fedprox`` (needs ``proximal_mu`` > 0) or ``fedadam``.
        weighting: ``samples`` (weight = num-examples) or ``uniform``.
        wire_dtype: ``float32`` (lossless) or ``float16`` for the arrays sent to sites.
        reply_codec: ``none`` (plain arrays) or ``xor-zstd``: sites code their train replies losslessly
            against what they received: 20-43 % fewer bytes to upload, for ~1 CPU-second per reply at the
            site and 0.35 s at the server at the published size (README: pays on uplinks slower than
            roughly 300 Mbit/s).
        server_lr, beta1, beta2, tau: FedAdam's server optimiser.
        run_dir: checkpoints and metrics go here; resume: continue from its latest checkpoint.
        keep_checkpoints: round checkpoints kept on disk (0 = all).
        model, base_channels, task_slots, modality_slots: the network (``build_model`` arguments).
        initial_weights: ``""`` = random with ``seed``; else a path to the published Hermes-R checkpoint
            or one of ours.
        catalog: task catalog yaml (``""`` = the bundled one, or the one inside ``initial_weights``).
        optimizer ... iters_per_epoch: the training-engine settings the server fixes for every site.
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
    strategy: Literal["fedavg", "fedprox", "fedadam"] = "fedavg"
    proximal_mu: float = Field(0.0, ge=0, allow_inf_nan=False)
    weighting: Literal["samples", "uniform"] = "samples"
    wire_dtype: Literal["float32", "float16"] = "float32"
    reply_codec: Literal["none", "xor-zstd"] = "none"
    server_lr: float = Field(1e-2, gt=0, allow_inf_nan=False)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0, allow_inf_nan=False)
    run_dir: str = "runs/hermes-server"
    resume: bool = False
    keep_checkpoints: int = Field(2, ge=0)
    model: str = "hermes-r"
    base_channels: int = Field(32, ge=1)
    task_slots: int = Field(72, ge=1)
    modality_slots: int = Field(6, ge=2)
    initial_weights: str = ""
    catalog: str = ""
    seed: int = 0
    optimizer: str = "lamb"
    lr: float = 2e-3
    weight_decay: float = 1e-5
    warmup_epochs: int = 5
    total_epochs: int = 200
    iters_per_epoch: int = 400

    @model_validator(mode="after")
    def _check(self) -> ServerConfig:
        if self.strategy == "fedprox" and self.proximal_mu <= 0:
            raise ValueError(f"strategy 'fedprox' needs proximal-mu > 0, got proximal-mu={self.proximal_mu}")
        if self.strategy != "fedprox" and self.proximal_mu != 0:
            raise ValueError(
                f"proximal-mu={self.proximal_mu} is only used by strategy 'fedprox' (got strategy="
                f"{self.strategy!r}); allowed strategies: {list(STRATEGIES)}"
            )
        if self.sites_per_round and self.min_sites_per_round > self.sites_per_round:
            raise ValueError(
                f"min-sites-per-round={self.min_sites_per_round} exceeds "
                f"sites-per-round={self.sites_per_round}"
            )
        self.engine_config()  # validates optimizer / lr / schedule with the engine's own checks
        return self

    # -- derived -----------------------------------------------------------------------------------
    def engine_config(self) -> dict[str, Any]:
        """The ``EngineConfig`` fields the server fixes for every site (validated by the engine)."""
        from hermes_model.engine import EngineConfig

        fields = {
            "optimizer": self.optimizer,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "warmup_epochs": self.warmup_epochs,
            "total_epochs": self.total_epochs,
            "iters_per_epoch": self.iters_per_epoch,
        }
        EngineConfig(**fields)
        return fields

    def model_kwargs(self) -> dict[str, Any]:
        """``build_model`` keyword arguments (without the name); only those the chosen model takes."""
        candidates = {
            "base_channels": self.base_channels,
            "task_slots": self.task_slots,
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
