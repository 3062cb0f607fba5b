"""Every algorithm trained to convergence on E2E with the same tuning budget: the quality each reaches, and the bytes
it takes to get there, beside a centralized reference trained to convergence.

    python benchmarks/compare_algorithms.py --jobs 2     # full run (its time: docs/benchmarks.md)
    python benchmarks/compare_algorithms.py --quick      # smoke run (CI), under 2 minutes
    python benchmarks/compare_algorithms.py --modes lora --partitions iid --methods splitfed_v2 cse_fsl
                                                         # a part of the grid; a later full run adds the rest
    python benchmarks/compare_algorithms.py --round-length 25 --methods splitfed_v2 cse_fsl fsl_sage
                                                         # second view: the split methods with rounds of 25
                                                         # local steps, each at the rate it chose

Set-up (``e2e_runs``): a GPT-2 with 6 blocks of width 128 pre-trained on held-out E2E references, fine-tuned
on the training part over 4 clients (IID, or Dirichlet(0.5) over the ``customer rating`` slot) with LoRA (r 4
on attention) or every weight. Every run, federated or not, evaluates the validation and the test loss (the
federated ones at the end of every round) and stops when the validation loss has not improved for a set number
of client steps, or at a cap.

Protocol, in three stages (a rerun skips the runs its results file already holds):

1. *Reference*: the unsplit model with a plain ``Trainer``, per fine-tuning mode, at the learning rates of the
   grid; the one with the lowest validation loss is run with two more seeds. Its converged test loss (mean over
   the seeds) is the ceiling; the targets are the test losses that close 80, 90, 95 and 99 % of the gap between
   the base model and it.
2. *Tuning*, the same for every algorithm, on IID clients and seed 0: the learning rate (the mode's base rate
   times each factor of the grid) at the preset's round length, then each other round length at the chosen
   rate; the choice is the lowest validation loss. Dirichlet clients use the IID choice.
3. *Final runs* with the chosen settings: three seeds for SplitFed-V2, CSE-FSL and FSL-SAGE, one for FedAvg and
   SplitFed-V1 (which runs with SplitFed-V2's settings), in all four settings.

Reported from the test curve at the point each run's validation loss was lowest: the converged test loss, the
share of the gap it closes, and the bytes and server updates it took; the bytes to each target, interpolated in
log-bytes between the two evaluations that bracket it (with the bracket); and, as a second view, the test loss
at fixed byte budgets and, to see where the quality comes from, after fixed numbers of server updates. Seeds
give min-max. ``--round-length N`` is a second view of stage 3: the final runs with rounds of N local steps
for every method, each at the learning rate it chose (the tuning and its report unchanged), written to
``compare_algorithms[_quick]_roundsN.json``. Writes ``compare_algorithms[_quick].json`` (with every curve and the
wall and CPU time of each invocation) and ``.png`` under ``--output-dir``, and each run as it ends in
``e2e_runs[_quick].jsonl`` there.
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from curves import GAP_SHARES, best_point, crossing, gap_closed, gap_targets, select, span, value_at
from e2e_runs import RunStore, Task, common_arguments, open_bench, run_all


ROOT = Path(__file__).resolve().parents[1]
METHODS = ["fedavg", "splitfed_v2", "cse_fsl", "fsl_sage"]  # tuned on the same grid
SEEDED = ["splitfed_v2", "cse_fsl", "fsl_sage"]  # the comparison FSL-SAGE's claim is about: several seeds
UNTUNED = {"splitfed_v1": "splitfed_v2"}  # runs with the settings chosen for the other
MODES = ["lora", "full"]
PARTITIONS = ["iid", "dirichlet"]

FULL = {
    # model and data (e2e_runs.load_data, e2e_runs.base_model)
    "n_layer": 6, "n_embd": 128, "n_head": 4, "max_length": 64, "validation_share": 0.1, "test_share": 0.1,
    "pretrain_share": 0.3, "eval_rows": 128, "pretrain_steps": 600, "pretrain_batch": 16, "pretrain_lr": 2e-3,
    # every run
    "num_clients": 4, "batch": 8, "cut_layer": 1, "local_steps": 10, "warmup_steps": 10,
    "eval_client_steps": 80, "patience_client_steps": 800, "max_client_steps": 8000,
    # an improvement of the validation loss smaller than this does not reset a federated run's patience; the
    # reference's must only improve at all (it is the ceiling: stopping it on a noisy plateau under-trains it)
    "min_improvement": 0.005, "reference_min_improvement": 0.0,
    # tuning grid: learning rate = base rate of the mode x factor; then the other round lengths
    "learning_rate": {"lora": 3e-3, "full": 1e-3}, "lr_factors": [0.3, 1.0, 3.0], "round_lengths": [10, 25],
    "seeds": [0, 1, 2],
    # which runs to make (``--modes``, ``--partitions``, ``--methods`` narrow them; a later run adds the rest)
    # and, if set, the round length every final run takes instead of its chosen one (``--round-length``)
    "round_length_view": None,
    "modes": MODES, "partitions": PARTITIONS, "methods": METHODS + list(UNTUNED),
    # second view: test loss at these budgets (MB)
    "budgets_mb": {"lora": [2, 8, 32], "full": [8, 32, 128]},
    # third view (where a method's quality comes from): test loss after this many server updates
    "server_update_marks": [250, 500, 1000, 2000],
    # each algorithm's own settings (FSLSageConfig fields); the rest are the library's defaults
    # FSL-SAGE aligns every 2 rounds, 5 epochs over the last 16 uploaded sequences (5 alignment batches per client
    # and round); the library's defaults (every 10 rounds, 40 epochs over 64) make 32
    "cse_fsl": {"aux_num_layers": 3},
    "fsl_sage": {"aux_num_layers": 3, "align_interval": 2, "align_epochs": 5, "align_buffer_size": 16},
}
QUICK = {
    **FULL, "n_layer": 2, "n_embd": 32, "n_head": 2, "max_length": 64, "eval_rows": 16, "pretrain_steps": 10,
    "num_clients": 2, "local_steps": 2, "eval_client_steps": 4, "patience_client_steps": 8, "max_client_steps": 16,
    "lr_factors": [1.0, 3.0], "round_lengths": [2, 4], "seeds": [0, 1], "budgets_mb": {"lora": [0.1], "full": [1]},
    "server_update_marks": [4, 8],
    "cse_fsl": {"aux_num_layers": 1}, "fsl_sage": {"aux_num_layers": 1, "align_epochs": 1, "align_buffer_size": 4,
                                                  "align_interval": 1},
}


# ---------------------------------------------------------------- tasks of each stage
def settings(lr: float, local_steps: int | None = None) -> tuple:
    return (("learning_rate", lr),) + ((("local_steps", local_steps),) if local_steps is not None else ())


def round_length_view(parser: argparse.ArgumentParser, round_length: int | None) -> int | None:
    """``--round-length``, refused (before anything is written) unless a round has at least one local step."""
    if round_length is not None and round_length < 1:
        parser.error(f"--round-length {round_length}: a round needs at least one local step")
    return round_length


def rate(cfg, mode: str, factor: float) -> float:
    return float(f"{cfg['learning_rate'][mode] * factor:.3g}")


def reference_grid(cfg) -> dict[str, list[Task]]:
    return {mode: [("centralized", mode, "all", cfg["seeds"][0], settings(rate(cfg, mode, f)))
                   for f in cfg["lr_factors"]] for mode in cfg["modes"]}


def lr_grid(cfg, method: str, mode: str) -> list[Task]:
    return [(method, mode, "iid", cfg["seeds"][0], settings(rate(cfg, mode, f), cfg["local_steps"]))
            for f in cfg["lr_factors"]]


def best_task(tasks: list[Task], store: RunStore) -> Task | None:
    """The task whose run has the lowest validation loss (``curves.select``: the test split plays no part), among
    those the store holds (None if it holds none)."""
    by_key = {json.dumps(t): t for t in tasks if store.get(t) is not None}
    return by_key[select({k: store.get(t)["curve"] for k, t in by_key.items()})] if by_key else None


def round_grid(cfg, chosen_lr: Task) -> list[Task]:
    method, mode, partition, seed, items = chosen_lr
    lr = dict(items)["learning_rate"]
    return [chosen_lr] + [(method, mode, partition, seed, settings(lr, n)) for n in cfg["round_lengths"]
                          if n != cfg["local_steps"]]


def tuned(cfg) -> list[str]:
    """The methods of ``cfg["methods"]`` that are tuned (an untuned one needs the method it borrows from)."""
    return [m for m in METHODS if m in cfg["methods"]]


def listed(cfg) -> list[str]:
    """Every method of ``cfg["methods"]`` that can run: the tuned ones and those whose lender is tuned."""
    return tuned(cfg) + [m for m, lender in UNTUNED.items() if m in cfg["methods"] and lender in cfg["methods"]]


def final_tasks(cfg, chosen: dict[tuple[str, str], Task]) -> list[Task]:
    """Every final run: each listed method at its chosen settings (with ``cfg["round_length_view"]``, at its
    chosen rate with rounds of that many local steps), in every mode and partition, with its seeds."""
    tasks = []
    for mode in cfg["modes"]:
        for partition in cfg["partitions"]:
            for method in listed(cfg):
                if (UNTUNED.get(method, method), mode) not in chosen:
                    continue
                items = chosen[(UNTUNED.get(method, method), mode)][4]
                if cfg["round_length_view"]:
                    items = settings(dict(items)["learning_rate"], cfg["round_length_view"])
                seeds = cfg["seeds"] if method in SEEDED else cfg["seeds"][:1]
                tasks += [(method, mode, partition, seed, items) for seed in seeds]
    return tasks


def longest_first(tasks: list[Task]) -> list[Task]:
    """Auxiliary-loss methods with LoRA run longest; starting them first lets two workers finish together."""
    return sorted(tasks, key=lambda t: (t[0] not in ("fsl_sage", "cse_fsl"), t[1] != "lora"))


# ---------------------------------------------------------------- reading the runs
def summarize(row: dict[str, Any], base: float, reference: float, targets: dict[str, float],
              budgets: list[float], marks: list[int] = ()) -> dict[str, Any]:
    """The figures of one run, from its test curve at the point its validation loss was lowest."""
    best = best_point(row["curve"])
    cross = {share: crossing(row["curve"], loss) for share, loss in targets.items()}
    return {"test_loss": best["test_loss"], "validation_loss": best["validation_loss"],
            "gap_closed": gap_closed(base, reference, best["test_loss"]),
            "over_reference": best["test_loss"] / reference - 1, "bytes": best["bytes"],
            "server_updates": best["server_updates"], "client_steps": best["client_steps"],
            "bytes_to_target": {s: c["value"] if c else None for s, c in cross.items()},
            "bracket_to_target": {s: c["bracket"] if c else None for s, c in cross.items()},
            "loss_at_budget": {str(b): value_at(row["curve"], b * 1e6) for b in budgets},
            "loss_at_server_updates": {str(n): value_at(row["curve"], n, x="server_updates")
                                       if row["curve"][-1]["server_updates"] >= n else None for n in marks},
            "stopped_by": row["stopped_by"], "cpu_seconds": row["cpu_seconds"],
            "align_share": row.get("time_share", {}).get("align")}


def analyse(cfg, store: RunStore, chosen: dict, reference_choice: dict) -> dict[str, Any]:
    """The figures of every setting from the runs the store holds (with ``--report-only`` some may be missing: a
    choice is then made among the runs there are, and a method without runs is left out)."""
    out: dict[str, Any] = {"references": {}, "tuning": {}, "settings": {}}
    for mode in cfg["modes"]:
        if reference_choice.get(mode) is None:
            continue
        grid = [t for t in reference_grid(cfg)[mode] if store.get(t)]
        runs = [r for r in map(store.get, reference_tasks_at(cfg, reference_choice[mode])) if r]
        base = runs[0]["curve"][0]["test_loss"]
        ceiling = span([best_point(r["curve"])["test_loss"] for r in runs])
        targets = gap_targets(base, ceiling["mean"])
        out["references"][mode] = {
            "grid": {str(dict(t[4])["learning_rate"]): best_point(store.get(t)["curve"])["validation_loss"]
                     for t in grid},
            "learning_rate": dict(reference_choice[mode][4])["learning_rate"], "base_test_loss": base,
            "test_loss": ceiling, "targets": targets,
            "steps": span([best_point(r["curve"])["step"] for r in runs]), "runs": runs}
        out["tuning"][mode] = {}
        for method in [m for m in tuned(cfg) if (m, mode) in chosen]:
            grid = {json.dumps(dict(t[4])): best_point(store.get(t)["curve"])["validation_loss"]
                    for t in tuning_tasks(cfg, store, method, mode) if store.get(t)}
            out["tuning"][mode][method] = {"grid": grid, "chosen": dict(chosen[(method, mode)][4])}
        for partition in cfg["partitions"]:
            rows = {}
            for method in listed(cfg):
                tasks = [t for t in final_tasks(cfg, chosen) if t[:3] == (method, mode, partition) and store.get(t)]
                if not tasks:
                    continue
                runs = [store.get(t) for t in tasks]
                per_run = [summarize(r, base, ceiling["mean"], targets, cfg["budgets_mb"][mode],
                                     cfg["server_update_marks"]) for r in runs]
                rows[method] = {"seeds": [t[3] for t in tasks], "settings": dict(tasks[0][4]), "runs": per_run,
                                "curves": [r["curve"] for r in runs], **aggregate(per_run)}
            out["settings"][f"{partition}/{mode}"] = {"base_test_loss": base, "reference": ceiling["mean"],
                                                      "targets": targets, "methods": rows,
                                                      "goal": goal(rows, ceiling["mean"]) if "fsl_sage" in rows
                                                      else None}
    return out


def reference_tasks_at(cfg, chosen: Task) -> list[Task]:
    name, mode, partition, _, items = chosen
    return [(name, mode, partition, seed, items) for seed in cfg["seeds"]]


def tuning_tasks(cfg, store: RunStore, method: str, mode: str) -> list[Task]:
    """Every tuning run of ``method`` in ``mode``: the learning rates, then the round lengths at the chosen one."""
    rates, best = lr_grid(cfg, method, mode), best_task(lr_grid(cfg, method, mode), store)
    return list(dict.fromkeys(rates + (round_grid(cfg, best) if best else [])))


def aggregate(per_run: list[dict[str, Any]]) -> dict[str, Any]:
    def of(get) -> dict[str, Any]:
        return span([get(r) for r in per_run])

    keys = per_run[0]["bytes_to_target"]
    return {"test_loss": of(lambda r: r["test_loss"]), "gap_closed": of(lambda r: r["gap_closed"]),
            "over_reference": of(lambda r: r["over_reference"]), "bytes": of(lambda r: r["bytes"]),
            "server_updates": of(lambda r: r["server_updates"]), "client_steps": of(lambda r: r["client_steps"]),
            "bytes_to_target": {s: of(lambda r, s=s: r["bytes_to_target"][s]) for s in keys},
            "loss_at_budget": {b: of(lambda r, b=b: r["loss_at_budget"][b]) for b in per_run[0]["loss_at_budget"]},
            "loss_at_server_updates": {n: of(lambda r, n=n: r["loss_at_server_updates"][n])
                                       for n in per_run[0]["loss_at_server_updates"]},
            "cpu_seconds": of(lambda r: r["cpu_seconds"]), "align_share": of(lambda r: r["align_share"]),
            "stopped_by": sorted({r["stopped_by"] for r in per_run})}


def goal(rows: dict[str, Any], reference: float) -> dict[str, Any]:
    """FSL-SAGE's claim in this setting: converged within 1 % of the reference, and to the 95 % target with at
    most 0.25x SplitFed-V2's bytes and 0.8x CSE-FSL's, seed ranges not overlapping."""
    sage = rows["fsl_sage"]
    out: dict[str, Any] = {"within_1_percent": sage["test_loss"]["max"] <= 1.01 * reference,
                           "over_reference_max": sage["over_reference"]["max"]}
    mine = sage["bytes_to_target"]["0.95"]
    for other, limit in (("splitfed_v2", 0.25), ("cse_fsl", 0.8)):
        if other not in rows:
            out[other] = {"ratio": None, "limit": limit, "met": None, "why": f"{other} not run"}
            continue
        theirs = rows[other]["bytes_to_target"]["0.95"]
        if mine["missing"] or theirs["missing"]:
            out[other] = {"ratio": None, "limit": limit, "met": False,
                          "why": f"95 % target missed by {mine['missing']} FSL-SAGE / {theirs['missing']} "
                                 f"{other} seeds"}
            continue
        ratio = mine["mean"] / theirs["mean"]
        out[other] = {"ratio": ratio, "limit": limit, "ranges_overlap": mine["max"] >= theirs["min"],
                      "met": ratio <= limit and mine["max"] < theirs["min"]}
    return out


# ---------------------------------------------------------------- report
def mb(value: float | None) -> str:
    return "—" if value is None else f"{value / 1e6:.3g}"


def cell(s: dict[str, Any], fmt=lambda v: f"{v:.4f}") -> str:
    if s["mean"] is None:
        return "not reached"
    text = fmt(s["mean"]) if s["n"] == 1 else f"{fmt(s['mean'])} ({fmt(s['min'])}–{fmt(s['max'])})"
    return text + (f", {s['missing']}/{s['n']} missed" if s["missing"] else "")


def table(results: dict[str, Any]) -> str:
    lines = []
    for mode, ref in results["references"].items():
        grid = ", ".join(f"{lr}: {v:.4f}" for lr, v in ref["grid"].items())
        lines.append(f"\n== reference, {mode}: validation loss by learning rate {grid}; chose {ref['learning_rate']}, "
                     f"base test loss {ref['base_test_loss']:.4f}, converged {cell(ref['test_loss'])} after "
                     f"{cell(ref['steps'], lambda v: f'{v:.0f}')} steps; targets "
                     + ", ".join(f"{float(s):.0%} {v:.4f}" for s, v in ref["targets"].items()))
        for method, tuned in results["tuning"][mode].items():
            lines.append(f"   tuning {method}: " + ", ".join(f"{k} {v:.4f}" for k, v in tuned["grid"].items())
                         + f" -> {tuned['chosen']}")
    shares = [str(s) for s in GAP_SHARES]
    for key, setting in results["settings"].items():
        lines.append(f"\n| {key} | seeds | converged test loss | gap closed | MB there | server updates | "
                     + " | ".join(f"MB to {float(s):.0%}" for s in shares) + " | stopped by | CPU s |")
        lines.append("|---" * (8 + len(shares)) + "|")
        for method, row in setting["methods"].items():
            lines.append(f"| {method} | {len(row['seeds'])} | {cell(row['test_loss'])} | "
                         f"{cell(row['gap_closed'], lambda v: f'{v:.1%}')} | {cell(row['bytes'], mb)} | "
                         f"{cell(row['server_updates'], lambda v: f'{v:.0f}')} | "
                         + " | ".join(cell(row["bytes_to_target"][s], mb) for s in shares)
                         + f" | {', '.join(row['stopped_by'])} | {cell(row['cpu_seconds'], lambda v: f'{v:.0f}')} |")
        for method, row in setting["methods"].items():
            lines.append(f"   {method}: test loss after " + ", ".join(
                f"{n} server updates {cell(v)}" for n, v in row["loss_at_server_updates"].items()))
        lines.append(f"goal: {json.dumps(setting['goal'])}")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 9), squeeze=False)
    colors: dict[str, Any] = {}
    for ax, (key, setting) in zip(axes.flat, results["settings"].items()):
        for method, row in setting["methods"].items():
            for i, curve in enumerate(row["curves"]):
                points = [p for p in curve if p["bytes"] > 0]
                line, = ax.plot([p["bytes"] / 1e6 for p in points], [p["test_loss"] for p in points],
                                lw=1.4 if i == 0 else 0.7, ls="-" if i == 0 else "--", color=colors.get(method),
                                label=method if i == 0 else None)
                colors[method] = line.get_color()
        ax.axhline(setting["reference"], color="k", lw=1, label="centralized, converged")
        for (share, loss), ls in zip(setting["targets"].items(), (":", "-.", "--", (0, (1, 3)))):
            ax.axhline(loss, color="grey", ls=ls, lw=0.8, label=f"{float(share):.0%} of the gap")
        ax.set_xscale("log")
        ax.set_title(key)
        ax.set_xlabel("cumulative MB on the wire (up + down), log scale")
        ax.set_ylabel("test loss")
        ax.grid(alpha=0.3, which="both")
    for ax in axes.flat[len(results["settings"]):]:  # a part of the grid: no empty panels
        ax.remove()
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- main
def choose(cfg, store: RunStore, run: Callable[[list[Task]], None]) -> tuple[dict, dict, list[Task]]:
    """Stages 1 and 2: ``run`` the reference's and the tuning's runs (it may start none), then choose among the
    stored ones. Returns the reference's chosen task per mode, the chosen task per (method, mode), and every task
    of the two stages."""
    # 1 and 2a: the reference's learning rates and every method's, at the preset's round length
    refs, modes = reference_grid(cfg), cfg["modes"]
    first = [t for m in modes for t in refs[m]] + [t for m in modes for method in tuned(cfg)
                                                   for t in lr_grid(cfg, method, m)]
    run(first)
    reference_choice = {m: best_task(refs[m], store) for m in modes}
    # 1 and 2b: the reference's other seeds; the other round lengths at each method's chosen rate
    best_rates = {(method, m): best_task(lr_grid(cfg, method, m), store) for m in modes for method in tuned(cfg)}
    rounds = {key: round_grid(cfg, best) for key, best in best_rates.items() if best}
    second = ([t for m in modes if reference_choice[m] for t in reference_tasks_at(cfg, reference_choice[m])]
              + [t for grid in rounds.values() for t in grid])
    run(second)
    chosen = {key: best_task(grid, store) for key, grid in rounds.items()}
    return reference_choice, chosen, first + second


def cpu_by_stage(store: RunStore, planned: list[Task], final: list[Task]) -> dict[str, float]:
    """The CPU seconds of the stored runs of this grid, per stage (the runs file also holds other benchmarks'
    runs, which do not count), and how many runs that is."""
    stages = {"reference": [t for t in planned if t[0] == "centralized"],
              "tuning": [t for t in planned if t[0] != "centralized"], "final": final}
    rows = {stage: [store.get(t) for t in dict.fromkeys(tasks)] for stage, tasks in stages.items()}
    out = {stage: sum(r["cpu_seconds"] for r in stored if r) for stage, stored in rows.items()}
    return {**out, "total": sum(out.values()), "runs": sum(r is not None for stored in rows.values() for r in stored)}


def report_line(task: Task, row: dict[str, Any]) -> None:
    name, mode, partition, seed, items = task
    best = best_point(row["curve"])
    print(f"{name} {mode} {partition} seed {seed} {dict(items)}: best validation {best['validation_loss']:.4f} "
          f"(test {best['test_loss']:.4f}) at step {best['step']}, {mb(best['bytes'])} MB; {row['stopped_by']} at "
          f"step {row['steps']}; {row['cpu_seconds']:.0f} CPU s", flush=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_arguments(parser)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=MODES, help="fine-tuning modes to run")
    parser.add_argument("--partitions", nargs="+", choices=PARTITIONS, default=PARTITIONS,
                        help="client partitions to run (tuning is on IID whatever this says)")
    parser.add_argument("--methods", nargs="+", choices=METHODS + list(UNTUNED), default=METHODS + list(UNTUNED),
                        help="algorithms to run (FSL-SAGE is always run)")
    parser.add_argument("--report-only", action="store_true",
                        help="start no run: write the figures from the runs already stored (choices among those)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="seeds of the reference and the final runs (the first also tunes); default 0 1 2")
    parser.add_argument("--round-lengths", type=int, nargs="+", default=None,
                        help="round lengths (local steps) of the tuning grid; default 10 25")
    parser.add_argument("--round-length", type=int, default=None, metavar="N",
                        help="second view: the final runs with rounds of N local steps for every method, at the "
                             "rate each chose; writes compare_algorithms_roundsN.json")
    opts = parser.parse_args(argv)
    cfg = copy.deepcopy(QUICK if opts.quick else FULL)
    cfg.update(modes=opts.modes, partitions=opts.partitions, methods=sorted(set(opts.methods) | {"fsl_sage"}))
    cfg.update({k: v for k, v in (("seeds", opts.seeds), ("round_lengths", opts.round_lengths)) if v})
    cfg["round_length_view"] = round_length_view(parser, opts.round_length)
    out_dir = Path(opts.output_dir)
    stem = "compare_algorithms_quick" if opts.quick else "compare_algorithms"
    view = f"{stem}_rounds{opts.round_length}" if opts.round_length else stem
    # The federated runs here take the library's defaults: their fingerprints hold the ones they read.
    setup = open_bench(opts, cfg, view)  # the view's invocations are its own
    store, clock, data, path, base_info, worker = (setup.store, setup.clock, setup.data, setup.data_file,
                                                   setup.base_info, setup.worker)
    print(f"data {path.name} {data['sizes']}; base: validation loss {base_info['eval_loss_before']:.3f} -> "
          f"{base_info['eval_loss_after']:.3f}", flush=True)
    before = len(store.rows)  # every benchmark of this set-up adds to the same runs file

    def run(tasks: list[Task]) -> None:
        if not opts.report_only:
            run_all(longest_first(tasks), store, opts.jobs, worker, report_line)

    reference_choice, chosen, planned = choose(cfg, store, run)
    # 3: final runs (seed 0 on IID clients is a tuning run already)
    final = [t for t in final_tasks(cfg, chosen) if t not in planned]
    run(final)
    missing = [t for t in dict.fromkeys(planned + final) if not store.get(t)]

    if not opts.report_only:
        store.add_invocation(clock.record(len(store.rows) - before))
    results = {"config": {**cfg, "data_file": path.name, "data": data["sizes"], "jobs": opts.jobs,
                          "threads": opts.threads}, "base": base_info,
               **analyse(cfg, store, chosen, reference_choice),
               "missing_runs": [list(t[:4]) + [dict(t[4])] for t in missing],
               "invocations": store.invocations, "cpu_seconds_by_stage": cpu_by_stage(store, planned, final)}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{view}.json").write_text(json.dumps(results, indent=1))
    plot(results, out_dir / f"{view}.png")
    print(table(results))
    if missing:
        print(f"\n{len(missing)} planned runs are not in {store.path} yet (the JSON lists them under missing_runs)")
    stages = results["cpu_seconds_by_stage"]
    hours = {k: f"{v / 3600:.1f}" for k, v in stages.items() if k != "runs"}
    print(f"\nthe grid's stored runs: {stages['runs']}, {hours['total']} CPU-h (reference {hours['reference']}, "
          f"tuning {hours['tuning']}, final {hours['final']})")
    total = results["invocations"]
    print(f"{sum(i['wall_seconds'] for i in total) / 60:.1f} min wall, "
          f"{sum(i['cpu_seconds'] for i in total) / 60:.1f} CPU-min over {len(total)} invocation(s); "
          f"wrote {out_dir / (view + '.json')} and .png", flush=True)
    return results


if __name__ == "__main__":
    main()
