"""The pipeline under a 2-process launch (issue 13), gloo on CPU: `torchrun --nproc_per_node 2
$(which cpift) run CFG` with DDP, `accelerate launch --multi_gpu --num_processes 2 $(which cpift)
run CFG` with FSDP2 and activation checkpointing (both launchers only set the process environment;
the strategy comes from the config). Every stage — checkpoints, core masks, groups, fused tensors, evaluation results, loss
curves — is bit-identical to the 1-process run with the same two micro-batches per step (train.py:
both add the same two micro-batch gradients), frozen elements are checked on every rank, core
selection and fusion run on both ranks (each reads and writes its share of the tensors), and the
run directory holds what one process would have written.

Plus the pieces that need no second process: the step / micro-batch plan, the config checks.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from cpift_fast.pipeline.config import ConfigError, load_config
from cpift_fast.pipeline.data import RankBatches, micro_batches, shuffled_batches
from cpift_fast.pipeline.driver import run_pipeline
from cpift_fast.pipeline.run import MANIFEST

from helpers import free_port, stage_digests
from test_pipeline import TINY

# the pipeline tests' TINY (every CPI-FT stage, the baselines, compare_modes, one forgetting pair)
# with EPI added
DIST = copy.deepcopy(TINY)
DIST.update(name="dist", methods=TINY["methods"] + ["epi"],
            epi={"ratio": 0.05, "interval": 2, "warmup": 2})
HALF = TINY["train"]["batch_size"] // 2  # the 1-process reference: two micro-batches per step, as two ranks


def _cpift() -> str:
    """The `cpift` console script of this environment (what `$(which cpift)` names)."""
    path = os.path.join(os.path.dirname(sys.executable), "cpift")
    if not os.path.exists(path):
        pytest.skip(f"no cpift console script next to {sys.executable} (install the package: make install)")
    return path


LAUNCHERS = {  # two processes on this machine
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port"],
}


def _launch(launcher: str, cfg: dict, runs: str, tmp_path) -> subprocess.CompletedProcess:
    path = tmp_path / f"{cfg['name']}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1", CPIFT_BACKEND="cpp")
    env.pop("TRITON_INTERPRET", None)
    port = [str(free_port())] if launcher == "accelerate" else []
    cmd = LAUNCHERS[launcher] + port + [_cpift(), "run", str(path), "--runs-dir", runs, "--no-progress"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _why(proc: subprocess.CompletedProcess) -> str:
    """A failed launch's story: the ranks' own messages (an abort's reason comes before the
    launcher's long summary, which alone would fill a tail), then the tail of stderr."""
    marks = ("rror", "terminate", "bort", "Fatal", "what()", "Traceback", "Signal")
    own = [line for line in proc.stderr.splitlines() if any(m in line for m in marks)]
    return "\n".join(["stdout tail:", proc.stdout[-1500:], "stderr lines of note:", *own[:80],
                      "stderr tail:", proc.stderr[-4000:]])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The 1-process run, two micro-batches per step (micro_batch_size = batch_size / 2)."""
    runs = str(tmp_path_factory.mktemp("one"))
    cfg = copy.deepcopy(DIST)
    cfg["train"]["micro_batch_size"] = HALF
    old = os.environ.get("CPIFT_BACKEND")
    os.environ["CPIFT_BACKEND"] = "cpp"  # the backend the 2-process runs use
    try:
        run_pipeline(load_config(cfg), runs_dir=runs)
    finally:
        os.environ.pop("CPIFT_BACKEND") if old is None else os.environ.__setitem__("CPIFT_BACKEND", old)
    return os.path.join(runs, "dist")


def _manifests(root: str) -> dict[str, dict]:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        if MANIFEST in files:
            with open(os.path.join(dirpath, MANIFEST)) as f:
                out[os.path.relpath(dirpath, root)] = json.load(f)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("strategy, launcher", [("ddp", "torchrun"), ("fsdp", "accelerate")])
def test_two_processes_equal_one_bit_for_bit(reference, tmp_path, strategy, launcher):
    cfg = copy.deepcopy(DIST)
    cfg["distributed"] = strategy
    cfg["train"]["gradient_checkpointing"] = strategy == "fsdp"  # recomputed activations: the same bits
    runs = str(tmp_path / "runs")
    proc = _launch(launcher, cfg, runs, tmp_path)
    assert proc.returncode == 0, _why(proc)
    root = os.path.join(runs, "dist")

    got, want = stage_digests(root), stage_digests(reference)
    assert got, "the 2-process run finished no stage"
    assert set(got) == set(want), set(got) ^ set(want)
    assert {k: got[k] for k in sorted(got)} == {k: want[k] for k in sorted(want)}
    assert any(k.endswith("/core") for k in got) and any(k.endswith("/cpift/fuse") for k in got)

    trained = {k: m["info"] for k, m in _manifests(root).items() if "frozen_checked_per_rank" in m["info"]}
    assert len(trained) > 10
    for key, info in trained.items():
        assert info["processes"] == 2 and info["distributed"] == strategy, key
        per_rank = info["frozen_checked_per_rank"]
        if strategy == "ddp":  # every rank checked its whole replica
            assert per_rank == [info["frozen_checked"]] * 2, key
        else:  # each rank checked its shards, together every frozen element
            assert sum(per_rank) == info["frozen_checked"] and (info["frozen_checked"] == 0 or min(per_rank) > 0), key
    assert sum(info["frozen_checked"] for info in trained.values()) > 0
    # core selection and fusion ran on both ranks (each its share of the tensors), not on rank 0 alone
    sharded = {k: m["info"] for k, m in _manifests(root).items() if "/cores/" in k or k.endswith("fuse")}
    assert len(sharded) >= 5 and all(info["processes"] == 2 for info in sharded.values()), sharded

    with open(os.path.join(root, "base", "config.json")) as f:
        assert json.load(f)["architectures"] == ["LlamaForCausalLM"]
    assert os.path.exists(os.path.join(root, "report.md"))
    leftovers = [os.path.join(d, n) for d, dirs, _ in os.walk(root) for n in dirs if n.startswith((".tmp-", ".old-"))]
    assert not leftovers


# ----- the step plan and the config checks (one process) ------------------------------------------

def test_micro_batches_share_every_example_once():
    batch = list(range(10))
    for parts in (1, 2, 3, 4):
        pieces = micro_batches(batch, parts)
        assert [i for p in pieces for i, counted in p if counted] == batch
        assert max(map(len, pieces)) - min(map(len, pieces)) <= 1
    short = micro_batches([7], 2)  # a batch shorter than the parts: an uncounted stand-in, no gradient
    assert short == [[(7, True)], [(7, False)]]


def test_rank_batches_split_each_step_over_the_processes():
    batches = shuffled_batches(20, 8, steps=4, seed=3)
    assert [len(b) for b in batches] == [8, 8, 4, 8]  # epoch 0: 8 + 8 + 4, then epoch 1
    assert sorted(i for b in batches[:3] for i in b) == list(range(20))
    one = list(RankBatches(batches, parts=4))
    two = [list(RankBatches(batches, parts=4, rank=r, world=2)) for r in range(2)]
    assert len(one) == 16 and [len(t) for t in two] == [8, 8]
    for step in range(4):  # rank 0 takes the first two micro-batches of a step, rank 1 the last two
        assert one[4 * step:4 * step + 4] == two[0][2 * step:2 * step + 2] + two[1][2 * step:2 * step + 2]
    with pytest.raises(ValueError, match="cannot be shared by 3 processes"):
        RankBatches(batches, parts=4, rank=0, world=3)


def test_one_process_default_order_is_the_trainers(tmp_path):
    """With one micro-batch per step the batches are those the Trainer's own seeded sampler draws,
    so 1-process results do not depend on the planner."""
    from transformers import Trainer, TrainingArguments

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return 20

        def __getitem__(self, i):
            return i

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, seed=5, data_seed=5,
                             use_cpu=True, report_to=[], remove_unused_columns=False)
    trainer = Trainer(model=torch.nn.Linear(1, 1), args=args, train_dataset=Items(), data_collator=list)
    loader = trainer.get_train_dataloader()
    drawn = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        drawn += [list(b) for b in loader]
    assert drawn == shuffled_batches(20, 8, steps=6, seed=5)


@pytest.mark.parametrize("change, message", [
    ({"distributed": "dpp"}, r"distributed must be one of ddp, fsdp; got 'dpp' \(did you mean 'ddp'\?\)"),
    ({"train": {"micro_batch_size": 5}}, r"train.micro_batch_size = 5 must divide train.batch_size = 16"),
])
def test_bad_distributed_settings_are_config_errors(change, message):
    cfg = copy.deepcopy(TINY)
    for key, value in change.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    with pytest.raises(ConfigError, match=message):
        load_config(cfg)


def test_a_batch_the_processes_cannot_share_fails_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")  # as torchrun --nproc_per_node 3 sets it; nothing is started
    with pytest.raises(ConfigError, match=r"train.batch_size = 16 cannot be shared by 3 process\(es\)"):
        run_pipeline(load_config(TINY), runs_dir=str(tmp_path))
    assert not os.listdir(tmp_path)


def test_accelerate_settings_the_config_cannot_honour_are_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match="configured for FSDP but the config says distributed: ddp"):
        run_pipeline(load_config(TINY), runs_dir=str(tmp_path))
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(ConfigError, match="mixed precision bf16"):
        run_pipeline(load_config(TINY), runs_dir=str(tmp_path))
    assert not os.listdir(tmp_path)


def test_gradient_checkpointing_engages_and_changes_no_bit():
    from cpift_fast.pipeline import train as train_mod
    from cpift_fast.pipeline.model import TinyLlamaSpec, build_tiny_llama
    from cpift_fast.pipeline.tasks import make_synthetic

    task = make_synthetic("shift", 32, 4, 0)
    trained = []
    for ckpt in (False, True):
        model, tok = build_tiny_llama(TinyLlamaSpec(16, 1, 2, 32))
        spec = train_mod.TrainSpec(batch_size=16, max_len=24, gradient_checkpointing=ckpt)
        train_mod.train(model, tok, task.train, spec, progress=False)
        engaged = getattr(model, "is_activation_checkpointing", None)  # transformers v5's name
        assert (engaged if engaged is not None else model.is_gradient_checkpointing) == ckpt
        trained.append({n: p.detach().clone() for n, p in model.named_parameters()})
    assert all(torch.equal(trained[0][n], trained[1][n]) for n in trained[0])


# ----- errors reach every rank (2 gloo processes, no training) -------------------------------------

def _errors_worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from cpift_fast.pipeline.dist import Dist
    from cpift_fast.pipeline.freeze import FrozenDriftError
    from cpift_fast.pipeline.run import MissingStageError

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    d = Dist(rank, 2, "ddp", dist.new_group(backend="gloo"))
    seen = {}

    def fails_on_rank_1():
        if rank == 1:
            raise FrozenDriftError("probe (rank 1): 3 frozen element(s) of 'w' changed during training")
        return "rank 0 fine"

    def missing():
        raise MissingStageError("seed0/probe/a", "probe", "core", "cfg.yaml")

    class Unpicklable(Exception):
        def __init__(self, a, b):
            super().__init__(f"{a} and {b}")

    def unpicklable():
        raise Unpicklable(1, 2)

    for name, call in (("together", lambda: d.together(fails_on_rank_1)), ("on_main", lambda: d.on_main(missing)),
                       ("unpicklable", lambda: d.on_main(unpicklable))):
        try:
            call()
            seen[name] = None
        except Exception as exc:  # noqa: BLE001 - recorded for the test
            seen[name] = (type(exc).__name__, str(exc))
    seen["broadcast"] = d.broadcast(f"from rank {rank}")
    seen["all_gather"] = d.all_gather(rank * 10)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(seen, f)
    dist.destroy_process_group()


@pytest.mark.slow
def test_an_error_on_one_rank_is_raised_on_every_rank(tmp_path):
    script = ("import sys, torch.multiprocessing as mp; sys.path.insert(0, sys.argv[1]); "
              "from test_pipeline_distributed import _errors_worker; from helpers import free_port; "
              "mp.spawn(_errors_worker, args=(free_port(), sys.argv[2]), nprocs=2)")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", script, os.path.dirname(__file__), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for seen in ranks:
        assert seen["together"] == ["FrozenDriftError",
                                    "probe (rank 1): 3 frozen element(s) of 'w' changed during training"]
        assert seen["on_main"][0] == "MissingStageError" and "`cpift run cfg.yaml --stage probe --task a`" \
            in seen["on_main"][1]
        assert seen["broadcast"] == "from rank 0" and seen["all_gather"] == [0, 10]
    assert ranks[0]["unpicklable"] == ["Unpicklable", "1 and 2"]  # rank 0 raises its own error
    assert ranks[1]["unpicklable"] == ["RankError", "rank 0: Unpicklable: 1 and 2"]  # the others a description
