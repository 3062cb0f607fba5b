"""Central (not federated) training beside a federated run: a cached pre-training of the base model, and the
centralized reference, both with a plain ``transformers.Trainer``.

* :func:`pretrained_base` trains a base model on held-out text (e.g. E2E references whose ``mr`` is in no
  other split), saves it with ``save_pretrained`` in a directory, and on a later call with the same
  settings loads it from there instead of training again. The model it returns was loaded from that
  directory's absolute path, so a PEFT adapter trained on it records a base path that loads offline.
* :func:`centralized_reference` trains the unsplit model on the federated run's training rows with the same
  PEFT config, batch size, number of examples and learning-rate schedule: one step per client step of the
  federated run (``max_steps * clients per round``), the warm-up scaled by the same factor.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel, Trainer, TrainingArguments, set_seed

from hf_fsl_sage.config import FSLSageConfig
from hf_fsl_sage.federation.data import split_lm_collator


__all__ = ["PRETRAINING_FILE", "centralized_reference", "pretrained_base"]

PRETRAINING_FILE = "pretraining.json"
_MODEL_COLUMNS = ["input_ids", "attention_mask", "labels"]


def _plain_args(output_dir: str, **kwargs: Any) -> TrainingArguments:
    return TrainingArguments(output_dir=output_dir, logging_strategy="no", save_strategy="no", report_to="none",
                             disable_tqdm=True, remove_unused_columns=False,
                             dataloader_pin_memory=torch.cuda.is_available(), **kwargs)


def _eval_loss(model: nn.Module, ds: datasets.Dataset, tokenizer, batch_size: int) -> float:
    """Plain cross-entropy (no label smoothing) as Trainer evaluates it."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(model=model, args=_plain_args(tmp, per_device_eval_batch_size=batch_size),
                          data_collator=split_lm_collator(tokenizer), eval_dataset=ds.select_columns(_MODEL_COLUMNS))
        return trainer.evaluate()["eval_loss"]


def pretrained_base(
    build: Callable[[], PreTrainedModel],
    text: datasets.Dataset,
    eval_dataset: datasets.Dataset,
    tokenizer,
    directory: str | Path,
    settings: dict[str, Any],
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """A base model trained centrally for ``steps`` steps on ``text`` (tokenized, with labels), cached in
    ``directory``.

    ``settings`` (JSON-serializable) identify the training: when ``directory`` holds a model trained with
    the same settings it is loaded and nothing trains. Returns the model, loaded from ``directory``, and
    what was recorded about its training (eval loss on ``eval_dataset`` before and after, seconds, and
    ``cached``).
    """
    directory = Path(directory).resolve()
    record_file = directory / PRETRAINING_FILE
    key = {**settings, "steps": steps, "batch_size": batch_size, "learning_rate": learning_rate, "seed": seed}
    if record_file.is_file():
        record = json.loads(record_file.read_text())
        if record.get("settings") == json.loads(json.dumps(key)):
            return AutoModelForCausalLM.from_pretrained(str(directory)), {**record, "cached": True}
    model = build()
    before = _eval_loss(model, eval_dataset, tokenizer, 32)
    started, cpu = time.time(), time.process_time()
    with tempfile.TemporaryDirectory() as tmp:
        args = _plain_args(tmp, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=learning_rate,
                           weight_decay=0.01, adam_epsilon=1e-6, warmup_steps=0.05, lr_scheduler_type="linear",
                           seed=seed, data_seed=seed)
        Trainer(model=model, args=args, train_dataset=text.select_columns(_MODEL_COLUMNS),
                data_collator=split_lm_collator(tokenizer)).train()
    record = {"settings": key, "steps": steps, "rows": len(text), "eval_loss_before": before,
              "seconds": time.time() - started, "cpu_seconds": time.process_time() - cpu,
              "eval_loss_after": _eval_loss(model, eval_dataset, tokenizer, 32)}
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory))
    record_file.write_text(json.dumps(record, indent=2) + "\n")  # written last: a complete cache entry
    return AutoModelForCausalLM.from_pretrained(str(directory)), {**record, "cached": False}


def centralized_reference(
    base: PreTrainedModel,
    args: FSLSageConfig,
    train: datasets.Dataset,
    eval_dataset: datasets.Dataset,
    tokenizer,
    peft_config=None,
) -> tuple[Trainer, dict[str, Any]]:
    """Train a copy of ``base`` with a plain Trainer as the federated run would see the same examples centrally.

    Same optimizer settings, batch size (``per_device_train_batch_size``), label smoothing and gradient
    clipping as ``args``; ``args.max_steps * args.participants_per_round`` steps, so as many examples as the
    clients process together; warm-up steps scaled by ``args.participants_per_round``. Returns the trainer
    (its model is the trained one) and ``eval_loss``/``eval_perplexity`` (plain cross-entropy), ``steps``,
    ``train_seconds``, ``train_cpu_seconds``. Seeded with ``args.seed`` from the start: the adapters' initial
    values do not depend on what the process drew before (a process that loads a cached base draws nothing).
    """
    set_seed(args.seed)
    model = copy.deepcopy(base).train()
    if peft_config is not None:
        from peft import get_peft_model

        model = get_peft_model(model, peft_config)
    factor = args.participants_per_round
    steps = args.max_steps * factor
    warmup = args.warmup_steps if args.warmup_steps < 1 else args.warmup_steps * factor
    with tempfile.TemporaryDirectory() as tmp:  # nothing is saved there
        plain = _plain_args(
            tmp, max_steps=steps, per_device_train_batch_size=args.per_device_train_batch_size,
            per_device_eval_batch_size=args.per_device_eval_batch_size, learning_rate=args.learning_rate,
            weight_decay=args.weight_decay, adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2,
            adam_epsilon=args.adam_epsilon, max_grad_norm=args.max_grad_norm, lr_scheduler_type=args.lr_scheduler_type,
            warmup_steps=warmup, label_smoothing_factor=args.label_smoothing_factor, seed=args.seed,
            data_seed=args.seed)
        trainer = Trainer(model=model, args=plain, train_dataset=train.select_columns(_MODEL_COLUMNS),
                          eval_dataset=eval_dataset.select_columns(_MODEL_COLUMNS),
                          data_collator=split_lm_collator(tokenizer), processing_class=tokenizer)
        started, cpu = time.time(), time.process_time()
        trainer.train()
        seconds, cpu = time.time() - started, time.process_time() - cpu
        trainer.label_smoother = None  # evaluate the plain cross-entropy, as the federated run reports it
        loss = trainer.evaluate()["eval_loss"]
    return trainer, {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0)), "steps": steps,
                     "train_seconds": seconds, "train_cpu_seconds": cpu}
