"""The `cpift` command.

    cpift info                       what was built and how (compiles the extension on first use), backends
    cpift --version                  the version
    cpift demo                       the built-in end-to-end demo (what `make demo` runs)
    cpift core BASE TUNED -o M       core region: exact global top-k of |tuned − base| (--plot, per layer);
                                     core and fuse under torchrun: each process reads its share of the tensors
    cpift overlap A.mask B.mask ...  Jaccard matrix of task cores and the groups (--tau, --plot)
    cpift fuse --backbone DIR --task NAME=DIR:MASK ... -o OUT   core transplant + SLERP, streamed
    cpift run CONFIG.yaml            CPI-FT + baselines from a config; resumable (--from STAGE, --seeds N);
                                     one stage kind / task at a time: --stage KIND [--task NAME] [--seed K]
    cpift sweep CONFIG --set K=V1,V2,...   one run per value (grid over two keys), stages shared; Fig. 2 plot
    cpift plan CONFIG                memory per GPU in each stage (model config only, no weights); fits?
    cpift bench [OP ...]             benchmarks: each op vs its pure-PyTorch path and outside anchors
                                     (--size quick|full, --out DIR): JSON records, Markdown, PNG
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import sys


class UsageError(ValueError):
    """A command-line argument is wrong (exit status 2, like argparse's own errors)."""


def _cmd_info(args: argparse.Namespace) -> int:
    from . import __version__, backend_info

    # "built" says how the extension was built (prebuilt or jit, flags, CUDA archs); loading it
    # compiles it first where needed, so `cpift info` also builds ahead of time.
    print(json.dumps({"cpift_fast": __version__, **backend_info()}, indent=2))
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
    p.add_argument("--verify", choices=["fast", "full"], default="fast",
                   help="how finished stages are checked before reuse: fast = every file present with its "
                        "recorded size (default); full = also re-hash their contents")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (dotted key, YAML value), e.g. --set cpift.p=0.05; repeatable")


def _launched_group():
    """Under torchrun / accelerate launch (WORLD_SIZE > 1): the default process group (gloo, set up
    here once; the checkpoints are on the CPU) and this process's rank; else (None, 0). `cpift core`
    and `cpift fuse` then split the tensors over the processes (cpift_fast.shard) and rank 0 prints
    and writes the single-file outputs."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None, 0
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
        atexit.register(dist.destroy_process_group)
    return dist.group.WORLD, dist.get_rank()


def _cmd_core(args: argparse.Namespace) -> int:
    """`cpift core BASE TUNED`: select, print k / threshold / time / per-layer breakdown, save.
    Under torchrun each process reads and selects on its share of the tensors; rank 0 reports."""
    from .select import DEFAULT_LAYER_PATTERN, core_region, layer_breakdown, plot_core_share

    pattern = args.layer_pattern or DEFAULT_LAYER_PATTERN
    group, rank = _launched_group()
    mask = core_region(args.base, args.tuned, args.fraction, mode=args.mode, scope=args.scope,
                       layer_pattern=pattern, progress=not args.no_progress and rank == 0, group=group,
                       shard_by="tensor")
    if group is not None:
        mask = mask.gather(group)  # the full mask on rank 0
        if rank != 0:
            return 0
    info = mask.info
    thr = f"{info.threshold:.6g}" if info.threshold is not None else "n/a (scope is not global or nothing selected)"
    print(f"elements N = {info.numel}, fraction = {info.fraction}, k = {info.k}, selected = {info.selected}"
          f" ({info.nonzero} nonzero diffs), mode = {info.mode}, scope = {info.scope}")
    print(f"threshold |diff| = {thr}; time {info.seconds:.2f} s")
    if info.mode == "approx":
        print(f"approx count error bound: ±{info.error_bound} (actual {info.selected - info.k:+d})")
    if info.short_by:
        print(f"note: only {info.nonzero} elements changed; the mask is short of k by {info.short_by}")
    rows = layer_breakdown(mask, pattern)
    total = max(1, info.selected)
    print(f"{'layer':>10} {'elements':>14} {'core':>12} {'share':>8} {'density':>8}")
    for layer, n, c in rows:
        print(f"{layer:>10} {n:>14} {c:>12} {100 * c / total:>7.2f}% {100 * c / max(n, 1):>7.3f}%")
    if args.output:
        mask.save(args.output)
        print(f"mask written to {args.output}")
    if args.plot:
        plot_core_share(rows, args.plot, f"core region ({info.fraction:g}, {info.mode}, {info.scope})")
        print(f"plot written to {args.plot}")
    return 0


def _cmd_overlap(args: argparse.Namespace) -> int:
    """`cpift overlap A.mask B.mask ... --tau 0.1 [--plot overlap.png]`."""
    import os

    import torch

    from .mask import ParamMask
    from .overlap import format_matrix, group_tasks, order_stages, overlap_counts, plot_overlap

    masks = [ParamMask.load(p) for p in args.masks]
    names = args.names.split(",") if args.names else [os.path.splitext(os.path.basename(p))[0] for p in args.masks]
    if len(names) != len(masks):
        raise UsageError(f"--names gives {len(names)} names for {len(masks)} masks")
    inter, union = overlap_counts(masks)
    J = torch.where(union > 0, inter.double() / union.clamp(min=1).double(), 0.0)
    groups = group_tasks(J, args.tau, names)
    print(format_matrix(J, names))
    print("\ncore sizes: " + ", ".join(f"{n}={c}" for n, c in zip(names, inter.diagonal().tolist())))
    print(f"groups at tau = {args.tau:g}: {groups}")
    result = {"names": names, "jaccard": J.tolist(), "intersection": inter.tolist(), "union": union.tolist(),
              "tau": args.tau, "groups": groups}
    if args.order:
        stages = order_stages(groups, args.order, seed=args.seed, masks=dict(zip(names, masks)))
        print(f"stage order ({args.order}): {stages}")
        result["stages"] = stages
    if args.plot:
        print(f"plot: {plot_overlap(J, names, groups, args.plot, tau=args.tau)}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def _parse_t(text: str):
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise UsageError(f"-t must be a number or JSON (anchor list or filter dict), got {text!r}") from None


def _cmd_fuse(args: argparse.Namespace) -> int:
    """`cpift fuse --backbone DIR --task NAME=DIR:MASK ... -t 0.5 -o OUT`."""
    import os

    from .fuse import fuse_models, plot_fusion

    tasks: dict[str, str] = {}
    cores: dict[str, str] = {}
    for spec in args.task:
        name, sep, rest = spec.partition("=")
        if not sep or not name or not rest:
            raise UsageError(f"--task must be NAME=DIR[:MASK], got {spec!r}")
        if name in tasks:
            raise UsageError(f"--task {name!r} given twice")
        path, mask = rest, None
        if ":" in rest:
            head, _, tail = rest.rpartition(":")
            if tail.endswith(".mask") or os.path.isfile(tail):
                path, mask = head, tail
        tasks[name] = path
        if mask is not None:
            cores[name] = mask
    if cores and set(cores) != set(tasks):
        raise UsageError(f"give a core mask for every task or for none (masks for {sorted(cores)} only)")
    group, rank = _launched_group()  # under torchrun: each process fuses and writes its share of the tensors
    out, stats = fuse_models(args.backbone, tasks, cores or None, t=_parse_t(args.t), base=args.base,
                             overlap_rule=args.overlap_rule, out=args.output, space=args.space,
                             dot_threshold=args.dot_threshold, max_shard_size=args.max_shard_size,
                             overwrite=args.overwrite, progress=not args.no_progress and rank == 0, group=group)
    if rank != 0:
        return 0
    angles = [e["angle_deg"] for e in stats["tensors"].values() if e.get("angle_deg") == e.get("angle_deg")
              and "angle_deg" in e]
    print(f"fused {len(stats['tensors'])} tensors ({stats['elements']} elements) into {out}")
    print(f"modes: {stats['modes']}")
    print(f"transplanted {stats['transplanted']} core elements ({stats['overlapping']} in more than one core, "
          f"rule {stats['overlap_rule']!r})")
    if angles:
        print(f"angle (deg, {stats['space']}): min {min(angles):.3f}  median {sorted(angles)[len(angles) // 2]:.3f}  "
              f"max {max(angles):.3f}")
    if args.stats:
        with open(args.stats, "w") as f:
            json.dump(stats, f, indent=2, default=str)
    if args.plot:
        print(f"plot: {plot_fusion(stats, args.plot)}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from .pipeline.driver import run_cli

    return run_cli(args)


def _cmd_sweep(args: argparse.Namespace) -> int:
    from .pipeline.sweep import sweep_cli

    return sweep_cli(args)


def _cmd_plan(args: argparse.Namespace) -> int:
    """`cpift plan CONFIG`: the memory plan of plan.py, as a table or JSON."""
    from .pipeline.config import load_config, parse_override
    from .plan import format_plan, plan_for_config

    cfg = load_config(args.config, dotted=[parse_override(item) for item in args.overrides])
    try:
        shape, settings, rows = plan_for_config(
            cfg, world_size=args.world_size, sharding=args.sharding, gpu_gb=args.gpu_gb,
            state_dtype=args.state_dtype, grad_checkpointing=args.grad_checkpointing, attention=args.attention)
    except ValueError as exc:  # a bad argument or an unusable model config
        raise UsageError(str(exc)) from None
    if args.json:
        print(json.dumps({"model": {**vars(shape), "params": shape.params}, "settings": settings,
                          "stages": [r.to_dict() for r in rows]}, indent=2))
    else:
        print(format_plan(shape, settings, rows))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    """`cpift bench [OP ...] [--size quick|full] [--out DIR] [--device D]`."""
    import time

    import torch

    from . import benchmarks
    from .benchmarks.harness import RESULTS

    unknown = [op for op in args.ops if op not in benchmarks.OPS]
    if unknown:
        raise UsageError(f"unknown op {', '.join(map(repr, unknown))}; the ops are: {', '.join(benchmarks.OPS)}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: torch sees no CUDA GPU here")
    start = time.perf_counter()
    benchmarks.run(list(dict.fromkeys(args.ops)) or list(benchmarks.OPS), args.size, args.out or RESULTS, device,
                   progress=not args.no_progress)
    print(f"cpift bench --size {args.size}: {time.perf_counter() - start:.0f} s; results in {args.out or RESULTS}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__

    parser = argparse.ArgumentParser(prog="cpift", description="Core-parameter isolation fine-tuning, fast.")
    parser.add_argument("--version", action="version", version=f"cpift_fast {__version__}")
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
    p.set_defaults(func=_cmd_core)
    # [issue 5] cpift overlap, cpift fuse
    p = sub.add_parser("overlap", help="Jaccard overlap of task core masks, and the task groups")
    p.add_argument("masks", nargs="+", help="ParamMask files (one per task; the task name is the file stem)")
    p.add_argument("--tau", type=float, default=0.1, help="group tasks whose Jaccard >= tau (default 0.1)")
    p.add_argument("--names", help="comma-separated task names (default: the file stems)")
    p.add_argument("--order", choices=["random", "size", "min_frozen"], help="also print the stage order")
    p.add_argument("--seed", type=int, default=0, help="seed of --order random")
    p.add_argument("--plot", help="save the heatmap with the groups outlined (.png/.pdf/.svg)")
    p.add_argument("--json", dest="json_out", help="write matrix, counts and groups as JSON here")
    p.set_defaults(func=_cmd_overlap)

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
    p.set_defaults(func=_cmd_fuse)
    # [issue 6] cpift run (and the pipeline's demo replaces _cmd_demo)
    p = sub.add_parser("run", help="run (or resume) a CPI-FT pipeline + baselines from a YAML config")
    p.add_argument("config", help="YAML config (see examples/demo.yaml)")
    _pipeline_args(p)
    p.add_argument("--stage", metavar="KIND",
                   help="compute only the stages of this kind (cluster fan-out: one job per kind, per task): "
                        "base probe core group stages fuse consolidate forgetting eval. Its input stages must "
                        "be finished (else one error naming the missing stage and the command that makes it; "
                        "nothing upstream is computed); finished stages are reused; no report (a plain "
                        "`cpift run` afterwards reuses everything and writes it)")
    p.add_argument("--task", metavar="NAME", help="with --stage probe or core: only this task's piece")
    p.add_argument("--seed", type=int, metavar="K", help="with --stage: only seed K's stages")
    p.set_defaults(func=_cmd_run)
    # [issue 12] cpift sweep
    p = sub.add_parser("sweep", help="sweep config values (e.g. --set cpift.tau=0,0.05,0.1): score vs value plot")
    p.add_argument("config", help="YAML config, or 'demo' for the built-in demo")
    p.add_argument("--runs-dir", default="runs", help="the sweep goes to RUNS_DIR/NAME/sweep/ (default ./runs)")
    p.add_argument("--name", help="run name (default: the config's name)")
    p.add_argument("--seeds", type=int, help="number of seeds per point; default: the config's")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="a swept key (several comma-separated values) or a fixed override (one value); repeatable")
    p.set_defaults(func=_cmd_sweep)
    # [issue 13] cpift plan
    p = sub.add_parser("plan", help="memory per GPU in each stage, from the model's config (no weights); fits?")
    p.add_argument("config", help="YAML config (its model: tiny, a hub name, or a directory with config.json)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (dotted key, YAML value); repeatable")
    p.add_argument("--world-size", type=int, default=1, help="GPUs of a training stage (default 1)")
    p.add_argument("--sharding", choices=["ddp", "fsdp"], default=None,
                   help="ddp: everything replicated; fsdp: params, grads, moments, masks sharded "
                        "(default: the config's distributed, else ddp)")
    p.add_argument("--gpu-gb", type=float, default=80.0, help="memory of one GPU in GiB (default 80)")
    p.add_argument("--state-dtype", choices=["float32"], default=None,
                   help="AdamW moments in fp32 (default: the parameter dtype, as the pipeline trains)")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="activation checkpointing in training (default: the config's train.gradient_checkpointing)")
    p.add_argument("--attention", choices=["eager", "sdpa"], default=None,
                   help="eager stores the attention scores (default: eager for tiny, sdpa for hub models)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=_cmd_plan)

    # [issue 14] cpift bench
    p = sub.add_parser("bench", help="benchmarks: each op vs its pure-PyTorch path and outside anchors")
    p.add_argument("ops", nargs="*", metavar="OP",
                   help="mask, adamw, select, overlap, fuse, importance (default: all, in that order)")
    p.add_argument("--size", choices=["quick", "full"], default="quick",
                   help="quick (default): small sizes, the whole suite in a few minutes; full: the large sizes "
                        "(2*10^7 to 10^9 elements per case, minutes per op)")
    p.add_argument("--out", help="where <op>.json, .md and .png go (default: bench/results/ in a checkout, "
                   "else ./cpift-bench)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when torch sees a GPU, else cpu")
    p.add_argument("--no-progress", action="store_true", help="no progress lines")
    p.set_defaults(func=_cmd_bench)

    for command in sub.choices.values():  # --debug also after the subcommand
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


class Terminated(BaseException):
    """SIGTERM (a scheduler's stop) while a command runs: unwound like Ctrl-C."""


@contextlib.contextmanager
def _interrupts():
    """While a command runs: SIGTERM raises Terminated, and an interrupt dropped in a finalizer comes back.

    CPython raises KeyboardInterrupt (or Terminated) in whatever Python code runs when the signal
    arrives. If that is a finalizer (a ``__del__`` run by the garbage collector, a weakref
    callback), the exception is "ignored": reported to ``sys.unraisablehook`` and dropped, and the
    run would go on to its end. Here the hook has the same signal sent again a millisecond later,
    from a timer thread (raised at once, it would be handled inside the hook and dropped too), so it
    lands in the code that follows. Only the main thread installs this (signal handlers live there)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum, frame):
        raise Terminated()

    def on_unraisable(unraisable):
        if unraisable.exc_type is not None and issubclass(unraisable.exc_type, (KeyboardInterrupt, Terminated)):
            again = signal.SIGTERM if issubclass(unraisable.exc_type, Terminated) else signal.SIGINT
            threading.Timer(0.001, signal.raise_signal, (again,)).start()
        else:
            previous_hook(unraisable)

    previous_term = signal.signal(signal.SIGTERM, on_term)
    previous_hook, sys.unraisablehook = sys.unraisablehook, on_unraisable
    try:
        yield
    finally:
        sys.unraisablehook = previous_hook
        signal.signal(signal.SIGTERM, previous_term)


def _describe(exc: BaseException) -> str:
    """One line for an exception: its message (OS errors: the reason and the file)."""
    if isinstance(exc, OSError) and exc.strerror:
        files = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
        return f"{exc.strerror}: {files}" if files else exc.strerror
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    text = " ".join(text.split()) or type(exc).__name__
    return text if isinstance(exc, (ValueError, OSError, KeyError, TypeError)) else f"{type(exc).__name__}: {text}"


def main(argv: list[str] | None = None) -> int:
    """Run one command. Failures end with one ``cpift: error: ...`` line on stderr and exit status
    1 (2 for a bad config or argument); Ctrl-C / SIGTERM end with "interrupted; re-run to resume"
    (130 / 143). ``--debug`` shows the full traceback instead."""
    parser = build_parser()
    parser.add_argument("--debug", action="store_true", help="show the full Python traceback of an error")
    args = parser.parse_args(argv)
    debug = bool(getattr(args, "debug", False))

    try:
        with _interrupts():
            return int(args.func(args) or 0)
    except (KeyboardInterrupt, Terminated) as exc:
        if debug:
            raise
        print("cpift: interrupted; re-run to resume", file=sys.stderr, flush=True)
        return 143 if isinstance(exc, Terminated) else 130
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line (traceback with --debug)
        if debug:
            raise
        from .pipeline.config import ConfigError

        usage = isinstance(exc, (ConfigError, UsageError))
        expected = usage or isinstance(exc, (ValueError, OSError, KeyError))  # errors the code raises on purpose
        hint = "" if expected else " (run with --debug for the traceback)"
        print(f"cpift: error: {_describe(exc)}{hint}", file=sys.stderr, flush=True)
        return 2 if usage else 1


def entry() -> None:
    """The `cpift` executable: main(), then exit with its status. After an interrupt the status is
    130 / 143 exactly: CPython re-sends itself SIGINT at exit (status -2) when its "unhandled
    KeyboardInterrupt" flag was set by a nested PyRun_* call the interrupt crossed inside a C
    extension, even though main() caught it (seen once, in a fresh-clone test run); os._exit after
    flushing keeps the promised status.

    A process of a torchrun / accelerate launch also ends by os._exit, after the atexit handlers
    (destroy_process_group among them): twice a rank that had finished its run aborted while the
    interpreter was torn down ("terminate called without an active exception", status -6), when
    process groups still referenced from Python (DDP's, the pipeline's own) freed their gloo
    threads' work with the interpreter half gone; the launcher then failed the whole run."""
    code = main()
    dist = sys.modules.get("torch.distributed")
    distributed = dist is not None and dist.is_available() and dist.is_initialized()
    if code in (130, 143) or distributed:
        if code not in (130, 143):
            atexit._run_exitfuncs()  # what a normal exit runs first, while the interpreter is whole
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
