"""A tiny federated split run as a Flower app: the same model, data and settings as ``tests/distributed_run.py``.

The ServerApp writes ``<output-dir>/final`` (the global model's adapters) and ``<output-dir>/result.json`` (ledger,
log history, evaluation, the nodes it lost). Settings come from the run config (``pyproject.toml``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from flwr.app import Context
from peft import LoraConfig
from transformers import AutoModelForCausalLM

from hf_fsl_sage import FSLSageConfig, FSLSageTrainer
from hf_fsl_sage.flower import flower_apps
from tests.distributed_run import tiny_config
from tests.helpers import PadCollator, compact_e2e


def make_trainer(context: Context, transport) -> FSLSageTrainer:
    cfg = context.run_config
    torch.set_num_threads(1)
    train, evalset, vocab, pad = compact_e2e()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(3, int(cfg["n-embd"]), vocab))
    save_steps = int(cfg["save-steps"])
    args = FSLSageConfig(
        output_dir=str(cfg["output-dir"]), algorithm=str(cfg["algorithm"]), num_clients=int(cfg["num-clients"]),
        local_steps=int(cfg["local-steps"]), max_steps=int(cfg["max-steps"]), per_device_train_batch_size=4,
        per_device_eval_batch_size=16, aux_num_layers=1, server_update_interval=1,
        align_interval=int(cfg["align-interval"]), align_epochs=2, align_buffer_size=8, learning_rate=3e-3,
        align_learning_rate=1e-3, warmup_steps=0, logging_steps=2, eval_strategy="no", report_to="none", seed=0,
        disable_tqdm=True, save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
        ddp_timeout=int(cfg["ddp-timeout"]), client_failures=str(cfg["client-failures"]),
        max_comm_bytes=int(cfg["max-comm-bytes"]) or None,
    )
    peft_config = LoraConfig(r=4, lora_alpha=32, lora_dropout=0.1, target_modules=["c_attn"], fan_in_fan_out=True)
    return FSLSageTrainer(model=model, args=args, train_dataset=train, eval_dataset=evalset.select(range(32)),
                          data_collator=PadCollator(pad), peft_config=peft_config, transport=transport)


def write_result(trainer: FSLSageTrainer, context: Context) -> None:
    metrics = trainer.evaluate()
    out = trainer.args.output_dir
    trainer.save_model(os.path.join(out, "final"))
    transport = trainer.federation.transport
    nodes = getattr(transport, "node_ids", [])
    lost = {str(nodes[r - 1]): why for r, why in getattr(transport, "lost", {}).items()}  # SuperNode ID -> why
    result = {"ledger": transport.ledger.state_dict(), "log_history": trainer.state.log_history, "eval": metrics,
              "global_step": trainer.state.global_step, "lost": lost,
              "exchanges": getattr(transport, "exchanges", 0), "timings": getattr(transport, "timings", []),
              "placement": trainer.placement.describe()}
    Path(out, "result.json").write_text(json.dumps(result, indent=1))


apps = flower_apps(make_trainer, after_training=write_result)
server_app = apps.server_app
client_app = apps.client_app
