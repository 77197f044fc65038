"""Issue 5's GPU check: ``hermes-sim run`` with four demo sites sharing one GPU.

    python benchmarks/sim_gpu.py       # 4 sites at --gpus-per-site 0.25, base 32, 96^3 patches, 2 rounds
    python benchmarks/sim_gpu.py --gpus-per-site 0 --base 8 --patch 32 --local-iterations 2   # on a CPU

Runs the real federated simulation (Ray, the real ServerApp and ClientApp) on four of the bundled demo
sites, with their configs copied and the patch size replaced, and no evaluation (rounds are training
only). Prints one JSON line: seconds per round (the server's ``round-time-s``: sending, local training,
receiving, aggregating), each site's training seconds, each site's peak GPU memory (PyTorch's
``max_memory_allocated`` in its Ray actor, ``gpu-peak-mib``) and the peak memory in use on the GPU as
``nvidia-smi`` sees it (every process's CUDA context included), sampled every 0.5 s.

Without a CUDA device and a GPU share > 0 it prints why it did not run and exits 0.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch
import yaml

from client.config import load_site_config
from simulation.report import read_metrics
from simulation.run import DEFAULT_LOCAL_ITERATIONS, SimOptions, run_mode, site_lines
from simulation.sites import demo_site_paths

SITES = ("brats-flair", "sarcoma-ct", "sarcoma-mr", "sarcoma-pet")


class GpuMemorySampler:
    """Peak of ``nvidia-smi``'s used memory (MiB, first GPU) while running; None without nvidia-smi."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.peak_mib: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> GpuMemorySampler:
        if shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        query = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "--id=0"]
        while not self._stop.is_set():
            out = subprocess.run(query, capture_output=True, text=True, check=False).stdout.strip()
            if out:
                self.peak_mib = max(self.peak_mib or 0.0, float(out.splitlines()[0]))
            self._stop.wait(self.interval_s)


def site_configs(folder: Path, patch: int) -> list[Path]:
    """Copies of the demo configs of :data:`SITES` with ``patch`` as patch size and absolute paths (the
    preprocessed data of the demo is reused: the sampler pads patches larger than a volume)."""
    out = []
    for path in demo_site_paths():
        if path.stem not in SITES:
            continue
        config = load_site_config(path)  # resolves the relative paths
        raw = yaml.safe_load(path.read_text())
        raw["work_dir"] = str(config.work_dir)
        for item, ds in zip(raw["datasets"], config.datasets, strict=True):
            item["source"] = str(ds.source)
        raw["training"]["patch_size"] = patch
        target = folder / path.name
        target.write_text(yaml.safe_dump(raw, sort_keys=False))
        out.append(target)
    return out


def summarise(run_dir: Path) -> dict[str, Any]:
    """Round times and per-site seconds and GPU peaks from the run's ``metrics.jsonl``."""
    lines = read_metrics(run_dir)
    times: dict[str, list[float]] = {}
    peaks: dict[str, float] = {}
    for x in site_lines(lines, "train"):  # the valid replies only
        times.setdefault(x["site"], []).append(round(float(x["train-time-s"]), 2))
        if "gpu-peak-mib" in x:
            peaks[x["site"]] = round(max(peaks.get(x["site"], 0.0), float(x["gpu-peak-mib"])), 1)
    return {
        "round_time_s": [x.get("round-time-s") for x in lines
                         if x.get("phase") == "train" and x.get("scope") == "aggregate"],
        "site_train_time_s": times,
        "site_gpu_peak_mib": peaks,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus-per-site", type=float, default=0.25)
    parser.add_argument("--base", type=int, default=32, help="Hermes-R base channels")
    parser.add_argument("--patch", type=int, default=96, help="patch edge in voxels")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-iterations", type=int, default=DEFAULT_LOCAL_ITERATIONS)
    parser.add_argument("--keep", type=Path, default=None, help="keep the run in this folder (default: deleted)")
    args = parser.parse_args(argv)
    setting = {"sites": len(SITES), "gpus_per_site": args.gpus_per_site, "base": args.base, "patch": args.patch,
               "rounds": args.rounds, "local_iterations": args.local_iterations}
    if args.gpus_per_site > 0 and not torch.cuda.is_available():
        result = {**setting, "skipped": "needs a CUDA device (or --gpus-per-site 0 to run on the CPU)"}
        print(json.dumps(result))
        return result
    with tempfile.TemporaryDirectory(prefix="sim-gpu-") as tmp:
        configs = Path(tmp) / "sites"
        configs.mkdir()
        run_dir = args.keep or Path(tmp) / "run"
        opts = SimOptions(sites=site_configs(configs, args.patch), rounds=args.rounds,
                          local_iterations=args.local_iterations, base_channels=args.base,
                          gpus_per_site=args.gpus_per_site, evaluate_every=0, run_dir=run_dir, echo=False)
        with GpuMemorySampler() as sampler:
            outcome = run_mode("federated", opts)
        result = {**setting, "device": torch.cuda.get_device_name(0) if args.gpus_per_site > 0 else "cpu",
                  "wall_s": outcome.summary["wall_time_s"], **summarise(run_dir),
                  "gpu_used_peak_mib": sampler.peak_mib}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
