"""Memory plan: what one process holds in each pipeline stage, from the model's config alone.

``memory_plan`` is a pure function of a Llama-style ``transformers`` config (an object or the
``config.json`` mapping; no weights are read) and the run settings; ``plan_for_config`` reads those
settings from a pipeline ``Config``. ``cpift plan CONFIG`` prints the result (docs/plan.md).

Parameter count (Llama family: ``model_type`` llama or mistral). With h = hidden_size, I =
intermediate_size, L = num_hidden_layers, a = num_attention_heads, kv = num_key_value_heads (GQA;
default a), d = head_dim (default h / a), V = vocab_size::

    embed  = V·h
    layer  = h·a·d + 2·h·kv·d + a·d·h          q, k, v, o projections
           + 3·h·I                             MLP gate, up, down
           + 2·h                               the two RMSNorm weights
           (+ a·d + 2·kv·d + h with attention_bias; + 2·I + h with mlp_bias)
    P      = embed + L·layer + h (final norm) + V·h (lm_head, unless tie_word_embeddings)

LLaMA-2-7B: P = 6,738,415,616. tests/test_plan.py checks P against ``sum(p.numel())`` of the
``transformers`` model built on the meta device.

Bytes per GPU. b_p: bytes per parameter element (the model dtype: the pipeline trains the weights
in that dtype, no fp32 master copy); b_s: per moment element (``state_dtype``, default b_p:
MaskedAdamW keeps its moments in the parameter dtype unless told fp32); S = world_size under
FSDP (params, grads, moments and masks are sharded: each rank holds 1/S), S = 1 under DDP
(everything replicated)::

    weights     P·b_p / S
    grads       P·b_p / S
    moments     2·P·b_s / S               AdamW exp_avg and exp_avg_sq (no amsgrad)
    masks       m·P / 8 / S               m frozen masks of 1 bit per element (frozen words
                                          localized to each rank's shard under FSDP)
    epi         n·P·b_e / S               EPI importance state for n tasks, b_e = 4 (float32),
                                          2 (bfloat16), 1 + 4/256 (int8: 1 byte + a fp32 scale per
                                          256 elements; cpift_fast/importance.py)
    comm        DDP, S > 1: P·b_p         the gradient buckets (DDP's default
                                          gradient_as_bucket_view=False keeps a second copy)
                FSDP: 3·U·b_p             U = largest FSDP unit (a decoder layer, the embedding or
                                          lm_head): the unit being computed and the prefetched one
                                          unsharded, plus its unsharded grads before the
                                          reduce-scatter

Activations (training; per-GPU batch b, sequence s, b_a = b_p bytes per activation element),
after Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models"
(MLSys 2023, arXiv:2205.05198), eq. (1), which gives for one transformer layer in 16-bit
without recomputation ``s·b·h·(34 + 5·a·s/h)`` bytes::

    layer_act   = s·b·h·(34 + 5·a·s/h)·b_a/2    attention "eager" (the a·s² scores are stored)
                = s·b·h·34·b_a/2                attention "sdpa" (flash / memory-efficient
                                                kernels: the scores are never stored)
    logits      = b·s·V·(b_a + 4)               logits and their fp32 copy for the cross entropy
    activations = L·layer_act + logits                           no checkpointing
                = L·s·b·h·b_a + layer_act + logits               with activation checkpointing:
                  each layer's input (2·s·b·h bytes in 16-bit) plus one layer recomputed in backward

The formula was derived for a GPT block (4h MLP, dropout); for Llama's SwiGLU MLP (I ≈ 2.7h, no
dropout) it is an estimate, not a measurement.

Stages (``KINDS`` of the pipeline, in order):

- training model: base (tiny model: pretraining; a hub model: base only records its name, nothing
  is held), probe (nothing frozen: m = 0), stages, consolidate, forgetting (one union mask of the
  frozen cores: m = 1), and epi when ``epi_tasks`` > 0 (the training stage of method epi or
  epi_static: n importance states and m = 3n + 1 masks — each task's mask, its first mask and its
  frozen set, and the optimizer's).
- streamed (the pipeline runs them on the CPU, from the checkpoint files): core — one (base, tuned)
  pair of the largest tensor T, its mask words, the 0.75 MiB histograms, and the N/8-byte result
  mask; fuse — one tensor of each of the n + 2 inputs (backbone, n probes, base), two fp32 work
  tensors and the output tensor (T·((n + 3)·b_p + 8)), plus the n core masks. With a hub base
  both also hold the base model's weights (it is loaded whole).
- group: the n core masks (n·P/8).
- eval: the whole model (eval is one process: not sharded) + the KV cache
  2·L·b_e·s_e·kv·d·b_a + one layer's forward working set layer_act(b_e, s_e); s_e = prompt
  (≤ train.max_len) + generated tokens.

``fits``: total ≤ gpu_gb GiB; ``headroom`` = gpu_gb GiB − total (the CUDA context, ~0.5–1 GiB,
and allocator fragmentation come out of it). core, group and fuse run on the CPU: their bytes are
host memory, with no fit (None).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from .pipeline.run import KINDS

GIB = 2 ** 30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
EPI_STATE_BYTES = {"float32": 4.0, "bfloat16": 2.0, "int8": 1.0 + 4.0 / 256}  # the config's epi.state_dtype
SHARDING = ("ddp", "fsdp")
ATTENTION = ("eager", "sdpa")
LLAMA_STYLE = ("llama", "mistral")
COMPONENTS = ("weights", "grads", "moments", "masks", "epi", "activations", "comm", "streamed")
HISTOGRAM_BYTES = (32768 + 65536) * 8  # core selection's two histograms (select.py: 0.25 + 0.5 MiB)
ON_CPU = ("core", "group", "fuse")      # stages the pipeline runs on the CPU (no GPU fit)


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Llama-style decoder that decide its memory."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    attention_bias: bool = False
    mlp_bias: bool = False
    model_type: str = "llama"

    @classmethod
    def from_config(cls, config) -> ModelShape:
        """From a ``transformers`` config object or a ``config.json`` mapping."""
        get = config.get if isinstance(config, Mapping) else (lambda key, default=None: getattr(config, key, default))
        model_type = get("model_type")
        if model_type not in LLAMA_STYLE:
            raise ValueError(f"memory plan: model_type {model_type!r} is not supported (Llama-style decoders "
                             f"only: {', '.join(LLAMA_STYLE)})")
        sizes = {}
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            value = get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"memory plan: model config {key} must be a positive integer, got {value!r}")
            sizes[key] = value
        heads = sizes["num_attention_heads"]
        kv_heads = get("num_key_value_heads") or heads
        head_dim = get("head_dim") or sizes["hidden_size"] // heads
        return cls(vocab=sizes["vocab_size"], hidden=sizes["hidden_size"], intermediate=sizes["intermediate_size"],
                   layers=sizes["num_hidden_layers"], heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                   tied=bool(get("tie_word_embeddings", False)), attention_bias=bool(get("attention_bias", False)),
                   mlp_bias=bool(get("mlp_bias", False)), model_type=model_type)

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def layer_params(self) -> int:
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        attention = h * q + 2 * h * kv + q * h + (q + 2 * kv + h if self.attention_bias else 0)
        mlp = 3 * h * self.intermediate + (2 * self.intermediate + h if self.mlp_bias else 0)
        return attention + mlp + 2 * h

    @property
    def params(self) -> int:
        head = 0 if self.tied else self.embed_params
        return self.embed_params + self.layers * self.layer_params + self.hidden + head

    @property
    def largest_tensor(self) -> int:
        """Elements of the largest single tensor (embedding, a projection or an MLP matrix)."""
        h = self.hidden
        return max(self.embed_params, self.heads * self.head_dim * h, self.intermediate * h)

    @property
    def largest_unit(self) -> int:
        """Elements of the largest FSDP unit: one decoder layer, the embedding or lm_head."""
        return max(self.layer_params, self.embed_params)

    def describe(self) -> str:
        return (f"{self.model_type}, {self.params:,} parameters ({self.params / 1e9:.2f} B; hidden {self.hidden}, "
                f"{self.layers} layers, "
                f"{self.heads} heads / {self.kv_heads} kv, intermediate {self.intermediate}, vocab {self.vocab}, "
                f"{'tied' if self.tied else 'untied'} embeddings)")


@dataclass
class StageMemory:
    """One stage's bytes per process, by component (COMPONENTS), and whether they fit the GPU.
    A stage the pipeline runs on the CPU (device "cpu") has no fit or headroom (None)."""

    stage: str
    holds: str
    bytes: dict[str, float] = field(default_factory=dict)
    gpu_bytes: float = 0.0
    device: str = "gpu"

    @property
    def total(self) -> float:
        return sum(self.bytes.values())

    @property
    def fits(self) -> bool | None:
        return self.total <= self.gpu_bytes if self.device == "gpu" else None

    @property
    def headroom(self) -> float | None:
        return self.gpu_bytes - self.total if self.device == "gpu" else None

    def to_dict(self) -> dict:
        """JSON-ready: every component, the total and the headroom in GiB."""
        return {"stage": self.stage, "holds": self.holds, "device": self.device,
                "gib": {k: self.bytes.get(k, 0.0) / GIB for k in COMPONENTS}, "total_gib": self.total / GIB,
                "fits": self.fits, "headroom_gib": None if self.headroom is None else self.headroom / GIB}


def _choice(name: str, value, valid) -> None:
    if value not in valid:
        raise ValueError(f"memory plan: {name} must be one of {', '.join(map(str, valid))}, got {value!r}")


def _positive(name: str, value, zero_ok: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if zero_ok else 1):
        raise ValueError(f"memory plan: {name} must be a {'non-negative' if zero_ok else 'positive'} integer, "
                         f"got {value!r}")


def memory_plan(model_config, *, world_size: int = 1, sharding: str = "ddp", param_dtype: str = "bfloat16",
                state_dtype: str | None = None, batch_size: int = 1, seq_len: int = 1024,
                grad_checkpointing: bool = False, attention: str = "sdpa", n_tasks: int = 2,
                epi_tasks: int = 0, epi_state: str = "float32", eval_batch_size: int = 1, eval_seq_len: int = 1024,
                hub_base: bool = True, gpu_gb: float = 80.0) -> list[StageMemory]:
    """Bytes one process holds in each stage (KINDS order, then ``epi`` when ``epi_tasks`` > 0):
    on its GPU, or in host memory for core, group and fuse; the formulas are in the module docstring.

    model_config: a Llama-style ``transformers`` config or ``config.json`` mapping. world_size: the
    processes of a training stage; sharding: "ddp" (replicated) or "fsdp" (sharded). param_dtype:
    "float32" | "bfloat16" | "float16"; state_dtype: None (the param dtype) or "float32" (MaskedAdamW's
    choices). batch_size: per GPU;
    seq_len: tokens per sequence. n_tasks: the core masks group and fuse hold. epi_tasks (0: no EPI
    stage), epi_state ("float32" | "bfloat16" | "int8", as ``epi.state_dtype``): EPI importance state. hub_base: the base model is a hub
    model (base holds nothing; core and fuse load it whole) rather than the pretrained tiny model.
    gpu_gb: GiB per GPU. Raises ValueError on a bad argument.
    """
    shape = ModelShape.from_config(model_config)
    for name, value in (("world_size", world_size), ("batch_size", batch_size), ("seq_len", seq_len),
                        ("n_tasks", n_tasks), ("eval_batch_size", eval_batch_size), ("eval_seq_len", eval_seq_len)):
        _positive(name, value)
    _positive("epi_tasks", epi_tasks, zero_ok=True)
    _choice("sharding", sharding, SHARDING)
    _choice("param_dtype", param_dtype, DTYPE_BYTES)
    _choice("state_dtype", state_dtype, tuple(dict.fromkeys((None, "float32", param_dtype))))  # MaskedAdamW's
    _choice("attention", attention, ATTENTION)
    _choice("epi_state", epi_state, EPI_STATE_BYTES)
    if isinstance(gpu_gb, bool) or not isinstance(gpu_gb, (int, float)) or not gpu_gb > 0:
        raise ValueError(f"memory plan: gpu_gb must be a positive number, got {gpu_gb!r}")

    P, h, V, L = shape.params, shape.hidden, shape.vocab, shape.layers
    b_p = DTYPE_BYTES[param_dtype]
    b_s = DTYPE_BYTES[state_dtype or param_dtype]
    b_a = b_p
    S = world_size if sharding == "fsdp" else 1
    T = shape.largest_tensor

    def layer_act(b: int, s: int) -> float:
        scores = 5 * shape.heads * s / h if attention == "eager" else 0.0
        return s * b * h * (34 + scores) * b_a / 2

    def training(masks: int, epi: int) -> dict[str, float]:
        logits = batch_size * seq_len * V * (b_a + 4)
        if grad_checkpointing:
            act = L * seq_len * batch_size * h * b_a + layer_act(batch_size, seq_len) + logits
        else:
            act = L * layer_act(batch_size, seq_len) + logits
        if sharding == "fsdp":
            comm = 3 * shape.largest_unit * b_p
        else:
            comm = P * b_p if world_size > 1 else 0.0
        return {"weights": P * b_p / S, "grads": P * b_p / S, "moments": 2 * P * b_s / S, "masks": masks * P / 8 / S,
                "epi": epi * P * EPI_STATE_BYTES[epi_state] / S, "activations": act, "comm": comm}

    base_weights = {"weights": P * b_p} if hub_base else {}
    rows = {
        "base": ("nothing (hub name)", {}) if hub_base else ("training (pretrain)", training(0, 0)),
        "probe": ("training", training(0, 0)),
        "core": ("streamed tensors", {**base_weights, "masks": P / 8,
                                             "streamed": 2 * T * b_p + T / 8 + HISTOGRAM_BYTES}),
        "group": ("core masks", {"masks": n_tasks * P / 8}),
        "stages": ("training", training(1, 0)),
        "fuse": ("streamed tensors", {**base_weights, "masks": n_tasks * P / 8,
                                             "streamed": T * ((n_tasks + 3) * b_p + 8)}),
        "consolidate": ("training", training(1, 0)),
        "forgetting": ("training", training(1, 0)),
        "eval": ("weights + KV cache", {
            "weights": P * b_p,
            "activations": 2 * L * eval_batch_size * eval_seq_len * shape.kv_heads * shape.head_dim * b_a
            + layer_act(eval_batch_size, eval_seq_len)}),
    }
    order = list(KINDS)
    if epi_tasks:
        rows["epi"] = ("training + EPI", training(3 * epi_tasks + 1, epi_tasks))
        order.append("epi")
    gpu_bytes = float(gpu_gb) * GIB
    return [StageMemory(stage, rows[stage][0], {k: float(v) for k, v in rows[stage][1].items()}, gpu_bytes,
                        "cpu" if stage in ON_CPU else "gpu") for stage in order]


def model_config_of(model: Mapping, max_len: int):
    """The ``transformers`` config of a pipeline config's ``model`` section: the built-in tiny
    Llama (built on the meta device by the pipeline's own builder: no weights), or a hub name /
    local directory read by ``AutoConfig`` (config.json only)."""
    import torch

    from .pipeline.model import TinyLlamaSpec, build_tiny_llama

    if model["source"] == "tiny":
        spec = TinyLlamaSpec(hidden_size=model["hidden_size"], num_layers=model["num_layers"],
                             num_heads=model["num_heads"], intermediate_size=model["intermediate_size"],
                             max_positions=max(64, max_len))
        with torch.device("meta"):
            return build_tiny_llama(spec)[0].config
    from transformers import AutoConfig

    source = os.path.expanduser(model["source"])
    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ValueError(f"model {model['source']!r}: cannot read its config ({str(exc).splitlines()[0][:200]})") from None


def plan_for_config(cfg, *, world_size: int = 1, sharding: str | None = None, gpu_gb: float = 80.0,
                    state_dtype: str | None = None, grad_checkpointing: bool = False,
                    attention: str | None = None) -> tuple[ModelShape, dict, list[StageMemory]]:
    """``memory_plan`` for a pipeline ``Config``: (model shape, the settings used, rows).

    From the config: the model (tiny: fp32, as the pipeline trains it, eager attention; a hub
    model: ``model.dtype``, sdpa attention — transformers' default), the per-GPU batch — what one
    process computes at once: ``train.micro_batch_size``, else ``train.batch_size`` / world_size
    rounded up (a step's batch is shared by the processes) — and ``train.max_len``, the number of
    tasks, ``eval.batch_size``, the eval sequence ``train.max_len`` + the largest
    ``max_new_tokens`` of the tasks (256, the real-data loaders' largest default, where none is
    set), ``distributed`` (the sharding when `sharding` is None; ddp when unset),
    ``train.gradient_checkpointing`` (or `grad_checkpointing`), and EPI: when ``methods`` has epi
    or epi_static, an epi row with importance state for every task of the config in
    ``epi.state_dtype`` (epi_tasks 0 otherwise). The rest are the arguments."""
    from .pipeline.config import EPI_METHODS

    model = cfg["model"]
    tiny = model["source"] == "tiny"
    max_len = int(cfg["train"]["max_len"])
    new_tokens = max((t.max_new_tokens for t in cfg.tasks if t.max_new_tokens), default=256)
    epi = bool(set(cfg["methods"]) & set(EPI_METHODS))
    train = cfg["train"]
    micro = train["micro_batch_size"] or -(-int(train["batch_size"]) // max(1, int(world_size)))
    settings = {"world_size": world_size, "sharding": sharding or cfg["distributed"] or "ddp",
                "param_dtype": "float32" if tiny else model["dtype"], "state_dtype": state_dtype,
                "batch_size": int(micro), "seq_len": max_len,
                "grad_checkpointing": bool(grad_checkpointing or train["gradient_checkpointing"]),
                "attention": attention or ("eager" if tiny else "sdpa"),
                "n_tasks": len(cfg.tasks), "epi_tasks": len(cfg.tasks) if epi else 0,
                "epi_state": cfg["epi"]["state_dtype"],
                "eval_batch_size": int(cfg["eval"]["batch_size"]), "eval_seq_len": max_len + new_tokens,
                "hub_base": not tiny, "gpu_gb": gpu_gb}
    hf_config = model_config_of(model, max_len)
    return ModelShape.from_config(hf_config), settings, memory_plan(hf_config, **settings)


def format_plan(shape: ModelShape, settings: dict, rows: list[StageMemory]) -> str:
    """The table ``cpift plan`` prints: GiB per component, total, fits (headroom) per stage."""
    s = settings
    ckpt = "activation checkpointing" if s["grad_checkpointing"] else "no activation checkpointing"
    epi = f"; EPI importance state for {s['epi_tasks']} tasks in {s['epi_state']}" if s["epi_tasks"] else ""
    lines = [
        f"model: {shape.describe()}",
        f"{s['sharding']} over {s['world_size']} GPU(s); weights {s['param_dtype']}, moments "
        f"{s['state_dtype'] or s['param_dtype']}; per-GPU batch {s['batch_size']} x {s['seq_len']} tokens, {ckpt}, "
        f"{s['attention']} attention; eval batch {s['eval_batch_size']} x {s['eval_seq_len']}{epi}",
        f"GiB per process (training, eval: on one GPU of {s['gpu_gb']:g} GiB; core, group, fuse: on the CPU)",
    ]
    head = ["stage", "holds"] + list(COMPONENTS) + ["total", "fits (headroom)"]
    table = [[r.stage, r.holds] + [f"{r.bytes.get(k, 0.0) / GIB:.2f}" for k in COMPONENTS]
             + [f"{r.total / GIB:.2f}", "n/a (CPU)" if r.fits is None
                else f"{'yes' if r.fits else 'NO'} ({r.headroom / GIB:+.2f})"] for r in rows]
    widths = [max(len(row[i]) for row in [head] + table) for i in range(len(head))]
    for row in [head] + table:
        cells = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
