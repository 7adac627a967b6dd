"""Self-written LoRA: identity at init, merge, disable, gradients, adapter checks, the closed-form count,
PEFT's adapter format both ways (PEFT is the test-only reference)."""
import copy
import json

import pytest
import torch

from conftest import SEQ
from nanogsm.lora import (ADAPTER_WEIGHTS, adapter_config, adapter_state, apply_lora, count_parameters, load_adapter, load_model,
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
        torch.testing.assert_close(merged(X), adapted, atol=1e-5, rtol=1e-5)  # W + BA rounds apart from Wx + BAx


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


def save_adapter(model, folder, base):
    save_folder(folder, {ADAPTER_WEIGHTS: adapter_state(model)}, {"adapter_config.json": json.dumps(adapter_config(model, base))})
    return folder


def test_adapter_folder_round_trip_and_wrong_base(hf_checkpoint, tmp_path):
    model = lora_model(hf_checkpoint, r=4, alpha=8, targets=["q_proj", "down_proj"])
    randomize_b(model)
    config = adapter_config(model, hf_checkpoint("gemma3_text")[1])
    assert config["target_modules"] == ["down_proj", "q_proj"] and config["r"] == 4 and config["peft_type"] == "LORA"
    loaded = load_model(save_adapter(model, tmp_path / "adapter", hf_checkpoint("gemma3_text")[1]))
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


def test_the_earlier_adapter_format_still_loads(hf_checkpoint, tmp_path):
    """adapter.safetensors with our module names + {base_model, r, alpha, targets}."""
    model = lora_model(hf_checkpoint, r=4, alpha=8, targets=["v_proj"])
    randomize_b(model)
    state = {k.removeprefix("base_model.model.model.").removesuffix(".weight"): v for k, v in adapter_state(model).items()}
    config = {"base_model": str(hf_checkpoint("gemma3_text")[1]), "r": 4, "alpha": 8, "targets": ["v_proj"]}
    save_folder(tmp_path / "old", {"adapter.safetensors": state}, {"adapter_config.json": json.dumps(config)})
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "old")(X), model(X), atol=0, rtol=0)


def hf_logits(hf_model, x=X):
    with torch.no_grad():
        return hf_model(input_ids=x).logits


@pytest.mark.parametrize("family", ["gemma", "gemma3_text"])
def test_peft_loads_a_nanogsm_adapter_to_the_same_logits(family, hf_checkpoint, tmp_path):
    peft = pytest.importorskip("peft")
    hf, folder = hf_checkpoint(family)
    model = lora_model(hf_checkpoint, family, r=4, alpha=8)
    randomize_b(model)
    save_adapter(model, tmp_path / "adapter", folder)
    wrapped = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "adapter").eval()
    with torch.no_grad():
        ours = model(X)
    torch.testing.assert_close(hf_logits(wrapped), ours, atol=1e-5, rtol=1e-5)
    assert (ours - hf_logits(hf)).abs().max() > 1e-2  # the adapter matters


@pytest.mark.parametrize("kw", [{}, dict(r=4, lora_alpha=16, use_rslora=True, target_modules=["o_proj", "gate_proj"]),
                                dict(r=2, lora_alpha=4, target_modules=r".*layers\.[01]\.self_attn\.(q|k)_proj")],
                         ids=["peft-defaults", "rslora", "regex"])
def test_nanogsm_loads_a_peft_adapter_to_peft_logits(kw, hf_checkpoint, tmp_path):
    """PEFT's defaults (r 8, alpha 8, q/v), rsLoRA's alpha / sqrt(r), a regex over module names."""
    peft = pytest.importorskip("peft")
    hf, folder = hf_checkpoint("gemma3_text")
    wrapped = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(task_type="CAUSAL_LM", **kw))
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    wrapped.save_pretrained(tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(folder)  # PEFT records the HF config's name; here the folder
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(config))
    ours = load_model(tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(ours(X), hf_logits(wrapped.eval()), atol=1e-5, rtol=1e-5)
    assert {m.rslora for m in lora_modules(ours).values()} == {kw.get("use_rslora", False)}


def test_merged_adapter_loads_in_hf_to_the_same_logits(hf_checkpoint, tmp_path):
    import transformers
    model = lora_model(hf_checkpoint, r=4, alpha=8)
    randomize_b(model)
    with torch.no_grad():
        adapted = model(X)
    merge_lora(model).save_pretrained(tmp_path / "merged")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    torch.testing.assert_close(hf_logits(hf), adapted, atol=1e-4, rtol=1e-5)
    # generation_config.json names the stop ids, so HF's generate stops where nanogsm's does
    eos = transformers.GenerationConfig.from_pretrained(tmp_path / "merged").eos_token_id
    assert (eos if isinstance(eos, list) else [eos]) == model.config.eos_token_ids != []


@pytest.mark.parametrize("field, value, message", [
    ("use_dora", True, "use_dora = True is not supported"),
    ("modules_to_save", ["lm_head"], "modules_to_save = \\['lm_head'\\] is not supported"),
    ("target_modules", ["embed_tokens", "q_proj"], "not of the embedding or the head"),
    ("peft_type", "IA3", "peft_type = 'IA3' is not supported"),
])
def test_unsupported_peft_adapters_are_one_line(field, value, message, hf_checkpoint, tmp_path):
    model = lora_model(hf_checkpoint, r=4, alpha=8)
    folder = save_adapter(model, tmp_path / "adapter", hf_checkpoint("gemma3_text")[1])
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(dict(config, **{field: value})))
    with pytest.raises(ValueError, match=message):
        load_model(folder)


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
