"""Base classes of the metric scripts.

:class:`E2EMetric` builds the ``evaluate.MetricInfo`` from class attributes;
:class:`MtevalMetric` and :class:`CocoMetric` also implement ``_compute`` around a
per-metric ``_score`` hook.

``evaluate.load`` uses the first non-abstract ``evaluate.Metric`` subclass in a
script's namespace. The classes here are abstract, and scripts import this module
(``from e2e_task.metrics import _base``) rather than the classes, so the
script's own class is the one loaded.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence
from typing import Any

import evaluate

from e2e_task.metrics._common import COCO_CAPTION_URL, E2E_CITATION, E2E_METRICS_URL, check_inputs, features
from e2e_task.metrics._mteval import MtevalStats, corpus_stats
from e2e_task.metrics._tokenize import coco_tokenize_pairs


class E2EMetric(evaluate.Metric, metaclass=abc.ABCMeta):
    """A metric over one prediction and its list of references per input."""

    DESCRIPTION: str
    CITATION: str  # BibTeX of the metric; the E2E challenge's entry follows it
    INPUTS: str  # the inputs description: arguments and returned values
    URLS: Sequence[str]

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=self.DESCRIPTION,
            citation=self.CITATION + E2E_CITATION,
            inputs_description=self.INPUTS,
            features=features(),
            codebase_urls=list(self.URLS),
        )

    @abc.abstractmethod
    def _compute(self, predictions: list[str], references: list[list[str]], **kwargs: Any) -> dict:
        """Check the inputs and score the predictions against their references."""


class MtevalMetric(E2EMetric):
    """A corpus score of NIST mteval-v13a; the fields of :meth:`_score`'s result are the outputs."""

    URLS = (E2E_METRICS_URL,)

    @abc.abstractmethod
    def _score(self, stats: MtevalStats) -> Any:
        """The score (a dataclass) from the corpus statistics."""

    def _compute(self, predictions: list[str], references: list[list[str]], preserve_case: bool = False) -> dict:
        check_inputs(predictions, references)
        return dataclasses.asdict(self._score(corpus_stats(predictions, references, preserve_case)))


class CocoMetric(E2EMetric):
    """A metric of the MS-COCO caption evaluation, run on COCO-tokenized text.

    The result holds :meth:`_score`'s entries, then ``tokenizer`` (the tokenizer used)
    and, when "ptb" fell back to "simple", ``tokenizer_fallback_reason``.
    """

    URLS = (COCO_CAPTION_URL,)

    @abc.abstractmethod
    def _score(self, predictions: list[str], references: list[list[str]]) -> dict:
        """The metric's entries of the result, from tokenized predictions and references."""

    def _compute(self, predictions: list[str], references: list[list[str]], tokenizer: str = "ptb") -> dict:
        check_inputs(predictions, references)
        hyps, refs, used, fallback = coco_tokenize_pairs(predictions, references, tokenizer)
        result = {**self._score(hyps, refs), "tokenizer": used}
        if fallback is not None:
            result["tokenizer_fallback_reason"] = fallback
        return result
