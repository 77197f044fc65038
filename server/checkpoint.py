"""Round checkpoints and the metrics history of a run directory.

Layout::

    <run_dir>/checkpoints/round_0003.pt   global model (hermes_model.model_checkpoint format, so
                                          hermes_model.load_checkpoint reads it) + catalog + plans + the
                                          trained-task table + server state
    <run_dir>/checkpoints/latest          name of the newest complete round checkpoint
    <run_dir>/metrics.jsonl               one JSON line per site and phase per round, plus aggregates
    <run_dir>/final_model.pt              the model at the end of the run (:func:`save_final_model`): the
                                          format of every model we hand to users (hermes-predict --model)
    <run_dir>/plans.json, fingerprint.json  the federation's plan and the merged data fingerprint

Each file is written atomically (temp file + rename); the pointer is written after the checkpoint, the
metric lines before it, and a resume drops metric lines of rounds after the checkpoint's, so a crash at
any point leaves a consistent directory.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hermes_model.catalog import Catalog
from hermes_model.factory import RAW_STATE_KEY, load_checkpoint, model_checkpoint
from hermes_model.fileio import atomic_torch_save, atomic_write_bytes
from hermes_model.plans import Plans
from hermes_model.trained import PLANS_KEY, TRAINED_TASKS_KEY, TrainedTask, trained_to_dict
from server.bank import PriorBank

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
METRICS_FILE = "metrics.jsonl"
# the field of a metric line that scored the raw global weights beside the EMA (the last round); lines without
# it score the model the run hands over
WEIGHTS_FIELD, RAW_WEIGHTS = "weights", "raw"
FINAL_MODEL = "final_model.pt"
PLANS_FILE, FINGERPRINT_FILE = "plans.json", "fingerprint.json"
SERVER_KEY = "server"
WEIGHTS_RAW, WEIGHTS_EMA = "raw", "ema"  # which weights a model file's state_dict holds
_ROUND_FILE = re.compile(r"^round_(\d{4,})\.pt$")


@dataclass
class RoundCheckpoint:
    """What a round checkpoint restores."""

    server_round: int
    model: nn.Module
    model_config: dict[str, Any]
    catalog: Catalog
    bank: PriorBank
    strategy_state: dict[str, Any]
    config: dict[str, Any]
    seed: int
    path: Path
    plans: Plans
    run_key: str


class RunStore:
    """The checkpoints and metrics of one run directory."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.checkpoint_dir = self.run_dir / CHECKPOINT_DIR
        self.metrics_path = self.run_dir / METRICS_FILE

    # -- checkpoints -------------------------------------------------------------------------------
    @staticmethod
    def round_file(server_round: int) -> str:
        return f"round_{server_round:04d}.pt"

    def round_files(self) -> dict[int, Path]:
        """Round -> checkpoint file, for every complete round checkpoint on disk."""
        if not self.checkpoint_dir.is_dir():
            return {}
        found = {}
        for path in self.checkpoint_dir.iterdir():
            match = _ROUND_FILE.match(path.name)
            if match:
                found[int(match.group(1))] = path
        return dict(sorted(found.items()))

    def latest_path(self) -> Path | None:
        """The newest complete checkpoint: the ``latest`` pointer, or the newest round file if the pointer
        is missing (a crash between writing the checkpoint and the pointer)."""
        pointer = self.checkpoint_dir / LATEST
        if pointer.is_file():
            path = self.checkpoint_dir / pointer.read_text(encoding="utf-8").strip()
            if path.is_file():
                return path
            logger.warning("checkpoint pointer %s names a missing file %s", pointer, path.name)
        files = self.round_files()
        return files[max(files)] if files else None

    def save_round(
        self,
        server_round: int,
        model: nn.Module,
        *,
        catalog: Catalog,
        bank: PriorBank,
        strategy_state: dict[str, Any],
        config: dict[str, Any],
        seed: int,
        plans: Plans,
        run_key: str,
        keep: int = 0,
    ) -> Path:
        """Write ``round_XXXX.pt`` atomically, then the ``latest`` pointer; keep the newest ``keep`` files
        (0 = all)."""
        server = {
            "round": int(server_round),
            "bank": bank.to_dict(),
            "strategy": strategy_state,
            "config": dict(config),
            "seed": int(seed),
            "run_key": run_key,
        }
        ckpt = model_checkpoint(model, catalog=catalog.to_dict(), **model_record(plans, bank.trained_tasks()),
                                **{SERVER_KEY: server})
        name = self.round_file(server_round)
        path = atomic_torch_save(self.checkpoint_dir / name, ckpt)
        atomic_write_bytes(self.checkpoint_dir / LATEST, f"{name}\n".encode())
        if keep:
            for old_round, old in list(self.round_files().items())[:-keep]:
                if old_round != server_round:
                    old.unlink(missing_ok=True)
        logger.info("round %d checkpoint written: %s", server_round, path)
        return path

    def load_latest(self) -> RoundCheckpoint | None:
        """The newest round checkpoint, or None when the run directory has none."""
        path = self.latest_path()
        return None if path is None else load_round_checkpoint(path)

    # -- metrics -----------------------------------------------------------------------------------
    def append_metrics(self, lines: list[dict[str, Any]]) -> None:
        """Append JSON lines to ``metrics.jsonl`` (flushed and fsynced)."""
        if not lines:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            for line in lines:
                f.write(json.dumps(line, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.is_file():
            return []
        lines = self.metrics_path.read_text(encoding="utf-8").splitlines()
        out = []
        for text in lines:
            try:
                out.append(json.loads(text))
            except json.JSONDecodeError:  # a line cut by a crash
                logger.warning("skipping a damaged line of %s", self.metrics_path)
        return out

    def truncate_metrics(self, server_round: int) -> None:
        """Keep only the lines of rounds <= ``server_round`` (atomic rewrite)."""
        if not self.metrics_path.is_file():
            return
        kept = [m for m in self.read_metrics() if int(m.get("round", 0)) <= server_round]
        text = "".join(json.dumps(m, sort_keys=True) + "\n" for m in kept)
        atomic_write_bytes(self.metrics_path, text.encode("utf-8"))


def load_round_checkpoint(path: str | os.PathLike) -> RoundCheckpoint:
    """Read a round checkpoint (``torch.load(weights_only=True)`` through ``load_checkpoint``)."""
    loaded = load_checkpoint(path)
    server = loaded.extra.get(SERVER_KEY)
    if not isinstance(server, dict) or "catalog" not in loaded.extra:
        raise ValueError(f"{path}: a model checkpoint, but not a server round checkpoint (no server state)")
    return RoundCheckpoint(
        server_round=int(server["round"]),
        model=loaded.model,
        model_config=loaded.config,
        catalog=Catalog.from_dict(loaded.extra["catalog"]),
        bank=PriorBank.from_dict(server["bank"]),
        strategy_state=server["strategy"],
        config=server["config"],
        seed=int(server["seed"]),
        path=Path(path),
        plans=Plans.from_dict(loaded.extra[PLANS_KEY]),
        run_key=str(server["run_key"]),
    )


def model_record(plans: Plans, trained: Mapping[int, TrainedTask]) -> dict[str, Any]:
    """What every checkpoint carries beside its weights so it can be used alone: the plan and which task
    rows were trained (:mod:`hermes_model.trained`)."""
    return {PLANS_KEY: plans.to_dict(), TRAINED_TASKS_KEY: trained_to_dict(trained.values())}


def save_final_model(path: str | os.PathLike, model: nn.Module, catalog: Catalog, plans: Plans,
                     trained: Mapping[int, TrainedTask], raw_state: Mapping[str, torch.Tensor] | None = None,
                     **metadata: Any) -> Path:
    """Write the model a run hands to its users, atomically: weights, build arguments, catalog, plan,
    trained-task table and ``metadata`` (e.g. ``mode``, ``server_round``), in the format every mode
    (federated simulation or deployment, centralized, local-only) shares; ``hermes-predict --model`` reads
    it. ``model`` holds the EMA weights when ``raw_state`` (the raw weights, kept beside them as
    :data:`RAW_STATE_KEY`) is given; ``weights`` says which (:data:`WEIGHTS_EMA` or :data:`WEIGHTS_RAW`)."""
    weights = {"weights": WEIGHTS_RAW}
    if raw_state is not None:
        weights = {"weights": WEIGHTS_EMA, RAW_STATE_KEY: {k: v.detach().cpu() for k, v in raw_state.items()}}
    extra = {**weights, **metadata, **model_record(plans, trained)}
    return atomic_torch_save(path, model_checkpoint(model.cpu().eval(), catalog=catalog.to_dict(), **extra))
