"""Models and tokenizers for the pipeline.

Two sources, one interface:
- ``tiny``: a small Llama-architecture causal LM built from a ``LlamaConfig`` in code, with a
  byte-level tokenizer built in code (ids 0..255 are bytes, then pad / bos / eos) as a real
  ``PreTrainedTokenizerFast``. No download.
- any ``transformers`` causal LM by hub name or local directory (``AutoModelForCausalLM`` +
  ``AutoTokenizer``).

Checkpoints are written with ``save_pretrained`` (safetensors + tokenizer files) and read back
bit-exactly; every directory loads with ``AutoModelForCausalLM`` and ``AutoTokenizer``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

BUILTIN_FLAG = "cpift_builtin_tiny"  # set in the config.json of the built-in tiny model


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what the ByteLevel pre-tokenizer emits)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def byte_level_tokenizer():
    """A real ``transformers`` tokenizer (``PreTrainedTokenizerFast``) that maps UTF-8 byte b to id b,
    with pad = 256, bos = 257, eos = 258: a byte-level BPE without merges. ``save_pretrained`` writes
    ``tokenizer.json``, so ``AutoTokenizer`` loads every directory the pipeline writes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    vocab.update({"<pad>": 256, "<s>": 257, "</s>": 258})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   clean_up_tokenization_spaces=False)
    return HFTokenizer(fast)


class HFTokenizer:
    """A ``transformers`` tokenizer behind the small interface the pipeline uses (encode without
    special tokens, decode without them, pad/bos/eos ids, the chat template if any)."""

    def __init__(self, tok):
        self.tok = tok
        if tok.eos_token_id is None:
            raise ValueError(f"tokenizer {tok.name_or_path!r} has no eos token; the pipeline needs one to end responses")
        self.eos_token_id = tok.eos_token_id
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.bos_token_id = tok.bos_token_id
        self.vocab_size = len(tok)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tok, "chat_template", None))

    def apply_chat_template(self, messages: list[dict]) -> str:
        """The conversation rendered by the tokenizer's chat template, ending with the generation prompt."""
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def save(self, directory: str) -> None:
        self.tok.save_pretrained(directory)


@dataclass(frozen=True)
class TinyLlamaSpec:
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256
    max_positions: int = 64


def build_tiny_llama(spec: TinyLlamaSpec, seed: int = 0):
    """A freshly initialised tiny ``LlamaForCausalLM`` (fp32, eager attention) and its byte-level tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = byte_level_tokenizer()
    cfg = LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads, max_position_embeddings=spec.max_positions,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False, attn_implementation="eager", **{BUILTIN_FLAG: True},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model.float(), tok


def sharding(fsdp_size: int | None) -> dict:
    """``from_pretrained`` keywords that shard the model over `fsdp_size` processes at load time
    (transformers' own FSDP2: each process reads only its shards); {} for None."""
    if not fsdp_size:
        return {}
    try:
        from transformers.distributed import DistributedConfig
    except ImportError:
        import transformers

        raise RuntimeError(f"distributed: fsdp needs a transformers with native FSDP2 loading "
                           f"(transformers.distributed.DistributedConfig); this is {transformers.__version__}") from None
    return {"distributed_config": DistributedConfig(fsdp_size=fsdp_size)}


def load_hub_model(name_or_dir: str, dtype: torch.dtype = torch.float32, fsdp_size: int | None = None):
    """Any causal LM ``transformers`` can load, plus its tokenizer (hub name or local dir); sharded
    over `fsdp_size` processes at load time when given (every process must call it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(name_or_dir, dtype=dtype, **sharding(fsdp_size))
    tok = HFTokenizer(AutoTokenizer.from_pretrained(name_or_dir))
    return model, tok


def save_checkpoint(model, tok, directory: str, main: bool = True) -> None:
    """``save_pretrained`` (safetensors) plus the tokenizer; the directory must exist. For a model
    sharded at load time every process calls it (transformers gathers the full state dict to rank 0,
    which writes it) and `main` says whether this process writes the tokenizer."""
    model.save_pretrained(directory, safe_serialization=True)
    if main:
        tok.save(directory)


def load_checkpoint(directory: str, fsdp_size: int | None = None):
    """Model + tokenizer from a directory written by ``save_checkpoint`` (fp32 values kept bit-exact),
    sharded over `fsdp_size` processes at load time when given (every process must call it). The
    built-in tiny model is loaded with eager attention (as it was trained)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with open(os.path.join(directory, "config.json")) as f:
        builtin = bool(json.load(f).get(BUILTIN_FLAG))
    extra = {"attn_implementation": "eager"} if builtin else {}
    model = AutoModelForCausalLM.from_pretrained(directory, dtype="auto", **extra, **sharding(fsdp_size))
    tok = HFTokenizer(AutoTokenizer.from_pretrained(directory))
    model.eval()
    return model, tok
