"""Fine-tune GPT-2 medium on E2E NLG with federated split learning (FSL-SAGE by default), then score it.

The defaults are the FSL-SAGE paper's LLM set-up: `gpt2-medium` and the `e2e_nlg`
dataset from the Hugging Face Hub, 10 clients, the model cut after block 0
(`cut_layer=1`), 3 auxiliary blocks, LoRA r=4 / alpha=32 / dropout=0.1 on the
attention projection (`c_attn`), AdamW at 2e-4 with 500 warm-up steps, batch 8
per client, label smoothing 0.1, an upload every 5 local steps and an alignment
every 10 rounds:

    accelerate launch recipes/gpt2m_e2e.py --output_dir gpt2m-e2e-fsl-sage

`--preset tiny` runs offline on a CPU in minutes (about 8 on two cores): a
GPT-2 with 6 blocks of width 128 built from a config (no download, no dropout),
the GPT-2 tokenizer and the E2E sample shipped with the package, split by
meaning representation into train/validation/test, 100 global steps (20 rounds
of 5 local steps). Its model starts from random weights, and LoRA needs a
pre-trained base: low-rank updates of random projections cannot build the token
embeddings and attention patterns the task needs, so a random base with LoRA
learns far less. The tiny preset therefore trains every weight
(`use_peft=False`) at a learning rate of 2e-3 (the alignment keeps the paper's
2e-4). Every flag still applies, e.g. `--use_peft true` to try LoRA anyway.

    python recipes/gpt2m_e2e.py --preset tiny

Every download has a local alternative: `--model_name_or_path DIR`,
`--tokenizer_name DIR`, `--train_file/--validation_file/--test_file` (CSV with
columns `mr`, `ref`). A missing validation or test split is carved out of the
training rows by meaning representation; train, validation and test never share
an `mr`.

At the end the global model (aggregated clients plus server) is evaluated
(eval_loss, eval_perplexity), beam-search generates one text per distinct test
`mr`, scored against all its references (BLEU, NIST, METEOR, ROUGE-L, CIDEr), and
`<output_dir>` receives `metrics.json`, a plot of loss against communicated MB,
the model (a PEFT adapter, or a full model without PEFT) and its model card.
`--push_to_hub --hub_model_id USER/NAME` publishes that folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, GPT2Config, HfArgumentParser, PreTrainedModel,
                          PreTrainedTokenizerBase, set_seed)
from transformers.pytorch_utils import Conv1D
from transformers.trainer_utils import IntervalStrategy

try:
    import hf_fsl_sage  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_fsl_sage import FSLSageConfig, FSLSageTrainer
from hf_fsl_sage.integrations.plotting import CommBytesAtEvaluation, plot_loss_vs_comm
from hf_fsl_sage.e2e.data import E2E_ATTRIBUTION, E2E_SAMPLE_PATH, load_e2e, offline_gpt2_tokenizer, split_by_mr, tokenize_e2e
from hf_fsl_sage.e2e.evaluation import GenerationEvalCallback, GenerationSettings, evaluate_e2e_generation
from hf_fsl_sage.e2e.metrics import METRIC_NAMES

logger = logging.getLogger("gpt2m_e2e")

# A small GPT-2 (7.6M parameters, 6.4M of them the 50,257 x 128 token embedding), no dropout: a short
# run from scratch learns faster without it.
TINY_MODEL = {"n_layer": 6, "n_embd": 128, "n_head": 4, "n_positions": 128, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
              "attn_pdrop": 0.0}

# Values of --preset tiny; any flag given on the command line wins over them.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "model_name_or_path": None,
        "model_config": json.dumps(TINY_MODEL),
        "train_file": str(E2E_SAMPLE_PATH),
        "use_peft": False,
        "max_length": 64,
        "max_new_tokens": 40,
        "output_dir": "runs/gpt2m_e2e-tiny",
        "max_steps": 100,
        "local_steps": 5,
        "learning_rate": 2e-3,  # from scratch; the alignment keeps the paper's 2e-4
        "align_learning_rate": 2e-4,
        "warmup_steps": 20,
        "align_epochs": 2,
        "align_buffer_size": 16,
        "logging_steps": 10,
        "eval_every_rounds": 4,
        "per_device_eval_batch_size": 32,
        "save_strategy": "no",
    },
}
DEFAULT_OUTPUT_DIR = "runs/gpt2m_e2e"


@dataclass
class ScriptArguments:
    """Model, data, LoRA and evaluation options of the recipe (training options are FSLSageConfig's)."""

    preset: str | None = field(default=None, metadata={
        "help": "'tiny': offline CPU run (small GPT-2 from a config, shipped tokenizer and E2E sample, no LoRA since "
                "the base is random; see the module docstring). Flags given explicitly override the preset.",
        "choices": sorted(PRESETS)})
    model_name_or_path: str | None = field(default="gpt2-medium", metadata={
        "help": "Hub id or local directory of the base model; empty/None builds a GPT-2 from --model_config."})
    model_config: str | None = field(default=None, metadata={
        "help": "JSON of GPT2Config fields for a model built from scratch (when --model_name_or_path is None)."})
    tokenizer_name: str | None = field(default=None, metadata={
        "help": "Hub id or local directory of the tokenizer (default: the model's; the shipped GPT-2 tokenizer "
                "for a model built from a config)."})
    dataset_name: str = field(default="e2e_nlg", metadata={"help": "Hub dataset used when no local file is given."})
    train_file: str | None = field(default=None, metadata={"help": "Local E2E CSV (columns mr, ref) for training."})
    validation_file: str | None = field(default=None, metadata={"help": "Local E2E CSV for evaluation."})
    test_file: str | None = field(default=None, metadata={"help": "Local E2E CSV for the generation metrics."})
    validation_fraction: float = field(default=0.1, metadata={
        "help": "Share of the training rows moved (whole mr groups) to validation when there is no validation split."})
    test_fraction: float = field(default=0.1, metadata={
        "help": "Share of the training rows moved (whole mr groups) to test when there is no test split."})
    max_length: int = field(default=128, metadata={"help": "Maximum tokens per example (mr + separator + ref + EOS)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate the loss on the first N rows."})
    use_peft: bool = field(default=True, metadata={"help": "Train LoRA adapters (True) or every weight (False)."})
    lora_r: int = field(default=4, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.1, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(default_factory=lambda: ["c_attn"], metadata={
        "help": "Modules that get LoRA adapters (GPT-2's attention projection by default)."})
    lora_fan_in_fan_out: bool | None = field(default=None, metadata={
        "help": "LoRA fan_in_fan_out; None sets it when the targets are GPT-2 style Conv1D layers."})
    eval_every_rounds: int | None = field(default=None, metadata={
        "help": "Also evaluate the loss every N rounds during training (None: only at the end)."})
    generate_every_eval: bool = field(default=False, metadata={
        "help": "With --eval_every_rounds, also generate and score on the validation mrs at each evaluation."})
    num_beams: int = field(default=10, metadata={"help": "Beam size."})
    length_penalty: float = field(default=0.9, metadata={"help": "Beam-search length penalty."})
    no_repeat_ngram_size: int = field(default=4, metadata={"help": "Forbid repeating n-grams of this size."})
    max_new_tokens: int = field(default=64, metadata={"help": "Maximum generated tokens per text."})
    generation_batch_size: int = field(default=8, metadata={"help": "Prompts per generate() call."})
    max_generation_mrs: int | None = field(default=None, metadata={
        "help": "Generate for the first N distinct test mrs only (None: all)."})
    metrics_file: str = field(default="metrics.json", metadata={"help": "Results file, inside output_dir."})
    plot_file: str = field(default="loss_vs_comm.png", metadata={"help": "Plot file, inside output_dir."})

    def generation(self) -> GenerationSettings:
        return GenerationSettings(self.num_beams, self.length_penalty, self.no_repeat_ngram_size, self.max_new_tokens,
                                  self.generation_batch_size)


def parse_args(argv: list[str] | None = None) -> tuple[ScriptArguments, FSLSageConfig]:
    """Parse ``argv`` into the script arguments and an FSLSageConfig, with the preset's values as defaults."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default=None)
    known, _ = pre.parse_known_args(argv)
    parser = HfArgumentParser((ScriptArguments, FSLSageConfig), description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    if known.preset is not None and known.preset not in PRESETS:
        parser.error(f"--preset {known.preset!r}: choose one of {sorted(PRESETS)}")
    parser.set_defaults(**{"output_dir": DEFAULT_OUTPUT_DIR, **PRESETS.get(known.preset, {})})
    script, config = parser.parse_args_into_dataclasses(args=argv)
    if script.eval_every_rounds is not None:
        if script.eval_every_rounds < 1:
            parser.error("--eval_every_rounds must be >= 1")
        config.eval_strategy = IntervalStrategy.STEPS
        config.eval_steps = script.eval_every_rounds * config.local_steps
        config.do_eval = True
    return script, config


# --------------------------------------------------------------------------- tokenizer and model


def load_tokenizer(script: ScriptArguments) -> PreTrainedTokenizerBase:
    name = script.tokenizer_name or script.model_name_or_path
    tok = offline_gpt2_tokenizer() if not name else AutoTokenizer.from_pretrained(name)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"  # training batches; generation uses a left-padding copy
    return tok


def build_model(script: ScriptArguments, tokenizer: PreTrainedTokenizerBase, seed: int) -> PreTrainedModel:
    if script.model_name_or_path:
        return AutoModelForCausalLM.from_pretrained(script.model_name_or_path)
    fields = json.loads(script.model_config or "{}")
    eos = tokenizer.eos_token_id
    config = GPT2Config(vocab_size=len(tokenizer), bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, **fields)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def lora_config(script: ScriptArguments, model: PreTrainedModel):
    from peft import LoraConfig

    fan_in_fan_out = script.lora_fan_in_fan_out
    if fan_in_fan_out is None:
        targets = set(script.lora_target_modules)
        fan_in_fan_out = any(isinstance(m, Conv1D) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in targets)
    return LoraConfig(r=script.lora_r, lora_alpha=script.lora_alpha, lora_dropout=script.lora_dropout,
                      target_modules=list(script.lora_target_modules), fan_in_fan_out=fan_in_fan_out,
                      task_type="CAUSAL_LM")


# --------------------------------------------------------------------------- data


def load_splits(script: ScriptArguments, seed: int) -> datasets.DatasetDict:
    """train / validation / test with columns mr, ref and no mr shared between splits."""
    files = (script.train_file, script.validation_file, script.test_file)
    if any(files):
        if script.train_file is None:
            raise ValueError("--validation_file/--test_file need a --train_file as well.")
        raw = load_e2e(*files)
    else:
        raw = load_e2e(hub_id=script.dataset_name)
    splits = dict(raw)
    missing = [s for s in ("validation", "test") if s not in splits]
    if missing:
        carved = split_by_mr(splits["train"], script.validation_fraction if "validation" in missing else 0.0,
                             script.test_fraction if "test" in missing else 0.0, seed=seed)
        splits.update(carved)
    seen: set[str] = set()
    for name in ("train", "validation", "test"):  # drop rows whose mr an earlier split already has
        ds = splits[name]
        keep = [i for i, mr in enumerate(ds["mr"]) if mr not in seen]
        if len(keep) < len(ds):
            logger.warning("%s: dropped %d rows whose mr is also in an earlier split", name, len(ds) - len(keep))
            ds = ds.select(keep)
        if len(ds) == 0:
            raise ValueError(f"The {name} split is empty after removing mrs shared with earlier splits.")
        splits[name] = ds
        seen.update(ds["mr"])
    return datasets.DatasetDict({k: splits[k] for k in ("train", "validation", "test")})


def tokenized(ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int) -> datasets.Dataset:
    """input_ids / attention_mask / labels (-100 on the mr and separator), plus the mr (for partitioning)."""
    return tokenize_e2e(ds, tokenizer, max_length=max_length).add_column("mr", ds["mr"])


# --------------------------------------------------------------------------- run


def _card_metrics(results: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in METRIC_NAMES:
        value = results.get(name)
        out[f"test_{name}"] = value if value is not None else f"unavailable: {results.get(f'{name}_unavailable_reason')}"
    out["test_mrs"] = results.get("num_generation_mrs")
    return out


def _summary(results: dict[str, Any]) -> str:
    rows = [("eval_loss", results["eval_loss"]), ("eval_perplexity", results["eval_perplexity"])]
    rows += [(n, results[n] if results[n] is not None else f"unavailable ({results.get(f'{n}_unavailable_reason')})")
             for n in METRIC_NAMES]
    rows += [("comm_MB (up / down)", f"{results['comm_bytes'] / 1e6:.1f} ({results['comm_bytes_up'] / 1e6:.1f} / "
                                     f"{results['comm_bytes_down'] / 1e6:.1f})"),
             ("rounds / global steps", f"{results['rounds']} / {results['global_steps']}"),
             ("wall-clock seconds", f"{results['runtime_seconds']:.0f}")]
    return "\n".join(f"  {k:<24} {v:.4f}" if isinstance(v, float) else f"  {k:<24} {v}" for k, v in rows)


def run(script: ScriptArguments, args: FSLSageConfig) -> tuple[FSLSageTrainer, dict[str, Any]]:
    """Train, evaluate, generate, write metrics.json, the plot and the model card; push if asked."""
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    started = time.time()
    set_seed(args.seed)

    tokenizer = load_tokenizer(script)
    raw = load_splits(script, args.seed)
    logger.info("rows (distinct mrs): %s", {k: f"{len(v)} ({len(set(v['mr']))})" for k, v in raw.items()})
    model = build_model(script, tokenizer, args.seed)
    train = tokenized(raw["train"], tokenizer, script.max_length)
    validation = tokenized(raw["validation"], tokenizer, script.max_length)
    if script.max_eval_samples is not None:
        validation = validation.select(range(min(script.max_eval_samples, len(validation))))

    trainer = FSLSageTrainer(model=model, args=args, train_dataset=train, eval_dataset=validation,
                             processing_class=tokenizer, peft_config=lora_config(script, model) if script.use_peft else None)
    trainer.add_callback(CommBytesAtEvaluation(trainer.federation.transport.ledger))
    if script.generate_every_eval:
        trainer.add_callback(GenerationEvalCallback(trainer, raw["validation"], script.generation(),
                                                    max_mrs=script.max_generation_mrs))
    initial = None
    if script.eval_every_rounds is not None and not args.resume_from_checkpoint:
        initial = trainer.evaluate()  # the eval curve's starting point; train() starts a fresh log_history
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    if initial is not None:
        trainer.state.log_history.insert(0, {**initial, "comm_bytes": 0, "comm_bytes_up": 0, "comm_bytes_down": 0,
                                             "step": 0})

    eval_metrics = trainer.evaluate()
    results = _finish_on_main(trainer, script, args, raw, eval_metrics, started) if trainer.is_world_process_zero() else None
    # With several processes every one calls these (Trainer writes and uploads from the main process only).
    card = {} if results is None else dict(
        finetuned_from=script.model_name_or_path, dataset=script.dataset_name, dataset_attribution=E2E_ATTRIBUTION,
        metrics=_card_metrics(results), language="en", tags=["e2e-nlg", "data-to-text"])
    if args.push_to_hub:
        trainer.push_to_hub(commit_message="FSL-SAGE fine-tuning on E2E", **card)
    else:
        trainer.save_model()
        trainer.create_model_card(**card)
    return trainer, results


def _finish_on_main(trainer: FSLSageTrainer, script: ScriptArguments, args: FSLSageConfig, raw, eval_metrics,
                    started: float) -> dict[str, Any]:
    """Generation, scores, metrics.json and the plot, on the main process (which holds the global model)."""
    generation = evaluate_e2e_generation(trainer, raw["test"], script.generation(), max_mrs=script.max_generation_mrs)
    trainer.log({f"test_{k}": v for k, v in generation.scores.items() if isinstance(v, (int, float))})
    ledger = trainer.federation.transport.ledger
    steps = trainer.state.global_step
    results: dict[str, Any] = {
        "eval_loss": eval_metrics["eval_loss"],
        "eval_perplexity": eval_metrics.get("eval_perplexity", math.exp(min(eval_metrics["eval_loss"], 700.0))),
        **{k: v for k, v in generation.scores.items() if k != "num_mrs"},
        "num_generation_mrs": generation.scores["num_mrs"],
        **ledger.metrics(),
        "comm_bytes_by_kind": dict(ledger.by_kind),
        "global_steps": steps,
        "rounds": trainer.schedule.position(steps - 1)[0] + 1 if steps else 0,
        "runtime_seconds": time.time() - started,
        "algorithm": args.algorithm,
        "processes": trainer.placement.world_size,
        "placement": trainer.placement.describe(),
        "script_args": asdict(script),
        "training_args": args.to_dict(),
        "generation_settings": asdict(generation.settings),
        "plot": script.plot_file,
        "generations": generation.records,
    }
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_loss_vs_comm(trainer.state.log_history, out / script.plot_file,
                      title=f"{args.algorithm}, {args.num_clients} clients, cut_layer={args.cut_layer}")
    (out / script.metrics_file).write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    print(f"\nResults ({out / script.metrics_file}):\n{_summary(results)}", flush=True)
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse ``argv`` (default: the command line) and run the recipe; returns what metrics.json holds."""
    return run(*parse_args(argv))[1]


if __name__ == "__main__":
    main(sys.argv[1:])
