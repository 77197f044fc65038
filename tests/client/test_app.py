"""Tests of the site's ClientApp (client/app.py): finding the site config, and query, train and evaluate
through the real handlers on a tiny real site, inspecting every record the site sends for anything that
identifies data (case ids, file names, path fragments)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.metadata import Metadata

from client.app import SiteError, app, load_site, site_config_path
from client.site import ProtocolError
from hermes_model.exchange import XOR_ZSTD_STYPE, StateLayout, to_wire
from server.validation import Sent, parse_train_reply
from tests.client.test_site import (
    CASES,
    CLASS_KEY,
    DATASET,
    ENGINE,
    ITERATIONS,
    MODEL,
    PLANS,
    RUN,
    TASK_ID,
    VAL_CASE,
    global_weights,
    write_site,
)

SERVER_NODE, SITE_NODE = 1, 42


def make_message(content: RecordDict, message_type: str) -> Message:
    """A message as the SuperNode delivers it. Building one outside a Flower runtime needs its metadata set
    explicitly (``Message(content, dst_node_id, type)`` reads the process's TaskIdentity, unset in tests)."""
    metadata = Metadata(run_id=7, message_id=f"m-{message_type}", src_node_id=SERVER_NODE,
                        dst_node_id=SITE_NODE, reply_to_message_id="", group_id="1", created_at=time.time(),
                        ttl=3600.0, message_type=message_type)
    return Message(content=content, metadata=metadata)


def make_context(node_config: dict[str, Any], run_config: dict[str, Any] | None = None) -> Context:
    return Context(run_id=7, node_id=SITE_NODE, node_config=node_config, state=RecordDict(),
                   run_config=run_config or {})


def round_content(server_round: int, wire: str = "float32", **config: Any) -> RecordDict:
    """The train/evaluate content the server sends this site (protocol section 2)."""
    layout, state = global_weights(server_round)
    arrays = {"backbone": layout.backbone(state), "task_rows": layout.task_rows(state, [TASK_ID]),
              "modality_rows": layout.modality_rows(state, [0])}
    values = {
        "server-round": server_round, "task_row_ids": [TASK_ID], "modality_row_ids": [0],
        "local-iterations": ITERATIONS, "schedule-iteration": (server_round - 1) * ITERATIONS, "seed": 3,
        "wire-dtype": wire, "proximal-mu": 0.0, "model": json.dumps(MODEL), "engine": json.dumps(ENGINE),
        "task-map": json.dumps({CLASS_KEY: TASK_ID, "lits/liver": 0}), "plans": PLANS.to_json(), "run-key": RUN,
        **config,
    }
    return RecordDict({
        "arrays": ArrayRecord({k: Array(to_wire(v, wire).numpy()) for k, v in arrays.items()}),
        "config": ConfigRecord(values),
    })


@pytest.fixture(scope="module")
def site_yaml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_site(tmp_path_factory.mktemp("appsite"))


# ---------------------------------------------------------------------------------------------- config lookup
def test_site_config_from_node_config_or_partition(tmp_path: Path) -> None:
    assert site_config_path(make_context({"site-config": "/a/site.yaml"})) == Path("/a/site.yaml")
    sim = {"site-configs": "a.yaml, b.yaml,c.yaml"}
    assert site_config_path(make_context({"partition-id": 1, "num-partitions": 3}, sim)) == Path("b.yaml")
    with pytest.raises(ValueError, match="partition-id = 3 does not index the 3 paths"):
        site_config_path(make_context({"partition-id": 3}, sim))
    with pytest.raises(ValueError, match="no site config"):
        site_config_path(make_context({}))


def test_a_broken_site_fails_without_revealing_its_paths(tmp_path: Path) -> None:
    missing = tmp_path / "secret_folder" / "site.yaml"
    with pytest.raises(SiteError) as info:
        app(make_message(RecordDict({"config": ConfigRecord({"catalog": "{}"})}), "query"),
            make_context({"site-config": str(missing)}))
    assert "SiteConfigError" in str(info.value) and "secret_folder" not in str(info.value)


# ------------------------------------------------------------------------------------------------ privacy
def strings_of(value: Any) -> list[str]:
    """Every string inside a record value, decoding JSON strings recursively (keys included)."""
    if isinstance(value, bytes):
        return [value.decode("utf-8", "replace")]
    if isinstance(value, str):
        try:
            decoded = json.loads(value)
        except ValueError:
            return [value]
        return [value] if isinstance(decoded, str) else [value, *strings_of(decoded)]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in [str(k), *strings_of(v)]]
    if isinstance(value, list | tuple):
        return [s for v in value for s in strings_of(v)]
    return []


def all_strings(content: RecordDict) -> list[str]:
    out = []
    for name, record in content.items():
        out.append(name)
        for key, value in record.items():
            out.append(key)
            if isinstance(record, ArrayRecord):
                assert isinstance(value, Array) and value.dtype in ("float32", "float16"), key
            else:
                assert isinstance(record, ConfigRecord | MetricRecord), name
                out += strings_of(value)
    return out


def forbidden_fragments(site_dir: Path) -> set[str]:
    """Case ids, file names and every folder name of the site's paths (work dir, sources, config)."""
    site = load_site(make_context({"site-config": str(site_dir / "site.yaml")}))
    fragments = set(CASES) | {"CT_image", "CT_mask", ".nii", ".npy", "cases.csv", "site.yaml", "raw", "work"}
    for path in (site_dir, site.config.work_dir, site.config.preprocessed_dir, site.state_dir(RUN)):
        fragments |= {p for p in path.resolve().parts if p not in ("/", "tmp")}
    fragments |= {p.name for p in site_dir.rglob("*")}  # every file and folder the site holds
    fragments -= {DATASET, "preprocessed"}  # the dataset's own name is not patient data
    return fragments


def assert_private(content: RecordDict, fragments: set[str]) -> None:
    for text in all_strings(content):
        leaks = sorted(f for f in fragments if f in text)
        assert not leaks, f"{leaks} found in {text!r}"
        allowed = (CLASS_KEY, f"dice/{CLASS_KEY}", f"dice-paper/{CLASS_KEY}")
        assert not re.search(r"[\\/]", text) or text in allowed, text


def numbers_of(value: Any) -> list[float]:
    """Every number inside a JSON value."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int | float):
        return [float(value)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in numbers_of(v)]
    if isinstance(value, list):
        return [n for v in value for n in numbers_of(v)]
    return []


def assert_no_per_case_values(fingerprint: str, site_dir: Path) -> None:
    """No statistic of one training case alone (its size, its foreground mean and percentiles) is among the
    numbers of the serialised fingerprint: only aggregates over the cases leave the site."""
    import SimpleITK as sitk

    entries = json.loads(fingerprint)
    assert [e["dataset"] for e in entries] == [DATASET] and entries[0]["cases"] == 2
    sent = numbers_of(entries)
    for case in (c for c in CASES if c != VAL_CASE):
        image = sitk.ReadImage(str(site_dir / "raw" / case / "CT_image.nii.gz"))
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(site_dir / "raw" / case / "CT_mask.nii.gz"))) > 0
        voxels = sitk.GetArrayFromImage(image)[mask].astype(np.float64)
        own = [*map(float, image.GetSize()), float(voxels.mean()), float(voxels.std()),
               *map(float, np.percentile(voxels, (0.5, 50, 99.5)))]
        assert list(image.GetSize()) != entries[0]["size_xyz"]
        clashes = [v for v in own if any(abs(v - n) <= 1e-9 * max(1.0, abs(v)) for n in sent)]
        assert not [v for v in clashes if v not in image.GetSize()], clashes


def test_query_train_evaluate_send_nothing_identifying(site_yaml: Path) -> None:
    context = make_context({"site-config": str(site_yaml)})
    fragments = forbidden_fragments(site_yaml.parent)
    assert {"STS_002", "CT_image", site_yaml.parent.name} <= fragments
    server_catalog = json.dumps({"modalities": {}, "datasets": {}})

    request = RecordDict({"config": ConfigRecord({"catalog": server_catalog})})
    query = app(make_message(request, "query"), context)
    assert list(query.content) == ["site"] and query.content["site"]["name"] == "sarcoma-test"
    assert json.loads(query.content["site"]["datasets"]) == [
        {"name": DATASET, "modality": "CT", "classes": {"1": "tumour"}, "num_train_cases": 2}
    ]
    assert_private(query.content, fragments)
    assert_no_per_case_values(query.content["site"]["fingerprint"], site_yaml.parent)

    sent = round_content(1, wire="float16")
    reply = app(make_message(sent, "train"), context)
    assert reply.metadata.reply_to_message_id == "m-train" and reply.metadata.dst_node_id == SERVER_NODE
    assert sorted(reply.content) == ["arrays", "config", "metrics"]
    arrays = reply.content["arrays"]
    assert sorted(arrays) == ["backbone", "modality_rows", "task_rows"]
    for name in arrays:
        assert arrays[name].numpy().dtype == np.float16
        assert arrays[name].numpy().shape == sent["arrays"][name].numpy().shape
    assert dict(reply.content["config"]) == {"task_row_ids": [TASK_ID], "modality_row_ids": [0]}
    metrics = reply.content["metrics"]
    assert set(metrics) == {"num-examples", "loss", "bce", "dice", "modality-acc", "train-time-s"}
    assert metrics["num-examples"] == ITERATIONS * 2
    assert_private(reply.content, fragments)

    evaluation = app(make_message(round_content(1), "evaluate"), context)
    assert list(evaluation.content) == ["metrics"]
    expected = {"num-examples", "dice/sts_ct/tumour", "dice-mean", "dice-paper/sts_ct/tumour", "dice-paper-mean",
                "eval-time-s"}
    assert set(evaluation.content["metrics"]) == expected
    assert_private(evaluation.content, fragments)


@pytest.mark.parametrize("wire", ["float32", "float16"])
def test_coded_train_reply_is_what_the_server_decodes(site_yaml: Path, wire: str) -> None:
    context = make_context({"site-config": str(site_yaml)})
    sent = round_content(2, wire=wire, **{"reply-codec": "xor-zstd"})
    reply = app(make_message(sent, "train"), context)
    arrays = reply.content["arrays"]
    assert {arrays[k].stype for k in arrays} == {XOR_ZSTD_STYPE} and {arrays[k].dtype for k in arrays} == {wire}
    wire_sent = {k: torch.from_numpy(sent["arrays"][k].numpy()) for k in arrays}
    layout = StateLayout.from_state_dict(global_weights(2)[1])
    update = parse_train_reply(reply, Sent(SITE_NODE, "sarcoma-test", (TASK_ID,), (0,), wire_sent), layout)
    assert update.num_examples == ITERATIONS * 2 and update.backbone.shape == (layout.backbone_size,)
    moved = (update.backbone - wire_sent["backbone"].float()).abs()
    assert 0 < float(moved.max()) < 1.0  # trained: every value decoded, none garbage


def test_malformed_requests_are_reported_by_key(site_yaml: Path) -> None:
    context = make_context({"site-config": str(site_yaml)})
    content = round_content(1)
    del content["config"]["local-iterations"]
    with pytest.raises(ProtocolError, match="config key 'local-iterations' is missing"):
        app(make_message(content, "train"), context)
    with pytest.raises(ProtocolError, match="task-map has no task id for \\['sts_ct/tumour'\\]"):
        content = round_content(1, **{"task-map": json.dumps({"lits/liver": 0})})
        app(make_message(content, "evaluate"), context)
    with pytest.raises(ProtocolError, match="no ArrayRecord named 'arrays'"):
        app(make_message(RecordDict({"config": ConfigRecord({"server-round": 1})}), "train"), context)


def test_the_privacy_check_catches_leaks(tmp_path: Path) -> None:
    fragments = {"STS_002", "CT_image", "hospital_share"}
    leaky = [RecordDict({"metrics": MetricRecord({"dice/STS_002": 1.0})}),
             RecordDict({"site": ConfigRecord({"datasets": json.dumps([{"name": "x", "in": "CT_image"}])})}),
             RecordDict({"config": ConfigRecord({"where": "/data/hospital_share/scans"})})]
    for content in leaky:
        with pytest.raises(AssertionError):
            assert_private(content, fragments)
    assert_private(RecordDict({"metrics": MetricRecord({"dice/sts_ct/tumour": 0.5})}), fragments)
