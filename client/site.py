"""A federated site, free of Flower: its config, its preprocessed data, local training and evaluation.

The ClientApp (:mod:`client.app`) only translates Flower records to and from the typed objects here:

- :meth:`Site.describe` and :meth:`Site.fingerprint` answer the server's query (dataset names, modality,
  classes, case counts; aggregate statistics of the training data, :mod:`client.fingerprint`);
- :meth:`Site.train` preprocesses with the federation's plan when its data was made with another one, loads
  the received backbone and prior rows over the site's own saved state, trains ``local_iterations``
  steps with the training engine (one device or DDP, :mod:`client.local_training`), saves the engine
  (weights, optimiser moments, EMA) to the site's disk and returns the backbone, the received prior rows
  and aggregate metrics;
- :meth:`Site.evaluate` segments every validation scan whole (no label-based crop) with the received
  weights, through the code path of ``hermes-predict`` (:func:`client.predict.segment_preprocessed`),
  and scores it against the original label at the scan's native geometry with the code of
  ``hermes-evaluate`` (:func:`client.evaluate.evaluate_case`); it returns aggregate numbers only.

What stays on the site's disk, under ``<work_dir>/client_state/<run key>/`` (one folder per run: a new
run starts clean, a resumed run continues):

- ``engine.pt``: the full engine state after the last training round (model, EMA, optimiser moments,
  schedule position, FedProx reference), written atomically; loaded before the received tensors are
  applied, so the rows the server does not send keep the site's own values;
- ``history.jsonl``: one line per round with the site's local metrics (for the site's operator).

and ``<work_dir>/plans.json``: the last plan received (``hermes-client preprocess`` uses it).

Nothing returned by this class names a case, a file or a path: only dataset and class names and numbers.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from client.config import DatasetConfig, SiteConfig, load_site_config
from client.dataset import PreprocessedDataset, derived_seed, round_sampling_seed
from client.formats import CaseSpec
from client.local_training import LocalResult, TrainData, resolve_devices, train_local
from hermes_model import build_model
from hermes_model.catalog import Catalog, modality_id
from hermes_model.engine import EngineConfig, TrainEngine
from hermes_model.exchange import (
    KNOWN_MODALITY,
    LOCAL_UPDATES,
    LOSS_TOKENS,
    NUM_EXAMPLES,
    REPLY_CODECS,
    WIRE_DTYPES,
    StateLayout,
    to_wire,
)
from hermes_model.fileio import atomic_write_json
from hermes_model.fingerprint import DatasetFingerprint
from hermes_model.plans import Plans

__all__ = ["DatasetSummary", "ProtocolError", "RoundRequest", "Site", "TrainReply"]

logger = logging.getLogger(__name__)

STATE_DIR = "client_state"
PLANS_FILE = "plans.json"  # the last plan received from a federation (hermes-client preprocess uses it)
_RUN_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
ENGINE_FILE = "engine.pt"
HISTORY_FILE = "history.jsonl"
EVAL_OVERLAP = 0.5
EVAL_METRICS = ("dice", "dice_paper")  # per-round evaluation: HD95 and surface Dice cost more (hermes-evaluate)
# optimiser settings taken from the round's config when the saved moments are loaded (counters are kept)
HYPER_PARAMETERS = ("lr", "weight_decay", "betas", "eps", "momentum")
# EngineConfig keys the server may set; the site fixes precision and memory layout for its hardware
SERVER_ENGINE_KEYS = frozenset(
    {"optimizer", "lr", "weight_decay", "betas", "eps", "momentum", "warmup_epochs", "total_epochs",
     "iters_per_epoch", "grad_clip", "ema_decay"}
)


class ProtocolError(ValueError):
    """A request from the server is malformed. The message only names keys and values of the request, so it
    may be sent back to the server (other exceptions are reported without their text: they may hold paths)."""


# ------------------------------------------------------------------------------------------------ requests
@dataclass(frozen=True)
class DatasetSummary:
    """What a site tells the server about one dataset: no case ids, file names or paths."""

    name: str
    modality: str
    classes: dict[int, str]
    num_train_cases: int

    def to_dict(self) -> dict[str, Any]:
        classes = {str(k): v for k, v in sorted(self.classes.items())}
        return {"name": self.name, "modality": self.modality, "classes": classes,
                "num_train_cases": self.num_train_cases}


def _int(value: Any, key: str, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        raise ProtocolError(f"{key} must be an int >= {low}, got {value!r}")
    return int(value)


def _ids(values: Sequence[int], key: str) -> tuple[int, ...]:
    if isinstance(values, str | bytes) or not isinstance(values, Sequence):
        raise ProtocolError(f"{key} must be a list of ints, got {values!r}")
    return tuple(_int(v, key) for v in values)


@dataclass(frozen=True)
class RoundRequest:
    """A train or evaluate request: the global tensors for this site and the round's config.

    Attributes:
        server_round: round number (>= 1).
        backbone: (backbone_size,) float tensor.
        task_rows: (len(task_row_ids), task_row_size) float tensor.
        modality_rows: (len(modality_row_ids), modality_row_size) float tensor.
        task_row_ids / modality_row_ids: the prior-bank rows sent (those the site owns), in order.
        model: ``{"name": ..., **build_model kwargs}``.
        task_map: ``"<dataset>/<class>"`` -> global task id, at least for the site's datasets.
        engine: EngineConfig fields the server fixes.
        local_iterations: optimiser steps to train.
        schedule_iteration: global learning-rate schedule position at the start of the round.
        seed: the federation's seed (the round's patches: ``client.dataset.round_sampling_seed``).
        wire_dtype: ``"float32"`` or ``"float16"`` for the reply's arrays.
        reply_codec: ``"xor-zstd"`` (code the reply against the request, losslessly) or ``"none"``.
        proximal_mu: FedProx coefficient (0 = plain FedAvg).
        local_update: ``steps`` (train ``local_iterations`` steps, reply the weights) or ``gradient`` (reply
            the gradients of one batch's loss sums, ``hermes_model.exchange.LOCAL_UPDATES``).
        keep_local_state: start from the site's saved optimiser state of this run (else fresh moments).
        plans: the federation's plan (preprocessing and patch size).
        run_key: the server's name of the run; the site keeps its local state under it, so a new run
            starts clean and a resumed one continues.
    """

    server_round: int
    backbone: torch.Tensor
    task_rows: torch.Tensor
    modality_rows: torch.Tensor
    task_row_ids: tuple[int, ...]
    modality_row_ids: tuple[int, ...]
    model: dict[str, Any]
    task_map: dict[str, int]
    engine: dict[str, Any] = field(default_factory=dict)
    local_iterations: int = 1
    schedule_iteration: int = 0
    seed: int = 0
    wire_dtype: str = "float32"
    reply_codec: str = "none"
    proximal_mu: float = 0.0
    local_update: str = "steps"
    keep_local_state: bool = True
    plans: Plans = field(default_factory=Plans)
    run_key: str = "default"

    def __post_init__(self) -> None:
        _int(self.server_round, "server-round", 1)
        _int(self.local_iterations, "local-iterations", 1)
        _int(self.schedule_iteration, "schedule-iteration")
        _int(self.seed, "seed")
        object.__setattr__(self, "task_row_ids", _ids(self.task_row_ids, "task_row_ids"))
        object.__setattr__(self, "modality_row_ids", _ids(self.modality_row_ids, "modality_row_ids"))
        if self.wire_dtype not in WIRE_DTYPES:
            raise ProtocolError(f"wire-dtype must be one of {sorted(WIRE_DTYPES)}, got {self.wire_dtype!r}")
        if self.reply_codec not in REPLY_CODECS:
            raise ProtocolError(f"reply-codec must be one of {list(REPLY_CODECS)}, got {self.reply_codec!r}")
        if not isinstance(self.keep_local_state, bool):
            raise ProtocolError(f"keep-local-state must be a bool, got {self.keep_local_state!r}")
        if self.local_update not in LOCAL_UPDATES:
            raise ProtocolError(f"local-update must be one of {list(LOCAL_UPDATES)}, got {self.local_update!r}")
        mu = self.proximal_mu
        if isinstance(mu, bool) or not isinstance(mu, int | float) or not math.isfinite(mu) or mu < 0:
            raise ProtocolError(f"proximal-mu must be a finite number >= 0, got {mu!r}")
        if not isinstance(self.model, Mapping) or not isinstance(self.model.get("name"), str):
            raise ProtocolError(f"model must be a mapping with a 'name', got {self.model!r}")
        if not isinstance(self.task_map, Mapping) or not all(
            isinstance(k, str) and not isinstance(v, bool) and isinstance(v, int)
            for k, v in self.task_map.items()
        ):
            raise ProtocolError("task-map must map '<dataset>/<class>' strings to int task ids")
        if not isinstance(self.run_key, str) or not _RUN_KEY.match(self.run_key):
            raise ProtocolError(f"run-key must be letters, digits, '_', '-' or '.', got {self.run_key!r}")
        unknown = sorted(set(self.engine) - SERVER_ENGINE_KEYS)
        if unknown:
            raise ProtocolError(
                f"engine has keys {unknown} the server may not set; allowed: {sorted(SERVER_ENGINE_KEYS)}"
            )


@dataclass
class TrainReply:
    """What a site returns after training: tensors in the wire dtype, the row ids (as received), metrics.
    A gradient reply holds the segmentation sum's gradient in the three arrays and the modality sum's in
    ``modality_term`` (backbone, task rows, modality rows)."""

    backbone: torch.Tensor
    task_rows: torch.Tensor
    modality_rows: torch.Tensor
    task_row_ids: tuple[int, ...]
    modality_row_ids: tuple[int, ...]
    metrics: dict[str, float]
    modality_term: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


def _shapes(state: Mapping[str, torch.Tensor]) -> list[tuple[str, tuple[int, ...]]]:
    return sorted((k, tuple(v.shape)) for k, v in state.items())


# ------------------------------------------------------------------------------------------------ the site
class Site:
    """One site: config, preprocessed data, local training and evaluation (no Flower here).

    Args:
        config: the validated site config.
        catalog: the task catalog the config was validated against (default: the bundled one); it supplies
            the classes of catalog datasets whose config leaves them out.
        world_size: train with this many CPU processes (DDP, gloo) instead of ``training.devices``
            (for machines without GPUs, e.g. tests).
        log_every: log training progress every this many iterations (default: ten times per round).
        preprocess_workers: worker processes when preprocessing runs on first use.
    """

    def __init__(
        self,
        config: SiteConfig,
        catalog: Catalog | None = None,
        *,
        world_size: int | None = None,
        log_every: int | None = None,
        preprocess_workers: int = 1,
    ) -> None:
        self.config = config
        self.catalog = catalog if catalog is not None else Catalog.load()
        self.devices = resolve_devices(config.training.devices, world_size)
        self.log_every = log_every
        self.preprocess_workers = preprocess_workers

    @classmethod
    def from_path(cls, path: str | Path, catalog: Catalog | None = None, **kwargs: Any) -> Site:
        """Load and validate the site config at ``path`` (see :func:`client.config.load_site_config`)."""
        catalog = catalog if catalog is not None else Catalog.load()
        return cls(load_site_config(path, catalog=catalog), catalog, **kwargs)

    # -- places ------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.config.site

    def state_dir(self, run_key: str) -> Path:
        """``<work_dir>/client_state/<run_key>``: the site's own training state in one run."""
        return self.config.work_dir / STATE_DIR / run_key

    def engine_path(self, run_key: str) -> Path:
        return self.state_dir(run_key) / ENGINE_FILE

    @property
    def primary_device(self) -> torch.device:
        return self.devices[0]

    # -- data --------------------------------------------------------------------------------------
    def _dataset_json(self, ds: DatasetConfig) -> Path:
        return self.config.preprocessed_dir / ds.name / "dataset.json"

    def _plans_match(self, ds: DatasetConfig, plans: Plans) -> bool:
        path = self._dataset_json(ds)
        if not path.is_file():
            return False
        meta = json.loads(path.read_text(encoding="utf-8"))
        return meta.get("plans") == json.loads(json.dumps(plans.preprocessing(ds.modality)))

    def ensure_preprocessed(self, plans: Plans) -> bool:
        """Preprocess the site's data with ``plans`` unless every dataset was made with it; True if it ran.

        Preprocessing is resumable: cases whose settings did not change are kept.
        """
        stale = [ds.name for ds in self.config.datasets if not self._plans_match(ds, plans)]
        if not stale:
            return False
        from client.preprocess import preprocess_site  # SimpleITK only when needed

        atomic_write_json(self.config.work_dir / PLANS_FILE, plans.to_dict())
        logger.info("site %s: preprocessing %s with the federation's plan (%s)", self.name, stale,
                    plans.describe())
        report = preprocess_site(
            self.config, plans, workers=self.preprocess_workers, progress=False, catalog=self.catalog
        )
        logger.info("site %s: %s", self.name, report.summary())
        still = [ds.name for ds in self.config.datasets if not self._plans_match(ds, plans)]
        if still:
            raise RuntimeError(f"site {self.name}: preprocessing produced no data for {still}")
        return True

    def _classes(self, ds: DatasetConfig) -> dict[int, str]:
        return ds.resolved_classes(self.catalog)

    def _num_train_cases(self, ds: DatasetConfig) -> int:
        from client.preprocess import dataset_splits

        train = set(dataset_splits(ds, self.catalog)["train"])
        return sum(1 for c in ds.cases() if c.case_id in train and c.label is not None)

    def describe(self) -> list[DatasetSummary]:
        """The query answer: per dataset its name, modality, classes and number of labelled training cases."""
        return [
            DatasetSummary(ds.name, ds.modality, self._classes(ds), self._num_train_cases(ds))
            for ds in self.config.datasets
        ]

    def fingerprint(self) -> list[DatasetFingerprint]:
        """Aggregate statistics of the site's training data (cached on disk): the planning exchange."""
        from client.fingerprint import site_fingerprint  # SimpleITK only when needed

        return site_fingerprint(self.config, self.catalog)

    def task_ids(self, task_map: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
        """Dataset name -> task id per class (ascending label value), looked up in ``task_map``."""
        out = {}
        for ds in self.config.datasets:
            keys = [f"{ds.name}/{name}" for _, name in sorted(self._classes(ds).items())]
            missing = [k for k in keys if k not in task_map]
            if missing:
                raise ProtocolError(f"task-map has no task id for {missing}; it has {sorted(task_map)}")
            out[ds.name] = tuple(int(task_map[k]) for k in keys)
        return out

    def open_datasets(self, task_map: Mapping[str, int], split: str, plans: Plans) -> list[PreprocessedDataset]:
        """The site's preprocessed datasets restricted to ``split`` (preprocessing first if needed)."""
        self.ensure_preprocessed(plans)
        ids = self.task_ids(task_map)
        out = []
        for ds in self.config.datasets:
            weight, _ = ds.resolved_weights(self.catalog)
            folder = self.config.preprocessed_dir / ds.name
            out.append(PreprocessedDataset.open(folder, ids[ds.name], split=split, sample_weight=weight))
        return out

    # -- model -------------------------------------------------------------------------------------
    @staticmethod
    def _model_factory(request: RoundRequest) -> functools.partial:
        spec = dict(request.model)
        return functools.partial(build_model, spec.pop("name"), **spec)

    def _build_model(self, request: RoundRequest) -> nn.Module:
        try:
            return self._model_factory(request)()
        except (TypeError, ValueError) as exc:
            raise ProtocolError(f"model {request.model!r} cannot be built: {exc}") from None

    def _engine_config(self, request: RoundRequest) -> EngineConfig:
        """The server's engine settings with the site's precision and memory layout for its devices."""
        training = self.config.training
        cuda = self.primary_device.type == "cuda"
        values = {"lr": training.lr, "weight_decay": training.weight_decay, **request.engine}
        values["precision"] = "bf16" if training.bf16 and cuda and torch.cuda.is_bf16_supported() else "fp32"
        values["channels_last"] = bool(training.channels_last and cuda)
        values["proximal_mu"] = float(request.proximal_mu)
        try:
            return EngineConfig.from_dict(values)
        except (TypeError, ValueError) as exc:
            raise ProtocolError(f"engine {request.engine!r} is not a valid engine config: {exc}") from None

    def _restore_local_state(self, engine: TrainEngine, run_key: str) -> bool:
        """Load this run's ``engine.pt`` into ``engine`` (model, EMA, optimiser moments) when it fits.

        The round's hyper-parameters win over the saved ones; the moments are dropped when the optimiser
        changed. Returns whether a state was loaded.
        """
        path = self.engine_path(run_key)
        if not path.is_file():
            return False
        saved = torch.load(path, weights_only=True, map_location=engine.device)
        if _shapes(saved.get("model", {})) != _shapes(engine.model.state_dict()):
            logger.warning("site %s: the saved engine state does not fit the model; not used", self.name)
            return False
        fresh = engine.optimizer.state_dict()
        optimizer = saved.get("optimizer", {})
        groups = optimizer.get("param_groups", [])
        if saved.get("config", {}).get("optimizer") != engine.config.optimizer or len(groups) != len(
            fresh["param_groups"]
        ):
            logger.warning("site %s: the optimiser changed; its saved moments are dropped", self.name)
            optimizer = fresh
        else:
            hyper = [{k: g[k] for k in HYPER_PARAMETERS if k in g} for g in fresh["param_groups"]]
            merged = [{**g, **h} for g, h in zip(groups, hyper, strict=True)]
            optimizer = {**optimizer, "param_groups": merged}
        engine.load_state_dict({**saved, "optimizer": optimizer, "config": engine.config.to_dict()})
        return True

    @staticmethod
    def _apply_received(model: nn.Module, request: RoundRequest) -> StateLayout:
        """Write the received backbone and prior rows into ``model`` in place."""
        layout = StateLayout.from_model(model)
        state = model.state_dict()
        try:
            layout.load_backbone(state, request.backbone.float())
            layout.load_task_rows(state, request.task_row_ids, request.task_rows.float())
            layout.load_modality_rows(state, request.modality_row_ids, request.modality_rows.float())
        except ValueError as exc:
            raise ProtocolError(str(exc)) from None
        return layout

    def _engine(self, request: RoundRequest, device: torch.device) -> tuple[TrainEngine, StateLayout, bool]:
        """The round's engine on ``device``: the site's saved state, overwritten by the received tensors,
        at the round's schedule position, with the received weights as FedProx reference when mu > 0."""
        engine = TrainEngine(self._build_model(request), self._engine_config(request), device)
        stepping = request.local_update == "steps"  # a gradient round takes no step: no optimiser state to load
        resumed = stepping and request.keep_local_state and self._restore_local_state(engine, request.run_key)
        layout = self._apply_received(engine.model, request)
        engine.iteration = request.schedule_iteration
        engine.set_proximal_reference(engine.model.state_dict() if request.proximal_mu > 0 else None)
        return engine, layout, resumed

    # -- train -------------------------------------------------------------------------------------
    def train(self, request: RoundRequest) -> TrainReply:
        """Train the received weights for ``local_iterations`` steps; save the engine; reply."""
        start = time.perf_counter()
        self._apply_threads()
        self._seed_torch(request, 0)
        datasets = self.open_datasets(request.task_map, "train", request.plans)
        multi = len(self.devices) > 1
        gpu = self.primary_device if self.primary_device.type == "cuda" and not multi else None
        if gpu is not None:
            torch.cuda.reset_peak_memory_stats(gpu)
        engine, layout, resumed = self._engine(request, torch.device("cpu") if multi else self.primary_device)
        training = self.config.training
        data = TrainData(
            datasets=tuple(datasets),
            patch_size=tuple(reversed(request.plans.patch_size)),  # plan (x, y, z) -> arrays (D, H, W)
            batch_size=training.batch_size,
            seed=round_sampling_seed(request.seed, request.server_round, self.name, training.seed),
            num_workers=training.num_workers,
            foreground_prob=training.foreground_oversample,
        )
        if request.local_update == "gradient":
            return self._gradient_reply(request, engine, layout, data, start)
        logger.info(
            "site %s: round %d, %d iterations from schedule position %d on %s (%s local state)",
            self.name, request.server_round, request.local_iterations, request.schedule_iteration,
            [str(d) for d in self.devices], "with" if resumed else "no",
        )
        result = train_local(
            engine, self._model_factory(request), data, request.local_iterations, self.devices,
            scratch_dir=self.state_dir(request.run_key), log_every=self.log_every,
        )
        engine.save(self.engine_path(request.run_key))
        state = engine.model.state_dict()
        metrics = {NUM_EXAMPLES: result.samples, **result.metrics(),
                   "train-time-s": time.perf_counter() - start}
        if gpu is not None:  # one device: this process's peak (DDP workers are other processes)
            metrics["gpu-peak-mib"] = torch.cuda.max_memory_allocated(gpu) / 2**20
        self._log_round("train", request, metrics, result)
        return TrainReply(
            backbone=to_wire(layout.backbone(state), request.wire_dtype),
            task_rows=to_wire(layout.task_rows(state, request.task_row_ids), request.wire_dtype),
            modality_rows=to_wire(layout.modality_rows(state, request.modality_row_ids), request.wire_dtype),
            task_row_ids=request.task_row_ids,
            modality_row_ids=request.modality_row_ids,
            metrics=metrics,
        )

    def _gradient_reply(self, request: RoundRequest, engine: TrainEngine, layout: StateLayout, data: TrainData,
                        start: float) -> TrainReply:
        """The gradients of the loss's two sums on one batch of this round (on the primary device, one
        process), in exchange form; nothing is trained or saved."""
        if engine.device != self.primary_device:
            engine = TrainEngine(engine.model, engine.config, self.primary_device)
        batch = next(iter(data.loader(1)))
        parts = engine.loss_sum_gradients(batch)
        samples = int(batch["image"].shape[0])
        metrics = {NUM_EXAMPLES: samples, **{k: parts.metrics[k] for k in ("loss", "bce", "dice")},
                   LOSS_TOKENS: parts.tokens, KNOWN_MODALITY: parts.known_modality,
                   "train-time-s": time.perf_counter() - start}
        logger.info("site %s: round %d, the gradient of one batch of %d (loss %.4f)", self.name,
                    request.server_round, samples, parts.metrics["loss"])

        def wire(grads: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            return (to_wire(layout.backbone(grads), request.wire_dtype),
                    to_wire(layout.task_rows(grads, request.task_row_ids), request.wire_dtype),
                    to_wire(layout.modality_rows(grads, request.modality_row_ids), request.wire_dtype))

        return TrainReply(*wire(parts.segmentation), request.task_row_ids, request.modality_row_ids, metrics,
                          modality_term=wire(parts.modality))

    # -- evaluate ----------------------------------------------------------------------------------
    def evaluate(self, request: RoundRequest) -> dict[str, float]:
        """Whole-scan Dice of the received weights on the validation split, at each scan's native geometry.

        Every validation scan is segmented whole (preprocessed without any label-based crop) through
        :func:`client.predict.segment_preprocessed`, the code path of ``hermes-predict``, and scored against
        its original label with :func:`client.evaluate.evaluate_case`, the code of ``hermes-evaluate``.

        Returns:
            ``num-examples`` (validation cases), ``dice/<dataset>/<class>`` (mean over the cases where the
            class is present; tasks never present are left out), ``dice-mean`` (mean of those; left out
            when there is none), the same with ``dice-paper`` (the paper's convention: training grid,
            cropped around the label; not what a user gets) and ``eval-time-s``.
        """
        start = time.perf_counter()
        self._apply_threads()
        self._seed_torch(request, 1)
        self.ensure_preprocessed(request.plans)
        # the site's tasks and modalities are exactly the rows received: no local state is needed
        model = self._build_model(request)
        self._apply_received(model, request)
        model = model.to(self.primary_device).eval()
        cases = self._validation_cases()
        scores: dict[str, dict[str, list[float]]] = {"dice": {}, "dice-paper": {}}
        task_ids = self.task_ids(request.task_map)
        for i, (ds, case) in enumerate(cases):
            for row in self._evaluate_case(model, ds, case, task_ids[ds.name], request.plans):
                for metric, column in (("dice", "dice"), ("dice-paper", "dice_paper")):
                    if math.isfinite(row[column]):
                        scores[metric].setdefault(row["class"], []).append(row[column])
            logger.info("site %s: evaluated validation case %d/%d", self.name, i + 1, len(cases))
        metrics: dict[str, float] = {NUM_EXAMPLES: len(cases)}
        for metric, table in scores.items():
            per_task = {f"{metric}/{key}": float(np.mean(v)) for key, v in sorted(table.items())}
            metrics.update(per_task)
            if per_task:
                metrics[f"{metric}-mean"] = float(np.mean(list(per_task.values())))
        metrics["eval-time-s"] = time.perf_counter() - start
        self._log_round("evaluate", request, metrics)
        return metrics

    def _validation_cases(self) -> list[tuple[DatasetConfig, CaseSpec]]:
        """The labelled validation cases that were preprocessed, per dataset in config order."""
        out = []
        for ds in self.config.datasets:
            meta = json.loads(self._dataset_json(ds).read_text(encoding="utf-8"))
            val = set(meta["splits"]["val"])
            out += [(ds, c) for c in ds.cases() if c.case_id in val and c.label is not None]
        return out

    def _evaluate_case(self, model: nn.Module, ds: DatasetConfig, case: CaseSpec, task_ids: Sequence[int],
                       plans: Plans) -> list[dict[str, Any]]:
        """Rows of :func:`client.evaluate.evaluate_case` for one validation case (classes named
        ``<dataset>/<class>``; the prediction's value ``i + 1`` is the dataset's ``i``-th class)."""
        from client.evaluate import ClassSpec, evaluate_case
        from client.predict import InferenceOptions, segment_preprocessed
        from client.preprocess import align_label, map_label_values, read_image, read_label

        folder = self.config.preprocessed_dir / ds.name
        meta = json.loads((folder / f"{case.case_id}.json").read_text(encoding="utf-8"))
        image_zyx = np.load(folder / f"{case.case_id}.npy", allow_pickle=False)
        options = InferenceOptions.from_plans(plans, overlap=EVAL_OVERLAP, progress=False)
        predicted = segment_preprocessed(model, image_zyx, meta, task_ids, modality_id(ds.modality), options,
                                         self.primary_device)
        classes = sorted(self._classes(ds).items())
        image = read_image(case.image, frame=case.frame)
        label = map_label_values(read_label(case, image), [v for v, _ in classes], ds.ignore_values)
        reference, _ = align_label(label, image, ds.resample_label)
        specs = [ClassSpec(f"{ds.name}/{name}", (i + 1,), (value,)) for i, (value, name) in enumerate(classes)]
        return evaluate_case(predicted, reference, specs, name=f"{ds.name}/{case.case_id}", plans=plans,
                             metrics=EVAL_METRICS)

    # the CPU threads of this process when a site first ran in it (Ray's OMP_NUM_THREADS in a simulated site)
    _process_threads: int | None = None

    def _apply_threads(self) -> None:
        """Fix the CPU threads of the site's work: ``training.threads``, else the count this process had when a
        site first ran in it. A process may run several sites one after another (Ray's actors in a simulation
        take whichever site comes next): without this a site would inherit the count another site set, and a
        float reduction split over another number of threads rounds differently (the run would depend on
        which actor took which site)."""
        if Site._process_threads is None:
            Site._process_threads = torch.get_num_threads()
        threads = self.config.training.threads or Site._process_threads
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
            logger.info("site %s: %d CPU thread(s) (%s)", self.name, threads,
                        "training.threads" if self.config.training.threads else "this process's default")

    def _seed_torch(self, request: RoundRequest, stream: int) -> None:
        """Seed torch's global generators (CPU and every GPU) from (federation seed, round, site seed, site
        name, ``stream``): a new process starts them from a random seed, and the model built for the round
        draws its initial weights (the prior rows the server does not send) from them."""
        torch.manual_seed(derived_seed(request.seed, request.server_round, self.config.training.seed, stream,
                                       *self.name.encode()))

    # -- local history -----------------------------------------------------------------------------
    def _log_round(self, kind: str, request: RoundRequest, metrics: Mapping[str, float],
                   result: LocalResult | None = None) -> None:
        line = {"kind": kind, "round": request.server_round, "time": time.time(), **metrics}
        if result is not None:
            line["world_size"] = result.world_size
        logger.info("site %s: %s round %d: %s", self.name, kind, request.server_round,
                    ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        folder = self.state_dir(request.run_key)
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / HISTORY_FILE).open("a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
