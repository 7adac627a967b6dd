"""SFT pieces (labels, loss normalisation, schedule, checkpointing) and train_sft.py end to end."""
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nanogsm.compile import compile_blocks
from nanogsm.lora import load_model
from nanogsm.model import Gemma, LMHead
from nanogsm.tokenizer import Tokenizer
from nanogsm.train import IGNORE, collate, lr_at, n_target_tokens, sft_example, token_loss_sum

ROOT = Path(__file__).parents[1]


def random_examples(n, vocab=256, seed=0):
    """(ids, labels) with a prompt of 3-6 tokens (label -100) and an answer of 2-12 tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p, a = torch.randint(3, 7, (1,), generator=g).item(), torch.randint(2, 13, (1,), generator=g).item()
        ids = torch.randint(0, vocab, (p + a,), generator=g).tolist()
        out.append((ids, [IGNORE] * p + ids[p:]))
    return out


def test_label_masking_exact():
    tok = Tokenizer.from_pretrained("gemma-3-270m")
    ids, labels, truncated = sft_example(tok, "What is 1+1?", "1+1=<<1+1=2>>2\n#### 2", 512)
    prompt = tok.encode("Question: What is 1+1?\nAnswer:")
    target = tok.encode(" 1+1=<<1+1=2>>2\n#### 2", bos=False) + [tok.eos_id]
    assert ids == prompt + target and labels == [IGNORE] * len(prompt) + target and not truncated
    assert tok.decode(target) == " 1+1=<<1+1=2>>2\n#### 2" and ids[0] == tok.bos_id and labels[-1] == tok.eos_id
    ids, labels, truncated = sft_example(tok, "What is 1+1?", "1+1=<<1+1=2>>2\n#### 2", len(prompt) + 2)
    assert truncated and len(ids) == len(labels) == len(prompt) + 2
    with pytest.raises(ValueError, match="--max-seq-length 5 is shorter than a prompt"):
        sft_example(tok, "What is 1+1?", "#### 2", 5)


def test_collate_pads_right_with_ignored_labels():
    ids, labels = collate([([5, 6, 7], [IGNORE, 6, 7]), ([8], [IGNORE])], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert labels.tolist() == [[IGNORE, 6, 7], [IGNORE, IGNORE, IGNORE]]
    assert n_target_tokens(labels) == 2


def test_lr_schedule():
    at = lambda s: lr_at(s, 100, 10, 1e-5, 1e-6)  # noqa: E731
    assert at(0) == pytest.approx(1e-6)  # first warmup step: max_lr / warmup
    assert at(9) == pytest.approx(1e-5)  # end of warmup: the peak
    assert at(10) == pytest.approx(1e-5)  # cosine starts at the peak
    assert at(99) == pytest.approx(1e-6)  # last step: the floor
    assert at(10 + 89 // 2) == pytest.approx(5.5e-6, rel=0.02)  # halfway down the cosine: the midpoint
    assert all(at(s) >= at(s + 1) for s in range(9, 99))


def test_effective_batch_loss_equals_single_big_batch(hf_checkpoint):
    model = Gemma.from_pretrained(hf_checkpoint("gemma3_text")[1])
    examples = random_examples(6)
    micro = [collate(examples[:2], 0), collate(examples[2:], 0)]
    n = sum(n_target_tokens(lab) for _, lab in micro)
    split = sum(token_loss_sum(model, ids, lab) / n for ids, lab in micro)
    split.backward()
    grads_split = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ids, lab = collate(examples, 0)
    big = token_loss_sum(model, ids, lab) / n_target_tokens(lab)
    big.backward()
    torch.testing.assert_close(split, big, atol=1e-6, rtol=1e-6)
    for a, p in zip(grads_split, model.parameters()):
        torch.testing.assert_close(a, p.grad, atol=1e-6, rtol=1e-5)
    mean_of_means = sum(token_loss_sum(model, i, lb) / n_target_tokens(lb) for i, lb in micro) / 2
    assert abs(mean_of_means.item() - big.item()) > 1e-3  # the normalisation matters here


def test_gradient_checkpointing_gives_the_same_gradients(hf_checkpoint):
    model = Gemma.from_pretrained(hf_checkpoint("gemma2")[1])
    ids, lab = collate(random_examples(4), 0)
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.grad_checkpointing = checkpointing
        token_loss_sum(model, ids, lab).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_loss_falls_when_overfitting_eight_examples(hf_checkpoint):
    model = Gemma.from_pretrained(hf_checkpoint("gemma")[1])
    ids, lab = collate(random_examples(8), 0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = token_loss_sum(model, ids, lab) / n_target_tokens(lab)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]


# ---- the script ----------------------------------------------------------------------------------

def train(*args, data_dir, script="train_sft.py"):
    env = dict(os.environ, NANOGSM_DATA_DIR=str(data_dir))
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.parametrize("script, weights", [("train_sft.py", "model.safetensors"), ("train_lora.py", "adapter_model.safetensors")])
def test_resume_is_bit_exact(script, weights, tiny_with_tokenizer, tmp_path, data_dir):
    common = ["--model", tiny_with_tokenizer, "--max-examples", 16, "--batch-size", 2, "--grad-accum", 2,
              "--max-seq-length", 256, "--lr", 1e-3, "--eval-n", 0]
    run = functools.partial(train, data_dir=data_dir, script=script)
    straight = run(*common, "--out", tmp_path / "a")
    assert straight.returncode == 0, straight.stderr
    assert "16 examples (main/train)" in straight.stdout and "4 steps of 2 x 2" in straight.stdout
    first = run(*common, "--out", tmp_path / "b", "--stop-after-steps", 2)
    assert first.returncode == 0, first.stderr
    second = run(*common, "--out", tmp_path / "b", "--resume")
    assert second.returncode == 0, second.stderr
    a, b = load_file(tmp_path / "a" / weights), load_file(tmp_path / "b" / weights)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    start = load_file(tiny_with_tokenizer / "model.safetensors")
    moved = [not torch.equal(a[k], start[k]) for k in a if k in start] or [a[k].abs().sum() > 0 for k in a
                                                                           if k.endswith("lora_B")]
    assert all(moved)  # SFT changed every weight; LoRA moved every B away from zero
    logs = [[json.loads(line) for line in (tmp_path / d / "log.jsonl").read_text().splitlines()] for d in "ab"]
    assert [r["loss"] for r in logs[0]] == [r["loss"] for r in logs[1]] and len(logs[0]) == 4
    assert set(logs[0][0]) == {"step", "loss", "lr", "grad_norm", "tok_per_s", "peak_mem_gb"}
    # The checkpoint is a folder every stage reads, with its tokenizer.
    assert load_model(tmp_path / "a") and Tokenizer.from_pretrained(tmp_path / "a")


def test_bf16_on_cpu_autocasts_and_stays_close_to_fp32(tiny_with_tokenizer, tmp_path, data_dir):
    common = ["--model", tiny_with_tokenizer, "--max-examples", 4, "--batch-size", 2, "--grad-accum", 2,
              "--max-seq-length", 256, "--eval-n", 0]
    losses = {}
    for mode in ("off", "on"):
        result = train(*common, "--bf16", mode, "--out", tmp_path / mode, data_dir=data_dir)
        assert result.returncode == 0, result.stderr
        assert ("compute bf16 autocast" in result.stdout) == (mode == "on")
        losses[mode] = json.loads((tmp_path / mode / "log.jsonl").read_text().splitlines()[0])["loss"]
    assert losses["on"] != losses["off"] and abs(losses["on"] - losses["off"]) < 0.02 * losses["off"]


@pytest.mark.parametrize("script", ["train_sft.py", "train_lora.py"])
def test_plain_runs_without_the_speed_layers_to_the_same_losses(script, tiny_with_tokenizer, tmp_path, data_dir):
    """--plain: the reference path only (no nanogsm/cpu.py); the same training, step for step."""
    common = ["--model", tiny_with_tokenizer, "--max-examples", 8, "--batch-size", 2, "--grad-accum", 2,
              "--max-seq-length", 256, "--lr", 1e-3, "--eval-n", 2]
    losses = {}
    for flag in ([], ["--plain"]):
        result = train(*common, *flag, "--out", tmp_path / f"run{len(flag)}", data_dir=data_dir, script=script)
        assert result.returncode == 0, result.stderr
        losses[len(flag)] = [json.loads(line).get("loss") for line in (tmp_path / f"run{len(flag)}" / "log.jsonl")
                             .read_text().splitlines()]
    assert len(losses[0]) == 2 and losses[0] == pytest.approx(losses[1], rel=1e-4)


@pytest.mark.parametrize("args, message", [
    (["--data", "mian"], "error: --data 'mian': expected main or socratic"),
    (["--max-seq-length", 8], "error: --max-seq-length 8 is shorter than a prompt"),
    (["--model", "no-such-model"], "error: model 'no-such-model': not a checkpoint folder"),
])
def test_bad_input(args, message, tiny_with_tokenizer, tmp_path, data_dir):
    base = ["--model", tiny_with_tokenizer, "--max-examples", 4, "--out", tmp_path / "x"]
    result = train(*base, *args, data_dir=data_dir)
    assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr


def test_existing_out_is_refused(tiny_with_tokenizer, tmp_path, data_dir):
    (tmp_path / "x").mkdir()
    result = train("--model", tiny_with_tokenizer, "--max-examples", 4, "--out", tmp_path / "x", data_dir=data_dir)
    assert result.returncode != 0 and "exists; pass --resume" in result.stderr


def test_lora_merge_and_evaluate_the_adapter_folder(tiny_with_tokenizer, tmp_path, data_dir):
    result = train("--model", tiny_with_tokenizer, "--max-examples", 8, "--batch-size", 2, "--grad-accum", 2,
                   "--max-seq-length", 256, "--lr", 1e-2, "--eval-n", 0, "--r", 4, "--alpha", 8, "--merge",
                   "--out", tmp_path / "lora", data_dir=data_dir, script="train_lora.py")
    assert result.returncode == 0, result.stderr
    assert "trainable of" in result.stdout
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8 and len(config["target_modules"]) == 7
    x = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "lora")(x), Gemma.from_pretrained(tmp_path / "lora" / "merged")(x),
                                   atol=1e-5, rtol=1e-5)  # merged weights round apart from Wx + BAx
    env = dict(os.environ, NANOGSM_DATA_DIR=str(data_dir))
    ev = subprocess.run([sys.executable, "evaluate.py", "--model", str(tmp_path / "lora"), "--n", "2", "--max-new-tokens",
                         "3"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert ev.returncode == 0 and "strict EM" in ev.stdout, ev.stderr


@pytest.mark.parametrize("script", ["train_sft.py", "train_lora.py"])
def test_training_continues_from_an_adapter_folder(script, tiny_with_tokenizer, tmp_path, data_dir):
    """--model an adapter folder: the run starts from its base with the adapter folded in, the same
    first loss as from the merged checkpoint; a LoRA on top loads back through the chain of bases."""
    common = ["--max-examples", 4, "--batch-size", 2, "--grad-accum", 2, "--max-seq-length", 256, "--eval-n", 0]
    first = train("--model", tiny_with_tokenizer, *common, "--epochs", 5, "--lr", 1e-2, "--r", 4, "--alpha", 8,
                  "--merge", "--out", tmp_path / "lora", data_dir=data_dir, script="train_lora.py")
    assert first.returncode == 0, first.stderr
    first_loss = {}
    starts = {"base": tiny_with_tokenizer, "adapter": tmp_path / "lora", "merged": tmp_path / "lora" / "merged"}
    for name, start in starts.items():
        result = train("--model", start, *common, "--out", tmp_path / name, data_dir=data_dir, script=script)
        assert result.returncode == 0, result.stderr
        first_loss[name] = json.loads((tmp_path / name / "log.jsonl").read_text().splitlines()[0])["loss"]
    assert first_loss["adapter"] == pytest.approx(first_loss["merged"], rel=1e-4)
    assert first_loss["adapter"] < first_loss["base"] - 0.05  # the first adapter's training is kept
    x = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "adapter")(x), load_model(tmp_path / "merged")(x),
                                   atol=5e-3, rtol=1e-3)  # one Adam step apart: rounding flips a few signs


@pytest.mark.parametrize("family", ["gemma", "gemma2"])  # gemma2: the final soft-cap sits inside the chunked head
def test_chunked_loss_equals_full_logits_loss(family, hf_checkpoint):
    import torch.nn.functional as F
    model = Gemma.from_pretrained(hf_checkpoint(family)[1])
    ids, labels = collate(random_examples(5), 0)
    chunked = token_loss_sum(model, ids, labels, chunk=7)  # chunks that do not divide the token count
    chunked.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logits = model(ids)[:, :-1]
    plain = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE,
                            reduction="sum")
    plain.backward()
    torch.testing.assert_close(chunked, plain, atol=1e-4, rtol=1e-6)
    for a, p in zip(grads, model.parameters()):
        torch.testing.assert_close(a, p.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("cap", [None, 2.0])
def test_head_loss_equals_autograd_through_cross_entropy(cap, bf16):
    check_head_loss(cap, bf16, "cpu")


def check_head_loss(cap, bf16, device, compiled=False):
    """HeadLoss (its loss and both gradients, formed in its forward) against F.cross_entropy on full
    logits under autograd, in the same autocast, with chunks that do not divide the positions
    (tests/test_cuda.py runs it on CUDA). compiled: the chunk arithmetic through torch.compile."""
    from nanogsm.train import HeadLoss, chunk_cross_entropy, compiled_chunk_cross_entropy
    xent = compiled_chunk_cross_entropy() if compiled else chunk_cross_entropy
    g = torch.Generator().manual_seed(0)
    N, d, V = 7, 5, 11
    hidden, weight = torch.randn(N, d, generator=g), torch.randn(V, d, generator=g)
    targets = torch.randint(0, V, (N,), generator=g)
    hidden, weight, targets = (t.to(device) for t in (hidden, weight, targets))
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=bf16)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with autocast:
        logits = (h1 @ w1.T).float()
        logits = logits if cap is None else torch.tanh(logits / cap) * cap
        plain = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    (2 * plain).backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with autocast:
        loss = HeadLoss.apply(h2, w2, targets, cap, 3, xent, LMHead().mm_t)
    (2 * loss).backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, plain, atol=1e-5, rtol=1e-5)
    tol = dict(atol=2e-2, rtol=1e-2) if bf16 else dict(atol=1e-5, rtol=1e-5)  # bf16: one rounding apart
    torch.testing.assert_close(h2.grad, h1.grad, **tol)
    torch.testing.assert_close(w2.grad, w1.grad, **tol)


def check_sft_step(folder, device):
    """sft_step (two micro-batches, clipping, AdamW, the read-back of loss and gradient norm) against
    plain autograd through full logits: the logged loss and pre-clip norm, and the weights after the
    update (tests/test_cuda.py runs it on CUDA, where the read-back is an asynchronous copy)."""
    from nanogsm.train import sft_step
    batches = [collate(random_examples(3, seed=s), 0) for s in (1, 2)]
    n = sum(n_target_tokens(labels) for _, labels in batches)
    results = []
    for plain in (False, True):
        model = Gemma.from_pretrained(folder).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)  # each weight moves ~1e-3
        if not plain:
            stats = sft_step(model, opt, batches, device, torch.autocast(device, enabled=False), clip=0.5, pad_id=0)
        else:
            loss = sum(torch.nn.functional.cross_entropy(model(ids.to(device))[:, :-1].float().flatten(0, 1),
                                                         labels[:, 1:].flatten().to(device), reduction="sum")
                       for ids, labels in batches) / n  # ignore_index -100: the prompt tokens
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
            stats = {"loss": loss.item(), "grad_norm": norm.item()}
        results.append((stats, [p.detach().cpu() for p in model.parameters()]))
    (stats, weights), (ref_stats, ref_weights) = results
    assert stats["loss"] == pytest.approx(ref_stats["loss"], rel=1e-5)
    assert stats["grad_norm"] == pytest.approx(ref_stats["grad_norm"], rel=1e-4) and ref_stats["grad_norm"] > 0.5
    for a, b in zip(weights, ref_weights):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert any((a != p).any() for a, p in zip(weights, Gemma.from_pretrained(folder).parameters()))


def test_sft_step_equals_plain_autograd_clipping_and_adamw(hf_checkpoint):
    check_sft_step(hf_checkpoint("gemma2")[1], "cpu")


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_with_tokenizer, tmp_path, data_dir):
    result = train("--model", tiny_with_tokenizer, "--max-examples", 12, "--batch-size", 2, "--grad-accum", 1,
                   "--max-seq-length", 256, "--lr", 1e30, "--warmup-frac", 0, "--save-every", 1, "--eval-n", 0,
                   "--out", tmp_path / "nan", data_dir=data_dir)
    assert result.returncode != 0 and "stopping. The last good checkpoint" in result.stderr
    state = json.loads((tmp_path / "nan" / "trainer_state.json").read_text())
    assert 1 <= state["step"] < 6  # saved before the bad step, never after it
    assert Gemma.from_pretrained(tmp_path / "nan")  # a complete, loadable folder


def test_compiled_blocks_give_the_eager_loss_and_gradients(hf_checkpoint):
    """`--compile` (torch.compile per block, CPU inductor here) changes speed, not results."""
    torch.compiler.reset()  # recompile budgets are per process: other tests compile these blocks too
    model = Gemma.from_pretrained(hf_checkpoint("gemma3_text")[1])
    ids, labels = collate(random_examples(3), 0)
    results = []
    for compiled in (False, True):
        if compiled:
            compile_blocks(model)
        model.zero_grad()
        loss = token_loss_sum(model, ids, labels, compiled=compiled)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (eager, eager_grads), (comp, comp_grads) = results
    torch.testing.assert_close(comp, eager, atol=1e-5, rtol=1e-5)
    for a, b in zip(comp_grads, eager_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert all(b._compiled_call_impl is not None for b in model.layers)  # really compiled


def test_head_loss_under_no_grad_computes_no_gradients(hf_checkpoint):
    """Evaluation (`evaluate.py --answer-loss`) gets the same loss without the gradient work."""
    from nanogsm.train import HeadLoss
    model = Gemma.from_pretrained(hf_checkpoint("gemma")[1])
    ids, labels = collate(random_examples(2), 0)
    calls = []
    original = HeadLoss.forward
    HeadLoss.forward = staticmethod(lambda ctx, *a: calls.append(ctx.needs_input_grad[:2]) or original(ctx, *a))
    try:
        with torch.no_grad():
            evaluated = token_loss_sum(model, ids, labels)
        trained = token_loss_sum(model, ids, labels)
    finally:
        HeadLoss.forward = staticmethod(original)
    assert calls == [(False, False), (True, True)]
    torch.testing.assert_close(evaluated, trained.detach())


@pytest.mark.parametrize("command, shown", [
    (["train_sft.py"], ["peak learning rate (default: 1e-05)", "end of the cosine (default: 1e-06)"]),
    (["train_lora.py"], ["LoRA rank (default: 16)", "alpha / r (default: 32)"]),
    (["train_ppo.py"], ["(default: 5e-07)", "(default: 0.05)"]),
    (["evaluate.py"], ["(default: one-shot-instruct)", "(default: 256)"]),
    (["-m", "bench.suite"], ["(default: gemma-3-270m)"]),
    (["-m", "bench.rollouts"], ["(default: 64)"]),
    (["-m", "bench.profile_step"], ["(default:"]),
    (["-m", "bench.profile_decode"], ["(default:"]),
    (["-m", "bench.load_memory"], ["usage:"]),
])
def test_help_shows_every_default_and_the_usage_examples(command, shown):
    result = subprocess.run([sys.executable, *command, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    flowing = " ".join(result.stdout.split())  # help lines wrap with the terminal's width
    assert all(text in flowing for text in shown)
    assert "\n    python " in result.stdout  # the docstring's usage examples keep their layout
