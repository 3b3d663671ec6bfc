"""Run every benchmark in cpift_fast/benchmarks/ one after the other (each in its own process, so none disturbs
another's memory or threads). Results land in bench/results/.

    python bench/run_all.py            # full sizes
    python bench/run_all.py --quick    # small sizes, a smoke run
"""

import glob
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> int:
    extra = sys.argv[1:]
    failed = []
    for script in sorted(glob.glob(os.path.join(os.path.dirname(HERE), "cpift_fast", "benchmarks", "bench_*.py"))):
        name = os.path.basename(script)
        print(f"\n=== {name} {' '.join(extra)}", flush=True)
        start = time.perf_counter()
        module = "cpift_fast.benchmarks." + name[:-3]
        if subprocess.run([sys.executable, "-m", module, *extra], cwd=os.path.dirname(HERE)).returncode != 0:
            failed.append(name)
        print(f"=== {name}: {time.perf_counter() - start:.0f} s", flush=True)
    if failed:
        print("failed:", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
