"""METEOR 1.5 through the jar shipped by ``pycocoevalcap``, driven as the COCO code drives it.

The COCO wrapper starts ``java -jar -Xmx2G meteor-1.5.jar - - -stdio -l en -norm`` in
the jar's folder (where METEOR finds its paraphrase table), sends one
``SCORE ||| ref_1 ||| ... ||| ref_k ||| hypothesis`` line per caption to collect
sufficient statistics, then a single ``EVAL ||| stats_1 ||| ... ||| stats_n`` line; the
answer is one score per caption followed by the corpus score, which METEOR computes
from the summed statistics (not the mean of caption scores). This module speaks the
same protocol but owns the process, so that failures surface as exceptions and the
JVM is always stopped.

Starting METEOR (the JVM and its paraphrase table) costs about 8 CPU-seconds, far more
than scoring an evaluation's captions, so each Python process keeps one server for all
its evaluations (each answer depends only on the lines of its own request), stopped at
exit, or at once if it fails.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from typing import IO

from e2e_task.metrics._common import LINE_BREAKS
from e2e_task.metrics._java import (
    METEOR_JAR,
    METEOR_PARAPHRASES,
    JavaToolUnavailable,
    require,
    stderr_tail,
    unavailable_reason,
)


METEOR_ARGS = ("-", "-", "-stdio", "-l", "en", "-norm")


def meteor_unavailable_reason() -> str | None:
    """Why METEOR cannot run here, or None."""
    return unavailable_reason(METEOR_JAR, METEOR_PARAPHRASES)


def _clean_hypothesis(text: str) -> str:
    # Same clean-up as the COCO wrapper (it does not touch the references).
    return text.replace("|||", "").replace("  ", " ")


def _one_line(text: str) -> str:
    # PTB-tokenized text never has line breaks; pre-tokenized input might, and one would
    # desynchronize the line protocol.
    return LINE_BREAKS.sub(" ", text)


class _MeteorProcess:
    """A running METEOR ``-stdio`` server."""

    def __init__(self) -> None:
        java, (jar, _) = require(METEOR_JAR, METEOR_PARAPHRASES)
        self._stderr: IO[bytes] = tempfile.TemporaryFile()
        cmd = [java, "-jar", "-Xmx2G", str(jar), *METEOR_ARGS]
        try:
            self._proc = subprocess.Popen(
                cmd,
                cwd=jar.parent,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
            )
        except OSError as exc:
            self._stderr.close()
            raise JavaToolUnavailable(f"could not start java: {exc}") from exc

    def send(self, line: str) -> None:
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(f"{line}\n".encode())
            self._proc.stdin.flush()
        except BrokenPipeError as exc:
            raise self._died() from exc

    def receive(self) -> str:
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            raise self._died()
        return line.decode("utf-8").strip()

    def _died(self) -> JavaToolUnavailable:
        code = self._proc.wait()
        self._stderr.seek(0)
        return JavaToolUnavailable(
            f"METEOR exited with {code}: {stderr_tail(self._stderr.read())}"
        )

    def exited(self) -> bool:
        return self._proc.poll() is not None

    def close(self) -> None:
        if self._proc.stdin is not None:
            try:
                self._proc.stdin.close()
            except BrokenPipeError:
                pass
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        self._stderr.close()


_SERVER: _MeteorProcess | None = None
_SERVER_PID: int | None = None
_LOCK = threading.Lock()


def _server() -> _MeteorProcess:
    """This process's METEOR server, started on first use, again if it has exited (a forked child starts its
    own)."""
    global _SERVER, _SERVER_PID
    if _SERVER is not None and _SERVER_PID == os.getpid() and _SERVER.exited():
        _stop_server()
    if _SERVER is None or _SERVER_PID != os.getpid():
        _SERVER, _SERVER_PID = _MeteorProcess(), os.getpid()
    return _SERVER


def _stop_server() -> None:
    global _SERVER
    if _SERVER is not None and _SERVER_PID == os.getpid():
        _SERVER.close()
    _SERVER = None


atexit.register(_stop_server)


def meteor_scores(
    predictions: Sequence[str], references: Sequence[Sequence[str]]
) -> tuple[float, list[float]]:
    """Corpus METEOR and per-prediction scores for already tokenized text.

    Raises :class:`JavaToolUnavailable` when java or the jar is missing or the JVM fails.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        raise ValueError("METEOR needs at least one prediction")
    with _LOCK:
        server = _server()
        try:
            stats = []
            for hyp, refs in zip(predictions, references, strict=True):
                server.send(" ||| ".join(["SCORE", *map(_one_line, refs), _clean_hypothesis(_one_line(hyp))]))
                stats.append(server.receive())
            server.send(" ||| ".join(["EVAL", *stats]))
            per_prediction = [float(server.receive()) for _ in predictions]
            corpus = float(server.receive())
        except BaseException:
            _stop_server()  # a server out of step with the protocol, or gone, is not reused
            raise
    return corpus, per_prediction
