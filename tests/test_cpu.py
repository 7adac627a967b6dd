"""The CPU speed layer (nanogsm/cpu.py) gives the plain model's outputs: each swapped module against
the plain products (float64 where exact), and whole models, plain and sped up, side by side."""
import copy

import pytest
import torch

from conftest import FAMILIES, WINDOW, tiny_hf_config
from nanogsm import cpu
from nanogsm.generate import generate
from nanogsm.lora import apply_lora, merge_lora
from nanogsm.model import Gemma, GemmaConfig, LMHead
from nanogsm.train import collate, token_loss_sum

pytestmark = pytest.mark.skipif(not cpu.AVAILABLE, reason="this PyTorch build has no oneDNN")
PROMPTS = [[2, 17, 33, 9, 100, 41, 7], [2, 5, 6], [2, 200, 8, 90, 13], [2, 8, 8, 8], [2]]


@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_equals_float64_products(bias):
    """Output and all three gradients against the same products in float64, for a 3-D input (rows
    flattened) given as a transposed view; without gradients the packed copy gives the same output."""
    g = torch.Generator().manual_seed(0)
    lin = cpu.OneDNNLinear.like(torch.nn.Linear(40, 24, bias=bias))
    x = torch.randn(3, 40, 5, generator=g).transpose(1, 2).requires_grad_()  # (3, 5, 40), a strided view
    grad_y = torch.randn(3, 5, 24, generator=g)
    y = lin(x)
    assert type(y.grad_fn).__name__ == "LinearFnBackward"  # the oneDNN path, not F.linear
    y.backward(grad_y)
    params = [t for t in (x, lin.weight, lin.bias) if t is not None]
    ref = [t.detach().double().requires_grad_() for t in params]
    y_ref = torch.nn.functional.linear(*ref)
    y_ref.backward(grad_y.double())
    torch.testing.assert_close(y.double(), y_ref, atol=1e-5, rtol=1e-5)
    for t, r in zip(params, ref):
        torch.testing.assert_close(t.grad.double(), r.grad, atol=1e-5, rtol=1e-5)
    a, c = torch.randn(40, 7, generator=g), torch.randn(40, 9, generator=g)  # mm_t on transposed views
    torch.testing.assert_close(cpu.mm_t(a.T, c.T).double(), a.T.double() @ c.double(), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(lin(x), y.detach(), atol=1e-5, rtol=1e-5)
        assert lin.packed.copy is not None
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast keeps PyTorch's own (bf16) path
        assert lin(x).dtype == torch.bfloat16 and cpu.mm_t(a.T, c.T).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", cpu.PACKED_DTYPES)
def test_packed_copy_follows_the_weight(dtype):
    """The blocked copy is remade after the weight changes in place (an optimizer step) or is
    replaced: no stale product."""
    lin = cpu.OneDNNLinear.like(torch.nn.Linear(40, 24).to(dtype))
    x = torch.randn(3, 40).to(dtype)
    with torch.no_grad():
        lin(x)
        first = lin.packed.copy
        lin.weight.mul_(2)  # in place, as AdamW updates it
        torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))
        assert lin.packed.copy is not first
        lin.weight = torch.nn.Parameter(torch.randn(24, 40).to(dtype))
        torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))


@pytest.mark.parametrize("dtype", cpu.PACKED_DTYPES)
def test_one_packed_copy_serves_every_batch(dtype):
    """The copy packed by a long prefill serves a decode step's few rows, and the reverse: F.linear's outputs."""
    lin = cpu.OneDNNLinear.like(torch.nn.Linear(40, 24).to(dtype))
    copies = []
    with torch.no_grad():
        for rows in (300, 1, 16, 300):
            x = torch.randn(rows, 40).to(dtype)
            torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))
            copies.append(lin.packed.copy)
    assert all(c is copies[0] for c in copies)


def test_a_model_made_under_inference_mode(hf_checkpoint):
    """Weights loaded inside torch.inference_mode (as bench/ loads them) have no version counter; the
    sped-up model still decodes the plain model's tokens, its linears packed."""
    with torch.inference_mode():
        plain = Gemma.from_pretrained(hf_checkpoint("gemma3_text")[1])
        fast = cpu.speed_up(Gemma.from_pretrained(hf_checkpoint("gemma3_text")[1]))
        assert fast.embed_tokens.weight.is_inference()
        want = generate(plain, PROMPTS, 8, stop_ids=())
        assert generate(fast, PROMPTS, 8, stop_ids=()) == want
        assert fast.layers[0].mlp.up_proj.packed.copy is not None


def sped_up_pair(family, hf_checkpoint):
    plain = Gemma.from_pretrained(hf_checkpoint(family)[1])
    return plain, cpu.speed_up(copy.deepcopy(plain))


@pytest.mark.parametrize("family", FAMILIES)
def test_speed_up_keeps_the_models_outputs(family, hf_checkpoint):
    """Logits, greedy and sampled tokens with log-probs, the training loss and every gradient:
    the sped-up model against the plain one; the state dict is unchanged."""
    plain, fast = sped_up_pair(family, hf_checkpoint)
    assert type(fast.layers[0].mlp.up_proj) is cpu.OneDNNLinear and type(fast.head) is cpu.OneDNNHead
    assert type(fast.layers[0].self_attn) is cpu.KeysAsRowsAttention
    assert fast.state_dict().keys() == plain.state_dict().keys()
    x = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(fast(x), plain(x), atol=1e-5, rtol=1e-5)
    n = 2 * WINDOW
    assert generate(fast, PROMPTS, n, batch_size=2) == generate(plain, PROMPTS, n, batch_size=2)
    kw = dict(temperature=1.0, seed=1, return_logprobs=True)
    (a, a_lp), (b, b_lp) = generate(fast, PROMPTS, n, **kw), generate(plain, PROMPTS, n, **kw)
    assert a == b
    torch.testing.assert_close(a_lp, b_lp, atol=1e-4, rtol=0)
    ids, labels = collate([(list(range(3, 15)), [-100] * 4 + list(range(7, 15)))] * 2, 0)
    for model in (plain, fast):
        model.zero_grad()
        token_loss_sum(model, ids, labels).backward()
    for p, q in zip(plain.parameters(), fast.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4)


def test_speed_up_under_lora_either_order(hf_checkpoint):
    """LoRA applied after the speed-up, or before it: the same logits as plain LoRA, and merging
    puts back a linear that still gives them."""
    plain, fast = sped_up_pair("gemma3_text", hf_checkpoint)
    before = cpu.speed_up(apply_lora(copy.deepcopy(plain), r=2, alpha=4))
    apply_lora(plain, r=2, alpha=4)
    apply_lora(fast, r=2, alpha=4)
    for model in (plain, fast, before):  # the same adapters in all three, B non-zero
        for i, (name, p) in enumerate(n_p for n_p in model.named_parameters() if "lora_" in n_p[0]):
            p.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(i))
    x = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = plain(x)
        torch.testing.assert_close(fast(x), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(before(x), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(merge_lora(fast)(x), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("V, chunks", [(262144, 512), (4096, 512), (4000, 512), (64, 512)])
def test_chunked_topk_is_topk(V, chunks):
    """The top 16 through chunk maxima are torch.topk's values, ties included (bf16 logits have many),
    and the indices point at them; with the top values crowded into one chunk, and spread."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, V, generator=g).bfloat16()
    a[1, :40] += 10  # the best 40 in the first chunks
    a[2] = a[2].round()  # a few distinct values: ties across chunks
    a[3, -1] = 100  # the best in the last chunk
    k = min(16, V)
    top, idx = cpu.chunked_topk(a, k, chunks)
    ref = a.topk(k, dim=-1).values
    assert torch.equal(top, ref)
    assert torch.equal(a.gather(-1, idx), top)
    assert all(len(set(row)) == k for row in idx.tolist())  # k distinct indices


def test_screened_argmax_is_the_fp32_argmax(monkeypatch):
    """Greedy tokens through the bf16 screen of the head are the fp32 head's argmax. Three kinds of
    rows: near one token (the screen's top 16 hold it); near a pair of tokens 1e-4 apart, which bf16
    logits rank at random (the exact logits of the top 16 decide); near a cluster of 40 such
    tokens, whose best the bf16 top 16 may miss (the bound sends these rows to the fp32 head)."""
    cfg = GemmaConfig.from_hf(dict(tiny_hf_config("gemma3_text").to_dict(), vocab_size=4096))
    d = cfg.hidden_size
    g = torch.Generator().manual_seed(0)
    w = torch.randn(cfg.vocab_size, d, generator=g) / d ** 0.5  # rows of norm ~1, as in Gemma
    w[101] = w[100] + 1e-4 * torch.randn(d, generator=g)  # a pair
    w[200:240] = w[200] + 1e-4 * torch.randn(40, d, generator=g)  # a cluster
    near = torch.tensor([7] * 8 + [100] * 8 + [200] * 8)
    h = 30 * w[near] + 0.3 * torch.randn(24, d, generator=g)  # (24, d): logits ~30 at the top
    ref = LMHead()(h, w).argmax(-1)
    bf16 = (h.bfloat16() @ w.bfloat16().T).argmax(-1)
    full_head, mm_t = [], cpu.mm_t
    monkeypatch.setattr(cpu, "mm_t", lambda a, b: (full_head.append(len(a)), mm_t(a, b))[1])
    with torch.no_grad():  # (OneDNNHead.argmax takes it where the CPU packs bf16; here called directly)
        tokens = cpu.screened_argmax(cpu.OneDNNHead(), h, w)
    assert torch.equal(tokens, ref)
    assert (bf16[8:] != ref[8:]).sum() >= 4  # bf16 logits alone pick other tokens
    assert full_head == [8]  # the cluster's rows, and only those
