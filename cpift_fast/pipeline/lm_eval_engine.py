"""The optional lm-evaluation-harness engine (``eval.evaluator: lm_eval``).

The model under evaluation is handed to the harness in-process (``HFLM(pretrained=model,
tokenizer=...)``), so no checkpoint is re-read; each pipeline task names the harness task that
scores it (``lm_eval_task:`` in its config entry, e.g. ``gsm8k``, ``logiqa``). The task's score is
the harness's first reported metric among ``PREFERRED`` (in [0, 1], normalized as 10 × that
metric); every harness metric of the task is kept in ``metrics``.
"""

from __future__ import annotations

PREFERRED = ("exact_match,strict-match", "exact_match,flexible-extract", "acc,none", "acc_norm,none",
             "exact_match,none")


def evaluate_lm_eval(model, tok, tasks, task_map: dict[str, str | None], batch_size: int = 8) -> dict:
    """{task: {"score", "metrics", "metric", "normalization", "n", "samples"}} from lm-eval."""
    missing = [t.name for t in tasks if not task_map.get(t.name)]
    if missing:
        raise ValueError(f"eval.evaluator lm_eval: task(s) {missing} have no lm_eval_task (the harness task to run)")
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise RuntimeError("eval.evaluator: lm_eval needs the optional package lm-evaluation-harness "
                           "(pip install lm-eval)") from None
    lm = HFLM(pretrained=model, tokenizer=getattr(tok, "tok", tok), batch_size=batch_size)
    out = lm_eval.simple_evaluate(model=lm, tasks=sorted({task_map[t.name] for t in tasks}))
    results = {}
    for t in tasks:
        name = task_map[t.name]
        got = {k: v for k, v in out["results"].get(name, {}).items() if isinstance(v, (int, float)) and "stderr" not in k}
        key = next((k for k in PREFERRED if k in got), None)
        if key is None:
            raise RuntimeError(f"lm-eval task {name!r} reported none of {PREFERRED} (got {sorted(got)})")
        results[t.name] = {"score": float(got[key]), "metrics": got, "metric": f"lm-eval {name}: {key}",
                           "normalization": f"10 × {key}", "n": None, "samples": []}
    return results
