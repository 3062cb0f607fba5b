"""Training data for any causal LM: tokenizing a text column, padding batches, the columns a split model reads."""

from __future__ import annotations

from typing import Any

import datasets
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


def prepare_dataset(ds: datasets.Dataset, tokenizer, name: str) -> datasets.Dataset:
    """Tokenize a ``text`` column if needed, add ``labels`` if missing, keep only :data:`MODEL_COLUMNS`."""
    if "input_ids" not in ds.column_names:
        if "text" not in ds.column_names:
            raise ValueError(f"{name} needs an 'input_ids' column or a 'text' column; it has {ds.column_names}.")
        if tokenizer is None:
            raise ValueError(f"{name} has a 'text' column: pass processing_class (the tokenizer) to tokenize it.")
        ds = tokenize_text(ds, tokenizer, max_length=min(getattr(tokenizer, "model_max_length", 1024), 1024))
    if "labels" not in ds.column_names:
        def add_labels(row):
            mask = row.get("attention_mask") or [1] * len(row["input_ids"])
            return {"labels": [t if m else IGNORE_INDEX for t, m in zip(row["input_ids"], mask)]}

        ds = ds.map(add_labels)
    return ds.remove_columns([c for c in ds.column_names if c not in MODEL_COLUMNS])
