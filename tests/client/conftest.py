"""Fixtures of the site-side tests: the real data folder beside the repo, synthetic images, site yamls."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
import yaml

from hermes_model.catalog import Catalog
from hermes_model.plans import Plans

# the plan of the small synthetic sites: the recipe's spacing and intensity, 16^3 patches, crop margin 4
SMALL_PLANS = Plans(target_spacing=(1.5, 1.5, 1.5), patch_size=(16, 16, 16), train_margin=4)
SHARED_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``shared/data`` beside the repository (skips the test when absent)."""
    if not (SHARED_DATA / "README.md").is_file():
        pytest.skip(f"real data folder not found at {SHARED_DATA} (the 'shared' folder beside the repo)")
    return SHARED_DATA.resolve()


@pytest.fixture(scope="session")
def catalog() -> Catalog:
    """The bundled task catalog, loaded once (its load logs warnings about its own content)."""
    logging.getLogger("hermes_model.catalog").setLevel(logging.ERROR)
    return Catalog.load()


def make_image(
    array_zyx: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    direction: Sequence[float] = (1, 0, 0, 0, 1, 0, 0, 0, 1),
) -> sitk.Image:
    """A SimpleITK image from a (Z, Y, X) array and its geometry (x, y, z order)."""
    image = sitk.GetImageFromArray(array_zyx)
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in origin])
    image.SetDirection([float(d) for d in direction])
    return image


def blob_case(shape_zyx: Sequence[int] = (24, 28, 32), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like float image (air around a soft-tissue body) and a two-class int label inside it."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.arange(n) for n in shape_zyx), indexing="ij")
    centre = [n / 2 for n in shape_zyx]
    r = np.sqrt(sum(((g - c) / (n / 3)) ** 2 for g, c, n in zip((z, y, x), centre, shape_zyx, strict=True)))
    image = np.where(r < 1.3, 40.0, -1000.0) + rng.normal(0, 10, shape_zyx)
    label = np.zeros(shape_zyx, np.uint8)
    label[r < 0.8] = 1
    label[(r < 0.4) & (x > centre[2])] = 2
    image[label == 2] += 100
    return image.astype(np.float32), label


@pytest.fixture
def write_site(tmp_path: Path) -> Callable[..., Path]:
    """``write_site(datasets, **top_level)`` writes ``site.yaml`` in ``tmp_path`` and returns its path."""

    def write(datasets: list[dict[str, Any]], **top: Any) -> Path:
        body = {"site": "test-site", "work_dir": "work", **top, "datasets": datasets}
        path = tmp_path / "site.yaml"
        path.write_text(yaml.safe_dump(body, sort_keys=False))
        return path

    return write


def write_csv(path: Path, rows: Sequence[tuple[str, str | Path, str | Path | None]]) -> Path:
    """A ``case,image,label`` csv (``None`` label = unlabelled)."""
    lines = ["case,image,label"] + [f"{c},{i},{'' if lab is None else lab}" for c, i, lab in rows]
    path.write_text("\n".join(lines) + "\n")
    return path
