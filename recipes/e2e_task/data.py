"""Datasets for split fine-tuning: E2E NLG (data-to-text) and generic text.

E2E training examples are laid out as ``{mr} ||| {ref}<|endoftext|>``:

* the prompt is the meaning representation followed by :data:`E2E_SEPARATOR`
  (``" |||"``, see :func:`e2e_prompt`); generation starts right after it;
* the target is the reference with one leading space (GPT-2's BPE attaches a
  space to the word that follows it, so the prompt ends without one) followed by
  the tokenizer's EOS token.

Only target tokens are scored: ``labels`` is ``-100`` on the prompt, so the loss
covers the reference and the EOS. Prompt and target are tokenized separately
and concatenated, which gives the same ids as tokenizing the whole string for
GPT-2 (the separator and the reference start new pre-tokens) and makes the
label mask exact.
"""

from __future__ import annotations

import csv
import json
import random
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import datasets
from tokenizers import Tokenizer
from transformers import GPT2TokenizerFast, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from hf_fsl_sage.splitting.loss import IGNORE_INDEX


RESOURCES_DIR = Path(__file__).resolve().parent / "resources"
GPT2_TOKENIZER_DIR = RESOURCES_DIR / "gpt2-tokenizer"
E2E_SAMPLE_PATH = RESOURCES_DIR / "e2e" / "e2e_sample.csv"

E2E_ATTRIBUTION = """\
Trained on the **E2E NLG** dataset by Jekaterina Novikova, Ondřej Dušek and Verena Rieser,
"The E2E Dataset: New Challenges for End-to-End Generation", Proceedings of the 18th Annual
SIGDIAL Meeting on Discourse and Dialogue, 2017 (arXiv:1706.09254), licensed under
[CC BY-SA 4.0](https://creativecommons.org/licenses/by-sa/4.0/)."""

E2E_SEPARATOR = " |||"
E2E_COLUMNS = ("mr", "ref")

# Column names used by the Hub versions of E2E, mapped to ours.
_HUB_COLUMN_MAP = {
    "meaning_representation": "mr",
    "human_reference": "ref",  # e2e_nlg
    "target": "ref",  # GEM/e2e_nlg
}

_MR_SLOT = re.compile(r"([^\[\],]+)\[([^\]]*)\]")


# --------------------------------------------------------------------------- tokenizer


def offline_gpt2_tokenizer(model_max_length: int = 1024) -> GPT2TokenizerFast:
    """GPT-2 tokenizer built from the files shipped with the package (no network).

    The pad token is the EOS token (GPT-2 has none of its own) and padding is on
    the right, as the training collator expects.
    """
    tok = GPT2TokenizerFast.from_pretrained(
        str(GPT2_TOKENIZER_DIR), model_max_length=model_max_length, local_files_only=True
    )
    tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def restricted_tokenizer(tokenizer: PreTrainedTokenizerFast, texts: Iterable[str]) -> GPT2TokenizerFast:
    """A byte-level BPE tokenizer (e.g. GPT-2's) cut down to the tokens that ``texts`` use.

    Kept: the tokens of ``texts``, every token a kept token is merged from (recursively), the 256 byte
    tokens and the special tokens, renumbered in their original order; and the merges that build kept
    tokens. A text tokenizes into the same tokens as before when the original tokenizer used only kept
    tokens for it (every merge BPE applied then builds a kept token, and no merge it did not apply has a
    lower rank), in particular every text of ``texts``; other text still tokenizes, into smaller pieces.
    For a model trained from scratch on such text the vocabulary, and with it the embedding and the LM
    head, shrinks from 50,257 rows to a few thousand.
    """
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model["type"] != "BPE" or spec["pre_tokenizer"].get("type") != "ByteLevel":
        raise ValueError("restricted_tokenizer needs a byte-level BPE tokenizer (like GPT-2's).")
    vocab: dict[str, int] = model["vocab"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    parents = {a + b: (a, b) for a, b in merges}
    by_id = {i: t for t, i in vocab.items()}
    special = {t["content"] for t in spec["added_tokens"]}
    keep = set(sorted(vocab, key=vocab.get)[:256]) | special
    todo = [by_id[i] for text in texts for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
    while todo:
        token = todo.pop()
        if token not in keep:
            keep.add(token)
            todo.extend(parents.get(token, ()))
    new_ids = {t: n for n, t in enumerate(sorted(keep, key=vocab.get))}
    model["vocab"] = new_ids
    model["merges"] = [[a, b] for a, b in merges if a + b in keep]
    for added in spec["added_tokens"]:
        added["id"] = new_ids[added["content"]]
    names = {k: getattr(tokenizer, k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    return GPT2TokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                             model_max_length=tokenizer.model_max_length, padding_side=tokenizer.padding_side,
                             **{k: v for k, v in names.items() if v is not None})


# --------------------------------------------------------------------------- loading


def load_e2e_csv(path: str | Path) -> datasets.Dataset:
    """Read an E2E CSV file with a header row containing ``mr`` and ``ref``.

    Other columns are dropped. Raises ``ValueError`` if a required column is missing.
    """
    path = Path(path)
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        found = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in E2E_COLUMNS if c not in found]
        if missing:
            raise ValueError(
                f"E2E CSV {str(path)!r} lacks column(s) {missing} (found {found}). "
                "Give it a header row with 'mr' (meaning representation) and 'ref' "
                "(reference text), e.g. rename 'meaning_representation' to 'mr' and "
                "'human_reference' to 'ref'."
            )
        reader.fieldnames = found
        rows = [((row["mr"] or "").strip(), (row["ref"] or "").strip()) for row in reader]
    return datasets.Dataset.from_dict(
        {"mr": [r[0] for r in rows], "ref": [r[1] for r in rows]},
        features=datasets.Features({"mr": datasets.Value("string"), "ref": datasets.Value("string")}),
    )


def _normalize_hub_split(ds: datasets.Dataset) -> datasets.Dataset:
    renames = {
        src: dst
        for src, dst in _HUB_COLUMN_MAP.items()
        if src in ds.column_names and dst not in ds.column_names
    }
    ds = ds.rename_columns(renames)
    missing = [c for c in E2E_COLUMNS if c not in ds.column_names]
    if missing:
        raise ValueError(
            f"Hub dataset split lacks column(s) {missing} (found {ds.column_names}); "
            f"known Hub column names are {_HUB_COLUMN_MAP}. "
            "Pass local CSV files with columns 'mr' and 'ref' instead."
        )
    return ds.select_columns(list(E2E_COLUMNS))


def load_e2e(
    train_file: str | Path | None = None,
    validation_file: str | Path | None = None,
    test_file: str | Path | None = None,
    hub_id: str = "e2e_nlg",
) -> datasets.DatasetDict:
    """Load E2E as a ``DatasetDict`` with columns ``mr`` and ``ref``.

    If any local file is given, only the given files are read (split names
    ``train``/``validation``/``test``) and the Hub is not contacted. Otherwise the
    dataset ``hub_id`` is loaded from the Hugging Face Hub (``e2e_nlg`` or
    ``GEM/e2e_nlg``) and its columns are renamed to ``mr``/``ref``.
    """
    files = {"train": train_file, "validation": validation_file, "test": test_file}
    local = {split: f for split, f in files.items() if f is not None}
    if local:
        return datasets.DatasetDict({split: load_e2e_csv(f) for split, f in local.items()})
    raw = datasets.load_dataset(hub_id)
    return datasets.DatasetDict({split: _normalize_hub_split(ds) for split, ds in raw.items()})


def split_by_mr(
    ds: datasets.Dataset, eval_fraction: float, test_fraction: float = 0.0, seed: int = 0
) -> datasets.DatasetDict:
    """Split ``ds`` into train/validation(/test) so that no ``mr`` spans two splits.

    Distinct ``mr`` values are sorted, shuffled with ``seed`` and assigned whole
    to ``test`` then ``validation`` until each holds about its fraction of the
    rows; the rest is ``train``. A ``test`` split is returned only when
    ``test_fraction > 0``. Rows keep their original order within a split.
    """
    if not 0.0 <= eval_fraction < 1.0 or not 0.0 <= test_fraction < 1.0:
        raise ValueError("eval_fraction and test_fraction must be in [0, 1).")
    if eval_fraction + test_fraction >= 1.0:
        raise ValueError("eval_fraction + test_fraction must be below 1 to leave training rows.")
    if "mr" not in ds.column_names:
        raise ValueError(f"split_by_mr needs an 'mr' column (found {ds.column_names}).")

    rows_of: dict[str, list[int]] = {}
    for i, mr in enumerate(ds["mr"]):
        rows_of.setdefault(mr, []).append(i)
    mrs = sorted(rows_of)
    random.Random(seed).shuffle(mrs)

    n = len(ds)
    wanted = [("test", test_fraction), ("validation", eval_fraction)]
    assigned: dict[str, list[int]] = {"test": [], "validation": [], "train": []}
    pos = 0
    for name, fraction in wanted:
        if fraction <= 0:
            continue
        target = max(1, round(fraction * n))
        while pos < len(mrs) and len(assigned[name]) < target:
            assigned[name].extend(rows_of[mrs[pos]])
            pos += 1
    for mr in mrs[pos:]:
        assigned["train"].extend(rows_of[mr])
    if not assigned["train"]:
        raise ValueError(
            f"Only {len(mrs)} distinct mr values: too few to leave any for training; "
            "lower eval_fraction/test_fraction."
        )

    out = {"train": ds.select(sorted(assigned["train"]))}
    if eval_fraction > 0:
        out["validation"] = ds.select(sorted(assigned["validation"]))
    if test_fraction > 0:
        out["test"] = ds.select(sorted(assigned["test"]))
    return datasets.DatasetDict(out)


# --------------------------------------------------------------------------- meaning representations


def parse_mr(mr: str) -> dict[str, str]:
    """Parse ``"name[Alimentum], area[city centre]"`` into ``{"name": "Alimentum", ...}``."""
    return {m.group(1).strip(): m.group(2).strip() for m in _MR_SLOT.finditer(mr)}


def mr_attribute(mr: str, key: str) -> str | None:
    """Value of slot ``key`` (e.g. ``"food"``, ``"customer rating"``) in ``mr``, or ``None``."""
    return parse_mr(mr).get(key)


def mr_slot(key: str, column: str = "mr"):
    """A ``group_by`` for :func:`~hf_fsl_sage.federation.partition.partition`: the slot ``key`` of a row's
    meaning representation (``None``, its own group, when the slot is absent)."""

    def group(row: dict) -> str | None:
        return mr_attribute(row[column], key)

    group.__name__ = f"mr_slot({key!r})"
    return group


def with_mr_slot_column(ds: datasets.Dataset, key: str, name: str | None = None,
                        column: str = "mr") -> datasets.Dataset:
    """``ds`` with a column (``name``, default ``key``) holding each row's slot ``key`` (``None`` where absent),
    ready to be an :class:`~hf_fsl_sage.FSLSageConfig` ``partition_column``."""
    return ds.add_column(name or key, [mr_attribute(mr, key) for mr in ds[column]])


def e2e_prompt(mr: str, separator: str = E2E_SEPARATOR) -> str:
    """Generation prompt for a meaning representation: ``mr`` + ``separator``.

    Use the same ``separator`` as :func:`tokenize_e2e`; the model continues with
    the reference's first word (which carries its leading space).
    """
    return mr.strip() + separator


# --------------------------------------------------------------------------- tokenization


def tokenize_e2e(
    ds: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int = 128,
    separator: str = E2E_SEPARATOR,
    num_proc: int | None = None,
) -> datasets.Dataset:
    """Tokenize E2E rows into ``input_ids``/``attention_mask``/``labels``.

    Each example is ``mr + separator + " " + ref + eos`` (see the module
    docstring); ``labels`` is ``-100`` on the ``mr`` and separator tokens. When
    the example is longer than ``max_length`` the ``mr`` is cut from its end
    first (the separator is kept); the reference is cut only if it cannot fit
    on its own. The original columns are removed.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has no EOS token; set tokenizer.eos_token before tokenizing.")
    sep_ids = tokenizer(separator, add_special_tokens=False)["input_ids"]
    if max_length < len(sep_ids) + 2:
        raise ValueError(f"max_length={max_length} cannot hold an mr token, the separator and a target token.")
    eos = tokenizer.eos_token_id

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[list[int]]]:
        mr_ids = tokenizer([m.strip() for m in batch["mr"]], add_special_tokens=False)["input_ids"]
        ref_ids = tokenizer([" " + r.strip() for r in batch["ref"]], add_special_tokens=False)["input_ids"]
        out: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
        for m, r in zip(mr_ids, ref_ids):
            target = r + [eos]
            room = max_length - len(sep_ids)  # tokens left for mr + target
            if len(m) + len(target) > room:
                m = m[: max(1, room - len(target))]
                target = target[: room - len(m)]
            ids = m + sep_ids + target
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            out["labels"].append([IGNORE_INDEX] * (len(m) + len(sep_ids)) + target)
        return out

    return ds.map(encode, batched=True, remove_columns=ds.column_names, num_proc=num_proc)
