"""Site configs of a simulated federation, staged into the run directory.

Every site of a simulation writes its training state (``client_state/engine.pt``) into its ``work_dir``.
So that a run never picks up the state of an earlier one, :func:`stage_sites` writes a copy of each site
config into ``<run_dir>/sites/<site>.yaml`` whose ``work_dir`` is ``<run_dir>/sites/<site>`` and whose
dataset sources are absolute. The preprocessed data is not run-specific:
``<run_dir>/sites/<site>/preprocessed`` is a link to the ``preprocessed`` folder of the original
``work_dir``, so the client preprocesses a site's data on first use and every later run reuses it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from client.config import SiteConfig, load_site_config
from hermes_model.catalog import Catalog

logger = logging.getLogger(__name__)

SITES_DIR = "sites"
REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_SITES_DIR = REPO_ROOT / "site_configs" / "demo"
QUICK_SITES = ("sarcoma-ct", "sarcoma-mr")


@dataclass(frozen=True)
class StagedSite:
    """One site of a simulation.

    Attributes:
        name: the site name (``site:`` of its config).
        source: the site config given by the user.
        path: the run's copy of it (``<run_dir>/sites/<name>.yaml``).
        config: the validated run copy.
    """

    name: str
    source: Path
    path: Path
    config: SiteConfig


def demo_site_paths(quick: bool = False) -> list[Path]:
    """The bundled demo federation's site configs (``site_configs/demo/*.yaml``); with ``quick`` only
    the two sarcoma sites of :data:`QUICK_SITES`."""
    paths = sorted(DEMO_SITES_DIR.glob("*.yaml"))
    if not paths:
        raise ValueError(f"no demo site configs found in {str(DEMO_SITES_DIR)!r}")
    if quick:
        paths = [p for p in paths if p.stem in QUICK_SITES]
    return paths


def _staged_raw(raw: Mapping[str, Any], config: SiteConfig, work_dir: Path) -> dict[str, Any]:
    out = dict(raw)
    out["work_dir"] = str(work_dir)
    datasets = []
    for item, ds in zip(raw["datasets"], config.datasets, strict=True):
        datasets.append({**item, "source": str(ds.source)})
    out["datasets"] = datasets
    return out


def _link_preprocessed(original: SiteConfig, work_dir: Path) -> None:
    cache = original.preprocessed_dir
    cache.mkdir(parents=True, exist_ok=True)
    link = work_dir / "preprocessed"
    if link.is_symlink() or link.exists():
        if link.resolve() == cache.resolve():
            return
        raise ValueError(f"{str(link)!r} exists and is not a link to the preprocessed data {str(cache)!r}")
    try:
        link.symlink_to(cache, target_is_directory=True)
    except OSError:  # no symlinks (e.g. Windows without privileges): preprocess inside the run instead
        logger.warning("cannot link %s to %s: the site's data is preprocessed inside the run", link, cache)


def stage_sites(
    paths: Sequence[str | os.PathLike], run_dir: str | os.PathLike, catalog: Catalog | None = None
) -> list[StagedSite]:
    """Validate the site configs at ``paths`` and stage run copies of them in ``<run_dir>/sites``.

    Raises:
        ValueError: no path, a missing file, an invalid config, or two configs with the same site name.
    """
    if not paths:
        raise ValueError("sites: give at least one site config (.yaml)")
    catalog = catalog if catalog is not None else Catalog.load()
    sites_dir = Path(run_dir).resolve() / SITES_DIR
    staged: list[StagedSite] = []
    seen: dict[str, Path] = {}
    for raw_path in paths:
        path = Path(raw_path).resolve()
        if not path.is_file():
            raise ValueError(f"sites: site config {str(raw_path)!r} does not exist")
        original = load_site_config(path, catalog=catalog)
        if original.site in seen:
            raise ValueError(
                f"sites: {str(path)!r} and {str(seen[original.site])!r} both name site {original.site!r}; "
                "site names must be unique"
            )
        seen[original.site] = path
        work_dir = sites_dir / original.site
        work_dir.mkdir(parents=True, exist_ok=True)
        _link_preprocessed(original, work_dir)
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        copy = sites_dir / f"{original.site}.yaml"
        text = yaml.safe_dump(_staged_raw(raw, original, work_dir), sort_keys=False)
        copy.write_text(text, encoding="utf-8")
        staged.append(StagedSite(original.site, path, copy, load_site_config(copy, catalog=catalog)))
    return staged
