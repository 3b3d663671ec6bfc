"""The stages of CPI-FT and its baselines, each a cached, atomic unit of a ``Run``.

    base         tiny model: "pretraining" on the generic mix; hub model: a pointer to it
    probe/T      fine-tune the base on task T alone for the probe budget (paper: 1 epoch)
    cores/T      core region of task T: top p of |θ_T − θ_0| over the whole model
    core         the cores of every task, collected (hard links) with their stats
    group        Jaccard matrix of the cores, groups (connected components of J ≥ τ), stage order
    <m>/stageK   SFT on the tasks of group K; optionally frozen: the union of earlier groups' cores
    epi/train, epi_static/train   EPI: multi-task SFT with per-task importance masks (drift.json)
    cpift/fuse   backbone = last stage; core transplant from each probe; SLERP for the rest
    cpift/consolidate   light SFT on a sampled mix with the cores frozen
    forgetting/A_then_B/<m>   start from probe A, add task B with method m (methods.py)
    eval/<m>     greedy decoding + task metric on every task's test set

Every stage reads its inputs from disk, so a resumed run computes the same values as an
uninterrupted one. Every training stage ends with the run-time freeze check (train.py). In a
multi-process launch (dist.py) the training stages are collective (every rank trains, rank 0
writes); so are core selection and fusion when the base is a local checkpoint (not a hub model):
each rank reads and computes its share of the tensors (cpift_fast.shard), the top-k is global,
fusion's ranks each write their share of the output shards, and the results are those of one
process bit for bit. Every other stage runs on rank 0.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from functools import cached_property

import torch

from ..fuse import fuse_models
from ..mask import ParamMask
from ..overlap import group_tasks, jaccard_matrix, order_stages, plot_overlap
from ..select import core_region, layer_breakdown
from .config import EXECUTION, Config
from .evaluate import evaluate
from .dist import SINGLE, Dist
from .model import TinyLlamaSpec, build_tiny_llama, load_checkpoint, load_hub_model, save_checkpoint
from .run import Run, StageOut
from .judge import Judge
from .loaders import LOADERS
from .tasks import Task, make_synthetic, pretraining_mix
from .train import EpiSpec, TrainSpec, train

SOURCE_FILE = "source.json"
DRIFT_FILE = "drift.json"
# core share per layer: numbered blocks, and embeddings / head / final norm each on their own
LAYER_PATTERN = r"(?:(?:layers|layer|h|blocks|block)\.\d+|embed\w*|wte|wpe|lm_head|ln_f|norm)"


def _dump(obj, path: str) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)


def load_json(stage: StageOut, name: str):
    with open(os.path.join(stage.path, name)) as f:
        return json.load(f)


@dataclass
class Env:
    """What every stage of one seed needs: the config, the run cache, the seed, the task data."""

    cfg: Config
    run: Run
    seed: int

    @property
    def progress(self) -> bool:
        return bool(self.cfg["progress"])

    @cached_property
    def tasks(self) -> dict[str, Task]:
        out = {}
        for spec in self.cfg.tasks:
            if spec.kind == "synthetic":
                out[spec.name] = make_synthetic(spec.name, spec.n_train, spec.n_test, self.seed)
            else:
                out[spec.name] = LOADERS[spec.kind](spec.source, spec.n_train, spec.n_test, self.seed, name=spec.name,
                                                    **spec.options())
        return out

    @cached_property
    def judge(self) -> Judge | None:
        """The LLM judge the environment configures (judge.py), only when a task is judged."""
        if not any(t.metric == "judge" for t in self.tasks.values()):
            return None
        return Judge.from_env()

    @property
    def judge_id(self) -> str | None:
        """What identifies the judge in stage hashes (never the API key)."""
        j = self.judge
        return f"{j.model}@{j.endpoint}" if j else None

    def key(self, *parts: str) -> str:
        return "/".join((f"seed{self.seed}",) + parts)

    def spec(self, epochs: float) -> TrainSpec:
        return train_spec(self.cfg, epochs, float(self.cfg["train"]["lr"]), self.cfg["data"]["chat_template"])

    def data_params(self, names: list[str]) -> dict:
        """The settings that determine the training data of `names` (for stage hashes; how a step is
        computed — config.EXECUTION — is not hashed)."""
        specs = {t.name: vars(t) for t in self.cfg.tasks}
        optim = {k: v for k, v in self.cfg["train"].items() if k != "epochs" and k not in EXECUTION}
        return {"seed": self.seed, "tasks": [specs[n] for n in names], "train": optim,
                "chat_template": self.cfg["data"]["chat_template"]}


def train_spec(cfg: Config, epochs: float, lr: float, chat_template: str = "auto") -> TrainSpec:
    """The config's train settings with this stage's budget and learning rate."""
    t = cfg["train"]
    return TrainSpec(epochs=float(epochs), batch_size=int(t["batch_size"]), lr=lr,
                     weight_decay=float(t["weight_decay"]), warmup_ratio=float(t["warmup_ratio"]),
                     max_grad_norm=float(t["max_grad_norm"]), max_len=int(t["max_len"]), chat_template=chat_template,
                     micro_batch_size=t["micro_batch_size"], gradient_checkpointing=bool(t["gradient_checkpointing"]))


# ----- model I/O --------------------------------------------------------------------------------

def load_model(stage: StageOut, dtype: str = "float32", dist: Dist = SINGLE):
    """The model a stage wrote (or the hub model a base stage points to) and its tokenizer. With
    ``dist.strategy == "fsdp"`` every rank calls it and gets its FSDP2 shards (train.py)."""
    src = os.path.join(stage.path, SOURCE_FILE)
    shards = dist.world if dist.strategy == "fsdp" else None
    if os.path.exists(src):
        with open(src) as f:
            return load_hub_model(json.load(f)["model"], dtype=getattr(torch, dtype), fsdp_size=shards)
    return load_checkpoint(stage.path, fsdp_size=shards)


def _sharded(model, tok, path: str, dist: Dist):
    """`model` sharded over the ranks (FSDP2, as load_model shards) and `tok` as it is: rank 0
    writes the model to `path`, every rank loads its shards, rank 0 removes `path`."""
    def write():
        os.makedirs(path)
        save_checkpoint(model, tok, path)
    dist.on_main(write)
    sharded, _ = dist.together(lambda: load_checkpoint(path, fsdp_size=dist.world))
    dist.on_main(lambda: shutil.rmtree(path))
    return sharded, tok


def _trained(run: Run, out: str, result: dict) -> dict:
    """Write a training stage's loss.json (rank 0: train() wrote the checkpoint) and return its
    manifest info."""
    if run.dist.is_main:
        _dump(result["loss"], os.path.join(out, "loss.json"))
    return {"steps": result["steps"], "frozen_checked": result["frozen_checked"],
            "frozen_checked_per_rank": result["frozen_checked_per_rank"], "processes": run.dist.world,
            "distributed": run.dist.strategy}


def _union(core: StageOut, names: list[str]) -> ParamMask | None:
    masks = [ParamMask.load(os.path.join(core.path, f"{n}.mask")) for n in names]
    if not masks:
        return None
    out = masks[0]
    for m in masks[1:]:
        out = out | m
    return out


# ----- stages ------------------------------------------------------------------------------------

def base_stage(cfg: Config, run: Run) -> StageOut:
    """Tiny model: build it and pretrain on the generic mix. Hub model: record which one."""
    model_cfg, pre = cfg["model"], cfg["pretrain"]
    used = ("batch_size", "weight_decay", "warmup_ratio", "max_grad_norm", "max_len")
    params = {"model": model_cfg, "seed": cfg["seed"],
              "pretrain": pre if model_cfg["source"] == "tiny" else None,
              "train": {k: cfg["train"][k] for k in used} if model_cfg["source"] == "tiny" else None}

    def fn(out):
        if model_cfg["source"] != "tiny":
            _dump({"model": model_cfg["source"]}, os.path.join(out, SOURCE_FILE))
            return {"source": model_cfg["source"]}
        spec = TinyLlamaSpec(hidden_size=model_cfg["hidden_size"], num_layers=model_cfg["num_layers"],
                             num_heads=model_cfg["num_heads"], intermediate_size=model_cfg["intermediate_size"],
                             max_positions=max(64, int(cfg["train"]["max_len"])))
        model, tok = build_tiny_llama(spec, seed=cfg["seed"])
        parameters = sum(p.numel() for p in model.parameters())
        if run.dist.strategy == "fsdp":  # sharded as it is loaded: through a checkpoint of the new model
            model, tok = _sharded(model, tok, os.path.join(out, ".init"), run.dist)
        tspec = train_spec(cfg, float(pre["epochs"]), float(pre["lr"]))
        result = train(model, tok, pretraining_mix(int(pre["examples"]), cfg["seed"]), tspec, seed=cfg["seed"],
                       desc="pretrain base", progress=bool(cfg["progress"]), dist=run.dist, out=out)
        return {**_trained(run, out, result), "parameters": parameters}

    return run.stage("base", "base", params, [], fn, seed=cfg["seed"], collective=model_cfg["source"] == "tiny")


def sft_stage(env: Env, key: str, kind: str, init: StageOut, examples_of: list[str], epochs: float,
              frozen: tuple[StageOut, list[str]] | None = None, examples: list | None = None,
              extra: dict | None = None) -> StageOut:
    """Fine-tune the model of `init` on the tasks `examples_of` (or on `examples`), with the union of
    the cores of `frozen[1]` (from the core stage `frozen[0]`) frozen."""
    params = {"data": env.data_params(examples_of), "epochs": epochs, "model": env.cfg["model"]["dtype"],
              "frozen_tasks": frozen[1] if frozen else [], "extra": extra}
    deps = [init] + ([frozen[0]] if frozen else [])

    def fn(out):
        model, tok = load_model(init, env.cfg["model"]["dtype"], env.run.dist)
        data = examples if examples is not None else [ex for n in examples_of for ex in env.tasks[n].train]
        mask = _union(frozen[0], frozen[1]) if frozen and frozen[1] else None
        result = train(model, tok, data, env.spec(epochs), frozen=mask, seed=env.seed, desc=key, progress=env.progress,
                       dist=env.run.dist, out=out)
        return {**_trained(env.run, out, result), "tasks": examples_of}

    return env.run.stage(key, kind, params, deps, fn, seed=env.seed, collective=True)


def epi_stage(env: Env, method: str, init: StageOut, policy: str) -> StageOut:
    """EPI (docs/epi.md) from the model of `init`: multi-task SFT over every task for train.epochs,
    task-homogeneous batches, per-task importance masks under `policy` ("evolving" | "static").
    Writes the checkpoint, loss.json and drift.json: {"settings", "steps", "state_bytes", "log"},
    the log holding one record per task per refresh (EvolvingIsolation.log)."""
    names = env.cfg.task_names
    epochs = float(env.cfg["train"]["epochs"])
    e = env.cfg["epi"]
    epi = EpiSpec(policy=policy, ratio=float(e["ratio"]), interval=int(e["interval"]), warmup=int(e["warmup"]),
                  beta=float(e["beta"]), signal=e["signal"], state_dtype=e["state_dtype"], normalize=e["normalize"])
    key = env.key(method, "train")
    params = {"data": env.data_params(names), "epochs": epochs, "model": env.cfg["model"]["dtype"], "epi": asdict(epi)}

    def fn(out):
        model, tok = load_model(init, env.cfg["model"]["dtype"], env.run.dist)
        data = [ex for n in names for ex in env.tasks[n].train]
        tasks = [n for n in names for _ in env.tasks[n].train]
        result = train(model, tok, data, env.spec(epochs), seed=env.seed, desc=key, progress=env.progress, epi=epi,
                       tasks=tasks, dist=env.run.dist, out=out)
        if env.run.dist.is_main:
            _dump({"settings": asdict(epi), "steps": result["steps"], "state_bytes": result["state_bytes"],
                   "log": result["drift"]}, os.path.join(out, DRIFT_FILE))
        return {**_trained(env.run, out, result), "tasks": names, "state_bytes": result["state_bytes"],
                "state_bytes_per_rank": result["state_bytes_per_rank"],
                "refreshes": len({r["step"] for r in result["drift"]})}

    return env.run.stage(key, "stages", params, [init], fn, seed=env.seed, collective=True)


def probe_stage(env: Env, base: StageOut, task: str) -> StageOut:
    return sft_stage(env, env.key("probe", task), "probe", base, [task], float(env.cfg["probe"]["epochs"]))


def tensor_source(stage: StageOut, dtype: str = "float32"):
    """What core selection and fusion read: the stage's checkpoint directory (streamed one tensor at
    a time), or, for a hub base that the stage only points to, the loaded model."""
    if os.path.exists(os.path.join(stage.path, SOURCE_FILE)):
        return load_model(stage, dtype)[0]
    return stage.path


def _local(stage: StageOut) -> bool:
    """Whether a stage holds its checkpoint (not a pointer to a hub model)."""
    return not os.path.exists(os.path.join(stage.path, SOURCE_FILE))


def task_core_stage(env: Env, base: StageOut, task: str, probe: StageOut) -> StageOut:
    """Core region of one task: exactly round(p·N) elements with the largest |θ_task − θ_base|
    (``cores/<task>``: ``<task>.mask`` and ``core_stats.json``). Under a multi-process launch with a
    local base every rank selects on its share of the tensors (shard_by="tensor"), rank 0 writes."""
    p = float(env.cfg["cpift"]["p"])
    dist = env.run.dist
    sharded = dist.enabled and _local(base)

    def fn(out):
        group = dist.group if sharded else None
        mask = core_region(tensor_source(base, env.cfg["model"]["dtype"]), probe.path, fraction=p,
                           progress=env.progress, group=group, shard_by="tensor")
        full = mask.gather(group) if sharded else mask  # rank 0: the full mask; others: None
        if full is None:
            return {}
        full.save(os.path.join(out, f"{task}.mask"))
        stats = {task: {"count": full.count(), "numel": full.numel, "per_tensor": full.count_per_tensor(),
                        "per_layer": [list(row) for row in layer_breakdown(full, LAYER_PATTERN)]}}
        _dump(stats, os.path.join(out, "core_stats.json"))
        return {task: stats[task]["count"], "processes": dist.world if sharded else 1}

    return env.run.stage(env.key("cores", task), "core", {"p": p}, [base, probe], fn, seed=env.seed,
                         collective=sharded)


def _link(src: str, dst: str) -> None:
    """dst as a hard link to src (a copy where the file system cannot link)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def core_stage(env: Env, base: StageOut, probes: dict[str, StageOut]) -> StageOut:
    """The cores of every task (``cores/<task>``, computed here when missing), collected into one
    stage: ``<task>.mask`` for each (hard links) and their stats in one ``core_stats.json``."""
    cores = {name: task_core_stage(env, base, name, probe) for name, probe in probes.items()}

    def fn(out):
        stats = {}
        for name, stage in cores.items():
            _link(os.path.join(stage.path, f"{name}.mask"), os.path.join(out, f"{name}.mask"))
            stats.update(load_json(stage, "core_stats.json"))
        _dump(stats, os.path.join(out, "core_stats.json"))
        return {name: s["count"] for name, s in stats.items()}

    return env.run.stage(env.key("core"), "core", {"p": float(env.cfg["cpift"]["p"])}, list(cores.values()), fn,
                         seed=env.seed)


def group_stage(env: Env, core: StageOut) -> StageOut:
    """Jaccard matrix → groups (J ≥ τ, connected components) → stage order."""
    c = env.cfg["cpift"]
    names = env.cfg.task_names

    def fn(out):
        masks = [ParamMask.load(os.path.join(core.path, f"{n}.mask")) for n in names]
        jac = jaccard_matrix(masks)
        groups = group_tasks(jac, float(c["tau"]), names)
        order = order_stages(groups, c["order"], seed=env.seed, masks=dict(zip(names, masks)))
        plot_overlap(jac, names, order, os.path.join(out, "overlap.png"), tau=float(c["tau"]))
        _dump({"names": names, "jaccard": jac.tolist(), "groups": [list(g) for g in groups],
               "order": [list(g) for g in order], "tau": c["tau"]}, os.path.join(out, "group.json"))
        return {"order": [list(g) for g in order]}

    return env.run.stage(env.key("group"), "group", {"tau": c["tau"], "order": c["order"], "seed": env.seed},
                         [core], fn, seed=env.seed)


def fuse_stage(env: Env, key: str, backbone: StageOut, probes: dict[str, StageOut], core: StageOut,
               base: StageOut, kind: str = "fuse") -> StageOut:
    """Core elements from each task's probe model, SLERP(backbone, fold of the probes) elsewhere;
    streamed from the checkpoint directories to a sharded safetensors checkpoint. `kind`: the stage
    kind (the forgetting experiment's fusion is of kind "forgetting")."""
    c = env.cfg["cpift"]
    dist = env.run.dist
    sharded = dist.enabled and _local(base)  # every rank fuses and writes its share of the tensors

    def fn(out):
        fused_dir = os.path.join(out, "fused")
        cores = {n: os.path.join(core.path, f"{n}.mask") for n in probes}
        _, stats = fuse_models(backbone.path, {n: s.path for n, s in probes.items()}, cores, t=c["t"],
                               base=tensor_source(base, env.cfg["model"]["dtype"]), overlap_rule=c["overlap_rule"],
                               out=fused_dir, progress=env.progress, group=dist.group if sharded else None)
        if not dist.is_main:
            return {}
        for fname in os.listdir(fused_dir):  # the checkpoint files, without the backbone's run records
            if fname not in ("manifest.json", "loss.json"):
                os.replace(os.path.join(fused_dir, fname), os.path.join(out, fname))
        shutil.rmtree(fused_dir)
        _dump(_jsonable(stats), os.path.join(out, "fuse_stats.json"))
        return {**{k: _jsonable(stats[k]) for k in ("modes", "transplanted", "overlapping") if k in stats},
                "processes": dist.world if sharded else 1}

    params = {"t": c["t"], "overlap_rule": c["overlap_rule"]}
    return env.run.stage(key, kind, params, [backbone, core, base] + list(probes.values()), fn, seed=env.seed,
                         collective=sharded)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if torch.is_tensor(obj):
        return obj.tolist()
    if isinstance(obj, (int, float, str, bool)) or obj is None:
        return obj
    return str(obj)


def consolidation_data(env: Env, names: list[str], ratio: float, key: str) -> list:
    """A `ratio` sample of each task's training data, mixed (deterministic given the seed)."""
    rng = random.Random(f"{env.seed}/{key}")
    out = []
    for n in names:
        train_set = env.tasks[n].train
        out.extend(rng.sample(train_set, max(1, round(ratio * len(train_set)))))
    rng.shuffle(out)
    return out


def consolidate_stages(env: Env, method: str, fused: StageOut, core: StageOut, order: list[list[str]],
                       mode: str | None = None, kind: str = "consolidate") -> StageOut:
    """Light SFT on a `ratio` sample of each task's data, from the fused model (paper §2.5, Table 3).

    mode multi_stage (paper default): one stage per group, in stage order, each on its group's
    sample; single_stage: one stage on the mixed sample of every task. Frozen in each stage:
    freeze=all: every task's core (paper); cumulative: the cores of the groups consolidated before
    it (multi_stage only); none: nothing. Stage keys: ``consolidate`` (single) and
    ``consolidate1..K`` (multi). `kind`: the stages' kind (the forgetting experiment's: "forgetting")."""
    c = env.cfg["cpift"]["consolidate"]
    mode = mode or c["mode"]
    names = [t for g in order for t in g]
    ratio, epochs = float(c["ratio"]), float(c["epochs"])
    extra = {"ratio": ratio, "freeze": c["freeze"], "mode": mode}
    if mode == "single_stage":
        if c["freeze"] == "cumulative":
            raise ValueError("single-stage consolidation cannot freeze cumulatively (no earlier groups)")
        key = env.key(method, "consolidate")
        frozen = (core, names) if c["freeze"] == "all" else None
        return sft_stage(env, key, kind, fused, names, epochs, frozen=frozen,
                         examples=consolidation_data(env, names, ratio, key), extra=extra)
    current, done = fused, []
    for k, group in enumerate(order):
        key = env.key(method, f"consolidate{k + 1}")
        frozen = {"all": (core, names), "cumulative": (core, list(done)), "none": None}[c["freeze"]]
        current = sft_stage(env, key, kind, current, list(group), epochs, frozen=frozen,
                            examples=consolidation_data(env, list(group), ratio, key), extra=extra)
        done += list(group)
    return current


def eval_stage(env: Env, name: str, model: StageOut) -> StageOut:
    names = env.cfg.task_names

    def fn(out):
        m, tok = load_model(model, env.cfg["model"]["dtype"])
        m.to("cuda" if torch.cuda.is_available() else "cpu")
        results = evaluate_model(env, m, tok, names, desc=f"eval {name}")
        _dump(results, os.path.join(out, "results.json"))
        return {n: r["score"] for n, r in results.items()}

    params = {"tasks": [vars(t) for t in env.cfg.tasks], "seed": env.seed,  # batch size: not in the result
              "chat_template": env.cfg["data"]["chat_template"], "max_len": env.cfg["train"]["max_len"],
              "evaluator": env.cfg["eval"]["evaluator"], "judge": env.judge_id}
    return env.run.stage(env.key("eval", name), "eval", params, [model], fn, seed=env.seed)


def evaluate_model(env: Env, model, tok, names: list[str], desc: str) -> dict:
    """The configured evaluator on the tasks `names`."""
    tasks = [env.tasks[n] for n in names]
    if env.cfg["eval"]["evaluator"] == "lm_eval":
        from .lm_eval_engine import evaluate_lm_eval

        specs = {t.name: t for t in env.cfg.tasks}
        return evaluate_lm_eval(model, tok, tasks, {n: specs[n].lm_eval_task for n in names},
                                batch_size=int(env.cfg["eval"]["batch_size"]))
    return evaluate(model, tok, tasks, progress=env.progress, batch_size=int(env.cfg["eval"]["batch_size"]),
                    desc=desc, chat_template=env.cfg["data"]["chat_template"],
                    max_len=int(env.cfg["train"]["max_len"]), judge=env.judge)


def scores(stage: StageOut) -> dict[str, float]:
    return {n: r["score"] for n, r in load_json(stage, "results.json").items()}
