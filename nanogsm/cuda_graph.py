"""The GPU decode step: one decode step recorded once as a CUDA graph, then replayed.

Why: a decode step of a small batch is ~50 small kernels per layer whose launch cost exceeds their
run time; a replay launches all of them at once (docs/BENCHMARKS.md#gpu). `generate` uses it on
CUDA (`cuda_graph=False` there, or `--plain` in the scripts, runs the same steps eagerly).
It can be recorded because `Gemma.forward` reads no value back to the host from a static KVCache.
"""
import torch


class DecodeStep:
    """tokens (b,), alive (b,) -> the final hidden states (b, d) of one decode step, each token
    written to its row's next cache slot (alive False: the token is marked invalid).

    The tokens and alive flags are copied into the recorded input tensors, and the hidden states
    come back in the recorded output tensor (overwritten by the next step). After the cache's rows
    change (`generate` drops finished rows) its tensors are new, and the step is recorded again."""

    def __init__(self, model, cache):
        self.model, self.cache, self.graph = model, cache, None

    def forward(self, tokens, alive):
        return self.model(tokens[:, None], pad_mask=alive[:, None], cache=self.cache, head=False)[:, -1]

    def __call__(self, tokens, alive):
        if self.graph is None or self.recorded_k is not self.cache.k:
            self.record(tokens, alive)
        self.tokens.copy_(tokens)
        self.alive.copy_(alive)
        self.graph.replay()
        return self.hidden

    def record(self, tokens, alive):
        self.graph = self.hidden = None  # free the previous recording's memory
        self.tokens, self.alive, pos = tokens.clone(), alive.clone(), self.cache.pos.clone()
        side = torch.cuda.Stream()  # one eager run first, on a side stream, so that lazy setup
        side.wait_stream(torch.cuda.current_stream())  # (kernel loading, library handles) is
        with torch.cuda.stream(side):  # not recorded
            self.forward(self.tokens, self.alive)
        torch.cuda.current_stream().wait_stream(side)
        self.cache.pos.copy_(pos)  # undo its step: the replay rewrites the same slot
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):  # records the kernels without running them
            self.hidden = self.forward(self.tokens, self.alive)
        self.recorded_k = self.cache.k
