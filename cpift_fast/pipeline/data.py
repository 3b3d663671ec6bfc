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
