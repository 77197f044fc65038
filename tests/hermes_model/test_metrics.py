"""Per-task metrics on hand-made masks: Dice, HD95 (mm), surface Dice (mm), and the summary."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from monai.metrics import compute_surface_dice

from hermes_model.metrics import dice_per_task, hd95_per_task, summarise, surface_dice_per_task

SHAPE = (20, 20, 20)


def cube(start: tuple[int, int, int], size: int = 6) -> np.ndarray:
    m = np.zeros(SHAPE, dtype=bool)
    m[tuple(slice(s, s + size) for s in start)] = True
    return m


def test_dice_exact_values_and_empty_conventions():
    pred = np.zeros((5, *SHAPE), dtype=bool)
    ref = np.zeros_like(pred)
    pred[0, 0, 0, :8] = True  # 8 voxels
    ref[0, 0, 0, 6:10] = True  # 4 voxels, 2 shared -> 2 * 2 / 12
    pred[1] = ref[1] = cube((2, 2, 2))  # identical -> 1
    ref[2] = cube((2, 2, 2))  # missed -> 0
    pred[3] = cube((2, 2, 2))  # reference empty, false positive -> NaN
    # task 4: both empty -> NaN
    dice = dice_per_task(torch.from_numpy(pred), ref)
    assert dice.shape == (5,)
    np.testing.assert_allclose(dice[:3], [1 / 3, 1.0, 0.0], atol=1e-6)
    assert np.isnan(dice[3]) and np.isnan(dice[4])


def test_dice_accepts_zero_one_integers():
    pred = np.zeros((1, 4, 4, 4), dtype=np.int8)
    ref = np.zeros((1, 4, 4, 4), dtype=np.uint8)
    pred[0, 0, 0, :3] = 1
    ref[0, 0, 0, :2] = 1
    np.testing.assert_allclose(dice_per_task(pred, ref), [0.8], atol=1e-6)


@pytest.mark.parametrize(("axis", "shift"), [(0, 2), (1, 3), (2, 1)])
def test_hd95_of_shifted_cubes_is_shift_in_mm(axis, shift):
    spacing = (2.5, 1.0, 0.7)
    start = [4, 4, 4]
    moved = list(start)
    moved[axis] += shift
    pred = np.stack([cube(tuple(moved)), cube(tuple(start))])
    ref = np.stack([cube(tuple(start)), cube(tuple(start))])
    hd = hd95_per_task(pred, ref, spacing=spacing)
    np.testing.assert_allclose(hd, [shift * spacing[axis], 0.0], atol=1e-5)


def test_hd95_ignores_a_few_outlier_voxels():
    # One stray voxel is < 5% of the prediction's 152 surface voxels: the max HD sees it, HD95 does not.
    pred = cube((2, 2, 2))
    pred[18, 18, 18] = True
    hd = hd95_per_task(pred[None], cube((2, 2, 2))[None], spacing=(2.0, 2.0, 2.0))
    np.testing.assert_allclose(hd, [0.0], atol=1e-6)


def test_hd95_nan_when_either_mask_is_empty():
    empty = np.zeros(SHAPE, dtype=bool)
    pred = np.stack([cube((2, 2, 2)), empty, empty])
    ref = np.stack([empty, cube((2, 2, 2)), empty])
    assert np.isnan(hd95_per_task(pred, ref, spacing=(1.5, 1.5, 1.5))).all()


def test_surface_dice_identical_shifted_and_tolerance_in_mm():
    spacing = (1.5, 1.5, 1.5)
    a, b = cube((4, 4, 4)), cube((6, 4, 4))  # shifted by 2 voxels = 3 mm along D
    pred = np.stack([a, b])
    ref = np.stack([a, a])
    same, moved = surface_dice_per_task(pred, ref, tolerance_mm=1.0, spacing=spacing)
    assert same == pytest.approx(1.0)
    assert 0.0 < moved < 1.0
    # 2.5 would cover the 2-voxel shift if read in voxels; in mm (3 mm shift) it does not.
    assert surface_dice_per_task(pred, ref, tolerance_mm=2.5, spacing=spacing)[1] < 1.0
    assert surface_dice_per_task(pred, ref, tolerance_mm=3.0, spacing=spacing)[1] == pytest.approx(1.0)


# Hand-made case for the area-weighted surface Dice (DeepMind / Nikolov et al.). Spacing (s0, s1, s2) = (3, 1, 2)
# mm. pred = 2x2x2 voxels at D 2-3, ref = the same box one voxel further along D (D 3-4). A surface element sits in each
# 2x2x2 neighbourhood ("cube", index i = voxels i and i+1) the mask crosses: for a box at voxels a, a+1 that is the
# cubes a-1, a, a+1 on each axis minus the all-inside centre (a, a, a). Marching-cubes areas: a face element normal
# to axis k has the cube's face area (A0 = s1 s2 = 2, A1 = s0 s2 = 6, A2 = s0 s1 = 3); an edge element along axis k is
# a rectangle s_k x half the diagonal of the other two (E0 = s0 hypot(s1, s2) / 2, E1 = s1 hypot(s0, s2) / 2,
# E2 = s2 hypot(s0, s1) / 2); a corner is one triangle T = |(s1 s2, s0 s2, s0 s1)| / 8 = 7/8. Layers along D:
# cap (cube a-1 or a+1) = A0 + 2 E1 + 2 E2 + 4 T, ring (cube a) = 2 A1 + 2 A2 + 4 E0; box area S = 2 cap + ring.
# pred's cubes are D 1-3, ref's D 2-4. pred's low cap (D 1) is s0 = 3 mm from ref's full layer D 2; pred's ring
# (D 2) lies on ref's low cap: 0; pred's high cap (D 3) lies on ref's ring except its centre face A0 (ref has no
# element at the centre of its ring), which is min(s1, s2, s0) = 1 mm from ref's ring. ref mirrors this. So
# tol < 1: NSD = 2 (S - cap - A0) / 2S; 1 <= tol < 3: 1 - cap / S; tol >= 3: 1. Counting boundary voxels instead
# (all 8 voxels of each box), half of each box coincides and the other half is 3 mm away: 0.5 for every tol < 3.
S0, S1, S2 = 3.0, 1.0, 2.0


def _two_boxes_one_voxel_apart() -> tuple[np.ndarray, np.ndarray]:
    pred = np.zeros((1, 7, 6, 6), dtype=bool)
    ref = np.zeros_like(pred)
    pred[0, 2:4, 2:4, 2:4] = True
    ref[0, 3:5, 2:4, 2:4] = True
    return pred, ref


def test_surface_dice_is_area_weighted_by_hand():
    a0, a1, a2 = S1 * S2, S0 * S2, S0 * S1
    e0, e1, e2 = S0 * np.hypot(S1, S2) / 2, S1 * np.hypot(S0, S2) / 2, S2 * np.hypot(S0, S1) / 2
    t = np.linalg.norm([S1 * S2, S0 * S2, S0 * S1]) / 8
    assert t == pytest.approx(7 / 8)
    cap = a0 + 2 * e1 + 2 * e2 + 4 * t
    ring = 2 * a1 + 2 * a2 + 4 * e0
    area = 2 * cap + ring
    pred, ref = _two_boxes_one_voxel_apart()
    expected = {0.0: 1 - (cap + a0) / area, 0.5: 1 - (cap + a0) / area, 1.0: 1 - cap / area, 2.9: 1 - cap / area}
    expected[3.0] = 1.0
    for tol, value in expected.items():
        got = surface_dice_per_task(pred, ref, tolerance_mm=tol, spacing=(S0, S1, S2))
        np.testing.assert_allclose(got, [value], rtol=1e-5, err_msg=f"tolerance {tol}")
    # symmetric in pred and ref, and the value is not the voxel count's 0.5
    np.testing.assert_allclose(surface_dice_per_task(ref, pred, 0.5, (S0, S1, S2)), [1 - (cap + a0) / area], rtol=1e-5)
    assert abs(1 - (cap + a0) / area - 0.5) > 0.2


def test_surface_dice_changes_below_the_voxel_size_where_voxel_counting_does_not():
    # 1.5 mm and 0.5 mm are both below the 3 mm voxel size along D.
    pred, ref = _two_boxes_one_voxel_apart()
    fine, coarse = (surface_dice_per_task(pred, ref, tol, (S0, S1, S2))[0] for tol in (1.5, 0.5))
    assert fine > coarse + 0.02
    p, r = (torch.from_numpy(m).float()[None] for m in (pred, ref))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        counted = [
            compute_surface_dice(p, r, [tol], include_background=True, spacing=[S0, S1, S2]).item()
            for tol in (1.5, 0.5)
        ]
    assert counted == pytest.approx([0.5, 0.5])  # MONAI's default (boundary voxels) does not move


def test_surface_dice_empty_conventions():
    empty = np.zeros(SHAPE, dtype=bool)
    pred = np.stack([cube((2, 2, 2)), empty, empty])
    ref = np.stack([empty, cube((2, 2, 2)), empty])
    nsd = surface_dice_per_task(pred, ref, tolerance_mm=2.0)
    assert np.isnan(nsd[0]) and nsd[1] == 0.0 and np.isnan(nsd[2])


def test_summarise_nan_mean_per_task():
    cases = [np.array([0.5, np.nan, np.nan]), np.array([1.0, 0.25, np.nan]), np.array([0.0, 0.75, np.nan])]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an all-NaN task must not warn
        out = summarise(cases)
    np.testing.assert_allclose(out[:2], [0.5, 0.5])
    assert np.isnan(out[2])


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: dice_per_task(np.zeros((2, 4, 4, 4)), np.zeros((3, 4, 4, 4))), "same shape"),
        (lambda: dice_per_task(np.zeros((4, 4, 4)), np.zeros((4, 4, 4))), "pred and ref"),
        (lambda: hd95_per_task(np.ones((1, 4, 4, 4)), np.ones((1, 4, 4, 4)), spacing=(1, 0, 1)), "spacing"),
        (lambda: hd95_per_task(np.ones((1, 4, 4, 4)), np.ones((1, 4, 4, 4)), spacing=(1, 1)), "spacing"),
        (lambda: surface_dice_per_task(np.ones((1, 4, 4, 4)), np.ones((1, 4, 4, 4)), -1.0), "tolerance_mm"),
        (lambda: summarise([]), "per_case"),
        (lambda: summarise([np.zeros(2), np.zeros(3)]), "per_case"),
    ],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
