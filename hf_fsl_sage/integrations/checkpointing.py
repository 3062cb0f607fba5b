"""Saving and resuming for :class:`~hf_fsl_sage.trainer.FSLSageTrainer`: the Trainer hooks that write and read
the global model, the model card, and each process's share of a checkpoint (its parties, optimizers, schedules
and random state), all without pickle."""

from __future__ import annotations

import os
from typing import Any

from safetensors.torch import save_file
from transformers.utils import logging

from ..federation.checkpoint import (
    load_federation_state,
    load_lost_processes,
    load_rng_state,
    save_federation_state,
    save_lost_processes,
    save_rng_state,
    save_training_args,
    state_file,
)


logger = logging.get_logger(__name__)


class CheckpointingMixin:
    """Trainer hooks for saving and resuming a federated split run; mixed into ``FSLSageTrainer`` before
    ``Trainer``, whose methods these extend or replace."""

    def create_model_card(self, **kwargs: Any) -> None:
        """Write ``README.md`` in ``output_dir``: the card of :mod:`hf_fsl_sage.integrations.model_card`.

        ``push_to_hub(**kwargs)`` passes its keyword arguments here: besides Trainer's (``model_name``,
        ``finetuned_from``, ``dataset``, ``license``, ``language``, ``tags``), ``dataset_attribution`` (text)
        and ``metrics`` (a dict added to the last evaluation's) are understood.
        """
        if self.is_world_process_zero():
            from .model_card import write_model_card

            write_model_card(self, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the global model (a PEFT adapter, or a whole model without PEFT), its tokenizer, the auxiliary
        models (``aux/``), ``training_args.json`` and the FSL-SAGE model card (``README.md``) in ``output_dir``.

        Warns when an adapter names no base model (one built in memory), with how to reload it.
        """
        super().save_model(output_dir, _internal_call)
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        self.create_model_card(output_dir=output_dir)
        base = getattr(next(iter(getattr(self.model, "peft_config", {}).values()), None), "base_model_name_or_path",
                       "")
        if hasattr(self.model, "peft_config") and not base and not _internal_call:
            logger.warning(f"The adapter saved in {output_dir} names no base model (the base was built in memory), "
                           "so AutoPeftModelForCausalLM.from_pretrained cannot load it: save the base with "
                           "model.save_pretrained(path) and pass model=path to FSLSageTrainer, or load the adapter "
                           f"onto the same base with PeftModel.from_pretrained(base, {output_dir!r}).")

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir or self.args.output_dir
        if self.args.should_save and self.split.untied_after_training():
            self.split.untie_for_export()
        super()._save(output_dir, state_dict)
        if self.args.should_save:
            for name, state in self.algorithm.exported_states().items():
                path = os.path.join(output_dir, f"{name}.safetensors")
                os.makedirs(os.path.dirname(path), exist_ok=True)
                save_file({n: t.detach().contiguous() for n, t in state.items()}, path)
            save_training_args(self.args, output_dir)  # JSON in place of Trainer's pickled training_args.bin

    def process_state(self) -> dict[str, Any]:
        """This process's share of a checkpoint: its parties, optimizers and schedules."""
        return {"federation": self._federation_state(), "optimizers": self.optimizer.state_dict(),
                "schedulers": self.lr_scheduler.state_dict()}

    def load_process_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`process_state` returned."""
        self._load_federation_state(state["federation"])
        self.optimizer.load_state_dict(state["optimizers"])
        self.lr_scheduler.load_state_dict(state["schedulers"])

    def _federation_state(self) -> dict[str, Any]:
        return {**self.federation.state_dict(), "algorithm": self.algorithm.state_dict()}

    def _load_federation_state(self, state: dict[str, Any]) -> None:
        self.federation.load_state_dict(state)
        self.algorithm.load_state_dict(state["algorithm"])

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        # Each process saves the parties it holds, with their optimizers and schedules, without pickle (in place
        # of Trainer's optimizer.pt and scheduler.pt).
        state = self.process_state()
        save_federation_state(state, output_dir, self.placement)
        if not self.placement.is_distributed:
            return
        if self.membership is not None and self.membership.lost and self.placement.is_server:
            save_lost_processes(output_dir, self.membership.lost)
        if self._collectives:
            self.federation.transport.barrier()  # the checkpoint is whole before Trainer writes its state, rotates
        else:
            self.federation.transport.save_peers(output_dir)

    def _save_rng_state(self, output_dir: str) -> None:
        save_rng_state(output_dir, self.placement)  # in place of Trainer's pickled rng_state.pth

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if checkpoint is not None:
            load_rng_state(checkpoint, self.placement)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        rank = self.placement.rank
        if self.placement.is_distributed and not os.path.isfile(state_file(checkpoint, self.placement)):
            lost = load_lost_processes(checkpoint)
            if rank in lost:
                self._rejoin(lost[rank])
                return
        state = load_federation_state(checkpoint, self.placement, self.args.device)
        self.load_process_state(state)  # the federation first: it says what differs when the run does not match
        if not self._collectives:  # processes without a process group (Flower): their transport hands them theirs
            self.federation.transport.load_peers(checkpoint)

    def _rejoin(self, cause: str) -> None:
        """Resume a process that had left the run before the checkpoint, so it wrote no state: its clients sit
        out the rest of the checkpoint's round and start again from the global model at the next one, with
        new optimizer states on the run's learning-rate schedule."""
        clients = self.placement.clients_of(self.placement.rank)
        self.federation.guard.dropped |= set(clients)
        for _ in range(self.state.global_step):
            self.lr_scheduler.step()
        logger.warning(f"Process {self.placement.rank} had left the run before this checkpoint ({cause}). It "
                       f"rejoins: its clients {clients} train again from the next round, with new optimizer "
                       "states.")
