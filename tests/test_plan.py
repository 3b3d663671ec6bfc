"""Memory plan (issue 13): parameter counts against transformers, the per-GPU bytes, fits, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from cpift_fast.cli import main
from cpift_fast.importance import bytes_per_element
from cpift_fast.pipeline.config import EPI_STATE_DTYPES
from cpift_fast.pipeline.run import KINDS
from cpift_fast.plan import EPI_STATE_BYTES, GIB, ModelShape, memory_plan

LLAMA2_7B = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
             "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 32, "vocab_size": 32000, "tie_word_embeddings": False}


def _meta_count(config) -> int:
    """sum(p.numel()) of the transformers model built on the meta device (no weights)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("kwargs", [
    dict(),                                                     # MHA, untied
    dict(tie_word_embeddings=True),                             # lm_head shares the embedding
    dict(num_key_value_heads=2),                                # GQA
    dict(num_key_value_heads=1, tie_word_embeddings=True),      # MQA, tied
    dict(head_dim=24, attention_bias=True, mlp_bias=True),      # explicit head_dim, biases
])
def test_param_count_equals_transformers(kwargs):
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=176, num_hidden_layers=3,
                         num_attention_heads=8, **kwargs)
    assert ModelShape.from_config(config).params == _meta_count(config)


def test_param_count_mistral_and_mapping():
    from transformers import MistralConfig

    config = MistralConfig(vocab_size=500, hidden_size=96, intermediate_size=200, num_hidden_layers=2,
                           num_attention_heads=6, num_key_value_heads=2)
    shape = ModelShape.from_config(config)
    assert shape.params == _meta_count(config)
    assert ModelShape.from_config(config.to_dict()) == shape  # config.json mapping == config object


def test_llama2_7b_from_config_json(tmp_path):
    from transformers import AutoConfig

    (tmp_path / "config.json").write_text(json.dumps(LLAMA2_7B))
    shape = ModelShape.from_config(AutoConfig.from_pretrained(tmp_path))
    assert shape.params == 6_738_415_616
    assert f"{shape.params / 1e9:.2f}" == "6.74"
    rows = {r.stage: r for r in memory_plan(AutoConfig.from_pretrained(tmp_path), param_dtype="bfloat16")}
    assert rows["probe"].bytes["weights"] == 2 * 6_738_415_616


def test_llama2_70b_gqa():
    from transformers import LlamaConfig

    config = dict(LLAMA2_7B, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                  num_attention_heads=64, num_key_value_heads=8)
    shape = ModelShape.from_config(config)
    assert shape.params == 68_976_648_192 == _meta_count(LlamaConfig(**config))
    assert shape.largest_unit == shape.layer_params  # an 80-layer decoder layer outweighs the embedding


def test_unsupported_model_type():
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        ModelShape.from_config({"model_type": "gpt2", "n_embd": 768})


def test_fsdp_divides_by_world_size():
    ddp = {r.stage: r for r in memory_plan(LLAMA2_7B, world_size=8, sharding="ddp")}
    fsdp = {r.stage: r for r in memory_plan(LLAMA2_7B, world_size=8, sharding="fsdp")}
    for stage in ("probe", "stages", "consolidate", "forgetting"):
        for key in ("weights", "grads", "moments", "masks"):
            assert fsdp[stage].bytes[key] == pytest.approx(ddp[stage].bytes[key] / 8)
        assert fsdp[stage].bytes["activations"] == ddp[stage].bytes["activations"]  # per-GPU batch: unchanged
    assert fsdp["stages"].bytes["masks"] > 0
    assert fsdp["eval"].bytes == ddp["eval"].bytes  # eval is one process: not sharded
    # DDP replicates: the same bytes on 1 or 8 GPUs, but for the gradient buckets of a multi-GPU run
    one = {r.stage: r for r in memory_plan(LLAMA2_7B, world_size=1, sharding="ddp")}
    assert one["probe"].bytes["weights"] == ddp["probe"].bytes["weights"]
    assert one["probe"].bytes["comm"] == 0 and ddp["probe"].bytes["comm"] == ddp["probe"].bytes["grads"]


def test_component_bytes():
    P = 6_738_415_616
    rows = {r.stage: r for r in memory_plan(LLAMA2_7B, param_dtype="bfloat16", state_dtype="float32",
                                            epi_tasks=5, epi_state="int8", n_tasks=5)}
    probe = rows["probe"].bytes
    assert probe["weights"] == probe["grads"] == 2 * P
    assert probe["moments"] == 8 * P                       # two fp32 moments
    assert probe["masks"] == 0 and rows["stages"].bytes["masks"] == P / 8   # one 1-bit union mask
    assert rows["group"].bytes["masks"] == 5 * P / 8
    assert rows["epi"].bytes["epi"] == pytest.approx(5 * P * (1 + 4 / 256))
    assert rows["epi"].bytes["masks"] == 16 * P / 8       # 3 masks per task + the optimizer's
    assert [r.stage for r in memory_plan(LLAMA2_7B)] == list(KINDS)   # no epi row without EPI tasks
    # core, group and fuse run on the CPU: host bytes, no GPU fit
    assert {r.stage for r in memory_plan(LLAMA2_7B) if r.fits is None} == {"core", "group", "fuse"}


def test_activation_formula():
    """Korthikanti et al.: s·b·h·(34 + 5·a·s/h) bytes per layer in 16-bit; the scores term only for
    eager attention; checkpointing keeps each layer's input plus one layer's working set."""
    b, s, h, a, L, V = 4, 512, 4096, 32, 32, 32000
    layer_sdpa, layer_eager = s * b * h * 34, s * b * h * (34 + 5 * a * s / h)
    logits = b * s * V * (2 + 4)

    def act(**kw):
        rows = memory_plan(LLAMA2_7B, param_dtype="bfloat16", batch_size=b, seq_len=s, **kw)
        return {r.stage: r for r in rows}["probe"].bytes["activations"]

    assert act(attention="sdpa") == pytest.approx(L * layer_sdpa + logits)
    assert act(attention="eager") == pytest.approx(L * layer_eager + logits)
    assert act(attention="sdpa", grad_checkpointing=True) == pytest.approx(L * 2 * s * b * h + layer_sdpa + logits)


def test_fits_flips_at_gpu_memory():
    total = {r.stage: r for r in memory_plan(LLAMA2_7B, world_size=8, sharding="fsdp")}["probe"].total
    above = {r.stage: r for r in memory_plan(LLAMA2_7B, world_size=8, sharding="fsdp",
                                             gpu_gb=total / GIB * 1.001)}["probe"]
    below = {r.stage: r for r in memory_plan(LLAMA2_7B, world_size=8, sharding="fsdp",
                                             gpu_gb=total / GIB * 0.999)}["probe"]
    assert above.fits and above.headroom > 0
    assert not below.fits and below.headroom < 0


@pytest.mark.parametrize("bad, message", [
    (dict(world_size=0), "world_size must be a positive integer"),
    (dict(sharding="zero3"), "sharding must be one of ddp, fsdp"),
    (dict(param_dtype="int8"), "param_dtype must be one of"),
    (dict(gpu_gb=0), "gpu_gb must be a positive number"),
    (dict(param_dtype="float32", state_dtype="bfloat16"), "state_dtype must be one of"),
    (dict(epi_state="fp8"), "epi_state must be one of"),
])
def test_bad_arguments(bad, message):
    with pytest.raises(ValueError, match=message):
        memory_plan(LLAMA2_7B, **bad)


# ----- CLI ---------------------------------------------------------------------------------------

def _config(tmp_path, model_dir=None) -> str:
    """A pipeline config with two built-in tasks; the model is a local directory if given."""
    model = f"model: {{source: {model_dir}, dtype: bfloat16}}\n" if model_dir else ""
    path = tmp_path / "cfg.yaml"
    path.write_text(f"name: plan\ntasks: [shift, unshift]\n{model}train: {{batch_size: 16, max_len: 128}}\n")
    return str(path)


def _model_dir(tmp_path, config: dict):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    return d


def test_cli_table_tiny(tmp_path, capsys):
    assert main(["plan", _config(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "llama" in out and "ddp over 1 GPU(s)" in out and "weights float32" in out
    stages = [line.split()[0] for line in out.splitlines()[4:]]
    assert stages == list(KINDS)
    assert "yes (+" in out and "n/a (CPU)" in out


def test_cli_json_matches_memory_plan(tmp_path, capsys):
    model = _model_dir(tmp_path, LLAMA2_7B)
    args = ["plan", _config(tmp_path, model), "--world-size", "8", "--sharding", "fsdp", "--gpu-gb", "40",
            "--grad-checkpointing", "--set", "methods=[full_sft, epi]", "--set", "epi.state_dtype=bfloat16", "--json"]
    assert main(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"]["params"] == 6_738_415_616
    assert [s["stage"] for s in data["stages"]] == list(KINDS) + ["epi"]
    assert data["settings"] == {  # the step's 16 examples shared by 8 processes: 2 per GPU
        "world_size": 8, "sharding": "fsdp", "param_dtype": "bfloat16", "state_dtype": None, "batch_size": 2,
        "seq_len": 128, "grad_checkpointing": True, "attention": "sdpa", "n_tasks": 2, "epi_tasks": 2,
        "epi_state": "bfloat16", "eval_batch_size": 256, "eval_seq_len": 128 + 256, "hub_base": True, "gpu_gb": 40.0}
    expected = memory_plan(LLAMA2_7B, **data["settings"])
    for got, want in zip(data["stages"], expected):
        assert got["total_gib"] == pytest.approx(want.total / GIB)
        assert got["fits"] == want.fits


def test_cli_batch_sharding_and_checkpointing_follow_the_config(tmp_path, capsys):
    args = ["plan", _config(tmp_path), "--world-size", "4", "--json"]
    assert main(args) == 0
    settings = json.loads(capsys.readouterr().out)["settings"]
    assert (settings["batch_size"], settings["sharding"], settings["grad_checkpointing"]) == (4, "ddp", False)
    assert main(args + ["--set", "train.micro_batch_size=2", "--set", "distributed=fsdp",
                        "--set", "train.gradient_checkpointing=true"]) == 0
    settings = json.loads(capsys.readouterr().out)["settings"]
    assert (settings["batch_size"], settings["sharding"], settings["grad_checkpointing"]) == (2, "fsdp", True)


def test_cli_set_override(tmp_path, capsys):
    model = _model_dir(tmp_path, LLAMA2_7B)
    assert main(["plan", _config(tmp_path), "--set", f"model.source={model}", "--set", "model.dtype=float16",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["settings"]["param_dtype"] == "float16" and data["model"]["hidden"] == 4096


@pytest.mark.parametrize("methods, state, rows", [
    ("[full_sft, cpift]", "int8", False),     # no EPI method: no epi row, whatever epi.state_dtype says
    ("[full_sft, epi_static]", "int8", True),
    ("[epi]", "float32", True),
])
def test_cli_epi_row_from_the_config(tmp_path, capsys, methods, state, rows):
    """The epi row comes from the config: methods epi / epi_static, epi.state_dtype, every task."""
    model = _model_dir(tmp_path, LLAMA2_7B)
    path = tmp_path / "three.yaml"
    path.write_text(f"name: plan\ntasks: [shift, unshift, mirror]\nmodel: {{source: {model}, dtype: bfloat16}}\n"
                    f"methods: {methods}\nepi: {{state_dtype: {state}}}\n")
    assert main(["plan", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    stages = {s["stage"]: s for s in data["stages"]}
    assert data["settings"]["epi_tasks"] == (3 if rows else 0) and data["settings"]["epi_state"] == state
    assert ("epi" in stages) == rows and [s["stage"] for s in data["stages"]][:len(KINDS)] == list(KINDS)
    if rows:
        P = 6_738_415_616
        assert stages["epi"]["gib"]["epi"] * GIB == pytest.approx(3 * P * bytes_per_element(
            "int8" if state == "int8" else getattr(torch, state)))
        assert main(["plan", str(path)]) == 0
        assert f"EPI importance state for 3 tasks in {state}" in capsys.readouterr().out


def test_epi_state_bytes_match_the_tracker():
    assert tuple(EPI_STATE_BYTES) == EPI_STATE_DTYPES
    for name, b in EPI_STATE_BYTES.items():
        assert b == bytes_per_element("int8" if name == "int8" else getattr(torch, name))


def test_cli_has_no_epi_options(tmp_path, capsys):
    for option in ("--epi-tasks", "--epi-state"):
        with pytest.raises(SystemExit) as exc:
            main(["plan", _config(tmp_path), option, "2"])
        assert exc.value.code == 2
        capsys.readouterr()


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cpift: error: "), err
    return err[0]


def test_cli_missing_config_json(tmp_path, capsys):
    empty = tmp_path / "nothing"
    empty.mkdir()
    assert main(["plan", _config(tmp_path, empty)]) == 2
    assert "has no config.json" in _one_error_line(capsys)


def test_cli_world_size_zero(tmp_path, capsys):
    assert main(["plan", _config(tmp_path), "--world-size", "0"]) == 2
    assert "world_size must be a positive integer, got 0" in _one_error_line(capsys)


def test_cli_unsupported_model(tmp_path, capsys):
    model = _model_dir(tmp_path, {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 2, "vocab_size": 100})
    assert main(["plan", _config(tmp_path, model)]) == 2
    assert "model_type 'gpt2' is not supported" in _one_error_line(capsys)
