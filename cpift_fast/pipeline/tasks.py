"""Instruction tasks: the built-in synthetic suite, the generic pretraining mix, and real-data loaders.

An example is ``(prompt, response)``; the model is trained on ``prompt + response + eos`` with the
loss on the response only, and evaluated by greedy decoding of the prompt and the task's metric
(exact match by default).

Built-in suite: every task reads the same kind of input — a short string over a small alphabet —
and writes a different function of it, keyed only by a 3-letter tag. Because the inputs are
shared and the outputs disagree, the tasks compete for the same capacity of a small model: joint
training trades one task against another (seesaw), and training one task after another overwrites
the first (forgetting). The generic pretraining mix (plain strings and a ``cpy`` copy task)
teaches the format and the alphabet only, so every task is learned by fine-tuning.

Real data (GSM8K, CodeAlpaca, Alpaca, LogiQA, UltraChat, generic instructions) is read by
loaders.py into the same ``Task``, with ``Chat`` prompts (rendered through the tokenizer's chat
template when it has one).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Union

ALPHABET = "abcdef"
MIN_LEN, MAX_LEN = 5, 5  # fixed length: the position-free tasks stay learnable in a few steps

Example = tuple  # (prompt: str | Chat, response: str)


def _shift(s: str, k: int) -> str:
    return "".join(ALPHABET[(ALPHABET.index(c) + k) % len(ALPHABET)] for c in s)


SYNTHETIC: dict[str, tuple[str, Callable[[str], str]]] = {
    # name: (one-line description, function of the input string)
    "reverse": ("the string reversed", lambda s: s[::-1]),
    "sort": ("the letters sorted", lambda s: "".join(sorted(s))),
    "shift": ("each letter replaced by the next one in the alphabet (f wraps to a)", lambda s: _shift(s, 1)),
    "unshift": ("each letter replaced by the previous one (a wraps to f): shift's inverse", lambda s: _shift(s, -1)),
    "rotate": ("the string rotated left by two", lambda s: s[2:] + s[:2]),
    "swap": ("first and last letters swapped", lambda s: s[-1] + s[1:-1] + s[0]),
    "mirror": ("each letter mirrored in the alphabet (a<->f, b<->e, c<->d)",
               lambda s: "".join(ALPHABET[len(ALPHABET) - 1 - ALPHABET.index(c)] for c in s)),
    "upper": ("the string in upper case", lambda s: s.upper()),
    "count": ("the number of a's, as a digit", lambda s: str(s.count("a"))),
}
TAGS = {"unshift": "uns", "reverse": "rev", "sort": "srt", "shift": "shf", "rotate": "rot", "swap": "swp", "count": "cnt", "mirror": "mir",
        "upper": "upp", "copy": "cpy"}


@dataclass(frozen=True)
class Chat:
    """A prompt as a conversation: (role, content) turns ending with a user turn, and ``plain``, its
    rendering for a tokenizer without a chat template (or with templates turned off)."""

    messages: tuple[tuple[str, str], ...]
    plain: str


Prompt = Union[str, Chat]


@dataclass
class Task:
    """A named task: train and test examples, a metric, and a decoding budget."""

    name: str
    train: list[Example]
    test: list[Example]
    metric: str = "exact"            # a key of evaluate.SCORERS
    max_new_tokens: int = 8
    description: str = ""
    meta: dict = field(default_factory=dict)   # e.g. LogiQA: "choices" and "gold" per test example


def _random_string(rng: random.Random) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(MIN_LEN, MAX_LEN)))


def synthetic_prompt(name: str, s: str) -> str:
    return f"{TAGS[name]} {s}="


def test_strings(n: int, seed: int = 1234) -> list[str]:
    """The held-out inputs shared by every synthetic task (fixed, independent of the run seed)."""
    rng = random.Random(f"cpift-test-{seed}")
    out, seen = [], set()
    while len(out) < n:
        s = _random_string(rng)
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def make_synthetic(name: str, n_train: int, n_test: int, seed: int) -> Task:
    """A built-in task; training inputs are drawn with `seed` and never include a test input."""
    if name not in SYNTHETIC:
        raise KeyError(f"unknown synthetic task {name!r}; built-in tasks: {sorted(SYNTHETIC)}")
    desc, fn = SYNTHETIC[name]
    held_out = test_strings(n_test)
    banned = set(held_out)
    rng = random.Random(f"cpift-train-{name}-{seed}")
    train = []
    while len(train) < n_train:
        s = _random_string(rng)
        if s not in banned:
            train.append((synthetic_prompt(name, s), fn(s)))
    test = [(synthetic_prompt(name, s), fn(s)) for s in held_out]
    return Task(name, train, test, metric="exact", max_new_tokens=MAX_LEN + 2, description=desc)


def pretraining_mix(n: int, seed: int) -> list[Example]:
    """Generic data for the base model: a quarter plain strings (prompt ''), the rest the copy task."""
    rng = random.Random(f"cpift-pretrain-{seed}")
    out = []
    for i in range(n):
        s = _random_string(rng)
        if i % 4 == 3:
            out.append(("", " ".join(_random_string(rng) for _ in range(3))))
        else:
            out.append((f"{TAGS['copy']} {s}=", s))
    return out
