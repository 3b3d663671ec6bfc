#!/usr/bin/env python3
"""Generate README.md's performance tables from the committed benchmark records.

The block between ``<!-- bench:begin -->`` and ``<!-- bench:end -->`` in README.md is this script's
output for ``bench/results/<op>.json`` (written by ``cpift bench``), never typed by hand:

    python tools/readme_bench.py            # rewrite the block from the records
    python tools/readme_bench.py --check    # exit 1 when the block differs from what the records give

tests/test_readme_bench.py runs the check. Tables: the runs (size, date, device, load average,
versions, copy bandwidth), then per headline case the cpift_fast paths, the pure-PyTorch path and the outside
anchors and floors (median, ratio to the case's baseline), then every target with its measured
value, and the paths a run skipped with the reason.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
README = os.path.join(ROOT, "README.md")
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
OPS = ("mask", "adamw", "select", "overlap", "fuse", "importance")  # cpift_fast.benchmarks.OPS (tested)
SCHEMA = "cpift-bench/1"


def load_results(directory: str = RESULTS) -> list[dict]:
    """The records of every op that has a ``<op>.json`` in `directory`, in OPS order, then those of
    the runs at a lower CPU capability (``cpu-<capability>/<op>.json``: ``ATEN_CPU_CAPABILITY=<capability>
    cpift bench OP --out bench/results/cpu-<capability>``), labelled ``op @ capability``."""
    results = []
    subdirs = sorted(d for d in os.listdir(directory) if d.startswith("cpu-")
                     and os.path.isdir(os.path.join(directory, d))) if os.path.isdir(directory) else []
    for sub in ["", *subdirs]:
        for op in OPS:
            path = os.path.join(directory, sub, f"{op}.json")
            if os.path.exists(path):
                with open(path) as f:
                    data = json.load(f)
                if data.get("schema") != SCHEMA:
                    raise ValueError(f"{path}: schema {data.get('schema')!r}, expected {SCHEMA!r} (re-run cpift bench)")
                data["label"] = f"{op} @ {sub[len('cpu-'):]}" if sub else op
                results.append(data)
    return results


def _num(v: float) -> str:
    if not math.isfinite(v):
        return str(v)
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def _time(seconds: float) -> str:
    return f"{_num(seconds)} s" if seconds >= 1 else f"{_num(1e3 * seconds)} ms"


def _path_cell(r: dict, with_bw: bool) -> str:
    text = f"{r['path']}: {_time(r['median_s'])}"
    if with_bw:
        text += f" (IQR {_time(r['q3_s'] - r['q1_s'])}), {_num(r['gbps'])} GB/s = {r['pct_copy_bw']:.0f} % copy"
    text += " (baseline)" if r["path"] == r["baseline"] else f", **{r['ratio']:.2f}×**"
    return text


def render(results: list[dict]) -> str:
    """The README block (without the markers) for the loaded results."""
    if not results:
        raise ValueError("no benchmark records (run `cpift bench --size full`)")
    lines = ["| op | size | date | device | CPU capability (torch / cpift_fast) | threads | load (1 min, start → end) "
             "| torch | copy bandwidth | run time |", "|---|---|---|---|---|---|---:|---|---:|---:|"]
    for res in results:
        m = res["meta"]
        start = f"{m['load_average_1m_start']:.1f} → " if "load_average_1m_start" in m else ""
        lines.append(f"| {res['label']} | {res['size']} | {m['date']} | {m['device']} | {m['cpu_capability']} / "
                     f"{m.get('cpift_cpu_capability') or '?'} | {m['cpu_threads']} | {start}{m['load_average_1m']:.1f} | "
                     f"{m['versions']['torch']} | {m['copy_gbps']:.1f} GB/s | {m['wall_s']:.0f} s |")
    lines += ["", "Per case: median time per call, and **time / the baseline path's** (below 1: faster than "
              "the baseline). Anchors are what users run without cpift_fast; floors are memory-traffic floors for "
              "the same bytes.", "",
              "| op | case | cpift_fast | pure-PyTorch path | outside anchors and floors |", "|---|---|---|---|---|"]
    for res in results:
        for case in dict.fromkeys(r["case"] for r in res["records"] if r["role"] != "copy"):
            recs = [r for r in res["records"] if r["case"] == case]
            if not recs[0]["params"].get("headline"):
                continue
            ours = "; ".join(_path_cell(r, True) for r in recs if r["role"] == "fused")
            ref = "; ".join(_path_cell(r, False) for r in recs if r["role"] == "reference")
            other = "; ".join(_path_cell(r, False) for r in recs if r["role"] in ("anchor", "floor"))
            lines.append(f"| {res['label']} | {case} | {ours} | {ref} | {other} |")
    lines += ["", "| op | target | measured | goal | |", "|---|---|---:|---|---|"]
    for res in results:
        for t in res["targets"]:
            lines.append(f"| {res['label']} | {t['name']} | {_num(t['value'])} | {t['goal']} | "
                         f"{'met' if t['met'] else '**missed**'} |")
    skipped = [f"{res['label']}: {s['path']} ({s['reason']})" for res in results for s in res["skipped"]]
    if skipped:
        lines += ["", "Skipped: " + "; ".join(skipped) + "."]
    return "\n".join(lines)


def replace_block(text: str, block: str) -> str:
    """`text` with the part between the markers replaced by `block` (markers kept, one each)."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"README.md must hold exactly one {BEGIN} ... {END} block")
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    return f"{head}{BEGIN}\n{block}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--check", action="store_true", help="exit 1 when README.md's block is out of date")
    parser.add_argument("--results", default=RESULTS, help="directory of <op>.json (default bench/results)")
    parser.add_argument("--readme", default=README)
    args = parser.parse_args(argv)
    with open(args.readme) as f:
        text = f.read()
    new = replace_block(text, render(load_results(args.results)))
    if args.check:
        if new != text:
            print(f"{args.readme}: the benchmark block differs from {args.results}; run python tools/readme_bench.py",
                  file=sys.stderr)
            return 1
        return 0
    if new != text:
        with open(args.readme, "w") as f:
            f.write(new)
        print(f"{args.readme}: benchmark block rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
