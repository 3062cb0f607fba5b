"""The GPT-2 / E2E recipe: data preparation, an end-to-end tiny run, and the Hub upload folder (no network)."""

from __future__ import annotations

import importlib.util
import json
import math
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
from transformers import AutoModelForCausalLM, AutoTokenizer

from e2e_task import arguments
from e2e_task.data import E2E_SAMPLE_PATH, E2E_SEPARATOR, IGNORE_INDEX, load_e2e_csv
from e2e_task.report import SCORES, card_metrics, summary
from tests.helpers import load_script


ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "gpt2m_e2e.py"
# A shorter tiny run: a smaller model, few steps, few generated texts.
SMALL = ["--preset", "tiny", "--model_config", '{"n_layer": 4, "n_embd": 32, "n_head": 2, "n_positions": 64}',
         "--num_clients", "3", "--local_steps", "2", "--max_steps", "4", "--logging_steps", "1",
         "--align_epochs", "1", "--align_buffer_size", "8", "--per_device_train_batch_size", "4",
         "--max_eval_samples", "16", "--max_generation_mrs", "3", "--num_beams", "2", "--max_new_tokens", "6",
         "--warmup_steps", "0", "--learning_rate", "1e-2", "--disable_tqdm", "true", "--seed", "0",
         "--pretrain_steps", "4", "--pretrain_batch_size", "4", "--compare_algorithms", "none"]


def load_recipe():
    return load_script(RECIPE, "gpt2m_e2e")


recipe = load_recipe()


def test_presets_and_paper_defaults(tmp_path):
    script, args = recipe.parse_args([])
    assert (script.model_name_or_path, script.dataset_name, script.use_peft) == ("gpt2-medium", "e2e_nlg", True)
    lora = (script.lora_r, script.lora_alpha, script.lora_dropout, script.lora_target_modules)
    assert lora == (4, 32, 0.1, ["c_attn"])
    assert (script.num_beams, script.length_penalty, script.no_repeat_ngram_size) == (10, 0.9, 4)
    assert (args.num_clients, args.cut_layer, args.aux_num_layers, args.server_update_interval, args.align_interval,
            args.learning_rate, args.per_device_train_batch_size, args.warmup_steps,
            args.label_smoothing_factor) == (10, 1, 3, 5, 10, 2e-4, 8, 500, 0.1)
    assert args.output_dir == arguments.DEFAULT_OUTPUT_DIR

    assert (script.pretrain_steps, script.reference) == (0, "none")

    script, args = recipe.parse_args(["--preset", "tiny", "--learning_rate", "1e-3"])
    # The design in small: a base pre-trained here, LoRA with the paper's settings, a centralized reference.
    assert script.model_name_or_path is None and script.use_peft
    lora = (script.lora_r, script.lora_alpha, script.lora_dropout, script.lora_target_modules)
    assert lora == (4, 32, 0.1, ["c_attn"])
    assert script.pretrain_steps > 0 and 0 < script.pretrain_fraction < 1 and script.reference == "centralized"
    assert (args.algorithm, args.num_clients, args.cut_layer, args.aux_num_layers) == ("fsl_sage", 10, 1, 3)
    # Chosen on the validation loss (docs/recipe.md): two uploads per round of 5, four replayed server steps each.
    assert (args.local_steps, args.server_update_interval, args.server_replay_steps) == (5, 3, 4)
    assert script.compare_algorithms == ["splitfed_v2"]  # the trade-off: SplitFed-V2 beside FSL-SAGE
    assert args.learning_rate == 1e-3  # an explicit flag wins over the preset
    assert args.output_dir == arguments.PRESETS["tiny"]["output_dir"]
    with pytest.raises(SystemExit):  # pre-training needs held-out rows
        recipe.parse_args(["--preset", "tiny", "--pretrain_fraction", "0"])


def test_half_precision_base_keeps_the_adapters_float32(tmp_path):
    script, args = recipe.parse_args([*SMALL, "--base_dtype", "bfloat16", "--output_dir", str(tmp_path / "o"),
                                      "--pretrain_steps", "0", "--pretrain_fraction", "0"])
    tokenizer, raw = recipe.prepare(script, args.seed)
    model, _ = recipe.base_model(script, args, tokenizer, raw, None)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    from peft import get_peft_model

    peft_model = get_peft_model(model, recipe.lora_config(script, model))
    dtypes = {n: p.dtype for n, p in peft_model.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.bfloat16}
    with pytest.raises(SystemExit):  # a half-precision base is for frozen weights, not full fine-tuning
        recipe.parse_args([*SMALL, "--base_dtype", "bfloat16", "--use_peft", "false"])


def test_splits_share_no_mr_and_loss_covers_only_the_reference(tmp_path):
    script, _ = recipe.parse_args(["--preset", "tiny"])
    splits = recipe.load_splits(script, seed=0)
    mrs = {name: set(ds["mr"]) for name, ds in splits.items()}
    assert set(splits) == {"train", "validation", "test", "pretrain"} and all(len(ds) > 0 for ds in splits.values())
    for a, b in [("train", "validation"), ("train", "test"), ("validation", "test"), ("pretrain", "train"),
                 ("pretrain", "validation"), ("pretrain", "test")]:
        assert not mrs[a] & mrs[b], (a, b)
    rows = load_e2e_csv(E2E_SAMPLE_PATH)
    assert sum(len(ds) for ds in splits.values()) == len(rows)
    # About 30 % of the training rows (whole mr groups) are held out for the pre-training.
    assert 0.25 < len(splits["pretrain"]) / (len(splits["pretrain"]) + len(splits["train"])) < 0.35

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
    rows = load_e2e_csv(E2E_SAMPLE_PATH)
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


def _offline_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


# Run in a fresh process: load the output folder with AutoPeftModelForCausalLM alone and evaluate it on the
# recipe's validation rows with a plain Trainer.
LOAD_AND_EVALUATE = """
import importlib.util, json, sys, tempfile
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer, Trainer, TrainingArguments
from hf_fsl_sage.federation.data import split_lm_collator
spec = importlib.util.spec_from_file_location("gpt2m_e2e", sys.argv[1])
recipe = importlib.util.module_from_spec(spec); sys.modules["gpt2m_e2e"] = recipe; spec.loader.exec_module(recipe)
script, args = recipe.parse_args(json.loads(sys.argv[2]))
tokenizer = AutoTokenizer.from_pretrained(args.output_dir)
_, validation = recipe._tokenized_splits(script, tokenizer, recipe.load_splits(script, args.seed))
model = AutoPeftModelForCausalLM.from_pretrained(args.output_dir)
with tempfile.TemporaryDirectory() as tmp:
    plain = TrainingArguments(tmp, per_device_eval_batch_size=args.per_device_eval_batch_size, report_to="none")
    trainer = Trainer(model=model, args=plain, data_collator=split_lm_collator(tokenizer),
                      eval_dataset=validation.select_columns(["input_ids", "attention_mask", "labels"]))
    loss, base = trainer.evaluate()["eval_loss"], model.peft_config["default"].base_model_name_or_path
    print(json.dumps({"eval_loss": loss, "base": base}))
"""


def _coco_scores(records: list[dict]) -> dict[str, float]:
    """ROUGE-L and CIDEr of the generations by pycocoevalcap's own code (PTB tokenizer, Rouge, Cider)."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": r} for r in rec["references"]] for i, rec in enumerate(records)})
    res = tokenizer.tokenize({i: [{"caption": rec["prediction"]}] for i, rec in enumerate(records)})
    return {"rouge_l": Rouge().compute_score(gts, res)[0], "cider": Cider().compute_score(gts, res)[0]}


@pytest.mark.slow
def test_tiny_preset_end_to_end_as_a_script(tmp_path):
    out = tmp_path / "run"
    argv = [*SMALL, "--eval_every_rounds", "1", "--output_dir", str(out), "--compare_algorithms", "splitfed_v2",
            "cse_fsl", "--compare_max_steps", "6"]
    proc = subprocess.run([sys.executable, str(RECIPE), *argv], cwd=ROOT, env=_offline_env(), capture_output=True,
                          text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    central = metrics["centralized"]
    assert metrics["comm_bytes"] == metrics["comm_bytes_up"] + metrics["comm_bytes_down"] > 0
    # Every score of both runs is a number; only METEOR may be missing, and only with its reason.
    for results in (metrics, central):
        for name in SCORES:
            if name == "meteor" and results[name] is None:
                assert shutil.which("java") is None and "java" in results["meteor_unavailable_reason"]
                continue
            assert isinstance(results[name], float) and math.isfinite(results[name]), name
    for name in SCORES:
        ratio = metrics["federated_over_centralized"][name]
        if isinstance(central[name], float) and central[name] != 0:
            assert ratio == pytest.approx(metrics[name] / central[name], rel=1e-12), name
    # The same examples: 4 global steps x 3 clients = 12 centralized steps of the same batch size.
    assert central["steps"] == 12 and metrics["global_steps"] == 4
    assert 0 <= metrics["slot_error_rate"] <= 1 and metrics["slots"] > 0
    errors = metrics["slots_missing"] + metrics["slots_contradicted"]
    assert errors == round(metrics["slot_error_rate"] * metrics["slots"])
    if shutil.which("java") and importlib.util.find_spec("pycocoevalcap"):
        for results, records in ((metrics, metrics["generations"]), (central, metrics["centralized_generations"])):
            for name, value in _coco_scores(records).items():
                assert results[name] == pytest.approx(value, abs=1e-9), name
    assert len(metrics["generations"]) == len(metrics["centralized_generations"]) == 3
    keys = {"mr", "prediction", "references", "slots_missing", "slots_contradicted"}
    assert keys <= metrics["generations"][0].keys()
    assert metrics["pretraining"]["steps"] == 4 and not metrics["pretraining"]["cached"]
    assert (out / "loss_vs_comm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "centralized" in proc.stdout and "ratio" in proc.stdout and "slot_error_rate" in proc.stdout

    # The compared algorithms: same base, data and clients, their own steps, scored and shown beside the main run.
    assert set(metrics["compared"]) == {"splitfed_v2", "cse_fsl"}
    for name, other in metrics["compared"].items():
        assert other["algorithm"] == name and other["global_steps"] == 6 and other["comm_bytes"] > 0
        assert other["num_generation_mrs"] == 3 and math.isfinite(other["eval_loss"])
        assert other["over_centralized"]["bleu"] == pytest.approx(other["bleu"] / central["bleu"], rel=1e-12)
        saved = json.loads((out / "compare" / name / "metrics.json").read_text())
        assert saved["eval_loss"] == other["eval_loss"] and len(saved["generations"]) == 3
        # Its eval curve starts at the base model, at 0 bytes, like the main run's.
        evals = [h for h in saved["log_history"] if "eval_loss" in h]
        assert evals[0]["comm_bytes"] == 0 and evals[0]["eval_loss"] == pytest.approx(metrics["pretraining"][
            "eval_loss_after"], rel=1e-6)
    # SplitFed-V2 sends a gradient back for every upload: more bytes than FSL-SAGE's in fewer steps.
    assert metrics["compared"]["splitfed_v2"]["comm_bytes"] > metrics["comm_bytes"]
    assert "splitfed_v2" in proc.stdout and "cse_fsl" in proc.stdout
    # BLEU's bootstrap over the same 3 mrs: every run's score on them all, the main run compared with each other.
    boot = metrics["bleu_bootstrap"]
    assert boot["mrs"] == 3 and boot["first"] == "fsl_sage" and list(boot["versus"]) == ["splitfed_v2", "cse_fsl",
                                                                                        "centralized"]
    for name, results in (("fsl_sage", metrics), ("centralized", central), *metrics["compared"].items()):
        assert boot["bleu"][name]["value"] == pytest.approx(results["bleu"], abs=1e-12)
        assert boot["bleu"][name]["low"] <= boot["bleu"][name]["high"]
    assert "bleu 95 % interval" in proc.stdout and "bleu gap to fsl_sage" in proc.stdout

    # The folder: a LoRA adapter, its model card, the tokenizer, and the pre-trained base beside it.
    assert (out / "adapter_config.json").is_file() and (out / "README.md").is_file()
    assert not (out / "model.safetensors").exists() and (out / "base_model" / "model.safetensors").is_file()
    # Loaded in a fresh process, offline, from anywhere, it gives the logged eval loss.
    loaded = subprocess.run([sys.executable, "-c", LOAD_AND_EVALUATE, str(RECIPE), json.dumps(argv)], cwd=tmp_path,
                            env=_offline_env(), capture_output=True, text=True, timeout=600, check=False)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    result = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert Path(result["base"]) == (out / "base_model").resolve()
    assert result["eval_loss"] == pytest.approx(metrics["eval_loss"], abs=1e-5)


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
                                      "--reference", "none", "--push_to_hub", "true",
                                      "--hub_model_id", "someone/tiny-fsl-sage"])
    trainer, results = recipe.run(script, args)
    folder = fake_hub["someone/tiny-fsl-sage"]

    tokenizer = AutoTokenizer.from_pretrained(str(folder))  # the cut-down vocabulary travels with the model
    assert len(tokenizer) == len(trainer.processing_class) < 5000
    batch = tokenizer(["name[Alimentum], area[city centre] ||| Alimentum is", "name[Zizzi] |||"],
                      return_tensors="pt", padding=True)
    base = AutoModelForCausalLM.from_pretrained(str(tmp_path / "o" / "base_model")).eval()  # pre-trained here
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

    from e2e_task.data import offline_gpt2_tokenizer
    from e2e_task.evaluation import GenerationSettings, generate_texts, group_references

    tokenizer = offline_gpt2_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tokenizer)))
    rows = load_e2e_csv(E2E_SAMPLE_PATH).select(range(40))
    mrs, refs = group_references(rows, max_mrs=3)
    assert len(set(mrs)) == 3 and all(refs) and len({len(m) for m in mrs}) > 1  # prompts of different lengths
    prompts = [m + E2E_SEPARATOR for m in mrs]
    settings = GenerationSettings(num_beams=3, max_new_tokens=5, batch_size=3)
    batched = generate_texts(model, tokenizer, prompts, settings)
    single = [generate_texts(model, tokenizer, [p], settings)[0] for p in prompts]
    assert batched == single
    assert tokenizer.padding_side == "right" and model.training  # the caller's tokenizer and mode are left alone


def test_unavailable_metric_is_reported_with_its_reason():
    results = {"algorithm": "fsl_sage", "eval_loss": 2.0, "eval_perplexity": 7.4, "bleu": 0.3, "nist": 4.0,
               "meteor": None, "meteor_unavailable_reason": "java was not found on PATH", "rouge_l": 0.5, "cider": 0.6,
               "comm_bytes": 3_000_000, "comm_bytes_up": 2_000_000, "comm_bytes_down": 1_000_000, "rounds": 2,
               "global_steps": 4, "runtime_seconds": 1.0, "num_generation_mrs": 3}
    assert card_metrics(results)["test_meteor"] == "unavailable: java was not found on PATH"
    assert "unavailable (java was not found on PATH)" in summary(results)
    # A run alone: its BLEU interval, and no gap row with nothing to compare.
    results["bleu_bootstrap"] = {"first": "fsl_sage", "bleu": {"fsl_sage": {"value": 0.3, "low": 0.2, "high": 0.4}},
                                 "versus": {}}
    assert "0.200-0.400" in summary(results) and "bleu gap" not in summary(results)


def _tiny_lm(tokenizer):
    from transformers import GPT2Config

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(GPT2Config(n_layer=2, n_embd=16, n_head=2, n_positions=64,
                                                       vocab_size=len(tokenizer)))


def test_pretrained_base_is_cached_by_its_settings(tmp_path):
    from e2e_task.central import pretrained_base
    from e2e_task.data import offline_gpt2_tokenizer
    from hf_fsl_sage.federation.data import tokenize_text

    tokenizer = offline_gpt2_tokenizer()
    rows = load_e2e_csv(E2E_SAMPLE_PATH).select(range(24))
    text = tokenize_text(rows.select_columns(["ref"]).rename_column("ref", "text"), tokenizer, max_length=32)
    built = []

    def build():
        built.append(1)
        return _tiny_lm(tokenizer)

    def pretrain(settings):
        return pretrained_base(build, text, text.select(range(4)), tokenizer, tmp_path / "base", settings, steps=3,
                               batch_size=4, learning_rate=1e-2, seed=0)

    first, info = pretrain({"data": "a"})
    assert len(built) == 1 and not info["cached"] and info["eval_loss_after"] < info["eval_loss_before"]
    assert first.name_or_path == str((tmp_path / "base").resolve())  # what a PEFT adapter will record
    again, info = pretrain({"data": "a"})
    assert len(built) == 1 and info["cached"]  # loaded, not trained again
    for a, b in zip(first.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    _, info = pretrain({"data": "b"})  # other settings: trained again
    assert len(built) == 2 and not info["cached"]


def test_centralized_reference_sees_the_federated_runs_examples_and_schedule(tmp_path):
    from peft import LoraConfig

    from e2e_task.central import centralized_reference
    from e2e_task.data import offline_gpt2_tokenizer, tokenize_e2e
    from hf_fsl_sage import FSLSageConfig

    tokenizer = offline_gpt2_tokenizer()
    rows = tokenize_e2e(load_e2e_csv(E2E_SAMPLE_PATH).select(range(40)), tokenizer, max_length=48)
    args = FSLSageConfig(output_dir=str(tmp_path), num_clients=3, max_steps=2, warmup_steps=1,
                         per_device_train_batch_size=4, learning_rate=1e-3, report_to="none")
    lora = LoraConfig(r=4, lora_alpha=32, lora_dropout=0.1, target_modules=["c_attn"], fan_in_fan_out=True,
                      task_type="CAUSAL_LM")
    base = _tiny_lm(tokenizer)
    torch.manual_seed(1)  # what the process drew before (a base built here, or none for a cached one) is no input
    trainer, result = centralized_reference(base, args, rows, rows.select(range(8)), tokenizer, lora)
    torch.manual_seed(2)
    assert centralized_reference(base, args, rows, rows.select(range(8)), tokenizer, lora)[1]["eval_loss"] == \
        result["eval_loss"]
    # 2 global steps x 3 clients = 6 steps of 4 examples; warm-up 1 global step = 3 steps; same label smoothing.
    assert result["steps"] == trainer.state.global_step == 6
    assert trainer.args.per_device_train_batch_size == 4 and trainer.args.warmup_steps == 3
    assert trainer.args.label_smoothing_factor == args.label_smoothing_factor == 0.1
    trained = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    assert not any(hasattr(m, "lora_A") for m in base.modules())  # the base itself is left alone
    # The reported loss is the plain cross-entropy (no label smoothing) of the trained model on the 8 eval rows.
    from hf_fsl_sage.federation.data import split_lm_collator

    batch = split_lm_collator(tokenizer)([{k: rows[i][k] for k in ("input_ids", "attention_mask", "labels")}
                                          for i in range(8)])
    trainer.model.eval()
    with torch.no_grad():
        plain = trainer.model(**batch).loss
    assert result["eval_loss"] == pytest.approx(float(plain), abs=1e-5)


def test_restricted_tokenizer_keeps_the_tokens_of_its_texts(tmp_path):
    from e2e_task.data import offline_gpt2_tokenizer, restricted_tokenizer

    full = offline_gpt2_tokenizer()
    rows = load_e2e_csv(E2E_SAMPLE_PATH)
    seen = [t for mr, ref in zip(rows["mr"][:300], rows["ref"][:300]) for t in (mr, " " + ref)]
    small = restricted_tokenizer(full, seen)
    assert 256 < len(small) < 2000 and small.eos_token == full.eos_token == "<|endoftext|>"
    for text in seen:  # the same BPE tokens (renumbered)
        tokens = small.convert_ids_to_tokens(small(text)["input_ids"])
        assert tokens == full.convert_ids_to_tokens(full(text)["input_ids"])
    # Text it was not built from still tokenizes (bytes at worst) and decodes back to itself.
    for text in ["Zyxwv café ÉCOLE £99 \u4e2d\u6587", *rows["ref"][-50:]]:
        assert small.decode(small(text)["input_ids"]) == text
    # Saved and reloaded like any tokenizer.
    small.save_pretrained(str(tmp_path))
    again = AutoTokenizer.from_pretrained(str(tmp_path))
    assert again(seen[0])["input_ids"] == small(seen[0])["input_ids"] and again.eos_token_id == small.eos_token_id


def test_help_lists_fsl_sage_options_first_with_their_choices():
    """--help: the options FSLSageConfig adds come first, in their own group, with the algorithm and codec names."""
    text = arguments.build_parser(recipe.__doc__).format_help()
    groups = [text.index(title) for title in ("FSL-SAGE options (FSLSageConfig):", "recipe options:",
                                              "Trainer options (TrainingArguments")]
    assert groups == sorted(groups)
    fsl = text[groups[0]:groups[1]]
    assert "--algorithm {cse_fsl,fedavg,fsl_sage,splitfed_v1,splitfed_v2}" in fsl
    assert "--smashed_codec {bf16,fp16,int4,int8,none}" in fsl
    assert "--num_clients" in fsl and "--output_dir" not in fsl and "--lora_r" not in fsl
    assert "--output_dir" in text[groups[2]:] and "--lora_r" in text[groups[1]:groups[2]]
    assert len(text[:groups[0]].splitlines()) < 60  # a short usage line, the description, -h
