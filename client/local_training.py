"""Local training of one federated round: the training engine's steps over the site's patches, in this
process on one device, or with PyTorch DDP across several (one process per device: NCCL on GPUs, gloo on
CPU processes).

Batches: with ``W`` processes of ``B`` patches each, step ``k`` of a round trains on the global batch of
samples ``k * W * B .. (k + 1) * W * B - 1`` of the :class:`~client.dataset.TrainPatchDataset`; rank ``r``
takes the slice ``k * W * B + r * B .. + B``. One process with ``W * B`` patches therefore sees exactly
the same global batches as ``W`` processes with ``B``.

Loss convention: each process computes the engine's loss (a mean over its batch's non-null task tokens)
and DDP averages the gradients over the processes, so the step follows the mean of the per-process mean
losses. It equals the single-process mean over the global batch whenever every process holds the same
number of non-null task tokens (always for a site with one dataset; with several datasets whose class
counts differ the tokens are weighted per process).

Everything crossing process boundaries goes through files in a scratch folder on the site's disk (no
shared memory, which containers often limit): the start state of the engine, the rendezvous file of
``torch.distributed`` and the final state written by rank 0.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler

from client.dataset import (
    PreprocessedDataset,
    TrainPatchDataset,
    collate_padded,
    concat_batches,
    derived_seed,
    loader_generator,
    make_loader,
)
from hermes_model.engine import EngineConfig, TrainEngine
from hermes_model.fileio import atomic_torch_save

__all__ = [
    "LocalResult",
    "RankSampler",
    "TrainData",
    "resolve_devices",
    "run_iterations",
    "train_local",
]

logger = logging.getLogger(__name__)

DEVICE_CHOICES = ("auto", "cpu")
DEFAULT_TIMEOUT = timedelta(minutes=30)
_START_FILE, _RESULT_FILE, _RENDEZVOUS_FILE = "start.pt", "result.pt", "rendezvous"


# ------------------------------------------------------------------------------------------------ devices
def resolve_devices(
    devices: str | Sequence[int] = "auto", world_size: int | None = None
) -> list[torch.device]:
    """The devices of local training, one process per entry.

    Args:
        devices: ``"auto"`` (every visible GPU, else the CPU), ``"cpu"``, or a list of CUDA device indices
            (the ``training.devices`` of a site config).
        world_size: when given, ``world_size`` CPU processes (gloo backend), whatever ``devices`` says:
            the way to exercise the multi-process path on machines without GPUs (tests).

    Returns:
        A non-empty list of devices: ``[cpu] * world_size``, ``[cpu]``, or ``[cuda:i, ...]``.
    """
    if world_size is not None:
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be an int >= 1 (number of CPU processes), got {world_size!r}")
        return [torch.device("cpu")] * world_size
    if devices == "cpu":
        return [torch.device("cpu")]
    if devices == "auto":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [torch.device("cuda", i) for i in range(count)] or [torch.device("cpu")]
    if isinstance(devices, str) or not isinstance(devices, Sequence) or not devices:
        raise ValueError(
            f"devices must be one of {DEVICE_CHOICES} or a non-empty list of GPU indices, got {devices!r}"
        )
    indices = list(devices)
    bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, int) or i < 0]
    if bad or len(set(indices)) != len(indices):
        raise ValueError(f"devices must be distinct GPU indices >= 0, got {indices}")
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    missing = [i for i in indices if i >= available]
    if missing:
        raise ValueError(
            f"devices {indices}: GPUs {missing} are not available ({available} visible); "
            f"use 'auto', 'cpu' or indices below {available}"
        )
    return [torch.device("cuda", i) for i in indices]


# ------------------------------------------------------------------------------------------------ data
class RankSampler(Sampler[int]):
    """Sample indices of one process's share of the global batches (see the module docstring).

    Pass ``e`` (counted from ``start_epoch``) covers indices ``e * num_samples .. (e + 1) * num_samples - 1``
    of the dataset, like :class:`client.dataset.EpochSampler`; of each global batch of
    ``world_size * batch_size`` indices this process yields its ``batch_size`` consecutive ones.
    """

    def __init__(
        self, num_samples: int, batch_size: int, rank: int, world_size: int, start_epoch: int = 0
    ) -> None:
        global_batch = batch_size * world_size
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need batch_size >= 1, world_size >= 1 and 0 <= rank < world_size, "
                f"got batch_size={batch_size}, world_size={world_size}, rank={rank}"
            )
        if num_samples < global_batch or num_samples % global_batch:
            raise ValueError(
                f"num_samples ({num_samples}) must be a positive multiple of "
                f"batch_size x world_size ({global_batch})"
            )
        if start_epoch < 0:
            raise ValueError(f"start_epoch must be >= 0, got {start_epoch}")
        self.num_samples, self.batch_size = num_samples, batch_size
        self.rank, self.world_size = rank, world_size
        self.epoch = start_epoch

    def __len__(self) -> int:
        return self.num_samples // self.world_size

    def __iter__(self) -> Iterator[int]:
        base = self.epoch * self.num_samples
        self.epoch += 1
        global_batch = self.batch_size * self.world_size
        for start in range(base, base + self.num_samples, global_batch):
            first = start + self.rank * self.batch_size
            yield from range(first, first + self.batch_size)


@dataclass(frozen=True)
class TrainData:
    """How a process draws its training batches (picklable: sent to the DDP processes).

    Attributes:
        datasets: the site's training datasets (train split, task ids set).
        patch_size: (D, H, W) voxels.
        batch_size: patches per process per step.
        seed: seed of the patch sampler (sample ``i`` is a function of ``(seed, i)``).
        num_workers: DataLoader worker processes per training process.
        foreground_prob: fraction of patches centred on labelled foreground.
        augment: spatial and intensity augmentation on/off.
        start_epoch: pass of the sampler to start from.
    """

    datasets: tuple[PreprocessedDataset, ...]
    patch_size: tuple[int, int, int]
    batch_size: int
    seed: int
    num_workers: int = 0
    foreground_prob: float = 0.33
    augment: bool = True
    start_epoch: int = 0

    def loader(self, iterations: int, rank: int = 0, world_size: int = 1) -> DataLoader:
        """The loader of process ``rank``: ``iterations`` batches of ``batch_size`` patches."""
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        dataset = TrainPatchDataset(
            self.datasets,
            self.patch_size,
            samples_per_epoch=iterations * self.batch_size * world_size,
            seed=self.seed,
            foreground_prob=self.foreground_prob,
            augment=self.augment,
        )
        if world_size == 1:
            return make_loader(dataset, self.batch_size, self.num_workers, start_epoch=self.start_epoch)
        sampler = RankSampler(len(dataset), self.batch_size, rank, world_size, self.start_epoch)
        extra: dict[str, Any] = {"persistent_workers": True} if self.num_workers > 0 else {}
        return DataLoader(
            dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
            collate_fn=collate_padded, generator=loader_generator(self.seed, self.start_epoch, rank), **extra,
        )


@dataclass(frozen=True)
class UnionData:
    """Several sites' :class:`TrainData` drawn side by side: step ``i``'s batch is the concatenation of
    every part's batch ``i`` (what the sites of a federated round draw; the centralized arm's batches). With
    several processes each takes its share of every part."""

    parts: tuple[TrainData, ...]

    @property
    def seed(self) -> int:
        return derived_seed(*(p.seed for p in self.parts))

    def loader(self, iterations: int, rank: int = 0, world_size: int = 1) -> Iterator[dict[str, torch.Tensor]]:
        loaders = [p.loader(iterations, rank, world_size) for p in self.parts]
        return (concat_batches(batches) for batches in zip(*loaders, strict=True))


# ------------------------------------------------------------------------------------------------ the loop
@dataclass
class LocalResult:
    """Summary of one round of local training (aggregate numbers only).

    ``loss``, ``bce`` and ``dice`` are means over the steps and processes; ``modality_acc`` is the fraction
    of training patches of known modality whose modality logits pick the right one (NaN when no patch had
    a known modality); ``samples`` = iterations x batch size x processes; ``task_samples``: task id ->
    training samples whose task tokens held it (over all processes).
    """

    iterations: int
    samples: int
    world_size: int
    loss: float
    bce: float
    dice: float
    modality_acc: float
    seconds: float
    task_samples: dict[int, int] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """Finite metrics, named as in the protocol (``modality-acc`` left out when undefined)."""
        out = {"loss": self.loss, "bce": self.bce, "dice": self.dice, "modality-acc": self.modality_acc}
        return {k: float(v) for k, v in out.items() if math.isfinite(v)}


class _ModalityCounter:
    """Forward hook counting correct modality predictions: model output ``(seg, logits (B, M))`` against
    the input ``modality_ids`` (B, 1), ignoring -1 (MR of unknown sequence)."""

    def __init__(self) -> None:
        self.correct = 0
        self.known = 0

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not (isinstance(output, tuple | list) and len(output) == 2 and len(args) >= 3):
            return
        ids = args[2].reshape(-1)
        known = ids >= 0
        predicted = output[1].detach().argmax(dim=1)
        self.correct += int((predicted[known] == ids[known]).sum())
        self.known += int(known.sum())


class _DistributedView(nn.Module):
    """The engine's model during DDP training: the forward runs through ``ddp`` (gradients are averaged
    over the processes), while parameters, buffers, state dict and sub-modules are those of the wrapped
    model under their own names, so the engine's EMA, FedProx reference and checkpoints are the same as in
    single-process training."""

    def __init__(self, ddp: DistributedDataParallel) -> None:
        super().__init__()
        inner = ddp.module
        for name in ("_parameters", "_buffers", "_non_persistent_buffers_set", "_modules"):
            object.__setattr__(self, name, getattr(inner, name))
        object.__setattr__(self, "_ddp", ddp)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._ddp(*args, **kwargs)

    def train(self, mode: bool = True) -> _DistributedView:
        self._ddp.train(mode)
        self.training = mode
        return self


def _log_every(iterations: int, log_every: int | None) -> int:
    if log_every is None:
        return max(1, iterations // 10)
    if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1:
        raise ValueError(f"log_every must be None or an int >= 1, got {log_every!r}")
    return log_every


def run_iterations(
    engine: TrainEngine,
    batches: Any,
    iterations: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    log_every: int | None = None,
) -> LocalResult:
    """Run ``iterations`` engine steps on ``batches`` (an iterable of batch dicts) in this process.

    With ``world_size > 1`` a process group must be initialised: the model is wrapped in DDP for the loop
    (and unwrapped after) and the metrics are summed over the processes. Rank 0 logs progress every
    ``log_every`` steps (default: ten times per round).
    """
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an int >= 1, got {iterations!r}")
    every = _log_every(iterations, log_every)
    plain = engine.model
    counter = _ModalityCounter()
    handle = plain.register_forward_hook(counter)
    if world_size > 1:
        ids = [engine.device.index] if engine.device.type == "cuda" else None
        engine.model = _DistributedView(DistributedDataParallel(plain, device_ids=ids))
    sums = {"loss": 0.0, "bce": 0.0, "dice": 0.0}
    task_samples: Counter[int] = Counter()
    steps, samples, start = 0, 0, time.perf_counter()
    try:
        for batch in batches:
            if steps == iterations:
                break
            out = engine.train_step(batch)
            steps += 1
            samples += int(batch["image"].shape[0])
            for row in batch["task_ids"].tolist():
                task_samples.update({t for t in row if t >= 0})
            for key in sums:
                sums[key] += out[key]
            if rank == 0 and (steps % every == 0 or steps == iterations):
                elapsed = time.perf_counter() - start
                logger.info(
                    "iteration %d/%d (schedule %d): loss %.4f, bce %.4f, dice %.4f, lr %.3g, %.2f s/it",
                    steps, iterations, engine.iteration, out["loss"], out["bce"], out["dice"], out["lr"],
                    elapsed / steps,
                )
    finally:
        handle.remove()
        engine.model = plain
    if steps < iterations:
        raise ValueError(f"the batches ran out after {steps} of {iterations} iterations")
    counts = [counter.correct, counter.known, samples]
    totals = torch.tensor([sums["loss"], sums["bce"], sums["dice"], *counts], dtype=torch.float64)
    if world_size > 1:
        totals = totals.to(engine.device)
        dist.all_reduce(totals)
        totals = totals.cpu()
        gathered: list[Any] = [None] * world_size
        dist.all_gather_object(gathered, dict(task_samples))
        task_samples = sum((Counter(g) for g in gathered), Counter())
    n = steps * world_size
    loss, bce, dice, correct, known, seen = totals.tolist()
    return LocalResult(
        iterations=steps,
        samples=int(seen),
        world_size=world_size,
        loss=loss / n,
        bce=bce / n,
        dice=dice / n,
        modality_acc=correct / known if known else math.nan,
        seconds=time.perf_counter() - start,
        task_samples=dict(sorted(task_samples.items())),
    )


# ------------------------------------------------------------------------------------------------ processes
@dataclass(frozen=True)
class _Job:
    model_factory: Callable[[], nn.Module]
    engine_config: dict[str, Any]
    data: TrainData | UnionData
    iterations: int
    devices: tuple[str, ...]
    scratch: str
    log_every: int | None
    log_level: int = logging.INFO


def _setup_process(rank: int, device: torch.device, world_size: int, log_level: int) -> None:
    """Device, CPU threads and logging (a spawned process starts without the parent's handlers)."""
    if not logging.getLogger().handlers:
        fmt = f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s"
        logging.basicConfig(level=log_level, format=fmt)
    logging.getLogger("client").setLevel(log_level)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))


def _worker(rank: int, job: _Job) -> None:
    """One DDP process: rebuild the engine from the start state, train its share, rank 0 saves the result."""
    world_size = len(job.devices)
    device = torch.device(job.devices[rank])
    _setup_process(rank, device, world_size, job.log_level)
    # a spawned process starts torch's generators from a random seed: derive them from the data and the rank
    torch.manual_seed(derived_seed(job.data.seed, rank))
    scratch = Path(job.scratch)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend, init_method=(scratch / _RENDEZVOUS_FILE).as_uri(), rank=rank, world_size=world_size,
        timeout=DEFAULT_TIMEOUT,
    )
    try:
        engine = TrainEngine(job.model_factory(), EngineConfig.from_dict(job.engine_config), device)
        engine.load_state_dict(torch.load(scratch / _START_FILE, weights_only=True, map_location=device))
        loader = job.data.loader(job.iterations, rank, world_size)
        result = run_iterations(
            engine, loader, job.iterations, rank=rank, world_size=world_size, log_every=job.log_every
        )
        if rank == 0:
            state = {"engine": engine.state_dict(), "result": asdict(result)}
            atomic_torch_save(scratch / _RESULT_FILE, state)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    _exit_without_static_destructors()


def _exit_without_static_destructors() -> None:
    """End a finished DDP process with ``os._exit``. A normal interpreter exit runs C++ static destructors
    while gloo/c10d threads may still be joinable, which now and then aborts the process ("terminate called
    without an active exception", SIGABRT) after its work is done and its result written."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _cpu_state(state: Any) -> Any:
    if isinstance(state, torch.Tensor):
        return state.detach().cpu()
    if isinstance(state, Mapping):
        return {k: _cpu_state(v) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(_cpu_state(v) for v in state)
    return state


def train_local(
    engine: TrainEngine,
    model_factory: Callable[[], nn.Module],
    data: TrainData | UnionData,
    iterations: int,
    devices: Sequence[torch.device],
    *,
    scratch_dir: str | os.PathLike | None = None,
    log_every: int | None = None,
) -> LocalResult:
    """Train ``engine`` for ``iterations`` steps on ``devices``; the engine holds the result afterwards.

    One device: the loop runs here (the engine must already be on that device). Several: one process per
    device is spawned (``torch.multiprocessing``), each rebuilds the engine with ``model_factory()`` (a
    picklable callable returning the untrained architecture) from the engine's current state, trains its
    share of each global batch under DDP, and the state reached (identical on every process) is loaded back
    into ``engine``. ``scratch_dir`` holds the exchange files (a temporary folder inside it, removed after);
    default: the system's temporary folder.

    Returns:
        The :class:`LocalResult` (metrics over all processes).
    """
    devices = [torch.device(d) for d in devices]
    if not devices:
        raise ValueError("devices must name at least one device, got none")
    if len(devices) == 1:
        if engine.device != devices[0]:
            raise ValueError(f"the engine is on {engine.device} but devices is [{devices[0]}]")
        loader = data.loader(iterations)
        return run_iterations(engine, loader, iterations, log_every=log_every)
    if scratch_dir is not None:
        Path(scratch_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ddp-", dir=scratch_dir) as scratch:
        atomic_torch_save(Path(scratch) / _START_FILE, _cpu_state(engine.state_dict()))
        job = _Job(model_factory, engine.config.to_dict(), data, iterations, tuple(str(d) for d in devices),
                   scratch, log_every, logger.getEffectiveLevel())
        logger.info("local training: %d processes on %s", len(devices), [str(d) for d in devices])
        mp.spawn(_worker, args=(job,), nprocs=len(devices), join=True)
        saved = torch.load(Path(scratch) / _RESULT_FILE, weights_only=True, map_location=engine.device)
    engine.load_state_dict(saved["engine"])
    return LocalResult(**saved["result"])
