"""Model factory and checkpoint loading (timm style: build by name; foreign weights through a filter)."""

from __future__ import annotations

import inspect
import logging
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hermes_model.hermes_m import HermesM
from hermes_model.hermes_r import HermesR

log = logging.getLogger(__name__)

MODEL_REGISTRY: dict[str, Callable[..., nn.Module]] = {"hermes-r": HermesR, "hermes-m": HermesM}
CHECKPOINT_FORMAT = "hermes-fl/model-v1"


def available_models() -> list[str]:
    return sorted(MODEL_REGISTRY)


def model_arguments(name: str) -> frozenset[str]:
    """The constructor arguments a registered model takes (e.g. Hermes-M has no ``base_channels``)."""
    if name not in MODEL_REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {available_models()}")
    return frozenset(inspect.signature(MODEL_REGISTRY[name]).parameters)


def build_model(name: str = "hermes-r", **kwargs: Any) -> nn.Module:
    """Build a registered network by name, e.g. ``build_model("hermes-r", base_channels=32)``."""
    if name not in MODEL_REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {available_models()}")
    model = MODEL_REGISTRY[name](**kwargs)
    model.hermes_config = {"name": name, **kwargs}  # type: ignore[attr-defined]
    return model


@dataclass
class LoadedCheckpoint:
    model: nn.Module
    config: dict[str, Any]
    source: str  # "hermes-fl" or "published"
    used_ema: bool
    extra: dict[str, Any] = field(default_factory=dict)


RAW_STATE_KEY = "raw_state_dict"  # a model file of ours whose state_dict is the EMA keeps the raw weights here


def model_checkpoint(model: nn.Module, **extra: Any) -> dict[str, Any]:
    """A self-describing checkpoint: weights, constructor arguments and any extra (e.g. the catalog)."""
    config = getattr(model, "hermes_config", None)
    if config is None:
        raise ValueError("the model was not made by build_model(); its constructor arguments are unknown")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {"format": CHECKPOINT_FORMAT, "model_config": dict(config), "state_dict": state, **extra}


def load_checkpoint(
    path: str | os.PathLike, use_ema: bool = True, map_location: str | torch.device = "cpu"
) -> LoadedCheckpoint:
    """Load our checkpoint (see :func:`model_checkpoint`) or the published Hermes-R layout
    (``{"model_state_dict", "ema_model_state_dict", ...}``), with ``torch.load(weights_only=True)``.

    The EMA weights are used when the file has them and ``use_ema`` (the reference evaluates the EMA
    model): ours keep the raw weights beside the EMA under :data:`RAW_STATE_KEY`; for the published layout
    the architecture is inferred from the tensor shapes.
    """
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        # torch's own message ends with advice to load with weights_only=False, i.e. to execute whatever
        # code the file holds: never show it; a real checkpoint of ours or the published one loads safely
        raise ValueError(
            f"{path} is not a model checkpoint that can be loaded safely ({type(exc).__name__}): a Hermes "
            "checkpoint holds only tensors and plain values; this file is damaged or holds something else "
            "(loading it by other means could run code it contains)"
        ) from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: not a checkpoint (a dict was expected, got {type(ckpt).__name__})")
    if ckpt.get("format") == CHECKPOINT_FORMAT:
        config = dict(ckpt["model_config"])
        used_ema = use_ema or RAW_STATE_KEY not in ckpt
        state = ckpt["state_dict"] if used_ema else ckpt[RAW_STATE_KEY]
        used_ema = used_ema and ckpt.get("weights") == "ema"
        source = "hermes-fl"
        extra = {k: v for k, v in ckpt.items() if k not in ("format", "model_config", "state_dict", RAW_STATE_KEY)}
    elif "model_state_dict" in ckpt:
        used_ema = use_ema and "ema_model_state_dict" in ckpt
        state = _strip_prefix(ckpt["ema_model_state_dict" if used_ema else "model_state_dict"])
        config = infer_model_config(state)
        source, extra = "published", {}
    else:
        raise ValueError(
            f"{path}: unknown checkpoint layout; keys {sorted(ckpt)[:8]} (expected 'format' or 'model_state_dict')"
        )
    name = config.pop("name")
    model = build_model(name, **config)
    model.load_state_dict(state, strict=True)
    log.info("loaded %s checkpoint %s (%s, ema=%s)", source, path, name, used_ema)
    return LoadedCheckpoint(model, {"name": name, **config}, source, used_ema, extra)


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights saved from DDP or torch.compile carry ``module.`` / ``_orig_mod.`` prefixes."""
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def infer_model_config(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Model name and constructor arguments of a published Hermes-R or Hermes-M state dict."""
    if "map_fusion.in_proj.0.weight" in state:
        name, bank = "hermes-m", "down2.prior_selection"
    elif "prior_init_fuse_2.task_prior" in state:
        name, bank = "hermes-r", "prior_init_fuse_2"
    else:
        raise ValueError("not a Hermes-R or Hermes-M state dict (no prior banks where they belong)")
    config = {"name": name, "task_slots": state[f"{bank}.task_prior"].shape[0] - 1,
              "modality_slots": state[f"{bank}.modality_prior"].shape[0]}
    if name == "hermes-r":
        config["base_channels"] = state["inc.conv1.weight"].shape[0]
    return config
