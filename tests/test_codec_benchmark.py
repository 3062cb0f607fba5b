"""The codec benchmark in its --quick form (CI): bytes per token from the formats, losses, the time profile."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import load_script


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_codec_benchmark_quick_reports_bytes_losses_and_time(tmp_path):
    QUICK = load_script(ROOT / "benchmarks" / "budget_setup.py", "budget_setup").QUICK

    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "codecs.py"), "--quick", "--repeats", "1",
                    "--output-dir", str(tmp_path)], check=True, cwd=ROOT, timeout=900)
    results = json.loads((tmp_path / "codecs_quick.json").read_text())
    h, batch, vocab = QUICK["n_embd"], QUICK["batch"], results["config"]["vocab_size"]
    assert 255 < vocab <= 65535  # labels travel as int16
    # activations per kept token, from the formats: fp32, 16-bit casts, int8 / packed int4 codes + a bf16 scale
    activation = {"none": 4 * h, "bf16": 2 * h, "fp16": 2 * h, "int8": h + 2, "int4": h // 2 + 2}
    for algorithm, summary in results["codecs"].items():
        for codec, row in summary["codecs"].items():
            assert row["activation_bytes_per_token"] == activation[codec]
            assert row["activation_ratio_to_none"] == activation[codec] / (4 * h)
            if algorithm == "splitfed_v2":
                assert row["gradient_bytes_per_token"] == activation[codec]
            assert abs(row["loss_change_vs_none_pct"][0]) < 1.0
        for run in (results["runs"][f"{algorithm}/{codec}/0"] for codec in activation):
            # beside the activations: a 2-byte label per kept token and a 1-byte length per uploaded row
            rows = run["server_updates"] * batch
            expected = (2 * run["upload_tokens"] + rows) / run["upload_tokens"]
            assert run["smashed_bytes_per_token"] - run["activation_bytes_per_token"] == pytest.approx(expected)
    (timing,) = results["timing"]["runs"]
    for name in ("centralized", "fsl_sage", "fsl_sage_no_heldout"):
        assert timing[name]["tokens"] > 0 and timing[name]["cpu_seconds"] > 0
    assert timing["fsl_sage"]["time_per_step"]["align"] > 0
    assert timing["fsl_sage"]["time_per_step"]["heldout_cosine"] > 0
    assert timing["fsl_sage_no_heldout"]["time_per_step"]["heldout_cosine"] == 0
