"""Gemma 1, 2 and 3 (text) in one hand-written decoder.

The three families differ only by a handful of switches (soft-caps, sliding windows, q/k-norm,
sandwich norms, rope bases). `GemmaConfig` turns a checkpoint's `config.json` into those switches,
and one code path reads them: there is no `if family == ...` in the forward pass.

References for every numerical detail: HF transformers `models/gemma{,2,3}/modeling_*.py` and
google-deepmind/gemma_pytorch `gemma/model.py`.
"""
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from nanogsm import weights

# What each supported `model_type` switches on. Everything else is read from config.json.
FAMILIES = {
    "gemma": dict(qk_norm=False, sandwich_norm=False),  # Gemma 1
    "gemma2": dict(qk_norm=False, sandwich_norm=True),
    "gemma3_text": dict(qk_norm=True, sandwich_norm=True),
}
# config.json of checkpoints whose shape benchmarks and tests use with random weights.
SHAPES = {
    "gemma-2b": {  # google/gemma-2b
        "architectures": ["GemmaForCausalLM"], "model_type": "gemma", "vocab_size": 256000, "hidden_size": 2048,
        "intermediate_size": 16384, "num_hidden_layers": 18, "num_attention_heads": 8, "num_key_value_heads": 1,
        "head_dim": 256, "hidden_act": "gelu", "max_position_embeddings": 8192, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "torch_dtype": "bfloat16",
    },
}
# Gemma 1's legacy "gelu" means the tanh approximation (HF GemmaConfig maps it the same way).
TANH_GELU = {"gelu", "gelu_pytorch_tanh", "gelu_new", "gelu_tanh"}


@dataclass
class GemmaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int  # independent of hidden_size / num_heads in Gemma
    layer_types: list  # per layer: "full_attention" or "sliding_attention"
    rope_theta: dict  # layer type -> rope base (Gemma 3: 1M global, 10k local)
    rope_scale: float = 1.0  # linear rope scaling on full-attention layers (Gemma 3 >= 4B)
    sliding_window: int | None = None
    query_pre_attn_scalar: float | None = None  # attention scale is this ** -0.5
    attn_softcap: float | None = None  # Gemma 2: 50
    final_softcap: float | None = None  # Gemma 2: 30
    qk_norm: bool = False  # Gemma 3: RMSNorm on q and k before rope
    sandwich_norm: bool = False  # Gemma 2/3: norms after attention/MLP and before MLP
    attention_bias: bool = False
    rms_norm_eps: float = 1e-6
    eos_token_ids: list = field(default_factory=list)  # where `generate` stops by default, as HF's generate
    hf_config: dict = field(default_factory=dict, repr=False)  # the original config.json, saved back as is

    @classmethod
    def from_hf(cls, cfg: dict, source="config.json"):
        """Map an HF `config.json` dict (old or new transformers format) to a GemmaConfig."""
        model_type = cfg.get("model_type")
        if model_type not in FAMILIES:
            raise ValueError(
                f"{source}: model_type {model_type!r} is not supported; nanogsm reads "
                f"{sorted(FAMILIES)} (Gemma 1, Gemma 2, Gemma 3 text-only checkpoints)")
        try:
            n_layers = cfg["num_hidden_layers"]
            act = cfg.get("hidden_activation") or cfg.get("hidden_act", "gelu_pytorch_tanh")
            if act not in TANH_GELU:
                raise ValueError(f"{source}: hidden activation {act!r}; Gemma uses tanh GELU")
            # Layer types: new configs list them; old ones imply them (Gemma 2: even layers slide,
            # Gemma 3: every 6th layer is global).
            layer_types = cfg.get("layer_types")
            if layer_types is None and model_type == "gemma2":
                layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
            if layer_types is None and model_type == "gemma3_text":
                every = cfg.get("sliding_window_pattern", 6)
                layer_types = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(n_layers)]
            layer_types = layer_types or ["full_attention"] * n_layers
            rope_theta, rope_scale = _rope_params(cfg, model_type)
            return cls(
                vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
                intermediate_size=cfg["intermediate_size"], num_layers=n_layers,
                num_heads=cfg["num_attention_heads"], num_kv_heads=cfg["num_key_value_heads"],
                head_dim=cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
                layer_types=list(layer_types), rope_theta=rope_theta, rope_scale=rope_scale,
                sliding_window=cfg.get("sliding_window"),
                query_pre_attn_scalar=cfg.get("query_pre_attn_scalar"),
                attn_softcap=cfg.get("attn_logit_softcapping"), final_softcap=cfg.get("final_logit_softcapping"),
                attention_bias=cfg.get("attention_bias", False), rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
                eos_token_ids=weights.id_list(cfg.get("eos_token_id")), hf_config=cfg, **FAMILIES[model_type])
        except KeyError as e:
            raise ValueError(f"{source}: missing field {e.args[0]!r} for a {model_type} config") from None

    @classmethod
    def from_json(cls, path):
        path = Path(path)
        try:
            cfg = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read a JSON config ({e})") from None
        return cls.from_hf(cfg, source=str(path))


def _rope_params(cfg, model_type):
    """Rope base per layer type and the linear scale of global layers, from either config format."""
    params = cfg.get("rope_parameters")  # transformers >= 5
    if params is None:  # older configs: flat fields
        params = {"rope_theta": cfg.get("rope_theta", 10_000.0), **(cfg.get("rope_scaling") or {})}
        if model_type == "gemma3_text":
            params = {"full_attention": params,
                      "sliding_attention": {"rope_theta": cfg.get("rope_local_base_freq", 10_000.0)}}
    if "full_attention" not in params:  # Gemma 1/2: one rope for every layer
        params = {"full_attention": params, "sliding_attention": params}
    for kind, p in params.items():
        rope_type = p.get("rope_type", p.get("type", "default"))
        if rope_type not in ("default", "linear") or (kind == "sliding_attention" and rope_type != "default"):
            raise ValueError(f"config.json: rope type {rope_type!r} on {kind} layers is not supported")
    full = params["full_attention"]
    scale = full.get("factor", 1.0) if full.get("rope_type", full.get("type")) == "linear" else 1.0
    return {k: float(p["rope_theta"]) for k, p in params.items()}, float(scale)


class RMSNorm(nn.Module):
    """x / rms(x) * (1 + w) in float32: Gemma stores w as an offset from 1 (zeros at init) and
    normalises in float32 before casting back, unlike Llama's x.to(dtype) * w (HF transformers#29402)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).type_as(x)


def rope_cos_sin(positions, head_dim, theta, scale=1.0):
    """cos, sin for rotate-half rope at integer `positions` (B, T) -> each (B, 1, T, head_dim), fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)) / scale
    freqs = positions.float()[..., None] * inv_freq  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, hd)
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    """Rotate pairs (x_i, x_{i+hd/2}) as in HF's rotate_half; cos/sin cast to x's dtype like HF."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5
        self.softcap = cfg.attn_softcap
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.hd, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.hd, cfg.hidden_size, bias=bias)
        self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps) if cfg.qk_norm else nn.Identity()

    def forward(self, x, cos, sin, mask, kv=None, slots=None):
        """kv: this layer's cache (keys, values), each (B, nkv, max_len, hd); the new keys and values
        are written at `slots` (T,), and attention reads the first S slots, S = mask.shape[-1]."""
        B, T, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # (B, T, nh*hd), (B, T, nkv*hd) x2
        q = q.view(B, T, self.n_heads, self.hd).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rope(self.q_norm(q), cos, sin), apply_rope(self.k_norm(k), cos, sin)
        if kv is not None:  # under autocast k and v arrive in bf16 and are stored in the cache's dtype
            kv[0].index_copy_(2, slots, k.to(kv[0].dtype))
            kv[1].index_copy_(2, slots, v.to(kv[1].dtype))
            S = mask.shape[-1]
            k, v = kv[0][:, :, :S], kv[1][:, :, :S]  # (B, nkv, S, hd): the slots attention reads, masked
        if self.softcap is None and T > 1:  # fused kernel (prefill, training); mask None = plain causal
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale,
                                               enable_gqa=True)
        else:  # Gemma 2's soft-cap, and one-token decode steps
            y = self.grouped_attention(q, k, v, mask)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd)  # (B, T, nh*hd)
        return self.o_proj(y)

    def grouped_attention(self, q, k, v, mask):
        """Attention as two matmuls, query heads grouped per kv head with a view (K/V never repeated).
        Gemma 2 needs it: scores -> cap * tanh(scores / cap) before the mask, which no fused kernel
        allows. A decode step (T = 1) too: there the fused CPU kernel is slower (docs/BENCHMARKS.md)."""
        B, _, T, hd = q.shape
        S, g = k.shape[2], self.n_heads // self.n_kv
        q = q.reshape(B, self.n_kv, g * T, hd)  # (B, nkv, g*T, hd): the g query heads of each kv head
        scores = self.scores(q, k)  # (B, nkv, g*T, S)
        scores = scores.view(B, self.n_kv, g, T, S) * self.scale  # (B, nkv, g, T, S)
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        scores = scores.masked_fill(~mask.unsqueeze(2), float("-inf"))
        probs = scores.float().softmax(-1).to(q.dtype)  # softmax in fp32
        y = probs.view(B, self.n_kv, g * T, S) @ v  # (B, nkv, g*T, hd)
        return y.view(B, self.n_heads, T, hd)

    def scores(self, q, k):
        """The grouped queries (B, nkv, g*T, hd) against the keys (B, nkv, S, hd) -> (B, nkv, g*T, S)."""
        return q @ k.transpose(-1, -2)


class MLP(nn.Module):
    """GeGLU: down(gelu_tanh(gate(x)) * up(x))."""

    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class Block(nn.Module):
    """x + post_norm(attn(norm(x))), then h + post_norm(mlp(norm(h))); the post norms are identities
    in Gemma 1, which has no sandwich norms."""

    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)  # noqa: E731
        post_norm = lambda: norm() if cfg.sandwich_norm else nn.Identity()  # noqa: E731
        self.input_layernorm, self.post_attention_layernorm = norm(), post_norm()
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), post_norm()
        self.self_attn, self.mlp = Attention(cfg), MLP(cfg)

    def forward(self, x, cos, sin, mask, kv=None, slots=None):
        h = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv, slots)
        x = x + self.post_attention_layernorm(h)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class KVCache:
    """Preallocated keys and values, per layer k[i] and v[i], each (B, n_kv, max_len, hd), filled left
    to right; `valid` (B, max_len) marks slots holding real tokens (positions and masks follow from
    it); `pos`, a 0-d tensor on the cache's device, is the next free slot. A static cache has
    attention read all slots under the mask (fixed shapes, no read-back: a step can be replayed as a
    CUDA graph, nanogsm/cuda_graph.py); otherwise attention reads only the slots written so far."""

    def __init__(self, cfg: GemmaConfig, batch_size, max_len, device, dtype, static=True):
        shape = (batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.valid = torch.zeros(batch_size, max_len, device=device, dtype=torch.bool)
        self.pos = torch.zeros((), device=device, dtype=torch.long)
        self.static = static

    def read_len(self, T):
        """How many slots attention reads when T new tokens are written: S in (B, nkv, S, hd)."""
        return self.valid.shape[1] if self.static else int(self.pos) + T


class LMHead(nn.Module):
    """The tied head h @ E^T, then Gemma 2's final soft-cap; the weight (the embedding) is passed in."""

    def __init__(self, softcap=None):
        super().__init__()
        self.softcap = softcap

    def forward(self, h, weight):  # (..., d), (V, d) -> (..., V)
        z = self.mm_t(h.reshape(-1, h.shape[-1]), weight).view(*h.shape[:-1], weight.shape[0])
        return z if self.softcap is None else torch.tanh(z / self.softcap) * self.softcap

    def argmax(self, h, weight):
        """The greedy tokens (b,) for hidden states h (b, d)."""
        return self(h, weight).argmax(-1)

    def mm_t(self, a, b):
        """a @ b.T: (m, k), (n, k) -> (m, n); also the head's products in the fused losses (`HeadLoss`)."""
        return a @ b.T


class Gemma(nn.Module):
    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.grad_checkpointing = False  # recompute each block's activations in backward
        self.head = LMHead(cfg.final_softcap)  # tied to embed_tokens: holds no weights of its own

    def forward(self, input_ids, pad_mask=None, cache=None, last_only=False, head=True):
        """input_ids (B, T) -> logits (B, T, vocab).

        pad_mask (B, T), optional: False on padding tokens, which no query attends to.
        cache: a KVCache; the new tokens take its next T slots and attend to all earlier ones.
        last_only: the last position only, (B, 1, ...): a prefill needs no more (full logits over
        Gemma's 256k vocabulary are the largest tensor of the whole forward).
        head=False: the final hidden states (B, T, d) instead; `logits(h)` applies the head
        (the training losses apply it in chunks, never holding all logits).
        Positions count the real tokens before each one, so left-padded rows start at 0.
        """
        cfg, (B, T) = self.config, input_ids.shape
        S = None if cache is None else cache.read_len(T)  # read once here, outside the blocks
        slots, masks, rope = self.attention_inputs(B, T, input_ids.device, pad_mask, cache, S)
        x = self.embed_tokens(input_ids)  # (B, T, d)
        # sqrt(d) is rounded to the activation dtype before multiplying, as in the reference.
        x = x * torch.tensor(cfg.hidden_size ** 0.5, dtype=x.dtype)
        for i, (block, kind) in enumerate(zip(self.layers, cfg.layer_types)):
            kv = None if cache is None else (cache.k[i], cache.v[i])
            if self.grad_checkpointing and torch.is_grad_enabled():  # non-reentrant: works with frozen params (LoRA)
                x = torch.utils.checkpoint.checkpoint(block, x, *rope[kind], masks[kind], kv, slots,
                                                      use_reentrant=False)
            else:
                x = block(x, *rope[kind], masks[kind], kv, slots)
        if cache is not None:
            cache.pos += T  # in place, on the device: a recorded CUDA graph replays it too
        x = self.norm(x[:, -1:] if last_only else x)
        return self.logits(x) if head else x

    def attention_inputs(self, B, T, device, pad_mask, cache, S):
        """What every layer of a forward over T new tokens reads: their cache slots (T,), and per
        layer type the attention mask (B, 1, T, S), or None for plain causal attention, and the
        rope tables (cos, sin); S: the cache slots attention reads (`KVCache.read_len`), or None
        without a cache."""
        cfg = self.config
        new_valid = torch.ones(B, T, dtype=torch.bool, device=device) if pad_mask is None else pad_mask.bool()
        if cache is None:
            slots, key_valid = torch.arange(T, device=device), new_valid  # (T,), (B, S = T)
        else:  # the new tokens take slots pos..pos+T-1; the keys are the slots attention reads, masked
            slots = cache.pos + torch.arange(T, device=device)  # (T,)
            cache.valid.index_copy_(1, slots, new_valid)
            key_valid = cache.valid[:, :S]  # (B, S): all max_len slots if the cache is static
        positions = (key_valid.cumsum(-1) - 1).clamp(min=0).index_select(1, slots)  # (B, T)
        q_slot, k_slot = slots[:, None], torch.arange(key_valid.shape[1], device=device)[None, :]  # (T, 1), (1, S)
        causal = (k_slot <= q_slot) & key_valid[:, None, None, :]  # (B, 1, T, S)
        masks = {"full_attention": causal}
        if cfg.sliding_window is not None:
            masks["sliding_attention"] = causal & (k_slot > q_slot - cfg.sliding_window)
        # A padding query sees no valid key; let it see itself so softmax stays finite (output unused).
        masks = {t: m | (k_slot == q_slot) for t, m in masks.items()}
        if cache is None and pad_mask is None and cfg.attn_softcap is None and T > 1:
            # Plain causal attention (training: right padding never reaches a real token): without a
            # mask tensor SDPA can take its flash kernel on CUDA (a mask tensor rules it out).
            masks["full_attention"] = None
        params = {t: (theta, cfg.rope_scale if t == "full_attention" else 1.0) for t, theta in cfg.rope_theta.items()}
        tables = {p: rope_cos_sin(positions, cfg.head_dim, *p) for p in set(params.values())}  # once if the types share it
        return slots, masks, {t: tables[p] for t, p in params.items()}

    def logits(self, h):
        """Tied LM head (and Gemma 2's final soft-cap): (..., d) -> (..., vocab)."""
        return self.head(h, self.embed_tokens.weight)

    @classmethod
    def from_pretrained(cls, name_or_path, dtype=torch.float32, device="cpu"):
        """Load a local folder, a .gguf file, `gemma-3-270m` (offline) or a Hub repo id."""
        folder = weights.resolve(name_or_path)
        cfg = GemmaConfig.from_json(folder / "config.json")
        cfg.eos_token_ids = weights.generation_eos_ids(folder) or cfg.eos_token_ids  # generation_config.json first
        with torch.device("meta"):  # no random init: the weights are assigned straight from the file
            model = cls(cfg)
        expected = {name: p.shape for name, p in model.state_dict().items()}
        state = weights.load_safetensors(folder, expected, hf_to_ours(cfg), dtype=dtype, device=device)
        model.load_state_dict(state, strict=True, assign=True)
        return model.eval()

    def save_pretrained(self, out_dir, text_files=None, tensor_files=None, state=None):
        """Write config.json, generation_config.json (the stop ids) and model.safetensors (HF names),
        plus any extra files (tokenizer, run args, optimizer state), atomically via a temp folder.
        `state`: tensors to write instead of this module's own (the whole weights of sharded training)."""
        cfg = self.config
        state = {ours_to_hf(cfg, k): v for k, v in (state or self.state_dict()).items()}
        hf_config = dict(cfg.hf_config, torch_dtype=str(self.embed_tokens.weight.dtype).removeprefix("torch."))
        hf_config.pop("dtype", None)
        weights.save_folder(out_dir, {"model.safetensors": state, **(tensor_files or {})},
                            {"config.json": json.dumps(hf_config, indent=2), "generation_config.json":
                             json.dumps({"eos_token_id": cfg.eos_token_ids}, indent=2), **(text_files or {})})


def hf_to_ours(cfg: GemmaConfig):
    """Key renaming HF -> nanogsm. Gemma 1's `post_attention_layernorm` is really the pre-MLP norm."""
    def rename(key):
        key = key.removeprefix("model.")
        if not cfg.sandwich_norm:
            key = key.replace("post_attention_layernorm", "pre_feedforward_layernorm")
        return key
    return rename


def ours_to_hf(cfg: GemmaConfig, key):
    if not cfg.sandwich_norm:
        key = key.replace("pre_feedforward_layernorm", "post_attention_layernorm")
    return "model." + key
