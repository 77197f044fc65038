"""What a site and the server exchange: the model state split into the shared **backbone** and the
rows of the **prior bank**, packed into a few large arrays (Flower-free; both sides import this).

- Backbone: every state tensor except the prior banks, plus the null-task row (the last row) of every
  ``*.task_prior``, flattened into one float vector in state-dict order.
- Task row ``t``: row ``t`` of every ``*.task_prior`` concatenated (one vector per task id).
- Modality row ``r``: row ``r`` of every ``*.modality_prior`` flattened and concatenated.

The layout is computed from the model's state dict, never typed by hand, so Hermes-R and any other
network with ``task_prior`` / ``modality_prior`` banks split the same way.
"""

from __future__ import annotations

import io
import math
import struct
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import zstandard

# Record and array names of the messages (the server and the ClientApp wrap them in Flower records).
ARRAYS_RECORD = "arrays"      # ArrayRecord: BACKBONE, TASK_ROWS, MODALITY_ROWS
CONFIG_RECORD = "config"      # ConfigRecord: round config (server -> site), row ids (both ways)
METRICS_RECORD = "metrics"    # MetricRecord: aggregate numbers only (site -> server)
SITE_RECORD = "site"          # ConfigRecord: a site's answer to the query message
BACKBONE, TASK_ROWS, MODALITY_ROWS = "backbone", "task_rows", "modality_rows"
EXCHANGE_ARRAYS = (BACKBONE, TASK_ROWS, MODALITY_ROWS)  # the arrays of every train/evaluate message
TASK_ROW_IDS, MODALITY_ROW_IDS = "task_row_ids", "modality_row_ids"
NUM_EXAMPLES = "num-examples"  # samples trained (train) or cases evaluated (evaluate)
# the query: a site answers with its name, datasets, data fingerprint and protocol version (SITE_RECORD); a
# query whose config holds REFUSED_KEY tells the site why the server refused it
NAME_KEY, DATASETS_KEY, FINGERPRINT_KEY, PROTOCOL_KEY = "name", "datasets", "fingerprint", "protocol"
REFUSED_KEY = "refused"
PROTOCOL_VERSION = 2  # 2: plans, fingerprints, refusals, run keys (a site and its server must agree)

# how a site updates the model in a round (server setting local-update): ``steps`` (local optimiser steps,
# the reply holds the new weights) or ``gradient`` (one batch: the reply holds the gradients of the loss's
# two sums, the segmentation sum in EXCHANGE_ARRAYS and the modality sum in MODALITY_TERM_ARRAYS, with their
# counts as the metrics LOSS_TOKENS and KNOWN_MODALITY; see TrainEngine.loss_sum_gradients)
LOCAL_UPDATES = ("steps", "gradient")
MODALITY_TERM_ARRAYS = tuple(f"modality-term/{name}" for name in EXCHANGE_ARRAYS)
LOSS_TOKENS, KNOWN_MODALITY = "loss-tokens", "known-modality"
TASK_BANK_SUFFIX = ".task_prior"
MODALITY_BANK_SUFFIX = ".modality_prior"
WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
REPLY_CODECS = ("none", "xor-zstd")  # how a site codes its train reply (server setting reply-codec)
XOR_ZSTD_STYPE = "hermes.xor-zstd"   # Flower Array stype of a reply array coded with encode_delta
_BIT_DTYPES = {2: torch.int16, 4: torch.int32}  # same-size integer views of the wire dtypes
_WIRE_TORCH_DTYPES = frozenset(WIRE_DTYPES.values())
CODEC_CHUNK = 1 << 22  # values encode_delta codes at a time (bounds its working memory)


@dataclass(frozen=True)
class StateLayout:
    """Names and shapes of a model state, and how it splits into backbone and prior rows."""

    shapes: tuple[tuple[str, tuple[int, ...]], ...]
    task_banks: tuple[str, ...]
    modality_banks: tuple[str, ...]

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> StateLayout:
        non_float = [k for k, v in state.items() if not torch.is_floating_point(v)]
        if non_float:
            raise ValueError(f"state tensors must be floating point; not: {non_float[:5]}")
        task = tuple(k for k in state if k.endswith(TASK_BANK_SUFFIX))
        modality = tuple(k for k in state if k.endswith(MODALITY_BANK_SUFFIX))
        if not task or not modality:
            raise ValueError("the state has no prior banks (*.task_prior and *.modality_prior)")
        rows = {state[k].shape[0] for k in task} | {-1 - state[k].shape[0] for k in modality}
        if len(rows) != 2:
            raise ValueError("all task banks (and all modality banks) must have the same number of rows")
        return cls(tuple((k, tuple(v.shape)) for k, v in state.items()), task, modality)

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> StateLayout:
        return cls.from_state_dict(model.state_dict())

    @property
    def task_slots(self) -> int:
        """Task ids 0..task_slots-1; the bank's last row (task_slots) is the null row (in the backbone)."""
        return dict(self.shapes)[self.task_banks[0]][0] - 1

    @property
    def modality_slots(self) -> int:
        return dict(self.shapes)[self.modality_banks[0]][0]

    @property
    def banks(self) -> frozenset[str]:
        return frozenset(self.task_banks + self.modality_banks)

    @property
    def backbone_size(self) -> int:
        shapes = dict(self.shapes)
        plain = sum(_numel(s) for k, s in self.shapes if k not in self.banks)
        return plain + sum(shapes[k][1] for k in self.task_banks)

    @property
    def task_row_size(self) -> int:
        return sum(dict(self.shapes)[k][1] for k in self.task_banks)

    @property
    def modality_row_size(self) -> int:
        return sum(_numel(dict(self.shapes)[k][1:]) for k in self.modality_banks)

    def check_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Raise ValueError unless ``state`` has exactly this layout's names and shapes."""
        theirs = [(k, tuple(v.shape)) for k, v in state.items()]
        if sorted(theirs) != sorted(self.shapes):
            missing = sorted(set(dict(self.shapes)) - set(state))[:5]
            extra = sorted(set(state) - set(dict(self.shapes)))[:5]
            raise ValueError(f"state does not match the layout (missing {missing}, unexpected {extra}, "
                             "or shapes differ)")

    # -- split -------------------------------------------------------------------------------------
    def backbone(self, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The backbone as one float32 vector of ``backbone_size`` elements."""
        parts = [state[k].detach().float().reshape(-1) for k, _ in self.shapes if k not in self.banks]
        parts += [state[k].detach().float()[-1] for k in self.task_banks]
        return torch.cat(parts)

    def task_rows(self, state: Mapping[str, torch.Tensor], ids: Sequence[int]) -> torch.Tensor:
        """(len(ids), task_row_size) float32: task row ``t`` of every bank, concatenated."""
        index = self._check_ids(ids, self.task_slots, "task")
        return torch.cat([state[k].detach().float()[index] for k in self.task_banks], dim=1)

    def modality_rows(self, state: Mapping[str, torch.Tensor], rows: Sequence[int]) -> torch.Tensor:
        """(len(rows), modality_row_size) float32: modality-bank row ``r`` of every bank, flattened."""
        index = self._check_ids(rows, self.modality_slots, "modality")
        return torch.cat([state[k].detach().float()[index].flatten(1) for k in self.modality_banks], dim=1)

    # -- merge -------------------------------------------------------------------------------------
    @torch.no_grad()
    def load_backbone(self, state: dict[str, torch.Tensor], vector: torch.Tensor) -> None:
        """Write a backbone vector into ``state`` in place (dtypes kept)."""
        _check_length(vector, self.backbone_size, "backbone")
        offset = 0
        for key, shape in self.shapes:
            if key not in self.banks:
                offset = _assign(state[key], vector, offset, _numel(shape))
        for key in self.task_banks:
            offset = _assign(state[key][-1], vector, offset, state[key].shape[1])

    @torch.no_grad()
    def load_task_rows(self, state: dict[str, torch.Tensor], ids: Sequence[int], rows: torch.Tensor) -> None:
        index = self._check_ids(ids, self.task_slots, "task")
        _check_matrix(rows, len(index), self.task_row_size, "task rows")
        offset = 0
        for key in self.task_banks:
            width = state[key].shape[1]
            state[key][index] = rows[:, offset:offset + width].to(state[key].device, state[key].dtype)
            offset += width

    @torch.no_grad()
    def load_modality_rows(self, state: dict[str, torch.Tensor], ids: Sequence[int], rows: torch.Tensor) -> None:
        index = self._check_ids(ids, self.modality_slots, "modality")
        _check_matrix(rows, len(index), self.modality_row_size, "modality rows")
        offset = 0
        for key in self.modality_banks:
            shape = state[key].shape[1:]
            width = _numel(shape)
            block = rows[:, offset:offset + width].reshape(len(index), *shape)
            state[key][index] = block.to(state[key].device, state[key].dtype)
            offset += width

    @staticmethod
    def _check_ids(ids: Sequence[int], limit: int, kind: str) -> list[int]:
        index = [int(i) for i in ids]
        bad = [i for i in index if not 0 <= i < limit]
        if bad:
            raise ValueError(f"{kind} row ids out of range [0, {limit}): {bad[:5]}")
        if len(set(index)) != len(index):
            raise ValueError(f"{kind} row ids repeat: {index}")
        return index


def from_wire(npy: bytes) -> torch.Tensor:
    """The float32 tensor of one received array: ``.npy`` bytes (how Flower's ``Array`` holds data).

    A float32 array is NOT copied: the tensor is a read-only view of ``npy`` (never write to it; copy
    it into a model or clone it). This saves one copy of every payload on both sides of the exchange.

    Raises:
        ValueError: not a complete ``.npy`` of float32 or float16 values (truncated, padded, another
            dtype, object arrays, an unknown format version).
    """
    stream = io.BytesIO(npy)  # shares the bytes, no copy
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
    else:
        raise ValueError(f"unsupported .npy format version {version}")
    if dtype.name not in WIRE_DTYPES:
        raise ValueError(f"dtype {dtype} is not {' or '.join(WIRE_DTYPES)}")
    count, offset = math.prod(shape), stream.tell()
    if len(npy) - offset != count * dtype.itemsize:
        raise ValueError(f"{len(npy) - offset} data bytes for {count} {dtype} values of shape {shape}")
    flat = np.frombuffer(npy, dtype=dtype, count=count, offset=offset)
    array = flat.reshape(shape[::-1]).T if fortran_order else flat.reshape(shape)
    with warnings.catch_warnings():  # the tensor shares the read-only bytes on purpose (docstring)
        warnings.simplefilter("ignore", UserWarning)
        tensor = torch.from_numpy(array)
    return tensor.float()


def to_wire(tensor: torch.Tensor, wire_dtype: str = "float32") -> torch.Tensor:
    """Cast for sending: lossless float32, or the opt-in 16-bit ``float16`` (averaging stays float32)."""
    if wire_dtype not in WIRE_DTYPES:
        raise ValueError(f"wire_dtype must be one of {sorted(WIRE_DTYPES)}, got {wire_dtype!r}")
    out = tensor.detach().to(WIRE_DTYPES[wire_dtype]).cpu().contiguous()
    if wire_dtype != "float32" and not bool(torch.isfinite(out).all()):
        raise ValueError(f"values overflow {wire_dtype}; use the lossless float32 wire format")
    return out


def encode_delta(values: torch.Tensor, reference: torch.Tensor) -> bytes:
    """Code ``values`` losslessly against ``reference``: what the site received in the same message (same
    shape and wire dtype). The bit patterns of the two are XORed and split into byte planes, and each plane
    is compressed with zstd.

    Training rarely changes a weight's sign, exponent and high mantissa bits, so those planes compress
    well: real replies shrink to 70-80 % of their size after rounds of 20-400 steps (README). The bytes are
    one little-endian uint64 length per plane, then one zstd frame per plane in memory order. Works on
    chunks, so that it needs little memory besides its output.
    """
    _check_pair(values, reference)
    bits, ref, itemsize = _bits(values).reshape(-1), _bits(reference).reshape(-1), values.element_size()
    streams = [zstandard.ZstdCompressor(level=1).compressobj(size=bits.numel()) for _ in range(itemsize)]
    pieces: list[list[bytes]] = [[] for _ in range(itemsize)]
    for start in range(0, bits.numel(), CODEC_CHUNK):
        xor = bits[start:start + CODEC_CHUNK] ^ ref[start:start + CODEC_CHUNK]
        planes = xor.view(torch.uint8).view(-1, itemsize)
        for j, stream in enumerate(streams):
            pieces[j].append(stream.compress(planes[:, j].contiguous().numpy()))
    for plane, stream in zip(pieces, streams, strict=True):
        plane.append(stream.flush())
    header = struct.pack(f"<{itemsize}Q", *(sum(map(len, plane)) for plane in pieces))
    return b"".join([header, *(piece for plane in pieces for piece in plane)])


def decode_delta(data: bytes, reference: torch.Tensor) -> torch.Tensor:
    """The values that :func:`encode_delta` coded against ``reference`` (its shape and dtype).

    Raises:
        ValueError: ``data`` is not such a coding of as many values as ``reference`` holds. Every frame's
            declared size is checked before it is decompressed, so forged data cannot make this allocate
            more than one plane of that size.
    """
    _check_pair(reference, reference)
    itemsize, count = reference.element_size(), reference.numel()
    header = struct.calcsize(f"<{itemsize}Q")
    if len(data) < header:
        raise ValueError(f"{len(data)} bytes: shorter than the {header}-byte header")
    lengths = struct.unpack_from(f"<{itemsize}Q", data)
    if header + sum(lengths) != len(data):
        raise ValueError(f"frame lengths {list(lengths)} and a {header}-byte header are not {len(data)} bytes")
    planes = torch.empty(count, itemsize, dtype=torch.uint8)
    view, offset = memoryview(data), header
    decompressor = zstandard.ZstdDecompressor()
    for j, length in enumerate(lengths):
        planes.numpy()[:, j] = _plane(decompressor, view[offset:offset + length], count)
        offset += length
    bits = planes.view(_BIT_DTYPES[itemsize]).view(reference.shape)
    return bits.bitwise_xor_(_bits(reference)).view(reference.dtype)


def _plane(decompressor: zstandard.ZstdDecompressor, frame: memoryview, count: int) -> np.ndarray:
    try:
        declared = zstandard.frame_content_size(frame)
        if declared != count:
            raise ValueError(f"a byte plane declares {declared} bytes, expected {count}")
        plane = decompressor.decompress(frame)
    except zstandard.ZstdError as exc:
        raise ValueError(f"a byte plane is not a zstd frame ({exc})") from None
    if len(plane) != count:
        raise ValueError(f"a byte plane holds {len(plane)} bytes, expected {count}")
    return np.frombuffer(plane, dtype=np.uint8)


def _check_pair(values: torch.Tensor, reference: torch.Tensor) -> None:
    if values.dtype not in _WIRE_TORCH_DTYPES or values.dtype != reference.dtype:
        raise ValueError(f"need two tensors of one wire dtype {list(WIRE_DTYPES)}; got {values.dtype}, "
                         f"{reference.dtype}")
    if values.shape != reference.shape:
        raise ValueError(f"shape {tuple(values.shape)} differs from the reference's {tuple(reference.shape)}")


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().cpu().contiguous().view(_BIT_DTYPES[tensor.element_size()])


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _assign(target: torch.Tensor, vector: torch.Tensor, offset: int, size: int) -> int:
    target.copy_(vector[offset:offset + size].reshape(target.shape))
    return offset + size


def _check_length(vector: torch.Tensor, size: int, what: str) -> None:
    if vector.ndim != 1 or vector.numel() != size:
        raise ValueError(f"{what} must be a vector of {size} values, got shape {tuple(vector.shape)}")


def _check_matrix(rows: torch.Tensor, count: int, width: int, what: str) -> None:
    if tuple(rows.shape) != (count, width):
        raise ValueError(f"{what} must have shape ({count}, {width}), got {tuple(rows.shape)}")
