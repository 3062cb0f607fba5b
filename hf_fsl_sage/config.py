"""FSLSageConfig: TrainingArguments plus the federated split learning parameters."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

from .algorithms.registry import available as available_algorithms
from .federation.partition import SCHEMES as PARTITIONS
from .transport.codecs import CODECS


AUX_INITS = ("server_blocks", "random")
AUX_TRAINABLE = ("adapters", "all")


class Registered:
    """The names in a registry as they are when read, for a field whose values can be registered after import:
    argparse (``HfArgumentParser``) shows them in ``--help`` and checks a value against them."""

    def __init__(self, names: Callable[[], Iterable[str]]):
        self._names = names

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._names()))

    def __len__(self) -> int:
        return len(list(self._names()))

    def __contains__(self, name: object) -> bool:
        return name in set(self._names())

    def __repr__(self) -> str:
        return repr(sorted(self._names()))


@dataclass
class FSLSageConfig(TrainingArguments):
    r"""
    Configuration of [`FSLSageTrainer`]: every [`~transformers.TrainingArguments`] field, plus the
    parameters below. Defaults follow the FSL-SAGE paper's GPT-2 medium / E2E set-up, except the alignment's size (see
    `align_epochs`).

    One Trainer *global step* is one local step on every participating client; a *round* is
    `local_steps` global steps and ends with the aggregation of the client models; `max_steps`
    counts global steps.

    Without a GPU (or with `use_cpu`), `dataloader_pin_memory` is turned off: there is nothing to pin memory for.

    Parameters:
        > Federation

        algorithm (`str`, defaults to `"fsl_sage"`):
            Training algorithm: one of the names registered in `hf_fsl_sage.algorithms`
            (`"fsl_sage"`, and the baselines registered there).
        num_clients (`int`, defaults to `10`):
            Number of clients the training set is partitioned over (>= 1).
        clients_per_round (`int` or `None`, defaults to `None`):
            Clients sampled (without replacement, reproducibly from `seed`) to take part in each
            round; `None` means all of them. Between 1 and `num_clients`.
        local_steps (`int`, defaults to `10`):
            Local steps per client per round (>= 1).
        partition (`str`, defaults to `"iid"`):
            How the training set is split among clients, once, from `seed`: `"iid"` (uniform
            random, sizes differ by at most one) or `"dirichlet"` (per group of `partition_column`,
            client shares drawn from Dirichlet(`dirichlet_alpha`)).
        dirichlet_alpha (`float`, defaults to `0.5`):
            Concentration of the Dirichlet partition (> 0); smaller is more skewed.
        partition_column (`str` or `None`, defaults to `None`):
            Column of the training set whose values define the groups of the Dirichlet partition.
            Required with `partition="dirichlet"`.

        > Split and auxiliary model

        cut_layer (`int`, defaults to `1`):
            Clients run the embedding stage and decoder blocks `[0, cut_layer)`, the server the rest.
            Between 1 and the number of blocks minus one.
        aux_num_layers (`int`, defaults to `3`):
            Decoder blocks of each client's auxiliary model (>= 1). The auxiliary model is these
            blocks, a final norm, and an LM head tied to the client's input embedding.
        aux_init (`str`, defaults to `"server_blocks"`):
            `"server_blocks"` copies the first `aux_num_layers` server blocks and the final norm
            (a warm start); `"random"` initialises them afresh as the model's own init does.
        aux_trainable (`str`, defaults to `"adapters"`):
            Which auxiliary weights train (FSL-SAGE: during alignment, on the server; CSE-FSL: on
            the client). `"adapters"`: with PEFT only the adapters the copied blocks carry, without
            PEFT every weight; `"all"`: every weight of the auxiliary blocks and final norm, with or
            without PEFT (the head stays tied to the client's embedding and never trains). What
            trains is exactly what travels after an alignment (or a CSE-FSL round), and is counted.
            The default is `"adapters"`: with LoRA and auxiliary blocks copied from the server, `"all"`
            sends every auxiliary weight after every alignment instead of the adapters alone, so a byte
            budget buys fewer global steps. With `aux_init="random"` use `"all"` (as the paper's reference
            implementation does): adapters on random frozen blocks estimate little.
        aux_heldout_cosine (`bool`, defaults to `True`):
            On every upload, before it joins the alignment buffer, the server measures the cosine
            between its true gradient w.r.t. the uploaded activations and the gradient of the
            auxiliary model the client is using, and logs the mean over the uploads since the last
            log as `aux_grad_cosine_heldout` (FSL-SAGE: the copy it last sent; CSE-FSL: only where
            the client's current auxiliary model lives in the server's process). Costs one extra
            forward and backward of the server and of the auxiliary model per upload.

        > FSL-SAGE schedule

        server_update_interval (`int`, defaults to `5`):
            A client uploads its smashed activations (and the server steps on them) every this many
            local steps, starting with the first (>= 1).
        align_interval (`int`, defaults to `10`):
            Rounds between alignments of the auxiliary models (>= 1); round 0 aligns.
        align_buffer_size (`int`, defaults to `16`):
            Sequences kept per client for alignment (most recent uploads) (>= 1).
        align_epochs (`int`, defaults to `5`):
            Passes over the buffer per alignment (>= 0; 0: no alignment, nothing sent down). The
            defaults of `align_interval`, `align_buffer_size` and `align_epochs` come from the
            FSL-SAGE ablation ("Alignment cost" in docs/benchmarks.md, which gives the figures): with
            them alignment is a small share of FSL-SAGE's time, and the converged loss is within the
            seed spread of the paper's settings (`align_epochs=40, align_buffer_size=64`), which spend
            most of the time aligning.
        align_learning_rate (`float` or `None`, defaults to `None`):
            Learning rate of the alignment optimizer; `None` uses `learning_rate`.
        server_replay_steps (`int`, defaults to `0`):
            After each step on an upload, the server takes this many more steps, each on an upload
            drawn at random from the ones it keeps for alignment (every client's last
            `align_buffer_size` sequences): more server updates for no extra bytes, for that much
            more server compute (>= 0; needs the labels on the server, so not with `private_labels`).
            With LoRA it pays in short runs (the recipe's main job); with every weight training the
            server over-fits the few buffered sequences and ends far worse (docs/benchmarks.md), so
            keep it at 0 there.

        > Communication budget

        max_comm_bytes (`int` or `None`, defaults to `None`):
            Stop training at the end of the global step in which the bytes on the wire (up + down, as
            the ledger counts them) reach this many (> 0), on every process at the same step; the
            stop is logged with the bytes. `max_steps` still caps the run and sets the learning-rate
            schedule. `None`: no budget.

        > Processes

        client_ranks (`list[int]` or `None`, defaults to `None`):
            Under `accelerate launch --num_processes P` (P >= 2), the process of each client (one
            entry per client, each in 0..P-1). The server always runs on process 0, the main
            process. `None` deals the clients round-robin over processes 1..P-1. Ignored with
            one process. How long a process waits for a message is `ddp_timeout` (seconds).

        > Reliability

        nonfinite (`str`, defaults to `"raise"`):
            What to do when a party's loss or gradients, a received message (activations, gradients)
            or a received model state holds NaN or infinity: `"raise"` stops the run with an error
            naming the party, the message or loss, the round and the global step (checkpoints already
            written stay good); `"skip"` discards that update or upload for the step, counts it in
            the logged `skipped_updates`, and goes on.
        client_failures (`str`, defaults to `"raise"`):
            What to do when a client raises during its local step: `"raise"` stops the run;
            `"drop"` drops that client from the rest of the round (the round aggregates the others,
            weights renormalised; logged as `dropped_clients`). Under several processes, `"drop"` also
            goes on without a client process that dies or does not answer within `ddp_timeout`: its
            clients stay out until the run is restarted from a checkpoint (see
            `hf_fsl_sage.transport.membership`). With `"raise"` such a process stops the run with
            `FederationCommError` (resume from the last checkpoint).
        simulate_client_failures (`float`, defaults to `0.0`):
            Probability, per participant and local step, that the client fails on purpose (seeded from
            `seed`, the round, the step and the client, so runs and resumes repeat exactly). For tests
            and benchmarks of `client_failures="drop"`; in [0, 1).

        > Transport

        smashed_codec (`str`, defaults to `"none"`):
            How the smashed activations (and, for SplitFed, the gradients sent back) are encoded on the
            wire: `"none"` (as computed), `"bf16"`, `"fp16"`, `"int8"` or `"int4"` (per-token absmax
            scale, counted in the bytes), or any name registered with
            `hf_fsl_sage.transport.codecs.register_codec`. Only the positions the attention mask keeps
            travel. The client steps on its own, unencoded activations. With `private_labels` the
            server's output and the gradients w.r.t. it travel in the same encoding.

        > Privacy (see docs/privacy.md for what each protects and costs)

        private_labels (`bool`, defaults to `False`):
            Keep the labels (for a causal LM: the tokens) on the clients. Each client holds the final
            norm and the LM head (tied to its embedding where the model ties them); an upload carries
            the cut-layer activations only; the server returns its last block's output, the client
            computes the loss and sends back the gradient w.r.t. that output, and the server
            back-propagates it. One round trip per upload (two more activation messages); for
            FSL-SAGE the alignment runs on the client, on true gradients at the cut that the server
            sends down (`cut_gradient`) instead of an aligned auxiliary model. No effect on
            `"fedavg"`, where nothing leaves the client during a round.
        smashed_clip_norm (`float` or `None`, defaults to `None`):
            Clip each token's cut-layer hidden vector to this L2 norm in training (> 0), before it is
            sent or used. `None`: no clipping.
        smashed_noise_multiplier (`float`, defaults to `0.0`):
            Gaussian noise added after the clipping, standard deviation `smashed_noise_multiplier *
            smashed_clip_norm` per coordinate (>= 0; needs `smashed_clip_norm`).
        embedding_dx_epsilon (`float` or `None`, defaults to `None`):
            d_chi-privacy of the tokens: in training, noise with density proportional to
            `exp(-epsilon * ||z||)` is added to each input token embedding before the client's
            blocks (> 0; smaller is noisier, the mean noise norm is `hidden_size / epsilon`).
            `None`: off.

        > Memory

        loss_chunk_tokens (`int`, defaults to `1024`):
            Labelled positions per chunk when computing the LM-head loss, so full-vocabulary
            logits are never held for the whole batch (>= 1).

    Not supported: float16 training from any source (`fp16`, `fp16_full_eval`, an accelerate config's
    `mixed_precision: fp16`, a model in float16): each party steps its own optimizer, without a loss scaler.
    Use bfloat16 (`bf16=True`, or a base model in bfloat16).

    Defaults that differ from [`~transformers.TrainingArguments`]: `learning_rate=2e-4`,
    `weight_decay=0.01`, `adam_epsilon=1e-6`, `warmup_steps=500`, `label_smoothing_factor=0.1`,
    `per_device_train_batch_size=8` (per client), `max_grad_norm=1.0` applied per party.
    `label_smoothing_factor` applies to the training losses; evaluation reports the plain
    cross-entropy so that `eval_perplexity = exp(eval_loss)`.
    """

    # Federation
    algorithm: str = field(default="fsl_sage", metadata={"help": "Training algorithm (see hf_fsl_sage.algorithms).",
                                                          "choices": Registered(available_algorithms)})
    num_clients: int = field(default=10, metadata={"help": "Number of clients (>= 1)."})
    clients_per_round: int | None = field(
        default=None, metadata={"help": "Clients sampled per round, 1..num_clients; None = all."}
    )
    local_steps: int = field(default=10, metadata={"help": "Local steps per client per round (>= 1)."})
    partition: str = field(
        default="iid", metadata={"help": "Client partition of the training set.", "choices": PARTITIONS}
    )
    dirichlet_alpha: float = field(default=0.5, metadata={"help": "Dirichlet concentration (> 0)."})
    partition_column: str | None = field(
        default=None, metadata={"help": "Column whose values group examples for the Dirichlet partition."}
    )
    # Split and auxiliary model
    cut_layer: int = field(default=1, metadata={"help": "Clients hold blocks [0, cut_layer); 1..num_blocks-1."})
    aux_num_layers: int = field(default=3, metadata={"help": "Decoder blocks in each auxiliary model (>= 1)."})
    aux_init: str = field(
        default="server_blocks", metadata={"help": "Auxiliary model initialisation.", "choices": AUX_INITS}
    )
    aux_trainable: str = field(
        default="adapters", metadata={"help": "Auxiliary weights that train.", "choices": AUX_TRAINABLE}
    )
    aux_heldout_cosine: bool = field(
        default=True, metadata={"help": "Log aux_grad_cosine_heldout, the aux gradient's cosine with the server's "
                                        "on each upload before it is buffered."}
    )
    # FSL-SAGE schedule
    server_update_interval: int = field(default=5, metadata={"help": "Upload every this many local steps (>= 1)."})
    align_interval: int = field(default=10, metadata={"help": "Rounds between alignments (>= 1)."})
    align_buffer_size: int = field(default=16, metadata={"help": "Sequences kept per client for alignment (>= 1)."})
    align_epochs: int = field(default=5, metadata={"help": "Passes over the buffer per alignment (>= 0)."})
    align_learning_rate: float | None = field(
        default=None, metadata={"help": "Alignment learning rate; None = learning_rate."}
    )
    server_replay_steps: int = field(
        default=0, metadata={"help": "Extra server steps after each upload, each on a buffered upload drawn at "
                                     "random (>= 0; no bytes)."}
    )
    # Communication budget
    max_comm_bytes: int | None = field(
        default=None, metadata={"help": "Stop at the end of the global step in which the ledger reaches this many "
                                        "bytes (> 0); None = no budget."}
    )
    # Processes
    client_ranks: list[int] | None = field(
        default=None, metadata={"help": "Process of each client under accelerate launch (server on process 0); "
                                        "None = round-robin over processes 1..P-1."}
    )
    # Reliability
    nonfinite: str = field(default="raise", metadata={"help": "On NaN/inf values: raise or skip.",
                                                       "choices": ["raise", "skip"]})
    client_failures: str = field(default="raise", metadata={"help": "On a client failing in its step: raise or drop.",
                                                            "choices": ["raise", "drop"]})
    simulate_client_failures: float = field(
        default=0.0, metadata={"help": "Seeded probability of a client failing at a local step (tests), in [0, 1)."}
    )
    # Transport
    smashed_codec: str = field(
        default="none", metadata={"help": "Wire encoding of the smashed activations and SplitFed's gradients.",
                                  "choices": Registered(lambda: CODECS)}
    )
    # Privacy
    private_labels: bool = field(
        default=False, metadata={"help": "Keep labels, final norm and LM head on the clients (one round trip per "
                                         "upload)."}
    )
    smashed_clip_norm: float | None = field(
        default=None, metadata={"help": "Per-token L2 clip of the cut-layer activations in training; None = off."}
    )
    smashed_noise_multiplier: float = field(
        default=0.0, metadata={"help": "Gaussian noise std after clipping, in units of smashed_clip_norm."}
    )
    embedding_dx_epsilon: float | None = field(
        default=None, metadata={"help": "d_chi-privacy epsilon of the input token embeddings; None = off."}
    )
    # Memory
    loss_chunk_tokens: int = field(default=1024, metadata={"help": "Labelled positions per LM-head loss chunk."})

    # TrainingArguments defaults changed to the paper's set-up
    learning_rate: float = field(default=2e-4, metadata={"help": "Initial learning rate of every party's AdamW."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    adam_epsilon: float = field(default=1e-6, metadata={"help": "AdamW epsilon."})
    warmup_steps: float = field(default=500, metadata={"help": "Linear warm-up steps (or ratio if < 1)."})
    label_smoothing_factor: float = field(default=0.1, metadata={"help": "Label smoothing of the training losses."})

    def __post_init__(self) -> None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not self.use_cpu and not _has_accelerator():
            # Several processes on a machine without GPUs: without this, Accelerate would set each up alone.
            self.use_cpu = True
        super().__post_init__()
        if self.dataloader_pin_memory and (self.use_cpu or not _has_accelerator()):
            # Nothing to pin for: torch would only warn at every data loader (every evaluation).
            self.dataloader_pin_memory = False

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"FSLSageConfig: {message}")

        need(self.algorithm in available_algorithms(),
             f"algorithm={self.algorithm!r} is unknown; choose one of {available_algorithms()} (or import the module "
             "that registers yours with hf_fsl_sage.algorithms.register).")
        need(_is_int(self.num_clients) and self.num_clients >= 1,
             f"num_clients={self.num_clients!r} must be an integer >= 1.")
        if self.clients_per_round is not None:
            need(
                _is_int(self.clients_per_round) and 1 <= self.clients_per_round <= self.num_clients,
                f"clients_per_round={self.clients_per_round!r} must be between 1 and num_clients={self.num_clients} "
                "(or None for all clients).",
            )
        for name in ("local_steps", "cut_layer", "aux_num_layers", "server_update_interval", "align_interval",
                     "align_buffer_size", "loss_chunk_tokens"):
            value = getattr(self, name)
            need(_is_int(value) and value >= 1, f"{name}={value!r} must be an integer >= 1.")
        need(_is_int(self.align_epochs) and self.align_epochs >= 0,
             f"align_epochs={self.align_epochs!r} must be >= 0.")
        need(_is_int(self.server_replay_steps) and self.server_replay_steps >= 0,
             f"server_replay_steps={self.server_replay_steps!r} must be an integer >= 0.")
        need(not (self.server_replay_steps and self.private_labels),
             f"server_replay_steps={self.server_replay_steps} needs the labels on the server, which private_labels "
             "keeps on the clients: set server_replay_steps=0 or private_labels=False.")
        need(self.partition in PARTITIONS, f"partition={self.partition!r} must be one of {PARTITIONS}.")
        need(self.aux_init in AUX_INITS, f"aux_init={self.aux_init!r} must be one of {AUX_INITS}.")
        need(self.aux_trainable in AUX_TRAINABLE,
             f"aux_trainable={self.aux_trainable!r} must be one of {AUX_TRAINABLE}.")
        need(self.smashed_codec in CODECS,
             f"smashed_codec={self.smashed_codec!r} is unknown; choose one of {sorted(CODECS)}.")
        need(self.dirichlet_alpha > 0, f"dirichlet_alpha={self.dirichlet_alpha!r} must be > 0.")
        if self.partition == "dirichlet":
            need(self.partition_column is not None,
                 "partition='dirichlet' needs partition_column (the column whose values define the groups, "
                 "e.g. a label column; for E2E, e2e_task.data.with_mr_slot_column(ds, 'food') adds one).")
        if self.align_learning_rate is not None:
            need(self.align_learning_rate > 0, f"align_learning_rate={self.align_learning_rate!r} must be > 0.")
        need(self.nonfinite in ("raise", "skip"), f"nonfinite={self.nonfinite!r} must be 'raise' or 'skip'.")
        need(self.client_failures in ("raise", "drop"),
             f"client_failures={self.client_failures!r} must be 'raise' or 'drop'.")
        need(isinstance(self.simulate_client_failures, (int, float)) and 0 <= self.simulate_client_failures < 1,
             f"simulate_client_failures={self.simulate_client_failures!r} must be a probability in [0, 1).")
        need(not self.simulate_client_failures or self.client_failures == "drop",
             "simulate_client_failures needs client_failures='drop' (with 'raise' the first failure stops the run).")
        if self.client_ranks is not None:
            need(len(self.client_ranks) == self.num_clients and all(_is_int(r) and r >= 0 for r in self.client_ranks),
                 f"client_ranks={self.client_ranks!r} must give one process index (>= 0) to each of the "
                 f"{self.num_clients} clients, or be None to deal them round-robin.")
        if self.max_comm_bytes is not None:
            need(_is_int(self.max_comm_bytes) and self.max_comm_bytes > 0,
                 f"max_comm_bytes={self.max_comm_bytes!r} must be an integer > 0 (bytes), or None for no budget.")
        if self.smashed_clip_norm is not None:
            need(isinstance(self.smashed_clip_norm, (int, float)) and self.smashed_clip_norm > 0,
                 f"smashed_clip_norm={self.smashed_clip_norm!r} must be > 0 (an L2 norm per token), or None.")
        need(isinstance(self.smashed_noise_multiplier, (int, float)) and self.smashed_noise_multiplier >= 0,
             f"smashed_noise_multiplier={self.smashed_noise_multiplier!r} must be >= 0.")
        need(not self.smashed_noise_multiplier or self.smashed_clip_norm is not None,
             "smashed_noise_multiplier needs smashed_clip_norm: the noise's scale is relative to the clip norm.")
        if self.embedding_dx_epsilon is not None:
            need(isinstance(self.embedding_dx_epsilon, (int, float)) and self.embedding_dx_epsilon > 0,
                 f"embedding_dx_epsilon={self.embedding_dx_epsilon!r} must be > 0, or None.")
        need(self.gradient_accumulation_steps == 1,
             f"gradient_accumulation_steps={self.gradient_accumulation_steps} is not supported: one global step is "
             "one local step per client; raise per_device_train_batch_size instead.")
        # fp16 without a loss scaler underflows: each party steps its own optimizer, and Accelerate's scaler
        # (applied in accelerator.backward) never sees those steps.
        need(not self.fp16, "fp16=True is not supported (parties step their own optimizers without a loss scaler); "
             "use bf16=True for mixed precision.")
        need(self.mixed_precision != "fp16",
             "mixed precision 'fp16' comes from ACCELERATE_MIXED_PRECISION (an accelerate config's `mixed_precision: "
             "fp16`, or `accelerate launch --mixed_precision fp16`) and is not supported (parties step their own "
             "optimizers without a loss scaler); set `mixed_precision: bf16` (or 'no') in the accelerate config, or "
             "pass --mixed_precision bf16.")
        need(not self.fp16_full_eval, "fp16_full_eval=True would cast the model to float16 in place; use "
             "bf16_full_eval=True.")

    @property
    def participants_per_round(self) -> int:
        return self.clients_per_round or self.num_clients


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _has_accelerator() -> bool:
    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
