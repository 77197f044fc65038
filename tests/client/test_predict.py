"""Tests of ``hermes-predict`` (client/predict.py).

The model is a thresholding stand-in registered in ``hermes_model.factory.MODEL_REGISTRY`` and saved with
``model_checkpoint``, so every test goes through the command's normal loading path and the expected
output is known: task ``t``'s logit is ``20 * sign[t] * (x - threshold[t])`` on the preprocessed
(z-scored) image ``x``. The tests check geometry and bookkeeping, not training quality. Real scans of
``shared/data`` (skipped when absent): the RAS/LPS/PSR copies of one T1, a CT and its genuinely flipped
copy, and a real DICOM series.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import nn

from client.predict import main, predict
from hermes_model.catalog import Catalog
from hermes_model.factory import MODEL_REGISTRY, build_model, model_checkpoint
from hermes_model.inference import label_map
from tests.client.conftest import blob_case, make_image

SCALE = 20.0
RAS = (-1, 0, 0, 0, -1, 0, 0, 0, 1)


class ThresholdNet(nn.Module):
    """Seg logit of task t = SCALE * sign[t] * (x - threshold[t]); windows must be divisible by 16."""

    def __init__(self, thresholds: Sequence[float], signs: Sequence[float], task_slots: int = 8,
                 modality_slots: int = 6) -> None:
        super().__init__()
        pad = task_slots - len(thresholds)
        self.register_buffer("thresholds", torch.tensor([*map(float, thresholds), *[0.0] * pad]))
        self.register_buffer("signs", torch.tensor([*map(float, signs), *[1.0] * pad]))
        self.scale = nn.Parameter(torch.tensor(SCALE))
        self.task_slots, self.modality_slots = task_slots, modality_slots

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor, modality_ids: torch.Tensor):
        if any(s % 16 for s in x.shape[2:]):
            raise RuntimeError(f"window {tuple(x.shape)} not divisible by 16")
        ids = task_ids.clamp(min=0)
        thr = self.thresholds[ids][..., None, None, None]
        sign = self.signs[ids][..., None, None, None]
        return self.scale * sign * (x - thr), torch.zeros(x.shape[0], self.modality_slots)


@pytest.fixture
def make_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Path]:
    """``make_checkpoint(catalog, thresholds, signs, **model_kwargs, extra=None)`` -> checkpoint path."""
    monkeypatch.setitem(MODEL_REGISTRY, "threshold-test", ThresholdNet)

    def make(catalog: Catalog, thresholds: Sequence[float] = (0.0,), signs: Sequence[float] = (1.0,),
             extra: dict | None = None, name: str = "model.pt", **kwargs) -> Path:
        model = build_model("threshold-test", thresholds=list(thresholds), signs=list(signs), **kwargs)
        path = tmp_path / name
        torch.save(model_checkpoint(model, catalog=catalog.to_dict(), **(extra or {})), path)
        return path

    return make


def toy_catalog() -> Catalog:
    """``toy`` (CT): bright (id 0), dark (id 1); ``toy_mr`` (MR-T1): bright (id 0, shared), tissue (id 2)."""
    catalog = Catalog({})
    catalog.register_dataset("toy", "CT", {1: "bright", 2: "dark"})
    catalog.register_dataset("toy_mr", "MR-T1", {1: "bright", 2: "tissue"}, share_tasks_with="toy")
    return catalog


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum()))


def run(args: list[str]) -> int:
    return main([*args, "--roi", "32", "--no-progress"])


def z_scored(original: np.ndarray, info: dict) -> np.ndarray:
    """The preprocessing's intensity transform, with the parameters the prediction JSON reports."""
    intensity = info["preprocessing"]["intensity"]
    return (np.clip(original, *intensity["clip"]) - intensity["mean"]) / intensity["std"]


def expected_labels(z: np.ndarray, low: float, high: float) -> np.ndarray:
    """Tasks 1: z > low and 2: z < high (low < high); where both, the more probable wins."""
    p1 = 1 / (1 + np.exp(-SCALE * (z - low)))
    p2 = 1 / (1 + np.exp(SCALE * (z - high)))
    return np.where((p1 >= 0.5) & (p1 >= p2), 1, np.where(p2 >= 0.5, 2, 0))


def read(path: Path) -> tuple[sitk.Image, np.ndarray]:
    image = sitk.ReadImage(str(path))
    return image, sitk.GetArrayFromImage(image)


def assert_same_geometry(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)


# ----------------------------------------------------------------------------------- synthetic: exactness
def test_probabilities_labels_and_mapping_on_a_grid_equal_to_the_target(
    tmp_path: Path, make_checkpoint: Callable[..., Path]
) -> None:
    """Spacing 1.5 mm, RAS: resampling is the identity, so outputs equal the thresholding stand-in exactly."""
    image, _ = blob_case((20, 30, 26))
    scan = tmp_path / "blob.nrrd"
    sitk.WriteImage(make_image(image, (1.5,) * 3, (30, 20, -5), RAS), str(scan))
    ckpt = make_checkpoint(toy_catalog(), thresholds=(-0.5, 0.5), signs=(1.0, -1.0))
    out = tmp_path / "out" / "seg.nii.gz"
    assert run(["--model", str(ckpt), "--input", str(scan), "--modality", "ct", "--output", str(out),
                "--tasks", "toy", "--probabilities"]) == 0
    info = json.loads((tmp_path / "out" / "seg_labels.json").read_text())
    assert info["labels"] == {"1": "toy/bright", "2": "toy/dark"} and info["background"] == 0
    assert [t["task_id"] for t in info["tasks"]] == [0, 1] and info["modality"] == "CT"
    assert info["preprocessing"]["orientation_from"] == "RAS" and info["input"] == "blob.nrrd"
    labels_img, labels = read(out)
    assert_same_geometry(labels_img, sitk.ReadImage(str(scan)))
    z = z_scored(image, info)
    expected = expected_labels(z, -0.5, 0.5)
    decided = (np.abs(z + 0.5) > 0.01) & (np.abs(z - 0.5) > 0.01) & (np.abs(z) > 0.01)
    np.testing.assert_array_equal(labels[decided], expected[decided])
    assert set(np.unique(labels)) == {1, 2}  # every voxel is bright or dark; both occur
    for task, sign, level in ((1, 1, -0.5), (2, -1, 0.5)):
        prob_img, prob = read(tmp_path / "out" / f"seg_prob_{task}.nii.gz")
        assert info["tasks"][task - 1]["probability_map"] == f"seg_prob_{task}.nii.gz"
        assert_same_geometry(prob_img, labels_img)
        np.testing.assert_allclose(prob, 1 / (1 + np.exp(-SCALE * sign * (z - level))), atol=2e-3)
    # the streamed label map is hermes_model.inference.label_map of the written probabilities
    probs = torch.stack([torch.from_numpy(read(tmp_path / "out" / f"seg_prob_{v}.nii.gz")[1])
                         for v in (1, 2)])
    np.testing.assert_array_equal(label_map(probs, [1, 2]).numpy(), labels)


def test_tasks_restrict_the_computation_and_shared_ids_are_computed_once(
    tmp_path: Path, make_checkpoint: Callable[..., Path]
) -> None:
    image, _ = blob_case((20, 24, 24))
    scan = tmp_path / "scan.nii.gz"
    sitk.WriteImage(make_image(image, (1.5,) * 3), str(scan))
    ckpt = make_checkpoint(toy_catalog(), thresholds=(-0.5, 0.5, 0.0), signs=(1.0, -1.0, 1.0))
    common = ["--model", str(ckpt), "--input", str(scan), "--modality", "CT"]
    assert run([*common, "--output", str(tmp_path / "a.nii.gz"), "--tasks", "toy_mr/tissue"]) == 0
    info = json.loads((tmp_path / "a_labels.json").read_text())
    assert info["labels"] == {"1": "toy_mr/tissue"} and info["tasks"][0]["task_id"] == 2
    # default: every task of the bank, toy/bright and toy_mr/bright (same id 0) once, under its first key
    results = predict(ckpt, scan, tmp_path / "b", "CT", roi=32, progress=False)
    assert [r.ok for r in results] == [True] and results[0].output == tmp_path / "b" / "scan.nii.gz"
    info = json.loads((tmp_path / "b" / "scan_labels.json").read_text())
    assert info["labels"] == {"1": "toy/bright", "2": "toy/dark", "3": "toy_mr/tissue"}
    # repeated and comma-separated entries keep the order given
    assert run([*common, "--output", str(tmp_path / "c.nii.gz"), "--tasks", "toy_mr/tissue,toy/dark",
                "--tasks", "toy_mr/bright"]) == 0
    info = json.loads((tmp_path / "c_labels.json").read_text())
    assert info["labels"] == {"1": "toy_mr/tissue", "2": "toy/dark", "3": "toy_mr/bright"}


# ----------------------------------------------------------------------------------- bad input
def test_batch_runs_the_good_scans_and_reports_each_bad_one_on_one_line(
    tmp_path: Path, make_checkpoint: Callable[..., Path], capsys: pytest.CaptureFixture
) -> None:
    batch = tmp_path / "batch"
    batch.mkdir()
    image, _ = blob_case((20, 24, 24))
    sitk.WriteImage(make_image(image, (1.5,) * 3), str(batch / "good.nii.gz"))
    sitk.WriteImage(make_image(image[:3], (1.5,) * 3), str(batch / "thin.nii.gz"))  # 3 slices of 1.5 mm
    (batch / "broken.nii.gz").write_bytes(b"this is not an image")
    (batch / "empty_series").mkdir()
    (batch / "notes.txt").write_text("not a scan: ignored")
    ckpt = make_checkpoint(toy_catalog())
    status = run(["--model", str(ckpt), "--input", str(batch), "--modality", "CT", "--output",
                  str(tmp_path / "out"), "--tasks", "toy/bright"])
    assert status == 1
    assert (tmp_path / "out" / "good.nii.gz").is_file() and (tmp_path / "out" / "good_labels.json").is_file()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.nii.gz", "good_labels.json"]
    err = capsys.readouterr().err
    failed = [ln for ln in err.splitlines() if ln.startswith("FAILED")]
    assert len(failed) == 3
    by_file = {name: next(ln for ln in failed if name in ln) for name in ("broken", "thin", "empty_series")}
    assert "broken.nii.gz: corrupt or truncated compressed file" in by_file["broken"]
    assert "too small for one window" in by_file["thin"] and "[24, 24, 3]" in by_file["thin"]
    assert "no DICOM series" in by_file["empty_series"]


def test_modality_without_a_prior_and_tasks_outside_the_bank_stop_before_any_work(
    tmp_path: Path, make_checkpoint: Callable[..., Path], capsys: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
) -> None:
    image, _ = blob_case((20, 24, 24))
    scan = tmp_path / "scan.nii.gz"
    sitk.WriteImage(make_image(image, (1.5,) * 3), str(scan))
    catalog = toy_catalog()
    catalog.register_dataset("big", "CT", {i: f"c{i}" for i in range(1, 6)})  # ids 3..7
    ckpt = make_checkpoint(catalog, modality_slots=3)  # task_slots 8: ids 0..6; modality rows CT, PET, MR
    out = tmp_path / "out"

    def error(*args: str) -> str:
        status = run(["--model", str(ckpt), "--input", str(scan), "--output", str(out), *args])
        assert status == 2
        lines = [ln for ln in capsys.readouterr().err.strip().splitlines() if "error" in ln]
        assert len(lines) == 1 and (str(ckpt) in lines[0] or "--tasks" in lines[0])
        return lines[0]

    assert "no prior for modality 'MR-T1'" in error("--modality", "MR-T1", "--tasks", "toy")
    assert "'big/c5' (id 7) is not in the model's bank" in error("--modality", "CT", "--tasks", "big")
    assert "did you mean 'toy/bright'" in error("--modality", "CT", "--tasks", "toy/brigth")
    assert "did you mean 'toy'" in error("--modality", "CT", "--tasks", "tox")
    assert not out.exists()
    with pytest.raises(SystemExit):  # argparse: unknown modality name, allowed names listed
        run(["--model", str(ckpt), "--input", str(scan), "--output", str(out), "--modality", "XR"])
    assert "allowed: ['CT', 'PET', 'MR-T1', 'MR-T2', 'cine-MR', 'MR']" in capsys.readouterr().err
    # a model's training record: task 0 trained on CT, task 2 on MR-T1, task 1 never
    caplog.set_level(logging.INFO, logger="client.predict")
    trained = {"0": {"samples": 40, "modalities": ["CT"]}, "2": {"samples": 20, "modalities": ["MR-T1"]}}
    ckpt = make_checkpoint(toy_catalog(), extra={"trained_tasks": trained}, name="trained.pt")
    assert "no site trained its row 1" in error("--modality", "PET", "--tasks", "toy/bright")
    for modality, labels in (("MR-T1", {"1": "toy_mr/tissue"}), ("CT", {"1": "toy/bright"})):
        assert run(["--model", str(ckpt), "--input", str(scan), "--output", str(out), "--modality",
                    modality]) == 0
        info = json.loads((out / "scan_labels.json").read_text())
        assert info["labels"] == labels  # the default: the tasks trained on this modality
        assert f"tasks: the tasks this model was trained on with {modality} scans" in caplog.text
    # an untrained task only when named, with a warning that its prior is the random one
    assert run(["--model", str(ckpt), "--input", str(scan), "--output", str(out), "--modality", "CT",
                "--tasks", "toy/dark"]) == 0
    assert "['toy/dark'] were never trained in this model" in caplog.text


def test_unusable_model_and_missing_input_are_one_line_errors(
    tmp_path: Path, make_checkpoint: Callable[..., Path], capsys: pytest.CaptureFixture
) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    image, _ = blob_case((20, 24, 24))
    scan = tmp_path / "scan.nii.gz"
    sitk.WriteImage(make_image(image, (1.5,) * 3), str(scan))
    good = make_checkpoint(toy_catalog())
    for model, inp, needle in ((bad, scan, "is not a model checkpoint"),
                               (tmp_path / "missing.pt", scan, "no such checkpoint file"),
                               (good, tmp_path / "nothing", "no such file or folder")):
        assert run(["--model", str(model), "--input", str(inp), "--modality", "CT",
                    "--output", str(tmp_path / "o")]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0] and "weights_only=False" not in lines[0]


# ----------------------------------------------------------------------------------- real data: geometry
def test_ras_lps_psr_copies_give_predictions_on_the_same_physical_voxels(
    shared_data: Path, tmp_path: Path, make_checkpoint: Callable[..., Path]
) -> None:
    ckpt = make_checkpoint(toy_catalog(), thresholds=(0.0,))
    outputs = {}
    for code in ("RAS", "LPS", "PSR"):
        scan = shared_data / "unlabelled" / f"niivue_orient_{code}.nii.gz"
        out = tmp_path / f"{code}.nii.gz"
        assert run(["--model", str(ckpt), "--input", str(scan), "--modality", "MR-T1", "--output", str(out),
                    "--tasks", "toy_mr/bright"]) == 0
        info = json.loads((tmp_path / f"{code}_labels.json").read_text())
        original_img, original = read(scan)
        outputs[code], pred = read(out)
        assert_same_geometry(outputs[code], original_img)
        expected = z_scored(original, info) > 0
        assert 0.2 < expected.mean() < 0.8
        assert dice(pred == 1, expected) > 0.95
        # the check has power: the same mask mirrored along an in-plane axis does not pass
        assert dice(pred[:, ::-1] == 1, expected) < 0.9
    reference = outputs["LPS"]
    for code in ("RAS", "PSR"):
        on_lps = sitk.Resample(outputs[code], reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        assert np.mean(sitk.GetArrayFromImage(on_lps) == sitk.GetArrayFromImage(reference)) > 0.999
    assert read(tmp_path / "PSR.nii.gz")[1].shape != read(tmp_path / "LPS.nii.gz")[1].shape


def test_flipped_axis_ct_and_dicom_series_keep_their_geometry(
    shared_data: Path, tmp_path: Path, make_checkpoint: Callable[..., Path]
) -> None:
    ct = sitk.ReadImage(str(shared_data / "totalseg" / "ct_dicom_image.nii.gz"))
    # a genuinely flipped copy: rows reversed, y direction negated, origin at the last row
    flipped = sitk.GetImageFromArray(sitk.GetArrayFromImage(ct)[:, ::-1, :].copy())
    flipped.SetSpacing(ct.GetSpacing())
    flipped.SetDirection((1, 0, 0, 0, -1, 0, 0, 0, 1))
    flipped.SetOrigin(ct.TransformIndexToPhysicalPoint((0, ct.GetSize()[1] - 1, 0)))
    batch = tmp_path / "batch"
    batch.mkdir()
    sitk.WriteImage(ct, str(batch / "plain.nii.gz"))
    sitk.WriteImage(flipped, str(batch / "flipped.nii.gz"))
    ckpt = make_checkpoint(toy_catalog(), thresholds=(0.5, 1.0), signs=(1.0, -1.0))
    assert run(["--model", str(ckpt), "--input", str(batch), "--modality", "CT", "--output",
                str(tmp_path / "out"), "--tasks", "toy"]) == 0
    preds = {}
    for name, image in (("plain", ct), ("flipped", flipped)):
        info = json.loads((tmp_path / "out" / f"{name}_labels.json").read_text())
        preds[name], pred = read(tmp_path / "out" / f"{name}.nii.gz")
        assert_same_geometry(preds[name], image)
        expected = expected_labels(z_scored(sitk.GetArrayFromImage(image), info), 0.5, 1.0)
        for value in (1, 2):
            assert 0.05 < (expected == value).mean() < 0.95
            assert dice(pred == value, expected == value) > 0.95, (name, value)
    on_plain = sitk.Resample(preds["flipped"], preds["plain"], sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    plain = sitk.GetArrayFromImage(preds["plain"])
    assert np.mean(sitk.GetArrayFromImage(on_plain) == plain) > 0.999
    # the naive array comparison fails: the flipped file's array really is upside down
    assert dice(sitk.GetArrayFromImage(preds["flipped"]) == 1, plain == 1) < 0.9
    # the same scan as a real DICOM series (a folder): NIfTI output on the series' own grid
    series = shared_data / "unlabelled" / "totalseg_ct_dicom_series"
    assert run(["--model", str(ckpt), "--input", str(series), "--modality", "CT", "--output",
                str(tmp_path / "dicom"), "--tasks", "toy/bright"]) == 0
    out = tmp_path / "dicom" / "totalseg_ct_dicom_series.nii.gz"
    info = json.loads((tmp_path / "dicom" / "totalseg_ct_dicom_series_labels.json").read_text())
    dicom_img = sitk.ImageSeriesReader()
    dicom_img.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series)))
    original = dicom_img.Execute()
    pred_img, pred = read(out)
    assert_same_geometry(pred_img, original)
    expected = z_scored(sitk.GetArrayFromImage(original), info) > 0.5
    assert dice(pred == 1, expected) > 0.95


def test_published_hermes_r_layout_runs_with_the_bundled_catalog(tmp_path: Path, catalog: Catalog) -> None:
    """The real network (base 8) in the released checkpoint layout: no embedded catalog, the bundled one."""
    torch.manual_seed(0)
    state = build_model("hermes-r", base_channels=8).state_dict()
    ckpt = tmp_path / "hermes_r.pth"
    torch.save({"model_state_dict": state, "ema_model_state_dict": state, "epoch": 1}, ckpt)
    image, _ = blob_case((24, 24, 24))
    scan = tmp_path / "scan.mha"
    sitk.WriteImage(make_image(image, (3.0, 3.0, 3.0), (1, 2, 3), RAS), str(scan))
    out = tmp_path / "seg.nrrd"
    assert run(["--model", str(ckpt), "--input", str(scan), "--modality", "CT", "--output", str(out),
                "--tasks", "lits/liver", "--spacing", "3", "--overlap", "0", "--probabilities"]) == 0
    info = json.loads((tmp_path / "seg_labels.json").read_text())
    assert info["model"]["source"] == "published" and info["labels"] == {"1": "lits/liver"}
    assert info["tasks"][0]["task_id"] == catalog.task_id("lits/liver")
    prob_img, prob = read(tmp_path / "seg_prob_1.nrrd")
    assert_same_geometry(prob_img, sitk.ReadImage(str(scan)))
    assert_same_geometry(read(out)[0], prob_img)
    assert 0.0 <= prob.min() < prob.max() <= 1.0
