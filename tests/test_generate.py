"""The KV-cache engine against HF transformers' greedy generate and against full recomputes."""
import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from conftest import FAMILIES, WINDOW
import nanogsm.generate as engine
from nanogsm.compile import compile_blocks
from nanogsm.generate import draws, generate, generate_naive, hash_seed, inverse_cdf, sample
from nanogsm.model import Gemma, KVCache

PROMPTS = [[2, 17, 33, 9, 100, 41, 7], [2, 5, 6], [2, 200, 1 + 7, 90, 13]]
QUEUE = PROMPTS + [[2, 8, 8, 8], [2, 150, 4, 4, 4, 4, 4, 4, 4, 4], [2]]  # more prompts than rows, not longest first


def hf_greedy(hf, prompt, n):
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_hf_generate_past_the_window(family, hf_checkpoint):
    hf, folder = hf_checkpoint(family)
    model = Gemma.from_pretrained(folder)
    n = 3 * WINDOW  # runs well past the sliding window
    ours = generate(model, PROMPTS, max_new_tokens=n, stop_ids=())  # HF below: eos_token_id=None
    for prompt, row in zip(PROMPTS, ours):
        assert row == hf_greedy(hf, prompt, n)


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_lengths_batch_equals_each_alone(family, hf_checkpoint):
    model = Gemma.from_pretrained(hf_checkpoint(family)[1])
    batch = generate(model, PROMPTS, max_new_tokens=12)
    assert batch == [generate(model, [p], max_new_tokens=12)[0] for p in PROMPTS]


SHARED = [[2, 9, 14, 7, 30, 31, 5, 6, 9, 11] + tail for tail in ([4], [8, 1, 3], [], [40, 41, 42, 43, 44, 45], [3, 3])]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prompts", [QUEUE, SHARED], ids=["queue", "shared-start"])
def test_continuous_batching_equals_each_alone(family, prompts, hf_checkpoint, monkeypatch):
    """Prompts through two rows: a finished row takes the next waiting prompt, and a full cache
    shifts left (past the sliding window); tokens and log-probs as each prompt alone. With a
    common start longer than the window (as a one-shot prompt has), it is prefilled once."""
    model = Gemma.from_pretrained(hf_checkpoint(family)[1])
    n = 3 * WINDOW
    free = [generate(model, [p], n)[0] for p in prompts]
    stop = [free[0][3], free[2][2]]  # some rows stop early, others run to n
    alone = [generate(model, [p], n, stop_ids=stop, return_logprobs=True) for p in prompts]
    assert len({len(tokens[0]) for tokens, _ in alone}) >= 2
    shifts, done = [], []
    monkeypatch.setattr(engine, "shift", lambda cache, k, shift=engine.shift: (shifts.append(k), shift(cache, k)))
    tokens, logprobs = generate(model, prompts, n, stop_ids=stop, return_logprobs=True, batch_size=2,
                                on_finish=done.append)
    assert tokens == [t[0] for t, _ in alone]
    torch.testing.assert_close(logprobs, [lp[0] for _, lp in alone], atol=1e-4, rtol=0)
    assert shifts and sorted(done) == list(range(len(prompts)))


def test_compiled_blocks_give_the_eager_tokens(hf_checkpoint):
    """--compile's blocks (CPU inductor here) in prefill and decode, the cache write inside them: no
    graph break, and a second call compiles nothing new."""
    torch.compiler.reset()  # recompile budgets are per process: other tests compile these blocks too
    counters.clear()
    folder = hf_checkpoint("gemma2")[1]
    eager = generate(Gemma.from_pretrained(folder), PROMPTS, 2 * WINDOW)
    model = Gemma.from_pretrained(folder)  # compiled before its first call
    compile_blocks(model)
    assert generate(model, PROMPTS, 2 * WINDOW) == eager
    graphs = counters["stats"]["unique_graphs"]
    assert generate(model, PROMPTS, 2 * WINDOW) == eager
    assert counters["stats"]["unique_graphs"] == graphs and not counters["graph_break"]
    assert all(b._compiled_call_impl is not None for b in model.layers)


@pytest.mark.parametrize("static", [True, False])
def test_cached_decode_logits_equal_full_recompute(hf_checkpoint, static):
    """A static cache's attention reads all its slots, the other only those written so far."""
    model = Gemma.from_pretrained(hf_checkpoint("gemma2")[1])
    seq = torch.tensor([PROMPTS[0] + [3] * 20])  # longer than the window
    cache = KVCache(model.config, 1, seq.shape[1] + 5, "cpu", torch.float32, static=static)
    with torch.no_grad():
        model(seq[:, :7], cache=cache)
        steps = [model(seq[:, t:t + 1], cache=cache)[0, -1] for t in range(7, seq.shape[1])]
        full = model(seq)[0, 7:]
    torch.testing.assert_close(torch.stack(steps), full, atol=1e-4, rtol=0)
    assert cache.read_len(1) == (seq.shape[1] + 5 if static else seq.shape[1] + 1)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_logprobs_equal_full_forward(hf_checkpoint, temperature):
    model = Gemma.from_pretrained(hf_checkpoint("gemma3_text")[1])
    tokens, logprobs = generate(model, PROMPTS, max_new_tokens=10, temperature=temperature, seed=0,
                                return_logprobs=True)
    for prompt, new, lp in zip(PROMPTS, tokens, logprobs):
        seq = torch.tensor([prompt + new])
        with torch.no_grad():
            ref = model(seq)[0, len(prompt) - 1:-1].log_softmax(-1).gather(-1, torch.tensor(new)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(lp), ref, atol=1e-4, rtol=0)


def test_stop_ids_end_rows_and_are_kept(hf_checkpoint):
    model = Gemma.from_pretrained(hf_checkpoint("gemma")[1])
    free = generate(model, PROMPTS, max_new_tokens=12, stop_ids=())  # (): no stop, not even EOS
    stop = free[0][4]  # the fifth token of row 0 becomes a stop id
    stopped = generate(model, PROMPTS, max_new_tokens=12, stop_ids=[stop])
    for row_free, row in zip(free, stopped):
        cut = row_free.index(stop) + 1 if stop in row_free else len(row_free)
        assert row == row_free[:cut]
    assert len(stopped[0]) <= 5


def test_seeded_sampling_is_reproducible(hf_checkpoint):
    model = Gemma.from_pretrained(hf_checkpoint("gemma")[1])
    a = generate(model, PROMPTS, max_new_tokens=10, temperature=1.0, seed=3)
    assert a == generate(model, PROMPTS, max_new_tokens=10, temperature=1.0, seed=3)
    assert a != generate(model, PROMPTS, max_new_tokens=10, temperature=1.0, seed=4)


def splitmix64(state, n):
    """The first n outputs of splitmix64 (Steele, Lea & Flood 2014) in plain Python integers."""
    out, m = [], 2**64 - 1
    for _ in range(n):
        state = (state + 0x9E3779B97F4A7C15) & m
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
        out.append(z ^ (z >> 31))
    return out


def test_draws_are_splitmix64_streams():
    """Row i's t-th draw is the t-th output of the splitmix64 stream seeded with its key, its top
    53 bits over 2^53; the numbers are uniform (deciles of 200,000 draws)."""
    keys = [int(hash_seed(s)) for s in (0, 1, [0, 5], [7, 5], -3)]
    assert len(set(keys)) == 5
    for key in keys:
        ref = [(z >> 11) / 2**53 for z in splitmix64(key, 40)]
        got = [draws(np.array([key] * 40, dtype=np.uint64), range(40))[t].item() for t in range(40)]
        assert got == ref
    u = draws(np.repeat(np.array(keys, dtype=np.uint64), 40_000), np.tile(np.arange(40_000), 5))
    assert u.dtype == torch.float64 and 0 <= u.min() and u.max() < 1
    counts = torch.histc(u, bins=10, min=0, max=1)
    assert ((counts - 20_000).abs() < 600).all()  # ~4.2 standard deviations


def test_seeded_sampling_is_the_same_however_prompts_are_batched(hf_checkpoint):
    """Each prompt draws from its own stream, so its tokens do not depend on which rows share its
    steps: all at once, two rows refilled as they finish, and each alone with its seed [seed, i].
    (Here, over 256 tokens. Over Gemma's 262k, the logits' last-bit differences between batches
    can move a draw in the long tail: docs/BENCHMARKS.md.)"""
    model = Gemma.from_pretrained(hf_checkpoint("gemma3_text")[1])
    kw = dict(max_new_tokens=12, temperature=1.0, seed=5)
    stop = generate(model, QUEUE, **kw)[0][2:4]  # some rows stop early
    together = generate(model, QUEUE, stop_ids=stop, **kw)
    assert len({len(t) for t in together}) >= 2
    assert generate(model, QUEUE, stop_ids=stop, batch_size=2, **kw) == together
    assert [generate(model, [p], stop_ids=stop, max_new_tokens=12, temperature=1.0, seed=[[5, i]])[0]
            for i, p in enumerate(QUEUE)] == together


def test_sampling_follows_the_softmax_down_to_its_tail():
    """Draw frequencies against the probabilities: 20,000 draws of 4 tokens, and a 65,536-token
    row whose first token holds 99.9% and whose other tokens share 0.1% (1.5e-8 each)."""
    g = torch.Generator().manual_seed(0)
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    draws = sample(probs.log().expand(20_000, 4), 1.0, u=torch.rand(20_000, generator=g, dtype=torch.float64))
    torch.testing.assert_close(torch.bincount(draws, minlength=4) / 20_000, probs, atol=0.015, rtol=0)
    tail = torch.full((64, 65_536), 0.001 / 65_535)
    tail[:, 0] = 0.999
    hits = sum((sample(tail.log(), 1.0, u=torch.rand(64, generator=g, dtype=torch.float64)) > 0).sum().item()
               for _ in range(200))
    assert 3 <= hits <= 30  # 12,800 draws, 12.8 expected


def test_sampling_draws_what_one_running_sum_draws():
    """`sample` finds its uniform number chunk by chunk; one float64 running sum over the whole row,
    fed the same uniform numbers, draws the same tokens (vocabularies with and without a partial
    last chunk, top-k masks included)."""
    for V, top_k in ((2048, None), (1000, None), (1000, 50)):
        logits = torch.randn(64, V, generator=torch.Generator().manual_seed(V)) * 3
        g, g_ref = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
        for _ in range(20):
            ref_logits = logits
            if top_k is not None:
                ref_logits = logits.masked_fill(logits < logits.topk(top_k, dim=-1).values[:, -1:], float("-inf"))
            cdf = ref_logits.softmax(-1).double().cumsum(-1)  # (64, V)
            u = torch.rand(64, generator=g_ref, dtype=torch.float64)[:, None] * cdf[:, -1:]
            expected = torch.searchsorted(cdf, u, right=True).squeeze(-1)
            assert torch.equal(sample(logits, 1.0, top_k=top_k, u=torch.rand(64, generator=g, dtype=torch.float64)),
                               expected)


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = lambda **kw: {sample(logits, 1.0, u=torch.rand(1, generator=g, dtype=torch.float64), **kw).item()  # noqa: E731
                          for _ in range(300)}
    assert draws(top_k=2) == {0, 1}
    assert draws(top_p=0.7) == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 reaches it
    assert draws(top_p=0.5) == {0}
    assert draws() == {0, 1, 2, 3}
    assert sample(logits).item() == 0


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kw", [{}, dict(temperature=1.0), dict(temperature=0.7, top_k=20, top_p=0.9)],
                         ids=["greedy", "sampled", "top-k-top-p"])
def test_engine_equals_naive_generate(family, kw, hf_checkpoint):
    """The engine (cache, shared-start prefill, continuous batching over 2 rows, cache shifts)
    against `generate_naive`, which recomputes the whole sequence for every token: the same tokens,
    stops and log-probs, greedy and sampled with the same per-prompt draws."""
    model = Gemma.from_pretrained(hf_checkpoint(family)[1])
    n = 2 * WINDOW
    stop = [generate_naive(model, [QUEUE[0]], n, seed=5, **kw)[0][3]]  # prompt 0's fourth token
    naive, naive_lp = generate_naive(model, QUEUE, n, stop_ids=stop, seed=5, return_logprobs=True, **kw)
    tokens, logprobs = generate(model, QUEUE, n, stop_ids=stop, seed=5, return_logprobs=True, batch_size=2, **kw)
    assert tokens == naive
    assert len({len(t) for t in tokens}) >= 2  # some rows stopped
    torch.testing.assert_close(logprobs, naive_lp, atol=1e-4, rtol=0)


def test_two_step_inverse_cdf_equals_one_running_sum():
    """`inverse_cdf`'s chunked running sum picks the token one float64 running sum over the whole
    vocabulary picks, masked (zero) tokens never, at u near 0, near 1 and in between."""
    g = torch.Generator().manual_seed(0)
    probs = torch.randn(64, 3000, generator=g).mul(3).softmax(-1)  # 3000: not a multiple of 512
    probs[:, ::7] = 0
    u = torch.rand(64, generator=g, dtype=torch.float64)
    u[:2] = torch.tensor([0.0, 1 - 2**-53], dtype=torch.float64)
    cdf = probs.double().cumsum(-1)
    ref = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0].clamp(max=2999)
    got = inverse_cdf(probs, u)
    assert torch.equal(got, ref)
    assert (probs.gather(-1, got[:, None]) > 0).all()
