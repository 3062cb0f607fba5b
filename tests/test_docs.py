"""The documentation is executable and true to the code: every Python block of the README and docs/ runs offline,
every dotted path they or the docstrings name imports, the configuration table matches FSLSageConfig, and the
README's test command is the one CI runs."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

from transformers import TrainingArguments

from hf_fsl_sage import FSLSageConfig
from tests.doc_blocks import ROOT, SKIP_REASONS, pages, python_blocks


PAGES_WITH_CODE = [p for p in pages() if any(b.skip is None for b in python_blocks(p))]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def test_python_blocks_run_offline(tmp_path: Path) -> None:
    """Each page's blocks run in order, in an empty folder of their own, with the Hub switched off (one interpreter
    for all pages: its start-up is most of a page's time)."""
    env = {**os.environ, **OFFLINE, "HF_HOME": str(tmp_path / "hf_home"), "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1"}
    pages = [str(p) for p in PAGES_WITH_CODE]
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "doc_blocks.py"), *pages], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    ran = re.findall(r"^@@ok (\S+)", done.stdout, re.M)
    failures = done.stdout[done.stdout.find("@@failed"):] if "@@failed" in done.stdout else done.stderr[-3000:]
    assert done.returncode == 0 and len(ran) == len(pages), f"pages that failed:\n{failures}"


def test_every_skip_marker_names_a_known_reason() -> None:
    """Blocks are skipped only for the network, a GPU or a missing flower extra, and each one not run is listed."""
    blocks = [b for p in pages() for b in python_blocks(p)]
    unknown = [f"{b.name} ({b.skip})" for b in blocks if b.skip not in (None, *SKIP_REASONS)]
    assert not unknown, f"skip markers other than {SKIP_REASONS}: {unknown}"


def test_the_quick_start_is_in_the_readme_and_runs() -> None:
    readme = python_blocks(ROOT / "README.md")
    assert len(readme) == 1 and readme[0].skip is None
    assert "AutoPeftModelForCausalLM.from_pretrained" in readme[0].code and ".generate(" in readme[0].code
    assert ROOT / "README.md" in PAGES_WITH_CODE


# ---------------------------------------------------------------- dotted paths
_DOTTED = re.compile(r"\b((?:hf_fsl_sage|e2e_task)(?:\.[A-Za-z_]\w*)+)(?![\w/-])")


def _named_paths() -> dict[str, str]:
    """Every ``hf_fsl_sage.…`` / ``e2e_task.…`` path in the docs, the README, the shipped READMEs and the source
    (docstrings and messages), with where it was first seen. Paths followed by ``/`` (files, format tags) are not
    Python names."""
    files = [*pages(), *ROOT.glob("recipes/**/*.md"), *ROOT.glob("hf_fsl_sage/**/*.py"), *ROOT.glob("recipes/**/*.py"),
             *ROOT.glob("benchmarks/*.py")]
    found: dict[str, str] = {}
    for path in files:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for name in _DOTTED.findall(line):
                found.setdefault(name, f"{path.relative_to(ROOT)}:{number}")
    return found


def _resolve(dotted: str) -> object:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[cut:]:
            obj = getattr(obj, attribute)
        return obj
    raise ModuleNotFoundError(dotted)


def test_every_dotted_path_named_in_docs_and_docstrings_imports() -> None:
    found = _named_paths()
    assert "hf_fsl_sage.transport.codecs.register_codec" in found  # the scan sees docstrings
    broken = []
    flower = importlib.util.find_spec("flwr") is not None
    for name, where in sorted(found.items()):
        if name.startswith("hf_fsl_sage.flower") and not flower:
            continue  # the flower extra is not installed here (CI installs it, and checks these names)
        try:
            _resolve(name)
        except (ImportError, AttributeError) as error:
            broken.append(f"{name} ({where}): {type(error).__name__}: {error}")
    assert not broken, "names that do not import:\n" + "\n".join(broken)


# ---------------------------------------------------------------- the configuration table
def _table_rows(page: Path) -> dict[str, list[str]]:
    rows = {}
    for line in page.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) >= 4:
            rows[cells[0].strip("`")] = cells
    return rows


def test_configuration_table_lists_every_field_with_its_default() -> None:
    """docs/configuration.md has one row per field FSLSageConfig adds to TrainingArguments, with its default."""
    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    added = {f.name: f.default for f in dataclasses.fields(FSLSageConfig) if f.name not in base}
    rows = _table_rows(ROOT / "docs" / "configuration.md")
    assert set(rows) == set(added), f"missing: {set(added) - set(rows)}, not fields: {set(rows) - set(added)}"
    for name, default in added.items():
        assert rows[name][1] == f"`{default!r}`".replace("'", '"'), f"{name}: the table says {rows[name][1]}"
        assert rows[name][3], f"{name}: which algorithms read it?"


def test_the_algorithms_own_settings_are_the_ones_the_table_says_they_read() -> None:
    """A field some algorithm declares in ``own_settings`` is read by exactly the algorithms that declare it (the
    "read by" column), and nothing else; a field none declares is read by every algorithm ("all ...")."""
    from hf_fsl_sage.algorithms import ALGORITHMS
    from hf_fsl_sage.algorithms.registry import fields_read_by

    rows = _table_rows(ROOT / "docs" / "configuration.md")
    for field, cells in rows.items():
        declared = sorted(name for name, cls in ALGORITHMS.items() if field in cls.own_settings)
        readers = sorted(name for name in ALGORITHMS if field in fields_read_by(name, [field]))
        if declared:
            assert sorted(re.findall(r"`(\w+)`", cells[3])) == declared == readers, (field, cells[3])
        else:
            assert readers == sorted(ALGORITHMS), field
    assert fields_read_by("splitfed_v2", ["align_epochs", "cut_layer"]) == ["cut_layer"]
    assert fields_read_by("fsl_sage", ["align_epochs", "cut_layer"]) == ["align_epochs", "cut_layer"]


def test_readme_test_command_is_the_one_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    command = next(line for line in (ROOT / ".ci" / "run").read_text().splitlines() if "pytest" in line)
    assert f"```bash\n{command}\n```" in readme
    assert "mkdocs build --strict" in command
    extras = re.search(r'-e "\.\[([^\]]*)\]"', command)
    assert extras and {"test", "docs", "flower"} <= set(extras.group(1).split(",")), "CI installs every extra it tests"


def test_config_docstring_quotes_no_measured_figures() -> None:
    """Measured figures live in docs/benchmarks.md beside the results they come from; a docstring that quotes them
    goes stale when the benchmark is re-run."""
    figures = re.findall(r"\d+(?:\.\d+)? ?%|\b\d\.\d{3}\b", FSLSageConfig.__doc__)
    assert not figures, f"FSLSageConfig's docstring quotes {figures}: point to docs/benchmarks.md instead"
