"""Federated training that IS centralized training: each site returns the gradient of one batch as the
loss's sums (local-update ``gradient``), the server combines them into the gradient of the union batch and
steps the recipe's LAMB (server-optimizer ``lamb``) with its warm-up + poly schedule on the global step.

The real ServerApp loop (``server.runner.run_federation``) runs against the real site ClientApp through an
in-process Grid, as in ``test_exactness.py``. The three sites hold disjoint tasks and modalities (sarcoma
CT, MR-T1 and PET as three datasets, batch sizes 1, 2 and 1), so the union batch mixes task rows and
modality rows that only one site trains, and rows no site holds get a zero gradient on both sides (LAMB's
weight decay still moves them, in both runs). Every batch a site used is recorded by a spy around
``TrainEngine.loss_sum_gradients`` (it calls the real method); the reference steps the same initial model
once per round on the concatenation of the round's batches with ``TrainEngine.train_step``.

Both sides compute in float64: the sites' engines run at precision ``fp64`` and Hermes-R's decoder resizes
in float64 (the published model resizes in float32 even in a float64 run). In float32 a conv weight gradient
of the batch of 4 differs from the sum of those of the batches 1, 2, 1 by ~1e-3 of its size (oneDNN picks
other algorithms per batch size), and the float32 resize leaves a few biases whose true gradient is 0 with a
rounding-noise gradient that LAMB's normalised step turns into a step of lr x |p| in a random direction;
either way the two runs part by 1e-5 (weights) to 3 % (LAMB moments) after 5 steps. What remains in float64
is the float32 wire and the float32 global model between rounds (the reference rounds its weights to float32
after each step too): measured 3e-9 (backbone), 2e-10 / 1e-9 (task / modality rows), 1e-7 (LAMB moments),
6e-8 (EMA), relative norms, against steps that move every part by 3e-3.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch

from client.app import app as client_app
from client.site import Site
from hermes_model import hermes_r, load_checkpoint
from hermes_model.blocks import upsample_like
from hermes_model.engine import BATCH_KEYS, EngineConfig, TrainEngine
from hermes_model.exchange import StateLayout
from server.checkpoint import RunStore
from server.config import ServerConfig
from server.local_grid import LocalGrid
from server.runner import initial_model, run_federation
from server.state import GlobalState
from tests.integration.conftest import PLAN_SETTINGS, STS_CT, STS_MR_T1, SiteData, write_site

ROUNDS, TOLERANCE = 5, 1e-6
STS_PET = ("PET_image.nii.gz", "PET_mask.nii.gz")
# site name -> (dataset, modality, files, patients, batch size)
SITES = {
    "site-ct": ("sts_ct", "CT", STS_CT, ("STS_019",), 1),
    "site-mr": ("sts_mr", "MR-T1", STS_MR_T1, ("STS_008", "STS_025"), 2),
    "site-pet": ("sts_pet", "PET", STS_PET, ("STS_002",), 1),
}
NODES = {"site-ct": 31, "site-mr": 32, "site-pet": 33}


def _config(tmp_path: Path) -> ServerConfig:
    return ServerConfig(
        num_server_rounds=ROUNDS, min_sites=3, min_sites_per_round=3, start_timeout_s=5, query_timeout_s=60,
        round_timeout_s=600, poll_interval_s=0.01, local_iterations=1, local_update="gradient",
        server_optimizer="lamb", evaluate_every=0, base_channels=8, modality_slots=6, seed=3, keep_checkpoints=0,
        warmup_epochs=2, total_epochs=ROUNDS + 1, iters_per_epoch=1, run_dir=str(tmp_path / "run"),
        **PLAN_SETTINGS,
    )


def _grid(tmp_path: Path, shared: Path) -> LocalGrid:
    configs = {}
    for name, (dataset, modality, files, patients, batch) in SITES.items():
        data = SiteData(dataset, modality, {1: "tumour"}, "ibsi_sts", files, patients)
        path = write_site(tmp_path / name, shared, name, data, batch_size=batch)
        configs[NODES[name]] = {"site-config": str(path)}
    return LocalGrid(client_app, configs)


def _record_batches(monkeypatch: pytest.MonkeyPatch) -> dict[int, list[dict[str, torch.Tensor]]]:
    """Spy on ``TrainEngine.loss_sum_gradients``: schedule position -> copies of the batches used there."""
    seen: dict[int, list[dict[str, torch.Tensor]]] = defaultdict(list)
    real = TrainEngine.loss_sum_gradients

    def spy(engine: TrainEngine, batch: Mapping[str, torch.Tensor]):
        seen[engine.iteration].append({k: batch[k].clone() for k in BATCH_KEYS})
        return real(engine, batch)

    monkeypatch.setattr(TrainEngine, "loss_sum_gradients", spy)
    return seen


def _everything_in_float64(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sites' engines at precision fp64, and Hermes-R's decoder resizing in float64 too (module docstring)."""
    real = Site._engine_config
    monkeypatch.setattr(Site, "_engine_config", lambda site, request: dataclasses.replace(
        real(site, request), precision="fp64"))
    monkeypatch.setattr(hermes_r, "upsample_like", lambda x, ref, dtype=None: upsample_like(x, ref))


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _parts(layout: StateLayout, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return dict(zip(("backbone", "task rows", "modality rows"), GlobalState.from_state_dict(layout, state).tensors(),
                    strict=True))


def test_gradient_replies_with_server_lamb_equal_centralized_lamb(
    tmp_path: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config(tmp_path)
    batches = _record_batches(monkeypatch)
    _everything_in_float64(monkeypatch)
    result = run_federation(_grid(tmp_path, shared_data), config)
    assert result.last_round == ROUNDS
    owned = {s: (o.task_ids, o.modality_rows) for s, o in result.bank.sites.items()}
    assert len({t for t, _ in owned.values()}) == 3 and len({m for _, m in owned.values()}) == 3, owned
    assert {pos: sorted(int(b["image"].shape[0]) for b in bs) for pos, bs in batches.items()} == {
        pos: [1, 1, 2] for pos in range(ROUNDS)
    }

    model = initial_model(config, StateLayout.from_model(result.model).task_slots)
    layout = StateLayout.from_model(model)
    start = _parts(layout, model.state_dict())
    engine = TrainEngine(model, EngineConfig.from_dict({**config.engine_config(), "precision": "fp64"}), "cpu")
    for step in range(ROUNDS):
        engine.train_step({k: torch.cat([b[k] for b in batches[step]]) for k in BATCH_KEYS})
        with torch.no_grad():  # the global model is float32 between rounds
            for p in engine.model.parameters():
                p.copy_(p.float())
    federated = _parts(layout, load_checkpoint(RunStore(config.run_dir).latest_path()).model.state_dict())
    central = _parts(layout, engine.model.state_dict())
    diffs = {name: _relative(federated[name], central[name]) for name in central}
    moved = {name: _relative(start[name], central[name]) for name in central}
    outer = result.strategy.outer.optimizer.state_dict()["state"]
    inner = [engine.optimizer.state[p] for p in engine.model.parameters()]
    assert len(outer) == len(inner)
    for moment in ("exp_avg", "exp_avg_sq"):
        ours = torch.cat([outer[i][moment].flatten() for i in range(len(inner))])
        theirs = torch.cat([s[moment].flatten() for s in inner])
        diffs[f"LAMB {moment}"] = _relative(ours, theirs)
    ema = result.strategy.ema.state
    assert ema is not None
    central_ema = GlobalState.from_state_dict(layout, engine.ema.module.state_dict())
    diffs["EMA"] = max(_relative(a, b) for a, b in zip(ema.tensors(), central_ema.tensors(), strict=True))
    print(f"relative differences {diffs}; moved by {moved}")
    assert all(v < TOLERANCE for v in diffs.values()), diffs
    assert all(v > 100 * TOLERANCE for v in moved.values()), moved  # the comparison is not vacuous
