"""Batched generation with a preallocated KV cache: prefill the prompts, then one token per step.

A batch row takes a prompt by prefilling all but its last token into the cache slots just before
the write slot (`Gemma.forward` derives each row's positions and masks from the cache's `valid`
slots, so a row computes exactly what it would alone); the next decode step feeds the last token.
The start all prompts share (BOS, or a one-shot example) is prefilled once and copied. With more
prompts than rows, a finished row takes the next waiting prompt (continuous batching); when none
waits, finished rows are dropped from the batch (and the cache) once enough of them are done. The
cache shifts its slots left past the oldest row still decoding when it is full, or once those
dead slots are an eighth of it. Sampled tokens take each prompt's own stream of uniform numbers
(`draws`), whatever the batch. `generate_naive` at the end is the plain version it is tested against.
"""
import os

import numpy as np
import torch
import torch.nn.functional as F

from nanogsm.calculator import calculator_tokens, prompt_tail
from nanogsm.cuda_graph import DecodeStep
from nanogsm.model import KVCache


def sample(logits, temperature=0.0, top_k=None, top_p=1.0, u=None):
    """Next token from logits (B, V): greedy at temperature 0, else softmax(logits / T) restricted to
    the top_k tokens and to the smallest set whose probability reaches top_p. u (B,): each row's
    uniform number in [0, 1), float64 (`draws`); None: from torch's generator."""
    if temperature == 0.0:
        return logits.argmax(-1)
    logits = restrict(logits, temperature, top_k, top_p)
    u = torch.rand(len(logits), dtype=torch.float64) if u is None else u  # (B,)
    return inverse_cdf(logits.softmax(-1), u)


def restrict(logits, temperature, top_k=None, top_p=1.0):
    """logits (B, V) / temperature, -inf outside the top_k tokens and outside the smallest set whose
    probability reaches top_p."""
    if temperature != 1.0:  # (PPO's rollouts sample at 1: no copy of the (B, V) logits)
        logits = logits / temperature
    if top_k is not None:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # mass before this token already reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def inverse_cdf(probs, u):
    """The token whose slice of the running sum of probs (B, V) holds u * total, for u (B,) in [0, 1):
    one float64 running sum in two steps, the chunk of 512 tokens u falls in (the running sum of
    the chunks' totals), then the token within it. Every token keeps its width, however small;
    masked tokens have zero width and are never drawn. (One float64 running sum over all 262k
    probabilities writes a float64 copy of them: docs/BENCHMARKS.md#sampling; `generate_naive` uses it.)"""
    (B, V), c = probs.shape, 512
    chunks = (F.pad(probs, (0, -V % c)) if V % c else probs).view(B, -1, c)  # (B, n, c): the last one zero-padded
    totals = chunks.sum(-1).double()  # (B, n)
    ends = totals.cumsum(-1)  # (B, n): the running sum at each chunk's end
    u = u.to(probs.device)[:, None] * ends[:, -1:]  # (B, 1)
    j = torch.searchsorted(ends, u, right=True).clamp(max=ends.shape[1] - 1)  # (B, 1): u's chunk (clamp: rounding)
    share = (u - ends.gather(-1, j)) / totals.gather(-1, j) + 1  # (B, 1): how far into its chunk u lies, in [0, 1)
    within = chunks.gather(1, j[:, :, None].expand(B, 1, c)).squeeze(1).double().cumsum(-1)  # (B, c)
    i = torch.searchsorted(within, share * within[:, -1:], right=True)  # (B, 1): the token in the chunk
    return (j * c + i).squeeze(-1).clamp(max=V - 1)  # (B,) (clamp: rounding at the very end)


GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # splitmix64's increment: 2^64 / the golden ratio


def mix64(x):
    """splitmix64's finalizer (Steele, Lea & Flood 2014): a uint64 numpy array -> well-mixed uint64
    (numpy's uint64 arithmetic wraps mod 2^64)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def draws(keys, steps):
    """Uniform numbers in [0, 1), float64 (b,): for each row the steps-th number of the splitmix64
    stream seeded with its key (uint64 (b,), steps (b,) ints). A number depends on its (key, step)
    alone, not on a generator's state, so a prompt draws the same numbers however the prompts are
    batched, refilled or split over processes (`generate`'s seed). The same tokens too where its
    logits are bit-equal: in another batch they can differ in their last bits, which over a 262k
    vocabulary's long tail can move a draw to a neighbouring token."""
    x = mix64(keys + (np.asarray(steps, dtype=np.uint64) + np.uint64(1)) * GOLDEN)
    return torch.from_numpy((x >> np.uint64(11)).astype(np.float64) * 2.0**-53)  # the top 53 bits


def hash_seed(seed):
    """A uint64 key from an int, or from a list of ints (e.g. [seed, prompt index])."""
    x = np.zeros(1, dtype=np.uint64)
    for part in seed if isinstance(seed, (list, tuple)) else [seed]:
        x = mix64((x ^ np.uint64(part % 2**64)) + GOLDEN)  # (1,): array arithmetic wraps mod 2^64
    return x[0]


@torch.no_grad()
def generate(model, prompts, max_new_tokens, temperature=0.0, top_k=None, top_p=1.0, stop_ids=None, seed=None,
             return_logprobs=False, stop_strings=(), tokenizer=None, calculator=False, cuda_graph=True,
             batch_size=None, on_finish=None):
    """Continue each prompt (a list of token ids) by up to max_new_tokens.

    A row stops after emitting a token in stop_ids (kept in its output), or once its decoded text
    contains one of stop_strings (needs `tokenizer`). stop_ids None: the checkpoint's end-of-sequence
    ids (generation_config.json's, else config.json's), as HF's generate; () never stops early. Returns the new tokens of each prompt and,
    with return_logprobs, their log-probs under the model (log_softmax of the raw logits:
    temperature 1, no top-k/top-p), as the PPO trainer recomputes them.
    batch_size: how many prompts decode together (default: all). With more prompts than that, a
    row that finishes takes the next waiting prompt (continuous batching): the batch stays full
    until the prompts run out, instead of decoding its last unfinished rows alone.
    on_finish: called with a prompt's index when it is done (a progress bar).
    calculator: when a row writes a GSM8K annotation `<<expr=`, the result of expr is forced as
    its next tokens (nanogsm/calculator.py).
    cuda_graph: on CUDA, replay each decode step from a recorded CUDA graph (nanogsm/cuda_graph.py);
    False: eager steps (the same outputs).
    seed (temperature > 0): an int, or a list of one seed per prompt (ints or lists of ints). Prompt
    i samples with the stream of uniform numbers seeded by [seed, i] (or by its own seed), its t-th
    token with the t-th number (`draws`): the same numbers however the prompts are batched, refilled
    or split over processes. None: a seed from torch's generator.
    """
    if (stop_strings or calculator) and tokenizer is None:
        raise ValueError("generate: stop_strings and calculator need a tokenizer")
    if max_new_tokens < 1 or not all(prompts):
        raise ValueError(f"generate: needs max_new_tokens >= 1 (got {max_new_tokens}) and prompts of at least one token")
    if not prompts:
        return ([], []) if return_logprobs else []
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    # Longest first: a prompt taking over a row ends at the write slot, so every later prompt fits
    # before it (the rows still decoding began with prompts at least as long).
    waiting = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    B, P = min(len(prompts), batch_size or len(prompts)), len(prompts[waiting[0]])
    # Fixed shapes (all slots read) where a step is recorded; else only the slots written.
    cache = KVCache(model.config, B, P + max_new_tokens, device, dtype, static=device.type == "cuda")
    cache.pos.fill_(P - 1)  # the first P - 1 slots: for the prompts, all but their last token
    # The prompts' common start (BOS; with a one-shot prompt, the example and the instruction) is
    # prefilled once, in a cache of its own, and copied into each row that takes a prompt.
    C = min(len(os.path.commonprefix(prompts)), min(len(p) for p in prompts) - 1)  # each keeps its last token
    shared = KVCache(model.config, 1, C, device, dtype)
    if C > 0:
        model(torch.tensor([prompts[0][:C]], device=device), cache=shared, last_only=True, head=False)
    if temperature > 0:  # each prompt's stream of uniform numbers (`draws`)
        seed = torch.randint(2**63 - 1, ()).item() if seed is None else seed  # None: torch.manual_seed's
        seeds = list(seed) if isinstance(seed, (list, tuple)) else [[seed, i] for i in range(len(prompts))]
        if len(seeds) != len(prompts):
            raise ValueError(f"generate: seed is a list of {len(seeds)} seeds for {len(prompts)} prompts")
        keys = np.array([hash_seed(s) for s in seeds], dtype=np.uint64)  # (n,)
    stop_ids = model.config.eos_token_ids if stop_ids is None else stop_ids
    stop_ids = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)

    out_tokens, out_logprobs = [[] for _ in prompts], [[] for _ in prompts]
    texts, forced = [""] * len(prompts), [[] for _ in prompts]  # generated text per prompt, calculator tokens to force
    tails = [prompt_tail(p, tokenizer) if calculator else "" for p in prompts]  # '<<' may be in the prompt
    rows, starts = [None] * B, [0] * B  # per batch row: the prompt it decodes, the slot where that prompt starts
    finished = [True] * B  # per batch row: nothing (more) to decode; all rows are free at first
    tokens = torch.zeros(B, dtype=torch.long, device=device)  # per row, the token the next step feeds
    pos = P - 1  # the cache's write slot, as a host number
    step = DecodeStep(model, cache) if cuda_graph and device.type == "cuda" else None  # the GPU decode step
    while True:
        free = [j for j, done in enumerate(finished) if done]
        if free and waiting:  # free rows take waiting prompts: all but the last token prefilled
            free = free[:len(waiting)]
            new, waiting = waiting[:len(free)], waiting[len(free):]
            prefill(model, cache, free, [prompts[r][:-1] for r in new], pos, shared)
            tokens[free] = torch.tensor([prompts[r][-1] for r in new], device=device)  # the next step feeds it
            for j, r in zip(free, new):
                rows[j], starts[j], finished[j] = r, pos - len(prompts[r]) + 1, False
        elif all(finished):
            break
        elif len(free) >= 0.25 * len(rows):  # no prompt waits: drop finished rows so they stop costing compute
            keep = [j for j, done in enumerate(finished) if not done]
            rows, starts, finished = [rows[j] for j in keep], [starts[j] for j in keep], [False] * len(keep)
            keep = torch.tensor(keep, device=device)
            tokens = tokens[keep]
            keep_rows(cache, keep)
        # Drop the slots before the oldest row still decoding when no slot is left (there are some:
        # no row outlives the cache), or once they are an eighth of the cache: on the CPU attention
        # reads all slots up to the write slot.
        first = min(s for s, done in zip(starts, finished) if not done)
        if first > 0 and (pos == cache.valid.shape[1] or 8 * first >= cache.valid.shape[1]):
            shift(cache, first)
            pos, starts = pos - first, [s - first for s in starts]
        # A finished row still in the batch feeds a token marked invalid: no later query attends to it.
        alive = torch.tensor([not done for done in finished], device=device)
        # Each row's uniform number: sent before the step is queued, while the device is idle.
        u = draws(keys[rows], [len(out_tokens[r]) for r in rows]).to(device) if temperature > 0 else None  # (b,)
        if step is not None:
            h = step(tokens, alive)  # (b, d)
        else:
            h = model(tokens[:, None], pad_mask=alive[:, None], cache=cache, head=False)[:, -1]  # (b, d)
        if temperature == 0 and not return_logprobs:
            tokens = model.head.argmax(h, model.embed_tokens.weight)  # (b,)
        else:
            logits = model.logits(h).float()  # (b, V)
            tokens = sample(logits, temperature, top_k, top_p, u)  # (b,)
        pos += 1
        for j, r in enumerate(rows):  # forced calculator tokens replace the sample
            if forced[r] and not finished[j]:
                tokens[j] = forced[r].pop(0)
        logprobs = logits.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1) if return_logprobs else None
        # The step's one wait for the device: its tokens and stop flags (and log-probs) come to the host.
        token_list, stop_list = torch.stack([tokens, torch.isin(tokens, stop_ids)]).tolist()
        logprob_list = logprobs.tolist() if return_logprobs else None
        for j, r in enumerate(rows):
            if finished[j]:
                continue
            out_tokens[r].append(token_list[j])
            if return_logprobs:
                out_logprobs[r].append(logprob_list[j])
            finished[j] = stop_list[j] == 1 or len(out_tokens[r]) == max_new_tokens
            if stop_strings or calculator:
                texts[r] += tokenizer.decode(out_tokens[r][-1:], skip_special=False)
                finished[j] |= any(s in texts[r] for s in stop_strings)
                if calculator and not forced[r]:
                    forced[r] = calculator_tokens(tails[r] + texts[r], tokenizer)
            if finished[j] and on_finish is not None:
                on_finish(r)
    return (out_tokens, out_logprobs) if return_logprobs else out_tokens


def prefill(model, cache, rows, prompts, end, shared):
    """Prefill `prompts` (lists of token ids) into batch rows `rows` (a list) of `cache`, each
    ending at slot `end`. They start with `shared`'s C tokens (a 1-row KVCache), which are copied;
    the rest, right-padded, is computed after them."""
    C = shared.valid.shape[1]
    tails = [p[C:] for p in prompts]  # what each row computes after the shared start
    T = max(len(t) for t in tails)
    block = KVCache(model.config, len(prompts), C + T, cache.valid.device, cache.k[0].dtype)
    for mine, theirs in zip(block.k + block.v, shared.k + shared.v):
        mine[:, :, :C] = theirs  # (n, nkv, C, hd)
    block.valid[:, :C] = True
    block.pos.fill_(C)
    if T > 0:
        x = torch.tensor([t + [0] * (T - len(t)) for t in tails])  # (n, T)
        pad_mask = torch.tensor([[True] * len(t) + [False] * (T - len(t)) for t in tails])  # (n, T)
        model(x.to(block.valid.device), pad_mask=pad_mask.to(block.valid.device), cache=block, last_only=True,
              head=False)
    place(cache, rows, block, [len(p) for p in prompts], end)


# ---- the cache, for continuous batching ----------------------------------------------------------

def keep_rows(cache, rows):
    """Keep only these batch rows of the cache (a LongTensor of indices), e.g. when others finished."""
    cache.k, cache.v, cache.valid = [k[rows] for k in cache.k], [v[rows] for v in cache.v], cache.valid[rows]


def place(cache, rows, block, lengths, end):
    """Batch row rows[i] starts over with the first lengths[i] slots of `block`'s row i (a filled
    KVCache), ending at slot `end`; its other slots turn invalid. In place: a recorded CUDA graph
    keeps reading these tensors."""
    cache.valid[rows] = False
    for i, (row, n) in enumerate(zip(rows, lengths)):
        cache.valid[row, end - n:end] = True
        for mine, theirs in zip(cache.k + cache.v, block.k + block.v):
            mine[row, :, end - n:end] = theirs[i, :, :n]  # (nkv, n, hd)


def shift(cache, n):
    """Move every slot n to the left, dropping the first n (no row still decoding may hold one):
    room at the end for more steps. Positions follow the valid slots, so they stay."""
    for t in cache.k + cache.v:
        t[:, :, :-n] = t[:, :, n:].clone()  # (B, nkv, max_len - n, hd)
    cache.valid[:, :-n] = cache.valid[:, n:].clone()
    cache.valid[:, -n:] = False
    cache.pos -= n


# ---- the reference the engine is tested against --------------------------------------------------

@torch.no_grad()
def generate_naive(model, prompts, max_new_tokens, temperature=0.0, top_k=None, top_p=1.0, stop_ids=None, seed=0,
                   return_logprobs=False):
    """`generate` the plain way, to test it against: one prompt at a time, the whole sequence
    recomputed for every new token (no cache, no batching, no speed layer), the full logits, and
    prompt i sampling its t-th token with the same uniform number (`draws` seeded by [seed, i]) from
    one float64 running sum of its probabilities."""
    device = next(model.parameters()).device
    stop_ids = model.config.eos_token_ids if stop_ids is None else stop_ids
    out_tokens, out_logprobs = [], []
    for i, prompt in enumerate(prompts):
        key = np.array([hash_seed([seed, i])], dtype=np.uint64)
        seq, new, logprobs = list(prompt), [], []
        while len(new) < max_new_tokens:
            logits = model(torch.tensor([seq], device=device))[:, -1].float()  # (1, V): all positions recomputed
            if temperature == 0:
                token = int(logits.argmax())
            else:
                probs = restrict(logits, temperature, top_k, top_p).softmax(-1).double()  # (1, V)
                cdf = probs.cumsum(-1)
                token = int(torch.searchsorted(cdf, draws(key, [len(new)]).to(device)[:, None] * cdf[:, -1:], right=True))
            logprobs.append(logits.log_softmax(-1)[0, token].item())
            seq, new = seq + [token], new + [token]
            if token in stop_ids:
                break
        out_tokens.append(new)
        out_logprobs.append(logprobs)
    return (out_tokens, out_logprobs) if return_logprobs else out_tokens
