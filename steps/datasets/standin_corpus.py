"""The stand-in base's pretraining corpus: documents that can only be predicted by copying from a record.

Real GPT-2 arrives knowing the language and how to repeat a name it has just read; LoRA then only has to learn
the task. The offline stand-in (steps.make_base) must learn both from this corpus, so it is built for that:

- **Records of other domains and their texts** (hotels, films, books, musicians, towns, universities, clubs): a
  record in one of three syntaxes (none of them the E2E MR's `slot : value |`), a newline, then a text that states
  every field. Names are invented from syllables (millions of them), so no name can be memorised: the only way
  to predict one is to copy it from the record above.
- **Restaurant descriptions** in the sample's own phrasing (steps.sample_data's phrase banks), two consecutive
  descriptions of one venue (half with invented names, half with the sample's own, as web text names real places),
  and never the MR they came from: the base learns how restaurants are described, not the MR -> text task the
  adapter is there to learn. Every token of the sample's references occurs, so the base can write all of them
  (the loss, and so the trained rows, cover the corpus's tokens only).
- **Ships, held out**: records of a domain the base never sees, for the copy probe (`probe_records`).

Documents are joined by `<|endoftext|>` when packed, as GPT-2's were; the text after that token is a new document,
so the base has no reason to describe the MR that precedes it in the fine-tuning data: that is the adapter's job.
Everything comes from `random.Random(<seeded string>)`, never from set order, so a seed gives the same corpus
on every machine.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from steps import sample_data

Record = dict[str, str]

ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z"]
VOWELS = ["a", "e", "i", "o", "u"]
ENDINGS = ["", "", "n", "r", "s", "l"]
GENRES = ["drama", "comedy", "thriller", "western", "documentary", "musical", "horror", "romance"]
INSTRUMENTS = ["guitar", "piano", "violin", "drums", "cello", "trumpet", "flute", "saxophone"]
COUNTRIES = ["France", "Italy", "Japan", "Brazil", "Canada", "Norway", "Egypt", "Kenya", "Peru", "Spain", "India", "Chile"]
SUBJECTS = ["history", "physics", "medicine", "law", "music", "art", "biology", "economics"]
SPORTS = ["football", "cricket", "rugby", "hockey", "basketball", "volleyball"]
VENUE_NOUNS = ["Kitchen", "Table", "Garden", "House", "Grill", "Corner", "Tavern", "Room", "Bistro", "Cafe"]


def word(rng: random.Random) -> str:
    """An invented capitalised word of two or three syllables: `Dorivan`, `Kesu`."""
    syllables = rng.choice((2, 2, 3))
    return ("".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(syllables)) + rng.choice(ENDINGS)).capitalize()


def person(rng: random.Random) -> str:
    return f"{word(rng)} {word(rng)}"


def place(rng: random.Random) -> str:
    return word(rng) if rng.random() < 0.7 else f"{word(rng)} {rng.choice(['Bay', 'Falls', 'Hill', 'Ford', 'Vale', 'Port'])}"


def with_optional(record: Record, rng: random.Random, key: str, value: Callable[[], str], p: float = 0.5) -> Record:
    if rng.random() < p:
        record[key] = value()
    return record


def hotel(rng: random.Random) -> tuple[Record, list[str]]:
    name = f"Hotel {word(rng)}" if rng.random() < 0.5 else f"The {word(rng)} Inn"
    r = with_optional({"name": name, "city": place(rng), "stars": str(rng.randint(1, 5)), "rooms": str(rng.randint(8, 400))},
                      rng, "near", lambda: place(rng))
    first = rng.choice([f"{name} is a {r['stars']} - star hotel in {r['city']}", f"In {r['city']} , {name} has {r['stars']} stars",
                        f"{name} is a hotel in {r['city']} with {r['stars']} stars"])
    parts = [first, rng.choice([f"It has {r['rooms']} rooms", f"{name} offers {r['rooms']} rooms", f"The hotel has {r['rooms']} rooms"])]
    if "near" in r:
        parts.append(rng.choice([f"It is near {r['near']}", f"{name} is close to {r['near']}"]))
    return r, parts


def film(rng: random.Random) -> tuple[Record, list[str]]:
    title = f"The {word(rng)}" if rng.random() < 0.4 else f"{word(rng)} {rng.choice(['Rising', 'Road', 'Nights', 'Story', 'Dreams'])}"
    r = with_optional({"title": title, "director": person(rng), "year": str(rng.randint(1930, 2024)), "genre": rng.choice(GENRES)},
                      rng, "starring", lambda: person(rng))
    parts = [rng.choice([f"{title} is a {r['year']} {r['genre']} film directed by {r['director']}",
                         f"Directed by {r['director']} , {title} is a {r['genre']} from {r['year']}",
                         f"{r['director']} directed the {r['genre']} {title} in {r['year']}"])]
    if "starring" in r:
        parts.append(rng.choice([f"It stars {r['starring']}", f"{r['starring']} plays the lead in {title}"]))
    return r, parts


def book(rng: random.Random) -> tuple[Record, list[str]]:
    title = f"{word(rng)} and {word(rng)}" if rng.random() < 0.3 else f"The {word(rng)} {rng.choice(['Letters', 'Garden', 'House', 'Sea', 'War'])}"
    r = with_optional({"title": title, "author": person(rng), "pages": str(rng.randint(90, 900)), "year": str(rng.randint(1800, 2024))},
                      rng, "publisher", lambda: f"{word(rng)} Press")
    parts = [rng.choice([f"{title} is a book by {r['author']} , published in {r['year']}", f"{r['author']} wrote {title} in {r['year']}",
                         f"Published in {r['year']} , {title} was written by {r['author']}"]),
             rng.choice([f"It has {r['pages']} pages", f"The book runs to {r['pages']} pages"])]
    if "publisher" in r:
        parts.append(f"It was published by {r['publisher']}")
    return r, parts


def musician(rng: random.Random) -> tuple[Record, list[str]]:
    name = person(rng)
    r = with_optional({"name": name, "instrument": rng.choice(INSTRUMENTS), "born": place(rng), "country": rng.choice(COUNTRIES)},
                      rng, "band", lambda: f"The {word(rng)}s")
    parts = [rng.choice([f"{name} is a {r['instrument']} player from {r['born']} , {r['country']}",
                         f"Born in {r['born']} , {r['country']} , {name} plays the {r['instrument']}",
                         f"{name} plays the {r['instrument']} and comes from {r['born']} in {r['country']}"])]
    if "band" in r:
        parts.append(rng.choice([f"{name} is a member of {r['band']}", f"{name} plays in {r['band']}"]))
    return r, parts


def town(rng: random.Random) -> tuple[Record, list[str]]:
    name = place(rng)
    r = with_optional({"name": name, "country": rng.choice(COUNTRIES), "population": str(rng.randint(500, 90000)),
                       "river": f"River {word(rng)}"}, rng, "mayor", lambda: person(rng))
    parts = [rng.choice([f"{name} is a town in {r['country']} with {r['population']} people",
                         f"{name} , on the {r['river']} , has {r['population']} people and lies in {r['country']}",
                         f"With a population of {r['population']} , {name} is a town in {r['country']}"]),
             rng.choice([f"The {r['river']} runs through {name}", f"{name} is on the {r['river']}"])]
    if "mayor" in r:
        parts.append(f"Its mayor is {r['mayor']}")
    return r, parts


def university(rng: random.Random) -> tuple[Record, list[str]]:
    name = f"University of {place(rng)}"
    r = with_optional({"name": name, "founded": str(rng.randint(1200, 2010)), "students": str(rng.randint(900, 60000)),
                       "known for": rng.choice(SUBJECTS)}, rng, "rector", lambda: person(rng))
    parts = [rng.choice([f"The {name} was founded in {r['founded']} and has {r['students']} students",
                         f"Founded in {r['founded']} , the {name} has {r['students']} students"]),
             rng.choice([f"It is known for {r['known for']}", f"The {name} is famous for {r['known for']}"])]
    if "rector" in r:
        parts.append(f"{r['rector']} is its rector")
    return r, parts


def club(rng: random.Random) -> tuple[Record, list[str]]:
    name = f"{place(rng)} {rng.choice(['United', 'Rovers', 'City', 'Athletic'])}"
    r = with_optional({"name": name, "sport": rng.choice(SPORTS), "ground": f"{word(rng)} Park", "founded": str(rng.randint(1860, 2015))},
                      rng, "captain", lambda: person(rng))
    parts = [rng.choice([f"{name} is a {r['sport']} club founded in {r['founded']}", f"Founded in {r['founded']} , {name} plays {r['sport']}"]),
             rng.choice([f"Its home ground is {r['ground']}", f"{name} plays at {r['ground']}"])]
    if "captain" in r:
        parts.append(f"The captain is {r['captain']}")
    return r, parts


def ship(rng: random.Random) -> tuple[Record, list[str]]:
    """The held-out domain: never in the corpus, only in the copy probe."""
    name = f"{rng.choice(['HMS', 'SS', 'MV'])} {word(rng)}"
    r = {"name": name, "launched": str(rng.randint(1800, 2020)), "length": f"{rng.randint(20, 300)} metres", "home port": place(rng)}
    return r, [f"{name} was launched in {r['launched']}", f"Its home port is {r['home port']}"]


DOMAINS = (hotel, film, book, musician, town, university, club)
# Record syntaxes; deliberately none is the E2E MR's `slot : value | slot : value`.
SYNTAXES: tuple[Callable[[Record], str], ...] = (
    lambda r: " ; ".join(f"{k} = {v}" for k, v in r.items()),
    lambda r: " ".join(f"[{k}] {v}" for k, v in r.items()),
    lambda r: ", ".join(f"{k}: {v}" for k, v in r.items()),
)
RESTAURANT_SHARE = 0.3  # of the documents: two descriptions of one invented venue; the rest are records and texts


def sentences(parts: list[str]) -> str:
    return " ".join(p[0].upper() + p[1:] + " ." for p in parts)


def record_document(rng: random.Random) -> str:
    record, parts = rng.choice(DOMAINS)(rng)
    return rng.choice(SYNTAXES)(record) + "\n" + sentences(parts)


def restaurant_document(rng: random.Random) -> str:
    """Two descriptions of one venue with an invented name, in the sample's phrasing; no MR."""
    mr = sample_data.random_mr(rng)
    if rng.random() < 0.5:
        mr["name"] = f"The {word(rng)} {rng.choice(VENUE_NOUNS)}" if rng.random() < 0.5 else word(rng)
    else:  # the sample's own name (the base must be able to write its tokens) with one fact: the sample's MRs have
        slot = rng.choice([k for k in mr if k != "name"])  # two or more, so this is never one of their references
        mr = {"name": mr["name"], slot: mr[slot]}
    if "near" in mr and rng.random() < 0.5:
        mr["near"] = f"The {word(rng)} {rng.choice(['Hotel', 'Museum', 'Station', 'Bakery'])}"
    return " ".join(sample_data.references_for(mr, 2, rng))


def documents(seed: int, count: int) -> list[str]:
    """`count` documents for pretraining (RESTAURANT_SHARE of them restaurant descriptions)."""
    rng = random.Random(f"stand-in corpus {seed}")
    return [restaurant_document(rng) if rng.random() < RESTAURANT_SHARE else record_document(rng) for _ in range(count)]


def probe_records(seed: int, count: int, unseen_domain: bool = True) -> list[tuple[str, str]]:
    """(prompt, name) pairs for the copy probe: a record and the newline its text follows.

    unseen_domain: ships, a domain the corpus never contains, and the name is the ship's invented word (`Rafil` of
    `SS Rafil`). Otherwise fresh records (names no document has) of the corpus's own domains, and the name is the
    record's first value (a hotel's, a film's or a book's title). Either way no amount of memorising predicts it.
    """
    rng = random.Random(f"stand-in copy probe {seed}" if unseen_domain else f"stand-in copy probe, known domains {seed}")
    out = []
    for _ in range(count):
        record, _ = ship(rng) if unseen_domain else rng.choice(DOMAINS)(rng)
        name = next(iter(record.values()))
        out.append((rng.choice(SYNTAXES)(record) + "\n", name.split(" ", 1)[1] if unseen_domain else name))
    return out
