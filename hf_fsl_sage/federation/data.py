"""Training data for any causal LM: tokenizing a text column, padding batches, the columns a split model reads."""

from __future__ import annotations

from typing import Any

import datasets
import pyarrow.compute as pc
from torch import nn
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase

from ..splitting.loss import IGNORE_INDEX


MODEL_COLUMNS = ("input_ids", "attention_mask", "labels", "position_ids")


def tokenize_text(
    ds: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int = 128,
    text_column: str = "text",
    add_eos: bool = True,
    num_proc: int | None = None,
) -> datasets.Dataset:
    """Tokenize a plain-text column for causal LM training (``labels`` = ``input_ids``).

    Blank rows are dropped. Texts are truncated to ``max_length`` tokens, the EOS
    included when ``add_eos``. The original columns are removed.
    """
    if text_column not in ds.column_names:
        raise ValueError(f"No {text_column!r} column (found {ds.column_names}); pass text_column=...")
    if add_eos and tokenizer.eos_token_id is None:
        raise ValueError("add_eos=True but the tokenizer has no EOS token.")
    ds = ds.filter(lambda b: [bool(t and t.strip()) for t in b[text_column]], batched=True)
    budget = max_length - 1 if add_eos else max_length

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[list[int]]]:
        ids = tokenizer(batch[text_column], add_special_tokens=False)["input_ids"]
        ids = [x[:budget] + ([tokenizer.eos_token_id] if add_eos else []) for x in ids]
        return {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids], "labels": [list(x) for x in ids]}

    return ds.map(encode, batched=True, remove_columns=ds.column_names, num_proc=num_proc)


# --------------------------------------------------------------------------- batching


def split_lm_collator(
    tokenizer: PreTrainedTokenizerBase, pad_to_multiple_of: int | None = None
) -> DataCollatorForSeq2Seq:
    """Collator padding on the right: ``input_ids`` with the pad id, ``attention_mask``
    with 0 and ``labels`` with -100.

    transformers' ``DataCollatorForSeq2Seq`` does exactly this for a decoder-only
    model when no ``model`` is passed and the tokenizer pads on the right.
    """
    if tokenizer.pad_token_id is None:
        raise ValueError("The tokenizer has no pad token; set tokenizer.pad_token = tokenizer.eos_token.")
    if tokenizer.padding_side != "right":
        raise ValueError(
            f"tokenizer.padding_side is {tokenizer.padding_side!r}; training batches must be padded on "
            "the right. Set tokenizer.padding_side = 'right' (use left padding only for generation)."
        )
    return DataCollatorForSeq2Seq(
        tokenizer, padding=True, pad_to_multiple_of=pad_to_multiple_of, label_pad_token_id=IGNORE_INDEX
    )


def text_max_length(model: nn.Module, tokenizer: PreTrainedTokenizerBase | None) -> int:
    """Tokens a row of a ``text`` column keeps: the positions the model has (``max_position_embeddings``), or the
    tokenizer's ``model_max_length`` if smaller; 1,024 when neither says."""
    config = getattr(model, "config", None)
    limits = [getattr(config.get_text_config(), "max_position_embeddings", None) if config is not None else None,
              getattr(tokenizer, "model_max_length", None)]
    limits = [int(n) for n in limits if isinstance(n, int) and 0 < n < 10**9]  # tokenizers say 1e30 for "no limit"
    return min(limits) if limits else 1024


def prepare_dataset(ds: datasets.Dataset, tokenizer, name: str, max_length: int = 1024) -> datasets.Dataset:
    """Tokenize a ``text`` column if needed (at most ``max_length`` tokens a row), add ``labels`` if missing, keep
    only :data:`MODEL_COLUMNS`."""
    if "input_ids" not in ds.column_names:
        if "text" not in ds.column_names:
            raise ValueError(f"{name} needs an 'input_ids' column or a 'text' column; it has {ds.column_names}.")
        if tokenizer is None:
            raise ValueError(f"{name} has a 'text' column: pass processing_class (the tokenizer) to tokenize it.")
        ds = tokenize_text(ds, tokenizer, max_length=max_length)
    if "labels" not in ds.column_names:
        def add_labels(row):
            mask = row.get("attention_mask") or [1] * len(row["input_ids"])
            return {"labels": [t if m else IGNORE_INDEX for t, m in zip(row["input_ids"], mask)]}

        ds = ds.map(add_labels)
    return ds.remove_columns([c for c in ds.column_names if c not in MODEL_COLUMNS])


# --------------------------------------------------------------------------- checks before training


def learned_positions(model: nn.Module) -> int | None:
    """How many positions ``model`` has learned embeddings for (GPT-2's ``wpe``, OPT's offset table), or None
    when its positions are computed (rotary, ALiBi) and a longer sequence does not fail on its own."""
    config = getattr(model, "config", None)
    limit = getattr(config.get_text_config(), "max_position_embeddings", None) if config is not None else None
    if not limit:
        return None
    tokens = model.get_input_embeddings()
    for module in model.modules():
        if isinstance(module, nn.Embedding) and module is not tokens and limit <= module.num_embeddings <= limit + 2:
            return int(limit)
    return None


def check_token_rows(ds: datasets.Dataset, name: str, vocab_size: int, max_positions: int | None,
                     need_labels: bool = True) -> None:
    """Refuse rows a causal LM cannot train on, before the first step, with what is wrong and how to fix it:
    an empty dataset, token ids or labels outside ``[0, vocab_size)``, rows longer than ``max_positions``,
    and (with ``need_labels``) rows whose labels are all ``-100``."""
    if len(ds) == 0:
        raise ValueError(f"{name} is empty: give it at least one row.")
    table = ds.with_format("arrow")[:]
    ids = table.column("input_ids")
    lengths = pc.list_value_length(ids)
    flat = pc.list_flatten(ids)
    low, high = pc.min_max(flat).values() if len(flat) else (None, None)
    if low is not None and (low.as_py() < 0 or high.as_py() >= vocab_size):
        outside = pc.or_(pc.less(flat, 0), pc.greater_equal(flat, vocab_size))
        bad = pc.list_parent_indices(ids)[pc.index(outside, True).as_py()].as_py()
        raise ValueError(f"{name} holds token ids in [{low}, {high}] but the model's vocabulary has {vocab_size} "
                         f"ids (row {bad}): tokenize with the model's own tokenizer, or resize the model's embeddings "
                         "(model.resize_token_embeddings(len(tokenizer))).")
    longest = pc.max(lengths).as_py()
    if max_positions is not None and longest is not None and longest > max_positions:
        row = pc.index(lengths, longest).as_py()
        raise ValueError(f"{name} has rows of up to {longest} tokens (row {row}) but the model has position "
                         f"embeddings for {max_positions}: truncate them (tokenize_text(..., max_length="
                         f"{max_positions}) or ds.map(...)) or drop longer rows.")
    if not need_labels or "labels" not in table.column_names:
        return
    labels = table.column("labels")
    flat = pc.list_flatten(labels)
    kept = pc.not_equal(flat, IGNORE_INDEX)
    learnable = pc.unique(pc.list_parent_indices(labels).filter(kept))
    if len(learnable) < len(ds):
        empty = sorted(set(range(len(ds))) - set(learnable.to_pylist()))
        raise ValueError(f"{name} has {len(empty)} row(s) whose labels are all {IGNORE_INDEX} (no token to learn "
                         f"from), e.g. rows {empty[:5]}: drop them, e.g. ds.filter(lambda r: any(t != "
                         f"{IGNORE_INDEX} for t in r['labels'])).")
    real = flat.filter(kept)
    if len(real) and (pc.min(real).as_py() < 0 or pc.max(real).as_py() >= vocab_size):
        raise ValueError(f"{name} has labels outside the vocabulary of {vocab_size} ids (other than "
                         f"{IGNORE_INDEX}): labels are token ids of the model's tokenizer.")

