"""The convergence benchmark and the FSL-SAGE ablation, in their --quick form (CI): every stage runs, the choices
follow the validation curves, and a second invocation reruns nothing."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import curves  # noqa: E402


def run(script: str, tmp_path: Path, *extra: str, in_process: bool = False) -> None:
    """``script --quick``, as a command or (``in_process``: no start-up, and no worker pool with ``--jobs 1``) by
    calling its ``main`` here."""
    argv = ["--quick", "--output-dir", str(tmp_path), *extra]
    if in_process:
        importlib.import_module(script.removesuffix(".py")).main(argv)
    else:
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *argv], check=True, cwd=ROOT, timeout=900)


@pytest.mark.slow
def test_compare_algorithms_quick_runs_every_stage_and_resumes(tmp_path):
    run("compare_algorithms.py", tmp_path)
    results = json.loads((tmp_path / "compare_algorithms_quick.json").read_text())
    runs_file = tmp_path / "e2e_runs_quick.jsonl"
    assert (tmp_path / "compare_algorithms_quick.png").is_file()
    cfg = results["config"]
    for mode, ref in results["references"].items():
        # The reference's learning rate is the one with the lowest validation loss, run with every seed.
        assert float(ref["learning_rate"]) == float(min(ref["grid"], key=ref["grid"].get))
        assert ref["test_loss"]["n"] == len(cfg["seeds"])
        base, ceiling = ref["base_test_loss"], ref["test_loss"]["mean"]
        assert ref["targets"]["0.95"] == pytest.approx(base - 0.95 * (base - ceiling))
        for method, tuned in results["tuning"][mode].items():
            assert json.dumps(tuned["chosen"]) == min(tuned["grid"], key=tuned["grid"].get)
    assert set(results["settings"]) == {"iid/lora", "dirichlet/lora", "iid/full", "dirichlet/full"}
    for key, setting in results["settings"].items():
        for method, row in setting["methods"].items():
            assert len(row["runs"]) == (len(cfg["seeds"]) if method in ("splitfed_v2", "cse_fsl", "fsl_sage") else 1)
            assert row["settings"] == results["tuning"][key.split("/")[1]]["splitfed_v2" if method == "splitfed_v1"
                                                                          else method]["chosen"]
            for summary, curve in zip(row["runs"], row["curves"]):
                best = curves.best_point(curve)
                assert summary["test_loss"] == best["test_loss"] and summary["bytes"] == best["bytes"]
                assert curve[0]["bytes"] == 0 and all(a["bytes"] <= b["bytes"] for a, b in zip(curve, curve[1:]))
                assert summary["stopped_by"] in ("early stopping", "step cap")
    invocation = results["invocations"][0]
    assert invocation["runs"] == len(runs_file.read_text().splitlines()) - 1 > 0
    assert invocation["cpu_seconds"] > 0 and invocation["wall_seconds"] > 0

    run("compare_algorithms.py", tmp_path, in_process=True)  # everything is in the runs file: nothing runs again
    again = json.loads((tmp_path / "compare_algorithms_quick.json").read_text())
    assert [i["runs"] for i in again["invocations"]] == [invocation["runs"], 0]
    assert again["settings"] == results["settings"]

    # The grid's CPU time counts its own runs once each, not the other benchmarks' in the same runs file.
    entries = [json.loads(line) for line in runs_file.read_text().splitlines()]
    stored = [e["row"]["cpu_seconds"] for e in entries if "row" in e]
    stages = again["cpu_seconds_by_stage"]
    assert stages["runs"] == len(stored) and stages["total"] == pytest.approx(sum(stored))
    assert stages["total"] == pytest.approx(stages["reference"] + stages["tuning"] + stages["final"])
    assert 0 < stages["reference"] < stages["total"] and 0 < stages["final"] < stages["total"]
    other = {**next(e for e in entries if "row" in e), "key": json.dumps(["fsl_sage", "lora", "iid", 7, []])}
    with runs_file.open("a") as f:
        f.write(json.dumps(other) + "\n")
    run("compare_algorithms.py", tmp_path, "--report-only", in_process=True)
    assert json.loads((tmp_path / "compare_algorithms_quick.json").read_text())["cpu_seconds_by_stage"] == stages
    runs_file.write_text("\n".join(json.dumps(e) for e in entries) + "\n")

    # --report-only starts nothing and reports the runs there are: without FSL-SAGE's, the others as before.
    kept = [line for line in runs_file.read_text().splitlines() if "fsl_sage" not in line]
    runs_file.write_text("\n".join(kept) + "\n")
    run("compare_algorithms.py", tmp_path, "--report-only", in_process=True)
    partial = json.loads((tmp_path / "compare_algorithms_quick.json").read_text())
    assert runs_file.read_text().splitlines() == kept
    assert {m for m, *_ in partial["missing_runs"]} == {"fsl_sage"} and len(partial["invocations"]) == 2
    for key, setting in partial["settings"].items():
        assert "fsl_sage" not in setting["methods"] and setting["goal"] is None
        assert setting["methods"] == {m: r for m, r in results["settings"][key]["methods"].items() if m != "fsl_sage"}

    # --round-length: the same tuning, the final runs with rounds of 3 local steps (a length outside the grid, so
    # every one of them is new) at each method's chosen rate, in a JSON of its own.
    runs_file.write_text("\n".join(json.dumps(e) for e in entries) + "\n")
    main_json = (tmp_path / "compare_algorithms_quick.json").read_text()
    run("compare_algorithms.py", tmp_path, "--round-length", "3", "--modes", "lora", "--partitions", "iid",
        "--methods", "splitfed_v2", "fsl_sage", in_process=True)
    view = json.loads((tmp_path / "compare_algorithms_quick_rounds3.json").read_text())
    assert (tmp_path / "compare_algorithms_quick_rounds3.png").is_file()
    assert (tmp_path / "compare_algorithms_quick.json").read_text() == main_json
    assert view["tuning"]["lora"] == {m: results["tuning"]["lora"][m] for m in ("splitfed_v2", "fsl_sage")}
    rows = view["settings"]["iid/lora"]["methods"]
    assert set(rows) == {"splitfed_v2", "fsl_sage"}
    for method, row in rows.items():
        chosen = results["tuning"]["lora"][method]["chosen"]
        assert row["settings"] == {"learning_rate": chosen["learning_rate"], "local_steps": 3}
        assert row["seeds"] == cfg["seeds"]
        # 3 local steps on 2 clients: the rounds end at client steps 6, 12, ...
        assert {p["client_steps"] % 6 for curve in row["curves"] for p in curve} == {0}
    assert [i["runs"] for i in view["invocations"]] == [2 * len(cfg["seeds"])]


@pytest.mark.parametrize("script, extra", [("compare_algorithms", ["--report-only"]), ("schedule", [])])
def test_refuses_a_round_without_local_steps(tmp_path, capsys, script, extra):
    with pytest.raises(SystemExit):
        importlib.import_module(script).main(["--quick", "--output-dir", str(tmp_path), *extra, "--round-length", "0"])
    assert not any(tmp_path.iterdir())  # refused before anything was written
    assert "--round-length 0: a round needs at least one local step" in capsys.readouterr().err


@pytest.mark.slow
def test_ablation_quick_runs_each_variant_from_the_reference(tmp_path):
    variants = ["reference", "server_update_interval=1", "SplitFed-V2"]
    run("ablate_fsl_sage.py", tmp_path, "--jobs", "1", "--variants", *variants, in_process=True)
    results = json.loads((tmp_path / "ablate_fsl_sage_quick.json").read_text())
    rows = results["variants"]
    assert list(rows) == variants
    assert rows["server_update_interval=1"]["changes"] == {"server_update_interval": 1}
    # Rounds of 2 local steps: the reference (an upload every 5 steps) uploads once a round, the variant twice.
    reference, every = (rows[n]["curves"][0] for n in ("reference", "server_update_interval=1"))
    common = min(len(reference), len(every))
    assert common > 1 and [2 * p["server_updates"] for p in reference[1:common]] == [
        p["server_updates"] for p in every[1:common]]
    assert rows["SplitFed-V2"]["algorithm"] == "splitfed_v2" and rows["SplitFed-V2"]["align_share"]["n"] == 1


@pytest.mark.slow
def test_schedule_quick_decays_the_rate_to_zero_over_the_horizon_without_stopping(tmp_path):
    run("schedule.py", tmp_path, "--jobs", "1", "--methods", "fsl_sage", "--seeds", "0", "--client-steps", "40",
        "--partitions", "iid", "dirichlet", in_process=True)
    out = json.loads((tmp_path / "schedule_quick.json").read_text())["modes"]["lora"]
    stored = {e["key"]: e["row"] for e in map(json.loads, (tmp_path / "e2e_runs_quick.jsonl").read_text().splitlines())
              if "key" in e}

    def row(name: str, partition: str, decay: int | None, **chosen) -> dict:
        items = sorted(dict(chosen, **({"decay_client_steps": decay} if decay else {})).items())
        return stored[json.dumps([name, "lora", partition, 0, [list(i) for i in items]])]

    reference_lr = out["reference_learning_rate"]
    chosen = out["partitions"]["iid"]["methods"]["fsl_sage"]["settings"]
    # 40 client steps: 40 steps of the unsplit model, 20 global steps of 2 clients; the rate is 0 after the last,
    # and no early stop (the quick preset's patience is 8 client steps) cuts the horizon short.
    for decayed, steps in ((row("centralized", "all", 40, learning_rate=reference_lr), 40),
                           (row("fsl_sage", "iid", 40, **chosen), 20)):
        assert (decayed["steps"], decayed["stopped_by"], decayed["last_learning_rate"]) == (steps, "step cap", 0.0)
        assert decayed["curve"][-1]["client_steps"] == 40
    assert row("fsl_sage", "iid", None, **chosen)["last_learning_rate"] > 0
    converged = curves.best_point(row("centralized", "all", None, learning_rate=reference_lr)["curve"])["test_loss"]
    for label, decay in (("constant", None), ("decaying", 40)):
        ref = curves.best_point(row("centralized", "all", decay, learning_rate=reference_lr)["curve"])["test_loss"]
        mine = curves.best_point(row("fsl_sage", "iid", decay, **chosen)["curve"])["test_loss"]
        assert out[f"reference_{label}"]["test_loss"]["mean"] == ref
        sage = out["partitions"]["iid"]["methods"]["fsl_sage"][label]
        assert sage["test_loss"]["mean"] == mine and sage["over_reference"]["mean"] == pytest.approx(mine / ref - 1)
        assert sage["over_converged_reference"]["mean"] == pytest.approx(mine / converged - 1)
    # Dirichlet clients: the settings chosen on IID clients, their own runs, the same reference.
    skewed = out["partitions"]["dirichlet"]["methods"]["fsl_sage"]
    assert skewed["settings"] == chosen
    for label, decay in (("constant", None), ("decaying", 40)):
        ref = curves.best_point(row("centralized", "all", decay, learning_rate=reference_lr)["curve"])["test_loss"]
        mine = curves.best_point(row("fsl_sage", "dirichlet", decay, **chosen)["curve"])["test_loss"]
        assert skewed[label]["test_loss"]["mean"] == mine and skewed[label]["over_reference"]["mean"] == pytest.approx(
            mine / ref - 1)
    assert mine != out["partitions"]["iid"]["methods"]["fsl_sage"]["decaying"]["test_loss"]["mean"]

    # --round-length 3 (outside the quick grid): both schedules rerun with rounds of 3 local steps at the chosen
    # rate, the tuning and the reference reused, in a JSON of its own.
    before = len(stored)
    run("schedule.py", tmp_path, "--jobs", "1", "--methods", "fsl_sage", "--seeds", "0", "--client-steps", "36",
        "--partitions", "iid", "--round-length", "3", "--name", "rounds3", in_process=True)
    view = json.loads((tmp_path / "rounds3.json").read_text())["modes"]["lora"]
    stored = {e["key"]: e["row"] for e in map(json.loads, (tmp_path / "e2e_runs_quick.jsonl").read_text().splitlines())
              if "key" in e}
    at3 = dict(chosen, local_steps=3)
    assert view["partitions"]["iid"]["methods"]["fsl_sage"]["settings"] == at3 and chosen["local_steps"] != 3
    assert len(stored) == before + 3  # the reference decayed over 36 client steps, FSL-SAGE constant and decaying
    for decay in (None, 36):
        # 3 local steps on 2 clients: the rounds, and so the evaluations, end at client steps 6, 12, ...
        curve = row("fsl_sage", "iid", decay, **at3)["curve"]
        assert {p["client_steps"] % 6 for p in curve} == {0} and len(curve) > 2
    assert row("fsl_sage", "iid", 36, **at3)["last_learning_rate"] == 0.0


def test_schedule_reads_constant_runs_up_to_the_horizon_by_their_validation_loss():
    import schedule

    def point(client_steps, validation, test):
        return {"client_steps": client_steps, "validation_loss": validation, "test_loss": test, "bytes": client_steps,
                "server_updates": client_steps // 10}

    # Lowest validation loss: 2.0 at 80 client steps up to 100, 1.5 at 160 over the whole run.
    run_ = {"curve": [point(0, 3.0, 3.1), point(80, 2.0, 2.2), point(160, 1.5, 1.6)], "cpu_seconds": 7.0}
    whole, upto = schedule.figures([run_], 2.0), schedule.figures([run_], 2.0, client_steps=100)
    assert (whole["test_loss"]["mean"], whole["bytes"]["mean"]) == (1.6, 160)
    assert whole["over_reference"]["mean"] == pytest.approx(-0.2)
    assert (upto["test_loss"]["mean"], upto["bytes"]["mean"], upto["server_updates"]["mean"]) == (2.2, 80, 8)
    assert upto["over_reference"]["mean"] == pytest.approx(0.1)
    # Test loss 2.2 at 80 MB-units, 1.6 at 160: 1.9 is half-way, in log-bytes sqrt(80 x 160); not within 100 steps.
    targets = {"0.95": 1.9}
    whole, upto = (schedule.figures([run_], 2.0, n, 2.0, targets)["bytes_to_target"]["0.95"] for n in (None, 100))
    assert whole["mean"] == pytest.approx((80 * 160) ** 0.5) and (upto["mean"], upto["missing"]) == (None, 1)


@pytest.mark.slow
def test_ablation_in_another_mode_and_partition_uses_that_modes_reference_and_rate(tmp_path):
    run("ablate_fsl_sage.py", tmp_path, "--jobs", "1", "--variants", "reference", "--mode", "full", "--partition",
        "dirichlet", in_process=True)
    results = json.loads((tmp_path / "ablate_fsl_sage_quick.json").read_text())
    runs = [(json.loads(e["key"]), e["row"]) for e in map(json.loads, (tmp_path / "e2e_runs_quick.jsonl")
                                                          .read_text().splitlines()) if "key" in e]
    # no LoRA run at all: the variant trains every weight on Dirichlet clients at the full-fine-tuning rate
    assert {key[1] for key, _ in runs} == {"full"}
    variant = [key for key, _ in runs if key[0] == "fsl_sage"]
    assert [k[:4] for k in variant] == [["fsl_sage", "full", "dirichlet", 0]]
    assert dict(map(tuple, variant[0][4]))["learning_rate"] == 1e-3
    # the yardstick: the centralized full-fine-tuning runs at their lowest-validation rate, read at their best point
    refs = [(key, row) for key, row in runs if key[0] == "centralized"]
    chosen = min(refs, key=lambda kr: curves.best_point(kr[1]["curve"])["validation_loss"])[0][4]
    at_chosen = [curves.best_point(r["curve"])["test_loss"] for k, r in refs if k[4] == chosen]
    assert results["ceiling"]["mean"] == pytest.approx(sum(at_chosen) / len(at_chosen))
    assert (results["config"]["mode"], results["config"]["partition"]) == ("full", "dirichlet")


@pytest.mark.slow
def test_ablation_with_client_steps_decays_every_variant_over_that_horizon(tmp_path):
    run("ablate_fsl_sage.py", tmp_path, "--jobs", "1", "--variants", "server_update_interval=1", "--client-steps",
        "40", in_process=True)
    results = json.loads((tmp_path / "ablate_fsl_sage_quick.json").read_text())
    assert results["config"]["decay_client_steps"] == 40
    rows = [json.loads(line) for line in (tmp_path / "e2e_runs_quick.jsonl").read_text().splitlines()]
    decayed = [r["row"] for r in rows if "decay_client_steps" in r.get("key", "")]
    # one run, of 20 global steps on 2 clients, to a rate of 0 (the centralized yardstick keeps its constant rate)
    assert [(r["steps"], r["stopped_by"], r["last_learning_rate"]) for r in decayed] == [(20, "step cap", 0.0)]
    assert results["variants"]["server_update_interval=1"]["runs"][0]["client_steps"] <= 40
