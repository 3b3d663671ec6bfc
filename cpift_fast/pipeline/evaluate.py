"""Evaluation: greedy decoding of each test prompt, scored by the task's metric."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .data import encode_prompts
from .tasks import Task


@torch.no_grad()
def generate(model, tok, prompts: list[str], max_new_tokens: int, batch_size: int = 256,
             desc: str = "eval", progress: bool = True, bar=None) -> list[str]:
    """Greedy completions (left-padded batches, stopped at eos), decoded to text. `bar`: an outer
    tqdm bar to advance per batch instead of drawing one here."""
    model.eval()
    encoded = encode_prompts(prompts, tok)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths batch together
    out: list[str | None] = [None] * len(encoded)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    own = bar is None
    if own:
        bar = tqdm(total=len(batches), desc=desc, disable=not progress, leave=False)
    for batch in batches:
        n = max(len(encoded[i]) for i in batch)
        ids = torch.full((len(batch), n), tok.pad_token_id, dtype=torch.long)
        attn = torch.zeros((len(batch), n), dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, n - len(encoded[i]):] = torch.tensor(encoded[i])
            attn[row, n - len(encoded[i]):] = 1
        dev = next(model.parameters()).device
        gen = model.generate(input_ids=ids.to(dev), attention_mask=attn.to(dev), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        for row, i in enumerate(batch):
            new = gen[row, n:].tolist()
            if tok.eos_token_id in new:
                new = new[:new.index(tok.eos_token_id)]
            out[i] = tok.decode(new)
        bar.update(1)
    if own:
        bar.close()
    return out  # type: ignore[return-value]


def evaluate(model, tok, tasks: list[Task], progress: bool = True, batch_size: int = 256, desc: str = "eval") -> dict:
    """{task: {"score": metric in [0, 1], "samples": first few (prompt, prediction, reference)}}."""
    results = {}
    total = sum(-(-len(t.test) // batch_size) for t in tasks)
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False)
    for task in tasks:
        bar.set_postfix(task=task.name)
        preds = generate(model, tok, [p for p, _ in task.test], task.max_new_tokens, batch_size=batch_size, bar=bar)
        results[task.name] = {
            "score": task.score(preds),
            "n": len(task.test),
            "samples": [[p, y, r] for (p, r), y in zip(task.test[:5], preds[:5])],
        }
    bar.close()
    return results
