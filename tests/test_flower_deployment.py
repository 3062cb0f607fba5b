"""Flower's two engines running the tests' app with ``flwr run``: the deployment engine on this machine (a SuperLink
and two SuperNodes as separate processes, 127.0.0.1 only, insecure localhost mode; one launch serves every check:
a run equal to one process, then a run whose SuperNode is killed mid-run while a late SuperNode connects), and the
simulation engine (Ray workers)."""

from __future__ import annotations

import json

import pytest


pytest.importorskip("flwr", reason='the Flower path needs the flower extra: pip install -e ".[flower]"')

from tests.flower_federation import APP, Federation, churn_problems, churn_run  # noqa: E402
from tests.helpers import load_script  # noqa: E402
from tests.test_flower import adapters, logged, one_process  # noqa: E402


pytestmark = pytest.mark.deadlines("flower")


# Alignment in round 0 only: 4 messages per SuperNode (each starts a process on the node) instead of 6.
QUICK = {"align-interval": 2}


@pytest.mark.slow
def test_a_deployment_trains_like_one_process_and_goes_on_without_a_killed_supernode(tmp_path):
    want = one_process(load_script(APP / "tiny_split_app.py", "tiny_split_app"), tmp_path / "one", **QUICK)
    with Federation(tmp_path / "flwr") as federation:
        federation.superlink()
        federation.supernode("node1"), federation.supernode("node2")
        # 1. exactness: the same adapters, ledger and logs as one process
        status, output = federation.run("exact", 900, **QUICK, **{"output-dir": str(tmp_path / "deployed")})
        assert status == 0, output[-4000:]
        got = json.loads((tmp_path / "deployed" / "result.json").read_text())
        a, b = adapters(tmp_path / "one"), adapters(tmp_path / "deployed")
        assert max(float((a[k] - b[k]).abs().max()) for k in a) == 0.0
        assert got["ledger"] == want["ledger"] and logged(got) == logged(want)

        # 2. churn, in one round: SuperNode 2 is killed once it has answered; a third one connects late and is not
        # used. The server learns of the loss from the SuperLink, which answers for a node that missed its
        # heartbeats (Flower 1.42: within 60 s), or when ddp-timeout runs out: three times the longest exchange
        # above, so that a loaded machine does not make it give up on the SuperNode that is still there.
        timeout = max(20, round(3 * max(t["total"] for t in got["timings"])))
        out = tmp_path / "churn"
        status, output, _ = churn_run(federation, "churn", 900, **QUICK, **{
            "output-dir": str(out), "client-failures": "drop", "ddp-timeout": timeout, "max-steps": 2})
        killed = federation.node_id("node2")
    assert status == 0, output[-4000:]
    assert churn_problems(out, output, killed, 2) == [], output[-4000:]


@pytest.mark.slow
def test_the_simulation_engine_trains_like_one_process(tmp_path):
    pytest.importorskip("ray", reason='the simulation engine needs Ray: pip install -e ".[flower]"')
    want = one_process(load_script(APP / "tiny_split_app.py", "tiny_split_app"), tmp_path / "one")
    with Federation(tmp_path / "flwr", simulation=True) as federation:
        federation.superlink()
        status, output = federation.run("simulated", 900, **{"output-dir": str(tmp_path / "simulated")})
    assert status == 0, output[-4000:]
    got = json.loads((tmp_path / "simulated" / "result.json").read_text())
    a, b = adapters(tmp_path / "one"), adapters(tmp_path / "simulated")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) == 0.0
    assert got["ledger"] == want["ledger"] and logged(got) == logged(want)
