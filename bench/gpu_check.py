"""`make gpu-check`: what only a CUDA machine can show, in one command.

1. the gpu-marked tests (the compiled Triton kernels against the C++ / reference results CI proves),
2. every benchmark on the GPU (`cpift bench OP --device cuda`, one process per op; records in
   bench/results/gpu/, beside the CPU records in bench/results/),
then bench/results/gpu-check.md and .json: device, torch / triton / CUDA versions, date, the test
summary and each benchmark's exit status and time. Exit status: non-zero if anything failed.

    python bench/gpu_check.py [--quick]     # --quick: the quick benchmark sizes (default: full)
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

import torch

from cpift_fast.benchmarks import OPS

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")


def _run(cmd: list[str]) -> tuple[int, float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    print(out[-6000:], flush=True)
    return proc.returncode, time.perf_counter() - start, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the quick benchmark sizes (default: full)")
    size = "quick" if parser.parse_args().quick else "full"
    if not torch.cuda.is_available():
        print("gpu-check: torch sees no CUDA GPU here; nothing to check", file=sys.stderr)
        return 2
    import triton

    meta = {"device": torch.cuda.get_device_name(0),
            "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    print(json.dumps(meta, indent=1), flush=True)
    rc, seconds, out = _run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"])
    summary = next((line for line in reversed(out.splitlines()) if " in " in line and ("passed" in line or
                                                                                      "failed" in line)), "no summary")
    records = {"meta": meta, "gpu_tests": {"exit": rc, "seconds": round(seconds, 1), "summary": summary.strip("= ")},
               "benchmarks": []}
    for op in OPS:
        code, secs, _ = _run([sys.executable, "-m", "cpift_fast.cli", "bench", op, "--size", size, "--device", "cuda",
                              "--out", os.path.join(RESULTS, "gpu")])
        records["benchmarks"].append({"op": op, "size": size, "exit": code, "seconds": round(secs, 1)})
    os.makedirs(RESULTS, exist_ok=True)
    lines = [f"# gpu-check, {meta['date']}", "",
             ", ".join(f"{k}: {v}" for k, v in meta.items() if k != "date"), "",
             f"gpu-marked tests: {records['gpu_tests']['summary']} (exit {rc})", "",
             "| benchmark (bench/results/gpu/) | size | exit | seconds |", "|---|---|---|---|"]
    lines += [f"| {b['op']} | {b['size']} | {b['exit']} | {b['seconds']} |" for b in records["benchmarks"]]
    for suffix, text in ((".json", json.dumps(records, indent=1)), (".md", "\n".join(lines) + "\n")):
        path = os.path.join(RESULTS, "gpu-check" + suffix)
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    print("\n".join(lines))
    return 0 if rc == 0 and all(b["exit"] == 0 for b in records["benchmarks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
