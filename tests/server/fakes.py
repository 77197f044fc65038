"""In-process stand-ins for the Flower runtime: a LocalGrid that calls fake sites directly, and the sites.

The fake sites follow the protocol (/server <-> client contract): they answer ``query`` with their
datasets and a plausible fingerprint of them (or the one they were given), record a refusal, and answer
``train`` with the received arrays plus a delta drawn from the round seed they were sent.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from hermes_model.catalog import Catalog, canonical_modality
from hermes_model.exchange import (
    ARRAYS_RECORD,
    BACKBONE,
    CONFIG_RECORD,
    METRICS_RECORD,
    MODALITY_ROW_IDS,
    MODALITY_ROWS,
    NUM_EXAMPLES,
    PROTOCOL_VERSION,
    SITE_RECORD,
    TASK_ROW_IDS,
    TASK_ROWS,
)
from hermes_model.fingerprint import DatasetFingerprint, fingerprints_to_json
from server.local_grid import LocalGrid

SMALL_CATALOG = {
    "datasets": {
        "alpha": {"modality": "CT", "task_ids": [0, 1], "classes": {1: "liver", 2: "tumour"}},
        "beta": {"modality": "MR-T2", "task_ids": [2], "classes": {1: "prostate"}},
    }
}


def small_catalog() -> Catalog:
    return Catalog.from_dict(SMALL_CATALOG)


def dataset_json(*entries: tuple[str, str, dict[int, str]]) -> str:
    return json.dumps(
        [
            {"name": n, "modality": m, "classes": {str(k): v for k, v in c.items()}, "num_train_cases": 3}
            for n, m, c in entries
        ]
    )


def fingerprint_of(name: str, modality: str, spacing: float = 1.5, **changes: object) -> DatasetFingerprint:
    """A fingerprint that fits the recipe's plan: 3 cases at ``spacing`` mm, CT in HU, PET in SUV."""
    modality = canonical_modality(modality)
    low = {"CT": -1000.0, "PET": 0.0}.get(modality, 0.0)
    fg = {"CT": 40.0, "PET": 8.0}.get(modality, 300.0)
    values = {
        "dataset": name, "modality": modality, "cases": 3, "spacing_xyz": (spacing,) * 3,
        "spacing_spread_xyz": (1.0,) * 3, "size_xyz": (100.0,) * 3, "size_std_xyz": (0.0,) * 3,
        "intensity": {"0.5": low, "50": 0.0, "99.5": 500.0},
        "foreground": {"0.5": fg / 2, "50": fg, "99.5": fg * 2},
        "foreground_mean": fg, "foreground_std": fg / 4,
    }
    values.update(changes)
    return DatasetFingerprint(**values)  # type: ignore[arg-type]


def fingerprint_json(datasets: str) -> str:
    """Plausible fingerprints of every dataset of a ``dataset_json``."""
    entries = json.loads(datasets)
    return fingerprints_to_json([fingerprint_of(e["name"], e["modality"]) for e in entries])


def train_content(
    backbone: np.ndarray,
    task_rows: np.ndarray,
    modality_rows: np.ndarray,
    task_ids: list[int],
    modality_ids: list[int],
    num_examples: float = 10,
    **metrics: float,
) -> RecordDict:
    """A protocol train reply's content."""
    return RecordDict(
        {
            ARRAYS_RECORD: ArrayRecord(
                {BACKBONE: Array(backbone), TASK_ROWS: Array(task_rows), MODALITY_ROWS: Array(modality_rows)}
            ),
            CONFIG_RECORD: ConfigRecord({TASK_ROW_IDS: list(task_ids), MODALITY_ROW_IDS: list(modality_ids)}),
            METRICS_RECORD: MetricRecord({NUM_EXAMPLES: num_examples, "loss": 1.0, **metrics}),
        }
    )


def received(msg: Message) -> dict[str, np.ndarray]:
    arrays = msg.content[ARRAYS_RECORD]
    return {k: arrays[k].numpy().astype(np.float32) for k in (BACKBONE, TASK_ROWS, MODALITY_ROWS)}


@dataclass
class FakeSite:
    """A site: its name, datasets json, samples per round and dice; ``reply`` may be replaced."""

    name: str
    datasets: str
    num_examples: float = 8
    dice: dict[str, float] = field(default_factory=dict)
    silent: bool = False  # never replies to train
    reply: Callable[[FakeSite, Message], Message | None] | None = None
    fingerprint: str | None = None  # None: fingerprint_json(datasets)
    refusals: list[str] = field(default_factory=list)
    protocol: int = PROTOCOL_VERSION
    leaves_when_refused: bool = False  # as hermes-client does: it stops its SuperNode
    left: bool = False

    def handle(self, msg: Message) -> Message | None:
        kind = msg.metadata.message_type
        if kind == MessageType.QUERY:
            config = msg.content[CONFIG_RECORD]
            if "refused" in config:
                self.refusals.append(str(config["refused"]))
                self.left = self.leaves_when_refused
                return Message(RecordDict({SITE_RECORD: ConfigRecord({"name": self.name})}), reply_to=msg)
            fingerprint = self.fingerprint if self.fingerprint is not None else fingerprint_json(self.datasets)
            answer = {"name": self.name, "datasets": self.datasets, "fingerprint": fingerprint,
                      "protocol": self.protocol}
            return Message(RecordDict({SITE_RECORD: ConfigRecord(answer)}), reply_to=msg)
        if self.reply is not None:
            return self.reply(self, msg)
        if kind == MessageType.TRAIN:
            return None if self.silent else self.train(msg)
        return self.evaluate(msg)

    def train(self, msg: Message) -> Message:
        """Received arrays + a delta drawn from the round seed (deterministic)."""
        config = msg.content[CONFIG_RECORD]
        arrays = received(msg)
        gen = torch.Generator().manual_seed(int(config["seed"]))
        out = {
            k: (v + 0.01 * torch.randn(v.shape, generator=gen).numpy()).astype(np.float32)
            for k, v in arrays.items()
        }
        content = train_content(
            out[BACKBONE],
            out[TASK_ROWS],
            out[MODALITY_ROWS],
            list(config[TASK_ROW_IDS]),
            list(config[MODALITY_ROW_IDS]),
            self.num_examples,
            dice=0.5,
        )
        return Message(content, reply_to=msg)

    def evaluate(self, msg: Message) -> Message:
        metrics = {NUM_EXAMPLES: self.num_examples, **self.dice}
        if self.dice:
            metrics["dice-mean"] = float(np.mean(list(self.dice.values())))
        return Message(RecordDict({METRICS_RECORD: MetricRecord(metrics)}), reply_to=msg)


class FakeGrid(LocalGrid):
    """A LocalGrid whose nodes are fake sites: a pushed message is handed, as it is, to the fake site of
    its node when its reply is pulled."""

    def __init__(self, sites: dict[int, FakeSite], crash_at_round: int | None = None) -> None:
        super().__init__(ClientApp(), {node: {} for node in sites}, serialize=False)
        self.sites = sites
        self.crash_at_round = crash_at_round
        self.sent: list[Message] = []

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids: list[str] = []
        for msg in messages:
            self.sent.append(msg)
            if self.crash_at_round is not None and msg.metadata.group_id == str(self.crash_at_round):
                raise RuntimeError(f"simulated server crash in round {self.crash_at_round}")
            ids += super().push_messages([msg])
        return ids

    def get_node_ids(self) -> Iterable[int]:
        return [node for node in super().get_node_ids() if not self.sites[node].left]

    def _deliver(self, msg: Message) -> Message | None:
        return self.sites[msg.metadata.dst_node_id].handle(msg)


def error_reply(msg: Message) -> Message:
    return Message(Error(code=0, reason="node unavailable"), reply_to=msg)
