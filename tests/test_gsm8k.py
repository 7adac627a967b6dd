"""GSM8K loading, prompts, strict/flexible answer extraction, the calculator."""
import json

import pytest

from nanogsm.gsm8k import (STRATEGIES, build_prompt, calculate, extract_answer, extract_last_number, is_correct,
                           heldout_subset, load_gsm8k, seeded_subset)


@pytest.mark.parametrize("text, value", [
    ("so #### 72", 72), ("#### $1,234.50.", 1234.5), ("#### -5", -5), ("#### \\$460", 460), ("#### 5%", 5),
    ("#### 10.0", 10), ("#### 1,000,000", 1e6), ("#### .5", 0.5), ("#### 3.\n", 3), ("####72", 72),
    ("#### 18 #### 20", 18), ("#### - 7", -7), ("#### $ 12", 12),
    ("#### ,", None), ("no marker 42", None), ("#### twelve", None), ("####", None), ("#### -", None),
])
def test_extract_answer(text, value):
    assert extract_answer(text) == value


def test_is_correct_and_flexible():
    assert is_correct("... #### 10.00", "#### 10")
    assert is_correct("#### 1,234", 1234.0)
    assert not is_correct("#### 11", "#### 10")
    assert not is_correct("the answer is 10", "#### 10")  # strict needs ####
    assert extract_last_number("first 3 then $1,200.5 done.") == 1200.5
    assert extract_last_number("went down by -4") == -4
    assert extract_last_number("none") is None


@pytest.mark.parametrize("expr, value", [
    ("48/2", "24"), ("48+24", "72"), ("2*(3+4)-1", "13"), ("1,000*3", "3000"), ("10/4", "2.5"), ("-3+5", "2"),
    ("1/3", "0.333333"), ("2.5*2", "5"),
    ("1/0", None), ("__import__('os')", None), ("2**10", None), ("(1+2", None), ("", None), ("9" * 200, None),
])
def test_calculator(expr, value):
    assert calculate(expr) == value


def test_load_real_files(data_dir):
    test = load_gsm8k("main", "test", data_dir)
    assert len(test) == 1319 and test[0]["id"] == 0 and test[5]["id"] == 5
    train = load_gsm8k("main", "train", data_dir)
    assert len(train) == 7473 and train[0]["question"].startswith("Natalia sold clips") and train[0]["gold"] == 72
    assert len(load_gsm8k("socratic", "test", data_dir)) == 1319


def test_seeded_subset_is_stable(data_dir):
    test = load_gsm8k("main", "test", data_dir)
    a, b = seeded_subset(test), seeded_subset(test)
    assert len(a) == 256 and [r["id"] for r in a] == [r["id"] for r in b] == sorted({r["id"] for r in a})
    assert seeded_subset(test, None) is test
    with pytest.raises(ValueError, match="--n 2000 is larger than the split"):
        seeded_subset(test, 2000)


def test_heldout_slice_never_overlaps_the_training_subset(data_dir):
    train = load_gsm8k("main", "train", data_dir)
    trained = {r["id"] for r in seeded_subset(train, 480, 0)}  # what train_sft.py --max-examples 480 uses
    held = heldout_subset(train, 480, 0, 128)
    assert len(held) == 128 and not trained & {r["id"] for r in held}
    assert [r["id"] for r in held] == [r["id"] for r in heldout_subset(train, 480, 0, 128)]
    assert {r["id"] for r in heldout_subset(train, 480, 1, 128)} != {r["id"] for r in held}  # follows the seed


@pytest.mark.parametrize("line, message", [
    ("{not json", r"test\.jsonl:2: not valid JSON"),
    (json.dumps({"question": " ", "answer": "#### 1"}), r"test\.jsonl:2: field 'question' is missing or empty"),
    (json.dumps({"question": "q", "answer": "no number"}), r"test\.jsonl:2: answer has no '#### <number>'"),
])
def test_malformed_lines_name_file_and_line(tmp_path, line, message):
    good = json.dumps({"question": "What is 1+1?", "answer": "1+1=2\n#### 2"})
    (tmp_path / "test.jsonl").write_text(good + "\n" + line + "\n")
    with pytest.raises(ValueError, match=message):
        load_gsm8k("main", "test", tmp_path)


def test_bad_config_split_and_folder(tmp_path):
    with pytest.raises(ValueError, match="unknown GSM8K config 'mian'"):
        load_gsm8k("mian", "test", tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        load_gsm8k("main", "test", tmp_path / "nope")


def test_prompts():
    q = "What is 1+1?"
    assert build_prompt(q, "zero-shot") == "Question: What is 1+1?\nAnswer:"
    one = build_prompt(q, "one-shot")
    assert one.startswith("Question: Natalia sold clips") and "#### 72\n\nQuestion: What is 1+1?\nAnswer:" in one
    instruct = build_prompt(q, "one-shot-instruct")
    assert instruct.startswith("You are a helpful math assistant.") and instruct.endswith(one)

    class Chat:
        chat = staticmethod(lambda text: f"<start_of_turn>user\n{text}<end_of_turn>\n<start_of_turn>model\n")
    assert build_prompt(q, "zero-shot-instruct", chat=True, tokenizer=Chat).startswith(
        "<start_of_turn>user\nYou are a helpful math assistant.")
    assert len(STRATEGIES) == 4
    with pytest.raises(ValueError, match="unknown prompt strategy"):
        build_prompt(q, "two-shot")
