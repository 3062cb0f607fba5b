"""Trainer callbacks of the federated run: the stop at a communication budget, and epochs that count the clients'
passes over their shares."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback
from transformers.trainer_utils import IntervalStrategy, SaveStrategy
from transformers.utils import logging


logger = logging.get_logger(__name__)


class CommBudgetStop(TrainerCallback):
    """Ends training after the global step in which the trainer found the ledger at ``max_comm_bytes``.

    The decision is taken inside ``training_step`` (where every process can agree on it); this callback turns
    it into Trainer's stop, evaluates and saves as Trainer does at ``max_steps``, and logs the bytes.
    """

    def __init__(self, trainer: Any):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        reached = self.trainer.comm_budget_reached
        if reached is None or control.should_training_stop:
            return control
        control.should_training_stop = True
        if args.eval_strategy == IntervalStrategy.STEPS and args.eval_delay <= state.global_step:
            control.should_evaluate = True
        if args.save_strategy == SaveStrategy.STEPS:
            control.should_save = True
        logger.info(f"Communication budget reached at global step {state.global_step}: {reached:,} bytes on the "
                    f"wire >= max_comm_bytes={args.max_comm_bytes:,}.")
        self.trainer.log({"comm_budget_stop_step": state.global_step, "comm_budget_bytes": reached})
        return control


class ClientEpochs(TrainerCallback):
    """Makes Trainer's ``epoch`` count passes of the clients over their shares (see
    :func:`hf_fsl_sage.federation.schedule.steps_per_epoch`), not passes over the global steps' index."""

    def __init__(self, steps_per_epoch: float):
        self.steps_per_epoch = steps_per_epoch

    def on_step_end(self, args, state, control, **kwargs):
        state.epoch = state.global_step / self.steps_per_epoch
        return control
