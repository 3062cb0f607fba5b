"""The Flower path: records, exactness against one process, failed SuperNodes (an in-process grid here; the
deployment engine with real SuperLink and SuperNode processes in test_flower_deployment.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


pytest.importorskip("flwr", reason='the Flower path needs the flower extra: pip install -e ".[flower]"')

import tomli  # noqa: E402  (a Flower dependency; tomllib is Python 3.11+)
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict  # noqa: E402

from hf_fsl_sage.flower.records import decode_items, encode_items, raw_array  # noqa: E402
from hf_fsl_sage.splitting.split import Smashed  # noqa: E402
from hf_fsl_sage.transport.base import FederationCommError, payload_nbytes  # noqa: E402
from tests.flower_grid import InProcessGrid  # noqa: E402
from tests.helpers import load_script  # noqa: E402


APP = Path(__file__).resolve().parent / "flower_app"


@pytest.fixture(scope="module")
def app():
    return load_script(APP / "tiny_split_app.py", "tiny_split_app")


def run_config(output_dir: Path, **overrides) -> dict:
    config = tomli.loads((APP / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    return {**config, "output-dir": str(output_dir), **overrides}


def one_process(app, output_dir: Path, **overrides) -> dict:
    config = run_config(output_dir, **overrides)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config)
    trainer = app.make_trainer(context, None)
    trainer.train()
    app.write_result(trainer, context)
    return json.loads((output_dir / "result.json").read_text())


def on_grid(app, output_dir: Path, fail: dict[int, int] | None = None, offline: dict[int, int] | None = None,
            **overrides) -> tuple[dict, InProcessGrid]:
    config = run_config(output_dir, **overrides)
    grid = InProcessGrid(app.client_app, 2, config, fail, offline)
    app.server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    return json.loads((output_dir / "result.json").read_text()), grid


def adapters(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "final" / "adapter_model.safetensors")


def logged(result: dict) -> list[dict]:
    """The training logs without wall times (which differ from run to run)."""
    timed = ("time/", "runtime", "per_second", "_time")
    return [{k: v for k, v in h.items() if not any(t in k for t in timed)} for h in result["log_history"]]


# ---------------------------------------------------------------- records
def test_messages_travel_in_records_exactly_and_malformed_ones_are_refused():
    torch.manual_seed(0)
    smashed = Smashed(torch.randn(2, 3, 4).to(torch.bfloat16), torch.ones(2, 3, dtype=torch.bool), None)
    items = [(1, "smashed", 0, (smashed, torch.arange(6).view(2, 3))), (3, "client_model", 7, {"w": torch.randn(5)}),
             (1, "gradient", 1, None)]
    index, buffers = encode_items(items)
    back = decode_items(index, buffers, "node 1")
    assert [(c, k, s) for c, k, s, _ in back] == [(1, "smashed", 0), (3, "client_model", 7), (1, "gradient", 1)]
    got = back[0][3][0]
    assert torch.equal(got.hidden_states, smashed.hidden_states) and got.hidden_states.dtype == torch.bfloat16
    assert torch.equal(back[1][3]["w"], items[1][3]["w"]) and back[2][3] is None
    # the buffers hold the payload's bytes (bf16 hidden 48, bool mask 6, int64 labels 48, float32 w 20), each
    # tensor padded to a multiple of 16 bytes, and nothing else
    assert payload_nbytes([i[3] for i in items]) == 48 + 6 + 48 + 20
    assert sum(len(buffers[k].data) for k in buffers) == 48 + 16 + 48 + 32
    short = ArrayRecord(array_dict={"0": raw_array(buffers["0"].data[:-16]), "1": buffers["1"], "2": buffers["2"]})
    with pytest.raises(FederationCommError, match="node 1: message 0 holds 96 bytes, its header describes 112"):
        decode_items(index, short, "node 1")
    pickled = ConfigRecord({"index": json.dumps([[0, '{"kind":"smashed","client":1,"structure":["pickle"],'
                                                     '"layout":[]}']])})
    with pytest.raises(FederationCommError, match="malformed message from node 1"):
        decode_items(pickled, ArrayRecord(array_dict={"0": raw_array(b"")}), "node 1")


# ---------------------------------------------------------------- exactness
@pytest.mark.parametrize("algorithm", ["fsl_sage", "splitfed_v2"])
def test_a_flower_run_trains_exactly_like_one_process(app, tmp_path, algorithm):
    """FSL-SAGE (alignment replies, a round run ahead) and SplitFed-V2 (a reply every step): the same adapters
    (max difference 0.0), the same ledger and the same logs as one process; protobuf bytes near the ledger."""
    want = one_process(app, tmp_path / "one", algorithm=algorithm)
    got, grid = on_grid(app, tmp_path / "flower", algorithm=algorithm)
    a, b = adapters(tmp_path / "one"), adapters(tmp_path / "flower")
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) == 0.0
    assert got["ledger"] == want["ledger"] and logged(got) == logged(want)
    assert got["eval"]["eval_loss"] == want["eval"]["eval_loss"]
    ledger = want["ledger"]["up"] + want["ledger"]["down"]
    assert ledger < grid.wire_bytes <= 1.10 * ledger


# ---------------------------------------------------------------- failed SuperNodes
@pytest.mark.deadlines("flower")
@pytest.mark.parametrize("gone", ["silent", "offline"])
def test_a_supernode_that_stops_answering_is_dropped_with_its_clients(app, tmp_path, gone):
    """Silent: no answer within ddp_timeout (1 s). Offline: the SuperLink answers for the node that it is unavailable
    (it missed its heartbeats), and the server does not wait out its ddp_timeout (10 minutes here)."""
    timeout = {"silent": 1, "offline": 600}[gone]
    node_gone = {"fail" if gone == "silent" else "offline": {102: 2}}  # after its second answer
    got, grid = on_grid(app, tmp_path, **node_gone, **{"client-failures": "drop", "ddp-timeout": timeout})
    assert got["global_step"] == 4 and list(got["lost"]) == ["102"]
    assert {"silent": "no answer within 1 s", "offline": "reports its SuperNode offline"}[gone] in got["lost"]["102"]
    drops = [h["dropped_clients"] for h in got["log_history"] if "dropped_clients" in h]
    assert drops[-1] == 2  # clients 1 and 3, once each
    assert all(torch.isfinite(t).all() for t in adapters(tmp_path).values())


@pytest.mark.deadlines("flower")
def test_a_supernode_that_stops_answering_stops_the_run_with_client_failures_raise(app, tmp_path):
    with pytest.raises(FederationCommError, match="SuperNode 102 .process 2, clients \\[1, 3\\]. is gone: no answer.*"
                                                  "client_failures='drop'"):
        on_grid(app, tmp_path, fail={102: 1}, **{"ddp-timeout": 1})


# ---------------------------------------------------------------- checkpoints and byte budgets
def test_a_flower_run_resumed_from_a_checkpoint_ends_as_the_run_that_wrote_it(app, tmp_path):
    """The checkpoint holds each node's share (asked from the node at that step); resuming hands it back."""
    full, _ = on_grid(app, tmp_path / "full", **{"save-steps": 2})
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert sorted(p.name for p in checkpoint.glob("federation-*")) == [f"federation-rank{r}-of-3.safetensors"
                                                                       for r in range(3)]
    resumed, _ = on_grid(app, tmp_path / "resumed", **{"save-steps": 2, "resume-from-checkpoint": str(checkpoint)})
    a, b = adapters(tmp_path / "full"), adapters(tmp_path / "resumed")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) == 0.0
    assert resumed["ledger"] == full["ledger"] and resumed["global_step"] == 4


def test_a_byte_budget_stops_a_flower_run_at_the_step_it_stops_one_process(app, tmp_path):
    """Round 0 (global steps 1-2) sends 216,358 bytes, each step of round 1 about 108,000: a budget of 300,000 stops
    the run after global step 3, mid-round. No node runs past it: the checkpoint written there holds every node
    at step 3, and the wire carries no step beyond the budget (protobuf bytes within 1.10x of the ledger)."""
    budget = {"max-comm-bytes": 300_000, "max-steps": 6}
    want = one_process(app, tmp_path / "one", **budget)
    got, grid = on_grid(app, tmp_path / "flower", **budget)
    assert got["global_step"] == want["global_step"] == 3
    a, b = adapters(tmp_path / "one"), adapters(tmp_path / "flower")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) == 0.0 and got["ledger"] == want["ledger"]
    ledger = want["ledger"]["up"] + want["ledger"]["down"]
    assert ledger < grid.wire_bytes <= 1.10 * ledger
    saved, _ = on_grid(app, tmp_path / "saved", **budget, **{"save-steps": 2})
    assert saved["global_step"] == 3
    assert (tmp_path / "saved" / "checkpoint-3" / "federation-rank2-of-3.safetensors").is_file()
