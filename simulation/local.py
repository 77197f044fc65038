"""Training without Flower, for the two baselines of a simulated federation.

Both reuse the site code of the federation (:class:`client.site.Site`): the same data, preprocessing,
training engine, recipe, schedule and sliding-window evaluation.

- :func:`run_local_only`: each site trains alone. It is FedAvg with one site: every round the site
  trains ``local_iterations`` steps from its own weights of the previous round (its optimiser state kept
  on its disk), so each site makes the same number of local steps as in the federated run, and it is
  evaluated on its own validation split.
- :func:`run_centralized`: one model on the POOLED training splits of all sites for ``rounds x
  local_iterations`` steps, each step on the union of the sites' batches (:func:`union_data`): exactly the
  patches the sites of the federated run draw, with its learning-rate schedule. It is evaluated on every
  site's validation split.

All three arms draw a site's patches of a round with :func:`client.dataset.round_sampling_seed`.

Both write ``metrics.jsonl`` lines in the server's format (``phase`` train/evaluate, ``scope`` site, the
site's metrics), so the report code is the same for every mode.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from client.dataset import round_sampling_seed
from client.local_training import TrainData, UnionData, resolve_devices, train_local
from client.site import RoundRequest, Site
from hermes_model.catalog import Catalog
from hermes_model.engine import EngineConfig, TrainEngine
from hermes_model.exchange import NUM_EXAMPLES, StateLayout
from hermes_model.factory import build_model
from hermes_model.plans import Plans, catalog_digest
from hermes_model.trained import TrainedTask
from server.bank import PriorBank, SiteOwnership, parse_site_datasets
from server.checkpoint import METRICS_FILE, RAW_WEIGHTS, WEIGHTS_FIELD, save_final_model
from server.config import ServerConfig
from server.outer import ServerEMA
from server.runner import UNSIZED_TASK_SLOTS, decide_task_slots, initial_catalog, initial_model, model_spec, new_run_key
from server.state import GlobalState

logger = logging.getLogger(__name__)

CENTRALIZED_SITE = "centralized"


@dataclass
class Federation:
    """The sites of a run registered the way the server registers them (sorted by site name).

    Attributes:
        config: the server settings of the run.
        model: the round-0 model (the federated run's initial weights).
        catalog: the catalog with the sites' new datasets registered.
        sites: the sites, by name.
        ownership: site name -> its task ids, modality rows and task map.
        plans: the plan the server would decide (with the model's build arguments).
        run_key: the sites' local state of this run lives under this name.
    """

    config: ServerConfig
    model: nn.Module
    catalog: Catalog
    sites: dict[str, Site]
    ownership: dict[str, SiteOwnership]
    plans: Plans
    run_key: str

    def model_spec(self) -> dict[str, Any]:
        layout = StateLayout.from_model(self.model)
        spec = dict(getattr(self.model, "hermes_config", {"name": self.config.model}))
        spec.update(task_slots=layout.task_slots, modality_slots=layout.modality_slots)
        return spec

    def request(self, site: str, model: nn.Module, server_round: int) -> RoundRequest:
        """The train/evaluate request the server would send ``site`` with the weights of ``model``."""
        own = self.ownership[site]
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        layout = StateLayout.from_state_dict(state)
        iterations = self.config.local_iterations
        return RoundRequest(
            server_round=server_round,
            backbone=layout.backbone(state).float(),
            task_rows=layout.task_rows(state, own.task_ids).float(),
            modality_rows=layout.modality_rows(state, own.modality_rows).float(),
            task_row_ids=own.task_ids,
            modality_row_ids=own.modality_rows,
            model=self.model_spec(),
            task_map=dict(own.task_map),
            engine=self.config.engine_config(),
            local_iterations=iterations,
            schedule_iteration=(server_round - 1) * iterations,
            seed=self.config.seed,
            plans=self.plans,
            run_key=self.run_key,
        )


def build_federation(config: ServerConfig, site_paths: Sequence[str | os.PathLike]) -> Federation:
    """The round-0 model, catalog and plan of ``config`` with the sites at ``site_paths`` registered, as
    the server of a federated run decides them (the bank sized from the sites, the same seed)."""
    catalog = initial_catalog(config)
    sites = {s.name: s for s in (Site.from_path(p, catalog=catalog) for p in site_paths)}
    declared = {n: parse_site_datasets(json.dumps([d.to_dict() for d in sites[n].describe()])) for n in sites}
    admission = PriorBank(UNSIZED_TASK_SLOTS, config.modality_slots)
    for name in sorted(sites):
        admission.register_site(name, declared[name], catalog)
    slots = decide_task_slots(config, catalog)
    model = initial_model(config, slots)
    layout = StateLayout.from_model(model)
    bank = PriorBank(layout.task_slots, layout.modality_slots)
    ownership = {name: bank.register_site(name, declared[name], catalog) for name in sorted(sites)}
    plans = config.plans().with_model(model_spec(model, config), catalog_digest(catalog.to_dict()))
    return Federation(config, model, catalog, sites, ownership, plans, new_run_key(config))


def _load_reply(model: nn.Module, request: RoundRequest, reply: Any) -> None:
    state = model.state_dict()
    layout = StateLayout.from_state_dict(state)
    layout.load_backbone(state, reply.backbone.float())
    layout.load_task_rows(state, request.task_row_ids, reply.task_rows.float())
    layout.load_modality_rows(state, request.modality_row_ids, reply.modality_rows.float())


def _line(server_round: int, phase: str, site: str, metrics: Mapping[str, float]) -> dict[str, Any]:
    return {"round": server_round, "phase": phase, "scope": "site", "site": site, "status": "ok",
            **{k: float(v) for k, v in metrics.items()}}


def append_metrics(run_dir: Path, lines: Sequence[Mapping[str, Any]]) -> None:
    """Append JSON lines to ``<run_dir>/metrics.jsonl``."""
    with (run_dir / METRICS_FILE).open("a", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line, sort_keys=True) + "\n")


def _evaluation_lines(fed: Federation, server_round: int, name: str, handed_over: nn.Module,
                      raw: nn.Module) -> list[dict[str, Any]]:
    """Site ``name``'s evaluation lines of ``server_round``: the weights handed over (EMA or raw, as the config
    says) where the round evaluates, and the raw weights too, tagged, where the config also scores them."""
    site, lines = fed.sites[name], []
    if fed.config.evaluates(server_round):
        metrics = site.evaluate(fed.request(name, handed_over, server_round))
        lines.append(_line(server_round, "evaluate", name, metrics))
    if fed.config.evaluates_raw(server_round):
        metrics = site.evaluate(fed.request(name, raw, server_round))
        lines.append({**_line(server_round, "evaluate", name, metrics), WEIGHTS_FIELD: RAW_WEIGHTS})
    return lines


# ----------------------------------------------------------------------------------------------- local only
def run_local_only(fed: Federation, run_dir: str | os.PathLike) -> dict[str, float]:
    """Train every site alone (module docstring); write metric lines and ``models/<site>.pt``.

    Returns:
        Site name -> seconds of local training (sum over rounds).
    """
    run_dir = Path(run_dir)
    train_seconds: dict[str, float] = {}
    layout, steps = StateLayout.from_model(fed.model), fed.config.local_iterations
    for name in sorted(fed.sites):
        site, model = fed.sites[name], copy.deepcopy(fed.model)
        ema = ServerEMA(EngineConfig.ema_decay)  # as the server keeps it: the recipe's decay per step
        train_seconds[name], samples = 0.0, 0.0
        for server_round in range(1, fed.config.num_server_rounds + 1):
            request = fed.request(name, model, server_round)
            reply = site.train(request)
            train_seconds[name] += float(reply.metrics.get("train-time-s", 0.0))
            samples += float(reply.metrics[NUM_EXAMPLES])
            _load_reply(model, request, reply)
            ema.update(GlobalState.from_state_dict(layout, model.state_dict()), (server_round - 1) * steps, steps)
            handed_over = ema.state.in_copy_of(layout, model) if fed.config.evaluate_ema else model
            lines = [_line(server_round, "train", name, reply.metrics),
                     *_evaluation_lines(fed, server_round, name, handed_over, model)]
            append_metrics(run_dir, lines)
            logger.info("local-only %s: round %d/%d done", name, server_round, fed.config.num_server_rounds)
        own = fed.ownership[name]
        trained = {t: TrainedTask(t, samples, own.task_modalities.get(t, ()), fed.config.num_server_rounds)
                   for t in own.task_ids}
        raw_state = model.state_dict() if handed_over is not model else None
        save_final_model(run_dir / "models" / f"{name}.pt", handed_over, fed.catalog, fed.plans, trained,
                         raw_state=raw_state, site=name, mode="local-only")
    return train_seconds


# ----------------------------------------------------------------------------------------------- centralized
def union_data(fed: Federation, server_round: int, processes: int = 1) -> UnionData:
    """The batches of ``server_round`` in every arm: each site's own datasets and batch size, its patches
    drawn with :func:`client.dataset.round_sampling_seed` (as its ClientApp draws them), concatenated site
    by site. With several ``processes`` each takes an equal share of every site's batch."""
    parts = []
    for name in sorted(fed.sites):
        site, training = fed.sites[name], fed.sites[name].config.training
        if training.batch_size % processes:
            raise ValueError(f"site {name!r}: batch size {training.batch_size} does not split over {processes} "
                             "training processes; use a number of devices that divides every site's batch size")
        parts.append(TrainData(
            datasets=tuple(site.open_datasets(fed.ownership[name].task_map, "train", fed.plans)),
            patch_size=tuple(reversed(fed.plans.patch_size)),
            batch_size=training.batch_size // processes,
            seed=round_sampling_seed(fed.config.seed, server_round, name, training.seed),
            num_workers=training.num_workers,
            foreground_prob=training.foreground_oversample,
        ))
    return UnionData(tuple(parts))


def _engine_config(fed: Federation, device: torch.device) -> EngineConfig:
    first = fed.sites[sorted(fed.sites)[0]].config.training
    cuda = device.type == "cuda"
    values: dict[str, Any] = {
        "lr": first.lr, "weight_decay": first.weight_decay, **fed.config.engine_config()
    }
    values["precision"] = "bf16" if first.bf16 and cuda and torch.cuda.is_bf16_supported() else "fp32"
    values["channels_last"] = bool(first.channels_last and cuda)
    return EngineConfig.from_dict(values)


def run_centralized(
    fed: Federation, run_dir: str | os.PathLike, devices: Sequence[torch.device] | None = None
) -> CentralizedResult:
    """Train one model on the pooled training splits (module docstring); write metric lines. Evaluation
    uses the EMA when the server config's ``evaluate_ema`` says so, as a federated run does.

    Args:
        devices: training devices (default: every GPU, else the CPU); several devices train with DDP.
    """
    run_dir = Path(run_dir)
    devices = list(devices) if devices is not None else resolve_devices("auto")
    multi = len(devices) > 1
    engine = TrainEngine(copy.deepcopy(fed.model), _engine_config(fed, devices[0]),
                         torch.device("cpu") if multi else devices[0])
    spec = fed.model_spec()
    factory: Callable[[], nn.Module] = _Factory(spec)
    iterations, seconds = fed.config.local_iterations, 0.0
    scratch = run_dir / "centralized_state"
    task_samples: Counter[int] = Counter()
    for server_round in range(1, fed.config.num_server_rounds + 1):
        engine.iteration = (server_round - 1) * iterations
        start = time.perf_counter()
        result = train_local(engine, factory, union_data(fed, server_round, len(devices)), iterations, devices,
                             scratch_dir=scratch)
        took = time.perf_counter() - start
        seconds += took
        task_samples.update(result.task_samples)
        metrics = {NUM_EXAMPLES: result.samples, **result.metrics(), "train-time-s": took}
        handed_over = engine.ema.module if fed.config.evaluate_ema else engine.model
        lines = [_line(server_round, "train", CENTRALIZED_SITE, metrics)]
        for name in sorted(fed.sites):
            lines += _evaluation_lines(fed, server_round, name, handed_over, engine.model)
        append_metrics(run_dir, lines)
        logger.info("centralized: round %d/%d done (%.1f s)", server_round, fed.config.num_server_rounds,
                    took)
    modalities: dict[int, set[str]] = {}
    for own in fed.ownership.values():
        for task, mods in own.task_modalities.items():
            modalities.setdefault(task, set()).update(mods)
    trained = {t: TrainedTask(t, float(n), tuple(sorted(modalities.get(t, ()))), fed.config.num_server_rounds)
               for t, n in sorted(task_samples.items())}
    return CentralizedResult(engine.model.cpu().eval(), engine.ema.module.cpu().eval(), seconds, trained)


@dataclass(frozen=True)
class CentralizedResult:
    """The pooled model's raw weights and its EMA (the recipe's decay per step), the seconds of training
    (sum over rounds) and its trained-task table (samples per task, modalities of the datasets holding it)."""

    model: nn.Module
    ema: nn.Module
    seconds: float
    trained: dict[int, TrainedTask]


@dataclass(frozen=True)
class _Factory:
    """Picklable ``build_model`` call (for the DDP processes)."""

    spec: Mapping[str, Any]

    def __call__(self) -> nn.Module:
        spec = dict(self.spec)
        return build_model(spec.pop("name"), **spec)
