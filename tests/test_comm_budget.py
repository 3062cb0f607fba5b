"""max_comm_bytes: training stops at the end of the global step in which the ledger reaches the budget."""

from __future__ import annotations

import pytest
from transformers import TrainerCallback

from hf_fsl_sage import FSLSageConfig
from tests.helpers import lora, make_trainer
from tests.launches import EQUAL_GROUP, check, result, run_one, run_three


class LedgerPerStep(TrainerCallback):
    """Cumulative bytes at the end of every global step, as the reference the budgeted run is checked against."""

    def __init__(self):
        self.trainer, self.totals = None, [0]

    def on_step_end(self, args, state, control, **kwargs):
        self.totals.append(self.trainer.federation.transport.ledger.total)


def _run(tmp_path, budget, algorithm):
    trainer = make_trainer(tmp_path, peft_config=lora(), algorithm=algorithm, max_comm_bytes=budget, max_steps=8,
                           eval_strategy="steps", eval_steps=100)
    record = LedgerPerStep()
    record.trainer = trainer
    trainer.add_callback(record)
    trainer.train()
    return trainer, record.totals


@pytest.mark.parametrize("algorithm", ["fsl_sage", "splitfed_v2"])
def test_budget_stops_at_the_end_of_the_step_that_reaches_it(tmp_path, algorithm):
    _, totals = _run(tmp_path / "free", None, algorithm)
    assert len(totals) == 9 and totals[-1] > totals[1] > 0
    k = next(s for s in range(4, 9) if totals[s] > totals[s - 1])  # a step that sends something
    for budget in (totals[k], totals[k - 1] + 1):  # exactly the step's total; one byte over the step before
        trainer, seen = _run(tmp_path / str(budget), budget, algorithm)
        ledger = trainer.federation.transport.ledger.total
        assert trainer.state.global_step == k and seen == totals[: k + 1]
        # Over the budget by less than one step's traffic.
        assert ledger == totals[k] and 0 <= ledger - budget <= totals[k] - totals[k - 1]
        stop = [h for h in trainer.state.log_history if "comm_budget_stop_step" in h]
        assert stop == [{**stop[0], "comm_budget_stop_step": k, "comm_budget_bytes": totals[k]}]
        assert [h["step"] for h in trainer.state.log_history if "eval_loss" in h] == [k]  # evaluated at the stop


def test_budget_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match=r"max_comm_bytes=0 must be an integer > 0 \(bytes\), or None"):
        FSLSageConfig(output_dir=str(tmp_path), max_comm_bytes=0)


@pytest.mark.slow
@pytest.mark.xdist_group(EQUAL_GROUP)
def test_three_processes_stop_at_the_same_step_with_the_same_bytes(tmp_path, equal_runs):
    """Only the server's process counts bytes; the stop is still taken at the same step everywhere."""
    free = result(equal_runs / "one" / "fsl_sage")  # the same run without a budget
    per_step = {h["step"]: h["comm_bytes"] for h in free["log_history"] if "comm_bytes" in h and "loss" in h}
    budget = per_step[4] - 1  # logged every 2 steps: steps 2 and 4 are known; the stop must be step 4
    assert per_step[2] < budget and free["global_step"] == 8
    check(run_one(tmp_path / "one", "--algorithm", "fsl_sage", "--max_comm_bytes", str(budget)))
    check(run_three(tmp_path / "three", "--algorithm", "fsl_sage", "--max_comm_bytes", str(budget)))
    one, three = result(tmp_path / "one"), result(tmp_path / "three")
    assert one["global_step"] == three["global_step"] == 4
    assert one["ledger"] == three["ledger"] and one["ledger"]["up"] + one["ledger"]["down"] == per_step[4]
