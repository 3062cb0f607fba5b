"""The time profile: exclusive time per part of a step, logged as time/* keys and summarised at the end."""

from __future__ import annotations

import time

import pytest
import torch

from hf_fsl_sage.timing import PARTS, StepTimer, per_step


def test_nested_sections_are_charged_their_exclusive_time(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr("hf_fsl_sage.timing.time.perf_counter", lambda: clock[0])
    timer = StepTimer()
    with timer("server_step"):
        clock[0] += 0.05
        with timer("align"):
            clock[0] += 0.1
        clock[0] += 0.01
    with timer("align"):
        clock[0] += 0.02
    window = timer.pop()
    assert window["server_step"] == pytest.approx(0.06) and window["align"] == pytest.approx(0.12)
    assert set(PARTS) <= window.keys() and window["client_forward"] == 0.0
    assert timer.pop()["align"] == 0.0 and timer.totals()["align"] == window["align"]  # pop starts a new window
    assert per_step({"align": 0.3}, 4) == {"time/align": 0.075}


@pytest.mark.parametrize("algorithm", ["fsl_sage", "splitfed_v2"])
def test_trainer_logs_the_profile_at_each_logging_step_and_in_the_train_metrics(tmp_path, algorithm):
    from tests.test_algorithms import make_trainer

    trainer = make_trainer(tmp_path, algorithm)
    spent = []  # wall time of each training step, measured around it
    step = trainer.training_step

    def timed_step(*args, **kwargs):
        started = time.perf_counter()
        try:
            return step(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - started)

    trainer.training_step = timed_step
    metrics = trainer.train().metrics
    logged = [h for h in trainer.state.log_history if "loss" in h and "time/server_step" in h]
    assert [h["step"] for h in logged] == [5, 10]
    keys = {f"time/{k}" for k in (*PARTS, "other")}
    assert keys <= metrics.keys() and all(keys <= h.keys() for h in logged)
    # the two windows of 5 steps make up the whole run; the parts add up to the time spent in training steps
    for key in keys:
        assert metrics[key] == pytest.approx((logged[0][key] + logged[1][key]) / 2, abs=2e-6)
    assert len(spent) == 10 and sum(metrics[k] for k in keys) * 10 == pytest.approx(sum(spent), rel=0.02)
    ran = {"client_forward", "client_backward_step", "client_receive", "server_step", "transport_encode",
           "transport_wait"}  # FSL-SAGE's clients receive aligned auxiliary models
    ran |= {"aux_forward", "align", "heldout_cosine"} if algorithm == "fsl_sage" else set()
    assert all(metrics[f"time/{k}"] > 0 for k in ran)
    assert all(metrics[f"time/{k}"] == 0 for k in set(PARTS) - ran)


def test_a_gpu_section_waits_for_its_own_stream_not_the_whole_device(monkeypatch):
    """NCCL transfers run on streams of their own; one given up on must not hold up the timer (a device-wide
    ``torch.cuda.synchronize`` would wait for it forever)."""
    synced = []

    class Stream:
        def synchronize(self):
            synced.append("stream")

    monkeypatch.setattr("torch.cuda.current_stream", lambda device=None: Stream())
    monkeypatch.setattr("torch.cuda.synchronize", lambda device=None: synced.append("device"))
    timer = StepTimer(torch.device("cuda", 1))
    with timer("server_step"):
        pass
    assert synced == ["stream", "stream"]
