"""E2E NLG Challenge ROUGE-L: the MS-COCO caption evaluation's sentence-averaged ROUGE-L."""

from e2e_task.metrics import _base
from e2e_task.metrics._coco import rouge_l
from e2e_task.metrics._common import COCO_TOKENIZER_ARG, INPUTS_DESCRIPTION


_DESCRIPTION = """
ROUGE-L as the MS-COCO caption evaluation code computes it for the E2E NLG Challenge:
per prediction, the longest common subsequence with each reference gives a precision
and a recall; the best precision and the best recall over the references are combined
into an F-measure with beta = 1.2; the score is the mean over predictions, in [0, 1].
Texts are first PTB-tokenized, lowercased and stripped of punctuation.
"""

_KWARGS_DESCRIPTION = (
    INPUTS_DESCRIPTION
    + COCO_TOKENIZER_ARG
    + """
Returns:
    rouge_l (`float`), tokenizer (`str`, the tokenizer used),
    tokenizer_fallback_reason (`str`, only when "ptb" fell back to "simple").
"""
)

_CITATION = """\
@inproceedings{lin2004rouge,
  title     = {{ROUGE}: A Package for Automatic Evaluation of Summaries},
  author    = {Lin, Chin-Yew},
  booktitle = {Text Summarization Branches Out},
  pages     = {74--81},
  year      = {2004}
}
"""


class E2ERougeL(_base.CocoMetric):
    """COCO ROUGE-L."""

    DESCRIPTION = _DESCRIPTION
    CITATION = _CITATION
    INPUTS = _KWARGS_DESCRIPTION

    def _score(self, predictions: list[str], references: list[list[str]]) -> dict:
        score, _ = rouge_l(predictions, references)
        return {"rouge_l": score}
