"""HermesStrategy with real Flower records as replies: payloads, averaging, validation, server optimisers,
EMA, evaluate."""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from client.wire import reply_array
from hermes_model.exchange import (
    ARRAYS_RECORD,
    BACKBONE,
    CONFIG_RECORD,
    METRICS_RECORD,
    MODALITY_ROWS,
    NUM_EXAMPLES,
    TASK_ROW_IDS,
    TASK_ROWS,
    XOR_ZSTD_STYPE,
    StateLayout,
)
from hermes_model.plans import Plans
from server.bank import PriorBank, parse_site_datasets
from server.checkpoint import RunStore, load_round_checkpoint
from server.outer import OuterSettings
from server.state import GlobalState
from server.strategy import HermesStrategy, StrategyOptions
from server.validation import DROP_REASONS
from tests.server.fakes import (
    FakeGrid,
    FakeSite,
    dataset_json,
    error_reply,
    received,
    small_catalog,
    train_content,
)

ALPHA = ("alpha", "CT", {1: "liver", 2: "tumour"})
BETA = ("beta", "MR-T2", {1: "prostate"})
SITES = {11: ("site-a", ALPHA), 12: ("site-b", BETA), 13: ("site-c", ALPHA)}  # node id -> site
COUNTS = {11: 10.0, 12: 30.0, 13: 60.0}


@pytest.fixture()
def setup(small_model):
    layout = StateLayout.from_model(small_model)
    catalog, bank = small_catalog(), PriorBank(layout.task_slots, layout.modality_slots)
    for name, ds in SITES.values():
        bank.register_site(name, parse_site_datasets(dataset_json(ds)), catalog)
    state = GlobalState.from_state_dict(layout, small_model.state_dict())
    grid = FakeGrid({n: FakeSite(name, dataset_json(ds)) for n, (name, ds) in SITES.items()})

    def make(**options) -> HermesStrategy:
        strategy = HermesStrategy(layout, bank, StrategyOptions(**options))
        strategy.nodes = {n: name for n, (name, _) in SITES.items()}
        return strategy

    return layout, bank, state, grid, make


def _messages(strategy: HermesStrategy, state: GlobalState, grid: FakeGrid, server_round: int = 1) -> dict:
    msgs = strategy.configure_train(server_round, state.to_record(), ConfigRecord(), grid)
    return {m.metadata.dst_node_id: m for m in msgs}


def _const_reply(msg: Message, backbone: float, rows: float, n: float, dtype=np.float32) -> Message:
    got = received(msg)
    config = msg.content[CONFIG_RECORD]
    content = train_content(
        np.full_like(got[BACKBONE], backbone, dtype=dtype),
        np.full_like(got[TASK_ROWS], rows, dtype=dtype),
        np.full_like(got[MODALITY_ROWS], rows, dtype=dtype),
        list(config[TASK_ROW_IDS]),
        list(config["modality_row_ids"]),
        n,
    )
    return Message(content, reply_to=msg)


def _replies(msgs: dict, values: dict[int, float], weights: dict[int, float] = COUNTS) -> list[Message]:
    return [_const_reply(msgs[n], v, v, weights[n]) for n, v in values.items()]


def test_configure_train_sends_each_site_only_its_rows(setup):
    layout, _, state, grid, make = setup
    strategy = make(local_iterations=5, seed=7, kind="fedprox", proximal_mu=0.01)
    msgs = _messages(strategy, state, grid, server_round=3)
    assert sorted(msgs) == [11, 12, 13]
    a, b = msgs[11].content, msgs[12].content
    assert a[CONFIG_RECORD][TASK_ROW_IDS] == [0, 1] and a[CONFIG_RECORD]["modality_row_ids"] == [0]
    assert b[CONFIG_RECORD][TASK_ROW_IDS] == [2] and b[CONFIG_RECORD]["modality_row_ids"] == [3]
    np.testing.assert_array_equal(a[ARRAYS_RECORD][TASK_ROWS].numpy(), state.task_rows[[0, 1]].numpy())
    np.testing.assert_array_equal(b[ARRAYS_RECORD][MODALITY_ROWS].numpy(), state.modality_rows[[3]].numpy())
    np.testing.assert_array_equal(a[ARRAYS_RECORD][BACKBONE].numpy(), state.backbone.numpy())
    cfg = a[CONFIG_RECORD]
    assert cfg["server-round"] == 3 and cfg["local-iterations"] == 5 and cfg["schedule-iteration"] == 10
    assert cfg["proximal-mu"] == pytest.approx(0.01) and cfg["wire-dtype"] == "float32"
    assert cfg["reply-codec"] == "none"  # the default: plain arrays
    assert json.loads(cfg["task-map"]) == {"alpha/liver": 0, "alpha/tumour": 1}
    assert cfg["seed"] == b[CONFIG_RECORD]["seed"] == 7  # the run seed: each site derives its own patches
    assert msgs[11].metadata.message_type == "train" and msgs[11].metadata.group_id == "3"
    assert len(a[ARRAYS_RECORD]) == 3  # few large arrays, never one per tensor


def test_sampling_is_a_function_of_seed_and_round(setup):
    _, _, state, grid, make = setup
    picks = [sorted(_messages(make(sites_per_round=2, seed=3), state, grid, r)) for r in range(1, 9)]
    again = [sorted(_messages(make(sites_per_round=2, seed=3), state, grid, r)) for r in range(1, 9)]
    assert picks == again and all(len(p) == 2 for p in picks)
    assert len({tuple(p) for p in picks}) > 1  # the sample changes with the round


def test_weighted_backbone_and_row_means_over_owners(setup):
    _, bank, state, grid, make = setup
    strategy = make()
    msgs = _messages(strategy, state, grid)
    arrays, metrics = strategy.aggregate_train(1, _replies(msgs, {11: 1.0, 12: 2.0, 13: 4.0}))
    new = GlobalState.from_record(arrays, strategy.layout)
    assert torch.allclose(new.backbone, torch.full_like(new.backbone, (10 * 1 + 30 * 2 + 60 * 4) / 100))
    alpha = (10 * 1 + 60 * 4) / 70
    assert torch.allclose(new.task_rows[[0, 1]], torch.full_like(new.task_rows[[0, 1]], alpha))
    assert torch.allclose(new.task_rows[2], torch.full_like(new.task_rows[2], 2.0))
    assert torch.equal(new.task_rows[3:], state.task_rows[3:])  # rows nobody owns keep their value
    assert torch.allclose(new.modality_rows[0], torch.full_like(new.modality_rows[0], alpha))
    assert torch.allclose(new.modality_rows[3], torch.full_like(new.modality_rows[3], 2.0))
    assert torch.equal(new.modality_rows[[1, 2, 4, 5]], state.modality_rows[[1, 2, 4, 5]])
    assert new.backbone.dtype == torch.float32
    assert metrics["valid-replies"] == 3 and metrics["dropped-replies"] == 0 and metrics[NUM_EXAMPLES] == 100
    assert bank.info("task", 0).last_round == 1 and bank.info("task", 0).samples == 70
    assert bank.info("modality", 3).samples == 30 and bank.info("task", 5) is None


def test_uniform_weighting(setup):
    _, _, state, grid, make = setup
    strategy = make(weighting="uniform")
    msgs = _messages(strategy, state, grid)
    new = GlobalState.from_record(
        strategy.aggregate_train(1, _replies(msgs, {11: 1.0, 12: 2.0, 13: 4.0}))[0], strategy.layout
    )
    assert torch.allclose(new.backbone, torch.full_like(new.backbone, 7 / 3))
    assert torch.allclose(new.task_rows[0], torch.full_like(new.task_rows[0], 2.5))


def test_rows_whose_owners_did_not_reply_keep_their_value(setup):
    _, bank, state, grid, make = setup
    strategy = make()
    msgs = _messages(strategy, state, grid)
    new = GlobalState.from_record(
        strategy.aggregate_train(1, _replies(msgs, {11: 1.0, 13: 4.0}))[0], strategy.layout
    )
    assert torch.equal(new.task_rows[2], state.task_rows[2])
    assert torch.equal(new.modality_rows[3], state.modality_rows[3])
    assert torch.allclose(new.backbone, torch.full_like(new.backbone, 250 / 70))
    assert bank.info("task", 2).last_round is None


def _mutate_arrays(**changes: Callable[[dict], None]):
    def mutate(content: RecordDict) -> RecordDict:
        arrays = {k: v.numpy() for k, v in content[ARRAYS_RECORD].items()}
        for fn in changes.values():
            fn(arrays)
        content[ARRAYS_RECORD] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
        return content

    return mutate


def _set_metric(key: str, value: float | None):
    def mutate(content: RecordDict) -> RecordDict:
        metrics = dict(content[METRICS_RECORD])
        metrics.pop(key, None)
        if value is not None:
            metrics[key] = value
        content[METRICS_RECORD] = MetricRecord(metrics)
        return content

    return mutate


def _poke(name: str, value: float):
    def fn(arrays: dict) -> None:
        arrays[name] = arrays[name].copy()
        arrays[name].reshape(-1)[0] = value

    return fn


def _drop_record(name: str):
    def mutate(content: RecordDict) -> RecordDict:
        return RecordDict({k: v for k, v in content.items() if k != name})

    return mutate


def _coded_backbone(**changes: Callable[[Array], object]):
    """Replace the backbone by a coded array (against zeros) whose fields ``changes`` alter; all these
    are caught before decoding, so the reference does not matter."""

    def mutate(content: RecordDict) -> RecordDict:
        arrays = dict(content[ARRAYS_RECORD].items())
        values = torch.from_numpy(arrays[BACKBONE].numpy())
        coded = reply_array(values, torch.zeros_like(values), "xor-zstd")
        fields = {"dtype": coded.dtype, "shape": tuple(coded.shape), "stype": coded.stype, "data": coded.data}
        arrays[BACKBONE] = Array(**{**fields, **{k: change(coded) for k, change in changes.items()}})
        return RecordDict({**dict(content.items()), ARRAYS_RECORD: ArrayRecord(arrays)})

    return mutate


INVALID = {
    "missing metrics record": (_drop_record(METRICS_RECORD), "bad-records"),
    "unexpected record": (
        lambda c: RecordDict({**dict(c.items()), "extra": ConfigRecord({"x": 1})}),
        "bad-records",
    ),
    "missing array": (_mutate_arrays(f=lambda a: a.pop(MODALITY_ROWS)), "bad-arrays"),
    "unexpected array": (_mutate_arrays(f=lambda a: a.update(extra=np.zeros(2, np.float32))), "bad-arrays"),
    "backbone size": (_mutate_arrays(f=lambda a: a.update(backbone=a[BACKBONE][:-1])), "bad-shape"),
    "row width": (_mutate_arrays(f=lambda a: a.update(task_rows=np.zeros((2, 5), np.float32))), "bad-shape"),
    "row count": (
        _mutate_arrays(f=lambda a: a.update(task_rows=np.concatenate([a[TASK_ROWS]] * 2))),
        "bad-shape",
    ),
    "float64": (_mutate_arrays(f=lambda a: a.update(backbone=a[BACKBONE].astype(np.float64))), "bad-dtype"),
    "int32": (_mutate_arrays(f=lambda a: a.update(task_rows=a[TASK_ROWS].astype(np.int32))), "bad-dtype"),
    "nan": (_mutate_arrays(f=_poke(BACKBONE, np.nan)), "non-finite"),
    "inf": (_mutate_arrays(f=_poke(MODALITY_ROWS, np.inf)), "non-finite"),
    "num-examples 0": (_set_metric(NUM_EXAMPLES, 0), "bad-num-examples"),
    "num-examples < 0": (_set_metric(NUM_EXAMPLES, -5.0), "bad-num-examples"),
    "num-examples missing": (_set_metric(NUM_EXAMPLES, None), "bad-num-examples"),
    "nan metric": (_set_metric("loss", float("nan")), "bad-metrics"),
    "rows not owned": (
        lambda c: RecordDict(
            {**dict(c.items()), CONFIG_RECORD: ConfigRecord({TASK_ROW_IDS: [0, 2], "modality_row_ids": [0]})}
        ),
        "bad-row-ids",
    ),
    "row ids missing": (
        lambda c: RecordDict({**dict(c.items()), CONFIG_RECORD: ConfigRecord({})}),
        "bad-row-ids",
    ),
    "coded, truncated": (_coded_backbone(data=lambda a: a.data[:-3]), "malformed"),
    "coded in another dtype": (_coded_backbone(dtype=lambda a: "float16"), "bad-dtype"),
    "unknown serialisation": (_coded_backbone(stype=lambda a: "pickle"), "bad-codec"),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_reply_is_dropped_and_counted(setup, case):
    _, _, state, grid, make = setup
    mutate, reason = INVALID[case]
    strategy = make()
    msgs = _messages(strategy, state, grid)
    good = _replies(msgs, {12: 2.0, 13: 4.0})
    bad = _const_reply(msgs[11], 100.0, 100.0, 10)
    bad = Message(mutate(bad.content), reply_to=msgs[11])
    arrays, metrics = strategy.aggregate_train(1, [bad, *good])
    assert (
        metrics["dropped-replies"] == 1
        and metrics[f"dropped/{reason}"] == 1
        and metrics["valid-replies"] == 2
    )
    new = GlobalState.from_record(arrays, strategy.layout)
    assert torch.allclose(new.backbone, torch.full_like(new.backbone, (30 * 2 + 60 * 4) / 90))
    dropped = [x for x in strategy.round_lines if x.get("status") == "dropped"]
    assert len(dropped) == 1 and dropped[0]["site"] == "site-a"
    assert dropped[0]["reason"] == reason and reason in DROP_REASONS


def test_error_reply_stranger_and_duplicate_are_dropped(setup):
    _, _, state, grid, make = setup
    strategy = make()
    msgs = _messages(strategy, state, grid)
    stranger_msg = Message(RecordDict(), dst_node_id=99, message_type="train")
    stranger = _const_reply(msgs[12], 5.0, 5.0, 10)
    stranger = Message(stranger.content, reply_to=stranger_msg)
    duplicate = _const_reply(msgs[13], 50.0, 50.0, 60)
    replies = [error_reply(msgs[11]), *_replies(msgs, {12: 2.0, 13: 4.0}), stranger, duplicate]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics["dropped/error-reply"] == 1 and metrics["dropped/unexpected-sender"] == 2
    new = GlobalState.from_record(arrays, strategy.layout)
    assert torch.allclose(new.backbone, torch.full_like(new.backbone, (30 * 2 + 60 * 4) / 90))


def test_round_without_valid_reply_keeps_the_model(setup):
    _, bank, state, grid, make = setup
    strategy = make(min_replies=2)
    msgs = _messages(strategy, state, grid)
    arrays, metrics = strategy.aggregate_train(1, [error_reply(m) for m in msgs.values()])
    assert arrays is None and metrics["skipped"] == 1 and metrics["dropped/error-reply"] == 3
    arrays, metrics = strategy.aggregate_train(1, _replies(msgs, {11: 1.0}))  # 1 valid < min_replies=2
    assert arrays is None and metrics["skipped"] == 1 and metrics["valid-replies"] == 1
    assert bank.info("task", 0).last_round is None
    assert strategy._current.equal(state)


def test_float16_wire_is_averaged_in_float32(setup):
    _, _, state, grid, make = setup
    strategy = make(wire_dtype="float16")
    msgs = _messages(strategy, state, grid)
    assert msgs[11].content[ARRAYS_RECORD][BACKBONE].dtype == "float16"
    replies = [
        _const_reply(msgs[n], v, v, COUNTS[n], np.float16) for n, v in {11: 1.0, 12: 2.0, 13: 4.0}.items()
    ]
    new = GlobalState.from_record(strategy.aggregate_train(1, replies)[0], strategy.layout)
    assert new.backbone.dtype == torch.float32
    assert torch.allclose(new.backbone, torch.full_like(new.backbone, 3.1))


def _coded(reply: Message, request: Message) -> Message:
    """``reply`` with its arrays coded against ``request``'s, as a site with reply-codec xor-zstd does."""
    sent = request.content[ARRAYS_RECORD]
    coded = {name: reply_array(torch.from_numpy(array.numpy()), torch.from_numpy(sent[name].numpy()), "xor-zstd")
             for name, array in reply.content[ARRAYS_RECORD].items()}
    content = RecordDict({**dict(reply.content.items()), ARRAYS_RECORD: ArrayRecord(coded)})
    return Message(content, reply_to=request)


@pytest.mark.parametrize("wire", ["float32", "float16"])
def test_coded_replies_give_the_same_model_as_plain_ones(setup, wire):
    _, _, state, grid, make = setup
    models = []
    for code in (False, True):
        strategy = make(wire_dtype=wire)
        msgs = _messages(strategy, state, grid)
        replies = _plus(msgs, 0.01, np.float16 if wire == "float16" else np.float32)
        if code:
            replies = [_coded(r, msgs[r.metadata.src_node_id]) for r in replies]
            assert replies[0].content[ARRAYS_RECORD][BACKBONE].stype == XOR_ZSTD_STYPE
        arrays, metrics = strategy.aggregate_train(1, replies)
        assert metrics["valid-replies"] == 3
        models.append(GlobalState.from_record(arrays, strategy.layout))
    assert models[0].equal(models[1]) and not models[0].equal(state)


def test_coded_non_finite_values_are_dropped(setup):
    _, _, state, grid, make = setup
    strategy = make()
    msgs = _messages(strategy, state, grid)
    replies = _plus(msgs, 0.01)
    poisoned = {k: v.numpy().copy() for k, v in replies[0].content[ARRAYS_RECORD].items()}
    poisoned[TASK_ROWS].reshape(-1)[0] = np.nan
    bad = Message(RecordDict({**dict(replies[0].content.items()),
                              ARRAYS_RECORD: ArrayRecord({k: Array(v) for k, v in poisoned.items()})}),
                  reply_to=msgs[11])
    _, metrics = strategy.aggregate_train(1, [_coded(bad, msgs[11]), *replies[1:]])
    assert metrics["dropped/non-finite"] == 1 and metrics["valid-replies"] == 2


def _plus(msgs: dict, delta: float, dtype=np.float32) -> list[Message]:
    out = []
    for n, msg in msgs.items():
        got = {k: (v + delta).astype(dtype) for k, v in received(msg).items()}
        cfg = msg.content[CONFIG_RECORD]
        out.append(
            Message(
                train_content(
                    got[BACKBONE],
                    got[TASK_ROWS],
                    got[MODALITY_ROWS],
                    list(cfg[TASK_ROW_IDS]),
                    list(cfg["modality_row_ids"]),
                    COUNTS[n],
                ),
                reply_to=msg,
            )
        )
    return out


def test_server_adam_moves_the_model_and_its_state_round_trips(setup, small_model, tmp_path):
    layout, bank, state, grid, make = setup
    outer = OuterSettings("adam", 0.1, betas=(0.9, 0.99), eps=1e-3)
    strategy = make(outer=outer)
    msgs = _messages(strategy, state, grid)
    only_a = {11: msgs[11]}
    new = GlobalState.from_record(strategy.aggregate_train(1, _plus(only_a, 0.5))[0], layout)
    step = 0.1 * 0.5 / (0.5 + 1e-3)  # bias-corrected Adam's first step: lr * g / (|g| + eps)
    assert torch.allclose(new.backbone - state.backbone, torch.full_like(state.backbone, step), atol=1e-5)
    assert torch.allclose(new.task_rows[[0, 1]] - state.task_rows[[0, 1]], torch.tensor(step), atol=1e-5)
    # rows nobody trained have a zero gradient: Adam's first step leaves them where they were
    assert torch.equal(new.task_rows[2:], state.task_rows[2:]) and torch.equal(
        new.modality_rows[1:], state.modality_rows[1:]
    )
    # the moments survive a round checkpoint: a restored strategy takes the same next step
    RunStore(tmp_path).save_round(
        1,
        small_model,
        catalog=small_catalog(),
        bank=bank,
        strategy_state=strategy.state_dict(),
        config={},
        seed=0,
        plans=Plans(),
        run_key="test-run",
    )
    restored = make(outer=outer)
    restored.load_state_dict(load_round_checkpoint(tmp_path / "checkpoints" / "round_0001.pt").strategy_state)
    outs = []
    for strat in (strategy, restored):
        msgs2 = _messages(strat, new, grid, server_round=2)
        outs.append(strat.aggregate_train(2, _plus(msgs2, -0.2))[0])
    first, second = (GlobalState.from_record(o, layout) for o in outs)
    assert first.equal(second) and not first.equal(new)
    with pytest.raises(ValueError, match="'adam'"):
        make().load_state_dict(strategy.state_dict())


def test_server_nesterov_carries_momentum_into_the_next_round(setup):
    layout, _, state, grid, make = setup
    strategy = make(outer=OuterSettings("nesterov", 0.5, momentum=0.9))
    one = GlobalState.from_record(strategy.aggregate_train(1, _plus(_messages(strategy, state, grid), 0.25))[0], layout)
    # Nesterov: buffer b = g, step lr * (g + momentum * b) with g = sent - mean = -0.25
    expected = state.backbone + 0.5 * 0.25 * 1.9
    torch.testing.assert_close(one.backbone, expected, rtol=0, atol=1e-6)
    # a round whose replies equal what was sent (zero gradient) still moves: the momentum
    two = GlobalState.from_record(strategy.aggregate_train(2, _plus(_messages(strategy, one, grid, 2), 0.0))[0], layout)
    torch.testing.assert_close(two.backbone, one.backbone + 0.5 * 0.9 * 0.9 * 0.25, rtol=0, atol=1e-6)


def test_server_sgd_at_lr_1_lands_on_the_weighted_mean_bit_for_bit(setup):
    layout, _, state, grid, make = setup
    strategy = make()
    assert strategy.options.outer == OuterSettings("sgd", 1.0)
    msgs = _messages(strategy, state, grid)
    replies, parts = [], []
    rng = np.random.default_rng(3)
    for node, msg in msgs.items():
        got = received(msg)
        backbone = (got[BACKBONE] + rng.normal(0, 1e-3, got[BACKBONE].shape)).astype(np.float32)
        parts.append((COUNTS[node], torch.from_numpy(backbone)))
        cfg = msg.content[CONFIG_RECORD]
        replies.append(Message(train_content(backbone, got[TASK_ROWS], got[MODALITY_ROWS], list(cfg[TASK_ROW_IDS]),
                                             list(cfg["modality_row_ids"]), COUNTS[node]), reply_to=msg))
    new = GlobalState.from_record(strategy.aggregate_train(1, replies)[0], layout)
    mean = torch.zeros_like(state.backbone)
    for weight, backbone in sorted(parts, key=lambda p: p[0]):  # replies are averaged in site-name order
        mean.add_(backbone, alpha=weight)
    mean.div_(sum(w for w, _ in parts))
    assert torch.equal(new.backbone, mean)


def test_server_ema_decays_by_the_product_of_the_rounds_step_alphas(setup):
    layout, _, state, grid, make = setup
    strategy = make(local_iterations=3, ema_decay=0.99)
    one = GlobalState.from_record(strategy.aggregate_train(1, _plus(_messages(strategy, state, grid), 1.0))[0], layout)
    assert strategy.ema.state is not None and strategy.ema.state.equal(one)  # step 0's alpha is 0: a copy
    two = GlobalState.from_record(strategy.aggregate_train(2, _plus(_messages(strategy, one, grid, 2), 1.0))[0], layout)
    keep = (1 - 1 / 4) * (1 - 1 / 5) * (1 - 1 / 6)  # steps 3, 4, 5 of round 2
    torch.testing.assert_close(strategy.ema.state.backbone, keep * one.backbone + (1 - keep) * two.backbone)
    # evaluation and the final model use the EMA; evaluate_ema=False the raw model
    evaluated = strategy.evaluation_arrays(two.to_record())
    assert GlobalState.from_record(evaluated, layout).equal(strategy.ema.state)
    raw = make(local_iterations=3, evaluate_ema=False)
    raw.ema.state = strategy.ema.state
    assert GlobalState.from_record(raw.evaluation_arrays(two.to_record()), layout).equal(two)


def test_evaluate_weighted_dice_per_task(setup):
    _, _, state, grid, make = setup
    grid.sites[11].dice, grid.sites[11].num_examples = {"dice/alpha/liver": 0.8}, 10
    grid.sites[13].dice, grid.sites[13].num_examples = {"dice/alpha/liver": 0.4}, 30
    grid.sites[12].dice, grid.sites[12].num_examples = {"dice/beta/prostate": 0.6}, 20
    strategy = make()
    msgs = list(strategy.configure_evaluate(1, state.to_record(), ConfigRecord(), grid))
    assert sorted(m.metadata.dst_node_id for m in msgs) == [11, 12, 13]
    assert all(m.metadata.message_type == "evaluate" for m in msgs)
    metrics = strategy.aggregate_evaluate(1, grid.send_and_receive(msgs))
    assert metrics["dice/alpha/liver"] == pytest.approx((10 * 0.8 + 30 * 0.4) / 40)
    assert metrics["dice/beta/prostate"] == pytest.approx(0.6)
    assert metrics[NUM_EXAMPLES] == 60 and metrics["valid-replies"] == 3
    bad = [error_reply(m) for m in msgs]
    assert strategy.aggregate_evaluate(1, bad) is None
    assert sum(1 for x in strategy.round_lines if x.get("reason") == "error-reply") == 3


def test_options_are_validated():
    with pytest.raises(ValueError, match="fedavg"):
        StrategyOptions(kind="fedsgd")
    with pytest.raises(ValueError, match="proximal-mu"):
        StrategyOptions(kind="fedprox", proximal_mu=0.0)
    with pytest.raises(ValueError, match="uniform"):
        StrategyOptions(weighting="cases")
    with pytest.raises(ValueError, match="reply-codec must be one of"):
        StrategyOptions(reply_codec="gzip")
    with pytest.raises(ValueError, match="strategy fedavg \\(got 'fedprox'\\)"):
        StrategyOptions(kind="fedprox", proximal_mu=0.1, local_update="gradient")
