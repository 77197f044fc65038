"""Tests of the Flower-free site (client/site.py) on a tiny real site: three sarcoma CT cases copied from
``shared/data/ibsi_sts`` beside the repository (skipped when absent), Hermes-R at base 8, 32^3 patches."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from client.evaluate import evaluate
from client.predict import predict
from client.site import ProtocolError, RoundRequest, Site
from hermes_model import build_model, model_checkpoint
from hermes_model.catalog import Catalog
from hermes_model.exchange import StateLayout
from hermes_model.fileio import atomic_torch_save
from hermes_model.plans import Plans
from hermes_model.trained import PLANS_KEY

IBSI_STS = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "ibsi_sts"
CASES = ("STS_002", "STS_003", "STS_006")
VAL_CASE = "STS_003"
DATASET, CLASS_KEY = "sts_ct", "sts_ct/tumour"
TASK_ID = 5
MODEL = {"name": "hermes-r", "base_channels": 8, "task_slots": 8, "modality_slots": 6}
ENGINE = {"optimizer": "lamb", "lr": 2e-3, "warmup_epochs": 0, "total_epochs": 10, "iters_per_epoch": 2}
ITERATIONS, BATCH = 2, 2
PLANS = Plans(target_spacing=(4.0, 4.0, 4.0), patch_size=(32, 32, 32), train_margin=2, interpolation="linear")
RUN = "run-a"


def write_site(root: Path, **training: Any) -> Path:
    """A site in ``root`` with copies of three sarcoma CT cases (one for validation); its yaml's path."""
    if not IBSI_STS.is_dir():
        pytest.skip(f"sarcoma data not found at {IBSI_STS} (the 'shared' folder beside the repo)")
    lines = ["case,image,label"]
    for case in CASES:
        folder = root / "raw" / case
        folder.mkdir(parents=True)
        for name in ("CT_image.nii.gz", "CT_mask.nii.gz"):
            shutil.copy(IBSI_STS / case / name, folder / name)
        lines.append(f"{case},raw/{case}/CT_image.nii.gz,raw/{case}/CT_mask.nii.gz")
    (root / "cases.csv").write_text("\n".join(lines) + "\n")
    body = {
        "site": "sarcoma-test", "work_dir": "work",
        "datasets": [{"name": DATASET, "modality": "CT", "format": "csv", "source": "cases.csv",
                      "classes": {1: "tumour"}, "split": {"val": [VAL_CASE], "test": []}}],
        "training": {"devices": "cpu", "batch_size": BATCH, "local_iterations": ITERATIONS,
                     "num_workers": 0, "bf16": False, **training},
    }
    path = root / "site.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def global_weights(seed: int = 0) -> tuple[StateLayout, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    model = build_model(MODEL["name"], **{k: v for k, v in MODEL.items() if k != "name"})
    return StateLayout.from_model(model), model.state_dict()


def make_request(server_round: int = 1, seed: int = 0, **overrides: Any) -> RoundRequest:
    """A request as the server sends it: backbone and the site's rows of a fresh model (``seed``)."""
    layout, state = global_weights(seed)
    values: dict[str, Any] = dict(
        server_round=server_round,
        backbone=layout.backbone(state),
        task_rows=layout.task_rows(state, [TASK_ID]),
        modality_rows=layout.modality_rows(state, [0]),
        task_row_ids=(TASK_ID,),
        modality_row_ids=(0,),
        model=dict(MODEL),
        task_map={CLASS_KEY: TASK_ID, "other/class": 1},
        engine=dict(ENGINE),
        local_iterations=ITERATIONS,
        schedule_iteration=(server_round - 1) * ITERATIONS,
        seed=0,
        plans=PLANS,
        run_key=RUN,
    )
    values.update(overrides)
    return RoundRequest(**values)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    return Site.from_path(write_site(tmp_path_factory.mktemp("site")))


# ------------------------------------------------------------------------------------------------ data
def test_describe_then_preprocess_on_first_use(tmp_path: Path) -> None:
    site = Site.from_path(write_site(tmp_path))
    assert not site.config.preprocessed_dir.exists()
    summary = [s.to_dict() for s in site.describe()]  # from the config's split: no preprocessing needed
    assert summary == [{"name": DATASET, "modality": "CT", "classes": {"1": "tumour"}, "num_train_cases": 2}]
    assert not site.config.preprocessed_dir.exists()
    assert site.ensure_preprocessed(PLANS) is True
    assert (site.config.preprocessed_dir / DATASET / "dataset.json").is_file()
    assert site.ensure_preprocessed(PLANS) is False
    assert json.loads((site.config.work_dir / "plans.json").read_text()) == PLANS.to_dict()
    # another plan (here a wider training crop) re-preprocesses the cases it changes
    assert site.ensure_preprocessed(Plans(target_spacing=4.0, patch_size=32, train_margin=3)) is True
    assert [s.to_dict() for s in site.describe()] == summary
    assert site.task_ids({CLASS_KEY: 7}) == {DATASET: (7,)}
    with pytest.raises(ProtocolError, match="task-map has no task id for \\['sts_ct/tumour'\\]"):
        site.task_ids({"sts_ct/liver": 1})


def test_request_validation() -> None:
    with pytest.raises(ProtocolError, match="wire-dtype must be one of"):
        make_request(wire_dtype="bfloat16")
    with pytest.raises(ProtocolError, match="local-iterations must be an int >= 1"):
        make_request(local_iterations=0)
    with pytest.raises(ProtocolError, match="proximal-mu must be a finite number >= 0"):
        make_request(proximal_mu=-1.0)
    with pytest.raises(ProtocolError, match="engine has keys \\['precision'\\]"):
        make_request(engine={"precision": "bf16"})


# ------------------------------------------------------------------------------------------------ train
def test_two_training_rounds(site: Site) -> None:
    request = make_request(1)
    layout, _ = global_weights()
    reply = site.train(request)
    assert reply.backbone.shape == (layout.backbone_size,) and reply.backbone.dtype == torch.float32
    assert reply.task_rows.shape == (1, layout.task_row_size)
    assert reply.modality_rows.shape == (1, layout.modality_row_size)
    assert (reply.task_row_ids, reply.modality_row_ids) == ((TASK_ID,), (0,))
    assert set(reply.metrics) == {"num-examples", "loss", "bce", "dice", "modality-acc", "train-time-s"}
    assert reply.metrics["num-examples"] == ITERATIONS * BATCH
    assert all(math.isfinite(v) for v in reply.metrics.values())
    assert not torch.equal(reply.backbone, request.backbone)  # it trained
    saved = torch.load(site.engine_path(RUN), weights_only=True)
    assert saved["iteration"] == ITERATIONS and saved["proximal_reference"] is None
    assert saved["optimizer"]["param_groups"][0]["step"] == ITERATIONS
    assert torch.equal(layout.backbone(saved["model"]), reply.backbone)

    # round 2: other global weights, 16-bit wire, FedProx; the saved optimiser moments carry on
    second = make_request(2, seed=1, wire_dtype="float16", proximal_mu=0.1)
    reply2 = site.train(second)
    assert reply2.backbone.dtype == reply2.task_rows.dtype == reply2.modality_rows.dtype == torch.float16
    saved = torch.load(site.engine_path(RUN), weights_only=True)
    assert saved["iteration"] == 2 * ITERATIONS
    assert saved["optimizer"]["param_groups"][0]["step"] == 2 * ITERATIONS
    reference = saved["proximal_reference"]  # the received weights
    assert torch.equal(layout.backbone({**saved["model"], **reference}), second.backbone)
    assert torch.equal(layout.task_rows({**saved["model"], **reference}, [TASK_ID]), second.task_rows)
    drift = (reply2.backbone.float() - second.backbone).abs().max()
    assert 0 < drift < (reply.backbone - second.backbone).abs().max()  # trained from the received weights
    history = [json.loads(line) for line in (site.state_dir(RUN) / "history.jsonl").read_text().splitlines()]
    assert [(h["kind"], h["round"]) for h in history][-2:] == [("train", 1), ("train", 2)]

    # round 3 with keep-local-state false: fresh optimiser moments (the saved state is overwritten)
    site.train(make_request(3, keep_local_state=False))
    assert torch.load(site.engine_path(RUN), weights_only=True)["optimizer"]["param_groups"][0]["step"] == ITERATIONS

    # another run with the same site config starts clean: no optimiser moments, its own history
    site.train(make_request(1, run_key="run-b"))
    fresh = torch.load(site.engine_path("run-b"), weights_only=True)
    assert fresh["optimizer"]["param_groups"][0]["step"] == ITERATIONS
    other = [json.loads(line) for line in (site.state_dir("run-b") / "history.jsonl").read_text().splitlines()]
    assert [(h["kind"], h["round"]) for h in other] == [("train", 1)]
    assert torch.load(site.engine_path(RUN), weights_only=True)["iteration"] == 3 * ITERATIONS  # untouched


def test_a_gradient_round_returns_the_loss_sums_and_trains_nothing(site: Site, monkeypatch) -> None:
    restored = []  # a gradient round takes no step: it must not load optimiser state
    monkeypatch.setattr(Site, "_restore_local_state", lambda self, engine, key: restored.append(key) or False)
    request = make_request(1, local_iterations=1, local_update="gradient", run_key="gradient-run")
    reply = site.train(request)
    assert restored == []
    layout, _ = global_weights()
    assert reply.modality_term is not None and reply.backbone.shape == (layout.backbone_size,)
    assert [t.shape for t in reply.modality_term] == [reply.backbone.shape, reply.task_rows.shape,
                                                      reply.modality_rows.shape]
    assert reply.metrics["num-examples"] == BATCH
    assert reply.metrics["loss-tokens"] == BATCH and reply.metrics["known-modality"] == BATCH  # CT: known
    assert float(reply.backbone.abs().max()) > 0 and float(reply.modality_term[0].abs().max()) > 0
    assert not site.engine_path("gradient-run").exists()  # nothing trained, nothing saved


def test_a_round_is_a_function_of_the_request_not_of_the_process(site: Site, monkeypatch) -> None:
    """Bitwise the same reply to the same request whatever torch's global random state (a new process seeds
    it at random; the model of the round draws the prior rows the server does not send from it) and whatever
    CPU threads a site that ran before in the same process set (a Ray actor runs one site after another)."""
    monkeypatch.setattr(Site, "_process_threads", None)
    default = torch.get_num_threads()
    requests = [make_request(1, run_key=key) for key in ("same-a", "same-threads", "same-b")]  # (seeds torch)
    torch.manual_seed(1)
    first = site.train(requests[0])
    threaded = Site(site.config.model_copy(update={
        "training": site.config.training.model_copy(update={"threads": default + 1})}), site.catalog)
    threaded.train(requests[1])
    assert torch.get_num_threads() == default + 1  # training.threads
    torch.manual_seed(2)
    again = site.train(requests[2])
    assert torch.get_num_threads() == default  # back to this process's own count
    for name in ("backbone", "task_rows", "modality_rows"):
        assert torch.equal(getattr(first, name), getattr(again, name)), name
    # the next round of the same run draws other patches: the reply is not a constant
    later = site.train(make_request(2, run_key="same-b"))
    assert not torch.equal(later.backbone, again.backbone)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_site_reports_its_peak_gpu_memory(tmp_path: Path) -> None:
    site = Site.from_path(write_site(tmp_path, devices=[0]))
    reply = site.train(make_request(1))
    assert reply.metrics["gpu-peak-mib"] > 0
    assert site.train(make_request(2, seed=1)).metrics["gpu-peak-mib"] > 0  # reset each round, not 0


def test_bad_tensors_are_protocol_errors(site: Site) -> None:
    request = make_request(1)
    with pytest.raises(ProtocolError, match="backbone must be a vector"):
        site.train(make_request(1, backbone=request.backbone[:-1]))
    with pytest.raises(ProtocolError, match="task rows must have shape"):
        site.evaluate(make_request(1, task_row_ids=(TASK_ID, 1)))
    with pytest.raises(ProtocolError, match="cannot be built"):
        site.evaluate(make_request(1, model={"name": "hermes-r", "depth": 3}))


# ------------------------------------------------------------------------------------------------ evaluate
def _export(request: RoundRequest, path: Path) -> Path:
    """The request's weights as a model file carrying the plan (what a run hands to its users)."""
    model = build_model(MODEL["name"], **{k: v for k, v in MODEL.items() if k != "name"})
    state = model.state_dict()
    layout = StateLayout.from_state_dict(state)
    layout.load_backbone(state, request.backbone)
    layout.load_task_rows(state, request.task_row_ids, request.task_rows)
    layout.load_modality_rows(state, request.modality_row_ids, request.modality_rows)
    catalog = Catalog.from_dict({"datasets": {DATASET: {"modality": "CT", "task_ids": [TASK_ID],
                                                         "classes": {1: "tumour"}}}})
    return atomic_torch_save(path, model_checkpoint(model, catalog=catalog.to_dict(), **{PLANS_KEY: PLANS.to_dict()}))


def test_evaluate_is_hermes_predict_then_hermes_evaluate_on_the_whole_scan(site: Site, tmp_path: Path) -> None:
    metrics = site.evaluate(make_request(1))
    assert set(metrics) == {"num-examples", "dice/sts_ct/tumour", "dice-mean", "dice-paper/sts_ct/tumour",
                            "dice-paper-mean", "eval-time-s"}
    assert metrics["num-examples"] == 1 and metrics["dice-mean"] == metrics["dice/sts_ct/tumour"]
    # the same weights through the user's path, on the raw validation scan: the same Dice, exactly
    for seed in (0, 1):
        request = make_request(1, seed=seed)
        from_site = site.evaluate(request)
        model = _export(request, tmp_path / f"model{seed}.pt")
        raw = site.config.work_dir.parent / "raw" / VAL_CASE
        out = tmp_path / f"pred{seed}.nii.gz"
        assert predict(model, raw / "CT_image.nii.gz", out, "CT", "sts_ct", device="cpu", progress=False)[0].ok
        scored = evaluate(out, raw / "CT_mask.nii.gz", tmp_path / "eval.csv", {"tumour": 1}, progress=False)
        assert scored.rows[0]["dice"] == pytest.approx(from_site["dice/sts_ct/tumour"], abs=1e-12)
        assert scored.rows[0]["dice_paper"] == pytest.approx(from_site["dice-paper/sts_ct/tumour"], abs=1e-12)
    assert from_site["dice-mean"] != metrics["dice-mean"]  # the received weights decide


def test_validation_scans_are_preprocessed_without_the_label(site: Site) -> None:
    site.ensure_preprocessed(PLANS)
    folder = site.config.preprocessed_dir / DATASET
    val = json.loads((folder / f"{VAL_CASE}.json").read_text())
    train = json.loads((folder / "STS_002.json").read_text())
    assert val["crop_rule"] == "above-minimum" and train["crop_rule"] == "label-box"
    # the validation crop is the box of the image above its minimum: no label voxel decides it
    full = [[0, n] for n in reversed(val["resampled"]["size_xyz"])]
    assert val["crop_zyx"] != train["crop_zyx"] and all(
        lo >= f[0] and hi <= f[1] for (lo, hi), f in zip(val["crop_zyx"], full, strict=True))
