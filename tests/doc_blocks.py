"""The fenced Python blocks of the README and the documentation pages, and a runner for one page's blocks.

A block preceded (on its previous non-blank line) by ``<!-- skip: needs-network -->`` or
``<!-- skip: needs-gpu -->`` is not run; one preceded by ``<!-- skip: needs-flower -->`` runs where the flower
extra is installed (CI installs it) and is skipped where it is not; any other skip marker is an error.

    python tests/doc_blocks.py README.md docs/saving.md    # each page's blocks in order, in a folder of its own
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
SKIP_REASONS = ("needs-network", "needs-gpu", "needs-flower")
_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
_SKIP = re.compile(r"^<!--\s*skip:\s*(.*?)\s*-->$")


@dataclass(frozen=True)
class Block:
    page: str  # relative to the repository root
    line: int  # of the opening fence
    code: str
    skip: str | None  # the marker's reason, or None

    @property
    def name(self) -> str:
        return f"{self.page}:{self.line}"


def pages() -> list[Path]:
    """The README and every documentation page."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def python_blocks(path: Path) -> list[Block]:
    """The fenced ``python`` blocks of a Markdown file, in order, with their skip markers."""
    lines = path.read_text().splitlines()
    blocks, i, previous = [], 0, ""
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            if lines[i].strip():
                previous = lines[i].strip()
            i += 1
            continue
        indent, fence, language = match.groups()
        end = i + 1
        while end < len(lines) and not lines[end].strip().startswith(fence):
            end += 1
        if language == "python":
            marker = _SKIP.match(previous)
            code = "\n".join(line[len(indent):] for line in lines[i + 1:end])
            blocks.append(Block(str(path.relative_to(ROOT)), i + 1, code + "\n", marker.group(1) if marker else None))
        previous, i = fence, end + 1
    return blocks


def runs(block: Block) -> bool:
    """Whether ``block`` runs here: not skipped, or it needs the flower extra and the extra is installed."""
    return block.skip is None or (block.skip == "needs-flower" and importlib.util.find_spec("flwr") is not None)


def run_page(path: Path) -> None:
    """Run the page's blocks that are not skipped, in order, in one namespace, in the current directory."""
    namespace: dict = {"__name__": "__main__"}
    for block in python_blocks(path):
        if runs(block):
            exec(compile(block.code, block.name, "exec"), namespace)  # noqa: S102 -- the documentation's own code


def main(paths: list[str]) -> int:
    """Run each page in a directory of its own (``<page stem>/`` under the current one); report every page that
    fails, with its traceback, and return how many did."""
    failed = 0
    start = Path.cwd()
    for name in paths:
        path = Path(name).resolve()
        folder = start / path.relative_to(ROOT).as_posix().replace("/", "_")
        folder.mkdir()
        os.chdir(folder)
        try:
            run_page(path)
            print(f"@@ok {path.relative_to(ROOT)}", flush=True)
        except BaseException:  # noqa: BLE001 -- report it and go on with the next page
            failed += 1
            print(f"@@failed {path.relative_to(ROOT)}\n{traceback.format_exc()}", flush=True)
        finally:
            os.chdir(start)
    return failed


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
