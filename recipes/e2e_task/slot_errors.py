"""Slot error rate of E2E outputs: how many of the meaning representation's slot values a text gets wrong.

For every slot ``key[value]`` of an ``mr`` the text is searched for each value the slot can take:

* **realized**: the ``mr``'s value is mentioned (synonyms count: "cheap", "inexpensive", "less than £20"
  are one price range; "5 out of 5" and "highly rated" one customer rating);
* **contradicted**: it is not, but another value of the same slot is ("expensive" when
  ``priceRange[cheap]``). For the venue slots (``name``, ``near``), each venue the text names that the
  ``mr`` does not hold stands in for one unrealized venue slot, ``name`` first ("The Cambridge Blue is ..."
  when ``name[Alimentum]``);
* **missing**: neither.

The slot error rate is (missing + contradicted) / slots, summed over the corpus. Values that the ``mr``
does not ask for but the text adds are not counted, and a text that mentions the right value and a wrong
one counts as realized. ``familyFriendly`` has one reading per text: a negated mention ("not family
friendly", "non-family") reads as ``no`` even when "family friendly" also occurs.

Mentions are found with the regular expressions below (E2E's slots; case-insensitive). Venue names
(``name``, ``near``) and values of other slots are matched literally; the venues a text can be said to
contradict with are the ``name``/``near`` values of the ``mrs`` scored together, or of a ``lexicon``.
This is a pattern matcher in the spirit of the E2E challenge's slot-error scripts, not a reimplementation
of them: paraphrases it does not know count as missing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .data import parse_mr


__all__ = ["SlotErrors", "slot_error_rate", "slot_errors", "venue_lexicon"]

VENUE_SLOTS = ("name", "near")

# slot -> [(values of the mr that one reading stands for, alternatives that mention it)]
_PRICE = r"pric\w*(?: range)?(?: is| are| of)?(?: very| quite| rather)?"
_RATING = r"(?:customer )?(?:rat|review)\w*(?: is| are| of)?(?: very| quite| rather)?"
_READINGS: dict[str, list[tuple[tuple[str, ...], list[str]]]] = {
    "priceRange": [
        (("cheap", "less than £20"), [r"\bcheap", r"\binexpensive", r"\baffordabl", r"\blow[- ](?:cost|pric)",
                                      rf"\b{_PRICE} low\b", r"\b(?:less than|under|below) £ ?20\b"]),
        (("moderate", "£20-25"), [r"\bmoderate", r"\baverage[- ]pric", r"\bmid[- ]?(?:range|pric)",
                                  rf"\b{_PRICE} average\b", r"£ ?20 ?(?:-|–|to) ?£? ?25"]),
        (("high", "more than £30"), [r"\bexpensive", r"\bpricey", r"\bhigh[- ](?:end|cost|pric)",
                                   rf"\b{_PRICE} high\b",
                                     r"\b(?:more than|over|above) £ ?30", r"£ ?30 ?\+"]),
    ],
    "customer rating": [
        (("low", "1 out of 5"), [rf"\b(?:low|poor)(?:ly)?[- ]{_RATING}", rf"\b{_RATING} (?:low|poor)\b",
                                 r"\b(?:1|one) out of (?:5|five)", r"\b(?:1|one)[- ]star"]),
        (("average", "3 out of 5"), [rf"\baverage[- ]{_RATING}", rf"\b{_RATING} average\b",
                                     r"\b(?:3|three) out of (?:5|five)", r"\b(?:3|three)[- ]star"]),
        (("high", "5 out of 5"), [rf"\b(?:high|well)(?:ly)?[- ]{_RATING}", rf"\b{_RATING} high\b",
                                  r"\b(?:5|five) out of (?:5|five)", r"\b(?:5|five)[- ]star"]),
    ],
    "eatType": [
        (("coffee shop",), [r"\bcoffee[- ]?shops?\b", r"\bcaf[eé]s?\b(?! (?:sicilia|brazil|rouge|adriatic))"]),
        (("pub",), [r"\bpubs?\b"]),
        (("restaurant",), [r"\brestaurants?\b"]),
    ],
    "food": [
        (("Chinese",), [r"\bchinese\b"]),
        (("English",), [r"\benglish\b", r"\bbritish\b"]),
        (("Fast food",), [r"\bfast[- ]food\b"]),
        (("French",), [r"\bfrench\b"]),
        (("Indian",), [r"\bindian\b"]),
        (("Italian",), [r"\bitalian\b"]),
        (("Japanese",), [r"\bjapanese\b", r"\bsushi\b"]),
    ],
    "area": [
        (("city centre",), [r"\bcity[- ]cent(?:re|er)\b", r"\bcent(?:re|er) of (?:the )?(?:city|town)\b",
                            r"\bdowntown\b"]),
        (("riverside",), [r"\briver"]),
    ],
}
_FAMILY = r"(?:family|families|kids?|child|children)"
_FAMILY_NO = re.compile(rf"(?:\bnot|n't|\bnon|\bno)\b[- ]*(?:\w+[- ]+){{0,3}}?{_FAMILY}|{_FAMILY}[- ]?unfriendly"
                        r"|\badults?\b", re.IGNORECASE)
_FAMILY_YES = re.compile(rf"\b{_FAMILY}\b", re.IGNORECASE)
_COMPILED = {slot: [(values, re.compile("|".join(alternatives), re.IGNORECASE)) for values, alternatives in readings]
             for slot, readings in _READINGS.items()}


def _literal(value: str) -> re.Pattern[str]:
    """A value matched as words, case-insensitive, any whitespace; a venue's leading "The" is optional."""
    words = value.split()
    if len(words) > 1 and words[0].lower() == "the":
        words = words[1:]
    return re.compile(r"(?<!\w)" + r"\s+".join(re.escape(w) for w in words) + r"(?!\w)", re.IGNORECASE)


def _mentions(text: str, slot: str, value: str) -> tuple[bool, list[str]]:
    """Whether ``value`` of ``slot`` is mentioned, and which other values of the slot are (pattern slots)."""
    if slot == "familyFriendly":
        reading = "no" if _FAMILY_NO.search(text) else "yes" if _FAMILY_YES.search(text) else None
        return reading == value.lower(), [reading] if reading not in (None, value.lower()) else []
    if slot in _COMPILED:
        found = [values for values, pattern in _COMPILED[slot] if pattern.search(text)]
        if any(value in values for values in found) or (not any(value in v for v, _ in _COMPILED[slot])
                                                        and _literal(value).search(text)):
            return True, []
        return False, [values[0] for values in found]
    return bool(_literal(value).search(text)), []


@dataclass
class SlotErrors:
    """Per-text outcome: the slots of the ``mr`` and which were missing or contradicted (slot -> found values)."""

    slots: int = 0
    missing: list[str] = field(default_factory=list)
    contradicted: dict[str, list[str]] = field(default_factory=dict)

    @property
    def errors(self) -> int:
        return len(self.missing) + len(self.contradicted)


def venue_lexicon(mrs: Iterable[str]) -> list[str]:
    """The ``name`` and ``near`` values of ``mrs``: the venues a text can name instead of the right one."""
    return sorted({v for mr in mrs for k, v in parse_mr(mr).items() if k in VENUE_SLOTS})


def slot_errors(text: str, mr: str, venues: Sequence[str] = ()) -> SlotErrors:
    """Check every slot of ``mr`` in ``text``; ``venues`` are the names that count as contradicting a venue slot."""
    slots = parse_mr(mr)
    held = {v.lower() for v in slots.values()}
    # Venues the text names that the mr does not hold: each stands in for one unrealized venue slot, in order.
    stray = [v for v in venues if v.lower() not in held and _literal(v).search(text)]
    result = SlotErrors(slots=len(slots))
    for slot, value in slots.items():
        realized, contradicting = _mentions(text, slot, value)
        if realized:
            continue
        if slot in VENUE_SLOTS and stray:
            contradicting = [stray.pop(0)]
        if contradicting:
            result.contradicted[slot] = contradicting
        else:
            result.missing.append(slot)
    return result


def slot_error_rate(predictions: Sequence[str], mrs: Sequence[str],
                    lexicon: Iterable[str] | None = None) -> dict[str, float | int]:
    """Corpus slot error rate of ``predictions`` (one per ``mr``): (missing + contradicted) / slots.

    ``lexicon``: ``mr`` strings whose venue names may be contradicted (default: ``mrs``).
    Returns ``slot_error_rate``, ``slots``, ``slots_missing``, ``slots_contradicted``.
    """
    if len(predictions) != len(mrs):
        raise ValueError(f"{len(predictions)} predictions but {len(mrs)} meaning representations")
    venues = venue_lexicon(mrs if lexicon is None else lexicon)
    per_text = [slot_errors(p, m, venues) for p, m in zip(predictions, mrs)]
    slots = sum(e.slots for e in per_text)
    if slots == 0:
        raise ValueError("no slots to check: the meaning representations hold no 'key[value]' pairs")
    missing = sum(len(e.missing) for e in per_text)
    contradicted = sum(len(e.contradicted) for e in per_text)
    return {"slot_error_rate": (missing + contradicted) / slots, "slots": slots, "slots_missing": missing,
            "slots_contradicted": contradicted}
