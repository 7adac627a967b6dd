"""Gemma tokenizer: a thin wrapper over `tokenizers.Tokenizer` (tokenizer.json), BOS and stop ids,
the chat template. (tokenizer.json from a GGUF file's vocabulary: nanogsm/weights.py.)"""
import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

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
