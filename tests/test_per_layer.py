"""Per-layer config settings cut down to the blocks a part of a split model holds (hf_fsl_sage.splitting.per_layer)."""

from __future__ import annotations

import pytest
import torch

from hf_fsl_sage import split_causal_lm
from hf_fsl_sage.algorithms.auxiliary import build_aux_model
from hf_fsl_sage.splitting.per_layer import config_for_blocks
from tests.tiny_models import tiny_causal_lm, tiny_config


def test_lists_with_one_entry_per_block_keep_the_first_ones() -> None:
    config = tiny_config("ergo", num_layers=5)
    kinds = list(config.layer_types)
    assert len(kinds) == 5 and len(set(kinds)) == 2
    sliced = config_for_blocks(config, 2)
    assert sliced.num_hidden_layers == 2 and sliced.layer_types == kinds[:2]
    assert config.num_hidden_layers == 5 and config.layer_types == kinds  # the original is left alone


def test_lists_of_block_indices_keep_the_indices_below_the_count() -> None:
    config = tiny_config("bamba", num_layers=5, attn_layer_indices=[1, 3])
    assert config_for_blocks(config, 3).attn_layer_indices == [1]
    assert config_for_blocks(config, 4).attn_layer_indices == [1, 3]


def test_heterogeneous_per_layer_overrides_keep_those_of_the_kept_blocks() -> None:
    config = tiny_config("gemma4_text", num_layers=5)
    overrides = config._heterogeneity_spec.per_layer_overrides
    assert {1, 3} <= overrides.keys()  # full-attention layers use another head size
    sliced = config_for_blocks(config, 2)
    assert sliced._heterogeneity_spec.per_layer_overrides == {1: overrides[1]}
    assert len(sliced.per_layer_config) == 2 and sliced.per_layer_config[1].head_dim == overrides[1]["head_dim"]


def test_a_list_whose_length_is_fixed_by_the_family_is_not_per_layer() -> None:
    # Falcon-H1 has five ssm_multipliers whatever its depth: with five blocks the length is a coincidence.
    config = tiny_config("falcon_h1", num_layers=5)
    assert len(config.ssm_multipliers) == 5
    assert config_for_blocks(config, 2).ssm_multipliers == config.ssm_multipliers


def test_a_composite_config_has_its_text_config_sliced() -> None:
    config = tiny_config("qwen3_5", num_layers=4)
    sliced = config_for_blocks(config, 3).get_text_config()
    assert sliced.num_hidden_layers == 3 and sliced.layer_types == config.get_text_config().layer_types[:3]


@pytest.mark.parametrize("cut", [1, 2])
def test_auxiliary_model_and_client_describe_their_blocks(cut: int) -> None:
    """Ergo's forward zips ``config.layer_types`` with its blocks (strict): the auxiliary model, which holds
    ``cut`` stand-ins and one block, and the client, which holds ``cut`` blocks and the stand-in it stops at,
    run only with configs that describe those blocks."""
    model = tiny_causal_lm("ergo", num_layers=4)
    split = split_causal_lm(model, cut)
    aux = build_aux_model(split, 1, "server_blocks", split.client.input_embeddings())
    assert len(aux.lm.model.config.layer_types) == len(aux.blocks) == cut + 1
    assert len(split.client.base.config.layer_types) == cut + 1
    assert len(model.config.layer_types) == 4  # the model's own config is unchanged
    ids = torch.randint(3, 200, (2, 6))
    smashed = split.client(ids)
    logits = aux(smashed).logits
    assert logits.shape == (2, 6, model.config.vocab_size) and torch.isfinite(logits).all()
