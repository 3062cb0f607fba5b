"""Small models and E2E data shared by the trainer tests, the algorithm tests and ``tests/distributed_run.py``.

The E2E rows are real (the shipped sample, GPT-2 tokenized) with their ids
renumbered to the tokens used: that keeps the real text and loss masking while
shrinking the LM head from 50,257 rows to the ~1.5k tokens the sample uses, so
training runs take seconds on a CPU.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from functools import cache
from pathlib import Path

import datasets
import torch
from peft import LoraConfig
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config

from e2e_task.data import E2E_SAMPLE_PATH, load_e2e_csv, offline_gpt2_tokenizer, split_by_mr, tokenize_e2e
from hf_fsl_sage import FSLSageConfig, FSLSageTrainer
from hf_fsl_sage.splitting.loss import IGNORE_INDEX


@cache
def compact_e2e(max_length: int = 48, eval_fraction: float = 0.15,
                with_mr: bool = True) -> tuple[datasets.Dataset, datasets.Dataset, int, int]:
    """(train, eval, vocab_size, pad_id) with the renumbered ids; train and eval share no ``mr``.

    With ``with_mr`` both splits keep the ``mr`` column (for grouped partitions).
    """
    tok = offline_gpt2_tokenizer()
    splits = split_by_mr(load_e2e_csv(E2E_SAMPLE_PATH), eval_fraction=eval_fraction, seed=0)
    eval_name = "validation" if "validation" in splits else "test"
    raw = {"train": splits["train"], "eval": splits[eval_name]}
    tokenized = {k: tokenize_e2e(v, tok, max_length=max_length) for k, v in raw.items()}
    used = sorted({t for ds in tokenized.values() for row in ds["input_ids"] for t in row} | {tok.eos_token_id})
    new_id = {old: i for i, old in enumerate(used)}

    def renumber(row):
        return {
            "input_ids": [new_id[t] for t in row["input_ids"]],
            "labels": [t if t == IGNORE_INDEX else new_id[t] for t in row["labels"]],
        }

    out = {k: v.map(renumber) for k, v in tokenized.items()}
    if with_mr:
        for k in out:
            out[k] = out[k].add_column("mr", raw[k]["mr"])
    return out["train"], out["eval"], len(used), new_id[tok.eos_token_id]


class PadCollator:
    """Right padding with ``pad_id`` / mask 0 / label -100; to ``width`` when given (every batch the same shape),
    else to the longest row."""

    def __init__(self, pad_id: int, width: int | None = None):
        self.pad_id, self.width = pad_id, width

    def __call__(self, rows):
        width = self.width or max(len(r["input_ids"]) for r in rows)

        def pad(key, value):
            return torch.tensor([list(r[key]) + [value] * (width - len(r[key])) for r in rows])

        return {"input_ids": pad("input_ids", self.pad_id), "attention_mask": pad("attention_mask", 0),
                "labels": pad("labels", IGNORE_INDEX)}


def tiny_gpt2(vocab: int, seed: int = 0, dropout: float = 0.0, n_embd: int = 64, n_head: int = 4,
              pretrained: bool = False, n_layer: int = 3):
    """A GPT-2 drawn from ``seed``; with ``pretrained``, briefly trained first (:func:`pretrained_state`)."""
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=64, vocab_size=vocab,
                        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    model = AutoModelForCausalLM.from_config(config)
    if pretrained:
        model.load_state_dict(pretrained_state(config.to_json_string(use_diff=False)))
    return model


def lora(dropout: float = 0.0, target_modules: tuple[str, ...] = ("c_attn",)) -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=32, lora_dropout=dropout, target_modules=list(target_modules),
                      fan_in_fan_out=True)


@cache
def pretrained_state(config_json: str, steps: int = 30, seed: int = 0) -> dict:
    """Weights of a model trained centrally for ``steps`` steps on the train split: a stand-in for pretraining."""
    train, _, _, pad = compact_e2e()
    torch.manual_seed(seed)
    config = AutoConfig.for_model(**json.loads(config_json))
    model = AutoModelForCausalLM.from_config(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    collate = PadCollator(pad)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        rows = torch.randint(len(train), (16,), generator=generator).tolist()
        loss = model(**collate([train[i] for i in rows])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def trainable_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def make_trainer(tmp_path: Path, model=None, peft_config=None, **overrides) -> FSLSageTrainer:
    """A FSLSageTrainer on the compact E2E rows: 3 clients, 4 local steps, 12 global steps, unless overridden."""
    train, evalset, vocab, pad = compact_e2e()
    settings = dict(output_dir=str(tmp_path / "out"), num_clients=3, local_steps=4, max_steps=12,
                    per_device_train_batch_size=4, per_device_eval_batch_size=16, aux_num_layers=1,
                    server_update_interval=2, align_interval=2, align_epochs=3, align_buffer_size=8,
                    learning_rate=3e-3, align_learning_rate=1e-3, warmup_steps=0, logging_steps=4, save_strategy="no",
                    report_to="none", seed=0, disable_tqdm=True)
    settings.update(overrides)
    return FSLSageTrainer(model=model if model is not None else tiny_gpt2(vocab), args=FSLSageConfig(**settings),
                          train_dataset=train, eval_dataset=evalset.select(range(64)),
                          data_collator=PadCollator(pad), peft_config=peft_config)


def load_script(path: Path, name: str):
    """The module a script file defines (a recipe or benchmark, which is not part of the package), imported by path."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module
