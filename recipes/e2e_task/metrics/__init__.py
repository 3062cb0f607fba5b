"""The metrics of the E2E NLG Challenge as local, offline `evaluate` modules.

Each prediction is scored against all references of its input (meaning
representation). Scores follow the challenge's official scripts:

* ``bleu`` and ``nist``: NIST mteval-v13a, reimplemented in Python (:mod:`._mteval`)
  and checked against the Perl script's output; no Java or Perl needed.
* ``rouge_l`` and ``cider``: the MS-COCO caption evaluation definitions, reimplemented
  (:mod:`._coco`) and checked against ``pycocoevalcap`` to 1e-6.
* ``meteor``: the official METEOR 1.5 jar with its paraphrase table, both shipped by the
  ``pycocoevalcap`` wheel, run with ``java``; ``None`` plus a reason when unavailable.

As in the official scoring, METEOR, ROUGE-L and CIDEr see text run through the Stanford
PTB tokenizer jar (also from ``pycocoevalcap``) with punctuation removed; without java
ROUGE-L and CIDEr fall back to a close Python approximation and report it.

Each metric lives in ``METRICS_DIR/<name>/<name>.py`` and loads with
``evaluate.load(str(METRICS_DIR / name))`` without network access.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import evaluate

from e2e_task.metrics._common import check_inputs
from e2e_task.metrics._tokenize import coco_tokenize_pairs


METRICS_DIR = Path(__file__).resolve().parent
METRIC_NAMES = ("bleu", "nist", "meteor", "rouge_l", "cider")

__all__ = ["METRICS_DIR", "METRIC_NAMES", "compute_e2e_metrics", "load_metric"]


def load_metric(name: str, **kwargs: Any) -> evaluate.EvaluationModule:
    """Load one of :data:`METRIC_NAMES` from its local folder with ``evaluate.load``."""
    if name not in METRIC_NAMES:
        raise ValueError(f"unknown metric {name!r}; expected one of {METRIC_NAMES}")
    return evaluate.load(str(METRICS_DIR / name), **kwargs)


@cache
def _cached_metric(name: str) -> evaluate.EvaluationModule:
    return load_metric(name)


def compute_e2e_metrics(
    predictions: Sequence[str], references: Sequence[Sequence[str]], tokenizer: str = "ptb"
) -> dict[str, float | str | None]:
    """Score generated texts with the five E2E metrics.

    Returns ``bleu``, ``nist``, ``meteor``, ``rouge_l``, ``cider`` and ``coco_tokenizer``
    (the tokenizer used before METEOR/ROUGE-L/CIDEr). ``meteor`` is None when it cannot
    run, with ``meteor_unavailable_reason``; ``coco_tokenizer_fallback_reason`` appears
    when the PTB tokenizer was requested but could not run.
    """
    predictions = list(predictions)
    references = [list(refs) for refs in references]
    check_inputs(predictions, references)
    raw = {"predictions": predictions, "references": references}
    scores: dict[str, float | str | None] = {
        "bleu": _cached_metric("bleu").compute(**raw)["bleu"],
        "nist": _cached_metric("nist").compute(**raw)["nist"],
    }
    # Tokenize once for the three COCO metrics instead of once per metric.
    hyps, refs, used, fallback = coco_tokenize_pairs(predictions, references, tokenizer)
    tokenized = {"predictions": hyps, "references": refs, "tokenizer": "none"}
    meteor = _cached_metric("meteor").compute(**tokenized)
    scores["meteor"] = meteor["meteor"]
    if meteor["meteor"] is None:
        scores["meteor_unavailable_reason"] = meteor["meteor_unavailable_reason"]
    scores["rouge_l"] = _cached_metric("rouge_l").compute(**tokenized)["rouge_l"]
    scores["cider"] = _cached_metric("cider").compute(**tokenized)["cider"]
    scores["coco_tokenizer"] = used
    if fallback is not None:
        scores["coco_tokenizer_fallback_reason"] = fallback
    return scores
