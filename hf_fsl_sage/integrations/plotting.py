"""Loss against communicated megabytes, read from a Trainer's ``log_history``.

Training logs of :class:`~hf_fsl_sage.FSLSageTrainer` carry the cumulative
``comm_bytes``; :class:`CommBytesAtEvaluation` adds it to evaluation logs, so
both curves share the x axis.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import TrainerCallback


__all__ = ["CommBytesAtEvaluation", "loss_curves", "plot_loss_vs_comm"]

MB = 1e6


class CommBytesAtEvaluation(TrainerCallback):
    """Adds the cumulative ``comm_bytes`` (and up/down) to each evaluation's entry of ``log_history``.

    ``ledger`` is the run's :class:`~hf_fsl_sage.transport.base.CommLedger`
    (``trainer.federation.transport.ledger``). Entries that already have ``comm_bytes`` are kept.
    """

    def __init__(self, ledger: Any):
        self.ledger = ledger

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if state.log_history and any(k.endswith("_loss") for k in state.log_history[-1]):
            for key, value in self.ledger.metrics().items():
                state.log_history[-1].setdefault(key, value)
        return control


def loss_curves(log_history: list[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """``{"train": [(MB, loss)], "server": [(MB, server_loss)], "eval": [(MB, eval_loss)]}`` from the
    entries that carry ``comm_bytes``."""
    curves: dict[str, list[tuple[float, float]]] = {"train": [], "server": [], "eval": []}
    for entry in log_history:
        if "comm_bytes" not in entry:
            continue
        if "loss" in entry:
            curves["train"].append((entry["comm_bytes"] / MB, float(entry["loss"])))
        if "server_loss" in entry:
            curves["server"].append((entry["comm_bytes"] / MB, float(entry["server_loss"])))
        if "eval_loss" in entry:
            curves["eval"].append((entry["comm_bytes"] / MB, float(entry["eval_loss"])))
    return curves


def plot_loss_vs_comm(log_history: list[dict[str, Any]], path: str | Path, title: str | None = None,
                      references: dict[str, float] | None = None,
                      compared: dict[str, list[dict[str, Any]]] | None = None) -> Path:
    """Write a PNG of the training losses (and eval loss, if any) against communicated MB; returns ``path``.

    ``references`` adds one horizontal line per entry (label -> loss), e.g. a centralized run's eval loss.
    ``compared`` adds the eval loss of other runs (label -> their ``log_history``), e.g. other algorithms on the
    same data; the x axis is then logarithmic, since their bytes may differ by orders of magnitude.

    Raises ``ValueError`` when no log entry carries ``comm_bytes`` (e.g. ``logging_steps`` larger than the run).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = loss_curves(log_history)
    if not curves["train"] and not curves["eval"]:
        raise ValueError("No log entry has comm_bytes: log at least once (logging_steps <= max_steps) "
                         "or evaluate with CommBytesAtEvaluation registered.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    styles = {"train": dict(label="clients' local training loss", marker=".", linewidth=1.2),
              "server": dict(label="server's training loss (on uploads)", marker=".", linewidth=1.2),
              "eval": dict(label="eval loss (global model, no smoothing)", marker="o", linewidth=1.6)}
    for name, points in curves.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, **styles[name])
    for label, history in (compared or {}).items():
        points = [(mb, loss) for mb, loss in loss_curves(history)["eval"] if mb > 0]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="s", markersize=3, linewidth=1.4, label=f"{label}: eval loss")
    if compared:
        ax.set_xscale("log")
    for (label, loss), color in zip((references or {}).items(), ("black", "grey", "brown")):
        ax.axhline(loss, color=color, linestyle="--", linewidth=1.2, label=label)
    ax.set_xlabel("communicated MB (uplink + downlink, cumulative)")
    ax.set_ylabel("loss (nats per token)")
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
