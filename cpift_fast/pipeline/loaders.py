"""Real task data in its published schemas, plus a generic instruction loader.

Each loader turns records into a ``Task`` of ``(prompt, response)`` examples whose prompt is a
``Chat`` (the conversation ending with a user turn, and its plain-text rendering for tokenizers
without a chat template). Sources (``source:`` in the config): a local file, a local folder
(``{split}.jsonl|json|csv|parquet`` or a single data file) or a hub name (through the optional
``datasets`` package; never needed by the tests).

    kind          schema                                                   metric (evaluate.py)
    gsm8k         jsonl {question, answer}; the answer ends in '#### N'    final number, strict + flexible
    codealpaca    JSON list {instruction, input, output}                   CodeBLEU, or BLEU-4 without `codebleu`
    alpaca        JSON list {instruction, input, output}                   LLM judge 1-10, or ROUGE-L offline
    logiqa        {context, question|query, options[4], answer|label|correct_option}   option log-likelihood
    ultrachat     {messages: [{role, content}, ...]} (ultrachat_200k) or {data: [str, ...]}   judge / ROUGE-L
    instructions  generic: json, jsonl, csv, parquet; a field mapping, or a chat ``messages`` list

Splits: a source with a test split (a folder holding ``test.*``, a hub split) uses it; otherwise a
fixed first 10 % of the records (independent of the seed) is held out for test. ``n_train`` /
``n_test`` subsample (train with the run seed, test with seed 0, so every seed sees the same test).

A malformed file or record raises ``DataError`` naming the file and the line (jsonl, csv) or the
record index (json, parquet, hub).
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
from collections.abc import Callable

from .tasks import Chat, Example, Task

DATA_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")
HELD_OUT = 0.1  # share of the records held out for test when the source has no test split


class DataError(ValueError):
    """A data file or record is not in the expected schema (the message names file and line/record)."""


class Record(dict):
    """A record and where it came from (for error messages)."""

    where: str = "?"


def _rec(data: dict, where: str) -> Record:
    r = Record(data)
    r.where = where
    return r


# ----- reading files -------------------------------------------------------------------------------

def read_file(path: str, split: str | None = None) -> list[Record]:
    """Records of one local file (.jsonl, .json, .csv, .parquet), each knowing its file and line/index."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".jsonl":
        out = []
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}, line {i}: not valid JSON ({exc.msg})") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}, line {i}: expected a JSON object, got {type(obj).__name__}")
                out.append(_rec(obj, f"{path}, line {i}"))
        return out
    if ext == ".json":
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}, line {exc.lineno}: not valid JSON ({exc.msg})") from None
        if isinstance(data, dict):
            key = split if split in data else "data" if "data" in data else None
            if key is None or not isinstance(data[key], list):
                raise DataError(f"{path}: a JSON object must hold the records as a list under "
                                f"{split!r} or 'data' (keys: {sorted(data)[:10]})")
            data = data[key]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        for i, obj in enumerate(data):
            if not isinstance(obj, dict):
                raise DataError(f"{path}, record {i}: expected a JSON object, got {type(obj).__name__}")
        return [_rec(obj, f"{path}, record {i}") for i, obj in enumerate(data)]
    if ext == ".csv":
        out = []
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames:
                raise DataError(f"{path}, line 1: a CSV file needs a header row")
            for row in reader:
                if None in row or any(v is None for v in row.values()):
                    raise DataError(f"{path}, line {reader.line_num}: {len(reader.fieldnames)} columns expected "
                                    f"({', '.join(reader.fieldnames)})")
                out.append(_rec(row, f"{path}, line {reader.line_num}"))
        return out
    if ext == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading parquet needs the optional package `pyarrow` "
                            "(pip install pyarrow)") from None
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as exc:  # noqa: BLE001 - any arrow error means the file is unreadable
            raise DataError(f"{path}: not a readable parquet file ({type(exc).__name__}: {exc})") from None
        return [_rec(r, f"{path}, record {i}") for i, r in enumerate(rows)]
    raise DataError(f"{path}: unknown data file type {ext!r} (valid: {', '.join(DATA_EXTENSIONS)})")


def _split_file(folder: str, split: str) -> str | None:
    for ext in DATA_EXTENSIONS:
        for name in (f"{split}{ext}", f"{split}-00000-of-00001{ext}"):
            if os.path.exists(os.path.join(folder, name)):
                return os.path.join(folder, name)
    return None


def read_source(source: str, splits: tuple[str, str] = ("train", "test"), hub_config: str | None = None
                ) -> tuple[list[Record], list[Record] | None]:
    """(train records, test records or None when the source has no test split)."""
    train_split, test_split = splits
    if os.path.isdir(source):
        train_file, test_file = _split_file(source, train_split), _split_file(source, test_split)
        if train_file:
            return read_file(train_file, train_split), (read_file(test_file, test_split) if test_file else None)
        files = sorted(f for f in os.listdir(source) if f.endswith(DATA_EXTENSIONS))
        if len(files) == 1:
            return read_file(os.path.join(source, files[0]), train_split), None
        raise DataError(f"{source}: no {train_split}.* file ({', '.join(DATA_EXTENSIONS)}) and not a single "
                        f"data file in the folder (found {files[:6]})")
    if os.path.exists(source):
        if source.endswith(".json"):  # a JSON object may hold both splits
            with open(source, encoding="utf-8") as f:
                head = f.read(1)
                while head and head.isspace():
                    head = f.read(1)
            if head == "{":
                with open(source, encoding="utf-8") as f:
                    keys = json.load(f)
                if isinstance(keys, dict) and train_split in keys:
                    return (read_file(source, train_split),
                            read_file(source, test_split) if test_split in keys else None)
        return read_file(source, train_split), None
    try:
        import datasets
    except ImportError:
        raise FileNotFoundError(f"{source!r} is not a local file or directory, and loading it as a hub data set "
                                "needs the optional package `datasets` (pip install datasets)") from None
    ds = datasets.load_dataset(source, hub_config)
    if train_split not in ds:
        raise DataError(f"hub data set {source!r}: no split {train_split!r} (splits: {sorted(ds)})")
    train = [_rec(dict(r), f"{source}[{train_split}], record {i}") for i, r in enumerate(ds[train_split])]
    test = ([_rec(dict(r), f"{source}[{test_split}], record {i}") for i, r in enumerate(ds[test_split])]
            if test_split in ds else None)
    return train, test


# ----- record access -------------------------------------------------------------------------------

def field(record: Record, *names: str, kind: type | tuple = str, optional: bool = False):
    """The first of `names` present in `record`, checked to be of `kind`; a DataError naming the
    record otherwise."""
    for name in names:
        if name in record and record[name] is not None:
            value = record[name]
            if not isinstance(value, kind):
                raise DataError(f"{record.where}: field {name!r} must be {_kind_name(kind)}, "
                                f"got {type(value).__name__}")
            return value
    if optional:
        return None
    raise DataError(f"{record.where}: missing field {' or '.join(repr(n) for n in names)} "
                    f"(fields: {sorted(record)[:12]})")


def _kind_name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({str: "a string", list: "a list", int: "an integer", dict: "a mapping"}.get(k, k.__name__)
                       for k in kinds)


def _subsample(examples: list, n: int | None, seed: int) -> list:
    if n is None or n >= len(examples):
        return examples
    return random.Random(seed).sample(examples, n)


def _split_examples(train_recs, test_recs, convert, n_train, n_test, seed):
    train = [convert(r) for r in train_recs]
    if test_recs is None:
        cut = max(1, int(len(train) * HELD_OUT))
        if len(train) < 2:
            raise DataError(f"{train_recs[0].where if train_recs else 'source'}: too few records to hold out a test set")
        test, train = train[:cut], train[cut:]
    else:
        test = [convert(r) for r in test_recs]
    if not train or not test:
        raise DataError("a task needs at least one training and one test example")
    return _subsample(train, n_train, seed), _subsample(test, n_test, 0)


def _user(content: str, plain: str) -> Chat:
    return Chat(messages=(("user", content),), plain=plain)


# ----- the five published schemas ------------------------------------------------------------------

def load_gsm8k(source, n_train=None, n_test=None, seed=0, name="gsm8k", hub_config=None, **_) -> Task:
    """GSM8K: ``question`` → ``answer`` (worked solution ending in '#### N')."""
    def conv(r):
        q, a = field(r, "question"), field(r, "answer")
        if "####" not in a:
            raise DataError(f"{r.where}: a GSM8K answer must end with '#### <number>'")
        return (_user(q, f"Question: {q}\nAnswer: "), a)
    train, test = read_source(source, hub_config=hub_config or ("main" if not os.path.exists(source) else None))
    tr, te = _split_examples(train, test, conv, n_train, n_test, seed)
    return Task(name, tr, te, metric="gsm8k", max_new_tokens=256, description="GSM8K grade-school math")


def _alpaca_conv(r):
    instruction, inp, out = field(r, "instruction"), field(r, "input", optional=True) or "", field(r, "output")
    content = f"{instruction}\n\n{inp}" if inp else instruction
    plain = f"Instruction: {instruction}\n" + (f"Input: {inp}\n" if inp else "") + "Response: "
    return (_user(content, plain), out)


def load_codealpaca(source, n_train=None, n_test=None, seed=0, name="codealpaca", hub_config=None, **_) -> Task:
    """CodeAlpaca ``{instruction, input, output}``; scored by CodeBLEU (or the named BLEU fallback)."""
    train, test = read_source(source, hub_config=hub_config)
    tr, te = _split_examples(train, test, _alpaca_conv, n_train, n_test, seed)
    return Task(name, tr, te, metric="code", max_new_tokens=256, description="CodeAlpaca code instructions")


def load_alpaca(source, n_train=None, n_test=None, seed=0, name="alpaca", hub_config=None, **_) -> Task:
    """Alpaca ``{instruction, input, output}``; scored by an LLM judge (or the ROUGE-L fallback)."""
    train, test = read_source(source, hub_config=hub_config)
    tr, te = _split_examples(train, test, _alpaca_conv, n_train, n_test, seed)
    return Task(name, tr, te, metric="judge", max_new_tokens=256, description="Alpaca general instructions")


LETTERS = "ABCD"


def _logiqa_conv(r):
    context = field(r, "context")
    question = field(r, "question", "query")
    options = field(r, "options", kind=list)
    if len(options) != 4 or not all(isinstance(o, str) for o in options):
        raise DataError(f"{r.where}: 'options' must be a list of four strings, got {len(options)} item(s)")
    answer = field(r, "answer", "label", "correct_option", kind=(int, str))
    if isinstance(answer, str):
        letter = answer.strip().upper()[:1]
        if answer.strip().isdigit():
            answer = int(answer)
        elif letter in LETTERS and len(answer.strip().rstrip(".")) == 1:
            answer = LETTERS.index(letter)
        else:
            raise DataError(f"{r.where}: 'answer' must be an index 0-3 or a letter A-D, got {answer!r}")
    if not 0 <= answer < 4:
        raise DataError(f"{r.where}: answer index {answer} is not in 0..3")
    choices = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
    body = f"Passage: {context}\nQuestion: {question}\nChoices:\n{choices}\n"
    return (_user(body + "Answer with the text of the correct choice.", body + "Answer: "), options[answer],
            [o for o in options], answer)


def load_logiqa(source, n_train=None, n_test=None, seed=0, name="logiqa", hub_config=None, **_) -> Task:
    """LogiQA: a passage, a question, four options, the answer (index or letter); evaluated by the
    log-likelihood of each option (acc and length-normalized acc_norm, as lm-eval)."""
    train, test = read_source(source, hub_config=hub_config)
    tr, te = _split_examples(train, test, _logiqa_conv, n_train, n_test, seed)
    task = Task(name, [(p, r) for p, r, _, _ in tr], [(p, r) for p, r, _, _ in te], metric="choice",
                max_new_tokens=64, description="LogiQA logical reasoning (4 options)")
    task.meta["choices"] = [c for _, _, c, _ in te]
    task.meta["gold"] = [g for _, _, _, g in te]
    return task


ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}


def _messages(value, where: str) -> list[tuple[str, str]]:
    """A chat list: [{role, content}] (also {from, value}, ShareGPT) or alternating strings
    (user first, as the original UltraChat ``data``)."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: a conversation must be a non-empty list of turns")
    out = []
    for i, turn in enumerate(value):
        if isinstance(turn, str):
            out.append(("user" if i % 2 == 0 else "assistant", turn))
            continue
        if not isinstance(turn, dict):
            raise DataError(f"{where}: turn {i} must be a mapping or a string, got {type(turn).__name__}")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if role not in ROLES or not isinstance(content, str):
            raise DataError(f"{where}: turn {i} needs a role ({'/'.join(ROLES)}) and string content, got {turn!r:.80}")
        out.append((ROLES[role], content))
    return out


def chat_example(turns: list[tuple[str, str]], where: str) -> Example:
    """The conversation up to its last assistant turn → that turn."""
    last = max((i for i, (role, _) in enumerate(turns) if role == "assistant"), default=None)
    if last is None or not any(role == "user" for role, _ in turns[:last]):
        raise DataError(f"{where}: a conversation needs a user turn followed by an assistant turn")
    history = tuple(turns[:last])
    plain = "".join(f"{'User' if r == 'user' else 'Assistant' if r == 'assistant' else 'System'}: {c}\n"
                    for r, c in history) + "Assistant: "
    return (Chat(messages=history, plain=plain), turns[last][1])


def load_ultrachat(source, n_train=None, n_test=None, seed=0, name="ultrachat", hub_config=None, splits=None,
                   **_) -> Task:
    """UltraChat multi-turn conversations (``messages`` as ultrachat_200k, or ``data`` as the original
    release): each conversation gives one example, its history → its last assistant turn."""
    def conv(r):
        value = field(r, "messages", "data", kind=list)
        return chat_example(_messages(value, r.where), r.where)
    split_names = tuple(splits) if splits else (("train", "test") if os.path.exists(source) else ("train_sft", "test_sft"))
    train, test = read_source(source, split_names, hub_config=hub_config)
    tr, te = _split_examples(train, test, conv, n_train, n_test, seed)
    return Task(name, tr, te, metric="judge", max_new_tokens=256, description="UltraChat multi-turn chat")


# ----- the generic instruction loader --------------------------------------------------------------

GENERIC_FIELDS = {"prompt": "instruction", "input": "input", "response": "output", "messages": "messages"}


def load_instructions(source, n_train=None, n_test=None, seed=0, name="instructions", hub_config=None,
                      fields=None, metric="rouge", splits=None, max_new_tokens=128, **_) -> Task:
    """User data: json, jsonl, csv or parquet (or a hub name). ``fields`` maps the roles ``prompt``,
    ``input`` (optional), ``response`` to column names (defaults: instruction, input, output); a record
    with a ``messages`` column (a chat list) is used as a conversation instead."""
    mapping = dict(GENERIC_FIELDS)
    unknown = set(fields or {}) - set(GENERIC_FIELDS)
    if unknown:
        raise DataError(f"task {name!r}: unknown field role(s) {sorted(unknown)} (valid: {', '.join(GENERIC_FIELDS)})")
    mapping.update(fields or {})

    def conv(r):
        if mapping["messages"] in r and r[mapping["messages"]] is not None:
            value = r[mapping["messages"]]
            if isinstance(value, str):  # csv: a JSON-encoded list
                try:
                    value = json.loads(value)
                except json.JSONDecodeError:
                    raise DataError(f"{r.where}: column {mapping['messages']!r} is not a JSON list of turns") from None
            return chat_example(_messages(value, r.where), r.where)
        prompt = field(r, mapping["prompt"])
        inp = field(r, mapping["input"], optional=True) or ""
        response = field(r, mapping["response"])
        content = f"{prompt}\n\n{inp}" if inp else prompt
        return (_user(content, f"{prompt}\n{inp}\n" if inp else f"{prompt}\n"), response)
    split_names = tuple(splits) if splits else ("train", "test")
    train, test = read_source(source, split_names, hub_config=hub_config)
    tr, te = _split_examples(train, test, conv, n_train, n_test, seed)
    return Task(name, tr, te, metric=metric, max_new_tokens=int(max_new_tokens), description=f"instructions from {source}")


LOADERS: dict[str, Callable[..., Task]] = {
    "gsm8k": load_gsm8k, "codealpaca": load_codealpaca, "alpaca": load_alpaca, "logiqa": load_logiqa,
    "ultrachat": load_ultrachat, "instructions": load_instructions,
}
"""kind → loader(source, n_train, n_test, seed, name=..., **task options)."""

_LOCAL_HINT = re.compile(r"^(?:/|\.|~)|\.(?:jsonl?|csv|parquet)$")


def looks_local(source: str) -> bool:
    """A path (absolute, relative with ./, ~, or a data file name) rather than a hub name."""
    return bool(_LOCAL_HINT.search(source))
