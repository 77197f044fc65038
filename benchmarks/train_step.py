"""Time one Hermes training step (forward, losses, backward, optimiser) and report peak memory.

    python benchmarks/train_step.py --base 16 --patch 64 --batch 2 --precision best

Prints one JSON line. ``--precision best`` picks the fastest setting we support on the device found:
bf16 autocast + channels_last_3d on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX), else fp32.
Peak memory is the CUDA allocator's peak on GPU, the process's peak resident set size on CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time

import torch

from hermes_model import available_models, build_model
from hermes_model.engine import EngineConfig, TrainEngine


def cpu_has_native_bf16() -> bool:
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(precision: str, device: torch.device) -> tuple[str, bool]:
    """(autocast precision, channels_last) for a --precision choice."""
    if precision != "best":
        return precision, precision == "bf16"
    native_bf16 = device.type == "cuda" or cpu_has_native_bf16()
    return ("bf16", True) if native_bf16 else ("fp32", False)


def make_batch(batch: int, patch: int, device: torch.device, tasks: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    task_ids = torch.tensor([[19, 20, 21, -1], [0, 1, -1, -1]] * batch)[:batch, :tasks]
    return {
        "image": torch.randn(batch, 1, patch, patch, patch, generator=g).to(device),
        "target": (torch.rand(batch, tasks, patch, patch, patch, generator=g) > 0.9).to(device),
        "task_ids": task_ids.to(device),
        "modality_ids": torch.tensor([[0], [-1]] * batch)[:batch].to(device),
    }


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="hermes-r", choices=available_models())
    parser.add_argument("--base", type=int, default=16, help="base channels (hermes-r)")
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--precision", default="best", choices=["fp32", "bf16", "best"])
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--optimizer", default="lamb", choices=["lamb", "adamw", "sgd"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the model first")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    precision, channels_last = resolve_precision(args.precision, device)
    torch.manual_seed(0)
    kwargs = {"base_channels": args.base} if args.model == "hermes-r" else {}
    model = build_model(args.model, **kwargs).to(device)
    if args.compile:
        model = torch.compile(model)
    config = EngineConfig(optimizer=args.optimizer, precision=precision, channels_last=channels_last,
                          warmup_epochs=0)
    engine = TrainEngine(model, config, device=device)
    batch = make_batch(args.batch, args.patch, device)

    times = []
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        engine.train_step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    result = {
        "model": args.model, "base": args.base if "base_channels" in kwargs else None,
        "patch": args.patch, "batch": args.batch,
        "precision": precision, "channels_last": channels_last, "compile": args.compile,
        "optimizer": args.optimizer, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "threads": torch.get_num_threads(), "steps": len(times),
        "median_step_s": round(statistics.median(times), 4),
        "min_step_s": round(min(times), 4),
        "steps_per_s": round(1 / statistics.median(times), 3),
        "peak_mem_mb": round(peak_memory_mb(device), 1),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
