"""Flower's two engines running the tests' app with ``flwr run``: the deployment engine on this machine (a SuperLink
and two SuperNodes as separate processes, 127.0.0.1 only, insecure localhost mode; one launch serves every check:
a run equal to one process, then a run whose SuperNode is killed mid-run while a late SuperNode connects), and the
simulation engine (Ray workers)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch


pytest.importorskip("flwr", reason='the Flower path needs the flower extra: pip install -e ".[flower]"')

from tests.helpers import load_script  # noqa: E402
from tests.processes import free_port, kill_group  # noqa: E402
from tests.test_flower import adapters, logged, one_process  # noqa: E402


ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "tests" / "flower_app"


class Federation:
    """A SuperLink and SuperNodes on 127.0.0.1, each in its own process group (killed with the test)."""

    def __init__(self, home: Path):
        self.home, self.port = home, free_port()
        self.env = {**os.environ, "FLWR_HOME": str(home), "PYTHONPATH": str(ROOT), "FLWR_TELEMETRY_ENABLED": "0",
                    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.05", "OMP_NUM_THREADS": "1"}
        self.processes: dict[str, subprocess.Popen] = {}
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(f'[superlink]\ndefault = "local"\n\n[superlink.local]\n'
                                          f'address = "127.0.0.1:{self.port}"\ninsecure = true\n\n'
                                          '[superlink.simulation]\noptions.num-supernodes = 2\n')

    def start(self, name: str, command: list[str]) -> None:
        log = open(self.home / f"{name}.log", "w")
        self.processes[name] = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                                start_new_session=True, cwd=self.home)

    def superlink(self) -> None:
        self.start("superlink", ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(self.port),
                                 "--disable-runtime-dependency-installation"])

    def supernode(self, name: str) -> None:
        self.start(name, ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                          "--port", str(free_port())])

    def log(self, name: str) -> str:
        return (self.home / f"{name}.log").read_text()

    def run(self, timeout: float, connection: str = "local", **config) -> subprocess.CompletedProcess:
        """``flwr run`` the tests' app with ``config`` over its run config; waits for the run to end."""
        overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in config.items())
        return subprocess.run(["flwr", "run", str(APP), connection, "--stream", "--run-config", overrides],
                              env=self.env, capture_output=True, text=True, timeout=timeout, cwd=self.home)

    def stop(self) -> None:
        for process in self.processes.values():
            kill_group(process)


@pytest.mark.slow
def test_a_deployment_trains_like_one_process_and_goes_on_without_a_killed_supernode(tmp_path):
    # Alignment in round 0 only: 4 messages per SuperNode (each starts a process on the node) instead of 6.
    quick = {"align-interval": 2}
    want = one_process(load_script(APP / "tiny_split_app.py", "tiny_split_app"), tmp_path / "one", **quick)
    federation = Federation(tmp_path / "flwr")
    try:
        federation.superlink()
        time.sleep(3)
        federation.supernode("node1"), federation.supernode("node2")
        # 1. exactness: the same adapters, ledger and logs as one process
        done = federation.run(900, **quick, **{"output-dir": str(tmp_path / "deployed")})
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        got = json.loads((tmp_path / "deployed" / "result.json").read_text())
        a, b = adapters(tmp_path / "one"), adapters(tmp_path / "deployed")
        assert max(float((a[k] - b[k]).abs().max()) for k in a) == 0.0
        assert got["ledger"] == want["ledger"] and logged(got) == logged(want)

        # 2. churn: SuperNode 2 is killed once it has answered; a third one connects late and is not used
        out = tmp_path / "churn"
        runner = subprocess.Popen(["flwr", "run", str(APP), "local", "--stream", "--run-config",
                                   f'output-dir="{out}" client-failures="drop" ddp-timeout=30 max-steps=6 '
                                   'align-interval=2'],
                                  env=federation.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  cwd=federation.home, start_new_session=True)
        try:
            answered = federation.log("node2").count("Sent successfully")
            deadline = time.monotonic() + 300
            while federation.log("node2").count("Sent successfully") <= answered:
                assert time.monotonic() < deadline, federation.log("node2")[-2000:]
                time.sleep(0.2)
            os.killpg(federation.processes["node2"].pid, signal.SIGKILL)
            federation.supernode("node3")
            stdout, _ = runner.communicate(timeout=900)
        finally:
            kill_group(runner)
        assert runner.returncode == 0, stdout[-4000:]
        result = json.loads((out / "result.json").read_text())
        assert result["global_step"] == 6 and list(result["lost"]) == ["2"], result["lost"]
        assert "Going on without SuperNode" in stdout and "took no part" in stdout, stdout[-4000:]
        assert all(torch.isfinite(t).all() for t in adapters(out).values())
    finally:
        federation.stop()



@pytest.mark.slow
def test_the_simulation_engine_trains_like_one_process(tmp_path):
    pytest.importorskip("ray", reason='the simulation engine needs Ray: pip install -e ".[flower]"')
    want = one_process(load_script(APP / "tiny_split_app.py", "tiny_split_app"), tmp_path / "one")
    federation = Federation(tmp_path / "flwr")
    try:
        done = federation.run(900, "simulation", **{"output-dir": str(tmp_path / "simulated")})
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    finally:
        federation.stop()
    got = json.loads((tmp_path / "simulated" / "result.json").read_text())
    a, b = adapters(tmp_path / "one"), adapters(tmp_path / "simulated")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) == 0.0
    assert got["ledger"] == want["ledger"] and logged(got) == logged(want)
