"""Time the same federated split run in one process and in three (server on process 0, clients on 1 and 2).

    python benchmarks/placement.py            # about 1 min on 2 CPU cores

Runs ``tests/distributed_run.py`` (FSL-SAGE, LoRA, a GPT-2 with 4 blocks of width 128 over the E2E
sample's 774 tokens, 4 clients, batch 8, 80 global steps: 8 rounds of 10 local steps, an upload every 5,
an alignment every 2 rounds) with ``python`` and with ``accelerate launch
--config_file accelerate_configs/cpu_3_processes.yaml``, each with one torch thread per process. Prints
and writes ``benchmarks/results/placement.json``: training seconds (Trainer's ``train_runtime``), the
largest difference between the final adapter weights, and whether the byte counts are equal.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for the tests/ helpers
from tests.processes import accelerate_launch, run  # noqa: E402


ROOT = Path(__file__).resolve().parents[1]


def _result(done, command: list[str], out: Path) -> dict:
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads((out / "result.json").read_text())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max_steps", type=int, default=80)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "placement.json"))
    opts = parser.parse_args(argv)
    from safetensors.torch import load_file

    script = [str(ROOT / "tests" / "distributed_run.py"), "--n_layer", "4", "--n_embd", "128", "--batch", "8",
              "--max_steps", str(opts.max_steps), "--local_steps", "10", "--server_update_interval", "5",
              "--align_interval", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    config = ROOT / "accelerate_configs" / "cpu_3_processes.yaml"
    with tempfile.TemporaryDirectory() as tmp:
        # Each launch in its own process group, killed whole on any exit; the launcher's port is retried if taken.
        single = [sys.executable, *script, "--output_dir", str(Path(tmp, "one"))]
        one = _result(run(single, env, timeout=3600), single, Path(tmp, "one"))
        three_args = [*script, "--output_dir", str(Path(tmp, "three"))]
        three = _result(accelerate_launch(config, three_args, env, timeout=3600), three_args, Path(tmp, "three"))
        a, b = (load_file(str(Path(tmp, d, "final", "adapter_model.safetensors"))) for d in ("one", "three"))
        diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    result = {
        "max_steps": opts.max_steps, "cpu_count": os.cpu_count(),
        "train_seconds_one_process": one["train_runtime"], "train_seconds_three_processes": three["train_runtime"],
        "speedup": one["train_runtime"] / three["train_runtime"], "max_abs_weight_difference": diff,
        "bytes_equal": one["ledger"] == three["ledger"], "comm_bytes": one["ledger"]["up"] + one["ledger"]["down"],
        "placement": three["placement"],
    }
    Path(opts.output).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.output).write_text(json.dumps(result, indent=1))
    print(f"one process:    {result['train_seconds_one_process']:.1f} s training")
    print(f"three processes: {result['train_seconds_three_processes']:.1f} s training ({result['placement']}); "
          f"speed-up {result['speedup']:.2f}x")
    print(f"max |weight difference| {diff:.2e}; bytes equal: {result['bytes_equal']} ({result['comm_bytes']:,} bytes)")
    return result


if __name__ == "__main__":
    main()
