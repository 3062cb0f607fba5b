"""The recipe's report: the scores it compares, the table it prints and the model card's metrics."""

from __future__ import annotations

from typing import Any

from .metrics import METRIC_NAMES


__all__ = ["SCORES", "card_metrics", "ratios", "summary"]

SCORES = ("eval_loss", "eval_perplexity", *METRIC_NAMES, "slot_error_rate")


def card_metrics(results: dict[str, Any]) -> dict[str, Any]:
    """The model card's ``test_<metric>`` entries; a metric that could not run reads "unavailable: <reason>"."""
    out: dict[str, Any] = {}
    for name in (*METRIC_NAMES, "slot_error_rate"):
        value = results.get(name)
        reason = results.get(f"{name}_unavailable_reason")
        out[f"test_{name}"] = value if value is not None else f"unavailable: {reason}"
    out["test_mrs"] = results.get("num_generation_mrs")
    return out


def _cell(results: dict[str, Any], name: str) -> str:
    value = results.get(name)
    if value is None:
        return f"unavailable ({results.get(f'{name}_unavailable_reason')})"
    return f"{value:.4f}"


def summary(results: dict[str, Any]) -> str:
    """The scores, bytes and steps of the main run, of each compared run and of the centralized reference, side by
    side, with the main run's ratio to the reference."""
    central = results.get("centralized")
    runs = {results["algorithm"]: results, **results.get("compared", {})}
    ratios = results.get("federated_over_centralized", {})
    width = max(21, *map(len, runs))  # the widest cell: SplitFed-V2's bytes, e.g. 486.6 (243.8 / 242.8)
    lines = [f"  {'metric':<24}" + "".join(f" {name:>{width}}" for name in runs)
             + (f" {'centralized':>{width}} {'ratio':>8}" if central else "")]
    for name in SCORES:
        line = f"  {name:<24}" + "".join(f" {_cell(run, name):>{width}}" for run in runs.values())
        if central:
            ratio = ratios.get(name)
            line += f" {_cell(central, name):>{width}} {'' if ratio is None else f'{ratio:.3f}':>8}"
        lines.append(line)
    rows = [("comm_MB (up / down)", lambda r: f"{r['comm_bytes'] / 1e6:.1f} ({r['comm_bytes_up'] / 1e6:.1f} / "
                                              f"{r['comm_bytes_down'] / 1e6:.1f})"),
            ("rounds / global steps", lambda r: f"{r['rounds']} / {r['global_steps']}"),
            ("wall-clock seconds", lambda r: f"{r['runtime_seconds']:.0f}")]
    for label, value in rows:
        lines.append(f"  {label:<24}" + "".join(f" {value(run):>{width}}" for run in runs.values()))
    boot = results.get("bleu_bootstrap")
    if boot:  # the bootstrap's columns: the runs, then the centralized reference
        bleu, versus = boot["bleu"], boot["versus"]
        lines.append(f"  {'bleu 95 % interval':<24}" + "".join(
            f" {bleu[name]['low']:.3f}-{bleu[name]['high']:.3f}".rjust(width + 1) for name in bleu))
        if versus:  # a run alone has no gap to show
            lines.append(f"  {'bleu gap to ' + boot['first']:<24}" + " " * (width + 1) + "".join(
                f" {versus[name]['low']:+.3f}..{versus[name]['high']:+.3f}".rjust(width + 1) for name in versus))
    return "\n".join(lines)


def ratios(federated: dict[str, Any], central: dict[str, Any]) -> dict[str, float | None]:
    """``federated`` / ``central`` for every score both have as a number (None otherwise)."""
    out = {}
    for name in SCORES:
        a, b = federated.get(name), central.get(name)
        out[name] = a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b != 0 else None
    return out
