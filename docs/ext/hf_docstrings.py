"""Griffe extension: read Hugging Face style docstrings (``FSLSageConfig``'s) with the Google parser.

Hugging Face's ``Parameters:`` sections group their entries under ``> Group`` lines, which the Google parser
would take for malformed entries; the groups are dropped here (the rendered table keeps the entries' order).
"""

from __future__ import annotations

import re
from typing import Any

import griffe


GROUP = re.compile(r"^[ \t]*> .*\n(?:[ \t]*\n)?", re.M)


class HuggingFaceGroups(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None and "> " in obj.docstring.value:
            obj.docstring.value = GROUP.sub("", obj.docstring.value)
