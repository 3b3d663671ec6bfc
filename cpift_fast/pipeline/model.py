"""Models and tokenizers for the pipeline.

Two sources, one interface:
- ``tiny``: a small Llama-architecture causal LM built from a ``LlamaConfig`` in code, with a
  byte-level tokenizer built in code (ids 0..255 are bytes, then pad / bos / eos). No download.
- any ``transformers`` causal LM by hub name or local directory (``AutoModelForCausalLM`` +
  ``AutoTokenizer``).

Checkpoints are written with ``save_pretrained`` (safetensors) and read back bit-exactly.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

TOKENIZER_FILE = "cpift_tokenizer.json"


class ByteTokenizer:
    """Byte-level tokenizer: UTF-8 bytes are ids 0..255; pad = 256, bos = 257, eos = 258."""

    kind = "byte"
    vocab_size = 259
    pad_token_id = 256
    bos_token_id = 257
    eos_token_id = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def save(self, directory: str) -> None:
        with open(os.path.join(directory, TOKENIZER_FILE), "w") as f:
            json.dump({"kind": self.kind}, f)


class HFTokenizer:
    """A ``transformers`` tokenizer behind the same four-method interface as ``ByteTokenizer``."""

    kind = "hf"

    def __init__(self, tok):
        self.tok = tok
        if tok.eos_token_id is None:
            raise ValueError(f"tokenizer {tok.name_or_path!r} has no eos token; the pipeline needs one to end responses")
        self.eos_token_id = tok.eos_token_id
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.bos_token_id = tok.bos_token_id
        self.vocab_size = len(tok)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def save(self, directory: str) -> None:
        self.tok.save_pretrained(directory)
        with open(os.path.join(directory, TOKENIZER_FILE), "w") as f:
            json.dump({"kind": self.kind}, f)


@dataclass(frozen=True)
class TinyLlamaSpec:
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256
    max_positions: int = 64


def build_tiny_llama(spec: TinyLlamaSpec, seed: int = 0):
    """A freshly initialised tiny ``LlamaForCausalLM`` (fp32, eager attention) and its ByteTokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = ByteTokenizer()
    cfg = LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads, max_position_embeddings=spec.max_positions,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False, attn_implementation="eager",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model.float(), tok


def load_hub_model(name_or_dir: str, dtype: torch.dtype = torch.float32):
    """Any causal LM ``transformers`` can load, plus its tokenizer (hub name or local dir)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(name_or_dir, dtype=dtype)
    tok = HFTokenizer(AutoTokenizer.from_pretrained(name_or_dir))
    return model, tok


def save_checkpoint(model, tok, directory: str) -> None:
    """``save_pretrained`` (safetensors) plus the tokenizer; the directory must exist."""
    model.save_pretrained(directory, safe_serialization=True)
    tok.save(directory)


def load_checkpoint(directory: str):
    """Model + tokenizer from a directory written by ``save_checkpoint`` (fp32 values kept bit-exact)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = os.path.join(directory, TOKENIZER_FILE)
    kind = json.load(open(path))["kind"] if os.path.exists(path) else "hf"
    model = AutoModelForCausalLM.from_pretrained(directory, dtype="auto")
    if kind == "byte":
        tok = ByteTokenizer()
        model.config._attn_implementation = "eager"
    else:
        tok = HFTokenizer(AutoTokenizer.from_pretrained(directory))
    model.eval()
    return model, tok

