"""Validation of the sites' replies (protocol section "Server validation of replies").

A bad reply raises :class:`ReplyRejected` with one of :data:`DROP_REASONS`; the strategy drops it,
logs the reason and counts it in the round's metrics. Nothing here raises anything else for bad input.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.constant import SType

from hermes_model.exchange import (
    ARRAYS_RECORD,
    BACKBONE,
    CONFIG_RECORD,
    EXCHANGE_ARRAYS,
    KNOWN_MODALITY,
    LOSS_TOKENS,
    METRICS_RECORD,
    MODALITY_ROW_IDS,
    MODALITY_ROWS,
    MODALITY_TERM_ARRAYS,
    NUM_EXAMPLES,
    TASK_ROW_IDS,
    TASK_ROWS,
    WIRE_DTYPES,
    XOR_ZSTD_STYPE,
    StateLayout,
    decode_delta,
    from_wire,
)

DROP_REASONS = (
    "error-reply",  # msg.has_error() (e.g. the node died: NODE_UNAVAILABLE)
    "unexpected-sender",  # a node that was not sent this round's message, or a second reply
    "bad-records",  # unexpected or missing record names / record types
    "bad-arrays",  # unexpected or missing array names
    "bad-row-ids",  # row ids differ from what the site owns (what it was sent)
    "bad-dtype",  # not float32 / float16 (a coded array: not the dtype it was sent in)
    "bad-codec",  # an array serialisation other than .npy or the codec of hermes_model.exchange
    "bad-shape",  # backbone size or (len(ids), row size) wrong
    "non-finite",  # NaN or inf
    "bad-num-examples",  # missing, not a number, or <= 0
    "bad-metrics",  # a metric that is not a finite number
    "malformed",  # arrays that do not decode
)
TRAIN_RECORDS = frozenset({ARRAYS_RECORD, CONFIG_RECORD, METRICS_RECORD})
TRAIN_ARRAYS = frozenset({BACKBONE, TASK_ROWS, MODALITY_ROWS})
GRADIENT_ARRAYS = TRAIN_ARRAYS | frozenset(MODALITY_TERM_ARRAYS)


class ReplyRejected(Exception):
    """A reply that must be dropped; ``reason`` is one of :data:`DROP_REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in DROP_REASONS:
            raise ValueError(f"reason must be one of {DROP_REASONS}, got {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Sent:
    """What the server sent one node this round: the reply must echo these row ids, and coded reply
    arrays decode against ``arrays`` (name -> the tensor sent, in the wire dtype)."""

    node_id: int
    site: str
    task_ids: tuple[int, ...]
    modality_rows: tuple[int, ...]
    arrays: Mapping[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainUpdate:
    """A valid train reply, arrays converted to float32.

    Attributes:
        backbone: (backbone_size,); task_rows: (len(task_ids), task_row_size);
        modality_rows: (len(modality_ids), modality_row_size).
        modality_term: a gradient reply's modality-sum gradient (the same three shapes); None otherwise.
    """

    site: str
    num_examples: float
    backbone: torch.Tensor
    task_ids: tuple[int, ...]
    task_rows: torch.Tensor
    modality_ids: tuple[int, ...]
    modality_rows: torch.Tensor
    metrics: dict[str, float]
    modality_term: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


@dataclass(frozen=True)
class EvalResult:
    site: str
    num_examples: float
    metrics: dict[str, float]


def parse_train_reply(msg: Message, sent: Sent, layout: StateLayout, gradient: bool = False) -> TrainUpdate:
    """Check a train reply against what ``sent`` received; raise :class:`ReplyRejected` if bad. A
    ``gradient`` reply (local-update ``gradient``) also holds the modality-term arrays and the counts."""
    if msg.has_error():
        raise ReplyRejected("error-reply", f"code {msg.error.code}: {msg.error.reason}")
    content = msg.content
    _check_names("bad-records", "records", set(content.keys()), TRAIN_RECORDS)
    arrays, config = content[ARRAYS_RECORD], content[CONFIG_RECORD]
    metrics = _metrics(content[METRICS_RECORD])
    num_examples = _num_examples(metrics)
    if not isinstance(arrays, ArrayRecord) or not isinstance(config, ConfigRecord):
        raise ReplyRejected("bad-records", "records 'arrays'/'config' have the wrong record type")
    _check_names("bad-arrays", "arrays", set(arrays.keys()), GRADIENT_ARRAYS if gradient else TRAIN_ARRAYS)
    if gradient:
        _check_counts(metrics)
    task_ids = _echoed_ids(config, TASK_ROW_IDS, sent.task_ids)
    modality_ids = _echoed_ids(config, MODALITY_ROW_IDS, sent.modality_rows)
    shapes = {
        BACKBONE: (layout.backbone_size,),
        TASK_ROWS: (len(task_ids), layout.task_row_size),
        MODALITY_ROWS: (len(modality_ids), layout.modality_row_size),
    }
    tensors = {name: _decode(arrays, name, shape, sent.arrays.get(name)) for name, shape in shapes.items()}
    term = None
    if gradient:
        term = tuple(_decode(arrays, coded, shapes[name], None)
                     for coded, name in zip(MODALITY_TERM_ARRAYS, EXCHANGE_ARRAYS, strict=True))
    return TrainUpdate(
        sent.site,
        num_examples,
        tensors[BACKBONE],
        task_ids,
        tensors[TASK_ROWS],
        modality_ids,
        tensors[MODALITY_ROWS],
        metrics,
        term,
    )


def parse_evaluate_reply(msg: Message, site: str) -> EvalResult:
    """Check an evaluate reply (a ``metrics`` record with a positive ``num-examples``)."""
    if msg.has_error():
        raise ReplyRejected("error-reply", f"code {msg.error.code}: {msg.error.reason}")
    content = msg.content
    if METRICS_RECORD not in content:
        raise ReplyRejected("bad-records", f"missing record {METRICS_RECORD!r}; got {sorted(content.keys())}")
    metrics = _metrics(content[METRICS_RECORD])
    return EvalResult(site, _num_examples(metrics), metrics)


def _check_names(reason: str, what: str, got: set[str], expected: frozenset[str]) -> None:
    if got != expected:
        raise ReplyRejected(
            reason, f"{what}: missing {sorted(expected - got)}, unexpected {sorted(got - expected)}"
        )


def _metrics(record: object) -> dict[str, float]:
    if not isinstance(record, MetricRecord):
        raise ReplyRejected("bad-records", f"record {METRICS_RECORD!r} must be a MetricRecord")
    out: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, list | bool) or not math.isfinite(float(value)):
            raise ReplyRejected("bad-metrics", f"metric {key!r} must be a finite number, got {value!r}")
        out[key] = float(value)
    return out


def _check_counts(metrics: Mapping[str, float]) -> None:
    for key in (LOSS_TOKENS, KNOWN_MODALITY):
        value = metrics.get(key)
        if value is None or value < 0 or value != int(value):
            raise ReplyRejected("bad-metrics", f"a gradient reply needs {key!r} as a count >= 0, got {value!r}")


def _num_examples(metrics: Mapping[str, float]) -> float:
    value = metrics.get(NUM_EXAMPLES)
    if value is None or not value > 0:
        raise ReplyRejected("bad-num-examples", f"{NUM_EXAMPLES!r} must be > 0, got {value!r}")
    return value


def _echoed_ids(config: ConfigRecord, key: str, expected: tuple[int, ...]) -> tuple[int, ...]:
    got = config.get(key)
    ok = isinstance(got, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in got)
    if not ok or tuple(got) != tuple(expected):
        raise ReplyRejected("bad-row-ids", f"{key} must be the owned rows {list(expected)}, got {got!r}")
    return tuple(expected)


def _decode(arrays: ArrayRecord, name: str, shape: tuple[int, ...], sent: torch.Tensor | None) -> torch.Tensor:
    array = arrays[name]
    if str(array.dtype) not in WIRE_DTYPES:
        raise ReplyRejected("bad-dtype", f"{name}: dtype {array.dtype!r}, allowed {list(WIRE_DTYPES)}")
    if tuple(array.shape) != shape:
        raise ReplyRejected("bad-shape", f"{name}: shape {tuple(array.shape)}, expected {shape}")
    if array.stype not in (SType.NUMPY, XOR_ZSTD_STYPE):
        raise ReplyRejected("bad-codec", f"{name}: serialisation {array.stype!r}, allowed "
                                         f"{[SType.NUMPY, XOR_ZSTD_STYPE]}")
    coded = array.stype == XOR_ZSTD_STYPE
    if coded and (sent is None or WIRE_DTYPES[str(array.dtype)] != sent.dtype):
        raise ReplyRejected("bad-dtype", f"{name}: a coded {array.dtype} array must have the dtype it was "
                                         f"sent in ({None if sent is None else sent.dtype})")
    try:
        tensor = decode_delta(array.data, sent).float() if coded else from_wire(array.data)
    except Exception as exc:  # any decoding failure of untrusted bytes is a bad reply
        raise ReplyRejected("malformed", f"{name}: cannot decode ({exc})") from None
    if tuple(tensor.shape) != shape:
        raise ReplyRejected("malformed", f"{name}: data of shape {tuple(tensor.shape)} disagrees with its header")
    if not bool(torch.isfinite(tensor).all()):
        raise ReplyRejected("non-finite", f"{name}: contains NaN or inf")
    return tensor
