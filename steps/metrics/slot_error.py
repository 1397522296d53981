"""The E2E slot error rate (SER): how many MR facts an output drops, contradicts or invents.

Word-overlap metrics (BLEU, ROUGE) barely move when a sentence drops the price or says "Italian" for
French food. The slot error rate counts exactly those mistakes, with hand-written patterns per slot
value, in the way of the E2E cleaning work (Dušek, Howcroft & Rieser 2019, "Semantic Noise Matters
for Neural Natural Language Generation"):

    SER = (missing + wrong + added) / number of slots in the MRs      (summed over the corpus)

- missing: an MR slot whose value the text does not realise at all;
- wrong: an MR slot realised only with another value of that slot ("Italian" for food[French],
  "not family-friendly" for familyFriendly[yes], "cheap" for priceRange[high]);
- added: a value the MR does not hold, realised besides the MR's own one, or for a slot the MR lacks.

A rate above 1 is possible (a text can add more facts than its MR has). Both MR forms the project
uses are read: the official `name[The Eagle], eatType[pub], ...` and the formatted context of
steps.prepare (`name : The Eagle | Type : pub | price : £ 20 - 25 | ...`). Texts may be raw or
word-tokenised like the E2E text files (`family - friendly`, `isn 't`, `£ 20 - 25`).
The patterns and their limits are documented in docs/slot_error.md.

Plain Python (only `re`), so it imports in milliseconds:

    from steps.metrics.slot_error import slot_error_rate, check_text
    report = slot_error_rate(contexts, predictions)      # SlotErrorReport: rate, missing, wrong, added, ...
    check_text(context, prediction).describe()           # "missing: near; wrong: food=Italian"

    python -m steps.metrics.slot_error data/formatted/test.jsonl          # {context, completion|prediction} lines
    python -m steps.metrics.slot_error data/raw/e2e/test.txt              # MR||text lines
    python -m steps.metrics.slot_error --mrs mrs.txt --texts outputs.txt  # parallel files, one per line
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# ---------------------------------------------------------------- slots and values

SLOTS = ("name", "eatType", "food", "priceRange", "customer rating", "area", "familyFriendly", "near")
ENTITY_SLOTS = ("name", "near")  # matched literally, against the names that MRs use

# Slot names of the formatted contexts (steps.prepare E2E_SLOTS) -> the official names.
FORMATTED_SLOT_NAMES = {
    "name": "name",
    "Type": "eatType",
    "food": "food",
    "price": "priceRange",
    "customer rating": "customer rating",
    "area": "area",
    "family friendly": "familyFriendly",
    "near": "near",
}

# E2E's numeric and verbal price/rating values mean the same thing to a reader ("cheap" is how people say
# "less than £20"), so each pair shares one set of patterns; a value is reported by its verbal name.
VALUE_MEANING = {
    "priceRange": {"less than £20": "cheap", "£20-25": "moderate", "more than £30": "high"},
    "customer rating": {"1 out of 5": "low", "3 out of 5": "average", "5 out of 5": "high"},
}

# The restaurant and landmark names of the E2E train, development and test MRs. They let an invented
# name or landmark count as an added slot, and keep "Raja Indian Cuisine" from reading as Indian food.
E2E_NAMES = (
    "Alimentum", "Aromi", "Bibimbap House", "Blue Spice", "Browns Cambridge", "Clowns", "Cocum", "Cotto",
    "Fitzbillies", "Giraffe", "Green Man", "Loch Fyne", "Midsummer House", "Strada", "Taste of Cambridge",
    "The Cambridge Blue", "The Cricketers", "The Dumpling Tree", "The Eagle", "The Golden Curry",
    "The Golden Palace", "The Mill", "The Olive Grove", "The Phoenix", "The Plough", "The Punter",
    "The Rice Boat", "The Twenty Two", "The Vaults", "The Waterman", "The Wrestlers",
    "Travellers Rest Beefeater", "Wildwood", "Zizzi",
)  # fmt: skip
E2E_LANDMARKS = (
    "All Bar One", "Avalon", "Burger King", "Café Adriatic", "Café Brazil", "Café Rouge", "Café Sicilia",
    "Clare Hall", "Crowne Plaza Hotel", "Express by Holiday Inn", "Rainbow Vegetarian Café",
    "Raja Indian Cuisine", "Ranch", "The Bakers", "The Portland Arms", "The Rice Boat", "The Six Bells",
    "The Sorrento", "Yippee Noodle Bar",
)  # fmt: skip

# ---------------------------------------------------------------- patterns


def gap(words: int) -> str:
    """Up to `words` extra words inside a phrase ("rated quite low", "not a very family-friendly").

    The words never include a conjunction, so "low prices and high ratings" cannot pair "low" with
    "ratings", nor "not cheap but family friendly" read as a negated family-friendly.
    """
    return rf"(?:[ -]+(?!(?:and|but|or|with|while|whilst|although|though|yet|however)\b)\w+){{0,{words}}}"


def score(number: str) -> str:
    """A score out of five: "5 out of 5", "five of five", "3 out 5", "5 stars", "one-star", "3/5"."""
    return rf"{number}(?:(?: out of| of| out) (?:5|five)(?: stars?)?|[- ]stars?|/5)"


FAMILY = r"(?:famil(?:y|ies)|kids?|child(?:ren)?|children's)"
FRIENDLY = r"(?:friendly|orien(?:ta)?ted)"
RATING_NOUN = r"(?:rat(?:ings?|ed|es)|reviews?|reviewed|feedback|standards?|quality|scores?|scored)"
PRICE_NOUN = r"(?:prices?|price range|pricing|priced|costs?)"
NOT_EXPENSIVE = r"not (?:too |that |very |so |overly )?(?:expensive|pricey|pricy|costly)"
NOT_CHEAP = r"not (?:too |that |very |so )?(?:cheap|inexpensive)"
FAIR_PRICE = r"(?:well|decently|fairly|reasonabl[ey])[- ]priced?|(?:fair|reasonable)[- ]price[ds]?|good value"  # cheap or moderate: the MR decides
# "not very good", "doesn't have a very good": the negation is part of the span, so the "good" inside it is ignored.
NOT_GOOD = (
    r"(?:not|\w+n't)(?: (?:have|has|get|got|receive|a|an|very|so|particularly|that|too)){0,3} (?:good|great|high|highly|well)"
)


def rating_patterns(number: str, before_noun: str, after_noun: str, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """A rating class: its score, an adjective before a rating noun, or one after it."""
    return (
        *extra,
        score(number),
        rf"{before_noun}{gap(2)}[ -]+{RATING_NOUN}",  # "high customer rating", "poorly rated", "excellent reviews"
        rf"{RATING_NOUN}{gap(2)}[ -]+(?:as |of |at )?{after_noun}(?![ -]+pric)",  # "rated low", not "quality food at high prices"
    )


def price_patterns(*phrases: str, judged: str) -> tuple[str, ...]:
    """A price class: its own phrases, or a price noun judged by an adjective ("prices are low")."""
    return (*phrases, rf"{PRICE_NOUN}{gap(3)}[ -]+{judged}(?![ -]+(?:customer|rat|review))")


# Slot -> value (or meaning, see VALUE_MEANING) -> regexes. Case is ignored; texts are normalised first
# (see normalise); each regex matches whole words only. Where two values share a phrase ("affordable"),
# the MR's own value wins; a match inside a longer match of any slot is ignored ("family-friendly" inside
# "not family-friendly", "Indian" inside "Raja Indian Cuisine").
VALUE_PATTERNS: dict[str, dict[str, tuple[str, ...]]] = {
    "eatType": {
        "coffee shop": (r"coffee[- ]*(?:shops?|houses?|places?|bars?)", r"caf[eé]s?"),
        "pub": (r"pubs?", r"public houses?"),
        "restaurant": (r"restaurants?",),
    },
    "food": {
        "Chinese": (r"Chinese", r"Chines"),
        "English": (r"English", r"British"),
        "Fast food": (r"fast[- ]*foods?",),
        "French": (r"French",),
        "Indian": (r"Indian",),
        "Italian": (r"Italian",),
        "Japanese": (r"Japanese", r"sushi"),
    },
    "priceRange": {
        "cheap": price_patterns(
            r"cheap(?:ly|er|est)?",
            r"inexpensive(?:ly)?",
            r"low(?:er)?[- ]+(?:cost|price[ds]?)",
            r"budget(?:[- ]friendly)?",
            r"affordabl[ey]",
            r"(?:less than|under|below|lower than|up to) £?20(?: pounds)?",
            r"£?20 or (?:less|under)",
            r"below[- ]average (?:price[sd]?|pricing|costs?)",
            FAIR_PRICE,
            NOT_EXPENSIVE,
            judged=r"(?:low|cheap)",
        ),
        "moderate": price_patterns(
            r"(?:moderate|moderately|average|mid|medium|decent)[- ]+price[ds]?",
            r"mid[- ]+range",
            r"moderately (?:expensive|pricey|pricy|cheap|inexpensive)",
            FAIR_PRICE,
            r"(?:moderate|average|medium)[- ]+(?:cost|pricing)",
            r"£?20 *(?:-+|to) *£?25(?: pounds)?",
            r"between £?20 and £?25",
            r"affordabl[ey]",
            NOT_EXPENSIVE,
            NOT_CHEAP,
            judged=r"(?:moderate|average|reasonable|medium|mid[- ]range|fair)",
        ),
        "high": price_patterns(
            r"expensive",
            r"pric(?:e)?y",
            r"costly",
            r"(?:high(?:er)?|highly)[- ]+(?:cost|end|price[ds]?)",
            r"premium[- ](?:price[ds]?|pricing)",
            r"up(?:scale|market)",
            r"(?:more than|over|above|greater than|at least) £?30(?: pounds)?",
            r"£?30 (?:or more|plus)",
            r"above[- ]average (?:price[sd]?|pricing|costs?)",
            NOT_CHEAP,
            judged=r"(?:high|expensive)",
        ),
    },
    "customer rating": {
        "low": rating_patterns(
            r"(?:1|one)",
            rf"(?:low|lowly|poor|poorly|bad|badly|terrible|negative|{NOT_GOOD})",
            r"(?:low|poor|poorly|bad|badly|terrible)",
        ),
        "average": rating_patterns(
            r"(?:3|three)",
            r"(?:average|mediocre|moderate|moderately|decent|okay|ok|fair|good|well)",
            r"(?:average|mediocre|moderate|moderately|decent|okay|ok|fair)",
        ),
        "high": rating_patterns(
            r"(?:5|five)",
            r"(?:high|highly|excellent|great|very good|good|well|top|outstanding|fantastic|superb|positive)",
            r"(?:high|highly|excellent|great|very good|very well|outstanding)",
            extra=(r"highly recommended",),
        ),
    },
    "area": {
        "city centre": (
            r"(?:city|town)[- ]+cent(?:re|er|ral)",
            r"cent(?:re|er) of (?:the )?(?:city|town)",
            r"(?:in|at) the cent(?:re|er)",
            r"downtown",
        ),
        "riverside": (
            r"river[- ]*side",
            r"river(?:bank|front)",
            r"waterfront",
            r"(?:by|near|on|along|at|beside|off|next to|close to|overlooking|alongside|facing) the river",
            r"side of the river",
        ),
    },
    "familyFriendly": {
        "no": (
            rf"(?:not|isn't|non|none|never|no){gap(2)}[ -]+{FAMILY}[ -]+{FRIENDLY}",  # "not a family-friendly", "non family friendly"
            rf"{FAMILY}[ -]+{FRIENDLY}\s*:?\s*no",  # an output that copies the MR: "family friendly : no"
            rf"non[ -]+{FAMILY}",
            rf"{FAMILY}[ -]+unfriendly",
            r"adults?[ -]+only",
            r"(?:only )?(?:for|towards?|at) adults",  # "for adults", "catered towards adults"
            r"adult (?:establishment|venue|place|only|atmosphere|environment)",
            rf"{FAMILY}[ -]*free",  # "child-free"
            rf"(?:no|not) {FAMILY}(?: (?:allowed|welcome|permitted|accepted))?",  # "no kids allowed" (covers the "kids allowed" in it)
            rf"(?:not|no|isn't)(?: (?:very |really |so |too )?(?:good|suitable|ideal|friendly|open|welcoming|appropriate|"
            rf"recommended|great|conducive|a place|the place|a good place))? (?:for|to|with|towards?)(?: all| the| all the| your| young)? {FAMILY}",
            rf"(?:not|\w+n't|never|no){gap(3)} (?:bring|take|bringing|taking)(?: the| your| young)? {FAMILY}",  # "don't bring the kids"
            rf"{FAMILY}(?: are| is)?(?:n't| not) (?:welcome|welcomed|allowed|permitted|accepted)",  # "kids not allowed"
            rf"(?:does not|doesn't|do not|don't|will not|won't|cannot|can't)(?: \w+ly)? (?:welcome|allow|accept|admit|permit|cater (?:to|for))"
            rf"{gap(2)} {FAMILY}",
        ),
        "yes": (
            rf"{FAMILY}[ -]+{FRIENDLY}",  # "family friendly", "kid-friendly", "child oriented"
            rf"for (?:the |your |all the )?(?:whole |entire )?{FAMILY}",  # "good for families", "for the whole family"
            # "family pub": only "family" is the match, so the "pub" after it still counts for eatType
            r"famil(?:y|ies)(?= (?:place|venue|restaurant|pub|coffee shop|establishment|dining|atmosphere|setting|environment))",
            rf"(?:bring|take){gap(2)} (?:the |your )?(?:whole )?{FAMILY}",
            rf"{FAMILY} (?:are |is |will be )?(?:very )?(?:welcome|welcomed|allowed|permitted|accepted)",  # "kids welcome"
            rf"friendly (?:with|to|towards?) (?:the |all )?{FAMILY}",
            rf"(?:welcomes?|welcoming|allows?|accepts?|caters? (?:to|for)){gap(2)} {FAMILY}",
            r"all ages",
        ),
    },
}

# "restaurant" is also the generic word for any eatery ("a coffee shop ... this restaurant is not kid friendly"):
# next to a specific type it is not a second value.
GENERIC_VALUES = {"eatType": "restaurant"}

# A name right after one of these words is the landmark of the sentence, not the venue: "a pub near
# Blue Spice" does not realise name[Blue Spice].
PROXIMITY_BEFORE = re.compile(r"(?:near|nearby|close to|next to|beside|by|opposite|adjacent to)\s*$", re.IGNORECASE)


def whole_words(pattern: str) -> str:
    # Lookarounds rather than \b, which would fail before a pattern that starts with "£".
    return rf"(?<!\w)(?:{pattern})(?!\w)"


def compile_pattern(pattern: str) -> re.Pattern[str]:
    return re.compile(whole_words(pattern), re.IGNORECASE)


@dataclass(frozen=True)
class ValuePatterns:
    any: re.Pattern[str]  # all of them in one regex: one scan tells whether the value can be there at all
    each: tuple[re.Pattern[str], ...]  # each alone, so that overlapping matches are all found


COMPILED: dict[str, dict[str, ValuePatterns]] = {
    slot: {
        value: ValuePatterns(compile_pattern("|".join(patterns)), tuple(map(compile_pattern, patterns)))
        for value, patterns in values.items()
    }
    for slot, values in VALUE_PATTERNS.items()
}

# ---------------------------------------------------------------- normalising texts and reading MRs

SPACED_CLITIC = re.compile(r"\s+('(?:s|t|re|ve|ll|m|d)|n't)(?!\w)", re.IGNORECASE)
SPACED_HYPHEN = re.compile(r"(?<=\w)\s+-\s+(?=\w)")
SPACED_POUND = re.compile(r"£\s+(?=\d)")


def normalise(text: str) -> str:
    """Undo the E2E text files' word tokenisation, so one pattern fits raw and tokenised texts.

    `isn 't` and `is n't` -> `isn't`, `family - friendly` -> `family-friendly`, `£ 20 - 25` -> `£20-25`,
    curly apostrophes and en dashes -> ASCII, whitespace collapsed.
    """
    text = text.replace("\u2019", "'").replace("\u2013", "-")
    text = SPACED_CLITIC.sub(r"\1", text)
    text = SPACED_HYPHEN.sub("-", text)
    text = SPACED_POUND.sub("£", text)
    return " ".join(text.split())


OFFICIAL_SLOT = re.compile(r"\s*([^\[\],]+?)\s*\[([^\]]*)\]\s*,?")


def split_mr(mr: str) -> list[tuple[str, str]]:
    """(slot, value) pairs of either MR form, slot names and values as written."""
    mr = mr.strip()
    if "[" in mr:
        pairs, end = [], 0
        for match in OFFICIAL_SLOT.finditer(mr):
            if match.start() != end:
                break
            pairs.append((match.group(1), match.group(2)))
            end = match.end()
        if end != len(mr):
            raise ValueError(f"cannot read MR {mr!r}: expected `slot[value], slot[value], ...`")
        return pairs
    pairs = []
    for part in mr.split("|"):
        slot, sep, value = part.partition(" : ")
        if not sep:
            raise ValueError(f"cannot read MR {mr!r}: expected `slot : value | slot : value | ...` or `slot[value], ...`")
        pairs.append((slot.strip(), value))
    return pairs


def canonical_slot(slot: str) -> str:
    if slot in SLOTS:
        return slot
    if slot in FORMATTED_SLOT_NAMES:
        return FORMATTED_SLOT_NAMES[slot]
    raise ValueError(f"unknown E2E slot {slot!r}; expected one of {', '.join(SLOTS)} (or {', '.join(FORMATTED_SLOT_NAMES)})")


def canonical_value(slot: str, value: str) -> str:
    """The table's spelling of a value ("£ 20 - 25" -> "moderate", "fast food" -> "Fast food"); else the value itself."""
    value = normalise(value)
    for written, meaning in VALUE_MEANING.get(slot, {}).items():
        if value.lower() == written.lower():
            return meaning
    for known in VALUE_PATTERNS.get(slot, {}):
        if value.lower() == known.lower():
            return known
    return value


def parse_mr(mr: str) -> dict[str, str]:
    """An E2E MR in either form -> {official slot name: value}, in the MR's order.

    Price and rating values are given by meaning ("less than £20" -> "cheap", "5 out of 5" -> "high");
    a value the table does not know is kept as written and later matched literally.
    """
    parsed: dict[str, str] = {}
    for written_slot, written_value in split_mr(mr):
        slot = canonical_slot(written_slot)
        if not written_value.strip():
            raise ValueError(f"empty value for slot {slot!r} in MR {mr!r}")
        if slot in parsed:
            raise ValueError(f"slot {slot!r} appears twice in MR {mr!r}")
        parsed[slot] = canonical_value(slot, written_value)
    if not parsed:
        raise ValueError(f"empty MR {mr!r}")
    return parsed


def is_e2e_mr(mr: str) -> bool:
    """Whether `mr` reads as an E2E MR (a WebNLG/DART triple context does not)."""
    try:
        parse_mr(mr)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------- finding slot mentions in a text


@dataclass(frozen=True)
class Mention:
    slot: str
    value: str
    start: int
    end: int

    def inside(self, other: Mention) -> bool:
        """Strictly inside `other`'s span (same span does not count)."""
        return other.start <= self.start and self.end <= other.end and (self.start, self.end) != (other.start, other.end)


def entity_pattern(names: Iterable[str]) -> re.Pattern[str] | None:
    """One regex for a list of names; a leading "The" may be left out ("Phoenix" for "The Phoenix")."""
    alternatives = []
    for name in sorted({normalise(n) for n in names}, key=len, reverse=True):  # longest first: "The Rice Boat" before "Rice"
        words = [re.escape(word) for word in name.split()]
        if len(words) > 1 and words[0].lower() == "the":
            words = [r"(?:the\s+)?" + words[1], *words[2:]]
        alternatives.append(r"\s+".join(words))
    return compile_pattern("|".join(alternatives)) if alternatives else None


def entity_key(name: str) -> str:
    """What two spellings of one name share: "The Blue Spice" and "blue  spice" -> "blue spice"."""
    return normalise(name).lower().removeprefix("the ")


class Entities:
    """The restaurant and landmark names a text may mention (E2E's own plus those of the MRs at hand).

    A name found in a text is reported in the lexicon's spelling, so it compares equal to the MR's.
    """

    def __init__(self, names: Iterable[str], landmarks: Iterable[str]) -> None:
        self.spelling: dict[str, dict[str, str]] = {}
        for slot, values in (("name", names), ("near", landmarks)):
            keyed: dict[str, str] = {}
            for value in sorted(set(values)):  # sorted: the same spelling wins on every run
                keyed.setdefault(entity_key(value), value)
            self.spelling[slot] = keyed
        self.patterns = {slot: entity_pattern(keyed.values()) for slot, keyed in self.spelling.items()}

    @classmethod
    def from_mrs(cls, mrs: Iterable[dict[str, str]] = ()) -> Entities:
        names, landmarks = list(E2E_NAMES), list(E2E_LANDMARKS)
        for mr in mrs:
            names += [mr["name"]] if "name" in mr else []
            landmarks += [mr["near"]] if "near" in mr else []
        return cls(names, landmarks)

    def including(self, mr: dict[str, str]) -> Entities:
        """This lexicon, plus the MR's own names if it lacks them."""
        if all(entity_key(mr[slot]) in self.spelling[slot] for slot in ENTITY_SLOTS if slot in mr):
            return self
        names, landmarks = ([*self.spelling[slot].values(), *([mr[slot]] if slot in mr else [])] for slot in ENTITY_SLOTS)
        return Entities(names, landmarks)

    def spell(self, slot: str, name: str) -> str:
        return self.spelling[slot].get(entity_key(name), name)

    def mentions(self, text: str, slot: str) -> list[Mention]:
        pattern = self.patterns[slot]
        if pattern is None:
            return []
        found = [Mention(slot, self.spell(slot, m.group()), m.start(), m.end()) for m in pattern.finditer(text)]
        if slot == "name":
            found = [m for m in found if not PROXIMITY_BEFORE.search(text, 0, m.start)]
        return found


def value_mentions(text: str, mr: dict[str, str]) -> list[Mention]:
    """Every match of every value pattern, overlaps included (keep_mention sorts them out)."""
    mentions = []
    for slot, values in COMPILED.items():
        for value, patterns in values.items():
            if patterns.any.search(text):
                mentions += [Mention(slot, value, m.start(), m.end()) for p in patterns.each for m in p.finditer(text)]
        unknown = mr.get(slot)
        if unknown is not None and unknown not in values:  # a value outside the table: look for it literally
            literal = compile_pattern(r"\s+".join(map(re.escape, unknown.split())))
            mentions += [Mention(slot, unknown, m.start(), m.end()) for m in literal.finditer(text)]
    return mentions


def keep_mention(mention: Mention, others: Sequence[Mention], mr: dict[str, str]) -> bool:
    """Drop a mention inside a longer one, and one sharing its span with a reading the MR supports."""
    for other in others:
        if other is mention:
            continue
        if mention.inside(other):
            return False
        same_span = (mention.start, mention.end) == (other.start, other.end)
        if same_span and mr.get(other.slot) == other.value and mr.get(mention.slot) != mention.value:
            return False
    return True


def first_reading_per_span(mentions: Sequence[Mention]) -> list[Mention]:
    """Of several readings of one span that the MR does not settle ("affordable", "The Rice Boat"), keep the first."""
    seen: set[tuple[int, int]] = set()
    kept = []
    for mention in mentions:
        if (mention.start, mention.end) not in seen:
            seen.add((mention.start, mention.end))
            kept.append(mention)
    return kept


def realised_values(text: str, mr: dict[str, str], entities: Entities) -> dict[str, list[str]]:
    """Slot -> the distinct values `text` realises, in order of appearance."""
    text = normalise(text)
    mentions = value_mentions(text, mr)
    for slot in ENTITY_SLOTS:
        mentions += entities.mentions(text, slot)
    kept = first_reading_per_span([m for m in mentions if keep_mention(m, mentions, mr)])
    found: dict[str, list[str]] = {}
    for mention in sorted(kept, key=lambda m: m.start):
        values = found.setdefault(mention.slot, [])
        if mention.value not in values:
            values.append(mention.value)
    for slot, generic in GENERIC_VALUES.items():
        if generic in found.get(slot, ()) and len(found[slot]) > 1:
            found[slot].remove(generic)
    return found


# ---------------------------------------------------------------- comparing with the MR


@dataclass(frozen=True)
class SlotCheck:
    """One text against its MR. `found` holds what the text realises, slot -> values."""

    slots: int
    missing: tuple[str, ...] = ()
    wrong: tuple[tuple[str, str], ...] = ()  # (slot, the value realised instead of the MR's)
    added: tuple[tuple[str, str], ...] = ()  # (slot, a value realised that the MR does not hold)
    found: dict[str, tuple[str, ...]] = field(default_factory=dict, compare=False)

    @property
    def errors(self) -> int:
        return len(self.missing) + len(self.wrong) + len(self.added)

    def describe(self) -> str:
        """A short line for a per-example table: "missing: near; wrong: food=Italian; added: area=riverside"."""
        parts = []
        if self.missing:
            parts.append("missing: " + ", ".join(self.missing))
        for label, pairs in (("wrong", self.wrong), ("added", self.added)):
            if pairs:
                parts.append(f"{label}: " + ", ".join(f"{slot}={value}" for slot, value in pairs))
        return "; ".join(parts)


def compare(mr: dict[str, str], found: dict[str, list[str]]) -> SlotCheck:
    """Per slot: the MR's value missing, replaced by another (wrong), or joined by others (added)."""
    missing, wrong, added = [], [], []
    for slot in SLOTS:
        values = found.get(slot, [])
        if slot not in mr:
            added += [(slot, value) for value in values]
        elif not values:
            missing.append(slot)
        elif mr[slot] in values:
            added += [(slot, value) for value in values if value != mr[slot]]
        else:  # the first other value contradicts the MR's; any further ones are added facts
            wrong.append((slot, values[0]))
            added += [(slot, value) for value in values[1:]]
    return SlotCheck(len(mr), tuple(missing), tuple(wrong), tuple(added), {s: tuple(v) for s, v in found.items()})


def check_text(mr: str | dict[str, str], text: str, entities: Entities | None = None) -> SlotCheck:
    """Which slots of `mr` (either MR form, or parse_mr's dict) `text` misses, contradicts or adds.

    `entities` lists the names that may be mentioned; E2E's own and this MR's are always included.
    """
    parsed = parse_mr(mr) if isinstance(mr, str) else mr
    entities = Entities.from_mrs([parsed]) if entities is None else entities.including(parsed)
    parsed = {slot: entities.spell(slot, value) if slot in ENTITY_SLOTS else value for slot, value in parsed.items()}
    return compare(parsed, realised_values(text, parsed, entities))


# ---------------------------------------------------------------- corpus level


@dataclass(frozen=True)
class SlotErrorReport:
    rate: float  # (missing + wrong + added) / slots
    slots: int
    missing: int
    wrong: int
    added: int
    examples: int
    examples_with_errors: int

    def as_dict(self, prefix: str = "") -> dict[str, float | int]:
        """For eval.json / MLflow: rate, counts, and the share of texts with any error."""
        values: dict[str, float | int] = {
            "rate": self.rate,
            "missing": self.missing,
            "wrong": self.wrong,
            "added": self.added,
            "slots": self.slots,
            "examples": self.examples,
            "examples_with_errors": self.examples_with_errors,
        }
        return {prefix + key: value for key, value in values.items()}


def check_corpus(mrs: Sequence[str], texts: Sequence[str]) -> list[SlotCheck]:
    """check_text for each (MR, text) pair; the names of all the MRs are known to every check."""
    if len(mrs) != len(texts):
        raise ValueError(f"{len(mrs)} MRs but {len(texts)} texts; pass one text per MR (repeat an MR for several texts)")
    parsed = {mr: parse_mr(mr) for mr in dict.fromkeys(mrs)}  # E2E repeats each MR for its ~8 references
    entities = Entities.from_mrs(parsed.values())
    return [check_text(parsed[mr], text, entities) for mr, text in zip(mrs, texts)]


def summarise(checks: Sequence[SlotCheck]) -> SlotErrorReport:
    slots = sum(c.slots for c in checks)
    missing, wrong, added = (sum(len(getattr(c, kind)) for c in checks) for kind in ("missing", "wrong", "added"))
    rate = (missing + wrong + added) / slots if slots else 0.0
    return SlotErrorReport(rate, slots, missing, wrong, added, len(checks), sum(c.errors > 0 for c in checks))


def slot_error_rate(mrs: Sequence[str], texts: Sequence[str]) -> SlotErrorReport:
    """The corpus slot error rate of `texts` (one per MR; repeat an MR to score several texts for it)."""
    return summarise(check_corpus(mrs, texts))


# ---------------------------------------------------------------- command line


def read_pairs(path: Path) -> tuple[list[str], list[str]]:
    """(MRs, texts) of a JSONL file ({context, completion|prediction}) or of `MR||text` lines."""
    mrs, texts = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            record = json.loads(line)
            text = record.get("prediction", record.get("completion"))
            if not isinstance(record.get("context"), str) or not isinstance(text, str):
                raise ValueError(f'{path}:{number}: expected {{"context": str, "completion" or "prediction": str}}')
            mrs.append(record["context"])
            texts.append(text)
        elif "||" in line:
            mr, text = line.split("||")[:2]
            mrs.append(mr)
            texts.append(text)
        else:
            raise ValueError(f"{path}:{number}: expected a JSON object or `MR||text`")
    return mrs, texts


def read_lines(path: Path) -> list[str]:
    # Empty lines stay: an empty output is a text that realises nothing, and dropping it would shift the rest.
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="E2E slot error rate of texts against their MRs (see docs/slot_error.md).")
    parser.add_argument("pairs", nargs="?", help="JSONL with context and completion/prediction, or `MR||text` lines")
    parser.add_argument("--mrs", help="one MR per line (either form); with --texts")
    parser.add_argument("--texts", help="one text per line, parallel to --mrs")
    parser.add_argument("--errors", type=int, default=0, help="also print up to this many texts with errors")
    args = parser.parse_args(argv)
    if args.pairs:
        mrs, texts = read_pairs(Path(args.pairs))
    elif args.mrs and args.texts:
        mrs, texts = read_lines(Path(args.mrs)), read_lines(Path(args.texts))
    else:
        parser.error("give a pairs file, or --mrs and --texts")
    checks = check_corpus(mrs, texts)
    print(json.dumps(summarise(checks).as_dict(), indent=2))
    shown = [(mr, text, check) for mr, text, check in zip(mrs, texts, checks) if check.errors][: args.errors]
    for mr, text, check in shown:
        print(f"\n{mr}\n{text}\n  -> {check.describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
