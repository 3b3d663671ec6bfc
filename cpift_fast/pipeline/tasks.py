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

Real data (``kind: gsm8k`` / ``kind: codealpaca``): local files (GSM8K jsonl, CodeAlpaca json) or a
hub name (needs the optional ``datasets`` package).
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field

ALPHABET = "abcdef"
MIN_LEN, MAX_LEN = 5, 5  # fixed length: the position-free tasks stay learnable in a few steps

Example = tuple[str, str]


def _shift(s: str, k: int) -> str:
    return "".join(ALPHABET[(ALPHABET.index(c) + k) % len(ALPHABET)] for c in s)


SYNTHETIC: dict[str, tuple[str, Callable[[str], str]]] = {
    # name: (one-line description, function of the input string)
    "reverse": ("the string reversed", lambda s: s[::-1]),
    "sort": ("the letters sorted", lambda s: "".join(sorted(s))),
    "shift": ("each letter replaced by the next one in the alphabet (f wraps to a)", lambda s: _shift(s, 1)),
    "rotate": ("the string rotated left by two", lambda s: s[2:] + s[:2]),
    "swap": ("first and last letters swapped", lambda s: s[-1] + s[1:-1] + s[0]),
    "mirror": ("each letter mirrored in the alphabet (a<->f, b<->e, c<->d)",
               lambda s: "".join(ALPHABET[len(ALPHABET) - 1 - ALPHABET.index(c)] for c in s)),
    "upper": ("the string in upper case", lambda s: s.upper()),
    "count": ("the number of a's, as a digit", lambda s: str(s.count("a"))),
}
TAGS = {"reverse": "rev", "sort": "srt", "shift": "shf", "rotate": "rot", "swap": "swp", "count": "cnt", "mirror": "mir",
        "upper": "upp", "copy": "cpy"}


def exact_match(prediction: str, reference: str) -> bool:
    return prediction.strip() == reference.strip()


def gsm8k_match(prediction: str, reference: str) -> bool:
    """The number after the last '####' (or the last number) equals the reference's."""
    return _final_number(prediction) is not None and _final_number(prediction) == _final_number(reference)


def _final_number(text: str) -> str | None:
    tail = text.rsplit("####", 1)[-1] if "####" in text else text
    nums = re.findall(r"-?\d[\d,]*(?:\.\d+)?", tail)
    return nums[-1].replace(",", "").rstrip(".") if nums else None


def normalized_match(prediction: str, reference: str) -> bool:
    """Exact match after collapsing whitespace (CodeAlpaca)."""
    return " ".join(prediction.split()) == " ".join(reference.split())


METRICS = {"exact": exact_match, "gsm8k": gsm8k_match, "normalized": normalized_match}


@dataclass
class Task:
    """A named task: train and test examples, a metric, and a decoding budget."""

    name: str
    train: list[Example]
    test: list[Example]
    metric: str = "exact"
    max_new_tokens: int = 8
    description: str = ""
    meta: dict = field(default_factory=dict)

    def score(self, predictions: list[str]) -> float:
        fn = METRICS[self.metric]
        if len(predictions) != len(self.test):
            raise ValueError(f"task {self.name!r}: {len(predictions)} predictions for {len(self.test)} test examples")
        return sum(fn(p, r) for p, (_, r) in zip(predictions, self.test)) / max(1, len(self.test))


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


# ----- real data ---------------------------------------------------------------------------------

def _read_records(source: str, split: str, hub_config: str | None) -> list[dict]:
    if os.path.isdir(source):
        for candidate in (f"{split}.jsonl", f"{split}.json"):
            if os.path.exists(os.path.join(source, candidate)):
                return _read_records(os.path.join(source, candidate), split, hub_config)
        files = sorted(f for f in os.listdir(source) if f.endswith((".json", ".jsonl")))
        if len(files) == 1:
            return _read_records(os.path.join(source, files[0]), split, hub_config)
        raise FileNotFoundError(f"no {split}.jsonl / {split}.json (or single .json file) in {source}")
    if os.path.exists(source):
        with open(source) as f:
            if source.endswith(".jsonl"):
                return [json.loads(line) for line in f if line.strip()]
            data = json.load(f)
            return data if isinstance(data, list) else data[split]
    try:
        import datasets
    except ImportError:
        raise FileNotFoundError(f"{source!r} is not a local file or directory, and loading it as a hub data set "
                                "needs the optional package `datasets` (pip install datasets)") from None
    return list(datasets.load_dataset(source, hub_config, split=split))


def load_gsm8k(source: str, n_train: int | None, n_test: int | None, seed: int, name: str = "gsm8k") -> Task:
    """GSM8K: `question` → `answer` (ends in '#### N'); metric: the final number matches."""
    def conv(records):
        return [(f"Question: {r['question']}\nAnswer: ", r["answer"]) for r in records]
    train = conv(_read_records(source, "train", "main"))
    test = conv(_read_records(source, "test", "main"))
    train, test = _subsample(train, n_train, seed), _subsample(test, n_test, 0)
    return Task(name, train, test, metric="gsm8k", max_new_tokens=256, description="GSM8K grade-school math")


def load_codealpaca(source: str, n_train: int | None, n_test: int | None, seed: int, name: str = "codealpaca") -> Task:
    """CodeAlpaca `{instruction, input, output}`; a fixed 10% split is held out for test."""
    records = _read_records(source, "train", None)
    examples = []
    for r in records:
        prompt = f"Instruction: {r['instruction']}\n"
        if r.get("input"):
            prompt += f"Input: {r['input']}\n"
        examples.append((prompt + "Response: ", r["output"]))
    cut = max(1, len(examples) // 10)
    test, train = examples[:cut], examples[cut:]
    train, test = _subsample(train, n_train, seed), _subsample(test, n_test, 0)
    return Task(name, train, test, metric="normalized", max_new_tokens=256, description="CodeAlpaca code instructions")


def _subsample(examples: list[Example], n: int | None, seed: int) -> list[Example]:
    if n is None or n >= len(examples):
        return examples
    return random.Random(seed).sample(examples, n)


REAL_LOADERS = {"gsm8k": load_gsm8k, "codealpaca": load_codealpaca}
