"""PPO and GRPO pieces as pure functions over (B, T) tensors of response tokens.

Conventions: `mask` is 1.0 on response tokens and 0.0 elsewhere (each row's response is one
contiguous run starting at column 0, right-padded); every masked mean is over response tokens of
the whole batch. References: Schulman et al. 2017 (PPO), 2015 (GAE); Ziegler et al. 2019 and
Ouyang et al. 2022 (per-token KL penalty in the reward); Shao et al. 2024 (GRPO); Schulman's
"Approximating KL divergence" note for the k1/k3 estimators.
"""
import torch
import torch.distributed as dist

from nanogsm.train import rank_world


def masked_mean(x, mask, n=None):
    """Mean over masked entries; with n, the masked sum divided by n (a count over a larger batch)."""
    return (x * mask).sum() / (mask.sum().clamp(min=1) if n is None else n)


def whiten(x, mask, eps=1e-8):
    """(x - mean) / std over the masked entries; zero where mask is 0."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def compute_gae(rewards, values, mask, gamma, lam):
    """Generalised advantage estimation, backwards over time.

    delta_t = r_t + gamma * V_{t+1} - V_t and A_t = delta_t + gamma * lam * A_{t+1}, where V_{t+1} and
    A_{t+1} are 0 after the last response token (the episode ends there). Returns
    (advantages, returns = advantages + values), both (B, T) and zero where mask is 0.
    """
    B, T = rewards.shape
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    next_adv = torch.zeros_like(next_value)
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_adv) * mask[:, t]
        next_value, next_adv = values[:, t] * mask[:, t], advantages[:, t]
    return advantages, (advantages + values) * mask


def kl_penalty(logprobs, ref_logprobs, kind="k1"):
    """Per-token estimate of KL(policy || reference) from samples of the policy.
    k1 = log p - log q (unbiased, can be negative); k3 = (q/p - 1) - log(q/p) (unbiased, >= 0)."""
    log_ratio = ref_logprobs - logprobs  # log q/p
    if kind == "k1":
        return -log_ratio
    if kind == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}; expected k1 or k3")


def policy_loss(logprobs, old_logprobs, advantages, mask, clip, n=None, clip_high=None):
    """Clipped surrogate: mean of max(-A r, -A clip(r, 1 - c, 1 + c_high)), r = exp(logp - logp_old),
    c_high = clip unless given (DAPO's clip-higher, Yu et al. 2025: more room for raising a rare token).
    Returns (loss, fraction of tokens where the clipped term was taken, approx KL(old || new) by k3)."""
    log_ratio = logprobs - old_logprobs
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + (clip if clip_high is None else clip_high))
    loss = masked_mean(torch.maximum(unclipped, clipped), mask, n)
    clip_frac = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = masked_mean(torch.expm1(-log_ratio) + log_ratio, mask)
    return loss, clip_frac.detach(), approx_kl.detach()


def value_loss(values, old_values, returns, mask, clip, n=None):
    """Clipped value loss: 0.5 * mean of max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2).
    Returns (loss, fraction of tokens where the clipped term was taken)."""
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    unclipped, clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask, n)
    return loss, masked_mean((clipped > unclipped).float(), mask).detach()


def grpo_advantages(rewards, group_size, std=True, eps=1e-6):
    """GRPO: each sample's reward minus its group's mean, over the group's std (groups are
    consecutive runs of group_size samples of the same prompt). std=False: the mean-centred reward
    alone (Dr. GRPO, Liu et al. 2025; nanochat), which does not scale a group whose rewards barely
    differ into a full-size update. rewards (N,) -> (N,)."""
    grouped = rewards.view(-1, group_size)  # (prompts, k)
    centred = grouped - grouped.mean(-1, keepdim=True)
    return (centred / (grouped.std(-1, keepdim=True) + eps) if std else centred).view(-1)


def informative_groups(rewards, group_size):
    """Which groups' rewards are not all equal (N,) -> (prompts,) bool: a group of equal rewards has
    zero group-relative advantages and adds nothing but noise (DAPO's dynamic sampling)."""
    grouped = rewards.view(-1, group_size)  # (prompts, k)
    return (grouped != grouped[:, :1]).any(-1)


# ---- the model side: a value head, packing rollouts, scoring them -------------------------------

class ValueHead(torch.nn.Module):
    """V(s_t) from the policy's final hidden state: one linear layer, zero-initialised so the first
    advantages are the rewards themselves. Sharing the trunk costs d+1 parameters instead of a
    second model (a separate critic would double weights, gradients and optimizer state)."""

    def __init__(self, hidden_size):
        super().__init__()
        self.proj = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.proj.weight)
        torch.nn.init.zeros_(self.proj.bias)

    def forward(self, h):
        return self.proj(h.float()).squeeze(-1)  # (..., d) -> (...)


def pack(prompts, responses, pad_id):
    """Prompt + response rows, right-padded: input_ids (B, L); for each response token the position
    whose logits predict it, resp_pos (B, R); the tokens (B, R); mask (B, R)."""
    B, L = len(prompts), max(len(p) + len(r) for p, r in zip(prompts, responses))
    R = max(1, max(len(r) for r in responses))
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    resp_pos = torch.zeros(B, R, dtype=torch.long)
    resp_tokens = torch.full((B, R), pad_id, dtype=torch.long)
    mask = torch.zeros(B, R)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        input_ids[i, :len(p) + len(r)] = torch.tensor(p + r)
        resp_pos[i, :len(r)] = torch.arange(len(p) - 1, len(p) + len(r) - 1)
        resp_tokens[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1.0
    return input_ids, resp_pos, resp_tokens, mask


def used_lengths(resp_pos, mask):
    """Per row, as host ints: the input positions a forward needs (up to the one whose logits
    predict the last response token) and the number of response tokens."""
    n_resp = mask.sum(-1).long()  # (B,)
    need = resp_pos.gather(1, (n_resp - 1).clamp(min=0)[:, None]).squeeze(1) + 1  # (B,)
    return need.tolist(), n_resp.tolist()


def take(batch, rows, need, n_resp):
    """The rows `rows` (a list of indices) of a dict of (B, L) input_ids and (B, R) tensors, each cut
    to the columns those rows use: input_ids to their longest `need`, the others to their longest
    response. Exact: attention is causal, so a position's hidden state never depends on later
    ones; without the cut, two short rollouts in a batch of long ones compute the long ones'
    padding, in the trunk and in the 262k-vocabulary head."""
    L, R = max(need[i] for i in rows), max(1, max(n_resp[i] for i in rows))
    idx = torch.tensor(rows, device=batch["input_ids"].device)
    return {k: v[idx, :L] if k == "input_ids" else v[idx, :R] for k, v in batch.items()}


def score_responses(model, value_head, input_ids, resp_pos, resp_tokens, chunk=1024):
    """One forward: log-probs (B, R), values (B, R) and entropies (B, R) of the response tokens,
    in fp32. The LM head runs on response positions only, fused with the log-softmax (`HeadScore`)."""
    hidden = model(input_ids, head=False)  # (B, L, d)
    h = hidden.gather(1, resp_pos[..., None].expand(-1, -1, hidden.shape[-1]))  # (B, R, d)
    weight = model.embed_tokens.weight
    if not torch.is_grad_enabled():  # scoring: detached inputs tell HeadScore to keep nothing for backward
        h, weight = h.detach(), weight.detach()
    logprobs, entropies = HeadScore.apply(h.flatten(0, 1), weight, resp_tokens.flatten(), model.config.final_softcap,
                                          chunk, model.head.mm_t)
    values = value_head(h) if value_head is not None else torch.zeros_like(h[..., 0], dtype=torch.float32)
    return logprobs.view(resp_tokens.shape), values, entropies.view(resp_tokens.shape)


class HeadScore(torch.autograd.Function):
    """Tied LM head (+ Gemma 2's final soft-cap) and log-softmax in one: hidden (N, d), weight (V, d),
    targets (N,) -> log p(target) (N,) and entropy (N,), fp32, `chunk` positions at a time.

    The log-softmax is formed in the logits' own memory and only it is kept for backward (nothing
    without gradients), where autograd through `log_softmax`, `exp` and `* logp` would keep and
    allocate several (N, V) tensors: on a CPU each costs more than the pass that fills it.
    With z a position's logits, p = softmax(z), H = -sum p log p:
        d log p_t / dz = onehot_t - p,    dH / dz = -p (log p + H),
    so for upstream gradients a = dL/dlog p_t and b = dL/dH: dL/dz = a onehot_t - p (a + b (log p + H)).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, cap, chunk, mm_t):
        logprobs, entropies, ctx.logps, ctx.lses = [], [], [], []
        for i in range(0, len(targets), chunk):
            h, t = hidden[i:i + chunk], targets[i:i + chunk]
            z = mm_t(h, weight)  # (C, V); bf16 matmul under autocast
            ctx.mm_dtype, z = z.dtype, z.float()
            if cap is not None:
                z = torch.tanh(z / cap) * cap
            top = z.amax(-1, keepdim=True)  # (C, 1)
            e = z.sub_(top).exp()  # (C, V): exp(z - max); p = e / e_sum
            e_sum = e.sum(-1, keepdim=True)  # (C, 1)
            logp = z.sub_(e_sum.log())  # (C, V): log-softmax, in z's memory
            logprobs.append(logp.gather(1, t[:, None]).squeeze(1))  # (C,)
            entropies.append(-e.mul_(logp).sum(-1) / e_sum[:, 0])  # (C,): -sum p log p, in e's memory (fp32)
            if any(ctx.needs_input_grad[:2]):
                ctx.logps.append(logp)
                ctx.lses.append(top + e_sum.log())  # logits = logp + lse, for the soft-cap's derivative
        entropies = torch.cat(entropies)
        ctx.cap, ctx.chunk, ctx.mm_t = cap, chunk, mm_t
        ctx.save_for_backward(hidden, weight, targets, entropies)
        return torch.cat(logprobs), entropies

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropies):  # a, b: (N,), (N,)
        hidden, weight, targets, entropies = ctx.saved_tensors
        C, cap = ctx.chunk, ctx.cap
        w = weight.to(ctx.mm_dtype)  # the backward matmuls run in the forward's precision
        grad_h = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device)
        grad_w = None
        for k, (logp, lse) in enumerate(zip(ctx.logps, ctx.lses)):
            sl = slice(k * C, k * C + len(logp))
            a, b, t = grad_logprobs[sl, None], grad_entropies[sl, None], targets[sl]  # (C, 1), (C, 1), (C,)
            g = (logp + entropies[sl, None]).mul_(b).add_(a).mul_(logp.exp()).neg_()  # (C, V): -p (a + b (log p + H))
            g[torch.arange(len(t), device=t.device), t] += a[:, 0]
            if cap is not None:  # logits = cap tanh(z / cap): dlogits/dz = 1 - (logits / cap)^2
                g *= 1 - ((logp + lse) / cap) ** 2
            g = g.to(ctx.mm_dtype)
            grad_h[sl] = ctx.mm_t(g, w.T)  # (C, d)
            if ctx.needs_input_grad[1]:
                part = ctx.mm_t(g.T, hidden[sl].to(ctx.mm_dtype).T).float()  # (V, d)
                grad_w = part if grad_w is None else grad_w.add_(part)
        ctx.logps = ctx.lses = None
        grad_h = grad_h.to(hidden.dtype) if ctx.needs_input_grad[0] else None
        return grad_h, grad_w, None, None, None, None


def token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef, kl_kind="k1"):
    """Per-token reward: -kl_coef * KL estimate on every response token, plus the sequence score on
    its last token (as in Ziegler et al. 2019). scores (B,) -> rewards (B, R), and the KL (B, R)."""
    kl = kl_penalty(logprobs, ref_logprobs, kl_kind) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(-1).long() - 1).clamp(min=0)  # index of each row's last response token
    rewards[torch.arange(len(scores)), last] += scores * (mask.sum(-1) > 0)
    return rewards, kl


def ppo_update(model, value_head, optimizer, batch, epochs, minibatch, grad_accum, clip, vf_coef, ent_coef,
               max_grad_norm, kl_coef_in_loss=0.0, autocast=None, seed=0, clip_high=None, norm_tokens=None):
    """The optimisation half of a PPO/GRPO step over the N rollouts in `batch` (a dict of tensors
    from `pack` plus old_logprobs, old_values, advantages, returns, ref_logprobs).

    For each of `epochs` passes the rollouts are shuffled and cut into optimizer steps of
    minibatch x grad_accum sequences; each forward takes `minibatch` sequences. Losses are sums over
    response tokens divided by the token count of the whole optimizer step (token-level
    normalisation), so the split into micro-batches does not change the update; with norm_tokens L,
    divided by the step's sequences x L instead (a constant, as Dr. GRPO: a long response's tokens
    weigh no less than a short one's). An optional batch["loss_mask"] leaves out tokens the policy
    did not choose (the calculator's) from the policy, entropy and KL terms. value_head None
    means no critic (GRPO); kl_coef_in_loss > 0 adds kl_coef * k3 KL to the reference to the loss
    (GRPO's placement of the KL term). Returns mean statistics.
    """
    N = batch["mask"].shape[0]
    step_size = minibatch * grad_accum
    rank, world = rank_world()
    params = [p for p in model.parameters() if p.requires_grad] + (list(value_head.parameters()) if value_head else [])
    generator = torch.Generator().manual_seed(seed)
    need, n_resp = used_lengths(batch["resp_pos"], batch["mask"])
    n_loss = batch["loss_mask"].sum(-1).long().tolist() if "loss_mask" in batch else n_resp  # tokens in the loss
    stats = {k: [] for k in ("policy", "value", "entropy", "approx_kl", "policy_clip_frac", "value_clip_frac",
                             "grad_norm")}
    for _ in range(epochs):
        order = torch.randperm(N, generator=generator).tolist()
        for start in range(0, N, step_size):
            # An optimizer step's rollouts, longest first: rollouts of similar length share a forward
            # and each forward is cut to the columns it uses (`take`). The step's gradient is the same sum.
            rows = sorted(order[start:start + step_size], key=lambda i: -need[i])
            n_tokens = len(rows) * norm_tokens if norm_tokens else max(1, sum(n_loss[i] for i in rows))
            forwards = [rows[i:i + minibatch] for i in range(0, len(rows), minibatch)]
            for micro in forwards[rank::world]:  # under torchrun: this rank's share
                mb = take(batch, micro, need, n_resp)
                scale = n_tokens / max(1, sum(n_loss[i] for i in micro))  # the step's mean -> this forward's mean
                loss_mask = mb.get("loss_mask", mb["mask"])
                with autocast or torch.autocast("cpu", enabled=False):
                    logprobs, values, entropies = score_responses(model, value_head, mb["input_ids"], mb["resp_pos"],
                                                                  mb["resp_tokens"])
                pg, pg_clip, approx_kl = policy_loss(logprobs, mb["old_logprobs"], mb["advantages"], loss_mask, clip,
                                                     n_tokens, clip_high)
                ent = masked_mean(entropies, loss_mask, n_tokens)
                loss = pg - ent_coef * ent
                if value_head is not None:
                    vl, vl_clip = value_loss(values, mb["old_values"], mb["returns"], mb["mask"], clip, n_tokens)
                    loss = loss + vf_coef * vl
                    stats["value"].append(vl.item() * scale)
                    stats["value_clip_frac"].append(vl_clip.item())
                if kl_coef_in_loss:
                    loss = loss + kl_coef_in_loss * masked_mean(kl_penalty(logprobs, mb["ref_logprobs"], "k3"),
                                                                loss_mask, n_tokens)
                loss.backward()
                stats["policy"].append(pg.item() * scale)
                stats["entropy"].append(ent.item() * scale)
                stats["approx_kl"].append(approx_kl.item())
                stats["policy_clip_frac"].append(pg_clip.item())
            if world > 1:  # each rank's loss is already divided by the whole step's token count: sum them
                for p in params:
                    dist.all_reduce(p.grad)
            stats["grad_norm"].append(torch.nn.utils.clip_grad_norm_(params, max_grad_norm).item())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    sums = torch.tensor([sum(v) for v in stats.values()], dtype=torch.float64)
    counts = torch.tensor([len(v) for v in stats.values()], dtype=torch.float64)
    if world > 1:  # means over every rank's micro-batches
        dist.all_reduce(sums)
        dist.all_reduce(counts)
    return {k: (s / c).item() for k, s, c in zip(stats, sums, counts) if c}


def explained_variance(values, returns, mask):
    """1 - Var(returns - values) / Var(returns) over response tokens: 1 is a perfect critic."""
    var = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    resid = returns - values
    return (1 - masked_mean((resid - masked_mean(resid, mask)) ** 2, mask) / var.clamp(min=1e-8)).item()
