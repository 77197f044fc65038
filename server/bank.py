"""The global prior bank: for every task row and modality row, which sites own it and its last update.

The tensors themselves live in the global model state (``server.state.GlobalState``); this module keeps
the bookkeeping: ownership (from the sites' ``query`` replies and the task catalog), the round that
last updated a row and the samples behind that update. New datasets reported by a site are registered
in the catalog (new task ids are appended; existing ids never move). The state is JSON-serialisable.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hermes_model.catalog import Catalog, canonical_modality, modality_id, modality_row
from hermes_model.trained import TrainedTask

logger = logging.getLogger(__name__)

TASK, MODALITY = "task", "modality"
ROW_KINDS = (TASK, MODALITY)


@dataclass(frozen=True)
class SiteDataset:
    """One dataset as a site reports it (no case ids, file names or paths).

    Attributes:
        name: dataset name.
        modalities: canonical modality names of its images (usually one).
        classes: label value -> class name.
        num_train_cases: training cases at the site.
    """

    name: str
    modalities: tuple[str, ...]
    classes: dict[int, str]
    num_train_cases: int = 0


@dataclass(frozen=True)
class SiteOwnership:
    """The prior rows a site owns, the task keys of its datasets and the modalities of its tasks."""

    task_ids: tuple[int, ...]
    modality_rows: tuple[int, ...]
    task_map: dict[str, int]
    datasets: tuple[str, ...]
    task_modalities: dict[int, tuple[str, ...]] = field(default_factory=dict)


@dataclass
class RowInfo:
    """Owners of one prior row; the round that last updated it and the samples of that update; the samples
    of every update together and the modalities they were drawn from (the row's training history)."""

    owners: set[str] = field(default_factory=set)
    last_round: int | None = None
    samples: float = 0.0
    total_samples: float = 0.0
    modalities: set[str] = field(default_factory=set)

    def to_dict(self) -> dict[str, Any]:
        return {"owners": sorted(self.owners), "last_round": self.last_round, "samples": self.samples,
                "total_samples": self.total_samples, "modalities": sorted(self.modalities)}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> RowInfo:
        return cls(set(raw["owners"]), raw["last_round"], float(raw["samples"]),
                   float(raw.get("total_samples", raw["samples"])), set(raw.get("modalities", [])))


def required_task_slots(catalog: Catalog, spare: int) -> int:
    """Task slots that hold every task of ``catalog`` plus ``spare`` rows: task ids ``0..task_slots-2`` fit
    (one slot is the null token)."""
    return catalog.num_tasks + 1 + int(spare)


def parse_site_datasets(text: str) -> list[SiteDataset]:
    """Parse the ``datasets`` json of a query reply: a list of ``{"name", "modality", "classes",
    "num_train_cases"}`` (``modality`` a name or a list of names; ``classes`` ``{"1": "liver"}``).

    Raises:
        ValueError: malformed json or entries (the message names the entry and field).
    """
    try:
        raw = json.loads(text)
    except (TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"site datasets must be a json list, got {str(text)[:80]!r}: {exc}") from None
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"site datasets must be a non-empty json list, got {type(raw).__name__}")
    out, names = [], set()
    for i, entry in enumerate(raw):
        item = _parse_dataset(i, entry)
        if item.name in names:
            raise ValueError(f"datasets[{i}]: dataset {item.name!r} reported twice")
        names.add(item.name)
        out.append(item)
    return out


def _parse_dataset(i: int, entry: Any) -> SiteDataset:
    where = f"datasets[{i}]"
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where}: must be an object with name, modality, classes, num_train_cases")
    name = entry.get("name")
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"{where}.name: must be a non-empty string without '/', got {name!r}")
    raw_mod = entry.get("modality")
    mods = [raw_mod] if isinstance(raw_mod, str) else raw_mod
    if not isinstance(mods, list) or not mods:
        raise ValueError(f"{where}.modality: must be a modality name or a list of them, got {raw_mod!r}")
    modalities = tuple(dict.fromkeys(canonical_modality(m) for m in mods))
    classes_raw = entry.get("classes")
    if not isinstance(classes_raw, Mapping) or not classes_raw:
        raise ValueError(
            f"{where}.classes: must be a non-empty object label -> class name, got {classes_raw!r}"
        )
    classes: dict[int, str] = {}
    for key, cname in classes_raw.items():
        try:
            value = int(key)
        except (TypeError, ValueError):
            value = 0
        if value < 1 or not isinstance(cname, str) or not cname.strip():
            raise ValueError(f"{where}.classes: bad entry {key!r}: {cname!r} (label >= 1 -> class name)")
        classes[value] = cname.strip()
    cases = entry.get("num_train_cases", 0)
    if isinstance(cases, bool) or not isinstance(cases, int) or cases < 0:
        raise ValueError(f"{where}.num_train_cases: must be an int >= 0, got {cases!r}")
    return SiteDataset(name, modalities, classes, cases)


class PriorBank:
    """Ownership and update history of every task row (ids ``0..task_slots-1``) and modality row.

    Args:
        task_slots: task ids of the model (the bank's null row is part of the backbone, not here).
        modality_slots: rows of the modality prior bank.
    """

    def __init__(self, task_slots: int, modality_slots: int) -> None:
        if task_slots < 1 or modality_slots < 2:
            raise ValueError(
                f"need task_slots >= 1 and modality_slots >= 2, got {task_slots}, {modality_slots}"
            )
        self.task_slots, self.modality_slots = int(task_slots), int(modality_slots)
        self.rows: dict[str, dict[int, RowInfo]] = {TASK: {}, MODALITY: {}}
        self.sites: dict[str, SiteOwnership] = {}

    # -- ownership ---------------------------------------------------------------------------------
    def register_site(self, site: str, datasets: Sequence[SiteDataset], catalog: Catalog) -> SiteOwnership:
        """Record what ``site`` owns; datasets new to ``catalog`` are registered in it first.

        A site reporting again (a restart, a resumed run) replaces its previous ownership.

        Raises:
            ValueError: a dataset disagrees with the catalog, or new tasks do not fit ``task_slots``.
        """
        for ds in datasets:  # check everything before registering anything
            self._check_dataset(ds, catalog)
        new = [ds for ds in datasets if ds.name not in catalog]
        needed = catalog.num_tasks + sum(len(ds.classes) for ds in new)
        if needed > self.usable_task_ids:
            raise ValueError(
                f"site {site!r}: new datasets {[d.name for d in new]} need task ids up to {needed - 1}, i.e. "
                f"task-slots >= {needed + 1}, but this run's prior bank has task_slots={self.task_slots} (task "
                f"ids 0..{self.usable_task_ids - 1}; its spare rows are used up); start a new run (the bank is "
                "sized from the sites present at its start, plus spare-task-slots)"
            )
        for ds in new:
            entry = catalog.register_dataset(ds.name, ds.modalities[0], ds.classes)
            logger.info(
                "site %r: new dataset %r registered with task ids %s", site, ds.name, list(entry.task_ids)
            )
        owned = self._ownership(datasets, catalog)
        self.release_site(site)
        for kind, ids in ((TASK, owned.task_ids), (MODALITY, owned.modality_rows)):
            for row in ids:
                self.rows[kind].setdefault(row, RowInfo()).owners.add(site)
        self.sites[site] = owned
        return owned

    def release_site(self, site: str) -> None:
        """Forget the ownership of ``site`` (its rows keep their history)."""
        for table in self.rows.values():
            for info in table.values():
                info.owners.discard(site)
        self.sites.pop(site, None)

    @property
    def usable_task_ids(self) -> int:
        """Task ids a model can take: ``0..task_slots-2``, the rule of the networks' input check and of
        ``Catalog.check_capacity`` (the published 72 slots hold 71 tasks; row ``task_slots - 1`` is spare)."""
        return self.task_slots - 1

    def ownership(self, site: str) -> SiteOwnership:
        if site not in self.sites:
            raise ValueError(f"unknown site {site!r}; registered: {sorted(self.sites)}")
        return self.sites[site]

    def owners(self, kind: str, row: int) -> set[str]:
        return set(self._table(kind).get(int(row), RowInfo()).owners)

    def info(self, kind: str, row: int) -> RowInfo | None:
        return self._table(kind).get(int(row))

    def record_update(self, kind: str, row: int, server_round: int, samples: float,
                      modalities: Sequence[str] = ()) -> None:
        """Row ``row`` was aggregated in ``server_round`` from ``samples`` samples of ``modalities``."""
        info = self._table(kind).setdefault(int(row), RowInfo())
        info.last_round, info.samples = int(server_round), float(samples)
        info.total_samples += float(samples)
        info.modalities |= set(modalities)

    def trained_tasks(self) -> dict[int, TrainedTask]:
        """The task rows some round updated, with their samples and modalities."""
        return {
            row: TrainedTask(row, info.total_samples, tuple(sorted(info.modalities)), info.last_round)
            for row, info in sorted(self.rows[TASK].items()) if info.last_round is not None
        }

    def _table(self, kind: str) -> dict[int, RowInfo]:
        if kind not in self.rows:
            raise ValueError(f"row kind must be one of {list(ROW_KINDS)}, got {kind!r}")
        return self.rows[kind]

    def _check_dataset(self, ds: SiteDataset, catalog: Catalog) -> None:
        if ds.name not in catalog:
            if len(ds.modalities) != 1:
                raise ValueError(
                    f"new dataset {ds.name!r} must report one modality, got {list(ds.modalities)}"
                )
            return
        entry = catalog.dataset(ds.name)
        wrong = {v: c for v, c in ds.classes.items() if entry.classes.get(v) != c}
        if wrong:
            raise ValueError(
                f"dataset {ds.name!r}: classes {wrong} disagree with the catalog's {dict(entry.classes)}"
            )

    def _ownership(self, datasets: Sequence[SiteDataset], catalog: Catalog) -> SiteOwnership:
        task_map: dict[str, int] = {}
        mod_rows: set[int] = set()
        task_modalities: dict[int, set[str]] = {}
        for ds in datasets:
            entry = catalog.dataset(ds.name)
            ids = {f"{ds.name}/{entry.classes[v]}": entry.task_id_for(v) for v in sorted(ds.classes)}
            task_map.update(ids)
            for task in ids.values():
                task_modalities.setdefault(task, set()).update(ds.modalities)
            mids = {modality_id(m) for m in ds.modalities} | set(entry.modality_ids.values())
            mod_rows |= {modality_row(m, self.modality_slots) for m in mids}
        bad = sorted(t for t in task_map.values() if not 0 <= t < self.usable_task_ids)
        if bad:
            raise ValueError(
                f"task ids {bad} do not fit task_slots={self.task_slots} (task ids 0..{self.usable_task_ids - 1})"
            )
        return SiteOwnership(
            tuple(sorted(set(task_map.values()))),
            tuple(sorted(mod_rows)),
            task_map,
            tuple(ds.name for ds in datasets),
            {t: tuple(sorted(m)) for t, m in sorted(task_modalities.items())},
        )

    # -- persistence -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (row ids become string keys)."""
        return {
            "task_slots": self.task_slots,
            "modality_slots": self.modality_slots,
            "rows": {k: {str(r): i.to_dict() for r, i in sorted(t.items())} for k, t in self.rows.items()},
            "sites": {
                s: {
                    "task_ids": list(o.task_ids),
                    "modality_rows": list(o.modality_rows),
                    "task_map": dict(o.task_map),
                    "datasets": list(o.datasets),
                    "task_modalities": {str(t): list(m) for t, m in o.task_modalities.items()},
                }
                for s, o in sorted(self.sites.items())
            },
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> PriorBank:
        bank = cls(raw["task_slots"], raw["modality_slots"])
        for kind in ROW_KINDS:
            bank.rows[kind] = {int(r): RowInfo.from_dict(i) for r, i in raw["rows"][kind].items()}
        for site, o in raw["sites"].items():
            modalities = {int(t): tuple(m) for t, m in o.get("task_modalities", {}).items()}
            bank.sites[site] = SiteOwnership(
                tuple(o["task_ids"]), tuple(o["modality_rows"]), dict(o["task_map"]), tuple(o["datasets"]),
                modalities,
            )
        return bank

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PriorBank) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]
