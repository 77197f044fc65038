"""The three kinds of ``hermes-sim`` runs: federated (Flower simulation engine), local-only, centralized.

Every run lives in one run directory::

    sites/<site>.yaml, sites/<site>/     the run's copies of the site configs and the sites' state
    checkpoints/round_XXXX.pt            round checkpoints (federated run: the server's, resumable)
    metrics.jsonl                        one line per site per round (and aggregate lines)
    final_model.pt                       the final global model (load_checkpoint / hermes-predict)
    models/<site>.pt                     local-only: each site's own final model
    report.csv, report.json, *.png       the report (simulation.report)
    logs/                                Flower, SuperLink and Ray output (federated run)

All three use the same :class:`server.config.ServerConfig` (model, seed, recipe, schedule) built by
:func:`server_config`, so their initial weights, learning-rate schedule and number of training samples
match.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from client.app import SITE_CONFIGS_KEY
from hermes_model.catalog import Catalog
from server.app import read_run_status
from server.checkpoint import FINAL_MODEL, RunStore, load_round_checkpoint, save_final_model
from server.config import ServerConfig
from simulation.flower import (
    LOCAL_RAY,
    RAY_ADDRESS_ENV,
    RayNode,
    ray_cluster_nodes,
    run_flower_simulation,
    sites_that_fit,
)
from simulation.local import build_federation, run_centralized, run_local_only
from simulation.report import (
    PAPER_DICE,
    DiceReport,
    final_dice,
    first_last_loss,
    format_report,
    read_metrics,
    write_run_report,
)
from simulation.sites import REPO_ROOT, StagedSite, demo_site_paths, stage_sites

logger = logging.getLogger(__name__)

MODES = ("federated", "local-only", "centralized")
# demo defaults: base 8, 32^3 patches at 3 mm, 5 sites; see the README for the time and Dice measured
# 60 rounds of 5 local steps with the server's Nesterov step (server.yaml's default optimiser): of the modes
# benchmarks/federated_vs_centralized.py compares at the same samples per site, the closest to centralized
DEFAULT_ROUNDS = 60
DEFAULT_LOCAL_ITERATIONS = 5
DEFAULT_BASE_CHANNELS = 8
DEFAULT_SPACING = (3.0, 3.0, 3.0)  # the demo's plan: coarse enough for a 2-core CPU (the recipe: 1.5 mm)
DEFAULT_PATCH = (32, 32, 32)  # (the recipe: 128)
DEMO_TRAIN_MARGIN = 8
DEMO_INTERPOLATION = "linear"
QUICK_ROUNDS = 2
# how the federation trains (SimOptions and ServerConfig fields): a federated run's report records them
FEDERATION_SETTINGS = ("strategy", "proximal_mu", "server_optimizer", "server_lr", "local_update", "keep_local_state")
DEFAULT_EVALUATIONS = 5  # validation points of a run's Dice curve
QUICK_LOCAL_ITERATIONS = 10


@dataclass
class SimOptions:
    """What a ``hermes-sim`` run does.

    Attributes:
        sites: site config files (default: the bundled demo federation; ``quick``: two of its sites).
        rounds: federated rounds (local-only and centralized: the same number of rounds of
            ``local_iterations`` steps).
        local_iterations: optimiser steps per site per round.
        model: the network (a name of ``hermes_model.available_models()``).
        base_channels: width of the network (Hermes-R; Hermes-M has fixed widths).
        spacing / patch_size: the federation's plan, (x, y, z) mm and voxels (the demo's 3 mm and 32^3;
            with a training crop margin of 8 voxels and linear resampling).
        run_dir: the run directory (default: a new folder under ``runs/``).
        cpus_per_site / gpus_per_site: resources of one virtual site (Ray); None = automatic: the
            machine's cores shared by the sites (:func:`auto_cpus_per_site`; with fewer cores than sites
            all of them run at once, :func:`ray_cpus`), the visible GPUs shared by the sites (at most one
            each; 0 without a GPU). An explicit ``cpus_per_site`` is taken literally.
        evaluate_every: evaluate every N rounds (the last round always); None = :func:`default_evaluate_every`.
        evaluate_raw: the last round also evaluates the raw weights beside the EMA (the report shows both).
        seed: seed of the initial weights and the patch sampling.
        lr: base learning rate.
        strategy, proximal_mu, server_optimizer, server_lr, local_update: the server's aggregation (the
            sites' local steps ``server.config.STRATEGIES``; FedProx's mu; the server optimiser
            ``server.outer`` and its learning rate, None = its default; steps or one batch's gradient per
            round); federated runs only. keep_local_state: sites keep their optimiser state between rounds.
        quick: the small smoke-test schedule (2 rounds, 2 sites, few steps) unless set explicitly.
        echo: copy Flower's output to the console.
        resume: continue the federated run in ``run_dir`` from its latest round checkpoint (up to
            ``rounds``), with the sites' saved state.
        ray_address: run the virtual sites of a federated run on the existing Ray cluster at this address
            (``HOST:PORT`` of its head); the automatic resources then come from the cluster's nodes. None:
            the ``RAY_ADDRESS`` environment variable if set, else a private Ray on this machine; ``"local"``:
            a private Ray whatever ``RAY_ADDRESS`` says.
    """

    sites: list[Path] = field(default_factory=list)
    rounds: int | None = None
    local_iterations: int | None = None
    model: str = "hermes-r"
    base_channels: int = DEFAULT_BASE_CHANNELS
    spacing: tuple[float, float, float] = DEFAULT_SPACING
    patch_size: tuple[int, int, int] = DEFAULT_PATCH
    run_dir: Path | None = None
    cpus_per_site: int | None = None
    gpus_per_site: float | None = None
    evaluate_every: int | None = None
    evaluate_raw: bool = True
    seed: int = 0
    lr: float = 2e-3
    strategy: str = ServerConfig.model_fields["strategy"].default
    proximal_mu: float = 0.0
    server_optimizer: str = ServerConfig.model_fields["server_optimizer"].default
    local_update: str = "steps"
    keep_local_state: bool = True
    server_lr: float | None = None
    quick: bool = False
    echo: bool = True
    resume: bool = False
    ray_address: str | None = None

    def __post_init__(self) -> None:
        if self.rounds is None:
            self.rounds = QUICK_ROUNDS if self.quick else DEFAULT_ROUNDS
        if self.local_iterations is None:
            self.local_iterations = QUICK_LOCAL_ITERATIONS if self.quick else DEFAULT_LOCAL_ITERATIONS
        if not self.sites:
            self.sites = demo_site_paths(quick=self.quick)
        self.sites = [Path(p) for p in self.sites]
        for name in ("rounds", "local_iterations", "base_channels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name.replace('_', '-')} must be an int >= 1, got {value!r}")
        if self.evaluate_every is None:
            self.evaluate_every = default_evaluate_every(self.rounds)
        every = self.evaluate_every
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ValueError(f"evaluate-every must be >= 0, got {self.evaluate_every!r}")
        if self.cpus_per_site is not None and (
            isinstance(self.cpus_per_site, bool) or not isinstance(self.cpus_per_site, int) or self.cpus_per_site < 1
        ):
            raise ValueError(f"cpus-per-site must be a whole number >= 1, got {self.cpus_per_site!r}")
        if self.gpus_per_site is not None and not 0 <= self.gpus_per_site <= 1:
            raise ValueError(
                f"gpus-per-site must be in [0, 1] (a fraction of one GPU), got {self.gpus_per_site!r}"
            )
        if self.ray_address is not None and (not isinstance(self.ray_address, str) or not self.ray_address.strip()):
            raise ValueError(f"ray-address must be a non-empty address such as HOST:6379, got {self.ray_address!r}")


def default_evaluate_every(rounds: int, evaluations: int = DEFAULT_EVALUATIONS) -> int:
    """Evaluate every this many rounds: about ``evaluations`` times in a run of six rounds or more (a curve
    of whole-scan Dice; the demo: rounds 12, 24, 36, 48 and 60), else in the last round only."""
    return max(1, rounds // evaluations) if rounds >= 6 else rounds


@dataclass
class SimResult:
    """The outcome of a run: its folder, Dice report and timing."""

    mode: str
    run_dir: Path
    report: DiceReport
    summary: dict[str, Any]
    files: list[Path]


# ----------------------------------------------------------------------------------------------- settings
def new_run_dir(mode: str, root: str | os.PathLike | None = None) -> Path:
    """A new folder ``<root>/<mode>-<YYYYmmdd-HHMMSS>[-N]`` (default root: ``runs/`` of the working
    folder)."""
    base = Path(root) if root is not None else Path.cwd() / "runs"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = base / f"{mode}-{stamp}", 1
    while path.exists():
        n += 1
        path = base / f"{mode}-{stamp}-{n}"
    return path


def _this_machine() -> list[RayNode]:
    """This machine as the one node of a private Ray instance (its cores and visible GPUs)."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [RayNode(float(os.cpu_count() or 1), float(gpus))]


def auto_gpus_per_site(num_sites: int, nodes: Sequence[RayNode] | None = None) -> float:
    """The GPUs of ``nodes`` (None: this machine's visible GPUs) shared by ``num_sites`` sites: the largest
    share (at most one GPU) with which every site fits on some node at once; 0 without GPUs."""
    nodes = _this_machine() if nodes is None else nodes
    if sum(n.gpus for n in nodes) == 0:
        return 0.0
    # a fitting share is a node's GPUs split k ways; the largest one that holds every site wins
    candidates = sorted({min(1.0, n.gpus / k) for n in nodes if n.gpus > 0 for k in range(1, num_sites + 1)},
                        reverse=True)
    share = next((c for c in candidates if sites_that_fit(nodes, 0, c) >= num_sites), candidates[-1])
    return math.floor(share * 100) / 100  # a little under the exact share, so every site fits


def auto_cpus_per_site(num_sites: int, nodes: Sequence[RayNode] | None = None) -> int:
    """The cores of ``nodes`` (None: this machine's) shared by ``num_sites`` sites: the most whole cores per
    site with which every site fits on some node at once (at least one each)."""
    if nodes is None:
        return max(1, (os.cpu_count() or 1) // num_sites)
    most = int(max(n.cpus for n in nodes))
    return next((c for c in range(most, 0, -1) if sites_that_fit(nodes, c, 0.0) >= num_sites), 1)


def ray_cpus(num_sites: int, cpus_per_site: int, gpus_per_site: float, cluster: bool = False) -> int | None:
    """CPUs Ray should schedule: on a CPU-only machine with fewer cores than the sites need, enough for
    all sites at once (they time-share the cores instead of queueing, so no core idles while the last
    sites of a round train: with 5 sites on 2 cores a round is 2.5 site-times instead of 3); else None
    (Ray's own count). Always None on an existing ``cluster``: Ray refuses ``num_cpus`` when it joins one
    (its sites beyond the cluster's CPUs wait for a free one)."""
    needed = num_sites * cpus_per_site
    if cluster or gpus_per_site > 0 or needed <= (os.cpu_count() or 1):
        return None
    return needed


def parallel_sites(num_sites: int, cpus_per_site: int, gpus_per_site: float,
                   scheduled_cpus: int | None = None, nodes: Sequence[RayNode] | None = None) -> int:
    """How many virtual sites Ray runs at the same time, on ``nodes`` (a cluster) or on this machine with
    the CPUs Ray schedules there (``scheduled_cpus``; None: the machine's)."""
    if nodes is None:
        nodes = _this_machine()
        if scheduled_cpus:
            nodes = [RayNode(float(scheduled_cpus), nodes[0].gpus)]
    return max(1, min(num_sites, sites_that_fit(nodes, cpus_per_site, gpus_per_site)))


def server_config(opts: SimOptions, staged: Sequence[StagedSite], run_dir: Path) -> ServerConfig:
    """The server settings shared by all modes: the server's own defaults (a schedule fitted to the run,
    a prior bank sized from the sites) with the run's length, model and plan (spacing, patch size)."""
    assert opts.rounds is not None and opts.local_iterations is not None
    server_lr = {} if opts.server_lr is None else {"server_lr": opts.server_lr}
    return ServerConfig(
        num_server_rounds=opts.rounds,
        local_iterations=opts.local_iterations,
        min_sites=len(staged),
        start_timeout_s=900.0,
        query_timeout_s=900.0,
        poll_interval_s=0.1,  # replies come from this machine's Ray actors: look often (as Flower's own grid)
        evaluate_every=opts.evaluate_every,
        evaluate_raw=opts.evaluate_raw,
        run_dir=str(run_dir),
        resume=opts.resume,
        model=opts.model,
        base_channels=opts.base_channels,
        seed=opts.seed,
        lr=opts.lr,
        target_spacing=",".join(f"{v:g}" for v in opts.spacing),
        patch_size=",".join(str(v) for v in opts.patch_size),
        train_margin=DEMO_TRAIN_MARGIN,
        interpolation=DEMO_INTERPOLATION,
        strategy=opts.strategy,
        proximal_mu=opts.proximal_mu,
        server_optimizer=opts.server_optimizer,
        local_update=opts.local_update,
        keep_local_state=opts.keep_local_state,
        **server_lr,
    )


def _prepare(opts: SimOptions, mode: str) -> tuple[Path, list[StagedSite], ServerConfig]:
    run_dir = (opts.run_dir or new_run_dir(mode)).resolve()
    if opts.resume and (mode != "federated" or opts.run_dir is None):
        raise ValueError("--resume continues a federated run: give its --run-dir (local-only and "
                         "centralized runs start over)")
    held = (run_dir / "metrics.jsonl").exists() or RunStore(run_dir).latest_path() is not None
    if held and not opts.resume:
        raise ValueError(f"run-dir {str(run_dir)!r} already holds a run; choose a new --run-dir "
                         "(or --resume a federated run)")
    run_dir.mkdir(parents=True, exist_ok=True)
    staged = stage_sites(opts.sites, run_dir)
    return run_dir, staged, server_config(opts, staged, run_dir)


def site_lines(lines: list[dict[str, Any]], phase: str) -> list[dict[str, Any]]:
    """The valid per-site lines of ``phase``."""
    return [x for x in lines
            if x.get("phase") == phase and x.get("scope") == "site" and x.get("status", "ok") == "ok"]


def _seconds(lines: list[dict[str, Any]], phase: str, key: str) -> float:
    """Sum of ``key`` over the valid site lines of ``phase``."""
    return sum(float(x.get(key, 0.0)) for x in site_lines(lines, phase))


def _train_eval_seconds(lines: list[dict[str, Any]]) -> tuple[float, float]:
    return _seconds(lines, "train", "train-time-s"), _seconds(lines, "evaluate", "eval-time-s")


def busy_seconds(lines: list[dict[str, Any]], parallel: int) -> float:
    """Seconds of the run in which at least one site trained or evaluated, estimated per round and phase.

    The sites of a round start together, ``parallel`` at a time, so a phase lasts at least as long as its
    slowest site and at least the sites' total over ``parallel`` (one at a time: the plain sum).
    """
    total = 0.0
    for phase, key in (("train", "train-time-s"), ("evaluate", "eval-time-s")):
        per_round: dict[int, list[float]] = {}
        for x in site_lines(lines, phase):
            per_round.setdefault(int(x["round"]), []).append(float(x.get(key, 0.0)))
        total += sum(max(max(times), sum(times) / parallel) for times in per_round.values())
    return total


def _summary(mode: str, opts: SimOptions, config: ServerConfig, staged: Sequence[StagedSite],
             wall: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    lines = read_metrics(config.run_dir)
    train, evaluate = _train_eval_seconds(lines)
    summary: dict[str, Any] = {
        "mode": mode,
        "sites": [s.name for s in staged],
        "site_configs": [str(s.source) for s in staged],
        "rounds": config.num_server_rounds,
        "local_iterations": config.local_iterations,
        "model": config.model,
        "base_channels": config.base_channels,
        "task_slots": config.task_slots,
        "seed": config.seed,
        "wall_time_s": round(wall, 2),
        "local_train_time_s": round(train, 2),
        "eval_time_s": round(evaluate, 2),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "loss": {s: {"first": a, "last": b} for s, (a, b) in first_last_loss(lines).items()},
    }
    if mode == "federated" and wall > 0:
        # ``overhead_fraction_idle``: the share of the run in which no site computed (the sites of a round
        # run in parallel, so wall time minus the sum of their training times would mean nothing)
        parallel = int((extra or {}).get("parallel_sites", 1))
        summary["busy_time_s"] = round(busy_seconds(lines, parallel), 2)
        summary["overhead_fraction_idle"] = round((wall - summary["busy_time_s"]) / wall, 4)
    if mode == "federated":
        summary.update({k: getattr(config, k) for k in FEDERATION_SETTINGS})
    summary.update(extra or {})
    return summary


def _finish(mode: str, run_dir: Path, summary: dict[str, Any]) -> SimResult:
    report, files = write_run_report(run_dir, summary)
    logger.info("%s run finished in %.1f s: %s", mode, summary["wall_time_s"], run_dir)
    return SimResult(mode, run_dir, report, summary, files)


# ----------------------------------------------------------------------------------------------- modes
def run_federated(opts: SimOptions) -> SimResult:
    """The real ServerApp and ClientApps as virtual clients of Flower's simulation engine (``flwr run``).

    Raises:
        RuntimeError: the run did not complete every round (see ``<run_dir>/logs/flower.log``).
    """
    run_dir, staged, config = _prepare(opts, "federated")
    address = opts.ray_address or os.environ.get(RAY_ADDRESS_ENV) or None
    address = None if address == LOCAL_RAY else address
    nodes = ray_cluster_nodes(address) if address else None  # None: this machine
    gpus = opts.gpus_per_site if opts.gpus_per_site is not None else auto_gpus_per_site(len(staged), nodes)
    cpus = opts.cpus_per_site if opts.cpus_per_site is not None else auto_cpus_per_site(len(staged), nodes)
    if nodes is not None and sites_that_fit(nodes, cpus, gpus) == 0:
        raise ValueError(f"no node of the Ray cluster at {address} has {cpus} CPU(s) and {gpus:g} GPU(s) for a site "
                         f"(nodes: {[(n.cpus, n.gpus) for n in nodes]}); lower --cpus-per-site / --gpus-per-site")
    # an explicit --cpus-per-site is taken literally: sites beyond the cores wait (less memory at once)
    ray = ray_cpus(len(staged), cpus, gpus, cluster=nodes is not None) if opts.cpus_per_site is None else None
    run_config: dict[str, Any] = {
        **config.to_run_config(), SITE_CONFIGS_KEY: ",".join(str(s.path) for s in staged)
    }
    result = run_flower_simulation(run_dir, run_config, len(staged), cpus_per_site=cpus,
                                   ray_cpus=ray, ray_address=address,
                                   gpus_per_site=gpus, echo=opts.echo)
    status = read_run_status(run_dir)
    latest = RunStore(run_dir).latest_path()
    ckpt = load_round_checkpoint(latest) if latest is not None else None
    if ckpt is None or ckpt.server_round < config.num_server_rounds or not (run_dir / FINAL_MODEL).is_file():
        done = 0 if ckpt is None else ckpt.server_round
        why = f": {status['reason']}" if status.get("status") == "failed" else ""
        raise RuntimeError(
            f"the federated run stopped after round {done} of {config.num_server_rounds}{why} (flwr exit code "
            f"{result.returncode}); see {result.log_path}"
        )
    extra = {"gpus_per_site": gpus, "cpus_per_site": cpus,
             "parallel_sites": parallel_sites(len(staged), cpus, gpus, ray, nodes)}
    if address:
        extra.update(ray_address=address, ray_nodes=len(nodes or []))
    summary = _summary("federated", opts, config, staged, result.seconds, extra)
    return _finish("federated", run_dir, summary)


def run_local_only_mode(opts: SimOptions) -> SimResult:
    """Every site trains alone for the federated run's number of local steps (no Flower; see
    :func:`simulation.local.run_local_only`)."""
    run_dir, staged, config = _prepare(opts, "local-only")
    start = time.perf_counter()
    fed = build_federation(config, [s.path for s in staged])
    run_local_only(fed, run_dir)
    summary = _summary("local-only", opts, config, staged, time.perf_counter() - start)
    return _finish("local-only", run_dir, summary)


def run_centralized_mode(opts: SimOptions) -> SimResult:
    """One model on the pooled training splits (see :func:`simulation.local.run_centralized`)."""
    run_dir, staged, config = _prepare(opts, "centralized")
    start = time.perf_counter()
    fed = build_federation(config, [s.path for s in staged])
    pooled = run_centralized(fed, run_dir)
    ema = config.evaluate_ema
    save_final_model(run_dir / FINAL_MODEL, pooled.ema if ema else pooled.model, fed.catalog, fed.plans,
                     pooled.trained, raw_state=pooled.model.state_dict() if ema else None, mode="centralized",
                     server_round=config.num_server_rounds)
    summary = _summary("centralized", opts, config, staged, time.perf_counter() - start,
                       {"batch_size": sum(s.config.training.batch_size for s in staged)})
    return _finish("centralized", run_dir, summary)


def run_mode(mode: str, opts: SimOptions) -> SimResult:
    """Run ``mode`` (one of :data:`MODES`)."""
    runners = {
        "federated": run_federated, "local-only": run_local_only_mode, "centralized": run_centralized_mode
    }
    if mode not in runners:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    defaults = SimOptions(sites=opts.sites)
    if mode != "federated" and any(getattr(opts, k) != getattr(defaults, k) for k in FEDERATION_SETTINGS):
        raise ValueError(f"--strategy, --proximal-mu, --server-optimizer, --server-lr, --local-update and "
                         f"--reset-local-state set the federation's training: federated runs only, not {mode}")
    return runners[mode](opts)


def describe(result: SimResult) -> str:
    """A printable summary: the Dice table and the timing."""
    s = result.summary
    paper = final_dice(read_metrics(result.run_dir), result.report.server_round, PAPER_DICE) \
        if result.report.server_round is not None else None
    raw = final_dice(read_metrics(result.run_dir), raw=True)
    lines = [f"{result.mode} run: {result.run_dir}", format_report(result.report, paper), *_raw_line(raw), "",
             f"wall time {s['wall_time_s']:.1f} s, local training {s['local_train_time_s']:.1f} s, "
             f"evaluation {s['eval_time_s']:.1f} s"]
    if "overhead_fraction_idle" in s:
        lines.append(f"simulation overhead: {s['overhead_fraction_idle']:.1%} of the wall time no site trained or "
                     f"evaluated ({s['wall_time_s'] - s['busy_time_s']:.1f} s; {s['parallel_sites']} site(s) at "
                     "a time)")
    for site, loss in sorted(s.get("loss", {}).items()):
        lines.append(f"train loss {site}: {loss['first']:.4f} (round 1) -> {loss['last']:.4f} (last round)")
    lines += ["", *usage_example(result)]
    return "\n".join(lines)


def _raw_line(raw: DiceReport) -> list[str]:
    """The raw weights' Dice beside the report of the EMA (none when the run did not evaluate them)."""
    if raw.server_round is None or raw.overall is None:
        return []
    datasets = ", ".join(f"{k} {v:.3f}" for k, v in raw.datasets.items())
    return [f"raw weights (not the EMA), round {raw.server_round}: {datasets}, all tasks {raw.overall:.3f}"]


def usage_example(result: SimResult) -> list[str]:
    """The commands that segment and score a validation scan of the run's first site with the model the run
    wrote: what the Dice table measured, as a user does it."""
    model = result.run_dir / FINAL_MODEL
    if result.mode == "local-only":
        model = next(iter(sorted((result.run_dir / "models").glob("*.pt"))), model)
    example = _validation_scan([Path(p) for p in result.summary.get("site_configs", [])])
    if example is None:
        return [f"model: {model} (hermes-predict --model {model} --input SCAN --modality MODALITY --output OUT)"]
    image, label, modality = example
    out = result.run_dir / "predictions"
    return ["segment a validation scan with the model this run wrote, and score it at its native geometry:",
            f"  hermes-predict --model {model} --input {image} --modality {modality} --output {out / 'seg.nii.gz'}",
            f"  hermes-evaluate --pred {out / 'seg.nii.gz'} --ref {label} --output {out / 'eval.csv'}",
            f"  (label values of that prediction: {_label_values(model, modality)})"]


def _label_values(model: Path, modality: str) -> str:
    """``1 = dataset/class, ...``: what ``hermes-predict`` writes by default for a ``modality`` scan."""
    from client.predict import load_model, resolve_tasks

    selection = resolve_tasks(None, load_model(model), modality)
    return ", ".join(f"{v} = {k}" for v, k in zip(selection.values, selection.keys, strict=True))


def _validation_scan(site_configs: Sequence[Path]) -> tuple[Path, Path, str] | None:
    """(image, label, modality) of the first labelled validation case of the first site that has one."""
    from client.config import load_site_config
    from client.preprocess import dataset_splits

    catalog = Catalog.load()
    for path in site_configs:
        try:
            config = load_site_config(path, catalog=catalog)
        except ValueError:
            continue
        for ds in config.datasets:
            val = set(dataset_splits(ds, catalog)["val"])
            for case in ds.cases():
                if case.case_id in val and case.label is not None and case.frame is None and not case.label_format:
                    return case.image, case.label, ds.modality
    return None


__all__ = ["MODES", "SimOptions", "SimResult", "asdict", "describe", "new_run_dir", "run_mode", "REPO_ROOT"]
