"""Every bad input stops the run before its first step, with an error that names the problem and the fix."""

from __future__ import annotations

import pickle
import re
import shutil
from pathlib import Path

import datasets
import huggingface_hub.constants
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2Model,
    T5Config,
    T5ForConditionalGeneration,
    TrainerCallback,
)

from hf_fsl_sage import FSLSageConfig, FSLSageTrainer
from hf_fsl_sage.federation.state_io import CheckpointError


VOCAB, POSITIONS, LENGTH = 50, 16, 8


def tiny_gpt2() -> nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(GPT2Config(n_layer=3, n_embd=16, n_head=2, n_positions=POSITIONS,
                                                       vocab_size=VOCAB))


def rows(n: int = 12, length: int = LENGTH, top: int = VOCAB, labels=None, **columns) -> datasets.Dataset:
    ids = [[(7 * i + j) % top if j else top - 1 for j in range(length)] for i in range(n)]
    data = {"input_ids": ids, "attention_mask": [[1] * length for _ in ids], **columns}
    if labels is not None:
        data["labels"] = [labels(i, x) for i, x in enumerate(ids)]
    return datasets.Dataset.from_dict(data)


class Collator:
    def __call__(self, features):
        width = max(len(f["input_ids"]) for f in features)
        batch = {}
        for key, pad in (("input_ids", 0), ("attention_mask", 0), ("labels", -100)):
            batch[key] = torch.tensor([f[key] + [pad] * (width - len(f[key])) for f in features])
        return batch


class StepSpy(TrainerCallback):
    """Counts the steps that began: a bad input must be refused before the first."""

    steps = 0

    def on_step_begin(self, args, state, control, **kwargs):
        StepSpy.steps += 1


SETTINGS = {"num_clients": 2, "local_steps": 1, "max_steps": 2, "per_device_train_batch_size": 2, "aux_num_layers": 1,
                "align_epochs": 1, "warmup_steps": 0, "report_to": "none", "save_strategy": "no", "disable_tqdm": True}


# ---------------------------------------------------------------- settings refused by FSLSageConfig itself
CONFIG_CASES = {
    "cut_layer_zero": ({"cut_layer": 0}, "cut_layer=0 must be an integer >= 1"),
    "cut_layer_negative": ({"cut_layer": -2}, "cut_layer=-2 must be an integer >= 1"),
    "cut_layer_not_an_integer": ({"cut_layer": 1.5}, "cut_layer=1.5 must be an integer >= 1"),
    "no_clients": ({"num_clients": 0}, "num_clients=0 must be an integer >= 1"),
    "more_participants_than_clients": ({"clients_per_round": 3}, ("clients_per_round=3 must be between 1 and "
                                                                 "num_clients=2")),
    "no_local_steps": ({"local_steps": 0}, "local_steps=0 must be an integer >= 1"),
    "upload_interval_zero": ({"server_update_interval": 0}, "server_update_interval=0 must be an integer >= 1"),
    "align_interval_zero": ({"align_interval": 0}, "align_interval=0 must be an integer >= 1"),
    "empty_align_buffer": ({"align_buffer_size": 0}, "align_buffer_size=0 must be an integer >= 1"),
    "no_aux_blocks": ({"aux_num_layers": 0}, "aux_num_layers=0 must be an integer >= 1"),
    "negative_align_epochs": ({"align_epochs": -1}, "align_epochs=-1 must be >= 0"),
    "zero_align_learning_rate": ({"align_learning_rate": 0.0}, "align_learning_rate=0.0 must be > 0"),
    "negative_replay_steps": ({"server_replay_steps": -1}, "server_replay_steps=-1 must be an integer >= 0"),
    "replay_with_private_labels": ({"server_replay_steps": 2, "private_labels": True},
                                   "server_replay_steps=2 needs the labels on the server"),
    "unknown_algorithm": ({"algorithm": "fedprox"}, "algorithm='fedprox' is unknown; choose one of"),
    "unknown_partition": ({"partition": "shards"}, "partition='shards' must be one of"),
    "unknown_aux_init": ({"aux_init": "zeros"}, "aux_init='zeros' must be one of"),
    "dirichlet_alpha_zero": ({"dirichlet_alpha": 0.0}, "dirichlet_alpha=0.0 must be > 0"),
    "dirichlet_without_column": ({"partition": "dirichlet"}, "partition='dirichlet' needs partition_column"),
    "client_ranks_too_short": ({"client_ranks": [0]}, ("client_ranks=[0] must give one process index (>= 0) to each "
                                                      "of the 2 clients")),
    "client_ranks_negative": ({"client_ranks": [0, -1]}, "must give one process index (>= 0)"),
    "unknown_nonfinite_policy": ({"nonfinite": "ignore"}, "nonfinite='ignore' must be 'raise' or 'skip'"),
    "unknown_failure_policy": ({"client_failures": "retry"}, "client_failures='retry' must be 'raise' or 'drop'"),
    "failure_rate_above_one": ({"simulate_client_failures": 1.5, "client_failures": "drop"},
                               "simulate_client_failures=1.5 must be a probability in [0, 1)"),
    "simulated_failures_that_stop_the_run": ({"simulate_client_failures": 0.1},
                                             "simulate_client_failures needs client_failures='drop'"),
    "gradient_accumulation": ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps=2 is not supported"),
}


@pytest.mark.parametrize("name", sorted(CONFIG_CASES))
def test_bad_settings_are_refused_by_the_config(tmp_path, name):
    change, message = CONFIG_CASES[name]
    with pytest.raises(ValueError, match=re.escape(message)):
        FSLSageConfig(output_dir=str(tmp_path), **{**SETTINGS, **change})


# ---------------------------------------------------------------- models and data refused by the trainer
def _t5() -> nn.Module:
    return T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=16, d_ff=32, num_layers=2, num_heads=2,
                                               d_kv=8))


def _no_head() -> nn.Module:
    return GPT2Model(GPT2Config(n_layer=3, n_embd=16, n_head=2, n_positions=POSITIONS, vocab_size=VOCAB))


TRAINER_CASES = {
    "cut_layer_equal_to_depth": ({"cut_layer": 3}, {}, ValueError,
                                 "cut_layer=3 is out of range for gpt2 with 3 blocks: choose an integer in 1 … 2"),
    "cut_layer_beyond_depth": ({"cut_layer": 7}, {}, ValueError, "cut_layer=7 is out of range for gpt2 with 3"),
    "aux_deeper_than_the_server": ({"aux_num_layers": 3}, {}, ValueError,
                                   ("aux_num_layers=3 exceeds the 2 blocks the server holds after cut_layer=1; "
                                   "choose aux_num_layers <= 2")),
    "encoder_decoder_model": ({}, {"model": _t5}, ValueError, "is an encoder-decoder model"),
    "bare_module": ({}, {"model": lambda: nn.Sequential(nn.Embedding(VOCAB, 8), nn.Linear(8, VOCAB))}, TypeError,
                    "model must be a model id or a transformers causal LM (PreTrainedModel), got Sequential"),
    "model_without_lm_head": ({}, {"model": _no_head}, ValueError, ("GPT2Model (model_type 'gpt2') is not a causal "
                                                                    "LM with an LM head")),
    "lora_target_missing": ({}, {"peft_config": LoraConfig(r=2, target_modules=["q_proj"])}, ValueError,
                            "Target modules {'q_proj'} not found in the base model"),
    "more_clients_than_rows": ({"num_clients": 20}, {}, ValueError, ("Cannot give 20 clients at least 1 example(s) "
                                                                     "each from 12 examples; use fewer clients")),
    "no_train_dataset": ({}, {"train_dataset": lambda: None}, ValueError, "FSLSageTrainer needs a train_dataset"),
    "empty_train_dataset": ({}, {"train_dataset": lambda: rows(0)}, ValueError, "train_dataset is empty"),
    "empty_eval_dataset": ({}, {"eval_dataset": lambda: rows(0)}, ValueError, "eval_dataset is empty"),
    "missing_columns": ({}, {"train_dataset": lambda: datasets.Dataset.from_dict({"foo": [1, 2, 3, 4]})},
                        ValueError, "train_dataset needs an 'input_ids' column or a 'text' column; it has ['foo']"),
    "text_without_tokenizer": ({}, {"train_dataset": lambda: datasets.Dataset.from_dict({"text": ["a b"] * 4})},
                               ValueError, "pass processing_class (the tokenizer) to tokenize it"),
    "token_ids_outside_vocabulary": ({}, {"train_dataset": lambda: rows(top=VOCAB + 5)}, ValueError,
                                     ("train_dataset holds token ids in [0, 54] but the model's vocabulary has 50 ids "
                                     "(row 0): tokenize with the model's own tokenizer")),
    "negative_token_ids": ({}, {"train_dataset": lambda: rows(labels=lambda i, x: x).map(
        lambda r, i: {"input_ids": [-1 if i == 3 else t for t in r["input_ids"]]}, with_indices=True)}, ValueError,
        "train_dataset holds token ids in [-1, 49] but the model's vocabulary has 50 ids (row 3)"),
    "eval_token_ids_outside_vocabulary": ({}, {"eval_dataset": lambda: rows(top=VOCAB + 1)}, ValueError,
                                          "eval_dataset holds token ids in [0, 50]"),
    "labels_outside_vocabulary": ({}, {"train_dataset": lambda: rows(labels=lambda i, x: [*x[:-1], VOCAB])},
                                  ValueError, "train_dataset has labels outside the vocabulary of 50 ids"),
    "rows_without_a_label": ({}, {"train_dataset": lambda: rows(labels=lambda i, x: x if i % 4 else [-100] * len(x))},
                             ValueError, ("train_dataset has 3 row(s) whose labels are all -100 (no token to learn "
                                         "from), e.g. rows [0, 4, 8]: drop them")),
    "rows_longer_than_the_positions": ({}, {"train_dataset": lambda: rows(length=POSITIONS + 4)}, ValueError,
                                       ("train_dataset has rows of up to 20 tokens (row 0) but the model has position "
                                       "embeddings for 16: truncate them")),
    "dirichlet_column_missing": ({"partition": "dirichlet", "partition_column": "topic"}, {}, ValueError,
                                 "No column 'topic' to group by"),
    "local_folder_that_does_not_exist": ({}, {"model": lambda: "./no/such/folder"}, OSError,
                                         "model='./no/such/folder' is not an existing folder: check the path"),
    "peft_model_with_a_peft_config": ({}, {"model": lambda: get_peft_model(tiny_gpt2(), LoraConfig(
        r=2, target_modules=["c_attn"], fan_in_fan_out=True)), "peft_config": LoraConfig(r=2)}, ValueError,
        "model is already a PeftModel (it carries adapters) and peft_config is given too: pass the base model"),
}


@pytest.mark.parametrize("name", sorted(TRAINER_CASES))
def test_bad_models_and_data_are_refused_before_the_first_step(tmp_path, name):
    settings, parts, error, message = TRAINER_CASES[name]
    StepSpy.steps = 0
    make = {"model": tiny_gpt2, "train_dataset": rows, "eval_dataset": lambda: None, **{
        k: v for k, v in parts.items() if k != "peft_config"}}
    with pytest.raises(error, match=re.escape(message)) as raised:
        args = FSLSageConfig(output_dir=str(tmp_path), **{**SETTINGS, **settings})
        trainer = FSLSageTrainer(model=make["model"](), args=args, train_dataset=make["train_dataset"](),
                                 eval_dataset=make["eval_dataset"](), data_collator=Collator(),
                                 peft_config=parts.get("peft_config"), callbacks=[StepSpy()])
        trainer.train()
    assert StepSpy.steps == 0
    assert "\n" not in str(raised.value), "one line"


def test_a_hub_id_that_cannot_be_reached_is_one_line(tmp_path, monkeypatch):
    """Offline (or mistyped, or private), a Hub id gives one line that says what to pass instead, without the chain
    of transformers' and huggingface_hub's errors."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match=re.escape("Could not load the model 'no-such-org/no-such-model' (a Hub id, as "
                                                "it is not a local folder): We couldn't connect")) as raised:
        FSLSageTrainer(model="no-such-org/no-such-model", args=FSLSageConfig(output_dir=str(tmp_path), **SETTINGS),
                       train_dataset=rows(), data_collator=Collator())
    assert "\n" not in str(raised.value) and raised.value.__suppress_context__ and raised.value.__cause__ is None
    assert "Pass a local folder saved with save_pretrained, or a model object" in str(raised.value)


# ---------------------------------------------------------------- checkpoints refused when resuming
class Unpickled:
    """Unpickling this creates ``marker``: proof that a checkpoint was unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (Path(self.marker),)


def _truncate(state: Path, tmp: Path) -> None:
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])


def _flip_last_byte(state: Path, tmp: Path) -> None:
    raw = bytearray(state.read_bytes())
    raw[-1] ^= 0xFF
    state.write_bytes(bytes(raw))


def _pickle(state: Path, tmp: Path) -> None:
    state.write_bytes(pickle.dumps({"clients": Unpickled(str(tmp / "unpickled"))}))


def _as_if_three_processes(state: Path, tmp: Path) -> None:
    state.rename(state.with_name("federation-rank0-of-3.safetensors"))


RESUME_CASES = {
    "missing_checkpoint": ({}, None, ValueError, "Can't find a valid checkpoint at"),
    "other_number_of_clients": ({"num_clients": 3}, None, ValueError,
                                ("the checkpoint was written by a run with 2 clients; this run has 3: resume with "
                                "num_clients=2")),
    "other_number_of_processes": ({}, _as_if_three_processes, FileNotFoundError,
                                  ("has no federation.safetensors (it holds ['federation-rank0-of-3.safetensors']: "
                                  "resume with the number of processes that wrote it)")),
    "no_federation_state": ({}, lambda state, tmp: state.unlink(), FileNotFoundError,
                            "has no federation.safetensors: it was not written by FSLSageTrainer"),
    "truncated_state": ({}, _truncate, CheckpointError, "federation.safetensors"),
    "corrupted_state": ({}, _flip_last_byte, CheckpointError, "is corrupted: its tensors do not match the checksum"),
    "pickled_state": ({}, _pickle, CheckpointError, "is truncated or not a safetensors state file"),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("written")
    args = FSLSageConfig(output_dir=str(out), **{**SETTINGS, "save_strategy": "steps", "save_steps": 2})
    FSLSageTrainer(model=tiny_gpt2(), args=args, train_dataset=rows(), data_collator=Collator()).train()
    return out / "checkpoint-2"


@pytest.mark.parametrize("name", sorted(RESUME_CASES))
def test_bad_checkpoints_are_refused_before_the_first_step(tmp_path, checkpoint, name):
    settings, damage, error, message = RESUME_CASES[name]
    copy = tmp_path / "checkpoint-2"
    shutil.copytree(checkpoint, copy)
    if damage is not None:
        damage(copy / "federation.safetensors", tmp_path)
    StepSpy.steps = 0
    args = FSLSageConfig(output_dir=str(tmp_path / "out"), **{**SETTINGS, "max_steps": 4, **settings})
    trainer = FSLSageTrainer(model=tiny_gpt2(), args=args, train_dataset=rows(), data_collator=Collator(),
                             callbacks=[StepSpy()])
    with pytest.raises(error, match=re.escape(message)):
        trainer.train(resume_from_checkpoint=str(tmp_path / "nowhere" if name == "missing_checkpoint" else copy))
    assert StepSpy.steps == 0 and not (tmp_path / "unpickled").exists()
