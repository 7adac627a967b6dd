"""nanogsm's Gemma against HF transformers on tiny random checkpoints of each family."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import FAMILIES, SEQ, make_hf_model
from nanogsm.model import Gemma, GemmaConfig, KVCache


def ids(vocab=256, batch=2, seq=SEQ, seed=1):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_hf(family, hf_checkpoint):
    hf, folder = hf_checkpoint(family)
    model = Gemma.from_pretrained(folder)
    x = ids()
    with torch.no_grad():
        ours, ref = model(x), hf(x).logits
    assert ours.shape == (2, SEQ, 256)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("static", [True, False])
@pytest.mark.parametrize("family", FAMILIES)
def test_cached_prefill_equals_plain_forward(family, hf_checkpoint, static):
    """Feeding the sequence in three chunks through a KVCache gives the full-forward logits, whether
    attention reads all the cache's slots (static) or only those written so far."""
    model = Gemma.from_pretrained(hf_checkpoint(family)[1])
    x = ids()
    cache = KVCache(model.config, 2, SEQ + 4, "cpu", torch.float32, static=static)
    with torch.no_grad():
        chunks = [model(x[:, a:b], cache=cache) for a, b in [(0, 10), (10, 11), (11, SEQ)]]
        torch.testing.assert_close(torch.cat(chunks, 1), model(x), atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padding_equals_unpadded(family, hf_checkpoint):
    model = Gemma.from_pretrained(hf_checkpoint(family)[1])
    x = ids(batch=1)
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), x], 1)
    pad_mask = torch.cat([torch.zeros(1, 5, dtype=torch.bool), torch.ones(1, SEQ, dtype=torch.bool)], 1)
    with torch.no_grad():
        torch.testing.assert_close(model(padded, pad_mask=pad_mask)[:, 5:], model(x), atol=1e-4, rtol=0)


def test_sharded_and_single_file_give_same_weights(tmp_path):
    hf = make_hf_model("gemma2")
    hf.save_pretrained(tmp_path / "single")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    a = Gemma.from_pretrained(tmp_path / "single").state_dict()
    b = Gemma.from_pretrained(tmp_path / "sharded").state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_pretrained_loads_in_hf(family, hf_checkpoint, tmp_path):
    import transformers
    model = Gemma.from_pretrained(hf_checkpoint(family)[1])
    model.save_pretrained(tmp_path / "out")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), atol=1e-4, rtol=0)


def test_bf16_load_and_forward(hf_checkpoint):
    model = Gemma.from_pretrained(hf_checkpoint("gemma3_text")[1], dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    with torch.no_grad():
        assert model(ids()).dtype == torch.bfloat16


def test_old_style_config_fields_map_like_new_ones(hf_checkpoint):
    """Pre-transformers-5 Gemma 3 configs use rope_theta / rope_local_base_freq /
    sliding_window_pattern instead of rope_parameters / layer_types."""
    old = {"model_type": "gemma3_text", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
           "num_hidden_layers": 7, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4,
           "rope_theta": 1e6, "rope_local_base_freq": 1e4, "sliding_window": 4,
           "rope_scaling": {"rope_type": "linear", "factor": 8.0}}
    cfg = GemmaConfig.from_hf(old)
    assert cfg.layer_types == ["sliding_attention"] * 5 + ["full_attention", "sliding_attention"]
    assert cfg.rope_theta == {"full_attention": 1e6, "sliding_attention": 1e4}
    assert cfg.rope_scale == 8.0 and cfg.qk_norm and cfg.sandwich_norm
    gemma2 = GemmaConfig.from_hf(dict(old, model_type="gemma2", rope_scaling=None, attn_logit_softcapping=50.0))
    assert gemma2.layer_types[:2] == ["sliding_attention", "full_attention"]
    assert gemma2.rope_theta == {"full_attention": 1e6, "sliding_attention": 1e6}
    assert gemma2.attn_softcap == 50.0 and not gemma2.qk_norm


# ---- bad checkpoints ---------------------------------------------------------------------------

@pytest.fixture
def broken(hf_checkpoint, tmp_path):
    """A writable copy of the tiny gemma3 checkpoint: (folder, its state dict)."""
    src = hf_checkpoint("gemma3_text")[1]
    for f in src.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    return tmp_path, load_file(tmp_path / "model.safetensors")


def test_missing_key_is_named(broken):
    folder, state = broken
    del state["model.layers.2.mlp.up_proj.weight"]
    save_file(state, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing key.*layers\.2\.mlp\.up_proj"):
        Gemma.from_pretrained(folder)


def test_unexpected_key_is_named(broken):
    folder, state = broken
    state["model.layers.9.mlp.up_proj.weight"] = torch.zeros(2)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"unexpected key 'model\.layers\.9\.mlp\.up_proj"):
        Gemma.from_pretrained(folder)


def test_wrong_shape_is_named(broken):
    folder, state = broken
    state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 48)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"k_proj\.weight' has shape \(3, 48\), config expects \(32, 48\)"):
        Gemma.from_pretrained(folder)


def test_truncated_safetensors(broken):
    folder, _ = broken
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors file"):
        Gemma.from_pretrained(folder)


@pytest.mark.parametrize("edit, message", [
    ({"model_type": "llama"}, "model_type 'llama' is not supported"),
    ({"model_type": "gemma3"}, "model_type 'gemma3' is not supported"),  # multimodal wrapper config
    ({"hidden_activation": "relu"}, "hidden activation 'relu'"),
    ({"num_hidden_layers": None}, None),
])
def test_bad_config(broken, edit, message):
    folder, _ = broken
    cfg = json.loads((folder / "config.json").read_text())
    for k, v in edit.items():
        if v is None:
            del cfg[k]
            message = f"missing field '{k}'"
        else:
            cfg[k] = v
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=message):
        Gemma.from_pretrained(folder)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        Gemma.from_pretrained("no-such-model")


@pytest.mark.parametrize("family", ["gemma", "gemma3_text"])
def test_no_pad_mask_takes_plain_causal_attention_with_the_same_result(hf_checkpoint, family):
    """Without a pad mask the full-attention layers call SDPA with is_causal and no mask tensor (its
    flash kernel on CUDA); that must equal the masked path an all-true pad mask takes."""
    model = Gemma.from_pretrained(hf_checkpoint(family)[1])
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x, pad_mask=torch.ones_like(x)), atol=1e-5, rtol=1e-5)
