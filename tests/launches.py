"""Launching ``tests/distributed_run.py`` in one process or three, and the runs several tests compare at once.

Starting Python, torch, transformers and PEFT costs several times what one of the tiny runs does, so the runs
that only compare one process with three are made together (:data:`EQUAL_RUNS`): once in one process and once
in a launch of three, joined by ``--and``, by the session fixture ``equal_runs`` (tests/conftest.py). Tests that
read it share the xdist group :data:`EQUAL_GROUP`, so that one worker makes the runs once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from hf_fsl_sage.transport.codecs import CODECS
from tests.processes import preloaded_launch, run


ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "tests" / "distributed_run.py"
ALGORITHMS = ["fsl_sage", "splitfed_v1", "splitfed_v2", "cse_fsl", "fedavg"]
CODEC_RUNS = [("splitfed_v2", name) for name in sorted(CODECS) if name != "none"] + [("fsl_sage", "int8")]
PRIVATE_LABELS = ["--private_labels", "--smashed_clip_norm", "0.5", "--smashed_noise_multiplier", "0.1",
                  "--smashed_codec", "bf16"]

# name -> arguments of tests/distributed_run.py; each is run in one process and in three
EQUAL_RUNS: dict[str, list[str]] = {
    **{algorithm: ["--algorithm", algorithm] for algorithm in ALGORITHMS},
    **{f"{algorithm}-{codec}": ["--algorithm", algorithm, "--smashed_codec", codec]
       for algorithm, codec in CODEC_RUNS},
    "private_labels": PRIVATE_LABELS,
    "router_state": ["--family", "zaya", "--algorithm", "splitfed_v2", "--max_steps", "4"],
}
EQUAL_GROUP = "equal-runs"


def env() -> dict[str, str]:
    environment = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    environment["PYTHONPATH"] = os.pathsep.join([str(ROOT), environment.get("PYTHONPATH", "")])
    return environment


def run_one(out: Path, *extra: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``distributed_run.py`` in one process."""
    return _one(["--output_dir", str(out), *extra], timeout)


def run_three(out: Path, *extra: str, timeout: float = 600,
              monitor_interval: float = 0.5) -> subprocess.CompletedProcess:
    """``distributed_run.py`` on three processes (server on 0, clients on 1 and 2), as ``accelerate launch`` starts
    them (:func:`tests.processes.preloaded_launch`). A run in which a process dies needs ``monitor_interval=5``:
    see :func:`tests.processes.accelerate_launch`."""
    return _three(["--output_dir", str(out), *extra], timeout, monitor_interval)


def together(root: Path, runs: dict[str, list[str]]) -> list[str]:
    """The arguments that make every run of ``runs`` in one launch, each in ``root / name``."""
    return [arg for name, extra in runs.items() for arg in ("--and", "--output_dir", str(root / name), *extra)][1:]


def launch_equal_runs(root: Path) -> Path:
    """Every run of :data:`EQUAL_RUNS` in ``root / "one" / name`` (one process) and ``root / "three" / name``."""
    check(_one(together(root / "one", EQUAL_RUNS), timeout=1200))
    check(_three(together(root / "three", EQUAL_RUNS), timeout=1200, monitor_interval=0.5))
    return root


def _one(argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    return run([sys.executable, str(RUN), *argv], env(), timeout=timeout)


def _three(argv: list[str], timeout: float, monitor_interval: float) -> subprocess.CompletedProcess:
    return preloaded_launch([str(RUN), *argv], env(), timeout, monitor_interval=monitor_interval)


def detection_seconds(out: Path) -> float:
    """Seconds from the moment a process was killed or stalled to the server's error, both inside the run."""
    return float((out / "failed_at").read_text()) - float((out / "killed_at").read_text())


def check(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, done.stderr[-4000:]


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / "adapter_model.safetensors"))


def result(out: Path) -> dict:
    return json.loads((out / "result.json").read_text())
