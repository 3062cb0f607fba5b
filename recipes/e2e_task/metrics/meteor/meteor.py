"""E2E NLG Challenge METEOR: METEOR 1.5 (jar and paraphrase table from pycocoevalcap)."""

from e2e_task.metrics import _base
from e2e_task.metrics._common import (
    COCO_CAPTION_URL,
    COCO_TOKENIZER_ARG,
    INPUTS_DESCRIPTION,
    check_inputs,
)
from e2e_task.metrics._java import JavaToolUnavailable
from e2e_task.metrics._meteor import meteor_scores, meteor_unavailable_reason
from e2e_task.metrics._tokenize import coco_tokenize_pairs


_DESCRIPTION = """
METEOR as the E2E NLG Challenge reports it: the official METEOR 1.5 jar (English,
`-norm`, paraphrase table), run through the MS-COCO caption evaluation protocol on
PTB-tokenized, lowercased text without punctuation; the corpus score comes from
METEOR's aggregated statistics. Needs `java` and the `pycocoevalcap` package. When
either is missing, or the JVM fails, `meteor` is `None` and
`meteor_unavailable_reason` says why; no other metric is substituted.
"""

_KWARGS_DESCRIPTION = (
    INPUTS_DESCRIPTION
    + COCO_TOKENIZER_ARG
    + """
Returns:
    meteor (`float` or `None`), meteor_unavailable_reason (`str`, only when `None`).
"""
)

_CITATION = """\
@inproceedings{denkowski2014meteor,
  title     = {Meteor Universal: Language Specific Translation Evaluation for Any Target Language},
  author    = {Denkowski, Michael and Lavie, Alon},
  booktitle = {Proceedings of the Ninth Workshop on Statistical Machine Translation},
  pages     = {376--380},
  year      = {2014}
}
"""


class E2EMeteor(_base.E2EMetric):
    """METEOR 1.5 through java, or None with a reason."""

    DESCRIPTION = _DESCRIPTION
    CITATION = _CITATION
    INPUTS = _KWARGS_DESCRIPTION
    URLS = (COCO_CAPTION_URL,)

    def _compute(self, predictions: list[str], references: list[list[str]], tokenizer: str = "ptb") -> dict:
        check_inputs(predictions, references)
        reason = meteor_unavailable_reason()
        if reason is not None:
            return {"meteor": None, "meteor_unavailable_reason": reason}
        hyps, refs, _, fallback = coco_tokenize_pairs(predictions, references, tokenizer)
        if fallback is not None:
            return {"meteor": None, "meteor_unavailable_reason": fallback}
        try:
            score, _ = meteor_scores(hyps, refs)
        except JavaToolUnavailable as exc:
            return {"meteor": None, "meteor_unavailable_reason": str(exc)}
        return {"meteor": score}
