"""evaluate() reports the global model's plain cross-entropy with dropout off, as the unsplit model does."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.helpers import compact_e2e, lora, make_trainer, tiny_gpt2


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_step_zero_evaluation_equals_the_unsplit_model_in_eval_mode(tmp_path, use_lora):
    model = tiny_gpt2(compact_e2e()[2], dropout=0.1)
    reference = copy.deepcopy(model).eval()
    trainer = make_trainer(tmp_path, model=model, peft_config=lora(dropout=0.1) if use_lora else None)
    trainer.algorithm.train(True)  # as during training
    rows, collator, size = trainer.eval_dataset, trainer.data_collator, trainer.args.per_device_eval_batch_size
    total = 0.0
    with torch.no_grad():  # Trainer's eval_loss: the mean over rows of their batch's token-mean cross-entropy
        for start in range(0, len(rows), size):
            batch = collator([rows[i] for i in range(start, min(start + size, len(rows)))])
            total += float(reference(**batch).loss) * len(batch["input_ids"])
    expected = total / len(rows)
    assert len(rows) == 64 and size == 16
    first, second = trainer.evaluate()["eval_loss"], trainer.evaluate()["eval_loss"]
    assert first == pytest.approx(expected, abs=1e-5) and second == first
    assert trainer.split.training  # training mode restored for the next step
