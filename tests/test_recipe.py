"""The GPT-2 / E2E recipe: data preparation, an end-to-end tiny run, and the Hub upload folder (no network)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from hf_fsl_sage.e2e.data import E2E_SEPARATOR, IGNORE_INDEX, load_e2e_csv
from hf_fsl_sage.e2e.metrics import METRIC_NAMES

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "gpt2m_e2e.py"
# A shorter tiny run: a smaller model, few steps, few generated texts.
SMALL = ["--preset", "tiny", "--model_config", '{"n_layer": 4, "n_embd": 32, "n_head": 2, "n_positions": 64}',
         "--num_clients", "3", "--local_steps", "2", "--max_steps", "4", "--logging_steps", "1",
         "--align_epochs", "1", "--align_buffer_size", "8", "--per_device_train_batch_size", "4",
         "--max_eval_samples", "16", "--max_generation_mrs", "3", "--num_beams", "2", "--max_new_tokens", "6",
         "--warmup_steps", "0", "--learning_rate", "1e-2", "--disable_tqdm", "true", "--seed", "0"]


def load_recipe():
    spec = importlib.util.spec_from_file_location("gpt2m_e2e", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


recipe = load_recipe()


def test_presets_and_paper_defaults(tmp_path):
    script, args = recipe.parse_args([])
    assert (script.model_name_or_path, script.dataset_name, script.use_peft) == ("gpt2-medium", "e2e_nlg", True)
    assert (script.lora_r, script.lora_alpha, script.lora_dropout, script.lora_target_modules) == (4, 32, 0.1, ["c_attn"])
    assert (script.num_beams, script.length_penalty, script.no_repeat_ngram_size) == (10, 0.9, 4)
    assert (args.num_clients, args.cut_layer, args.aux_num_layers, args.server_update_interval, args.align_interval,
            args.learning_rate, args.per_device_train_batch_size, args.warmup_steps,
            args.label_smoothing_factor) == (10, 1, 3, 5, 10, 2e-4, 8, 500, 0.1)
    assert args.output_dir == recipe.DEFAULT_OUTPUT_DIR

    script, args = recipe.parse_args(["--preset", "tiny", "--learning_rate", "1e-3"])
    assert script.model_name_or_path is None and not script.use_peft
    assert args.learning_rate == 1e-3  # an explicit flag wins over the preset
    assert args.output_dir == recipe.PRESETS["tiny"]["output_dir"]


def test_splits_share_no_mr_and_loss_covers_only_the_reference(tmp_path):
    script, args = recipe.parse_args(["--preset", "tiny"])
    splits = recipe.load_splits(script, seed=0)
    mrs = {name: set(ds["mr"]) for name, ds in splits.items()}
    assert all(len(ds) > 0 for ds in splits.values())
    assert not (mrs["train"] & mrs["validation"] or mrs["train"] & mrs["test"] or mrs["validation"] & mrs["test"])

    tokenizer = recipe.load_tokenizer(script)
    rows = splits["train"].select(range(5))
    tok = recipe.tokenized(rows, tokenizer, script.max_length)
    for row, mr, ref in zip(tok, rows["mr"], rows["ref"]):
        ids, labels = row["input_ids"], row["labels"]
        prompt_len = len(tokenizer(mr + E2E_SEPARATOR, add_special_tokens=False)["input_ids"])
        assert labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
        assert labels[prompt_len:] == ids[prompt_len:]
        assert tokenizer.decode(labels[prompt_len:]) == " " + ref + tokenizer.eos_token
        assert row["mr"] == mr  # kept for partitioning by meaning representation


def test_local_files_rows_sharing_an_mr_with_an_earlier_split_are_dropped(tmp_path):
    rows = load_e2e_csv(recipe.E2E_SAMPLE_PATH)
    a, b, c, d = sorted(set(rows["mr"]))[:4]
    files = {"train": {a, b}, "validation": {b, c}, "test": {a, c, d}}
    for name, keep in files.items():
        rows.filter(lambda r, keep=keep: r["mr"] in keep).to_csv(str(tmp_path / f"{name}.csv"), index=False)
    script, _ = recipe.parse_args([f"--{name}_file={tmp_path / f'{name}.csv'}" for name in files])
    splits = recipe.load_splits(script, seed=0)
    assert {k: set(v["mr"]) for k, v in splits.items()} == {"train": {a, b}, "validation": {c}, "test": {d}}

    rows.filter(lambda r: r["mr"] == a).to_csv(str(tmp_path / "test.csv"), index=False)
    with pytest.raises(ValueError, match="test split is empty"):
        recipe.load_splits(script, seed=0)


@pytest.mark.slow
def test_tiny_preset_end_to_end_as_a_script(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(RECIPE), *SMALL, "--eval_every_rounds", "1", "--output_dir", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    required = {"eval_loss", "eval_perplexity", *METRIC_NAMES, "comm_bytes", "comm_bytes_up", "comm_bytes_down",
                "generations"}
    assert required <= metrics.keys()
    assert metrics["comm_bytes"] == metrics["comm_bytes_up"] + metrics["comm_bytes_down"] > 0
    for name in METRIC_NAMES:  # a score, or None with the reason
        assert metrics[name] is not None or metrics[f"{name}_unavailable_reason"]
    assert len(metrics["generations"]) == 3
    assert {"mr", "prediction", "references"} <= metrics["generations"][0].keys()
    assert (out / "loss_vs_comm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "README.md").is_file() and (out / "model.safetensors").is_file()
    assert "Results" in proc.stdout and "bleu" in proc.stdout


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """Capture Trainer's Hub calls: create_repo records the id, upload_folder copies what would be uploaded."""
    pushed: dict[str, Path] = {}

    def create_repo(self, repo_id, **kwargs):
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, *, repo_id, folder_path, ignore_patterns=None, **kwargs):
        target = tmp_path / "hub" / repo_id
        shutil.copytree(folder_path, target, ignore=shutil.ignore_patterns(*(ignore_patterns or [])))
        pushed[repo_id] = target
        return SimpleNamespace(commit_url=f"https://hub.invalid/{repo_id}")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    return pushed


@pytest.mark.parametrize("use_peft", [True, False], ids=["lora", "full"])
def test_push_to_hub_folder_loads_and_reproduces_the_trained_model(tmp_path, fake_hub, use_peft):
    script, args = recipe.parse_args([*SMALL, "--use_peft", str(use_peft).lower(), "--output_dir", str(tmp_path / "o"),
                                      "--push_to_hub", "true", "--hub_model_id", "someone/tiny-fsl-sage"])
    trainer, results = recipe.run(script, args)
    folder = fake_hub["someone/tiny-fsl-sage"]

    tokenizer = recipe.load_tokenizer(script)
    batch = tokenizer(["name[Alimentum], area[city centre] ||| Alimentum is", "name[Zizzi] |||"],
                      return_tensors="pt", padding=True)
    base = recipe.build_model(script, tokenizer, args.seed).eval()
    with torch.no_grad():
        untrained = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if use_peft:
        assert (folder / "adapter_config.json").is_file() and not (folder / "model.safetensors").exists()
        loaded = PeftModel.from_pretrained(base, str(folder))
    else:
        loaded = AutoModelForCausalLM.from_pretrained(str(folder))
    with torch.no_grad():
        trainer.split.eval()
        expected = trainer.split(batch["input_ids"], batch["attention_mask"]).logits
        got = loaded.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = batch["attention_mask"].bool()
    assert torch.allclose(got[mask], expected[mask], atol=1e-5), (got - expected)[mask].abs().max()
    assert not torch.allclose(untrained[mask], expected[mask], atol=1e-3)  # training changed the model

    card = (folder / "README.md").read_text()
    ledger = trainer.federation.transport.ledger
    for needed in ("library_name: " + ("peft" if use_peft else "transformers"), "`fsl_sage`", "`cut_layer=1`",
                   "| clients | 3 |", "| rounds | 2 |", f"{ledger.total:,} B", f"{ledger.up:,} B", "test_bleu",
                   "eval_loss", "arXiv:2505.23182", "Nair, Lin, Talebi, Ju, Bentley, Liu", "ICML 2025",
                   "Novikova", "Dušek", "Rieser", "SIGDIAL", "CC BY-SA 4.0", "someone/tiny-fsl-sage"):
        assert needed in card, needed
    assert json.loads((folder / "metrics.json").read_text())["comm_bytes"] == results["comm_bytes"]


def test_batched_left_padded_generation_matches_one_prompt_at_a_time():
    from transformers import GPT2Config

    from hf_fsl_sage.e2e.data import offline_gpt2_tokenizer
    from hf_fsl_sage.e2e.evaluation import GenerationSettings, generate_texts, group_references

    tokenizer = offline_gpt2_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tokenizer)))
    rows = load_e2e_csv(recipe.E2E_SAMPLE_PATH).select(range(40))
    mrs, refs = group_references(rows, max_mrs=3)
    assert len(set(mrs)) == 3 and all(refs) and len({len(m) for m in mrs}) > 1  # prompts of different lengths
    prompts = [m + E2E_SEPARATOR for m in mrs]
    settings = GenerationSettings(num_beams=3, max_new_tokens=5, batch_size=3)
    batched = generate_texts(model, tokenizer, prompts, settings)
    single = [generate_texts(model, tokenizer, [p], settings)[0] for p in prompts]
    assert batched == single
    assert tokenizer.padding_side == "right" and model.training  # the caller's tokenizer and mode are left alone


def test_unavailable_metric_is_reported_with_its_reason():
    results = {"eval_loss": 2.0, "eval_perplexity": 7.4, "bleu": 0.3, "nist": 4.0, "meteor": None,
               "meteor_unavailable_reason": "java was not found on PATH", "rouge_l": 0.5, "cider": 0.6,
               "comm_bytes": 3_000_000, "comm_bytes_up": 2_000_000, "comm_bytes_down": 1_000_000, "rounds": 2,
               "global_steps": 4, "runtime_seconds": 1.0, "num_generation_mrs": 3}
    assert recipe._card_metrics(results)["test_meteor"] == "unavailable: java was not found on PATH"
    assert "unavailable (java was not found on PATH)" in recipe._summary(results)
