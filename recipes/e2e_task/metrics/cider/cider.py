"""E2E NLG Challenge CIDEr: the MS-COCO caption evaluation's CIDEr (CIDEr-D variant)."""

from e2e_task.metrics import _base
from e2e_task.metrics._coco import cider
from e2e_task.metrics._common import COCO_TOKENIZER_ARG, INPUTS_DESCRIPTION


_DESCRIPTION = """
CIDEr as the MS-COCO caption evaluation code computes it for the E2E NLG Challenge:
tf-idf vectors of 1..4-grams with document frequencies taken from the references of
the evaluated corpus, clipped cosine similarity to each reference, a Gaussian length
penalty (sigma = 6), averaged over n-gram orders and references and multiplied by 10;
the score is the mean over predictions. Texts are first PTB-tokenized, lowercased and
stripped of punctuation. Because idf comes from the corpus itself, a corpus of a
single prediction always scores 0.
"""

_KWARGS_DESCRIPTION = (
    INPUTS_DESCRIPTION
    + COCO_TOKENIZER_ARG
    + """
Returns:
    cider (`float`), tokenizer (`str`, the tokenizer used),
    tokenizer_fallback_reason (`str`, only when "ptb" fell back to "simple").
"""
)

_CITATION = """\
@inproceedings{vedantam2015cider,
  title     = {{CIDEr}: Consensus-based Image Description Evaluation},
  author    = {Vedantam, Ramakrishna and Zitnick, C. Lawrence and Parikh, Devi},
  booktitle = {Proceedings of CVPR},
  pages     = {4566--4575},
  year      = {2015}
}
"""


class E2ECider(_base.CocoMetric):
    """COCO CIDEr."""

    DESCRIPTION = _DESCRIPTION
    CITATION = _CITATION
    INPUTS = _KWARGS_DESCRIPTION

    def _score(self, predictions: list[str], references: list[list[str]]) -> dict:
        score, _ = cider(predictions, references)
        return {"cider": score}
