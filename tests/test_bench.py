"""`cpift bench`: the harness (timer choice per device, statistics, targets, LLaMA shapes), the CLI,
and one whole `cpift bench --size quick` run (within 3 minutes, every op's records complete)."""

import json
import math
import os
import resource
import subprocess
import sys
import time

import pytest
import torch

from cpift_fast import benchmarks
from cpift_fast.benchmarks import harness
from cpift_fast.cli import main


def test_timer_is_chosen_by_device():
    assert harness.timer_name("cpu") == "torch.utils.benchmark"
    assert harness.timer_name(torch.device("cuda", 0)) == "triton.testing.do_bench"


def test_cuda_samples_come_from_do_bench_in_seconds(monkeypatch):
    """The GPU branch without a GPU: samples() on a CUDA device goes to triton's do_bench (all
    per-call times, milliseconds) and returns seconds; the CPU timer is not touched."""
    import triton.testing

    calls = []

    def fake_do_bench(fn, warmup, rep, return_mode):
        calls.append((fn, warmup, rep, return_mode))
        return [2.0, 4.0, 3.0]

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    monkeypatch.setattr(harness, "_samples_cpu", lambda fn, t: pytest.fail("CPU timer used for a CUDA device"))
    fn = lambda: None  # noqa: E731
    assert harness.samples(fn, torch.device("cuda"), 0.2) == [0.002, 0.004, 0.003]
    assert calls == [(fn, 50, 200, "all")]


def test_cpu_samples_come_from_blocked_autorange_with_all_threads(monkeypatch):
    import torch.utils.benchmark as tub

    seen = {}
    real = tub.Timer

    class SpyTimer(real):
        def __init__(self, *args, **kwargs):
            seen.update(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(tub, "Timer", SpyTimer)
    calls = []
    times = harness.samples(lambda: calls.append(1), "cpu", 0.01)
    assert times and all(t > 0 for t in times) and calls
    assert seen["num_threads"] == torch.get_num_threads()


def test_stats_median_quartiles_range():
    s = harness.Stats.of([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s.median, s.q1, s.q3, s.min, s.max, s.n) == (3.0, 2.0, 4.0, 1.0, 5.0, 5)
    assert harness.Stats.of([7.0]).q1 == 7.0
    with pytest.raises(ValueError, match="no timing samples"):
        harness.Stats.of([])


def test_interleaved_rounds_and_per_path_limit(monkeypatch):
    order = []
    monkeypatch.setattr(harness, "samples", lambda fn, device, t: [fn()])
    stats = harness.measure_interleaved({"a": lambda: order.append("a") or 1.0,
                                         "b": lambda: order.append("b") or 2.0},
                                        "cpu", harness.Budget(rounds=3, min_run_time=0.1), {"b": 1})
    assert order == ["a", "b", "a", "a"]
    assert (stats["a"].n, stats["b"].n) == (3, 1)


def test_target_met_is_computed():
    assert harness.target("x", 1.05, "<= 1.10")["met"] is True
    assert harness.target("x", 4.9, ">= 5")["met"] is False
    with pytest.raises(ValueError, match="goal"):
        harness.target("x", 1.0, "< 2")


def test_path_forces_and_restores_the_backend(monkeypatch):
    monkeypatch.setenv("CPIFT_BACKEND", "cpp")
    seen = []
    harness.Path(lambda: seen.append(os.environ.get("CPIFT_BACKEND")), "reference", 1.0, backend="torch").call()()
    assert seen == ["torch"] and os.environ["CPIFT_BACKEND"] == "cpp"
    with pytest.raises(ValueError, match="role"):
        harness.Path(lambda: None, "other", 1.0)


def test_llama_shapes_keep_the_7b_proportions():
    shapes = dict(harness.llama_shapes(10**8))
    assert len(shapes) == 3 + 32 * 9
    total = sum(math.prod(s) for s in shapes.values())
    h = shapes["model.norm.weight"][0]
    assert total <= 10**8 < total * 1.1 and h % 16 == 0
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (h, h)
    inter, _ = shapes["model.layers.31.mlp.gate_proj.weight"]
    assert shapes["model.layers.31.mlp.down_proj.weight"] == (h, inter)
    assert abs(inter / h - 11008 / 4096) < 0.1 and abs(shapes["lm_head.weight"][0] / h - 32000 / 4096) < 0.1
    with pytest.raises(ValueError, match="too few"):
        harness.llama_shapes(1000)


@pytest.fixture(scope="module")
def readme_tool():
    """tools/readme_bench.py, loaded by path (tools/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("readme_bench", os.path.join(harness.ROOT, "tools",
                                                                               "readme_bench.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_readme_tool_knows_every_op(readme_tool):
    assert readme_tool.OPS == benchmarks.OPS and readme_tool.SCHEMA == harness.SCHEMA


def test_readme_block_is_generated_from_the_committed_records(readme_tool):
    """README.md's performance tables are exactly what tools/readme_bench.py makes of
    bench/results/<op>.json (and cpu-<capability>/<op>.json), and every op has its records there."""
    results = readme_tool.load_results()
    assert [r["op"] for r in results if r["label"] == r["op"]] == list(benchmarks.OPS)
    assert all(r["label"] == f"{r['op']} @ {r['meta']['cpift_cpu_capability']}" for r in results if r["label"] != r["op"])
    with open(readme_tool.README) as f:
        text = f.read()
    assert readme_tool.replace_block(text, readme_tool.render(results)) == text, \
        "README.md's benchmark block is out of date: run python tools/readme_bench.py"


def test_readme_block_markers_are_required(readme_tool):
    with pytest.raises(ValueError, match="exactly one"):
        readme_tool.replace_block("no markers here", "table")
    assert readme_tool.replace_block(f"a\n{readme_tool.BEGIN}\nold\n{readme_tool.END}\nb", "new") == \
        f"a\n{readme_tool.BEGIN}\nnew\n{readme_tool.END}\nb"


def test_cli_rejects_an_unknown_op(capsys):
    assert main(["bench", "adamw", "sort"]) == 2
    assert "unknown op 'sort'; the ops are: mask, adamw, select, overlap, fuse, importance" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU; this machine has one")
def test_cli_refuses_cuda_without_a_gpu(capsys):
    assert main(["bench", "mask", "--device", "cuda"]) == 2
    assert "--device cuda: torch sees no CUDA GPU here" in capsys.readouterr().err


def check_records(data: dict, op: str) -> None:
    """One op's JSON: the schema, every case and path of its quick specs, finite numbers, copy bandwidth."""
    assert data["schema"] == harness.SCHEMA and data["op"] == op and data["size"] == "quick"
    meta = data["meta"]
    for key in ("date", "device", "device_type", "cpu_capability", "cpift_cpu_capability", "cpu_threads", "timer",
                "copy_gbps", "wall_s", "load_average_1m", "load_average_1m_start"):
        assert key in meta, key
    assert meta["timer"] == "torch.utils.benchmark"
    assert meta["versions"]["torch"] == torch.__version__ and meta["versions"]["cpift_fast"]
    copy = [r for r in data["records"] if r["role"] == "copy"]
    assert len(copy) == 1 and copy[0]["gbps"] == meta["copy_gbps"] > 0
    for spec in benchmarks.load(op).specs("quick"):
        got = [r["path"] for r in data["records"] if r["case"] == spec["case"]]
        assert got == list(spec["paths"]), (spec["case"], got)
    for r in data["records"]:
        for key in ("median_s", "q1_s", "q3_s", "min_s", "max_s", "gbps", "pct_copy_bw", "ratio"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["case"], r["path"], key, r[key])
        assert r["min_s"] <= r["q1_s"] <= r["median_s"] <= r["q3_s"] <= r["max_s"] and r["samples"] >= 1
        assert r["role"] in harness.ROLES and r["baseline"] in {x["path"] for x in data["records"]
                                                                 if x["case"] == r["case"]}
        assert math.isclose(r["pct_copy_bw"], 100 * r["gbps"] / meta["copy_gbps"])
    for t in data["targets"]:
        assert math.isfinite(t["value"]) and isinstance(t["met"], bool)
    assert all(s["reason"] for s in data["skipped"])


@pytest.mark.slow
def test_quick_suite_within_three_minutes(tmp_path):
    """The whole `cpift bench --size quick`, as a user runs it: at most 3 minutes on 2 cores, and
    for every op the JSON records (checked), the Markdown table and the PNG chart.

    The bound is on the CPU time (user + sys) of the run, not its wall time: on 2 cores of its own
    the run's wall time is at most its CPU time (some thread of it is always running, bar a second
    of disk reads), and on a shared machine the wall time measures the other work as well."""
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cpift_fast.cli", "bench", "--size", "quick", "--device", "cpu",
                           "--out", str(tmp_path)], capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert cpu <= 180, (f"cpift bench --size quick used {cpu:.0f} s of CPU (limit 180 s); wall {wall:.0f} s, "
                        f"load {load:.1f} at the start")
    for op in benchmarks.OPS:
        check_records(json.loads((tmp_path / f"{op}.json").read_text()), op)
        assert (tmp_path / f"{op}.md").read_text().startswith(f"# {op}\n")
        assert (tmp_path / f"{op}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{op}{ext}" for op in benchmarks.OPS
                                                                for ext in (".json", ".md", ".png"))
