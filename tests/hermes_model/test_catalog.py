"""Task catalog: shipped ids, modality ids, registration, round trips and error messages."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import hermes_model.catalog as catalog_module
from hermes_model.catalog import (
    MODALITY_NAMES,
    Catalog,
    DatasetEntry,
    canonical_modality,
    modality_id,
    modality_name,
    modality_row,
)

SPEC_YAML = Path(__file__).resolve().parents[2] / ".." / "shared" / "spec" / "hermes_catalog.yaml"
BUNDLED_YAML = Path(__file__).resolve().parents[2] / "hermes_model" / "data" / "hermes_catalog.yaml"


@pytest.fixture(scope="module")
def shipped() -> Catalog:
    return Catalog.load()


@pytest.fixture()
def fresh() -> Catalog:
    return Catalog.load()


def _tiny(**changes) -> dict:
    """A small valid catalog dict; ``changes`` replace whole datasets."""
    datasets = {
        "a": {"modality": "CT", "task_ids": [0, 1], "classes": {1: "liver", 2: "spleen"}},
        "b": {"modality": "MR-T1", "task_ids": [2], "classes": {1: "brain"}},
    }
    datasets.update(changes)
    return {"datasets": datasets}


# ------------------------------------------------------------------------------------------ shipped file
def test_bundled_yaml_is_verbatim_copy_of_spec():
    if not SPEC_YAML.is_file():
        pytest.skip(f"shared spec folder not found beside the repo ({SPEC_YAML})")
    assert BUNDLED_YAML.read_bytes() == SPEC_YAML.read_bytes()


def test_shipped_counts(shipped):
    assert len(shipped) == 11
    assert list(shipped.datasets)[:4] == ["lits", "kits", "amos_ct", "amos_mr"]
    assert shipped.num_tasks == 71
    assert sorted(set(shipped.task_map().values())) == list(range(71))  # no gaps


@pytest.mark.parametrize(
    ("key", "tid"),
    [
        ("lits/liver", 0),
        ("lits/liver tumour", 1),
        ("kits/kidney tumour", 3),
        ("amos_ct/spleen", 4),
        ("amos_ct/prostate/uterus", 18),  # class names may contain '/'
        ("bcv/spleen", 19),
        ("bcv/left adrenal gland", 31),
        ("chaos/spleen", 41),
        ("structseg_head_oar/right mandible", 63),
        ("mnm/right ventricle", 66),
        ("autopet/lesion", 70),
    ],
)
def test_shipped_task_ids(shipped, key, tid):
    assert shipped.task_id(key) == tid


def test_amos_mr_shares_ids_with_amos_ct_only(shipped):
    ct, mr = shipped.dataset("amos_ct"), shipped.dataset("amos_mr")
    ct_keys = {c: t for c, t in zip(ct.classes.values(), ct.task_ids, strict=True)}
    assert list(mr.task_ids) == list(range(4, 17))
    for label, cname in mr.classes.items():
        assert mr.task_id_for(label) == ct_keys[cname]
    assert shipped.task_keys(4) == ["amos_ct/spleen", "amos_mr/spleen"]
    assert shipped.task_key(4) == "amos_ct/spleen"
    assert shipped.task_keys(17) == ["amos_ct/bladder"]
    # every other pair of datasets is disjoint, even for the same organ
    owners: dict[int, set[str]] = {}
    for name, entry in shipped.datasets.items():
        for t in entry.task_ids:
            owners.setdefault(t, set()).add(name)
    shared = {t for t, names in owners.items() if len(names) > 1}
    assert shared == set(range(4, 17))
    assert shipped.task_id("bcv/liver") != shipped.task_id("amos_ct/liver")


def test_entry_methods(shipped):
    lits = shipped.dataset("lits")
    assert lits.task_key(2) == "lits/liver tumour"
    assert lits.task_id_for(2) == 1
    assert lits.label_to_task() == {1: 0, 2: 1}
    assert lits.modality == "CT" and lits.modality_id == 0 and lits.sample_weight == 0.3
    amos_mr = shipped.dataset("amos_mr")
    assert amos_mr.modality == "MR" and amos_mr.modality_id == -1 and amos_mr.intensity_aug_prob == 0.2
    chaos = shipped.dataset("chaos")
    assert chaos.modality is None and chaos.modality_id is None
    assert chaos.modality_ids == {"t1_in": 2, "t1_out": 2, "t2": 3}
    assert chaos.modality_id_for("t2") == 3 and chaos.modality_id_for("t1_out") == 2
    with pytest.raises(ValueError, match=r"chaos.*t1_in.*t2.*got 'flair'"):
        chaos.modality_id_for("flair")
    with pytest.raises(ValueError, match=r"'lits' has no label value 3.*liver tumour"):
        lits.task_key(3)


def test_split_cases_and_duplicate_warning(caplog, monkeypatch):
    monkeypatch.setattr(catalog_module, "_WARNED", set())  # as in a fresh process
    with caplog.at_level(logging.WARNING, logger="hermes_model.catalog"):
        cat = Catalog.load()
        Catalog.load()
        assert not caplog.records  # loading warns about no dataset: a run warns about the ones it uses
        head = cat.dataset("structseg_head_oar")
        assert head.split["val"] == ("25", "25")  # kept verbatim
        assert head.cases("val") == ("25",)
        assert head.cases("val") == ("25",)  # a second use in the same process does not repeat the warning
        assert cat.dataset("bcv").cases("val") == ("img0032",)
        assert len(cat.dataset("autopet").cases("train")) == 705
    messages = [r.getMessage() for r in caplog.records]
    assert sum("structseg_head_oar.split.val" in m and "['25']" in m for m in messages) == 1
    with pytest.raises(ValueError, match=r"split must be one of \['train', 'val', 'test'\], got 'valid'"):
        head.cases("valid")


# ------------------------------------------------------------------------------------------ modalities
def test_modality_ids_and_rows():
    assert {n: modality_id(n) for n in MODALITY_NAMES} == {
        "CT": 0, "PET": 1, "MR-T1": 2, "MR-T2": 3, "cine-MR": 4, "MR": -1,
    }
    assert modality_id("MR (unknown sequence)") == -1
    assert modality_id(" ct ") == 0 and canonical_modality("CINE-mr") == "cine-MR"
    assert modality_name(-1) == "MR" and modality_name(4) == "cine-MR"
    assert [modality_row(i) for i in (0, 1, 2, 3, 4, -1)] == [0, 1, 2, 3, 4, 5]
    assert modality_row(-1, modality_slots=8) == 7
    assert modality_row(np.int64(-1)) == 5 and modality_row(torch.tensor(3)) == 3


def test_modality_errors():
    with pytest.raises(ValueError, match=r"unknown modality 'MR-T3' \(did you mean 'MR-T2', 'MR-T1'.*allow"):
        modality_id("MR-T3")
    with pytest.raises(ValueError, match=r"allowed: \['CT', 'PET', 'MR-T1', 'MR-T2', 'cine-MR', 'MR'\]"):
        modality_id("ultrasound")
    with pytest.raises(ValueError, match=r"modality_id 5 does not fit modality_slots=6: allowed -1 or 0..4"):
        modality_row(5)
    with pytest.raises(ValueError, match=r"modality_id must be an int, got 1.0"):
        modality_row(1.0)
    with pytest.raises(ValueError, match=r"modality_slots must be an int >= 2, got 1"):
        modality_row(0, modality_slots=1)
    with pytest.raises(ValueError, match=r"unknown modality id 7"):
        modality_name(7)


# ------------------------------------------------------------------------------------------ look-up errors
def test_lookup_errors_suggest_close_names(shipped):
    with pytest.raises(ValueError, match=r"unknown task key 'bcv/spleeen' \(did you mean 'bcv/spleen'"):
        shipped.task_id("bcv/spleeen")
    with pytest.raises(ValueError, match=r"classes of 'lits': \['lits/liver', 'lits/liver tumour'\]"):
        shipped.task_id("lits/tumor")
    with pytest.raises(ValueError, match=r"unknown dataset 'kits19' \(did you mean 'kits'.*known: \['lits'"):
        shipped.dataset("kits19")
    with pytest.raises(ValueError, match=r"unknown task id 71; known ids: 0..70"):
        shipped.task_key(71)
    with pytest.raises(ValueError, match=r"-1 is the null/padding task"):
        shipped.task_keys(-1)


def test_check_capacity(shipped):
    shipped.check_capacity(72)
    shipped.check_capacity(100)
    with pytest.raises(ValueError, match=r"71 tasks .* task_slots=71 holds only 70 .* task_slots >= 72"):
        shipped.check_capacity(71)
    with pytest.raises(ValueError, match=r"task_slots must be a positive int, got 0"):
        shipped.check_capacity(0)


# ------------------------------------------------------------------------------------------ registration
def test_register_new_dataset_appends_ids(fresh):
    before = fresh.task_map()
    entry = fresh.register_dataset("prostate_mr", "MR-T2", {1: "peripheral zone", 2: "transition zone"})
    assert entry.task_ids == (71, 72)
    assert fresh.num_tasks == 73
    assert fresh.task_id("prostate_mr/transition zone") == 72
    assert entry.intensity_aug_prob == 0.2 and entry.sample_weight == 1.0 and entry.modality_id == 3
    after = fresh.task_map()
    assert {k: after[k] for k in before} == before  # nothing renumbered
    ct = fresh.register_dataset("pancreas_ct", "CT", {2: "pancreas", 1: "pancreas tumour"}, sample_weight=0.5)
    assert ct.task_ids == (73, 74) and ct.task_key(1) == "pancreas_ct/pancreas tumour"
    assert ct.intensity_aug_prob == 0.1 and ct.sample_weight == 0.5
    with pytest.raises(ValueError, match=r"task_slots >= 76"):
        fresh.check_capacity(72)


def test_register_multi_sequence_dataset(fresh):
    entry = fresh.register_dataset("liver_mr", {"t1": "MR-T1", "t2": 3}, {1: "liver"})
    assert entry.modality is None and entry.modality_ids == {"t1": 2, "t2": 3}
    assert entry.task_ids == (71,) and entry.intensity_aug_prob == 0.2


def test_register_sharing_tasks(fresh):
    entry = fresh.register_dataset(
        "amos_mr_t1", "MR-T1", {1: "liver", 2: "spleen", 3: "kidney cyst"}, share_tasks_with="amos_mr"
    )
    assert entry.task_ids == (9, 4, 71)  # liver and spleen reuse amos ids, the new class gets 71
    assert fresh.task_keys(9) == ["amos_ct/liver", "amos_mr/liver", "amos_mr_t1/liver"]
    with pytest.raises(ValueError, match=r"share_tasks_with='lits' but no class name in common"):
        fresh.register_dataset("knee", "MR-T1", {1: "cartilage"}, share_tasks_with="lits")
    with pytest.raises(ValueError, match=r"unknown dataset 'bvc' \(did you mean 'bcv'"):
        fresh.register_dataset("x", "CT", {1: "spleen"}, share_tasks_with="bvc")


def test_register_existing_name(fresh):
    lits = fresh.dataset("lits")
    same = fresh.register_dataset("lits", "CT", {1: "liver", 2: "liver tumour"}, sample_weight=0.3)
    assert same is lits and fresh.num_tasks == 71
    again = fresh.register_dataset(
        "amos_mr", "MR (unknown sequence)", dict(fresh.dataset("amos_mr").classes), sample_weight=1.6,
        share_tasks_with="amos_ct",
    )
    assert again is fresh.dataset("amos_mr")
    with pytest.raises(ValueError, match=r"'lits' is already registered with different content:\n.*classes"):
        fresh.register_dataset("lits", "CT", {1: "liver", 2: "tumour"}, sample_weight=0.3)
    with pytest.raises(ValueError, match=r"sample_weight: registered 0.3, given 1.0"):
        fresh.register_dataset("lits", "CT", {1: "liver", 2: "liver tumour"})
    with pytest.raises(ValueError, match=r"modality: registered 'CT', given 'PET'"):
        fresh.register_dataset("lits", "PET", {1: "liver", 2: "liver tumour"}, sample_weight=0.3)
    with pytest.raises(ValueError, match=r"task id of 'liver': registered 0, shared dataset has 9"):
        fresh.register_dataset("lits", "CT", {1: "liver", 2: "liver tumour"}, 0.3, share_tasks_with="amos_ct")
    assert fresh.num_tasks == 71 and fresh.dataset("lits") is lits


@pytest.mark.parametrize(
    ("classes", "modality", "message"),
    [
        ({1: "liver", 2: "liver"}, "CT", r"datasets\.new\.classes: duplicate class name 'liver'"),
        ({}, "CT", r"datasets\.new\.classes: must be a non-empty mapping"),
        ({0: "background", 1: "liver"}, "CT", r"datasets\.new\.classes: label value 0 is background"),
        ({1: "liver"}, "MRI", r"datasets\.new\.modality: unknown modality 'MRI'.*allowed"),
        ({1: "  "}, "CT", r"datasets\.new\.classes\[1\]: class name must be a non-empty string"),
    ],
)
def test_register_bad_input(fresh, classes, modality, message):
    with pytest.raises(ValueError, match=r"invalid catalog entry 'new'") as info:
        fresh.register_dataset("new", modality, classes)
    assert info.match(message)
    assert "new" not in fresh and fresh.num_tasks == 71


def test_register_bad_numbers_and_name(fresh):
    with pytest.raises(ValueError, match=r"sample_weight: must be a number > 0, got -1"):
        fresh.register_dataset("new", "CT", {1: "liver"}, sample_weight=-1)
    with pytest.raises(ValueError, match=r"intensity_aug_prob: must be a number in \[0, 1\], got 1.5"):
        fresh.register_dataset("new", "CT", {1: "liver"}, intensity_aug_prob=1.5)
    with pytest.raises(ValueError, match=r"dataset name 'a/b': must be a non-empty string without '/'"):
        fresh.register_dataset("a/b", "CT", {1: "liver"})
    assert "new" not in fresh


# ------------------------------------------------------------------------------------------ round trips
def test_to_dict_from_dict_round_trip(fresh):
    split = {"train": ["p1"], "test": ["p2"]}
    fresh.register_dataset("prostate_mr", "MR-T2", {1: "peripheral zone"}, split=split)
    d = fresh.to_dict()
    via_json = json.loads(json.dumps(d))  # JSON turns label keys into strings
    for data in (d, via_json):
        back = Catalog.from_dict(data)
        assert back == fresh
        assert back.task_map() == fresh.task_map()
        assert back.dataset("chaos") == fresh.dataset("chaos")
        assert back.dataset("prostate_mr").split == {"train": ("p1",), "test": ("p2",)}
    assert d["datasets"]["amos_mr"]["modality"] == "MR" and d["datasets"]["amos_mr"]["modality_id"] == -1
    assert d["datasets"]["chaos"]["modality_ids"] == {"t1_in": 2, "t1_out": 2, "t2": 3}


def test_save_load_round_trip(fresh, tmp_path):
    fresh.register_dataset("knee", "MR-T1", {1: "femoral cartilage", 2: "tibial cartilage"})
    path = fresh.save(tmp_path / "sub" / "catalog.yaml")
    assert path.is_file() and not list(path.parent.glob(".*.tmp"))
    assert yaml.safe_load(path.read_text())["datasets"]["knee"]["task_ids"] == [71, 72]
    back = Catalog.load(path)
    assert back == fresh and back.num_tasks == 73
    assert Catalog.load(path).task_key(4) == "amos_ct/spleen"  # catalog order survives


def test_direct_construction_is_validated():
    good = DatasetEntry("a", "CT", {1: "liver"}, (0,))
    assert Catalog({"a": good}).num_tasks == 1
    with pytest.raises(ValueError, match=r"datasets\.a\.modality: unknown modality 'ct-scan'"):
        Catalog({"a": DatasetEntry("a", "ct-scan", {1: "liver"}, (0,))})
    with pytest.raises(ValueError, match=r"datasets\['b'\]: must be a DatasetEntry named 'b'"):
        Catalog({"b": good})


# ------------------------------------------------------------------------------------------ validation
def test_conflicting_shared_id_names_both_datasets():
    raw = _tiny(c={"modality": "CT", "task_ids": [1], "classes": {1: "kidney"}})
    with pytest.raises(ValueError, match=r"task id 1 is used by datasets 'a' \(class 'spleen'\) and 'c' "):
        Catalog.from_dict(raw)
    same_protocol = _tiny(c={"modality": "PET", "task_ids": [1, 3], "classes": {1: "spleen", 2: "lung"}})
    assert Catalog.from_dict(same_protocol).task_keys(1) == ["a/spleen", "c/spleen"]


def test_all_problems_reported_at_once(tmp_path):
    raw = _tiny(
        c={"modality": "CT", "task_ids": [5, 5], "classes": {1: "x", 2: "y"}},
        d={"modality": "CT", "task_ids": [6, 7], "classes": {1: "x"}},
        e={"modality": "PET", "modality_id": 0, "task_ids": [8], "classes": {1: "x"}},
        f={"modality": "CT", "task_ids": [9], "clases": {1: "x"}},
        g={"modality": "CT", "task_ids": [0], "classes": {1: "lung"}},
    )
    raw["modalities"] = {"CT": 0, "PET": 2}
    raw["datset"] = {}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError) as info:
        Catalog.load(path)
    msg = str(info.value)
    assert "bad.yaml" in msg and "problem(s)" in msg
    for part in [
        "datasets.c.task_ids: duplicate task ids [5]",
        "datasets.d.task_ids: 2 ids for 1 classes",
        "datasets.e.modality_id: 0 disagrees with modality 'PET' (id 1)",
        "datasets.f: unknown key 'clases' (did you mean 'classes'?)",
        "datasets.f.classes: must be a non-empty mapping",
        "task id 0 is used by datasets 'a' (class 'liver') and 'g' (class 'lung')",
        "modalities['PET']: id 2 disagrees with the built-in id 1",
        "unknown top-level key 'datset' (did you mean 'datasets'?)",
    ]:
        assert part in msg, part
    assert msg.count("\n  - ") == 8 and "8 problem(s)" in msg  # f has two problems


def test_load_file_errors(tmp_path):
    with pytest.raises(ValueError, match=r"catalog file .*missing\.yaml' does not exist"):
        Catalog.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("datasets: [unclosed\n")
    with pytest.raises(ValueError, match=r"is not valid yaml"):
        Catalog.load(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ValueError, match=r"catalog must be a mapping"):
        Catalog.load(bad)


def test_shipped_file_mutations_are_caught(tmp_path):
    raw = yaml.safe_load(BUNDLED_YAML.read_text())
    broken = copy.deepcopy(raw)
    broken["datasets"]["amos_mr"]["classes"][1] = "bladder"  # id 4: spleen for CT, bladder for MR
    expected = r"task id 4 is used by datasets 'amos_ct' \(class 'spleen'\) and 'amos_mr' \(class 'bladder'\)"
    with pytest.raises(ValueError, match=expected):
        Catalog.from_dict(broken)
    broken = copy.deepcopy(raw)
    broken["datasets"]["chaos"]["modality_ids"]["t2"] = 9
    with pytest.raises(ValueError, match=r"datasets\.chaos\.modality_ids\['t2'\]: unknown modality id 9"):
        Catalog.from_dict(broken)
