"""Sliding-window inference for Hermes models (spec section 4, "Validation").

The reference validates with windows of the training patch size, half-window overlap, a sigmoid per
window and a plain average of the overlapping window PROBABILITIES, then a threshold of 0.5
(``prob >= 0.5``). :func:`predict_volume` does the same through MONAI's
:func:`monai.inferers.sliding_window_inference`: the predictor returns ``sigmoid(seg_logits)`` for each
window batch and MONAI blends those probabilities (``mode="constant"`` averages them, as the reference
does; ``mode="gaussian"`` weights window centres more). Volumes smaller than the window are padded by
MONAI (symmetrically, with ``padding_mode="constant"``, value 0, i.e. the z-scored mean) and the output
is cropped back to the input size.

Shapes: one volume ``image`` (D, H, W) or (1, D, H, W); the output is (n, D, H, W) float32
probabilities, one channel per requested task id.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import nn

logger = logging.getLogger(__name__)

ROI_DIVISOR = 16
MODES = ("constant", "gaussian")
PRECISIONS = ("fp32", "bf16")


def _as_int(value: object, name: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got bool {value!r}")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None


def _check_roi(roi_size: int | Sequence[int]) -> tuple[int, int, int]:
    roi = tuple(roi_size) if isinstance(roi_size, Sequence | np.ndarray) else (roi_size,) * 3
    if len(roi) != 3:
        raise ValueError(f"roi_size must have 3 entries (D, H, W), got {roi_size!r}")
    roi = tuple(_as_int(r, "roi_size") for r in roi)
    if any(r <= 0 or r % ROI_DIVISOR for r in roi):
        raise ValueError(f"roi_size entries must be positive multiples of {ROI_DIVISOR}, got {roi}")
    return roi  # type: ignore[return-value]


def _check_task_ids(task_ids: Sequence[int]) -> list[int]:
    if isinstance(task_ids, torch.Tensor | np.ndarray):
        task_ids = np.asarray(task_ids.tolist()).reshape(-1).tolist()
    ids = [_as_int(t, "task_ids") for t in task_ids]
    if not ids:
        raise ValueError("task_ids must name at least one task, got an empty sequence")
    bad = [t for t in ids if t < 0]
    if bad:
        raise ValueError(f"task_ids must be >= 0 (no null task -1 at inference), got {bad} in {ids}")
    return ids


def _check_options(overlap: float, mode: str, precision: str, sw_batch_size: int) -> None:
    if not 0.0 <= float(overlap) < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if _as_int(sw_batch_size, "sw_batch_size") < 1:
        raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size!r}")


def _as_batch(image: torch.Tensor | np.ndarray) -> torch.Tensor:
    """(D, H, W) or (1, D, H, W) -> (1, 1, D, H, W) float32 (kept on its device)."""
    x = torch.as_tensor(image)
    if x.ndim == 4 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 3:
        raise ValueError(f"image must have shape (D, H, W) or (1, D, H, W), got {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"image must not be empty, got shape {tuple(x.shape)}")
    return x.to(torch.float32)[None, None]


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _autocast(device: torch.device, precision: str):
    if precision != "bf16":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def make_predictor(
    model: nn.Module, task_ids: torch.Tensor, modality_ids: torch.Tensor, precision: str = "fp32"
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Wrap ``model`` as a window predictor: (k, 1, d, h, w) -> (k, n, d, h, w) float32 probabilities.

    ``task_ids`` (1, n) and ``modality_ids`` (1, 1) are repeated to ``k`` rows for each window batch.
    The model's output ``(seg, modality_logits)`` is reduced to ``seg`` (the first entry when ``seg`` is
    a list ``[main, aux]``), then passed through a sigmoid in float32.
    """

    def predict(window: torch.Tensor) -> torch.Tensor:
        k = window.shape[0]
        tids = task_ids.to(window.device).repeat(k, 1)
        mids = modality_ids.to(window.device).repeat(k, 1)
        with _autocast(window.device, precision):
            seg = model(window, tids, mids)[0]
        if isinstance(seg, list | tuple):
            seg = seg[0]
        expected = (k, tids.shape[1], *window.shape[2:])
        if tuple(seg.shape) != expected:
            raise ValueError(f"model seg output has shape {tuple(seg.shape)}, expected {expected}")
        return torch.sigmoid(seg.float())

    return predict


def predict_volume(
    model: nn.Module,
    image: torch.Tensor | np.ndarray,
    task_ids: Sequence[int],
    modality_id: int,
    roi_size: int | Sequence[int] = (128, 128, 128),
    overlap: float = 0.5,
    mode: str = "constant",
    sw_batch_size: int = 1,
    precision: str = "fp32",
    sw_device: torch.device | str | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Per-task probabilities of one volume by sliding-window inference.

    Args:
        model: a Hermes network, ``forward(x (B,1,D,H,W), task_ids (B,n), modality_ids (B,1))`` returning
            ``(seg_logits (B,n,D,H,W) or [main, aux], modality_logits)``. Run in eval mode (restored after).
        image: (D, H, W) or (1, D, H, W) tensor or array (any size; smaller than ``roi_size`` is padded).
        task_ids: n >= 1 global task ids (>= 0; the null task -1 is not allowed).
        modality_id: the modality id (-1 = MR of unknown sequence).
        roi_size: window size, an int or 3 ints, each a positive multiple of 16.
        overlap: fraction of window overlap in [0, 1); 0.5 is the reference's half-window overlap.
        mode: ``"constant"`` (plain average of window probabilities) or ``"gaussian"``.
        sw_batch_size: windows per forward pass.
        precision: ``"fp32"`` or ``"bf16"`` (autocast on the window device); the output is float32.
        sw_device: where windows run (default: the model's device).
        device: where the whole-volume output is accumulated and returned (default CPU).
        progress: show a tqdm bar over window batches.

    Returns:
        (n, D, H, W) float32 probabilities on ``device``.
    """
    roi = _check_roi(roi_size)
    ids = _check_task_ids(task_ids)
    modality = _as_int(modality_id, "modality_id")
    _check_options(overlap, mode, precision, sw_batch_size)
    x = _as_batch(image)
    sw_dev = torch.device(sw_device) if sw_device is not None else _model_device(model)
    out_dev = torch.device(device) if device is not None else torch.device("cpu")
    predictor = make_predictor(
        model, torch.tensor([ids], dtype=torch.long), torch.tensor([[modality]], dtype=torch.long), precision
    )
    logger.debug("sliding window: image %s, roi %s, %d tasks, %s", tuple(x.shape[2:]), roi, len(ids), mode)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            probs = sliding_window_inference(
                x,
                roi,
                int(sw_batch_size),
                predictor,
                overlap=float(overlap),
                mode=mode,
                sw_device=sw_dev,
                device=out_dev,
                progress=progress,
            )
    finally:
        model.train(was_training)
    return torch.as_tensor(probs)[0].float()


def threshold(probs: torch.Tensor, level: float = 0.5) -> torch.Tensor:
    """Binary masks ``probs >= level`` (the reference's rule), same shape as ``probs``, dtype bool."""
    return torch.as_tensor(probs) >= level


def label_map(probs: torch.Tensor, class_values: Sequence[int], level: float = 0.5) -> torch.Tensor:
    """One label volume from per-task probabilities.

    Args:
        probs: (n, D, H, W) probabilities, one channel per task.
        class_values: n label values; voxels where task i wins get ``class_values[i]``.
        level: a task is present at a voxel when its probability is ``>= level``.

    Returns:
        (D, H, W) long: 0 where no task reaches ``level``, else the value of the task with the highest
        probability among those that do (ties go to the first task).
    """
    p = torch.as_tensor(probs)
    if p.ndim != 4:
        raise ValueError(f"probs must have shape (n, D, H, W), got {tuple(p.shape)}")
    values = [_as_int(v, "class_values") for v in class_values]
    if len(values) != p.shape[0]:
        raise ValueError(f"class_values needs {p.shape[0]} entries (one per task), got {len(values)}")
    best = p.argmax(dim=0)
    lut = torch.tensor(values, dtype=torch.long, device=p.device)
    labels = lut[best]
    labels[~threshold(p, level).any(dim=0)] = 0
    return labels
