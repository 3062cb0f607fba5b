"""float16 training, from any source, is refused before the first step with the fix named (no party has a loss
scaler); bfloat16 trains."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from hf_fsl_sage import FSLSageConfig, FSLSageTrainer
from tests.helpers import load_script
from tests.test_bad_inputs import SETTINGS, Collator, StepSpy, rows, tiny_gpt2


def _train(tmp_path, model=None, model_init_kwargs=None, **settings) -> FSLSageTrainer:
    args = FSLSageConfig(output_dir=str(tmp_path / "out"), **{**SETTINGS, **settings})
    trainer = FSLSageTrainer(model=tiny_gpt2() if model is None else model, args=args, train_dataset=rows(),
                             data_collator=Collator(), callbacks=[StepSpy()], model_init_kwargs=model_init_kwargs)
    trainer.train()
    return trainer


@pytest.mark.parametrize("source, settings, env, message", [
    ("fp16 argument", {"fp16": True}, None, "fp16=True is not supported"),
    ("accelerate config", {}, "fp16", "mixed precision 'fp16' comes from ACCELERATE_MIXED_PRECISION (an "
                                      "accelerate config's `mixed_precision: fp16`, or `accelerate launch "
                                      "--mixed_precision fp16`)"),
    ("fp16 evaluation", {"fp16_full_eval": True}, None, "fp16_full_eval=True would cast the model to float16 in "
                                                        "place; use bf16_full_eval=True"),
])
def test_float16_mixed_precision_is_refused_by_the_config(tmp_path, monkeypatch, source, settings, env, message):
    if env is not None:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", env)
    StepSpy.steps = 0
    with pytest.raises(ValueError, match=re.escape(message)):
        _train(tmp_path, **settings)
    assert StepSpy.steps == 0


def test_a_float16_model_is_refused_whether_given_or_loaded(tmp_path):
    fix = "Load the model in bfloat16 (model_init_kwargs={'dtype': torch.bfloat16}, or model.to(torch.bfloat16))"
    StepSpy.steps = 0
    with pytest.raises(ValueError, match=re.escape("the model holds float16 weights (transformer.h.0.attn.c_attn, "
                                                   "transformer.h.0.attn.c_proj, ...), which are not supported")):
        _train(tmp_path, model=tiny_gpt2().to(torch.float16))
    tiny_gpt2().save_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match=re.escape(fix)):
        _train(tmp_path, model=str(tmp_path / "base"), model_init_kwargs={"dtype": torch.float16})
    assert StepSpy.steps == 0
    trained = _train(tmp_path, model=str(tmp_path / "base"), model_init_kwargs={"dtype": torch.bfloat16})
    assert trained.state.global_step == 2 and next(trained.model.parameters()).dtype == torch.bfloat16


def test_the_recipe_refuses_a_float16_base_with_the_fix(capsys):
    recipe = load_script(Path(__file__).resolve().parents[1] / "recipes" / "gpt2m_e2e.py", "gpt2m_e2e")
    with pytest.raises(SystemExit):
        recipe.parse_args(["--base_dtype", "float16"])
    err = capsys.readouterr().err
    assert "--base_dtype float16 is not supported: gradients through a float16 base underflow without a loss " \
           "scaler" in err and "use --base_dtype bfloat16" in err
