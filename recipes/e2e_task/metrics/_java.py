"""Finding ``java`` and the jars that the ``pycocoevalcap`` wheel ships.

The official E2E scoring runs two Java tools from the MS-COCO caption evaluation code:
the Stanford PTB tokenizer (applied before METEOR, ROUGE-L and CIDEr) and METEOR 1.5.
The PyPI package ``pycocoevalcap`` bundles both jars and METEOR's English paraphrase
table, so nothing has to be downloaded at run time.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path


PTB_JAR = ("tokenizer", "stanford-corenlp-3.4.1.jar")
METEOR_JAR = ("meteor", "meteor-1.5.jar")
METEOR_PARAPHRASES = ("meteor", "data", "paraphrase-en.gz")


class JavaToolUnavailable(RuntimeError):
    """A Java-based scorer cannot run here (no java, no jar, or the JVM failed)."""


def java_executable() -> str | None:
    """Path of the ``java`` launcher on PATH, or None."""
    return shutil.which("java")


def pycocoevalcap_file(*parts: str) -> Path | None:
    """Path of a file inside the installed ``pycocoevalcap`` package, or None."""
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None:
        return None
    # The wheel has no top-level __init__.py, so it is a namespace package.
    for base in spec.submodule_search_locations or []:
        candidate = Path(base, *parts)
        if candidate.is_file():
            return candidate
    return None


def unavailable_reason(*resources: tuple[str, ...]) -> str | None:
    """Why java plus the given pycocoevalcap files cannot be used, or None if they can."""
    if java_executable() is None:
        return "no `java` executable on PATH (a Java 8+ runtime is required)"
    if importlib.util.find_spec("pycocoevalcap") is None:
        return "the `pycocoevalcap` package, which ships the jar, is not installed"
    for parts in resources:
        if pycocoevalcap_file(*parts) is None:
            return f"{'/'.join(parts)} is missing from the installed pycocoevalcap package"
    return None


def require(*resources: tuple[str, ...]) -> tuple[str, list[Path]]:
    """Return the java path and resource paths, or raise :class:`JavaToolUnavailable`."""
    reason = unavailable_reason(*resources)
    if reason is not None:
        raise JavaToolUnavailable(reason)
    java = java_executable()
    paths = [pycocoevalcap_file(*parts) for parts in resources]
    assert java is not None and all(p is not None for p in paths)
    return java, [p for p in paths if p is not None]


def stderr_tail(data: bytes, limit: int = 500) -> str:
    """Last ``limit`` characters of a process's stderr, for error messages."""
    text = data.decode("utf-8", errors="replace").strip()
    return text[-limit:] if text else "(no stderr)"
