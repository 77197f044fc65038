"""Site configuration: one YAML file per site, validated with pydantic before any work starts.

Example (see ``site_configs/templates/site.yaml`` for every key)::

    site: sarcoma-ct
    work_dir: ../runs/sarcoma-ct          # relative paths are relative to this file
    datasets:
      - name: ibsi_sts
        modality: CT                      # CT | PET | MR-T1 | MR-T2 | cine-MR | MR
        format: csv                       # a key of client.formats.FORMATS
        source: cases.csv
        classes: {1: tumour}              # required for datasets new to the catalog
        split: {val: 0.2, test: 0.2, seed: 0}
    training: {batch_size: 2}

:func:`load_site_config` reports every problem (unreadable yaml, wrong types, missing files, unknown
modality or format, bad classes, a clash with the task catalog, bad splits, duplicate dataset names,
unusable case ids) in one :class:`SiteConfigError`, each with the file and the key.

How the scans are preprocessed (spacing, patch size, crop margin, intensity) is not a site setting: the
federation's plan decides it (:mod:`hermes_model.plans`), and a site config that still sets one of
:data:`PLAN_KEYS` is refused with a message saying where the setting now lives.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from client.formats import FORMATS, CaseSpec, FormatError, list_cases
from hermes_model.catalog import Catalog, canonical_modality, default_intensity_aug_prob, modality_id

__all__ = [
    "DatasetConfig",
    "SiteConfig",
    "SiteConfigError",
    "SplitSpec",
    "TrainingSettings",
    "load_site_config",
]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")
MAX_LABEL_VALUE = 127  # labels are stored as int8
REFUSAL_FILE = "server_refusal.json"  # in work_dir: the ClientApp records a refusal, hermes-client start reads it
# site-config keys of earlier versions that the federation's plan now decides -> the server setting
PLAN_KEYS = {"target_spacing": "target-spacing", "min_size": "patch-size", "margin": "train-margin",
             "interpolation": "interpolation"}
PLAN_TRAINING_KEYS = {"patch_size": "patch-size"}


class SiteConfigError(ValueError):
    """A site config is invalid; ``errors`` holds one ``"<file>: <key>: <problem>"`` line per problem."""

    def __init__(self, path: str | Path, errors: list[str]) -> None:
        self.path = Path(path)
        self.errors = list(errors)
        lines = "\n".join(f"  - {e}" for e in self.errors)
        super().__init__(f"invalid site config {str(self.path)!r}: {len(self.errors)} problem(s):\n{lines}")


def _xyz(value: Any, name: str, kind: type) -> tuple:
    """A number or a list of 3 numbers -> a 3-tuple (x, y, z)."""
    items = [value] * 3 if isinstance(value, int | float) and not isinstance(value, bool) else value
    if not isinstance(items, list | tuple) or len(items) != 3:
        raise ValueError(f"{name} must be a number or a list of 3 numbers [x, y, z], got {value!r}")
    if any(isinstance(v, bool) or not isinstance(v, int | float) or v <= 0 for v in items):
        raise ValueError(f"{name} values must be positive numbers, got {value!r}")
    if kind is int and any(float(v) != int(v) for v in items):
        raise ValueError(f"{name} values must be whole numbers, got {value!r}")
    return tuple(kind(v) for v in items)


def _catalog(info: ValidationInfo) -> Catalog | None:
    return (info.context or {}).get("catalog")


class SplitSpec(BaseModel):
    """Validation/test split of a dataset: fractions of the labelled cases, or explicit lists of case ids.

    ``val`` and ``test`` are both fractions in [0, 1) with a sum below 1 (drawn with ``seed``), or both
    lists of case ids (the remaining cases train). ``catalog: true`` (or ``split: catalog`` in the yaml)
    takes the catalog's published lists instead (cases in none of them train). Unlabelled cases always
    go to ``train``.
    """

    model_config = ConfigDict(extra="forbid")

    val: float | list[str] = 0.2
    test: float | list[str] = 0.2
    seed: int = 0
    catalog: bool = False

    @field_validator("val", "test", mode="before")
    @classmethod
    def _ids_as_text(cls, v: Any) -> Any:
        if isinstance(v, list):  # yaml reads unquoted case ids such as 12 as numbers
            return [str(i) if isinstance(i, int) and not isinstance(i, bool) else i for i in v]
        return v

    @model_validator(mode="after")
    def _check(self) -> SplitSpec:
        if self.catalog:
            return self
        fractions = [isinstance(v, float) for v in (self.val, self.test)]
        if fractions[0] != fractions[1]:
            raise ValueError("split.val and split.test must both be fractions or both be lists of case ids")
        if all(fractions):
            for key, v in (("val", self.val), ("test", self.test)):
                if not 0.0 <= v < 1.0:
                    raise ValueError(f"split.{key} must be a fraction in [0, 1), got {v}")
            if self.val + self.test >= 1.0:
                raise ValueError(f"split.val + split.test must be below 1, got {self.val} + {self.test}")
        else:
            both = sorted(set(self.val) & set(self.test))
            if both:
                raise ValueError(f"case ids in both split.val and split.test: {both}")
        return self


class DatasetConfig(BaseModel):
    """One dataset of a site.

    Attributes:
        name: dataset name (a catalog dataset, or a new one that then needs ``classes``).
        modality: one of CT, PET, MR-T1, MR-T2, cine-MR, MR (MR of unknown sequence).
        format: raw layout, a key of :data:`client.formats.FORMATS`.
        source: where the raw data is (file or folder, relative to the yaml file).
        classes: label value (1..127) -> class name; optional for catalog datasets (must then agree).
        split: a :class:`SplitSpec` (the string ``"catalog"`` is short for ``{catalog: true}``).
        ignore_values: label values mapped to background instead of being an error.
        resample_label: resample a label whose grid (size, spacing, origin, direction) differs from its
            image's onto the image grid; False (default) fails such a case, which is usually a mix-up.
        sample_weight / intensity_aug_prob: override the catalog's (or the modality's) defaults.
        options: extra options passed to the format's lister.
    """

    model_config = ConfigDict(extra="forbid")

    name: str
    modality: str
    format: str
    source: Path
    classes: dict[int, str] | None = None
    split: SplitSpec = Field(default_factory=SplitSpec)
    ignore_values: list[int] = Field(default_factory=list)
    resample_label: bool = False
    sample_weight: float | None = Field(default=None, gt=0)
    intensity_aug_prob: float | None = Field(default=None, ge=0, le=1)
    options: dict[str, Any] = Field(default_factory=dict)

    _cases: list[CaseSpec] | None = PrivateAttr(default=None)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"dataset name {v!r} must consist of letters, digits, '_' and '-'")
        return v

    @field_validator("modality")
    @classmethod
    def _modality(cls, v: str) -> str:
        return canonical_modality(v)

    @field_validator("format")
    @classmethod
    def _format(cls, v: str) -> str:
        if v not in FORMATS:
            raise ValueError(f"unknown format {v!r}; allowed: {sorted(FORMATS)}")
        return v

    @field_validator("source")
    @classmethod
    def _source(cls, v: Path, info: ValidationInfo) -> Path:
        base = (info.context or {}).get("base_dir")
        path = (Path(base) / v if base is not None else v).resolve()
        if not path.exists():
            raise ValueError(f"source {str(path)!r} does not exist")
        return path

    @field_validator("split", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        if isinstance(v, str):
            if v != "catalog":
                raise ValueError(f"split must be a mapping {{val, test, seed}} or 'catalog', got {v!r}")
            return {"catalog": True}
        return v

    @field_validator("classes")
    @classmethod
    def _classes(cls, v: dict[int, str] | None) -> dict[int, str] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("classes must not be empty")
        problems = []
        bad = sorted(k for k in v if not 1 <= k <= MAX_LABEL_VALUE)
        if bad:
            problems.append(
                f"class values {bad} out of range; allowed: 1..{MAX_LABEL_VALUE} (0 is background)"
            )
        names = [n.strip() for n in v.values()]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes or any(not n for n in names):
            problems.append(
                f"overlapping classes: class names must be unique and non-empty, repeated: {dupes}"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return {k: n.strip() for k, n in sorted(v.items())}

    @model_validator(mode="after")
    def _against_catalog(self, info: ValidationInfo) -> DatasetConfig:
        catalog = _catalog(info)
        if self.classes is not None:
            clash = sorted(set(self.ignore_values) & set(self.classes))
            if clash:
                raise ValueError(f"overlapping classes: values {clash} are both in classes and ignore_values")
        if catalog is None:
            return self
        if self.name not in catalog:
            if self.classes is None:
                raise ValueError(f"dataset {self.name!r} is not in the catalog: 'classes' is required")
            if self.split.catalog:
                raise ValueError(f"split: 'catalog' needs a catalog dataset, {self.name!r} is not one")
            return self
        entry = catalog.dataset(self.name)
        if self.classes is not None and self.classes != entry.classes:
            raise ValueError(
                f"catalog clash: classes {self.classes} of dataset {self.name!r} differ from the catalog's "
                f"{entry.classes} (leave 'classes' out to use the catalog's)"
            )
        allowed = [entry.modality_id] if entry.modality is not None else list(entry.modality_ids.values())
        if modality_id(self.modality) not in allowed:
            want = entry.modality if entry.modality is not None else entry.modality_ids
            raise ValueError(f"catalog clash: modality {self.modality!r} but the catalog has {want!r}")
        return self

    def resolved_classes(self, catalog: Catalog) -> dict[int, str]:
        """The classes of this dataset: the config's, else the catalog's."""
        return dict(self.classes) if self.classes is not None else dict(catalog.dataset(self.name).classes)

    def resolved_weights(self, catalog: Catalog) -> tuple[float, float]:
        """``(sample_weight, intensity_aug_prob)``: the config's, else the catalog's, else the defaults."""
        entry = catalog.dataset(self.name) if self.name in catalog else None
        weight = entry.sample_weight if entry else 1.0
        if self.sample_weight is not None:
            weight = self.sample_weight
        if self.intensity_aug_prob is not None:
            aug = self.intensity_aug_prob
        else:
            aug = entry.intensity_aug_prob if entry else default_intensity_aug_prob(self.modality)
        return float(weight), float(aug)

    def cases(self) -> list[CaseSpec]:
        """The dataset's cases, listed from ``source`` by its format (once, then cached)."""
        if self._cases is None:
            self._cases = list_cases(self.format, self.source, self.options)
        return list(self._cases)


class TrainingSettings(BaseModel):
    """Local training settings of a site (used by the training engine).

    Attributes:
        devices: ``"auto"`` (all GPUs, else CPU), ``"cpu"``, or a list of CUDA device indices.
        batch_size: patches per device per step (the patch size is the federation's plan).
        local_iterations: optimiser steps per federated round.
        num_workers: data-loader worker processes.
        threads: CPU threads of the site's training and evaluation (``torch.set_num_threads``; the
            launcher also sets ``OMP_NUM_THREADS``); None = every core. Set it when sites share a machine.
        lr / weight_decay: LAMB optimiser settings (spec section 4).
        foreground_oversample: fraction of patches centred on labelled foreground.
        bf16 / channels_last: speed settings, used when the device supports them.
        seed: seed of the site's random streams.
    """

    model_config = ConfigDict(extra="forbid")

    devices: Literal["auto", "cpu"] | list[int] = "auto"
    batch_size: int = Field(default=2, ge=1)
    local_iterations: int = Field(default=400, ge=1)
    num_workers: int = Field(default=4, ge=0)
    threads: int | None = Field(default=None, ge=1)
    lr: float = Field(default=2e-3, gt=0)
    weight_decay: float = Field(default=1e-5, ge=0)
    foreground_oversample: float = Field(default=0.33, ge=0, le=1)
    bf16: bool = True
    channels_last: bool = False
    seed: int = 0

    @field_validator("devices")
    @classmethod
    def _devices(cls, v: Any) -> Any:
        if isinstance(v, list) and (not v or any(d < 0 for d in v) or len(set(v)) != len(v)):
            raise ValueError(f"devices must be 'auto', 'cpu' or a list of distinct GPU indices >= 0, got {v}")
        return v


class SiteConfig(BaseModel):
    """A site: its datasets, where it writes (``work_dir``), preprocessing and training settings.

    Attributes:
        site: unique site name.
        work_dir: output folder (relative to the yaml file); preprocessed data goes to
            ``<work_dir>/preprocessed/``.
        datasets: the site's datasets (distinct names).
        training: :class:`TrainingSettings`.
        root_certificates: the federation's CA certificate (PEM) that verifies the server's TLS
            certificate (``hermes-client start``; relative to the yaml file; ``None``: give it on the
            command line or run ``--insecure``).
        auth_private_key: the site's private key (OpenSSH, NIST EC curve such as P-384) for SuperNode
            authentication (``hermes-client start``; relative to the yaml file; ``None``: no
            authentication unless given on the command line).
    """

    model_config = ConfigDict(extra="forbid")

    site: str
    work_dir: Path
    root_certificates: Path | None = None
    auth_private_key: Path | None = None
    datasets: list[DatasetConfig] = Field(min_length=1)
    training: TrainingSettings = Field(default_factory=TrainingSettings)

    _config_path: Path | None = PrivateAttr(default=None)

    @field_validator("site")
    @classmethod
    def _site(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"site name {v!r} must consist of letters, digits, '_' and '-'")
        return v

    @field_validator("work_dir")
    @classmethod
    def _work_dir(cls, v: Path, info: ValidationInfo) -> Path:
        base = (info.context or {}).get("base_dir")
        return (Path(base) / v if base is not None else v).resolve()

    @field_validator("root_certificates", "auth_private_key")
    @classmethod
    def _relative_file(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        base = (info.context or {}).get("base_dir")
        return None if v is None else (Path(base) / v if base is not None else v).resolve()

    @field_validator("datasets")
    @classmethod
    def _distinct(cls, v: list[DatasetConfig]) -> list[DatasetConfig]:
        names = [d.name for d in v]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate dataset names {dupes}: each dataset may appear once per site")
        return v

    @property
    def config_path(self) -> Path | None:
        """The YAML file this config was loaded from (``None`` when built in code)."""
        return self._config_path

    @property
    def preprocessed_dir(self) -> Path:
        """``<work_dir>/preprocessed``."""
        return self.work_dir / "preprocessed"

    def dataset(self, name: str) -> DatasetConfig:
        """The dataset called ``name``."""
        for d in self.datasets:
            if d.name == name:
                return d
        raise ValueError(f"unknown dataset {name!r}; this site has {[d.name for d in self.datasets]}")


# ------------------------------------------------------------------------------------------------ loading
def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after", "function-before") or str(part).startswith(("list[", "dict[")):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _pydantic_errors(exc: ValidationError, where: str, names: list[Any]) -> list[str]:
    lines = []
    for err in exc.errors():
        msg = err["msg"].removeprefix("Value error, ")
        loc = tuple(err["loc"])
        key = _loc(loc)
        if len(loc) >= 2 and loc[0] == "datasets" and isinstance(loc[1], int) and loc[1] < len(names):
            key = key.replace(f"datasets[{loc[1]}]", f"datasets[{loc[1]}] ({names[loc[1]]})", 1)
        lines.append(f"{where}: {key}: {msg}")
    return lines


def _split_problems(ds: DatasetConfig, cases: list[CaseSpec], catalog: Catalog) -> list[str]:
    ids = {c.case_id for c in cases}
    problems = []
    if not ds.split.catalog and isinstance(ds.split.val, list):
        for key in ("val", "test"):
            unknown = sorted(set(getattr(ds.split, key)) - ids)
            if unknown:
                problems.append(
                    f"split.{key}: unknown case ids {unknown} (not among the {len(ids)} cases listed)"
                )
            listed = set(getattr(ds.split, key))
            unlabelled = sorted(c.case_id for c in cases if c.case_id in listed and c.label is None)
            if unlabelled:
                problems.append(f"split.{key}: cases {unlabelled} have no label and cannot be evaluated")
    elif ds.split.catalog and not {c.group or c.case_id for c in cases} & {
        i for v in catalog.dataset(ds.name).split.values() for i in v
    }:
        problems.append("split: 'catalog' but none of the listed case ids is in the catalog's split lists")
    return problems


def _case_problems(ds: DatasetConfig, index: int, where: str, catalog: Catalog) -> list[str]:
    key = f"datasets[{index}] ({ds.name})"
    try:
        cases = ds.cases()
    except FormatError as exc:
        return [f"{where}: {key}.source: {p}" for p in exc.problems]
    return [f"{where}: {key}.{p}" for p in _split_problems(ds, cases, catalog)]


def _read_yaml(path: Path) -> Mapping[str, Any]:
    if not path.is_file():
        raise SiteConfigError(path, [f"{path}: file does not exist"])
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise SiteConfigError(path, [f"{path}: not readable YAML: {exc}"]) from exc
    if not isinstance(raw, Mapping):
        problem = f"{path}: top level must be a mapping with keys site, work_dir, datasets"
        raise SiteConfigError(path, [problem])
    return raw


def load_site_config(path: str | Path, catalog: Catalog | None = None) -> SiteConfig:
    """Read and validate a site YAML file, and list every dataset's cases.

    Args:
        path: the site YAML file; relative paths in it are relative to its folder.
        catalog: the task catalog to check datasets against (default: the bundled one).

    Raises:
        SiteConfigError: every problem found, each with the file and the key.
    """
    path = Path(path).resolve()
    raw = _read_yaml(path)
    catalog = catalog if catalog is not None else Catalog.load()
    context = {"base_dir": path.parent, "catalog": catalog}
    where = path.name
    raw, errors = _without_plan_keys(raw, where)
    config: SiteConfig | None = None
    raw_datasets = raw.get("datasets")
    names = [d.get("name") if isinstance(d, Mapping) else None for d in raw_datasets or []]
    try:
        config = SiteConfig.model_validate(raw, context=context)
    except ValidationError as exc:
        errors.extend(_pydantic_errors(exc, where, names))
        dupes = sorted({str(n) for n in names if n is not None and names.count(n) > 1})
        if dupes and not any("duplicate dataset names" in e for e in errors):
            errors.append(
                f"{where}: datasets: duplicate dataset names {dupes}: each dataset may appear once per site"
            )
    datasets = config.datasets if config is not None else _valid_datasets(raw, context)
    for ds in datasets:
        index = names.index(ds.name) if ds.name in names else 0
        errors.extend(_case_problems(ds, index, where, catalog))
    if errors or config is None:
        raise SiteConfigError(path, errors)
    config._config_path = path
    return config


def _without_plan_keys(raw: Mapping[str, Any], where: str) -> tuple[dict[str, Any], list[str]]:
    """``raw`` without the keys the federation's plan decides, and one error per such key."""
    out, errors = dict(raw), []
    training = dict(raw["training"]) if isinstance(raw.get("training"), Mapping) else None
    moved = [(k, s, out) for k, s in PLAN_KEYS.items()]
    moved += [(k, s, training) for k, s in PLAN_TRAINING_KEYS.items()] if training is not None else []
    for key, setting, table in moved:
        if key in table:
            del table[key]
            prefix = "training." if table is training else ""
            errors.append(
                f"{where}: {prefix}{key}: preprocessing and patch settings are decided by the federation's plan, "
                f"not by a site: remove it here; the server sets it ('{setting}' in server.yaml)"
            )
    if training is not None:
        out["training"] = training
    return out, errors


def _valid_datasets(raw: Mapping[str, Any], context: dict[str, Any]) -> list[DatasetConfig]:
    """The datasets of ``raw`` that validate on their own (to list their cases despite other errors)."""
    out = []
    items = raw.get("datasets")
    for item in items if isinstance(items, list) else []:
        try:
            out.append(DatasetConfig.model_validate(item, context=context))
        except ValidationError:
            continue
    return out
