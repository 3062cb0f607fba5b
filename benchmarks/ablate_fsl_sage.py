"""FSL-SAGE's own settings, one at a time, at the same communication budget: what limits its quality per byte.

    python benchmarks/ablate_fsl_sage.py            # LoRA/IID variants, and round lengths with full fine-tuning
    python benchmarks/ablate_fsl_sage.py --quick    # smoke run

Same data, base model, clients and seed as ``compare_algorithms.py`` (its preset, its helpers); every variant
changes one setting of the reference (the benchmark's FSL-SAGE settings) and runs to the same budget. Reports the
eval loss at 25/50/100 % of the budget, the held-out gradient cosine (the auxiliary model the client used against
the server's true gradient, on each upload before it is buffered), the alignment's in-sample cosine after
fitting, the share of the bytes that went into auxiliary models, and wall and CPU time. Writes
``ablate_fsl_sage[_quick].json`` under ``--output-dir``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import compare_algorithms as bench
import torch
from transformers.utils import logging as hf_logging


# One change each from the reference; the LoRA/IID setting unless the name says full fine-tuning. Names that start
# with "CSE-FSL" or "SplitFed-V2" run that algorithm with the same settings, as the baselines to beat.
VARIANTS: dict[str, dict] = {
    "reference": {},
    "CSE-FSL": {},
    "align_epochs=0 (no alignment)": {"align_epochs": 0},
    "aux_trainable=all": {"aux_trainable": "all"},
    "aux_trainable=all, align_learning_rate=3e-4": {"aux_trainable": "all", "align_learning_rate": 3e-4},
    "aux_init=random, aux_trainable=all": {"aux_init": "random", "aux_trainable": "all"},
    "CSE-FSL, aux_init=random, aux_trainable=all": {"aux_init": "random", "aux_trainable": "all"},
    "aux_init=random, aux_trainable=all, align_interval=4": {"aux_init": "random", "aux_trainable": "all",
                                                             "align_interval": 4},
    "aux_num_layers=1": {"aux_num_layers": 1},
    "aux_num_layers=3": {"aux_num_layers": 3},
    "CSE-FSL, aux_num_layers=3": {"aux_num_layers": 3},
    "align_epochs=1": {"align_epochs": 1},
    "align_epochs=15": {"align_epochs": 15},
    "align_buffer_size=48": {"align_buffer_size": 48},
    "align_learning_rate=3e-4": {"align_learning_rate": 3e-4},
    "align_learning_rate=1e-2": {"align_learning_rate": 1e-2},
    "align_interval=1": {"align_interval": 1},
    "align_interval=4": {"align_interval": 4},
    "local_steps=25": {"local_steps": 25},
    "CSE-FSL, local_steps=25": {"local_steps": 25},
}
FULL_VARIANTS: dict[str, dict] = {
    "full: reference": {}, "full: CSE-FSL": {}, "full: SplitFed-V2": {},
    "full: local_steps=25": {"local_steps": 25}, "full: CSE-FSL, local_steps=25": {"local_steps": 25},
    "full: SplitFed-V2, local_steps=25": {"local_steps": 25},
}
BASELINES = {"CSE-FSL": "cse_fsl", "SplitFed-V2": "splitfed_v2"}


def algorithm_of(name: str) -> str:
    short = name.removeprefix("full: ")
    return next((algorithm for prefix, algorithm in BASELINES.items() if short.startswith(prefix)), "fsl_sage")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bench.common_options(parser)
    parser.add_argument("--variants", nargs="+", default=None, help="names of VARIANTS / FULL_VARIANTS to run")
    opts = parser.parse_args(argv)
    torch.set_num_threads(opts.threads)
    hf_logging.set_verbosity_error()
    cfg = bench.preset(opts)
    out_dir = Path(opts.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "ablate_fsl_sage_quick" if opts.quick else "ablate_fsl_sage"
    variants = {**{k: (True, v) for k, v in VARIANTS.items()}, **{k: (False, v) for k, v in FULL_VARIANTS.items()}}
    if opts.variants:
        variants = {k: variants[k] for k in opts.variants}

    started = time.time()
    results, init_args, _ = bench.prepare(opts, cfg)
    tasks = {name: (algorithm_of(name), lora, "iid", opts.seed, tuple(sorted(over.items())))
             for name, (lora, over) in variants.items()}
    done = bench.run_all(list(tasks.values()), opts.jobs, init_args, out_dir / f"{stem}.partial.jsonl", opts.resume)
    rows = {}
    for name, task in tasks.items():
        run = done[task]
        at = bench.summarize(run, results["base"]["eval_loss"], results["base"]["eval_loss"])["loss_at_fraction"]
        aux_bytes = sum(v for k, v in run["bytes_by_kind"].items() if k.startswith("aux_model"))
        rows[name] = {"algorithm": task[0], "lora": task[1], "overrides": dict(task[4]),
                      **{f"loss_at_{f}": at[str(f)] for f in at}, "aux_bytes_share": aux_bytes / run["total_bytes"],
                      **run}
    results.update(variants=rows, seconds=time.time() - started)
    (out_dir / f"{stem}.json").write_text(json.dumps(results, indent=1))
    (out_dir / f"{stem}.partial.jsonl").unlink(missing_ok=True)
    print(table(rows, cfg))
    print(f"\ntotal {results['seconds'] / 60:.1f} min wall; wrote {out_dir / (stem + '.json')}")
    return results


def table(rows: dict, cfg: dict) -> str:
    budget = cfg["budget_mb"]
    width = max(len("variant"), *map(len, rows)) + 2
    head = (f"{'variant':<{width}}{'@25%':>8}{'@50%':>8}{'@100%':>8}{'held-out cos':>13}{'align cos':>10}"
            f"{'aux bytes':>10}{'server upd':>11}{'steps':>7}{'wall s':>8}{'CPU s':>7}")
    title = f"FSL-SAGE ablation at {budget['lora']:g} MB (LoRA) / {budget['full']:g} MB (full fine-tuning), IID"
    lines = [title, head]

    def loss(r: dict, f: float) -> str:
        cell = r[f"loss_at_{f}"]
        return f"{cell['eval_loss']:.4f}" + ("" if cell["reached"] else "*")

    for name, r in rows.items():
        cos = "—" if r["heldout_cosine"] is None else f"{r['heldout_cosine']:.3f}"
        align = "—" if r["align_cosine_after"] is None else f"{r['align_cosine_after']:.3f}"
        lines.append(f"{name:<{width}}{loss(r, 0.25):>8}{loss(r, 0.5):>8}{loss(r, 1.0):>8}{cos:>13}{align:>10}"
                     f"{r['aux_bytes_share']:>10.1%}{r['server_updates']:>11}{r['global_steps']:>7}"
                     f"{r['train_seconds']:>8.0f}{r['cpu_seconds']:>7.0f}")
    lines.append("* stopped at the step cap before that fraction of the budget.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
