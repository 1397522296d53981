"""A small synthetic E2E-style restaurant dataset, so the whole pipeline runs offline.

MRs use the eight E2E slots and are rendered like the original repo's text files
(`name : X | Type : pub | price : £ 20 - 25 | ...`); references are built from
phrase banks in the same word-tokenised style (`family - friendly`, `It 's`,
spaces before `.` and `,`) and mention every slot of their MR. Splits share no
MR, and the references of one MR are contiguous, as in the real valid/test files.

The phrase banks also feed the stand-in base's pretraining corpus (steps.datasets.standin_corpus), which describes
restaurants with invented names and never pairs an MR with its text.

Everything comes from one `random.Random(seed)` and never iterates over a set, so
the same seed gives byte-identical files on any machine.

    python -m steps.sample_data --out_dir data/raw/sample --seed 0   # train.txt, valid.txt, test.txt ("MR||ref")
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

from steps.core.common import InputError, atomic_write, run_stage

SPLITS = ("train", "valid", "test")

NAMES = [
    "The Golden Lion", "Blue Harbour", "The Copper Kettle", "Riverside Rose", "The Old Mill House", "Saffron Garden",
    "The Silver Spoon", "Green Olive", "The Red Lantern", "Maple Corner", "The Wandering Fox", "Little Italy",
    "The Brass Bell", "Juniper", "The Crown and Anchor", "Lotus Pavilion", "The Hungry Heron", "Cedar House",
    "The Black Swan", "Sakura", "Bella Vista", "The Cosy Nook", "Harvest Table", "The Jolly Ferryman",
    "Pearl Dragon", "The Willow Tree", "Le Petit Jardin", "The Oak Barrel", "Spice Route", "The Yellow Door",
]  # fmt: skip
LANDMARKS = [
    "Café Rosé", "The Corn Exchange", "Market Square", "The Grand Hotel", "Bridge Street Bakery", "The Museum of Art",
    "Riverside Cinema", "Crème Brûlée Bistro", "The Station", "Central Library", "The Botanic Garden", "Burger Barn",
]  # fmt: skip

# Slot name in the text files -> its values, already in the text files' tokenisation.
VALUES = {
    "Type": ["pub", "coffee shop", "restaurant"],
    "food": ["English", "Chinese", "French", "Italian", "Indian", "Japanese", "Fast food"],
    "price": ["cheap", "moderate", "high", "less than £ 20", "£ 20 - 25", "more than £ 30"],
    "customer rating": ["low", "average", "high", "1 out of 5", "3 out of 5", "5 out of 5"],
    "area": ["city centre", "riverside"],
    "family friendly": ["yes", "no"],
}
SLOT_ORDER = ("name", "Type", "food", "price", "customer rating", "area", "family friendly", "near")
# How often an optional slot appears; with these an MR has about five slots, as in E2E.
SLOT_PROBABILITY = {"Type": 0.7, "food": 0.6, "price": 0.55, "customer rating": 0.6, "area": 0.75, "family friendly": 0.6, "near": 0.45}

PRICE = {
    "cheap": ["has cheap prices", "is cheap", "is inexpensive", "has a cheap price range", "offers food at low prices"],
    "moderate": ["is moderately priced", "has moderate prices", "has a moderate price range", "is reasonably priced"],
    "high": ["is expensive", "has high prices", "has a high price range", "is on the pricey side"],
    "less than £ 20": ["costs less than £ 20 per person", "has a price range of less than £ 20", "charges less than £ 20"],
    "£ 20 - 25": ["has a price range of £ 20 - 25", "costs £ 20 - 25 per person", "charges £ 20 - 25 for a meal"],
    "more than £ 30": ["costs more than £ 30 per person", "has a price range of more than £ 30", "charges more than £ 30"],
}
RATING_WORDS = {
    "low": ["has a low customer rating", "is rated low by customers", "has low ratings", "gets poor reviews"],
    "average": ["has an average customer rating", "is rated average by customers", "has average reviews"],
    "high": ["has a high customer rating", "is highly rated", "gets excellent reviews", "is rated high by customers"],
}
RATING_SCORE = ["has a customer rating of {v}", "is rated {v} by customers", "has a rating of {v}", "scores {v} with customers"]
AREA = {
    "city centre": ["is in the city centre", "is located in the city centre", "can be found in the city centre"],
    "riverside": ["is by the riverside", "is located on the riverside", "is in the riverside area", "sits by the river"],
}
AREA_OPENING = {"city centre": ["In the city centre", "In the centre of the city"], "riverside": ["By the riverside", "In the riverside area"]}
FAMILY = {
    "yes": ["is family - friendly", "is kid friendly", "welcomes families", "is child friendly", "is a good place for children"],
    "no": ["is not family - friendly", "is not kid friendly", "does not welcome children", "is not suitable for families"],
}
NEAR = ["is near {v}", "is located near {v}", "is close to {v}", "is next to {v}", "can be found near {v}"]
FOOD = ["serves {v} food", "offers {v} food", "has {v} food on the menu", "specialises in {v} food", "serves {v} dishes"]
FAST_FOOD = ["serves fast food", "offers fast food", "specialises in fast food"]
GENERIC_NOUNS = ["place", "venue", "eatery", "place to eat"]


def random_mr(rng: random.Random) -> dict[str, str]:
    """One MR: a name plus at least two optional slots, in E2E's slot order."""
    while True:
        mr = {"name": rng.choice(NAMES)}
        for slot in SLOT_ORDER[1:]:
            if rng.random() < SLOT_PROBABILITY[slot]:
                mr[slot] = rng.choice(LANDMARKS) if slot == "near" else rng.choice(VALUES[slot])
        if len(mr) >= 3:
            return mr


def render_mr(mr: dict[str, str]) -> str:
    return " | ".join(f"{slot} : {mr[slot]}" for slot in SLOT_ORDER if slot in mr)


def with_article(phrase: str) -> str:
    return ("an " if phrase[0].lower() in "aeiou" else "a ") + phrase


def noun_phrase(mr: dict[str, str], rng: random.Random, use_food: bool) -> str:
    """`a pub`, `an Italian coffee shop`, `a fast food place`: eatType (or a generic noun), maybe the food."""
    noun = mr.get("Type") or rng.choice(GENERIC_NOUNS)
    if use_food and "food" in mr:
        noun = f"{mr['food'].lower() if mr['food'] == 'Fast food' else mr['food']} {noun}"
    return with_article(noun)


def predicate(slot: str, value: str, rng: random.Random) -> str:
    """A verb phrase stating one slot, to follow a subject such as `It`."""
    if slot == "food":
        return rng.choice(FAST_FOOD) if value == "Fast food" else rng.choice(FOOD).format(v=value)
    if slot == "price":
        return rng.choice(PRICE[value])
    if slot == "customer rating":
        return rng.choice(RATING_WORDS[value]) if value in RATING_WORDS else rng.choice(RATING_SCORE).format(v=value)
    if slot == "area":
        return rng.choice(AREA[value])
    if slot == "family friendly":
        return rng.choice(FAMILY[value])
    if slot == "near":
        return rng.choice(NEAR).format(v=value)
    raise ValueError(f"no predicate for slot {slot!r}")


def join_predicates(parts: list[str]) -> str:
    if len(parts) <= 2:
        return " and ".join(parts)
    return " , ".join(parts[:-1]) + " and " + parts[-1]


def opening(mr: dict[str, str], rng: random.Random) -> tuple[str, set[str]]:
    """The first clause, which always names the venue; returns it and the slots it stated."""
    use_food = rng.random() < 0.5
    np = noun_phrase(mr, rng, use_food)
    name = mr["name"]
    choices: list[tuple[str, set[str]]] = [
        (f"{name} is {np}", set()),
        (f"There is {np} called {name}", set()),
        (f"There is {np} named {name}", set()),
    ]
    if "area" in mr:
        area = rng.choice(AREA_OPENING[mr["area"]])
        choices += [(f"{area} , there is {np} called {name}", {"area"}), (f"{area} you can find {np} named {name}", {"area"})]
    if "near" in mr:
        choices.append((f"Near {mr['near']} , there is {np} called {name}", {"near"}))
    text, extra = rng.choice(choices)
    return text, {"name", "Type", *extra, *({"food"} if use_food else set())}


def sentence_subject(mr: dict[str, str], rng: random.Random) -> str:
    options = ["It", "It", mr["name"]]
    if "Type" in mr:
        options += [f"The {mr['Type']}", f"This {mr['Type']}"]
    return rng.choice(options)


def random_reference(mr: dict[str, str], rng: random.Random) -> str:
    """One natural reference that mentions every slot of `mr` exactly once."""
    first, stated = opening(mr, rng)
    rest = [predicate(slot, mr[slot], rng) for slot in SLOT_ORDER if slot in mr and slot not in stated]
    rng.shuffle(rest)
    sentences = [first]
    if rest and rng.random() < 0.5:  # continue the opening: "There is a pub called X that serves ..."
        take = rng.randint(1, min(2, len(rest)))
        sentences[0] += " that " + join_predicates(rest[:take])
        rest = rest[take:]
    while rest:
        take = rng.randint(1, min(3, len(rest)))
        sentences.append(f"{sentence_subject(mr, rng)} {join_predicates(rest[:take])}")
        rest = rest[take:]
    return " ".join(s[0].upper() + s[1:] + " ." for s in sentences)


def references_for(mr: dict[str, str], count: int, rng: random.Random) -> list[str]:
    """`count` distinct references (fewer only if the phrase banks run out for a tiny MR)."""
    refs: dict[str, None] = {}  # a dict keeps insertion order; a set's order would vary between runs
    for _ in range(count * 20):
        refs.setdefault(random_reference(mr, rng), None)
        if len(refs) == count:
            break
    return list(refs)


def generate_sample(
    seed: int = 0, train_mrs: int = 600, valid_mrs: int = 60, test_mrs: int = 60
) -> dict[str, list[tuple[str, str]]]:
    """Split name -> list of (MR, reference) lines; MRs never repeat across splits."""
    counts = {"train": train_mrs, "valid": valid_mrs, "test": test_mrs}
    if min(counts.values()) < 1:
        raise InputError(f"every split needs at least one MR; got {counts}")
    refs_per_mr = {"train": (3, 7), "valid": (4, 8), "test": (5, 10)}
    rng = random.Random(seed)
    unique: dict[str, dict[str, str]] = {}
    for _ in range(50 * sum(counts.values())):
        mr = random_mr(rng)
        unique.setdefault(render_mr(mr), mr)
        if len(unique) == sum(counts.values()):
            break
    else:
        raise InputError(f"could not draw {sum(counts.values())} distinct MRs; ask for fewer")
    mrs = list(unique.items())
    rng.shuffle(mrs)
    splits: dict[str, list[tuple[str, str]]] = {}
    start = 0
    for split in SPLITS:
        lines = []
        for rendered, mr in mrs[start : start + counts[split]]:
            lines += [(rendered, ref) for ref in references_for(mr, rng.randint(*refs_per_mr[split]), rng)]
        splits[split] = lines
        start += counts[split]
    return splits


def write_text_files(splits: dict[str, list[tuple[str, str]]], out_dir: Path) -> None:
    """Write `<split>.txt` with one `MR||reference` per line, the original repo's raw format."""
    for split, lines in splits.items():
        with atomic_write(out_dir / f"{split}.txt") as f:
            f.writelines(f"{mr}||{ref}\n" for mr, ref in lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Generate the synthetic E2E-style sample as raw text files (train.txt, valid.txt, test.txt).",
    )
    parser.add_argument("--out_dir", default="data/raw/sample", help="directory for the three MR||ref text files")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives byte-identical files")
    parser.add_argument("--train_mrs", type=int, default=600, help="distinct MRs in train (3-7 references each)")
    parser.add_argument("--valid_mrs", type=int, default=60, help="distinct MRs in valid (4-8 references each)")
    parser.add_argument("--test_mrs", type=int, default=60, help="distinct MRs in test (5-10 references each)")
    args = parser.parse_args(argv)
    return run_stage(lambda: run(args))


def run(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    splits = generate_sample(args.seed, args.train_mrs, args.valid_mrs, args.test_mrs)
    write_text_files(splits, Path(args.out_dir))
    written = ", ".join(f"{split} {len(lines)} lines" for split, lines in splits.items()) + f" to {args.out_dir}"
    print(f"sample_data: wrote {written} (seed {args.seed}, {time.perf_counter() - start:.2f} s)")


if __name__ == "__main__":
    sys.exit(main())
