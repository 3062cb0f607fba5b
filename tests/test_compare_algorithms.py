"""The convergence benchmark and the FSL-SAGE ablation, in their --quick form (CI): every stage runs, the choices
follow the validation curves, and a second invocation reruns nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import curves  # noqa: E402


def run(script: str, tmp_path: Path, *extra: str) -> None:
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--output-dir", str(tmp_path),
                    *extra], check=True, cwd=ROOT, timeout=900)


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

    run("compare_algorithms.py", tmp_path)  # everything is in the runs file: nothing runs again
    again = json.loads((tmp_path / "compare_algorithms_quick.json").read_text())
    assert [i["runs"] for i in again["invocations"]] == [invocation["runs"], 0]
    assert again["settings"] == results["settings"]


@pytest.mark.slow
def test_ablation_quick_runs_each_variant_from_the_reference(tmp_path):
    variants = ["reference", "server_replay=2", "SplitFed-V2"]
    run("ablate_fsl_sage.py", tmp_path, "--jobs", "1", "--variants", *variants)
    results = json.loads((tmp_path / "ablate_fsl_sage_quick.json").read_text())
    rows = results["variants"]
    assert list(rows) == variants
    assert rows["server_replay=2"]["changes"] == {"server_replay": 2}
    # Replayed server steps cost no bytes: at the same step, the same bytes as the reference's run.
    reference, replay = (rows[n]["curves"][0] for n in ("reference", "server_replay=2"))
    common = min(len(reference), len(replay))
    assert [p["bytes"] for p in reference[:common]] == [p["bytes"] for p in replay[:common]]
    assert rows["SplitFed-V2"]["algorithm"] == "splitfed_v2" and rows["SplitFed-V2"]["align_share"]["n"] == 1
