"""Peak memory of each process: one process holding every party, and three (server + two client processes).

    python benchmarks/memory.py                  # fp32 and bf16, 1 and 3 processes
    python benchmarks/memory.py --dtypes fp32    # one precision only

The GPT-2 medium architecture (24 blocks, width 1024, 16 heads, the 50,257-token vocabulary) with random
weights, written once to a temporary directory as safetensors and then loaded by path, as a user would
(``FSLSageTrainer(model=<dir>, model_init_kwargs={"dtype": ...})``). FSL-SAGE with LoRA r 4 on the
attention projection (``c_attn``), cut after block 0, 3 auxiliary blocks, 10 clients; ``--steps`` local
steps (default one round of one step: batch 1 of 32 random tokens per client, an upload and a one-epoch
alignment per client), so that every party, optimizer state and alignment buffer exists. fp32 took
1.8 CPU-minutes in one process and 2.3 in three (summed over the processes) on 2 cores.

Each process reports its peak resident memory (``ru_maxrss``), its resident memory after the imports
(what Python, torch and transformers cost before any model exists), ``torch.cuda.max_memory_allocated``
on a GPU, and the bytes of the parameters it holds, by party (a tensor shared by several parties counts
once, with the first). Prints a table and writes ``benchmarks/results/memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]

GPT2_MEDIUM = {"n_layer": 24, "n_embd": 1024, "n_head": 16, "n_positions": 1024, "vocab_size": 50257}
SEQUENCE, CLIENTS = 32, 10


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb / 1024


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


# ---------------------------------------------------------------- inside one process
def write_model(directory: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPT2Config(**GPT2_MEDIUM))
    model.save_pretrained(directory, safe_serialization=True)


def _tensor_bytes(tensors, seen: set[int]) -> int:

    total = 0
    for t in tensors:
        if t.device.type == "meta" or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def party_bytes(trainer) -> dict[str, int]:
    """Bytes of the parameters this process holds, by party; a shared tensor counts once, with the first.

    ``client half`` is the split's client side (with the input embedding, which a tied LM head reads): the
    global client model on the server's process, the frozen weights the clients share on a client's process.
    The copies count only the tensors of their own.
    """
    import torch

    fed, seen = trainer.federation, set()
    out: dict[str, int] = {}

    def add(name: str, modules) -> None:
        out[name] = sum(_tensor_bytes(m.parameters(), seen) for m in modules if m is not None)

    algo = trainer.algorithm
    add("client half", [fed.split.client])
    add("server half", [fed.split.server])
    add("client models (own tensors)", [c.model and c.model.module for c in fed.clients])
    add("client auxiliary models (own tensors)", [a.module for a in algo.aux.values()])
    add("server auxiliary models (own tensors)", [s.aux.module for s in algo.server_aux.values()])
    add("rest of the model", [trainer.model])
    out["all parameters"] = sum(out.values())
    optimizers = [p.optimizer for p in trainer.parties().values()] + [s.optimizer for s in algo.server_aux.values()]
    out["optimizer states"] = _tensor_bytes([t for o in optimizers for s in o.state.values() for t in s.values()
                                             if isinstance(t, torch.Tensor) and t.dim() > 0], set())
    return out


def _role(placement) -> str:
    if not placement.is_distributed:
        return "everything"
    held = [c for c in range(CLIENTS) if placement.holds_client(c)]
    return ("server" if placement.is_server else "") + (f"clients {held}" if held else "")


def worker(model_dir: str, dtype_name: str, steps: int, out_dir: str) -> None:
    import torch

    after_imports_probe = _rss_mb()
    import datasets
    from peft import LoraConfig

    from hf_fsl_sage import FSLSageConfig, FSLSageTrainer

    torch.set_num_threads(1)
    after_imports = _rss_mb()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    g = torch.Generator().manual_seed(0)
    rows = CLIENTS * steps
    ids = torch.randint(0, GPT2_MEDIUM["vocab_size"], (rows, SEQUENCE), generator=g).tolist()
    train = datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * SEQUENCE] * rows, "labels": ids})

    def collate(batch):
        return {k: torch.tensor([row[k] for row in batch]) for k in batch[0]}

    args = FSLSageConfig(
        output_dir=os.path.join(out_dir, "run"), num_clients=CLIENTS, local_steps=steps, max_steps=steps,
        per_device_train_batch_size=1, cut_layer=1, aux_num_layers=3, server_update_interval=steps,
        align_interval=1, align_epochs=1, align_buffer_size=1, warmup_steps=0, report_to="none",
        save_strategy="no", logging_steps=1000, disable_tqdm=True, seed=0,
    )
    lora = LoraConfig(r=4, lora_alpha=32, lora_dropout=0.1, target_modules=["c_attn"], fan_in_fan_out=True)
    started = time.time()
    trainer = FSLSageTrainer(model=model_dir, args=args, train_dataset=train, data_collator=collate,
                             peft_config=lora, model_init_kwargs={"dtype": dtype})
    built, peak_setup = time.time(), _peak_rss_mb()
    trainer.train()
    result = {
        "rank": trainer.placement.rank,
        "role": _role(trainer.placement),
        "peak_rss_mb": _peak_rss_mb(), "peak_rss_setup_mb": peak_setup, "rss_after_imports_mb": after_imports,
        "rss_before_imports_mb": after_imports_probe, "rss_end_mb": _rss_mb(), "setup_seconds": built - started,
        "train_seconds": time.time() - built, "cpu_seconds": sum(os.times()[:2]),
        "parameter_bytes": party_bytes(trainer),
        "smashed_dtype": str(trainer.federation.split.client.input_embeddings().weight.dtype),
        "ledger": trainer.federation.transport.ledger.state_dict() if trainer.placement.is_server else None,
    }
    if torch.cuda.is_available():
        result["cuda_max_memory_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    Path(out_dir, f"rank{trainer.placement.rank}.json").write_text(json.dumps(result, indent=1))


# ---------------------------------------------------------------- driver
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(command: list[str]) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    done = subprocess.run(command, check=False, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")


def measure(model_dir: str, dtype: str, processes: int, steps: int, tmp: str) -> list[dict]:
    out = Path(tmp, f"{dtype}-{processes}")
    out.mkdir()
    script = [str(Path(__file__).resolve()), "--worker", "--model_dir", model_dir, "--dtype", dtype,
              "--steps", str(steps), "--out", str(out)]
    if processes == 1:
        _run([sys.executable, *script])
    else:
        _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "accelerate_configs" / "cpu_3_processes.yaml"), "--num_processes", str(processes),
              "--main_process_port", str(_free_port()), *script])
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "memory.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model_dir", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--write_model", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.write_model:
        write_model(opts.write_model)
        return {}
    if opts.worker:
        worker(opts.model_dir, opts.dtype, opts.steps, opts.out)
        return {}

    started = time.time()
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.join(tmp, "gpt2-medium-random")
        _run([sys.executable, __file__, "--write_model", model_dir])
        for dtype in opts.dtypes:
            for processes in (1, 3):
                runs[f"{dtype}, {processes} process{'es' if processes > 1 else ''}"] = measure(
                    model_dir, dtype, processes, opts.steps, tmp)
    result = {"model": GPT2_MEDIUM, "clients": CLIENTS, "cut_layer": 1, "aux_num_layers": 3, "lora_r": 4,
              "steps": opts.steps, "cpu_count": os.cpu_count(), "wall_seconds": time.time() - started, "runs": runs}
    for dtype in opts.dtypes:
        single = runs.get(f"{dtype}, 1 process")
        for p in runs.get(f"{dtype}, 3 processes", []):
            p["peak_rss_vs_one_process"] = p["peak_rss_mb"] / single[0]["peak_rss_mb"]
    Path(opts.output).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.output).write_text(json.dumps(result, indent=1))
    print(f"{'run':<20} {'process':<22} {'peak RSS MB':>11} {'x one':>6} {'after imports':>13} {'params MB':>9}")
    for name, procs in runs.items():
        for p in procs:
            params = p["parameter_bytes"]["all parameters"] / 2**20
            ratio = p.get("peak_rss_vs_one_process")
            print(f"{name:<20} {p['role']:<22} {p['peak_rss_mb']:>11.0f} {'' if ratio is None else f'{ratio:.2f}':>6} "
                  f"{p['rss_after_imports_mb']:>13.0f} {params:>9.0f}")
    print(f"{time.time() - started:.0f} s")
    return result


if __name__ == "__main__":
    main()
