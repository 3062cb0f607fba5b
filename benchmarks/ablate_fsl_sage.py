"""What caps FSL-SAGE's quality, and what its alignment costs: controlled runs to convergence, one change at a time.

    python benchmarks/ablate_fsl_sage.py --jobs 2                   # every variant (see docs/benchmarks.md)
    python benchmarks/ablate_fsl_sage.py --variants reference "server_update_interval=1" --seeds 0 1 2
    python benchmarks/ablate_fsl_sage.py --variants reference "server_update_interval=1" --client-steps 4000
                                                                    # the same with a rate decaying to zero
    python benchmarks/ablate_fsl_sage.py --mode full --variants "local_steps=25" --client-steps 4000
                                                                    # every weight training
    python benchmarks/ablate_fsl_sage.py --quick                    # smoke run

Same data, base model, clients and protocol as ``compare_algorithms.py`` (``e2e_runs``: validation and test
loss at the end of every round, stop when the validation loss stops improving): LoRA (``--mode``) on IID
clients (``--partition``). Every variant changes one thing from ``REFERENCE`` (FSL-SAGE with every setting it
reads written out, so that the figures do not move with the library's defaults, at the learning rate
``compare_algorithms.py`` chooses for it in the mode) and states the hypothesis it tests. The yardstick is the
converged centralized reference of ``compare_algorithms.py`` in that mode (same preset and runs, stored with the
variants).

Reported per variant (mean and min-max over ``--seeds``): the converged test loss, the share of the gap
between the base model and the reference it closes, the bytes and server updates to get there, the bytes to
the 95 % target, the share of the training time spent aligning, and the CPU time. Writes
``ablate_fsl_sage[_quick].json`` under ``--output-dir``, and each run as it ends in ``e2e_runs[_quick].jsonl`` there.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

import compare_algorithms as bench
from curves import best_point, gap_targets, span
from e2e_runs import common_arguments, decayed, open_bench, run_all

from hf_fsl_sage.algorithms.registry import fields_read_by


# the reference's learning rate: compare_algorithms.py's choice for FSL-SAGE in the mode
LEARNING_RATE = {"lora": 3e-3, "full": 1e-3}
REFERENCE = {"local_steps": 10, "server_update_interval": 5, "aux_num_layers": 3, "aux_init": "server_blocks",
             "aux_trainable": "adapters", "align_interval": 2, "align_epochs": 5, "align_buffer_size": 16}
QUICK_REFERENCE = {**REFERENCE, "local_steps": 2, "aux_num_layers": 1, "align_interval": 1, "align_epochs": 1,
                   "align_buffer_size": 4}

# name -> (hypothesis, algorithm, changes from the reference)
VARIANTS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "reference": ("", "fsl_sage", {}),
    # where the plateau comes from
    "server_update_interval=1": ("the server's updates per example cap the quality: uploading every step "
                                 "(5x the server updates) ends lower", "fsl_sage", {"server_update_interval": 1}),
    "server_update_interval=2": ("as above, in between", "fsl_sage", {"server_update_interval": 2}),
    "server_update_interval=1, aux_num_layers=5": (
        "with an upload every step, what still separates FSL-SAGE from SplitFed-V2 is the estimate's depth: an "
        "auxiliary model as deep as the server half closes it", "fsl_sage",
        {"server_update_interval": 1, "aux_num_layers": 5}),
    "server_replay_steps=4": ("the number of the server's updates, not fresh uploads, caps the quality: four more "
                              "server steps per upload on buffered ones (as many updates as uploading every step, "
                              "no bytes) end lower", "fsl_sage", {"server_replay_steps": 4}),
    "server_replay_steps=1": ("as above, one more server step per upload", "fsl_sage", {"server_replay_steps": 1}),
    "server_update_interval=3": ("more uploads per round, as in the main job's preset (at local steps 1, 4, 7 and "
                                 "10 of each round: 4 instead of 2) end lower for about 2x the bytes", "fsl_sage",
                                 {"server_update_interval": 3}),
    "server_update_interval=3, server_replay_steps=4": (
        "the main job's preset on the benchmark's scale: a second upload per round and four replayed server steps "
        "per upload", "fsl_sage", {"server_update_interval": 3, "server_replay_steps": 4}),
    "align_epochs=0": ("the auxiliary estimate's bias caps the client half: without alignment it ends higher",
                       "fsl_sage", {"align_epochs": 0}),
    "aux_num_layers=1": ("a shallower auxiliary model estimates worse and ends higher", "fsl_sage",
                         {"aux_num_layers": 1}),
    "aux_num_layers=5": ("an auxiliary model as deep as the server half (all 5 of its blocks) estimates better and "
                         "ends lower, for 5/3 of the auxiliary compute", "fsl_sage", {"aux_num_layers": 5}),
    "aux_init=random, aux_trainable=all": ("the paper's auxiliary model (random blocks, all weights aligned)",
                                           "fsl_sage", {"aux_init": "random", "aux_trainable": "all"}),
    "num_clients=1": ("averaging client halves (FedAvg) costs quality: one client with all the data ends lower",
                      "fsl_sage", {"num_clients": 1}),
    "local_steps=25": ("longer rounds: fewer averagings of the client halves", "fsl_sage", {"local_steps": 25}),
    "local_steps=25, server_update_interval=3, server_replay_steps=4": (
        "the main job's preset at rounds of 25: with full fine-tuning, where the client half's FedAvg is most of "
        "FSL-SAGE's bytes, more uploads and replayed server steps buy quality for few bytes", "fsl_sage",
        {"local_steps": 25, "server_update_interval": 3, "server_replay_steps": 4}),
    "local_steps=25, server_update_interval=3": (
        "its uploads alone: 9 a round instead of 5", "fsl_sage", {"local_steps": 25, "server_update_interval": 3}),
    "local_steps=25, server_update_interval=2": (
        "more uploads still: 13 a round", "fsl_sage", {"local_steps": 25, "server_update_interval": 2}),
    "local_steps=25, server_update_interval=1": (
        "an upload every local step: 25 a round", "fsl_sage", {"local_steps": 25, "server_update_interval": 1}),
    "local_steps=25, server_replay_steps=4": (
        "its replayed server steps alone", "fsl_sage", {"local_steps": 25, "server_replay_steps": 4}),
    "learning_rate=1e-3": ("the schedule: a smaller step", "fsl_sage", {"learning_rate": 1e-3}),
    "learning_rate=1e-2": ("the schedule: a larger step", "fsl_sage", {"learning_rate": 1e-2}),
    # baselines with the same settings
    "CSE-FSL": ("the same without alignment, the auxiliary model trained by the client", "cse_fsl", {}),
    "SplitFed-V2": ("the true gradient, every step", "splitfed_v2", {}),
    # alignment cost (the library's defaults)
    "align every 10 rounds, 40 epochs, 64 sequences (paper)": ("alignment settings", "fsl_sage",
                                                               {"align_interval": 10, "align_epochs": 40,
                                                                "align_buffer_size": 64}),
    "align every 10 rounds, 5 epochs, 16 sequences": ("alignment settings", "fsl_sage", {"align_interval": 10}),
    "align every 5 rounds, 5 epochs, 32 sequences": ("alignment settings", "fsl_sage",
                                                     {"align_interval": 5, "align_buffer_size": 32}),
    "align every 2 rounds, 2 epochs, 16 sequences": ("alignment settings", "fsl_sage", {"align_epochs": 2}),
    # alignment with the paper's auxiliary model, which starts far from the server's blocks
    "aux_init=random, aux_trainable=all, align_epochs=0": (
        "with random auxiliary blocks, alignment is what makes the estimate: without it the client half ends "
        "higher", "fsl_sage", {"aux_init": "random", "aux_trainable": "all", "align_epochs": 0}),
    "aux_init=random, aux_trainable=all, align every 10 rounds, 5 epochs, 16 sequences": (
        "alignment settings, random auxiliary blocks", "fsl_sage",
        {"aux_init": "random", "aux_trainable": "all", "align_interval": 10}),
    "aux_init=random, aux_trainable=all, align every 10 rounds, 40 epochs, 64 sequences (paper)": (
        "alignment settings, random auxiliary blocks", "fsl_sage",
        {"aux_init": "random", "aux_trainable": "all", "align_interval": 10, "align_epochs": 40,
         "align_buffer_size": 64}),
}


def task(name: str, seed: int, reference: dict[str, Any], mode: str = "lora", partition: str = "iid"):
    """The run of variant ``name``: its algorithm, with the reference's settings that algorithm reads."""
    _, algorithm, changes = VARIANTS[name]
    settings = {**reference, **changes}
    items = tuple(sorted((k, settings[k]) for k in fields_read_by(algorithm, settings)))
    return algorithm, mode, partition, seed, items


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_arguments(parser)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of the runs")
    parser.add_argument("--reference-seeds", type=int, nargs="+", default=None,
                        help="seeds of the centralized reference; default compare_algorithms.py's")
    parser.add_argument("--mode", choices=bench.MODES, default="lora",
                        help="fine-tuning mode: LoRA adapters or every weight; default lora")
    parser.add_argument("--partition", choices=bench.PARTITIONS, default="iid",
                        help="how the training rows are dealt to the clients; default iid")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="NAME")
    parser.add_argument("--name", default=None,
                        help="name of the JSON written under --output-dir (default ablate_fsl_sage[_quick]); the "
                             "runs go to the shared runs file whatever the name")
    parser.add_argument("--client-steps", type=int, default=None,
                        help="train every variant this many client steps with the rate decaying linearly to zero "
                             "instead of stopping early (as schedule.py does); the yardstick stays the converged "
                             "constant-rate reference")
    opts = parser.parse_args(argv)
    cfg = copy.deepcopy(bench.QUICK if opts.quick else bench.FULL)
    cfg["seeds"] = opts.reference_seeds or cfg["seeds"]
    reference = {**(QUICK_REFERENCE if opts.quick else REFERENCE), "learning_rate": LEARNING_RATE[opts.mode]}
    out_dir = Path(opts.output_dir)
    stem = "ablate_fsl_sage_quick" if opts.quick else "ablate_fsl_sage"
    # Every variant gives each setting it depends on: its runs, like the centralized ones, do not depend on the
    # library's defaults (and share the runs file, and the centralized reference, with compare_algorithms.py).
    setup = open_bench(opts, cfg, stem, library_defaults=False)
    store, clock, data, path, worker = setup.store, setup.clock, setup.data, setup.data_file, setup.worker
    before = len(store.rows)

    # The yardstick: the converged reference at the learning rate compare_algorithms chooses in this mode.
    refs = bench.reference_grid(cfg)[opts.mode]
    run_all(refs, store, opts.jobs, worker, bench.report_line)
    ceiling_tasks = bench.reference_tasks_at(cfg, bench.best_task(refs, store))
    tasks = {(name, seed): task(name, seed, reference, opts.mode, opts.partition)
             for name in opts.variants for seed in opts.seeds}
    if opts.client_steps:
        tasks = {key: decayed(t, opts.client_steps) for key, t in tasks.items()}
    run_all(bench.longest_first(ceiling_tasks + list(tasks.values())), store, opts.jobs, worker, bench.report_line)
    store.add_invocation(clock.record(len(store.rows) - before))

    ceiling_runs = [store.get(t) for t in ceiling_tasks]
    base = ceiling_runs[0]["curve"][0]["test_loss"]
    ceiling = span([best_point(r["curve"])["test_loss"] for r in ceiling_runs])
    targets = gap_targets(base, ceiling["mean"])
    rows = {}
    for name in opts.variants:
        runs = [store.get(tasks[(name, seed)]) for seed in opts.seeds]
        per_run = [bench.summarize(r, base, ceiling["mean"], targets, cfg["budgets_mb"][opts.mode]) for r in runs]
        rows[name] = {"hypothesis": VARIANTS[name][0], "algorithm": VARIANTS[name][1],
                      "changes": VARIANTS[name][2], "seeds": opts.seeds, "runs": per_run,
                      "curves": [r["curve"] for r in runs], **bench.aggregate(per_run)}
    results = {"config": {**cfg, "data_file": path.name, "data": data["sizes"],
                          "decay_client_steps": opts.client_steps, "mode": opts.mode,
                          "partition": opts.partition}, "reference_settings": reference,
               "ceiling": ceiling, "base_test_loss": base, "targets": targets, "variants": rows,
               "invocations": store.invocations}
    (out_dir / f"{opts.name or stem}.json").write_text(json.dumps(results, indent=1))
    print(table(results))
    return results


def table(results: dict[str, Any]) -> str:
    ref = results["ceiling"]
    lines = [f"centralized reference {bench.cell(ref)} (base {results['base_test_loss']:.4f}); 95 % target "
             f"{results['targets']['0.95']:.4f}",
             "| variant | converged test loss | gap closed | over reference | MB there | server updates | "
             "MB to 95 % | align share | CPU s |", "|---" * 9 + "|"]
    for name, row in results["variants"].items():
        cells = [bench.cell(row["test_loss"]), bench.cell(row["gap_closed"], lambda v: f"{v:.1%}"),
                 bench.cell(row["over_reference"], lambda v: f"{v:+.2%}"), bench.cell(row["bytes"], bench.mb),
                 bench.cell(row["server_updates"], lambda v: f"{v:.0f}"),
                 bench.cell(row["bytes_to_target"]["0.95"], bench.mb),
                 bench.cell(row["align_share"], lambda v: f"{v:.0%}"),
                 bench.cell(row["cpu_seconds"], lambda v: f"{v:.0f}")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
