""":func:`run`, :func:`run_together`, :func:`accelerate_launch` and :func:`preloaded_launch` start test
processes so that none outlives its test: each command runs in its own session (process group), and on a timeout,
an error or a finished test the whole group is killed, so the workers a launcher started go with it. Output goes
to files, not pipes, so a chatty process never blocks while the test waits on another.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path


def kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def run_together(commands: Sequence[Sequence[str]], env: dict[str, str], timeout: float,
                 cwd: str | Path | None = None) -> list[subprocess.CompletedProcess]:
    """Run ``commands`` at the same time, each in its own process group; wait for all, at most ``timeout`` s.

    Raises :class:`subprocess.TimeoutExpired` (after killing every group) when the time runs out.
    """
    with tempfile.TemporaryDirectory(prefix="launch-") as logs, contextlib.ExitStack() as stack:
        processes, files = [], []
        try:
            for i, command in enumerate(commands):
                out = stack.enter_context(open(Path(logs, f"{i}.out"), "w+"))
                err = stack.enter_context(open(Path(logs, f"{i}.err"), "w+"))
                files += [out, err]
                processes.append(subprocess.Popen(list(command), env=env, cwd=cwd, stdout=out, stderr=err, text=True,
                                                  start_new_session=True))
            deadline = time.monotonic() + timeout
            for process, command in zip(processes, commands):
                remaining = deadline - time.monotonic()
                try:
                    process.wait(timeout=max(remaining, 0.01))
                except subprocess.TimeoutExpired:
                    raise subprocess.TimeoutExpired(list(command), timeout) from None
            done = []
            for i, (process, command) in enumerate(zip(processes, commands)):
                out, err = files[2 * i], files[2 * i + 1]
                out.seek(0), err.seek(0)
                done.append(subprocess.CompletedProcess(list(command), process.returncode, out.read(), err.read()))
            return done
        finally:
            for process in processes:
                kill_group(process)  # also the workers a launcher started, even when the launcher exited


def run(command: Sequence[str], env: dict[str, str], timeout: float,
        cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    """:func:`run_together` for one command."""
    return run_together([command], env, timeout, cwd)[0]


_PORT_TAKEN = re.compile(r"EADDRINUSE|[Aa]ddress already in use|port .* is already in use")


def this_python_first(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with the directory of the interpreter running the tests first on ``PATH``: scripts that start
    ``python``, ``flwr`` or ``flower-superlink`` by name then run this environment's, not another install's."""
    return {**env, "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(config: str | Path, script_and_args: Sequence[str], env: dict[str, str], timeout: float,
                      attempts: int = 3, monitor_interval: float = 5) -> subprocess.CompletedProcess:
    """``accelerate launch`` on a free port, again on another port if the chosen one was taken before the
    launcher could bind it (another test or job may take it in between).

    ``monitor_interval`` (seconds): once the launcher sees a worker die it stops the others; checking every 5 s
    rather than every 0.1 s leaves the survivors time to report what they saw (the server's process names the
    dead peer), which a loaded machine otherwise loses to the race. The launcher also notices that every worker
    has finished at its next check only, so a launch where no process dies is shorter with 0.5.
    """
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    return _on_a_free_port(launcher, monitor_interval, script_and_args, env, timeout, attempts)


def preloaded_launch(script_and_args: Sequence[str], env: dict[str, str], timeout: float, processes: int = 3,
                     attempts: int = 3, monitor_interval: float = 0.5) -> subprocess.CompletedProcess:
    """``tests/preloaded_launch.py``: the processes of :func:`accelerate_launch` with the CPU config, forked from
    one that imported the script (a third of the CPU time); for tests that are not about the launcher."""
    launcher = [sys.executable, str(Path(__file__).with_name("preloaded_launch.py")), "--num_processes",
                str(processes)]
    return _on_a_free_port(launcher, monitor_interval, script_and_args, env, timeout, attempts)


def _on_a_free_port(launcher: list[str], monitor_interval: float, script_and_args: Sequence[str],
                    env: dict[str, str], timeout: float, attempts: int) -> subprocess.CompletedProcess:
    """Run ``launcher`` on a free port, again on another if the chosen one was taken before it could bind it."""
    for attempt in range(attempts):
        command = [*launcher, "--main_process_port", str(free_port()), "--monitor_interval", str(monitor_interval),
                   *script_and_args]
        done = run(command, env, timeout)
        if done.returncode == 0 or not _PORT_TAKEN.search(done.stderr) or attempt == attempts - 1:
            return done
    raise AssertionError("unreachable")
