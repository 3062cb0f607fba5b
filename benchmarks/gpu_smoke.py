"""Smoke test for the first machine with GPUs: the multi-process paths, on NCCL, in a few launches.

    bash benchmarks/gpu_smoke.sh                 # every GPU of this machine (2-8), NCCL
    bash benchmarks/gpu_smoke.sh --quick         # CPU, 3 processes on gloo: the reduced pass CI runs

Launches (tests/distributed_run.py, and the E2E recipe), all with the same seed and data:

1. one process (on one GPU): the reference, with int8 activations, seeded client failures and ``"drop"``;
2. N processes, the same settings, a checkpoint at global step 4, and process 0 spending longer than
   ``ddp_timeout`` in its first evaluation;
3. N processes resuming from that checkpoint;
4. the recipe's tiny preset with ``--bf16 true``: central pre-training, reference and a compared SplitFed-V2 run
   on process 0, then the federated run, evaluation and generation, every result written once;
5. N processes with ``"drop"``, the last process stopping between the header and the payload of an upload;
6. N processes with ``"raise"``, the last process killed.

Each check prints one line: PASS or FAIL, its name, what it compared (with the figures), and what a GPU run must
show. The results, with wall and CPU time, go to ``benchmarks/results/gpu_smoke.json`` (``gpu_smoke_quick.json``
with ``--quick``; ``--output``).
``--quick`` is the same checks on CPU with fewer steps (3 processes; 2 for the killed process, whose run needs no
survivor). Exits 1 if any check failed. ``--launcher preloaded`` (CPU only; what the test suite uses) starts the
processes of each launch from one that has imported the script (``tests/preloaded_launch.py``, torchrun's
environment) instead of ``accelerate launch``: the same checks for a third of the start-up time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository root, for the tests/ helpers
from tests.processes import accelerate_launch, preloaded_launch, run  # noqa: E402


RUN = ROOT / "tests" / "distributed_run.py"
RECIPE = ROOT / "recipes" / "gpt2m_e2e.py"
GPU_TOLERANCE = 1e-4  # max |adapter difference|: GPU kernels (attention backward) need not be bitwise reproducible
CPU_TOLERANCE = 1e-5  # measured 0.0 on CPU


@dataclass
class Check:
    name: str
    passed: bool
    compared: str
    gpu_must_show: str

    def line(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'} {self.name}: {self.compared} | a GPU run must show: " \
               f"{self.gpu_must_show}"


@dataclass
class Setup:
    device: str  # "cuda" or "cpu"
    processes: int
    timeout: int  # ddp_timeout, seconds
    max_steps: int
    work: Path
    launcher: str = "accelerate"  # or "preloaded" (CPU)

    @property
    def tolerance(self) -> float:
        return GPU_TOLERANCE if self.device == "cuda" else CPU_TOLERANCE

    @property
    def clients(self) -> int:
        return max(4, self.processes - 1)

    def config(self) -> Path:
        name = "eight_gpus.yaml" if self.device == "cuda" else "cpu_3_processes.yaml"
        return ROOT / "accelerate_configs" / name


def _env(one_gpu: bool = False) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", CUBLAS_WORKSPACE_CONFIG=":4096:8")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    if one_gpu:  # a lone process seeing several GPUs would be wrapped in DataParallel by Trainer
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    return env


def _launch(setup: Setup, processes: int, script_and_args: list[str], timeout: float = 900,
            monitor_interval: float = 0.5):
    """``monitor_interval=5`` where a process dies: see :func:`tests.processes.accelerate_launch`."""
    if setup.launcher == "preloaded":
        return preloaded_launch(script_and_args, _env(), timeout, processes=processes,
                                monitor_interval=monitor_interval)
    return accelerate_launch(setup.config(), ["--num_processes", str(processes), *script_and_args], _env(), timeout,
                             monitor_interval=monitor_interval)


def _train(setup: Setup, out: Path, *extra: str, processes: int | None = None, monitor_interval: float = 0.5):
    args = [str(RUN), "--output_dir", str(out), "--num_clients", str(setup.clients), "--max_steps",
            str(setup.max_steps), *extra]
    if processes == 1:
        return run([sys.executable, *args], _env(one_gpu=True), timeout=900)
    return _launch(setup, processes or setup.processes, args, monitor_interval=monitor_interval)


def _result(out: Path) -> dict:
    path = out / "result.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _adapter_diff(a: Path, b: Path) -> float:
    try:
        x, y = (load_file(str(d / "final" / "adapter_model.safetensors")) for d in (a, b))
    except FileNotFoundError:
        return math.inf
    return max(float((x[k].float() - y[k].float()).abs().max()) for k in x) if x.keys() == y.keys() else math.inf


def _tail(done) -> str:
    """What failed in a launch that did not exit 0: the process the launcher names and how it ended, and the first
    error line (empty if it exited 0)."""
    if done.returncode == 0:
        return ""
    root = re.search(r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)[^\n]*?(SIG\w+)?\)?\n", done.stderr,
                     re.S)
    ended = f"process {root.group(1)} exited {root.group(2)} {root.group(3) or ''}".strip() + "; " if root else ""
    errors = [line for line in done.stderr.splitlines()
              if re.match(r"(\[rank\d+\]:\s*)?([\w.]*(Error|Exception): |terminate called)", line)]
    first = (errors or done.stderr.strip().splitlines()[-1:] or [""])[0]
    return f"[{ended}{first.strip()[:300]}]"


def _logged(result: dict, key: str) -> list:
    return [h[key] for h in result.get("log_history", []) if key in h]


# ---------------------------------------------------------------- the checks
SHARED = ["--client_failures", "drop", "--simulate_client_failures", "0.15", "--smashed_codec", "int8"]
STALL_STEP = 3


def _stall(setup: Setup, last: int, seconds: int) -> list[str]:
    return ["--stall_payload_rank", str(last), "--stall_payload_step", str(STALL_STEP), "--stall_seconds",
            str(seconds), "--ddp_timeout", str(setup.timeout)]


def _stall_check(setup: Setup, done, result: dict, last: int, seconds: int) -> Check:
    named = f"process {last} is out of the run: the smashed message of client" in done.stderr
    left = f"process {last} was dropped from the run at" in done.stderr
    dropped = _logged(result, "dropped_clients")
    ok = done.returncode == 0 and named and left and bool(dropped) and dropped[-1] > 0 and \
        "watchdog" not in done.stderr.lower()
    return Check("stalled_process_drop", ok,
                 f"process {last} stops {seconds} s after an upload's header at global step {STALL_STEP}, "
                 f"ddp_timeout {setup.timeout} s: exit {done.returncode}, named lost: {named}, left with status 0: "
                 f"{left}, dropped_clients {dropped}, {result.get('global_step')} global steps {_tail(done)}",
                 "the server gives up on the posted NCCL receive, aborts the data group at the end of the step and "
                 "forms it again (bound to each GPU); no watchdog; the run finishes")


def reference_and_processes(setup: Setup, with_stall: bool) -> list[Check]:
    """One process, N processes (checkpoint, slow first evaluation), resume. ``with_stall`` (the quick pass): the
    last process also stops between a header and its payload at global step 3 in the N-process runs, and its
    clients fail from that step on in the one-process run, which then gives the same result."""
    one, many, resumed = setup.work / "one", setup.work / "processes", setup.work / "resumed"
    slow, last, checkpoint = setup.timeout + 5, setup.processes - 1, 2 if with_stall else 4
    clients = [c for c in range(setup.clients) if 1 + c % (setup.processes - 1) == last]
    reference, stall = [], []
    # The stalled process wakes (timeout + 5 s after the header) while process 0 is still in its slow first
    # evaluation (which ends at least timeout + slow after the header), never while process 0 is exiting.
    stalled = setup.timeout + 5
    if with_stall:
        reference = ["--fail_clients", *map(str, clients), "--fail_from_step", str(STALL_STEP)]
        stall = _stall(setup, last, stalled)
    done_one = _train(setup, one, *SHARED, *reference, processes=1)
    done_many = _train(setup, many, *SHARED, *stall, "--save_steps", str(checkpoint), "--ddp_timeout",
                       str(setup.timeout), "--slow_eval_seconds", str(slow))
    done_resumed = _train(setup, resumed, *SHARED, *stall, "--save_steps", str(checkpoint), "--resume",
                          str(many / f"checkpoint-{checkpoint}"), "--slow_eval_seconds", str(slow))
    a, b, c = _result(one), _result(many), _result(resumed)
    diff, diff_resumed = _adapter_diff(one, many), _adapter_diff(many, resumed)
    ledgers = [r.get("ledger", {}) for r in (a, b, c)]
    resumed_equal = bool(c) and ledgers[1] == ledgers[2]
    # A lost process is sent no more client models: with the stall only the uploads match the one-process run's.
    ledger_equal = resumed_equal and (ledgers[0].get("up") == ledgers[1].get("up") if with_stall
                                      else ledgers[0] == ledgers[1])
    ledger = ("uploads equal" if with_stall else "ledger equal") if ledger_equal else "bytes different"
    up = ledgers[1].get("by_kind", {}).get("smashed_up", 0)
    dropped = [_logged(r, "dropped_clients") for r in (a, b)]
    if with_stall:  # counted once when their process is lost, every round when they fail: compare the seeded ones
        seeded_ok = bool(dropped[1]) and dropped[1][-1] > len(clients) and diff <= setup.tolerance
        seeded = f"dropped_clients {dropped[1]}: more than the {len(clients)} clients of the lost process, with the " \
                 "one-process adapters"
    else:
        seeded_ok = dropped[0] == dropped[1] and bool(dropped[1]) and dropped[1][-1] > 0
        seeded = f"dropped_clients logged {dropped[1]} vs one process {dropped[0]}"
    p = setup.processes
    checks = [
        Check("one_process", done_one.returncode == 0 and bool(a),
              f"1 process on {setup.device}: exit {done_one.returncode}, {a.get('global_step')} global steps, eval "
              f"loss {a.get('eval', {}).get('eval_loss', float('nan')):.4f} {_tail(done_one)}",
              "exit 0 on one GPU (the reference of the next checks)"),
        Check("processes_equal", done_many.returncode == 0 and diff <= setup.tolerance and ledger_equal,
              f"{p} processes vs 1: max |adapter difference| {diff:.2e} (tolerance {setup.tolerance:.0e}), {ledger} "
              f"({ledgers[1].get('up', 0):,} bytes up) {_tail(done_many)}",
              f"payloads on NCCL between {p} GPUs give the adapters of one GPU within {GPU_TOLERANCE:.0e} and the "
              "same bytes"),
        Check("resume", done_resumed.returncode == 0 and diff_resumed <= setup.tolerance and resumed_equal,
              f"{p} processes resumed at global step {checkpoint} vs uninterrupted: max |adapter difference| "
              f"{diff_resumed:.2e}, ledger {'equal' if resumed_equal else 'different'} {_tail(done_resumed)}",
              "each process reloads its share of the checkpoint onto its own GPU; same adapters and bytes"),
        Check("codec", done_many.returncode == 0 and up > 0 and diff <= setup.tolerance,
              f"int8 activations: {up:,} bytes of smashed uploads, the same across processes as in one",
              "int8 codes and bf16 scales cross NCCL as uint8 buffers and decode to the one-GPU values"),
        Check("dropped_client", done_many.returncode == 0 and seeded_ok,
              f"seeded client failures ('drop'): {seeded}",
              "the same clients dropped at the same steps as on one GPU"),
        Check("slow_process_zero", done_many.returncode == 0,
              f"process 0 spent {slow} s in its first evaluation, ddp_timeout {setup.timeout} s: exit "
              f"{done_many.returncode} (the others waited on the store, without a collective deadline)",
              "no NCCL watchdog timeout on the waiting processes while process 0 evaluates"),
    ]
    return checks + ([_stall_check(setup, done_many, b, last, stalled)] if with_stall else [])


def recipe(setup: Setup, quick: bool) -> list[Check]:
    """Launch 4: the recipe, bf16, central stage on process 0, generation."""
    out = setup.work / "recipe"
    steps, mrs = ("4", "2") if quick else ("20", "8")
    args = [str(RECIPE), "--preset", "tiny", "--output_dir", str(out), "--bf16", "true", "--max_steps", steps,
            "--local_steps", "2", "--eval_every_rounds", "1", "--num_clients", str(max(10, setup.processes - 1)),
            "--pretrain_steps", "10" if quick else "50", "--pretrain_fraction", "0.3", "--reference", "centralized",
            "--max_generation_mrs", mrs, "--max_new_tokens", "8" if quick else "24", "--num_beams", "2" if quick
            else "4", "--ddp_timeout", str(setup.timeout), "--disable_tqdm", "true", "--compare_algorithms",
            "splitfed_v2", "--compare_max_steps", "2"]
    if setup.device == "cpu":  # bf16 on CPU needs it said (the central stage runs in a process of its own)
        args += ["--use_cpu", "true"]
    started = time.monotonic()
    done = _launch(setup, setup.processes, args)
    seconds = time.monotonic() - started
    metrics = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").is_file() else {}
    central = metrics.get("centralized", {}).get("runtime_seconds", float("nan"))
    compared = metrics.get("compared", {}).get("splitfed_v2", {})
    ok = (done.returncode == 0 and metrics.get("processes") == setup.processes
          and metrics.get("placement", "").startswith("process 0: server; process 1: clients")
          and metrics.get("training_args", {}).get("bf16") is True and metrics.get("global_steps") == int(steps)
          and math.isfinite(metrics.get("eval_loss", math.nan)) and metrics.get("num_generation_mrs") == int(mrs)
          and metrics.get("bleu") is not None and metrics.get("comm_bytes", 0) > 0
          and compared.get("global_steps") == 2 and done.stdout.count("Results (") == 1
          and (out / "adapter_model.safetensors").is_file() and (out / "loss_vs_comm.png").is_file())
    return [Check("recipe_bf16_generation", ok,
                  f"recipe --preset tiny --bf16 true on {setup.processes} processes: exit {done.returncode}, eval "
                  f"loss {metrics.get('eval_loss', float('nan')):.3f}, BLEU {metrics.get('bleu') or math.nan:.4f}, "
                  f"{metrics.get('num_generation_mrs')} of {mrs} mrs generated, centralized reference "
                  f"{central:.0f} s on process 0 (ddp_timeout {setup.timeout} s), SplitFed-V2 beside it "
                  f"{compared.get('global_steps')} of 2 steps, results written {done.stdout.count('Results (')} "
                  f"time(s), {seconds:.0f} s in all {_tail(done)}",
                  "bf16 autocast on every GPU, generation on GPU 0 while the other processes finish, and no "
                  "watchdog during the central stage")]


def stalled_process(setup: Setup) -> list[Check]:
    """"drop", the last process stops between a header and its payload (a launch of its own in the full pass)."""
    out, last = setup.work / "stalled", setup.processes - 1
    extra = []
    if setup.processes == 2:  # the run goes on only with clients left: put half of them on the server's process
        extra = ["--client_ranks", *[str(c % 2) for c in range(setup.clients)]]
    done = _train(setup, out, "--client_failures", "drop", *_stall(setup, last, 3 * setup.timeout), *extra)
    return [_stall_check(setup, done, _result(out), last, 3 * setup.timeout)]


def killed_process(setup: Setup, processes: int) -> list[Check]:
    """Launch 6: "raise", the last process killed."""
    out, last = setup.work / "killed", processes - 1
    done = _train(setup, out, "--kill_rank", str(last), "--kill_step", "3", "--ddp_timeout", str(setup.timeout),
                  processes=processes, monitor_interval=5)
    pattern = rf"FederationCommError: the server's process could not (receive|send) the \w+ message of client \d+ " \
              rf"(from|to) process {last} "
    named = re.search(pattern, done.stderr) is not None
    try:
        seconds = float((out / "failed_at").read_text()) - float((out / "killed_at").read_text())
    except FileNotFoundError:
        seconds = math.inf
    ok = done.returncode != 0 and named and seconds < setup.timeout and "watchdog" not in done.stderr.lower()
    return [Check("killed_process_raise", ok,
                  f"process {last} of {processes} killed: exit {done.returncode}, the server named it: {named}, "
                  f"{seconds:.1f} s after the kill (ddp_timeout {setup.timeout} s)",
                  "FederationCommError naming the dead process well before ddp_timeout (seen on the gloo control "
                  "group), never an NCCL watchdog abort")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU, 3 processes, fewer steps (what CI runs)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None,
                        help="default: cuda with 2 or more GPUs (CPU with --quick)")
    parser.add_argument("--processes", type=int, default=None, help="default: every GPU (at most 8); 3 on CPU")
    parser.add_argument("--ddp_timeout", type=int, default=None, help="seconds; default 30 on GPUs, 10 on CPU")
    parser.add_argument("--launcher", choices=["accelerate", "preloaded"], default="accelerate",
                        help="accelerate launch, or (CPU only) processes forked from one that imported the script")
    parser.add_argument("--output", default=None,
                        help="default: benchmarks/results/gpu_smoke.json (gpu_smoke_quick.json with --quick)")
    cli = parser.parse_args(argv)
    gpus = torch.cuda.device_count()
    device = cli.device or ("cpu" if cli.quick or gpus < 2 else "cuda")
    if device == "cuda" and gpus < 2:
        parser.error(f"--device cuda needs 2 or more GPUs, this machine has {gpus}; use --quick for the CPU pass")
    if cli.launcher == "preloaded" and device != "cpu":
        parser.error("--launcher preloaded starts CPU processes only; launch on GPUs with accelerate (the default)")
    processes = cli.processes or (min(gpus, 8) if device == "cuda" else 3)
    timeout = cli.ddp_timeout or (30 if device == "cuda" else 10)
    started, cpu = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    checks: list[Check] = []
    with tempfile.TemporaryDirectory(prefix="gpu_smoke-") as work:
        setup = Setup(device, processes, timeout, 8, Path(work), cli.launcher)
        print(f"gpu_smoke: {processes} processes on {device} ({'quick' if cli.quick else 'full'} pass), "
              f"ddp_timeout {timeout} s", flush=True)
        stages = [lambda: reference_and_processes(setup, with_stall=cli.quick), lambda: recipe(setup, cli.quick),
                  lambda: killed_process(setup, 2 if cli.quick else processes)]
        if not cli.quick:
            stages.insert(2, lambda: stalled_process(setup))
        for stage in stages:
            for check in stage():
                checks.append(check)
                print(check.line(), flush=True)
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    summary = {"device": device, "processes": processes, "quick": cli.quick, "ddp_timeout": timeout,
               "launcher": cli.launcher,
               "passed": sum(c.passed for c in checks), "checks": [asdict(c) for c in checks],
               "wall_seconds": round(time.time() - started, 1),
               "cpu_seconds": round(used.ru_utime + used.ru_stime - cpu.ru_utime - cpu.ru_stime, 1),
               "gpus": [torch.cuda.get_device_name(i) for i in range(gpus)], "torch": torch.__version__}
    print(f"gpu_smoke: {summary['passed']} of {len(checks)} checks passed in {summary['wall_seconds']:.0f} s "
          f"({summary['cpu_seconds']:.0f} CPU-seconds in the launched processes)", flush=True)
    output = Path(cli.output or ROOT / "benchmarks" / "results" / f"gpu_smoke{'_quick' * cli.quick}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(summary, indent=1) + "\n")
    return 0 if all(c.passed for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
