"""Fixtures of the integration tests: the real data folder beside the repo, tiny real sites, Flower's
process identity for in-process runs."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from server.local_grid import server_identity

SHARED_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"

# one sarcoma patient of ``shared/data/ibsi_sts``: (CT image, CT mask) and (MR-T1 image, MR-T1 mask)
STS_CT = ("CT_image.nii.gz", "CT_mask.nii.gz")
STS_MR_T1 = ("MR_T1_image.nii.gz", "MR_T1_mask.nii.gz")
BRATS_FLAIR = ("flair_image.nii.gz", "seg.nii.gz")
BRATS_CLASSES = {1: "necrosis", 2: "oedema", 3: "non-enhancing tumour", 4: "enhancing tumour"}


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``shared/data`` beside the repository (skips the test when absent)."""
    if not (SHARED_DATA / "README.md").is_file():
        pytest.skip(f"real data folder not found at {SHARED_DATA} (the 'shared' folder beside the repo)")
    return SHARED_DATA.resolve()


@pytest.fixture(autouse=True)
def flower_identity() -> Iterator[None]:
    """Messages built by the server read Flower's TaskIdentity, which a ServerApp process has set."""
    logging.getLogger("hermes_model.catalog").setLevel(logging.ERROR)
    with server_identity(run_id=1):
        yield


@dataclass(frozen=True)
class SiteData:
    """One dataset of a test site: real cases copied from ``shared/data``.

    Attributes:
        dataset / modality / classes: as in the site config.
        folder: the dataset's folder in ``shared/data`` (e.g. ``ibsi_sts``).
        files: (image, label) file names inside each case folder.
        cases: case folders (= case ids); ``val``: those of them kept for validation.
    """

    dataset: str
    modality: str
    classes: dict[int, str]
    folder: str
    files: tuple[str, str]
    cases: tuple[str, ...]
    val: tuple[str, ...] = ()


PLAN_SETTINGS = {"target_spacing": 4.0, "patch_size": 32, "train_margin": 2}


def write_site(root: Path, shared: Path, name: str, data: SiteData, **training: Any) -> Path:
    """A site ``name`` in ``root`` (csv format, CPU training); its yaml. The plan of these tests is
    :data:`PLAN_SETTINGS` (4 mm, 32^3 patches, crop margin 2), set in the server config."""
    root.mkdir(parents=True, exist_ok=True)
    lines = ["case,image,label"]
    for case in data.cases:
        folder = root / "raw" / case
        folder.mkdir(parents=True)
        for file in data.files:
            shutil.copy(shared / data.folder / case / file, folder / file)
        lines.append(f"{case},raw/{case}/{data.files[0]},raw/{case}/{data.files[1]}")
    (root / "cases.csv").write_text("\n".join(lines) + "\n")
    body = {
        "site": name, "work_dir": "work",
        "datasets": [{"name": data.dataset, "modality": data.modality, "format": "csv", "source": "cases.csv",
                      "classes": dict(data.classes), "split": {"val": list(data.val), "test": []}}],
        "training": {"devices": "cpu", "batch_size": 1, "num_workers": 0, "bf16": False,
                     **training},
    }
    path = root / "site.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path
