"""Batched sampling with a preallocated KV cache: prefills, then one-token decode steps.

A batch row takes a prompt by prefilling all but its last token into the cache slots just before
the write slot (`Gemma.forward` derives each row's positions and masks from the cache's `valid`
slots, so a row computes exactly what it would alone); the next decode step feeds the last token.
The start all prompts share (BOS, or a one-shot example) is prefilled once and copied. With more
prompts than rows, a finished row takes the next waiting prompt (continuous batching); when none
waits, finished rows are dropped from the batch (and the cache) once enough of them are done. The
cache shifts its slots left past the oldest row still decoding when it is full, or once those
dead slots are an eighth of it. On CUDA each decode step is replayed from a recorded CUDA graph
(`DecodeStep`). The decode steps read each layer's q/k/v and gate/up weights concatenated, and on
the CPU oneDNN's blocked copies of the fp32 or bf16 weights (`decode_weights`); on the CPU they
attend only to the cache slots written so far (a non-static `KVCache`), and greedy tokens from
fp32 weights come from the head in bf16, checked against an error bound (`screened_argmax`).
Sampled tokens take each prompt's own stream of uniform numbers (`draws`), whatever the batch.
"""
import os

import numpy as np
import torch
import torch.nn.functional as F

from nanogsm.model import KVCache, decode_weights, packed_linear


def sample(logits, temperature=0.0, top_k=None, top_p=1.0, u=None):
    """Next token from logits (B, V): greedy at temperature 0, else softmax(logits / T) restricted to
    the top_k tokens and to the smallest set whose probability reaches top_p. u (B,): each row's
    uniform number in [0, 1), float64 (`draws`); None: from torch's generator."""
    if temperature == 0.0:
        return logits.argmax(-1)
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
    # Inverse-CDF sampling: one uniform number per row, found in the running sum of the row's
    # probabilities, in two steps: the chunk of 512 tokens it falls in (the running sum of the
    # chunks' totals), then the token within that chunk (its probabilities' running sum in float64:
    # every token keeps its width, however small). Masked tokens have zero width and are never
    # drawn. One float64 running sum over all 16 x 262k probabilities took 23-26 ms on the 2-core CPU,
    # half of it writing its float64 copy (docs/BENCHMARKS.md); torch.multinomial, which draws one
    # random number per vocabulary entry, 31-78 ms.
    probs = logits.softmax(-1)  # (B, V)
    (B, V), c = probs.shape, 512
    chunks = (F.pad(probs, (0, -V % c)) if V % c else probs).view(B, -1, c)  # (B, n, c): the last one zero-padded
    totals = chunks.sum(-1).double()  # (B, n)
    ends = totals.cumsum(-1)  # (B, n): the running sum at each chunk's end
    u = torch.rand(B, dtype=torch.float64) if u is None else u  # (B,)
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
    vocabulary's long tail can move a draw to a neighbouring token (docs/BENCHMARKS.md)."""
    x = mix64(keys + (np.asarray(steps, dtype=np.uint64) + np.uint64(1)) * GOLDEN)
    return torch.from_numpy((x >> np.uint64(11)).astype(np.float64) * 2.0**-53)  # the top 53 bits


def hash_seed(seed):
    """A uint64 key from an int, or from a list of ints (e.g. [seed, prompt index])."""
    x = np.zeros(1, dtype=np.uint64)
    for part in seed if isinstance(seed, (list, tuple)) else [seed]:
        x = mix64((x ^ np.uint64(part % 2**64)) + GOLDEN)  # (1,): array arithmetic wraps mod 2^64
    return x[0]


def screened_argmax(model, h, k=16):
    """The greedy tokens, argmax of model.logits(h), for hidden states h (b, d) -> (b,), with the
    fp32 head skipped where it can be; needs `model.screen` (`decode_weights(greedy=True)`).

    The head's 262k x 640 product is ~45% of a batch-16 decode step of Gemma 3 270M on the 2-core
    CPU, and half that in bf16 (docs/BENCHMARKS.md). Logits `a` from h and the head rounded to
    bf16 differ from the fp32 logits by at most
        e = (2^-7 + 2^-12) |h| max_v |w_v|  +  2^-7 |a|
    (h and w_v each rounded at a relative 2^-8, fp32 sums of d products, Cauchy-Schwarz; then `a`
    itself rounded to bf16, |a| the larger of the first and the k-th). So when the k-th largest `a`
    is more than 2e below the largest, the best token is among those k, and their exact fp32
    logits pick it; other rows get the full fp32 head. (Gemma 2's final soft-cap is monotone: the
    argmax of the raw logits is the same.)"""
    head, w_max = model.screen
    a = packed_linear(h.bfloat16(), head, None)  # (b, V) in bf16
    top, idx = chunked_topk(a, k)  # (b, k), largest first
    top = top.float()
    e = (2**-7 + 2**-12) * h.norm(dim=-1) * w_max + 2**-7 * top[:, [0, -1]].abs().amax(-1)  # (b,)
    exact = (model.embed_tokens.weight[idx] @ h[:, :, None]).squeeze(-1)  # (b, k, d) @ (b, d, 1) -> (b, k)
    tokens = idx.gather(-1, exact.argmax(-1, keepdim=True)).squeeze(-1)  # (b,)
    unsure = top[:, -1] >= top[:, 0] - 2 * e  # (b,)
    if unsure.any():
        tokens[unsure] = model.logits(h[unsure]).argmax(-1)
    return tokens


def chunked_topk(a, k, chunks=512):
    """a.topk(k) over the last dim of a (b, V): values (b, k), largest first, and their indices,
    found in two small steps. The k largest values lie in the k chunks (of `chunks` equal chunks)
    with the largest maxima: a value in any other chunk is at most its chunk's maximum, which is
    at most the k-th largest of those maxima. Over Gemma's 262k logits in bf16, 16 rows, k 16:
    1.1 ms against 3.6 ms for one topk (docs/BENCHMARKS.md). Ties may pick other indices of the
    same values. A vocabulary that does not split into `chunks` equal chunks, or k > chunks: one topk."""
    b, V = a.shape
    if V % chunks or k > chunks:
        return a.topk(min(k, V), dim=-1)
    n = V // chunks  # values per chunk
    _, best = a.view(b, chunks, n).amax(-1).topk(k, dim=-1)  # (b, k): the chunks with the largest maxima
    idx = (best[:, :, None] * n + torch.arange(n, device=a.device)).view(b, k * n)  # (b, k*n): their values' indices
    top, j = a.gather(-1, idx).topk(k, dim=-1)  # (b, k)
    return top, idx.gather(-1, j)


class DecodeStep:
    """One decode step: tokens (b,) -> next-token logits (b, V) in fp32 (head=False: the final
    hidden states (b, d), for `screened_argmax`), each token written to its row's next cache slot
    (alive False: the token is marked invalid, see `generate`).

    On CUDA the step is recorded once as a CUDA graph and then replayed. A decode step of a small
    batch is ~50 small kernels per layer whose launch cost exceeds their run time; a replay
    launches all of them at once (gemma-2b, batch 1, H200: 3.6x faster steps; with compiled
    blocks the recording holds their fused kernels, 5.5x; docs/BENCHMARKS.md). It can be
    recorded because the forward reads no value back to the host (see KVCache). The tokens and
    alive flags are copied into the recorded input tensors, and the logits come back in the
    recorded output tensor (overwritten by the next step). After `cache.keep` the cache tensors
    are new, so the step is recorded again for the smaller batch.
    """

    def __init__(self, model, cache, cuda_graph=True, head=True):
        self.model, self.cache, self.graph, self.head = model, cache, None, head
        self.cuda_graph = cuda_graph and cache.valid.is_cuda

    def forward(self, tokens, alive):  # head=False: the final hidden states (b, d) instead
        return self.model(tokens[:, None], pad_mask=alive[:, None], cache=self.cache, head=self.head)[:, -1].float()

    def __call__(self, tokens, alive):
        if not self.cuda_graph:
            return self.forward(tokens, alive)
        if self.graph is None or self.recorded_k is not self.cache.k:
            self.record(tokens, alive)
        self.tokens.copy_(tokens)
        self.alive.copy_(alive)
        self.graph.replay()
        return self.logits

    def record(self, tokens, alive):
        self.graph = self.logits = None  # free the previous recording's memory
        self.tokens, self.alive, pos = tokens.clone(), alive.clone(), self.cache.pos.clone()
        side = torch.cuda.Stream()  # one eager run first, on a side stream, so that lazy setup
        side.wait_stream(torch.cuda.current_stream())  # (kernel loading, library handles) is
        with torch.cuda.stream(side):  # not recorded
            self.forward(self.tokens, self.alive)
        torch.cuda.current_stream().wait_stream(side)
        self.cache.pos.copy_(pos)  # undo its step: the replay rewrites the same slot
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):  # records the kernels without running them
            self.logits = self.forward(self.tokens, self.alive)
        self.recorded_k = self.cache.k


@torch.no_grad()
def generate(model, prompts, max_new_tokens, temperature=0.0, top_k=None, top_p=1.0, stop_ids=(), seed=None,
             return_logprobs=False, stop_strings=(), tokenizer=None, calculator=False, cuda_graph=True,
             batch_size=None, on_finish=None):
    """Continue each prompt (a list of token ids) by up to max_new_tokens.

    A row stops after emitting a token in stop_ids (kept in its output), or once its decoded text
    contains one of stop_strings (needs `tokenizer`). Returns the new tokens of each prompt and,
    with return_logprobs, their log-probs under the model (log_softmax of the raw logits:
    temperature 1, no top-k/top-p), as the PPO trainer recomputes them.
    batch_size: how many prompts decode together (default: all). With more prompts than that, a
    row that finishes takes the next waiting prompt (continuous batching): the batch stays full
    until the prompts run out, instead of decoding its last unfinished rows alone.
    on_finish: called with a prompt's index when it is done (a progress bar).
    calculator: when a row writes a GSM8K annotation `<<expr=`, the result of expr (see
    `nanogsm.gsm8k.calculate`) is forced as its next tokens, as in the GSM8K paper.
    cuda_graph=False: plain eager decode steps on CUDA too (to compare; the outputs are the same).
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
    stop_ids = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)

    out_tokens, out_logprobs = [[] for _ in prompts], [[] for _ in prompts]
    texts, forced = [""] * len(prompts), [[] for _ in prompts]  # generated text per prompt, calculator tokens to force
    tails = [tokenizer.decode(p[-16:], skip_special=False) if calculator else "" for p in prompts]  # '<<' may be in the prompt
    rows, starts = [None] * B, [0] * B  # per batch row: the prompt it decodes, the slot where that prompt starts
    finished = [True] * B  # per batch row: nothing (more) to decode; all rows are free at first
    tokens = torch.zeros(B, dtype=torch.long, device=device)  # per row, the token the next step feeds
    pos = P - 1  # the cache's write slot, as a host number
    # Fused projections; on this CPU oneDNN's blocked weights, and for greedy tokens a bf16 head.
    with decode_weights(model, B, greedy=temperature == 0 and not return_logprobs):
        step_fn = DecodeStep(model, cache, cuda_graph, head=model.screen is None)
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
                cache.keep(keep)
            # Drop the slots before the oldest row still decoding when no slot is left (there are some:
            # no row outlives the cache), or once they are an eighth of the cache: on the CPU attention
            # reads all slots up to the write slot.
            first = min(s for s, done in zip(starts, finished) if not done)
            if first > 0 and (pos == cache.valid.shape[1] or 8 * first >= cache.valid.shape[1]):
                cache.shift(first)
                pos, starts = pos - first, [s - first for s in starts]
            # A finished row still in the batch feeds a token marked invalid: no later query attends to it.
            alive = torch.tensor([not done for done in finished], device=device)
            # Each row's uniform number: sent before the step is queued, while the device is idle.
            u = draws(keys[rows], [len(out_tokens[r]) for r in rows]).to(device) if temperature > 0 else None  # (b,)
            if model.screen is not None:  # greedy, fp32 on this CPU: the head in bf16 first
                tokens = screened_argmax(model, step_fn(tokens, alive))  # (b, d) -> (b,)
            else:
                logits = step_fn(tokens, alive)  # (b, V)
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
    cache.place(rows, block, [len(p) for p in prompts], end)


def calculator_tokens(text, tokenizer):
    """If text ends inside an annotation `<<expr=`, the tokens of expr's value, else []."""
    from nanogsm.gsm8k import calculate
    if not text.endswith("=") or "<<" not in text:
        return []
    expr = text[text.rindex("<<") + 2:-1]
    if ">>" in expr:
        return []
    value = calculate(expr)
    return [] if value is None else tokenizer.encode(value, bos=False)
