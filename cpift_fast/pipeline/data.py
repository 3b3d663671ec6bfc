"""Tokenised instruction data: ``bos? prompt response eos``, loss on the response only."""

from __future__ import annotations

import torch

from .tasks import Example

IGNORE = -100


class SFTDataset(torch.utils.data.Dataset):
    """Each item: input_ids and labels (prompt and padding positions labelled -100), cut to max_len."""

    def __init__(self, examples: list[Example], tok, max_len: int):
        self.items = []
        prefix = [tok.bos_token_id] if tok.bos_token_id is not None else []
        for prompt, response in examples:
            p = prefix + tok.encode(prompt)
            r = tok.encode(response) + [tok.eos_token_id]
            ids = (p + r)[:max_len]
            labels = ([IGNORE] * len(p) + r)[:max_len]
            if all(x == IGNORE for x in labels):
                raise ValueError(f"example with prompt {prompt[:40]!r}... has no response tokens within max_len={max_len}")
            self.items.append((ids, labels))

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


def encode_prompts(prompts: list[str], tok) -> list[list[int]]:
    prefix = [tok.bos_token_id] if tok.bos_token_id is not None else []
    return [prefix + tok.encode(p) for p in prompts]
