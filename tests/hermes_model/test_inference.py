"""Sliding-window inference: shapes, blending, padding, task/modality repetition, precision, label maps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hermes_model.inference import label_map, predict_volume, threshold

N_MODALITIES = 6


def _check_divisible(x: torch.Tensor) -> None:
    if any(s % 16 for s in x.shape[2:]):
        raise RuntimeError(f"window {tuple(x.shape)} not divisible by 16")


class PointwiseModel(nn.Module):
    """Seg logit of task t at voxel v = (x(v) - t) * 10 + modality_id: independent of the window."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the module a device

    def forward(self, x, task_ids, modality_ids):
        _check_divisible(x)
        t = task_ids.to(x.dtype)[:, :, None, None, None]
        m = modality_ids.to(x.dtype)[:, :, None, None, None]
        seg = (x - t) * 10.0 + m + self.anchor
        return seg, torch.zeros(x.shape[0], N_MODALITIES)


def pointwise_probs(x: torch.Tensor, task_ids: list[int], modality_id: int) -> torch.Tensor:
    t = torch.tensor(task_ids, dtype=torch.float32)[:, None, None, None]
    return torch.sigmoid((x[None] - t) * 10.0 + modality_id)


class RecordingModel(PointwiseModel):
    """Pointwise model that records what each call received and the state it ran in."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict] = []

    def forward(self, x, task_ids, modality_ids):
        self.calls.append(
            {
                "k": x.shape[0],
                "task_ids": task_ids.clone(),
                "modality_ids": modality_ids.clone(),
                "training": self.training,
                "grad": torch.is_grad_enabled(),
                "autocast": torch.is_autocast_enabled("cpu"),
            }
        )
        return super().forward(x, task_ids, modality_ids)


class WindowMeanModel(nn.Module):
    """Seg logit = the mean of the window, the same at every voxel of the window (one task)."""

    def forward(self, x, task_ids, modality_ids):
        mean = x.mean(dim=(1, 2, 3, 4), keepdim=True)
        return mean.expand(-1, task_ids.shape[1], *x.shape[2:]), torch.zeros(x.shape[0], N_MODALITIES)


class AuxOutputModel(PointwiseModel):
    """Returns ([main, aux], modality_logits) like Hermes-M; aux is garbage that must be ignored."""

    def forward(self, x, task_ids, modality_ids):
        seg, mod = super().forward(x, task_ids, modality_ids)
        return [seg, torch.full_like(seg, 50.0)], mod


class ConvModel(nn.Module):
    """A small conv net (so bf16 autocast really changes the compute dtype); logits per task."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv3d(1, 4, 3, padding=1)
        self.head = nn.Conv3d(4, 3, 1)

    def forward(self, x, task_ids, modality_ids):
        _check_divisible(x)
        seg = self.head(torch.relu(self.conv(x)))
        return seg[:, : task_ids.shape[1]], torch.zeros(x.shape[0], N_MODALITIES)


@pytest.fixture
def volume() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(40, 36, 50, generator=g) * 3.0


@pytest.mark.parametrize("mode", ["constant", "gaussian"])
def test_pointwise_model_gives_sigmoid_everywhere(volume, mode):
    tasks, modality = [0, 1, 2], 1
    probs = predict_volume(PointwiseModel(), volume, tasks, modality, roi_size=32, overlap=0.5, mode=mode)
    assert probs.shape == (3, 40, 36, 50)
    assert probs.dtype == torch.float32 and probs.device.type == "cpu"
    torch.testing.assert_close(probs, pointwise_probs(volume, tasks, modality), atol=1e-5, rtol=0)


def test_volume_smaller_than_roi_is_padded_and_cropped_back():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 20, 40, 10, generator=g) * 3.0  # (1, D, H, W), two axes below the roi
    probs = predict_volume(PointwiseModel(), x.numpy(), [2], -1, roi_size=(32, 32, 32), overlap=0.25)
    assert probs.shape == (1, 20, 40, 10)
    torch.testing.assert_close(probs, pointwise_probs(x[0], [2], -1), atol=1e-5, rtol=0)


def test_overlapping_windows_average_probabilities_not_logits():
    # Along W the two windows are [0, 32) and [16, 48); window means are 0 and 4.
    x = torch.zeros(16, 16, 48)
    x[:, :, 32:] = 8.0
    probs = predict_volume(WindowMeanModel(), x, [5], 0, roi_size=(16, 16, 32), overlap=0.5)
    s0, s4 = torch.sigmoid(torch.tensor(0.0)), torch.sigmoid(torch.tensor(4.0))
    torch.testing.assert_close(probs[0, :, :, :16], torch.full((16, 16, 16), float(s0)))
    torch.testing.assert_close(probs[0, :, :, 16:32], torch.full((16, 16, 16), float((s0 + s4) / 2)))
    torch.testing.assert_close(probs[0, :, :, 32:], torch.full((16, 16, 16), float(s4)))


def test_task_and_modality_ids_repeated_per_window_batch(volume):
    model = RecordingModel()
    model.train()
    tasks = [7, 3, 60]
    probs = predict_volume(model, volume, tasks, -1, roi_size=32, overlap=0.5, sw_batch_size=5)
    n_windows = 2 * 2 * 3  # ceil((size - 32) / 16) + 1 per axis for 40, 36, 50
    assert sum(c["k"] for c in model.calls) == n_windows
    assert [c["k"] for c in model.calls] == [5, 5, 2]
    for call in model.calls:
        assert torch.equal(call["task_ids"], torch.tensor([tasks] * call["k"]))
        assert torch.equal(call["modality_ids"], torch.full((call["k"], 1), -1))
        assert call["training"] is False and call["grad"] is False and call["autocast"] is False
    assert model.training is True  # restored after inference
    torch.testing.assert_close(probs, pointwise_probs(volume, tasks, -1), atol=1e-5, rtol=0)


def test_bf16_runs_under_autocast_and_returns_float32(volume):
    model = RecordingModel()
    predict_volume(model, volume, [0], 0, roi_size=32, precision="bf16")
    assert model.calls and all(c["autocast"] for c in model.calls)

    conv = ConvModel()
    ref = predict_volume(conv, volume, [0, 1], 0, roi_size=32, precision="fp32")
    low = predict_volume(conv, volume, [0, 1], 0, roi_size=32, precision="bf16")
    assert low.dtype == torch.float32 and low.shape == (2, 40, 36, 50)
    assert not torch.equal(low, ref)  # bf16 compute really happened
    torch.testing.assert_close(low, ref, atol=3e-2, rtol=0)


def test_aux_output_list_uses_main_head(volume):
    probs = predict_volume(AuxOutputModel(), volume, [1], 2, roi_size=32)
    torch.testing.assert_close(probs, pointwise_probs(volume, [1], 2), atol=1e-5, rtol=0)


def test_explicit_devices_cpu(volume):
    probs = predict_volume(PointwiseModel(), volume, [0], 0, roi_size=32, sw_device="cpu", device="cpu")
    assert probs.device.type == "cpu" and probs.shape == (1, 40, 36, 50)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_windows_on_gpu_volume_on_cpu(volume):
    model = ConvModel().cuda()
    ref = predict_volume(ConvModel(), volume, [0, 1, 2], 0, roi_size=32)
    probs = predict_volume(model, volume, [0, 1, 2], 0, roi_size=32, sw_device="cuda", device="cpu")
    assert probs.device.type == "cpu"
    torch.testing.assert_close(probs, ref, atol=1e-4, rtol=0)
    low = predict_volume(model, volume, [0, 1, 2], 0, roi_size=32, precision="bf16", device="cuda")
    assert low.device.type == "cuda" and low.dtype == torch.float32
    torch.testing.assert_close(low.cpu(), ref, atol=3e-2, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"roi_size": (32, 30, 32)}, "roi_size"),
        ({"roi_size": 0}, "roi_size"),
        ({"roi_size": (32, 32)}, "roi_size"),
        ({"task_ids": []}, "task_ids"),
        ({"task_ids": [0, -1]}, "task_ids"),
        ({"task_ids": [-3]}, "task_ids"),
        ({"overlap": 1.0}, "overlap"),
        ({"overlap": -0.1}, "overlap"),
        ({"mode": "linear"}, "mode"),
        ({"precision": "fp16"}, "precision"),
        ({"sw_batch_size": 0}, "sw_batch_size"),
        ({"image": torch.zeros(2, 16, 16, 16)}, "image"),
        ({"image": torch.zeros(16, 16)}, "image"),
        ({"image": torch.zeros(1, 1, 16, 16, 16)}, "image"),
    ],
)
def test_bad_input_raises_value_error(kwargs, match):
    args = {"image": torch.zeros(16, 16, 16), "task_ids": [0], "modality_id": 0, "roi_size": 16}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        predict_volume(PointwiseModel(), **args)


def test_threshold_uses_greater_or_equal():
    probs = torch.tensor([0.2, 0.5, 0.7])
    assert threshold(probs).tolist() == [False, True, True]
    assert threshold(probs, level=0.6).tolist() == [False, False, True]


def test_label_map_resolves_overlaps_by_highest_probability():
    probs = torch.zeros(2, 1, 1, 5)
    probs[0, 0, 0] = torch.tensor([0.9, 0.6, 0.1, 0.4, 0.55])
    probs[1, 0, 0] = torch.tensor([0.2, 0.8, 0.3, 0.45, 0.55])
    labels = label_map(probs, class_values=[3, 7])
    assert labels.dtype == torch.long and labels.shape == (1, 1, 5)
    # task 0 only; both (task 1 higher); neither; neither (< 0.5); tie -> first task
    assert labels[0, 0].tolist() == [3, 7, 0, 0, 3]
    assert label_map(probs, [3, 7], level=0.85)[0, 0].tolist() == [3, 0, 0, 0, 0]


def test_label_map_bad_input():
    with pytest.raises(ValueError, match="class_values"):
        label_map(torch.zeros(2, 1, 1, 1), [1])
    with pytest.raises(ValueError, match="probs"):
        label_map(torch.zeros(1, 1, 1), [1])


def test_predict_then_label_map_round_trip(volume):
    probs = predict_volume(PointwiseModel(), volume, [2, 1], 0, roi_size=32)
    labels = label_map(probs, [5, 9])
    # Task 1's logit (x - 1) * 10 always beats task 2's, and reaches 0.5 exactly where x >= 1.
    assert labels.shape == (40, 36, 50)
    assert torch.equal(labels, torch.where(volume >= 1.0, 9, 0))


def test_real_hermes_r_single_window_equals_direct_forward():
    from hermes_model import build_model

    torch.manual_seed(0)
    model = build_model("hermes-r", base_channels=8, task_slots=72, modality_slots=6)
    x = torch.randn(32, 32, 32)
    tasks = [19, 20, 21]
    probs = predict_volume(model, x, tasks, -1, roi_size=32)
    model.eval()
    with torch.no_grad():
        seg, _ = model(x[None, None], torch.tensor([tasks]), torch.tensor([[-1]]))
    torch.testing.assert_close(probs, torch.sigmoid(seg[0]), atol=1e-5, rtol=0)

    odd = torch.randn(20, 24, 40)  # padded on D and H, two windows along W in one batch of 2
    small = predict_volume(model, odd, [0, 1], 2, roi_size=32, sw_batch_size=2)
    assert small.shape == (2, 20, 24, 40) and bool(((small > 0) & (small < 1)).all())
