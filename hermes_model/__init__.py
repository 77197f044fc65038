"""The Hermes network, losses, training engine, inference, metrics and task catalog (no Flower here)."""

from hermes_model.factory import (
    LoadedCheckpoint,
    available_models,
    build_model,
    load_checkpoint,
    model_checkpoint,
)
from hermes_model.losses import LossTerms, hermes_loss

__all__ = [
    "LoadedCheckpoint",
    "LossTerms",
    "available_models",
    "build_model",
    "hermes_loss",
    "load_checkpoint",
    "model_checkpoint",
]
