"""torchrun with FSDP2 on CPU (gloo, 2 processes): the same loss and weights as one process over
the same global batch, and checkpoints that resume on a different number of ranks."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).parents[1]


def launch(script, nproc, out, model, data_dir, *extra):
    args = [script, "--model", str(model), "--max-examples", "16", "--batch-size", "2", "--grad-accum", "2",
            "--max-seq-length", "256", "--lr", "1e-3", "--warmup-frac", "0", "--eval-n", "0", "--out", str(out),
            *map(str, extra)]
    cmd = [sys.executable, *args] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    env = dict(os.environ, NANOGSM_DATA_DIR=str(data_dir), OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def losses(out, key="loss"):
    return [r[key] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if key in r]


def assert_same_run(a, b, weights):
    torch.testing.assert_close(losses(a), losses(b), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(losses(a, "grad_norm"), losses(b, "grad_norm"), atol=1e-5, rtol=1e-4)
    wa, wb = load_file(a / weights), load_file(b / weights)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4, msg=k)


@pytest.mark.parametrize("script, weights", [("train_sft.py", "model.safetensors"),
                                             ("train_lora.py", "adapter_model.safetensors")])
def test_two_ranks_equal_one_process(script, weights, tiny_with_tokenizer, tmp_path, data_dir):
    one, two = tmp_path / "one", tmp_path / "two"
    launch(script, 1, one, tiny_with_tokenizer, data_dir)
    result = launch(script, 2, two, tiny_with_tokenizer, data_dir)
    assert len(losses(two)) == 4 and result.stdout.count("step 1 |") == 1  # logged once, by rank 0
    assert_same_run(one, two, weights)
    first = losses(one)[0]
    assert abs(first - losses(two)[0]) < 1e-5 and losses(one)[-1] < first  # it trained


@pytest.mark.parametrize("script, weights, first, then", [("train_sft.py", "model.safetensors", 2, 1),
                                                          ("train_sft.py", "model.safetensors", 1, 2),
                                                          ("train_lora.py", "adapter_model.safetensors", 2, 1)])
def test_checkpoint_resumes_on_another_number_of_ranks(script, weights, first, then, tiny_with_tokenizer, tmp_path,
                                                       data_dir):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    launch(script, 1, straight, tiny_with_tokenizer, data_dir)
    launch(script, first, resumed, tiny_with_tokenizer, data_dir, "--stop-after-steps", 2)
    assert json.loads((resumed / "trainer_state.json").read_text())["step"] == 2
    launch(script, then, resumed, tiny_with_tokenizer, data_dir, "--resume")
    assert_same_run(straight, resumed, weights)


def test_grad_accum_must_split_over_the_ranks(tiny_with_tokenizer, tmp_path, data_dir):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_sft.py",
           "--model", str(tiny_with_tokenizer), "--max-examples", "16", "--batch-size", "2", "--grad-accum", "3",
           "--eval-n", "0", "--out", str(tmp_path / "x")]
    env = dict(os.environ, NANOGSM_DATA_DIR=str(data_dir), OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode != 0 and "--grad-accum 3 must be a multiple of the 2 ranks" in result.stderr


@pytest.mark.parametrize("algo", [["--algo", "ppo"], ["--algo", "grpo", "--group-size", "2"]])
def test_data_parallel_ppo_equals_one_process(algo, tiny_with_tokenizer, tmp_path, data_dir):
    """Each rank generates and scores half of the rollouts and trains on half of each optimizer
    step's micro-batches; gradients are summed over ranks: the same update as one process."""
    runs = {}
    for nproc in (1, 2):
        out = tmp_path / f"ppo{nproc}"
        args = ["train_ppo.py", "--init", str(tiny_with_tokenizer), "--out", str(out), "--steps", "2", "--rollouts", "8",
                "--ppo-batch", "2", "--minibatch", "2", "--grad-accum", "2", "--max-new-tokens", "6", "--lr", "1e-4",
                "--save-every", "0", *algo]
        cmd = [sys.executable, *args] if nproc == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
        env = dict(os.environ, NANOGSM_DATA_DIR=str(data_dir), OMP_NUM_THREADS="1")
        result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[nproc] = out
    for key in ("rollout/response_len", "rollout/kl_ref", "loss/policy", "loss/entropy", "params/grad_norm"):
        torch.testing.assert_close(losses(runs[1], key), losses(runs[2], key), atol=1e-5, rtol=1e-4, msg=key)
    files = ["model.safetensors"] + (["value_head.safetensors"] if "ppo" in algo else [])
    for name in files:
        a, b = load_file(runs[1] / name), load_file(runs[2] / name)
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)
