"""The CPU speed layer: the model's products through oneDNN, the same numbers as the plain model.

Why: PyTorch hands fp32 matmuls on a CPU to MKL, which runs its AVX2 code on AMD CPUs; oneDNN (also
inside PyTorch) runs AVX-512 where the CPU has it, and packs weights once (docs/BENCHMARKS.md#cpu-layer).

    model = cpu.speed_up(model)  # after loading; before or after apply_lora

A pass over a loaded model that swaps modules (as gpt-fast's quantize.py does), keeping their
parameters, names and state dict:
- every nn.Linear -> OneDNNLinear: fp32 products, forward and both gradients, on oneDNN's GEMM;
  without gradients (decoding, scoring) a copy of the weight in oneDNN's blocked layout (fp32, and
  bf16 where the CPU packs it), made once per value of the weight: an optimizer step makes the next.
- Attention -> KeysAsRowsAttention: a decode step's scores as K @ q^T, transposed (the same
  products; bmm streams a long cache faster with the keys as rows).
- the LM head -> OneDNNHead: the same products, packed; greedy tokens from fp32 weights come from
  the head in bf16 first, checked against an error bound (`screened_argmax`; CPUs that pack bf16).
Under autocast, torch.compile, on CUDA, or in a build without these ops, the plain products run.
Delete this file and its calls (`--plain` in the scripts does the same): a correct, slower program.
"""
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanogsm.model import Attention, LMHead

# Private oneDNN ops of PyTorch, used only where they exist.
AVAILABLE = torch.backends.mkldnn.is_available() and all(
    hasattr(torch.ops.mkldnn, op) for op in ("_linear_pointwise", "_reorder_linear_weight"))
# oneDNN packs bf16 weights only on CPUs with AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT.
BF16 = AVAILABLE and hasattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported") and torch.ops.mkldnn._is_mkldnn_bf16_supported()
PACKED_DTYPES = (torch.float32, torch.bfloat16) if BF16 else (torch.float32,)
# The rows oneDNN is told to pack for: any hint from 8 up gives a layout as fast for 1 to 1,500 rows;
# a hint of 1 gives one ~1.5x slower for a decode batch of 16 (docs/BENCHMARKS.md#cpu-layer).
PACK_ROWS = 32


def speed_up(model):
    """Swap the model's nn.Linear and LMHead modules for the oneDNN ones, in place; returns the model."""
    if not AVAILABLE:
        return model
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, OneDNNLinear.like(child))
            elif type(child) is LMHead:
                setattr(parent, name, OneDNNHead(child.softcap))
            elif type(child) is Attention:
                child.__class__ = KeysAsRowsAttention  # the same module and parameters, one method changed
    return model


def on_onednn(*tensors, dtypes=(torch.float32,)):
    """Whether a product of these tensors goes to oneDNN: plain CPU tensors of these dtypes, outside
    autocast and outside torch.compile (which picks its own GEMM)."""
    return AVAILABLE and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling() and all(
        type(t) in (torch.Tensor, nn.Parameter) and t.device.type == "cpu" and t.dtype in dtypes for t in tensors)


def mm_t(a, b):
    """a @ b.T: (m, k), (n, k) -> (m, n), on oneDNN's GEMM for CPU fp32. Either may be a transposed
    view (oneDNN copies a transposed `a` to row-major first, still far cheaper than MKL's GEMM)."""
    if on_onednn(a, b):
        return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    return a @ b.T


def onednn_linear(x, weight, bias):  # (..., k), (n, k), (n,) or None -> (..., n)
    y = mm_t(x.reshape(-1, x.shape[-1]), weight)  # (m, n)
    y = y if bias is None else y.add_(bias)
    return y.view(*x.shape[:-1], weight.shape[0])


class LinearFn(torch.autograd.Function):
    """F.linear with the forward and both gradients on `mm_t`."""

    @staticmethod
    def forward(ctx, x, weight, bias):  # (..., k), (n, k), (n,) or None
        ctx.save_for_backward(x, weight)
        return onednn_linear(x, weight, bias)  # (..., n)

    @staticmethod
    def backward(ctx, grad_y):  # (..., n)
        x, weight = ctx.saved_tensors
        g = grad_y.reshape(-1, grad_y.shape[-1])  # (m, n)
        need_x, need_w, need_b = ctx.needs_input_grad
        grad_x = mm_t(g, weight.T).view(x.shape) if need_x else None  # (m, n) @ (n, k)
        grad_w = mm_t(g.T, x.reshape(-1, x.shape[-1]).T) if need_w else None  # (n, m) @ (m, k)
        grad_b = g.sum(0) if need_b else None
        return grad_x, grad_w, grad_b


def pack(weight):
    """oneDNN's blocked layout of weight (n, k)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS)


class Packed:
    """A copy of a weight made by make(weight) (`pack` by default), remade when the weight is
    replaced or changed in place (an optimizer step)."""

    def __init__(self, make=pack):
        self.make, self.key, self.copy = make, None, None

    def get(self, weight):
        """The copy. A weight made under torch.inference_mode has no version counter: its copy
        follows only replacement."""
        key = (weight.data_ptr(), -1 if weight.is_inference() else weight._version)
        if self.key is None or self.key[0]() is not weight or self.key[1:] != key:
            self.copy, self.key = self.make(weight), (weakref.ref(weight), *key)
        return self.copy


def packed_product(x, packed, bias=None):  # (..., k), packed (n, k) -> (..., n)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class OneDNNLinear(nn.Linear):
    @classmethod
    def like(cls, linear):
        """An OneDNNLinear holding `linear`'s own weight and bias parameters."""
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        new.weight, new.bias = linear.weight, linear.bias
        new.packed = Packed()
        return new

    def forward(self, x):
        w, b = self.weight, self.bias
        if not on_onednn(x, w, dtypes=PACKED_DTYPES) or x.dtype != w.dtype:
            return F.linear(x, w, b)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w, b)):
            return LinearFn.apply(x, w, b) if w.dtype == torch.float32 else F.linear(x, w, b)
        return packed_product(x, self.packed.get(w), b)


class KeysAsRowsAttention(Attention):
    def scores(self, q, k):  # (B, nkv, g*T, hd), (B, nkv, S, hd) -> (B, nkv, g*T, S)
        if q.shape[2] == self.n_heads // self.n_kv and q.device.type == "cpu":  # a decode step: T = 1
            return (k @ q.transpose(-1, -2)).transpose(-1, -2)  # (B, nkv, S, g), keys as rows
        return super().scores(q, k)


class OneDNNHead(LMHead):
    def __init__(self, softcap=None):
        super().__init__(softcap)
        self.packed = Packed()
        # for `screened_argmax`: the head in bf16, packed, and the largest norm of its rows
        self.screen = Packed(lambda w: (pack(w.bfloat16()) if BF16 else w.bfloat16(), w.norm(dim=-1).max().item()))

    def forward(self, h, weight):  # (..., d), (V, d) -> (..., V)
        if torch.is_grad_enabled() or not on_onednn(h, weight, dtypes=PACKED_DTYPES) or h.dtype != weight.dtype:
            return super().forward(h, weight)
        z = packed_product(h, self.packed.get(weight))  # (..., V)
        return z if self.softcap is None else torch.tanh(z / self.softcap) * self.softcap

    def mm_t(self, a, b):
        return mm_t(a, b)

    def argmax(self, h, weight):
        if torch.is_grad_enabled() or not BF16 or not on_onednn(h, weight):
            return super().argmax(h, weight)
        return screened_argmax(self, h, weight)


def screened_argmax(head, h, weight, k=16):
    """argmax of h @ weight.T for fp32 h (b, d) -> (b,), with the fp32 head skipped where it can be.

    The head's 262k x d product is the largest of a small model's decode step, and half the work in
    bf16 (docs/BENCHMARKS.md#cpu-layer). Logits `a` from h and the head
    rounded to bf16 differ from the fp32 logits by at most
        e = (2^-7 + 2^-12) |h| max_v |w_v|  +  2^-7 |a|
    (h and w_v each rounded at a relative 2^-8, fp32 sums of d products, Cauchy-Schwarz; then `a`
    itself rounded to bf16, |a| the larger of the first and the k-th). So when the k-th largest `a`
    is more than 2e below the largest, the best token is among those k, and their exact fp32
    logits pick it; other rows get the full fp32 head."""
    packed, w_max = head.screen.get(weight)
    a = packed_product(h.bfloat16(), packed) if BF16 else h.bfloat16() @ packed.T  # (b, V) in bf16
    top, idx = chunked_topk(a, k)  # (b, k), largest first
    top = top.float()
    e = (2**-7 + 2**-12) * h.norm(dim=-1) * w_max + 2**-7 * top[:, [0, -1]].abs().amax(-1)  # (b,)
    exact = (weight[idx] @ h[:, :, None]).squeeze(-1)  # (b, k, d) @ (b, d, 1) -> (b, k)
    tokens = idx.gather(-1, exact.argmax(-1, keepdim=True)).squeeze(-1)  # (b,)
    unsure = top[:, -1] >= top[:, 0] - 2 * e  # (b,)
    if unsure.any():
        tokens[unsure] = mm_t(h[unsure], weight).argmax(-1)
    return tokens


def chunked_topk(a, k, chunks=512):
    """a.topk(k) over the last dim of a (b, V): values (b, k), largest first, and their indices, in
    two small steps. The k largest values lie in the k chunks (of `chunks` equal chunks) with the
    largest maxima: a value in any other chunk is at most its chunk's maximum, which is at most the
    k-th largest of those maxima. Ties may pick other indices of the same values. A vocabulary that
    does not split into `chunks` equal chunks, or k > chunks: one topk."""
    b, V = a.shape
    if V % chunks or k > chunks:
        return a.topk(min(k, V), dim=-1)
    n = V // chunks  # values per chunk
    _, best = a.view(b, chunks, n).amax(-1).topk(k, dim=-1)  # (b, k): the chunks with the largest maxima
    idx = (best[:, :, None] * n + torch.arange(n, device=a.device)).view(b, k * n)  # (b, k*n): their values' indices
    top, j = a.gather(-1, idx).topk(k, dim=-1)  # (b, k)
    return top, idx.gather(-1, j)
