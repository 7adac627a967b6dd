"""GSM8K loading, prompts, strict/flexible answer extraction, the calculator."""
import json

import pytest

from nanogsm.calculator import calculate, forced_mask
from nanogsm.gsm8k import (STRATEGIES, build_prompt, extract_answer, extract_last_number, five_shot_examples,
                           heldout_subset, is_correct, lm_eval_match, load_gsm8k, score, seeded_subset,
                           reward, solution_steps, step_credit)


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


GOLD = "48/2 = <<48/2=24>>24 in May.\n48+24 = <<48+24=72>>72 in all.\n#### 72"


@pytest.mark.parametrize("text, credit", [
    (GOLD, 1.0),
    ("<<48/2=24>>24 then <<24*2=48>>48 #### 48", 0.5),  # precision 1/2, recall 1/2
    ("<<48/2=24>>24 #### 24", 2 / 3),  # precision 1, recall 1/2
    ("<<48/2=24>>24 <<1+1=2>>2 <<2+1=3>>3 <<48+24=72>>72", 2 * 0.5 * 1 / 1.5),  # padding: precision 2/4, recall 1
    ("<<48/2=24.0>>24 <<72=72>>", 1.0),  # 24.0 is 24
    ("<<48/2=24>>24 <<12*2=24>>24 <<1+1=2>>2", 0.5),  # a repeated result counts once: precision 1/2, not 2/3
    ("24 and 72, no annotations #### 72", 0.0), ("<<1+1=2>>2", 0.0), ("<<x=>> #### 3", 0.0),
])
def test_step_credit_by_hand(text, credit):
    assert step_credit(text, GOLD) == pytest.approx(credit)
    assert step_credit(text, "no annotations #### 72") == 0.0


def test_reward_by_hand():
    record = {"gold": 72.0, "answer": GOLD}
    half = "<<48/2=24>>24 then <<24*2=48>>48"  # step credit 0.5
    assert reward(half + " #### 72", record, step=0.5) == (1.0, True)  # a right answer gets no partial credit
    assert reward(half + " #### 48", record, step=0.5) == (0.25, False)
    assert reward(half + " #### 48", record) == (0.0, False)  # the study's reward
    assert reward(half + " #### 48", record, wrong=-1, step=0.5, format_bonus=0.1) == (pytest.approx(-0.65), False)
    assert reward(half, record, wrong=-1, step=0.5, format_bonus=0.1) == (-0.75, False)  # no '####': no bonus


@pytest.mark.parametrize("expr, value", [
    ("48/2", "24"), ("48+24", "72"), ("2*(3+4)-1", "13"), ("1,000*3", "3000"), ("10/4", "2.5"), ("-3+5", "2"),
    ("1/3", "0.333333"), ("2.5*2", "5"),
    ("1/0", None), ("__import__('os')", None), ("2**10", None), ("(1+2", None), ("", None), ("9" * 200, None),
])
def test_calculator(expr, value):
    assert calculate(expr) == value


class CharTokenizer:
    """One token per character: a tokenizer whose forced tokens are easy to write by hand."""
    def encode(self, text, bos=False):
        return [ord(c) for c in text]

    def decode(self, ids, skip_special=False):
        return "".join(map(chr, ids))


def test_forced_mask_by_hand():
    tok = CharTokenizer()
    text = "2*3=<<2*3=6>> then <<6+1=7>>x"
    marked = "".join("F" if f else "." for f in forced_mask(tok.encode(text), tok))
    assert marked == ".........." "F" ".............." "F" "..."  # the 6 and the 7 follow "<<expr="
    # the prompt's end may open the annotation; an unparsable expression forces nothing
    assert forced_mask(tok.encode("=5>>"), tok, prompt=tok.encode("<<2+3")) == [False, True, False, False]
    assert not any(forced_mask(tok.encode("<<2**3=8>>"), tok))


def test_solution_steps_count_the_reasoning_lines(data_dir):
    assert solution_steps("He has 2+3=<<2+3=5>>5 apples.\nThen 5*2=<<5*2=10>>10.\n#### 10") == 2
    assert solution_steps("One line, then a blank one.\n\n#### 4") == 1
    train = load_gsm8k("main", "train", data_dir)
    assert sum(solution_steps(r["answer"]) <= 2 for r in train) == 1961  # the easiest 26%: 1,960 by raw line count, + id 2815 (a blank line)


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


def test_blank_lines_are_skipped_and_errors_keep_the_file_line(tmp_path):
    good = json.dumps({"question": "What is 1+1?", "answer": "1+1=2\n#### 2"})
    (tmp_path / "test.jsonl").write_text(good + "\n\n" + good + "\n")
    assert [r["id"] for r in load_gsm8k("main", "test", tmp_path)] == [0, 1]
    (tmp_path / "test.jsonl").write_text(good + "\n\n" + good + "\n{not json\n")
    with pytest.raises(ValueError, match=r"test\.jsonl:4: not valid JSON"):
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
    assert len(STRATEGIES) == 6
    with pytest.raises(ValueError, match="unknown prompt strategy"):
        build_prompt(q, "two-shot")


def test_lm_eval_prompts(data_dir):
    """5-shot: five seeded train records with their whole gold answers; 8-shot-cot: Wei et al.'s
    exemplars, `Q: ...\nA: ... The answer is N.`; blocks separated by blank lines."""
    shots = five_shot_examples(data_dir)
    assert shots == five_shot_examples(data_dir) and len(shots) == 5
    five = build_prompt("What is 1+1?", "5-shot", shots=shots)
    assert five.count("Question: ") == 6 and five.count("####") == 5 and five.endswith("\n\nQuestion: What is 1+1?\nAnswer:")
    assert five.startswith(f"Question: {shots[0]['question']}\nAnswer: {shots[0]['answer']}\n\n")
    cot = build_prompt("What is 1+1?", "8-shot-cot")
    assert cot.startswith("Q: There are 15 trees in the grove.") and cot.count("The answer is ") == 8
    assert cot.endswith("The answer is 8.\n\nQ: What is 1+1?\nA:")
    with pytest.raises(ValueError, match="needs its train exemplars"):
        build_prompt("What is 1+1?", "5-shot")


@pytest.mark.parametrize("strategy, text, reference, found, ok", [
    ("5-shot", "She pays 16 - 3 = 13.\n#### 13", "... #### 13", "13", True),
    ("5-shot", "#### 1,000 dollars", "so #### 1000", "1,000", True),  # commas ignored
    ("5-shot", "#### -5", "#### -5", "-5", True),
    ("5-shot", "#### $5", "#### 5", None, False),  # lm-eval's strict regex wants the digits right after '#### '
    ("5-shot", "#### 18.", "#### 18", "18.", False),  # its exact match keeps the period
    ("5-shot", "The answer is 13.", "#### 13", None, False),
    ("8-shot-cot", "So 5 * 4 = 20. The answer is 29.", "29", "29", True),
    ("8-shot-cot", "The answer is 1,234.50.", "1234.50", "1,234.50", True),
    ("8-shot-cot", "The answer is 29", "29", "2", False),  # the regex's final '.' takes a character: here the 9
    ("8-shot-cot", "The answer is 7. The answer is 8.", "8", "7.", False),  # the first match counts
    ("8-shot-cot", "#### 29", "29", None, False),
])
def test_lm_eval_extraction(strategy, text, reference, found, ok):
    assert lm_eval_match(text, reference, strategy) == (found, ok)


def test_lm_eval_scoring_of_a_row():
    record = {"id": 0, "question": "q", "answer": "2 + 2 = <<2+2=4>>4\n#### 4", "gold": 4.0}
    assert score(record, [("2 + 2 = 4. The answer is 4.", False)], "8-shot-cot")["correct"]
    row = score(record, [("It is four.", False)], "8-shot-cot")
    assert not row["correct"] and row["extracted"] is None and row["kind"] == "no ####"
    assert score(record, [("2 + 2 = 4\n#### 4", False)], "5-shot")["correct"]
