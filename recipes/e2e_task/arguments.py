"""The recipe's command line: its own options (``ScriptArguments``: model, data, LoRA, evaluation), the presets,
and the parser that joins them with ``FSLSageConfig``'s (FSL-SAGE's and Trainer's)."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field, fields
from typing import Any

from transformers import HfArgumentParser, TrainingArguments
from transformers.trainer_utils import IntervalStrategy

from e2e_task.data import E2E_SAMPLE_PATH
from e2e_task.evaluation import GenerationSettings
from hf_fsl_sage import FSLSageConfig
from hf_fsl_sage.algorithms.registry import available as available_algorithms


# A small GPT-2 (6 blocks of width 128, 1.2M parameters besides the embedding), no dropout in the base (LoRA keeps
# its own dropout of 0.1). With --restrict_vocab its vocabulary is the ~1,500 GPT-2 tokens of the training text.
TINY_MODEL = {"n_layer": 6, "n_embd": 128, "n_head": 4, "n_positions": 128, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
              "attn_pdrop": 0.0}

# Values of --preset tiny; any flag given on the command line wins over them.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "model_name_or_path": None,
        "model_config": json.dumps(TINY_MODEL),
        "train_file": str(E2E_SAMPLE_PATH),
        "restrict_vocab": True,
        "pretrain_fraction": 0.3,
        "pretrain_steps": 300,
        "reference": "centralized",
        "max_length": 64,
        "max_new_tokens": 40,
        "output_dir": "runs/gpt2m_e2e-tiny",
        "max_steps": 100,
        "local_steps": 5,
        "learning_rate": 2e-3,
        "warmup_steps": 10,
        "align_epochs": 2,
        "align_buffer_size": 16,
        "server_update_interval": 3,
        "server_replay_steps": 4,
        "logging_steps": 10,
        "eval_every_rounds": 4,
        "per_device_eval_batch_size": 32,
        "save_strategy": "no",
        "aux_heldout_cosine": False,
        "compare_algorithms": ["splitfed_v2"],
    },
}
DEFAULT_OUTPUT_DIR = "runs/gpt2m_e2e"


@dataclass
class ScriptArguments:
    """Model, data, LoRA and evaluation options of the recipe (training options are FSLSageConfig's)."""

    preset: str | None = field(default=None, metadata={
        "help": "'tiny': offline CPU run (small GPT-2 from a config, pre-trained centrally on held-out E2E text, "
                "shipped tokenizer and E2E sample; see the module docstring). Flags given explicitly override it.",
        "choices": sorted(PRESETS)})
    model_name_or_path: str | None = field(default="gpt2-medium", metadata={
        "help": "Hub id or local directory of the base model; empty/None builds a GPT-2 from --model_config."})
    model_config: str | None = field(default=None, metadata={
        "help": "JSON of GPT2Config fields for a model built from scratch (when --model_name_or_path is None)."})
    tokenizer_name: str | None = field(default=None, metadata={
        "help": "Hub id or local directory of the tokenizer (default: the model's; the shipped GPT-2 tokenizer "
                "for a model built from a config)."})
    restrict_vocab: bool = field(default=False, metadata={
        "help": "For a model built from --model_config: cut the tokenizer down to the tokens of the training and "
                "pre-training text (plus their BPE parts and the 256 bytes), which tokenizes that text as before "
                "with a vocabulary of ~1,500 instead of 50,257 (the embedding and LM head shrink alike). The output "
                "folder holds the cut tokenizer."})
    dataset_name: str = field(default="e2e_nlg", metadata={"help": "Hub dataset used when no local file is given."})
    train_file: str | None = field(default=None, metadata={"help": "Local E2E CSV (columns mr, ref) for training."})
    validation_file: str | None = field(default=None, metadata={"help": "Local E2E CSV for evaluation."})
    test_file: str | None = field(default=None, metadata={"help": "Local E2E CSV for the generation metrics."})
    validation_fraction: float = field(default=0.1, metadata={
        "help": "Share of the training rows moved (whole mr groups) to validation when there is no validation split."})
    test_fraction: float = field(default=0.1, metadata={
        "help": "Share of the training rows moved (whole mr groups) to test when there is no test split."})
    pretrain_fraction: float = field(default=0.0, metadata={
        "help": "Share of the training rows (whole mr groups) held out to pre-train the base centrally, on their "
                "references as plain text, before fine-tuning (needs --pretrain_steps)."})
    pretrain_steps: int = field(default=0, metadata={"help": "Central pre-training steps (0: none)."})
    pretrain_batch_size: int = field(default=16, metadata={"help": "Batch size of the central pre-training."})
    pretrain_learning_rate: float = field(default=2e-3, metadata={"help": "Learning rate of the pre-training."})
    base_model_dir: str | None = field(default=None, metadata={
        "help": "Where the pre-trained base is saved and reused by runs with the same settings "
                "(default: <output_dir>/base_model). LoRA adapters refer to it by its absolute path."})
    reference: str = field(default="none", metadata={
        "help": "'centralized': also train the same base, PEFT config, data, batch size, number of examples and "
                "schedule with a plain transformers.Trainer, and report federated/centralized ratios.",
        "choices": ["none", "centralized"]})
    max_length: int = field(default=128, metadata={"help": "Maximum tokens per example (mr + separator + ref + EOS)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate the loss on the first N rows."})
    use_peft: bool = field(default=True, metadata={"help": "Train LoRA adapters (True) or every weight (False)."})
    base_dtype: str = field(default="float32", metadata={
        "help": "dtype of the frozen base while fine-tuning with LoRA: 'bfloat16' halves the base's memory and the "
                "smashed activations' bytes, while the adapters and their optimizer states stay float32. "
                "Pre-training, if any, runs in float32 first. float16 is refused (no loss scaling).",
        "choices": ["float32", "bfloat16", "float16"]})
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
    compare_algorithms: list[str] = field(default_factory=list, metadata={
        "help": "Also train these algorithms (registered names) on the same base, data, clients and seed as the main "
                "run, score them the same way and show them beside it (metrics.json 'compared', the table, the plot). "
                "They run in the child process of the centralized reference, in parallel with the main run. "
                "'none': no comparison."})
    compare_max_steps: int | None = field(default=None, metadata={
        "help": "Global steps of each compared run (default: --max_steps)."})
    metrics_file: str = field(default="metrics.json", metadata={"help": "Results file, inside output_dir."})
    plot_file: str = field(default="loss_vs_comm.png", metadata={"help": "Plot file, inside output_dir."})

    def generation(self) -> GenerationSettings:
        return GenerationSettings(self.num_beams, self.length_penalty, self.no_repeat_ngram_size, self.max_new_tokens,
                                  self.generation_batch_size)


def build_parser(description: str | None = None) -> HfArgumentParser:
    """The recipe's options in three groups for ``--help``: FSL-SAGE's own (the fields FSLSageConfig adds), the
    recipe's (model, data, LoRA, evaluation), then Trainer's (every TrainingArguments field)."""
    parser = HfArgumentParser((ScriptArguments, FSLSageConfig), description=description,
                              usage="%(prog)s [--preset tiny] [FSL-SAGE, recipe and Trainer options]",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    trainer_fields = {f.name for f in fields(TrainingArguments)}
    fsl_fields = {f.name for f in fields(FSLSageConfig)} - trainer_fields
    recipe_fields = {f.name for f in fields(ScriptArguments)}
    groups = {"fsl": parser.add_argument_group("FSL-SAGE options (FSLSageConfig)"),
              "recipe": parser.add_argument_group("recipe options: model, data, LoRA, evaluation"),
              "trainer": parser.add_argument_group("Trainer options (TrainingArguments, defaults as FSLSageConfig "
                                                   "sets them)")}
    general = parser._optionals  # where HfArgumentParser put every field; argparse has no public way to move them
    for action in list(general._group_actions):
        if action.dest == "help":
            continue
        group = "fsl" if action.dest in fsl_fields else "recipe" if action.dest in recipe_fields else "trainer"
        general._group_actions.remove(action)
        groups[group]._group_actions.append(action)
    return parser


def parse_args(argv: list[str] | None = None, description: str | None = None
               ) -> tuple[ScriptArguments, FSLSageConfig]:
    """Parse ``argv`` into the script arguments and an FSLSageConfig, with the preset's values as defaults
    (``description``: the text ``--help`` shows above the options)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default=None)
    known, _ = pre.parse_known_args(argv)
    parser = build_parser(description)
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
    if script.compare_algorithms == ["none"]:
        script.compare_algorithms = []
    unknown = [a for a in script.compare_algorithms if a not in available_algorithms()]
    if unknown:
        parser.error(f"--compare_algorithms {' '.join(unknown)}: not a registered algorithm; choose from "
                     f"{available_algorithms()} (or 'none')")
    if script.restrict_vocab and script.model_name_or_path:
        parser.error("--restrict_vocab applies to a model built from --model_config (a pre-trained model keeps the "
                     "vocabulary it was trained with): pass --model_name_or_path '' or --restrict_vocab false")
    if script.base_dtype == "float16":
        parser.error("--base_dtype float16 is not supported: gradients through a float16 base underflow without a "
                     "loss scaler, and the federated parties step their own optimizers without one; use "
                     "--base_dtype bfloat16")
    if script.base_dtype != "float32" and not script.use_peft:
        parser.error(f"--base_dtype {script.base_dtype} keeps a frozen base in half precision, but --use_peft false "
                     "trains every weight: use --bf16 true (mixed precision) for full fine-tuning instead")
    if script.pretrain_steps < 0 or not 0.0 <= script.pretrain_fraction < 1.0:
        parser.error("--pretrain_steps must be >= 0 and --pretrain_fraction in [0, 1)")
    if (script.pretrain_steps > 0) != (script.pretrain_fraction > 0):
        parser.error("central pre-training needs both --pretrain_steps > 0 and --pretrain_fraction > 0 "
                     "(set both to 0 to fine-tune the base as it is)")
    return script, config
