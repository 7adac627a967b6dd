"""Shared fixtures: tiny random Gemma 1/2/3 checkpoints written by HF transformers (the reference),
and the GSM8K folder (NANOGSM_DATA_DIR, default ../shared/gsm8k)."""
import os
from pathlib import Path

import pytest
import torch

FAMILIES = ["gemma", "gemma2", "gemma3_text"]
SEQ = 24  # longer than the tiny sliding window below
WINDOW = 8


def tiny_hf_config(family):
    """A config small enough for CPU that still exercises every family switch: head_dim != hidden /
    heads, GQA/MQA, both layer types, a query scale that is not head_dim, different rope bases."""
    import transformers
    common = dict(vocab_size=256, hidden_size=48, intermediate_size=96, num_hidden_layers=4,
                  num_attention_heads=4, head_dim=16, max_position_embeddings=512)
    if family == "gemma":
        return transformers.GemmaConfig(num_key_value_heads=1, rope_parameters={"rope_type": "default", "rope_theta": 500.0}, **common)
    layer_types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    if family == "gemma2":
        return transformers.Gemma2Config(num_key_value_heads=2, sliding_window=WINDOW, query_pre_attn_scalar=24,
                                         layer_types=layer_types, **common)
    return transformers.Gemma3TextConfig(
        num_key_value_heads=2, sliding_window=WINDOW, query_pre_attn_scalar=24, layer_types=layer_types,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 50.0}}, **common)


def make_hf_model(family, seed=0):
    """HF model with every parameter (norm weights too) drawn at a scale where a wrong detail shows."""
    import transformers
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_hf_config(family), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """family -> (HF model, folder it was saved to)."""
    cache = {}

    def get(family):
        if family not in cache:
            model = make_hf_model(family)
            folder = tmp_path_factory.mktemp(family)
            model.save_pretrained(folder)
            cache[family] = (model, folder)
        return cache[family]
    return get


@pytest.fixture(scope="session")
def data_dir():
    path = Path(os.environ.get("NANOGSM_DATA_DIR", Path(__file__).parents[1] / ".." / "shared" / "gsm8k"))
    if not (path / "test.jsonl").is_file():
        pytest.fail(f"GSM8K not found at {path}; set NANOGSM_DATA_DIR")
    return path


@pytest.fixture(scope="session")
def tiny_with_tokenizer(tmp_path_factory):
    """A tiny random Gemma 3 with the real 262k vocabulary and the offline model's tokenizer, so the
    scripts run end to end in seconds."""
    import shutil
    import transformers
    from nanogsm.weights import resolve
    source = resolve("gemma-3-270m")
    torch.manual_seed(0)
    config = transformers.Gemma3TextConfig(vocab_size=262144, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=16,
                                           layer_types=["sliding_attention", "full_attention"])
    folder = tmp_path_factory.mktemp("tiny-real-vocab")
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, folder / name)
    return folder
