"""The `cpift` command.

    cpift info                       what was built, which backend each op uses
    cpift demo                       the built-in end-to-end demo (what `make demo` runs)
    cpift core BASE TUNED -o M       core region: exact global top-k of |tuned − base| (--plot, per layer)
    cpift run CONFIG.yaml            CPI-FT + baselines from a config; resumable (--from STAGE, --seeds N)
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
    from .pipeline.driver import demo_cli

    return demo_cli(args)


def _pipeline_args(p: argparse.ArgumentParser) -> None:
    """Options shared by `cpift run` and `cpift demo` (issue 6)."""
    p.add_argument("--runs-dir", default="runs", help="where runs/NAME/ goes (default ./runs)")
    p.add_argument("--name", help="run name (default: the config's name)")
    p.add_argument("--seeds", type=int, help="number of seeds (mean ± std in the report); default: the config's")
    p.add_argument("--from", dest="from_stage", metavar="STAGE",
                   help="re-run this stage kind and every later one: base probe core group stages fuse "
                        "consolidate forgetting eval")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (dotted key, YAML value), e.g. --set cpift.p=0.05; repeatable")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cpift", description="Core-parameter isolation fine-tuning, fast.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="what was built and which backend each op uses")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("demo", help="run the built-in end-to-end demo (tiny Llama, 4 synthetic tasks, CPU)")
    _pipeline_args(p)
    p.set_defaults(func=_cmd_demo)

    # [issue 4] cpift core
    p = sub.add_parser("core", help="core region: the top fraction of |tuned - base| (exact global top-k)")
    p.add_argument("base", help="base checkpoint: directory (sharded safetensors + index) or .safetensors file")
    p.add_argument("tuned", help="fine-tuned checkpoint, same names/shapes/dtypes as base")
    p.add_argument("--fraction", type=float, default=0.01, help="fraction of all elements to select (default 0.01)")
    p.add_argument("--mode", choices=["exact", "approx"], default="exact")
    p.add_argument("--scope", choices=["global", "per_tensor", "per_layer"], default="global")
    p.add_argument("--layer-pattern", default=None, help="regex whose first group is the layer (breakdown, per_layer)")
    p.add_argument("-o", "--output", help="write the mask here (ParamMask safetensors file)")
    p.add_argument("--plot", help="save a bar chart of the core share per layer (.png/.pdf/.svg)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=lambda args: __import__("cpift_fast.select", fromlist=["run_cli"]).run_cli(args))
    # [issue 5] cpift overlap, cpift fuse
    p = sub.add_parser("overlap", help="Jaccard overlap of task core masks, and the task groups")
    p.add_argument("masks", nargs="+", help="ParamMask files (one per task; the task name is the file stem)")
    p.add_argument("--tau", type=float, default=0.1, help="group tasks whose Jaccard >= tau (default 0.1)")
    p.add_argument("--names", help="comma-separated task names (default: the file stems)")
    p.add_argument("--order", choices=["random", "size", "min_frozen"], help="also print the stage order")
    p.add_argument("--seed", type=int, default=0, help="seed of --order random")
    p.add_argument("--plot", help="save the heatmap with the groups outlined (.png/.pdf/.svg)")
    p.add_argument("--json", dest="json_out", help="write matrix, counts and groups as JSON here")
    p.set_defaults(func=lambda args: __import__("cpift_fast.overlap", fromlist=["run_cli"]).run_cli(args))

    p = sub.add_parser("fuse", help="fuse task models into a backbone: core transplant + SLERP, streamed")
    p.add_argument("--backbone", required=True, help="backbone checkpoint (directory or .safetensors)")
    p.add_argument("--task", action="append", required=True, metavar="NAME=DIR[:MASK]",
                   help="a task model and its core mask (repeat; order = fold order and overlap order)")
    p.add_argument("--base", help="pre-trained weights θ0 (enables --space task_vector)")
    p.add_argument("-t", default="0.5", help="number, JSON anchor list '[0,0.5,1]' or JSON filters "
                   "'{\"self_attn\": 0.3, \"default\": 0.5}' (default 0.5)")
    p.add_argument("--space", choices=["weights", "task_vector"], default=None,
                   help="angle on raw weights or on θ − θ0 (default: task_vector iff --base)")
    p.add_argument("--overlap-rule", choices=["last", "first", "mean"], default="last")
    p.add_argument("--dot-threshold", type=float, default=0.9995)
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("-o", "--output", required=True, help="output checkpoint directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--stats", help="write the per-tensor stats as JSON here")
    p.add_argument("--plot", help="save a per-tensor chart of angles and transplanted shares (.png/.pdf/.svg)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=lambda args: __import__("cpift_fast.fuse", fromlist=["run_cli"]).run_cli(args))
    # [issue 6] cpift run (and the pipeline's demo replaces _cmd_demo)
    p = sub.add_parser("run", help="run (or resume) a CPI-FT pipeline + baselines from a YAML config")
    p.add_argument("config", help="YAML config (see examples/demo.yaml)")
    _pipeline_args(p)
    p.set_defaults(func=lambda args: __import__("cpift_fast.pipeline.driver", fromlist=["run_cli"]).run_cli(args))

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
