"""evaluate.py end to end: user errors, a tiny real run, and the paired comparison."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanogsm.gsm8k import seeded_subset, load_gsm8k
from nanogsm.report import mcnemar_exact, wilson_interval

ROOT = Path(__file__).parents[1]


def run(*args, data_dir=None):
    env = dict(os.environ, **({"NANOGSM_DATA_DIR": str(data_dir)} if data_dir else {}))
    return subprocess.run([sys.executable, "evaluate.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.parametrize("args, message", [
    (["--model", "no-such-model", "--n", "2"], "error: model 'no-such-model': not a checkpoint folder"),
    (["--model", "gemma-3-270m", "--n", "5000"], "error: --n 5000 is larger than the split (1319 problems)"),
    (["--model", "gemma-3-270m", "--prompt", "two-shot"], "error: --prompt 'two-shot'"),
    (["--model", "gemma-3-270m", "--data-dir", "/nonexistent"], "error: GSM8K data folder /nonexistent does not exist"),
    (["--model", "gemma-3-270m", "--config", "mian"], "error: unknown GSM8K config 'mian'"),
    (["--model", "gemma-3-270m", "--n", "0"], "error: --n, --batch-size and --max-new-tokens must be at least 1"),
    (["--model", "gemma-3-270m", "--part", "3/2"], "error: --part '3/2': expected K/N with 1 <= K <= N"),
    (["--model", "gemma-3-270m", "--part", "1"], "error: --part '1': expected K/N"),
    (["--by-steps"], "error: --by-steps needs --compare A B"),
])
def test_user_errors_are_one_line(args, message, data_dir):
    result = run(*args, data_dir=data_dir)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr


def test_checkpoint_without_tokenizer(hf_checkpoint, data_dir):
    result = run("--model", str(hf_checkpoint("gemma")[1]), "--n", "2", data_dir=data_dir)
    assert result.returncode != 0 and "no tokenizer.json" in result.stderr and "Traceback" not in result.stderr


def test_real_model_run_writes_rows_for_the_seeded_subset(tmp_path, data_dir):
    out = tmp_path / "run.jsonl"
    result = run("--model", "gemma-3-270m", "--n", "3", "--max-new-tokens", "6", "--out", str(out), data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    assert "strict EM" in result.stdout and "flexible" in result.stdout and "failures:" in result.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    subset = seeded_subset(load_gsm8k("main", "test", data_dir), 3)
    assert [r["id"] for r in rows] == [r["id"] for r in subset]
    assert set(rows[0]) >= {"id", "question", "gold", "completion", "extracted", "correct"}
    assert all(r["kind"] == "truncated at max tokens" or r["kind"] == "correct" or "####" in r["completion"]
               for r in rows)


def test_parts_of_an_evaluation_join_to_the_whole_run(tmp_path, tiny_with_tokenizer, data_dir):
    common = ("--model", str(tiny_with_tokenizer), "--n", "5", "--max-new-tokens", "3", "--prompt", "zero-shot")
    assert run(*common, "--out", str(tmp_path / "all.jsonl"), data_dir=data_dir).returncode == 0
    for k in (1, 2):
        result = run(*common, "--part", f"{k}/2", "--out", str(tmp_path / f"p{k}.jsonl"), data_dir=data_dir)
        assert result.returncode == 0, result.stderr
    whole = [json.loads(line) for line in (tmp_path / "all.jsonl").read_text().splitlines()]
    parts = [[json.loads(line) for line in (tmp_path / f"p{k}.jsonl").read_text().splitlines()] for k in (1, 2)]
    assert [r["id"] for r in parts[0]] == [r["id"] for r in whole[0::2]]  # problems 1, 3, 5 and 2, 4
    assert sorted(parts[0] + parts[1], key=lambda r: r["id"]) == whole  # the same rows, completions included
    summary = run("--summary", str(tmp_path / "p1.jsonl"), str(tmp_path / "p2.jsonl"))
    assert summary.returncode == 0, summary.stderr
    assert f"strict EM {sum(r['correct'] for r in whole)}/5 =" in summary.stdout
    twice = run("--summary", str(tmp_path / "p1.jsonl"), str(tmp_path / "all.jsonl"))
    assert twice.returncode != 0 and "a problem id appears twice" in twice.stderr and "Traceback" not in twice.stderr
    (tmp_path / "hand.jsonl").write_text(json.dumps({"id": 0, "correct": True, "completion": "#### 1"}) + "\n")
    hand = run("--summary", str(tmp_path / "hand.jsonl"))  # a row with fewer fields than --out writes
    assert hand.returncode != 0 and "Traceback" not in hand.stderr
    assert "hand.jsonl:1: no flexible_correct, extracted, kind (expected a row of evaluate.py --out)" in hand.stderr


def test_heldout_scores_train_problems_the_run_did_not_see(tmp_path, tiny_with_tokenizer, data_dir):
    result = run("--model", str(tiny_with_tokenizer), "--heldout", "--n", "2", data_dir=data_dir)
    assert result.returncode != 0 and "has no max_examples" in result.stderr and "Traceback" not in result.stderr
    import shutil
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_with_tokenizer, run_dir)
    (run_dir / "args.json").write_text(json.dumps({"data": "main", "max_examples": 40, "seed": 3}))
    out = tmp_path / "held.jsonl"
    result = run("--model", str(run_dir), "--heldout", "--n", "4", "--max-new-tokens", "2", "--out", str(out),
                 data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    train = load_gsm8k("main", "train", data_dir)
    trained = {r["id"] for r in seeded_subset(train, 40, 3)}
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4 and not trained & {r["id"] for r in rows}
    assert [r["question"] for r in rows] == [train[r["id"]]["question"] for r in rows]  # train, not test


def test_compile_gives_the_eager_completions(tmp_path, tiny_with_tokenizer, data_dir):
    rows = {}
    for flag in ([], ["--compile"]):
        out = tmp_path / f"run{len(flag)}.jsonl"
        result = run("--model", str(tiny_with_tokenizer), "--n", "3", "--max-new-tokens", "6", "--out", str(out), *flag,
                     data_dir=data_dir)
        assert result.returncode == 0, result.stderr
        assert ("torch.compile: every transformer block" in result.stdout) == bool(flag)
        rows[len(flag)] = [json.loads(line)["completion"] for line in out.read_text().splitlines()]
    assert rows[0] == rows[1] and len(rows[0]) == 3


def test_plain_gives_the_completions_of_the_speed_layers(tmp_path, tiny_with_tokenizer, data_dir):
    """--plain (no nanogsm/cpu.py, no CUDA graphs): the same greedy completions, the calculator on."""
    rows = {}
    for flag in ([], ["--plain"]):
        out = tmp_path / f"run{len(flag)}.jsonl"
        result = run("--model", str(tiny_with_tokenizer), "--n", "4", "--max-new-tokens", "12", "--calculator",
                     "--out", str(out), *flag, data_dir=data_dir)
        assert result.returncode == 0, result.stderr
        rows[len(flag)] = [json.loads(line)["completion"] for line in out.read_text().splitlines()]
    assert rows[0] == rows[1] and len(rows[0]) == 4


def test_answer_loss_equals_hf_loss_on_the_gold_answers(tiny_with_tokenizer, data_dir):
    import transformers
    from nanogsm.tokenizer import Tokenizer
    result = run("--model", str(tiny_with_tokenizer), "--n", "3", "--answer-loss", data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    ours = float(result.stdout.split("answer loss ")[1].split()[0])
    tok = Tokenizer.from_pretrained(tiny_with_tokenizer)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_with_tokenizer, dtype=torch.float32)
    total, count = 0.0, 0
    for r in seeded_subset(load_gsm8k("main", "test", data_dir), 3):
        prompt = tok.encode(f"Question: {r['question']}\nAnswer:")
        target = tok.encode(" " + r["answer"], bos=False) + [tok.eos_id]
        ids = torch.tensor([prompt + target])
        labels = torch.tensor([[-100] * len(prompt) + target])
        with torch.no_grad():
            total += hf(input_ids=ids, labels=labels).loss.item() * len(target)  # HF: mean over shifted labels
        count += len(target)
    assert ours == pytest.approx(total / count, abs=1e-4)


def test_compare_counts_and_mcnemar(tmp_path):
    a = [True, True, True, True, False, False]
    b = [True, False, False, False, True, False]
    texts = {"a": ["x = <<1+1=2>>2\n#### 2"] * 6, "b": ["#### 2", "1\n2\n3\n#### 3"] * 3}
    for name, flags in (("a", a), ("b", b)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"id": i, "correct": c, "completion": t}) + "\n"
                                                        for i, (c, t) in enumerate(zip(flags, texts[name]))))
    result = run("--compare", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"))
    assert result.returncode == 0, result.stderr
    assert "A answers: 21 characters, 1.00 lines before '####'" in result.stdout  # 14 + 1 + 6 characters, 1 line
    assert "B answers: 9 characters, 1.50 lines before '####'" in result.stdout  # (6 + 12) / 2, (0 + 3) / 2
    assert "| both right | 1 | 0 |" in result.stdout and "| only A | 3 | 1, 2, 3 |" in result.stdout
    assert "| only B | 1 | 4 |" in result.stdout and "| both wrong | 1 | 5 |" in result.stdout
    assert "McNemar exact p = 0.6250" in result.stdout  # 2 * (C(4,0) + C(4,1)) / 2^4
    # a row without a field compare reads: one line naming the file, the line and the field
    (tmp_path / "b.jsonl").write_text(json.dumps({"id": 0, "correct": True}) + "\n")
    result = run("--compare", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"))
    assert result.returncode != 0 and "Traceback" not in result.stderr and result.stdout == ""
    assert "b.jsonl:1: no completion (expected a row of evaluate.py --out)" in result.stderr


def test_compare_by_steps_counts_by_hand(tmp_path, data_dir):
    # test problems 0-4: their reference answers have 2, 2, 4, 2 and 2 reasoning lines (read by hand)
    test = load_gsm8k("main", "test", data_dir)
    for name, flags in (("a", [True, True, True, False, False]), ("b", [True, False, False, True, True])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"id": i, "question": test[i]["question"],
                                                                    "correct": c, "completion": "#### 1"}) + "\n"
                                                        for i, c in enumerate(flags)))
    result = run("--compare", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), "--by-steps", data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    table = result.stdout.split("| reasoning lines |")[1].splitlines()[2:]
    assert table == ["| 2 | 4 | 2 | 3 | 1 | 2 |", "| 4 | 1 | 1 | 0 | 1 | 0 |"]
    # rows of another split (here: another question under id 0) are refused in one line
    (tmp_path / "a.jsonl").write_text(json.dumps({"id": 0, "question": "How many?", "correct": True,
                                                  "completion": "#### 1"}) + "\n")
    result = run("--compare", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), "--by-steps", data_dir=data_dir)
    assert result.returncode != 0 and "Traceback" not in result.stderr and result.stdout == ""
    assert "a.jsonl: problem 0 is not that of the GSM8K test split" in result.stderr


def test_statistics_by_hand():
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(5, 0) == pytest.approx(2 / 32)
    lo, hi = wilson_interval(8, 256)
    assert lo == pytest.approx(0.01591, abs=1e-4) and hi == pytest.approx(0.06044, abs=1e-4)  # computed by hand


def test_samples_report_majority_and_pass_at_k(tmp_path, data_dir):
    out = tmp_path / "k.jsonl"
    result = run("--model", "gemma-3-270m", "--n", "2", "--max-new-tokens", "4", "--samples", "3", "--temperature",
                 "1.0", "--out", str(out), data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    assert "maj@3" in result.stdout and "pass@3" in result.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(len(r["completions"]) == 3 and len(r["extracted_all"]) == 3 for r in rows)
    assert len({c for r in rows for c in r["completions"]}) > 2  # sampled, not three copies of greedy
    greedy = run("--model", "gemma-3-270m", "--samples", "3", data_dir=data_dir)
    assert greedy.returncode != 0 and "--samples k > 1 needs --temperature > 0" in greedy.stderr
