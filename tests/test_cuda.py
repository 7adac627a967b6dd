"""GPU-only checks, skipped without CUDA: decode steps replayed from a recorded CUDA graph give
the same tokens and log-probs as plain eager steps, in each dtype setup the project uses; the
training paths that differ on CUDA (flash attention, the fused heads under CUDA autocast)."""
import pytest
import torch

from conftest import FAMILIES, WINDOW
from nanogsm.compile import compile_blocks
from nanogsm.generate import generate
from nanogsm.model import Gemma
from test_generate import PROMPTS, QUEUE

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decode_equals_eager(family, dtype, hf_checkpoint):
    model = Gemma.from_pretrained(hf_checkpoint(family)[1], dtype=dtype, device="cuda")
    n = 3 * WINDOW  # past the sliding window
    assert generate(model, PROMPTS, n) == generate(model, PROMPTS, n, cuda_graph=False)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cuda_graph_under_autocast_with_stops_and_logprobs(temperature, hf_checkpoint):
    """fp32 weights under bf16 autocast, as PPO rollouts run; a stop id ends row 0 early, so the
    batch shrinks and the step is recorded again."""
    model = Gemma.from_pretrained(hf_checkpoint("gemma3_text")[1], device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        free = generate(model, PROMPTS, 12, cuda_graph=False, stop_ids=())[0]
        kw = dict(max_new_tokens=12, stop_ids=[free[4]], temperature=temperature, seed=0, return_logprobs=True)
        graph, eager = generate(model, PROMPTS, **kw), generate(model, PROMPTS, cuda_graph=False, **kw)
    assert graph == eager
    if temperature == 0.0:
        assert len(graph[0][0]) == free.index(free[4]) + 1 < 12  # row 0 stopped early


@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_graph_with_continuous_batching(family, hf_checkpoint):
    """Rows refilled and the cache shifted in place under the recorded step (as on the CPU in
    test_generate, where the outputs are also checked against each prompt alone)."""
    model = Gemma.from_pretrained(hf_checkpoint(family)[1], device="cuda")
    free = generate(model, QUEUE, 3 * WINDOW, cuda_graph=False)
    kw = dict(max_new_tokens=3 * WINDOW, stop_ids=[free[0][3], free[2][2]], batch_size=2, return_logprobs=True)
    (graph, graph_lp), (eager, eager_lp) = generate(model, QUEUE, **kw), generate(model, QUEUE, cuda_graph=False, **kw)
    assert graph == eager == [generate(model, [p], cuda_graph=False, **kw)[0][0] for p in QUEUE]
    torch.testing.assert_close(graph_lp, eager_lp, atol=1e-4, rtol=0)


def test_compiled_blocks_recorded_in_the_cuda_graph_give_the_eager_tokens(hf_checkpoint):
    """Blocks through torch.compile (inductor's kernels, the cache write among them) inside the
    recorded decode step."""
    torch.compiler.reset()
    model = Gemma.from_pretrained(hf_checkpoint("gemma2")[1], device="cuda")
    eager = generate(model, PROMPTS, 2 * WINDOW, cuda_graph=False)
    compile_blocks(model)
    assert generate(model, PROMPTS, 2 * WINDOW) == eager


def test_training_attention_takes_the_flash_kernel_and_is_as_exact_as_the_masked_path(hf_checkpoint):
    """Training calls the model without a pad mask, so full attention is plain causal. Restricted
    to flash attention, SDPA would raise if it could not take that call (GQA included). Under bf16
    autocast its logits and gradients are as close to the fp32 model as the masked path's."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    model = Gemma.from_pretrained(hf_checkpoint("gemma")[1], device="cuda").train()
    x = torch.randint(0, 256, (2, 40), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    results = {}
    for name, pad_mask, backends, bf16 in (("fp32", None, [SDPBackend.MATH], False),
                                           ("flash", None, [SDPBackend.FLASH_ATTENTION], True),
                                           ("masked", torch.ones_like(x), [SDPBackend.EFFICIENT_ATTENTION,
                                                                           SDPBackend.MATH], True)):
        model.zero_grad()
        with sdpa_kernel(backends), torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x, pad_mask=pad_mask).float()
        logits.logsumexp(-1).mean().backward()
        results[name] = (logits, model.layers[0].self_attn.q_proj.weight.grad.clone())
    errors = {name: [((a - ref).norm() / ref.norm()).item() for a, ref in zip(results[name], results["fp32"])]
              for name in ("flash", "masked")}
    assert all(e_flash <= 2 * e_masked + 1e-3 for e_flash, e_masked in zip(*errors.values())), errors


@pytest.mark.parametrize("cap", [None, 2.0])
@pytest.mark.parametrize("bf16", [False, True])
def test_fused_heads_on_cuda_equal_autograd_through_the_plain_formulas(cap, bf16):
    """HeadLoss (SFT; eager and with its chunk arithmetic compiled, as --compile runs it) and HeadScore
    (PPO) run their own gradient arithmetic; here on CUDA, in fp32 and under bf16 autocast, against
    the plain formulas (the CPU tests' checks)."""
    from test_ppo import check_head_score
    from test_train import check_head_loss
    check_head_loss(cap, bf16, "cuda")
    check_head_loss(cap, bf16, "cuda", compiled=True)
    check_head_score(cap, bf16, "cuda")


def test_sft_step_on_cuda_equals_plain_autograd(hf_checkpoint):
    """The training step on CUDA, where the loss and gradient norm come back by an asynchronous copy
    that the optimizer step does not wait for (the CPU test's check)."""
    from test_train import check_sft_step
    check_sft_step(hf_checkpoint("gemma2")[1], "cuda")
