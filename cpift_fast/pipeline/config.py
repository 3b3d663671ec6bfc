"""Run configuration: YAML → validated ``Config``, with every error reported before any training.

Checked up front: unknown keys (with the closest valid one), unknown tasks, missing data files,
p / τ / t / ratios out of range, unknown methods or stage-order strategies, user groups that do
not partition the tasks, and a model that is neither ``tiny``, an existing local directory, nor
resolvable on the hub.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import os
from dataclasses import dataclass

import yaml

from .tasks import REAL_LOADERS, SYNTHETIC

METHODS = ("full_sft", "ms_random", "ms_user", "cpift")
ORDER_STRATEGIES = ("random", "size", "min_frozen")
OVERLAP_RULES = ("last", "first", "mean")
CONSOLIDATE_FREEZE = ("all", "cumulative", "none")

DEFAULTS: dict = {
    "name": "run",
    "seed": 0,
    "seeds": 1,
    "threads": 1,
    "progress": True,
    "model": {"source": "tiny", "hidden_size": 128, "num_layers": 2, "num_heads": 4,
              "intermediate_size": 256, "dtype": "float32"},
    "pretrain": {"examples": 6000, "epochs": 1.0, "lr": 3e-3},
    "data": {"n_train": 1000, "n_test": 200},
    "tasks": [],
    "train": {"epochs": 2.0, "batch_size": 32, "lr": 2e-3, "weight_decay": 0.01, "warmup_ratio": 0.03,
              "max_grad_norm": 1.0, "max_len": 32},
    "probe": {"epochs": 1.0},
    "cpift": {"p": 0.01, "tau": 0.1, "order": "random", "t": 0.5, "overlap_rule": "last",
              "freeze": "cumulative",
              "consolidate": {"ratio": 0.1, "epochs": 1.0, "freeze": "all"}},
    "methods": ["full_sft", "ms_random", "cpift"],
    "baselines": {"ms_random": {"k": 2}, "ms_user": {"groups": None}},
    "forgetting": {"pairs": [], "epochs": None},
    "eval": {"batch_size": 256},
}

# keys whose value is free-form (not checked key by key)
_OPEN = {("baselines", "ms_user", "groups"), ("forgetting", "pairs"), ("tasks",), ("methods",)}


class ConfigError(ValueError):
    """The configuration is invalid; raised before any training starts."""


@dataclass
class TaskSpec:
    name: str
    kind: str = "synthetic"          # synthetic | gsm8k | codealpaca
    source: str | None = None        # local file/dir or hub name (real data)
    n_train: int | None = None
    n_test: int | None = None


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

    def section_hash(self, *keys: str, extra=None) -> str:
        """Stable hash of the named top-level sections (plus `extra`), for stage manifests."""
        payload = {k: self.raw[k] for k in keys}
        if extra is not None:
            payload["_extra"] = extra
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


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


def _range(value, lo, hi, name, lo_open=False):
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if not (lo < v <= hi if lo_open else lo <= v <= hi):
        raise ConfigError(f"{name} = {value} is out of range: it must be in {'(' if lo_open else '['}{lo}, {hi}]")
    return v


def _task_spec(item, data: dict) -> TaskSpec:
    if isinstance(item, str):
        item = {"name": item}
    if not isinstance(item, dict) or "name" not in item:
        raise ConfigError(f"each task must be a name or a mapping with 'name', got {item!r}")
    unknown = set(item) - {"name", "kind", "source", "n_train", "n_test"}
    if unknown:
        raise ConfigError(f"task {item['name']!r}: unknown key(s) {sorted(unknown)} (valid: name, kind, source, n_train, n_test)")
    kind = item.get("kind", "synthetic")
    spec = TaskSpec(name=str(item["name"]), kind=kind, source=item.get("source"),
                    n_train=item.get("n_train", data["n_train"]), n_test=item.get("n_test", data["n_test"]))
    if kind == "synthetic":
        if spec.name not in SYNTHETIC:
            near = difflib.get_close_matches(spec.name, list(SYNTHETIC), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"unknown task {spec.name!r}{hint} Built-in tasks: {sorted(SYNTHETIC)}; "
                              f"real data needs kind: {' | '.join(REAL_LOADERS)} and a source")
    elif kind in REAL_LOADERS:
        if not spec.source:
            raise ConfigError(f"task {spec.name!r} (kind {kind}) needs a 'source': a local file/directory or a hub name")
        looks_local = spec.source.startswith(("/", ".", "~")) or os.path.splitext(spec.source)[1] in (".json", ".jsonl")
        if looks_local and not os.path.exists(os.path.expanduser(spec.source)):
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


def validate(raw: dict) -> Config:
    """Merge `raw` over the defaults and check everything; raise ConfigError with a clear message."""
    if not isinstance(raw, dict):
        raise ConfigError(f"the config must be a mapping, got {type(raw).__name__}")
    cfg = _merge(DEFAULTS, raw)
    if not cfg["tasks"]:
        raise ConfigError(f"config has no tasks; list some under 'tasks' (built-in: {sorted(SYNTHETIC)})")
    tasks = [_task_spec(t, cfg["data"]) for t in cfg["tasks"]]
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ConfigError(f"task names must be unique, got {names}")
    if len(tasks) < 2:
        raise ConfigError("CPI-FT needs at least two tasks")
    for key in ("seed", "seeds", "threads"):
        if not isinstance(cfg[key], int) or cfg[key] < (0 if key == "seed" else 1):
            raise ConfigError(f"{key} must be a {'non-negative' if key == 'seed' else 'positive'} integer, got {cfg[key]!r}")
    if not str(cfg["name"]) or "/" in str(cfg["name"]):
        raise ConfigError(f"name must be a non-empty string without '/', got {cfg['name']!r}")
    c = cfg["cpift"]
    _range(c["p"], 0.0, 1.0, "cpift.p", lo_open=True)
    _range(c["tau"], 0.0, 1.0, "cpift.tau")
    _range(c["t"], 0.0, 1.0, "cpift.t")
    _range(c["consolidate"]["ratio"], 0.0, 1.0, "cpift.consolidate.ratio", lo_open=True)
    if c["order"] not in ORDER_STRATEGIES:
        raise ConfigError(f"cpift.order must be one of {ORDER_STRATEGIES}, got {c['order']!r}")
    if c["overlap_rule"] not in OVERLAP_RULES:
        raise ConfigError(f"cpift.overlap_rule must be one of {OVERLAP_RULES}, got {c['overlap_rule']!r}")
    if c["freeze"] not in ("cumulative", "none"):
        raise ConfigError(f"cpift.freeze must be 'cumulative' or 'none', got {c['freeze']!r}")
    if c["consolidate"]["freeze"] not in CONSOLIDATE_FREEZE:
        raise ConfigError(f"cpift.consolidate.freeze must be one of {CONSOLIDATE_FREEZE}, got {c['consolidate']['freeze']!r}")
    for section, key in (("train", "epochs"), ("probe", "epochs"), ("pretrain", "epochs"), ("train", "lr"), ("pretrain", "lr")):
        _range(cfg[section][key], 0.0, 1e9, f"{section}.{key}", lo_open=True)
    _range(c["consolidate"]["epochs"], 0.0, 1e9, "cpift.consolidate.epochs", lo_open=True)
    _range(cfg["train"]["warmup_ratio"], 0.0, 1.0, "train.warmup_ratio")
    methods = cfg["methods"]
    if not isinstance(methods, list) or not methods:
        raise ConfigError(f"methods must be a non-empty list from {METHODS}")
    for m in methods:
        if m not in METHODS:
            raise ConfigError(f"unknown method {m!r} (valid: {', '.join(METHODS)})")
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
        with open(path) as f:
            try:
                raw = yaml.safe_load(f) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    for key, value in (overrides or {}).items():
        raw[key] = value
    for path, value in dotted or []:
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {'.'.join(path)}: {part!r} is not a mapping in the config")
        node[path[-1]] = value
    return validate(raw)


# What `cpift demo` runs (mirrored by examples/demo.yaml): four built-in tasks on a tiny Llama,
# sized to finish in a few minutes on a 2-core CPU.
DEMO: dict = {
    "name": "demo",
    "seed": 0,
    "seeds": 3,
    "threads": 1,
    "model": {"source": "tiny", "hidden_size": 128, "num_layers": 2, "num_heads": 4, "intermediate_size": 256},
    "pretrain": {"examples": 12000, "epochs": 1.0, "lr": 3e-3},
    "data": {"n_train": 1000, "n_test": 200},
    "tasks": ["shift", "mirror", "upper", "count"],
    "train": {"epochs": 2.0, "batch_size": 32, "lr": 3e-3, "max_len": 32},
    "probe": {"epochs": 1.0},
    "cpift": {"p": 0.01, "tau": 0.1, "order": "random", "t": 0.5,
              "consolidate": {"ratio": 0.1, "epochs": 1.0, "freeze": "all"}},
    "methods": ["full_sft", "ms_random", "ms_user", "cpift"],
    "baselines": {"ms_random": {"k": 2}, "ms_user": {"groups": [["shift", "mirror"], ["upper", "count"]]}},
    "forgetting": {"pairs": [["shift", "mirror"]]},
}
