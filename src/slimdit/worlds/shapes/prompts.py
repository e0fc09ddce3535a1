"""Prompts of the shapes world: a small grammar, GenEval's six categories, the fixed evaluation set and a
training-caption generator that never emits an evaluation prompt.

Every prompt carries the metadata of what must hold in an image made from it (``Prompt.objects`` and
``Prompt.relation``): exactly ``len(objects)`` objects, matched one-to-one to the specs, and the relation
between objects 0 and 1 if there is one.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import cache
from importlib import resources

import numpy as np

from slimdit.worlds.shapes.scenes import (
    COLOR_LIST,
    RELATIONS,
    SHAPES,
    SIZES_LIST,
    ObjectSpec,
    PlacedObject,
    place,
    render,
)

CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
PREFIXES = (
    "",
    "a photo of",
    "an image of",
    "a picture of",
    "a drawing of",
    "a render of",
    "a scene with",
    "an illustration of",
    "a snapshot of",
    "a painting of",
    "a sketch of",
    "a view of",
    "a frame showing",
    "a canvas with",
)
NUMBERS = {2: "two", 3: "three", 4: "four"}
RELATION_WORDS = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
EVAL_PER_CATEGORY = 50
EVAL_SEED = 20261123


@dataclass(frozen=True)
class Prompt:
    text: str
    category: str
    objects: tuple[ObjectSpec, ...]
    relation: str | None = None

    def to_json(self) -> dict:
        d = asdict(self)
        d["objects"] = [asdict(o) for o in self.objects]
        return d

    @classmethod
    def from_json(cls, d: dict) -> Prompt:
        return cls(d["text"], d["category"], tuple(ObjectSpec(**o) for o in d["objects"]), d.get("relation"))


def _phrase(o: ObjectSpec) -> str:
    return " ".join(w for w in ("a", o.size, o.color, o.shape) if w)


def _contents(category: str) -> list[tuple[str, tuple[ObjectSpec, ...], str | None]]:
    """All (phrase, objects, relation) a category can ask for, in a fixed order."""
    if category == "single_object":
        objs = [(ObjectSpec(s, size=z),) for s in SHAPES for z in SIZES_LIST]
    elif category == "colors":
        objs = [(ObjectSpec(s, color=c),) for s in SHAPES for c in COLOR_LIST]
    elif category == "counting":
        return [(f"{NUMBERS[n]} {s}s", (ObjectSpec(s),) * n, None) for s in SHAPES for n in NUMBERS]
    elif category == "two_object":
        objs = [
            (ObjectSpec(a, size=za), ObjectSpec(b, size=zb))
            for a, b in itertools.permutations(SHAPES, 2)
            for za in SIZES_LIST
            for zb in SIZES_LIST
        ]
    elif category == "color_attr":
        objs = [
            (ObjectSpec(a, color=ca), ObjectSpec(b, color=cb))
            for a, b in itertools.permutations(SHAPES, 2)
            for ca, cb in itertools.permutations(COLOR_LIST, 2)
        ]
    elif category == "position":
        return [
            (f"{_phrase(ObjectSpec(a))} {RELATION_WORDS[r]} {_phrase(ObjectSpec(b))}",
             (ObjectSpec(a), ObjectSpec(b)), r)
            for a, b in itertools.permutations(SHAPES, 2)
            for r in RELATIONS
        ]
    else:
        raise ValueError(f"unknown category {category!r}; allowed: {CATEGORIES}")
    return [(" and ".join(_phrase(o) for o in os), os, None) for os in objs]


def _make(category: str, prefix: str, content: tuple[str, tuple[ObjectSpec, ...], str | None]) -> Prompt:
    phrase, objs, rel = content
    return Prompt(f"{prefix} {phrase}".strip(), category, objs, rel)


def build_eval_prompts(per_category: int = EVAL_PER_CATEGORY, seed: int = EVAL_SEED) -> list[Prompt]:
    """Draw the evaluation set: ``per_category`` distinct prompts per category, spread evenly over contents."""
    rng = np.random.default_rng(seed)
    out: list[Prompt] = []
    for cat in CATEGORIES:
        contents = _contents(cat)
        order = rng.permutation(len(contents))
        unused = {i: list(rng.permutation(len(PREFIXES))) for i in range(len(contents))}
        picked: list[Prompt] = []
        for i in itertools.cycle(order):
            if len(picked) == per_category:
                break
            picked.append(_make(cat, PREFIXES[unused[i].pop()], contents[i]))
        out.extend(picked)
    return out


@cache
def eval_prompts() -> tuple[Prompt, ...]:
    """The fixed evaluation set shipped with the package (``eval_prompts.jsonl``)."""
    text = resources.files("slimdit.worlds.shapes").joinpath("eval_prompts.jsonl").read_text()
    return tuple(Prompt.from_json(json.loads(line)) for line in text.splitlines() if line.strip())


@cache
def _eval_texts() -> frozenset[str]:
    return frozenset(p.text for p in eval_prompts())


@cache
def _all_prompts() -> dict[str, Prompt]:
    return {p.text: p for cat in CATEGORIES for pre in PREFIXES for p in (_make(cat, pre, c) for c in _contents(cat))}


def parse_prompt(text: str) -> Prompt:
    """Return the prompt (with its metadata) that the grammar writes as ``text``."""
    key = " ".join(text.lower().split())
    if key not in _all_prompts():
        raise ValueError(f"{text!r} is not a shapes-world prompt; examples: {eval_prompts()[0].text!r}, "
                         f"{eval_prompts()[-1].text!r} (see slimdit.worlds.shapes.prompts)")
    return _all_prompts()[key]


def vocabulary() -> list[str]:
    """Every word the grammar can produce, sorted."""
    words: set[str] = set()
    for cat in CATEGORIES:
        for phrase, _, _ in _contents(cat):
            words.update(phrase.split())
    for p in PREFIXES:
        words.update(p.split())
    return sorted(words)


def sample_training_prompt(rng: np.random.Generator) -> Prompt:
    """Sample a prompt uniformly over categories, contents and phrasings, never one of the evaluation set."""
    held_out = _eval_texts()
    while True:
        cat = CATEGORIES[rng.integers(len(CATEGORIES))]
        contents = _contents_cached(cat)
        p = _make(cat, PREFIXES[rng.integers(len(PREFIXES))], contents[rng.integers(len(contents))])
        if p.text not in held_out:
            return p


@cache
def _contents_cached(cat: str) -> list:
    return _contents(cat)


def caption_alternatives(text: str) -> tuple[list[str], int]:
    """Every caption of ``text``'s category in ``text``'s phrasing (its prefix kept, each content of the category
    after it), and the index of ``text`` among them: the choices a zero-shot classifier picks ``text`` from."""
    p = parse_prompt(text)
    contents = _contents_cached(p.category)
    phrase = next(ph for ph, objs, rel in contents if objs == p.objects and rel == p.relation)
    if not text.endswith(phrase):
        raise ValueError(f"caption {text!r} does not end with its content {phrase!r}")
    prefix = text[: len(text) - len(phrase)]
    texts = [f"{prefix}{ph}" for ph, _, _ in contents]
    return texts, texts.index(text)


def render_prompt(prompt: Prompt, rng: np.random.Generator) -> np.ndarray:
    """Render one ground-truth image for ``prompt``: exactly its objects, free attributes drawn at random."""
    return render(place(list(prompt.objects), rng, prompt.relation))


@dataclass
class TrainingSet:
    """An endless, seeded stream of (caption, image) pairs; item ``i`` depends only on ``(seed, i)``."""

    seed: int = 0

    def scene(self, i: int) -> tuple[Prompt, list[PlacedObject]]:
        rng = np.random.default_rng((self.seed, i))
        p = sample_training_prompt(rng)
        return p, place(list(p.objects), rng, p.relation)

    def item(self, i: int) -> tuple[str, np.ndarray]:
        p, objs = self.scene(i)
        return p.text, render(objs)

    def batch(self, start: int, n: int) -> tuple[list[str], np.ndarray]:
        caps, imgs = zip(*(self.item(i) for i in range(start, start + n)))
        return list(caps), np.stack(imgs)

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        return (self.item(i) for i in itertools.count())
