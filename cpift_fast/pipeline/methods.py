"""The compared methods, each a function of (config, seed) built from the shared stages.

All methods see the same base model, the same training data and the same SFT budget
(``train.epochs`` passes over every task's data); they differ only in how the data is scheduled
and what is frozen:

    full_sft    one SFT on the mix of all tasks
    ms_random   multi-stage SFT over a random partition of the tasks into K groups, random order
    ms_user     multi-stage SFT over user-given groups, in the given order
    cpift       probes → cores → groups → multi-stage SFT freezing earlier groups' cores
                → fuse (core transplant + SLERP) → consolidation with the cores frozen
"""

from __future__ import annotations

import random
from collections.abc import Callable

from .run import StageOut
from .stages import Env, consolidate_stages, core_stage, fuse_stage, group_stage, load_json, probe_stage, sft_stage


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


def full_sft(env: Env, base: StageOut) -> StageOut:
    names = env.cfg.task_names
    return sft_stage(env, env.key("full_sft", "train"), "stages", base, names, float(env.cfg["train"]["epochs"]))


def ms_random(env: Env, base: StageOut) -> StageOut:
    k = int(env.cfg["baselines"]["ms_random"]["k"])
    return multi_stage(env, "ms_random", base, random_groups(env.cfg.task_names, k, env.seed))


def ms_user(env: Env, base: StageOut) -> StageOut:
    return multi_stage(env, "ms_user", base, [list(g) for g in env.cfg["baselines"]["ms_user"]["groups"]])


def cpift(env: Env, base: StageOut) -> StageOut:
    probe = probes(env, base)
    core = core_stage(env, base, probe)
    group = group_stage(env, core)
    order = load_json(group, "group.json")["order"]
    freeze = core if env.cfg["cpift"]["freeze"] == "cumulative" else None
    last = multi_stage(env, "cpift", base, order, core=freeze)
    fused = fuse_stage(env, env.key("cpift", "fuse"), last, probe, core, base)
    return consolidate_stages(env, "cpift", fused, core, order)


METHODS: dict[str, Callable[[Env, StageOut], StageOut]] = {
    "full_sft": full_sft, "ms_random": ms_random, "ms_user": ms_user, "cpift": cpift,
}
LABELS = {"base": "Base model", "probe": "Single-task probes (reference)", "full_sft": "Full SFT (multi-task)",
          "ms_random": "Multi-Stage (random groups)", "ms_user": "Multi-Stage (user groups)", "cpift": "CPI-FT"}
