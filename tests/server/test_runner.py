"""The run loop on an in-process fake grid: bounded start, skipped rounds, checkpoints, resume, the app."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from flwr.app import Context, Message, MessageType, RecordDict

from hermes_model import load_checkpoint
from server.app import app
from server.checkpoint import RunStore, load_round_checkpoint
from server.config import ServerConfig
from server.runner import SiteWaitTimeout, initial_catalog, initial_model, run_federation, send_and_collect
from server.state import GlobalState
from tests.server.fakes import FakeGrid, FakeSite, dataset_json, small_catalog

ALPHA = ("alpha", "CT", {1: "liver", 2: "tumour"})
BETA = ("beta", "MR-T2", {1: "prostate"})
DELTA = ("delta", "PET", {1: "lesion"})  # new to the catalog: registered at the first query


def _sites() -> dict[int, FakeSite]:
    return {
        11: FakeSite("site-a", dataset_json(ALPHA), 8, {"dice/alpha/liver": 0.7}),
        12: FakeSite("site-b", dataset_json(BETA), 16, {"dice/beta/prostate": 0.5}),
        13: FakeSite("site-c", dataset_json(ALPHA, DELTA), 4, {"dice/delta/lesion": 0.2}),
    }


def _config(tmp_path: Path, run_dir: str, **overrides) -> ServerConfig:
    catalog = tmp_path / "catalog.yaml"
    if not catalog.exists():
        small_catalog().save(catalog)
    values = dict(
        num_server_rounds=4,
        min_sites=3,
        sites_per_round=2,
        start_timeout_s=5,
        poll_interval_s=0.01,
        round_timeout_s=30,
        query_timeout_s=5,
        local_iterations=2,
        server_optimizer="adam",
        base_channels=8,
        task_slots=8,
        modality_slots=6,
        catalog=str(catalog),
        run_dir=str(tmp_path / run_dir),
        seed=11,
        keep_checkpoints=0,
        evaluate_every=2,
    )
    values.update(overrides)
    return ServerConfig(**values)


def _timeless(lines: list[dict]) -> list[dict]:
    return [{k: v for k, v in line.items() if k != "round-time-s"} for line in lines]


def test_resume_after_a_crash_equals_a_straight_run(tmp_path):
    straight = run_federation(FakeGrid(_sites()), _config(tmp_path, "straight"))
    with pytest.raises(RuntimeError, match="simulated server crash"):
        run_federation(FakeGrid(_sites(), crash_at_round=3), _config(tmp_path, "crashed"))
    store = RunStore(tmp_path / "crashed")
    assert store.latest_path().name == "round_0002.pt"
    resumed = run_federation(FakeGrid(_sites()), _config(tmp_path, "crashed", resume=True))

    assert resumed.last_round == straight.last_round == 4
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    initial = initial_model(_config(tmp_path, "x"))
    assert not all(torch.equal(a[k], v) for k, v in initial.state_dict().items())  # training moved it
    assert resumed.bank == straight.bank and resumed.catalog == straight.catalog
    outer_a, outer_b = straight.strategy.outer, resumed.strategy.outer
    assert outer_a.steps == outer_b.steps == 4
    state_a, state_b = outer_a.optimizer.state_dict()["state"], outer_b.optimizer.state_dict()["state"]
    assert state_a.keys() == state_b.keys() and len(state_a) == len(outer_a.params)
    assert all(torch.equal(state_a[i][m], state_b[i][m]) for i in state_a for m in ("exp_avg", "exp_avg_sq"))
    assert straight.strategy.ema.state.equal(resumed.strategy.ema.state)
    lines_a, lines_b = RunStore(tmp_path / "straight").read_metrics(), store.read_metrics()
    assert _timeless(lines_a) == _timeless(lines_b)
    # per-site lines carry site names (never node ids); aggregates of train and evaluate are there
    assert {x["site"] for x in lines_a if x["scope"] == "site"} == {"site-a", "site-b", "site-c"}
    evaluations = [(x["round"], x.get("weights")) for x in lines_a
                   if x["scope"] == "aggregate" and x["phase"] == "evaluate"]
    assert evaluations == [(2, None), (4, None), (4, "raw")]  # the EMA, and in the last round the raw weights too
    # the new dataset got a row, and the site owning it trained it
    delta_id = straight.catalog.task_id("delta/lesion")
    assert straight.bank.owners("task", delta_id) == {"site-c"}
    assert straight.bank.info("task", delta_id).last_round is not None


def test_round_checkpoint_is_a_model_checkpoint_and_old_ones_are_pruned(tmp_path):
    cfg = _config(
        tmp_path, "run", num_server_rounds=3, keep_checkpoints=1, strategy="fedavg", evaluate_every=0
    )
    result = run_federation(FakeGrid(_sites()), cfg)
    store = RunStore(cfg.run_dir)
    assert list(store.round_files()) == [3]
    assert (store.checkpoint_dir / "latest").read_text().strip() == "round_0003.pt"
    loaded = load_checkpoint(store.latest_path())
    assert loaded.source == "hermes-fl" and loaded.config["base_channels"] == 8
    state = result.model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in loaded.model.state_dict().items())
    ckpt = load_round_checkpoint(store.latest_path())
    assert ckpt.server_round == 3 and ckpt.bank == result.bank and "delta" in ckpt.catalog
    # one of our checkpoints as initial weights: same tensors, and the catalog inside it is used
    next_config = _config(tmp_path, "next", initial_weights=str(store.latest_path()), catalog="")
    model, catalog = initial_model(next_config), initial_catalog(next_config)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()) and "delta" in catalog
    with pytest.raises(ValueError, match="base-channels: checkpoint 8, config 16"):
        initial_model(_config(tmp_path, "next", initial_weights=str(store.latest_path()), base_channels=16))


def test_existing_run_dir_needs_resume(tmp_path):
    cfg = _config(tmp_path, "run", num_server_rounds=1, strategy="fedavg", evaluate_every=0)
    run_federation(FakeGrid(_sites()), cfg)
    with pytest.raises(ValueError, match="resume"):
        run_federation(FakeGrid(_sites()), cfg)
    with pytest.raises(ValueError, match="seed: checkpoint has 11, now 12"):
        run_federation(
            FakeGrid(_sites()),
            _config(tmp_path, "run", num_server_rounds=2, strategy="fedavg", resume=True, seed=12),
        )


class _SlowGrid(FakeGrid):
    """Node n's reply can be pulled ``delays[n]`` seconds after the push (None: never)."""

    def __init__(self, delays: dict[int, float | None]) -> None:
        super().__init__({node: FakeSite(f"site-{node}", "[]") for node in delays})
        self.delays, self.pulls = delays, 0

    def push_messages(self, messages):
        self.pushed_at = time.monotonic()
        return super().push_messages(messages)

    def pull_messages(self, message_ids):
        self.pulls += 1
        waited = time.monotonic() - self.pushed_at
        ready = [m for m in message_ids if self.delays[self._pending[m].metadata.dst_node_id] is not None
                 and waited >= self.delays[self._pending[m].metadata.dst_node_id]]
        return [Message(RecordDict(), reply_to=self._pending.pop(m)) for m in ready]


def _messages(*nodes: int) -> list[Message]:
    return [Message(RecordDict(), dst_node_id=n, message_type=MessageType.TRAIN, ttl=60.0) for n in nodes]


def test_replies_are_collected_as_they_arrive_not_on_flowers_3_s_cadence():
    grid, messages = _SlowGrid({21: 0.0, 22: 0.3}), _messages(22, 21)
    t0 = time.monotonic()
    replies = send_and_collect(grid, messages, timeout_s=30, poll_s=0.05)
    elapsed = time.monotonic() - t0
    # in the order they arrived
    assert [r.metadata.reply_to_message_id for r in replies] == [m.metadata.message_id for m in messages[::-1]]
    assert 0.3 <= elapsed < 1.5 and grid.pulls >= 3


def test_collecting_replies_stops_at_the_timeout_with_those_that_came():
    grid, messages = _SlowGrid({21: 0.0, 22: None}), _messages(21, 22)
    t0 = time.monotonic()
    replies = send_and_collect(grid, messages, timeout_s=0.4, poll_s=0.05)
    assert 0.4 <= time.monotonic() - t0 < 1.5
    assert [r.metadata.reply_to_message_id for r in replies] == [messages[0].metadata.message_id]


def test_start_timeout_is_a_clear_error_not_a_hang(tmp_path):
    sites = _sites()
    cfg = _config(tmp_path, "run", min_sites=4, start_timeout_s=0.3)
    t0 = time.monotonic()
    with pytest.raises(SiteWaitTimeout, match="only 3 of min-sites=4"):
        run_federation(FakeGrid(sites), cfg)
    assert time.monotonic() - t0 < 5


def test_rounds_with_too_few_replies_keep_the_model(tmp_path):
    sites = _sites()
    sites[12].silent = sites[13].silent = True  # they never answer train
    cfg = _config(
        tmp_path,
        "run",
        round_timeout_s=0.5,
        num_server_rounds=2,
        sites_per_round=0,
        min_sites_per_round=2,
        strategy="fedavg",
        evaluate_every=0,
    )
    result = run_federation(FakeGrid(sites), cfg)
    initial = initial_model(cfg)
    state = result.model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in initial.state_dict().items())
    aggregates = [x for x in RunStore(cfg.run_dir).read_metrics() if x["scope"] == "aggregate"]
    assert [x["skipped"] for x in aggregates] == [1, 1] and [x["valid-replies"] for x in aggregates] == [1, 1]
    assert list(RunStore(cfg.run_dir).round_files()) == [1, 2]


def test_server_app_runs_from_the_run_config(tmp_path):
    cfg = _config(
        tmp_path, "app", num_server_rounds=1, strategy="fedprox", proximal_mu=0.05, evaluate_every=1
    )
    grid = FakeGrid(_sites())
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=cfg.to_run_config())
    app(grid, context)
    assert list(RunStore(cfg.run_dir).round_files()) == [1]
    sent = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert len(sent) == 2 and all(m.content["config"]["proximal-mu"] == pytest.approx(0.05) for m in sent)
    assert json.loads(sent[0].content["config"]["model"])["base_channels"] == 8
    queries = [m for m in grid.sent if m.metadata.message_type == "query"]
    assert len(queries) == 3 and "alpha" in json.loads(queries[0].content["config"]["catalog"])["datasets"]


def test_initial_weights_from_the_published_layout_use_the_ema_weights(tmp_path):
    model = initial_model(_config(tmp_path, "x", seed=1))
    ema = initial_model(_config(tmp_path, "x", seed=2))
    path = tmp_path / "hermes_r_published.pth"
    torch.save(
        {"model_state_dict": model.state_dict(), "ema_model_state_dict": ema.state_dict(), "epoch": 3}, path
    )
    published = _config(tmp_path, "x", initial_weights=str(path))
    loaded, catalog = initial_model(published), initial_catalog(published)
    assert all(torch.equal(v, ema.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert "alpha" in catalog  # the configured catalog (the published file carries none)
    with pytest.raises(ValueError, match="does not exist"):
        initial_model(_config(tmp_path, "x", initial_weights=str(tmp_path / "missing.pt")))


def test_final_model_holds_the_ema_and_the_raw_weights(tmp_path):
    cfg = _config(tmp_path, "run", num_server_rounds=3, evaluate_every=0, server_optimizer="sgd")
    result = run_federation(FakeGrid(_sites()), cfg)
    ema = result.strategy.ema.state
    layout = result.strategy.layout
    assert ema is not None and not ema.equal(GlobalState.from_state_dict(layout, result.model.state_dict()))
    handed = load_checkpoint(result.final_model)
    assert handed.used_ema and handed.extra["weights"] == "ema" and "raw_state_dict" not in handed.extra
    assert GlobalState.from_state_dict(layout, handed.model.state_dict()).equal(ema)
    raw = load_checkpoint(result.final_model, use_ema=False)
    assert not raw.used_ema
    assert all(torch.equal(v, raw.model.state_dict()[k]) for k, v in result.model.state_dict().items())
