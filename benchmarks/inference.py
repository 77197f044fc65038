"""Sliding-window inference speed of the demo model on real demo scans, fp32 and bf16, sw-batch 1 and 4.

    python benchmarks/inference.py [--model final_model.pt] [--repeats 3] [--threads N] [--cases STS_002 ...]

Runs on the CPU. The demo's plan: Hermes-R base 8 (task slots and task ids of the demo federation: the
catalog plus the demo's BraTS and sarcoma datasets), 3 mm isotropic, 32³ windows, overlap 0.5, constant
blending (:func:`hermes_model.inference.predict_volume`). Each case is a whole scan preprocessed as the
inference path does it (:func:`client.preprocess.preprocess_image`: 3 mm, linear interpolation, its own
crop, padded to 32³; ``cases[].shape_zyx`` in the output is what the windows cover): by
default the sarcoma CT scans STS_002, STS_005 and STS_009 (task ``sarcoma/tumour``, modality CT) and the
BraTS FLAIR scan brats_2013_pat0001_1 (the four BraTS tasks, modality MR-T2, as the demo's brats-flair site).

For each precision (fp32; bf16 = CPU autocast) and sw-batch (1, 4): seconds per case (median over
``--repeats``, after one untimed warm-up run per setting; ``*_min``: the fastest repeat, the better figure
on a machine shared with other work), windows per second over all cases, and beside
them the bare forward pass (median over ``--repeats`` too) of the same number of random 32³ windows per case
at the same batch size and precision (no window extraction, sigmoid, blending or padding), so the
sliding-window overhead shows. Windows are counted by a hook on the model's forward.

Weights: ``--model PATH`` loads a trained checkpoint (:func:`hermes_model.load_checkpoint`); without it a
freshly built, randomly initialised model is timed. Speed does not depend on the weights (the same
convolutions, attention and element-wise work whatever the values), but the bf16-vs-fp32 agreement
check does: with random weights the probabilities sit where random weights put them, so the flip
fraction is indicative only; pass a trained checkpoint to judge bf16 for real.

Agreement: on the first case, every setting's probabilities are compared with fp32 at sw-batch 1 (max abs
probability difference, fraction of voxels whose ``prob >= 0.5`` decision flips, over all task channels).
``recommendation`` names the setting with the most windows per second among those that flip at most
``--max-flip-fraction`` of the voxels (default 1e-4: float32 rounding alone, e.g. sw-batch 4 against 1, can
move a voxel that sits at 0.5). Prints one JSON object; ``machine.load_average_1min`` (before and after)
tells whether other work shared the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import yaml

from client.preprocess import PreprocessSettings, preprocess_image
from hermes_model import build_model, load_checkpoint
from hermes_model.catalog import Catalog, modality_id
from hermes_model.inference import predict_volume

REPO = Path(__file__).resolve().parents[1]
DEMO_SITES = REPO / "site_configs" / "demo"
SARCOMA = REPO / "demo_data" / "sarcoma"
BRATS = REPO / "demo_data" / "brats"
DEFAULT_CASES = ("STS_002", "STS_005", "STS_009", "brats_2013_pat0001_1")
PUBLISHED_TASK_SLOTS = 72  # simulation.run.task_slots_for: max(72, tasks + 2), as the demo run builds it
ROI = 32
OVERLAP = 0.5
MODE = "constant"
SPACING = 3.0
PRECISIONS = ("fp32", "bf16")
SW_BATCHES = (1, 4)


@dataclass
class Case:
    name: str
    path: Path
    modality: str
    task_ids: list[int]
    image: np.ndarray  # preprocessed (Z, Y, X)


def demo_catalog() -> Catalog:
    """The catalog the demo federation runs with: the shipped one plus each demo site's new datasets,
    registered in site-name order (as ``hermes-sim run`` does)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the shipped catalog's own split notes are not ours to report
        catalog = Catalog.load()
    # the yaml files are read as plain data (only dataset names, modalities and classes are needed here)
    sites = sorted((yaml.safe_load(p.read_text()) for p in DEMO_SITES.glob("*.yaml")), key=lambda s: s["site"])
    for site in sites:
        for ds in site["datasets"]:
            if ds["name"] not in catalog:
                classes = {int(k): str(v) for k, v in ds["classes"].items()}
                catalog.register_dataset(ds["name"], ds["modality"], classes)
    return catalog


def preprocess(path: Path, modality: str) -> np.ndarray:
    settings = PreprocessSettings(
        modality=modality,
        classes=(),
        target_spacing=(SPACING, SPACING, SPACING),
        min_size=(ROI, ROI, ROI),
        interpolation="linear",
    )
    image, _ = preprocess_image(path, settings)
    return image


def load_case(name: str, catalog: Catalog) -> Case:
    """A demo case by name: ``STS_NNN`` (sarcoma CT) or ``brats_...`` (BraTS FLAIR, read as MR-T2)."""
    if name.startswith("STS_"):
        path, modality, dataset = SARCOMA / name / "CT_image.nii.gz", "CT", "sarcoma"
    elif name.startswith("brats_"):
        path, modality, dataset = BRATS / name / "flair_image.nii.gz", "MR-T2", "brats"
    else:
        raise SystemExit(f"--cases: {name!r} is neither a sarcoma (STS_NNN) nor a BraTS (brats_...) demo case")
    if not path.exists():
        raise SystemExit(f"--cases: {name}: {path} not found")
    ids = list(catalog.dataset(dataset).task_ids)
    return Case(name, path, modality, ids, preprocess(path, modality))


def autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


class WindowCounter:
    """Counts the windows the model sees (sum of batch sizes of its forward calls)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.windows = 0
        self.handle = model.register_forward_pre_hook(self._count)

    def _count(self, _module: torch.nn.Module, args: tuple) -> None:
        self.windows += int(args[0].shape[0])


def sliding_window(model: torch.nn.Module, case: Case, precision: str, sw_batch: int) -> torch.Tensor:
    return predict_volume(
        model,
        case.image,
        case.task_ids,
        modality_id(case.modality),
        roi_size=ROI,
        overlap=OVERLAP,
        mode=MODE,
        sw_batch_size=sw_batch,
        precision=precision,
    )


def bare_forward(model: torch.nn.Module, case: Case, windows: int, precision: str, batch: int) -> None:
    """``windows`` random 32³ windows through the model in batches of ``batch`` (the last one smaller)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, ROI, ROI, ROI, generator=g)
    tids = torch.tensor([case.task_ids] * batch)
    mids = torch.tensor([[modality_id(case.modality)]] * batch)
    with torch.no_grad(), autocast(precision):
        for start in range(0, windows, batch):
            k = min(batch, windows - start)
            model(x[:k], tids[:k], mids[:k])


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def agreement(probs: torch.Tensor, ref: torch.Tensor) -> dict:
    flips = (probs >= 0.5) != (ref >= 0.5)
    return {
        "max_abs_prob_diff": float((probs - ref).abs().max()),
        "flip_fraction": float(flips.float().mean()),
        "flipped_voxels": int(flips.sum()),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="a trained checkpoint (default: random weights)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case and setting (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    parser.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), help="demo case names")
    parser.add_argument(
        "--max-flip-fraction", type=float, default=1e-4, help="most flipped voxels a recommended setting may have"
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(args.threads if args.threads else cores)
    load_before = os.getloadavg()[0]

    catalog = demo_catalog()
    task_slots = max(PUBLISHED_TASK_SLOTS, catalog.num_tasks + 2)
    if args.model is not None:
        loaded = load_checkpoint(args.model)
        model, model_config, weights = loaded.model, loaded.config, str(args.model)
    else:
        torch.manual_seed(0)
        model_config = {"name": "hermes-r", "base_channels": 8, "task_slots": task_slots, "modality_slots": 6}
        model = build_model("hermes-r", base_channels=8, task_slots=task_slots, modality_slots=6)
        weights = "random (build_model, seed 0)"
    model = model.eval()
    cases = [load_case(name, catalog) for name in args.cases]
    counter = WindowCounter(model)

    settings = [(precision, sw_batch) for precision in PRECISIONS for sw_batch in SW_BATCHES]
    first_probs = {}
    for precision, sw_batch in settings:  # warm-up; these probabilities are the agreement check's
        first_probs[(precision, sw_batch)] = sliding_window(model, cases[0], precision, sw_batch)
        bare_forward(model, cases[0], 2 * sw_batch + 1, precision, sw_batch)  # a full and a partial batch
    # Repeats interleave the settings, and each bare forward runs right after its sliding window, so a
    # burst of other work on the machine hits every setting alike instead of one whole setting.
    windows: dict[str, int] = {}
    sw_t: dict[tuple, list[float]] = {(*st, c.name): [] for st in settings for c in cases}
    bare_t: dict[tuple, list[float]] = {(*st, c.name): [] for st in settings for c in cases}
    for repeat in range(args.repeats):
        for precision, sw_batch in settings:
            for case in cases:
                counter.windows = 0
                sw_t[(precision, sw_batch, case.name)].append(
                    seconds(partial(sliding_window, model, case, precision, sw_batch))
                )
                n = counter.windows
                if windows.setdefault(case.name, n) != n:
                    raise RuntimeError(f"{case.name}: {n} windows at sw-batch {sw_batch}, {windows[case.name]} before")
                bare_t[(precision, sw_batch, case.name)].append(
                    seconds(partial(bare_forward, model, case, n, precision, sw_batch))
                )
        print(f"repeat {repeat + 1}/{args.repeats} done", file=sys.stderr)

    total_windows = sum(windows.values())
    results = []
    for precision, sw_batch in settings:
        row: dict = {"precision": precision, "sw_batch": sw_batch}
        for label, times in (("", sw_t), ("bare_forward_", bare_t)):
            med = {c.name: statistics.median(times[(precision, sw_batch, c.name)]) for c in cases}
            low = {c.name: min(times[(precision, sw_batch, c.name)]) for c in cases}
            row[f"{label}seconds_per_case"] = {k: round(v, 3) for k, v in med.items()}
            row[f"{label}seconds_per_case_min"] = {k: round(v, 3) for k, v in low.items()}
            row[f"{label}windows_per_s"] = round(total_windows / sum(med.values()), 2)
            row[f"{label}windows_per_s_best"] = round(total_windows / sum(low.values()), 2)
        row["sliding_window_overhead"] = round(row["bare_forward_windows_per_s"] / row["windows_per_s"] - 1, 3)
        results.append(row)
    counter.handle.remove()

    reference = first_probs[("fp32", 1)]
    for row in results:
        row[f"vs_fp32_sw1_on_{cases[0].name}"] = agreement(first_probs[(row["precision"], row["sw_batch"])], reference)
    key = f"vs_fp32_sw1_on_{cases[0].name}"
    safe = [r for r in results if r[key]["flip_fraction"] <= args.max_flip_fraction]
    best = max(safe, key=lambda r: r["windows_per_s"])

    def describe(r: dict) -> str:
        return (
            f"{r['precision']} sw-batch {r['sw_batch']} ({r['windows_per_s']} windows/s median, "
            f"{r['windows_per_s_best']} in its fastest repeats)"
        )

    recommendation = (
        f"{describe(best)}: the fastest setting by median that flips at most a fraction {args.max_flip_fraction} "
        f"of the 0.5-threshold decisions on {cases[0].name}"
    )
    for r in results:  # anything faster by either figure, and what it costs
        if r is not best and (
            r["windows_per_s"] > best["windows_per_s"] or r["windows_per_s_best"] > best["windows_per_s_best"]
        ):
            flips = r[key]
            recommendation += (
                f"; {describe(r)} flips {flips['flipped_voxels']} voxels ({flips['flip_fraction']:.2e}), "
                f"max abs probability difference {flips['max_abs_prob_diff']:.2e}"
            )
    if args.model is None:
        recommendation += " (random weights: the agreement check is indicative only)"

    out = {
        "benchmark": "sliding-window inference (CPU)",
        "settings": {
            "model": model_config,
            "weights": weights,
            "spacing_mm": SPACING,
            "roi": ROI,
            "overlap": OVERLAP,
            "mode": MODE,
            "precisions": list(PRECISIONS),
            "sw_batches": list(SW_BATCHES),
            "repeats": args.repeats,
        },
        "machine": {
            "cpu_count": cores,
            "torch_threads": torch.get_num_threads(),
            "torch_version": torch.__version__,
            "processor": platform.processor() or platform.machine(),
            "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "native_bf16": bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        },
        "cases": [
            {
                "name": c.name,
                "modality": c.modality,
                "task_ids": c.task_ids,
                "shape_zyx": list(c.image.shape),
                "windows": windows[c.name],
            }
            for c in cases
        ],
        "results": results,
        "recommendation": recommendation,
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
