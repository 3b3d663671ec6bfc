"""Run a whole config: base model, every method for every seed, evaluations, forgetting, report."""

from __future__ import annotations

import os
import time

import torch

from .config import DEMO, Config, ConfigError, load_config, parse_override
from .methods import METHODS, cpift_consolidation_modes, forgetting, probes
from .run import Run
from .stages import Env, base_stage, core_stage, eval_stage, load_json, scores



def run_pipeline(cfg: Config, runs_dir: str = "runs", from_kind: str | None = None, seeds: int | None = None,
                 write_report: bool = True, verify: str = "fast") -> dict:
    """Run (or resume) every stage of `cfg`; return the collected results (and write the report).
    `seeds`: the number of seeds (None: the config's); `verify`: how reused stages are checked
    ("fast": file sizes, "full": contents too; see run.py)."""
    if seeds is not None and (not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1):
        raise ConfigError(f"--seeds must be a positive integer (the number of seeds), got {seeds!r}")
    torch.set_num_threads(int(cfg["threads"]))
    if cfg["model"]["source"] == "tiny":  # loading/saving a tiny model is instant: no bars for it
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    run = Run(os.path.join(runs_dir, cfg.name), from_kind=from_kind, progress=bool(cfg["progress"]), verify=verify)
    base = base_stage(cfg, run)
    n_seeds = int(cfg["seeds"] if seeds is None else seeds)
    names = cfg.task_names
    results: dict = {"tasks": names, "methods": list(cfg["methods"]), "seeds": {}, "run_dir": run.root}
    for seed in range(int(cfg["seed"]), int(cfg["seed"]) + n_seeds):
        env = Env(cfg, run, seed)
        per: dict = {"scores": {}, "forgetting": {}, "consolidation": {}, "eval": {}}
        per["scores"]["base"] = scores(eval_stage(env, "base", base))
        needs_probes = "cpift" in cfg["methods"] or cfg["forgetting"]["pairs"]
        if needs_probes:
            probe = probes(env, base)
            own = {}
            for name, stage in probe.items():
                own[name] = scores(eval_stage(env, f"probe/{name}", stage))[name]
            per["scores"]["probe"] = own
        for method in cfg["methods"]:
            final = METHODS[method].run(env, base)
            ev = eval_stage(env, method, final)
            per["scores"][method] = scores(ev)
            per["eval"][method] = _metric_info(ev)
        if "cpift" in cfg["methods"] and cfg["cpift"]["consolidate"]["compare_modes"]:
            for mode, final in cpift_consolidation_modes(env, base).items():
                per["consolidation"][mode] = scores(eval_stage(env, f"cpift_consolidate_{mode}", final))
        if cfg["forgetting"]["pairs"]:
            core = core_stage(env, base, probe)
            for a, b in cfg["forgetting"]["pairs"]:
                for x, y in ((a, b), (b, a)):
                    first = scores(eval_stage(env, f"probe/{x}", probe[x]))  # A's model on every task
                    finals = forgetting(env, x, y, probe, core, base, list(cfg["forgetting"]["methods"]))
                    per["forgetting"][f"{x}->{y}"] = {
                        "first": x, "second": y, "before": first[x], "second_before": first[y],
                        "second_probe": per["scores"]["probe"][y],
                        "methods": {m: scores(eval_stage(env, f"forgetting/{x}_then_{y}/{m}", st))
                                    for m, st in finals.items()}}
        results["seeds"][seed] = per
    results["stage_log"] = run.log
    results["stage_seconds"] = sum(float(o.manifest.get("seconds", 0.0)) for o in run.done.values())
    results["seconds"] = time.perf_counter() - t0
    if write_report:
        from .report import write_report as _write

        with run.lock("report"):  # two processes on one run directory: one report at a time
            results["report"] = _write(cfg, results)
    return results


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
    run_pipeline(cfg, runs_dir=args.runs_dir, from_kind=args.from_stage, seeds=args.seeds,
                 verify=getattr(args, "verify", "fast"))
    return 0


def run_cli(args) -> int:
    """`cpift run CONFIG.yaml`."""
    return _cli(args.config, args)


def demo_cli(args) -> int:
    """`cpift demo`: the built-in config (tiny Llama, four synthetic tasks), no download."""
    return _cli(DEMO, args)
