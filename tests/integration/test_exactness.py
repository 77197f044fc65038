"""Exactness of federated averaging (issue 4): with SGD, one local step per round and weights equal to the
batch shares, federated training of 3 sites equals centralized training on the union of their batches.

The real ServerApp loop (``server.runner.run_federation``) runs against the real site ClientApp
(``client.app.app``) through an in-process Grid; the three sites hold patients of the SAME sarcoma CT
dataset (so they own the same task and modality rows) with batch sizes 1, 2 and 1. Every batch a site
trained on is recorded by a spy around ``TrainEngine.train_step`` (it calls the real method), then the
centralized reference steps the same initial model once per round on the concatenation of the round's
batches with the same ``TrainEngine`` and schedule position.

Why the two must agree (up to float rounding):

- Loss convention: the Hermes loss is a mean over the batch's non-null task tokens (BCE and Dice per
  (sample, token), the modality cross-entropy per sample). One dataset with one class gives every sample
  exactly one token, so the loss of the union batch of B = b_1 + b_2 + b_3 samples is
  ``sum_i (b_i / B) * loss_i`` (loss_i the mean over site i's b_i samples), and so is its gradient.
- Aggregation: each site returns ``w - lr * g_i``; the server's weighted mean with weights
  ``num-examples`` = b_i (weighting "samples") is ``w - lr * sum_i (b_i / B) g_i`` = the centralized step.
  The task and modality rows are owned by all three sites, so they are averaged with the same weights.
- Optimiser state: SGD's momentum buffer (momentum 0.9, the engine default, kept on each site's disk
  between rounds) is linear in the gradients, and the weights b_i / B are the same every round, so the
  weighted mean of the sites' buffers is the centralized buffer at every round: the test covers the
  site's saved optimiser state too (a site losing it would be off by 0.9 x the round-1 step, ~2e-4).
  Weight decay is 0 so that rows nobody trains stay put in both runs (with decay the centralized run
  would shrink them while the federation leaves unsent rows alone).
- Schedule: the server sends ``schedule-iteration = (round - 1) * local-iterations``, the position the
  centralized engine is at; warmup is 0 so the first step has a non-zero learning rate.
- Hermes-R has no dropout or batch statistics (instance norm, layer norm), so a sample's gradient does
  not depend on the rest of its batch.

The sites reply with the opt-in ``xor-zstd`` reply codec, so the test also shows that it is lossless.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from flwr.app import Message

from client.app import app as client_app
from hermes_model import load_checkpoint
from hermes_model.engine import BATCH_KEYS, EngineConfig, TrainEngine
from hermes_model.exchange import (
    ARRAYS_RECORD,
    BACKBONE,
    METRICS_RECORD,
    NUM_EXAMPLES,
    XOR_ZSTD_STYPE,
    StateLayout,
    decode_delta,
    from_wire,
)
from server.checkpoint import RunStore
from server.config import ServerConfig
from server.local_grid import LocalGrid
from server.runner import initial_model, run_federation
from tests.integration.conftest import PLAN_SETTINGS, STS_CT, SiteData, write_site

ROUNDS, TOLERANCE = 2, 1e-5
# Float32 rounding is the only difference: a conv weight gradient computed on the batch of 4 differs from
# the weighted mean of the gradients of the batches 1, 2, 1 by up to ~5e-4 of its size (in float64 the two
# agree to 1e-15), and the next round's step amplifies such weight differences (at lr 0.05: 1.3e-5 after
# round 1, 7e-4 after round 2; one round from the same weights: 1.2e-5). Hence a small learning rate:
# measured at LR, 1.3e-7 after round 1 and 7e-7 after round 2, while every step moves the weights by
# 2.5e-4 and a uniform average of the same replies misses by 1.3e-4.
LR = 5e-4
# site name -> (patients, batch size): batch shares 1/4, 2/4, 1/4
SITES = {"site-a": (("STS_019",), 1), "site-b": (("STS_008", "STS_025"), 2), "site-c": (("STS_002",), 1)}
NODES = {"site-a": 21, "site-b": 22, "site-c": 23}


def _config(tmp_path: Path) -> ServerConfig:
    return ServerConfig(
        num_server_rounds=ROUNDS, min_sites=3, min_sites_per_round=3, start_timeout_s=5, query_timeout_s=60,
        round_timeout_s=600, poll_interval_s=0.01, local_iterations=1, evaluate_every=0,
        strategy="fedavg", server_optimizer="sgd", weighting="samples", wire_dtype="float32", reply_codec="xor-zstd",
        base_channels=8, task_slots=73, modality_slots=6, seed=5, keep_checkpoints=0,
        optimizer="sgd", lr=LR, weight_decay=0.0, warmup_epochs=0, total_epochs=10, iters_per_epoch=1,
        run_dir=str(tmp_path / "run"), **PLAN_SETTINGS,
    )


def _grid(tmp_path: Path, shared: Path) -> LocalGrid:
    configs = {}
    for name, (patients, batch) in SITES.items():
        data = SiteData("sts_ct", "CT", {1: "tumour"}, "ibsi_sts", STS_CT, patients)
        path = write_site(tmp_path / name, shared, name, data, batch_size=batch)
        configs[NODES[name]] = {"site-config": str(path)}
    return LocalGrid(client_app, configs, keep_history=True)


def _record_batches(monkeypatch: pytest.MonkeyPatch) -> dict[int, list[dict[str, torch.Tensor]]]:
    """Spy on ``TrainEngine.train_step``: schedule position -> copies of the batches trained there."""
    seen: dict[int, list[dict[str, torch.Tensor]]] = defaultdict(list)
    real_step = TrainEngine.train_step

    def step(engine: TrainEngine, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
        seen[engine.iteration].append({k: batch[k].clone() for k in BATCH_KEYS})
        return real_step(engine, batch)

    monkeypatch.setattr(TrainEngine, "train_step", step)
    return seen


def _union(batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([b[k] for b in batches]) for k in BATCH_KEYS}


def _replied_backbone(request: Message, reply: Message) -> torch.Tensor:
    """The backbone of a train reply coded (this run uses reply codec xor-zstd) against the request's."""
    coded = reply.content[ARRAYS_RECORD][BACKBONE]
    assert coded.stype == XOR_ZSTD_STYPE
    return decode_delta(coded.data, from_wire(request.content[ARRAYS_RECORD][BACKBONE].data))


def _max_diff(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_federated_sgd_equals_centralized_sgd_on_the_union(
    tmp_path: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config(tmp_path)
    grid = _grid(tmp_path, shared_data)
    with monkeypatch.context() as patch:
        batches = _record_batches(patch)
        result = run_federation(grid, config)
    assert grid.failures == [] and result.last_round == ROUNDS
    assert sorted(result.bank.sites) == sorted(SITES)
    owned = {s: (o.task_ids, o.modality_rows) for s, o in result.bank.sites.items()}
    assert len(set(owned.values())) == 1, owned  # same dataset and modality: the same rows
    sizes = {pos: [int(b["image"].shape[0]) for b in bs] for pos, bs in batches.items()}
    assert {pos: sorted(s) for pos, s in sizes.items()} == {0: [1, 1, 2], 1: [1, 1, 2]}
    assert all(int((b["task_ids"] >= 0).sum()) == b["task_ids"].shape[0] for bs in batches.values() for b in bs)

    # the centralized reference: same initial model, one step per round on the union batch
    store = RunStore(config.run_dir)
    federated = [load_checkpoint(store.round_files()[r]).model.state_dict() for r in range(1, ROUNDS + 1)]
    model = initial_model(config)
    engine = TrainEngine(model, EngineConfig.from_dict(config.engine_config()), "cpu")
    previous = {k: v.clone() for k, v in model.state_dict().items()}
    diffs: dict[str, float] = {}
    for server_round in range(1, ROUNDS + 1):
        assert engine.iteration == server_round - 1
        engine.train_step(_union(batches[server_round - 1]))
        diffs[f"round {server_round}"] = _max_diff(federated[server_round - 1], engine.model.state_dict())
        diffs[f"step {server_round}"] = _max_diff(engine.model.state_dict(), previous)
        previous = federated[server_round - 1]
    assert all(v < TOLERANCE for k, v in diffs.items() if not k.startswith("step")), diffs
    assert all(v > 10 * TOLERANCE for k, v in diffs.items() if k.startswith("step")), diffs  # not vacuous
    assert _max_diff(result.model.state_dict(), engine.model.state_dict()) < TOLERANCE

    # control: the last round's replies averaged uniformly (ignoring the batch shares) miss the reference
    layout = StateLayout.from_model(engine.model)
    trains = [x for x in grid.history if x.reply is not None and x.request.metadata.message_type == "train"]
    last = trains[-len(SITES):]
    assert sorted(x.reply.content[METRICS_RECORD][NUM_EXAMPLES] for x in last) == [1, 1, 2]
    uniform = torch.stack([_replied_backbone(x.request, x.reply) for x in last]).mean(0)
    control = float((uniform - layout.backbone(engine.model.state_dict())).abs().max())
    assert control > 10 * TOLERANCE, (control, diffs)
