"""E2E NLG metrics: hand-computed cases, mteval-v13a values, and pycocoevalcap cross-checks."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from e2e_task.metrics import (
    METRIC_NAMES,
    METRICS_DIR,
    _coco,
    _mteval,
    _tokenize,
    compute_e2e_metrics,
    load_metric,
)


HAS_JAVA = shutil.which("java") is not None
HAS_COCO = importlib.util.find_spec("pycocoevalcap") is not None
needs_java = pytest.mark.skipif(not HAS_JAVA, reason="needs a `java` executable on PATH")
needs_coco = pytest.mark.skipif(not HAS_COCO, reason="needs the pycocoevalcap package")

# An E2E-like corpus with 3, 2, 4 and 1 references per prediction.
PREDICTIONS = [
    "The Eagle is a cheap coffee shop near Burger King in the riverside area.",
    "Zizzi is a family-friendly pub with a 5 out of 5 customer rating.",
    "Cotto serves Indian food in the £20-25 price range; it's located in the city centre.",
    "The Rice Boat (a restaurant) isn't family friendly.",
]
REFERENCES = [
    [
        "The Eagle is a cheap coffee shop located in the riverside area near Burger King.",
        "Near Burger King in riverside, The Eagle coffee shop offers cheap food.",
        "The Eagle, a low-priced coffee shop, is near Burger King by the river.",
    ],
    [
        "Zizzi is a pub that is family friendly and has a customer rating of 5 out of 5.",
        "Rated 5 out of 5 by customers, the family-friendly Zizzi pub is a great choice.",
    ],
    [
        "Cotto is an Indian coffee shop in the city centre with prices of £20-25.",
        "In the city centre, Cotto serves Indian food for £20-25.",
        "Cotto, in the city centre, has Indian food at an average price of £20-25.",
        "Cotto provides Indian food. It is in the city centre and costs £20-25.",
    ],
    ["The Rice Boat restaurant is not family-friendly."],
]
# The E2E challenge's scorer (its adapted mteval-v13a-sig.pl, references padded with empty
# ones to 4 per segment as its scripts do) on the corpus above: BLEU printed to 12 decimals,
# NIST to 10. (Unadapted mteval-v13a, dividing by 4 references, prints NIST 4.911705673398.)
MTEVAL_BLEU = 0.404703570150
E2E_NIST = 4.8316847837


def _bleu(predictions: list[str], references: list[list[str]]) -> float:
    return load_metric("bleu").compute(predictions=predictions, references=references)["bleu"]


def _nist(predictions: list[str], references: list[list[str]]) -> float:
    return load_metric("nist").compute(predictions=predictions, references=references)["nist"]


def test_mteval_tokenization_matches_perl() -> None:
    # Output of mteval's tokenizer: entities decoded, <skipped> dropped, only ASCII
    # lowercased (É stays), a dash after a digit split, 3.5 kept, trailing dots split.
    text = "The Eagle&apos;s ÉCOLE: £20-25, 3.5 stars! (Near &quot;Burger King&quot;)\n<skipped>Rated 5/5.."
    expected = 'the eagle & apos ; s École : £20 - 25 , 3.5 stars ! ( near " burger king " ) rated 5 / 5 . .'
    assert " ".join(_mteval.normalize(text)) == expected


def test_identical_prediction_scores_one() -> None:
    refs = [["The Eagle is a coffee shop.", "A coffee shop called The Eagle."]]
    assert _bleu(["The Eagle is a coffee shop."], refs) == pytest.approx(1.0, abs=1e-12)
    # NIST of "a b" against itself: info(a) = info(b) = log2(2/1) = 1 and
    # info(a b) = log2(count(a)/count(a b)) = 0, so (1 + 1) / 2 + 0 / 1 = 1.
    assert _nist(["a b"], [["a b"]]) == pytest.approx(1.0, abs=1e-12)


def test_bleu_two_segments_multiple_references_and_brevity_penalty() -> None:
    # Segment 1: hyp "the the cat sat on mat" (6 words); refs of 6 and 7 words -> closest 6.
    #   1-grams: the x2 (clipped to 2 by ref 1), cat, sat, on, mat: 6/6
    #   2-grams: the the, [the cat], [cat sat], [sat on], on mat: 3/5
    #   3-grams: the the cat, [the cat sat], [cat sat on], sat on mat: 2/4
    #   4-grams: the the cat sat, [the cat sat on], cat sat on mat: 1/3
    # Segment 2: hyp "hello world" (2); refs of 3 and 4 words -> closest 3.
    #   1-grams 2/2, 2-grams [hello world] 1/1 (from ref 2), no 3- or 4-grams.
    # Corpus: p = 8/8, 4/6, 2/4, 1/3 -> geometric mean (1/9)^(1/4);
    # lengths 8 vs 6 + 3 = 9 -> BP = exp(1 - 9/8). mteval-v13a prints the same value.
    preds = ["the the cat sat on mat", "hello world"]
    refs = [
        ["the cat sat on the mat", "a cat sat on a mat here"],
        ["hello big world", "say hello world now"],
    ]
    result = load_metric("bleu").compute(predictions=preds, references=refs)
    assert result["bleu"] == pytest.approx(math.exp(1 - 9 / 8) * 9**-0.25, abs=1e-12)
    assert result["bleu"] == pytest.approx(0.509509824266, abs=1e-11)
    assert result["brevity_penalty"] == pytest.approx(math.exp(-0.125), abs=1e-12)
    assert result["precisions"] == pytest.approx([1.0, 4 / 6, 2 / 4, 1 / 3], abs=1e-12)
    assert (result["hyp_length"], result["ref_length"]) == (8, 9)


def test_bleu_tie_in_reference_length_takes_shorter() -> None:
    # 4 words against refs of 5 and 3 words: equally close, mteval takes 3 -> no penalty.
    result = load_metric("bleu").compute(predictions=["p q r s"], references=[["p q r s t", "q r s"]])
    assert result["ref_length"] == 3
    assert result["brevity_penalty"] == 1.0


def test_bleu_smoothing_of_zero_matches() -> None:
    # hyp "a b c d e" vs ref "a b c x d e": p1 = 5/5, p2 = 3/4 (ab bc de), p3 = 1/3 (abc),
    # no 4-gram match -> mteval smooths it to 1 / (2 * 2 four-grams) = 1/4.
    # Geometric mean (1 * 3/4 * 1/3 * 1/4)^(1/4) = 1/2; BP = exp(1 - 6/5).
    bleu = _bleu(["a b c d e"], [["a b c x d e"]])
    assert bleu == pytest.approx(0.5 * math.exp(-0.2), abs=1e-12)


def test_nist_information_weights_and_brevity_penalty() -> None:
    # Refs "a b c", "a c": counts a=2, b=1, c=2 of 5 words; (a b)=1.
    # info(a) = log2(5/2), info(b) = log2(5/1), info(a b) = log2(count(a)/count(a b)) = 1.
    # hyp "a b": 1-grams (log2 2.5 + log2 5) / 2, 2-grams 1 / 1.
    # Average reference length 5 / 2 refs = 2.5, ratio 2 / 2.5 = 0.8,
    # penalty exp(-beta ln(0.8)^2) with beta = -ln(0.5) / ln(1.5)^2.
    beta = -math.log(0.5) / math.log(1.5) ** 2
    expected = (math.log2(12.5) / 2 + 1) * math.exp(-beta * math.log(0.8) ** 2)
    result = load_metric("nist").compute(predictions=["a b"], references=[["a b c", "a c"]])
    assert result["nist"] == pytest.approx(expected, abs=1e-12)
    assert result["nist"] == pytest.approx(2.287556580294, abs=1e-11)  # mteval-v13a


def test_bleu_nist_match_mteval_on_e2e_sample() -> None:
    # Varying reference counts (3, 2, 4, 1) exercise NIST's average reference length.
    assert _bleu(PREDICTIONS, REFERENCES) == pytest.approx(MTEVAL_BLEU, abs=1e-11)
    assert _nist(PREDICTIONS, REFERENCES) == pytest.approx(E2E_NIST, abs=1e-10)


def test_nist_length_penalty_of_short_outputs_uses_the_mean_number_of_references() -> None:
    # Refs "a b c d" + "e f g h" (segment 1) and "a b c d" (segment 2): 12 words, a, b, c, d twice.
    # Both predictions are "a b": info(a) = info(b) = log2(12/2), info(a b) = log2(count(a)/count(a b)) = 0,
    # so the information per order is log2(6) for 1-grams and 0 for 2-grams.
    # Average reference length: 12 words / (3 references / 2 segments) = 8, against 4 predicted words:
    # ratio 1/2 and penalty exp(-beta ln(1/2)^2). Dividing by the largest reference count (2) instead
    # would give 6, ratio 2/3 and penalty 1/2.
    beta = -math.log(0.5) / math.log(1.5) ** 2
    result = load_metric("nist").compute(predictions=["a b", "a b"], references=[["a b c d", "e f g h"], ["a b c d"]])
    assert result["brevity_penalty"] == pytest.approx(math.exp(-beta * math.log(0.5) ** 2), abs=1e-12)
    assert result["nist"] == pytest.approx(math.log2(6) * math.exp(-beta * math.log(0.5) ** 2), abs=1e-12)
    assert result["info_per_order"] == pytest.approx([math.log2(6), 0, 0, 0, 0], abs=1e-12)
    # Padding with empty references, as the E2E scripts do, changes nothing.
    padded = load_metric("nist").compute(predictions=["a b", "a b"],
                                         references=[["a b c d", "e f g h"], ["a b c d", ""]])
    assert padded["nist"] == pytest.approx(result["nist"], abs=1e-12)


def test_nist_reproduces_perl_truthiness_of_prefix_zero() -> None:
    # mteval treats the prefix "0" as false and uses the total word count instead of
    # count("0") for bigrams starting with "0"; value printed by mteval-v13a.
    assert _nist(["0 a 0 b"], [["0 a 0 b", "0 a"]]) == pytest.approx(3.765789584175, abs=1e-11)


def test_rouge_l_hand_computed() -> None:
    # hyp "a b c d" vs "a c d e f": LCS 3 -> P 3/4, R 3/5; vs "b d": LCS 2 -> P 2/4, R 1.
    # COCO takes max P = 3/4 and max R = 1: F = (1 + 1.44) * 0.75 / (1 + 1.44 * 0.75).
    # The second caption equals its reference (F = 1); the corpus score is the mean.
    f1 = 2.44 * 0.75 / (1 + 1.44 * 0.75)
    result = load_metric("rouge_l").compute(
        predictions=["a b c d", "x y"], references=[["a c d e f", "b d"], ["x y"]], tokenizer="none"
    )
    assert result["rouge_l"] == pytest.approx((f1 + 1.0) / 2, abs=1e-12)
    assert result["tokenizer"] == "none"
    assert _coco.rouge_l_sentence("", [""]) == 1.0  # COCO splits "" into one empty token


def test_cider_hand_computed() -> None:
    # N = 2 captions; every n-gram has df <= 1, so every idf is ln 2 and vectors are tf * ln 2.
    # Caption 1 "a b" vs "a b": cosine 1 for 1- and 2-grams, 0 for empty 3-/4-gram
    #   vectors, equal bigram counts -> no penalty: mean(1, 1, 0, 0) * 10 = 5.
    # Caption 2 "c d" vs "c e": 1-grams ln2^2 / (sqrt2 ln2)^2 = 1/2, 2-grams 0:
    #   mean(1/2, 0, 0, 0) * 10 = 1.25. Corpus: (5 + 1.25) / 2.
    result = load_metric("cider").compute(
        predictions=["a b", "c d"], references=[["a b"], ["c e"]], tokenizer="none"
    )
    assert result["cider"] == pytest.approx(3.125, abs=1e-12)
    # With one caption idf = log(1) - log(1) = 0 everywhere, as in the COCO code.
    assert _coco.cider(["a b"], [["a b"]])[0] == 0.0


def test_simple_tokenizer_approximates_ptb() -> None:
    texts = [
        'The Rice Boat (a pub) is "family friendly" & isn\'t cheap: £20-25, rated 3.5.',
        "Near Café Brazil, it's a 3-star coffee shop... St. Mary's style!",
    ]
    # Both strings are what the PTB jar plus the COCO punctuation filter produce.
    assert _tokenize.simple_tokenize(texts) == [
        "the rice boat -lrb- a pub -rrb- is family friendly & is n't cheap # 20-25 rated 3.5",
        "near café brazil it 's a 3-star coffee shop st. mary 's style",
    ]


def test_input_validation() -> None:
    with pytest.raises(ValueError):
        compute_e2e_metrics(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError):
        compute_e2e_metrics(["a"], [[]])
    with pytest.raises(ValueError):
        load_metric("bleurt")


@needs_coco
def test_rouge_l_and_cider_match_pycocoevalcap() -> None:
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    vocab = "the eagle coffee shop near burger king is a family friendly rated 5 of 3 cheap pub".split()
    rng = random.Random(0)
    for _ in range(30):
        n = rng.randint(2, 6)
        sent = lambda lo: " ".join(rng.choice(vocab) for _ in range(rng.randint(lo, 12)))  # noqa: E731
        hyps = [sent(0) for _ in range(n)]
        refs = [[sent(1) for _ in range(rng.randint(1, 4))] for _ in range(n)]
        gts, res = dict(enumerate(refs)), {i: [h] for i, h in enumerate(hyps)}
        assert _coco.rouge_l(hyps, refs)[0] == pytest.approx(Rouge().compute_score(gts, res)[0], abs=1e-6)
        assert _coco.cider(hyps, refs)[0] == pytest.approx(Cider().compute_score(gts, res)[0], abs=1e-6)


@needs_java
@needs_coco
def test_ptb_tokenizer_matches_pycocoevalcap() -> None:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    texts = PREDICTIONS + [r for refs in REFERENCES for r in refs] + ["", "A... (b) St. John's"]
    theirs = PTBTokenizer().tokenize({i: [{"caption": t}] for i, t in enumerate(texts)})
    assert _tokenize.ptb_tokenize(texts) == [theirs[i][0] for i in range(len(texts))]


@pytest.mark.slow
@needs_java
@needs_coco
def test_e2e_metrics_match_official_pipeline() -> None:
    # The COCO half of the E2E scoring: PTB tokenization, then METEOR, ROUGE-L, CIDEr.
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": r} for r in refs] for i, refs in enumerate(REFERENCES)})
    res = tokenizer.tokenize({i: [{"caption": p}] for i, p in enumerate(PREDICTIONS)})
    official = {
        "meteor": Meteor().compute_score(gts, res)[0],
        "rouge_l": Rouge().compute_score(gts, res)[0],
        "cider": Cider().compute_score(gts, res)[0],
    }
    scores = compute_e2e_metrics(PREDICTIONS, REFERENCES)
    assert scores["coco_tokenizer"] == "ptb"
    assert "meteor_unavailable_reason" not in scores
    for name, value in official.items():
        assert scores[name] == pytest.approx(value, abs=1e-6), name
    assert scores["bleu"] == pytest.approx(MTEVAL_BLEU, abs=1e-11)
    assert scores["nist"] == pytest.approx(E2E_NIST, abs=1e-10)


@pytest.mark.slow
@needs_java
@needs_coco
def test_one_meteor_server_scores_every_evaluation_of_a_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """METEOR's JVM starts once per process (about 8 CPU-seconds each time); a reused server answers each request
    as it answered the same request before, and one that has exited is replaced."""
    from e2e_task.metrics import _meteor

    _meteor._stop_server()
    started = []

    def counted() -> _meteor._MeteorProcess:
        started.append("jvm")
        return real()

    class StandIn:  # answers every request with 0.5, without a JVM
        def __init__(self):
            started.append("stand-in")

        def exited(self) -> bool:
            return False

        def send(self, line: str) -> None:
            pass

        def receive(self) -> str:
            return "0.5"

        def close(self) -> None:
            pass

    real = _meteor._MeteorProcess
    monkeypatch.setattr(_meteor, "_MeteorProcess", counted)
    a = ([p.lower() for p in PREDICTIONS[:2]], [[r.lower() for r in refs] for refs in REFERENCES[:2]])
    b = ([PREDICTIONS[3].lower()], [[REFERENCES[3][0].lower()]])
    first, other, again = _meteor.meteor_scores(*a), _meteor.meteor_scores(*b), _meteor.meteor_scores(*a)
    assert started == ["jvm"] and again == first and first != other and 0 < first[0] < 1
    _meteor._SERVER._proc.kill()
    _meteor._SERVER._proc.wait()
    monkeypatch.setattr(_meteor, "_MeteorProcess", StandIn)
    assert _meteor.meteor_scores(*b) == (0.5, [0.5]) and started == ["jvm", "stand-in"]
    _meteor._stop_server()


def test_without_java_meteor_is_none_with_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no java on PATH
    result = load_metric("meteor").compute(predictions=PREDICTIONS, references=REFERENCES)
    assert result["meteor"] is None
    assert "java" in result["meteor_unavailable_reason"]
    scores = compute_e2e_metrics(PREDICTIONS, REFERENCES)
    assert scores["meteor"] is None and "java" in scores["meteor_unavailable_reason"]
    assert scores["coco_tokenizer"] == "simple"
    assert "java" in scores["coco_tokenizer_fallback_reason"]
    assert 0.0 < scores["rouge_l"] <= 1.0 and scores["cider"] > 0.0
    assert scores["bleu"] == pytest.approx(MTEVAL_BLEU, abs=1e-11)


def test_evaluate_load_works_offline(tmp_path: Path) -> None:
    script = f"""
import json
import evaluate
from e2e_task.metrics import METRICS_DIR
out = {{}}
for name in {list(METRIC_NAMES)!r}:
    module = evaluate.load(str(METRICS_DIR / name))
    out[name] = module.name
bleu = evaluate.load(str(METRICS_DIR / "bleu"))
out["bleu_score"] = bleu.compute(predictions=["a b c d"], references=[["a b c d", "x"]])["bleu"]
print(json.dumps(out))
"""
    repo_root = Path(__file__).resolve().parents[1]
    unreachable = "http://127.0.0.1:9"  # any network access fails at once
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_EVALUATE_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf_home"),  # nothing cached from earlier runs
        "HTTP_PROXY": unreachable,
        "HTTPS_PROXY": unreachable,
        "PYTHONPATH": os.pathsep.join([str(repo_root), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(METRIC_NAMES) <= set(out)
    assert out["bleu_score"] == 1.0


def test_each_metric_is_an_evaluate_script_folder() -> None:
    for name in METRIC_NAMES:
        assert (METRICS_DIR / name / f"{name}.py").is_file()


# ---------------------------------------------------------------- slot error rate
MR = ("name[Alimentum], eatType[coffee shop], food[Chinese], priceRange[less than £20], customer rating[high], "
      "area[riverside], familyFriendly[no], near[Burger King]")
VENUES = ["Alimentum", "Burger King", "The Cambridge Blue", "The Eagle"]


def test_slot_errors_hand_made_cases() -> None:
    from e2e_task.slot_errors import slot_errors

    # Every slot realized, with synonyms: inexpensive = less than £20, highly rated = high, by the river.
    right = ("Alimentum is an inexpensive, highly rated Chinese coffee shop by the river near Burger King. "
             "It is not family-friendly.")
    assert (slot_errors(right, MR, VENUES).errors, slot_errors(right, MR, VENUES).slots) == (0, 8)
    # Another venue instead of the name: name contradicted (by the stray venue), near missing; coffee shop
    # and Chinese realized; price, rating, area and family missing. 2 realized of 8.
    wrong_name = slot_errors("The Cambridge Blue is a coffee shop that serves Chinese food.", MR, VENUES)
    assert wrong_name.contradicted == {"name": ["The Cambridge Blue"]}
    assert sorted(wrong_name.missing) == ["area", "customer rating", "familyFriendly", "near", "priceRange"]
    # Contradicted values: expensive (price), 1 out of 5 (rating), city centre (area), kid friendly (family);
    # food and near missing; name and eat type realized.
    opposite = slot_errors("Alimentum is an expensive coffee shop rated 1 out of 5 in the city centre. It is kid "
                           "friendly.", MR, VENUES)
    assert opposite.contradicted == {"priceRange": ["high"], "customer rating": ["low"],
                                     "area": ["city centre"], "familyFriendly": ["yes"]}
    assert sorted(opposite.missing) == ["food", "near"]
    # A venue the mr holds under another slot is no contradiction; "The" of a venue is optional.
    mr = "name[The Eagle], near[The Cambridge Blue]"
    assert slot_errors("Eagle is near The Cambridge Blue.", mr, VENUES).errors == 0
    assert slot_errors("The Cambridge Blue is a pub.", mr, VENUES).missing == ["name"]


def test_slot_error_rate_is_errors_over_slots_of_the_corpus() -> None:
    from e2e_task.slot_errors import slot_error_rate

    mrs = [MR, "name[The Eagle], familyFriendly[yes], priceRange[£20-25]", "name[The Eagle], area[city centre]"]
    predictions = [
        "The Cambridge Blue is a coffee shop that serves Chinese food.",  # 6 errors of 8 (see above)
        "The Eagle is a family friendly place with prices of £20-25.",  # 0 of 3
        "Alimentum is in the city centre.",  # name contradicted by Alimentum: 1 of 2
    ]
    # Venues of the three mrs: Alimentum, Burger King, The Eagle. The Cambridge Blue is none of them, so
    # text 1 misses its name (6 missing); Alimentum contradicts text 3's name.
    result = slot_error_rate(predictions, mrs)
    assert result == {"slot_error_rate": 7 / 13, "slots": 13, "slots_missing": 6, "slots_contradicted": 1}
    # With the Cambridge Blue in the lexicon, text 1's name is contradicted instead of missing.
    result = slot_error_rate(predictions, mrs, lexicon=[*mrs, "name[The Cambridge Blue]"])
    assert result == {"slot_error_rate": 7 / 13, "slots": 13, "slots_missing": 5, "slots_contradicted": 2}
    with pytest.raises(ValueError, match="2 meaning representations"):
        slot_error_rate(["a"], mrs[:2])
