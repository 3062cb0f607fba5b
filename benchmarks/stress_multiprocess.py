"""Run the multi-process scenarios of tests/test_distributed.py many times and count failures.

    python benchmarks/stress_multiprocess.py --runs 30
    python benchmarks/stress_multiprocess.py --runs 10 --scenarios drop machine \
        --output benchmarks/results/stress_drop.json

Each run launches, with the shipped 3-process CPU config: the equality scenario (one algorithm per run, in turn,
compared with its one-process reference, which is computed once per algorithm), the kill scenario (process 2 is
killed at global step 3; the job must stop with the server naming it, within 30 s of the kill) and the stall
scenario (process 2 hangs; the server must give up 10 to 40 s after the stall, with ddp_timeout 10). The drop
scenario (not run by default) is the stall with client_failures="drop": process 2 hangs for 20 s, the others must
go on without it and finish (exit 0, process 2 leaving with status 0) with the adapters of the one-process run in
which its clients fail from that step on. The machine scenario (not run by default either) is two launches of
accelerate_configs/two_machines.yaml on this host, two processes each, with client_failures="drop": process 3 on
"machine" 1 is killed at global step 3, machine 1's launcher stops process 2 and exits non-zero, and the server's
machine must go on without both and finish all 8 steps (its launcher then waits in torchrun's exit barrier for the
lost machine, up to 300 s; the scenario stops it once the result is written). Every launch runs in its own
process group, killed as a group when it ends. Writes benchmarks/results/stress_multiprocess.json (or --output).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from safetensors.torch import load_file


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for the tests/ helpers
from tests.processes import accelerate_launch, free_port, kill_group, run  # noqa: E402


ROOT = Path(__file__).resolve().parents[1]

RUN = ROOT / "tests" / "distributed_run.py"
CONFIG = ROOT / "accelerate_configs" / "cpu_3_processes.yaml"
TWO_MACHINES = ROOT / "accelerate_configs" / "two_machines.yaml"
ALGORITHMS = ["fsl_sage", "splitfed_v1", "splitfed_v2", "cse_fsl", "fedavg"]
KILLED = "could not receive the smashed message of client 1 from process 2 (client 1) at round 1, global step 3"


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _three(out: Path, *extra: str):
    return accelerate_launch(CONFIG, [str(RUN), "--output_dir", str(out), *extra], _env(), timeout=900)


def _ok(done) -> None:
    if done.returncode != 0:
        raise AssertionError(f"exit {done.returncode}: {done.stderr[-2000:]}")


def _detection(out: Path) -> float:
    return float((out / "failed_at").read_text()) - float((out / "killed_at").read_text())


def _adapter_diff(one: Path, other: Path) -> float:
    """The largest difference between two runs' final adapters (infinite if they hold different tensors)."""
    a, b = (load_file(str(d / "final" / "adapter_model.safetensors")) for d in (one, other))
    return max(float((a[k] - b[k]).abs().max()) for k in a) if a.keys() == b.keys() else float("inf")


def equality(work: Path, algorithm: str, references: dict[str, Path]) -> dict:
    if algorithm not in references:
        one = work / f"one-{algorithm}"
        _ok(run([sys.executable, str(RUN), "--output_dir", str(one), "--algorithm", algorithm], _env(), 900))
        references[algorithm] = one
    three = work / f"three-{algorithm}-{time.monotonic_ns()}"
    _ok(_three(three, "--algorithm", algorithm))
    diff = _adapter_diff(references[algorithm], three)
    ledgers = [json.loads((d / "result.json").read_text())["ledger"] for d in (references[algorithm], three)]
    if diff > 1e-5 or ledgers[0] != ledgers[1]:
        raise AssertionError(f"{algorithm}: adapters differ by {diff} or ledgers differ")
    return {"algorithm": algorithm, "max_abs_diff": diff}


def failure(work: Path, stall: bool) -> dict:
    out = work / f"{'stall' if stall else 'kill'}-{time.monotonic_ns()}"
    flag = ["--stall_rank", "2", "--ddp_timeout", "10"] if stall else ["--kill_rank", "2", "--ddp_timeout", "60"]
    done = _three(out, *flag, "--kill_step", "3")
    if done.returncode == 0 or KILLED not in done.stderr:
        raise AssertionError(f"exit {done.returncode} without the expected error: {done.stderr[-2000:]}")
    seconds = _detection(out)
    low, high = (10, 40) if stall else (0, 30)
    if not low <= seconds < high:
        raise AssertionError(f"detected after {seconds:.1f} s, expected [{low}, {high})")
    return {"detection_s": round(seconds, 2)}


def drop(work: Path, references: dict[str, Path]) -> dict:
    lost = ["--client_failures", "drop"]
    if "drop" not in references:
        one = work / "one-drop"
        _ok(run([sys.executable, str(RUN), "--output_dir", str(one), *lost, "--fail_clients", "1", "3",
                 "--fail_from_step", "3"], _env(), 900))
        references["drop"] = one
    out = work / f"drop-{time.monotonic_ns()}"
    t0 = time.time()
    _ok(_three(out, *lost, "--stall_rank", "2", "--kill_step", "3", "--stall_seconds", "20", "--ddp_timeout", "10"))
    diff = _adapter_diff(references["drop"], out)
    if diff > 1e-5:
        raise AssertionError(f"adapters differ from the one-process run by {diff}")
    result = json.loads((out / "result.json").read_text())
    return {"max_abs_diff": diff, "train_runtime_s": result["train_runtime"], "launch_s": round(time.time() - t0, 1)}


def machine(work: Path) -> dict:
    out = work / f"machines-{time.monotonic_ns()}"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(TWO_MACHINES),
              "--num_processes", "4", "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port())]
    script = [str(RUN), "--output_dir", str(out), "--client_failures", "drop", "--kill_rank", "3", "--kill_step", "3",
              "--ddp_timeout", "10"]
    logs = [work / f"{out.name}-machine{r}.err" for r in (0, 1)]
    with open(logs[0], "w") as err0, open(logs[1], "w") as err1:
        launches = [subprocess.Popen([*launch, "--machine_rank", str(r), *script], env=_env(),
                                     stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
                    for r, err in ((0, err0), (1, err1))]
        try:
            launches[1].wait(timeout=600)
            deadline = time.monotonic() + 600
            while not (out / "result.json").is_file():
                if time.monotonic() > deadline or launches[0].poll() not in (None, 0):
                    server = [line for line in logs[0].read_text().splitlines() if line.startswith("[rank0]")]
                    raise AssertionError("machine 0 did not finish: " + "\n".join(server)[-3000:])
                time.sleep(1)
            finished = time.time()
            time.sleep(2)  # the result file is whole; machine 0's launcher now waits in the exit barrier
        finally:
            for launched in launches:
                kill_group(launched)
    stderr = logs[0].read_text()
    lost = sorted(int(n) for n in re.findall(r"^Going on without process (\d+)", stderr, re.MULTILINE))
    result = json.loads((out / "result.json").read_text())
    if launches[1].returncode == 0 or 3 not in lost or result["global_step"] != 8:
        raise AssertionError(f"machine 1 exit {launches[1].returncode}, lost {lost}, {result['global_step']} steps")
    killed = float((out / "killed_at").read_text())
    return {"machine1_exit": launches[1].returncode, "lost_processes": lost, "steps": result["global_step"],
            "finished_after_kill_s": round(finished - killed, 1)}


SCENARIOS = {"equality": equality, "kill": failure, "stall": failure, "drop": drop, "machine": machine}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--scenarios", nargs="+", default=["equality", "kill", "stall"], choices=list(SCENARIOS))
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "stress_multiprocess.json"))
    cli = parser.parse_args()
    torch.set_num_threads(1)
    records, references = [], {}
    started, cpu_started = time.time(), os.times()
    with tempfile.TemporaryDirectory(prefix="stress-") as tmp:
        for i in range(cli.runs):
            algorithm = ALGORITHMS[i % len(ALGORITHMS)]
            arguments = {"equality": {"algorithm": algorithm, "references": references}, "kill": {"stall": False},
                         "stall": {"stall": True}, "drop": {"references": references}, "machine": {}}
            for name in cli.scenarios:
                scenario, kwargs = SCENARIOS[name], arguments[name]
                t0 = time.time()
                try:
                    record = {"run": i, "scenario": name, "ok": True, **scenario(Path(tmp), **kwargs)}
                except Exception as error:  # noqa: BLE001 -- a failure is a result here: count it and go on
                    record = {"run": i, "scenario": name, "ok": False, "error": str(error)[-1500:],
                              "trace": traceback.format_exc()[-1500:]}
                record["wall_s"] = round(time.time() - t0, 1)
                records.append(record)
                print(json.dumps({k: v for k, v in record.items() if k != "trace"}), flush=True)
    cpu = os.times()
    failures = [r for r in records if not r["ok"]]
    summary = {
        "runs": cli.runs, "launches": len(records), "failures": len(failures),
        "by_scenario": {s: sum(1 for r in failures if r["scenario"] == s) for s in cli.scenarios},
        "wall_s": round(time.time() - started, 1),
        "children_cpu_s": round(cpu.children_user + cpu.children_system - cpu_started.children_user
                                - cpu_started.children_system, 1),
        "note": "2-core machine shared with other jobs; wall times include start-up under that load",
        "records": records,
    }
    Path(cli.output).parent.mkdir(parents=True, exist_ok=True)
    Path(cli.output).write_text(json.dumps(summary, indent=1))
    print(f"{len(failures)} failures in {cli.runs} runs ({len(records)} launches); "
          f"{summary['by_scenario']}; wall {summary['wall_s']} s")


if __name__ == "__main__":
    main()
