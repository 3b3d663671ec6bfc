"""Sweeps: ``cpift sweep CONFIG --set cpift.tau=0,0.05,0.1,0.2,0.3 [--set cpift.p=0.01,0.05]``.

A ``--set`` whose value lists several comma-separated values is a sweep axis; a single value
(which may be a YAML list or mapping: commas inside brackets do not split) is a fixed override. One or two axes (a grid over two keys). Every
point's config is validated before any training.

Points share every stage they can: point i runs in ``runs/NAME/sweep/<point>/``, a hard-linked
copy of the previous point's run directory (no bytes copied), so the stage cache (run.py) reuses
each stage whose settings and inputs are unchanged — the base model, the probes and, for a τ
sweep, the cores and every baseline — and recomputes only what the swept value changes. Stages
are replaced by rename, never written in place, so a recomputed stage leaves the other point's
files untouched.

The sweep report ``runs/NAME/sweep/report.md`` (+ ``sweep.json``) tabulates each method's
average 0–10 score per point and the mean pairwise core overlap (Jaccard), and plots score vs
the swept value (paper Fig. 2) and, when ``cpift.p`` is swept, core overlap vs p.

Under torchrun / accelerate launch every process runs the sweep; rank 0 alone links the point
directories and writes the sweep report (dist.py).
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import shutil
import tempfile

import yaml

from .config import Config, ConfigError, load_config
from .dist import setup as setup_dist
from .driver import run_pipeline
from .report import _mean_std, _savefig, results_rows
from .methods import LABELS

MAX_AXES = 2


def _split_values(text: str) -> list[str]:
    """'0,0.05,[1, 2]' -> ['0', '0.05', '[1, 2]'] (commas inside brackets or braces stay)."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts]


def parse_sweep(items: list[str]) -> tuple[list[tuple[list[str], object]], list[tuple[str, list]]]:
    """--set items -> (fixed [(key path, value)], axes [(dotted key, [values])])."""
    fixed, axes = [], []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE or KEY=V1,V2,..., e.g. cpift.tau=0,0.1")
        key, value = (x.strip() for x in item.split("=", 1))
        try:
            values = [yaml.safe_load(v) for v in _split_values(value)]
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: a value is not valid YAML ({exc})") from None
        if any(k == key for k, _ in axes) or any(".".join(p) == key for p, _ in fixed):
            raise ConfigError(f"--set {key}: given twice")
        if len(values) > 1:
            if len(set(map(json.dumps, values))) != len(values):
                raise ConfigError(f"--set {key}: repeated values {values}")
            axes.append((key, values))
        else:
            fixed.append((key.split("."), values[0]))
    if not axes:
        raise ConfigError("cpift sweep needs at least one --set KEY=V1,V2,... with two or more values")
    if len(axes) > MAX_AXES:
        raise ConfigError(f"cpift sweep: at most {MAX_AXES} swept keys (a grid over two), got {[k for k, _ in axes]}")
    return fixed, axes


def _label(point: dict) -> str:
    return ",".join(f"{k.split('.')[-1]}={v}" for k, v in point.items()).replace("/", "_")


def _link_tree(src: str, dst: str) -> None:
    """dst = a hard-linked copy of src (hidden entries — temps, locks — and reports left out)."""
    def ignore(directory, names):
        top = os.path.abspath(directory) == os.path.abspath(src)
        return [n for n in names if n.startswith(".") or n.endswith(".lock")
                or (top and (n == "report.md" or n.endswith(".png")))]
    tmp = dst + ".linking"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, copy_function=os.link, ignore=ignore)
    os.rename(tmp, dst)


def mean_overlap(run_dir: str, seed: int) -> float | None:
    """Mean off-diagonal Jaccard of the cores (group stage of `seed`), or None without one."""
    path = os.path.join(run_dir, f"seed{seed}", "group", "group.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        jac = json.load(f)["jaccard"]
    n = len(jac)
    vals = [jac[i][j] for i in range(n) for j in range(n) if i != j]
    return sum(vals) / len(vals) if vals else None


def run_sweep(config, items: list[str], runs_dir: str = "runs", name: str | None = None, seeds: int | None = None,
              overrides: dict | None = None) -> dict:
    """Validate every point, run them in order (sharing stages), write the sweep report."""
    fixed, axes = parse_sweep(items)
    keys = [k for k, _ in axes]
    points = [dict(zip(keys, combo)) for combo in itertools.product(*(v for _, v in axes))]
    cfgs: list[Config] = []
    for point in points:
        dotted = fixed + [(k.split("."), v) for k, v in point.items()]
        try:
            cfgs.append(load_config(copy.deepcopy(config) if isinstance(config, dict) else config,
                                    overrides, dotted=dotted))
        except ConfigError as exc:
            raise ConfigError(f"sweep point {_label(point)}: {exc}") from None
    root = os.path.join(runs_dir, name or cfgs[0].name, "sweep")
    dist = setup_dist(cfgs[0]["distributed"])
    dist.on_main(lambda: os.makedirs(root, exist_ok=True))
    out = {"axes": [[k, v] for k, v in axes], "points": [], "root": os.path.abspath(root)}
    prev = None
    for point, cfg in zip(points, cfgs):
        label = _label(point)
        here = os.path.join(root, label)
        if prev is not None:
            def link(src=prev, dst=here):
                if not os.path.exists(dst):
                    _link_tree(src, dst)
            dist.on_main(link)
        cfg.raw["name"] = label
        if cfg["progress"] and dist.is_main:
            print(f"=== sweep point {label} ===", flush=True)
        res = run_pipeline(cfg, runs_dir=root, seeds=seeds, write_report=False)
        first_seed = min(res["seeds"])
        out["points"].append({
            "point": point, "label": label,
            "avg": {key: avg for key, _, avg in results_rows(res)},
            "tasks": {key: per_task for key, per_task, _ in results_rows(res)},
            "overlap": mean_overlap(here, first_seed),
            "groups": _groups(here, first_seed),
            "ran": sum(1 for _, s, _ in res["stage_log"] if s == "ran"),
            "cached": sum(1 for _, s, _ in res["stage_log"] if s == "cached"),
            "seconds": res["seconds"]})
        prev = here
    out["report"] = dist.on_main(lambda: write_sweep_report(out))
    return out


def _groups(run_dir: str, seed: int):
    path = os.path.join(run_dir, f"seed{seed}", "group", "group.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)["groups"]


def _numeric(values) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def write_sweep_report(out: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = out["root"]
    (k1, v1), *rest = out["axes"]
    k2, v2 = rest[0] if rest else (None, [None])
    methods = [m for m in out["points"][0]["avg"] if m not in ("base",)]
    xs = list(range(len(v1))) if not _numeric(v1) else v1
    figs = {}
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    for second in v2:
        pts = [p for p in out["points"] if k2 is None or p["point"][k2] == second]
        series = ["cpift"] if k2 is not None else methods
        for m in series:
            if m not in pts[0]["avg"]:
                continue
            means = [_mean_std(p["avg"][m])[0] for p in pts]
            errs = [_mean_std(p["avg"][m])[1] for p in pts]
            label = LABELS.get(m, m) + (f" ({k2.split('.')[-1]}={second})" if k2 else "")
            ax.errorbar(xs, means, yerr=errs, marker="o", capsize=2, label=label,
                        linestyle="-" if m == "cpift" else "--")
    if not _numeric(v1):
        ax.set_xticks(xs, [str(v) for v in v1])
    ax.set_xlabel(k1)
    ax.set_ylabel("Avg normalized score (0–10)")
    ax.set_title(f"Score vs {k1}")
    ax.legend(fontsize=6)
    _savefig(fig, os.path.join(root, "score_vs_value.png"))
    plt.close(fig)
    figs["score"] = "score_vs_value.png"
    p_axis = next((i for i, (k, _) in enumerate(out["axes"]) if k == "cpift.p"), None)
    if p_axis is not None:
        kp, vp = out["axes"][p_axis]
        fig, ax = plt.subplots(figsize=(4.6, 3.2))
        pairs = sorted({(p["point"][kp], p["overlap"]) for p in out["points"] if p["overlap"] is not None})
        ax.plot([a for a, _ in pairs], [b for _, b in pairs], marker="o")
        ax.set_xscale("log" if all(a > 0 for a, _ in pairs) else "linear")
        ax.set_xlabel("p (core fraction)")
        ax.set_ylabel("mean pairwise Jaccard of the cores")
        ax.set_title("Core overlap vs p")
        _savefig(fig, os.path.join(root, "overlap_vs_p.png"))
        plt.close(fig)
        figs["overlap"] = "overlap_vs_p.png"
    head = [k for k, _ in out["axes"]]
    lines = [f"# Sweep over {' × '.join(head)}", "",
             "Each point is a full run (every method, every seed); stages unchanged by the swept value are shared "
             "with the previous point (hard links), so only what the value changes is recomputed. Avg (0–10) is "
             "the mean normalized task score; overlap is the mean pairwise Jaccard of the task cores (first seed).", "",
             "| " + " | ".join(head) + " | " + " | ".join(LABELS.get(m, m) for m in methods)
             + " | core overlap | groups (first seed) | stages run / reused |",
             "|" + "---|" * len(head) + "---:|" * len(methods) + "---:|---|---|"]
    for p in out["points"]:
        cells = []
        for m in methods:
            vals = p["avg"].get(m)
            if vals is None:
                cells.append("")
                continue
            mean, std = _mean_std(vals)
            cells.append(f"{mean:.2f} ± {std:.2f}" if len(vals) > 1 else f"{mean:.2f}")
        ov = f"{p['overlap']:.3f}" if p["overlap"] is not None else "–"
        lines.append("| " + " | ".join(str(p["point"][k]) for k in head) + " | " + " | ".join(cells)
                     + f" | {ov} | {p['groups']} | {p['ran']} / {p['cached']} |")
    lines += ["", f"![score vs {k1}]({figs['score']})", ""]
    if "overlap" in figs:
        lines += [f"![core overlap vs p]({figs['overlap']})", ""]
    path = os.path.join(root, "report.md")
    for fname, text in (("report.md", "\n".join(lines) + "\n"), ("sweep.json", json.dumps(out, indent=1, default=str))):
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=root)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(root, fname))
    print("\n".join(lines[:4 + 2 + len(out["points"]) + 1]))
    print(f"sweep report: {path}")
    return path


def sweep_cli(args) -> int:
    """`cpift sweep CONFIG --set KEY=V1,V2,...` (CONFIG 'demo' = the built-in demo config)."""
    import sys

    from .config import DEMO

    config = DEMO if args.config == "demo" else args.config
    overrides = {"progress": False} if args.no_progress else None
    try:
        run_sweep(config, args.overrides, runs_dir=args.runs_dir, name=args.name, seeds=args.seeds, overrides=overrides)
    except ConfigError as exc:
        print(f"cpift: config error: {exc}", file=sys.stderr)
        return 2
    return 0
