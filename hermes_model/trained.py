"""Which task rows of a model were trained, on how many samples and with which modalities (Flower-free).

Every checkpoint we write carries this table (key :data:`TRAINED_TASKS_KEY`) beside the plan (key
:data:`PLANS_KEY`), so ``hermes-predict`` segments by default only what the model learned: a task row
that no site trained still holds its random initial prior.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from hermes_model.catalog import canonical_modality, modality_id, modality_row

TRAINED_TASKS_KEY = "trained_tasks"
PLANS_KEY = "plans"


@dataclass(frozen=True)
class TrainedTask:
    """One trained task row.

    Attributes:
        task_id: global task id.
        samples: training samples (patches) drawn by the site(s) that trained it, over the model's history.
        modalities: canonical modality names of the scans it was trained on.
        last_round: the last round (federated) or epoch that updated it.
    """

    task_id: int
    samples: float
    modalities: tuple[str, ...]
    last_round: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "modalities": list(self.modalities), "last_round": self.last_round}


def trained_to_dict(tasks: Iterable[TrainedTask]) -> dict[str, dict[str, Any]]:
    """``{"<task id>": {"samples", "modalities", "last_round"}}`` (JSON keys are strings)."""
    return {str(t.task_id): t.to_dict() for t in sorted(tasks, key=lambda t: t.task_id)}


def trained_from_dict(raw: Mapping[str, Any]) -> dict[int, TrainedTask]:
    """Inverse of :func:`trained_to_dict`; ValueError when malformed."""
    try:
        out = {}
        for key, item in raw.items():
            task = int(key)
            mods = tuple(sorted({canonical_modality(m) for m in item.get("modalities", [])}))
            last = item.get("last_round")
            out[task] = TrainedTask(task, float(item["samples"]), mods, None if last is None else int(last))
        return out
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"malformed trained-task table: {exc!r}") from None


def merge_trained(tables: Iterable[Mapping[int, TrainedTask]]) -> dict[int, TrainedTask]:
    """Sum samples and unite modalities of the same task over several tables."""
    out: dict[int, TrainedTask] = {}
    for table in tables:
        for task, info in table.items():
            old = out.get(task)
            if old is None:
                out[task] = info
                continue
            rounds = [r for r in (old.last_round, info.last_round) if r is not None]
            out[task] = TrainedTask(task, old.samples + info.samples,
                                    tuple(sorted(set(old.modalities) | set(info.modalities))),
                                    max(rounds) if rounds else None)
    return out


def trained_modality_rows(tasks: Mapping[int, TrainedTask], modality_slots: int) -> frozenset[int]:
    """Rows of the modality prior bank that training used (the rows of the trained tasks' modalities)."""
    names = {m for t in tasks.values() for m in t.modalities}
    return frozenset(modality_row(modality_id(m), modality_slots) for m in names)
