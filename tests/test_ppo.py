"""PPO / GRPO pieces against plain-Python loops and hand-computed values."""
import math

import pytest
import torch

from nanogsm.model import LMHead
from nanogsm.ppo import (HeadScore, compute_gae, grpo_advantages, informative_groups, kl_penalty, policy_loss,
                         value_loss, whiten)


def random_batch(B=5, T=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = [T, 1, 4, 7, 0][:B]
    mask = torch.tensor([[1.0 if t < n else 0.0 for t in range(T)] for n in lengths])
    # Values past the response are garbage on purpose: a value head outputs something on padding too.
    return torch.randn(B, T, generator=g) * mask, torch.randn(B, T, generator=g), mask, lengths


def gae_loop(rewards, values, length, gamma, lam):
    adv, running = [0.0] * len(rewards), 0.0
    for t in reversed(range(length)):
        next_value = values[t + 1] if t + 1 < length else 0.0
        running = rewards[t] + gamma * next_value - values[t] + gamma * lam * running
        adv[t] = running
    return adv


@pytest.mark.parametrize("gamma, lam", [(0.99, 0.95), (1.0, 1.0), (0.5, 0.0)])
def test_gae_equals_a_plain_python_loop(gamma, lam):
    rewards, values, mask, lengths = random_batch()
    adv, ret = compute_gae(rewards, values, mask, gamma, lam)
    for b, n in enumerate(lengths):
        expected = gae_loop(rewards[b].tolist(), values[b].tolist(), n, gamma, lam)
        assert adv[b].tolist() == pytest.approx(expected, abs=1e-5)
        assert ret[b, :n].tolist() == pytest.approx([a + v for a, v in zip(expected[:n], values[b, :n].tolist())], abs=1e-5)
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()


def test_gae_with_lambda_one_and_zero_values_is_the_monte_carlo_return():
    rewards, _, mask, lengths = random_batch(seed=1)
    adv, ret = compute_gae(rewards, torch.zeros_like(rewards), mask, gamma=0.9, lam=1.0)
    for b, n in enumerate(lengths):
        mc = [sum(0.9 ** (k - t) * rewards[b, k].item() for k in range(t, n)) for t in range(n)]
        assert adv[b, :n].tolist() == pytest.approx(mc, abs=1e-5) and ret[b, :n].tolist() == pytest.approx(mc, abs=1e-5)


def test_policy_loss_by_hand():
    ratios = torch.tensor([[0.5, 1.0, 1.5, 0.5, 3.0]])
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])  # the last token is padding
    loss, clip_frac, approx_kl = policy_loss(ratios.log(), torch.zeros(1, 5), adv, mask, clip=0.2)
    # per token max(-A r, -A clip(r)): -0.5 (unclipped), 1.0 (equal), -1.2 (clipped), 0.8 (clipped)
    assert loss.item() == pytest.approx((-0.5 + 1.0 - 1.2 + 0.8) / 4)
    assert clip_frac.item() == pytest.approx(0.5)
    k3 = [(1 / r - 1) + math.log(r) for r in (0.5, 1.0, 1.5, 0.5)]
    assert approx_kl.item() == pytest.approx(sum(k3) / 4)


def test_clip_higher_by_hand():
    """clip_high widens only the upper bound: a positive advantage at ratio 1.5 is cut at 1.28, not 1.2;
    a negative one at ratio 0.5 still at 0.8."""
    ratios, adv, mask = torch.tensor([[1.5, 0.5, 1.1]]), torch.tensor([[1.0, -1.0, 2.0]]), torch.ones(1, 3)
    loss, clip_frac, _ = policy_loss(ratios.log(), torch.zeros(1, 3), adv, mask, clip=0.2, clip_high=0.28)
    assert loss.item() == pytest.approx((-1.28 + 0.8 - 2.2) / 3)
    assert clip_frac.item() == pytest.approx(2 / 3)


def test_value_loss_by_hand():
    values, returns = torch.tensor([[0.5, 0.1, 9.0]]), torch.tensor([[1.0, 1.0, 0.0]])
    loss, clip_frac = value_loss(values, torch.zeros(1, 3), returns, torch.tensor([[1.0, 1.0, 0.0]]), clip=0.2)
    # token 1: max((0.5-1)^2, (0.2-1)^2) = 0.64 (clipped); token 2: (0.1-1)^2 = 0.81 both ways
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81) / 2)
    assert clip_frac.item() == pytest.approx(0.5)


def test_kl_estimators_match_the_definition_in_expectation():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.25, 0.25, 0.25, 0.25])
    kl = (p * (p / q).log()).sum()
    for kind in ("k1", "k3"):
        per_token = kl_penalty(p.log(), q.log(), kind)
        assert (p * per_token).sum().item() == pytest.approx(kl.item(), abs=1e-6)
    assert (kl_penalty(p.log(), q.log(), "k3") >= 0).all() and (kl_penalty(p.log(), q.log(), "k1") < 0).any()
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_penalty(p, q, "k2")


def test_grpo_advantages_by_hand():
    adv = grpo_advantages(torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 1]), group_size=4)
    assert adv.tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5, 0, 0, 0, 0], abs=1e-5)
    adv = grpo_advantages(torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 0]), group_size=4, std=False)  # Dr. GRPO: centred only
    assert adv.tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25, 0.5, 0.5, -0.5, -0.5])


def test_informative_groups_by_hand():
    rewards = torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0.5, 0, 0, 0])
    assert informative_groups(rewards, 4).tolist() == [True, False, False, True]
    assert informative_groups(rewards, 2).tolist() == [True, False, False, False, False, False, True, False]


def test_whiten():
    x, _, mask, _ = random_batch(seed=2)
    w = whiten(x * 3 + 2, mask)
    n = mask.sum()
    assert (w * mask).sum().item() == pytest.approx(0, abs=1e-4)
    assert ((w ** 2 * mask).sum() / n).item() == pytest.approx(1, abs=1e-3)


@pytest.mark.parametrize("bf16", [False, True])  # True: under CPU bf16 autocast, backward outside it (as ppo_update)
@pytest.mark.parametrize("cap", [None, 2.0])  # 2.0: Gemma 2's final soft-cap, small enough to matter
def test_head_score_equals_autograd_through_log_softmax(cap, bf16):
    check_head_score(cap, bf16, "cpu")


def check_head_score(cap, bf16, device):
    """HeadScore's log-probs, entropies and both gradients against the plain formulas under autograd,
    with chunks that do not divide the positions (tests/test_cuda.py runs it on CUDA)."""
    g = torch.Generator().manual_seed(0)
    N, d, V = 7, 5, 11
    hidden, weight = torch.randn(N, d, generator=g), torch.randn(V, d, generator=g)
    targets = torch.randint(0, V, (N,), generator=g)
    a, b = torch.randn(N, generator=g), torch.randn(N, generator=g)  # upstream gradients
    hidden, weight, targets, a, b = (t.to(device) for t in (hidden, weight, targets, a, b))
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=bf16)

    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with autocast:
        logits = (h1 @ w1.T).float()
        logits = logits if cap is None else torch.tanh(logits / cap) * cap
        logp = logits.log_softmax(-1)
        plain_lp, plain_ent = logp.gather(1, targets[:, None]).squeeze(1), -(logp.exp() * logp).sum(-1)
    ((a * plain_lp).sum() + (b * plain_ent).sum()).backward()

    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with autocast:
        lp, ent = HeadScore.apply(h2, w2, targets, cap, 3, LMHead().mm_t)
    ((a * lp).sum() + (b * ent).sum()).backward()
    assert lp.dtype == ent.dtype == torch.float32
    torch.testing.assert_close(lp, plain_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, plain_ent, atol=1e-5, rtol=1e-5)
    tol = dict(atol=2e-2, rtol=1e-2) if bf16 else dict(atol=1e-5, rtol=1e-5)  # bf16: one rounding apart
    torch.testing.assert_close(h2.grad, h1.grad, **tol)
    torch.testing.assert_close(w2.grad, w1.grad, **tol)
    uniform = HeadScore.apply(torch.zeros(2, d, device=device), weight, targets[:2], cap, 3, LMHead().mm_t)[1]
    assert uniform.tolist() == pytest.approx([math.log(V)] * 2)
    with torch.no_grad(), autocast:  # scoring: the same values
        torch.testing.assert_close(HeadScore.apply(hidden, weight, targets, cap, 4, LMHead().mm_t)[0], plain_lp.detach())


# ---- learning a synthetic task end to end with the same pieces train_ppo.py uses -------------------

def run_rl(hf_checkpoint, algo, steps=40, k=4, rollouts=32, std=True, norm_tokens=None, clip_high=None, skip=False,
           on_policy=False, kl_coef=0.01, lr=1e-3, temperature=1.0):
    """A tiny random model is rewarded for the fraction of its 4 response tokens below 32 (chance:
    1/8). Rollouts come from the KV-cache engine, old log-probs from the trainer's forward (or, on
    policy, from the engine). The options are train_ppo.py's, for GRPO: std=False (Dr. GRPO),
    norm_tokens (a constant loss normaliser), clip_high, skip (dynamic sampling), on_policy (one
    optimizer step per batch, no scoring forward), kl_coef 0 (no reference), temperature (rollouts
    sampled from softmax(logits / T), trained with the policy's own log-probs)."""
    from nanogsm.generate import generate
    from nanogsm.model import Gemma
    from nanogsm.ppo import ValueHead, pack, ppo_update, score_responses, token_rewards
    torch.manual_seed(0)
    model = Gemma.from_pretrained(hf_checkpoint("gemma")[1])
    ref = Gemma.from_pretrained(hf_checkpoint("gemma")[1]).requires_grad_(False)
    value_head = ValueHead(model.config.hidden_size) if algo == "ppo" else None
    params = list(model.parameters()) + (list(value_head.parameters()) if value_head else [])
    optimizer = torch.optim.AdamW(params, lr=lr)
    g = torch.Generator().manual_seed(0)
    means = []
    for step in range(steps):
        prompts = [torch.randint(100, 256, (3,), generator=g).tolist() for _ in range(rollouts // k) for _ in range(k)]
        responses, engine_logprobs = generate(model, prompts, 4, temperature=temperature, seed=step, return_logprobs=True,
                                               stop_ids=())
        scores = torch.tensor([sum(t < 32 for t in r) / len(r) for r in responses])
        means.append(scores.mean().item())
        if skip:
            keep = informative_groups(scores, k).repeat_interleave(k).tolist()
            prompts, responses, scores = [p for p, ok in zip(prompts, keep) if ok], \
                [r for r, ok in zip(responses, keep) if ok], scores[torch.tensor(keep)]
            engine_logprobs = [lp for lp, ok in zip(engine_logprobs, keep) if ok]
            if not prompts:
                continue
        input_ids, resp_pos, resp_tokens, mask = pack(prompts, responses, 0)
        with torch.no_grad():
            old_logprobs, old_values, _ = score_responses(model, value_head, input_ids, resp_pos, resp_tokens)
            ref_logprobs = score_responses(ref, None, input_ids, resp_pos, resp_tokens)[0]
        # The engine's log-probs are the trainer's log-probs (the policy's own, whatever the temperature).
        torch.testing.assert_close(old_logprobs, torch.tensor(engine_logprobs), atol=1e-4, rtol=0)
        if on_policy:
            old_logprobs = torch.tensor(engine_logprobs)
        batch = dict(input_ids=input_ids, resp_pos=resp_pos, resp_tokens=resp_tokens, mask=mask,
                     old_logprobs=old_logprobs, old_values=old_values, ref_logprobs=ref_logprobs)
        if algo == "ppo":
            rewards, _ = token_rewards(scores, old_logprobs, ref_logprobs, mask, kl_coef=kl_coef)
            advantages, returns = compute_gae(rewards, old_values, mask, gamma=1.0, lam=0.95)
            advantages = whiten(advantages, mask)
        else:
            advantages, returns = grpo_advantages(scores, k, std=std)[:, None] * mask, torch.zeros_like(mask)
        batch.update(advantages=advantages, returns=returns)
        epochs, minibatch, grad_accum = (1, 4, len(prompts) // 4) if on_policy else (2, 4, 2)
        stats = ppo_update(model, value_head, optimizer, batch, epochs=epochs, minibatch=minibatch, grad_accum=grad_accum,
                           clip=0.2, vf_coef=0.1, ent_coef=0.0, max_grad_norm=1.0,
                           kl_coef_in_loss=kl_coef if algo == "grpo" else 0, clip_high=clip_high, norm_tokens=norm_tokens)
        assert 0 <= stats["policy_clip_frac"] <= 1 and stats["grad_norm"] >= 0
    return means


def eight_rollouts(seed=0):
    from nanogsm.ppo import pack
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 256, (int(n),), generator=g).tolist() for n in torch.randint(2, 6, (8,), generator=g)]
    responses = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (1, 7, 2, 5, 3, 6, 1, 4)]
    input_ids, resp_pos, resp_tokens, mask = pack(prompts, responses, 0)
    return dict(input_ids=input_ids, resp_pos=resp_pos, resp_tokens=resp_tokens, mask=mask), g


def sgd_change(model, batch, **kw):
    """The weights' change from one ppo_update with SGD at lr 1 (the gradient), GRPO-style (no critic)."""
    import copy

    from nanogsm.ppo import ppo_update
    m = copy.deepcopy(model)
    before = torch.cat([p.detach().flatten() for p in m.parameters()])
    ppo_update(m, None, torch.optim.SGD(m.parameters(), lr=1.0), batch, epochs=1, vf_coef=0.0, ent_coef=0.0,
               max_grad_norm=1e9, **{"minibatch": 2, "grad_accum": 4, "clip": 0.2, **kw})
    return before - torch.cat([p.detach().flatten() for p in m.parameters()])


def test_constant_norm_clip_high_and_loss_mask_equal_a_plain_loss(hf_checkpoint):
    """norm_tokens L: the summed clipped surrogate over the tokens in batch["loss_mask"], divided by
    sequences x L, written out on the whole batch in one forward with autograd."""
    from nanogsm.model import Gemma
    from nanogsm.ppo import score_responses
    batch, g = eight_rollouts()
    mask = batch["mask"]
    loss_mask = mask * (torch.rand(mask.shape, generator=g) > 0.3)  # holes: tokens the policy did not choose
    batch.update(old_logprobs=(torch.randn(mask.shape, generator=g) * 0.3 - 5) * mask, loss_mask=loss_mask,
                 advantages=torch.randn(mask.shape, generator=g) * mask)
    torch.manual_seed(0)
    model = Gemma.from_pretrained(hf_checkpoint("gemma")[1])
    got = sgd_change(model, batch, norm_tokens=10, clip_high=0.3)
    logprobs, _, _ = score_responses(model, None, batch["input_ids"], batch["resp_pos"], batch["resp_tokens"])
    ratio, adv = (logprobs - batch["old_logprobs"]).exp(), batch["advantages"]
    objective = torch.minimum(ratio * adv, ratio.clamp(0.8, 1.3) * adv)  # PPO's pessimistic surrogate
    (-(objective * loss_mask).sum() / (8 * 10)).backward()
    want = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.testing.assert_close(got, want, atol=1e-5 * want.abs().max().item(), rtol=0)  # (differences of weights)
    assert want.abs().max() > 0


def test_skipped_groups_change_nothing_but_the_token_count(hf_checkpoint):
    """Groups of equal rewards have zero advantages: dropping them (dynamic sampling) leaves the other
    rollouts' summed gradient as it was, divided by their own tokens instead of all the tokens."""
    from nanogsm.model import Gemma
    batch, g = eight_rollouts(seed=3)
    mask = batch["mask"]
    scores = torch.tensor([1.0, 0, 1, 1, 0, 0, 0, 1])  # groups of 2: the second and third are all-equal
    keep = informative_groups(scores, 2).repeat_interleave(2)  # (8,)
    batch.update(old_logprobs=(torch.randn(mask.shape, generator=g) * 0.3 - 5) * mask,
                 advantages=grpo_advantages(scores, 2)[:, None] * mask)
    model = Gemma.from_pretrained(hf_checkpoint("gemma")[1])
    everything = sgd_change(model, batch)
    kept = sgd_change(model, {k: v[keep] for k, v in batch.items()})
    n_all, n_kept = mask.sum().item(), mask[keep].sum().item()
    torch.testing.assert_close(kept, everything * n_all / n_kept, atol=1e-5 * kept.abs().max().item(), rtol=0)
    assert keep.tolist() == [True, True, False, False, False, False, True, True] and kept.abs().max() > 0


def test_each_forward_takes_similar_rollouts_cut_to_the_columns_they_use(hf_checkpoint, monkeypatch):
    """Within an optimizer step the rollouts go longest first, two to a forward, and each forward's
    inputs stop at its longest prompt + response - 1 (the last position whose logits score a
    response token), its response columns at its longest response."""
    from nanogsm import ppo
    from nanogsm.model import Gemma
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (2, 9, 3, 5, 5, 6, 6, 9)]  # no equal lengths
    responses = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (1, 7, 2, 5, 3, 6, 1, 4)]
    input_ids, resp_pos, resp_tokens, mask = ppo.pack(prompts, responses, 0)
    zeros = torch.zeros(mask.shape)
    batch = dict(input_ids=input_ids, resp_pos=resp_pos, resp_tokens=resp_tokens, mask=mask, old_logprobs=zeros - 5,
                 old_values=zeros, ref_logprobs=zeros - 5, advantages=torch.randn(mask.shape, generator=g) * mask,
                 returns=zeros)
    seen, score = [], ppo.score_responses

    def recorded(model, value_head, input_ids, resp_pos, resp_tokens):  # (forward rows, input columns, response columns)
        seen.append((*input_ids.shape, resp_tokens.shape[1]))
        return score(model, value_head, input_ids, resp_pos, resp_tokens)
    monkeypatch.setattr(ppo, "score_responses", recorded)
    model = Gemma.from_pretrained(hf_checkpoint("gemma")[1])
    ppo.ppo_update(model, ppo.ValueHead(model.config.hidden_size), torch.optim.SGD(model.parameters(), lr=0.0), batch,
                   epochs=1, minibatch=2, grad_accum=4, clip=0.2, vf_coef=0.1, ent_coef=0.01, max_grad_norm=1.0)
    rows = sorted(zip(prompts, responses), key=lambda pr: -(len(pr[0]) + len(pr[1])))
    pairs = [rows[i:i + 2] for i in range(0, 8, 2)]
    assert seen == [(2, max(len(p) + len(r) - 1 for p, r in pair), max(len(r) for _, r in pair)) for pair in pairs]
    assert input_ids.shape[1] == 16 and seen[-1] == (2, 4, 2)  # the batch is 16 columns; the shortest pair needs 4


def test_train_ppo_scores_each_rollout_in_its_own_row(tiny_with_tokenizer, tmp_path, data_dir):
    """With --lr 0 the update recomputes the scored log-probs: the ratio is 1 everywhere (nothing
    clipped, approximate KL 0) and the policy equals the reference (KL 0), whatever order and cut the
    rollouts were scored in."""
    import json
    result = ppo_script("--init", tiny_with_tokenizer, "--out", tmp_path / "run", "--steps", 1, "--save-every", 0,
                        "--wrong-reward", -1, *SMALL[:-2], "--rollouts", 8, "--ppo-batch", 2, "--lr", 0,
                        data_dir=data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    log = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    assert log["rollout/kl_ref"] == 0 and log["params/policy_clip_frac"] == 0, log
    assert abs(log["loss/approx_kl"]) < 1e-9 and log["params/grad_norm"] > 0, log


ONE_UPDATE = {"rollouts": 16, "steps": 50, "lr": 5e-3}  # on policy: one AdamW step per batch (not 8), so a larger lr


@pytest.mark.parametrize("algo, options", [
    ("ppo", {}), ("grpo", {}), ("grpo", {"std": False}), ("grpo", {"norm_tokens": 4}), ("grpo", {"clip_high": 0.28}),
    ("grpo", {"skip": True}), ("grpo", {"on_policy": True, **ONE_UPDATE}), ("grpo", {"kl_coef": 0.0}),
    ("grpo", {"std": False, "norm_tokens": 4, "clip_high": 0.28, "skip": True, "on_policy": True, "kl_coef": 0.0,
              **ONE_UPDATE}),
    ("grpo", {"temperature": 0.7, "on_policy": True, **ONE_UPDATE}),
], ids=["ppo", "grpo", "no-std", "constant-norm", "clip-high", "skip", "on-policy", "kl-free", "all-ours", "temperature-0.7"])
def test_rl_raises_the_reward_on_a_learnable_task(algo, options, hf_checkpoint):
    means = run_rl(hf_checkpoint, algo, **options)
    first, last = sum(means[:10]) / 10, sum(means[-10:]) / 10
    assert first < 0.3 and last > first + 0.2, means  # chance is 1/8


# ---- train_ppo.py end to end on a tiny model ---------------------------------------------------------

def ppo_script(*args, data_dir):
    import os
    import subprocess
    import sys
    from pathlib import Path
    env = dict(os.environ, NANOGSM_DATA_DIR=str(data_dir))
    return subprocess.run([sys.executable, "train_ppo.py", *map(str, args)], cwd=Path(__file__).parents[1], env=env,
                          capture_output=True, text=True, timeout=600)


SMALL = ["--rollouts", 4, "--ppo-batch", 2, "--minibatch", 2, "--grad-accum", 1, "--max-new-tokens", 6, "--lr", 1e-4]


OURS = ["--algo", "grpo", "--group-size", 2, "--grad-accum", 2, "--ppo-epochs", 1, "--on-policy", "--kl-coef", 0, "--ent-coef", 0,
        "--adv-std", "off", "--loss-norm", "constant", "--clip-high", 0.28, "--calculator", "--max-gold-steps", 2,
        "--temperature", 0.7, "--step-reward", 0.5]


@pytest.mark.parametrize("extra", [[], ["--algo", "grpo", "--group-size", 2], ["--lora", "--lora-r", 2], OURS],
                         ids=["ppo", "grpo", "lora", "ours"])
def test_train_ppo_runs_saves_and_resumes(extra, tiny_with_tokenizer, tmp_path, data_dir):
    import json
    first = ppo_script("--init", tiny_with_tokenizer, "--out", tmp_path / "run", "--steps", 1, *SMALL, *extra,
                       data_dir=data_dir)
    assert first.returncode == 0, first.stderr
    assert "settings: " in first.stdout and f"kl_coef={0 if extra == OURS else 0.05}" in first.stdout
    assert ("curriculum: 1961 train problems" in first.stdout) == (extra == OURS)
    second = ppo_script("--init", tiny_with_tokenizer, "--out", tmp_path / "run", "--steps", 2, "--resume", *SMALL,
                        *extra, data_dir=data_dir)
    assert second.returncode == 0, second.stderr
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    for key in ("rollout/reward_mean", "loss/policy", "loss/approx_kl", "loss/entropy", "params/policy_clip_frac",
                "params/grad_norm", "rollout/response_len", "rollout/frac_same_reward", "time/generate_s", "time/score_s",
                "time/train_s"):
        assert key in log[-1]
    assert ("rollout/kl_ref" in log[-1]) == (extra != OURS)  # KL-free: no reference is run
    if "--algo" not in extra:
        assert "loss/value" in log[-1] and "params/value_clip_frac" in log[-1]
        assert (tmp_path / "run" / "value_head.safetensors").is_file()


def test_dynamic_sampling_skips_groups_of_equal_rewards(tiny_with_tokenizer, tmp_path, data_dir):
    """A random model is always wrong: every group is skipped, fill draws --fill-rounds more batches,
    and no update runs (the log says so)."""
    import json
    result = ppo_script("--init", tiny_with_tokenizer, "--out", tmp_path / "run", "--steps", 1, *SMALL, "--algo", "grpo",
                        "--group-size", 2, "--dynamic-sampling", "fill", "--fill-rounds", 2, data_dir=data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    log = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    assert log["rollout/generated"] == 12 and log["rollout/groups_skipped"] == 6 and log["rollout/reward_mean"] == 0
    assert "loss/policy" not in log and (tmp_path / "run" / "model.safetensors").is_file()


@pytest.mark.parametrize("lora", [False, True])
def test_an_adapter_init_is_the_start_and_the_reference(lora, tiny_with_tokenizer, tmp_path, data_dir):
    """--init an SFT adapter folder: merged into its base, it is the start the policy trains from
    and the reference the KL is taken to (with --lora, the policy's new adapters switched off, not
    the bare base). With lr 0 the KL to it is 0, and the saved run loads to the start's logits."""
    import json
    import shutil

    from nanogsm.lora import adapter_config, adapter_state, apply_lora, load_model
    from nanogsm.weights import save_folder
    torch.manual_seed(0)
    sft = apply_lora(load_model(tiny_with_tokenizer), r=2, alpha=4)
    with torch.no_grad():
        for name, p in sft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    folder = tmp_path / "sft"
    save_folder(folder, {"adapter_model.safetensors": adapter_state(sft)},
                {"adapter_config.json": json.dumps(adapter_config(sft, tiny_with_tokenizer))})
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_with_tokenizer / name, folder / name)
    result = ppo_script("--init", folder, "--out", tmp_path / "run", "--steps", 1, *SMALL, "--lr", 0, "--wrong-reward", -1,
                        *(["--lora", "--lora-r", 2] if lora else []), data_dir=data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    log = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    assert abs(log["rollout/kl_ref"]) < 1e-5 and log["params/grad_norm"] > 0, log
    x = torch.randint(0, 1000, (2, 7))
    with torch.no_grad():
        start, base, run = (load_model(f)(x) for f in (folder, tiny_with_tokenizer, tmp_path / "run"))
    torch.testing.assert_close(run, start, atol=1e-5, rtol=1e-5)
    assert (start - base).abs().max() > 1e-3  # the adapter matters


@pytest.mark.parametrize("args, message", [
    (["--rollouts", 10, "--ppo-batch", 4], "--rollouts 10 is not divisible by --ppo-batch (4)"),
    (["--rollouts", 8, "--ppo-batch", 8, "--minibatch", 3, "--grad-accum", 1],
     "--rollouts 8 is not divisible by --minibatch x --grad-accum (3)"),
    (["--algo", "grpo", "--group-size", 1, "--rollouts", 4, "--ppo-batch", 2, "--minibatch", 2, "--grad-accum", 1],
     "--algo grpo needs --group-size >= 2"),
    (["--gen-batch", 0], "--gen-batch must be at least 1 (got 0)"),
    (["--step-reward", 1], "--step-reward must be in [0, 1) so that a right answer outscores any wrong one (got 1.0)"),
    (["--fill-rounds", -1], "--fill-rounds must be 0 or more (got -1)"),
    ([*SMALL, "--dynamic-sampling", "skip"], "--dynamic-sampling skip needs --group-size >= 2"),
    ([*SMALL, "--algo", "grpo", "--group-size", 2, "--on-policy"], "--on-policy uses each batch for one optimizer step"),
    ([*SMALL, "--algo", "grpo", "--group-size", 2, "--grad-accum", 2, "--on-policy", "--ppo-epochs", 2],
     "needs --algo grpo, --ppo-epochs 1"),
    ([*SMALL, "--grad-accum", 2, "--on-policy"], "needs --algo grpo"),
    (["--max-gold-steps", 0], "--max-gold-steps must be at least 1 (got 0)"),
    ([*SMALL, "--max-gold-steps", 1], "--max-gold-steps 1: no train problem has so few reasoning lines"),
])
def test_train_ppo_bad_batch_arithmetic(args, message, tiny_with_tokenizer, tmp_path, data_dir):
    result = ppo_script("--init", tiny_with_tokenizer, "--out", tmp_path / "x", *args, data_dir=data_dir)
    assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists()  # refused before anything is written


def test_train_ppo_init_must_be_a_checkpoint(tmp_path, data_dir, hf_checkpoint):
    result = ppo_script("--init", tmp_path / "nothing", "--out", tmp_path / "x", data_dir=data_dir)
    assert result.returncode != 0 and "not a checkpoint folder" in result.stderr
    result = ppo_script("--init", hf_checkpoint("gemma")[1], "--out", tmp_path / "x", data_dir=data_dir)
    assert result.returncode != 0 and "no tokenizer.json" in result.stderr


def test_train_ppo_compile_gives_the_eager_step(tiny_with_tokenizer, tmp_path, data_dir):
    """--compile (compiled blocks in generation, scoring and the PPO passes) changes speed, not results.
    A random model gets every answer wrong; reward -1 (not 0) gives it real advantages and gradients,
    so the comparison is not one of float noise around zero."""
    import json
    logs = []
    for extra in ([], ["--compile"]):
        result = ppo_script("--init", tiny_with_tokenizer, "--out", tmp_path / f"run{len(logs)}", "--steps", 1,
                            "--save-every", 0, "--wrong-reward", -1, *SMALL, *extra, data_dir=data_dir)
        assert result.returncode == 0, result.stderr[-3000:]
        logs.append(json.loads((tmp_path / f"run{len(logs)}" / "log.jsonl").read_text().splitlines()[0]))
    eager, compiled = logs
    assert compiled["rollout/response_len"] == eager["rollout/response_len"]  # the same sampled rollouts
    assert eager["rollout/reward_mean"] == -1 and eager["params/grad_norm"] > 0.1
    # The policy and the reference are compiled apart, so at step 1 their KL is 0 only up to the last bits
    # of their kernels (4.6e-5 nats in some runs on an Intel Xeon), where eager mode gives exactly 0.
    assert eager["rollout/kl_ref"] == 0 and abs(compiled["rollout/kl_ref"]) < 1e-4
    for key in ("loss/policy", "loss/value", "loss/approx_kl", "loss/entropy", "params/grad_norm"):
        assert compiled[key] == pytest.approx(eager[key], rel=1e-4, abs=1e-6), key
