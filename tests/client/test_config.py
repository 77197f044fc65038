"""Tests of the site configuration (client/config.py): defaults, paths, and every error at once."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import ValidationError

from client.config import SiteConfigError, SplitSpec, TrainingSettings, load_site_config
from hermes_model.catalog import Catalog
from tests.client.conftest import write_csv


@pytest.fixture
def csv_source(tmp_path: Path) -> Path:
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.nii.gz").write_bytes(b"x")
    return write_csv(tmp_path / "cases.csv", [("a", "a.nii.gz", "a.nii.gz"), ("b", "b.nii.gz", "b.nii.gz"),
                                              ("c", "c.nii.gz", None)])


def new_dataset(**over: object) -> dict:
    return {"name": "sarcoma", "modality": "CT", "format": "csv", "source": "cases.csv",
            "classes": {1: "tumour"}, **over}


def test_valid_config_resolves_paths_and_fills_defaults(
    tmp_path: Path, csv_source: Path, write_site: Callable[..., Path], catalog: Catalog
) -> None:
    write_csv(tmp_path / "lits.csv", [("0", "a.nii.gz", "a.nii.gz"), ("6", "b.nii.gz", "b.nii.gz")])
    lits = new_dataset(name="lits", classes=None, split="catalog", source="lits.csv")
    path = write_site([new_dataset(), lits], work_dir="../runs/x")
    config = load_site_config(path, catalog=catalog)
    assert config.work_dir == (tmp_path / ".." / "runs" / "x").resolve()
    assert config.preprocessed_dir == config.work_dir / "preprocessed"
    assert config.datasets[0].source == csv_source.resolve()
    assert config.training == TrainingSettings() and config.training.threads is None
    assert config.datasets[0].resample_label is False
    assert config.datasets[0].split == SplitSpec(val=0.2, test=0.2, seed=0)
    assert config.datasets[1].split.catalog
    assert config.datasets[1].resolved_classes(catalog) == {1: "liver", 2: "liver tumour"}
    assert config.datasets[1].resolved_weights(catalog) == (0.3, 0.1)
    assert config.datasets[0].resolved_weights(catalog) == (1.0, 0.1)  # new CT dataset: defaults
    assert [c.case_id for c in config.datasets[0].cases()] == ["a", "b", "c"]
    assert config.config_path == path.resolve()


def test_defaults_of_the_spec(csv_source: Path, tmp_path: Path) -> None:
    (tmp_path / "s.yaml").write_text(
        "site: s\nwork_dir: w\ndatasets:\n  - {name: d, modality: mr-t2, format: csv, source: cases.csv,"
        " classes: {1: x}}\n"
    )
    config = load_site_config(tmp_path / "s.yaml")
    assert config.training.batch_size == 2 and config.training.devices == "auto"
    assert config.datasets[0].modality == "MR-T2"  # canonical spelling
    assert config.datasets[0].resolved_weights(Catalog.load()) == (1.0, 0.2)  # MR default augmentation


def test_all_errors_are_reported_at_once_with_file_and_key(
    csv_source: Path, write_site: Callable[..., Path], catalog: Catalog
) -> None:
    path = write_site(
        [
            new_dataset(modality="XR", classes={1: "tumour", 2: "tumour"}),                  # 0
            new_dataset(name="kits", classes={1: "kidney", 2: "tumour"}),                    # 1
            new_dataset(name="fresh", classes=None, source="missing.csv"),                   # 2
            new_dataset(name="split_bad", split={"val": 0.5, "test": 0.5}),                  # 3
            new_dataset(name="split_ids", split={"val": ["a", "zz"], "test": ["c"]}),        # 4
            new_dataset(name="sarcoma", format="nifti", ignore_values=[1]),                  # 5
        ],
        training={"patch_size": 100, "batch_sise": 2},
        target_spacing=2,
    )
    with pytest.raises(SiteConfigError) as info:
        load_site_config(path, catalog=catalog)
    err = info.value
    assert isinstance(err, ValueError)
    text = str(err)
    expected = [
        "datasets[0] (sarcoma).modality: unknown modality 'XR'",
        "datasets[0] (sarcoma).classes: overlapping classes",
        "datasets[1] (kits): catalog clash",
        "datasets[2] (fresh).source: source",
        "datasets[3] (split_bad).split: split.val + split.test must be below 1",
        "datasets[4] (split_ids).split.val: unknown case ids ['zz']",
        "datasets[4] (split_ids).split.test: cases ['c'] have no label",
        "datasets[5] (sarcoma).format: unknown format 'nifti'; allowed: ['amos_ct', 'amos_mr', 'autopet',",
        "training.patch_size: preprocessing and patch settings are decided by the federation's plan, not by a "
        "site: remove it here; the server sets it ('patch-size' in server.yaml)",
        "target_spacing: preprocessing and patch settings are decided by the federation's plan",
        "training.batch_sise: Extra inputs are not permitted",
        "datasets: duplicate dataset names ['sarcoma']",
    ]
    for line in expected:
        assert line in text, f"missing {line!r} in:\n{text}"
    assert all(e.startswith("site.yaml: ") for e in err.errors)
    assert len(err.errors) == len(expected)


def test_catalog_rules(csv_source: Path, write_site: Callable[..., Path], catalog: Catalog) -> None:
    cases = [
        (new_dataset(name="newset", classes=None), "is not in the catalog: 'classes' is required"),
        (new_dataset(name="lits", modality="PET", classes=None), "catalog clash: modality 'PET'"),
        (new_dataset(name="chaos", modality="CT", classes=None), "catalog clash: modality 'CT'"),
        (new_dataset(name="newset", split="catalog"), "'catalog' needs a catalog dataset"),
        (new_dataset(classes={1: "a", 2: "b"}, ignore_values=[2, 255]), "values [2] are both in classes"),
        (new_dataset(classes={0: "bg", 128: "x"}), "class values [0, 128] out of range"),
        (new_dataset(name="lits", classes=None, split="catalog"), "none of the listed case ids is in the"),
    ]
    for dataset, message in cases:
        with pytest.raises(SiteConfigError) as info:
            load_site_config(write_site([dataset]), catalog=catalog)
        assert message in str(info.value)
    # a catalog dataset with the catalog's own classes, and a chaos MR sequence, are fine
    ok = [new_dataset(name="lits", classes={1: "liver", 2: "liver tumour"}),
          new_dataset(name="chaos", modality="MR-T2", classes=None)]
    assert len(load_site_config(write_site(ok), catalog=catalog).datasets) == 2


def test_split_spec_rules() -> None:
    assert SplitSpec(val=0, test=0).val == 0.0
    assert SplitSpec(val=[12, "a"], test=[]).val == ["12", "a"]  # yaml numbers become case ids
    for kwargs, message in [
        ({"val": 0.2, "test": ["a"]}, "both be fractions or both be lists"),
        ({"val": -0.1}, "fraction in [0, 1)"),
        ({"val": ["a"], "test": ["a", "b"]}, "in both split.val and split.test: ['a']"),
        ({"val": 0.1, "tset": 0.1}, "Extra inputs"),
    ]:
        with pytest.raises(ValidationError, match=re.escape(message)):
            SplitSpec(**kwargs)


def test_training_settings() -> None:
    t = TrainingSettings(threads=2, devices=[0, 1])
    assert t.threads == 2 and t.devices == [0, 1]
    for kwargs in ({"devices": [0, 0]}, {"devices": "gpu"}, {"batch_size": 0}, {"threads": 0},
                   {"patch_size": 64}):
        with pytest.raises(ValidationError):
            TrainingSettings(**kwargs)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(SiteConfigError, match="file does not exist"):
        load_site_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("site: [unclosed\n")
    with pytest.raises(SiteConfigError, match="not readable YAML"):
        load_site_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(SiteConfigError, match="top level must be a mapping"):
        load_site_config(tmp_path / "list.yaml")
    (tmp_path / "empty.yaml").write_text("site: s\nwork_dir: w\ndatasets: []\n")
    with pytest.raises(SiteConfigError, match="datasets: List should have at least 1 item"):
        load_site_config(tmp_path / "empty.yaml")


def test_template_is_valid(tmp_path: Path, catalog: Catalog) -> None:
    template = Path(__file__).resolve().parents[2] / "site_configs" / "templates" / "site.yaml"
    text = template.read_text()
    (tmp_path / "data").mkdir()
    for name in ("cases.csv",):
        (tmp_path / "data" / name).write_text("case,image,label\np1,p1.nii.gz,\n")
    (tmp_path / "data" / "p1.nii.gz").write_bytes(b"x")
    (tmp_path / "site.yaml").write_text(text)
    config = load_site_config(tmp_path / "site.yaml", catalog=catalog)
    assert config.site and config.datasets
