"""The compared methods, each a function of (Env, base stage) built from the shared stages, and
the forgetting experiment (paper Table 2).

All methods see the same base model, the same training data and the same SFT budget
(``train.epochs`` passes over every task's data); they differ only in how the data is scheduled
and what is frozen:

    full_sft    one SFT on the mix of all tasks
    ms_random   multi-stage SFT over a random partition of the tasks into K groups, random order
    ms_user     multi-stage SFT over user-given groups, in the given order
    cpift       probes → cores → groups → multi-stage SFT freezing earlier groups' cores
                → fuse (core transplant + SLERP) → consolidation with the cores frozen
    epi         one multi-task SFT with task-homogeneous batches; per-task importance EMAs; each
                task's mask (top epi.ratio) refreshed every epi.interval steps after epi.warmup; a
                task-t step freezes the other tasks' masks minus t's own (docs/epi.md)
    epi_static  the same with each task's mask computed once (at epi.warmup, or at the first later
                refresh point for a task without a step by then): the CPI-FT-style ablation

``METHODS`` is a registry (``register``): a new method adds one entry with its label and the
function that returns its final model stage; config, driver and report read the registry.

Forgetting (Table 2), for a pair (A, B) in both directions: start from the model trained on A
(probe A) and add task B with the probe budget —

    full_sft      fine-tune on B, every parameter trainable (sequential SFT)
    multi_stage   fine-tune on B with A's core frozen (the CPI-FT stage schedule, no fusion)
    cpift         the frozen stage, then fusion with both probes (core transplant + SLERP) and the
                  consolidation on a sample of A and B with the cores frozen (cpift.consolidate)

The report gives the drop on A (A's probe score − A after) and the gain on B (B after − B
before, i.e. B on the model trained on A) per method. Every stage of the experiment, its fusion and
consolidation too, is of kind "forgetting" (``--stage forgetting`` computes them all).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from .run import StageOut
from .stages import (Env, consolidate_stages, core_stage, epi_stage, fuse_stage, group_stage, load_json, probe_stage,
                     sft_stage)


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    run: Callable[[Env, StageOut], StageOut]


METHODS: dict[str, Method] = {}


def register(name: str, label: str) -> Callable:
    """Decorator: add `fn(env, base) -> final model stage` to METHODS under `name`."""
    def wrap(fn):
        if name in METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        METHODS[name] = Method(name, label, fn)
        return fn
    return wrap


def probes(env: Env, base: StageOut) -> dict[str, StageOut]:
    return {name: probe_stage(env, base, name) for name in env.cfg.task_names}


def multi_stage(env: Env, method: str, base: StageOut, order: list[list[str]],
                core: StageOut | None = None) -> StageOut:
    """SFT over `order` (a list of task groups); with `core`, stage k freezes the union of the
    cores of all tasks trained in stages 1..k-1."""
    current, done = base, []
    epochs = float(env.cfg["train"]["epochs"])
    for k, group in enumerate(order):
        frozen = (core, list(done)) if core is not None else None
        current = sft_stage(env, env.key(method, f"stage{k + 1}"), "stages", current, list(group), epochs,
                            frozen=frozen, extra={"order": order})
        done += list(group)
    return current


def random_groups(names: list[str], k: int, seed: int) -> list[list[str]]:
    """A random partition of `names` into k non-empty groups, in random order."""
    rng = random.Random(f"ms_random/{seed}")
    shuffled = list(names)
    rng.shuffle(shuffled)
    groups = [shuffled[i::k] for i in range(k)]
    return [g for g in groups if g]


@register("full_sft", "Full SFT (multi-task)")
def full_sft(env: Env, base: StageOut) -> StageOut:
    names = env.cfg.task_names
    return sft_stage(env, env.key("full_sft", "train"), "stages", base, names, float(env.cfg["train"]["epochs"]))


@register("ms_random", "Multi-Stage (random groups)")
def ms_random(env: Env, base: StageOut) -> StageOut:
    k = int(env.cfg["baselines"]["ms_random"]["k"])
    return multi_stage(env, "ms_random", base, random_groups(env.cfg.task_names, k, env.seed))


@register("ms_user", "Multi-Stage (user groups)")
def ms_user(env: Env, base: StageOut) -> StageOut:
    return multi_stage(env, "ms_user", base, [list(g) for g in env.cfg["baselines"]["ms_user"]["groups"]])


def cpift_parts(env: Env, base: StageOut) -> tuple[StageOut, StageOut, list[list[str]]]:
    """(fused model, core stage, stage order): CPI-FT up to its consolidation."""
    probe = probes(env, base)
    core = core_stage(env, base, probe)
    group = group_stage(env, core)
    order = load_json(group, "group.json")["order"]
    freeze = core if env.cfg["cpift"]["freeze"] == "cumulative" else None
    last = multi_stage(env, "cpift", base, order, core=freeze)
    fused = fuse_stage(env, env.key("cpift", "fuse"), last, probe, core, base)
    return fused, core, order


@register("cpift", "CPI-FT")
def cpift(env: Env, base: StageOut) -> StageOut:
    fused, core, order = cpift_parts(env, base)
    return consolidate_stages(env, "cpift", fused, core, order)


@register("epi", "EPI (evolving masks)")
def epi(env: Env, base: StageOut) -> StageOut:
    return epi_stage(env, "epi", base, "evolving")


@register("epi_static", "EPI, static masks (ablation)")
def epi_static(env: Env, base: StageOut) -> StageOut:
    return epi_stage(env, "epi_static", base, "static")


def cpift_consolidation_modes(env: Env, base: StageOut) -> dict[str, StageOut]:
    """CPI-FT's final model under both consolidation modes (Table 3); the stages before are shared."""
    fused, core, order = cpift_parts(env, base)
    return {mode: consolidate_stages(env, "cpift", fused, core, order, mode=mode)
            for mode in ("multi_stage", "single_stage")}


LABELS = {"base": "Base model", "probe": "Single-task probes (reference)",
          **{name: m.label for name, m in METHODS.items()}}
CONSOLIDATION_LABELS = {"multi_stage": "multi-stage over the groups, all cores frozen (paper default)",
                        "single_stage": "single stage on the mixed sample"}

# ----- forgetting (Table 2) ---------------------------------------------------------------------------

FORGETTING_LABELS = {"full_sft": "Full SFT (all parameters)", "multi_stage": "Multi-Stage, A's core frozen",
                     "cpift": "CPI-FT (frozen stage + fusion + consolidation)"}


def forgetting(env: Env, a: str, b: str, probe: dict[str, StageOut], core: StageOut, base: StageOut,
               methods: list[str]) -> dict[str, StageOut]:
    """A → B: the model trained on A (probe A) learns B by each method. {method: final model stage}."""
    epochs = float(env.cfg["forgetting"]["epochs"] or env.cfg["probe"]["epochs"])
    prefix = ("forgetting", f"{a}_then_{b}")
    out: dict[str, StageOut] = {}
    if "full_sft" in methods:
        out["full_sft"] = sft_stage(env, env.key(*prefix, "full_sft"), "forgetting", probe[a], [b], epochs)
    if "multi_stage" in methods or "cpift" in methods:
        frozen = sft_stage(env, env.key(*prefix, "multi_stage"), "forgetting", probe[a], [b], epochs,
                           frozen=(core, [a]))
        if "multi_stage" in methods:
            out["multi_stage"] = frozen
        if "cpift" in methods:
            fused = fuse_stage(env, env.key(*prefix, "cpift_fuse"), frozen, {a: probe[a], b: probe[b]}, core, base,
                               kind="forgetting")
            out["cpift"] = consolidate_stages(env, "/".join(prefix + ("cpift",)), fused, core, [[a], [b]],
                                              kind="forgetting")
    return out
