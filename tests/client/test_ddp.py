"""Tests of local training (client/local_training.py): devices, batch sharding, and DDP on 2 CPU processes
(gloo) against single-process training on the same global batches."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from client.dataset import EpochSampler, PreprocessedDataset
from client.local_training import RankSampler, TrainData, resolve_devices, run_iterations, train_local
from client.site import Site
from hermes_model.engine import EngineConfig, TrainEngine
from tests.client.test_site import ENGINE, RUN, make_request, write_site


class TinyNet(nn.Module):
    """A small network with the Hermes forward signature and no batch statistics (instance norm), so that
    splitting a batch over processes changes nothing but the order of the sums."""

    def __init__(self, task_slots: int = 8, modality_slots: int = 6) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 4, 3, padding=1)
        self.head = nn.Conv3d(4, 1, 1)
        self.task_bias = nn.Embedding(task_slots, 1)
        self.modality = nn.Linear(4, modality_slots)

    def forward(self, x, task_ids, modality_ids):
        h = F.relu(F.instance_norm(self.conv(x)))
        seg = self.head(h) + self.task_bias(task_ids.clamp_min(0)).reshape(*task_ids.shape, 1, 1, 1)
        return seg, self.modality(h.mean(dim=(2, 3, 4)))


def tiny_net() -> TinyNet:
    """Picklable factory (the DDP processes import this module to rebuild the network)."""
    return TinyNet()


def write_dataset(root: Path, name: str = "blobs", cases: int = 4, shape=(24, 24, 24)) -> PreprocessedDataset:
    """A preprocessed dataset folder with two classes (values 1 and 2) in random blobs."""
    folder = root / name
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    ids = [f"c{i}" for i in range(cases)]
    for case in ids:
        label = np.zeros(shape, np.int8)
        z, y, x = (rng.integers(4, s - 10) for s in shape)
        label[z : z + 6, y : y + 6, x : x + 6] = 1
        label[z + 2 : z + 4, y + 2 : y + 4, x + 2 : x + 4] = 2
        image = (label.astype(np.float32) + rng.normal(0, 0.3, shape)).astype(np.float32)
        np.save(folder / f"{case}.npy", image)
        np.save(folder / f"{case}_gt.npy", label)
    meta = {"dataset": name, "modality": "CT", "modality_id": 0, "classes": {"1": "outer", "2": "inner"},
            "cases": ids, "labelled": {c: True for c in ids}, "splits": {"train": ids, "val": [], "test": []},
            "sample_weight": 1.0, "intensity_aug_prob": 0.5}
    (folder / "dataset.json").write_text(json.dumps(meta))
    return PreprocessedDataset.open(folder, task_ids=[3, 5])


def make_engine(optimizer: str) -> TrainEngine:
    torch.manual_seed(0)
    config = EngineConfig(optimizer=optimizer, lr=0.05, warmup_epochs=0, total_epochs=10, iters_per_epoch=2,
                          weight_decay=1e-3)
    engine = TrainEngine(tiny_net(), config, "cpu")
    engine.iteration = 3  # a position in the federation's schedule, as a round would set it
    return engine


# ------------------------------------------------------------------------------------------------ devices
def test_resolve_devices() -> None:
    assert resolve_devices("cpu") == [torch.device("cpu")]
    assert resolve_devices([0, 1], world_size=3) == [torch.device("cpu")] * 3
    if not torch.cuda.is_available():
        assert resolve_devices("auto") == [torch.device("cpu")]
        with pytest.raises(ValueError, match=r"GPUs \[0\] are not available"):
            resolve_devices([0])
    with pytest.raises(ValueError, match="world_size must be an int >= 1"):
        resolve_devices("cpu", world_size=0)
    with pytest.raises(ValueError, match="distinct GPU indices"):
        resolve_devices([1, 1])
    with pytest.raises(ValueError, match="devices must be one of"):
        resolve_devices("gpu")


# ------------------------------------------------------------------------------------------------ sharding
def test_rank_shares_make_up_the_global_batches_of_one_process() -> None:
    batch, world, n = 2, 3, 12
    single = list(EpochSampler(n))  # what make_loader draws in one process (one pass)
    ranks = [RankSampler(n, batch, r, world) for r in range(world)]
    shares = [list(s) for s in ranks]
    assert [len(s) for s in shares] == [n // world] * world == [len(s) for s in ranks]
    for step in range(n // (batch * world)):
        joined = [i for r in range(world) for i in shares[r][step * batch : (step + 1) * batch]]
        assert joined == single[step * batch * world : (step + 1) * batch * world]
    assert list(ranks[0])[:2] == [12, 13]  # the next pass draws new samples
    with pytest.raises(ValueError, match="multiple of batch_size x world_size"):
        RankSampler(10, batch, 0, world)
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        RankSampler(12, batch, 3, world)


# ------------------------------------------------------------------------------------------------ one process
def test_run_iterations_reports_aggregates_and_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = TrainData((write_dataset(tmp_path),), (16, 16, 16), batch_size=2, seed=1)
    engine = make_engine("sgd")
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="client.local_training"):
        result = train_local(engine, tiny_net, data, 4, [torch.device("cpu")], log_every=2)
    assert (result.iterations, result.samples, result.world_size) == (4, 8, 1)
    assert engine.iteration == 3 + 4
    assert all(math.isfinite(v) for v in (result.loss, result.bce, result.dice))
    assert 0.0 <= result.modality_acc <= 1.0 and result.seconds > 0
    assert result.metrics().keys() == {"loss", "bce", "dice", "modality-acc"}
    assert any(not torch.equal(before[k], v) for k, v in engine.model.state_dict().items())
    progress = [r.getMessage() for r in caplog.records if "iteration" in r.getMessage()]
    assert [m.split(" (")[0] for m in progress] == ["iteration 2/4", "iteration 4/4"]
    with pytest.raises(ValueError, match="ran out after 1 of 3"):
        run_iterations(make_engine("sgd"), list(data.loader(1)), 3)


def test_modality_accuracy_counts_known_modalities_only(tmp_path: Path) -> None:
    data = TrainData((write_dataset(tmp_path),), (16, 16, 16), batch_size=2, seed=0, augment=False)
    engine = make_engine("sgd")
    with torch.no_grad():  # make the modality head always answer 0 (= CT, the dataset's modality)
        engine.model.modality.weight.zero_()
        engine.model.modality.bias.copy_(torch.tensor([50.0, 0, 0, 0, 0, 0]))
    assert run_iterations(engine, data.loader(1), 1).modality_acc == 1.0
    batches = [{**b, "modality_ids": torch.full_like(b["modality_ids"], -1)} for b in data.loader(1)]
    assert math.isnan(run_iterations(engine, batches, 1).modality_acc)


# ------------------------------------------------------------------------------------------------ DDP
@pytest.mark.parametrize("optimizer", ["sgd", "lamb"])
def test_two_gloo_processes_equal_one_process_on_the_same_batches(tmp_path: Path, optimizer: str) -> None:
    dataset = write_dataset(tmp_path)
    iterations = 3
    single = make_engine(optimizer)
    one = train_local(single, tiny_net, TrainData((dataset,), (16, 16, 16), batch_size=4, seed=7),
                      iterations, resolve_devices("cpu"))
    parallel = make_engine(optimizer)
    start = {k: v.clone() for k, v in parallel.model.state_dict().items()}
    two = train_local(parallel, tiny_net, TrainData((dataset,), (16, 16, 16), batch_size=2, seed=7),
                      iterations, resolve_devices("cpu", world_size=2), scratch_dir=tmp_path / "scratch")
    assert (two.world_size, two.samples, two.iterations) == (2, one.samples, iterations) == (2, 12, 3)
    moved = 0.0
    for key, value in single.model.state_dict().items():
        torch.testing.assert_close(parallel.model.state_dict()[key], value, rtol=1e-4, atol=1e-5)
        moved = max(moved, float((value - start[key]).abs().max()))
    assert moved > 1e-3  # training changed the weights: the comparison is not trivial
    for key, value in single.ema.state_dict().items():
        torch.testing.assert_close(parallel.ema.state_dict()[key], value, rtol=1e-4, atol=1e-5)
    assert parallel.iteration == single.iteration == 3 + iterations
    assert parallel.optimizer.state_dict()["state"].keys() == single.optimizer.state_dict()["state"].keys()
    for name in ("loss", "bce", "dice"):
        assert getattr(two, name) == pytest.approx(getattr(one, name), rel=1e-4)
    assert not any((tmp_path / "scratch").iterdir())  # the exchange files are removed


def test_a_site_trains_hermes_r_on_two_processes_as_on_one(tmp_path: Path) -> None:
    """The real path end to end: Site.train with Hermes-R (base 8) on 2 gloo processes x 2 patches equals
    one process x 4 patches (SGD), and the reply counts the samples of both processes. One step: at
    initialisation with this learning rate Hermes-R amplifies float rounding differences (1e-7..3e-6 after one
    step) to ~0.5 % of the update after a second one."""
    sites = {
        "one": Site.from_path(write_site(tmp_path / "one", batch_size=4)),
        "two": Site.from_path(write_site(tmp_path / "two", batch_size=2), world_size=2),
    }
    assert [len(s.devices) for s in sites.values()] == [1, 2]
    engine = {**ENGINE, "optimizer": "sgd", "lr": 0.05}
    request = make_request(1, engine=engine, local_iterations=1)
    replies = {name: site.train(request) for name, site in sites.items()}
    assert replies["one"].metrics["num-examples"] == replies["two"].metrics["num-examples"] == 4
    assert (replies["two"].backbone - request.backbone).abs().max() > 1e-3  # it trained
    for name in ("backbone", "task_rows", "modality_rows"):
        torch.testing.assert_close(getattr(replies["two"], name), getattr(replies["one"], name),
                                   rtol=1e-4, atol=1e-5)
    assert replies["two"].metrics["loss"] == pytest.approx(replies["one"].metrics["loss"], rel=1e-4)
    saved = torch.load(sites["two"].engine_path(RUN), weights_only=True)
    assert saved["iteration"] == 1 and not list(sites["two"].state_dir(RUN).glob("ddp-*"))
