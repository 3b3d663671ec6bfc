"""Text metrics of generated answers (pure functions; the evaluator picks one per task).

- exact / normalized match (synthetic tasks; whitespace-collapsed match).
- GSM8K, lm-evaluation-harness conventions: **strict** = the number after the first ``#### ``
  (regex ``#### (\\-?[0-9\\.\\,]+)``); **flexible** = the last number-like span in the answer
  (regex ``(-?[$0-9.,]{2,})|(-?[0-9]+)``); both sides then drop ``,``, ``$``, everything up to
  ``#### `` and a trailing ``.`` before an exact comparison.
- BLEU-4 (corpus, Papineni et al. 2002): uniform weights over 1..4-gram clipped precisions, brevity
  penalty exp(1 − r/c) when c < r; an n-gram order with no match gets precision ε/total with
  ε = 0.1 (nltk's smoothing ``method1``) so one empty order does not zero the score. Code is
  tokenized into identifiers, numbers and single punctuation characters. The named fallback of
  CodeBLEU when the optional ``codebleu`` package is missing.
- CodeBLEU (Ren et al. 2020) through the optional ``codebleu`` package.
- ROUGE-L F1 (Lin 2004): LCS of lower-cased alphanumeric tokens, F = 2PR/(P+R) (the
  ``rouge-score`` package's tokenization without stemming): the offline fallback of the judge.
"""

from __future__ import annotations

import math
import re
from collections import Counter


def exact_match(prediction: str, reference: str) -> bool:
    return prediction.strip() == reference.strip()


def normalized_match(prediction: str, reference: str) -> bool:
    """Exact match after collapsing whitespace."""
    return " ".join(prediction.split()) == " ".join(reference.split())


# ----- GSM8K ----------------------------------------------------------------------------------------

_GSM_IGNORE = (re.compile(r","), re.compile(r"\$"), re.compile(r"(?s).*#### "), re.compile(r"\.$"))
_GSM_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_GSM_FLEX = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def _gsm_clean(text: str) -> str:
    for pattern in _GSM_IGNORE:
        text = pattern.sub("", text)
    return text.strip()


def gsm8k_strict(prediction: str) -> str | None:
    m = _GSM_STRICT.search(prediction)
    return _gsm_clean(m.group(1)) if m else None


def gsm8k_flexible(prediction: str) -> str | None:
    found = _GSM_FLEX.findall(prediction)
    if not found:
        return None
    last = found[-1]
    return _gsm_clean(last[0] or last[1])


def gsm8k_scores(prediction: str, reference: str) -> dict[str, bool]:
    """{"strict": ..., "flexible": ...}: does the extracted answer equal the reference's final answer."""
    gold = _gsm_clean(reference)
    strict, flexible = gsm8k_strict(prediction), gsm8k_flexible(prediction)
    return {"strict": strict is not None and strict == gold, "flexible": flexible is not None and flexible == gold}


# ----- BLEU -----------------------------------------------------------------------------------------

_CODE_TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\d+(?:\.\d+)?|\S")
BLEU_EPSILON = 0.1


def code_tokens(text: str) -> list[str]:
    return _CODE_TOKEN.findall(text)


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(predictions: list[str], references: list[str], max_n: int = 4, tokenize=code_tokens) -> float:
    """Corpus BLEU-max_n in [0, 1] (one reference per prediction)."""
    if len(predictions) != len(references):
        raise ValueError(f"BLEU: {len(predictions)} predictions for {len(references)} references")
    matches, totals = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for pred, ref in zip(predictions, references):
        h, r = tokenize(pred), tokenize(ref)
        hyp_len += len(h)
        ref_len += len(r)
        for n in range(1, max_n + 1):
            hc, rc = _ngrams(h, n), _ngrams(r, n)
            matches[n - 1] += sum(min(c, rc[g]) for g, c in hc.items())
            totals[n - 1] += max(0, len(h) - n + 1)
    if hyp_len == 0 or matches[0] == 0:
        return 0.0
    log_p = 0.0
    for m, t in zip(matches, totals):
        if t == 0:
            return 0.0  # predictions too short for this n-gram order
        log_p += math.log(m / t if m else BLEU_EPSILON / t)
    bp = 1.0 if hyp_len >= ref_len else math.exp(1.0 - ref_len / hyp_len)
    return bp * math.exp(log_p / max_n)


def codebleu_available() -> bool:
    try:
        import codebleu  # noqa: F401
    except ImportError:
        return False
    return True


def code_score(predictions: list[str], references: list[str], lang: str = "python") -> tuple[float, str]:
    """(score in [0, 1], metric name): CodeBLEU when the ``codebleu`` package is installed, else BLEU-4."""
    if codebleu_available():
        from codebleu import calc_codebleu

        return float(calc_codebleu(references, predictions, lang=lang)["codebleu"]), f"CodeBLEU ({lang})"
    return corpus_bleu(predictions, references), "BLEU-4 (fallback: the `codebleu` package is not installed)"


# ----- ROUGE-L ----------------------------------------------------------------------------------------

def rouge_tokens(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def _lcs(a: list[str], b: list[str]) -> int:
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 in [0, 1]."""
    p, r = rouge_tokens(prediction), rouge_tokens(reference)
    lcs = _lcs(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)
