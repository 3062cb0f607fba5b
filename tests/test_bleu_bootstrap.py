"""Paired bootstrap of corpus BLEU over the mrs: resamples scored as the official corpus BLEU of the drawn segments."""

from __future__ import annotations

import numpy as np
import pytest

from e2e_task.bootstrap import bleu_intervals, resampled_bleu, segment_stats
from tests.test_metrics import MTEVAL_BLEU, PREDICTIONS, REFERENCES, _bleu


def _records(predictions: list[str], references: list[list[str]] = REFERENCES) -> list[dict]:
    return [{"mr": f"mr {i}", "prediction": p, "references": r}
            for i, (p, r) in enumerate(zip(predictions, references, strict=True))]


def test_each_resample_scores_as_the_corpus_of_the_drawn_segments():
    draws = np.array([[0, 1, 2, 3], [0, 0, 0, 0], [3, 1, 1, 2], [2, 3, 3, 3]])
    got = resampled_bleu(segment_stats(_records(PREDICTIONS)), draws)
    # The metric module (checked against mteval-v13a) on the drawn segments as a corpus of their own.
    expected = [_bleu([PREDICTIONS[i] for i in row], [REFERENCES[i] for i in row]) for row in draws]
    assert got.tolist() == pytest.approx(expected, rel=1e-12)
    assert got[0] == pytest.approx(MTEVAL_BLEU, abs=1e-12)  # the E2E challenge's scorer on the whole corpus


def test_a_system_better_on_every_mr_wins_every_resample_and_a_copy_ties():
    exact = [refs[0] for refs in REFERENCES]  # BLEU 1 on any draw
    out = bleu_intervals({"exact": _records(exact), "model": _records(PREDICTIONS), "copy": _records(exact)},
                         resamples=200, seed=3)
    assert out["bleu"]["exact"] == {"value": 1.0, "low": 1.0, "high": 1.0}
    model = out["bleu"]["model"]
    assert model["value"] == pytest.approx(MTEVAL_BLEU, abs=1e-12) and model["low"] < model["value"]
    assert model["value"] < model["high"] < 1.0
    versus = out["versus"]["model"]
    assert versus["first_higher"] == 1.0 and 0 < versus["low"] < versus["difference"] < versus["high"]
    assert versus["difference"] == pytest.approx(1 - MTEVAL_BLEU, abs=1e-12)
    assert out["versus"]["copy"] == {"difference": 0.0, "low": 0.0, "high": 0.0, "first_higher": 0.0}
    # The interval is the central 95 % of the model's 200 resampled scores (the same draws, seeded).
    draws = np.random.default_rng(3).integers(0, 4, size=(200, 4))
    scores = resampled_bleu(segment_stats(_records(PREDICTIONS)), draws)
    assert (model["low"], model["high"]) == tuple(np.percentile(scores, [2.5, 97.5]))


def test_systems_scored_on_other_mrs_are_refused_with_the_fix():
    other = _records(PREDICTIONS)[:3]
    with pytest.raises(ValueError, match="different mrs.*--max_generation_mrs"):
        bleu_intervals({"a": _records(PREDICTIONS), "b": other})
    with pytest.raises(ValueError, match="no generation records"):
        bleu_intervals({"a": []})
    with pytest.raises(ValueError, match="resamples must be >= 1"):
        bleu_intervals({"a": _records(PREDICTIONS)}, resamples=0)
