"""Gemma tokenizer: a thin wrapper over `tokenizers.Tokenizer` (tokenizer.json), BOS and stop ids,
the chat template, and rebuilding tokenizer.json from a GGUF file's vocabulary."""
import json
from pathlib import Path

from tokenizers import AddedToken, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

from nanogsm import weights

END_OF_TURN = "<end_of_turn>"


class Tokenizer:
    def __init__(self, tok: HFTokenizer, extra_stop_ids=()):
        self.tok = tok
        self.bos_id = tok.token_to_id("<bos>")
        self.eos_id = tok.token_to_id("<eos>")
        self.pad_id = tok.token_to_id("<pad>")
        # Instruction-tuned Gemma ends its turn with <end_of_turn> (107 in Gemma 1/2, 106 in Gemma 3,
        # so it is looked up); a base model never emits it, so stopping on it is always safe.
        end_of_turn = tok.token_to_id(END_OF_TURN)
        ids = [self.eos_id, end_of_turn, *extra_stop_ids]
        self.stop_ids = sorted({i for i in ids if i is not None})

    @classmethod
    def from_pretrained(cls, name_or_path):
        folder = weights.resolve(name_or_path)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"{folder}: no tokenizer.json in the checkpoint folder")
        return cls(HFTokenizer.from_file(str(path)), extra_stop_ids=config_eos_ids(folder))

    @property
    def vocab_size(self):
        return self.tok.get_vocab_size()

    def encode(self, text: str, bos=True) -> list:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if bos and (not ids or ids[0] != self.bos_id):  # a text that starts with <bos> keeps just one
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids, skip_special=True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    @staticmethod
    def chat(user_message: str) -> str:
        """Gemma's chat template for one user turn (Gemma has no system role); BOS comes from encode."""
        return f"<start_of_turn>user\n{user_message}{END_OF_TURN}\n<start_of_turn>model\n"


def config_eos_ids(folder: Path) -> list:
    """EOS ids named by config.json / generation_config.json (an int or a list)."""
    ids = []
    for name in ("config.json", "generation_config.json"):
        path = folder / name
        if path.is_file():
            eos = json.loads(path.read_text()).get("eos_token_id")
            ids += eos if isinstance(eos, list) else [] if eos is None else [eos]
    return ids


# ---- rebuilding tokenizer.json from a GGUF vocabulary ------------------------------------------

CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types


def tokenizer_from_gguf(reader):
    """Rebuild Gemma's byte-fallback BPE (as HF's GemmaTokenizer builds it) from a GGUF reader.

    The GGUF holds tokens, scores and token types but no merges. Merges are every split of a token
    into two vocabulary pieces, ranked by the token's position in the vocabulary (Gemma's scores do
    not follow merge order; HF's GGUF converter ranks the same way). Tokens of two or more spaces
    are stored as real spaces, but the model looks them up as '▁' runs: respell them first.
    Returns (tokenizer.json text, dict of special ids and vocab size).
    """
    fields = reader.fields
    tokens = [t if not (t and t.strip() == "" and " " in t) else "▁" * len(t)
              for t in fields["tokenizer.ggml.tokens"].contents()]
    types = fields["tokenizer.ggml.token_type"].contents()
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = HFTokenizer(BPE(vocab=vocab, merges=bpe_merges(vocab), fuse_unk=True, unk_token="<unk>",
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
