"""Batched sampling with a preallocated KV cache: one prefill, then one-token decode steps.

Prompts of different lengths are left-padded; `Gemma.forward` derives each row's positions and
masks from the cache's `valid` slots, so a padded row computes exactly what it would alone.
Finished rows are dropped from the batch (and from the cache) once enough of them are done.
On CUDA each decode step is replayed from a recorded CUDA graph (`DecodeStep`). The decode steps
read each layer's q/k/v and gate/up weights concatenated, and on the CPU oneDNN's blocked copies
of the fp32 weights (`decode_weights`); on the CPU they attend only to the cache slots written so
far (a non-static `KVCache`).
"""
import torch

from nanogsm.model import KVCache, decode_weights


def sample(logits, temperature=0.0, top_k=None, top_p=1.0, generator=None):
    """Next token from logits (B, V): greedy at temperature 0, else softmax(logits / T) restricted to
    the top_k tokens and to the smallest set whose probability reaches top_p."""
    if temperature == 0.0:
        return logits.argmax(-1)
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
    # probabilities (in float64: every token keeps its width, however small). Masked tokens have
    # zero width and are never drawn. torch.multinomial draws one random number per vocabulary
    # entry instead: a draw for 16 x 262k logits took 78 ms that way on the 2-core dev CPU, 31 here.
    cdf = logits.softmax(-1).double().cumsum(-1)  # (B, V)
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device, dtype=cdf.dtype)  # (B, 1)
    u = u * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)


class DecodeStep:
    """One decode step: tokens (b,) -> next-token logits (b, V) in fp32, each token written to its
    row's next cache slot (alive False: the token is marked invalid, see `generate`).

    On CUDA the step is recorded once as a CUDA graph and then replayed. A decode step of a small
    batch is ~50 small kernels per layer whose launch cost exceeds their run time; a replay
    launches all of them at once (gemma-2b, batch 1, H200: 3.6x faster steps; with compiled
    blocks the recording holds their fused kernels, 5.5x; docs/BENCHMARKS.md). It can be
    recorded because the forward reads no value back to the host (see KVCache). The tokens and
    alive flags are copied into the recorded input tensors, and the logits come back in the
    recorded output tensor (overwritten by the next step). After `cache.keep` the cache tensors
    are new, so the step is recorded again for the smaller batch.
    """

    def __init__(self, model, cache, cuda_graph=True):
        self.model, self.cache, self.graph = model, cache, None
        self.cuda_graph = cuda_graph and cache.valid.is_cuda

    def forward(self, tokens, alive):
        return self.model(tokens[:, None], pad_mask=alive[:, None], cache=self.cache)[:, -1].float()

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
             return_logprobs=False, stop_strings=(), tokenizer=None, calculator=False, cuda_graph=True):
    """Continue each prompt (a list of token ids) by up to max_new_tokens.

    A row stops after emitting a token in stop_ids (kept in its output), or once its decoded text
    contains one of stop_strings (needs `tokenizer`). Returns the new tokens of each row and, with
    return_logprobs, their log-probs under the model (log_softmax of the raw logits: temperature 1,
    no top-k/top-p), as the PPO trainer recomputes them.
    calculator: when a row writes a GSM8K annotation `<<expr=`, the result of expr (see
    `nanogsm.gsm8k.calculate`) is forced as its next tokens, as in the GSM8K paper.
    cuda_graph=False: plain eager decode steps on CUDA too (to compare; the outputs are the same).
    """
    if (stop_strings or calculator) and tokenizer is None:
        raise ValueError("generate: stop_strings and calculator need a tokenizer")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    B, P = len(prompts), max(len(p) for p in prompts)
    x = torch.zeros(B, P, dtype=torch.long)
    pad_mask = torch.zeros(B, P, dtype=torch.bool)
    for i, p in enumerate(prompts):  # left padding: every row's last prompt token is at column P-1
        x[i, P - len(p):] = torch.tensor(p)
        pad_mask[i, P - len(p):] = True
    # Fixed shapes (all slots read) where a step is recorded or compiled; else only the slots written.
    cache = KVCache(model.config, B, P + max_new_tokens, device, dtype, static=device.type == "cuda" or model.compiled)
    step_fn = DecodeStep(model, cache, cuda_graph)
    generator = None if seed is None else torch.Generator(device).manual_seed(seed)
    stop_ids = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)

    out_tokens, out_logprobs = [[] for _ in range(B)], [[] for _ in range(B)]
    texts, forced = [""] * B, [[] for _ in range(B)]  # generated text per row, calculator tokens to force
    tails = [tokenizer.decode(p[-16:], skip_special=False) if calculator else "" for p in prompts]  # '<<' may be in the prompt
    rows = list(range(B))  # original index of each row still in the batch
    finished = [False] * B  # per row still in the batch
    logits = model(x.to(device), pad_mask=pad_mask.to(device), cache=cache, last_only=True)[:, -1].float()  # (B, V)
    with decode_weights(model, B):  # fused projections; on this CPU, oneDNN's blocked weights
        for step in range(max_new_tokens):
            tokens = sample(logits, temperature, top_k, top_p, generator)  # (b,)
            for j, r in enumerate(rows):  # forced calculator tokens replace the sample
                if forced[r]:
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
                finished[j] = stop_list[j] == 1
                if stop_strings or calculator:
                    texts[r] += tokenizer.decode(out_tokens[r][-1:], skip_special=False)
                    finished[j] |= any(s in texts[r] for s in stop_strings)
                    if calculator and not forced[r]:
                        forced[r] = calculator_tokens(tails[r] + texts[r], tokenizer)
            if step == max_new_tokens - 1 or all(finished):
                break
            if sum(finished) >= 0.25 * len(rows):  # drop finished rows so they stop costing compute
                keep = [j for j, done in enumerate(finished) if not done]
                rows, finished = [rows[j] for j in keep], [False] * len(keep)
                keep = torch.tensor(keep, device=device)
                tokens = tokens[keep]
                cache.keep(keep)
            # A finished row still in the batch feeds a token marked invalid: no later query attends to it.
            logits = step_fn(tokens, torch.tensor([not done for done in finished], device=device))
    return (out_tokens, out_logprobs) if return_logprobs else out_tokens


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
