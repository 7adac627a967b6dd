"""The benchmark suite runs end to end on a tiny model (correctness of the plumbing only: no
timing is asserted anywhere in the tests)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]


def test_suite_runs_every_workload_on_a_tiny_model(tiny_with_tokenizer, tmp_path, data_dir):
    out = tmp_path / "bench.json"
    env = dict(os.environ, NANOGSM_DATA_DIR=str(data_dir))
    result = subprocess.run([sys.executable, "-m", "bench.suite", "--model", str(tiny_with_tokenizer), "--batches", "1",
                             "2", "--prompt-len", "8", "--new-tokens", "4", "--train-batch", "2", "--train-seq", "16",
                             "--steps", "1", "--ppo-rollouts", "2", "--threads", "1", "--out", str(out)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {(r["workload"], r["variant"], r["batch"]): r for r in report["rows"]}
    assert set(rows) == {("train", v, "2x16") for v in ("full", "full + ckpt", "LoRA", "LoRA + ckpt")} | \
        {(w, v, b) for w, v in (("prefill", ""), ("decode", "greedy")) for b in ("1", "2")} | \
        {("ppo", "2 rollouts x 64 tokens, 2 epochs", "2")}
    for key, row in rows.items():
        assert row["nanogsm"]["peak_gb"] > 0
        if key[0] != "ppo" and not key[1].startswith("LoRA"):
            assert row["hf"]["tok_s"] > 0 and row["nanogsm"]["tok_s"] > 0  # both sides measured
    assert 0 < rows["train", "full", "2x16"]["mfu"] < 1
    assert 0 < rows["decode", "greedy", "1"]["nanogsm"]["bandwidth_frac"]
    assert all("bandwidth_frac_step" in rows["decode", "greedy", "1"][side] for side in ("nanogsm", "hf"))
    assert "bandwidth_frac" not in rows["decode", "greedy", "2"]["nanogsm"]
    assert 0 < rows["ppo", "2 rollouts x 64 tokens, 2 epochs", "2"]["nanogsm"]["generate_share"] < 1
    assert "| train | full | 2x16 |" in result.stdout  # the printed table


def test_profile_step_runs_the_training_step_and_splits_its_time(tiny_with_tokenizer, tmp_path):
    out = tmp_path / "profile.json"
    result = subprocess.run([sys.executable, "-m", "bench.profile_step", "--model", str(tiny_with_tokenizer), "--batch", "2",
                             "--seq", "16", "--accum", "2", "--lora", "--attn-mask", "--trace", "--threads", "1", "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["step_s"] > 0 and report["tok_s"] > 0
    assert report["kinds"]["matmul"]["s"] > 0 and report["kinds"]["matmul"]["count"] > 0
    assert sum(k["s"] for k in report["kinds"].values()) <= report["profiled_step_s"]  # self times: no double count
    assert (tmp_path / "profile.trace.json.gz").stat().st_size > 0
    assert "| matmul |" in result.stdout


def test_profile_decode_splits_a_decode_step_by_kind(tiny_with_tokenizer, tmp_path):
    out = tmp_path / "profile-decode.json"
    result = subprocess.run([sys.executable, "-m", "bench.profile_decode", "--model", str(tiny_with_tokenizer), "--batch", "1",
                             "--prompt-len", "8", "--new-tokens", "4", "--threads", "1", "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["kinds"]["matmul"]["s_per_step"] > 0 and report["kinds"]["matmul"]["per_step"] > 0
    assert 0 < report["busy_step_s"] <= 1.5 * report["wall_step_s"]  # the profiled run includes its prefill
    assert 0 < report["bound_step_s"] and report["top"][0]["calls_per_step"] > 0
    assert "| matmul |" in result.stdout


def test_rollouts_bench_counts_the_steps_of_both_ways(tiny_with_tokenizer, tmp_path, data_dir):
    """Both ways run end to end; the one call fills its rows, in fewer decode steps (no timing)."""
    out = tmp_path / "rollouts.json"
    env = dict(os.environ, NANOGSM_DATA_DIR=str(data_dir))
    result = subprocess.run([sys.executable, "-m", "bench.rollouts", "--model", str(tiny_with_tokenizer), "--n", "6",
                             "--max-new-tokens", "5", "--chunk", "3", "--gen-batch", "2", "6", "--repeats", "1",
                             "--threads", "1", "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = {name: r[0] for name, r in json.loads(out.read_text())["results"].items()}
    chunked, one = runs["chunks of 3, a call each"], runs["one call, 6 rows"]
    assert chunked["tokens"] == one["tokens"] == runs["one call, 2 rows"]["tokens"] > 0
    assert one["steps"] < chunked["steps"] and one["rows_per_step"] == 6
    assert "| one call, 6 rows | 1 |" in result.stdout


def test_decode_steps_by_hand():
    """Responses of 3, 1, 1, 1, 2 tokens: chunks of 2 take 3 + 1 + 2 steps; two rows: one row
    decodes the 3, the other the three 1s (free after step 3), then whichever is free first the 2."""
    from bench.rollouts import decode_steps
    lengths = [3, 1, 1, 1, 2]
    assert decode_steps(lengths, chunk=2) == 6
    assert decode_steps(lengths, rows=2) == 5
    assert decode_steps(lengths, rows=5) == 3 and decode_steps(lengths, rows=1) == 8


def test_suite_runs_the_real_gsm8k_workloads(tiny_with_tokenizer, tmp_path, data_dir):
    """--train-data gsm8k trains on a train_sft.py micro-batch (prompt tokens unlabelled); --decode-pad
    pads one decode row and --decode-temperature samples on both sides; the eval workload generates
    for seeded test prompts with evaluate.py's stop rules on both sides."""
    out = tmp_path / "bench.json"
    env = dict(os.environ, NANOGSM_DATA_DIR=str(data_dir))
    result = subprocess.run([sys.executable, "-m", "bench.suite", "--model", str(tiny_with_tokenizer), "--only", "train",
                             "decode", "eval", "--train-data", "gsm8k", "--train-variants", "full", "--train-batch", "2",
                             "--batches", "2", "--prompt-len", "8", "--new-tokens", "4", "--decode-pad", "3",
                             "--decode-temperature", "1",
                             "--eval-n", "3", "--eval-new-tokens", "5", "--steps", "1", "--threads", "1", "--out", str(out)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    train, decode, ev = json.loads(out.read_text())["rows"]
    assert decode["variant"] == "sampled at T=1, first row 3 padding" and decode["hf"]["tok_s"] > 0 < decode["nanogsm"]["tok_s"]
    batch, seq = train["nanogsm"]["shape"]
    assert batch == 2 and 50 < seq <= 512 and train["batch"].startswith(f"2x{seq} GSM8K")
    assert 0.3 < train["nanogsm"]["labelled"] < 0.95  # the prompt carries no loss
    assert train["hf"]["tok_s"] > 0 and train["nanogsm"]["tok_s"] > 0
    assert ev["workload"] == "eval" and ev["variant"] == "one-shot-instruct, 3 problems, greedy"
    for side in ("nanogsm", "hf"):
        assert 3 <= ev[side]["tokens"] <= 3 * 5 and ev[side]["tok_s"] > 0 and 0 <= ev[side]["em"] <= 1
        assert "outputs" not in ev[side]  # compared, then dropped from the report
    assert ev["same_outputs"] == 1.0  # same weights, greedy, fp32: the same tokens on both sides
    assert ev["nanogsm"]["tokens"] == ev["hf"]["tokens"]
    assert "| eval | one-shot-instruct, 3 problems, greedy | 16 |" in result.stdout


def test_idle_gaps_finds_the_device_idle_stretches_between_kernels():
    """Hand-made kernel events (us): overlapping kernels are one busy stretch; gaps are measured
    from the latest end so far, and named by the kernels around them."""
    from types import SimpleNamespace

    from bench.profile_step import idle_gaps
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    spans = [("a", 0, 10, cuda), ("b", 5, 30, cuda), ("c", 12, 20, cuda), ("host", 30, 500, cpu),
             ("d", 35, 40, cuda), ("e", 1040, 1050, cuda)]  # gaps: 30 -> 35 (after b), 40 -> 1040 (after d)
    prof = SimpleNamespace(events=lambda: [SimpleNamespace(name=n, time_range=SimpleNamespace(start=s, end=e),
                                                           device_type=t) for n, s, e, t in spans])
    total, count, short, longest = idle_gaps(prof)
    assert count == 2 and total == pytest.approx(1005e-6) and short == pytest.approx(5e-6)
    assert longest == [(pytest.approx(1000e-6), "d", "e"), (pytest.approx(5e-6), "b", "d")]


def test_ladder_runs_every_stage_at_a_tiny_scale(tiny_with_tokenizer, tmp_path, data_dir):
    """bench/ladder.py (the GPU ladder) on a tiny model: SFT, eval with and without the calculator, GRPO,
    the same two evals and the table with both paired comparisons."""
    env = dict(os.environ, NANOGSM_DATA_DIR=str(data_dir))
    result = subprocess.run([sys.executable, "-m", "bench.ladder", "--tiny", "--model", str(tiny_with_tokenizer),
                             "--out", str(tmp_path / "ladder")], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = (tmp_path / "ladder" / "table.md").read_text()
    assert table.count("of 8 |") == 4 and "RL steps run: 2" in table and table.count("McNemar") == 2, table
    assert "calculator (A) vs GRPO + calculator (B)" in table
    for stage in ("SFT, 1 epoch", "SFT: eval", "SFT + calculator: eval", "GRPO from SFT", "GRPO: eval",
                  "GRPO + calculator: eval"):
        assert f"| {stage} |" in table
