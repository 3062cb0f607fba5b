"""Per-layer settings of a config, cut down to the blocks a part of a split model holds.

A config describes every decoder block of the model: besides ``num_hidden_layers`` it may hold lists with one
entry per block (``layer_types``, ``mlp_layer_types``, per-layer window sizes or head counts, ...), lists of
block indices (``mlp_only_layers``, ``attn_layer_indices``, ...) and per-layer overrides of a heterogeneous
config (``per_layer_config``, e.g. a head size for some layers only). A model whose forward walks these beside
its block list (``zip(config.layer_types, self.layers, strict=True)``) fails when it holds fewer blocks than
its config describes: an auxiliary model holds the blocks before the cut as stand-ins and only a few blocks
after it, the client the blocks before the cut. :func:`config_for_blocks` makes the config describe exactly
the first ``num_blocks`` blocks; every part of a split model that holds fewer blocks than the model goes
through it.
"""

from __future__ import annotations

import copy
import functools
import re

from transformers import PretrainedConfig


__all__ = ["config_for_blocks", "slice_per_layer"]

# Lists of block indices, by name: ``mlp_only_layers``, ``attn_layer_indices``, ``full_attn_idxs`` ...
_INDEX_LIST = re.compile(r".*(_layers|layer_(ids|idxs|indices)|_idxs)")


def _is_index(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def slice_per_layer(config: PretrainedConfig, num_blocks: int) -> None:
    """Make ``config`` (in place) describe its first ``num_blocks`` decoder blocks.

    Lists and tuples with one entry per block keep their first ``num_blocks`` entries, lists of block indices
    keep the indices below ``num_blocks``, heterogeneous per-layer overrides keep those of the first
    ``num_blocks`` blocks, and the number of blocks becomes ``num_blocks``. Sub-configs are sliced too (the
    text config of a composite one). Fields are read from the instance, never through the config's
    attribute access, which refuses to read a per-layer field of a heterogeneous config globally.
    """
    for sub in _configs(config):
        layers = vars(sub).get("num_hidden_layers")
        if not _is_index(layers) or num_blocks >= layers:
            continue
        for name, value in list(vars(sub).items()):
            if not isinstance(value, (list, tuple)) or name.startswith("_"):
                continue
            if len(value) == layers and name not in _fixed_length_lists(type(sub)):
                vars(sub)[name] = type(value)(value[:num_blocks])
            elif value and _INDEX_LIST.fullmatch(name) and all(_is_index(i) and 0 <= i < layers for i in value):
                vars(sub)[name] = type(value)(i for i in value if i < num_blocks)
        spec = vars(sub).get("_heterogeneity_spec")
        if spec is not None:
            spec = copy.copy(spec)
            spec.per_layer_overrides = {i: o for i, o in spec.per_layer_overrides.items() if i < num_blocks}
            vars(sub)["_heterogeneity_spec"] = spec
        vars(sub)["num_hidden_layers"] = num_blocks


@functools.cache
def _fixed_length_lists(cls: type[PretrainedConfig]) -> frozenset[str]:
    """Lists of the class's default config whose length is not its number of blocks: not per-layer settings, even
    where a model's length happens to equal its number of blocks (Falcon-H1's five ``ssm_multipliers``)."""
    try:
        default = cls()
    except Exception:  # noqa: BLE001 - a config class that has no default: rely on the lengths alone
        return frozenset()
    layers = vars(default).get("num_hidden_layers")
    return frozenset(n for n, v in vars(default).items()
                     if isinstance(v, (list, tuple)) and _is_index(layers) and len(v) != layers)


def config_for_blocks(config: PretrainedConfig, num_blocks: int) -> PretrainedConfig:
    """A copy of ``config`` that describes its first ``num_blocks`` decoder blocks (see :func:`slice_per_layer`)."""
    sliced = copy.deepcopy(config)
    slice_per_layer(sliced, num_blocks)
    return sliced


def _configs(config: PretrainedConfig) -> list[PretrainedConfig]:
    """``config`` and the configs nested in it (sub-configs of a composite config), each once."""
    found: dict[int, PretrainedConfig] = {}
    todo = [config]
    while todo:
        current = todo.pop()
        if id(current) in found:
            continue
        found[id(current)] = current
        todo += [v for v in vars(current).values() if isinstance(v, PretrainedConfig)]
    return list(found.values())
