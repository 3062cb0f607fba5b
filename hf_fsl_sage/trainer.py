"""FSLSageTrainer: federated split learning as a transformers Trainer."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import datasets
import torch
from torch import nn
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    get_scheduler,
)
from transformers.modeling_outputs import CausalLMOutput
from transformers.utils import logging

from .algorithms.registry import get as get_algorithm
from .config import FSLSageConfig
from .federation.data import (
    check_token_rows,
    learned_positions,
    prepare_dataset,
    split_lm_collator,
    text_max_length,
)
from .federation.federation import Federation, Party
from .federation.guard import Guard
from .federation.partition import partition
from .federation.roles import RoleOptimizers, RoleSchedulers
from .federation.schedule import GlobalStepDataset, RoundSchedule, steps_per_epoch
from .integrations.callbacks import ClientEpochs, CommBudgetStop
from .integrations.checkpointing import CheckpointingMixin
from .splitting.materialise import load_pretrained, load_tokenizer, release_unneeded
from .splitting.split import split_causal_lm
from .timing import TIME_NAMES, StepTimer, per_step, time_vector
from .transport.base import Transport
from .transport.codecs import ActivationCoder
from .transport.defences import ActivationDefence
from .transport.distributed import DistributedTransport
from .transport.groups import ProcessGroups
from .transport.local import LocalTransport
from .transport.membership import Membership
from .transport.placement import Placement
from .transport.waiting import share_error, share_json


if TYPE_CHECKING:
    from peft import PeftConfig

logger = logging.get_logger(__name__)


class FSLSageTrainer(CheckpointingMixin, Trainer):
    """Train a causal LM with federated split learning (FSL-SAGE by default) through the Trainer API.

    Args:
        model: a causal LM, a ``peft.PeftModel``, or a Hub id / local path loaded with
            ``AutoModelForCausalLM.from_pretrained``.
        args: an :class:`FSLSageConfig`.
        data_collator: defaults to right-padding with -100 labels (:func:`~hf_fsl_sage.split_lm_collator`).
        train_dataset: ``datasets.Dataset`` with ``input_ids`` (optionally ``attention_mask`` and ``labels``,
            -100 where there is no loss), or a ``text`` column tokenized with ``processing_class`` and truncated
            to the model's positions.
        eval_dataset: the same, or a dict of them.
        processing_class: the tokenizer (loaded from ``model`` when it is a string and this is None).
        peft_config: a ``peft`` config applied to the whole model before it is split.
        callbacks: Trainer callbacks.
        model_init_kwargs: keyword arguments for ``from_pretrained`` when ``model`` is a string;
            ``{"dtype": torch.bfloat16}`` keeps the frozen base in bf16 while LoRA adapters and their
            optimizer states stay fp32 (PEFT's default), and smashed activations travel in bf16.
        transport: what carries the messages between the parties when it is neither this process nor the
            ``accelerate launch`` process group: the Flower apps of :mod:`hf_fsl_sage.flower` pass one, which
            places the clients (``place(num_clients, client_ranks)``); leave it None otherwise.

    Under ``accelerate launch`` a process that holds clients but not the server materialises only the
    embedding stage, blocks ``[0, cut_layer)`` and the server blocks its auxiliary models copy; the rest of
    the model stays on the ``meta`` device. Given a Hub id or a directory it reads only those tensors
    (:func:`~hf_fsl_sage.splitting.materialise.load_for_clients`); given a model, it frees the rest.
    Evaluation, saving and ``push_to_hub`` run on the server's process, which holds the whole global model.
    """

    def __init__(
        self,
        model: str | PreTrainedModel | nn.Module,
        args: FSLSageConfig | None = None,
        data_collator: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None,
        train_dataset: datasets.Dataset | None = None,
        eval_dataset: datasets.Dataset | dict[str, datasets.Dataset] | None = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        peft_config: PeftConfig | None = None,
        callbacks: list[TrainerCallback] | None = None,
        model_init_kwargs: dict[str, Any] | None = None,
        transport: Transport | None = None,
    ):
        # Args
        if args is None:
            args = FSLSageConfig(output_dir="fsl_sage_output")
        if not isinstance(args, FSLSageConfig):
            raise TypeError(f"args must be an FSLSageConfig, got {type(args).__name__}; "
                            "build one with FSLSageConfig(...).")

        # Placement: a process that holds clients but not the server needs only part of the model
        if transport is not None:  # it knows which process this is (a Flower app's transport)
            placement = transport.place(args.num_clients, args.client_ranks)
        else:
            placement = Placement.build(args.process_index, args.world_size, args.num_clients, args.client_ranks)
        algorithm_cls = get_algorithm(args.algorithm)
        server_blocks = None if placement.is_server else algorithm_cls.server_blocks_on_clients(args)
        # Labels and defences concern what crosses the wire during a round (not FedAvg's: nothing does)
        private_labels = args.private_labels and algorithm_cls.sends_activations
        keep_head = private_labels  # the client's process then holds the final norm and LM head

        # Model
        if isinstance(model, str):
            model_id = model
            model = load_pretrained(model_id, args.cut_layer, server_blocks, keep_head=keep_head,
                                    **(model_init_kwargs or {}))
            if processing_class is None:
                processing_class = load_tokenizer(model_id)
        if peft_config is not None and hasattr(model, "peft_config"):
            raise ValueError("model is already a PeftModel (it carries adapters) and peft_config is given too: pass "
                             "the base model with peft_config, or the PeftModel without peft_config.")
        if not isinstance(model.get_base_model() if hasattr(model, "get_base_model") else model, PreTrainedModel):
            raise TypeError(f"model must be a model id or a transformers causal LM (PreTrainedModel), got "
                            f"{type(model).__name__}: load it with AutoModelForCausalLM.from_pretrained(...) or "
                            ".from_config(...) and pass LoRA settings as peft_config.")
        half = sorted({n.rsplit(".", 1)[0] for n, t in [*model.named_parameters(), *model.named_buffers()]
                       if t.dtype == torch.float16})
        if half:
            raise ValueError(f"the model holds float16 weights ({', '.join(half[:2])}{', ...' * (len(half) > 2)}), "
                             "which are not supported: gradients through them underflow without a loss scaler, and "
                             "each party steps its own optimizer without one. Load the model in bfloat16 "
                             "(model_init_kwargs={'dtype': torch.bfloat16}, or model.to(torch.bfloat16)) or float32.")
        if processing_class is not None and getattr(processing_class, "pad_token", "") is None:
            processing_class.pad_token = processing_class.eos_token

        # PEFT
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        if server_blocks is not None:  # an instantiated model: free what this process does not hold
            release_unneeded(model, args.cut_layer, server_blocks, keep_head=keep_head)

        # Data: the client partition is computed on the dataset as given (it may need a text column)
        if train_dataset is None:
            raise ValueError("FSLSageTrainer needs a train_dataset (its rows are partitioned among the clients).")
        if len(train_dataset) == 0:
            raise ValueError("train_dataset is empty: give it at least one row per client.")
        parts = partition(train_dataset, args.num_clients, args.partition, args.seed, args.dirichlet_alpha,
                          args.partition_column)
        vocab, positions = model.get_input_embeddings().num_embeddings, learned_positions(model)
        text_length = text_max_length(model, processing_class)  # a text column is truncated to the model's positions
        train_dataset = prepare_dataset(train_dataset, processing_class, "train_dataset", text_length)
        if isinstance(eval_dataset, dict):
            eval_dataset = {k: prepare_dataset(v, processing_class, f"eval_dataset[{k!r}]", text_length)
                            for k, v in eval_dataset.items()}
        elif eval_dataset is not None:
            eval_dataset = prepare_dataset(eval_dataset, processing_class, "eval_dataset", text_length)
        check_token_rows(train_dataset, "train_dataset", vocab, positions)
        for key, ds in (eval_dataset.items() if isinstance(eval_dataset, dict) else [("", eval_dataset)]):
            if ds is not None:
                check_token_rows(ds, f"eval_dataset[{key!r}]" if key else "eval_dataset", vocab, positions,
                                 need_labels=False)
        if data_collator is None:
            if processing_class is None:
                raise ValueError("Pass processing_class (the tokenizer) or a data_collator to pad batches.")
            data_collator = split_lm_collator(processing_class)
        epoch_steps = steps_per_epoch([len(p) for p in parts], args.participants_per_round,
                                      args.per_device_train_batch_size)
        if args.max_steps <= 0:
            args.max_steps = math.ceil(args.num_train_epochs * epoch_steps)

        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, callbacks=callbacks)
        self.label_smoother = None  # training losses apply args.label_smoothing_factor themselves

        # Split and roles
        self.split = split_causal_lm(self.model, args.cut_layer, private_labels=private_labels)
        self.schedule = RoundSchedule(parts, args.participants_per_round, args.local_steps,
                                      args.per_device_train_batch_size, args.max_steps, args.seed)
        self.placement = placement
        #: Which processes are still in the run (several processes with client_failures="drop"; else None).
        self.membership = None
        if transport is not None:
            logger.info(f"Federated split placement: {self.placement.describe()}")
        elif self.placement.is_distributed:
            if torch.distributed.get_backend() == "gloo":  # the deadline Trainer gives NCCL's group, on CPUs too
                torch.distributed.distributed_c10d._set_pg_timeout(args.ddp_timeout_delta)
            # Control traffic on a gloo group, tensors on the launch's backend (NCCL on GPUs): see transport.groups
            groups = ProcessGroups(args.device, args.ddp_timeout_delta)
            groups.form()
            if args.client_failures == "drop":
                self.membership = Membership(self.placement.rank, self.placement.world_size, args.ddp_timeout_delta,
                                             groups=groups)
            transport = DistributedTransport(self.placement, args.device, args.ddp_timeout_delta, self.membership,
                                             groups)
            logger.info(f"Federated split placement: {self.placement.describe()}")
        else:
            transport = LocalTransport()
        # Activations cross the wire encoded; the receiver checks and decodes them to the model's dtype.
        #: Whether the processes share a torch.distributed process group (``accelerate launch``) for collectives.
        self._collectives = isinstance(transport, DistributedTransport)
        transport.coder = ActivationCoder(args.smashed_codec, dtype=next(self.split.server.parameters()).dtype,
                                          hidden_size=self.split.cut_width, vocab_size=vocab,
                                          hidden_shape=self.split.cut_shape, carried=self.split.carried_shapes,
                                          labels_on_client=private_labels, head_shape=self.split.head_shape)
        defence = ActivationDefence(args.smashed_clip_norm, args.smashed_noise_multiplier, args.embedding_dx_epsilon)
        transport.timer = StepTimer(args.device)
        self._timed_steps = [0, 0]  # global steps timed since the last log, and in all
        self.federation = Federation(self.split, [len(p) for p in parts], transport, self._make_optimizer,
                                     self.placement, seed=args.seed, max_grad_norm=args.max_grad_norm,
                                     label_smoothing=args.label_smoothing_factor,
                                     loss_chunk_tokens=args.loss_chunk_tokens,
                                     batch_size=args.per_device_train_batch_size,
                                     guard=Guard(args.nonfinite, args.client_failures),
                                     failure_rate=args.simulate_client_failures,
                                     defence=defence if algorithm_cls.sends_activations else None)
        self.algorithm = algorithm_cls.from_config(args, self.federation)
        self._round_metrics: dict[str, float] = {}
        #: What this process's parties reported in the last global step, by client.
        self.step_results: dict[int, dict[str, float]] = {}
        self._server_losses: list[float] = []
        self._guard_seen = [0, 0]  # this process's guard counts at the last log_sums()
        self._guard_counts = [0, 0]  # skipped updates and dropped clients of every process, as logged
        #: Bytes on the wire at the end of the global step that reached ``max_comm_bytes`` (None until then).
        self.comm_budget_reached: int | None = None
        if args.max_comm_bytes is not None:
            self.add_callback(CommBudgetStop(self))
        self.add_callback(ClientEpochs(epoch_steps))

    # ------------------------------------------------------------ optimizers
    def _make_optimizer(self, module: nn.Module, lr: float | None):
        """AdamW (per ``args``) over ``module``'s trainable parameters and its schedule.

        With ``lr`` given, the optimizer runs at that fixed rate and no schedule is returned: building one
        would set the rate to the warm-up's starting value (0) even if it is never stepped.
        """
        decay = set(self.get_decay_parameter_names(module))
        params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in params if n in decay], "weight_decay": self.args.weight_decay},
            {"params": [p for n, p in params if n not in decay], "weight_decay": 0.0},
        ]
        optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args)
        if lr is not None:
            kwargs = {**kwargs, "lr": lr}
        optimizer = optimizer_cls([g for g in groups if g["params"]], **kwargs)
        if lr is not None:
            return optimizer, None
        scheduler = get_scheduler(self.args.lr_scheduler_type, optimizer,
                                  num_warmup_steps=self.args.get_warmup_steps(self.args.max_steps),
                                  num_training_steps=self.args.max_steps,
                                  scheduler_specific_kwargs=self.args.lr_scheduler_kwargs)
        return optimizer, scheduler

    def parties(self) -> dict[str, Party]:
        """Every party this process steps: the federation's (server, clients) and the algorithm's own."""
        return {**self.federation.parties(), **self.algorithm.parties()}

    def create_optimizer(self, model=None):
        self.optimizer = RoleOptimizers(self.parties())
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        self.lr_scheduler = RoleSchedulers(self.parties())
        return self.lr_scheduler

    # ------------------------------------------------------------ training
    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        steps = GlobalStepDataset(self.schedule, self.train_dataset, self.data_collator)
        # Batches of one step with a batch sampler, so that resuming skips steps by index without building them.
        return torch.utils.data.DataLoader(steps, batch_size=1, shuffle=False, collate_fn=_only_item,
                                           num_workers=self.args.dataloader_num_workers)

    def _move_model_to_device(self, model: nn.Module, device: torch.device) -> None:
        if device.type == "cpu":  # a CPU process under torch.distributed has "cpu:0", to which .to() copies
            device = torch.device("cpu")
        if any(p.is_meta for p in model.parameters()):  # a client's process: move the parts it holds
            model._apply(lambda t: t if t.is_meta else t.to(device))
            return
        super()._move_model_to_device(model, device)

    def _wrap_model(self, model: nn.Module, training: bool = True, dataloader=None) -> nn.Module:
        if self.placement.is_distributed and training:
            # No DistributedDataParallel: the processes hold different parties and exchange messages instead.
            # Handing Trainer another module than ``self.model`` keeps ``accelerator.prepare`` from wrapping it.
            return self.split
        return super()._wrap_model(model, training, dataloader)

    def training_step(self, model, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        """One global step: one local step on every participant, in ascending client order.

        Returns this process's share of the mean client loss: Trainer averages the value over processes.
        """
        round_index, local = inputs["round"], inputs["local_step"]
        participants = list(inputs["clients"])
        self.federation.transport.context = f"round {round_index}, global step {inputs['step']}"
        self._timed_steps = [n + 1 for n in self._timed_steps]
        with self.federation.timer("other"):  # what the timed parts of the step leave
            return self._global_step(inputs, round_index, local, participants)

    def _global_step(self, inputs: dict[str, Any], round_index: int, local: int, participants: list[int]):
        if local == 0:
            self.federation.guard.new_round()
            self._round_metrics.update(self.algorithm.begin_round(round_index, participants))
        self.algorithm.train()
        self.step_results = {}
        with self.accelerator.autocast():
            for c in participants:
                held = self.placement.holds_client(c)
                batch = self._prepare_inputs(inputs["clients"][c]) if held else None
                self.step_results[c] = self.algorithm.local_step(c, batch, round_index, local)
        if inputs["round_end"]:
            self._round_metrics.update(self.algorithm.end_round(round_index, participants))
            if any(k.startswith("align_") for k in self._round_metrics):
                self.log({"round": round_index, **self._pop_align_metrics()})
        elsewhere = self.federation.transport.step_done(inputs["step"])  # what other processes computed
        losses = []
        for c in participants:
            result = {**elsewhere.get(c, {}), **self.step_results[c]}
            if result.get("loss") is not None:
                losses.append(result["loss"])
            if result.get("server_loss") is not None:
                self._server_losses.append(result["server_loss"])
        processes = self.args.world_size  # Trainer averages the returned loss over its processes
        if self.membership is not None:  # before any collective: the processes agree on who is left
            self._sync_membership(inputs["step"])
            processes = len(self.membership.members)
        if self.args.max_comm_bytes is not None:
            self._check_comm_budget()
        return torch.tensor(sum(losses) * processes / len(participants), device=self.args.device)

    def _sync_membership(self, step: int) -> None:
        """End of a global step with ``client_failures="drop"``: learn which processes left the run (the server's
        process saw their messages fail or time out) and drop their clients from every later round."""
        for rank in self.membership.sync(step, self.federation.transport.context):
            clients = self.placement.clients_of(rank)
            self.federation.guard.lose(clients, count=self.placement.is_server)
            if self.placement.is_server:
                logger.warning(f"Going on without process {rank} and its clients {clients} from "
                               f"{self.federation.transport.context}; they stay out until the run is restarted. "
                               f"Why: {self.membership.lost[rank]}")

    def _check_comm_budget(self) -> None:
        """Whether this global step reached ``max_comm_bytes``, decided the same on every process.

        Only the server's process counts bytes, so under several processes it broadcasts its total
        (one int64 per global step, only when a budget is set).
        """
        total = self.federation.transport.ledger.total
        if self._collectives:
            total = int(self.federation.transport.broadcast(torch.tensor([total], dtype=torch.int64))[0])
        if total >= self.args.max_comm_bytes:
            self.comm_budget_reached = total

    def _pop_align_metrics(self) -> dict[str, float]:
        keys = [k for k in self._round_metrics if k.startswith("align_")]
        return {k: self._round_metrics.pop(k) for k in keys}

    def _clip_grad_norm(self, model):
        return None  # each party clips its own gradients when it steps

    def _get_grad_norm(self, model, grad_norm=None):
        return grad_norm

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        return 0

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "train_loss" in logs:
            logs.update(self.federation.transport.ledger.metrics())
            logs.update(self._time_metrics(self.federation.timer.totals(), self._timed_steps[1], "time_total"))
        elif "loss" in logs and "eval_loss" not in logs:
            names, sums = self.log_sums()
            means = dict.fromkeys(names[:-2])
            sums = self.federation.transport.sum_over_processes("log", sums)  # the same means on every process
            for i, name in enumerate(means):
                total, count = float(sums[2 * i]), int(sums[2 * i + 1])
                if count:
                    logs[name] = round(total / count, 4)
            self._guard_counts = [a + int(b) for a, b in zip(self._guard_counts, sums[-2:])]  # since the run began
            if self.args.nonfinite == "skip":
                logs["skipped_updates"] = self._guard_counts[0]
            if self.args.client_failures == "drop":
                logs["dropped_clients"] = self._guard_counts[1]
            logs["round"] = self.schedule.position(max(self.state.global_step - 1, 0))[0]
            logs.update(self.federation.transport.ledger.metrics())
            logs.update(self._time_metrics(self.federation.timer.pop(), self._timed_steps[0]))
            self._timed_steps[0] = 0
            logs = {k: v for k, v in logs.items() if v is not None}
        super().log(logs, start_time)

    def log_sums(self) -> tuple[list[str], torch.Tensor]:
        """What this process adds to the logged means since the last call: ``(names, values)``, a ``(sum, count)``
        pair per mean (``server_loss`` and the algorithm's), then how many ``skipped_updates`` and
        ``dropped_clients`` the guard counted. Every process of a run has the same names."""
        guard = self.federation.guard
        means = {"server_loss": (sum(self._server_losses), len(self._server_losses)), **self.algorithm.log_sums()}
        self._server_losses = []
        counts = [guard.skipped_updates, guard.dropped_clients]
        new = [now - before for now, before in zip(counts, self._guard_seen)]
        self._guard_seen = counts
        values = [v for pair in means.values() for v in pair] + new
        return [*means, "skipped_updates", "dropped_clients"], torch.tensor(values, dtype=torch.float64)

    def _time_metrics(self, seconds: dict[str, float], steps: int, window: str = "time") -> dict[str, float]:
        """``time/<part>`` in seconds per global step, summed over the processes (each times its parties);
        ``window``: ``"time"`` (since the last log) or ``"time_total"``."""
        values = time_vector(seconds)
        values = self.federation.transport.sum_over_processes(window, values)  # every process logs at these steps
        return per_step(dict(zip(TIME_NAMES, values.tolist())), steps)

    # ------------------------------------------------------------ evaluation
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Evaluate the global model; with several processes, on the server's (main) process only.

        The other processes receive the metrics, so callbacks that act on them (early stopping, best-model
        saving) decide the same everywhere. They wait for them without a deadline
        (:func:`~hf_fsl_sage.transport.waiting.share_json`): evaluation, and generation in a callback, may take
        longer than ``ddp_timeout``.
        """
        if not self._collectives:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        metrics = None
        if self.placement.is_server:
            try:
                metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
            except BaseException as error:
                share_error(error, "evaluation of the global model")
                raise
        metrics = share_json(metrics, "evaluation of the global model")
        if not self.placement.is_server:
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def get_eval_dataloader(self, eval_dataset=None) -> torch.utils.data.DataLoader:
        if not self._collectives:
            return super().get_eval_dataloader(eval_dataset)
        if isinstance(eval_dataset, str):
            eval_dataset = self.eval_dataset[eval_dataset]
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        # Not sharded over processes: the server's process evaluates all of it.
        return torch.utils.data.DataLoader(dataset, batch_size=self.args.eval_batch_size,
                                           collate_fn=self.data_collator, num_workers=self.args.dataloader_num_workers,
                                           pin_memory=self.args.dataloader_pin_memory)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Loss of the global split model (aggregated client + server), plain cross-entropy."""
        loss = self.federation.global_loss(inputs)
        return (loss, CausalLMOutput(loss=loss)) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.accelerator.autocast():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def evaluation_loop(self, *args, **kwargs):
        if self._collectives:
            self.gather_function = _unchanged  # only this process evaluates: nothing to gather
        # Trainer's ``model.eval()`` reaches ``self.model`` only; the split halves evaluated here follow their own
        # mode, and without this dropout would stay on during evaluation.
        was_training = self.split.training
        self.algorithm.train(False)
        try:
            output = super().evaluation_loop(*args, **kwargs)
        finally:
            self.algorithm.train(was_training)
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        loss = output.metrics.get(f"{prefix}_loss")
        if loss is not None:
            output.metrics[f"{prefix}_perplexity"] = math.exp(min(loss, 700.0))
        return output


def _only_item(items: list[dict[str, Any]]) -> dict[str, Any]:
    return items[0]


def _unchanged(tensors):
    return tensors
