"""Evaluation: each task scored by its metric, batched, with one progress bar.

Every task result holds ``score`` — the task's **normalized score in [0, 1]** (the report's
"Avg 0–10" is 10 × its mean over tasks) — plus the raw ``metrics``, the ``metric`` used and its
``normalization`` in words:

    metric   how                                                         score (normalized)
    exact    greedy decoding, exact match                                accuracy
    normalized  greedy decoding, whitespace-collapsed match              accuracy
    gsm8k    greedy decoding; strict and flexible final number (lm-eval)  strict accuracy
    code     greedy decoding; CodeBLEU, or BLEU-4 without `codebleu`     the (Code)BLEU value
    choice   log-likelihood of each option (LogiQA): acc, acc_norm        acc (acc_norm reported beside it)
    judge    greedy decoding; LLM judge 1–10 (judge.py), or offline     judge rating / 10, or ROUGE-L F1
             ROUGE-L F1 against the reference, named as the fallback
    rouge    greedy decoding; ROUGE-L F1                                 ROUGE-L F1

``choice`` follows lm-eval's multiple-choice convention: log p(option | prompt) summed over the
option's tokens; acc picks the largest sum, acc_norm the largest sum divided by the option's
length in characters (its UTF-8 bytes, as lm-eval). Ties go to the first option.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from . import metrics
from .data import encode_prompts, render
from .judge import Judge
from .tasks import Chat, Task


@torch.no_grad()
def generate(model, tok, prompts: list, max_new_tokens: int, batch_size: int = 256, desc: str = "eval",
             progress: bool = True, bar=None, chat_template: str = "auto", max_len: int | None = None) -> list[str]:
    """Greedy completions (left-padded batches, stopped at eos), decoded to text. `bar`: an outer
    tqdm bar to advance per batch instead of drawing one here."""
    model.eval()
    encoded = encode_prompts(prompts, tok, chat_template, max_len)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths batch together
    out: list[str | None] = [None] * len(encoded)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    own = bar is None
    if own:
        bar = tqdm(total=len(batches), desc=desc, disable=not progress, leave=False)
    dev = next(model.parameters()).device
    for batch in batches:
        n = max(len(encoded[i]) for i in batch)
        ids = torch.full((len(batch), n), tok.pad_token_id, dtype=torch.long)
        attn = torch.zeros((len(batch), n), dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, n - len(encoded[i]):] = torch.tensor(encoded[i])
            attn[row, n - len(encoded[i]):] = 1
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


@torch.no_grad()
def option_logliks(model, tok, prompt, options: list[str], chat_template: str = "auto",
                   max_len: int | None = None) -> list[float]:
    """log p(option | prompt) summed over each option's tokens, all options in one batch."""
    model.eval()
    ctx = encode_prompts([prompt], tok, chat_template, None)[0]
    conts = [tok.encode(o) for o in options]
    if any(not c for c in conts):
        raise ValueError(f"an option encodes to no tokens: {options!r}")
    seqs = []
    for c in conts:
        s = ctx + c
        if max_len is not None and len(s) > max_len:
            s = s[len(s) - max_len:]
        seqs.append(s)
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), tok.pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        attn[i, :len(s)] = 1
    dev = next(model.parameters()).device
    logits = model(input_ids=ids.to(dev), attention_mask=attn.to(dev)).logits.float().log_softmax(-1).cpu()
    out = []
    for i, (s, c) in enumerate(zip(seqs, conts)):
        k = min(len(c), len(s) - 1)
        positions = torch.arange(len(s) - k - 1, len(s) - 1)
        targets = torch.tensor(s[len(s) - k:])
        out.append(float(logits[i, positions, targets].sum()))
    return out


def choice_scores(logliks: list[list[float]], choices: list[list[str]], gold: list[int]) -> dict[str, float]:
    """acc and acc_norm (lm-eval): argmax of the sum, and of the sum per UTF-8 byte of the option."""
    acc = acc_norm = 0
    for ll, opts, g in zip(logliks, choices, gold):
        acc += int(max(range(len(ll)), key=lambda i: (ll[i], -i)) == g)
        normed = [v / max(1, len(o.encode("utf-8"))) for v, o in zip(ll, opts)]
        acc_norm += int(max(range(len(normed)), key=lambda i: (normed[i], -i)) == g)
    n = max(1, len(gold))
    return {"acc": acc / n, "acc_norm": acc_norm / n}


def question_text(prompt) -> str:
    """What the judge sees as the question: the conversation (multi-turn) or the user turn."""
    if isinstance(prompt, Chat):
        if len(prompt.messages) == 1:
            return prompt.messages[0][1]
        return "\n".join(f"{role}: {content}" for role, content in prompt.messages)
    return str(prompt)


# ----- scorers: (task, predictions, judge) -> (score in [0, 1], metrics, metric name, normalization) ----

def _accuracy(fn) -> Callable:
    def scorer(task: Task, preds: list[str], judge):
        acc = sum(fn(p, r) for p, (_, r) in zip(preds, task.test)) / max(1, len(task.test))
        return acc, {"accuracy": acc}, task.metric, "10 × accuracy"
    return scorer


def _gsm8k(task: Task, preds: list[str], judge):
    rows = [metrics.gsm8k_scores(p, r) for p, (_, r) in zip(preds, task.test)]
    n = max(1, len(rows))
    strict = sum(r["strict"] for r in rows) / n
    flexible = sum(r["flexible"] for r in rows) / n
    return strict, {"strict": strict, "flexible": flexible}, "GSM8K final number (lm-eval strict-match; flexible-extract beside it)", \
        "10 × strict-match accuracy"


def _code(task: Task, preds: list[str], judge):
    value, name = metrics.code_score(preds, [r for _, r in task.test], lang=task.meta.get("lang", "python"))
    return value, {"codebleu" if name.startswith("CodeBLEU") else "bleu": value}, name, f"10 × {name.split(' ')[0]}"


def _rouge(task: Task, preds: list[str], judge):
    value = sum(metrics.rouge_l(p, r) for p, (_, r) in zip(preds, task.test)) / max(1, len(task.test))
    return value, {"rouge_l": value}, "ROUGE-L F1 against the reference", "10 × ROUGE-L F1"


def _judge(task: Task, preds: list[str], judge: Judge | None):
    if judge is None:
        value, m, _, norm = _rouge(task, preds, None)
        return value, m, "ROUGE-L F1 against the reference (offline fallback: no judge configured, CPIFT_JUDGE_URL unset)", norm
    ratings = [judge.rate(question_text(p), y) for y, (p, _) in zip(preds, task.test)]
    mean = sum(ratings) / max(1, len(ratings))
    return mean / 10.0, {"judge_mean": mean}, judge.describe(), "judge rating (1–10) as is"


SCORERS: dict[str, Callable] = {
    "exact": _accuracy(metrics.exact_match), "normalized": _accuracy(metrics.normalized_match),
    "gsm8k": _gsm8k, "code": _code, "rouge": _rouge, "judge": _judge,
}
METRIC_NAMES = tuple(SCORERS) + ("choice",)


def score_predictions(task: Task, preds: list[str], judge: Judge | None = None) -> dict:
    if len(preds) != len(task.test):
        raise ValueError(f"task {task.name!r}: {len(preds)} predictions for {len(task.test)} test examples")
    if task.metric not in SCORERS:
        raise ValueError(f"task {task.name!r}: unknown metric {task.metric!r} (valid: {', '.join(METRIC_NAMES)})")
    score, values, name, norm = SCORERS[task.metric](task, preds, judge)
    return {"score": score, "metrics": values, "metric": name, "normalization": norm}


def evaluate(model, tok, tasks: list[Task], progress: bool = True, batch_size: int = 256, desc: str = "eval",
             chat_template: str = "auto", max_len: int | None = None, judge: Judge | None = None) -> dict:
    """{task: {"score" (normalized, [0, 1]), "metrics", "metric", "normalization", "n", "samples"}}."""
    results = {}
    total = sum(len(t.test) if t.metric == "choice" else -(-len(t.test) // batch_size) for t in tasks)
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False)
    for task in tasks:
        bar.set_postfix(task=task.name)
        if task.metric == "choice":
            choices, gold = task.meta["choices"], task.meta["gold"]
            lls = []
            for (prompt, _), opts in zip(task.test, choices):
                lls.append(option_logliks(model, tok, prompt, opts, chat_template, max_len))
                bar.update(1)
            values = choice_scores(lls, choices, gold)
            picked = [opts[max(range(len(ll)), key=lambda i: (ll[i], -i))] for ll, opts in zip(lls, choices)]
            entry = {"score": values["acc"], "metrics": values,
                     "metric": "option log-likelihood (lm-eval multiple choice: acc; acc_norm beside it)",
                     "normalization": "10 × acc"}
            preds = picked
        else:
            preds = generate(model, tok, [p for p, _ in task.test], task.max_new_tokens, batch_size=batch_size,
                             bar=bar, chat_template=chat_template, max_len=max_len)
            entry = score_predictions(task, preds, judge)
        entry["n"] = len(task.test)
        entry["samples"] = [[render(tok, p, chat_template), y, r] for (p, r), y in zip(task.test[:5], preds[:5])]
        results[task.name] = entry
    bar.close()
    return results
