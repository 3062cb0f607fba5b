"""Corpus BLEU and NIST exactly as NIST ``mteval-v13a`` scores them.

This follows the variant used by the E2E NLG Challenge (``mteval-v13a-sig.pl`` run
with default options on SGML files): default "western" tokenization with ASCII-only
lowercasing, closest reference length for the BLEU brevity penalty (ties go to the
shorter reference, empty references are ignored), the ``1 / 2^k`` smoothing of BLEU
n-gram precisions that have no match, and NIST information weights estimated from all
references of the corpus.

The E2E scripts pad every instance to the largest number of references with empty
references, and their adapted mteval skips those pads: NIST's average reference length
is the total number of reference words divided by the *mean* number of non-empty
references per segment (unadapted mteval-v13a, which expects the same number of
references everywhere, divides by that number). :func:`corpus_stats` counts both.

sacrebleu is not used: it has no NIST, and its BLEU lowercases with Unicode rules.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field


BLEU_MAX_N = 4
NIST_MAX_N = 5

_WHITESPACE = re.compile(r"\s+")
# mteval's punctuation class: { | } ~ [ \ ] ^ _ ` space ! " # $ % & ( ) * + : ; < = > ? @ /
_PUNCT = re.compile(r"([{-~\[-` -&(-+:-@/])")
_PERIOD_COMMA_AFTER_NON_DIGIT = re.compile(r"([^0-9])([.,])")
_PERIOD_COMMA_BEFORE_NON_DIGIT = re.compile(r"([.,])([^0-9])")
_DASH_AFTER_DIGIT = re.compile(r"([0-9])(-)")
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")

_NIST_BETA = -math.log(0.5) / math.log(1.5) / math.log(1.5)


def normalize(text: str, preserve_case: bool = False) -> list[str]:
    """Tokenize ``text`` like mteval-v13a's default (non-international) tokenizer."""
    # The SGML reader joins all whitespace runs (including newlines) into one space
    # before the tokenizer sees the segment.
    text = _WHITESPACE.sub(" ", text)
    text = text.replace("<skipped>", "")
    text = text.replace("&quot;", '"').replace("&amp;", "&")
    text = text.replace("&lt;", "<").replace("&gt;", ">")
    text = f" {text} "
    if not preserve_case:
        text = text.translate(_ASCII_LOWER)  # Perl's tr/[A-Z]/[a-z]/ leaves non-ASCII alone
    text = _PUNCT.sub(r" \1 ", text)
    text = _PERIOD_COMMA_AFTER_NON_DIGIT.sub(r"\1 \2 ", text)
    text = _PERIOD_COMMA_BEFORE_NON_DIGIT.sub(r" \1 \2", text)
    text = _DASH_AFTER_DIGIT.sub(r"\1 \2 ", text)
    return text.split()


def _ngram_counts(words: Sequence[str], max_n: int) -> Counter[tuple[str, ...]]:
    counts: Counter[tuple[str, ...]] = Counter()
    for n in range(1, max_n + 1):
        for i in range(len(words) - n + 1):
            counts[tuple(words[i : i + n])] += 1
    return counts


def _closest_ref_length(current: int, ref_len: int, hyp_len: int) -> int:
    """mteval's ``brevity_penalty_closest`` step: keep the closer length, prefer shorter on ties."""
    if ref_len == 0:
        return current
    if abs(hyp_len - ref_len) < abs(hyp_len - current):
        return ref_len
    if abs(hyp_len - ref_len) == abs(hyp_len - current) and current > ref_len:
        return ref_len
    return current


def _information_weights(
    tokenized_refs: Sequence[Sequence[Sequence[str]]], max_n: int
) -> dict[tuple[str, ...], float]:
    counts: Counter[tuple[str, ...]] = Counter()
    total_words = 0
    for refs in tokenized_refs:
        for ref in refs:
            total_words += len(ref)
            counts.update(_ngram_counts(ref, max_n))
    info = {}
    for ngram, count in counts.items():
        prefix = " ".join(ngram[:-1])
        # mteval tests the prefix string for Perl truth, so a prefix that is the single
        # token "0" is treated like no prefix and divides by the total word count.
        denominator = total_words if prefix in ("", "0") else counts[ngram[:-1]]
        info[ngram] = -math.log(count / denominator) / math.log(2)
    return info


@dataclass
class MtevalStats:
    """Sufficient statistics accumulated over a corpus (index ``n - 1`` holds n-grams)."""

    ref_length: int = 0
    num_segments: int = 0
    num_refs: int = 0  # non-empty references (at least one token) over all segments
    matches: list[int] = field(default_factory=lambda: [0] * NIST_MAX_N)
    hyp_ngrams: list[int] = field(default_factory=lambda: [0] * NIST_MAX_N)
    ref_ngrams: list[int] = field(default_factory=lambda: [0] * NIST_MAX_N)
    matched_info: list[float] = field(default_factory=lambda: [0.0] * NIST_MAX_N)


def corpus_stats(
    predictions: Sequence[str], references: Sequence[Sequence[str]], preserve_case: bool = False
) -> MtevalStats:
    """Tokenize and accumulate mteval's per-segment statistics over the whole corpus."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    max_n = NIST_MAX_N
    hyps = [normalize(p, preserve_case) for p in predictions]
    refs = [[normalize(r, preserve_case) for r in rs] for rs in references]
    info = _information_weights(refs, max_n)
    stats = MtevalStats(num_segments=len(refs), num_refs=sum(1 for rs in refs for r in rs if r))
    for hyp, seg_refs in zip(hyps, refs, strict=True):
        hyp_counts = _ngram_counts(hyp, max_n)
        max_ref_counts: dict[tuple[str, ...], int] = {}
        seg_ref_length: int | None = None
        for ref in seg_refs:
            for ngram, count in _ngram_counts(ref, max_n).items():
                if count > max_ref_counts.get(ngram, 0):
                    max_ref_counts[ngram] = count
            for n in range(1, max_n + 1):
                stats.ref_ngrams[n - 1] += max(len(ref) - n + 1, 0)
            if seg_ref_length is None:
                seg_ref_length = len(ref)
            else:
                seg_ref_length = _closest_ref_length(seg_ref_length, len(ref), len(hyp))
        stats.ref_length += seg_ref_length or 0
        for n in range(1, max_n + 1):
            stats.hyp_ngrams[n - 1] += max(len(hyp) - n + 1, 0)
        for ngram, count in hyp_counts.items():
            clipped = min(count, max_ref_counts.get(ngram, 0))
            if clipped:
                stats.matches[len(ngram) - 1] += clipped
                stats.matched_info[len(ngram) - 1] += info[ngram] * clipped
    return stats


@dataclass
class BleuResult:
    """Corpus BLEU with mteval's (smoothed) individual n-gram precisions."""

    bleu: float
    precisions: list[float]
    brevity_penalty: float
    hyp_length: int
    ref_length: int


def bleu_from_stats(stats: MtevalStats, max_n: int = BLEU_MAX_N) -> BleuResult:
    """BLEU as mteval-v13a's ``bleu_score`` (smoothed, geometric mean of 1..max_n)."""
    hyp_len = stats.hyp_ngrams[0]
    brevity = math.exp(min(0.0, 1.0 - stats.ref_length / hyp_len)) if hyp_len > 0 else 0.0
    log_sum = 0.0
    smooth = 1
    precisions = []
    for n in range(1, max_n + 1):
        hyp_count, match = stats.hyp_ngrams[n - 1], stats.matches[n - 1]
        if hyp_count == 0:
            log_p = 0.0
        elif match == 0:
            smooth *= 2
            log_p = math.log(1.0 / (smooth * hyp_count))
        else:
            log_p = math.log(match / hyp_count)
        precisions.append(math.exp(log_p))
        log_sum += log_p
    bleu = math.exp(log_sum / max_n) * brevity
    return BleuResult(bleu, precisions, brevity, hyp_len, stats.ref_length)


def nist_length_penalty(ratio: float) -> float:
    """NIST brevity penalty: 1 at or above the average reference length, 0.5 at ratio 2/3."""
    if ratio >= 1:
        return 1.0
    if ratio <= 0:
        return 0.0
    return math.exp(-_NIST_BETA * math.log(ratio) ** 2)


@dataclass
class NistResult:
    """Corpus NIST and its components."""

    nist: float
    info_per_order: list[float]
    brevity_penalty: float


def nist_from_stats(stats: MtevalStats, max_n: int = NIST_MAX_N) -> NistResult:
    """NIST as the E2E challenge's mteval-v13a scores it (cumulative over orders 1..max_n).

    The length penalty compares the predicted words with the average reference length: total reference
    words divided by the mean number of non-empty references per segment.
    """
    per_order = [stats.matched_info[n] / max(stats.hyp_ngrams[n], 1) for n in range(max_n)]
    ref_words = stats.ref_ngrams[0]
    if ref_words == 0 or stats.num_refs == 0:
        penalty = 0.0  # mteval divides by zero here; no reference words means no score
    else:
        mean_refs = stats.num_refs / stats.num_segments
        penalty = nist_length_penalty(stats.hyp_ngrams[0] / (ref_words / mean_refs))
    return NistResult(sum(per_order) * penalty, per_order, penalty)

