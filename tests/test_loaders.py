"""Task loaders (issue 12): the five published schemas and the generic instruction loader, on small
fixture files in each schema (tests/fixtures); bad files give errors naming file and line/record."""

from __future__ import annotations

import os

import pytest

from cpift_fast.pipeline.config import ConfigError, load_config
from cpift_fast.pipeline.data import render
from cpift_fast.pipeline.loaders import (DataError, load_alpaca, load_codealpaca, load_gsm8k, load_instructions,
                                         load_logiqa, load_ultrachat, read_file)
from cpift_fast.pipeline.model import byte_level_tokenizer
from cpift_fast.pipeline.tasks import Chat

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def fx(*parts: str) -> str:
    return os.path.join(FIX, *parts)


def test_gsm8k_folder_with_splits():
    task = load_gsm8k(fx("gsm8k"), None, None, 0)
    assert len(task.train) == 3 and len(task.test) == 2 and task.metric == "gsm8k"
    prompt, answer = task.test[0]
    assert isinstance(prompt, Chat) and prompt.messages == (("user", "Ann had 9 cookies and ate 2. How many are left?"),)
    assert prompt.plain == "Question: Ann had 9 cookies and ate 2. How many are left?\nAnswer: "
    assert answer.endswith("#### 7")
    sub = load_gsm8k(fx("gsm8k"), 2, 1, seed=5)
    assert len(sub.train) == 2 and len(sub.test) == 1
    assert sub.test == load_gsm8k(fx("gsm8k"), 2, 1, seed=6).test, "the test subsample must not depend on the seed"


def test_codealpaca_and_alpaca_hold_out_a_fixed_tenth():
    code = load_codealpaca(fx("codealpaca.json"), None, None, 0)
    assert len(code.test) == 1 and len(code.train) == 9 and code.metric == "code"
    prompt, out = code.train[0]  # record 1: with an input
    assert prompt.plain == "Instruction: Reverse the given list in Python.\nInput: xs = [1, 2, 3]\nResponse: "
    assert prompt.messages == (("user", "Reverse the given list in Python.\n\nxs = [1, 2, 3]"),) and out == "xs[::-1]"
    alpaca = load_alpaca(fx("alpaca.json"), None, None, 0)
    assert alpaca.metric == "judge" and len(alpaca.test) == 1 and len(alpaca.train) == 4
    assert alpaca.test[0][0].plain == "Instruction: Give three tips for staying healthy.\nResponse: "


def test_logiqa_field_variants_and_choices():
    task = load_logiqa(fx("logiqa"), None, None, 0)
    assert task.metric == "choice" and len(task.train) == 2 and len(task.test) == 2
    assert task.meta["gold"] == [2, 0]  # label "c" -> 2, answer 0
    assert task.meta["choices"][0] == ["A bird", "A fish", "A mammal", "A plant"]
    assert task.test[0][1] == "A mammal"
    assert task.train[1][1] == "It did not rain."  # query + correct_option variant
    plain = task.test[0][0].plain
    assert plain.startswith("Passage: Every cat is a mammal.") and "C. A mammal" in plain and plain.endswith("Answer: ")


def test_ultrachat_both_formats():
    task = load_ultrachat(fx("ultrachat"), None, None, 0)
    assert task.metric == "judge" and len(task.train) == 2 and len(task.test) == 1
    prompt, response = task.train[0]
    assert response == "I can answer questions."
    assert [r for r, _ in prompt.messages] == ["user", "assistant", "user"]
    assert prompt.plain == ("User: Hi, who are you?\nAssistant: I am a helpful assistant.\nUser: What can you do?\n"
                            "Assistant: ")
    original = load_ultrachat(fx("ultrachat_original.jsonl"), None, None, 0)  # {data: [str, ...]}
    assert len(original.test) == 1 and len(original.train) == 2
    assert original.test[0][1] == "Ice melts at 0 degrees Celsius."


def test_generic_loader_formats_and_field_mapping():
    csv_task = load_instructions(fx("instructions.csv"), None, None, 0,
                                 fields={"prompt": "question", "input": "context", "response": "answer"}, metric="exact")
    rows = csv_task.test + csv_task.train
    assert [r for _, r in rows] == ["Green", "5", "Rome"] and csv_task.metric == "exact"
    assert rows[1][0].messages == (("user", "Add the numbers\n\n2 and 3"),)
    jl = load_instructions(fx("instructions.jsonl"), None, None, 0, fields={"prompt": "q", "response": "a"})
    assert [r for _, r in jl.test + jl.train] == ["yes", "no", "maybe"] and jl.metric == "rouge"
    chat = load_instructions(fx("chat.jsonl"), None, None, 0)
    prompt, response = chat.test[0]
    assert prompt.messages == (("system", "Be brief."), ("user", "Hello")) and response == "Hi!"
    assert chat.train[0][0].messages == (("user", "Thanks"),) and chat.train[0][1] == "You are welcome."
    with pytest.raises(DataError, match="unknown field role"):
        load_instructions(fx("instructions.jsonl"), None, None, 0, fields={"question": "q"})
    with pytest.raises(DataError, match=r"instructions\.jsonl, line 1: missing field 'instruction'"):
        load_instructions(fx("instructions.jsonl"), None, None, 0)


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="parquet needs the optional package pyarrow")
    import pyarrow.parquet as pq

    path = str(tmp_path / "d.parquet")
    pq.write_table(pa.table({"instruction": ["a", "b", "c"], "output": ["x", "y", "z"]}), path)
    task = load_instructions(path, None, None, 0)
    assert [r for _, r in task.test + task.train] == ["x", "y", "z"]


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path):
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        path = tmp_path / "d.parquet"
        path.write_bytes(b"PAR1")
        with pytest.raises(DataError, match=r"d\.parquet: reading parquet needs the optional package `pyarrow`"):
            read_file(str(path))
    else:
        pytest.skip("pyarrow is installed: the missing-package message cannot be shown")


@pytest.mark.parametrize("path, loader, message", [
    ("bad.jsonl", load_gsm8k, r"bad\.jsonl, line 3: not valid JSON"),
    ("logiqa_bad.jsonl", load_logiqa, r"logiqa_bad\.jsonl, line 2: 'options' must be a list of four strings"),
    ("bad.csv", load_instructions, r"bad\.csv, line 3: 2 columns expected"),
    ("alpaca.json", load_gsm8k, r"alpaca\.json, record 0: missing field 'question'"),
    ("instructions.jsonl", load_ultrachat, r"instructions\.jsonl, line 1: missing field 'messages' or 'data'"),
])
def test_bad_files_name_file_and_line(path, loader, message):
    with pytest.raises(DataError, match=message):
        loader(fx(path), None, None, 0)


def test_bad_records_name_the_record(tmp_path):
    p = tmp_path / "x.json"
    p.write_text('[{"instruction": "a", "output": "b"}, {"instruction": 3, "output": "c"}]')
    with pytest.raises(DataError, match=r"x\.json, record 1: field 'instruction' must be a string, got int"):
        load_alpaca(str(p), None, None, 0)
    p.write_text('[{"instruction": "a",\n "output": }]')
    with pytest.raises(DataError, match=r"x\.json, line 2: not valid JSON"):
        load_alpaca(str(p), None, None, 0)
    q = tmp_path / "g.jsonl"
    q.write_text('{"question": "q", "answer": "no marker"}\n')
    with pytest.raises(DataError, match=r"g\.jsonl, line 1: a GSM8K answer must end with '#### <number>'"):
        load_gsm8k(str(q), None, None, 0)


def test_chat_template_is_used_when_the_tokenizer_has_one():
    tok = byte_level_tokenizer()
    chat = Chat(messages=(("user", "Hi"),), plain="User: Hi\nAssistant: ")
    assert render(tok, chat) == "User: Hi\nAssistant: "  # no template: the plain rendering
    tok.tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
                             "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    assert render(tok, chat) == "<|user|>Hi<|assistant|>"
    assert render(tok, chat, "never") == "User: Hi\nAssistant: "
    assert render(tok, "shf abc=") == "shf abc="  # built-in tasks' plain prompts stay as they are


def test_config_task_kinds_and_options():
    base = {"name": "x", "tasks": ["shift", {"name": "g", "kind": "gsm8k", "source": fx("gsm8k")}]}
    for kind, src in (("codealpaca", "codealpaca.json"), ("alpaca", "alpaca.json"), ("logiqa", "logiqa"),
                      ("ultrachat", "ultrachat"), ("instructions", "chat.jsonl")):
        cfg = load_config({**base, "tasks": base["tasks"] + [{"name": kind, "kind": kind, "source": fx(src)}]})
        assert cfg.tasks[-1].kind == kind
    ok = load_config({**base, "tasks": base["tasks"] + [
        {"name": "mine", "kind": "instructions", "source": fx("instructions.csv"), "metric": "exact",
         "fields": {"prompt": "question", "response": "answer"}}]})
    assert ok.tasks[-1].options() == {"fields": {"prompt": "question", "response": "answer"}, "metric": "exact"}
    with pytest.raises(ConfigError, match="'fields' is a mapping for kind: instructions only"):
        load_config({**base, "tasks": base["tasks"] + [{"name": "a", "kind": "alpaca", "source": fx("alpaca.json"),
                                                        "fields": {"prompt": "x"}}]})
    with pytest.raises(ConfigError, match="unknown kind 'csv'"):
        load_config({**base, "tasks": base["tasks"] + [{"name": "a", "kind": "csv", "source": fx("instructions.csv")}]})
    with pytest.raises(ConfigError, match=r"data source '\./nope\.parquet' does not exist"):
        load_config({**base, "tasks": base["tasks"] + [{"name": "a", "kind": "instructions", "source": "./nope.parquet"}]})
    with pytest.raises(ConfigError, match="data.chat_template"):
        load_config({**base, "data": {"chat_template": "sometimes"}})
