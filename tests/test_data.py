import csv
from pathlib import Path

import datasets
import pytest

from e2e_task import data
from e2e_task.data import (
    E2E_SAMPLE_PATH,
    IGNORE_INDEX,
    e2e_prompt,
    load_e2e,
    load_e2e_csv,
    mr_attribute,
    offline_gpt2_tokenizer,
    parse_mr,
    split_by_mr,
    tokenize_e2e,
)
from hf_fsl_sage.federation.data import split_lm_collator, tokenize_text


MR = "name[Alimentum], area[city centre], familyFriendly[no]"
REF = "There is a place in the city centre, Alimentum, that is not family-friendly."
EOS = 50256
DEVSET = Path(__file__).resolve().parents[2] / "shared" / "data" / "e2e" / "devset.csv"


@pytest.fixture(scope="module")
def tok():
    return offline_gpt2_tokenizer()


@pytest.fixture(scope="module")
def sample():
    return load_e2e_csv(E2E_SAMPLE_PATH)


def _write_csv(path, header, rows):
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_offline_tokenizer(tok):
    assert tok("Hello world")["input_ids"] == [15496, 995]
    assert len(tok) == 50257
    assert tok.eos_token_id == tok.pad_token_id == EOS
    assert tok.padding_side == "right"
    assert tok.model_max_length == 1024


def test_sample_is_whole_mr_groups(sample):
    assert sample.column_names == ["mr", "ref"]
    assert len(sample) == 1203
    assert len(set(sample["mr"])) == 138


@pytest.mark.skipif(not DEVSET.exists(), reason=f"the E2E development set is not at {DEVSET}: put the shared data "
                    "folder beside the clone (../shared/data/e2e/devset.csv, see docs/index.md)")
def test_sample_keeps_every_reference_of_its_mrs(sample):
    full = load_e2e_csv(DEVSET)
    chosen = set(sample["mr"])
    kept = [(m, r) for m, r in zip(full["mr"], full["ref"]) if m in chosen]
    assert kept == list(zip(sample["mr"], sample["ref"]))


def test_load_e2e_csv_missing_column(tmp_path):
    path = _write_csv(tmp_path / "bad.csv", ["meaning_representation", "ref"], [[MR, REF]])
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['mr'\].*rename 'meaning_representation' to 'mr'"):
        load_e2e_csv(path)


def test_load_e2e_local_files(tmp_path):
    train = _write_csv(tmp_path / "train.csv", ["mr", "ref", "extra"], [[MR, REF, "x"], [MR, " Alimentum. ", "y"]])
    dev = _write_csv(tmp_path / "dev.csv", ["ref", "mr"], [[REF, MR]])
    dd = load_e2e(train_file=train, validation_file=dev)
    assert sorted(dd) == ["train", "validation"]
    assert dd["train"].column_names == ["mr", "ref"]
    assert dd["train"]["ref"] == [REF, "Alimentum."]
    assert dd["validation"][0] == {"mr": MR, "ref": REF}


@pytest.mark.parametrize(
    "hub_id, columns",
    [
        ("e2e_nlg", {"meaning_representation": [MR], "human_reference": [REF]}),
        (
            "GEM/e2e_nlg",
            {"gem_id": ["e2e-0"], "meaning_representation": [MR], "target": [REF], "references": [[REF]]},
        ),
    ],
)
def test_load_e2e_hub_columns_renamed(monkeypatch, hub_id, columns):
    calls = []

    def fake_load_dataset(name, *args, **kwargs):
        calls.append(name)
        return datasets.DatasetDict({"train": datasets.Dataset.from_dict(columns)})

    monkeypatch.setattr(data.datasets, "load_dataset", fake_load_dataset)
    dd = load_e2e(hub_id=hub_id)
    assert calls == [hub_id]
    assert dd["train"].column_names == ["mr", "ref"]
    assert dd["train"][0] == {"mr": MR, "ref": REF}


def test_split_by_mr_disjoint_and_reproducible(sample):
    dd = split_by_mr(sample, eval_fraction=0.1, test_fraction=0.1, seed=0)
    assert sorted(dd) == ["test", "train", "validation"]
    mrs = {name: set(split["mr"]) for name, split in dd.items()}
    assert not mrs["train"] & mrs["validation"]
    assert not mrs["train"] & mrs["test"]
    assert not mrs["validation"] & mrs["test"]
    assert sum(len(s) for s in dd.values()) == len(sample)
    for name in ("validation", "test"):
        assert 0.08 * len(sample) < len(dd[name]) < 0.14 * len(sample)

    again = split_by_mr(sample, eval_fraction=0.1, test_fraction=0.1, seed=0)
    assert again["validation"]["mr"] == dd["validation"]["mr"]
    other = split_by_mr(sample, eval_fraction=0.1, test_fraction=0.1, seed=1)
    assert set(other["validation"]["mr"]) != mrs["validation"]

    two = split_by_mr(sample, eval_fraction=0.2)
    assert sorted(two) == ["train", "validation"]
    assert not set(two["train"]["mr"]) & set(two["validation"]["mr"])


def test_split_by_mr_bad_fractions(sample):
    with pytest.raises(ValueError, match="below 1"):
        split_by_mr(sample, eval_fraction=0.6, test_fraction=0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        split_by_mr(sample, eval_fraction=-0.1)


def test_mr_attribute():
    mr = "name[The Eagle], eatType[coffee shop], customer rating[5 out of 5], near[Burger King]"
    assert mr_attribute(mr, "name") == "The Eagle"
    assert mr_attribute(mr, "eatType") == "coffee shop"
    assert mr_attribute(mr, "customer rating") == "5 out of 5"
    assert mr_attribute(mr, "near") == "Burger King"
    assert mr_attribute(mr, "food") is None
    assert mr_attribute(MR, "area") == "city centre"
    assert mr_attribute(MR, "familyFriendly") == "no"
    assert parse_mr(MR) == {"name": "Alimentum", "area": "city centre", "familyFriendly": "no"}


def test_tokenize_e2e_label_mask(tok):
    ds = datasets.Dataset.from_dict({"mr": [MR], "ref": [REF]})
    ex = tokenize_e2e(ds, tok, max_length=128)[0]
    ref_ids = tok(" " + REF)["input_ids"]
    prompt_ids = tok(e2e_prompt(MR))["input_ids"]
    assert len(ref_ids) == 20 and len(prompt_ids) == 19  # 17 mr tokens + " |||" (2 tokens)
    assert ex["input_ids"] == prompt_ids + ref_ids + [EOS]
    assert ex["input_ids"] == tok(e2e_prompt(MR) + " " + REF)["input_ids"] + [EOS]
    assert ex["attention_mask"] == [1] * 40
    assert ex["labels"] == [IGNORE_INDEX] * 19 + ref_ids + [EOS]
    assert sum(label != IGNORE_INDEX for label in ex["labels"]) == 21  # reference tokens + EOS
    assert tok.decode(ex["input_ids"]) == f"{MR} ||| {REF}<|endoftext|>"


def test_tokenize_e2e_truncation_keeps_reference(tok):
    ds = datasets.Dataset.from_dict({"mr": [MR], "ref": [REF]})
    ex = tokenize_e2e(ds, tok, max_length=30)[0]
    ref_ids = tok(" " + REF)["input_ids"]
    assert len(ex["input_ids"]) == 30
    assert ex["input_ids"][-21:] == ref_ids + [EOS]
    assert ex["input_ids"][7:9] == [8614, 91]  # separator after 7 kept mr tokens
    assert ex["labels"] == [IGNORE_INDEX] * 9 + ref_ids + [EOS]

    short = tokenize_e2e(ds, tok, max_length=12)[0]
    assert len(short["input_ids"]) == 12
    assert short["input_ids"][:3] == tok(MR)["input_ids"][:1] + [8614, 91]
    assert short["labels"][3:] == ref_ids[:9]


def test_tokenize_e2e_sample_lengths(tok, sample):
    out = tokenize_e2e(sample, tok, max_length=64)
    assert out.column_names == ["input_ids", "attention_mask", "labels"]
    assert len(out) == len(sample)
    assert max(len(x) for x in out["input_ids"]) <= 64
    assert all(lab[-1] == EOS or len(lab) == 64 for lab in out["labels"])


def test_tokenize_text(tok):
    texts = ["Hello world", "   ", "", "one two three four five six"]
    ds = datasets.Dataset.from_dict({"text": texts, "id": [0, 1, 2, 3]})
    out = tokenize_text(ds, tok, max_length=4)
    assert out.column_names == ["input_ids", "attention_mask", "labels"]
    assert len(out) == 2
    assert out[0]["input_ids"] == [15496, 995, EOS]
    assert out[0]["labels"] == out[0]["input_ids"]
    assert len(out[1]["input_ids"]) == 4 and out[1]["input_ids"][-1] == EOS
    raw = tokenize_text(ds, tok, max_length=4, add_eos=False)
    assert raw[0]["input_ids"] == [15496, 995]
    with pytest.raises(ValueError, match="text_column"):
        tokenize_text(ds.rename_column("text", "body"), tok)


def test_collator_right_pads(tok):
    ds = datasets.Dataset.from_dict({"mr": [MR, "name[Cocum]"], "ref": [REF, "Cocum."]})
    feats = list(tokenize_e2e(ds, tok))
    batch = split_lm_collator(tok)(feats)
    n0, n1 = len(feats[0]["input_ids"]), len(feats[1]["input_ids"])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, n0)
    assert batch["input_ids"][1, n1:].tolist() == [tok.pad_token_id] * (n0 - n1)
    assert batch["attention_mask"][1].tolist() == [1] * n1 + [0] * (n0 - n1)
    assert batch["labels"][1].tolist() == feats[1]["labels"] + [IGNORE_INDEX] * (n0 - n1)
    assert batch["labels"][0].tolist() == feats[0]["labels"]
    padded = split_lm_collator(tok, pad_to_multiple_of=16)(feats)
    assert n0 == 40
    assert padded["input_ids"].shape == padded["labels"].shape == (2, 48)


def test_collator_rejects_left_padding():
    tok = offline_gpt2_tokenizer()
    tok.padding_side = "left"
    with pytest.raises(ValueError, match="padding_side = 'right'"):
        split_lm_collator(tok)
