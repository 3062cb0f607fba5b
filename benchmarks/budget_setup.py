"""The equal-budget set-up that ``codecs.py`` and ``privacy.py`` measure on (their figures come from it).

A small GPT-2 and the real GPT-2 tokenizer, its ids renumbered over the tokens that occur in the data
(``--full-vocab`` keeps all 50,257 rows); the E2E dev set (``--data``; default ``../shared/data/e2e/devset.csv``
next to the repository when present, else the sample shipped in the package) split by ``mr`` into a pretraining
part, a training part and an eval part; the base model trained centrally on the pretraining part's references
(a stand-in for pretraining); helpers to fine-tune it federated (``federated``: until ``max_comm_bytes`` or a
global-step cap, evaluating at byte marks) or centrally (``centralized``), and the options and workers the
scripts share. The convergence benchmark, ``compare_algorithms.py``, has a set-up of its own (``e2e_runs``).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import multiprocessing
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_callback import PrinterCallback
from transformers.utils import logging as hf_logging

from e2e_task.data import (
    E2E_SAMPLE_PATH,
    load_e2e_csv,
    offline_gpt2_tokenizer,
    split_by_mr,
    tokenize_e2e,
    with_mr_slot_column,
)
from hf_fsl_sage import FSLSageConfig, FSLSageTrainer
from hf_fsl_sage.federation.data import tokenize_text


ROOT = Path(__file__).resolve().parents[1]
ALGORITHMS = ["fedavg", "splitfed_v1", "splitfed_v2", "cse_fsl", "fsl_sage"]
SEEDED = ["splitfed_v2", "cse_fsl", "fsl_sage"]  # the comparison FSL-SAGE's claim is about: several seeds
DEVSET = ROOT.parent / "shared" / "data" / "e2e" / "devset.csv"
FRACTIONS = (0.1, 0.25, 0.5, 1.0)
GAP_TARGETS = (0.8, 0.9)

FULL = {
    # model and data
    "n_layer": 4, "n_embd": 64, "n_head": 4, "max_length": 96, "rows": None, "eval_rows": 96,
    "pretrain_steps": 150, "pretrain_batch": 16, "pretrain_lr": 3e-3,
    # federation, shared by every algorithm
    "num_clients": 4, "batch": 8, "local_steps": 10, "cut_layer": 1, "server_update_interval": 5,
    "lr_lora": 3e-3, "lr_full": 1e-3, "warmup_steps": 5,
    # budget, step cap, evaluations, centralized reference
    "budget_mb": {"lora": 16.0, "full": 24.0}, "max_steps": 150, "eval_points": 6, "central_steps": 40,
    # each algorithm's own settings
    "fsl_sage": {"aux_num_layers": 2, "align_interval": 2, "align_epochs": 5, "align_buffer_size": 16},
    "cse_fsl": {"aux_num_layers": 2},
}
QUICK = {
    **FULL, "n_layer": 2, "n_embd": 32, "n_head": 2, "rows": 600, "eval_rows": 32, "pretrain_steps": 5,
    "num_clients": 2, "local_steps": 2, "server_update_interval": 2, "budget_mb": {"lora": 0.6, "full": 1.5},
    "max_steps": 12, "eval_points": 3, "central_steps": 4,
    "fsl_sage": {"aux_num_layers": 1, "align_interval": 1, "align_epochs": 1, "align_buffer_size": 4},
    "cse_fsl": {"aux_num_layers": 1},
}


# ---------------------------------------------------------------- data and models
def load_data(cfg: dict[str, Any], tok, seed: int, full_vocab: bool, path: Path) -> dict[str, Any]:
    """Tokenized pretraining / train / eval parts of the E2E dev set (train keeps its ``mr`` for partitioning).

    Unless ``full_vocab``, token ids are renumbered densely over the GPT-2 tokens that occur in the data
    (about 1.3k of 50,257), so the vocabulary rows stay in proportion to the blocks of a small model.
    """
    raw = load_e2e_csv(path)
    if cfg["rows"]:
        raw = raw.select(range(cfg["rows"]))
    parts = split_by_mr(raw, eval_fraction=0.1, test_fraction=0.3, seed=seed)
    out = {name: tokenize_e2e(parts[key], tok, max_length=cfg["max_length"])
           for name, key in (("train", "train"), ("eval", "validation"))}
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
    out["token_index"] = None if full_vocab else index  # GPT-2 id -> the id used here
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
        total += float(model(**batch).loss) * batch["input_ids"].shape[0]
        count += batch["input_ids"].shape[0]
    model.train(was_training)
    return total / count


def plain_trainer(model, out_dir: str, train, collator, steps: int, batch: int, lr: float, seed: int, warmup: int,
                  scheduler: str, callbacks=()) -> Trainer:
    args = TrainingArguments(output_dir=out_dir, max_steps=steps, per_device_train_batch_size=batch,
                             learning_rate=lr, weight_decay=0.01, adam_epsilon=1e-6, warmup_steps=warmup,
                             label_smoothing_factor=0.1, max_grad_norm=1.0, lr_scheduler_type=scheduler,
                             logging_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True,
                             seed=seed, data_seed=seed, remove_unused_columns=False,
                             dataloader_pin_memory=torch.cuda.is_available())
    columns = ["input_ids", "attention_mask", "labels"]
    return Trainer(model=model, args=args, train_dataset=train.select_columns(columns),
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
                      cfg["pretrain_lr"], seed, 0, "linear").train()
    info = {"eval_loss_random_init": before, "eval_loss": eval_loss(model, data["eval"], collator),
            "steps": cfg["pretrain_steps"], "seconds": time.time() - start,
            "params": sum(p.numel() for p in model.parameters())}
    return model.eval(), info


# ---------------------------------------------------------------- runs
class EvalEvery(TrainerCallback):
    """Plain-Trainer callback: plain cross-entropy on the eval set every ``every`` steps."""

    def __init__(self, every: int, evaluate, curve: list[dict[str, float]]):
        self.every, self.evaluate, self.curve = every, evaluate, curve

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self.curve.append({"step": state.global_step, "bytes": 0, "eval_loss": self.evaluate(model)})


def centralized(cfg, base, data, collator, lora: bool, seed: int) -> dict[str, Any]:
    """Plain Trainer on the unsplit model: same PEFT config, data, batch and schedule, ``central_steps`` steps."""
    set_seed(seed)
    model = copy.deepcopy(base).train()
    if lora:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config())
    steps = cfg["central_steps"]
    curve = [{"step": 0, "bytes": 0, "eval_loss": eval_loss(model, data["eval"], collator)}]
    start, cpu = time.time(), time.process_time()
    with tempfile.TemporaryDirectory() as tmp:
        every = max(1, steps // cfg["eval_points"])
        callback = EvalEvery(every, lambda m: eval_loss(m, data["eval"], collator), curve)
        lr = cfg["lr_lora"] if lora else cfg["lr_full"]
        plain_trainer(model, tmp, data["train"], collator, steps, cfg["batch"], lr,
                      seed, cfg["warmup_steps"], "constant_with_warmup", [callback]).train()
    return {"curve": curve, "final_eval_loss": curve[-1]["eval_loss"], "steps": steps,
            "train_seconds": time.time() - start, "cpu_seconds": time.process_time() - cpu}


class EvalAtBytes(TrainerCallback):
    """Evaluates when the ledger first passes each byte mark, and records (step, bytes, server updates, loss)."""

    def __init__(self, trainer: FSLSageTrainer, marks: list[float]):
        self.trainer, self.marks, self.points = trainer, sorted(marks), []

    def on_step_end(self, args, state, control, **kwargs):
        total = self.trainer.federation.transport.ledger.total
        if self.marks and total >= self.marks[0]:
            control.should_evaluate = True
            self.marks = [m for m in self.marks if m > total]

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        ledger = self.trainer.federation.transport.ledger
        point = {"step": state.global_step, "bytes": ledger.total, "server_updates": ledger.messages["smashed_up"],
                 "eval_loss": metrics["eval_loss"]}
        if not self.points or self.points[-1]["step"] != point["step"]:
            self.points.append(point)


def client_params(trainer: FSLSageTrainer) -> tuple[int, int]:
    """(trained, held) parameters of one client: its half, plus the server half (FedAvg) and the aux model."""
    client, name, algorithm = trainer.federation.clients[0], trainer.args.algorithm, trainer.algorithm
    server_copy = [algorithm.server_copies[0].module] if name == "fedavg" else []
    aux = [algorithm.aux[0].module] if hasattr(algorithm, "aux") else []
    held = [client.model.module, *server_copy, *aux]
    trained = [client.model.module, *server_copy, *(aux if name == "cse_fsl" else [])]

    def count(modules, only_trainable: bool) -> int:
        unique = {id(p): p for m in modules for p in m.parameters() if p.requires_grad or not only_trainable}
        return sum(p.numel() for p in unique.values())

    return count(trained, True), count(held, False)


def byte_marks(budget: float, points: int) -> list[float]:
    """``points`` marks spaced evenly on a log axis from 1 % of the budget, plus the reported fractions."""
    grid = [budget * 10 ** (-2 + 2 * i / (points - 1)) for i in range(points)] if points > 1 else [budget]
    return sorted(set(grid) | {budget * f for f in FRACTIONS})


def fed_args(cfg, algorithm: str, lora: bool, partition: str, seed: int, out_dir: str, budget: float,
             overrides: dict[str, Any]) -> FSLSageConfig:
    per_algorithm = dict(cfg.get(algorithm, {}))
    settings = dict(
        output_dir=out_dir, algorithm=algorithm, num_clients=cfg["num_clients"], local_steps=cfg["local_steps"],
        max_steps=cfg["max_steps"], max_comm_bytes=int(budget), partition=partition,
        partition_column="customer rating", dirichlet_alpha=0.5, per_device_train_batch_size=cfg["batch"],
        per_device_eval_batch_size=32, cut_layer=cfg["cut_layer"],
        server_update_interval=cfg["server_update_interval"],
        learning_rate=cfg["lr_lora"] if lora else cfg["lr_full"], warmup_steps=cfg["warmup_steps"],
        lr_scheduler_type="constant_with_warmup", eval_strategy="steps", eval_steps=10**9,
        logging_strategy="steps", logging_steps=cfg["local_steps"],
        save_strategy="no", report_to="none", disable_tqdm=True, seed=seed, **per_algorithm)
    settings.update(overrides)
    return FSLSageConfig(**settings)


def federated(cfg, base, data, collator, algorithm: str, lora: bool, partition: str, seed: int, out_dir: str,
              overrides: dict[str, Any] | None = None, inspect=None) -> dict[str, Any]:
    """One federated run; ``overrides`` are extra FSLSageConfig fields, ``inspect(trainer)`` adds to the result."""
    set_seed(seed)
    budget = cfg["budget_mb"]["lora" if lora else "full"] * 1e6
    args = fed_args(cfg, algorithm, lora, partition, seed, out_dir, budget, overrides or {})
    trainer = FSLSageTrainer(model=copy.deepcopy(base).train(), args=args, train_dataset=data["train"],
                             eval_dataset=data["eval"], data_collator=collator,
                             peft_config=lora_config() if lora else None)
    trainer.remove_callback(PrinterCallback)  # quiet: the benchmark prints its own lines
    curve = EvalAtBytes(trainer, byte_marks(budget, cfg["eval_points"]))
    trainer.add_callback(curve)
    trainer.evaluate()  # step 0, recorded by the callback
    start, cpu = time.time(), time.process_time()
    train_metrics = trainer.train().metrics
    seconds, cpu_seconds = time.time() - start, time.process_time() - cpu
    ledger = trainer.federation.transport.ledger
    if curve.points[-1]["step"] != trainer.state.global_step:
        trainer.evaluate()
    history = trainer.state.log_history

    def mean_logged(key: str) -> float | None:
        values = [h[key] for h in history if key in h]
        return sum(values) / len(values) if values else None

    last = curve.points[-1]
    trained, held = client_params(trainer)
    return {"client_trainable_params": trained, "client_total_params": held, "curve": curve.points,
            "final_eval_loss": last["eval_loss"], "total_bytes": ledger.total,
            "budget_bytes": budget, "stopped_by": "budget" if ledger.total >= budget else "step cap",
            "global_steps": trainer.state.global_step, "client_steps": trainer.state.global_step * args.num_clients,
            "server_updates": ledger.messages["smashed_up"] if algorithm != "fedavg" else None,
            "bytes_by_kind": dict(ledger.by_kind), "train_seconds": seconds, "cpu_seconds": cpu_seconds,
            "align_cosine_after": mean_logged("align_grad_cosine_after"),
            "heldout_cosine": mean_logged("aux_grad_cosine_heldout"),
            "heldout_seconds": getattr(trainer.algorithm, "heldout_seconds", None),
            "settings": {k: getattr(args, k) for k in ("local_steps", "server_update_interval", "learning_rate",
                                                          "aux_num_layers", "align_interval", "align_epochs",
                                                          "align_buffer_size", "align_learning_rate", "aux_init")
                         if hasattr(args, k)} | (overrides or {}),
            "time_per_step": {k[5:]: v for k, v in train_metrics.items() if k.startswith("time/")},
            **(inspect(trainer) if inspect else {})}


def summarize(row: dict[str, Any], base_loss: float, central_loss: float) -> dict[str, Any]:
    """Loss at each budget fraction, and bytes to each gap-closing target (None where not reached)."""
    curve, budget = row["curve"], row["budget_bytes"]
    at = {}
    for f in FRACTIONS:
        point = next((p for p in curve if p["bytes"] >= f * budget * (1 - 1e-9)), None)
        at[str(f)] = ({"eval_loss": point["eval_loss"], "bytes": point["bytes"], "reached": True} if point else
                      {"eval_loss": curve[-1]["eval_loss"], "bytes": curve[-1]["bytes"], "reached": False})
    targets = {}
    for g in GAP_TARGETS:
        loss = base_loss - g * (base_loss - central_loss)
        targets[str(g)] = {"eval_loss": loss,
                           "bytes": next((p["bytes"] for p in curve if p["eval_loss"] <= loss), None)}
    return {"loss_at_fraction": at, "targets": targets}


# ---------------------------------------------------------------- workers
_WORKER: dict[str, Any] = {}
Task = tuple[str, bool, str, int, tuple]  # (algorithm or "centralized", lora, partition, seed, overrides as items)


def _init_worker(cfg: dict[str, Any], seed: int, full_vocab: bool, path: str, threads: int, base_config,
                 base_state) -> None:
    """Every worker rebuilds the same data and base model; runs then depend only on their seed."""
    torch.set_num_threads(threads)
    hf_logging.set_verbosity_error()
    data = load_data(cfg, offline_gpt2_tokenizer(), seed, full_vocab, Path(path))
    base = AutoModelForCausalLM.from_config(base_config)
    base.load_state_dict(base_state)
    _WORKER.update(cfg=cfg, data=data, collator=PadCollator(data["pad_id"]), base=base.eval())
    # Trainer.train() collects garbage over the ~500k long-lived objects of the imports, data and base (~0.5 CPU-s
    # a run); frozen, the collector skips them.
    gc.collect()
    gc.freeze()


def _run(task: Task) -> tuple[Task, dict[str, Any]]:
    name, lora, partition, seed, overrides = task
    w = _WORKER
    if name == "centralized":
        return task, centralized(w["cfg"], w["base"], w["data"], w["collator"], lora, seed)
    with tempfile.TemporaryDirectory() as tmp:
        return task, federated(w["cfg"], w["base"], w["data"], w["collator"], name, lora, partition, seed, tmp,
                               dict(overrides))


def _task(raw: list) -> Task:
    name, lora, partition, seed, overrides = raw
    return name, lora, partition, seed, tuple(tuple(item) for item in overrides)


def run_all(tasks: list[Task], jobs: int, init_args: tuple, partial: Path | None = None,
            resume: bool = False) -> dict[Task, dict[str, Any]]:
    """Run ``tasks`` in ``jobs`` worker processes (in this process when 1), printing each as it ends.

    With ``partial``, each finished run is also appended to that JSON-lines file as it ends; with ``resume``,
    the runs already in it are taken from there instead of being run again.
    """
    done: dict[Task, dict[str, Any]] = {}
    if partial is not None and resume and partial.is_file():
        kept = [json.loads(line) for line in partial.read_text().splitlines() if line.strip()]
        done = {_task(k["task"]): k["row"] for k in kept if _task(k["task"]) in tasks}
        print(f"resuming: {len(done)} of {len(tasks)} runs taken from {partial}", flush=True)
        tasks = [t for t in tasks if t not in done]
    elif partial is not None:
        partial.write_text("")

    def report(task: Task, row: dict[str, Any]) -> None:
        done[task] = row
        if partial is not None:
            with partial.open("a") as f:
                f.write(json.dumps({"task": task, "row": row}) + "\n")
        name, lora, partition, seed, overrides = task
        extra = " ".join(f"{k}={v}" for k, v in overrides)
        print(f"[{len(done)}/{len(tasks)}] {partition}/{'lora' if lora else 'full'} seed {seed} {name} {extra}: "
              f"eval loss {row['final_eval_loss']:.4f} at {mb(row['curve'][-1]['bytes'])} MB, "
              f"{row.get('global_steps', row.get('steps'))} steps, {row['train_seconds']:.0f} s", flush=True)

    if not tasks:
        return done
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


def prepare(opts, cfg) -> tuple[dict[str, Any], tuple, dict[str, Any]]:
    """Data, base model and worker arguments shared by this benchmark and the ablation."""
    if not opts.data and not DEVSET.is_file() and not opts.quick:
        raise SystemExit(f"the E2E development set is not at {DEVSET}: pass --data path/to/devset.csv (the figures "
                         "in docs/benchmarks.md come from it; the sample shipped in the package is for --quick only)")
    path = Path(opts.data) if opts.data else (DEVSET if DEVSET.is_file() else E2E_SAMPLE_PATH)
    data = load_data(cfg, offline_gpt2_tokenizer(), opts.seed, opts.full_vocab, path)
    base, base_info = pretrain_base(cfg, data, PadCollator(data["pad_id"]), opts.seed)
    print(f"data {path.name} {data['sizes']}, vocabulary {data['vocab_size']}; base: eval loss "
          f"{base_info['eval_loss_random_init']:.3f} -> {base_info['eval_loss']:.3f} after {base_info['steps']} "
          f"central steps ({base_info['seconds']:.0f} s)", flush=True)
    config = {**cfg, "data_file": path.name, "data": data["sizes"], "vocab_size": data["vocab_size"],
              "partition_column": "customer rating", "dirichlet_alpha": 0.5, "jobs": opts.jobs,
              "threads": opts.threads}
    init_args = (cfg, opts.seed, opts.full_vocab, str(path), opts.threads, base.config, base.state_dict())
    return {"config": config, "base": base_info}, init_args, data


def common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny budget, to check that everything runs (< 3 min)")
    parser.add_argument("--output-dir", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--data", default=None, help="E2E csv; default ../shared/data/e2e/devset.csv or the sample")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data split and the base model")
    parser.add_argument("--budget-mb", type=float, nargs=2, default=None, metavar=("LORA", "FULL"),
                        help="communication budget in MB (1e6 bytes) per run, with LoRA and with full fine-tuning")
    parser.add_argument("--max-steps", type=int, default=None, help="global-step cap of every run")
    parser.add_argument("--local-steps", type=int, default=None,
                        help=f"local steps per round of every federated run (default: the preset's, "
                             f"{FULL['local_steps']}; {QUICK['local_steps']} with --quick)")
    parser.add_argument("--full-vocab", action="store_true",
                        help="keep GPT-2's 50,257-row vocabulary instead of the tokens that occur in the data")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel, one process each")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process; 1 is fastest here")
    parser.add_argument("--resume", action="store_true",
                        help="take the runs already finished from the .partial.jsonl an interrupted run left")


def preset(opts) -> dict[str, Any]:
    cfg = copy.deepcopy(QUICK if opts.quick else FULL)
    if opts.budget_mb:
        cfg["budget_mb"] = {"lora": opts.budget_mb[0], "full": opts.budget_mb[1]}
    if opts.max_steps:
        cfg["max_steps"] = opts.max_steps
    if opts.local_steps:
        cfg["local_steps"] = opts.local_steps
    return cfg


# ---------------------------------------------------------------- report


def mb(n: float | None) -> str:
    return "not reached" if n is None else f"{n / 1e6:,.1f}"
