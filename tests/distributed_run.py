"""A tiny federated split run, the same in one process or under ``accelerate launch`` (used by test_distributed).

    PYTHONPATH=. python tests/distributed_run.py --output_dir D [--algorithm fsl_sage]
    PYTHONPATH=. accelerate launch --config_file accelerate_configs/cpu_3_processes.yaml tests/distributed_run.py \
        --output_dir D
    PYTHONPATH=. python tests/distributed_run.py --output_dir D1 --algorithm fedavg --and --output_dir D2 ...

Runs joined by ``--and`` train one after the other in the same processes (and process group), each as if
launched alone: starting Python, torch and PEFT costs several times what one of these runs does.

from the repository root (``tests.helpers`` is imported from there).

Writes ``D/final`` (the global model as a PEFT adapter) and, on the main process, ``D/result.json``
(ledger, log history, placement). ``--kill_rank R --kill_step S`` makes process R die (SIGKILL) at the end of
global step S; ``--stall_rank R`` makes it hang there instead (for ``--stall_seconds``, then go on).
``--fail_clients C.. --fail_from_step S`` makes those clients fail at every local step from global step index S
on, in any process (a one-process stand-in for losing their process). The moment of the kill (``D/killed_at``)
and of the error the server's process raises (``D/failed_at``) are written as Unix times, so a test can time the
detection alone.

``--data_backend nccl_like`` carries the payloads on :mod:`tests.nccl_like` (NCCL's semantics over gloo);
``--stall_payload_rank R --stall_payload_step S`` makes process R stop for ``--stall_seconds`` between the header
and the payload of its first message at global step S; ``--slow_eval_seconds T`` makes process 0 spend T more
seconds in its first evaluation (a process-0 phase longer than ``ddp_timeout``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import sys
import time
import warnings
from pathlib import Path

import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, GPT2Config, TrainerCallback

from hf_fsl_sage import FSLSageConfig, FSLSageTrainer
from hf_fsl_sage.transport import groups
from hf_fsl_sage.transport.base import FederationCommError
from hf_fsl_sage.transport.distributed import DistributedTransport
from tests.helpers import PadCollator, compact_e2e
from tests.tiny_models import tiny_causal_lm


class DieAt(TrainerCallback):
    """Process ``rank`` dies (SIGKILL), or hangs with ``stall``, at the end of global step ``step``."""

    def __init__(self, rank: int, step: int, stall: bool = False, stall_seconds: float = 3600):
        self.rank, self.step, self.stall, self.stall_seconds = rank, step, stall, stall_seconds

    def on_step_end(self, args, state, control, **kwargs):
        if args.process_index == self.rank and state.global_step == self.step:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            Path(args.output_dir, "killed_at").write_text(repr(time.time()))
            if self.stall:
                time.sleep(self.stall_seconds)
                return
            os.kill(os.getpid(), signal.SIGKILL)


class SlowEvaluation(TrainerCallback):
    """Process 0 spends ``seconds`` more in its first evaluation."""

    def __init__(self, seconds: float):
        self.seconds, self.done = seconds, False

    def on_evaluate(self, args, state, control, **kwargs):
        if args.process_index == 0 and not self.done:
            self.done = True
            time.sleep(self.seconds)


def stall_between_header_and_payload(rank: int, step: int, seconds: float, output_dir: str) -> None:
    """Process ``rank`` stops for ``seconds`` after the header of its first message at global ``step``."""
    send_payload, stalled = DistributedTransport._send_payload, []

    def slow(transport, buffer, dst):
        if transport.placement.rank == rank and transport.context.endswith(f"global step {step}") and not stalled:
            stalled.append(True)
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            Path(output_dir, "killed_at").write_text(repr(time.time()))
            time.sleep(seconds)
        send_payload(transport, buffer, dst)

    DistributedTransport._send_payload = slow


def tiny_config(n_layer: int, n_embd: int, vocab: int, **kwargs) -> GPT2Config:
    return GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=2, n_positions=64, vocab_size=vocab, resid_pdrop=0.1,
                      embd_pdrop=0.1, attn_pdrop=0.1, **kwargs)


def holdings(trainer: FSLSageTrainer) -> dict:
    """The parameters this process holds: those of the model by name, and the bytes of every live parameter."""
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance over every object touches deprecated torch attributes
        live = [o for o in gc.get_objects() if isinstance(o, torch.nn.Parameter) and not o.is_meta]
    unique = {p.data_ptr(): p.numel() * p.element_size() for p in live}
    named = {n: p.numel() * p.element_size() for n, p in trainer.model.named_parameters() if not p.is_meta}
    dtypes = sorted({str(p.dtype) for p in live})
    trainable = sorted({str(p.dtype) for p in live if p.requires_grad})
    return {"model": named, "bytes": sum(unique.values()), "dtypes": dtypes, "trainable_dtypes": trainable}


PROCESS_WIDE = ("kill_rank", "stall_rank", "data_backend", "stall_payload_rank")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    runs: list[list[str]] = [[]]
    for arg in argv:
        runs.append([]) if arg == "--and" else runs[-1].append(arg)
    parser = _parser()
    clis = [parser.parse_args(run) for run in runs]
    if len(clis) > 1:
        wide = sorted({name for cli in clis for name in PROCESS_WIDE if getattr(cli, name) is not None})
        if wide:
            parser.error(f"--{', --'.join(wide)} act on the whole process: launch such a run alone, not with --and")
    # Trainer.train() collects garbage over the ~500k objects of the imports (~0.5 CPU-s a run); frozen, they are
    # skipped (under tests/preloaded_launch.py they are frozen already).
    gc.collect()
    gc.freeze()
    for cli in clis:
        train(cli)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--algorithm", default="fsl_sage")
    parser.add_argument("--max_steps", type=int, default=8)
    parser.add_argument("--save_steps", type=int, default=0)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--kill_rank", type=int, default=None)
    parser.add_argument("--stall_rank", type=int, default=None)
    parser.add_argument("--kill_step", type=int, default=None)
    parser.add_argument("--stall_seconds", type=float, default=3600)
    parser.add_argument("--client_failures", default="raise")
    parser.add_argument("--simulate_client_failures", type=float, default=0.0)
    parser.add_argument("--fail_clients", type=int, nargs="*", default=[])
    parser.add_argument("--fail_from_step", type=int, default=0)
    parser.add_argument("--ddp_timeout", type=int, default=120)
    parser.add_argument("--n_layer", type=int, default=3)
    parser.add_argument("--n_embd", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--num_clients", type=int, default=4)
    parser.add_argument("--client_ranks", type=int, nargs="*", default=None)
    parser.add_argument("--local_steps", type=int, default=2)
    parser.add_argument("--server_update_interval", type=int, default=1)
    parser.add_argument("--align_interval", type=int, default=1)
    parser.add_argument("--max_comm_bytes", type=int, default=None)
    parser.add_argument("--eval_steps", type=int, default=4, help="0: no evaluation during training")
    parser.add_argument("--model_path", default=None, help="load the base model from this directory instead")
    parser.add_argument("--dtype", default="float32", help="dtype of the base model loaded from --model_path")
    parser.add_argument("--holdings", action="store_true", help="each process writes D/holdings-rank<r>.json")
    parser.add_argument("--smashed_codec", default="none")
    parser.add_argument("--family", default=None, help="a tiny model of this family (tests.tiny_models), not GPT-2")
    parser.add_argument("--data_backend", default=None, help="nccl_like: payloads with NCCL's semantics")
    parser.add_argument("--stall_payload_rank", type=int, default=None)
    parser.add_argument("--stall_payload_step", type=int, default=None)
    parser.add_argument("--slow_eval_seconds", type=float, default=0.0)
    parser.add_argument("--private_labels", action="store_true")
    parser.add_argument("--smashed_clip_norm", type=float, default=None)
    parser.add_argument("--smashed_noise_multiplier", type=float, default=0.0)
    return parser


def train(cli: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    if cli.data_backend is not None:
        import tests.nccl_like  # noqa: F401 -- registers the backend

        groups.launch_backend = lambda: cli.data_backend
    if cli.stall_payload_rank is not None:
        stall_between_header_and_payload(cli.stall_payload_rank, cli.stall_payload_step, cli.stall_seconds,
                                         cli.output_dir)

    train, evalset, vocab, pad = compact_e2e()
    torch.manual_seed(0)
    if cli.family:
        model = tiny_causal_lm(cli.family, num_layers=cli.n_layer, vocab_size=vocab)
    else:
        model = cli.model_path or AutoModelForCausalLM.from_config(tiny_config(cli.n_layer, cli.n_embd, vocab))
    args = FSLSageConfig(
        output_dir=cli.output_dir, algorithm=cli.algorithm, num_clients=cli.num_clients, local_steps=cli.local_steps,
        max_steps=cli.max_steps, per_device_train_batch_size=cli.batch, per_device_eval_batch_size=16,
        aux_num_layers=1, server_update_interval=cli.server_update_interval, align_interval=cli.align_interval,
        align_epochs=2, align_buffer_size=8, learning_rate=3e-3, align_learning_rate=1e-3, warmup_steps=0,
        logging_steps=2, eval_strategy="steps" if cli.eval_steps else "no", eval_steps=cli.eval_steps or 4,
        report_to="none", seed=0, disable_tqdm=True,
        save_strategy="steps" if cli.save_steps else "no", save_steps=cli.save_steps or 500,
        ddp_timeout=cli.ddp_timeout, max_comm_bytes=cli.max_comm_bytes, smashed_codec=cli.smashed_codec,
        client_failures=cli.client_failures, simulate_client_failures=cli.simulate_client_failures,
        client_ranks=cli.client_ranks, private_labels=cli.private_labels,
        smashed_clip_norm=cli.smashed_clip_norm, smashed_noise_multiplier=cli.smashed_noise_multiplier,
    )
    peft_config = LoraConfig(r=4, lora_alpha=32, lora_dropout=0.1, target_modules=["c_attn"], fan_in_fan_out=True)
    if cli.family:
        peft_config = LoraConfig(r=4, lora_alpha=32, lora_dropout=0.1, target_modules="all-linear")
    callbacks = []
    if cli.kill_rank is not None or cli.stall_rank is not None:
        callbacks.append(DieAt(cli.stall_rank if cli.kill_rank is None else cli.kill_rank, cli.kill_step,
                               stall=cli.kill_rank is None, stall_seconds=cli.stall_seconds))
    if cli.slow_eval_seconds:
        callbacks.append(SlowEvaluation(cli.slow_eval_seconds))
    trainer = FSLSageTrainer(model=model, args=args, train_dataset=train, eval_dataset=evalset.select(range(32)),
                             data_collator=PadCollator(pad), peft_config=peft_config, callbacks=callbacks,
                             model_init_kwargs={"dtype": getattr(torch, cli.dtype)})
    if cli.fail_clients:
        seeded = trainer.federation.fails_at  # the failures simulate_client_failures draws, kept
        trainer.federation.fails_at = lambda r, local, c: seeded(r, local, c) or (
            c in cli.fail_clients and r * cli.local_steps + local >= cli.fail_from_step)
    try:
        trainer.train(resume_from_checkpoint=cli.resume)
    except FederationCommError:
        if trainer.is_world_process_zero():
            Path(cli.output_dir).mkdir(parents=True, exist_ok=True)
            Path(cli.output_dir, "failed_at").write_text(repr(time.time()))
        raise
    metrics = trainer.evaluate()
    trainer.save_model(os.path.join(cli.output_dir, "final"))
    if cli.holdings:
        holdings_file = Path(cli.output_dir, f"holdings-rank{trainer.args.process_index}.json")
        holdings_file.write_text(json.dumps(holdings(trainer)))
    if trainer.is_world_process_zero():
        result = {"ledger": trainer.federation.transport.ledger.state_dict(), "log_history": trainer.state.log_history,
                  "eval": metrics, "world_size": trainer.placement.world_size,
                  "train_runtime": next(h["train_runtime"] for h in trainer.state.log_history if "train_runtime" in h),
                  "placement": trainer.placement.describe(), "global_step": trainer.state.global_step}
        Path(cli.output_dir, "result.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
