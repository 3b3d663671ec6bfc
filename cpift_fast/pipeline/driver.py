"""Run a whole config: base model, every method for every seed, evaluations, forgetting, report.

Under torchrun / accelerate launch every process runs this driver in lock step (dist.py): the
training stages on every rank, everything else — and every write in the run directory — on rank 0.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

import torch

from .config import DEMO, Config, ConfigError, load_config, parse_override
from .dist import launched_world_size
from .dist import setup as setup_dist
from .methods import METHODS, cpift_consolidation_modes, forgetting, probes
from .run import KINDS, PER_TASK, MissingStageError, NotSelected, Run
from .stages import (Env, base_stage, core_stage, eval_stage, load_json, probe_stage, scores, task_core_stage,
                     train_spec)


def run_pipeline(cfg: Config, runs_dir: str = "runs", from_kind: str | None = None, seeds: int | None = None,
                 write_report: bool = True, verify: str = "fast", stage: str | None = None,
                 task: str | None = None, seed: int | None = None) -> dict:
    """Run (or resume) every stage of `cfg`; return the collected results (and write the report).
    `seeds`: the number of seeds (None: the config's); `verify`: how reused stages are checked
    ("fast": file sizes, "full": contents too; see run.py).

    One stage kind (`stage`, cluster fan-out): compute only the stages of that kind — with `task`
    only that task's piece of a per-task kind (run.PER_TASK), with `seed` only that seed's — and
    reuse finished ones. Every input stage must be finished: an unfinished one raises
    MissingStageError naming it (upstream stages are never computed). Then no results are collected
    and no report is written: the returned dict holds "stage_log", "run_dir" and "selected" (the
    keys of the selected stages, computed now or found finished). A plain run afterwards reuses every stage and reports.

    Launched as several processes (torchrun, accelerate launch) every process calls this with the
    same arguments; they all return the same results, and rank 0 alone writes the report."""
    if seeds is not None and (not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1):
        raise ConfigError(f"--seeds must be a positive integer (the number of seeds), got {seeds!r}")
    n_seeds = int(cfg["seeds"] if seeds is None else seeds)
    all_seeds = range(int(cfg["seed"]), int(cfg["seed"]) + n_seeds)
    _check_selection(cfg, stage, task, seed, all_seeds, from_kind)
    try:  # before any process group is set up
        train_spec(cfg, 1.0, 1.0).parts(launched_world_size())
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    dist = setup_dist(cfg["distributed"])
    torch.set_num_threads(int(cfg["threads"]))
    if cfg["model"]["source"] == "tiny":  # loading/saving a tiny model is instant: no bars for it
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    run = Run(os.path.join(runs_dir, cfg.name), from_kind=from_kind, progress=bool(cfg["progress"]), verify=verify,
              only=stage, task=task, dist=dist)
    base = base_stage(cfg, run)
    names = cfg.task_names
    results: dict = {"tasks": names, "methods": list(cfg["methods"]), "seeds": {}, "run_dir": run.root}
    for k in all_seeds if seed is None else [seed]:
        results["seeds"][k] = _run_seed(Env(cfg, run, k), base)
    results["stage_log"] = run.log
    if stage is not None:
        results["selected"] = sorted(run.selected_done)
        if run.progress:
            print(f"--stage {stage}{f' --task {task}' if task else ''}: {len(results['selected'])} stage(s) "
                  f"finished ({sum(st == 'ran' for _, st, _ in run.log)} computed now)", flush=True)
        return {k: results[k] for k in ("stage_log", "selected", "run_dir")}
    results["stage_seconds"] = sum(float(o.manifest.get("seconds", 0.0)) for o in run.done.values())
    results["seconds"] = time.perf_counter() - t0
    if write_report:
        from .report import write_report as _write

        def report():
            with run.lock("report"):  # two processes on one run directory: one report at a time
                return _write(cfg, results)

        results["report"] = dist.on_main(report)
    return results


def _check_selection(cfg: Config, stage, task, seed, all_seeds: range, from_kind) -> None:
    """ConfigError (before any work) for a bad --stage / --task / --seed, or one given without
    --stage, or --stage with --from."""
    if stage is None:
        if task is not None or seed is not None:
            raise ConfigError(f"{'--task' if task is not None else '--seed'} needs --stage KIND")
        return
    if stage not in KINDS:
        raise ConfigError(f"--stage {stage!r}: unknown stage (valid: {', '.join(KINDS)})")
    if from_kind is not None:
        raise ConfigError("--stage and --from cannot be combined (--stage computes only unfinished stages)")
    if task is not None:
        if stage not in PER_TASK:
            raise ConfigError(f"--task applies to the per-task stages ({', '.join(PER_TASK)}), not --stage {stage}")
        if task not in cfg.task_names:
            raise ConfigError(f"--task {task!r}: not a task of the config (tasks: {', '.join(cfg.task_names)})")
    if seed is not None and seed not in all_seeds:
        raise ConfigError(f"--seed {seed}: not a seed of the run (seeds {all_seeds.start}..{all_seeds.stop - 1})")


@contextlib.contextmanager
def _branch() -> Iterator[None]:
    """One branch of a seed's pipeline: under --stage, a stage that is not that command's work
    (run.NotSelected) ends the branch; the next branch goes on. (A plain run never raises it.)"""
    try:
        yield
    except NotSelected:
        pass


def _run_seed(env: Env, base) -> dict:
    """Every stage of one seed, in independent branches; the seed's scores, forgetting, evals."""
    cfg = env.cfg
    per: dict = {"scores": {}, "forgetting": {}, "consolidation": {}, "eval": {}}
    with _branch():
        per["scores"]["base"] = scores(eval_stage(env, "base", base))
    if "cpift" in cfg["methods"] or cfg["forgetting"]["pairs"]:
        probe = {}
        for name in cfg.task_names if env.run.task is None else [env.run.task]:
            with _branch():
                probe[name] = probe_stage(env, base, name)
        for name, stage in probe.items():  # each task's core, on its own (--stage core --task NAME)
            with _branch():
                task_core_stage(env, base, name, stage)
        if env.run.task is not None:  # --task: that task's per-task stages are all there is to do
            return per
        own = {}
        for name, stage in probe.items():
            with _branch():
                own[name] = scores(eval_stage(env, f"probe/{name}", stage))[name]
        per["scores"]["probe"] = own
    for method in cfg["methods"]:
        with _branch():
            ev = eval_stage(env, method, METHODS[method].run(env, base))
            per["scores"][method] = scores(ev)
            per["eval"][method] = _metric_info(ev)
    if "cpift" in cfg["methods"] and cfg["cpift"]["consolidate"]["compare_modes"]:
        with _branch():
            for mode, final in cpift_consolidation_modes(env, base).items():
                per["consolidation"][mode] = scores(eval_stage(env, f"cpift_consolidate_{mode}", final))
    for a, b in cfg["forgetting"]["pairs"]:
        for x, y in ((a, b), (b, a)):
            with _branch():
                probe = probes(env, base)
                finals = forgetting(env, x, y, probe, core_stage(env, base, probe), base,
                                    list(cfg["forgetting"]["methods"]))
                first = scores(eval_stage(env, f"probe/{x}", probe[x]))  # A's model on every task
                per["forgetting"][f"{x}->{y}"] = {
                    "first": x, "second": y, "before": first[x], "second_before": first[y],
                    "second_probe": per["scores"]["probe"][y],
                    "methods": {m: scores(eval_stage(env, f"forgetting/{x}_then_{y}/{m}", st))
                                for m, st in finals.items()}}
    return per


def _metric_info(stage) -> dict:
    """{task: {"metric", "normalization", "metrics"}} of an eval stage (for the report)."""
    return {n: {k: r.get(k) for k in ("metric", "normalization", "metrics")}
            for n, r in load_json(stage, "results.json").items()}


def _cli(config, args) -> int:
    """`cpift run` / `cpift demo`; errors propagate to cli.main (one `cpift: error:` line)."""
    from .run import KINDS

    overrides = {}
    if args.name:
        overrides["name"] = args.name
    if args.no_progress:
        overrides["progress"] = False
    if args.from_stage is not None and args.from_stage not in KINDS:
        raise ConfigError(f"--from {args.from_stage!r}: unknown stage (valid: {', '.join(KINDS)})")
    dotted = [parse_override(item) for item in getattr(args, "overrides", [])]
    cfg = load_config(config, overrides, dotted=dotted)
    try:
        run_pipeline(cfg, runs_dir=args.runs_dir, from_kind=args.from_stage, seeds=args.seeds,
                     verify=getattr(args, "verify", "fast"), stage=getattr(args, "stage", None),
                     task=getattr(args, "task", None), seed=getattr(args, "seed", None))
    except MissingStageError as exc:
        raise exc.for_config(config) from None
    return 0


def run_cli(args) -> int:
    """`cpift run CONFIG.yaml`."""
    return _cli(args.config, args)


def demo_cli(args) -> int:
    """`cpift demo`: the built-in config (tiny Llama, four synthetic tasks), no download."""
    return _cli(DEMO, args)
