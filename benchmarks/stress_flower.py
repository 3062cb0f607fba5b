"""Run the churn scenario of tests/test_flower_deployment.py many times and count failures.

    python benchmarks/stress_flower.py --runs 10      # about 2 min a run on 2 idle cores

Each run starts a fresh federation on 127.0.0.1 (a SuperLink and SuperNodes node1 and node2, see
tests/flower_federation.py) and runs the tests' Flower app (FSL-SAGE, 4 clients, 4 global steps) with
``client_failures="drop"`` and a ``ddp_timeout`` of 10 minutes. SuperNode node2 is killed (SIGKILL, with its
ClientApp processes) as soon as it has answered once, and node3 connects right after. The run must end at step 4
without node2 alone, which the SuperLink reports offline once it has missed its heartbeats, with its two clients
counted as dropped, the late node3 named, and finite adapters. Writes benchmarks/results/stress_flower.json (or
--output): each run's outcome, its seconds, and the seconds from the kill to the run's end.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for the tests/ helpers
from tests.flower_federation import Federation, churn_problems, churn_run  # noqa: E402


ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"align-interval": 2, "client-failures": "drop", "ddp-timeout": 600}


def churn(work: Path) -> dict:
    began = time.time()
    with Federation(work / "flwr") as federation:
        federation.superlink()
        federation.supernode("node1"), federation.supernode("node2")
        status, output, killed_at = churn_run(federation, "churn", 1800, **SETTINGS,
                                              **{"output-dir": str(work / "out")})
        killed = federation.node_id("node2")
    ended = time.time()
    problems = [f"flwr run exited with {status}: {output[-1500:]}"] if status else \
        churn_problems(work / "out", output, killed, 4)
    return {"ok": not problems, "problems": problems, "seconds": ended - began,
            "kill_to_end_seconds": ended - killed_at}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "stress_flower.json"))
    opts = parser.parse_args(argv)
    runs = []
    for i in range(opts.runs):
        with tempfile.TemporaryDirectory(prefix="stress-flower-") as tmp:
            try:
                outcome = churn(Path(tmp))
            except Exception:  # a run that breaks counts as a failure, and the next one still runs
                outcome = {"ok": False, "problems": [traceback.format_exc()[-1500:]]}
        runs.append(outcome)
        print(f"run {i + 1}/{opts.runs}: {'ok' if outcome['ok'] else 'FAILED'} "
              f"({outcome.get('seconds', 0):.0f} s, {outcome.get('kill_to_end_seconds', 0):.0f} s after the kill)"
              + ("" if outcome["ok"] else f": {outcome['problems']}"), flush=True)
    result = {"runs": len(runs), "failures": sum(not r["ok"] for r in runs), "settings": SETTINGS, "outcomes": runs}
    Path(opts.output).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.output).write_text(json.dumps(result, indent=1))
    print(f"{result['failures']} failures in {result['runs']} runs")
    return result


if __name__ == "__main__":
    main()
