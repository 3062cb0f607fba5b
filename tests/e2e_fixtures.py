"""Small E2E datasets for trainer tests: real rows and GPT-2 tokenization, ids renumbered to the tokens used.

Renumbering keeps the real text and loss masking while shrinking the LM head
from 50,257 rows to the ~1.5k tokens the shipped sample uses, so training
runs take seconds on a CPU.
"""

from __future__ import annotations

from functools import lru_cache

import datasets

from hf_fsl_sage.e2e.data import E2E_SAMPLE_PATH, load_e2e_csv, offline_gpt2_tokenizer, split_by_mr, tokenize_e2e


@lru_cache(maxsize=None)
def compact_e2e(max_length: int = 48) -> tuple[datasets.Dataset, datasets.Dataset, int, int]:
    """(train, eval, vocab_size, pad_id) with the renumbered ids; train and eval share no ``mr``."""
    tok = offline_gpt2_tokenizer()
    splits = split_by_mr(load_e2e_csv(E2E_SAMPLE_PATH), eval_fraction=0.15, seed=0)
    eval_name = "validation" if "validation" in splits else "test"
    raw = {"train": splits["train"], "eval": splits[eval_name]}
    tokenized = {k: tokenize_e2e(v, tok, max_length=max_length) for k, v in raw.items()}
    used = sorted({t for ds in tokenized.values() for row in ds["input_ids"] for t in row} | {tok.eos_token_id})
    new_id = {old: i for i, old in enumerate(used)}

    def renumber(row):
        return {
            "input_ids": [new_id[t] for t in row["input_ids"]],
            "labels": [t if t == -100 else new_id[t] for t in row["labels"]],
        }

    out = {k: v.map(renumber) for k, v in tokenized.items()}
    for k in out:
        out[k] = out[k].add_column("mr", raw[k]["mr"])
    return out["train"], out["eval"], len(used), new_id[tok.eos_token_id]


class PadCollator:
    """Right padding with ``pad_id`` / mask 0 / label -100."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows):
        import torch

        width = max(len(r["input_ids"]) for r in rows)

        def pad(key, value):
            return torch.tensor([list(r[key]) + [value] * (width - len(r[key])) for r in rows])

        return {"input_ids": pad("input_ids", self.pad_id), "attention_mask": pad("attention_mask", 0),
                "labels": pad("labels", -100)}


@lru_cache(maxsize=None)
def pretrained_state(config_json: str, steps: int = 30, seed: int = 0) -> dict:
    """Weights of a model trained centrally for ``steps`` steps on the train split: a stand-in for pretraining."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    train, _, _, pad = compact_e2e()
    torch.manual_seed(seed)
    config = AutoConfig.for_model(**__import__("json").loads(config_json))
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
