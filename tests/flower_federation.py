"""A Flower federation on this machine (127.0.0.1 only, insecure localhost mode) for the tests and benchmarks: a
SuperLink and SuperNodes as separate processes, each in its own process group and killed with :meth:`stop`, and
``flwr run`` of the tests' app (``tests/flower_app``) against it.

Nothing reaches the network: telemetry and Flower's update check are off, and the SuperLink is always one
started here (``flwr run`` on a connection without an address would start a detached one on fixed ports).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from pathlib import Path

from tests.processes import free_port, kill_group, this_python_first


ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "tests" / "flower_app"


class Federation:
    """A SuperLink (``simulation=True``: with the simulation engine) and the SuperNodes started on it.

    Its logs are ``<home>/<name>.log``; ``FLWR_HOME`` is ``home``.
    """

    def __init__(self, home: Path, simulation: bool = False):
        self.home, self.port, self.simulation = home, free_port(), simulation
        self.env = {**this_python_first(os.environ), "FLWR_HOME": str(home), "PYTHONPATH": str(ROOT),
                    "OMP_NUM_THREADS": "1", "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                    # the SuperExec looks for a ClientApp or ServerApp to start every 50 ms instead of every 1 s
                    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.05"}
        self.processes: dict[str, subprocess.Popen] = {}
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(f'[superlink]\ndefault = "local"\n\n[superlink.local]\n'
                                          f'address = "127.0.0.1:{self.port}"\ninsecure = true\n')

    def start(self, name: str, command: list[str]) -> subprocess.Popen:
        with open(self.home / f"{name}.log", "w") as log:
            self.processes[name] = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                                    start_new_session=True, cwd=self.home)
        return self.processes[name]

    def superlink(self, wait: float = 120.0) -> None:
        """Start the SuperLink and wait until it listens."""
        command = ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(self.port),
                   "--disable-runtime-dependency-installation"]
        process = self.start("superlink", command + (["--simulation"] if self.simulation else []))
        deadline = time.monotonic() + wait
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the SuperLink did not start:\n{self.log('superlink')[-2000:]}") from None
                time.sleep(0.1)

    def supernode(self, name: str, port: int | None = None) -> None:
        """Start SuperNode ``name``; it reaches the SuperLink at ``port`` (default: the SuperLink's own)."""
        self.start(name, ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port or self.port}",
                          "--port", str(free_port())])

    def node_id(self, name: str) -> str:
        """The ID the SuperLink gave SuperNode ``name`` (from its log)."""
        return re.search(r"SuperNode ID: (\d+)", self.log(name)).group(1)

    def log(self, name: str) -> str:
        return (self.home / f"{name}.log").read_text(errors="replace")

    def command(self, **config) -> list[str]:
        """``flwr run`` of the tests' app, its run config overridden by ``config``, its logs streamed."""
        overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in config.items())
        command = ["flwr", "run", str(APP), "local", "--stream", "--run-config", overrides]
        return command + (["--federation-config", "num-supernodes=2"] if self.simulation else [])

    def launch(self, name: str, **config) -> subprocess.Popen:
        """Start a run of the tests' app with ``config``; its output goes to ``<home>/<name>.log``."""
        return self.start(name, self.command(**config))

    def run(self, name: str, timeout: float, **config) -> tuple[int, str]:
        """Run the tests' app with ``config``; returns its exit status and output once the run has ended."""
        process = self.launch(name, **config)
        try:
            return process.wait(timeout), self.log(name)
        finally:
            kill_group(process)

    def stop(self) -> None:
        for process in self.processes.values():
            kill_group(process)

    def __enter__(self) -> Federation:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def churn_run(federation: Federation, name: str, timeout: float, **config) -> tuple[int, str, float]:
    """A run of the tests' app on SuperNodes ``node1`` and ``node2`` of ``federation`` with ``config`` in which
    ``node2`` is killed (SIGKILL, its whole process group) as soon as it has answered once, and a SuperNode
    ``node3`` connects right after. Returns the run's exit status, its output and the time of the kill."""
    answered = federation.log("node2").count("Sent successfully")
    process = federation.launch(name, **config)
    try:
        deadline = time.monotonic() + timeout
        while federation.log("node2").count("Sent successfully") <= answered:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"SuperNode node2 never answered:\n{federation.log('node2')[-2000:]}\n"
                                   f"{federation.log(name)[-2000:]}")
            time.sleep(0.1)
        kill_group(federation.processes["node2"])
        killed = time.time()
        federation.supernode("node3")
        return process.wait(max(deadline - time.monotonic(), 1)), federation.log(name), killed
    finally:
        kill_group(process)


def churn_problems(output_dir: Path, output: str, killed: str, max_steps: int) -> list[str]:
    """What went wrong in a :func:`churn_run` with ``client_failures="drop"`` (nothing: ``[]``): the run must end
    at ``max_steps`` without SuperNode ``killed`` alone (reported offline by the SuperLink, or silent for
    ``ddp_timeout``), with its two clients counted as dropped, the late SuperNode named, and finite adapters."""
    from safetensors.torch import load_file

    result = json.loads((output_dir / "result.json").read_text())
    problems = []
    if result["global_step"] != max_steps:
        problems.append(f"ended at global step {result['global_step']}, not {max_steps}")
    if list(result["lost"]) != [killed]:
        problems.append(f"lost {result['lost']}, not SuperNode {killed} alone")
    elif not any(why in result["lost"][killed] for why in ("reports its SuperNode offline", "no answer within")):
        problems.append(f"lost SuperNode {killed} for another reason: {result['lost'][killed]}")
    dropped = [h["dropped_clients"] for h in result["log_history"] if "dropped_clients" in h]
    if not dropped or dropped[-1] != 2:
        problems.append(f"dropped clients logged {dropped}, not 2 at the end")
    if "Going on without SuperNode" not in output or "took no part" not in output:
        problems.append("the log names neither the lost SuperNode nor the late one")
    adapters = load_file(output_dir / "final" / "adapter_model.safetensors")
    if not all(bool(t.isfinite().all()) for t in adapters.values()):
        problems.append("adapters not finite")
    return problems
