"""The model card (``README.md``) written next to a model trained by :class:`~hf_fsl_sage.FSLSageTrainer`.

It states what a reader of the Hub page needs to reuse or reproduce the model:
the base model, the algorithm and its parameters, where the model was split,
the federation (clients, rounds), the bytes that crossed the client-server
boundary, the evaluation metrics, how to load it, the paper to cite and the
training data's attribution.
"""

from __future__ import annotations

import enum
import os
from typing import Any

from huggingface_hub import ModelCard, ModelCardData


__all__ = ["FSL_SAGE_CITATION", "render_model_card", "write_model_card"]

FSL_SAGE_CITATION = """\
@inproceedings{nair2025fslsage,
  title     = {{FSL-SAGE}: Accelerating Federated Split Learning via Smashed Activation Gradient Estimation},
  author    = {Nair and Lin and Talebi and Ju and Bentley and Liu},
  booktitle = {Proceedings of the 42nd International Conference on Machine Learning (ICML)},
  year      = {2025},
  eprint    = {2505.23182},
  archivePrefix = {arXiv}
}"""

def _base_model(trainer: Any, finetuned_from: str | None) -> str | None:
    if finetuned_from:
        return finetuned_from
    peft_config = getattr(trainer.model, "peft_config", None)
    if peft_config:
        return next(iter(peft_config.values())).base_model_name_or_path or None
    return getattr(trainer.model.config, "_name_or_path", None) or None


def _is_hub_id(name: str | None) -> bool:
    return bool(name) and not os.path.exists(name) and name.count("/") <= 1 and not name.startswith((".", "/"))


def _blocks(first: int, last: int) -> str:
    return f"block {first}" if first == last else f"blocks {first}–{last}"


def _mb(nbytes: int) -> str:
    return f"{nbytes:,} B ({nbytes / 1e6:,.1f} MB)"


def _fmt(value: Any) -> str:
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return "n/a" if value is None else str(value)


def _table(rows: list[tuple[str, Any]], header: tuple[str, str] = ("", "")) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in rows]
    return "\n".join(lines)


def _parameters(trainer: Any) -> list[tuple[str, Any]]:
    args, algorithm = trainer.args, trainer.algorithm
    rows: list[tuple[str, Any]] = [
        ("algorithm", f"`{args.algorithm}`"),
        ("clients", args.num_clients),
        ("clients per round", args.participants_per_round),
        ("local steps per round", args.local_steps),
        ("partition", args.partition if args.partition == "iid" else
         f"dirichlet(alpha={args.dirichlet_alpha}) over `{args.partition_column}`"),
        ("batch size per client", args.per_device_train_batch_size),
        ("learning rate / warm-up / schedule",
         f"{args.learning_rate} / {args.warmup_steps} / {_fmt(args.lr_scheduler_type)}"),
        ("optimizer", f"{_fmt(args.optim)} (weight decay {args.weight_decay}, eps {args.adam_epsilon})"),
        ("label smoothing", args.label_smoothing_factor),
    ]
    rows += algorithm.model_card_rows()
    peft_config = getattr(trainer.model, "peft_config", None)
    if peft_config:
        cfg = next(iter(peft_config.values()))
        targets = sorted(cfg.target_modules) if isinstance(cfg.target_modules, (set, list)) else cfg.target_modules
        rows.append(("PEFT", f"{cfg.peft_type.value if hasattr(cfg.peft_type, 'value') else cfg.peft_type} "
                             f"r={getattr(cfg, 'r', '')} alpha={getattr(cfg, 'lora_alpha', '')} "
                             f"dropout={getattr(cfg, 'lora_dropout', '')} on {targets}"))
    else:
        rows.append(("PEFT", "none (every weight trained)"))
    rows.append(("seed", args.seed))
    return rows


def _privacy(trainer: Any) -> str:
    """What the server could read, in the run's mode (the measurements behind it: the project's privacy page)."""
    args = trainer.args
    if trainer.split.private_labels:
        text = ("The labels stay on the clients (`private_labels=True`): the server received the clients' "
                "cut-layer activations and the gradients of their loss w.r.t. its output, never the labels. "
                "Cut-layer activations can still be inverted to the input tokens, and the returned gradients "
                "reveal the labels to a server that knows the frozen head.")
    else:
        text = ("The server received the clients' cut-layer activations and their labels, which for a causal LM "
                "are the input tokens themselves: split learning kept the clients' weights and most of the compute "
                "local, not the training text private from the server.")
    sigma = args.smashed_noise_multiplier
    defences = [f"per-token clipping to {args.smashed_clip_norm}" if args.smashed_clip_norm else "",
                f"Gaussian noise of {sigma} x the clip" if sigma else "",
                f"d_chi-privacy of the input embeddings (epsilon {args.embedding_dx_epsilon})"
                if args.embedding_dx_epsilon else ""]
    if any(defences) and trainer.algorithm.sends_activations:
        text += " Defences on the activations in training: " + ", ".join(d for d in defences if d) + "."
    return text


def _final_metrics(trainer: Any, metrics: dict[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for entry in trainer.state.log_history:  # the last evaluation, if any
        if "eval_loss" in entry:
            out = {k: v for k, v in entry.items() if k.startswith("eval_")
                   and not k.endswith(("_runtime", "_per_second")) and k != "eval_model_preparation_time"}
    out.update(metrics or {})
    return out


def render_model_card(
    trainer: Any,
    model_name: str | None = None,
    finetuned_from: str | None = None,
    dataset: str | list[str] | None = None,
    dataset_attribution: str | None = None,
    metrics: dict[str, Any] | None = None,
    license: str | None = None,
    language: str | list[str] | None = None,
    tags: str | list[str] | None = None,
    **_: Any,
) -> ModelCard:
    """Model card of ``trainer``'s global model. ``metrics`` are added to the last evaluation's metrics."""
    args, split = trainer.args, trainer.split
    ledger = trainer.federation.transport.ledger
    is_peft = bool(getattr(trainer.model, "peft_config", None))
    base = _base_model(trainer, finetuned_from)
    config = getattr(trainer.model, "config", None)
    model_type = getattr(config, "model_type", "causal LM")
    base_text = f"`{base}`" if base else (
        f"a randomly initialised {model_type} built from its config "
        f"({split.num_layers} blocks, hidden size {getattr(config, 'hidden_size', '?')}), no pre-training")

    tag_list = [tags] if isinstance(tags, str) else list(tags or [])
    for tag in ("federated-learning", "split-learning", args.algorithm.replace("_", "-"), "text-generation",
                *(("peft", "lora") if is_peft else ())):
        if tag not in tag_list:
            tag_list.append(tag)
    data = ModelCardData(
        base_model=base if _is_hub_id(base) else None,
        library_name="peft" if is_peft else "transformers",
        license=license, language=language, pipeline_tag="text-generation", tags=tag_list,
        datasets=[dataset] if isinstance(dataset, str) else dataset,
    )

    steps = trainer.state.global_step
    rounds = trainer.schedule.position(steps - 1)[0] + 1 if steps > 0 else 0
    kinds = sorted(ledger.by_kind.items())
    final = _final_metrics(trainer, metrics)
    name = model_name or os.path.basename(os.path.abspath(args.output_dir))
    repo = getattr(trainer, "hub_model_id", None) or args.hub_model_id or args.output_dir
    if is_peft:
        load = (f"from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
                f"base = AutoModelForCausalLM.from_pretrained({base or '<base model>'!r})\n"
                f"model = PeftModel.from_pretrained(base, {repo!r})")
    else:
        load = ("from transformers import AutoModelForCausalLM\n\n"
                f"model = AutoModelForCausalLM.from_pretrained({repo!r})")

    sections = [
        f"# {name}",
        f"{'A LoRA adapter for' if is_peft else 'A fine-tuned version of'} {base_text}, trained with federated "
        f"split learning: **{trainer.algorithm.display_name or args.algorithm}**, with "
        f"`hf_fsl_sage.FSLSageTrainer`. The weights are the *global* model: "
        f"the FedAvg of the clients' halves joined to the server's half.",
        "## Split",
        f"The model was cut after block {split.cut_layer - 1} (`cut_layer={split.cut_layer}` of {split.num_layers} "
        f"blocks): each client held the embeddings and {_blocks(0, split.cut_layer - 1)}, the server "
        + (f"{_blocks(split.cut_layer, split.num_layers - 1)}; the final norm, the LM head and the labels stayed "
           "on the clients." if split.private_labels else
           f"{_blocks(split.cut_layer, split.num_layers - 1)}, the final norm and the LM head."),
        "## Training",
        _table([*_parameters(trainer), ("rounds", rounds), ("global steps (one local step per client)", steps)],
               ("parameter", "value")),
        "## Communication",
        "Bytes that crossed the client-server boundary during training (tensors in the dtype sent).",
        _table([("total", _mb(ledger.total)), ("uplink (clients to server)", _mb(ledger.up)),
                ("downlink (server to clients)", _mb(ledger.down)),
                *[(f"`{kind}`", _mb(n)) for kind, n in kinds]], ("traffic", "bytes")),
        "## Evaluation",
        _table(sorted(final.items()), ("metric", "value")) if final else "No evaluation was run.",
        "## Usage",
        f"```python\n{load}\n```",
        "## Privacy",
        _privacy(trainer),
    ]
    if dataset_attribution:
        sections += ["## Data", dataset_attribution]
    sections += ["## Citation",
                 "FSL-SAGE: Nair, Lin, Talebi, Ju, Bentley, Liu, \"FSL-SAGE: Accelerating Federated Split Learning "
                 "via Smashed Activation Gradient Estimation\", ICML 2025, arXiv:2505.23182.",
                 f"```bibtex\n{FSL_SAGE_CITATION}\n```"]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")


def write_model_card(trainer: Any, output_dir: str | None = None, **kwargs: Any) -> str:
    """Write ``README.md`` into ``output_dir`` (default ``trainer.args.output_dir``); returns its path."""
    path = os.path.join(output_dir or trainer.args.output_dir, "README.md")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    render_model_card(trainer, **kwargs).save(path)
    return path
