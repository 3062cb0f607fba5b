"""How far a BLEU score, and a BLEU difference, can be trusted: paired bootstrap resampling over the meaning
representations (Koehn, "Statistical significance tests for machine translation evaluation", EMNLP 2004).

A test split of a few dozen ``mr``\\ s gives a corpus BLEU that moves by several points when other ``mr``\\ s are
drawn. Resampling the ``mr``\\ s with replacement, the same draw for every system, and scoring each draw with the
official corpus BLEU (:func:`e2e_task.metrics._mteval.bleu_from_stats` on the summed statistics of the drawn
segments) gives each system's interval and, paired, the interval of each difference and how often one system wins.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .metrics._mteval import MtevalStats, bleu_from_stats, corpus_stats


__all__ = ["segment_stats", "resampled_bleu", "bleu_intervals"]


def segment_stats(records: Sequence[Mapping[str, Any]]) -> list[MtevalStats]:
    """mteval's statistics of each record (``prediction`` against its ``references``) on its own: summed over the
    records they give the corpus BLEU of them all (BLEU reads only additive counts)."""
    return [corpus_stats([r["prediction"]], [r["references"]]) for r in records]


def _bleu_of(stats: Sequence[MtevalStats], counts: np.ndarray) -> float:
    """Corpus BLEU of the segments taken ``counts[i]`` times each."""
    total = MtevalStats(
        ref_length=int(sum(c * s.ref_length for c, s in zip(counts, stats))),
        matches=[int(sum(c * s.matches[n] for c, s in zip(counts, stats))) for n in range(len(stats[0].matches))],
        hyp_ngrams=[int(sum(c * s.hyp_ngrams[n] for c, s in zip(counts, stats)))
                    for n in range(len(stats[0].hyp_ngrams))])
    return bleu_from_stats(total).bleu


def resampled_bleu(stats: Sequence[MtevalStats], draws: np.ndarray) -> np.ndarray:
    """The corpus BLEU of each row of ``draws`` (segment indices, one resample per row)."""
    counts = np.stack([np.bincount(row, minlength=len(stats)) for row in draws])
    return np.array([_bleu_of(stats, c) for c in counts])


def bleu_intervals(systems: Mapping[str, Sequence[Mapping[str, Any]]], resamples: int = 1000, seed: int = 0,
                   confidence: float = 0.95) -> dict[str, Any]:
    """Paired bootstrap of corpus BLEU over the ``mr``\\ s that ``systems`` (name -> generation records with ``mr``,
    ``prediction`` and ``references``, as :func:`e2e_task.evaluation.evaluate_e2e_generation` returns them) share.

    Returns ``bleu`` (per system: its BLEU on every ``mr`` and the central ``confidence`` interval over the
    resamples) and ``versus`` (for each system after the first: the first's BLEU minus its, the interval of that
    difference over the same resamples, and the share of resamples where the first scores higher).
    """
    if not systems:
        raise ValueError("bleu_intervals needs at least one system's generation records")
    if resamples < 1 or not 0 < confidence < 1:
        raise ValueError(f"resamples must be >= 1 and confidence in (0, 1), got {resamples} and {confidence}")
    names = list(systems)
    mrs = [r["mr"] for r in systems[names[0]]]
    if not mrs:
        raise ValueError(f"system {names[0]!r} has no generation records")
    for name in names[1:]:
        other = [r["mr"] for r in systems[name]]
        if other != mrs:
            raise ValueError(f"systems {names[0]!r} and {name!r} were scored on different mrs ({len(mrs)} and "
                             f"{len(other)} records, not the same in the same order): generate for the same test "
                             "split with the same --max_generation_mrs")
    draws = np.random.default_rng(seed).integers(0, len(mrs), size=(resamples, len(mrs)))
    tail = 100 * (1 - confidence) / 2
    bleu, samples = {}, {}
    for name in names:
        stats = segment_stats(systems[name])
        samples[name] = resampled_bleu(stats, draws)
        low, high = np.percentile(samples[name], [tail, 100 - tail])
        bleu[name] = {"value": _bleu_of(stats, np.ones(len(stats), dtype=int)), "low": float(low),
                      "high": float(high)}
    first = names[0]
    versus = {}
    for name in names[1:]:
        diff = samples[first] - samples[name]
        low, high = np.percentile(diff, [tail, 100 - tail])
        versus[name] = {"difference": bleu[first]["value"] - bleu[name]["value"], "low": float(low),
                        "high": float(high), "first_higher": float(np.mean(diff > 0))}
    return {"mrs": len(mrs), "resamples": resamples, "seed": seed, "confidence": confidence, "first": first,
            "bleu": bleu, "versus": versus}
