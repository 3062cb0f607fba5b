"""The E2E set-up the benchmarks share: data, base model, and runs trained until validation stops improving.

Data: the E2E development set (``--data``; the sample shipped in ``e2e_task`` for ``--quick``) split by ``mr``
(no meaning representation in two parts) into validation and test parts, a pre-training part and a training
part; the GPT-2 tokenizer cut down to the tokens of the pre-training and training text
(``e2e_task.data.restricted_tokenizer``). The base model, a GPT-2 built from a config, is first trained
centrally on the pre-training part's references as plain text (``e2e_task.central.pretrained_base``, cached by
its settings): a stand-in for a checkpoint that knows the language but not the task.

Runs: :func:`centralized` (a plain ``Trainer`` on the unsplit model) and :func:`federated`
(``FSLSageTrainer``) evaluate the validation and the test loss about every ``eval_client_steps`` client steps
(federated runs at the end of a round, where every algorithm's global model is freshly aggregated), record the
curve with the bytes on the wire and the server updates, and stop when the validation loss has not improved on its
best by more than ``min_improvement`` (the centralized reference: ``reference_min_improvement``) for
``patience_client_steps`` client steps (``transformers.EarlyStoppingCallback``), or at ``max_client_steps``.
Every run uses a constant learning rate after a short warm-up, so stopping truncates no schedule; a run whose
settings give ``decay_client_steps`` instead trains that many client steps, the rate decaying linearly to zero,
and does not stop early (``schedule.py``).

:class:`RunStore` keeps each finished run as one JSON line, keyed by its task and what its result depends on;
:func:`run_all` runs only what the store lacks, in worker processes, so an interrupted benchmark resumes where
it stopped.
"""

from __future__ import annotations

import argparse
import copy
import gc
import hashlib
import json
import math
import multiprocessing
import os
import resource
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from curves import best_point
from transformers import (
    AutoModelForCausalLM,
    EarlyStoppingCallback,
    GPT2Config,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_callback import PrinterCallback
from transformers.utils import logging as hf_logging

from e2e_task.central import pretrained_base
from e2e_task.data import (
    E2E_SAMPLE_PATH,
    E2E_SEPARATOR,
    load_e2e_csv,
    offline_gpt2_tokenizer,
    restricted_tokenizer,
    split_by_mr,
    tokenize_e2e,
    with_mr_slot_column,
)
from hf_fsl_sage import FSLSageConfig, FSLSageTrainer
from hf_fsl_sage.algorithms.registry import fields_read_by
from hf_fsl_sage.federation.data import split_lm_collator, tokenize_text


ROOT = Path(__file__).resolve().parents[1]
DEVSET = ROOT.parent / "shared" / "data" / "e2e" / "devset.csv"
PARTITION_COLUMN = "customer rating"
# Task: (what runs: "centralized" or an algorithm, "lora"/"full", partition or "all", seed, settings as items)
Task = tuple[str, str, str, int, tuple]


# ---------------------------------------------------------------- data and base model
def load_data(cfg: dict[str, Any], path: Path, seed: int) -> dict[str, Any]:
    """Tokenizer and tokenized parts: ``pretrain`` (plain text), ``train`` (with the ``mr`` and the partition
    column), ``validation`` and ``test`` (``cfg["eval_rows"]`` rows each, drawn at random across their ``mr``\\ s)."""
    raw = load_e2e_csv(path)
    parts = split_by_mr(raw, cfg["validation_share"], cfg["test_share"], seed=seed)
    held = split_by_mr(parts["train"], cfg["pretrain_share"], seed=seed + 1)
    train_raw, pretrain_raw = held["train"], held["validation"]
    texts = [E2E_SEPARATOR] + [t for ds in (train_raw, pretrain_raw) for mr, ref in zip(ds["mr"], ds["ref"])
                               for t in (mr, ref, " " + ref)]
    tok = restricted_tokenizer(offline_gpt2_tokenizer(), texts)
    tok.padding_side = "right"
    length = cfg["max_length"]
    train = tokenize_e2e(train_raw, tok, max_length=length).add_column("mr", train_raw["mr"])
    out = {"tokenizer": tok, "train": with_mr_slot_column(train, PARTITION_COLUMN),
           "pretrain": tokenize_text(pretrain_raw.select_columns(["ref"]).rename_column("ref", "text"), tok,
                                     max_length=length)}
    for name in ("validation", "test"):
        ds = tokenize_e2e(parts[name], tok, max_length=length).shuffle(seed=seed)
        out[name] = ds.select(range(min(cfg["eval_rows"], len(ds))))
    out["sizes"] = {"rows": len(raw), "pretrain": len(pretrain_raw), "train": len(train_raw),
                    "validation": len(parts["validation"]), "test": len(parts["test"]),
                    "evaluated": {"validation": len(out["validation"]), "test": len(out["test"])},
                    "vocabulary": len(tok)}
    return out


def base_model(cfg: dict[str, Any], data: dict[str, Any], cache: Path, seed: int) -> tuple[torch.nn.Module, dict]:
    """The GPT-2 of ``cfg`` pre-trained centrally on ``data["pretrain"]``, cached in ``cache`` by its settings."""
    tok = data["tokenizer"]
    model_fields = {k: cfg[k] for k in ("n_layer", "n_embd", "n_head")}

    def build():
        torch.manual_seed(seed)
        eos = tok.eos_token_id
        config = GPT2Config(vocab_size=len(tok), n_positions=max(128, cfg["max_length"]), bos_token_id=eos,
                            eos_token_id=eos, pad_token_id=eos, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            **model_fields)
        return AutoModelForCausalLM.from_config(config)

    settings = {**model_fields, "data": data["sizes"], "max_length": cfg["max_length"]}
    model, info = pretrained_base(build, data["pretrain"], data["validation"], tok, cache, settings,
                                  cfg["pretrain_steps"], cfg["pretrain_batch"], cfg["pretrain_lr"], seed)
    info["params"] = sum(p.numel() for p in model.parameters())
    return model.eval(), {k: v for k, v in info.items() if k != "settings"}


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=32, lora_dropout=0.1, target_modules=["c_attn"], fan_in_fan_out=True,
                      task_type="CAUSAL_LM")


# ---------------------------------------------------------------- callbacks
class EarlyStopping(EarlyStoppingCallback):
    """``transformers.EarlyStoppingCallback`` when several eval datasets are evaluated in turn: only the call
    that carries ``metric_for_best_model`` counts (Trainer calls ``on_evaluate`` once per dataset)."""

    def on_evaluate(self, args, state, control, metrics, **kwargs):
        if f"eval_{args.metric_for_best_model}" in metrics:
            super().on_evaluate(args, state, control, metrics, **kwargs)


class Curve(TrainerCallback):
    """Records every evaluation: step, client steps, bytes on the wire and server updates (federated runs: the
    uploads times ``updates_per_upload``; 0 for a centralized one), and the loss on each eval dataset
    (``validation_loss``, ``test_loss``)."""

    def __init__(self, clients: int = 1, ledger=None, updates_per_upload: int = 1):
        self.clients, self.ledger, self.points, self.per_upload = clients, ledger, [], updates_per_upload

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        step = state.global_step
        if not self.points or self.points[-1]["step"] != step:
            ledger = self.ledger
            self.points.append({"step": step, "client_steps": step * self.clients,
                                "bytes": ledger.total if ledger else 0,
                                "server_updates": ledger.messages["smashed_up"] * self.per_upload if ledger else 0})
        self.points[-1].update({k[len("eval_"):]: v for k, v in metrics.items() if k.endswith("_loss")})


class CentralTrainer(Trainer):
    """Plain ``Trainer`` whose evaluation reports the plain cross-entropy, as ``FSLSageTrainer`` does (training
    keeps its label smoothing)."""

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        smoother, self.label_smoother = self.label_smoother, None
        try:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        finally:
            self.label_smoother = smoother


def stopping_args(eval_steps: int) -> dict[str, Any]:
    """The ``TrainingArguments`` every run shares: evaluation every ``eval_steps``, the best model judged on the
    validation loss, no logging or saving of its own."""
    return dict(eval_strategy="steps", eval_steps=eval_steps, metric_for_best_model="validation_loss",
                greater_is_better=False, save_strategy="no", report_to="none", disable_tqdm=True,
                per_device_eval_batch_size=64, weight_decay=0.01,
                adam_epsilon=1e-6, label_smoothing_factor=0.1, max_grad_norm=1.0, remove_unused_columns=False)


def schedule_args(decay_client_steps: int | None) -> dict[str, Any]:
    """The learning-rate schedule: constant after the warm-up, or decaying linearly to zero at the last step."""
    return {"lr_scheduler_type": "linear" if decay_client_steps else "constant_with_warmup"}


def _finish(trainer: Trainer, curve: Curve, cap: int, started: tuple[float, float]) -> dict[str, Any]:
    points = curve.points
    best = best_point(points)
    return {"curve": points, "best": best, "steps": trainer.state.global_step,
            "stopped_by": "early stopping" if trainer.state.global_step < cap else "step cap",
            "last_learning_rate": trainer.lr_scheduler.get_last_lr()[0],
            "train_seconds": time.time() - started[0], "cpu_seconds": time.process_time() - started[1]}


# ---------------------------------------------------------------- runs
def centralized(cfg: dict[str, Any], base, data: dict[str, Any], mode: str, seed: int,
                settings: dict[str, Any]) -> dict[str, Any]:
    """The unsplit model with a plain Trainer, same PEFT config, data, batch and optimizer, until the validation
    loss stops improving (or ``cfg["max_client_steps"]`` steps; with ``settings["decay_client_steps"]``, that many
    steps of a decaying rate)."""
    set_seed(seed)
    model = copy.deepcopy(base).train()
    if mode == "lora":
        from peft import get_peft_model

        model = get_peft_model(model, lora_config())
    every, decay = cfg["eval_client_steps"], settings.get("decay_client_steps")
    cap = every * math.ceil((decay or cfg["max_client_steps"]) / every)
    curve = Curve()
    stopping = [] if decay else [EarlyStopping(math.ceil(cfg["patience_client_steps"] / every),
                                               cfg["reference_min_improvement"])]
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, max_steps=cap, per_device_train_batch_size=cfg["batch"],
                                 learning_rate=settings["learning_rate"], warmup_steps=cfg["warmup_steps"],
                                 logging_strategy="no", seed=seed, data_seed=seed, **stopping_args(every),
                                 dataloader_pin_memory=torch.cuda.is_available(),
                                 **schedule_args(decay))
        columns = ["input_ids", "attention_mask", "labels"]
        trainer = CentralTrainer(
            model=model, args=args, train_dataset=data["train"].select_columns(columns),
            eval_dataset={k: data[k] for k in ("validation", "test")},
            data_collator=split_lm_collator(data["tokenizer"]), callbacks=[curve, *stopping])
        trainer.remove_callback(PrinterCallback)
        trainer.evaluate()  # the base model: the curve's first point
        started = (time.time(), time.process_time())
        trainer.train()
        return _finish(trainer, curve, cap, started)


def federated(cfg: dict[str, Any], base, data: dict[str, Any], algorithm: str, mode: str, partition: str,
              seed: int, settings: dict[str, Any]) -> dict[str, Any]:
    """One federated run until the validation loss (of the global model, at the end of each round) stops
    improving, or ``cfg["max_client_steps"]`` client steps; ``settings`` are FSLSageConfig fields and, optionally,
    ``decay_client_steps`` (that many client steps of a decaying rate, no early stop)."""
    set_seed(seed)
    settings = {"num_clients": cfg["num_clients"], "local_steps": cfg["local_steps"], **cfg.get(algorithm, {}),
                **settings}
    decay = settings.pop("decay_client_steps", None)
    clients, local_steps = settings["num_clients"], settings["local_steps"]
    every = local_steps * max(1, round(cfg["eval_client_steps"] / (clients * local_steps)))  # whole rounds
    cap = every * math.ceil((decay or cfg["max_client_steps"]) / (clients * every))  # global steps, evaluated last
    patience = math.ceil(cfg["patience_client_steps"] / (clients * every))
    with tempfile.TemporaryDirectory() as tmp:
        args = FSLSageConfig(
            output_dir=tmp, algorithm=algorithm, max_steps=cap, partition=partition,
            partition_column=PARTITION_COLUMN, dirichlet_alpha=0.5, per_device_train_batch_size=cfg["batch"],
            cut_layer=cfg["cut_layer"], warmup_steps=cfg["warmup_steps"], logging_strategy="steps",
            logging_steps=local_steps, aux_heldout_cosine=False, seed=seed, **stopping_args(every),
            **schedule_args(decay), **settings)
        trainer = FSLSageTrainer(model=copy.deepcopy(base).train(), args=args, train_dataset=data["train"],
                                 eval_dataset={k: data[k] for k in ("validation", "test")},
                                 processing_class=data["tokenizer"],
                                 peft_config=lora_config() if mode == "lora" else None)
        trainer.remove_callback(PrinterCallback)
        ledger = trainer.federation.transport.ledger
        curve = Curve(clients, ledger, 1 + settings.get("server_replay_steps", 0))
        trainer.add_callback(curve)
        if not decay:
            trainer.add_callback(EarlyStopping(patience, cfg["min_improvement"]))
        trainer.evaluate()
        started = (time.time(), time.process_time())
        metrics = trainer.train().metrics
        row = _finish(trainer, curve, cap, started)
    times = {k[len("time/"):]: v for k, v in metrics.items() if k.startswith("time/")}
    aligned = [h["align_grad_cosine_after"] for h in trainer.state.log_history if "align_grad_cosine_after" in h]
    return {**row, "client_steps": row["steps"] * clients, "total_bytes": ledger.total,
            "server_updates": ledger.messages["smashed_up"] * curve.per_upload if algorithm != "fedavg" else None,
            "bytes_by_kind": dict(ledger.by_kind), "time_per_step": times,
            "time_share": {k: v / sum(times.values()) for k, v in times.items()} if sum(times.values()) else {},
            "align_cosine_after": sum(aligned) / len(aligned) if aligned else None, "settings": settings}


# ---------------------------------------------------------------- resumable store and workers
# The preset's entries a run's result depends on (the rest choose which runs to make, or how to report them).
RUN_KEYS = ("n_layer", "n_embd", "n_head", "max_length", "validation_share", "test_share", "pretrain_share",
            "eval_rows", "pretrain_steps", "pretrain_batch", "pretrain_lr", "num_clients", "batch", "cut_layer",
            "local_steps", "warmup_steps", "eval_client_steps", "patience_client_steps", "min_improvement",
            "max_client_steps")


# Fields added to FSLSageConfig after runs were stored, with the value that behaves as before they existed: at that
# value a field stays out of the fingerprint, so adding it does not make the stored runs stale.
ADDED_FIELDS = {"server_replay_steps": 0}


def fingerprint(cfg: dict[str, Any], data_file: Path, task: Task, library_defaults: bool) -> str:
    """What the result of ``task`` depends on besides its key: the preset's :data:`RUN_KEYS` and its own settings
    for the task's algorithm, the data file (name and size) and, for runs that do not give every setting they
    read, the defaults of the fields ``FSLSageConfig`` adds that the algorithm reads and neither the preset nor the
    task sets (changing one of those reruns such runs, changing another does not), less :data:`ADDED_FIELDS` at
    their neutral value."""
    defaults = {}
    if library_defaults:
        given = set(cfg.get(task[0], {})) | {name for name, _ in task[4]}
        defaults = {k: getattr(FSLSageConfig, k, None) for k in fields_read_by(task[0], FSLSageConfig.__annotations__)
                    if k not in given and ADDED_FIELDS.get(k, object()) != getattr(FSLSageConfig, k, None)}
    used = {k: cfg[k] for k in RUN_KEYS} | {"algorithm": cfg.get(task[0], {})}
    if task[0] == "centralized":
        used["reference_min_improvement"] = cfg["reference_min_improvement"]
    text = json.dumps([used, data_file.name, data_file.stat().st_size, defaults], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def decayed(task: Task, client_steps: int) -> Task:
    """``task`` with its rate decaying to zero over ``client_steps`` client steps instead of stopping early (the
    ``decay_client_steps`` setting :func:`centralized` and :func:`federated` read)."""
    name, mode, partition, seed, items = task
    return name, mode, partition, seed, tuple(sorted(dict(items, decay_client_steps=client_steps).items()))


def task_key(task: Task) -> str:
    name, mode, partition, seed, settings = task
    return json.dumps([name, mode, partition, seed, sorted(map(list, settings))])


class RunStore:
    """Finished runs as JSON lines ``{"fingerprint", "key", "row"}``, shared by the benchmarks of one set-up (a
    centralized reference runs once for all of them), and one line ``{"benchmark", "invocation"}`` per invocation
    of a benchmark (its wall and CPU time).

    ``fingerprint_of(task)`` says what a task's result depends on besides its key (see :func:`fingerprint`); a
    line with another fingerprint is not a result of that task, so changing the preset reruns what it changes.
    """

    def __init__(self, path: Path, fingerprint_of: Callable[[Task], str], benchmark: str):
        self.path, self.fingerprint_of, self.benchmark = path, fingerprint_of, benchmark
        self.rows: dict[tuple[str, str], dict[str, Any]] = {}
        self.invocations: list[dict[str, Any]] = []
        if path.is_file():
            for line in path.read_text().splitlines():
                entry = json.loads(line) if line.strip() else {}
                if "key" in entry:
                    self.rows[(entry["fingerprint"], entry["key"])] = entry["row"]
                elif entry.get("benchmark") == benchmark:
                    self.invocations.append(entry["invocation"])

    def _append(self, entry: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(entry) + "\n")

    def add(self, task: Task, row: dict[str, Any]) -> None:
        fingerprint = self.fingerprint_of(task)
        self.rows[(fingerprint, task_key(task))] = row
        self._append({"fingerprint": fingerprint, "key": task_key(task), "row": row})

    def get(self, task: Task) -> dict[str, Any] | None:
        return self.rows.get((self.fingerprint_of(task), task_key(task)))

    def add_invocation(self, record: dict[str, Any]) -> None:
        self.invocations.append(record)
        self._append({"benchmark": self.benchmark, "invocation": record})


class Clock:
    """Wall and CPU time (this process and its finished children) and load averages over an invocation."""

    def __init__(self):
        self.wall, self.cpu, self.load = time.time(), self._cpu(), os.getloadavg()

    @staticmethod
    def _cpu() -> float:
        return sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
                   for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))

    def record(self, runs: int) -> dict[str, Any]:
        return {"started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.wall)),
                "wall_seconds": time.time() - self.wall, "cpu_seconds": self._cpu() - self.cpu, "runs": runs,
                "load_average_start": self.load[0], "load_average_end": os.getloadavg()[0], "cpus": os.cpu_count()}


_WORKER: dict[str, Any] = {}


def prepare_worker(cfg: dict[str, Any], path: str, seed: int, threads: int, cache: str) -> None:
    """Each worker rebuilds the same data and loads the cached base model; a run then depends on its seed only."""
    torch.set_num_threads(threads)
    hf_logging.set_verbosity_error()
    data = load_data(cfg, Path(path), seed)
    base, _ = base_model(cfg, data, Path(cache), seed)
    _WORKER.update(cfg=cfg, data=data, base=base)
    # Trainer.train() collects garbage over the ~500k long-lived objects of the imports, data and base (~0.5 CPU-s
    # a run); frozen, the collector skips them.
    gc.collect()
    gc.freeze()


def run_task(task: Task) -> tuple[Task, dict[str, Any]]:
    name, mode, partition, seed, settings = task
    w = _WORKER
    if name == "centralized":
        return task, centralized(w["cfg"], w["base"], w["data"], mode, seed, dict(settings))
    return task, federated(w["cfg"], w["base"], w["data"], name, mode, partition, seed, dict(settings))


def run_all(tasks: list[Task], store: RunStore, jobs: int, worker_args: tuple,
            report: Callable[[Task, dict[str, Any]], None]) -> None:
    """Run the ``tasks`` the store lacks, ``jobs`` at a time (in this process when 1), storing each as it ends."""
    todo = list(dict.fromkeys(t for t in tasks if store.get(t) is None))
    if len(todo) < len(tasks):
        print(f"{len(set(tasks)) - len(todo)} of {len(set(tasks))} runs already in {store.path}", flush=True)
    if not todo:
        return
    if jobs <= 1:
        prepare_worker(*worker_args)
        for task in todo:
            store.add(*run_task(task))
            report(task, store.get(task))
        return
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=prepare_worker,
                             initargs=worker_args) as pool:
        for future in as_completed([pool.submit(run_task, t) for t in todo]):
            task, row = future.result()
            store.add(task, row)
            report(task, row)


def runs_file(out_dir: Path, quick: bool) -> Path:
    """The runs file the benchmarks of this set-up share."""
    return out_dir / ("e2e_runs_quick.jsonl" if quick else "e2e_runs.jsonl")


def data_path(option: str | None, quick: bool) -> Path:
    if option:
        return Path(option)
    if DEVSET.is_file() and not quick:
        return DEVSET
    if not quick:
        raise SystemExit(f"the E2E development set is not at {DEVSET}: pass --data path/to/devset.csv (the "
                         "figures in docs/benchmarks.md come from it; the sample shipped in e2e_task is for --quick)")
    return E2E_SAMPLE_PATH


# ---------------------------------------------------------------- what every benchmark of this set-up opens with
def common_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every benchmark of this set-up takes."""
    parser.add_argument("--quick", action="store_true", help="tiny model and budgets, to check that it all runs")
    parser.add_argument("--output-dir", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--data", default=None, help="E2E csv; default ../shared/data/e2e/devset.csv")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data split and the base model")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel, one process each")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process; 1 is fastest here")


@dataclass
class Bench:
    """A benchmark's runs file, clock, data, base model (its pre-training figures) and worker arguments."""

    store: RunStore
    clock: Clock
    data: dict[str, Any]
    data_file: Path
    base_info: dict[str, Any]
    worker: tuple


def open_bench(opts: argparse.Namespace, cfg: dict[str, Any], stem: str, library_defaults: bool = True) -> Bench:
    """Set up a benchmark from its :func:`common_arguments` and preset: its runs go to the shared runs file (a
    federated run's fingerprint holds the library's defaults it reads when ``library_defaults``, see
    :func:`fingerprint`), the base model is the shared cached one."""
    torch.set_num_threads(opts.threads)
    hf_logging.set_verbosity_error()
    out_dir, path = Path(opts.output_dir), data_path(opts.data, opts.quick)
    store = RunStore(runs_file(out_dir, opts.quick),
                     lambda t: fingerprint(cfg, path, t, library_defaults and t[0] != "centralized"), stem)
    clock = Clock()
    cache = out_dir / "cache" / ("compare_algorithms_quick_base" if opts.quick else "compare_algorithms_base")
    data = load_data(cfg, path, opts.seed)
    _, base_info = base_model(cfg, data, cache, opts.seed)
    return Bench(store, clock, data, path, base_info, (cfg, str(path), opts.seed, opts.threads, str(cache)))
