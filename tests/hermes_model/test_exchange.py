import io

import numpy as np
import pytest
import torch

from hermes_model import build_model
from hermes_model.exchange import StateLayout, decode_delta, encode_delta, from_wire, to_wire


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


# ------------------------------------------------------------------------------------------------ delta codec
def _update(shape: tuple[int, ...], dtype: torch.dtype, relative: float = 1e-3, seed: int = 0):
    """(received, trained): weights and the same weights moved by ``relative`` of their scale."""
    gen = torch.Generator().manual_seed(seed)
    received = torch.randn(shape, generator=gen) * 0.05
    trained = received + relative * 0.05 * torch.randn(shape, generator=gen)
    return received.to(dtype), trained.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(0, 7), (1,), (4, 7), (10_001,)])
def test_delta_coding_is_bit_exact(dtype, shape):
    received, trained = _update(shape, dtype)
    decoded = decode_delta(encode_delta(trained, received), received)
    assert decoded.dtype == dtype and decoded.shape == trained.shape
    assert torch.equal(decoded.view(torch.uint8), trained.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_delta_coding_keeps_every_bit_pattern(dtype):
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-42, -3.5, 6e4]).to(dtype)
    received = torch.flip(special, [0])
    decoded = decode_delta(encode_delta(special, received), received)
    assert torch.equal(decoded.view(torch.uint8), special.view(torch.uint8))  # NaN, -0.0 and subnormals too


def test_delta_coding_compresses_small_updates_and_does_not_grow_random_data():
    received, trained = _update((100_000,), torch.float32, relative=1e-3)
    assert len(encode_delta(trained, received)) < 0.7 * trained.numel() * 4
    unrelated = torch.randn(100_000)
    assert len(encode_delta(unrelated, received)) < 1.01 * unrelated.numel() * 4 + 100


def test_delta_coding_refuses_mismatched_tensors():
    received, trained = _update((6,), torch.float32)
    with pytest.raises(ValueError, match="one wire dtype"):
        encode_delta(trained.half(), received)
    with pytest.raises(ValueError, match="one wire dtype"):
        encode_delta(trained.double(), received.double())
    with pytest.raises(ValueError, match="shape"):
        encode_delta(trained.view(2, 3), received)


def _frames(data: bytes, itemsize: int = 4) -> list[bytes]:
    lengths = np.frombuffer(data[:8 * itemsize], dtype="<u8").tolist()
    out, offset = [], 8 * itemsize
    for length in lengths:
        out.append(data[offset:offset + length])
        offset += length
    return out


def _join(frames: list[bytes]) -> bytes:
    return np.array([len(f) for f in frames], dtype="<u8").tobytes() + b"".join(frames)


def test_delta_decoding_rejects_malformed_data():
    received, trained = _update((1000,), torch.float32)
    data = encode_delta(trained, received)
    longer_received, longer = _update((1001,), torch.float32)
    frames = _frames(data)
    cases = {
        "shorter than": data[:20],
        "are not": data[:-1],
        "are not ": data + b"\0",
        "declares 1001": _join(_frames(encode_delta(longer, longer_received))),
        "not a zstd frame": _join([frames[0], b"\x01" * len(frames[1]), *frames[2:]]),
    }
    for message, bad in cases.items():
        with pytest.raises(ValueError, match=message.strip()):
            decode_delta(bad, received)
    with pytest.raises(ValueError, match="one wire dtype"):
        decode_delta(data, received.double())
