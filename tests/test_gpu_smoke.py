"""The GPU smoke script's CPU pass (gloo, 3 processes): every check runs and passes, so the script cannot rot.

Its ``recipe_bf16_generation`` check is also the test of the E2E recipe on three processes: the central stage and
a compared run in process 0's child, every result written once. The processes are forked from one preloaded
process (``--launcher preloaded``, torchrun's environment): ``accelerate launch`` itself is run by the two-machine
test in tests/test_distributed.py."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.processes import this_python_first


pytestmark = pytest.mark.deadlines("smoke")


ROOT = Path(__file__).resolve().parents[1]
CHECKS = ["one_process", "processes_equal", "resume", "codec", "dropped_client", "slow_process_zero",
          "stalled_process_drop", "recipe_bf16_generation", "killed_process_raise"]


@pytest.mark.slow
def test_the_gpu_smoke_script_passes_every_check_on_cpu(tmp_path):
    out = tmp_path / "gpu_smoke.json"
    env = this_python_first(dict(os.environ, OMP_NUM_THREADS="1"))  # the script runs `python` by name
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_smoke.sh"), "--quick", "--launcher", "preloaded",
                           "--output", str(out)],
                          capture_output=True, text=True, timeout=1500, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith(("PASS ", "FAIL "))]
    assert done.returncode == 0, "\n".join(lines) + done.stderr[-2000:]
    assert sorted(line.split()[1].rstrip(":") for line in lines) == sorted(CHECKS)
    assert all(" | a GPU run must show: " in line for line in lines)
    summary = json.loads(out.read_text())
    assert (summary["device"], summary["processes"], summary["passed"]) == ("cpu", 3, len(CHECKS))
    assert summary["launcher"] == "preloaded"
