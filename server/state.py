"""The global model as the server keeps it: the backbone vector and the full task and modality row
matrices of ``hermes_model.exchange.StateLayout`` (float32), and its Flower ``ArrayRecord`` form."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import nn

from hermes_model.exchange import BACKBONE, EXCHANGE_ARRAYS, MODALITY_ROWS, TASK_ROWS, StateLayout


@dataclass
class GlobalState:
    """The whole model state in exchange form.

    Attributes:
        backbone: (backbone_size,) float32.
        task_rows: (task_slots, task_row_size) float32: row ``t`` is task id ``t``.
        modality_rows: (modality_slots, modality_row_size) float32.
    """

    backbone: torch.Tensor
    task_rows: torch.Tensor
    modality_rows: torch.Tensor

    @classmethod
    def from_state_dict(cls, layout: StateLayout, state: Mapping[str, torch.Tensor]) -> GlobalState:
        return cls(
            layout.backbone(state).clone(),
            layout.task_rows(state, range(layout.task_slots)).clone(),
            layout.modality_rows(state, range(layout.modality_slots)).clone(),
        )

    def load_into(self, layout: StateLayout, state: dict[str, torch.Tensor]) -> None:
        """Write this state into a model state dict in place (e.g. ``model.state_dict()``)."""
        layout.load_backbone(state, self.backbone)
        layout.load_task_rows(state, range(layout.task_slots), self.task_rows)
        layout.load_modality_rows(state, range(layout.modality_slots), self.modality_rows)

    def in_copy_of(self, layout: StateLayout, model: nn.Module) -> nn.Module:
        """A deep copy of ``model`` holding this state (``model`` itself is left as it is)."""
        out = copy.deepcopy(model)
        self.load_into(layout, out.state_dict())
        return out

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.backbone, self.task_rows, self.modality_rows

    def clone(self) -> GlobalState:
        return GlobalState(*(t.clone() for t in self.tensors()))

    def to_record(self) -> ArrayRecord:
        """ArrayRecord with three float32 arrays named ``backbone``, ``task_rows``, ``modality_rows``."""
        return ArrayRecord(
            {
                n: Array(t.detach().float().cpu().numpy())
                for n, t in zip(EXCHANGE_ARRAYS, self.tensors(), strict=True)
            }
        )

    @classmethod
    def from_record(cls, record: ArrayRecord, layout: StateLayout) -> GlobalState:
        """Inverse of :meth:`to_record`; checks names and shapes against ``layout``."""
        if sorted(record.keys()) != sorted(EXCHANGE_ARRAYS):
            raise ValueError(
                f"global ArrayRecord must hold {list(EXCHANGE_ARRAYS)}, got {sorted(record.keys())}"
            )
        expected = expected_global_shapes(layout)
        out = []
        for name in EXCHANGE_ARRAYS:
            arr = np.asarray(record[name].numpy(), dtype=np.float32)
            if tuple(arr.shape) != expected[name]:
                raise ValueError(f"global array {name!r} has shape {arr.shape}, expected {expected[name]}")
            out.append(torch.from_numpy(arr.copy()))
        return cls(*out)

    def equal(self, other: GlobalState) -> bool:
        return all(torch.equal(a, b) for a, b in zip(self.tensors(), other.tensors(), strict=True))


def expected_global_shapes(layout: StateLayout) -> dict[str, tuple[int, ...]]:
    return {
        BACKBONE: (layout.backbone_size,),
        TASK_ROWS: (layout.task_slots, layout.task_row_size),
        MODALITY_ROWS: (layout.modality_slots, layout.modality_row_size),
    }
