import io

import numpy as np
import pytest
import torch

from hermes_model import build_model
from hermes_model.exchange import StateLayout, from_wire, to_wire


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("hermes-r", base_channels=8)


def test_layout_is_computed_from_the_model(model):
    layout = StateLayout.from_model(model)
    state = model.state_dict()
    assert layout.task_slots == 72 and layout.modality_slots == 6
    assert len(layout.task_banks) == 5 and len(layout.modality_banks) == 5
    assert layout.task_row_size == 34 * 8 and layout.modality_row_size == 10 * 34 * 8
    total = layout.backbone_size + 72 * layout.task_row_size + 6 * layout.modality_row_size
    assert total == sum(t.numel() for t in state.values())


def test_split_and_merge_round_trip_only_touch_what_was_sent(model):
    layout = StateLayout.from_model(model)
    state = model.state_dict()
    blank = {k: torch.zeros_like(v) for k, v in state.items()}
    layout.load_backbone(blank, layout.backbone(state))
    layout.load_task_rows(blank, [3, 19], layout.task_rows(state, [3, 19]))
    layout.load_modality_rows(blank, [5], layout.modality_rows(state, [5]))
    for key, value in state.items():
        if key.endswith(".task_prior"):
            sent = [3, 19, 72]  # the null row travels with the backbone
            assert torch.equal(blank[key][sent], value[sent])
            assert blank[key][[0, 1, 20, 71]].abs().sum() == 0
        elif key.endswith(".modality_prior"):
            assert torch.equal(blank[key][5], value[5]) and blank[key][:5].abs().sum() == 0
        else:
            assert torch.equal(blank[key], value), key


def test_task_row_concatenates_the_same_id_of_every_bank(model):
    layout = StateLayout.from_model(model)
    state = model.state_dict()
    row = layout.task_rows(state, [7])[0]
    expected = torch.cat([state[k][7] for k in layout.task_banks])
    assert torch.equal(row, expected)


def test_bad_ids_and_shapes_are_value_errors(model):
    layout = StateLayout.from_model(model)
    state = model.state_dict()
    with pytest.raises(ValueError, match="out of range"):
        layout.task_rows(state, [72])
    with pytest.raises(ValueError, match="repeat"):
        layout.modality_rows(state, [1, 1])
    with pytest.raises(ValueError, match="backbone must be a vector"):
        layout.load_backbone(dict(state), torch.zeros(5))
    with pytest.raises(ValueError, match="task rows must have shape"):
        layout.load_task_rows(dict(state), [1], torch.zeros(2, layout.task_row_size))
    other = build_model("hermes-r", base_channels=8, task_slots=80).state_dict()
    with pytest.raises(ValueError, match="does not match the layout"):
        layout.check_state(other)


def test_wire_formats():
    values = torch.tensor([0.1, -2.5, 3.0])
    assert to_wire(values).dtype == torch.float32
    half = to_wire(values, "float16")
    assert half.dtype == torch.float16 and torch.allclose(half.float(), values, atol=1e-3)
    with pytest.raises(ValueError, match="overflow"):
        to_wire(torch.tensor([1e6]), "float16")
    with pytest.raises(ValueError, match="wire_dtype must be one of"):
        to_wire(values, "int8")


# ------------------------------------------------------------------------------------------------ from_wire
def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)  # what flwr.app.Array holds
    return buffer.getvalue()


def test_from_wire_float32_is_a_view_and_float16_is_widened():
    values = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    npy = _npy(values)
    tensor = from_wire(npy)
    assert tensor.dtype == torch.float32 and tuple(tensor.shape) == (3, 5)
    assert np.array_equal(tensor.numpy(), values)
    start = np.frombuffer(npy, np.uint8).ctypes.data
    assert start < tensor.data_ptr() < start + len(npy)  # a view of the received bytes: no copy
    half = from_wire(_npy(values.astype(np.float16)))
    assert half.dtype == torch.float32
    assert np.array_equal(half.numpy(), values.astype(np.float16).astype(np.float32))
    fortran = from_wire(_npy(np.asfortranarray(values)))
    assert np.array_equal(fortran.numpy(), values)


@pytest.mark.parametrize(
    ("npy", "message"),
    [
        (_npy(np.zeros(4, np.float32))[:-1], "data bytes"),
        (_npy(np.zeros(4, np.float32)) + b"\0\0\0\0", "data bytes"),
        (_npy(np.zeros(4, np.int32)), "not float32"),
        (_npy(np.zeros(4, np.float64)), "not float32"),
        (b"not an npy file at all", "magic"),
    ],
)
def test_from_wire_rejects_malformed_bytes(npy, message):
    with pytest.raises(ValueError, match=message):
        from_wire(npy)
