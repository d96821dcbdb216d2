"""A small, learnable, deterministic English-like corpus for tests (tests never need downloads)."""

from __future__ import annotations

import random

SUBJECTS = ["the king", "a fool", "the queen", "my lord", "the old man", "a soldier", "the duke", "her father"]
VERBS = ["loves", "fears", "serves", "betrays", "follows", "remembers", "praises", "forgives"]
OBJECTS = ["the crown", "his daughter", "the sea", "a letter", "the castle", "his honour", "the night", "a song"]
TAILS = ["in the morning.", "with a heavy heart.", "and says nothing.", "for the last time.", "before the storm."]


def sentence(rng: random.Random) -> str:
    s = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(TAILS)}"
    return s[0].upper() + s[1:]


def documents(n: int, seed: int = 0, sentences: tuple[int, int] = (5, 30)) -> list[dict]:
    rng = random.Random(seed)
    sources = ["Plays", "Poems"]
    docs = []
    for i in range(n):
        text = " ".join(sentence(rng) for _ in range(rng.randint(*sentences)))
        docs.append({"text": text, "meta": {"pile_set_name": sources[i % 2]}})
    return docs
