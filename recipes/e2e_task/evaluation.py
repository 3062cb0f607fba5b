"""Score a trained global model on E2E: beam-search generation per meaning representation, then the E2E metrics.

Every distinct ``mr`` of the evaluation rows is generated once, from the prompt
the training data used (:func:`e2e_task.data.e2e_prompt`), and the output is
scored against *all* references of that ``mr`` with
:func:`e2e_task.metrics.compute_e2e_metrics`, and checked against the ``mr`` itself for its slot
error rate (:mod:`e2e_task.slot_errors`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import datasets
import torch
from torch import nn
from transformers import GenerationConfig, PreTrainedTokenizerBase, TrainerCallback

from .data import E2E_SEPARATOR, e2e_prompt
from .metrics import compute_e2e_metrics
from .slot_errors import slot_error_rate, slot_errors, venue_lexicon


__all__ = ["GenerationSettings", "E2EGenerationResult", "GenerationEvalCallback", "group_references",
           "generation_model", "generate_texts", "evaluate_e2e_generation"]


@dataclass
class GenerationSettings:
    """Decoding of the E2E outputs (defaults: the paper's beam search)."""

    num_beams: int = 10
    length_penalty: float = 0.9
    no_repeat_ngram_size: int = 4
    max_new_tokens: int = 64
    batch_size: int = 8

    def generation_config(self, tokenizer: PreTrainedTokenizerBase) -> GenerationConfig:
        return GenerationConfig(
            do_sample=False, num_beams=self.num_beams, length_penalty=self.length_penalty,
            no_repeat_ngram_size=self.no_repeat_ngram_size, max_new_tokens=self.max_new_tokens,
            early_stopping=True, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
        )


@dataclass
class E2EGenerationResult:
    """Scores (``bleu``, ``nist``, ``meteor``, ``rouge_l``, ``cider``, ``slot_error_rate`` and notes) and one
    record per ``mr``."""

    scores: dict[str, Any]
    records: list[dict[str, Any]]  # {"mr", "prediction", "references", "slots_missing", "slots_contradicted"}
    settings: GenerationSettings

    def to_dict(self) -> dict[str, Any]:
        return {"scores": self.scores, "generation": asdict(self.settings), "records": self.records}


def group_references(ds: datasets.Dataset, max_mrs: int | None = None) -> tuple[list[str], list[list[str]]]:
    """Distinct ``mr`` values in order of first appearance and, for each, all its references."""
    refs: dict[str, list[str]] = {}
    for mr, ref in zip(ds["mr"], ds["ref"]):
        refs.setdefault(mr.strip(), []).append(ref.strip())
    mrs = list(refs)[:max_mrs] if max_mrs is not None else list(refs)
    return mrs, [refs[m] for m in mrs]


def generation_model(trainer: Any) -> nn.Module:
    """The global model (aggregated clients plus server) of an ``FSLSageTrainer`` (or a plain ``Trainer``'s model),
    ready for ``generate``.

    ``trainer.model`` (the ``PeftModel`` with PEFT) holds every global weight except, when the tied LM
    head was trained on the server apart from the client's embedding, the head: it is then given the
    server's head first, as ``save_model`` does.
    """
    split = getattr(trainer, "split", None)  # a plain Trainer has none: its model is the global one
    if split is not None and split.untied_after_training():
        split.untie_for_export()
    return trainer.model


def _left_padding(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    tok = copy.deepcopy(tokenizer)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@torch.no_grad()
def generate_texts(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], settings: GenerationSettings
) -> list[str]:
    """Continuations of ``prompts`` (prompt removed, special tokens dropped, stripped), in batches.

    Batches are padded on the left with a copy of ``tokenizer`` (the caller's padding side is left
    alone) and placed on the model's device; the model is in eval mode meanwhile.
    """
    tok = _left_padding(tokenizer)
    config = settings.generation_config(tok)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        for start in range(0, len(prompts), settings.batch_size):
            batch = tok(list(prompts[start : start + settings.batch_size]), return_tensors="pt", padding=True,
                        add_special_tokens=False).to(device)
            generated = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                       generation_config=config)
            new_tokens = generated[:, batch["input_ids"].shape[1] :]
            out.extend(t.strip() for t in tok.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return out


def evaluate_e2e_generation(
    trainer: Any,
    ds: datasets.Dataset,
    settings: GenerationSettings | None = None,
    separator: str = E2E_SEPARATOR,
    max_mrs: int | None = None,
    lexicon: Sequence[str] | None = None,
) -> E2EGenerationResult:
    """Generate for every distinct ``mr`` of ``ds`` (columns ``mr``, ``ref``) with the trainer's global model
    and score against all references of each ``mr``, and against the ``mr`` for the slot error rate.

    ``lexicon``: ``mr`` strings whose venue names count as contradicting a venue slot (default: ``ds``'s).
    A metric that cannot run (METEOR without java) is ``None`` with a ``<name>_unavailable_reason``.
    """
    settings = settings or GenerationSettings()
    mrs, references = group_references(ds, max_mrs)
    if not mrs:
        raise ValueError("No rows to generate for: the evaluation split is empty.")
    model = generation_model(trainer)
    predictions = generate_texts(model, trainer.processing_class, [e2e_prompt(m, separator) for m in mrs], settings)
    scores = compute_e2e_metrics(predictions, references)
    lexicon = list(ds["mr"]) if lexicon is None else lexicon
    scores.update(slot_error_rate(predictions, mrs, lexicon))
    scores["num_mrs"] = len(mrs)
    venues = venue_lexicon(lexicon)
    records = []
    for m, p, r in zip(mrs, predictions, references):
        errors = slot_errors(p, m, venues)
        records.append({"mr": m, "prediction": p, "references": r, "slots_missing": errors.missing,
                        "slots_contradicted": errors.contradicted})
    return E2EGenerationResult(scores, records, settings)


class GenerationEvalCallback(TrainerCallback):
    """At each evaluation during training, also generate for ``ds``'s mrs and add ``eval_<metric>`` to the logs.

    Register it after :class:`~hf_fsl_sage.integrations.plotting.CommBytesAtEvaluation` (both edit the evaluation's
    ``log_history`` entry). Scores are logged only for metrics that ran.
    """

    def __init__(self, trainer: Any, ds: datasets.Dataset, settings: GenerationSettings | None = None,
                 max_mrs: int | None = None):
        self.trainer, self.ds, self.settings, self.max_mrs = trainer, ds, settings, max_mrs

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not (state.log_history and "eval_loss" in state.log_history[-1]) or not state.is_world_process_zero:
            return control  # only the main process holds the global model
        result = evaluate_e2e_generation(self.trainer, self.ds, self.settings, max_mrs=self.max_mrs)
        scores = {f"eval_{k}": v for k, v in result.scores.items() if isinstance(v, (int, float))}
        state.log_history[-1].update(scores)
        if metrics is not None:
            metrics.update(scores)
        return control
