"""Flower against torch.distributed on the same tiny run: seconds per global step and what dominates them, and the
bytes on the wire against the ledger.

    python benchmarks/flower.py            # deployment engine against accelerate launch (about 10 min on 2 idle cores)
    python benchmarks/flower.py --quick    # Flower's messages on an in-process grid: bytes only (seconds; CI)

The run is the tests' Flower app (``tests/flower_app``: a GPT-2 of 3 blocks of width 32 over the E2E sample, LoRA,
4 clients on 2 SuperNodes, batch 4, 2 local steps per round, an upload every step, FSL-SAGE aligning every round)
for FSL-SAGE and SplitFed-V2, 8 global steps (4 with ``--quick``). For each algorithm:

- **torch.distributed**: ``tests/distributed_run.py`` with the same settings under ``accelerate launch
  --config_file accelerate_configs/cpu_3_processes.yaml`` (the server's process and two client processes).
- **Flower deployment** (not with ``--quick``): ``flwr run`` of the app on a SuperLink and two SuperNodes
  started here; the SuperNodes reach the SuperLink through a TCP relay in this process that counts every byte
  each way (the messages, and the polling, heartbeats and app download around them).
- **Flower messages**: the same run on an in-process grid (``tests/flower_grid.py``), which measures each
  message in Flower's protobuf form: the payload Flower sends, without HTTP and polling.

Printed and written to ``benchmarks/results/flower[_quick].json``: training seconds per global step (Trainer's
``train_runtime``) both ways and the difference; per Flower exchange, where its seconds went (the node's process
start with its imports, the trainer's build, the steps, the answer's encoding, and Flower's queueing and polling)
and the CPU seconds of the node's ClientApp process; CPU seconds of each whole run (all its processes); the
ledger, the protobuf bytes and the TCP bytes with their ratios to the ledger; whether the adapters equal.
On a shared machine the wall-clock figures are not timings: compare the CPU seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import tempfile
import threading
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for the tests/ helpers
from tests.processes import accelerate_launch  # noqa: E402


ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "accelerate_configs" / "cpu_3_processes.yaml"
PARTS = ("start", "build", "steps", "answer", "flower")


class Relay:
    """A TCP relay from a port on 127.0.0.1 to ``port`` that counts the bytes of each direction."""

    def __init__(self, port: int):
        self.target, self.bytes, self.lock = port, {"to_superlink": 0, "from_superlink": 0}, threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            node, _ = self.listener.accept()
            link = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pipe, args=(node, link, "to_superlink"), daemon=True).start()
            threading.Thread(target=self._pipe, args=(link, node, "from_superlink"), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, direction: str) -> None:
        try:
            while data := source.recv(1 << 16):
                with self.lock:
                    self.bytes[direction] += len(data)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def _tree_cpu(pid: int) -> float:
    """CPU seconds of process ``pid``, its live descendants and the children they have reaped."""
    import psutil

    try:
        root = psutil.Process(pid)
        total = 0.0
        for process in [root, *root.children(recursive=True)]:
            t = process.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        return total
    except psutil.NoSuchProcess:
        return 0.0


def _adapters(directory: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(directory / "final" / "adapter_model.safetensors"))


def _max_difference(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _train_seconds(result: dict) -> float:
    return next(h["train_runtime"] for h in result["log_history"] if "train_runtime" in h)


def _ledger(result: dict) -> int:
    return result["ledger"]["up"] + result["ledger"]["down"]


def _exchanges(timings: list[dict]) -> dict:
    """Mean seconds per exchange of each part, and the part that dominates."""
    count = max(len(timings), 1)
    mean = {k: sum(t[k] for t in timings) / count for k in (*PARTS, "total", "cpu")}
    return {"count": len(timings), "mean_seconds": mean, "dominant": max(PARTS, key=mean.get)}


def distributed(algorithm: str, settings: dict, out: Path) -> dict:
    """The run under ``accelerate launch`` with three processes."""
    args = [str(ROOT / "tests" / "distributed_run.py"), "--output_dir", str(out), "--algorithm", algorithm,
            "--max_steps", str(settings["max-steps"]), "--local_steps", str(settings["local-steps"]),
            "--num_clients", str(settings["num-clients"]), "--align_interval", str(settings["align-interval"]),
            "--n_embd", str(settings["n-embd"]), "--eval_steps", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = accelerate_launch(CONFIG, args, env, timeout=3600)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"accelerate launch failed:\n{done.stderr[-3000:]}")
    result = json.loads((out / "result.json").read_text())
    result["cpu_seconds"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return result


def deployed(algorithm: str, settings: dict, home: Path) -> dict:
    """The run on the deployment engine: a SuperLink, two SuperNodes behind a counting relay, ``flwr run``."""
    from tests.flower_federation import Federation

    with Federation(home) as federation:
        federation.superlink()
        relay = Relay(federation.port)
        federation.supernode("node1", relay.port), federation.supernode("node2", relay.port)
        process = federation.launch("run", **settings, algorithm=algorithm, **{"output-dir": str(home / "out")})
        status = process.wait(3600)
        cpu = sum(_tree_cpu(p.pid) for name, p in federation.processes.items() if name != "run")
        if status != 0:
            raise SystemExit(f"flwr run failed:\n{federation.log('run')[-3000:]}")
    result = json.loads((home / "out" / "result.json").read_text())
    result.update(cpu_seconds=cpu, tcp_bytes=dict(relay.bytes))
    return result


def in_process(algorithm: str, settings: dict, out: Path) -> dict:
    """The run on the in-process grid, which counts each message's protobuf bytes."""
    from flwr.app import Context, RecordDict

    from tests.flower_grid import InProcessGrid
    from tests.helpers import load_script

    app = load_script(ROOT / "tests" / "flower_app" / "tiny_split_app.py", "tiny_split_app")
    config = {**_app_config(), **settings, "algorithm": algorithm, "output-dir": str(out)}
    grid = InProcessGrid(app.client_app, 2, config)
    app.server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    return {**json.loads((out / "result.json").read_text()), "protobuf_bytes": grid.wire_bytes}


def _app_config() -> dict:
    import tomli

    return tomli.loads((ROOT / "tests" / "flower_app" / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the in-process grid only, 4 global steps (CI)")
    parser.add_argument("--algorithms", nargs="+", default=["fsl_sage", "splitfed_v2"])
    parser.add_argument("--max_steps", type=int, default=None, help="default 8, or 4 with --quick")
    parser.add_argument("--n_embd", type=int, default=32, help="the model's width: the activations' size")
    parser.add_argument("--output", default=None, help="default benchmarks/results/flower[_quick].json")
    opts = parser.parse_args(argv)
    output = Path(opts.output or ROOT / "benchmarks" / "results" / f"flower{'_quick' if opts.quick else ''}.json")
    steps = opts.max_steps or (4 if opts.quick else 8)
    settings = {"max-steps": steps, "local-steps": 2, "num-clients": 4, "align-interval": 1, "n-embd": opts.n_embd}
    results = {"settings": settings, "quick": opts.quick, "cpu_count": os.cpu_count(), "algorithms": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for algorithm in opts.algorithms:
            row: dict = {}
            grid = in_process(algorithm, settings, Path(tmp, algorithm, "grid"))
            ledger = _ledger(grid)
            row.update(ledger_bytes=ledger, protobuf_bytes=grid["protobuf_bytes"],
                       protobuf_to_ledger=grid["protobuf_bytes"] / ledger, exchanges=grid["exchanges"])
            if not opts.quick:
                torch_run = distributed(algorithm, settings, Path(tmp, algorithm, "torch"))
                flower_run = deployed(algorithm, settings, Path(tmp, algorithm, "flower"))
                tcp = sum(flower_run["tcp_bytes"].values())
                row.update(
                    seconds_per_step_torch_distributed=_train_seconds(torch_run) / steps,
                    seconds_per_step_flower=_train_seconds(flower_run) / steps,
                    cpu_seconds_torch_distributed=torch_run["cpu_seconds"],
                    cpu_seconds_flower=flower_run["cpu_seconds"],
                    flower_exchanges=_exchanges(flower_run["timings"]), tcp_bytes=flower_run["tcp_bytes"],
                    tcp_to_ledger=tcp / ledger, tcp_beyond_protobuf_per_exchange=(tcp - grid["protobuf_bytes"]) /
                    flower_run["exchanges"], ledgers_equal=_ledger(torch_run) == _ledger(flower_run) == ledger,
                    max_abs_adapter_difference=_max_difference(_adapters(Path(tmp, algorithm, "torch")),
                                                               _adapters(Path(tmp, algorithm, "flower", "out"))),
                )
                row["overhead_seconds_per_step"] = row["seconds_per_step_flower"] - \
                    row["seconds_per_step_torch_distributed"]
            results["algorithms"][algorithm] = row
            _print(algorithm, row)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=1))
    return results


def _print(algorithm: str, row: dict) -> None:
    print(f"{algorithm}: ledger {row['ledger_bytes']:,} B; Flower messages (protobuf) {row['protobuf_bytes']:,} B = "
          f"{row['protobuf_to_ledger']:.3f}x; {row['exchanges']} exchanges")
    if "tcp_bytes" not in row:
        return
    tcp = row["tcp_bytes"]
    print(f"  TCP between SuperNodes and SuperLink: {tcp['to_superlink']:,} B up + {tcp['from_superlink']:,} B down "
          f"= {row['tcp_to_ledger']:.3f}x the ledger ({row['tcp_beyond_protobuf_per_exchange']:,.0f} B per exchange "
          f"beyond the messages: HTTP, polling, heartbeats); ledgers equal: {row['ledgers_equal']}; adapters max "
          f"difference {row['max_abs_adapter_difference']:.1e}")
    print(f"  seconds per global step: torch.distributed {row['seconds_per_step_torch_distributed']:.2f}, Flower "
          f"{row['seconds_per_step_flower']:.2f} (+{row['overhead_seconds_per_step']:.2f}); CPU seconds of the run: "
          f"{row['cpu_seconds_torch_distributed']:.0f} vs {row['cpu_seconds_flower']:.0f}")
    ex = row["flower_exchanges"]
    parts = ", ".join(f"{k} {ex['mean_seconds'][k]:.2f}" for k in PARTS)
    print(f"  per exchange ({ex['count']}): {ex['mean_seconds']['total']:.2f} s = {parts}; dominated by "
          f"{ex['dominant']}; CPU of the node's ClientApp process {ex['mean_seconds']['cpu']:.2f} s")


if __name__ == "__main__":
    main()
