"""Two sites on one machine: seconds per local round alone and side by side, with and without a thread cap.

    python benchmarks/shared_host.py --steps 10 --sites 2

Each site is a separate process training the demo model (Hermes-R base 8, 32^3 patches, batch 2) for
``--steps`` steps on random batches, as a ClientApp does in a deployment. Three settings:

- ``alone``: one site, every core (PyTorch's default thread count);
- ``together, uncapped``: ``--sites`` sites at once, each with PyTorch's default (every core each);
- ``together, capped``: the same with each site capped to cores / sites threads, as ``training.threads`` in a
  site config (and ``hermes-client start``'s ``OMP_NUM_THREADS``) does.

Prints one JSON object: the seconds of each site's round (median over ``--repeats``) per setting.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import time

import torch

from hermes_model import build_model
from hermes_model.engine import EngineConfig, TrainEngine


def _batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randn(2, 1, 32, 32, 32, generator=g),
        "target": (torch.rand(2, 1, 32, 32, 32, generator=g) > 0.9),
        "task_ids": torch.tensor([[5], [5]]),
        "modality_ids": torch.tensor([[0], [0]]),
    }


def _round(steps: int, threads: int | None, ready: multiprocessing.synchronize.Barrier,
           out: multiprocessing.Queue) -> None:
    """One site's round in this process: ``steps`` training steps, after every site is ready."""
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    engine = TrainEngine(build_model("hermes-r", base_channels=8, task_slots=8, modality_slots=6),
                         EngineConfig(warmup_epochs=0, total_epochs=1, iters_per_epoch=steps), "cpu")
    batches = [_batch(i) for i in range(steps)]
    engine.train_step(batches[0])  # warm up the allocator and kernels outside the timing
    ready.wait()  # every site has built its model and taken its warm-up step
    began = time.perf_counter()
    for batch in batches:
        engine.train_step(batch)
    out.put(time.perf_counter() - began)


def run(sites: int, steps: int, threads: int | None) -> list[float]:
    """Seconds of each of ``sites`` concurrent rounds."""
    ctx = multiprocessing.get_context("spawn")
    ready, out = ctx.Barrier(sites), ctx.Queue()
    procs = [ctx.Process(target=_round, args=(steps, threads, ready, out)) for _ in range(sites)]
    for p in procs:
        p.start()
    times = [out.get(timeout=3600) for _ in procs]
    for p in procs:
        p.join()
    return sorted(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    share = max(1, cores // args.sites)
    settings = {"alone": (1, None), "together, uncapped": (args.sites, None),
                "together, capped": (args.sites, share)}
    results = {}
    for name, (sites, threads) in settings.items():
        runs = [run(sites, args.steps, threads) for _ in range(args.repeats)]
        results[name] = {"threads per site": threads or torch.get_num_threads(),
                         "seconds per round, median": round(statistics.median(t for r in runs for t in r), 2),
                         "seconds per round, all": [[round(t, 2) for t in r] for r in runs]}
    print(json.dumps({"cores": cores, "sites": args.sites, "steps": args.steps, "results": results}, indent=2))


if __name__ == "__main__":
    main()
