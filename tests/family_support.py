"""Which causal-LM families of the installed transformers split exactly and train: one check, for tests and table.

``tests/test_split.py`` runs :func:`check_family` on every family :func:`families_to_check` lists, and
``benchmarks/split_support.py`` runs the same function to write the support table, so the table says what the
tests check. The families are those of the *installed* transformers (``AutoModelForCausalLM``'s registry),
enumerated when the tests are collected: a family added by a new release is checked the day it is installed.
A family is left out only if the split refuses it by design (``UNSUPPORTED_MODEL_TYPES``, each with its
reason).
"""

from __future__ import annotations

import tempfile
import traceback
from pathlib import Path
from typing import Any

from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from hf_fsl_sage.splitting.families import UNSUPPORTED_MODEL_TYPES, carried_inputs, private_labels_problem
from tests.tiny_models import (
    FAMILY_NOTES,
    SLIDING_WINDOW,
    max_split_diff,
    one_fsl_sage_round,
    round_problems,
    tiny_causal_lm,
)


__all__ = ["LOGIT_TOLERANCE", "LOSS_TOLERANCE", "NUM_LAYERS", "SEQ_LEN", "check_family", "describe",
           "families_to_check", "installed_families"]

NUM_LAYERS = 3  # cuts 1 and 2: a server block before the last, and the last block alone
SEQ_LEN = 10  # longer than the tiny sliding window
LOGIT_TOLERANCE = 1e-5
LOSS_TOLERANCE = 1e-6


def installed_families() -> list[str]:
    """Every causal-LM family (``model_type``) the installed transformers can build with ``AutoModelForCausalLM``."""
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def families_to_check() -> list[str]:
    """The installed families the split does not refuse by design: each must split exactly and train."""
    return [f for f in installed_families() if f not in UNSUPPORTED_MODEL_TYPES]


def _short(exc: BaseException) -> str:
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    text = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
    return f"{text} ({Path(where.filename).name}:{where.lineno})" if where else text


def check_family(model_type: str) -> dict[str, Any]:
    """Build a tiny ``model_type``, split it at every cut, compare with the unsplit model, then train one FSL-SAGE
    round; the row of the support table, never raises.

    ``status`` is ``"exact"`` when ``server(client(x))`` matches the model's logits within
    :data:`LOGIT_TOLERANCE` and its loss within :data:`LOSS_TOLERANCE` at every cut (no mask, right padding,
    left padding with and without position ids; NaN never matches), else ``"mismatch"``, ``"error"`` (the
    split or a forward raised), ``"no config"`` (no tiny model) or ``"unsupported"`` (refused by design). An
    exact family then trains one round (``trains``): client step on its auxiliary estimate, server step,
    alignment and FedAvg must end with finite losses and changed client and server weights. ``private_labels``
    says the same of the split that keeps the final norm, the LM head and the labels on the client
    (``client.head(server(client(x)))`` at every cut, same cases and tolerances), or ``"refused"`` when the
    family's declaration rules it out (``private_labels_problem``).
    """
    row: dict[str, Any] = {"family": model_type, "model_class": MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]}
    if model_type in FAMILY_NOTES:
        row["note"] = FAMILY_NOTES[model_type]
    if model_type in UNSUPPORTED_MODEL_TYPES:
        return {**row, "status": "unsupported", "reason": UNSUPPORTED_MODEL_TYPES[model_type]}
    carried = carried_inputs(model_type)
    if carried:
        row["carried"] = [c.name for c in carried]
        row["reveals_text"] = [c.name for c in carried if c.reveals_text]
    try:
        model = tiny_causal_lm(model_type, num_layers=NUM_LAYERS)
    except Exception as exc:  # noqa: BLE001 - reported, not hidden
        return {**row, "status": "no config", "reason": _short(exc)}
    row["model_class"] = type(model).__name__
    window = getattr(model.config.get_text_config(), "sliding_window", None)
    if isinstance(window, int) and window > SLIDING_WINDOW:
        return {**row, "status": "error", "reason": f"tiny sliding window {window} > {SLIDING_WINDOW}: it never acts"}
    try:
        logit, loss = max_split_diff(model, seq_len=SEQ_LEN)
    except Exception as exc:  # noqa: BLE001
        return {**row, "status": "error", "reason": _short(exc)}
    exact = logit <= LOGIT_TOLERANCE and loss <= LOSS_TOLERANCE
    row.update(status="exact" if exact else "mismatch", max_logit_diff=logit, max_loss_diff=loss)
    if not exact:
        return row
    row.update(_labels_on_client(model, model_type))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            report = one_fsl_sage_round(model.train(), tmp)
    except Exception as exc:  # noqa: BLE001
        return {**row, "trains": False, "train_reason": _short(exc)}
    problems = round_problems(report)
    row.update(trains=not problems, eval_loss_after_round=report.get("eval_loss"))
    if problems:
        row["train_reason"] = "; ".join(problems)
    return row


def _labels_on_client(model: Any, model_type: str) -> dict[str, Any]:
    problem = private_labels_problem(model_type)
    if problem:
        return {"private_labels": "refused", "private_labels_reason": problem}
    try:
        logit, loss = max_split_diff(model, seq_len=SEQ_LEN, private_labels=True)
    except Exception as exc:  # noqa: BLE001
        return {"private_labels": "error", "private_labels_reason": _short(exc)}
    exact = logit <= LOGIT_TOLERANCE and loss <= LOSS_TOLERANCE
    return {"private_labels": "exact" if exact else "mismatch", "private_labels_max_logit_diff": logit}


def describe(row: dict[str, Any]) -> str:
    """One line for a failed check: what failed and why."""
    diff = row.get("max_logit_diff")
    detail = row.get("reason") or row.get("train_reason") or (f"max |Δlogit| {diff:.2e}" if diff is not None else "")
    if row.get("private_labels") not in (None, "exact", "refused"):
        detail += f"; labels on the client: {row['private_labels']} ({row.get('private_labels_reason') or ''}" \
                  f"max |Δlogit| {row.get('private_labels_max_logit_diff')})"
    return f"{row['family']}: {row['status']}{'' if row.get('trains', True) else ', does not train'}: {detail}"
