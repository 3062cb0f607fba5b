"""ROUGE-L and CIDEr as defined by the MS-COCO caption evaluation code.

Both take captions that are already tokenized (see :mod:`._tokenize`) and, like the
COCO code, split them on spaces. Own implementations rather than ``pycocoevalcap``'s
classes: they are short, keep these two metrics usable when ``pycocoevalcap`` is not
installed, and the tests check them against ``pycocoevalcap`` to 1e-6 when it is.

Definitions kept from the COCO code, quirks included:

* ROUGE-L: per caption, precision and recall of the LCS against every reference; the
  *maximum* precision and the *maximum* recall (possibly from different references)
  give ``F = (1 + b^2) P R / (R + b^2 P)`` with ``b = 1.2``; the corpus score is the
  mean over captions. Splitting on a single space makes an empty caption one empty
  token, so an empty caption against an empty reference scores 1.
* CIDEr (the CIDEr-D variant the COCO code implements): n-grams 1..4 weighted by
  ``tf * (log(N) - log(max(1, df)))`` where ``df`` counts the captions whose reference
  set contains the n-gram and ``N`` is the number of captions; per order, the cosine of
  hypothesis and reference vectors with the hypothesis weights clipped at the
  reference weights, times ``exp(-delta^2 / (2 sigma^2))`` with ``sigma = 6``; averaged
  over orders and references and multiplied by 10. ``delta`` is the difference of the
  *bigram* counts (that is what the COCO code calls length). With a single caption
  every idf is 0, so the score is 0.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

from e2e_task.metrics._common import check_inputs


ROUGE_BETA = 1.2
CIDER_MAX_N = 4
CIDER_SIGMA = 6.0

NGram = tuple[str, ...]


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l_sentence(candidate: str, refs: Sequence[str], beta: float = ROUGE_BETA) -> float:
    """COCO ROUGE-L of one tokenized caption against its tokenized references."""
    if not refs:
        raise ValueError("ROUGE-L needs at least one reference per prediction")
    cand = candidate.split(" ")
    best_p = best_r = 0.0
    for ref in refs:
        ref_tokens = ref.split(" ")
        lcs = _lcs_length(ref_tokens, cand)
        best_p = max(best_p, lcs / len(cand))
        best_r = max(best_r, lcs / len(ref_tokens))
    if best_p == 0 or best_r == 0:
        return 0.0
    return (1 + beta**2) * best_p * best_r / (best_r + beta**2 * best_p)


def rouge_l(
    predictions: Sequence[str], references: Sequence[Sequence[str]]
) -> tuple[float, list[float]]:
    """Mean COCO ROUGE-L over captions, and the per-caption scores."""
    check_inputs(predictions, references)
    scores = [rouge_l_sentence(p, refs) for p, refs in zip(predictions, references, strict=True)]
    return sum(scores) / len(scores), scores


def _ngrams(sentence: str, max_n: int) -> Counter[NGram]:
    words = sentence.split()
    counts: Counter[NGram] = Counter()
    for n in range(1, max_n + 1):
        for i in range(len(words) - n + 1):
            counts[tuple(words[i : i + n])] += 1
    return counts


class _TfIdf:
    """Per-order tf-idf vectors of one caption, their norms and its bigram count."""

    def __init__(self, counts: Counter[NGram], df: Counter[NGram], log_n: float, max_n: int):
        self.vectors: list[dict[NGram, float]] = [{} for _ in range(max_n)]
        squares = [0.0] * max_n
        self.length = 0
        for ngram, tf in counts.items():
            order = len(ngram) - 1
            weight = tf * (log_n - math.log(max(1.0, df[ngram])))
            self.vectors[order][ngram] = weight
            squares[order] += weight * weight
            if order == 1:
                self.length += tf
        self.norms = [math.sqrt(s) for s in squares]


def _cider_similarity(hyp: _TfIdf, ref: _TfIdf, sigma: float) -> list[float]:
    penalty = math.exp(-((hyp.length - ref.length) ** 2) / (2 * sigma**2))
    values = []
    for order, vector in enumerate(hyp.vectors):
        ref_vector = ref.vectors[order]
        value = 0.0
        for ngram, weight in vector.items():
            ref_weight = ref_vector.get(ngram, 0.0)
            value += min(weight, ref_weight) * ref_weight
        if hyp.norms[order] != 0 and ref.norms[order] != 0:
            value /= hyp.norms[order] * ref.norms[order]
        values.append(value * penalty)
    return values


def cider(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    max_n: int = CIDER_MAX_N,
    sigma: float = CIDER_SIGMA,
) -> tuple[float, list[float]]:
    """Corpus CIDEr (mean over captions) and the per-caption scores."""
    check_inputs(predictions, references)
    ref_counts = [[_ngrams(r, max_n) for r in refs] for refs in references]
    df: Counter[NGram] = Counter()
    for counts in ref_counts:
        df.update(set().union(*counts))
    log_n = math.log(len(predictions))
    scores = []
    for prediction, counts in zip(predictions, ref_counts, strict=True):
        hyp = _TfIdf(_ngrams(prediction, max_n), df, log_n, max_n)
        total = [0.0] * max_n
        for ref_count in counts:
            sims = _cider_similarity(hyp, _TfIdf(ref_count, df, log_n, max_n), sigma)
            total = [t + s for t, s in zip(total, sims, strict=True)]
        scores.append(sum(total) / max_n / len(counts) * 10.0)
    return sum(scores) / len(scores), scores

