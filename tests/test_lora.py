"""Self-written LoRA: identity at init, merge, disable, gradients, adapter checks, the closed-form count."""
import json

import pytest
import torch

from conftest import SEQ
from nanogsm.lora import (adapter_config, adapter_state, apply_lora, count_parameters, load_adapter, load_model,
                          lora_disabled, lora_modules, merge_lora, store_base_in)
from nanogsm.model import SHAPES, Gemma, GemmaConfig
from nanogsm.train import IGNORE, collate, token_loss_sum
from nanogsm.weights import save_folder

X = torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(1))


def lora_model(hf_checkpoint, family="gemma3_text", seed=0, **kw):
    torch.manual_seed(seed)
    return apply_lora(Gemma.from_pretrained(hf_checkpoint(family)[1]), **kw)


def randomize_b(model):
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.normal_(0, 0.05)


def test_zero_b_is_exactly_the_base(hf_checkpoint):
    base = Gemma.from_pretrained(hf_checkpoint("gemma3_text")[1])
    model = lora_model(hf_checkpoint, r=4, alpha=8)
    assert len(lora_modules(model)) == 4 * 7
    with torch.no_grad():
        assert torch.equal(model(X), base(X))


def test_merge_equals_unmerged_and_disable_gives_base(hf_checkpoint):
    base = Gemma.from_pretrained(hf_checkpoint("gemma2")[1])
    model = lora_model(hf_checkpoint, "gemma2", r=4, alpha=8)
    randomize_b(model)
    with torch.no_grad():
        adapted = model(X)
        assert (adapted - base(X)).abs().max() > 1e-2  # the adapters do something
        with lora_disabled(model):
            torch.testing.assert_close(model(X), base(X), atol=0, rtol=0)
        merged = merge_lora(model)
        assert not lora_modules(merged)
        torch.testing.assert_close(merged(X), adapted, atol=1e-5, rtol=0)


def test_only_lora_parameters_get_gradients_and_checkpointing_agrees(hf_checkpoint):
    model = lora_model(hf_checkpoint, r=4, alpha=8)
    randomize_b(model)  # with B = 0, A would get no gradient
    ids, labels = collate([(X[0].tolist(), [IGNORE] * 4 + X[0, 4:].tolist()), (X[1, :10].tolist(), X[1, :10].tolist())], 0)
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.grad_checkpointing = checkpointing
        token_loss_sum(model, ids, labels).backward()
        named = dict(model.named_parameters())
        assert all((p.grad is not None) == ("lora_" in n) for n, p in named.items())
        lora_grads = {n: p.grad.clone() for n, p in named.items() if "lora_" in n}
        assert all(g.abs().sum() > 0 for g in lora_grads.values())  # every A and B gets a non-zero gradient
        grads.append(lora_grads)
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)


def test_trainable_count_matches_the_closed_form_for_gemma_2b():
    with torch.device("meta"):
        model = apply_lora(Gemma(GemmaConfig.from_hf(SHAPES["gemma-2b"])), r=16, alpha=32)
    trainable, total = count_parameters(model)
    closed_form = sum(16 * (m.base.in_features + m.base.out_features) for m in lora_modules(model).values())
    assert trainable == closed_form == 19_611_648
    assert total == 2_506_172_416 + trainable


def test_adapter_folder_round_trip_and_wrong_base(hf_checkpoint, tmp_path):
    model = lora_model(hf_checkpoint, r=4, alpha=8, targets=["q_proj", "down_proj"])
    randomize_b(model)
    config = adapter_config(model, hf_checkpoint("gemma3_text")[1])
    assert config["targets"] == ["down_proj", "q_proj"] and config["r"] == 4
    save_folder(tmp_path / "adapter", {"adapter.safetensors": adapter_state(model)},
                {"adapter_config.json": json.dumps(config)})
    loaded = load_model(tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), model(X), atol=0, rtol=0)
    # An adapter onto a base with other shapes fails, naming the module.
    other_cfg = GemmaConfig.from_hf(dict(json.loads((hf_checkpoint("gemma2")[1] / "config.json").read_text()),
                                         intermediate_size=80))
    other = Gemma(other_cfg)
    with pytest.raises(ValueError, match=r"'layers\.0\.mlp\.down_proj\.lora_A' has shape \(4, 96\), the base model's "
                                         r"module needs \(4, 80\)"):
        load_adapter(other, tmp_path / "adapter")
    with pytest.raises(ValueError, match="no linear layer of the model has such a name"):
        apply_lora(Gemma.from_pretrained(hf_checkpoint("gemma")[1]), targets=["qkv"])


def test_bf16_base_under_autocast_is_what_autocast_computes(hf_checkpoint):
    """train_lora.py stores the frozen base in bf16 when it trains under bf16 autocast: the same
    numbers as autocast casting the fp32 base in every forward, so loss and gradients are equal."""
    ids, labels = collate([(X[0].tolist(), [IGNORE] * 4 + X[0, 4:].tolist()), (X[1].tolist(), X[1].tolist())], 0)
    results = []
    for bf16_base in (False, True):
        model = lora_model(hf_checkpoint, "gemma", r=4, alpha=8)
        randomize_b(model)
        if bf16_base:
            store_base_in(model, torch.bfloat16)
            assert all(m.base.weight.dtype == torch.bfloat16 and m.lora_A.dtype == torch.float32
                       for m in lora_modules(model).values())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = token_loss_sum(model, ids, labels)
        loss.backward()
        results.append((loss, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    assert torch.equal(results[0][0], results[1][0])
    for name, grad in results[0][1].items():
        assert torch.equal(grad, results[1][1][name]), name
