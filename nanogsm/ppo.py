"""PPO and GRPO pieces as pure functions over (B, T) tensors of response tokens.

Conventions: `mask` is 1.0 on response tokens and 0.0 elsewhere (each row's response is one
contiguous run starting at column 0, right-padded); every masked mean is over response tokens of
the whole batch. References: Schulman et al. 2017 (PPO), 2015 (GAE); Ziegler et al. 2019 and
Ouyang et al. 2022 (per-token KL penalty in the reward); Shao et al. 2024 (GRPO); Schulman's
"Approximating KL divergence" note for the k1/k3 estimators.
"""
import torch


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


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


def policy_loss(logprobs, old_logprobs, advantages, mask, clip):
    """Clipped surrogate: mean of max(-A r, -A clip(r, 1 - c, 1 + c)), r = exp(logp - logp_old).
    Returns (loss, fraction of tokens where the clipped term was taken, approx KL(old || new) by k3)."""
    log_ratio = logprobs - old_logprobs
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_frac = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = masked_mean(torch.expm1(-log_ratio) + log_ratio, mask)
    return loss, clip_frac.detach(), approx_kl.detach()


def value_loss(values, old_values, returns, mask, clip):
    """Clipped value loss: 0.5 * mean of max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2).
    Returns (loss, fraction of tokens where the clipped term was taken)."""
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    unclipped, clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    return loss, masked_mean((clipped > unclipped).float(), mask).detach()


def entropy(logits, mask):
    """Mean entropy of the token distributions (B, T, V) over response tokens, in fp32."""
    logp = logits.float().log_softmax(-1)
    return masked_mean(-(logp.exp() * logp).sum(-1), mask)


def grpo_advantages(rewards, group_size, eps=1e-6):
    """GRPO: each sample's reward minus its group's mean, over the group's std (groups are
    consecutive runs of group_size samples of the same prompt). rewards (N,) -> (N,)."""
    grouped = rewards.view(-1, group_size)  # (prompts, k)
    mean, std = grouped.mean(-1, keepdim=True), grouped.std(-1, keepdim=True)
    return ((grouped - mean) / (std + eps)).view(-1)
