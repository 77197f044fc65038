"""The task catalog: the one place that maps ``"<dataset>/<class>"`` to a global task id (spec section 1).

A dataset's classes (label value -> class name) map to global task ids. Datasets that follow the same
annotation protocol may share ids (AMOS-CT and AMOS-MR share 4..16); every other dataset has its own
ids, even for the same organ. Modality names map to modality ids (CT 0, PET 1, MR-T1 2, MR-T2 3,
cine-MR 4, MR of unknown sequence -1); a model's modality prior row is the id, or its last row for -1.

The bundled ``data/hermes_catalog.yaml`` is loaded with :meth:`Catalog.load`. A checkpoint can embed
the catalog it was trained with through :meth:`Catalog.to_dict` / :meth:`Catalog.from_dict`.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import logging
import operator
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hermes_model.fileio import atomic_write_bytes

logger = logging.getLogger(__name__)

__all__ = [
    "MODALITY_ALIASES",
    "MODALITY_NAMES",
    "NULL_TASK_ID",
    "UNKNOWN_MR_MODALITY_ID",
    "Catalog",
    "DatasetEntry",
    "canonical_modality",
    "default_intensity_aug_prob",
    "modality_id",
    "modality_name",
    "modality_row",
]

NULL_TASK_ID = -1
UNKNOWN_MR_MODALITY_ID = -1

# Canonical modality names (what users type) -> modality id.
MODALITY_NAMES: dict[str, int] = {"CT": 0, "PET": 1, "MR-T1": 2, "MR-T2": 3, "cine-MR": 4, "MR": -1}
# Other accepted spellings -> canonical name.
MODALITY_ALIASES: dict[str, str] = {"MR (unknown sequence)": "MR"}
_MR_KINDS = frozenset({"MR-T1", "MR-T2", "cine-MR", "MR"})
_ENTRY_KEYS = frozenset(
    {
        "modality", "task_ids", "classes", "sample_weight", "intensity_aug_prob",
        "modality_id", "modality_ids", "split",
    }
)
_TOP_KEYS = frozenset({"modalities", "note", "datasets"})
_SPLIT_NAMES = ("train", "val", "test")
_BUNDLED = "data/hermes_catalog.yaml"
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_YAML_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def _as_index(value: Any) -> int | None:
    """``value`` as an int if it is an integer (Python, NumPy or 0-d tensor), not a bool; else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _close(word: str, choices: Iterable[str], n: int = 3) -> str:
    """`` (did you mean 'x'?)`` for the closest choices, or an empty string."""
    matches = difflib.get_close_matches(word, list(choices), n=n, cutoff=0.6)
    return f" (did you mean {', '.join(repr(m) for m in matches)}?)" if matches else ""


def canonical_modality(name: str) -> str:
    """Canonical spelling of a modality name; accepts aliases and any letter case.

    Raises:
        ValueError: ``name`` is not a known modality; the message lists the allowed names.
    """
    if not isinstance(name, str):
        raise ValueError(f"modality must be a string, got {name!r}; allowed: {list(MODALITY_NAMES)}")
    spellings = {**{n: n for n in MODALITY_NAMES}, **MODALITY_ALIASES}
    folded = {k.casefold(): v for k, v in spellings.items()}
    key = name.strip().casefold()
    if key in folded:
        return folded[key]
    raise ValueError(
        f"unknown modality {name!r}{_close(name.strip(), spellings)}; allowed: {list(MODALITY_NAMES)}"
        f" (alias: {list(MODALITY_ALIASES)})"
    )


def modality_id(name: str) -> int:
    """Modality id of a modality name, e.g. ``"CT" -> 0``, ``"MR" -> -1`` (MR of unknown sequence)."""
    return MODALITY_NAMES[canonical_modality(name)]


def modality_name(modality_id: int) -> str:
    """Canonical modality name of a modality id, e.g. ``-1 -> "MR"``."""
    if not isinstance(modality_id, bool):
        for name, mid in MODALITY_NAMES.items():
            if mid == modality_id:
                return name
    raise ValueError(f"unknown modality id {modality_id!r}; allowed: {sorted(MODALITY_NAMES.values())}")


def modality_row(modality_id: int, modality_slots: int = 6) -> int:
    """Row of the modality prior bank used for ``modality_id``: the id itself, or the last row for -1.

    Args:
        modality_id: a modality id (``-1`` = MR of unknown sequence).
        modality_slots: rows in the model's modality prior bank (6 for Hermes).
    """
    if _as_index(modality_slots) is None or modality_slots < 2:
        raise ValueError(f"modality_slots must be an int >= 2, got {modality_slots!r}")
    if _as_index(modality_id) is None:
        raise ValueError(f"modality_id must be an int, got {modality_id!r}")
    modality_id, modality_slots = int(modality_id), int(modality_slots)
    if modality_id == UNKNOWN_MR_MODALITY_ID:
        return modality_slots - 1
    if 0 <= modality_id < modality_slots - 1:
        return modality_id
    raise ValueError(
        f"modality_id {modality_id} does not fit modality_slots={modality_slots}: "
        f"allowed -1 or 0..{modality_slots - 2}"
    )


def default_intensity_aug_prob(modality: str) -> float:
    """Default intensity-augmentation probability of a modality: 0.1 for CT/PET, 0.2 for MR kinds."""
    return 0.2 if canonical_modality(modality) in _MR_KINDS else 0.1


def _default_aug_for(modality: str | None, modality_ids: Mapping[str, int]) -> float:
    """Default for a dataset: that of its modality, or 0.2 if any of its sequences is an MR kind."""
    if modality is not None:
        return default_intensity_aug_prob(modality)
    mr_ids = {MODALITY_NAMES[m] for m in _MR_KINDS}
    return 0.2 if any(m in mr_ids for m in modality_ids.values()) else 0.1


@dataclass(frozen=True)
class DatasetEntry:
    """One dataset of the catalog.

    Attributes:
        name: dataset name (no ``/``).
        modality: canonical modality name, or ``None`` when the dataset mixes sequences (see
            ``modality_ids``).
        classes: label value (>= 1) -> class name.
        task_ids: global task id of each class, in the order of ``sorted(classes)``.
        sample_weight: relative sampling weight of the dataset (> 0).
        intensity_aug_prob: probability of the intensity augmentations, in [0, 1].
        modality_ids: sequence name -> modality id, for multi-sequence datasets (empty otherwise).
        split: ``train`` / ``val`` / ``test`` -> case ids, verbatim from the catalog file.
        modality_note: free-text description of a multi-sequence modality (kept for round trips).
    """

    name: str
    modality: str | None
    classes: dict[int, str]
    task_ids: tuple[int, ...]
    sample_weight: float = 1.0
    intensity_aug_prob: float = 0.1
    modality_ids: dict[str, int] = field(default_factory=dict)
    split: dict[str, tuple[str, ...]] = field(default_factory=dict)
    modality_note: str | None = None

    @property
    def modality_id(self) -> int | None:
        """Modality id of a single-modality dataset; ``None`` for a multi-sequence one."""
        return None if self.modality is None else MODALITY_NAMES[self.modality]

    def modality_id_for(self, sequence: str | None = None) -> int:
        """Modality id of the dataset, or of ``sequence`` for a multi-sequence dataset."""
        if self.modality is not None:
            return MODALITY_NAMES[self.modality]
        if sequence not in self.modality_ids:
            raise ValueError(
                f"dataset {self.name!r} mixes sequences: sequence must be one of {list(self.modality_ids)}, "
                f"got {sequence!r}"
            )
        return self.modality_ids[sequence]

    def task_key(self, label_value: int) -> str:
        """``"<dataset>/<class>"`` key of a label value."""
        return f"{self.name}/{self.classes[self._check_label(label_value)]}"

    def task_id_for(self, label_value: int) -> int:
        """Global task id of a label value."""
        label_value = self._check_label(label_value)
        return self.task_ids[sorted(self.classes).index(label_value)]

    def label_to_task(self) -> dict[int, int]:
        """Label value -> global task id, for every class."""
        return dict(zip(sorted(self.classes), self.task_ids, strict=True))

    def task_keys(self) -> dict[str, int]:
        """``"<dataset>/<class>"`` -> global task id, for every class."""
        return {f"{self.name}/{self.classes[v]}": t for v, t in self.label_to_task().items()}

    def cases(self, split: str) -> tuple[str, ...]:
        """Case ids of ``split`` (``train``, ``val`` or ``test``), duplicates removed, order kept.

        Problems of the published lists (a case id listed twice, or in two splits) are logged once per
        process, when a split of this dataset is used, not whenever the catalog is loaded.
        """
        if split not in _SPLIT_NAMES:
            raise ValueError(f"split must be one of {list(_SPLIT_NAMES)}, got {split!r}")
        _warn_split_problems(f"datasets.{self.name}", self.split)
        return tuple(dict.fromkeys(self.split.get(split, ())))

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable form in the layout of the catalog yaml."""
        out: dict[str, Any] = {}
        modality = self.modality if self.modality is not None else self.modality_note
        if modality is not None:
            out["modality"] = modality
        out["task_ids"] = list(self.task_ids)
        out["classes"] = {v: self.classes[v] for v in sorted(self.classes)}
        out["sample_weight"] = self.sample_weight
        out["intensity_aug_prob"] = self.intensity_aug_prob
        if self.modality is None:
            out["modality_ids"] = dict(self.modality_ids)
        elif self.modality in MODALITY_NAMES:  # else left out: parsing reports the unknown modality
            out["modality_id"] = MODALITY_NAMES[self.modality]
        out["split"] = {k: list(v) for k, v in self.split.items()}
        return out

    @classmethod
    def from_dict(cls, name: str, raw: Mapping[str, Any]) -> DatasetEntry:
        """Parse and check one dataset; every problem is reported in one ValueError."""
        errors: list[str] = []
        entry = _parse_entry(name, raw, errors)
        if errors or entry is None:
            raise ValueError(f"invalid catalog entry {name!r}:\n  - " + "\n  - ".join(errors))
        return entry

    def _check_label(self, label_value: int) -> int:
        if label_value not in self.classes:
            raise ValueError(
                f"dataset {self.name!r} has no label value {label_value!r}; "
                f"known: {dict(sorted(self.classes.items()))}"
            )
        return int(label_value)


# ----------------------------------------------------------------------------------------------- parsing
def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _parse_classes(where: str, raw: Any, errors: list[str]) -> dict[int, str]:
    if not isinstance(raw, Mapping) or not raw:
        errors.append(f"{where}.classes: must be a non-empty mapping label value -> class name, got {raw!r}")
        return {}
    classes: dict[int, str] = {}
    seen: dict[str, int] = {}
    for key, cname in raw.items():
        value = _as_int(key)
        if value is None or value < 0:
            errors.append(f"{where}.classes: label value {key!r} must be a positive int")
            continue
        if value == 0:
            errors.append(f"{where}.classes: label value 0 is background and cannot be a class ({cname!r})")
            continue
        if not isinstance(cname, str) or not cname.strip():
            errors.append(f"{where}.classes[{value}]: class name must be a non-empty string, got {cname!r}")
            continue
        cname = cname.strip()
        if value in classes:
            errors.append(f"{where}.classes: label value {value} given twice")
        elif cname in seen:
            errors.append(
                f"{where}.classes: duplicate class name {cname!r} (label values {seen[cname]}, {value})"
            )
        seen.setdefault(cname, value)
        classes.setdefault(value, cname)
    return classes


def _parse_task_ids(where: str, raw: Any, n_classes: int, errors: list[str]) -> tuple[int, ...]:
    ids = [_as_int(t) for t in raw] if isinstance(raw, Sequence) and not isinstance(raw, str) else None
    if ids is None or any(t is None or t < 0 for t in ids):
        errors.append(f"{where}.task_ids: must be a list of non-negative ints, got {raw!r}")
        return ()
    dupes = sorted({t for t in ids if ids.count(t) > 1})
    if dupes:
        errors.append(f"{where}.task_ids: duplicate task ids {dupes} within the dataset")
    if n_classes and len(ids) != n_classes:
        errors.append(f"{where}.task_ids: {len(ids)} ids for {n_classes} classes (one id per class needed)")
    return tuple(ids)  # type: ignore[arg-type]


def _parse_modality(
    where: str, raw: Mapping[str, Any], errors: list[str]
) -> tuple[str | None, dict[str, int], str | None]:
    """(canonical modality or None, modality_ids, free-text note)."""
    if raw.get("modality_ids") is not None:
        mapping = raw["modality_ids"]
        if not isinstance(mapping, Mapping) or not mapping:
            errors.append(
                f"{where}.modality_ids: must be a non-empty mapping sequence -> modality, got {mapping!r}"
            )
            return None, {}, None
        ids: dict[str, int] = {}
        for seq, value in mapping.items():
            try:
                ids[str(seq)] = modality_id(value) if isinstance(value, str) else _known_modality_id(value)
            except ValueError as exc:
                errors.append(f"{where}.modality_ids[{seq!r}]: {exc}")
        note = raw.get("modality")
        return None, ids, note if isinstance(note, str) else None
    if "modality" not in raw:
        errors.append(f"{where}.modality: missing; allowed: {list(MODALITY_NAMES)} (or give modality_ids)")
        return None, {}, None
    try:
        name = canonical_modality(raw["modality"])
    except ValueError as exc:
        errors.append(f"{where}.modality: {exc}")
        return None, {}, None
    given = raw.get("modality_id")
    if given is not None and (_as_int(given) != MODALITY_NAMES[name]):
        errors.append(
            f"{where}.modality_id: {given!r} disagrees with modality {name!r} (id {MODALITY_NAMES[name]})"
        )
    return name, {}, None


def _known_modality_id(value: Any) -> int:
    mid = _as_int(value)
    if mid is None or mid not in MODALITY_NAMES.values():
        raise ValueError(f"unknown modality id {value!r}; allowed: {sorted(MODALITY_NAMES.values())}")
    return mid


def _parse_split(where: str, raw: Any, errors: list[str]) -> dict[str, tuple[str, ...]]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        errors.append(f"{where}.split: must be a mapping {list(_SPLIT_NAMES)} -> case ids, got {raw!r}")
        return {}
    split: dict[str, tuple[str, ...]] = {}
    for key, cases in raw.items():
        if key not in _SPLIT_NAMES:
            errors.append(f"{where}.split: unknown split {key!r}{_close(str(key), _SPLIT_NAMES)}; allowed: "
                          f"{list(_SPLIT_NAMES)}")
        elif not isinstance(cases, Sequence) or isinstance(cases, str):
            errors.append(f"{where}.split.{key}: must be a list of case ids, got {cases!r}")
        else:
            split[key] = tuple(str(c) for c in cases)
    return split


_WARNED: set[str] = set()  # split warnings already logged by this process


def _warn_once(message: str) -> None:
    """Log ``message`` the first time only: every process that loads the catalog (each site, each Ray actor,
    each round) would otherwise repeat the same warning about the same file."""
    if message not in _WARNED:
        _WARNED.add(message)
        logger.warning("%s", message)


def _warn_split_problems(where: str, split: Mapping[str, Sequence[str]]) -> None:
    for key, cases in split.items():
        dupes = sorted(c for c, n in Counter(cases).items() if n > 1)
        if dupes:
            _warn_once(f"{where}.split.{key} lists case ids more than once: {dupes}")
    names = list(split)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            both = sorted(set(split[a]) & set(split[b]))
            if both:
                _warn_once(f"{where}.split: case ids in both {a} and {b}: {both}")


def _parse_sample_weight(where: str, value: Any, errors: list[str]) -> float:
    number = _as_float(value)
    if number is None or number <= 0:
        errors.append(f"{where}.sample_weight: must be a number > 0, got {value!r}")
        return 1.0
    return number


def _parse_aug_prob(where: str, value: Any, errors: list[str]) -> float:
    number = _as_float(value)
    if number is None or not 0.0 <= number <= 1.0:
        errors.append(f"{where}.intensity_aug_prob: must be a number in [0, 1], got {value!r}")
        return 0.0
    return number


def _check_name(name: Any, errors: list[str]) -> bool:
    if not isinstance(name, str) or not name.strip() or "/" in name or name != name.strip():
        errors.append(f"dataset name {name!r}: must be a non-empty string without '/' or surrounding spaces")
        return False
    return True


def _parse_entry(name: str, raw: Any, errors: list[str]) -> DatasetEntry | None:
    n_before = len(errors)
    where = f"datasets.{name}"
    if not _check_name(name, errors):
        return None
    if not isinstance(raw, Mapping):
        errors.append(f"{where}: must be a mapping, got {raw!r}")
        return None
    for key in raw:
        if key not in _ENTRY_KEYS:
            errors.append(
                f"{where}: unknown key {key!r}{_close(str(key), _ENTRY_KEYS)}; allowed: {sorted(_ENTRY_KEYS)}"
            )
    classes = _parse_classes(where, raw.get("classes"), errors)
    task_ids = _parse_task_ids(where, raw.get("task_ids"), len(classes), errors)
    modality, modality_ids, note = _parse_modality(where, raw, errors)
    sample_weight = _parse_sample_weight(where, raw.get("sample_weight", 1.0), errors)
    default_aug = _default_aug_for(modality, modality_ids)
    aug = _parse_aug_prob(where, raw.get("intensity_aug_prob", default_aug), errors)
    split = _parse_split(where, raw.get("split"), errors)
    if len(errors) > n_before:
        return None
    return DatasetEntry(name, modality, classes, task_ids, sample_weight, aug, modality_ids, split, note)


def _cross_check(entries: Iterable[DatasetEntry], errors: list[str]) -> None:
    """Datasets may share a task id only when they name the same class for it (same protocol)."""
    owner: dict[int, tuple[str, str]] = {}
    for entry in entries:
        for label, tid in entry.label_to_task().items():
            cname = entry.classes[label]
            if tid not in owner:
                owner[tid] = (entry.name, cname)
                continue
            first, first_class = owner[tid]
            if first_class != cname:
                errors.append(
                    f"task id {tid} is used by datasets {first!r} (class {first_class!r}) and {entry.name!r} "
                    f"(class {cname!r}): datasets may share a task id only for the same class (same protocol)"
                )


def _check_modalities_block(raw: Any, errors: list[str]) -> None:
    if raw is None:
        return
    if not isinstance(raw, Mapping):
        errors.append(f"modalities: must be a mapping name -> id, got {raw!r}")
        return
    for name, mid in raw.items():
        try:
            canonical = canonical_modality(name)
        except ValueError as exc:
            errors.append(f"modalities: {exc}")
            continue
        if _as_int(mid) != MODALITY_NAMES[canonical]:
            errors.append(
                f"modalities[{name!r}]: id {mid!r} disagrees with the built-in id {MODALITY_NAMES[canonical]}"
            )


# ----------------------------------------------------------------------------------------------- catalog
class Catalog:
    """Datasets, their classes and the global task ids they map to.

    Args:
        datasets: dataset name -> entry (order is kept: for shared ids the first dataset names the task).
        note: free-text note carried along with the catalog.

    Raises:
        ValueError: the datasets are inconsistent (every problem listed in one message).
    """

    def __init__(self, datasets: Mapping[str, DatasetEntry], note: str | None = None) -> None:
        errors: list[str] = []
        for key, entry in datasets.items():
            if not isinstance(entry, DatasetEntry) or key != entry.name:
                errors.append(f"datasets[{key!r}]: must be a DatasetEntry named {key!r}, got {entry!r}")
                continue
            try:  # entries built directly get the same checks as parsed ones
                _parse_entry(key, entry.to_dict(), errors)
            except (TypeError, KeyError, AttributeError) as exc:
                errors.append(f"datasets[{key!r}]: malformed DatasetEntry ({exc!r})")
        _cross_check([e for e in datasets.values() if isinstance(e, DatasetEntry)], errors)
        _raise_all("invalid catalog", errors)
        self._datasets: dict[str, DatasetEntry] = dict(datasets)
        self.note = note

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> Catalog:
        """Load a catalog yaml; ``None`` loads the catalog bundled with the package."""
        if path is None:
            text = importlib.resources.files("hermes_model").joinpath(_BUNDLED).read_text(encoding="utf-8")
            source = f"hermes_model/{_BUNDLED}"
        else:
            path = Path(path)
            if not path.is_file():
                raise ValueError(f"catalog file {str(path)!r} does not exist")
            text, source = path.read_text(encoding="utf-8"), str(path)
        try:
            raw = yaml.load(text, Loader=_YAML_LOADER)  # a safe loader (C one when available)
        except yaml.YAMLError as exc:
            raise ValueError(f"catalog file {source!r} is not valid yaml: {exc}") from exc
        try:
            return cls.from_dict(raw)
        except ValueError as exc:
            raise ValueError(f"catalog file {source!r}: {exc}") from exc

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Catalog:
        """Build from the layout of the catalog yaml (or :meth:`to_dict`); all problems in one ValueError."""
        if not isinstance(raw, Mapping):
            raise ValueError(
                f"catalog must be a mapping with keys {sorted(_TOP_KEYS)}, got {type(raw).__name__}"
            )
        errors: list[str] = []
        for key in raw:
            if key not in _TOP_KEYS:
                errors.append(
                    f"unknown top-level key {key!r}{_close(str(key), _TOP_KEYS)}; "
                    f"allowed: {sorted(_TOP_KEYS)}"
                )
        _check_modalities_block(raw.get("modalities"), errors)
        datasets_raw = raw.get("datasets")
        if not isinstance(datasets_raw, Mapping):
            errors.append(f"datasets: must be a mapping name -> dataset, got {datasets_raw!r}")
            datasets_raw = {}
        entries = {}
        for name, entry_raw in datasets_raw.items():
            entry = _parse_entry(name, entry_raw, errors)
            if entry is not None:
                entries[name] = entry
        _cross_check(entries.values(), errors)
        _raise_all("invalid catalog", errors)
        note = raw.get("note")
        return cls(entries, note=note if isinstance(note, str) else None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (the yaml layout) that :meth:`from_dict` reads back."""
        out: dict[str, Any] = {"modalities": dict(MODALITY_NAMES)}
        if self.note is not None:
            out["note"] = self.note
        out["datasets"] = {name: entry.to_dict() for name, entry in self._datasets.items()}
        return out

    def save(self, path: str | os.PathLike) -> Path:
        """Write the catalog as yaml, atomically."""
        text = yaml.dump(self.to_dict(), Dumper=_YAML_DUMPER, sort_keys=False, allow_unicode=True, width=120)
        return atomic_write_bytes(path, text.encode("utf-8"))

    # -- look-ups ----------------------------------------------------------------------------------
    @property
    def datasets(self) -> dict[str, DatasetEntry]:
        """Dataset name -> entry (a copy: register new datasets with :meth:`register_dataset`)."""
        return dict(self._datasets)

    @property
    def num_tasks(self) -> int:
        """Largest task id + 1 (0 for an empty catalog)."""
        return max((t for e in self._datasets.values() for t in e.task_ids), default=-1) + 1

    def dataset(self, name: str) -> DatasetEntry:
        """The entry of dataset ``name``."""
        if name not in self._datasets:
            raise ValueError(
                f"unknown dataset {name!r}{_close(str(name), self._datasets)}; known: {list(self._datasets)}"
            )
        return self._datasets[name]

    def task_map(self) -> dict[str, int]:
        """Every ``"<dataset>/<class>"`` key -> global task id."""
        return {k: t for e in self._datasets.values() for k, t in e.task_keys().items()}

    def task_id(self, key: str) -> int:
        """Global task id of ``"<dataset>/<class>"`` (class names may contain ``/``)."""
        table = self.task_map()
        if key in table:
            return table[key]
        dataset = key.split("/", 1)[0] if isinstance(key, str) else ""
        hint = _close(str(key), table, n=5)
        if dataset in self._datasets:
            hint += f"; classes of {dataset!r}: {list(self._datasets[dataset].task_keys())}"
        raise ValueError(f"unknown task key {key!r}{hint} (keys are '<dataset>/<class>')")

    def task_keys(self, task_id: int) -> list[str]:
        """Every ``"<dataset>/<class>"`` key that maps to ``task_id`` (several when datasets share it)."""
        keys = [k for k, t in self.task_map().items() if t == task_id and not isinstance(task_id, bool)]
        if not keys:
            null = " (-1 is the null/padding task)" if task_id == NULL_TASK_ID else ""
            raise ValueError(f"unknown task id {task_id!r}{null}; known ids: {self._id_ranges()}")
        return keys

    def task_key(self, task_id: int) -> str:
        """The key of ``task_id``; for a shared id, that of the first dataset in catalog order."""
        return self.task_keys(task_id)[0]

    def check_capacity(self, task_slots: int) -> None:
        """Raise unless a model with ``task_slots`` task rows (ids 0..task_slots-2 plus the null) fits."""
        if isinstance(task_slots, bool) or not isinstance(task_slots, int) or task_slots < 1:
            raise ValueError(f"task_slots must be a positive int, got {task_slots!r}")
        if self.num_tasks > task_slots - 1:
            raise ValueError(
                f"catalog has {self.num_tasks} tasks (ids 0..{self.num_tasks - 1}) but "
                f"task_slots={task_slots} holds only {task_slots - 1} plus the null token: "
                f"use task_slots >= {self.num_tasks + 1}"
            )

    # -- registration ------------------------------------------------------------------------------
    def register_dataset(
        self,
        name: str,
        modality: str | Mapping[str, str | int],
        classes: Mapping[int, str],
        sample_weight: float = 1.0,
        intensity_aug_prob: float | None = None,
        share_tasks_with: str | None = None,
        split: Mapping[str, Sequence[str]] | None = None,
    ) -> DatasetEntry:
        """Add a dataset; its classes get new task ids after the current largest (existing ids never move).

        Args:
            name: dataset name.
            modality: a modality name, or sequence name -> modality for a multi-sequence dataset.
            classes: label value (>= 1) -> class name.
            sample_weight: relative sampling weight (> 0).
            intensity_aug_prob: defaults to 0.1 for CT/PET and 0.2 for MR kinds.
            share_tasks_with: an existing dataset with the same annotation protocol whose ids are reused
                for the class names both have; the other classes get new ids.
            split: optional ``train``/``val``/``test`` -> case ids.

        Returns:
            The new entry, or the existing one when ``name`` is registered with identical content.
        """
        raw = self._raw_entry(name, modality, classes, sample_weight, intensity_aug_prob, split)
        n_classes = len(classes) if isinstance(classes, Mapping) else 0
        probe = DatasetEntry.from_dict(name, {**raw, "task_ids": list(range(n_classes))})
        shared = self._shared_ids(name, probe, share_tasks_with)
        if name in self._datasets:
            return self._same_or_raise(probe, shared, intensity_aug_prob is None, split is None)
        next_id = self.num_tasks
        ids = []
        for value in sorted(probe.classes):
            if probe.classes[value] in shared:
                ids.append(shared[probe.classes[value]])
            else:
                ids.append(next_id)
                next_id += 1
        candidate = dataclasses.replace(probe, task_ids=tuple(ids))
        errors: list[str] = []
        _cross_check([*self._datasets.values(), candidate], errors)
        _raise_all(f"cannot register dataset {name!r}", errors)
        self._datasets[name] = candidate
        logger.info("registered dataset %r with task ids %s", name, list(candidate.task_ids))
        return candidate

    @staticmethod
    def _raw_entry(
        name: str,
        modality: str | Mapping[str, str | int],
        classes: Mapping[int, str],
        sample_weight: float,
        intensity_aug_prob: float | None,
        split: Mapping[str, Sequence[str]] | None,
    ) -> dict[str, Any]:
        raw: dict[str, Any] = {"classes": classes, "sample_weight": sample_weight}
        raw["modality_ids" if isinstance(modality, Mapping) else "modality"] = modality
        if intensity_aug_prob is not None:
            raw["intensity_aug_prob"] = intensity_aug_prob
        if split is not None:
            raw["split"] = split
        return raw

    def _shared_ids(self, name: str, probe: DatasetEntry, share_tasks_with: str | None) -> dict[str, int]:
        """Class name -> task id of ``share_tasks_with`` for the class names ``probe`` also has."""
        if share_tasks_with is None:
            return {}
        if share_tasks_with == name:
            raise ValueError(f"dataset {name!r}: share_tasks_with must name another dataset, got itself")
        other = self.dataset(share_tasks_with)
        theirs = {other.classes[v]: t for v, t in other.label_to_task().items()}
        shared = {c: theirs[c] for c in probe.classes.values() if c in theirs}
        if not shared:
            raise ValueError(
                f"dataset {name!r}: share_tasks_with={share_tasks_with!r} but no class name in common "
                f"(theirs: {sorted(theirs)}, given: {sorted(probe.classes.values())})"
            )
        return shared

    def _same_or_raise(
        self, probe: DatasetEntry, shared: Mapping[str, int], any_aug: bool, any_split: bool
    ) -> DatasetEntry:
        """The registered entry if ``probe`` has the same content; else a ValueError listing the diffs."""
        existing = self._datasets[probe.name]
        names = ["modality", "modality_ids", "classes", "sample_weight"]
        names += [] if any_aug else ["intensity_aug_prob"]
        names += [] if any_split else ["split"]
        diffs = [
            f"{f}: registered {getattr(existing, f)!r}, given {getattr(probe, f)!r}"
            for f in names
            if getattr(existing, f) != getattr(probe, f)
        ]
        own = {existing.classes[v]: t for v, t in existing.label_to_task().items()}
        diffs += [
            f"task id of {c!r}: registered {own.get(c)}, shared dataset has {t}"
            for c, t in shared.items()
            if own.get(c) != t
        ]
        if diffs:
            raise ValueError(
                f"dataset {probe.name!r} is already registered with different content:\n  - "
                + "\n  - ".join(diffs)
            )
        return existing

    # -- misc --------------------------------------------------------------------------------------
    def _id_ranges(self) -> str:
        ids = sorted({t for e in self._datasets.values() for t in e.task_ids})
        if not ids:
            return "none"
        ranges, start, prev = [], ids[0], ids[0]
        for t in [*ids[1:], None]:
            if t is not None and t == prev + 1:
                prev = t
                continue
            ranges.append(f"{start}..{prev}" if prev != start else str(start))
            if t is not None:
                start = prev = t
        return ", ".join(ranges)

    def __contains__(self, name: object) -> bool:
        return name in self._datasets

    def __len__(self) -> int:
        return len(self._datasets)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Catalog):
            return NotImplemented
        return list(self._datasets.items()) == list(other._datasets.items()) and self.note == other.note

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Catalog({len(self._datasets)} datasets, {self.num_tasks} tasks)"


def _raise_all(what: str, errors: list[str]) -> None:
    if errors:
        raise ValueError(f"{what}: {len(errors)} problem(s):\n  - " + "\n  - ".join(errors))
