"""The prior-bank report on a real run directory: 2 rounds of the server runner on the in-process fake
grid with 3 sites (train and evaluate every round)."""

from __future__ import annotations

import csv
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Message, MessageType
from flwr.supercore.task_identity import TaskIdentity
from matplotlib.image import imread

from hermes_model.exchange import METRICS_RECORD
from server.checkpoint import RunStore, load_round_checkpoint
from server.cli import main
from server.report import (
    cosine_similarity,
    dice_series,
    layer_banks,
    prior_similarity,
    prior_vectors,
    site_dice_series,
    train_loss_series,
    write_report,
)
from server.runner import run_federation
from tests.server.fakes import FakeGrid, FakeSite
from tests.server.test_runner import _config, _sites

BASE_LOSS = {"site-a": 1.2, "site-b": 0.9, "site-c": 1.5}  # the sites report BASE_LOSS / round
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SITES = ("site-a", "site-b", "site-c")


def _reply(site: FakeSite, msg: Message) -> Message:
    """The fake site's protocol reply, with a train loss that depends on the site and the round."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return site.evaluate(msg)
    out = site.train(msg)
    out.content[METRICS_RECORD]["loss"] = BASE_LOSS[site.name] / int(msg.metadata.group_id)
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("report")
    sites = _sites()
    for site in sites.values():
        site.reply = _reply
    cfg = _config(base, "run", num_server_rounds=2, sites_per_round=3, evaluate_every=1)
    with pytest.MonkeyPatch.context() as mp:  # what the conftest's task_identity does, module-wide
        mp.setattr(TaskIdentity, "_run_id", 1)
        mp.setattr(TaskIdentity, "_node_id", 0)
        mp.setattr(TaskIdentity, "_task_id", 1)
        run_federation(FakeGrid(sites), cfg)
    return Path(cfg.run_dir)


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR", f"{path.name} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    pixels = imread(path)  # decodes the whole image
    assert pixels.shape[:2] == (height, width)
    return width, height


def test_report_writes_readable_pngs_and_the_ownership_csv(run_dir):
    files = write_report(run_dir)
    out = run_dir / "report"
    assert files.out_dir == out and files.server_round == 2
    names = sorted(p.name for p in files.files)
    assert names == sorted(
        [
            "task_priors_cosine.png",
            "modality_priors_cosine.png",
            "ownership.csv",
            "train_loss.png",
            "dice.png",
        ]
    )
    for path in files.files:
        assert path.parent == out and path.is_file()
        if path.suffix == ".png":
            width, height = _png_size(path)
            assert 200 <= width <= 6000 and 200 <= height <= 6000, (path.name, width, height)


def test_cosine_matrix_matches_a_direct_computation(run_dir):
    ckpt = RunStore(run_dir).load_latest()
    task = prior_similarity(ckpt, "task")
    # trained rows: the task ids of alpha, beta and delta (delta registered by site-c at the query)
    keys = ["alpha/liver", "alpha/tumour", "beta/prostate", "delta/lesion"]
    assert task.rows == tuple(ckpt.catalog.task_id(k) for k in keys) == (0, 1, 2, 3)
    assert [label.split(" [")[0] for label in task.labels] == keys
    state = ckpt.model.state_dict()
    vectors = torch.cat([v[list(task.rows)] for k, v in state.items() if k.endswith(".task_prior")], dim=1)
    direct = torch.nn.functional.cosine_similarity(vectors[:, None], vectors[None, :], dim=-1).numpy()
    np.testing.assert_allclose(task.matrix, direct, atol=1e-5)
    np.testing.assert_allclose(task.matrix, task.matrix.T)
    np.testing.assert_allclose(np.diag(task.matrix), 1.0)
    assert np.abs(task.matrix[~np.eye(4, dtype=bool)]).max() < 0.99  # distinct rows, not a constant matrix

    modality = prior_similarity(ckpt, "modality")
    assert modality.rows == (0, 1, 3) and modality.labels == ("CT", "PET", "MR-T2")
    assert modality.matrix.shape == (3, 3)
    np.testing.assert_allclose(np.diag(modality.matrix), 1.0)

    every = prior_similarity(ckpt, "task", all_rows=True)
    assert every.rows == tuple(range(8)) and every.labels[7] == "(unassigned) [7]"
    first = layer_banks(ckpt, "task")[0]
    layer = prior_similarity(ckpt, "task", bank=first)
    rows = state[first][list(layer.rows)]
    expected = torch.nn.functional.cosine_similarity(rows[:, None], rows[None, :], dim=-1).numpy()
    np.testing.assert_allclose(layer.matrix, expected, atol=1e-5)
    assert prior_vectors(ckpt, "task", [0, 2]).shape == (2, sum(state[k].shape[1] for k in layer_banks(ckpt, "task")))


def test_cosine_similarity_of_known_vectors():
    sim = cosine_similarity(np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0], [0.0, 0.0]]))
    h = 1 / np.sqrt(2)
    np.testing.assert_allclose(sim[:3, :3], [[1, 0, h], [0, 1, h], [h, h, 1]], atol=1e-12)
    assert np.isnan(sim[3]).all() and np.isnan(sim[:, 3]).all()  # undefined for a zero vector
    with pytest.raises(ValueError, match="2-D"):
        cosine_similarity(np.zeros(3))


def test_ownership_csv_lists_the_sites_that_own_each_row(run_dir):
    files = write_report(run_dir, run_dir.parent / "own")
    with open(files.ownership_csv, newline="") as f:
        table = {(r["kind"], r["name"].split(" [")[0]): r for r in csv.DictReader(f)}
    owners = {key: set(r["owners"].split(";")) for key, r in table.items()}
    assert owners == {
        ("task", "alpha/liver"): {"site-a", "site-c"},
        ("task", "alpha/tumour"): {"site-a", "site-c"},
        ("task", "beta/prostate"): {"site-b"},
        ("task", "delta/lesion"): {"site-c"},
        ("modality", "CT"): {"site-a", "site-c"},
        ("modality", "PET"): {"site-c"},
        ("modality", "MR-T2"): {"site-b"},
    }
    # every site trains every round: last update in round 2, samples = the owners' samples (8, 16, 4)
    assert {r["last_round"] for r in table.values()} == {"2"}
    assert float(table["task", "alpha/liver"]["samples"]) == 12
    assert float(table["task", "beta/prostate"]["samples"]) == 16
    assert float(table["modality", "PET"]["samples"]) == 4


def test_curves_have_every_site_and_every_task(run_dir):
    lines = RunStore(run_dir).read_metrics()
    loss = train_loss_series(lines)
    assert set(loss) == set(SITES)
    for site in SITES:
        assert [r for r, _ in loss[site]] == [1, 2]
        assert [v for _, v in loss[site]] == pytest.approx([BASE_LOSS[site], BASE_LOSS[site] / 2])
    assert [r for r, _ in train_loss_series(lines, last_round=1)["site-b"]] == [1]
    dice = dice_series(lines)
    assert {k: [r for r, _ in v] for k, v in dice.items()} == {
        "alpha/liver": [1, 2],
        "beta/prostate": [1, 2],
        "delta/lesion": [1, 2],
    }
    assert [v for _, v in dice["alpha/liver"]] == pytest.approx([0.7, 0.7])
    assert [v for _, v in dice["delta/lesion"]] == pytest.approx([0.2, 0.2])
    assert set(site_dice_series(lines)) == set(SITES)


def test_cli_report_of_a_chosen_round_per_layer(run_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["report", str(run_dir), "--out", str(out), "--round", "1", "--per-layer", "--all-rows"]) == 0
    printed = capsys.readouterr().out
    assert "prior bank of round 1" in printed and "| task" in printed and "site-b" in printed
    ckpt = load_round_checkpoint(run_dir / "checkpoints" / "round_0001.pt")
    for kind in ("task", "modality"):
        for bank in layer_banks(ckpt, kind):
            path = out / f"{kind}_priors_cosine_{bank.rsplit('.', 1)[0]}.png"
            assert path.is_file() and str(path) in printed
    with open(out / "ownership.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 + 6  # every task slot and modality row
    assert {r["last_round"] for r in rows if r["owners"]} == {"1"}
    assert {r["owners"] for r in rows if r["kind"] == "task" and r["row"] in {"4", "5", "6", "7"}} == {""}


def test_no_metrics_still_gives_heatmaps(run_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir / "checkpoints", copy / "checkpoints")
    files = write_report(copy)
    assert files.curves == [] and len(files.heatmaps) == 2 and files.ownership_csv.is_file()


def test_run_dir_without_checkpoints_is_a_clear_error(run_dir, tmp_path, capsys):
    with pytest.raises(ValueError, match="has no round checkpoint"):
        write_report(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        write_report(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"--round 9: .*available rounds: \[1, 2\]"):
        write_report(run_dir, tmp_path / "x", server_round=9)
    assert main(["report", str(tmp_path)]) == 2
    assert "has no round checkpoint" in capsys.readouterr().err
    with pytest.raises(ValueError, match="kind must be one of"):
        prior_similarity(RunStore(run_dir).load_latest(), "organ")
