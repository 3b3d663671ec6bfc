"""Task data, metrics, tokenisation and the report table (issue 6); real data skips without it."""

from __future__ import annotations

import os

import pytest

from cpift_fast.pipeline.data import IGNORE, Collator, SFTDataset
from cpift_fast.pipeline.model import byte_level_tokenizer
from cpift_fast.pipeline.evaluate import score_predictions
from cpift_fast.pipeline.loaders import load_codealpaca, load_gsm8k
from cpift_fast.pipeline.metrics import normalized_match
from cpift_fast.pipeline.report import forgetting_table, results_table, seesaw_lines
from cpift_fast.pipeline.tasks import SYNTHETIC, make_synthetic, pretraining_mix

# real public data beside the checkout (../shared/data), when present; tests using it skip otherwise
DATA = os.environ.get("CPIFT_SHARED_DATA",
                      os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data"))


def test_synthetic_tasks_are_deterministic_disjoint_and_distinct():
    a = make_synthetic("shift", 200, 50, seed=3)
    assert a.train == make_synthetic("shift", 200, 50, seed=3).train
    assert a.train != make_synthetic("shift", 200, 50, seed=4).train
    test_inputs = {p for p, _ in a.test}
    assert not test_inputs & {p for p, _ in a.train}, "a test input leaked into training data"
    s = "abcdef"[:5]
    outputs = {name: fn(s) for name, (_, fn) in SYNTHETIC.items()}
    assert outputs["shift"] == "bcdef" and outputs["mirror"] == "fedcb" and outputs["upper"] == "ABCDE"
    assert outputs["count"] == "1" and outputs["reverse"] == "edcba"
    # every task maps the same inputs to a different output: they compete for the same capacity
    tasks = ["shift", "mirror", "upper", "reverse"]
    assert len({outputs[t] for t in tasks}) == len(tasks)
    with pytest.raises(KeyError, match="unknown synthetic task"):
        make_synthetic("nope", 1, 1, 0)


def test_scores_and_metrics():
    task = make_synthetic("upper", 4, 10, 0)
    assert score_predictions(task, [r for _, r in task.test])["score"] == 1.0
    assert score_predictions(task, ["x"] * 10)["score"] == 0.0
    with pytest.raises(ValueError, match="9 predictions for 10"):
        score_predictions(task, ["x"] * 9)
    assert normalized_match("def f():\n    return 1", "def f():  return 1")


def test_tokenisation_masks_the_prompt():
    tok = byte_level_tokenizer()
    ds = SFTDataset([("shf abc=", "bcd"), ("", "x")], tok, max_len=32)
    item = ds[0]
    assert item["input_ids"][0] == tok.bos_token_id and item["input_ids"][-1] == tok.eos_token_id
    n_prompt = 1 + len("shf abc=")
    assert item["labels"][:n_prompt] == [IGNORE] * n_prompt
    assert item["labels"][n_prompt:] == list(b"bcd") + [tok.eos_token_id]
    batch = Collator(tok.pad_token_id)([ds[0], ds[1]])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"][1].sum() == 3 and (batch["labels"][1, 3:] == IGNORE).all()
    long = SFTDataset([("a" * 40, "bcd")], tok, max_len=16)[0]  # the prompt loses its start
    assert len(long["input_ids"]) == 16 and long["input_ids"][0] == tok.bos_token_id
    assert long["labels"][-4:] == list(b"bcd") + [tok.eos_token_id] and long["input_ids"][1:12] == list(b"a" * 11)
    with pytest.raises(ValueError, match="no response tokens"):
        SFTDataset([("a", "b")], tok, max_len=1)
    mix = pretraining_mix(8, 0)
    assert sum(1 for p, _ in mix if p.startswith("cpy ")) == 6


@pytest.mark.skipif(not os.path.isdir(os.path.join(DATA, "gsm8k")), reason="real data (../shared/data) not present")
def test_gsm8k_loader_local():
    task = load_gsm8k(os.path.join(DATA, "gsm8k"), n_train=20, n_test=5, seed=0)
    assert len(task.train) == 20 and len(task.test) == 5
    prompt, answer = task.test[0]
    assert prompt.plain.startswith("Question: ") and "####" in answer
    assert score_predictions(task, [a for _, a in task.test])["metrics"] == {"strict": 1.0, "flexible": 1.0}


@pytest.mark.skipif(not os.path.isdir(os.path.join(DATA, "codealpaca")), reason="real data (../shared/data) not present")
def test_codealpaca_loader_local():
    path = os.path.join(DATA, "codealpaca", "code_alpaca_2k.json")
    task = load_codealpaca(path, n_train=30, n_test=10, seed=0)
    assert len(task.train) == 30 and len(task.test) == 10
    assert all(p.plain.startswith("Instruction: ") and p.plain.endswith("Response: ") for p, _ in task.train)
    full = load_codealpaca(path, None, None, 0)
    assert len(full.test) == (len(full.train) + len(full.test)) // 10  # a fixed 10% held out


def test_hub_dataset_without_datasets_package_is_a_clear_error():
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(FileNotFoundError, match="needs the optional package `datasets`"):
            load_gsm8k("openai/gsm8k", 1, 1, 0)
    else:
        pytest.skip("`datasets` is installed: the missing-package message cannot be shown")


def test_results_table_mean_std_and_normalized_score():
    results = {
        "tasks": ["a", "b"],
        "seeds": {
            0: {"scores": {"probe": {"a": 1.0, "b": 0.4}, "full_sft": {"a": 1.0, "b": 0.5}, "cpift": {"a": 0.5, "b": 0.5}},
                "forgetting": {"a->b": {"first": "a", "second": "b", "before": 1.0, "second_before": 0.1,
                                        "second_probe": 0.8, "methods": {"full_sft": {"a": 0.2, "b": 0.9}}}}},
            1: {"scores": {"probe": {"a": 1.0, "b": 0.8}, "full_sft": {"a": 0.8, "b": 0.7}, "cpift": {"a": 0.5, "b": 0.3}},
                "forgetting": {"a->b": {"first": "a", "second": "b", "before": 0.8, "second_before": 0.3,
                                        "second_probe": 0.8, "methods": {"full_sft": {"a": 0.0, "b": 0.7}}}}},
        },
    }
    table = results_table(results)
    full = next(line for line in table.splitlines() if line.startswith("| Full SFT"))
    # a: 90 ± 14.1; b: 60 ± 14.1; avg 0-10: seeds 7.5 and 7.5 -> 7.50 ± 0.00 (best row in bold)
    assert "90.0 ± 14.1" in full and "60.0 ± 14.1" in full and "**7.50 ± 0.00**" in full
    cp = next(line for line in table.splitlines() if line.startswith("| CPI-FT"))
    assert "4.50 ± 0.71" in cp  # seeds: 5.0 and 4.0
    ft = forgetting_table(results)
    assert ("| a → b | Full SFT (all parameters) | 90.0 ± 14.1 | 10.0 ± 14.1 | 80.0 ± 0.0 | 20.0 ± 14.1 | "
            "80.0 ± 14.1 | 60.0 ± 28.3 | 80.0 ± 0.0 |") in ft  # gain: 0.8 and 0.4
    # seesaw: a: 0 and -20 -> -10 (below its probe); b: +10 and -10 -> 0 (not below)
    lines = seesaw_lines(results)
    assert "a -10.0" in lines[0] and "b +0.0" in lines[0] and lines[1].startswith("1 of 2 task(s)")
