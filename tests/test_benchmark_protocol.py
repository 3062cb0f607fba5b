"""The benchmark's protocol: runs stop on their validation curve, byte costs are interpolated between the two
evaluations that bracket a target, and choices are made on validation while figures come from test."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, GPT2Config

from e2e_task.data import offline_gpt2_tokenizer, restricted_tokenizer


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import compare_algorithms  # noqa: E402
import curves  # noqa: E402
import e2e_runs  # noqa: E402


def point(nbytes: float, test: float, validation: float | None = None) -> dict:
    return {"bytes": nbytes, "test_loss": test, "validation_loss": test if validation is None else validation,
            "server_updates": 0, "client_steps": 0, "step": 0}


# ---------------------------------------------------------------- byte cost to a target
def test_bytes_to_target_is_interpolated_in_log_bytes_between_the_bracketing_evaluations():
    curve = [point(0, 3.0), point(1e6, 2.8), point(4e6, 2.6), point(16e6, 2.5), point(32e6, 2.52)]
    # 2.7 is half way from 2.8 (1 MB) to 2.6 (4 MB): half way on a log axis is the geometric mean, 2 MB.
    assert curves.crossing(curve, 2.7) == {"value": pytest.approx(2e6), "bracket": [1e6, 4e6]}
    # A quarter of the way from 2.6 (4 MB) to 2.5 (16 MB): 4 MB * 4 ** 0.25.
    assert curves.crossing(curve, 2.575)["value"] == pytest.approx(4e6 * 4 ** 0.25)
    assert curves.crossing(curve, 2.6) == {"value": pytest.approx(4e6), "bracket": [1e6, 4e6]}  # at or below
    # From the start (0 bytes) the interpolation is linear: 2.9 is half way to the first evaluation.
    assert curves.crossing(curve, 2.9) == {"value": pytest.approx(0.5e6), "bracket": [0, 1e6]}
    assert curves.crossing(curve, 3.1) == {"value": 0, "bracket": [0, 0]}
    assert curves.crossing(curve, 2.4) is None  # never reached
    # The first crossing counts, even if the curve goes back up later.
    assert curves.crossing([point(0, 3.0), point(1e6, 2.5), point(2e6, 2.9), point(4e6, 2.4)], 2.6)["bracket"] == [
        0, 1e6]


def test_targets_close_their_share_of_the_gap_and_budgets_read_the_last_evaluation_inside():
    assert curves.gap_targets(3.0, 2.0, (0.8, 0.95)) == {"0.8": pytest.approx(2.2), "0.95": pytest.approx(2.05)}
    assert curves.gap_closed(3.0, 2.0, 2.25) == pytest.approx(0.75)
    curve = [point(0, 3.0), point(1e6, 2.8), point(4e6, 2.6)]
    assert curves.value_at(curve, 3.9e6) == 2.8 and curves.value_at(curve, 4e6) == 2.6
    assert curves.span([1.0, None, 3.0]) == {"mean": 2.0, "min": 1.0, "max": 3.0, "n": 3, "missing": 1}


# ---------------------------------------------------------------- validation chooses, test reports
def test_tuning_picks_on_validation_and_reports_on_test():
    # "a" is best on validation, "b" on test: the choice must be "a", whatever the test losses are.
    a = [point(0, 3.0, 3.0), point(1e6, 2.9, 2.6), point(2e6, 2.95, 2.7)]
    b = [point(0, 3.0, 3.0), point(1e6, 2.2, 2.7), point(2e6, 2.1, 2.65)]
    assert curves.select({"a": a, "b": b}) == "a"
    no_test = {k: [{"validation_loss": p["validation_loss"]} for p in c] for k, c in {"a": a, "b": b}.items()}
    assert curves.select(no_test) == "a"  # the choice reads no test loss at all

    # The benchmark's own choice of a tuning run goes through the same function, on the stored runs.
    class Store:
        def __init__(self, rows):
            self.rows = rows

        def get(self, task):
            return self.rows[task]

    tasks = [("fsl_sage", "lora", "iid", 0, (("learning_rate", lr),)) for lr in (1e-3, 3e-3)]
    assert compare_algorithms.best_task(tasks, Store({tasks[0]: {"curve": b}, tasks[1]: {"curve": a}})) == tasks[1]

    # A run's reported figures are read off the test curve at the point its validation loss was lowest (the
    # second point of "b"'s curve is not its best validation point: the third is).
    summary = compare_algorithms.summarize({"curve": b, "stopped_by": "early stopping", "cpu_seconds": 1.0},
                                           base=3.0, reference=2.0, targets={"0.8": 2.2}, budgets=[1.5])
    assert summary["validation_loss"] == 2.65 and summary["test_loss"] == 2.1 and summary["bytes"] == 2e6
    assert summary["gap_closed"] == pytest.approx(0.9)
    assert summary["bytes_to_target"]["0.8"] == pytest.approx(1e6)  # test 2.2 reached at exactly 1 MB
    assert summary["loss_at_budget"] == {"1.5": 2.2}


# ---------------------------------------------------------------- the reference stops on its validation curve
@pytest.fixture(scope="module")
def tiny():
    train_text = ["the cat sat on the mat."] * 8
    other_text = ["a dog ran in the park today.", "birds sing at dawn near the river."] * 4
    tok = restricted_tokenizer(offline_gpt2_tokenizer(), train_text + other_text)
    tok.padding_side = "right"

    def rows(texts):
        ids = [tok(t)["input_ids"] + [tok.eos_token_id] for t in texts]
        return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids], "labels": ids})

    config = GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    return {"tokenizer": tok, "train": rows(train_text), "other": rows(other_text),
            "base": AutoModelForCausalLM.from_config(config)}


CFG = {"batch": 8, "warmup_steps": 0, "eval_client_steps": 5, "patience_client_steps": 10, "min_improvement": 0.0,
       "reference_min_improvement": 0.0, "max_client_steps": 60}


@pytest.mark.parametrize("validation", ["train", "other"])
def test_the_reference_stops_when_its_validation_loss_stops_improving(tiny, validation):
    data = {"tokenizer": tiny["tokenizer"], "train": tiny["train"], "validation": tiny[validation],
            "test": tiny["other"]}
    row = e2e_runs.centralized(CFG, tiny["base"], data, "full", 0, {"learning_rate": 1e-2})
    losses = [p["validation_loss"] for p in row["curve"]]
    assert [p["step"] for p in row["curve"]] == list(range(0, row["steps"] + 1, 5))
    if validation == "train":
        # Memorising the training rows: the validation loss falls at every evaluation, so no stop before the cap.
        assert all(b < a for a, b in zip(losses, losses[1:]))
        assert row["stopped_by"] == "step cap" and row["steps"] == 60
    else:
        # Other text: its loss turns up as the model memorises; the run stops 10 steps (2 evaluations) after its
        # best point, long before the cap.
        best = row["best"]
        assert row["stopped_by"] == "early stopping" and row["steps"] == best["step"] + 10 < 60
        assert best["validation_loss"] == min(losses) < losses[0]
        assert all(v >= best["validation_loss"] for v in losses[losses.index(min(losses)) + 1:])
    assert all(math.isfinite(p["test_loss"]) for p in row["curve"])


# ---------------------------------------------------------------- what a stored run depends on
def test_a_field_added_at_its_neutral_value_keeps_the_stored_runs(monkeypatch):
    """The FSL-SAGE runs in the committed runs file that read the library's defaults were stored before
    ``server_replay_steps`` existed: their stored fingerprints are still the ones the benchmark computes (so they are
    not rerun); with another default for it, none of them is."""
    if not e2e_runs.DEVSET.is_file():
        pytest.skip(f"the E2E development set is not at {e2e_runs.DEVSET} (the shared data folder beside the clone)")
    stored = []
    for line in (e2e_runs.ROOT / "benchmarks" / "results" / "e2e_runs.jsonl").read_text().splitlines():
        entry = json.loads(line)
        key = json.loads(entry.get("key", "[null]"))
        if key[0] == "fsl_sage" and not any(name == "align_epochs" for name, _ in key[4]):  # library defaults
            stored.append((entry["fingerprint"], (*key[:4], tuple(map(tuple, key[4])))))
    assert len(stored) >= 12  # the compare and schedule benchmarks' FSL-SAGE runs

    def computed(task):
        return e2e_runs.fingerprint(compare_algorithms.FULL, e2e_runs.DEVSET, task, True)

    assert [computed(task) for _, task in stored] == [fp for fp, _ in stored]
    monkeypatch.setattr(e2e_runs.FSLSageConfig, "server_replay_steps", 2)
    assert not any(computed(task) == fp for fp, task in stored)


def test_a_runs_fingerprint_follows_the_defaults_its_algorithm_reads_and_does_not_set(monkeypatch):
    """A library default reruns the runs that read it without setting it, and only those."""
    cfg, data = compare_algorithms.QUICK, Path(e2e_runs.E2E_SAMPLE_PATH)
    fsl_sage = ("fsl_sage", "lora", "iid", 0, (("learning_rate", 3e-3),))
    splitfed = ("splitfed_v2", "lora", "iid", 0, (("learning_rate", 3e-3),))
    before = {t[0]: e2e_runs.fingerprint(cfg, data, t, True) for t in (fsl_sage, splitfed)}
    assert "align_epochs" in cfg["fsl_sage"] and "align_learning_rate" not in cfg["fsl_sage"]
    monkeypatch.setattr(e2e_runs.FSLSageConfig, "align_epochs", 99)  # set by the preset: no rerun
    assert {t[0]: e2e_runs.fingerprint(cfg, data, t, True) for t in (fsl_sage, splitfed)} == before
    monkeypatch.setattr(e2e_runs.FSLSageConfig, "align_learning_rate", 1.0)  # read by FSL-SAGE only
    assert e2e_runs.fingerprint(cfg, data, fsl_sage, True) != before["fsl_sage"]
    assert e2e_runs.fingerprint(cfg, data, splitfed, True) == before["splitfed_v2"]
    monkeypatch.setattr(e2e_runs.FSLSageConfig, "loss_chunk_tokens", 7)  # read by every algorithm
    assert e2e_runs.fingerprint(cfg, data, splitfed, True) != before["splitfed_v2"]
    # Set by the task itself: not a default it depends on.
    local = ("fsl_sage", "lora", "iid", 0, (("learning_rate", 3e-3), ("align_learning_rate", 1e-3)))
    reference = e2e_runs.fingerprint(cfg, data, local, True)
    monkeypatch.setattr(e2e_runs.FSLSageConfig, "align_learning_rate", 2.0)
    assert e2e_runs.fingerprint(cfg, data, local, True) == reference
