"""Run configuration: YAML → validated ``Config``, with every error reported before any training.

Checked up front: every scalar setting against its rule in ``RULES`` (type, range or choices; a
run or task name must be a plain directory name, so no path leaves the runs directory), unknown
keys (with the closest valid one), unknown tasks, missing data files,
p / τ / t / ratios out of range, unknown methods or stage-order strategies, user groups that do
not partition the tasks, EPI settings (``epi:``; a warmup that leaves the EPI stage no step after
its first masks), ``distributed`` (ddp | fsdp) and a ``train.micro_batch_size`` that does not
divide ``train.batch_size`` (whether the processes of a launch can share the batch is checked when
the run starts, before any work: driver.py), and a model that is neither ``tiny``, an existing local directory, nor
resolvable on the hub.
"""

from __future__ import annotations

import copy
import difflib
import math
import os
from dataclasses import dataclass

import yaml

from .loaders import LOADERS as REAL_LOADERS
from .loaders import looks_local
from .tasks import SYNTHETIC

METHODS = ("full_sft", "ms_random", "ms_user", "cpift", "epi", "epi_static")
ORDER_STRATEGIES = ("random", "size", "min_frozen")
OVERLAP_RULES = ("last", "first", "mean")
CONSOLIDATE_FREEZE = ("all", "cumulative", "none")
CONSOLIDATE_MODES = ("multi_stage", "single_stage")
CHAT_TEMPLATE = ("auto", "never")
EVALUATORS = ("builtin", "lm_eval")
DISTRIBUTED = ("ddp", "fsdp")
# train settings that change how a step is computed, not what it computes (up to floating-point
# summation order): left out of the stage hashes, so a run resumed with another process count or
# micro-batch size reuses its finished stages
EXECUTION = ("micro_batch_size", "gradient_checkpointing")
EPI_METHODS = ("epi", "epi_static")
EPI_SIGNALS = ("grad_x_param", "grad_sq", "grad_abs")
EPI_STATE_DTYPES = ("float32", "bfloat16", "int8")
EPI_NORMALIZE = ("layer", "none")
TASK_METRICS = ("exact", "normalized", "gsm8k", "code", "rouge", "judge")
TASK_KEYS = ("name", "kind", "source", "n_train", "n_test", "fields", "splits", "hub_config", "metric",
             "max_new_tokens", "lm_eval_task")

DEFAULTS: dict = {
    "name": "run",
    "seed": 0,
    "seeds": 1,
    "threads": 1,
    "progress": True,
    "model": {"source": "tiny", "hidden_size": 128, "num_layers": 2, "num_heads": 4,
              "intermediate_size": 256, "dtype": "float32"},
    "pretrain": {"examples": 6000, "epochs": 1.0, "lr": 3e-3},
    "data": {"n_train": 1000, "n_test": 200, "chat_template": "auto"},
    "tasks": [],
    # batch_size: examples per optimizer step (the global batch, whatever the number of processes);
    # micro_batch_size: examples per forward/backward on one process (null: batch_size / processes),
    # the rest of the batch by gradient accumulation; gradient_checkpointing: recompute activations
    # in the backward pass. The last two only change how a step is computed (not hashed: EXECUTION)
    "train": {"epochs": 2.0, "batch_size": 32, "lr": 2e-3, "weight_decay": 0.01, "warmup_ratio": 0.03,
              "max_grad_norm": 1.0, "max_len": 32, "micro_batch_size": None, "gradient_checkpointing": False},
    # multi-process launches (torchrun / accelerate launch): ddp | fsdp (FSDP2); null: ddp
    "distributed": None,
    "probe": {"epochs": 1.0},
    "cpift": {"p": 0.01, "tau": 0.1, "order": "random", "t": 0.5, "overlap_rule": "last",
              "freeze": "cumulative",
              "consolidate": {"ratio": 0.1, "epochs": 1.0, "freeze": "all", "mode": "multi_stage",
                              "compare_modes": False}},
    # EPI (methods epi / epi_static; docs/epi.md): ratio = CPI-FT's p (the same share protected per
    # task); beta, signal, normalize: the defaults; interval, warmup (optimizer steps): choices
    "epi": {"ratio": 0.01, "interval": 100, "warmup": 100, "beta": 0.99, "signal": "grad_x_param",
            "state_dtype": "float32", "normalize": "layer"},
    "methods": ["full_sft", "ms_random", "cpift"],
    "baselines": {"ms_random": {"k": 2}, "ms_user": {"groups": None}},
    "forgetting": {"pairs": [], "epochs": None, "methods": ["full_sft", "multi_stage", "cpift"]},
    "eval": {"batch_size": 256, "evaluator": "builtin"},
}

# keys whose value is free-form (not checked key by key)
_OPEN = {("baselines", "ms_user", "groups"), ("forgetting", "pairs"), ("forgetting", "methods"), ("tasks",),
         ("methods",)}
FORGETTING_METHODS = ("full_sft", "multi_stage", "cpift")


class ConfigError(ValueError):
    """The configuration is invalid; raised before any training starts."""


@dataclass
class TaskSpec:
    name: str
    kind: str = "synthetic"          # synthetic | gsm8k | codealpaca | alpaca | logiqa | ultrachat | instructions
    source: str | None = None        # local file/dir or hub name (real data)
    n_train: int | None = None
    n_test: int | None = None
    fields: dict | None = None       # instructions: {prompt, input, response, messages} -> column names
    splits: list | None = None       # [train split, test split] names (files in a folder, hub splits)
    hub_config: str | None = None    # the hub data set's config name (e.g. gsm8k: main)
    metric: str | None = None        # instructions: exact | normalized | gsm8k | code | rouge | judge
    max_new_tokens: int | None = None
    lm_eval_task: str | None = None  # eval.evaluator lm_eval: the harness task that scores this task

    def options(self) -> dict:
        """Loader keyword options (those set)."""
        keys = ("fields", "splits", "hub_config", "metric", "max_new_tokens")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


@dataclass
class Config:
    raw: dict
    tasks: list[TaskSpec]

    def __getitem__(self, key):
        return self.raw[key]

    @property
    def name(self) -> str:
        return self.raw["name"]

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]


def _merge(defaults: dict, user: dict, path: tuple[str, ...] = ()) -> dict:
    out = copy.deepcopy(defaults)
    for key, value in user.items():
        here = path + (key,)
        if key not in defaults:
            near = difflib.get_close_matches(str(key), [str(k) for k in defaults], n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else f" (valid: {sorted(defaults)})"
            raise ConfigError(f"unknown config key {'.'.join(map(str, here))!r}{hint}")
        if isinstance(defaults[key], dict) and here not in _OPEN:
            if not isinstance(value, dict):
                raise ConfigError(f"config key {'.'.join(here)!r} must be a mapping, got {value!r}")
            out[key] = _merge(defaults[key], value, here)
        else:
            out[key] = value
    return out


# ----- declarative value rules ---------------------------------------------------------------------
# Every scalar setting of DEFAULTS has a rule here (tests/test_reliability.py checks that none is
# missing); validate() applies them all before anything else, so a bad type, range or choice is
# reported by name before any work. Cross-field checks (groups vs. tasks, ...) come after.

class Rule:
    """A check of one config value; `check` returns an error message or None."""

    def check(self, value) -> str | None:
        raise NotImplementedError


@dataclass(frozen=True)
class Int(Rule):
    lo: int | None = None
    hi: int | None = None
    why: str = ""

    def check(self, value):
        if not isinstance(value, int) or isinstance(value, bool):
            return f"must be an integer, got {value!r}"
        if (self.lo is not None and value < self.lo) or (self.hi is not None and value > self.hi):
            lo = "-inf" if self.lo is None else self.lo
            hi = "inf" if self.hi is None else self.hi
            return f"= {value} is out of range: it must be an integer in [{lo}, {hi}]{self.why}"
        return None


@dataclass(frozen=True)
class Num(Rule):
    """A finite number in [lo, hi] (lo excluded with lo_open, hi with hi_open). YAML 1.1 reads
    ``1e-3`` as a string; a string that is a plain float literal is accepted as that number."""

    lo: float = float("-inf")
    hi: float = float("inf")
    lo_open: bool = False
    hi_open: bool = False

    def check(self, value):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            return f"must be a number, got {value!r}"
        try:
            v = float(value)
        except ValueError:
            return f"must be a number, got {value!r}"
        if v != v or v in (float("inf"), float("-inf")):
            return f"must be a finite number, got {value!r}"
        above = self.lo < v if self.lo_open else self.lo <= v
        below = v < self.hi if self.hi_open else v <= self.hi
        if not (above and below):
            return (f"= {value} is out of range: it must be in {'(' if self.lo_open else '['}"
                    f"{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}")
        return None


@dataclass(frozen=True)
class Bool(Rule):
    def check(self, value):
        return None if isinstance(value, bool) else f"must be true or false, got {value!r}"


@dataclass(frozen=True)
class Choice(Rule):
    values: tuple

    def check(self, value):
        if isinstance(value, (str, int, float, bool, type(None))) and value in self.values:
            return None
        near = difflib.get_close_matches(str(value), [str(v) for v in self.values], n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        return f"must be one of {', '.join(map(str, self.values))}; got {value!r}{hint}"


@dataclass(frozen=True)
class Optional(Rule):
    rule: Rule

    def check(self, value):
        return None if value is None else self.rule.check(value)


@dataclass(frozen=True)
class Text(Rule):
    def check(self, value):
        return None if isinstance(value, str) and value else f"must be a non-empty string, got {value!r}"


@dataclass(frozen=True)
class DirName(Rule):
    """One plain directory name: it cannot leave the directory it is joined to."""

    def check(self, value):
        if not isinstance(value, str) or not value:
            return f"must be a non-empty string, got {value!r}"
        if value in (".", "..") or value.startswith(".") or "/" in value or "\\" in value or "\0" in value \
                or len(value.encode()) > 255:
            return (f"must be a plain directory name (no '/', not starting with '.', at most 255 bytes), "
                    f"got {value!r}")
        return None


MODEL_DTYPES = ("float32", "bfloat16", "float16")

RULES: dict[str, Rule] = {
    "name": DirName(), "seed": Int(0), "seeds": Int(1), "threads": Int(1), "progress": Bool(),
    "model.source": Text(), "model.hidden_size": Int(1), "model.num_layers": Int(1), "model.num_heads": Int(1),
    "model.intermediate_size": Int(1), "model.dtype": Choice(MODEL_DTYPES),
    "pretrain.examples": Int(1), "pretrain.epochs": Num(0, 1e9, lo_open=True), "pretrain.lr": Num(0, 1e9, lo_open=True),
    "data.n_train": Int(1), "data.n_test": Int(1),
    "train.epochs": Num(0, 1e9, lo_open=True), "train.batch_size": Int(1), "train.lr": Num(0, 1e9, lo_open=True),
    "train.weight_decay": Num(0, 1e9), "train.warmup_ratio": Num(0, 1), "train.max_grad_norm": Num(0, 1e9),
    "train.max_len": Int(3, why=" (beginning-of-sequence + a prompt token + a response token)"),
    "train.micro_batch_size": Optional(Int(1)), "train.gradient_checkpointing": Bool(),
    "distributed": Optional(Choice(DISTRIBUTED)),
    "probe.epochs": Num(0, 1e9, lo_open=True),
    "cpift.p": Num(0, 1, lo_open=True), "cpift.tau": Num(0, 1), "cpift.order": Choice(ORDER_STRATEGIES),
    "cpift.t": Num(0, 1), "cpift.overlap_rule": Choice(OVERLAP_RULES), "cpift.freeze": Choice(("cumulative", "none")),
    "cpift.consolidate.ratio": Num(0, 1, lo_open=True), "cpift.consolidate.epochs": Num(0, 1e9, lo_open=True),
    "cpift.consolidate.freeze": Choice(CONSOLIDATE_FREEZE), "cpift.consolidate.mode": Choice(CONSOLIDATE_MODES),
    "cpift.consolidate.compare_modes": Bool(), "data.chat_template": Choice(CHAT_TEMPLATE),
    "eval.evaluator": Choice(EVALUATORS),
    "baselines.ms_random.k": Int(1),
    "forgetting.epochs": Optional(Num(0, 1e9, lo_open=True)),
    "eval.batch_size": Int(1),
    "epi.ratio": Num(0, 1, lo_open=True), "epi.interval": Int(1), "epi.warmup": Int(0),
    "epi.beta": Num(0, 1, hi_open=True), "epi.signal": Choice(EPI_SIGNALS),
    "epi.state_dtype": Choice(EPI_STATE_DTYPES), "epi.normalize": Choice(EPI_NORMALIZE),
}


def _leaves(tree: dict, path: tuple[str, ...] = ()):
    """Dotted names of the scalar settings of a DEFAULTS-shaped tree (free-form keys excluded)."""
    for key, value in tree.items():
        here = path + (key,)
        if here in _OPEN:
            continue
        if isinstance(value, dict):
            yield from _leaves(value, here)
        else:
            yield ".".join(here)


def check_rules(cfg: dict) -> None:
    """Apply RULES to a merged config; raise ConfigError on the first bad value."""
    for dotted, rule in RULES.items():
        node = cfg
        for part in dotted.split("."):
            node = node[part]
        problem = rule.check(node)
        if problem is not None:
            raise ConfigError(f"{dotted} {problem}")


def _task_spec(item, data: dict) -> TaskSpec:
    if isinstance(item, str):
        item = {"name": item}
    if not isinstance(item, dict) or "name" not in item:
        raise ConfigError(f"each task must be a name or a mapping with 'name', got {item!r}")
    unknown = set(item) - set(TASK_KEYS)
    if unknown:
        raise ConfigError(f"task {item['name']!r}: unknown key(s) {sorted(unknown)} (valid: {', '.join(TASK_KEYS)})")
    kind = item.get("kind", "synthetic")
    spec = TaskSpec(name=str(item["name"]), kind=kind, source=item.get("source"),
                    n_train=item.get("n_train", data["n_train"]), n_test=item.get("n_test", data["n_test"]),
                    fields=item.get("fields"), splits=item.get("splits"), hub_config=item.get("hub_config"),
                    metric=item.get("metric"), max_new_tokens=item.get("max_new_tokens"),
                    lm_eval_task=item.get("lm_eval_task"))
    if spec.fields is not None and (kind != "instructions" or not isinstance(spec.fields, dict)):
        raise ConfigError(f"task {spec.name!r}: 'fields' is a mapping for kind: instructions only, got {spec.fields!r}")
    if spec.metric is not None and (kind != "instructions" or spec.metric not in TASK_METRICS):
        raise ConfigError(f"task {spec.name!r}: 'metric' is for kind: instructions, one of {TASK_METRICS}; got {spec.metric!r}")
    if spec.splits is not None and not (isinstance(spec.splits, list) and len(spec.splits) == 2
                                        and all(isinstance(x, str) for x in spec.splits)):
        raise ConfigError(f"task {spec.name!r}: 'splits' must be [train split, test split], got {spec.splits!r}")
    if spec.max_new_tokens is not None and (not isinstance(spec.max_new_tokens, int) or spec.max_new_tokens < 1):
        raise ConfigError(f"task {spec.name!r}: max_new_tokens must be a positive integer, got {spec.max_new_tokens!r}")
    if kind == "synthetic":
        if spec.name not in SYNTHETIC:
            near = difflib.get_close_matches(spec.name, list(SYNTHETIC), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"unknown task {spec.name!r}{hint} Built-in tasks: {sorted(SYNTHETIC)}; "
                              f"real data needs kind: {' | '.join(REAL_LOADERS)} and a source")
    elif kind in REAL_LOADERS:
        if not spec.source:
            raise ConfigError(f"task {spec.name!r} (kind {kind}) needs a 'source': a local file/directory or a hub name")
        if looks_local(spec.source) and not os.path.exists(os.path.expanduser(spec.source)):
            raise ConfigError(f"task {spec.name!r}: data source {spec.source!r} does not exist")
        spec.source = os.path.expanduser(spec.source)
    else:
        raise ConfigError(f"task {spec.name!r}: unknown kind {kind!r} (valid: synthetic, {', '.join(REAL_LOADERS)})")
    for key in ("n_train", "n_test"):
        v = getattr(spec, key)
        if v is not None and (not isinstance(v, int) or v < 1):
            raise ConfigError(f"task {spec.name!r}: {key} must be a positive integer, got {v!r}")
    return spec


def _check_model(model: dict) -> None:
    source = model["source"]
    if source == "tiny":
        for key in ("hidden_size", "num_layers", "num_heads", "intermediate_size"):
            if not isinstance(model[key], int) or model[key] < 1:
                raise ConfigError(f"model.{key} must be a positive integer, got {model[key]!r}")
        if model["hidden_size"] % model["num_heads"]:
            raise ConfigError(f"model.hidden_size ({model['hidden_size']}) must be divisible by model.num_heads ({model['num_heads']})")
        return
    if not isinstance(source, str) or not source:
        raise ConfigError(f"model.source must be 'tiny', a local directory or a hub name, got {source!r}")
    if os.path.isdir(os.path.expanduser(source)):
        if not os.path.exists(os.path.join(os.path.expanduser(source), "config.json")):
            raise ConfigError(f"model {source!r}: the directory has no config.json (not a transformers model)")
        return
    if source.startswith(("/", ".", "~")):
        raise ConfigError(f"model {source!r} not found: no such local directory")
    try:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(source)
    except Exception as exc:  # noqa: BLE001 - any failure means the model cannot be used
        raise ConfigError(f"model {source!r} not found: not a local directory and not loadable from the hub "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None


def _check_epi_warmup(cfg: dict, tasks: list[TaskSpec]) -> None:
    """epi.warmup must leave steps after the first mask: the EPI stage takes ceil(train.epochs × Σ_t
    ceil(n_t / batch_size)) optimizer steps (one task per batch; n_t = the task's n_train, an upper
    bound for real data: the training stage checks the exact count again)."""
    batch_size = cfg["train"]["batch_size"]
    steps = max(1, math.ceil(float(cfg["train"]["epochs"]) * sum(math.ceil(t.n_train / batch_size) for t in tasks)))
    warmup = cfg["epi"]["warmup"]
    if warmup >= steps:
        raise ConfigError(f"epi.warmup = {warmup} must be below the EPI training stage's {steps} optimizer steps "
                          f"(train.epochs × one batch per {batch_size} examples of each task): no mask would "
                          f"ever be in force")


def validate(raw: dict) -> Config:
    """Merge `raw` over the defaults and check everything; raise ConfigError with a clear message."""
    if not isinstance(raw, dict):
        raise ConfigError(f"the config must be a mapping, got {type(raw).__name__}")
    cfg = _merge(DEFAULTS, raw)
    check_rules(cfg)
    if not cfg["tasks"]:
        raise ConfigError(f"config has no tasks; list some under 'tasks' (built-in: {sorted(SYNTHETIC)})")
    tasks = [_task_spec(t, cfg["data"]) for t in cfg["tasks"]]
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ConfigError(f"task names must be unique, got {names}")
    if len(tasks) < 2:
        raise ConfigError("CPI-FT needs at least two tasks")
    for t in tasks:  # task names become stage directories (probe/<name>, ...)
        problem = DirName().check(t.name)
        if problem is not None:
            raise ConfigError(f"task name {problem}")
    c = cfg["cpift"]
    if c["consolidate"]["mode"] == "single_stage" and c["consolidate"]["freeze"] == "cumulative":
        raise ConfigError("cpift.consolidate.freeze: cumulative needs mode: multi_stage (a single stage has no earlier groups)")
    if cfg["eval"]["evaluator"] == "lm_eval":
        missing = [t.name for t in tasks if not t.lm_eval_task]
        if missing:
            raise ConfigError(f"eval.evaluator lm_eval: task(s) {missing} need lm_eval_task (the harness task that scores them)")
    fm = cfg["forgetting"]["methods"]
    if not isinstance(fm, list) or not fm or any(m not in FORGETTING_METHODS for m in fm):
        raise ConfigError(f"forgetting.methods must be a non-empty list from {FORGETTING_METHODS}, got {fm!r}")
    methods = cfg["methods"]
    if not isinstance(methods, list) or not methods:
        raise ConfigError(f"methods must be a non-empty list from {METHODS}")
    for m in methods:
        if m not in METHODS:
            raise ConfigError(f"unknown method {m!r} (valid: {', '.join(METHODS)})")
    if set(methods) & set(EPI_METHODS):
        _check_epi_warmup(cfg, tasks)
    micro = cfg["train"]["micro_batch_size"]
    if micro is not None and cfg["train"]["batch_size"] % micro:
        raise ConfigError(f"train.micro_batch_size = {micro} must divide train.batch_size = {cfg['train']['batch_size']} "
                          f"(a step is batch_size / micro_batch_size forward/backward passes over the processes)")
    k = cfg["baselines"]["ms_random"]["k"]
    if not isinstance(k, int) or not 1 <= k <= len(tasks):
        raise ConfigError(f"baselines.ms_random.k must be an integer in [1, {len(tasks)}] (the number of tasks), got {k!r}")
    groups = cfg["baselines"]["ms_user"]["groups"]
    if "ms_user" in methods:
        if not groups:
            raise ConfigError("method ms_user needs baselines.ms_user.groups: a list of task-name lists")
        flat = [t for g in groups for t in g]
        if sorted(flat) != sorted(names):
            raise ConfigError(f"baselines.ms_user.groups must use every task exactly once; got {groups} for tasks {names}")
    for pair in cfg["forgetting"]["pairs"]:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(p in names for p in pair) and pair[0] != pair[1]):
            raise ConfigError(f"forgetting.pairs entries must be two different task names from {names}, got {pair!r}")
    if cfg["model"]["source"] != "tiny" and any(t.kind == "synthetic" for t in tasks):
        pass  # synthetic tasks work with any tokenizer
    _check_model(cfg["model"])
    return Config(raw=cfg, tasks=tasks)


def parse_override(item: str) -> tuple[list[str], object]:
    """'cpift.p=0.05' -> (['cpift', 'p'], 0.05): a dotted key and a YAML value."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. cpift.p=0.05")
    key, value = item.split("=", 1)
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML ({exc})") from None
    return key.strip().split("."), parsed


def load_config(path_or_dict: str | os.PathLike | dict, overrides: dict | None = None,
                dotted: list[tuple[list[str], object]] | None = None) -> Config:
    """Read a YAML file (or take a dict), apply `overrides` (top-level keys) and `dotted`
    ((key path, value) pairs, as from ``--set``), validate."""
    if isinstance(path_or_dict, dict):
        raw = copy.deepcopy(path_or_dict)
    else:
        path = os.fspath(path_or_dict)
        if not os.path.exists(path):
            raise ConfigError(f"config file {path!r} does not exist")
        try:
            with open(path, encoding="utf-8") as f:
                raw = yaml.safe_load(f)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {getattr(exc, 'strerror', None) or exc}") from None
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the config must be a YAML mapping (key: value lines), "
                              f"got a {type(raw).__name__}")
    for key, value in (overrides or {}).items():
        raw[key] = value
    for keys, value in dotted or []:
        node = raw
        for part in keys[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {'.'.join(keys)}: {part!r} is not a mapping in the config")
        node[keys[-1]] = value
    return validate(raw)


# What `cpift demo` runs (mirrored by examples/demo.yaml): four built-in tasks on a tiny Llama, sized
# to finish in a few minutes on a 2-core CPU. The suite is built to show the problem, not to favour
# a method: shift and unshift are inverse maps of the same inputs (their tags alone tell them apart),
# the model is small (hidden 32, one layer), and every method gets the probes' budget (one epoch
# over each task's data), so joint training trades tasks against each other (seesaw) and training
# one task after another overwrites the first (forgetting).
DEMO: dict = {
    "name": "demo",
    "seed": 0,
    "seeds": 3,
    "threads": 1,
    "model": {"source": "tiny", "hidden_size": 32, "num_layers": 1, "num_heads": 4, "intermediate_size": 64},
    "pretrain": {"examples": 12000, "epochs": 1.0, "lr": 3e-3},
    "data": {"n_train": 1000, "n_test": 200},
    "tasks": ["shift", "unshift", "mirror", "upper"],
    "train": {"epochs": 1.0, "batch_size": 32, "lr": 3e-3, "max_len": 32},
    "probe": {"epochs": 1.0},
    "cpift": {"p": 0.01, "tau": 0.1, "order": "random", "t": 0.5,
              "consolidate": {"ratio": 0.1, "epochs": 1.0, "freeze": "all", "mode": "multi_stage",
                              "compare_modes": True}},
    "epi": {"ratio": 0.01, "interval": 16, "warmup": 16, "beta": 0.99, "signal": "grad_x_param",
            "state_dtype": "float32", "normalize": "layer"},
    "methods": ["full_sft", "ms_random", "ms_user", "cpift", "epi", "epi_static"],
    "baselines": {"ms_random": {"k": 2}, "ms_user": {"groups": [["shift", "unshift"], ["mirror", "upper"]]}},
    "forgetting": {"pairs": [["shift", "unshift"]], "methods": ["full_sft", "multi_stage", "cpift"]},
}
