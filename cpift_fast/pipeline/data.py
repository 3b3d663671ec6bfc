"""Tokenised instruction data: ``bos? render(prompt) response eos``, loss on the response only.

``render`` turns a prompt into text: a plain string stays as it is; a ``Chat`` goes through the
tokenizer's chat template when ``chat_template`` is ``"auto"`` and the tokenizer has one, and is
its ``plain`` rendering otherwise (``"never"``). When ``prompt + response`` exceeds ``max_len``
tokens, the prompt loses tokens from its start (the end of a prompt, next to the answer, matters
most) so that min(len(response), max_len // 2) response tokens fit; the response is then cut at
max_len.
"""

from __future__ import annotations

import torch

from .tasks import Chat, Example

IGNORE = -100


def render(tok, prompt, chat_template: str = "auto") -> str:
    """The text of `prompt` for `tok` (see the module docstring)."""
    if isinstance(prompt, Chat):
        if chat_template == "auto" and getattr(tok, "has_chat_template", False):
            return tok.apply_chat_template([{"role": r, "content": c} for r, c in prompt.messages])
        return prompt.plain
    if not isinstance(prompt, str):
        raise TypeError(f"a prompt must be a string or a Chat, got {type(prompt).__name__}")
    return prompt


def _prefix(tok, text: str) -> list[int]:
    """bos, unless the rendered text (a chat template) already starts with it."""
    if tok.bos_token_id is None:
        return []
    bos = getattr(getattr(tok, "tok", None), "bos_token", None)
    return [] if bos and text.startswith(bos) else [tok.bos_token_id]


def encode_example(tok, prompt, response: str, max_len: int, chat_template: str = "auto") -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one example, at most max_len long (see the truncation rule above)."""
    text = render(tok, prompt, chat_template)
    pre = _prefix(tok, text)
    p = tok.encode(text)
    r = tok.encode(response) + [tok.eos_token_id]
    room = max_len - len(pre)
    if len(p) + len(r) > room:
        keep_r = min(len(r), max(1, max_len // 2))
        p = p[max(0, len(p) - (room - keep_r)):] if room > keep_r else []
    ids = (pre + p + r)[:max_len]
    labels = ([IGNORE] * (len(pre) + len(p)) + r)[:max_len]
    if all(x == IGNORE for x in labels):
        raise ValueError(f"example with prompt {text[:40]!r}... has no response tokens within max_len={max_len}")
    return ids, labels


class SFTDataset(torch.utils.data.Dataset):
    """Each item: input_ids and labels (prompt and padding positions labelled -100), cut to max_len."""

    def __init__(self, examples: list[Example], tok, max_len: int, chat_template: str = "auto"):
        self.items = [encode_example(tok, p, r, max_len, chat_template) for p, r in examples]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        ids, labels = self.items[i]
        return {"input_ids": ids, "labels": labels}


class Collator:
    """Right-pads a batch with pad_token_id (labels with -100) and builds the attention mask."""

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id

    def __call__(self, batch):
        n = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), n), self.pad, dtype=torch.long)
        labels = torch.full((len(batch), n), IGNORE, dtype=torch.long)
        attn = torch.zeros((len(batch), n), dtype=torch.long)
        for i, b in enumerate(batch):
            k = len(b["input_ids"])
            ids[i, :k] = torch.tensor(b["input_ids"])
            labels[i, :k] = torch.tensor(b["labels"])
            attn[i, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": attn}


def encode_prompts(prompts: list, tok, chat_template: str = "auto", max_len: int | None = None) -> list[list[int]]:
    """bos + the rendered prompt; with max_len, only its last max_len tokens."""
    out = []
    for prompt in prompts:
        text = render(tok, prompt, chat_template)
        pre = _prefix(tok, text)
        ids = tok.encode(text)
        if max_len is not None and len(pre) + len(ids) > max_len:
            ids = ids[len(pre) + len(ids) - max_len:]
        out.append(pre + ids)
    return out


# ----- steps, micro-batches and processes ---------------------------------------------------------
# A step's examples (its global batch) do not depend on the number of processes: each step's batch
# is cut into `parts` micro-batches, and process r of `world` computes the consecutive parts / world
# of them starting at r·parts/world, accumulating their gradients; the all-reduce sums the processes'
# gradients. With parts = world = 2 that sum is g₁ + g₂ in both a 1-process run (two accumulated
# micro-batches) and a 2-process one, so the two are bit-identical (train.py).

def shuffled_batches(n: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """The examples of each of `steps` optimizer steps: epoch e is torch.randperm(n) drawn from a
    generator seeded with seed + e (as the Trainer's seedable sampler draws it), cut into batches of
    `batch_size` (the epoch's last one shorter); epochs follow each other until `steps` batches."""
    out: list[list[int]] = []
    epoch = 0
    while len(out) < steps:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        out.extend(order[a:a + batch_size] for a in range(0, n, batch_size))
        epoch += 1
    return out[:steps]


def micro_batches(batch: list[int], parts: int) -> list[list[tuple[int, bool]]]:
    """`batch` cut into `parts` consecutive pieces whose sizes differ by at most one (larger first),
    as (example, counted) keys. A piece that would be empty (a batch shorter than `parts`) holds the
    batch's first example with counted=False: its labels are all ignored, so it adds no loss and an
    exact zero gradient, and every process has a micro-batch to compute."""
    size, extra = divmod(len(batch), parts)
    out, start = [], 0
    for k in range(parts):
        end = start + size + (k < extra)
        out.append([(i, True) for i in batch[start:end]] or [(batch[0], False)])
        start = end
    return out


class RankBatches(torch.utils.data.Sampler):
    """The micro-batches (lists of (example, counted) keys) process `rank` of `world` computes, step
    after step: of each step's `parts` micro-batches the consecutive parts / world starting at
    rank · parts / world."""

    def __init__(self, batches: list[list[int]], parts: int, rank: int = 0, world: int = 1):
        if parts % world:
            raise ValueError(f"{parts} micro-batches per step cannot be shared by {world} processes")
        self.batches, self.parts, self.rank, self.world = batches, parts, rank, world
        self.per_rank = parts // world

    def __len__(self) -> int:
        return len(self.batches) * self.per_rank

    def __iter__(self):
        first = self.rank * self.per_rank
        for batch in self.batches:
            yield from micro_batches(batch, self.parts)[first:first + self.per_rank]


class KeyedDataset(torch.utils.data.Dataset):
    """A dataset indexed by (example, counted) keys: an uncounted example's labels are all ignored."""

    def __init__(self, dataset: torch.utils.data.Dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        i, counted = key
        item = self.dataset[i]
        return item if counted else {**item, "labels": [IGNORE] * len(item["labels"])}
