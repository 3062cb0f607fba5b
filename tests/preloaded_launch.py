"""Launch a script on N processes forked from one that has already imported it, as ``accelerate launch`` would
start it with ``accelerate_configs/cpu_3_processes.yaml`` (torchrun's launcher), for tests that are not about the
launcher.

    PYTHONPATH=. python tests/preloaded_launch.py --num_processes 3 --main_process_port P \
        tests/distributed_run.py --output_dir D

Each process of a launch imports torch, transformers, PEFT and the library: about 6.5 CPU-seconds, several
times what a tiny run costs. Here the launcher imports the script's modules once (the script runs with
``__name__ != "__main__"``, so only its imports and definitions), then forks every rank, which runs the script as
``__main__`` in torchrun's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ..., the rendezvous store kept
by the launcher as torchrun's agent keeps it). As torchrun does, once a process fails the launcher stops the
others (SIGTERM, then SIGKILL) and exits non-zero, naming it.

Forking is safe here because nothing has run a parallel region or started a thread before the fork (checked:
the launcher refuses to fork with threads running). The launcher itself is tested by the GPU smoke script's CPU
pass, which launches with ``accelerate launch``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import runpy
import signal
import sys
import threading
import time
import traceback
from datetime import timedelta


ENVIRONMENT = {  # what accelerate launch adds for the CPU config besides the ranks (ACCELERATE_*, torchrun's)
    "ACCELERATE_DYNAMO_BACKEND": "NO", "ACCELERATE_DYNAMO_MODE": "default", "ACCELERATE_DYNAMO_USE_FULLGRAPH": "False",
    "ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION": "False", "ACCELERATE_MIXED_PRECISION": "no",
    "GROUP_RANK": "0", "GROUP_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1",
    "ROLE_NAME": "default", "TORCHELASTIC_MAX_RESTARTS": "0", "TORCHELASTIC_RESTART_COUNT": "0",
    "TORCHELASTIC_RUN_ID": "none", "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
}


def _run_rank(script: str, argv: list[str], rank: int, world_size: int, port: int) -> None:
    os.environ.update(ENVIRONMENT, MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      ROLE_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
                      ROLE_WORLD_SIZE=str(world_size))
    sys.argv = [script, *argv]
    try:
        runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if not isinstance(stop.code, (int, type(None))):
            print(stop.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush(), sys.stderr.flush()
    raise SystemExit(code)  # the normal interpreter exit (atexit handlers), as the process ends under torchrun


def _stop(children: dict[int, int], grace: float) -> None:
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while children and time.monotonic() < deadline:
        pid, _ = os.waitpid(-1, os.WNOHANG)
        if pid:
            children.pop(pid, None)
        else:
            time.sleep(0.1)
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with status {os.WEXITSTATUS(status)}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_processes", type=int, required=True)
    parser.add_argument("--main_process_port", type=int, required=True)
    parser.add_argument("--monitor_interval", type=float, default=0.5,
                        help="seconds between checks of the processes, as torchrun's")
    parser.add_argument("script")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    cli = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    runpy.run_path(cli.script, run_name="__preload__")  # the imports, paid once
    import torch.distributed as dist

    if threading.active_count() > 1:
        raise SystemExit(f"preloaded_launch: {threading.active_count() - 1} thread(s) started while importing "
                         f"{cli.script}; forking now is unsafe, launch it with accelerate launch")
    # Trainer.train() collects garbage over the ~500k objects of the imports (~0.5 CPU-s a run); frozen, they are
    # skipped, and the forked processes share their pages instead of copying them on the collector's first pass.
    gc.collect()
    gc.freeze()
    sys.stdout.flush(), sys.stderr.flush()
    children: dict[int, int] = {}
    for rank in range(cli.num_processes):
        pid = os.fork()
        if pid == 0:
            _run_rank(cli.script, cli.args, rank, cli.num_processes, cli.main_process_port)
        children[pid] = rank
    try:  # the rendezvous store, where torchrun's agent keeps it (the ranks retry until it is up)
        store = dist.TCPStore("127.0.0.1", cli.main_process_port, cli.num_processes, True, wait_for_workers=False,
                              timeout=timedelta(minutes=30))
    except Exception as error:
        _stop(children, grace=0)
        print(f"preloaded_launch: could not serve the store on port {cli.main_process_port}: {error}",
              file=sys.stderr)
        return 1
    failed = None
    while children and failed is None:
        time.sleep(cli.monitor_interval)
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if not pid:
                break
            rank = children.pop(pid)
            if status != 0:
                failed = f"process {rank} {_describe(status)}"
                break
    if failed:
        _stop(children, grace=30)
        print(f"preloaded_launch: {failed}; the other processes were stopped", file=sys.stderr)
    del store
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
