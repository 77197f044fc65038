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
from server.checkpoint import RunStore, load_round_checkpoint
from server.config import ServerConfig
from simulation.flower import run_flower_simulation
from simulation.local import build_federation, run_centralized, run_local_only, save_final_model
from simulation.report import DiceReport, first_last_loss, format_report, read_metrics, write_run_report
from simulation.sites import REPO_ROOT, StagedSite, demo_site_paths, stage_sites

logger = logging.getLogger(__name__)

MODES = ("federated", "local-only", "centralized")
FINAL_MODEL = "final_model.pt"
PUBLISHED_TASK_SLOTS = 72
# demo defaults: base 8, 32^3 patches at 3 mm, 5 sites; see the README for the time and Dice measured
DEFAULT_ROUNDS = 15
DEFAULT_LOCAL_ITERATIONS = 20
DEFAULT_BASE_CHANNELS = 8
QUICK_ROUNDS = 2
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
        run_dir: the run directory (default: a new folder under ``runs/``).
        cpus_per_site / gpus_per_site: resources of one virtual site (Ray); None = automatic: the
            machine's cores shared by the sites (:func:`auto_cpus_per_site`; with fewer cores than sites
            all of them run at once, :func:`ray_cpus`), the visible GPUs shared by the sites (at most one
            each; 0 without a GPU). An explicit ``cpus_per_site`` is taken literally.
        evaluate_every: evaluate every N rounds (the last round always); None = the last round only
            (a sliding-window evaluation costs about as much as a round of training on a CPU).
        seed: seed of the initial weights and the patch sampling.
        lr: base learning rate.
        strategy, proximal_mu, server_lr: the server's aggregation (``server.config.STRATEGIES``; FedProx's
            mu; FedAdam's learning rate, None = the server's default); federated runs only.
        quick: the small smoke-test schedule (2 rounds, 2 sites, few steps) unless set explicitly.
        echo: copy Flower's output to the console.
        resume: continue the federated run in ``run_dir`` from its latest round checkpoint (up to
            ``rounds``), with the sites' saved state.
    """

    sites: list[Path] = field(default_factory=list)
    rounds: int | None = None
    local_iterations: int | None = None
    model: str = "hermes-r"
    base_channels: int = DEFAULT_BASE_CHANNELS
    run_dir: Path | None = None
    cpus_per_site: int | None = None
    gpus_per_site: float | None = None
    evaluate_every: int | None = None
    seed: int = 0
    lr: float = 2e-3
    strategy: str = "fedavg"
    proximal_mu: float = 0.0
    server_lr: float | None = None
    quick: bool = False
    echo: bool = True
    resume: bool = False

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
            self.evaluate_every = self.rounds
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


def auto_gpus_per_site(num_sites: int) -> float:
    """The visible GPUs shared evenly by ``num_sites`` sites (at most one GPU each; 0 without CUDA)."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        return 0.0
    share = min(1.0, count / num_sites)
    return math.floor(share * 100) / 100  # a little under the exact share, so every site fits


def auto_cpus_per_site(num_sites: int) -> int:
    """The machine's cores shared evenly by ``num_sites`` sites (at least one each)."""
    return max(1, (os.cpu_count() or 1) // num_sites)


def ray_cpus(num_sites: int, cpus_per_site: int, gpus_per_site: float) -> int | None:
    """CPUs Ray should schedule: on a CPU-only machine with fewer cores than the sites need, enough for
    all sites at once (they time-share the cores instead of queueing, so no core idles while the last
    sites of a round train: with 5 sites on 2 cores a round is 2.5 site-times instead of 3); else None
    (Ray's own count)."""
    needed = num_sites * cpus_per_site
    if gpus_per_site > 0 or needed <= (os.cpu_count() or 1):
        return None
    return needed


def parallel_sites(num_sites: int, cpus_per_site: int, gpus_per_site: float,
                   scheduled_cpus: int | None = None) -> int:
    """How many virtual sites Ray runs at the same time, given the CPUs it schedules (None: the machine's)."""
    cpus = scheduled_cpus or os.cpu_count() or 1
    slots = cpus // cpus_per_site
    if gpus_per_site > 0:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        slots = min(slots, int(count / gpus_per_site))
    return max(1, min(num_sites, slots))


def task_slots_for(staged: Sequence[StagedSite]) -> int:
    """Task slots that hold the catalog plus every new dataset of ``staged`` (at least the published 72).

    The model accepts task ids up to ``task_slots - 2`` (one slot is the null token), so one more than
    the number of tasks is needed, plus one spare.
    """
    catalog = Catalog.load()
    for site in sorted(staged, key=lambda s: s.name):
        for ds in site.config.datasets:
            if ds.name not in catalog:
                catalog.register_dataset(ds.name, ds.modality, ds.resolved_classes(catalog))
    return max(PUBLISHED_TASK_SLOTS, catalog.num_tasks + 2)


def server_config(opts: SimOptions, staged: Sequence[StagedSite], run_dir: Path) -> ServerConfig:
    """The server settings shared by all modes: one schedule epoch per round (``iters-per-epoch`` =
    ``local-iterations``), the schedule ending with the last round, no warm-up (the recipe's
    epoch-wise warm-up would keep the learning rate near 0 for whole rounds of a short run)."""
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
        run_dir=str(run_dir),
        resume=opts.resume,
        model=opts.model,
        base_channels=opts.base_channels,
        task_slots=task_slots_for(staged),
        seed=opts.seed,
        lr=opts.lr,
        iters_per_epoch=opts.local_iterations,
        total_epochs=opts.rounds,
        warmup_epochs=0,
        strategy=opts.strategy,
        proximal_mu=opts.proximal_mu,
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
        # the literal figure (wall - sum of local training) / wall only means something when the sites train
        # one at a time; ``overhead_fraction_idle`` is the share of the run in which no site computed
        parallel = int((extra or {}).get("parallel_sites", 1))
        summary["overhead_fraction"] = round((wall - train) / wall, 4)
        summary["busy_time_s"] = round(busy_seconds(lines, parallel), 2)
        summary["overhead_fraction_idle"] = round((wall - summary["busy_time_s"]) / wall, 4)
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
    gpus = opts.gpus_per_site if opts.gpus_per_site is not None else auto_gpus_per_site(len(staged))
    cpus = opts.cpus_per_site if opts.cpus_per_site is not None else auto_cpus_per_site(len(staged))
    # an explicit --cpus-per-site is taken literally: sites beyond the cores wait (less memory at once)
    ray = ray_cpus(len(staged), cpus, gpus) if opts.cpus_per_site is None else None
    run_config: dict[str, Any] = {
        **config.to_run_config(), SITE_CONFIGS_KEY: ",".join(str(s.path) for s in staged)
    }
    result = run_flower_simulation(run_dir, run_config, len(staged), cpus_per_site=cpus,
                                   ray_cpus=ray,
                                   gpus_per_site=gpus, echo=opts.echo)
    latest = RunStore(run_dir).latest_path()
    ckpt = load_round_checkpoint(latest) if latest is not None else None
    if ckpt is None or ckpt.server_round < config.num_server_rounds:
        done = 0 if ckpt is None else ckpt.server_round
        raise RuntimeError(
            f"the federated run stopped after round {done} of {config.num_server_rounds} (flwr exit code "
            f"{result.returncode}); see {result.log_path}"
        )
    save_final_model(run_dir / FINAL_MODEL, ckpt.model, ckpt.catalog, mode="federated",
                     server_round=ckpt.server_round)
    extra = {"gpus_per_site": gpus, "cpus_per_site": cpus,
             "parallel_sites": parallel_sites(len(staged), cpus, gpus, ray)}
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
    model, _ = run_centralized(fed, run_dir)
    save_final_model(run_dir / FINAL_MODEL, model, fed.catalog, mode="centralized",
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
    aggregation = (opts.strategy, opts.proximal_mu, opts.server_lr) != ("fedavg", 0.0, None)
    if mode != "federated" and aggregation:
        raise ValueError(f"--strategy, --proximal-mu and --server-lr set the server's aggregation: federated "
                         f"runs only, not {mode}")
    return runners[mode](opts)


def describe(result: SimResult) -> str:
    """A printable summary: the Dice table and the timing."""
    s = result.summary
    lines = [f"{result.mode} run: {result.run_dir}", format_report(result.report), "",
             f"wall time {s['wall_time_s']:.1f} s, local training {s['local_train_time_s']:.1f} s, "
             f"evaluation {s['eval_time_s']:.1f} s"]
    if "overhead_fraction" in s:
        lines.append(f"simulation overhead: {s['overhead_fraction_idle']:.1%} of the wall time no site trained or "
                     f"evaluated ({s['wall_time_s'] - s['busy_time_s']:.1f} s; {s['parallel_sites']} site(s) at "
                     f"a time); (wall - sum of local training) / wall: {s['overhead_fraction']:.1%}")
    for site, loss in sorted(s.get("loss", {}).items()):
        lines.append(f"train loss {site}: {loss['first']:.4f} (round 1) -> {loss['last']:.4f} (last round)")
    return "\n".join(lines)


__all__ = ["MODES", "SimOptions", "SimResult", "asdict", "describe", "new_run_dir", "run_mode", "REPO_ROOT"]
