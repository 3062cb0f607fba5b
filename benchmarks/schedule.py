"""Noise floor or bias floor: the runs of ``compare_algorithms.py`` again, with the learning rate decaying to zero.

    python benchmarks/schedule.py --jobs 2 --round-lengths 10   # LoRA, IID clients, seeds 0 1 2 (docs/benchmarks.md)
    python benchmarks/schedule.py --methods fsl_sage --seeds 0
    python benchmarks/schedule.py --partitions dirichlet --client-steps 8000   # Dirichlet(0.5) clients
    python benchmarks/schedule.py --modes full --round-length 25 --name schedule_full_rounds25   # rounds of 25
    python benchmarks/schedule.py --quick                   # smoke run

``compare_algorithms.py`` trains every method at a constant learning rate until its validation loss stops
improving, so its converged loss is where two things leave it: the noise of its updates at that rate, and the
bias of its gradient (FSL-SAGE's and CSE-FSL's client halves step on an auxiliary model's estimate). A decaying
rate removes the first: here the centralized reference and each method, with the settings ``compare_algorithms.py``
chose (it runs its tuning stages first if they are not stored yet) and on the same seeds and clients, train a
fixed number of client steps (``--client-steps``, the same for all) while the rate falls linearly from the chosen
one to zero after the warm-up, with no early stop. A gap to the reference that was noise closes; one that stays
is the method's own.

Reported per method (mean and min-max over ``--seeds``), for the decaying runs and the constant-rate ones (read
over the whole run and over its first ``--client-steps``): the test loss at the point of lowest validation loss,
its excess over the reference run the same way and over the converged constant-rate reference, and the bytes and
server updates to get there. The reference is centralized, so one serves every ``--partitions``; the methods use
the settings chosen on IID clients, as ``compare_algorithms.py`` does. ``--round-length N`` runs every method (the
constant-rate runs and the decaying ones) with rounds of N local steps at the rate it chose, as the view of
``compare_algorithms.py --round-length N`` does. Writes ``schedule[_quick].json``
(``--name``) under ``--output-dir`` (per mode, the references, then per partition the methods), and each run as it
ends in the runs file ``compare_algorithms.py`` uses.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

import compare_algorithms as bench
from curves import best_point, crossing, gap_targets, span
from e2e_runs import Task, common_arguments, decayed, open_bench, run_all


CLIENT_STEPS = {"full": 4000, "quick": 16}  # default --client-steps


def figures(runs: list[dict[str, Any]], reference: float, client_steps: int | None = None,
            converged: float | None = None, targets: dict[str, float] | None = None) -> dict[str, Any]:
    """Mean and min-max over ``runs`` of the test loss where the validation loss was lowest (among the evaluations
    up to ``client_steps`` if given), its excess over ``reference`` (and over ``converged``, the constant-rate
    reference, if given), the bytes and server updates to that point and, given ``targets``, the bytes to each
    (``curves.crossing``; None for a run that does not reach it)."""
    kept = _up_to(runs, client_steps)
    best = [best_point(c) for c in kept]
    extra = {} if converged is None else {
        "over_converged_reference": span([b["test_loss"] / converged - 1 for b in best])}
    if targets:
        extra["bytes_to_target"] = {share: span([(crossing(c, loss) or {}).get("value") for c in kept])
                                   for share, loss in targets.items()}
    return {"test_loss": span([b["test_loss"] for b in best]), **extra,
            "over_reference": span([b["test_loss"] / reference - 1 for b in best]),
            "bytes": span([b["bytes"] for b in best]), "server_updates": span([b["server_updates"] for b in best]),
            "client_steps": span([b["client_steps"] for b in best]),
            "cpu_seconds": span([r["cpu_seconds"] for r in runs])}


def _up_to(runs: list[dict[str, Any]], client_steps: int | None) -> list[list[dict[str, Any]]]:
    """Each run's curve, among the evaluations up to ``client_steps`` if given."""
    return [[p for p in r["curve"] if client_steps is None or p["client_steps"] <= client_steps] for r in runs]


def mean_test_loss(runs: list[dict[str, Any]], client_steps: int | None = None) -> float:
    """The mean over ``runs`` of the test loss where the validation loss was lowest (up to ``client_steps``)."""
    return span([best_point(c)["test_loss"] for c in _up_to(runs, client_steps)])["mean"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_arguments(parser)
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds of the runs; default 0 1 2")
    parser.add_argument("--modes", nargs="+", choices=bench.MODES, default=["lora"], help="fine-tuning modes")
    parser.add_argument("--partitions", nargs="+", choices=bench.PARTITIONS, default=["iid"],
                        help="how the training rows are dealt to the clients; default iid")
    parser.add_argument("--methods", nargs="+", choices=bench.SEEDED, default=bench.SEEDED,
                        help="methods to rerun beside the reference")
    parser.add_argument("--round-lengths", type=int, nargs="+", default=None,
                        help="round lengths of compare_algorithms.py's tuning grid to choose among; default 10 25")
    parser.add_argument("--round-length", type=int, default=None, metavar="N",
                        help="run every method with rounds of N local steps at its chosen rate (the tuning unchanged; "
                             "compare_algorithms.py --round-length N's runs are the constant-rate ones)")
    parser.add_argument("--client-steps", type=int, default=None,
                        help="client steps of every decaying run (the rate reaches zero at the last); default "
                             f"{CLIENT_STEPS['full']} ({CLIENT_STEPS['quick']} with --quick)")
    parser.add_argument("--name", default=None,
                        help="name of the JSON written under --output-dir (default schedule[_quick]); the runs go to "
                             "the shared runs file whatever the name")
    opts = parser.parse_args(argv)
    cfg = copy.deepcopy(bench.QUICK if opts.quick else bench.FULL)
    cfg.update(modes=opts.modes, partitions=opts.partitions, methods=opts.methods)
    cfg.update({k: v for k, v in (("seeds", opts.seeds), ("round_lengths", opts.round_lengths)) if v})
    cfg["round_length_view"] = bench.round_length_view(parser, opts.round_length)
    steps = opts.client_steps or CLIENT_STEPS["quick" if opts.quick else "full"]
    if steps < cfg["eval_client_steps"]:
        parser.error(f"--client-steps {steps} is below one evaluation interval ({cfg['eval_client_steps']} client "
                     "steps): give at least that many")
    out_dir = Path(opts.output_dir)
    stem = "schedule_quick" if opts.quick else "schedule"
    # compare_algorithms.py's fingerprints: its stored runs are this benchmark's constant-rate runs.
    setup = open_bench(opts, cfg, stem)
    store, clock, data, path, worker = setup.store, setup.clock, setup.data, setup.data_file, setup.worker
    before = len(store.rows)

    def run(tasks: list[Task]) -> None:
        run_all(bench.longest_first(tasks), store, opts.jobs, worker, bench.report_line)

    reference_choice, chosen, _ = bench.choose(cfg, store, run)
    constant = {(mode, "centralized"): bench.reference_tasks_at(cfg, reference_choice[mode]) for mode in opts.modes}
    constant |= {(mode, partition, method): [t for t in bench.final_tasks(cfg, chosen)
                                             if t[:3] == (method, mode, partition)]
                 for mode in opts.modes for partition in opts.partitions for method in opts.methods}
    decaying = {key: [decayed(t, steps) for t in tasks] for key, tasks in constant.items()}
    run([t for tasks in constant.values() for t in tasks] + [t for tasks in decaying.values() for t in tasks])
    store.add_invocation(clock.record(len(store.rows) - before))

    modes: dict[str, Any] = {}
    for mode in opts.modes:
        out = modes[mode] = {"partitions": {p: {"methods": {}} for p in opts.partitions}}
        converged_runs = [store.get(t) for t in constant[(mode, "centralized")]]
        converged = mean_test_loss(converged_runs)
        out["base_test_loss"] = base = converged_runs[0]["curve"][0]["test_loss"]
        out["targets"] = targets = gap_targets(base, converged)
        # constant_at_horizon: the constant-rate runs read up to the decaying runs' last step (the same horizon)
        for label, runs_of, upto in (("constant", constant, None), ("constant_at_horizon", constant, steps),
                                     ("decaying", decaying, None)):
            ref_runs = [store.get(t) for t in runs_of[(mode, "centralized")]]
            ref = mean_test_loss(ref_runs, upto)
            out[f"reference_{label}"] = figures(ref_runs, ref, upto, converged)
            for partition in opts.partitions:
                methods = out["partitions"][partition]["methods"]
                for method in opts.methods:
                    tasks = runs_of[(mode, partition, method)]
                    runs = [store.get(t) for t in tasks]
                    methods.setdefault(method, {"settings": dict(tasks[0][4])})
                    curves = {"curves": [r["curve"] for r in runs]} if upto is None else {}
                    methods[method][label] = {**figures(runs, ref, upto, converged, targets), **curves}
        out["reference_learning_rate"] = dict(reference_choice[mode][4])["learning_rate"]
    results = {"config": {**cfg, "data_file": path.name, "data": data["sizes"], "client_steps": steps,
                          "seeds": cfg["seeds"]}, "modes": modes, "invocations": store.invocations}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{opts.name or stem}.json").write_text(json.dumps(results, indent=1))
    print(table(results))
    return results


def table(results: dict[str, Any]) -> str:
    steps = results["config"]["client_steps"]
    labels = {"constant": "constant", "constant_at_horizon": f"constant, first {steps} client steps",
              "decaying": "decaying"}
    lines = []
    for mode, out in results["modes"].items():
        lines += [f"\n== {mode}: constant rate until the validation loss stops improving, or the rate decaying "
                  f"linearly to zero over {steps} client steps",
                  "| method | clients | schedule | test loss | over its reference | over the converged reference | "
                  "MB there | server updates | MB to 95 % | CPU s |", "|---" * 10 + "|"]
        for label in labels:
            ref = out[f"reference_{label}"]
            lines.append(f"| centralized | all | {labels[label]} | {bench.cell(ref['test_loss'])} | — | "
                         f"{bench.cell(ref['over_converged_reference'], lambda v: f'{v:+.2%}')} | — | — | — | "
                         f"{bench.cell(ref['cpu_seconds'], lambda v: f'{v:.0f}')} |")
        for partition, methods in out["partitions"].items():
            for method, row in methods["methods"].items():
                for label in labels:
                    r = row[label]
                    lines.append(f"| {method} | {partition} | {labels[label]} | {bench.cell(r['test_loss'])} | "
                                 f"{bench.cell(r['over_reference'], lambda v: f'{v:+.2%}')} | "
                                 f"{bench.cell(r['over_converged_reference'], lambda v: f'{v:+.2%}')} | "
                                 f"{bench.cell(r['bytes'], bench.mb)} | "
                                 f"{bench.cell(r['server_updates'], lambda v: f'{v:.0f}')} | "
                                 f"{bench.cell(r['bytes_to_target']['0.95'], bench.mb)} | "
                                 f"{bench.cell(r['cpu_seconds'], lambda v: f'{v:.0f}')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
