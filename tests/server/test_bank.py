"""The global prior bank: ownership from the sites' reports, incremental registration, persistence."""

from __future__ import annotations

import json

import pytest

from server.bank import MODALITY, TASK, PriorBank, parse_site_datasets
from tests.server.fakes import dataset_json, small_catalog

ALPHA = ("alpha", "CT", {1: "liver", 2: "tumour"})
BETA = ("beta", "MR-T2", {1: "prostate"})


def _register(bank: PriorBank, site: str, *entries, catalog=None):
    catalog = catalog if catalog is not None else small_catalog()
    return bank.register_site(site, parse_site_datasets(dataset_json(*entries)), catalog)


def test_ownership_of_catalog_datasets():
    bank = PriorBank(task_slots=8, modality_slots=6)
    catalog = small_catalog()
    own_a = _register(bank, "site-a", ALPHA, catalog=catalog)
    _register(bank, "site-b", ALPHA, BETA, catalog=catalog)
    assert own_a.task_ids == (0, 1) and own_a.modality_rows == (0,)
    assert own_a.task_map == {"alpha/liver": 0, "alpha/tumour": 1}
    assert bank.ownership("site-b").task_ids == (0, 1, 2) and bank.ownership("site-b").modality_rows == (0, 3)
    assert bank.owners(TASK, 0) == {"site-a", "site-b"} and bank.owners(TASK, 2) == {"site-b"}
    assert bank.owners(MODALITY, 3) == {"site-b"} and bank.owners(TASK, 5) == set()
    unknown_mr = _register(bank, "site-c", ("gamma", "MR", {1: "knee"}), catalog=catalog)
    assert unknown_mr.modality_rows == (5,)  # MR of unknown sequence uses the last modality row


def test_new_dataset_gets_new_ids_and_existing_ids_never_move():
    catalog = small_catalog()
    before = catalog.task_map()
    bank = PriorBank(task_slots=8, modality_slots=6)
    own = _register(bank, "site-x", ("delta", "PET", {1: "lesion", 2: "node"}), catalog=catalog)
    assert own.task_map == {"delta/lesion": 3, "delta/node": 4} and own.modality_rows == (1,)
    assert "delta" in catalog and {k: catalog.task_id(k) for k in before} == before
    # a second site with the same new dataset shares its rows
    again = _register(bank, "site-y", ("delta", "PET", {1: "lesion", 2: "node"}), catalog=catalog)
    assert again.task_ids == (3, 4) and bank.owners(TASK, 3) == {"site-x", "site-y"}
    assert catalog.num_tasks == 5


def test_new_dataset_beyond_task_slots_is_refused_without_side_effects():
    catalog = small_catalog()
    bank = PriorBank(task_slots=4, modality_slots=6)
    with pytest.raises(ValueError, match="task_slots=4"):
        _register(bank, "site-x", ("delta", "PET", {1: "a", 2: "b"}), catalog=catalog)
    assert "delta" not in catalog and "site-x" not in bank.sites


def test_classes_disagreeing_with_the_catalog_are_refused():
    with pytest.raises(ValueError, match="disagree"):
        _register(PriorBank(8, 6), "site-a", ("alpha", "CT", {1: "spleen"}))


def test_reregistering_replaces_ownership_and_keeps_history():
    catalog = small_catalog()
    bank = PriorBank(8, 6)
    _register(bank, "site-a", ALPHA, BETA, catalog=catalog)
    bank.record_update(TASK, 2, server_round=3, samples=40)
    _register(bank, "site-a", ALPHA, catalog=catalog)
    assert bank.owners(TASK, 2) == set() and bank.info(TASK, 2).last_round == 3
    assert bank.ownership("site-a").task_ids == (0, 1)


def test_state_is_json_serialisable_and_round_trips():
    bank = PriorBank(8, 6)
    _register(bank, "site-a", ALPHA, BETA)
    bank.record_update(MODALITY, 3, server_round=2, samples=12.0)
    text = json.dumps(bank.to_dict())
    restored = PriorBank.from_dict(json.loads(text))
    assert restored == bank and restored.info(MODALITY, 3).samples == 12.0
    assert restored.ownership("site-a").task_map == {"alpha/liver": 0, "alpha/tumour": 1, "beta/prostate": 2}


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("not json", "json list"),
        ("[]", "non-empty"),
        ('[{"name": "a/b", "modality": "CT", "classes": {"1": "x"}}]', "name"),
        ('[{"name": "a", "modality": "XR", "classes": {"1": "x"}}]', "unknown modality"),
        ('[{"name": "a", "modality": "CT", "classes": {"0": "x"}}]', "classes"),
        (
            '[{"name": "a", "modality": "CT", "classes": {"1": "x"}, "num_train_cases": -1}]',
            "num_train_cases",
        ),
        (
            '[{"name": "a", "modality": "CT", "classes": {"1": "x"}}, {"name": "a", "modality": "CT", '
            '"classes": {"1": "x"}}]',
            "twice",
        ),
    ],
)
def test_bad_site_reports_are_clear_errors(text, match):
    with pytest.raises(ValueError, match=match):
        parse_site_datasets(text)
