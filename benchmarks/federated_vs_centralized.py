"""Federated training against centralized and local-only training on the demo federation, same patches.

    python benchmarks/federated_vs_centralized.py --quick            # about 5 minutes on 2 cores
    python benchmarks/federated_vs_centralized.py --seeds 0 1 2      # the grid (hours on a CPU)
    python benchmarks/federated_vs_centralized.py --modes fedavg nesterov-k20 centralized --seeds 0

Every arm runs through ``hermes-sim`` (``simulation.run.run_mode``) with the demo's settings and the same
number of samples per site, drawn by one plan (``client.dataset.round_sampling_seed``); arms with the same
rounds draw the same patches: ``centralized`` and ``local-only`` those of the default mode, their ``-k20``
twins those of FedAvg and the other 20-step modes. Each run is scored twice, both times on whole scans at
their native geometry through the code of ``hermes-predict`` and ``hermes-evaluate``: on the sites' validation
cases (the run's own report) and on a test split of sarcoma patients that no site trains or validates on
(:data:`TEST_PATIENTS` from ``../shared/data/ibsi_sts``, CT, MR-T1 and PET; each modality's scans are
segmented by the model a user of that site would get: the federated or centralized ``final_model.pt``, or the
site's own local-only model).

``exact_max_rel_diff``: the federation with one-batch gradients and the server's LAMB (``gradient-k1``)
against centralized training, both with one local step per round: the largest relative difference of any
parameter tensor of their raw final weights (float32 training; ``tests/integration/test_gradient_exactness.py``
shows the same comparison in float64 to 1e-7).

Prints one JSON object ``{"runs": [{"mode", "seed", "split", "sarcoma", "brats", "all", "per_site",
"wall_s", "rounds", "overhead", "bytes_moved"}], "exact_max_rel_diff": float, "mean_over_seeds": [{"mode",
"split", "seeds", "sarcoma", "brats", "all", "wall_s"}]}`` (``overhead``: the share of the wall time in
which no site trained or evaluated; ``bytes_moved``: what the federation's messages carried);
``--quick``: the two sarcoma sites of the quick demo,
2 test patients, the two baselines, the default mode and the exactness pair.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from client.evaluate import ClassSpec, evaluate_case  # noqa: E402
from client.predict import predict  # noqa: E402
from client.preprocess import read_image  # noqa: E402
from hermes_model import load_checkpoint  # noqa: E402
from hermes_model.exchange import StateLayout  # noqa: E402
from simulation.report import DiceReport, load_report  # noqa: E402
from simulation.run import DEFAULT_LOCAL_ITERATIONS, SimOptions, default_evaluate_every, run_mode  # noqa: E402

SHARED_STS = REPO.parent / "shared" / "data" / "ibsi_sts"
TEST_PATIENTS = tuple(f"STS_{i:03d}" for i in range(31, 37))  # the demo's sites use STS_001-023
QUICK_TEST_PATIENTS = TEST_PATIENTS[:2]
# site -> (modality, image file, mask file) of the sarcoma test scans it would segment
SARCOMA_SITES = {
    "sarcoma-ct": ("CT", "CT_image.nii.gz", "CT_mask.nii.gz"),
    "sarcoma-mr": ("MR-T1", "MR_T1_image.nii.gz", "MR_T1_mask.nii.gz"),
    "sarcoma-pet": ("PET", "PET_image.nii.gz", "PET_mask.nii.gz"),
}
SARCOMA_TASK = "sarcoma/tumour"
EVALUATIONS = 3  # validation points per run: evaluation time is not what the arms differ in
TEST_DICE_FILE = "test_dice.json"  # a run's test-split Dice, kept beside it


@dataclass(frozen=True)
class Mode:
    """One arm: the ``hermes-sim`` mode and its options (``options`` are ``SimOptions`` fields)."""

    sim_mode: str
    options: dict[str, Any] = field(default_factory=dict)


STEPS = 20  # local steps per round of FedAvg (the demo's before nesterov-k5 became its default)
# The baselines take the default mode's rounds, so they draw its very patches; their "-k20" twins draw
# FedAvg's (a round's patches are drawn for its steps: the same plan and number, other patches).
MODES = {
    "centralized": Mode("centralized", {"local_iterations": DEFAULT_LOCAL_ITERATIONS}),
    "local-only": Mode("local-only", {"local_iterations": DEFAULT_LOCAL_ITERATIONS}),
    "centralized-k20": Mode("centralized", {"local_iterations": STEPS}),
    "local-only-k20": Mode("local-only", {"local_iterations": STEPS}),
    "fedavg": Mode("federated", {"server_optimizer": "sgd", "local_iterations": STEPS}),  # the old default
    "nesterov-k5": Mode("federated", {"server_optimizer": "nesterov", "local_iterations": 5}),
    "nesterov-k10": Mode("federated", {"server_optimizer": "nesterov", "local_iterations": 10}),
    "nesterov-k20": Mode("federated", {"server_optimizer": "nesterov", "local_iterations": STEPS}),
    "nesterov-k20-reset": Mode("federated", {"server_optimizer": "nesterov", "local_iterations": STEPS,
                                             "keep_local_state": False}),
    "adam": Mode("federated", {"server_optimizer": "adam", "local_iterations": STEPS}),
    "gradient-k1": Mode("federated", {"server_optimizer": "lamb", "local_update": "gradient", "local_iterations": 1}),
}
DEFAULT_MODE = "nesterov-k5"  # hermes-sim run's default
QUICK_MODES = ("centralized", "local-only", DEFAULT_MODE)


def _sim_options(mode: Mode, seed: int, run_dir: Path, quick: bool, rounds: int | None) -> SimOptions:
    """Every arm takes the demo's optimiser steps per site (``--quick``: the quick demo's), in rounds of its
    own local steps (``--quick``: scaled down as the quick demo scales FedAvg's)."""
    options = dict(mode.options)
    demo = SimOptions(quick=quick)
    steps = options.pop("local_iterations")
    if quick:
        steps = max(1, steps * demo.local_iterations // STEPS)
    rounds = rounds or demo.rounds * demo.local_iterations // steps
    every = default_evaluate_every(rounds, EVALUATIONS)  # the same points of the run whatever its rounds
    return SimOptions(quick=quick, seed=seed, run_dir=run_dir, echo=False, rounds=rounds, local_iterations=steps,
                      evaluate_every=every, evaluate_raw=False, **options)  # arms compared on what they hand over


def _test_scores(run_dir: Path, sim_mode: str, sites: list[str], patients: tuple[str, ...],
                 out: Path) -> dict[str, float]:
    """Mean whole-scan Dice of the sarcoma test scans per site (modality)."""
    scores: dict[str, float] = {}
    for site in sites:
        modality, image, mask = SARCOMA_SITES[site]
        model = run_dir / "models" / f"{site}.pt" if sim_mode == "local-only" else run_dir / "final_model.pt"
        dice = []
        for patient in patients:
            pred = out / f"{site}-{patient}.nii.gz"
            (result,) = predict(model, SHARED_STS / patient / image, pred, modality, SARCOMA_TASK, progress=False)
            if not result.ok:
                raise RuntimeError(f"{patient} {modality}: {result.error}")
            (row,) = evaluate_case(read_image(pred), read_image(SHARED_STS / patient / mask),
                                   [ClassSpec(SARCOMA_TASK, (1,), (1,))], name=patient, metrics=("dice",))
            dice.append(float(row["dice"]))
        scores[site] = statistics.fmean(dice)
    return scores


def _cached_test_scores(run_dir: Path, sim_mode: str, sites: list[str], patients: tuple[str, ...],
                        out: Path) -> dict[str, float]:
    """:func:`_test_scores`, kept in ``<run_dir>/test_dice.json`` for the same sites and patients."""
    cache = run_dir / TEST_DICE_FILE
    key = {"sites": sites, "patients": list(patients)}
    if cache.is_file():
        held = json.loads(cache.read_text(encoding="utf-8"))
        if held.get("key") == key:
            return held["dice"]
    scores = _test_scores(run_dir, sim_mode, sites, patients, out)
    cache.write_text(json.dumps({"key": key, "dice": scores}), encoding="utf-8")
    return scores


def _val_row(report: DiceReport) -> dict[str, Any]:
    per_site = {site: statistics.fmean(d for d, _ in tasks.values()) for site, tasks in report.site_tasks.items()}
    return {"sarcoma": _num(report.datasets.get("sarcoma")), "brats": _num(report.datasets.get("brats")),
            "all": _num(report.overall), "per_site": {k: _num(v) for k, v in sorted(per_site.items())}}


def _num(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 4)


def _finished_run(opts: SimOptions) -> tuple[DiceReport, dict[str, Any]] | None:
    """The report of a run already completed in ``opts.run_dir`` with the same rounds and steps (a grid that
    was stopped goes on where it stopped), else None."""
    try:
        report, summary = load_report(opts.run_dir)
    except ValueError:
        return None
    same = (summary.get("rounds"), summary.get("local_iterations")) == (opts.rounds, opts.local_iterations)
    return (report, summary) if same and summary.get("wall_time_s") is not None else None


def _bytes_moved(opts: SimOptions, mode: Mode) -> int | None:
    """Bytes the federation's messages carry (federated arms): per site and round the model down and the
    update up (a gradient round: two arrays up), per evaluation the model down; float32, no reply codec,
    counting the backbone (the prior rows a site exchanges are below 0.1 % of it)."""
    if mode.sim_mode != "federated":
        return None
    model = load_checkpoint(opts.run_dir / "final_model.pt").model
    backbone = StateLayout.from_model(model).backbone_size * 4
    up = 2 if opts.local_update == "gradient" else 1
    evaluations = sum(1 for r in range(1, opts.rounds + 1) if r % opts.evaluate_every == 0 or r == opts.rounds)
    return len(opts.sites) * backbone * (opts.rounds * (1 + up) + evaluations)


def run_arm(name: str, seed: int, work: Path, quick: bool, rounds: int | None, patients: tuple[str, ...],
            score_only: bool = False) -> list[dict]:
    """The arm's validation and test rows. An arm not finished in ``work`` is trained first, or with
    ``score_only`` left out (no rows)."""
    mode = MODES[name]
    opts = _sim_options(mode, seed, work / f"{name}-seed{seed}", quick, rounds)
    finished = _finished_run(opts)
    if finished is None and score_only:
        print(f"{name} seed {seed}: not finished in {work}, left out", file=sys.stderr)
        return []
    if finished is None:
        if opts.run_dir.exists():  # a run stopped part-way: start the arm over, keep what it left aside
            opts.run_dir.rename(opts.run_dir.with_name(f"{opts.run_dir.name}.stopped-{time.strftime('%Y%m%d-%H%M%S')}"))
        result = run_mode(mode.sim_mode, opts)
        finished = result.report, result.summary
    report, summary = finished
    common = {"mode": name, "seed": seed, "wall_s": round(summary["wall_time_s"], 1), "rounds": opts.rounds,
              "overhead": summary.get("overhead_fraction_idle"), "bytes_moved": _bytes_moved(opts, mode)}
    sites = [s for s in SARCOMA_SITES if s in {p.stem for p in opts.sites}]
    test = _cached_test_scores(opts.run_dir, mode.sim_mode, sites, patients, work / "predictions")
    test_row = {"sarcoma": _num(statistics.fmean(test.values())), "brats": None,
                "all": _num(statistics.fmean(test.values())), "per_site": {k: _num(v) for k, v in test.items()}}
    rows = [{**common, "split": "val", **_val_row(report)}, {**common, "split": "test", **test_row}]
    print(json.dumps(rows), file=sys.stderr, flush=True)  # progress: one line per finished arm
    return rows


def exactness(work: Path, quick: bool) -> float:
    """Largest relative difference of a parameter tensor between ``gradient-k1`` and centralized training
    with one step per round (raw final weights)."""
    rounds = 4 if quick else 10
    states = []
    for sim_mode, options in (("federated", MODES["gradient-k1"].options), ("centralized", {"local_iterations": 1})):
        opts = SimOptions(quick=quick, run_dir=work / f"exact-{sim_mode}", echo=False, rounds=rounds,
                          evaluate_every=rounds, **options)
        run_mode(sim_mode, opts)
        states.append(load_checkpoint(opts.run_dir / "final_model.pt", use_ema=False).model.state_dict())
    fed, central = states
    return max(float((fed[k] - central[k]).norm() / central[k].norm().clamp_min(1e-12)) for k in central)


def seed_means(runs: list[dict]) -> list[dict]:
    """Per mode and split, the mean over its seeds of sarcoma, BraTS and all-task Dice and of the wall time."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in runs:
        groups.setdefault((row["mode"], row["split"]), []).append(row)
    out = []
    for (mode, split), rows in groups.items():
        def mean(key: str, rows: list[dict] = rows) -> float | None:
            values = [r[key] for r in rows if r[key] is not None]
            return _num(statistics.fmean(values)) if values else None
        out.append({"mode": mode, "split": split, "seeds": sorted(r["seed"] for r in rows),
                    **{k: mean(k) for k in ("sarcoma", "brats", "all", "wall_s")}})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 sites, 1 seed, the baselines and the default mode")
    parser.add_argument("--modes", nargs="+", choices=sorted(MODES), default=None)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--rounds", type=int, default=None, help="rounds of every arm (default: the demo's)")
    parser.add_argument("--no-exactness", action="store_true", help="skip the gradient-k1 vs centralized pair")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="keep the runs here; an arm already finished there is scored, not run again "
                        "(default: a temp folder)")
    parser.add_argument("--score-only", action="store_true",
                        help="train nothing: report the arms already finished in --work-dir, leave out the rest")
    args = parser.parse_args(argv)
    if args.score_only and args.work_dir is None:
        parser.error("--score-only needs --work-dir (the folder holding the finished arms)")
    logging.basicConfig(level=logging.WARNING)
    if not SHARED_STS.is_dir():
        print(f"the test patients live in {SHARED_STS}: not found", file=sys.stderr)
        return 2
    modes = args.modes or (list(QUICK_MODES) if args.quick else sorted(MODES))
    patients = QUICK_TEST_PATIENTS if args.quick else TEST_PATIENTS
    with tempfile.TemporaryDirectory(prefix="fed-vs-central-") as tmp:
        work = args.work_dir or Path(tmp)
        (work / "predictions").mkdir(parents=True, exist_ok=True)
        runs = [row for seed in args.seeds for name in modes
                for row in run_arm(name, seed, work, args.quick, args.rounds, patients, args.score_only)]
        exact = None if args.no_exactness or args.score_only else exactness(work, args.quick)
    print(json.dumps({"runs": runs, "exact_max_rel_diff": exact, "mean_over_seeds": seed_means(runs),
                      "test_patients": list(patients), "default_mode": DEFAULT_MODE}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
