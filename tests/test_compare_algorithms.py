"""The equal-bytes benchmark and the FSL-SAGE ablation, in their --quick form (CI)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
ALGORITHMS = ["fedavg", "splitfed_v1", "splitfed_v2", "cse_fsl", "fsl_sage"]


@pytest.mark.slow
def test_compare_algorithms_quick_runs_every_algorithm_to_the_budget(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare_algorithms.py"), "--quick", "--output-dir",
                    str(tmp_path), "--seeds", "0", "1"], check=True, cwd=ROOT, timeout=900)
    results = json.loads((tmp_path / "compare_algorithms_quick.json").read_text())
    assert set(results["settings"]) == {"iid/lora", "dirichlet/lora", "iid/full", "dirichlet/full"}
    assert (tmp_path / "compare_algorithms_quick.png").is_file()
    assert not (tmp_path / "compare_algorithms_quick.partial.jsonl").exists()
    for key, setting in results["settings"].items():
        base, central = setting["base_eval_loss"], setting["centralized"]["final_eval_loss"]
        assert setting["targets"]["0.9"] == pytest.approx(base - 0.9 * (base - central))
        assert set(setting["algorithms"]) == set(ALGORITHMS)
        for name, runs in setting["algorithms"].items():
            assert len(runs) == (2 if key == "iid/lora" and name in ("splitfed_v2", "cse_fsl", "fsl_sage") else 1)
            for run in runs:
                budget, total = run["budget_bytes"], run["total_bytes"]
                # Stopped by the budget (over it by less than one step's traffic) or by the step cap (under it).
                assert (run["stopped_by"] == "budget") == (total >= budget)
                assert run["stopped_by"] == "step cap" or run["global_steps"] < results["config"]["max_steps"]
                assert run["curve"][0]["bytes"] == 0 and run["curve"][-1]["bytes"] == total
                assert set(run["loss_at_fraction"]) == {"0.1", "0.25", "0.5", "1.0"}
                assert set(run["targets"]) == {"0.8", "0.9"}
                if name == "fsl_sage":
                    assert -1.0 <= run["heldout_cosine"] <= 1.0 and run["align_cosine_after"] is not None


@pytest.mark.slow
def test_ablation_quick_runs_each_variant_once(tmp_path):
    variants = ["reference", "aux_trainable=all", "full: local_steps=25"]
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ablate_fsl_sage.py"), "--quick", "--output-dir",
                    str(tmp_path), "--jobs", "1", "--variants", *variants], check=True, cwd=ROOT, timeout=600)
    rows = json.loads((tmp_path / "ablate_fsl_sage_quick.json").read_text())["variants"]
    assert list(rows) == variants
    assert rows["aux_trainable=all"]["aux_bytes_share"] > rows["reference"]["aux_bytes_share"]  # it sends more
    full = rows["full: local_steps=25"]
    assert full["settings"]["local_steps"] == 25 and not full["lora"]
