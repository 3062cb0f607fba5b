"""Fine-tune GPT-2 medium on E2E NLG with federated split learning (FSL-SAGE by default), then score it.

The defaults are the FSL-SAGE paper's LLM set-up: `gpt2-medium` and the `e2e_nlg`
dataset from the Hugging Face Hub, 10 clients, the model cut after block 0
(`cut_layer=1`), 3 auxiliary blocks, LoRA r=4 / alpha=32 / dropout=0.1 on the
attention projection (`c_attn`), AdamW at 2e-4 with 500 warm-up steps, batch 8
per client, label smoothing 0.1, an upload every 5 local steps and an alignment
every 10 rounds (of 5 passes over each client's last 16 uploads, the library's
measured default; the paper's 40 passes over 64: `--align_epochs 40
--align_buffer_size 64`):

    accelerate launch recipes/gpt2m_e2e.py --output_dir gpt2m-e2e-fsl-sage

`--preset tiny` is the same design in small, offline on a CPU in minutes: a
GPT-2 with 6 blocks of width 128 built from a config (no download), the GPT-2
tokenizer and the E2E sample shipped with the package, split by meaning
representation into a pre-training part and train/validation/test (no `mr` in
two parts). The model is first pre-trained centrally on the pre-training
part's references, as plain text (a stand-in for a pre-trained checkpoint; it is
saved in `<output_dir>/base_model` and reused by later runs with the same
settings), then fine-tuned with FSL-SAGE and LoRA (r 4 / alpha 32 / dropout 0.1
on attention) for 100 global steps (20 rounds of 5 local steps, 10 clients),
uploading at the first and fourth of each round's local steps
(`server_update_interval=3`; the library's default is 5), the server taking 4
more steps per upload on uploads it keeps (`server_replay_steps=4`; the
library's default, the paper's, is 0).
A centralized reference (`--reference centralized`, on in the preset) trains
the same base with the same LoRA config, data, batch size, number of examples
and schedule with a plain `transformers.Trainer`, and SplitFed-V2
(`--compare_algorithms splitfed_v2`, on in the preset) the same federation for
the same steps; all three are scored.
`--use_peft false` fine-tunes every weight instead.

    accelerate launch recipes/gpt2m_e2e.py --preset tiny --output_dir out/tiny

Every download has a local alternative: `--model_name_or_path DIR`,
`--tokenizer_name DIR`, `--train_file/--validation_file/--test_file` (CSV with
columns `mr`, `ref`). A missing validation or test split is carved out of the
training rows by meaning representation; train, validation and test never share
an `mr`.

At the end the global model (aggregated clients plus server) is evaluated
(eval_loss, eval_perplexity), beam-search generates one text per distinct test
`mr`, scored against all its references (BLEU, NIST, METEOR, ROUGE-L, CIDEr) and
against the `mr` (slot error rate), and `<output_dir>` receives `metrics.json`
(with the centralized reference and the federated/centralized ratios when it
ran), a plot of loss against communicated MB, the model (a PEFT adapter, or a
full model without PEFT) and its model card.
`--push_to_hub --hub_model_id USER/NAME` publishes that folder.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import datasets
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    set_seed,
)
from transformers.pytorch_utils import Conv1D

from e2e_task import arguments
from e2e_task.arguments import ScriptArguments
from e2e_task.bootstrap import bleu_intervals
from e2e_task.central import centralized_reference, pretrained_base
from e2e_task.data import (
    E2E_ATTRIBUTION,
    E2E_SEPARATOR,
    load_e2e,
    offline_gpt2_tokenizer,
    restricted_tokenizer,
    split_by_mr,
    tokenize_e2e,
)
from e2e_task.evaluation import GenerationEvalCallback, evaluate_e2e_generation
from e2e_task.metrics import METRIC_NAMES
from e2e_task.report import card_metrics, ratios, summary
from hf_fsl_sage import FSLSageConfig, FSLSageTrainer
from hf_fsl_sage.federation.data import tokenize_text
from hf_fsl_sage.integrations.plotting import CommBytesAtEvaluation, plot_loss_vs_comm
from hf_fsl_sage.transport.waiting import main_process_first


logger = logging.getLogger("gpt2m_e2e")

def parse_args(argv: list[str] | None = None) -> tuple[ScriptArguments, FSLSageConfig]:
    """The recipe's command line (``e2e_task.arguments``), with this module's docstring as its ``--help``."""
    return arguments.parse_args(argv, __doc__)


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
        fan_in_fan_out = any(isinstance(m, Conv1D) for n, m in model.named_modules()
                             if n.rsplit(".", 1)[-1] in targets)
    return LoraConfig(r=script.lora_r, lora_alpha=script.lora_alpha, lora_dropout=script.lora_dropout,
                      target_modules=list(script.lora_target_modules), fan_in_fan_out=fan_in_fan_out,
                      task_type="CAUSAL_LM")


# --------------------------------------------------------------------------- data


def load_splits(script: ScriptArguments, seed: int) -> datasets.DatasetDict:
    """train / validation / test (and pretrain, with --pretrain_fraction) with columns mr, ref and no mr shared
    between splits."""
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
    names = ["train", "validation", "test"]
    if script.pretrain_fraction > 0:  # whole mr groups of the training rows, for the central pre-training
        held_out = split_by_mr(splits["train"], script.pretrain_fraction, seed=seed + 1)
        splits["train"], splits["pretrain"] = held_out["train"], held_out["validation"]
        names.append("pretrain")
    seen: set[str] = set()
    for name in names:  # drop rows whose mr an earlier split already has
        ds = splits[name]
        keep = [i for i, mr in enumerate(ds["mr"]) if mr not in seen]
        if len(keep) < len(ds):
            logger.warning("%s: dropped %d rows whose mr is also in an earlier split", name, len(ds) - len(keep))
            ds = ds.select(keep)
        if len(ds) == 0:
            raise ValueError(f"The {name} split is empty after removing mrs shared with earlier splits.")
        splits[name] = ds
        seen.update(ds["mr"])
    return datasets.DatasetDict({k: splits[k] for k in names})


def prepare(script: ScriptArguments, seed: int) -> tuple[PreTrainedTokenizerBase, datasets.DatasetDict]:
    """The tokenizer (cut down to the training text's tokens with --restrict_vocab) and the splits."""
    tokenizer = load_tokenizer(script)
    raw = load_splits(script, seed)
    if script.restrict_vocab:
        rows = [raw[name] for name in ("train", "pretrain") if name in raw]
        texts = [E2E_SEPARATOR] + [t for ds in rows for mr, ref in zip(ds["mr"], ds["ref"])
                                   for t in (mr, ref, " " + ref)]
        tokenizer = restricted_tokenizer(tokenizer, texts)
        tokenizer.padding_side = "right"
    return tokenizer, raw


def tokenized(ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int) -> datasets.Dataset:
    """input_ids / attention_mask / labels (-100 on the mr and separator), plus the mr (for partitioning)."""
    return tokenize_e2e(ds, tokenizer, max_length=max_length).add_column("mr", ds["mr"])


# --------------------------------------------------------------------------- central stage


def _central_dir(script: ScriptArguments, args: FSLSageConfig) -> Path:
    return Path(args.output_dir) / "centralized"


def base_model(script: ScriptArguments, args: FSLSageConfig, tokenizer, raw,
               validation) -> tuple[PreTrainedModel, dict]:
    """The base model: loaded or built, then pre-trained centrally (cached in --base_model_dir) if asked, then cast
    to --base_dtype."""
    dtype = getattr(torch, script.base_dtype)
    if script.pretrain_steps == 0:
        return build_model(script, tokenizer, args.seed).to(dtype), {}
    text = tokenize_text(raw["pretrain"].select_columns(["ref"]).rename_column("ref", "text"), tokenizer,
                         max_length=script.max_length)
    files = [f for f in (script.train_file, script.validation_file, script.test_file) if f]
    data = [(str(Path(f).resolve()), os.path.getsize(f)) for f in files] or script.dataset_name
    fractions = [script.validation_fraction, script.test_fraction, script.pretrain_fraction]
    settings = {"model": script.model_name_or_path, "model_config": script.model_config, "data": data,
                "tokenizer": script.tokenizer_name, "vocab": len(tokenizer), "fractions": fractions,
                "max_length": script.max_length}
    directory = script.base_model_dir or str(Path(args.output_dir) / "base_model")
    model, info = pretrained_base(lambda: build_model(script, tokenizer, args.seed), text, validation, tokenizer,
                                  directory, settings, script.pretrain_steps, script.pretrain_batch_size,
                                  script.pretrain_learning_rate, args.seed)
    logger.info("base model %s in %s: eval loss %.3f -> %.3f", "reused" if info["cached"] else "pre-trained",
                directory, info["eval_loss_before"], info["eval_loss_after"])
    return model.to(dtype), {**info, "directory": str(Path(directory).resolve()), "rows": len(raw["pretrain"])}


def run_centralized(script: ScriptArguments, args: FSLSageConfig, model, tokenizer, raw, train, validation) -> dict:
    """The centralized reference on the same base, data and PEFT config; its scores go to centralized/."""
    started = time.time()
    peft_config = lora_config(script, model) if script.use_peft else None
    trainer, results = centralized_reference(model, args, train, validation, tokenizer, peft_config)
    generation = evaluate_e2e_generation(trainer, raw["test"], script.generation(), max_mrs=script.max_generation_mrs,
                                         lexicon=_all_mrs(raw))
    results.update({k: v for k, v in generation.scores.items() if k != "num_mrs"})
    results.update(runtime_seconds=time.time() - started, generations=generation.records)
    out = _central_dir(script, args)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    return results


def _compared_dir(args: FSLSageConfig, name: str) -> Path:
    return Path(args.output_dir) / "compare" / name


def run_compared(script: ScriptArguments, args: FSLSageConfig, name: str, tokenizer, raw, train,
                 validation) -> dict[str, Any]:
    """Algorithm ``name`` on the main run's base, data, clients and seed for ``--compare_max_steps`` global steps,
    evaluated and scored as the main run is; its results (with its log history) go to compare/<name>/."""
    started, cpu = time.time(), time.process_time()
    model, _ = base_model(script, args, tokenizer, raw, validation)  # cached: a fresh copy of the same base
    out = _compared_dir(args, name)
    steps = script.compare_max_steps or args.max_steps
    compared = replace(args, algorithm=name, output_dir=str(out), max_steps=steps)
    set_seed(args.seed)
    trainer = _federated_trainer(script, compared, model, tokenizer, train, validation)
    _train(trainer, script)
    results = _scores(trainer, script, raw, trainer.evaluate())
    results.update(runtime_seconds=time.time() - started, cpu_seconds=time.process_time() - cpu, algorithm=name,
                   log_history=trainer.state.log_history)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    return results


def central_stage(script: ScriptArguments, args: FSLSageConfig) -> None:
    """Pre-training, the centralized reference and the compared algorithms, in this (single) process: what the
    main process runs in a child process beside the federated run (see :func:`run`)."""
    tokenizer, raw = prepare(script, args.seed)
    train, validation = _tokenized_splits(script, tokenizer, raw)
    model, _ = base_model(script, args, tokenizer, raw, validation)
    if script.reference == "centralized":
        run_centralized(script, args, model, tokenizer, raw, train, validation)
    for name in script.compare_algorithms:
        run_compared(script, args, name, tokenizer, raw, train, validation)


def _central_in_child(argv: list[str], threads: int | None = None) -> subprocess.Popen:
    """Start :func:`central_stage` in a one-process child (a plain Trainer would otherwise join the process group),
    with ``threads`` torch threads if given; returns the running process."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "ACCELERATE_USE_CPU") and not k.startswith(("TORCHELASTIC", "GROUP_", "ROLE_"))}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *argv, "--central_only"], env=env)


def _wait(child: subprocess.Popen) -> None:
    if child.wait() != 0:
        raise RuntimeError(f"the centralized reference / compared runs failed in their child process "
                           f"(exit status {child.returncode}); its error is printed above")


def _all_mrs(raw) -> list[str]:
    return [mr for ds in raw.values() for mr in ds["mr"]]


def _tokenized_splits(script: ScriptArguments, tokenizer, raw) -> tuple[datasets.Dataset, datasets.Dataset]:
    train = tokenized(raw["train"], tokenizer, script.max_length)
    validation = tokenized(raw["validation"], tokenizer, script.max_length)
    if script.max_eval_samples is not None:
        validation = validation.select(range(min(script.max_eval_samples, len(validation))))
    return train, validation


# --------------------------------------------------------------------------- run

def run(script: ScriptArguments, args: FSLSageConfig,
        argv: list[str] | None = None) -> tuple[FSLSageTrainer, dict[str, Any]]:
    """Pre-train (if asked), train, evaluate, generate, write metrics.json, the plot and the model card; push if
    asked. ``argv`` (the command line) lets several processes run the central stage in a one-process child."""
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    started, cpu = time.time(), time.process_time()
    set_seed(args.seed)

    tokenizer, raw = prepare(script, args.seed)
    logger.info("vocabulary: %d tokens", len(tokenizer))
    logger.info("rows (distinct mrs): %s", {k: f"{len(v)} ({len(set(v['mr']))})" for k, v in raw.items()})
    train, validation = _tokenized_splits(script, tokenizer, raw)

    central: dict[str, Any] | None = None
    child_work = script.pretrain_steps or script.reference == "centralized" or script.compare_algorithms
    command = sys.argv[1:] if argv is None else argv
    child = None
    if args.world_size > 1 and child_work:
        # The others wait for process 0 on the launch's store, without the deadline a barrier would have.
        with main_process_first("central pre-training, reference and compared runs"):
            if args.process_index == 0:
                _wait(_central_in_child(command))
            model, pretraining = base_model(script, args, tokenizer, raw, validation)  # cached by the child
    else:
        model, pretraining = base_model(script, args, tokenizer, raw, validation)
        if script.reference == "centralized" or script.compare_algorithms:
            # In parallel with the federated run, each process on half the threads.
            threads = max(1, torch.get_num_threads() // 2)
            child = _central_in_child(command, threads)
            torch.set_num_threads(threads)
        set_seed(args.seed)

    trainer = _federated_trainer(script, args, model, tokenizer, train, validation)
    if script.generate_every_eval:
        trainer.add_callback(GenerationEvalCallback(trainer, raw["validation"], script.generation(),
                                                    max_mrs=script.max_generation_mrs))
    _train(trainer, script, resume=args.resume_from_checkpoint)
    if child is not None:
        _wait(child)
        torch.set_num_threads(threads * 2)
    if args.process_index == 0 and script.reference == "centralized":
        central = json.loads((_central_dir(script, args) / "metrics.json").read_text())
    compared = {name: json.loads((_compared_dir(args, name) / "metrics.json").read_text())
                for name in script.compare_algorithms} if args.process_index == 0 else {}

    eval_metrics = trainer.evaluate()
    results = None
    if trainer.is_world_process_zero():
        results = _finish_on_main(trainer, script, args, raw, eval_metrics, (started, cpu), pretraining, central,
                                  compared)
    # With several processes every one calls these (Trainer writes and uploads from the main process only).
    base = pretraining.get("directory") or script.model_name_or_path
    card = {} if results is None else {
        "finetuned_from": base, "dataset": script.dataset_name, "dataset_attribution": E2E_ATTRIBUTION,
        "metrics": card_metrics(results), "language": "en", "tags": ["e2e-nlg", "data-to-text"]}
    if args.push_to_hub:
        trainer.push_to_hub(commit_message="FSL-SAGE fine-tuning on E2E", **card)
    else:
        trainer.save_model()
        trainer.create_model_card(**card)
    return trainer, results


def _federated_trainer(script: ScriptArguments, args: FSLSageConfig, model, tokenizer, train,
                       validation) -> FSLSageTrainer:
    trainer = FSLSageTrainer(model=model, args=args, train_dataset=train, eval_dataset=validation,
                             processing_class=tokenizer,
                             peft_config=lora_config(script, model) if script.use_peft else None)
    trainer.add_callback(CommBytesAtEvaluation(trainer.federation.transport.ledger))
    return trainer


def _train(trainer: FSLSageTrainer, script: ScriptArguments, resume: str | bool | None = None) -> None:
    """Train; with --eval_every_rounds the log history starts with the evaluation of the base (0 bytes)."""
    initial = None
    if script.eval_every_rounds is not None and not resume:
        initial = trainer.evaluate()  # the eval curve's starting point; train() starts a fresh log_history
    trainer.train(resume_from_checkpoint=resume)
    if initial is not None:
        trainer.state.log_history.insert(0, {**initial, "comm_bytes": 0, "comm_bytes_up": 0, "comm_bytes_down": 0,
                                             "step": 0})


def _scores(trainer: FSLSageTrainer, script: ScriptArguments, raw, eval_metrics) -> dict[str, Any]:
    """Eval loss and perplexity, the generation scores and records, the bytes, steps and rounds of a run."""
    generation = evaluate_e2e_generation(trainer, raw["test"], script.generation(), max_mrs=script.max_generation_mrs,
                                         lexicon=_all_mrs(raw))
    ledger = trainer.federation.transport.ledger
    steps = trainer.state.global_step
    return {
        "eval_loss": eval_metrics["eval_loss"],
        "eval_perplexity": eval_metrics.get("eval_perplexity", math.exp(min(eval_metrics["eval_loss"], 700.0))),
        **{k: v for k, v in generation.scores.items() if k != "num_mrs"},
        "num_generation_mrs": generation.scores["num_mrs"],
        **ledger.metrics(),
        "comm_bytes_by_kind": dict(ledger.by_kind),
        "global_steps": steps,
        "rounds": trainer.schedule.position(steps - 1)[0] + 1 if steps else 0,
        "generation_settings": asdict(generation.settings),
        "generations": generation.records,
    }


def _finish_on_main(trainer: FSLSageTrainer, script: ScriptArguments, args: FSLSageConfig, raw, eval_metrics,
                    started: tuple[float, float], pretraining: dict[str, Any], central: dict[str, Any] | None,
                    compared: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Generation, scores, metrics.json and the plot, on the main process (which holds the global model)."""
    results = _scores(trainer, script, raw, eval_metrics)
    trainer.log({f"test_{k}": v for k, v in results.items() if k in (*METRIC_NAMES, "slot_error_rate")
                 and isinstance(v, (int, float))})
    generations = results.pop("generations")
    if central is not None:
        results["federated_over_centralized"] = ratios(results, central)
        results["centralized"] = {k: v for k, v in central.items() if k != "generations"}
    results.update({
        "runtime_seconds": time.time() - started[0],
        "cpu_seconds": time.process_time() - started[1],  # this process, all threads; not a child's
        "train_seconds": next((h["train_runtime"] for h in trainer.state.log_history if "train_runtime" in h), None),
        "pretraining": {k: v for k, v in pretraining.items() if k != "settings"},
        "algorithm": args.algorithm,
        "processes": trainer.placement.world_size,
        "placement": trainer.placement.describe(),
        "script_args": asdict(script),
        "training_args": args.to_dict(),
        "plot": script.plot_file,
        "compared": {name: {k: v for k, v in other.items() if k not in ("generations", "log_history")}
                     | ({"over_centralized": ratios(other, central)} if central else {})
                     for name, other in compared.items()},
        "generations": generations,
    })
    if central is not None:
        results["centralized_generations"] = central["generations"]
    # 15 test mrs in the tiny preset: how far apart BLEU scores must be to differ (paired bootstrap over the mrs)
    systems = {args.algorithm: generations, **{name: other["generations"] for name, other in compared.items()},
               **({"centralized": central["generations"]} if central is not None else {})}
    results["bleu_bootstrap"] = bleu_intervals(systems, seed=args.seed)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    reference = {"centralized (same examples), final eval loss": central["eval_loss"]} if central else None
    plot_loss_vs_comm(trainer.state.log_history, out / script.plot_file, references=reference,
                      title=f"{args.algorithm}, {args.num_clients} clients, cut_layer={args.cut_layer}",
                      compared={name: other["log_history"] for name, other in compared.items()})
    (out / script.metrics_file).write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    print(f"\nResults ({out / script.metrics_file}):\n{summary(results)}", flush=True)
    return results


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Parse ``argv`` (default: the command line) and run the recipe; returns what metrics.json holds."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--central_only" in argv:  # the one-process child of a multi-process run
        central_stage(*parse_args([a for a in argv if a != "--central_only"]))
        return None
    return run(*parse_args(argv), argv=argv)[1]


if __name__ == "__main__":
    main()
