"""The pipeline on a `transformers` causal LM loaded from a local directory (the hub-model path),
with a real `transformers` tokenizer instead of the built-in byte tokenizer (issue 6)."""

from __future__ import annotations

import os

import pytest
import torch

from cpift_fast import ParamMask
from cpift_fast.pipeline.config import load_config
from cpift_fast.pipeline.driver import run_pipeline

tokenizers = pytest.importorskip("tokenizers", reason="building a local tokenizer needs `tokenizers`")


@pytest.fixture(scope="module")
def local_model_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    chars = sorted(set("abcdefABCDEF0123456789 =:") | set("cpyshfmirupnt"))
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    path = str(tmp_path_factory.mktemp("local-llama"))
    fast.save_pretrained(path)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def test_local_transformers_model_runs_every_stage(local_model_dir, tmp_path):
    cfg = load_config({
        "name": "local", "progress": False,
        "model": {"source": local_model_dir},
        "data": {"n_train": 32, "n_test": 8},
        "tasks": ["shift", "count"],
        "train": {"epochs": 1.0, "batch_size": 16, "lr": 3e-3, "max_len": 24},
        "cpift": {"p": 0.05, "tau": 0.0, "order": "size",
                  "consolidate": {"ratio": 0.5, "epochs": 1.0, "freeze": "cumulative"}},
        "methods": ["full_sft", "cpift"],
    })
    results = run_pipeline(cfg, runs_dir=str(tmp_path))
    root = os.path.join(str(tmp_path), "local")
    assert os.path.exists(os.path.join(root, "base", "source.json")), "a hub/local base is referenced, not copied"
    mask = ParamMask.load(os.path.join(root, "seed0", "core", "shift.mask"))
    assert mask.count() > 0
    assert set(results["seeds"][0]["scores"]["cpift"]) == {"shift", "count"}
    # tau = 0: one group, one stage; cumulative consolidation: one consolidation stage per group
    assert os.path.isdir(os.path.join(root, "seed0", "cpift", "stage1"))
    assert not os.path.exists(os.path.join(root, "seed0", "cpift", "stage2"))
    assert os.path.isdir(os.path.join(root, "seed0", "cpift", "consolidate1"))
    assert os.path.exists(os.path.join(root, "report.md"))
