"""The wire format carries plain data only, and a receiver rejects anything it does not expect."""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path

import pytest
import torch

from hf_fsl_sage.splitting.split import Smashed
from hf_fsl_sage.transport.base import TensorSpec, conforms, flatten
from hf_fsl_sage.transport.distributed import (
    MalformedMessage,
    decode_header,
    encode_header,
)
from tests.processes import run_together


ROOT = Path(__file__).resolve().parents[1]


def _payload():
    smashed = Smashed(torch.zeros(2, 5, 8, dtype=torch.bfloat16), torch.ones(2, 5, dtype=torch.bool), None)
    return {"act": (smashed, torch.zeros(2, 5, dtype=torch.int64)), "w": [torch.zeros(3)], "n": None}


def test_header_is_json_and_round_trips():
    spec = flatten(_payload())[0]
    raw = encode_header("smashed", 3, spec)
    assert json.loads(raw)["layout"] == [[[2, 5, 8], "bfloat16"], [[2, 5], "bool"], [[2, 5], "int64"],
                                         [[3], "float32"]]
    kind, client, (structure, layout) = decode_header(raw)
    assert (kind, client) == ("smashed", 3)
    assert layout == [((2, 5, 8), torch.bfloat16), ((2, 5), torch.bool), ((2, 5), torch.int64), ((3,), torch.float32)]
    assert json.dumps(structure) == json.dumps(spec[0])


def _good() -> dict:
    return json.loads(encode_header("smashed", 0, flatten(_payload())[0]))


def _with(**change) -> bytes:
    return json.dumps({**_good(), **change}).encode()


@pytest.mark.parametrize("raw, problem", [
    (pickle.dumps(("smashed", 0, ("tensor",))), "not JSON"),
    (b"[1, 2]", "exactly kind, client, structure and layout"),
    (_with(extra=1), "exactly kind, client, structure and layout"),
    (_with(client="0"), "client not an integer"),
    (_with(structure=["tensor", "x"]), "unknown tag or the wrong length"),
    (_with(structure=["builtins.eval", []]), "unknown tag"),
    (_with(structure=["dict", [[1, ["tensor"]]]]), "not a [string key, node] pair"),
    (_with(structure=["tensor"]), "holds 1 tensors but the layout describes 4 tensors"),
    (_with(layout=[[[2, 5, 8], "object"], [[2, 5], "bool"], [[2, 5], "int64"], [[3], "float32"]]),
     "is not one of"),
    (_with(layout=[[[2, -5, 8], "bfloat16"], [[2, 5], "bool"], [[2, 5], "int64"], [[3], "float32"]]),
     "is not [shape of sizes, dtype]"),
    (_with(layout=[[[2 ** 33, 2 ** 33], "float32"], [[2, 5], "bool"], [[2, 5], "int64"], [[3], "float32"]]),
     "would exceed"),
])
def test_malformed_headers_are_rejected(raw, problem):
    with pytest.raises(MalformedMessage, match=problem.replace("[", r"\[").replace("]", r"\]")):
        decode_header(raw)


def test_deep_nesting_is_rejected():
    node = ["tensor"]
    for _ in range(40):
        node = ["list", [node]]
    with pytest.raises(MalformedMessage, match="nested deeper"):
        decode_header(_with(structure=node, layout=[[[1], "float32"]]))


def test_conforms_names_what_differs():
    spec = (Smashed(TensorSpec(("batch", "seq", 8), (torch.float32,)), TensorSpec(("batch", "seq"), (torch.bool,),
                                                                               optional=True)),
            TensorSpec(("batch", "seq"), (torch.int64,)))
    good = (Smashed(torch.zeros(2, 5, 8), None), torch.zeros(2, 5, dtype=torch.int64))
    assert conforms(good, spec, {"batch": 2}) is None
    assert "batch = 2 <= 1" in conforms(good, spec, {"batch": 1})
    assert "payload[0].hidden_states: shape (2, 5, 9)" in conforms((Smashed(torch.zeros(2, 5, 9)), good[1]), spec)
    assert "payload[1]: shape (2, 4)" in conforms((good[0], torch.zeros(2, 4, dtype=torch.int64)), spec)
    assert "dtype torch.float16" in conforms((Smashed(torch.zeros(2, 5, 8, dtype=torch.float16)), good[1]), spec)
    assert "a NoneType where a tensor belongs" in conforms((Smashed(torch.zeros(2, 5, 8)), None), spec)
    state = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    assert conforms({"a": torch.ones(2, 3), "b": torch.ones(4)}, state) is None
    assert "keys differ (missing ['b'], unexpected ['c'])" in conforms({"a": torch.ones(2, 3), "c": torch.ones(4)},
                                                                        state)
    assert "payload['b']: shape (5,)" in conforms({"a": torch.ones(2, 3), "b": torch.ones(5)}, state)


def test_crafted_messages_are_rejected_over_a_real_process_group(tmp_path):
    """Process 1 sends a pickle header and malformed or unexpected messages; process 0 rejects each, names the
    sender, unpickles nothing, and still receives the valid message after them exactly."""
    marker, out = tmp_path / "unpickled", tmp_path / "outcome.json"
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    peer = [sys.executable, str(ROOT / "tests" / "wire_peer.py"), "--store", str(tmp_path / "store"),
            "--marker", str(marker), "--out", str(out)]
    done = run_together([[*peer, "--rank", "0"], [*peer, "--rank", "1"]], env, timeout=180)
    assert [d.returncode for d in done] == [0, 0], done[0].stderr[-3000:] + done[1].stderr[-3000:]
    assert not marker.exists()
    outcome = json.loads(out.read_text())
    assert outcome.pop("valid") == {"ok": True}
    expected = {
        "pickle_header": "the header is not JSON",
        "unknown_dtype": "dtype 'object' is not one of",
        "fewer_shapes_than_tensors": "the structure holds 4 tensors but the layout describes 1 tensors",
        "unknown_structure_tag": "unknown tag",
        "extra_header_field": "exactly kind, client, structure and layout",
        "huge_allocation": "would exceed",
        "other_kind": "expected smashed of client 0 from process 1 (client 0) but got gradient of client 0",
        "other_client": "expected smashed of client 0 from process 1 (client 0) but got smashed of client 3",
        "wrong_hidden_size": "q is torch.int8 of shape (8, 9); smashed_codec='int8' at hidden size 8 sends "
                             "torch.int8 rows of shape (8,)",
        "batch_over_limit": "3 rows, more than a batch (2)",
        "lengths_disagree_with_rows": "the upload's fields have leading sizes [(8,)], expected (10,)",
        "label_outside_vocabulary": "a label is outside the vocabulary (0..999, or -100)",
        "not_encoded": "the upload is not a dict of exactly rows, lengths, mask, position_ids and labels",
    }
    assert outcome.keys() == expected.keys()
    for name, text in expected.items():
        error = outcome[name]["error"]
        assert text in error, (name, error)
        assert "process 1 (client 0)" in error and f"scenario {name}" in error, (name, error)
