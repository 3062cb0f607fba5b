"""FedAvg, SplitFed-V1/V2, CSE-FSL and FSL-SAGE on E2E: eval loss against the bytes each one sends.

    python benchmarks/compare_algorithms.py            # full run, about 20-25 min on 2 CPU cores
    python benchmarks/compare_algorithms.py --quick    # smoke run, under 3 min

Set-up: a small GPT-2 (6 blocks of width 128) and the real GPT-2 tokenizer, its
ids renumbered over the ~1.3k tokens that occur in the data (``--full-vocab``
keeps all 50,257 rows, which would then dominate compute and model bytes). The
E2E dev set is split by ``mr`` into a pretraining part (30 %), a training part
and an eval part (10 %), no ``mr`` in two parts. The base model is first trained
centrally with a plain ``transformers.Trainer`` on the pretraining part's
references alone, as text (a stand-in for pretraining: it knows the language,
not the data-to-text task). Every algorithm then fine-tunes a copy of that base
on the training part, spread over 5 clients, with the same seed, data and number
of global steps, in four settings: IID or Dirichlet(0.5) non-IID clients
(groups: the ``customer rating`` slot of the ``mr``), each with LoRA (r 4 on
attention) or full fine-tuning. The centralized reference is a plain ``Trainer``
on the unsplit model with the same PEFT config, data, batch size, schedule and
number of examples.

Per algorithm it reports the eval-loss curve against cumulative bytes (evaluated
every few rounds), the final eval loss, the bytes needed to first reach a
target eval loss (default: the worst final eval loss among the split methods),
and the parameters a client trains and holds. Writes
``compare_algorithms[_quick].json`` and ``.png`` under ``--output-dir``
(default ``benchmarks/results``) and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch
from transformers import (AutoModelForCausalLM, GPT2Config, Trainer, TrainerCallback, TrainingArguments,
                          set_seed)
from transformers.utils import logging as hf_logging

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hf_fsl_sage import FSLSageConfig, FSLSageTrainer  # noqa: E402
from hf_fsl_sage.e2e.data import (  # noqa: E402
    E2E_SAMPLE_PATH,
    load_e2e_csv,
    offline_gpt2_tokenizer,
    split_by_mr,
    with_mr_slot_column,
    tokenize_e2e,
    tokenize_text,
)

ALGORITHMS = ["fedavg", "splitfed_v1", "splitfed_v2", "cse_fsl", "fsl_sage"]
SPLIT_METHODS = ["splitfed_v1", "splitfed_v2", "cse_fsl", "fsl_sage"]
# The whole E2E development set where it is at hand, else the sample shipped in the package.
DEVSET = ROOT.parent / "shared" / "data" / "e2e" / "devset.csv"
DATA = DEVSET if DEVSET.is_file() else E2E_SAMPLE_PATH

FULL = dict(n_layer=6, n_embd=128, n_head=4, max_length=96, rows=None, eval_rows=256, pretrain_steps=200,
            pretrain_batch=16, pretrain_lr=2e-3, num_clients=5, batch=8, local_steps=10, max_steps=100,
            eval_every_rounds=1, lr_lora=3e-3, lr_full=1e-3, cut_layer=1, aux_num_layers=2, server_update_interval=5,
            align_interval=2, align_epochs=5, align_buffer_size=32)
QUICK = {**FULL, "n_layer": 3, "n_embd": 32, "n_head": 2, "rows": 900, "eval_rows": 48, "pretrain_steps": 10,
         "local_steps": 2, "max_steps": 4, "aux_num_layers": 1, "server_update_interval": 2, "align_interval": 1,
         "align_epochs": 1, "align_buffer_size": 8}


# ---------------------------------------------------------------- data and models
def load_data(cfg: dict[str, Any], tok, seed: int, full_vocab: bool) -> dict[str, Any]:
    """Tokenized pretraining / train / eval parts of the E2E dev set (train keeps its ``mr`` for partitioning).

    Unless ``full_vocab``, token ids are renumbered densely over the GPT-2 tokens that occur in the data
    (about 1.3k of 50,257), so the vocabulary rows stay in proportion to the blocks of a small model.
    """
    raw = load_e2e_csv(DATA)
    if cfg["rows"]:
        raw = raw.select(range(cfg["rows"]))
    parts = split_by_mr(raw, eval_fraction=0.1, test_fraction=0.3, seed=seed)
    out = {name: tokenize_e2e(parts[key], tok, max_length=cfg["max_length"])
           for name, key in (("train", "train"), ("eval", "validation"))}
    # Pretraining stand-in: plain language modelling of the references alone (no meaning representations)
    out["pretrain"] = tokenize_text(parts["test"].select_columns(["ref"]).rename_column("ref", "text"), tok,
                                    max_length=cfg["max_length"])
    names = ("pretrain", "train", "eval")
    pad, vocab = tok.eos_token_id, len(tok)
    if not full_vocab:
        used = sorted({t for name in names for row in out[name]["input_ids"] for t in row} | {tok.eos_token_id})
        index = {t: i for i, t in enumerate(used)}
        pad, vocab = index[tok.eos_token_id], len(used)
        for name in names:
            out[name] = out[name].map(lambda row: {"input_ids": [index[t] for t in row["input_ids"]],
                                                   "labels": [t if t < 0 else index[t] for t in row["labels"]]})
    out["train"] = with_mr_slot_column(out["train"].add_column("mr", parts["train"]["mr"]), "customer rating")
    if cfg["eval_rows"]:
        out["eval"] = out["eval"].select(range(min(cfg["eval_rows"], len(out["eval"]))))
    out["sizes"] = {name: len(out[name]) for name in names}
    out["vocab_size"], out["pad_id"] = vocab, pad
    return out


class PadCollator:
    """Right padding: ``input_ids`` with ``pad_id``, ``attention_mask`` with 0, ``labels`` with -100."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        return {key: torch.tensor([list(r[key]) + [fill] * (width - len(r[key])) for r in rows])
                for key, fill in (("input_ids", self.pad_id), ("attention_mask", 0), ("labels", -100))}


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=32, lora_dropout=0.1, target_modules=["c_attn"], fan_in_fan_out=True)


@torch.no_grad()
def eval_loss(model: torch.nn.Module, ds, collator, batch_size: int = 32) -> float:
    """Batch-size-weighted mean of the per-batch token-mean cross-entropy (as the Trainers report it)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(ds), batch_size):
        batch = collator([ds[i] for i in range(start, min(start + batch_size, len(ds)))])
        loss = model(**batch).loss
        total += float(loss) * batch["input_ids"].shape[0]
        count += batch["input_ids"].shape[0]
    model.train(was_training)
    return total / count


class EvalEvery(TrainerCallback):
    """Plain-Trainer callback: plain cross-entropy on the eval set every ``every`` steps."""

    def __init__(self, every: int, evaluate, curve: list[dict[str, float]]):
        self.every, self.evaluate, self.curve = every, evaluate, curve

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self.curve.append({"step": state.global_step, "bytes": 0, "eval_loss": self.evaluate(model)})


def plain_trainer(model, out_dir: str, train, collator, steps: int, batch: int, lr: float, seed: int,
                  callbacks=()) -> Trainer:
    args = TrainingArguments(output_dir=out_dir, max_steps=steps, per_device_train_batch_size=batch,
                             learning_rate=lr, weight_decay=0.01, adam_epsilon=1e-6, warmup_steps=0.05,
                             label_smoothing_factor=0.1, max_grad_norm=1.0, lr_scheduler_type="linear",
                             logging_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True,
                             seed=seed, data_seed=seed, remove_unused_columns=False)
    return Trainer(model=model, args=args, train_dataset=train.select_columns(["input_ids", "attention_mask", "labels"]),
                   data_collator=collator, callbacks=list(callbacks))


def pretrain_base(cfg: dict[str, Any], data, collator, seed: int) -> tuple[torch.nn.Module, dict[str, Any]]:
    set_seed(seed)
    config = GPT2Config(n_layer=cfg["n_layer"], n_embd=cfg["n_embd"], n_head=cfg["n_head"],
                        n_positions=max(128, cfg["max_length"]), vocab_size=data["vocab_size"],
                        bos_token_id=data["pad_id"], eos_token_id=data["pad_id"], pad_token_id=data["pad_id"])
    model = AutoModelForCausalLM.from_config(config)
    before = eval_loss(model, data["eval"], collator)
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        plain_trainer(model, tmp, data["pretrain"], collator, cfg["pretrain_steps"], cfg["pretrain_batch"],
                      cfg["pretrain_lr"], seed).train()
    info = {"eval_loss_random_init": before, "eval_loss": eval_loss(model, data["eval"], collator),
            "steps": cfg["pretrain_steps"], "seconds": time.time() - start,
            "params": sum(p.numel() for p in model.parameters())}
    return model.eval(), info


# ---------------------------------------------------------------- runs
def centralized(cfg, base, data, collator, lora: bool, seed: int) -> dict[str, Any]:
    """Plain Trainer on the unsplit model: same PEFT config, data, batch and number of examples."""
    set_seed(seed)
    model = copy.deepcopy(base).train()
    if lora:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config())
    steps = cfg["max_steps"] * cfg["num_clients"]  # every client step of the federated runs, one after another
    curve = [{"step": 0, "bytes": 0, "eval_loss": eval_loss(model, data["eval"], collator)}]
    every = cfg["local_steps"] * cfg["eval_every_rounds"] * cfg["num_clients"]
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        callback = EvalEvery(every, lambda m: eval_loss(m, data["eval"], collator), curve)
        plain_trainer(model, tmp, data["train"], collator, steps, cfg["batch"],
                      cfg["lr_lora"] if lora else cfg["lr_full"], seed, [callback]).train()
    return {"curve": curve, "final_eval_loss": curve[-1]["eval_loss"], "steps": steps,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "total_params": sum(p.numel() for p in model.parameters()), "train_seconds": time.time() - start}


class Curve(TrainerCallback):
    """Records (step, cumulative bytes, eval loss) at every evaluation of an FSLSageTrainer."""

    def __init__(self, trainer: FSLSageTrainer):
        self.trainer, self.points = trainer, []

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        ledger = self.trainer.federation.transport.ledger
        self.points.append({"step": state.global_step, "round": state.global_step // args.local_steps,
                            "bytes": ledger.total, "bytes_up": ledger.up, "bytes_down": ledger.down,
                            "eval_loss": metrics["eval_loss"]})


def client_params(trainer: FSLSageTrainer) -> tuple[int, int]:
    """(trained, held) parameters of one client: its half, plus the server half (FedAvg) and the aux model."""
    client, name, algorithm = trainer.federation.clients[0], trainer.args.algorithm, trainer.algorithm
    server_copy = [algorithm.server_copies[0].module] if name == "fedavg" else []
    aux = [algorithm.aux[0].module] if hasattr(algorithm, "aux") else []
    held = [client.model.module] + server_copy + aux
    trained = [client.model.module] + server_copy + (aux if name == "cse_fsl" else [])

    def count(modules, only_trainable: bool) -> int:
        unique = {id(p): p for m in modules for p in m.parameters() if p.requires_grad or not only_trainable}
        return sum(p.numel() for p in unique.values())

    return count(trained, True), count(held, False)


def federated(cfg, base, data, collator, algorithm: str, lora: bool, partition: str, seed: int,
              out_dir: str) -> dict[str, Any]:
    set_seed(seed)
    eval_steps = cfg["local_steps"] * cfg["eval_every_rounds"]
    args = FSLSageConfig(
        output_dir=out_dir, algorithm=algorithm, num_clients=cfg["num_clients"], local_steps=cfg["local_steps"],
        max_steps=cfg["max_steps"], partition=partition, partition_column="customer rating",
        dirichlet_alpha=0.5, per_device_train_batch_size=cfg["batch"], per_device_eval_batch_size=32,
        cut_layer=cfg["cut_layer"], aux_num_layers=cfg["aux_num_layers"],
        server_update_interval=cfg["server_update_interval"], align_interval=cfg["align_interval"],
        align_epochs=cfg["align_epochs"], align_buffer_size=cfg["align_buffer_size"],
        learning_rate=cfg["lr_lora"] if lora else cfg["lr_full"], warmup_steps=0.05,
        eval_strategy="steps", eval_steps=eval_steps, logging_strategy="no", save_strategy="no",
        report_to="none", disable_tqdm=True, seed=seed)
    trainer = FSLSageTrainer(model=copy.deepcopy(base).train(), args=args, train_dataset=data["train"],
                             eval_dataset=data["eval"], data_collator=collator,
                             peft_config=lora_config() if lora else None)
    curve = Curve(trainer)
    trainer.add_callback(curve)
    trainer.evaluate()
    start = time.time()
    trainer.train()
    seconds = time.time() - start
    if curve.points[-1]["step"] != cfg["max_steps"]:
        trainer.evaluate()
    trained, held = client_params(trainer)
    ledger = trainer.federation.transport.ledger
    alignments = [{k: h[k] for k in ("round", "align_grad_cosine_before", "align_grad_cosine_after")}
                  for h in trainer.state.log_history if "align_grad_cosine_before" in h]
    return {"curve": curve.points, "final_eval_loss": curve.points[-1]["eval_loss"], "total_bytes": ledger.total,
            "bytes_up": ledger.up, "bytes_down": ledger.down, "bytes_by_kind": dict(ledger.by_kind),
            "client_trainable_params": trained, "client_total_params": held,
            "client_sizes": [len(p) for p in trainer.schedule.partitions], "train_seconds": seconds,
            **({"alignments": alignments} if alignments else {})}


def bytes_to_reach(curve: list[dict[str, float]], target: float) -> int | None:
    return next((p["bytes"] for p in curve if p["eval_loss"] <= target), None)


# ---------------------------------------------------------------- workers
_WORKER: dict[str, Any] = {}
Task = tuple[str, bool, str]  # (algorithm or "centralized", lora, partition)


def _init_worker(cfg: dict[str, Any], seed: int, full_vocab: bool, threads: int, base_config, base_state) -> None:
    """Every worker rebuilds the same data and base model; runs then depend only on their seed."""
    torch.set_num_threads(threads)
    hf_logging.set_verbosity_error()
    data = load_data(cfg, offline_gpt2_tokenizer(), seed, full_vocab)
    base = AutoModelForCausalLM.from_config(base_config)
    base.load_state_dict(base_state)
    _WORKER.update(cfg=cfg, seed=seed, data=data, collator=PadCollator(data["pad_id"]), base=base.eval())


def _run(task: Task) -> tuple[Task, dict[str, Any]]:
    name, lora, partition = task
    w = _WORKER
    if name == "centralized":
        return task, centralized(w["cfg"], w["base"], w["data"], w["collator"], lora, w["seed"])
    with tempfile.TemporaryDirectory() as tmp:
        return task, federated(w["cfg"], w["base"], w["data"], w["collator"], name, lora, partition, w["seed"], tmp)


def run_all(tasks: list[Task], jobs: int, init_args: tuple) -> dict[Task, dict[str, Any]]:
    """Run ``tasks`` in ``jobs`` worker processes (in this process when 1), printing each as it ends."""
    done: dict[Task, dict[str, Any]] = {}

    def report(task: Task, row: dict[str, Any]) -> None:
        done[task] = row
        name, lora, partition = task
        where = f"{partition}/{'lora' if lora else 'full'}"
        print(f"[{len(done)}/{len(tasks)}] {where} {name}: eval loss {row['final_eval_loss']:.4f}, "
              f"{mb(row['curve'][-1]['bytes'])} MB, {row['train_seconds']:.0f} s", flush=True)

    if jobs <= 1:
        _init_worker(*init_args)
        for task in tasks:
            report(*_run(task))
        return done
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                             initargs=init_args) as pool:
        for future in as_completed([pool.submit(_run, task) for task in tasks]):
            report(*future.result())
    return done


# ---------------------------------------------------------------- report
def mb(n: float | None) -> str:
    return "never" if n is None else f"{n / 1e6:,.2f}"


def table(results: dict[str, Any]) -> str:
    lines = []
    for key, setting in results["settings"].items():
        c = setting["centralized"]
        lines.append(f"\n== {key}: target eval loss {setting['target_eval_loss']:.4f} "
                     f"(centralized reference: {c['final_eval_loss']:.4f}, start {c['curve'][0]['eval_loss']:.4f})")
        lines.append(f"{'algorithm':<12} {'final loss':>10} {'total MB':>10} {'MB to target':>13} "
                     f"{'client trainable':>17} {'client total':>13} {'train s':>8}")
        for name, row in setting["algorithms"].items():
            lines.append(f"{name:<12} {row['final_eval_loss']:>10.4f} {mb(row['total_bytes']):>10} "
                         f"{mb(row['bytes_to_target']):>13} {row['client_trainable_params']:>17,} "
                         f"{row['client_total_params']:>13,} {row['train_seconds']:>8.1f}")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    settings = results["settings"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 9), squeeze=False)
    for ax, (key, setting) in zip(axes.flat, settings.items()):
        for name, row in setting["algorithms"].items():
            points = [p for p in row["curve"] if p["bytes"] > 0]
            ax.plot([p["bytes"] / 1e6 for p in points], [p["eval_loss"] for p in points], marker="o", ms=3,
                    label=name)
        ax.axhline(setting["centralized"]["final_eval_loss"], color="k", ls="--", lw=1, label="centralized (0 MB)")
        ax.axhline(setting["target_eval_loss"], color="grey", ls=":", lw=1, label="target")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(key)
        ax.set_xlabel("cumulative MB on the wire (up + down)")
        ax.set_ylabel("eval loss")
        ax.grid(alpha=0.3, which="both")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny budget, to check that everything runs (< 3 min)")
    parser.add_argument("--output-dir", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--target-loss", type=float, default=None,
                        help="eval loss to reach; default: the worst final eval loss among the split methods")
    parser.add_argument("--algorithms", nargs="+", default=ALGORITHMS, choices=ALGORITHMS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--full-vocab", action="store_true",
                        help="keep GPT-2's 50,257-row vocabulary instead of the tokens that occur in the data")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel, one process each")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per process; 1 is fastest for this model size")
    opts = parser.parse_args(argv)
    torch.set_num_threads(opts.threads)
    hf_logging.set_verbosity_error()
    cfg = QUICK if opts.quick else FULL
    out_dir = Path(opts.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "compare_algorithms_quick" if opts.quick else "compare_algorithms"

    started = time.time()
    data = load_data(cfg, offline_gpt2_tokenizer(), opts.seed, opts.full_vocab)
    collator = PadCollator(data["pad_id"])
    base, base_info = pretrain_base(cfg, data, collator, opts.seed)
    print(f"data {data['sizes']}, vocabulary {data['vocab_size']}; base: eval loss {base_info['eval_loss_random_init']:.3f} -> "
          f"{base_info['eval_loss']:.3f} after {base_info['steps']} central steps ({base_info['seconds']:.0f} s)",
          flush=True)

    results: dict[str, Any] = {"config": {**cfg, "seed": opts.seed, "quick": opts.quick, "data_file": DATA.name,
                                          "data": data["sizes"], "vocab_size": data["vocab_size"],
                                          "partition_column": "customer rating", "dirichlet_alpha": 0.5,
                                          "jobs": opts.jobs, "threads": opts.threads},
                               "base": base_info, "settings": {}}
    settings = [(partition, lora) for lora in (True, False) for partition in ("iid", "dirichlet")]
    tasks = [("centralized", lora, "all") for lora in (True, False)]
    tasks += [(name, lora, partition) for partition, lora in settings for name in opts.algorithms]
    init_args = (cfg, opts.seed, opts.full_vocab, opts.threads, base.config, base.state_dict())
    done = run_all(tasks, opts.jobs, init_args)
    for partition, lora in settings:
        rows = {name: done[(name, lora, partition)] for name in opts.algorithms}
        split_finals = [rows[n]["final_eval_loss"] for n in SPLIT_METHODS if n in rows]
        target = opts.target_loss
        if target is None:
            target = max(split_finals or [r["final_eval_loss"] for r in rows.values()])
        for row in rows.values():
            row["bytes_to_target"] = bytes_to_reach(row["curve"], target)
        results["settings"][f"{partition}/{'lora' if lora else 'full'}"] = {
            "partition": partition, "lora": lora, "target_eval_loss": target,
            "centralized": done[("centralized", lora, "all")], "algorithms": rows}
    results["seconds"] = time.time() - started
    (out_dir / f"{stem}.json").write_text(json.dumps(results, indent=1))
    plot(results, out_dir / f"{stem}.png")
    print(table(results))
    print(f"\ntotal {results['seconds'] / 60:.1f} min; wrote {out_dir / (stem + '.json')} and .png")
    return results


if __name__ == "__main__":
    main()
