"""The plans record, data fingerprints and the trained-task table (hermes_model.plans / fingerprint / trained)."""

from __future__ import annotations

import json
import math

import pytest

from hermes_model.fingerprint import (
    DatasetFingerprint,
    fingerprints_from_json,
    fingerprints_to_json,
    merge_fingerprints,
    plan_problems,
)
from hermes_model.plans import IntensityScheme, Plans, parse_xyz_setting
from hermes_model.trained import TrainedTask, merge_trained, trained_from_dict, trained_modality_rows, trained_to_dict


def test_the_recipes_plan_and_its_round_trip() -> None:
    plans = Plans()
    assert plans.target_spacing == (1.5, 1.5, 1.5) and plans.patch_size == (128, 128, 128)
    assert plans.train_margin == 20 and plans.interpolation == "bspline"
    assert plans.scheme("CT") == IntensityScheme("window", -991.0, 500.0, "HU")
    assert plans.scheme("pet") == IntensityScheme("percentile", 2.0, 98.0, "SUV")
    assert plans.scheme("MR-T1").unit is None
    demo = Plans(target_spacing=3, patch_size=(32, 32, 48), train_margin=8, interpolation="linear").with_model(
        {"name": "hermes-r", "base_channels": 8}, "abc")
    again = Plans.from_json(demo.to_json())
    assert again == demo and again.digest() == demo.digest() and again.digest() != plans.digest()
    assert demo.preprocessing("CT")["min_size"] == [32, 32, 48]
    assert demo.describe().startswith("3x3x3 mm, 32x32x48 patches, linear resampling")


@pytest.mark.parametrize("kwargs, match", [
    ({"patch_size": 40}, "multiples of 16"),
    ({"target_spacing": (1, 2)}, "one number or three"),
    ({"target_spacing": -1}, "positive"),
    ({"train_margin": -1}, "train margin"),
    ({"interpolation": "cubic"}, "interpolation must be one of"),
])
def test_bad_plans_name_the_setting(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Plans(**kwargs)


def test_a_plan_without_a_modality_says_which_it_has_and_records_are_checked() -> None:
    plans = Plans(intensity={"CT": IntensityScheme("window", -991, 500, "HU")})
    with pytest.raises(ValueError, match=r"no intensity scheme for modality 'PET'; it has \['CT'\]"):
        plans.scheme("PET")
    with pytest.raises(ValueError, match="not a plans record"):
        Plans.from_dict({"format": "other"})
    with pytest.raises(ValueError, match="percentiles must satisfy"):
        IntensityScheme("percentile", 2, 120)
    assert parse_xyz_setting("3, 3,4", "x") == (3.0, 3.0, 4.0) and parse_xyz_setting(2, "x") == (2.0,) * 3


def _fp(**changes) -> DatasetFingerprint:
    values = dict(dataset="d", modality="CT", cases=4, spacing_xyz=(1.0, 1.0, 3.0), spacing_spread_xyz=(1.1,) * 3,
                  size_xyz=(200.0, 200.0, 60.0), size_std_xyz=(10.0,) * 3,
                  intensity={"0.5": -1000.0, "50": 20.0, "99.5": 900.0}, foreground={"50": 40.0, "99.5": 90.0},
                  foreground_mean=42.0, foreground_std=12.0)
    values.update(changes)
    return DatasetFingerprint(**values)


def test_plan_problems_name_the_site_and_the_statistic() -> None:
    plans = Plans()
    assert plan_problems("a", _fp(), plans) == []
    (ct,) = plan_problems("a", _fp(intensity={"0.5": 3.0}), plans)
    assert ct.startswith("site 'a', dataset 'd' (CT): CT is not in Hounsfield units") and "is 3," in ct
    (pet,) = plan_problems("b", _fp(modality="PET", foreground={"99.5": 4000.0}), plans)
    assert "PET is not in SUV" in pet and "4000" in pet
    problems = plan_problems("c", _fp(spacing_xyz=(0.4, 1.0, 5.0)), plans)
    assert "its typical spacing along x is 0.4 mm, 3.8x the plan's 1.5 mm" in problems[0]
    assert "its typical spacing along z is 5 mm, 3.3x the plan's 1.5 mm" in problems[1] and len(problems) == 2
    (mod,) = plan_problems("d", _fp(modality="MR-T1"), Plans(intensity={"CT": IntensityScheme("window", 0, 1)}))
    assert "no intensity scheme for modality 'MR-T1'" in mod
    assert plan_problems("e", _fp(cases=0, intensity={"0.5": 3.0}), plans) == []  # nothing read: nothing known


def test_fingerprints_round_trip_and_merge_per_modality() -> None:
    fps = [_fp(), _fp(dataset="m", modality="MR-T1", cases=2, spacing_xyz=(2.0, 2.0, 2.0), foreground={})]
    assert fingerprints_from_json(fingerprints_to_json(fps)) == fps
    with pytest.raises(ValueError, match="malformed dataset fingerprint"):
        fingerprints_from_json(json.dumps([{"dataset": "x"}]))
    merged = merge_fingerprints({"s1": [_fp(cases=1, spacing_xyz=(1.0, 1.0, 1.0))],
                                 "s2": [_fp(cases=3, spacing_xyz=(8.0, 8.0, 8.0), intensity={"50": 60.0})]})
    ct = merged["modalities"]["CT"]
    assert ct["cases"] == 4 and ct["datasets"] == 2
    assert ct["spacing_xyz"] == pytest.approx([math.exp(0.75 * math.log(8))] * 3)  # case-weighted geometric mean
    assert ct["intensity"]["50"] == pytest.approx((20.0 + 3 * 60.0) / 4)
    assert sorted(merged["sites"]) == ["s1", "s2"]


def test_trained_tasks_round_trip_merge_and_modality_rows() -> None:
    a = {3: TrainedTask(3, 10.0, ("CT",), 2), 5: TrainedTask(5, 4.0, ("MR",), 1)}
    b = {3: TrainedTask(3, 6.0, ("PET",), 4)}
    assert trained_from_dict(json.loads(json.dumps(trained_to_dict(a.values())))) == a
    merged = merge_trained([a, b])
    assert merged[3] == TrainedTask(3, 16.0, ("CT", "PET"), 4) and merged[5] == a[5]
    assert trained_modality_rows(merged, 6) == frozenset({0, 1, 5})  # CT, PET, and MR's last row
    with pytest.raises(ValueError, match="malformed trained-task table"):
        trained_from_dict({"x": {}})
