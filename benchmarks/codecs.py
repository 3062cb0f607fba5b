"""Activation codecs for FSL-SAGE and SplitFed-V2, and FSL-SAGE's training time against centralized training.

    python benchmarks/codecs.py                  # 2 seeds x 2 algorithms x 5 codecs + 3 timings
    python benchmarks/codecs.py --quick          # smoke scale

The set-up, data, base model and helpers are those of ``budget_setup.py``
(its preset, LoRA, IID), every run to the preset's step cap with no byte
budget, so that codecs compare at equal steps. For each algorithm and each
``smashed_codec`` it reports the bytes of the smashed messages per token that
travelled, whole (hidden states with their scales, row lengths, labels; padding
never travels) and of the activations alone, the same for SplitFed's gradients, the eval loss at equal steps (the
end of the run) and at equal bytes (every run's curve read, by linear
interpolation, at the smallest total bytes any codec of that algorithm reached),
and the time profile per global step (``time/*`` of the train metrics).

Then, in one process, back to back and ``--repeats`` times: a centralized PEFT
``Trainer`` on the unsplit model (same LoRA config, data, batch size, learning
rate and number of examples), FSL-SAGE, and FSL-SAGE without its held-out
gradient cosine (a diagnostic), none evaluating while it trains;
it reports wall and CPU seconds per training token (tokens = non-padding
positions of every batch the run trained on). Writes ``codecs[_quick].json``
under ``--output-dir`` (default ``benchmarks/results``) and prints the tables.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import multiprocessing
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch
from budget_setup import (  # beside this script: the equal-budget set-up's helpers
    _WORKER,
    _init_worker,
    common_options,
    fed_args,
    federated,
    lora_config,
    plain_trainer,
    prepare,
    preset,
)
from transformers import set_seed
from transformers.utils import logging as hf_logging

from hf_fsl_sage import FSLSageTrainer
from hf_fsl_sage.federation.schedule import GlobalStepDataset
from hf_fsl_sage.transport.base import payload_nbytes
from hf_fsl_sage.transport.codecs import CODECS


ROOT = Path(__file__).resolve().parents[1]


ALGORITHMS = ["fsl_sage", "splitfed_v2"]
CODEC_NAMES = ["none", "bf16", "fp16", "int8", "int4"]


# ---------------------------------------------------------------- one run
def schedule_tokens(trainer) -> dict[str, int]:
    """Non-padding tokens the clients trained on, and those (and all positions) of the batches they uploaded."""
    steps = GlobalStepDataset(trainer.schedule, trainer.train_dataset, trainer.data_collator)
    out = {"train_tokens": 0, "upload_tokens": 0, "upload_positions": 0}
    for step in range(trainer.state.global_step or trainer.args.max_steps):
        item = steps[step]
        uploads = trainer.algorithm.uploads_at(item["round"], item["local_step"])
        for batch in item["clients"].values():
            kept = int(batch["attention_mask"].sum())
            out["train_tokens"] += kept
            if uploads:
                out["upload_tokens"] += kept
                out["upload_positions"] += batch["attention_mask"].numel()
    return out


def _task(task: tuple[str, str, int]) -> tuple[tuple[str, str, int], dict[str, Any]]:
    """A codec run ``(algorithm, codec, seed)``, or ``("timing", repeat, seed)``: centralized then FSL-SAGE."""
    algorithm, codec, seed = task
    w = _WORKER
    if algorithm == "timing":
        return task, time_pair(w["cfg"], w["base"], w["data"], w["collator"], seed)
    with tempfile.TemporaryDirectory() as tmp:
        row = federated(w["cfg"], w["base"], w["data"], w["collator"], algorithm, True, "iid", seed, tmp,
                        overrides={"smashed_codec": codec, "max_comm_bytes": None}, inspect=schedule_tokens)
    kinds = row["bytes_by_kind"]
    # what the same uploads cost before padding was dropped: fp32 hidden, bool mask and int64 labels everywhere
    row["padded_fp32_bytes_per_token"] = row["upload_positions"] * (4 * w["cfg"]["n_embd"] + 9) / row["upload_tokens"]
    row["smashed_bytes_per_token"] = kinds.get("smashed_up", 0) / row["upload_tokens"]
    # the activations alone (codes and scales of one kept position, exact: tests/test_codecs.py); the rest of
    # each message is row lengths and labels
    row["activation_bytes_per_token"] = payload_nbytes(CODECS[codec].encode(torch.zeros(1, w["cfg"]["n_embd"])))
    row["gradient_bytes_per_token"] = kinds.get("gradient_down", 0) / row["upload_tokens"]
    return task, row


def loss_at_bytes(curve: list[dict[str, float]], budget: float) -> float | None:
    """Eval loss at ``budget`` cumulative bytes, linearly interpolated between evaluations (None if never reached)."""
    for a, b in itertools.pairwise(curve):
        if a["bytes"] <= budget <= b["bytes"]:
            t = 0.0 if b["bytes"] == a["bytes"] else (budget - a["bytes"]) / (b["bytes"] - a["bytes"])
            return a["eval_loss"] + t * (b["eval_loss"] - a["eval_loss"])
    return None


# ---------------------------------------------------------------- timing against centralized training
class CountingCollator:
    """The benchmark's collator, counting the non-padding tokens of every batch it builds."""

    def __init__(self, collator):
        self.collator, self.tokens = collator, 0

    def __call__(self, rows):
        batch = self.collator(rows)
        self.tokens += int(batch["attention_mask"].sum())
        return batch


def time_centralized(cfg, base, data, collator, seed: int) -> dict[str, float]:
    """A plain PEFT Trainer on the unsplit model, as many examples as FSL-SAGE's clients see, no evaluation."""
    from peft import get_peft_model

    set_seed(seed)
    model = get_peft_model(copy.deepcopy(base).train(), lora_config())
    counting = CountingCollator(collator)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = plain_trainer(model, tmp, data["train"], counting, cfg["max_steps"] * cfg["num_clients"],
                                cfg["batch"], cfg["lr_lora"], seed, cfg["warmup_steps"], "constant_with_warmup")
        start, cpu = time.time(), time.process_time()
        trainer.train()
        wall, cpu = time.time() - start, time.process_time() - cpu
    return {"wall_seconds": wall, "cpu_seconds": cpu, "tokens": counting.tokens}


def time_fsl_sage(cfg, base, data, collator, seed: int, **overrides: Any) -> dict[str, Any]:
    """FSL-SAGE to the step cap, no byte budget, no evaluation; ``overrides`` are FSLSageConfig fields."""
    set_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        args = fed_args(cfg, "fsl_sage", True, "iid", seed, tmp, 0, {"max_comm_bytes": None, "eval_strategy": "no",
                                                                      "logging_strategy": "no", **overrides})
        trainer = FSLSageTrainer(model=copy.deepcopy(base).train(), args=args, train_dataset=data["train"],
                                 data_collator=collator, peft_config=lora_config())
        start, cpu = time.time(), time.process_time()
        metrics = trainer.train().metrics
        wall, cpu = time.time() - start, time.process_time() - cpu
        tokens = schedule_tokens(trainer)["train_tokens"]
    return {"wall_seconds": wall, "cpu_seconds": cpu, "tokens": tokens,
            "time_per_step": {k[5:]: v for k, v in metrics.items() if k.startswith("time/")}}


def time_pair(cfg, base, data, collator, seed: int) -> dict[str, Any]:
    """Centralized, FSL-SAGE, and FSL-SAGE without the held-out cosine (a diagnostic), back to back in this
    process: seconds per training token, alignment's share."""
    runs = {"centralized": time_centralized(cfg, base, data, collator, seed),
            "fsl_sage": time_fsl_sage(cfg, base, data, collator, seed),
            "fsl_sage_no_heldout": time_fsl_sage(cfg, base, data, collator, seed, aux_heldout_cosine=False)}
    per = {k: {m: r[m] / r["tokens"] for m in ("wall_seconds", "cpu_seconds")} for k, r in runs.items()}
    out = {**runs, "per_token": per}
    for name in ("fsl_sage", "fsl_sage_no_heldout"):
        profile = runs[name]["time_per_step"]
        suffix = "" if name == "fsl_sage" else "_no_heldout"
        out["align_share" + suffix] = profile.get("align", 0.0) / max(sum(profile.values()), 1e-12)
        out["ratio_wall" + suffix] = per[name]["wall_seconds"] / per["centralized"]["wall_seconds"]
        out["ratio_cpu" + suffix] = per[name]["cpu_seconds"] / per["centralized"]["cpu_seconds"]
    return out


# ---------------------------------------------------------------- report
def summarise(done: dict[tuple[str, str, int], dict[str, Any]], seeds: list[int],
              codecs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for algorithm in ALGORITHMS:
        rows = {codec: [done[(algorithm, codec, s)] for s in seeds] for codec in codecs}
        budget = min(r["total_bytes"] for runs in rows.values() for r in runs)
        base_smashed = statistics.mean(r["smashed_bytes_per_token"] for r in rows["none"])
        base_activation = rows["none"][0]["activation_bytes_per_token"]
        base_loss = [r["final_eval_loss"] for r in rows["none"]]
        table = {}
        for codec, runs in rows.items():
            finals = [r["final_eval_loss"] for r in runs]
            at_budget = [loss_at_bytes(r["curve"], budget) for r in runs]
            parts = {k: statistics.mean(r["time_per_step"][k] for r in runs) for k in runs[0]["time_per_step"]}
            padded = statistics.mean(r["padded_fp32_bytes_per_token"] for r in runs)
            smashed = statistics.mean(r["smashed_bytes_per_token"] for r in runs)
            activation = runs[0]["activation_bytes_per_token"]
            table[codec] = {
                "smashed_bytes_per_token": smashed,
                "activation_bytes_per_token": activation, "metadata_bytes_per_token": smashed - activation,
                "activation_ratio_to_none": activation / base_activation,
                "gradient_bytes_per_token": statistics.mean(r["gradient_bytes_per_token"] for r in runs),
                "smashed_ratio_to_none": statistics.mean(r["smashed_bytes_per_token"] for r in runs) / base_smashed,
                "smashed_ratio_to_padded_fp32": statistics.mean(r["smashed_bytes_per_token"] for r in runs) / padded,
                "total_bytes": statistics.mean(r["total_bytes"] for r in runs),
                "final_eval_loss": finals, "final_eval_loss_mean": statistics.mean(finals),
                "loss_change_vs_none_pct": [100 * (f / b - 1) for f, b in zip(finals, base_loss)],
                "eval_loss_at_budget": at_budget, "time_per_step": parts,
                "train_seconds": [r["train_seconds"] for r in runs],
            }
        out[algorithm] = {"byte_budget": budget, "codecs": table}
    return out


def codec_table(summary: dict[str, Any]) -> str:
    lines = []
    for algorithm, s in summary.items():
        lines.append(f"\n== {algorithm}: equal-bytes budget {s['byte_budget'] / 1e6:.2f} MB")
        lines.append(f"{'codec':<6} {'B/token up':>10} {'x none':>7} {'activ.':>7} {'x none':>7} {'meta':>5} "
                     f"{'B/token grad':>12} {'loss (seeds)':>22} {'d% vs none':>16} {'loss @budget':>22} "
                     f"{'s/step':>7}")
        for codec, r in s["codecs"].items():
            losses = " ".join(f"{v:.4f}" for v in r["final_eval_loss"])
            change = " ".join(f"{v:+.2f}" for v in r["loss_change_vs_none_pct"])
            budget = " ".join("-" if v is None else f"{v:.4f}" for v in r["eval_loss_at_budget"])
            lines.append(f"{codec:<6} {r['smashed_bytes_per_token']:>10.1f} {r['smashed_ratio_to_none']:>7.3f} "
                         f"{r['activation_bytes_per_token']:>7.0f} {r['activation_ratio_to_none']:>7.3f} "
                         f"{r['metadata_bytes_per_token']:>5.2f} {r['gradient_bytes_per_token']:>12.1f} {losses:>22} "
                         f"{change:>16} {budget:>22} "
                         f"{sum(r['time_per_step'].values()):>7.3f}")
    return "\n".join(lines)


def timing_table(timing: dict[str, Any]) -> str:
    lines = [f"\n== per training token (microseconds), {len(timing['runs'])} back-to-back repeats"]
    for run in timing["runs"]:
        cells = []
        for name in ("centralized", "fsl_sage", "fsl_sage_no_heldout"):
            r = run[name]
            cells.append(f"{name} wall {1e6 * r['wall_seconds'] / r['tokens']:.1f} cpu "
                         f"{1e6 * r['cpu_seconds'] / r['tokens']:.1f}")
        lines.append(" | ".join(cells) + f" | ratio cpu {run['ratio_cpu']:.2f} ({run['ratio_cpu_no_heldout']:.2f} "
                     f"without held-out cosine), wall {run['ratio_wall']:.2f} ({run['ratio_wall_no_heldout']:.2f}); "
                     f"alignment {100 * run['align_share']:.0f} % ({100 * run['align_share_no_heldout']:.0f} %)")
    for name in ("fsl_sage", "fsl_sage_no_heldout"):
        profile = timing["runs"][-1][name]["time_per_step"]
        total = sum(profile.values())
        lines.append(f"{name} seconds per global step: " + ", ".join(
            f"{k} {v:.4f} ({100 * v / total:.0f} %)" for k, v in profile.items() if v))
    return "\n".join(lines)


# ---------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_options(parser)
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="training seeds (data and base: --seed); default 0 1, or 0 with --quick")
    parser.add_argument("--codecs", nargs="+", default=CODEC_NAMES, help="codecs to run ('none' among them)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timings of centralized then FSL-SAGE, back to back in one process each")
    parser.add_argument("--part", choices=["all", "codecs", "timing"], default="all",
                        help="run only the codec runs or only the timing (written to codecs[_quick]_<part>.json)")
    opts = parser.parse_args(argv)
    torch.set_num_threads(opts.threads)
    hf_logging.set_verbosity_error()
    cfg = preset(opts)
    opts.seeds = opts.seeds or ([0] if opts.quick else [0, 1])
    out_dir = Path(opts.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = ("codecs_quick" if opts.quick else "codecs") + ("" if opts.part == "all" else f"_{opts.part}")
    unknown = set(opts.codecs) - set(CODECS)
    if unknown or "none" not in opts.codecs:
        parser.error(f"--codecs: unknown {sorted(unknown)}, or 'none' (the reference) missing")

    started = time.time()
    results, init_args, _ = prepare(opts, cfg)
    results["config"].update(seeds=opts.seeds, codecs=opts.codecs, quick=opts.quick, partition="iid", lora=True,
                             byte_budget=None)

    tasks = []
    if opts.part != "codecs":  # first: each is two runs in a row
        tasks += [("timing", str(r), 0) for r in range(opts.repeats)]
    if opts.part != "timing":
        tasks += [(a, c, s) for s in opts.seeds for a in ALGORITHMS for c in opts.codecs]
    done: dict[tuple[str, str, int], dict[str, Any]] = {}
    with ProcessPoolExecutor(opts.jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_init_worker, initargs=init_args) as pool:
        for future in as_completed([pool.submit(_task, t) for t in tasks]):
            task, row = future.result()
            done[task] = row
            partial = {**results, "partial": {"/".join(map(str, k)): v for k, v in done.items()}}
            (out_dir / f"{stem}_partial.json").write_text(json.dumps(partial, indent=1))
            if task[0] == "timing":
                print(f"[{len(done)}/{len(tasks)}] timing {task[1]}: fsl_sage / centralized per token: wall "
                      f"{row['ratio_wall']:.2f}, cpu {row['ratio_cpu']:.2f}", flush=True)
            else:
                print(f"[{len(done)}/{len(tasks)}] {task}: eval loss {row['final_eval_loss']:.4f}, "
                      f"{row['smashed_bytes_per_token']:.1f} B/token up, {row['train_seconds']:.0f} s", flush=True)
    codec_runs = {k: v for k, v in done.items() if k[0] != "timing"}
    if codec_runs:
        results["runs"] = {"/".join(map(str, k)): v for k, v in sorted(codec_runs.items())}
        results["codecs"] = summarise(codec_runs, opts.seeds, opts.codecs)
        print(codec_table(results["codecs"]))
    runs = [done[k] for k in sorted(done) if k[0] == "timing"]
    if runs:
        keys = [f"{k}{s}" for k in ("ratio_wall", "ratio_cpu", "align_share") for s in ("", "_no_heldout")]
        results["timing"] = {"runs": runs, **{f"{k}_median": statistics.median(r[k] for r in runs) for k in keys}}
        print(timing_table(results["timing"]))
    results["seconds"] = time.time() - started
    (out_dir / f"{stem}.json").write_text(json.dumps(results, indent=1))
    print(f"\ntotal {results['seconds'] / 60:.1f} min; wrote {out_dir / (stem + '.json')}")
    return results


if __name__ == "__main__":
    main()
