"""Preprocessing throughput: cases per minute and peak memory on the real sarcoma and BraTS cases of
``../shared/data``, with 1 and 2 worker processes.

    python benchmarks/preprocess.py [--shared ../shared] [--workers 1 2] [--min-size 128]

Prints one JSON line per worker count. Each measurement runs in a fresh process over a fresh work
directory (nothing skipped); peak memory is the largest resident set of the main process and of any
worker process.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BRATS_CLASSES = {1: "necrosis", 2: "oedema", 3: "non-enhancing tumour", 4: "enhancing tumour"}


def write_site(shared: Path, folder: Path, min_size: int) -> tuple[Path, int]:
    """A site config with the sarcoma CT cases and the BraTS FLAIR cases; returns (path, case count)."""
    data = shared / "data"
    sarcoma = sorted(p for p in (data / "ibsi_sts").glob("STS_*") if (p / "CT_image.nii.gz").exists())
    brats = sorted(p for p in (data / "brats2013").glob("brats_*") if p.is_dir())
    _write_csv(folder / "sarcoma.csv", [(p.name, p / "CT_image.nii.gz", p / "CT_mask.nii.gz") for p in sarcoma])
    _write_csv(folder / "brats.csv", [(p.name, p / "flair_image.nii.gz", p / "seg.nii.gz") for p in brats])
    config = {
        "site": "benchmark",
        "work_dir": "work",
        "min_size": min_size,
        "datasets": [
            {"name": "sarcoma_ct", "modality": "CT", "format": "csv", "source": "sarcoma.csv",
             "classes": {1: "tumour"}, "split": {"val": 0.2, "test": 0.0, "seed": 0}},
            {"name": "brats_flair", "modality": "MR-T2", "format": "csv", "source": "brats.csv",
             "classes": BRATS_CLASSES, "split": {"val": 0.2, "test": 0.0, "seed": 0}},
        ],
    }
    path = folder / "site.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, len(sarcoma) + len(brats)


def _write_csv(path: Path, rows: list[tuple[str, Path, Path]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case", "image", "label"])
        writer.writerows((case, str(image), str(label)) for case, image, label in rows)


def measure(site: Path, workers: int) -> dict:
    """Run one preprocessing in this process (called in a fresh subprocess)."""
    from client.config import load_site_config
    from client.preprocess import preprocess_site

    config = load_site_config(site)
    start = time.perf_counter()
    report = preprocess_site(config, workers=workers, progress=False)
    seconds = time.perf_counter() - start
    cases = len(report.done)
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"workers": workers, "cases": cases, "failed": len(report.failed), "seconds": round(seconds, 2),
            "cases_per_min": round(60 * cases / seconds, 1),
            "peak_mem_mb_main": round(own, 1), "peak_mem_mb_worker": round(children, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--min-size", type=int, default=128)
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # internal: run one measurement
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.workers[0])))
        return
    if not (args.shared / "data").is_dir():
        sys.exit(f"no data folder under {args.shared}: pass --shared PATH")
    for workers in args.workers:
        with tempfile.TemporaryDirectory() as tmp:
            site, total = write_site(args.shared.resolve(), Path(tmp), args.min_size)
            out = subprocess.run([sys.executable, __file__, "--measure", str(site), "--workers", str(workers)],
                                 check=True, capture_output=True, text=True, cwd=REPO)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            print(json.dumps({"benchmark": "preprocess", "cases_listed": total, "min_size": args.min_size,
                              **result}))


if __name__ == "__main__":
    main()
