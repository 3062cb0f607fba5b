"""Hold only what a client's process needs: the rest of the model stays on the ``meta`` device.

Under ``accelerate launch`` a process that holds clients but not the server
needs the embedding stage, blocks ``[0, cut_layer)`` and, when its clients
keep auxiliary models copied from the server, the first server blocks and the
final norm those copies start from. The later blocks, and an LM head that is
not tied to the input embedding, keep their structure (so the model still
splits and loads adapters like everywhere else) but no storage.

* :func:`load_for_clients` builds the model with Accelerate's
  ``init_empty_weights`` and reads only the needed tensors, by name, from the
  safetensors files of a local directory or a Hub repository (downloading only
  the shards that hold them); tensors are placed with Accelerate's
  ``set_module_tensor_to_device`` and the tied weights re-tied by transformers.
  Anything it cannot read that way (another weight format, renamed keys,
  loading options it does not know) falls back to ``from_pretrained`` followed
  by :func:`release_unneeded`.
* :func:`release_unneeded` moves the same modules of an instantiated model to
  ``meta``, freeing their memory.
* :func:`load_pretrained` is the trainer's entry point for a model given by name: whole or for a client's
  process, with a one-line error for a folder that does not exist or a Hub id that cannot be reached.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, cached_file, logging

from .split import _unwrap, decoder_blocks
from .stand_ins import join_path, path_of


logger = logging.get_logger(__name__)

__all__ = ["load_for_clients", "load_pretrained", "load_tokenizer", "release_unneeded", "unneeded_modules"]

# from_pretrained keywords this loader understands: where to find the files, and how to build the model.
_FILE_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "subfolder")
_BUILD_KWARGS = ("dtype", "torch_dtype", "attn_implementation", "trust_remote_code")


def unneeded_modules(model: nn.Module, cut_layer: int, server_blocks: int, keep_head: bool = False) -> list[str]:
    """Paths (in the causal LM inside ``model``) a client's process does not need.

    ``server_blocks`` is how many blocks after the cut its parties copy (the auxiliary model's); the blocks
    after those, and the LM head unless it is the input embedding's tensor or ``keep_head`` (the clients hold it
    when the labels are private), are not needed.
    """
    lm = _unwrap(model)
    base_path, blocks_path = decoder_blocks(lm)
    blocks = lm.get_submodule(join_path(base_path, blocks_path))
    paths = [join_path(base_path, blocks_path, str(i)) for i in range(cut_layer + server_blocks, len(blocks))]
    head = lm.get_output_embeddings()
    if head is not None and not keep_head and head.weight is not lm.get_input_embeddings().weight:
        paths.append(path_of(lm, head))
    return paths


def release_unneeded(model: nn.Module, cut_layer: int, server_blocks: int, keep_head: bool = False) -> int:
    """Move the modules a client's process does not need to ``meta``; returns the bytes freed."""
    lm = _unwrap(model)
    freed = 0
    for path in unneeded_modules(lm, cut_layer, server_blocks, keep_head):
        module = lm.get_submodule(path)
        freed += sum(t.numel() * t.element_size() for t in module.parameters() if not t.is_meta)
        module.to("meta")
    return freed


def load_for_clients(model_id: str, cut_layer: int, server_blocks: int, keep_head: bool = False,
                     **kwargs) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained(model_id, **kwargs)`` holding only what a client's process needs."""
    model = _load_by_name(model_id, cut_layer, server_blocks, kwargs, keep_head)
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(model_id, **kwargs)
        release_unneeded(model, cut_layer, server_blocks, keep_head)
    return model


def load_pretrained(model_id: str, cut_layer: int, server_blocks: int | None, keep_head: bool = False,
                    **kwargs) -> PreTrainedModel:
    """The causal LM ``model_id`` names (a Hub id or a local folder): whole when ``server_blocks`` is None, else
    holding only what a client's process needs (:func:`load_for_clients`).

    A local folder's absolute path becomes the model's ``name_or_path``, so an adapter trained on it records where
    its base is. A path that is not a folder, or a Hub id that cannot be loaded (offline, mistyped, private),
    raises a one-line ``OSError`` that says what to pass instead.
    """
    _check_exists(model_id)
    try:
        if server_blocks is None:
            model = AutoModelForCausalLM.from_pretrained(model_id, **kwargs)
        else:
            model = load_for_clients(model_id, cut_layer, server_blocks, keep_head, **kwargs)
    except OSError as error:
        raise OSError(_not_loaded(model_id, "model", error) + " Pass a local folder saved with save_pretrained, "
                      "or a model object (e.g. AutoModelForCausalLM.from_config(config)).") from None
    if os.path.isdir(model_id):
        model.name_or_path = model.config.name_or_path = os.path.abspath(model_id)
    return model


def load_tokenizer(model_id: str) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained(model_id)``, with the one-line errors of :func:`load_pretrained`."""
    _check_exists(model_id)
    try:
        return AutoTokenizer.from_pretrained(model_id)
    except OSError as error:
        raise OSError(_not_loaded(model_id, "tokenizer", error) + " Pass processing_class=<a tokenizer>.") from None


def _check_exists(model_id: str) -> None:
    """A name that can only be a local path (absolute, relative with ./ or ../, ~, or more than one /) must exist."""
    path_like = model_id.startswith(("/", "./", "../", "~", "\\")) or model_id.count("/") > 1 or "\\" in model_id
    if path_like and not os.path.isdir(os.path.expanduser(model_id)):
        raise OSError(f"model={model_id!r} is not an existing folder: check the path (relative to "
                      f"{os.getcwd()!r}), or pass a Hub id such as 'gpt2' or 'org/name', or a model object.")


def _not_loaded(model_id: str, what: str, error: OSError) -> str:
    reason = " ".join(str(error).split())
    return f"Could not load the {what} {model_id!r} (a Hub id, as it is not a local folder): {reason[:300]}"


def _load_by_name(model_id: str, cut_layer: int, server_blocks: int, kwargs: dict,
                  keep_head: bool = False) -> PreTrainedModel | None:
    unknown = sorted(set(kwargs) - set(_FILE_KWARGS) - set(_BUILD_KWARGS))
    if unknown:
        logger.info(f"Loading {model_id} whole, then releasing what this process does not need (options {unknown}).")
        return None
    files = {k: kwargs[k] for k in _FILE_KWARGS if k in kwargs}
    weight_files = _safetensors_files(model_id, files)
    if weight_files is None:
        logger.info(f"{model_id} has no safetensors weights: loading it whole, then releasing what is not needed.")
        return None
    config = AutoConfig.from_pretrained(model_id, trust_remote_code=kwargs.get("trust_remote_code", False), **files)
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
    if dtype in (None, "auto"):
        dtype = _checkpoint_dtype(config, weight_files)
    build = {k: kwargs[k] for k in ("attn_implementation", "trust_remote_code") if k in kwargs}
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **build)
    skip = tuple(p + "." for p in unneeded_modules(model, cut_layer, server_blocks, keep_head))
    wanted = [n for n, _ in model.named_parameters(remove_duplicate=False) if not n.startswith(skip)]
    wanted += [n for n, b in model.named_buffers() if b.is_meta and not n.startswith(skip)]
    by_file = _locate(wanted, weight_files, model.base_model_prefix)
    for (shard, resolved), names in by_file.items():
        with safe_open(resolved, framework="pt") as f:
            for stored, name in names:
                set_module_tensor_to_device(model, name, "cpu", value=f.get_tensor(stored), dtype=dtype)
    model.tie_weights()
    missing = [n for n in wanted if model.get_parameter_or_buffer(n).is_meta]
    if missing:
        logger.info(f"{model_id}: {len(missing)} tensors (e.g. {missing[0]!r}) are not stored under their names; "
                    "loading it whole, then releasing what is not needed.")
        return None
    model.eval()  # as from_pretrained returns it
    return model


def _safetensors_files(model_id: str, files: dict) -> dict | None:
    """Where the checkpoint's tensors are (``map``: stored key -> shard file name), or None without safetensors.

    Shards are resolved (downloaded from the Hub if needed) only when a wanted tensor is in them.
    """
    index = cached_file(model_id, SAFE_WEIGHTS_INDEX_NAME, _raise_exceptions_for_missing_entries=False,
                        _raise_exceptions_for_connection_errors=False, **files)
    if index is not None:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {"model_id": model_id, "files": files, "map": weight_map}
    single = cached_file(model_id, SAFE_WEIGHTS_NAME, _raise_exceptions_for_missing_entries=False,
                         _raise_exceptions_for_connection_errors=False, **files)
    if single is None:
        return None
    with safe_open(single, framework="pt") as f:
        keys = list(f.keys())
    return {"model_id": model_id, "files": files, "map": dict.fromkeys(keys, SAFE_WEIGHTS_NAME)}


def _locate(names: list[str], weights: dict, prefix: str) -> dict[tuple[str, str], list[tuple[str, str]]]:
    """The stored key of each wanted tensor (also under the base model's prefix, added or removed), by shard."""
    stored_map: dict[str, str] = weights["map"]
    by_file: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
    resolved: dict[str, str] = {}
    for name in names:
        candidates = [name, name.removeprefix(prefix + "."), join_path(prefix, name)]
        stored = next((c for c in candidates if c in stored_map), None)
        if stored is None:
            continue  # a tied weight, or a renamed key: checked after loading
        shard = stored_map[stored]
        if shard not in resolved:
            resolved[shard] = cached_file(weights["model_id"], shard, **weights["files"])
        by_file[(shard, resolved[shard])].append((stored, name))
    return by_file


def _checkpoint_dtype(config, weights: dict) -> torch.dtype:
    """What ``from_pretrained(dtype="auto")`` picks: the config's dtype, else the first floating tensor's."""
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if isinstance(dtype, torch.dtype):
        return dtype
    shard = next(iter(weights["map"].values()))
    with safe_open(cached_file(weights["model_id"], shard, **weights["files"]), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - a safetensors file, not a dict
            t = f.get_slice(key)
            found = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}.get(t.get_dtype())
            if found is not None:
                return found
    return torch.float32
