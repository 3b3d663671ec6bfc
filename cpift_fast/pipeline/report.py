"""The run report: ``runs/NAME/report.md`` with PNG figures, and a one-screen summary.

Contents: the results table (methods × tasks, like the paper's Table 1; mean ± std over seeds;
"Avg 0–10" = 10 × the normalized task scores averaged over tasks, each task's normalization
stated), the seesaw measurement (joint Full SFT against each task's single-task probe), the
consolidation modes (Table 3), the groups and the core-overlap heatmap, the core share per layer,
loss curves per stage, the forgetting table (Table 2: A→B and B→A, drop on A and gain on B per
method), EPI's mask drift (from the drift.json of its training stage: Jaccard of each task's mask
with the previous and with the first one per refresh, protected / released counts), and the time
spent per stage.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections import defaultdict

from ..io import honour_umask
from .config import EPI_METHODS, Config
from .methods import CONSOLIDATION_LABELS, FORGETTING_LABELS, LABELS, METHODS


def _row_order(results: dict) -> list[str]:
    """base, probe, then the methods (registry order; unknown keys last)."""
    methods = list(results.get("methods") or METHODS)
    return ["base", "probe"] + [m for m in METHODS if m in methods] + [m for m in methods if m not in METHODS]


def _mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, s


def _fmt(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    m, s = _mean_std([v * scale for v in values])
    return f"{m:.{digits}f} ± {s:.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"


def results_rows(results: dict) -> list[tuple[str, dict[str, list[float]], list[float]]]:
    """[(row key, {task: [score per seed]}, [avg 0-10 per seed])] in display order."""
    names = results["tasks"]
    seeds = results["seeds"]
    rows = []
    for key in _row_order(results):
        if not all(key in per["scores"] for per in seeds.values()):
            continue
        per_task = {n: [per["scores"][key][n] for per in seeds.values()] for n in names}
        avg = [10.0 * sum(per["scores"][key][n] for n in names) / len(names) for per in seeds.values()]
        rows.append((key, per_task, avg))
    return rows


def results_table(results: dict) -> str:
    names = results["tasks"]
    lines = ["| method | " + " | ".join(names) + " | Avg (0–10) |",
             "|---|" + "---:|" * (len(names) + 1)]
    rows = results_rows(results)
    best = max((_mean_std(avg)[0] for key, _, avg in rows if key not in ("base", "probe")), default=None)
    for key, per_task, avg in rows:
        cells = [_fmt(per_task[n]) for n in names]
        avg_cell = _fmt(avg, scale=1.0, digits=2)
        if best is not None and key not in ("base", "probe") and abs(_mean_std(avg)[0] - best) < 1e-12:
            avg_cell = f"**{avg_cell}**"
        lines.append(f"| {LABELS.get(key, key)} | " + " | ".join(cells) + f" | {avg_cell} |")
    return "\n".join(lines)


def _averages(results: dict) -> dict[str, float]:
    """{method: mean over seeds of its Avg (0-10)} (base and probe left out)."""
    return {key: _mean_std(avg)[0] for key, _, avg in results_rows(results) if key not in ("base", "probe")}


def verdict(results: dict) -> str | None:
    """One line: CPI-FT's average next to the best baseline's (mean over seeds, 0-10 scale; the EPI
    methods are compared in epi_verdict, not counted as baselines)."""
    avgs = {k: v for k, v in _averages(results).items() if k not in EPI_METHODS}
    if "cpift" not in avgs or len(avgs) < 2:
        return None
    best = max((k for k in avgs if k != "cpift"), key=avgs.get)
    diff = avgs["cpift"] - avgs[best]
    word = "above" if diff > 0 else "below" if diff < 0 else "level with"
    return (f"CPI-FT averages {avgs['cpift']:.2f}/10, {abs(diff):.2f} {word} the best baseline here, "
            f"{LABELS.get(best, best)} ({avgs[best]:.2f}/10).")


def epi_verdict(results: dict) -> str | None:
    """One line: EPI's average, its static-mask ablation's and CPI-FT's / Full SFT's where they ran."""
    avgs = _averages(results)
    if not any(m in avgs for m in EPI_METHODS):
        return None
    parts = [f"{LABELS[m]} averages {avgs[m]:.2f}/10" for m in EPI_METHODS if m in avgs]
    if all(m in avgs for m in EPI_METHODS):
        parts.append(f"evolving − static: {avgs['epi'] - avgs['epi_static']:+.2f}")
    others = [f"{LABELS[m]} {avgs[m]:.2f}/10" for m in ("cpift", "full_sft") if m in avgs]
    return "; ".join(parts) + (f" (for reference: {', '.join(others)})." if others else ".")


def read_drift(root: str, seed: int) -> dict[str, dict]:
    """{method: its drift.json} for the EPI methods that ran for `seed`."""
    out = {}
    for m in EPI_METHODS:
        path = os.path.join(root, f"seed{seed}", m, "train", "drift.json")
        if os.path.exists(path):
            with open(path) as f:
                out[m] = json.load(f)
    return out


def drift_table(drift: dict) -> str:
    """Per refresh (rows) and task (columns): protected / released (added) of one drift.json."""
    tasks = list(dict.fromkeys(r["task"] for r in drift["log"]))
    by_step = defaultdict(dict)
    for r in drift["log"]:
        by_step[r["step"]][r["task"]] = r
    lines = ["| step | " + " | ".join(tasks) + " | J prev (mean) |", "|---:|" + "---:|" * (len(tasks) + 1)]
    for k, (step, recs) in enumerate(sorted(by_step.items())):
        cells = [f"{recs[t]['protected']} / {recs[t]['released']} (+{recs[t]['added']})" for t in tasks]
        jprev = f"{sum(recs[t]['jaccard_prev'] for t in tasks) / len(tasks):.3f}" if k else "–"  # no previous mask
        lines.append(f"| {step} | " + " | ".join(cells) + f" | {jprev} |")
    return "\n".join(lines)


def seesaw(results: dict) -> dict | None:
    """{task: [Full SFT − probe per seed]} (normalized score, 0–1): negative = joint training lost
    against training the task alone."""
    seeds = results["seeds"].values()
    if not all("full_sft" in per["scores"] and "probe" in per["scores"] for per in seeds):
        return None
    return {n: [per["scores"]["full_sft"][n] - per["scores"]["probe"][n] for per in seeds] for n in results["tasks"]}


def seesaw_lines(results: dict) -> list[str]:
    gaps = seesaw(results)
    if gaps is None:
        return []
    means = {n: round(100 * _mean_std(g)[0], 6) + 0.0 for n, g in gaps.items()}  # + 0.0: no "-0.0"
    below = [n for n, m in means.items() if m < 0]
    cells = ", ".join(f"{n} {m:+.1f}" for n, m in means.items())
    verdict_ = (f"{len(below)} of {len(gaps)} task(s) score below their single-task probe under joint Full SFT "
                f"({', '.join(below)}): the seesaw is measurable here." if below else
                "no task scores below its single-task probe under joint Full SFT: no seesaw on this suite at this budget.")
    return [f"Seesaw (Full SFT − single-task probe, points, mean over seeds): {cells}.", verdict_]


def consolidation_table(results: dict) -> str | None:
    """Table 3: CPI-FT's final scores under both consolidation modes."""
    seeds = list(results["seeds"].values())
    if not all(per.get("consolidation") for per in seeds):
        return None
    names = results["tasks"]
    lines = ["| consolidation | " + " | ".join(names) + " | Avg (0–10) |", "|---|" + "---:|" * (len(names) + 1)]
    for mode in seeds[0]["consolidation"]:
        per_task = {n: [per["consolidation"][mode][n] for per in seeds] for n in names}
        avg = [10.0 * sum(per["consolidation"][mode][n] for n in names) / len(names) for per in seeds]
        lines.append(f"| {CONSOLIDATION_LABELS.get(mode, mode)} | " + " | ".join(_fmt(per_task[n]) for n in names)
                     + f" | {_fmt(avg, scale=1.0, digits=2)} |")
    return "\n".join(lines)


def forgetting_table(results: dict) -> str | None:
    """Table 2: per direction A → B and method, A before/after (drop) and B before/after (gain)."""
    rows = defaultdict(lambda: defaultdict(list))
    for per in results["seeds"].values():
        for direction, f in per["forgetting"].items():
            for method, after in f["methods"].items():
                r = rows[(direction, method)]
                r["first"], r["second"] = f["first"], f["second"]
                r["before"].append(f["before"])
                r["after"].append(after[f["first"]])
                r["second_before"].append(f["second_before"])
                r["second_after"].append(after[f["second"]])
                r["second_probe"].append(f["second_probe"])
    if not rows:
        return None
    lines = ["| A → B | method | A before | A after | drop on A | B before | B after | gain on B | B alone (probe) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for (direction, method), r in rows.items():
        drop = [b - a for b, a in zip(r["before"], r["after"])]
        gain = [a - b for b, a in zip(r["second_before"], r["second_after"])]
        lines.append(f"| {r['first']} → {r['second']} | {FORGETTING_LABELS.get(method, method)} | {_fmt(r['before'])} | "
                     f"{_fmt(r['after'])} | {_fmt(drop)} | {_fmt(r['second_before'])} | {_fmt(r['second_after'])} | "
                     f"{_fmt(gain)} | {_fmt(r['second_probe'])} |")
    return "\n".join(lines)


def metric_lines(results: dict) -> list[str]:
    """One line per task: the metric used and its normalization to 0–10 (from the first seed's evals)."""
    per = next(iter(results["seeds"].values()))
    info = next((v for v in per.get("eval", {}).values() if v), None)
    if not info:
        return []
    out = []
    for n in results["tasks"]:
        i = info.get(n) or {}
        extra = ", ".join(f"{k} {100 * v:.1f}" if isinstance(v, float) and k != "judge_mean" else f"{k} {v}"
                          for k, v in (i.get("metrics") or {}).items())
        out.append(f"- {n}: {i.get('metric')}; normalized to 0–10 as {i.get('normalization')}"
                   + (f" (first method: {extra})" if extra else ""))
    return out


def _layer_label(layer: str) -> str:
    parts = layer.rsplit(".", 1)
    return f"layer {parts[1]}" if len(parts) == 2 and parts[1].isdigit() else layer


def core_share_per_layer(core_stats: dict) -> dict[str, dict[str, float]]:
    """{task: {layer: share of the task's core lying in that layer}} (rows of select.layer_breakdown)."""
    out = {}
    for task, s in core_stats.items():
        total = max(1, sum(count for _, _, count in s["per_layer"]))
        out[task] = {}
        for layer, _, count in s["per_layer"]:
            label = _layer_label(str(layer))
            out[task][label] = out[task].get(label, 0.0) + count / total
    return out


def _savefig(fig, path: str) -> None:
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=directory)
    os.close(fd)
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    honour_umask(tmp)
    os.replace(tmp, path)


def _plots(results: dict, root: str, seed: int) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = {}
    sroot = os.path.join(root, f"seed{seed}")
    # results bar chart
    rows = results_rows(results)
    names = results["tasks"]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(names), 3.4))
    width = 0.8 / max(1, len(rows))
    for i, (key, per_task, _) in enumerate(rows):
        means = [_mean_std(per_task[n])[0] * 100 for n in names]
        errs = [_mean_std(per_task[n])[1] * 100 for n in names]
        ax.bar([j + i * width for j in range(len(names))], means, width, yerr=errs, capsize=2,
               error_kw={"elinewidth": 0.8}, label=LABELS.get(key, key))
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names)
    ax.set_ylabel("normalized score (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)
    ax.set_title("Per-task results")
    _savefig(fig, os.path.join(root, "results.png"))
    plt.close(fig)
    made["results"] = "results.png"
    # overlap heatmap with groups (drawn by the group stage)
    overlap = os.path.join(sroot, "group", "overlap.png")
    if os.path.exists(overlap):
        made["overlap"] = os.path.relpath(overlap, root)
    # core share per layer
    stats_path = os.path.join(sroot, "core", "core_stats.json")
    if os.path.exists(stats_path):
        with open(stats_path) as f:
            share = core_share_per_layer(json.load(f))
        first = next(iter(share.values()))
        layers = list(first) + sorted({l for s in share.values() for l in s} - set(first))
        fig, ax = plt.subplots(figsize=(1.5 + 0.9 * len(layers), 3.2))
        width = 0.8 / max(1, len(share))
        for i, (task, s) in enumerate(share.items()):
            ax.bar([j + i * width for j in range(len(layers))], [100 * s.get(l, 0) for l in layers], width, label=task)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(layers))], layers, rotation=20)
        ax.set_ylabel("share of the core region (%)")
        ax.set_title("Where each task's core lies")
        ax.legend(fontsize=7)
        _savefig(fig, os.path.join(root, "core_share.png"))
        plt.close(fig)
        made["core_share"] = "core_share.png"
    # EPI: mask drift per task (Jaccard with the previous / the first mask), released per refresh
    drift = read_drift(root, seed).get("epi")
    if drift and drift["log"]:
        tasks = list(dict.fromkeys(r["task"] for r in drift["log"]))
        fig, axes = plt.subplots(1, 3, figsize=(11, 3.0))
        for t in tasks:
            recs = [r for r in drift["log"] if r["task"] == t]
            steps = [r["step"] for r in recs]
            axes[0].plot(steps[1:], [r["jaccard_prev"] for r in recs[1:]], marker="o", ms=3, label=t)  # 1st: no previous
            axes[1].plot(steps, [r["jaccard_first"] for r in recs], marker="o", ms=3, label=t)  # None (no mask yet): a gap
            axes[2].plot(steps, [r["released"] for r in recs], marker="o", ms=3, label=f"{t} released")
            axes[2].plot(steps, [r["protected"] for r in recs], ls=":", color=axes[2].lines[-1].get_color(),
                         label=f"{t} protected")
        for ax, title in zip(axes, ("Jaccard with the previous mask", "Jaccard with the first mask",
                                    "elements per task mask")):
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("optimizer step (refresh)")
        axes[0].set_ylim(-0.02, 1.02)
        axes[1].set_ylim(-0.02, 1.02)
        axes[0].legend(fontsize=6)
        axes[2].legend(fontsize=5, ncol=2)
        _savefig(fig, os.path.join(root, "epi_drift.png"))
        plt.close(fig)
        made["epi_drift"] = "epi_drift.png"
    # loss curves per stage
    curves = _loss_curves(root, sroot)
    if curves:
        fig, axes = plt.subplots(1, len(curves), figsize=(3.2 * len(curves), 2.8), squeeze=False)
        for ax, (title, stages) in zip(axes[0], curves.items()):
            offset = 0
            for label, points in stages:
                if not points:
                    continue
                ax.plot([offset + s for s, _ in points], [v for _, v in points], label=label)
                offset += points[-1][0]
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("step")
            ax.legend(fontsize=6)
        axes[0][0].set_ylabel("training loss (responses)")
        _savefig(fig, os.path.join(root, "loss_curves.png"))
        plt.close(fig)
        made["loss_curves"] = "loss_curves.png"
    return made


def _read_loss(path: str):
    try:
        with open(os.path.join(path, "loss.json")) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def _loss_curves(root: str, sroot: str) -> dict[str, list]:
    curves = {}
    base = _read_loss(os.path.join(root, "base"))
    if base:
        curves["base (pretraining)"] = [("pretrain", base)]
    probe_dir = os.path.join(sroot, "probe")
    if os.path.isdir(probe_dir):
        curves["probes"] = [(t, _read_loss(os.path.join(probe_dir, t))) for t in sorted(os.listdir(probe_dir))
                            if not t.startswith(".")]
    for method in METHODS:
        mdir = os.path.join(sroot, method)
        if not os.path.isdir(mdir):
            continue
        stages = sorted((d for d in os.listdir(mdir) if not d.startswith(".")),
                        key=lambda d: (d.startswith("consolidate"), d == "fuse", d))
        points = [(d, _read_loss(os.path.join(mdir, d))) for d in stages]
        points = [(d, p) for d, p in points if p]
        if points:
            curves[LABELS.get(method, method)] = points
    return curves


def _tiny_on_real_data_note(cfg: Config) -> list[str]:
    """What the built-in tiny model can and cannot show on real data (said plainly in the report)."""
    if cfg["model"]["source"] != "tiny" or all(t.kind == "synthetic" for t in cfg.tasks):
        return []
    return ["", "**What this run can and cannot show.** The model is the built-in tiny Llama (byte-level, trained "
            "for seconds on a CPU). The run exercises every loader, prompt format, metric, stage and the report on "
            "real text, but such a model cannot solve math word problems, write code, reason over passages or "
            "chat: its scores sit near the floor, and differences between methods here are noise, not evidence "
            "about CPI-FT. Use a real pretrained model (e.g. configs/paper-llama2-7b.yaml) for that.", ""]


def _epi_section(cfg: Config, results: dict, root: str, seed: int, plots: dict) -> list[str]:
    """The report's EPI section (settings, drift plot and table of `seed`), or nothing without EPI."""
    drift = read_drift(root, seed)
    if not drift:
        return []
    e = cfg["epi"]
    out = ["## EPI: importance drift", "",
           f"Settings: mask ratio {e['ratio']}, refresh every {e['interval']} steps from step {e['warmup']} (static "
           f"ablation: once per task, at step {e['warmup']} or when it first has importance), EMA β = {e['beta']}, "
           f"signal {e['signal']}, state {e['state_dtype']}, normalization {e['normalize']} (docs/epi.md). Seed {seed}."]
    for m, d in drift.items():
        refreshes = sorted({r["step"] for r in d["log"]})
        out.append(f"- {LABELS[m]}: {d['steps']} steps, {len(refreshes)} refresh(es), importance state "
                   f"{d['state_bytes'] / 1024:.1f} KiB")
    if "epi" in drift and drift["epi"]["log"]:
        out += ["", "Each task's mask per refresh: protected (|M_t|) / released (left M_t since the previous "
                "refresh) and (+added); the last column is the mean Jaccard with the previous mask over the tasks. "
                "A task without steps before a refresh has an empty mask there (Jaccard 0).", "",
                drift_table(drift["epi"]), ""]
    if "epi_drift" in plots:
        out += [f"![EPI mask drift]({plots['epi_drift']})", ""]
    if "epi_static" in drift and drift["epi_static"]["log"]:
        out += ["Static ablation, each task's mask computed once (at the warmup, or at the first refresh point "
                "after the task's first step when it had none then):", "", drift_table(drift["epi_static"]), ""]
    return out + [""]


def write_report(cfg: Config, results: dict) -> str:
    """Write report.md (+ PNGs) into the run directory; print the one-screen summary; return the path."""
    root = results["run_dir"]
    seeds = sorted(results["seeds"])
    plots = _plots(results, root, seeds[0])
    lines = [f"# CPI-FT run `{cfg.name}`", ""]
    m = cfg["model"]
    model_desc = (f"tiny Llama (hidden {m['hidden_size']}, {m['num_layers']} layers, {m['num_heads']} heads, "
                  f"MLP {m['intermediate_size']}, byte-level tokenizer)" if m["source"] == "tiny" else m["source"])
    c = cfg["cpift"]
    lines += [f"- model: {model_desc}",
              f"- tasks: {', '.join(cfg.task_names)}; seeds: {', '.join(map(str, seeds))}",
              f"- budget: SFT {cfg['train']['epochs']} epoch(s) per task for every method, probes "
              f"{cfg['probe']['epochs']} epoch(s), consolidation {c['consolidate']['epochs']} epoch(s) on "
              f"{100 * float(c['consolidate']['ratio']):.0f}% of each task's data (cores frozen: {c['consolidate']['freeze']})",
              f"- CPI-FT: p = {c['p']}, τ = {c['tau']}, stage order {c['order']}, SLERP t = {c['t']}, "
              f"overlap rule {c['overlap_rule']}",
              f"- wall time of this invocation: {results['seconds']:.0f} s; all stages of the run, as first "
              f"computed: {results.get('stage_seconds', 0.0):.0f} s", "",
              *_tiny_on_real_data_note(cfg),
              "## Results", "",
              "Normalized score (%) per task on held-out test sets; mean ± std over seeds. Avg (0–10) = 10 × the "
              "mean normalized task score. The single-task probe row is a reference (one model per task), not a "
              "method.", "",
              results_table(results), ""]
    for line in (verdict(results), epi_verdict(results)):
        if line:
            lines += [line, ""]
    mlines = metric_lines(results)
    if mlines:
        lines += ["Metrics and their normalization:", ""] + mlines + [""]
    sl = seesaw_lines(results)
    if sl:
        lines += ["## Seesaw", ""] + [f"{x}" for x in sl] + [""]
    ct = consolidation_table(results)
    if ct:
        lines += ["## Consolidation modes (paper Table 3)", "",
                  "CPI-FT's final model with the consolidation run as one stage per group (in stage order) or as "
                  "one stage on the mixed sample; everything before consolidation is shared.", "", ct, ""]
    if "results" in plots:
        lines += [f"![results]({plots['results']})", ""]
    lines += ["## Core regions, overlap and groups", ""]
    for seed in seeds:
        gpath = os.path.join(root, f"seed{seed}", "group", "group.json")
        if os.path.exists(gpath):
            with open(gpath) as f:
                g = json.load(f)
            order = " → ".join("{" + ", ".join(x) + "}" for x in g["order"])
            lines.append(f"- seed {seed}: groups (J ≥ {g['tau']}): {g['groups']}; stage order: {order}")
            if seed == seeds[0]:
                names = g["names"]
                lines += ["", "| J | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
                lines += [f"| {a} | " + " | ".join(f"{v:.3f}" for v in row) + " |" for a, row in zip(names, g["jaccard"])]
                lines.append("")
    for key, title in (("overlap", "Jaccard overlap of the core regions, groups outlined"),
                       ("core_share", "Core share per layer")):
        if key in plots:
            lines += ["", f"![{title}]({plots[key]})", ""]
    ft = forgetting_table(results)
    if ft:
        lines += ["## Forgetting (paper Table 2)", "",
                  "Start from the model trained on A (probe A) and add B with the probe budget, by each method: "
                  "Full SFT trains every parameter on B; Multi-Stage trains on B with A's core frozen; CPI-FT adds "
                  "fusion with both probes and the consolidation (cores frozen). Drop on A = A before − A after; "
                  "gain on B = B after − B before (B on the model trained on A).", "", ft, ""]
    lines += _epi_section(cfg, results, root, seeds[0], plots)
    if "loss_curves" in plots:
        lines += ["## Loss curves per stage", "", f"![loss curves]({plots['loss_curves']})", ""]
    lines += ["## Stages", "", "| stage | status | seconds |", "|---|---|---:|"]
    lines += [f"| {k} | {s} | {t:.1f} |" for k, s, t in results["stage_log"]]
    path = os.path.join(root, "report.md")
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".md", dir=root)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    honour_umask(tmp)
    os.replace(tmp, path)
    print(summary(cfg, results, path))
    return path


def summary(cfg: Config, results: dict, path: str) -> str:
    bar = "=" * 78
    out = [bar, f"CPI-FT run '{cfg.name}': {len(results['seeds'])} seed(s), {results['seconds']:.0f} s", "",
           results_table(results).replace("**", ""), ""]
    for line in (verdict(results), epi_verdict(results)):
        if line:
            out += [line, ""]
    out += [x for x in seesaw_lines(results)] + ([""] if seesaw_lines(results) else [])
    ct = consolidation_table(results)
    if ct:
        out += ["consolidation modes (Table 3):", ct, ""]
    ft = forgetting_table(results)
    if ft:
        out += ["forgetting (Table 2):", ft, ""]
    ran = sum(1 for _, s, _ in results["stage_log"] if s == "ran")
    cached = sum(1 for _, s, _ in results["stage_log"] if s == "cached")
    out += [f"stages: {ran} ran, {cached} reused from an earlier run", f"report: {path}", bar]
    return "\n".join(out)
