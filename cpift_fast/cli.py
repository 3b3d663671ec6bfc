"""The `cpift` command.

    cpift info                       what was built, which backend each op uses
    cpift demo                       the built-in end-to-end demo (what `make demo` runs)
"""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_info(args: argparse.Namespace) -> int:
    from . import backend_info

    print(json.dumps(backend_info(), indent=2))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import time

    import torch

    from . import ParamMask, backend_info

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.GELU(), torch.nn.Linear(2048, 512))
    print("backends:", {op: b["cpu"] for op, b in backend_info()["ops"].items()})
    bools = {n: torch.rand_like(p) < 0.01 for n, p in model.named_parameters()}
    t0 = time.perf_counter()
    mask = ParamMask.from_bool(bools)
    print(f"{mask}  (packed in {1e3 * (time.perf_counter() - t0):.1f} ms)")
    print("per tensor:", mask.count_per_tensor())
    union = mask | ParamMask.from_bool({n: torch.rand_like(p) < 0.01 for n, p in model.named_parameters()})
    print(f"union of two 1% masks: {union.count()} elements; complement: {(~union).count()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cpift", description="Core-parameter isolation fine-tuning, fast.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="what was built and which backend each op uses")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("demo", help="run the built-in end-to-end demo")
    p.set_defaults(func=_cmd_demo)

    # [issue 4] cpift core
    # [issue 5] cpift overlap, cpift fuse
    # [issue 6] cpift run (and the pipeline's demo replaces _cmd_demo)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
