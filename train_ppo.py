"""PPO (or GRPO) on GSM8K from an SFT checkpoint, with an exact-match reward.

    python train_ppo.py --init ckpt/sft-main                       # the study's settings (gemma-2b scale, GPU)
    python train_ppo.py --init ckpt/sft-270m --rollouts 32 --ppo-batch 16 --steps 10 --max-new-tokens 160   # CPU
    python train_ppo.py --init ckpt/sft-main --algo grpo --group-size 8
    python train_ppo.py --init ckpt/sft-main --lora                # policy trains LoRA adapters
    python train_ppo.py --init ckpt/sft-main --algo grpo --group-size 16 --adv-std off --loss-norm constant \
        --dynamic-sampling skip --on-policy --ppo-epochs 1 --grad-accum 256 --kl-coef 0 --ent-coef 0   # see below
    torchrun --nproc_per_node=8 train_ppo.py --init ckpt/sft-main   # data-parallel over 8 GPUs

Algorithm, per step (PPO with a learned critic as used for RLHF: Schulman et al. 2017; Ziegler et
al. 2019; Ouyang et al. 2022):
 1. Rollouts: `--rollouts` responses from the current policy with the KV-cache engine (--temperature
    1.0) to zero-shot prompts `Question: <q>\\nAnswer:` from the train split (`--group-size` samples
    per prompt; 1 for PPO by default), in one `generate` call: `--gen-batch` rows decode at once
    and a finished row takes the next prompt. Rollout j of step s samples from its own stream of
    random numbers, seeded by (--seed, s, j), the same however it is batched and on whichever rank
    (its tokens too where its logits agree to the last bit; README, "Several GPUs").
 2. Score: +1 when the number after '####' equals the gold answer, else `--wrong-reward` (0), plus
    `--format-bonus` when the response has a parsable '####' answer; with `--step-reward W` a wrong
    answer adds W x its step credit (below).
 3. Old log-probs and values (policy + value head) and reference log-probs (the frozen init
    weights; with --lora the same weights with adapters disabled), all recomputed by the trainer.
 4. Per-token reward: -kl_coef * KL estimate (k1, or k3 with --kl k3) on every response token,
    plus the score on the last token.
 5. GAE(gamma, lambda) over response tokens -> advantages and returns; advantages whitened over
    the step's rollouts.
 6. `--ppo-epochs` passes; each shuffles the rollouts into optimizer steps of minibatch x
    grad_accum sequences (forwards of `--minibatch` sequences): clipped policy loss + vf_coef x
    clipped value loss - ent_coef x entropy, token-level normalised, grad-norm clipped, AdamW.
The study's recipe is the default. Options of later small-model RL work (each tested in tests/test_ppo.py):
  --adv-std off        GRPO advantages mean-centred only, not over the group's std (Dr. GRPO, Liu et
                       al. 2025; nanochat): a group whose rewards barely differ is not scaled up.
  --loss-norm constant an optimizer step's summed token losses over sequences x --max-new-tokens,
                       not over its tokens (Dr. GRPO): no preference for short or long responses.
  --dynamic-sampling   skip: groups whose rewards are all equal (zero advantage) are dropped before
                       scoring and training (DAPO, Yu et al. 2025); fill: more prompts are drawn
                       (up to --fill-rounds batches, from the far end of the shuffled order) to
                       replace them. The log counts generated rollouts and skipped groups.
  --on-policy          each batch makes one optimizer step (--ppo-epochs 1, --rollouts = --minibatch
                       x --grad-accum), so the old log-probs are the engine's sampled ones and the
                       scoring forward is skipped (REINFORCE with a group baseline, as nanochat).
  --kl-coef 0          no reference model: neither loaded nor run. --ent-coef 0: no entropy bonus.
  --clip-high C        the ratio's upper clip 1 + C above the lower 1 - --clip (DAPO's clip-higher).
  --calculator         rollouts get the calculator as in evaluate.py; its forced result tokens
                       are left out of the policy loss (the policy did not choose them).
  --max-gold-steps N   a curriculum: only train problems whose reference answer has at most N
                       reasoning lines. A small start solves the short ones, so their groups'
                       rewards differ where those of hard ones are all 0.
  --step-reward W      a wrong answer scores W x the F1 of its `<<expr=result>>` results against the
                       reference answer's (partial credit for the right intermediate quantities;
                       W < 1 keeps every right answer above every wrong one): groups whose answers
                       are all wrong still differ, so far more of them carry a signal.
  --temperature T      rollouts sample softmax(logits / T); the loss still uses the policy's own
                       (T = 1) log-probs, as the engine returns them: with T < 1 the rollouts sit
                       nearer the greedy answers that evaluation scores (an off-policy sample).
An adapter --init (a LoRA SFT) is merged into its base first: that is the start and the reference;
with --lora new adapters train on top of it.
Batch arithmetic (the study's numbers): 512 rollouts per step are generated (64 decoding at once)
and scored in chunks of `--ppo-batch` 32 sequences; an optimizer step takes minibatch 2 x
grad_accum 8 = 16 sequences, so one PPO epoch is 32 optimizer steps and a PPO step (2 epochs) is
64. Scoring and each optimizer step put rollouts of similar length together (longest first) and cut
each forward to the columns it uses: the same numbers with less padding. Under torchrun with N
ranks the same numbers are global: rank r generates chunks r, r + N, ... (and scores as many of
the sorted ones); every rank then holds the whole batch (advantages see all of it) and takes 1/N of
each step's micro-batches; gradients are summed over ranks. From the same rollouts, one process
and N processes compute the same update.

Deviations from the textbook: the value head is a linear layer on the policy's final hidden state
(shared trunk, not a separate critic: ~0 extra memory, but policy and value gradients mix in the
trunk); the episode is the response (gamma applies per token, no discount across problems); the KL
penalty is in the reward (PPO) or in the loss as k3 (GRPO, as in DeepSeekMath).
GRPO (`--algo grpo`, Shao et al. 2024): no critic; each response's advantage is its reward minus
its group's mean, over the group's std, on every token; the KL to the reference goes in the loss.
"""
import argparse
import sys
import time

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from nanogsm import cpu
from nanogsm.calculator import forced_mask
from nanogsm.compile import compile_blocks
from nanogsm.generate import generate
from nanogsm.gsm8k import build_prompt, load_gsm8k, reward, solution_steps
from nanogsm.lora import adapter_config, adapter_state, apply_lora, load_model, lora_disabled, merge_lora
from nanogsm.ppo import (ValueHead, compute_gae, explained_variance, grpo_advantages, informative_groups, pack,
                         ppo_update, score_responses, take, token_rewards, used_lengths, whiten)
from nanogsm.report import HelpFormatter, progress
from nanogsm.tokenizer import Tokenizer
from nanogsm.train import (eval_em, load_trainer_state, log_step, peak_memory_gb, pick_device, prepare_out_dir,
                           save_checkpoint, seed_everything, setup_distributed)
from nanogsm.weights import resolve

parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
parser.add_argument("--init", required=True, help="the SFT checkpoint (folder, or adapter folder) to start from")
parser.add_argument("--out", default="ckpt/ppo", help="checkpoint folder")
parser.add_argument("--algo", default="ppo", choices=["ppo", "grpo"], help="PPO with a critic, or GRPO")
parser.add_argument("--data-dir", help="folder of GSM8K jsonl files (default NANOGSM_DATA_DIR, else the Hub)")
parser.add_argument("--steps", type=int, default=100, help="PPO steps (rollout + update rounds)")
parser.add_argument("--rollouts", type=int, default=512, help="responses generated per step")
parser.add_argument("--group-size", type=int, default=None, help="samples per prompt (default: 1 PPO, 8 GRPO)")
parser.add_argument("--ppo-batch", type=int, default=32, help="sequences per scoring batch (and per rank's share)")
parser.add_argument("--gen-batch", type=int, default=64,
                    help="rollouts decoding at once, a finished one making room for the next (continuous "
                         "batching); on a GPU larger is faster")
parser.add_argument("--minibatch", type=int, default=2, help="sequences per training forward")
parser.add_argument("--grad-accum", type=int, default=8, help="forwards per optimizer step")
parser.add_argument("--ppo-epochs", type=int, default=2, help="passes over each step's rollouts")
parser.add_argument("--lr", type=float, default=5e-7, help="AdamW learning rate (constant)")
parser.add_argument("--kl-coef", type=float, default=0.05, help="weight of the KL to the reference (0: no "
                    "reference model is loaded or run)")
parser.add_argument("--kl", default="k1", choices=["k1", "k3"], help="per-token KL estimator in the reward")
parser.add_argument("--vf-coef", type=float, default=0.1, help="value-loss weight")
parser.add_argument("--ent-coef", type=float, default=0.01, help="entropy-bonus weight")
parser.add_argument("--clip", type=float, default=0.2, help="clip range of the policy ratio and of the value")
parser.add_argument("--clip-high", type=float, default=None, help="upper clip of the policy ratio, 1 + this (default "
                    "--clip; DAPO's clip-higher: larger)")
parser.add_argument("--adv-std", default="on", choices=["on", "off"], help="GRPO: divide each group's centred rewards "
                    "by its std (off: mean-centred only, as Dr. GRPO and nanochat)")
parser.add_argument("--loss-norm", default="tokens", choices=["tokens", "constant"], help="divide an optimizer "
                    "step's summed token losses by its response tokens, or by its sequences x --max-new-tokens (Dr. GRPO)")
parser.add_argument("--dynamic-sampling", default="off", choices=["off", "skip", "fill"], help="drop groups whose "
                    "rewards are all equal before scoring and training (DAPO); fill: draw more prompts to replace them")
parser.add_argument("--fill-rounds", type=int, default=4, help="with --dynamic-sampling fill: most extra generate rounds per step")
parser.add_argument("--on-policy", action="store_true", help="one optimizer step per batch: the engine's sampled "
                    "log-probs are the old log-probs (no scoring forward); needs --algo grpo and --ppo-epochs 1")
parser.add_argument("--calculator", action="store_true", help="rollouts use the calculator (as evaluate.py); the "
                    "tokens it forces are left out of the policy loss")
parser.add_argument("--gamma", type=float, default=0.99, help="discount per token")
parser.add_argument("--lam", type=float, default=0.95, help="GAE lambda")
parser.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient-norm clipping")
parser.add_argument("--max-gold-steps", type=int, default=None,
                    help="curriculum: train only on problems whose reference answer has at most this many reasoning "
                         "lines (2: the easiest 26%%, 1,961 problems; None: all)")
parser.add_argument("--temperature", type=float, default=1.0, help="rollout sampling temperature")
parser.add_argument("--max-new-tokens", type=int, default=256, help="response budget")
parser.add_argument("--wrong-reward", type=float, default=0.0, help="reward of a wrong answer")
parser.add_argument("--format-bonus", type=float, default=0.0, help="extra reward for a parsable '####' answer")
parser.add_argument("--step-reward", type=float, default=0.0, help="a wrong answer's reward adds this x the F1 of its "
                    "annotation results against the reference's (0 <= W < 1)")
parser.add_argument("--lora", action="store_true", help="train LoRA adapters; the reference is the adapters off")
parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank with --lora")
parser.add_argument("--lora-alpha", type=float, default=32, help="LoRA alpha with --lora")
parser.add_argument("--no-grad-checkpointing", action="store_true", help="keep activations (more memory)")
parser.add_argument("--compile", action="store_true", help="torch.compile every transformer block of the policy "
                    "and the reference (same results; the first steps are slow while it compiles)")
parser.add_argument("--plain", action="store_true", help="the reference path only: no oneDNN layer on a CPU (nanogsm/cpu.py), no CUDA-graph decode steps")
parser.add_argument("--eval-every", type=int, default=0, help="every N steps: greedy EM on --eval-n test problems")
parser.add_argument("--eval-n", type=int, default=256, help="seeded test subset for --eval-every")
parser.add_argument("--save-every", type=int, default=10, help="checkpoint every N steps")
parser.add_argument("--max-minutes", type=float, default=None, help="stop (and save) after the first step that ends "
                    "past this many minutes of the run")
parser.add_argument("--seed", type=int, default=0, help="prompt order and sampling seed")
parser.add_argument("--resume", action="store_true", help="continue the run in --out")
parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def main(args):
    # ---- setup: every check before any compute
    rank, world = setup_distributed()  # torchrun: data-parallel (one full policy per rank); python: 0 of 1
    k = args.group_size or (8 if args.algo == "grpo" else 1)
    for name, divisor in (("--ppo-batch", args.ppo_batch), ("--minibatch x --grad-accum", args.minibatch * args.grad_accum),
                          ("--group-size", k), (f"--ppo-batch x {world} ranks", args.ppo_batch * world)):
        if args.rollouts % divisor:
            raise ValueError(f"--rollouts {args.rollouts} is not divisible by {name} ({divisor})")
    if args.fill_rounds < 0:
        raise ValueError(f"--fill-rounds must be 0 or more (got {args.fill_rounds})")
    if args.max_gold_steps is not None and args.max_gold_steps < 1:
        raise ValueError(f"--max-gold-steps must be at least 1 (got {args.max_gold_steps})")
    if not 0 <= args.step_reward < 1:
        raise ValueError(f"--step-reward must be in [0, 1) so that a right answer outscores any wrong one "
                         f"(got {args.step_reward})")
    if args.gen_batch < 1:
        raise ValueError(f"--gen-batch must be at least 1 (got {args.gen_batch})")
    if args.grad_accum % world:
        raise ValueError(f"--grad-accum {args.grad_accum} must be a multiple of the {world} ranks")
    if args.algo == "grpo" and k < 2:
        raise ValueError("--algo grpo needs --group-size >= 2 (advantages are relative within a group)")
    if args.dynamic_sampling != "off" and k < 2:
        raise ValueError(f"--dynamic-sampling {args.dynamic_sampling} needs --group-size >= 2 (a group of one sample "
                         "always has equal rewards)")
    if args.on_policy and (args.algo != "grpo" or args.ppo_epochs != 1 or args.rollouts != args.minibatch * args.grad_accum):
        raise ValueError("--on-policy uses each batch for one optimizer step with no critic: it needs --algo grpo, "
                         f"--ppo-epochs 1 and --rollouts ({args.rollouts}) = --minibatch x --grad-accum "
                         f"({args.minibatch * args.grad_accum})")
    source = resolve(args.init)
    tok = Tokenizer.from_pretrained(source)
    print("settings: " + " ".join(f"{key}={value}" for key, value in {**vars(args), "group_size": k}.items()))
    device = pick_device()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")
    seed_everything(args.seed)

    # ---- data: train questions (the test split stays for evaluation)
    records = load_gsm8k("main", "train", args.data_dir)
    if args.max_gold_steps:  # curriculum: problems the start can solve give rewards that differ
        records = [r for r in records if solution_steps(r["answer"]) <= args.max_gold_steps]
        if not records:
            raise ValueError(f"--max-gold-steps {args.max_gold_steps}: no train problem has so few reasoning lines")
        print(f"curriculum: {len(records)} train problems with at most {args.max_gold_steps} reasoning lines")
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(args.seed)).tolist()
    out = prepare_out_dir(args.out, args.resume, args.overwrite)

    # ---- models: policy (+ value head), reference. An adapter --init is merged into its base: the start.
    use_ref = args.kl_coef > 0  # KL-free: no reference model in memory, no reference forward
    if args.lora:  # one copy of the base: the reference is the policy with its adapters disabled
        model = load_model(out, device=device) if args.resume else apply_lora(
            merge_lora(load_model(source, device=device)), args.lora_r, args.lora_alpha)
        ref = None
    else:
        model = merge_lora(load_model(out if args.resume else source, device=device))
        ref = merge_lora(load_model(source, device=device)).eval().requires_grad_(False) if use_ref else None
    model.grad_checkpointing = not args.no_grad_checkpointing
    if device == "cpu" and not args.plain:  # oneDNN products, the same results faster (nanogsm/cpu.py)
        cpu.speed_up(model)
        if ref is not None:
            cpu.speed_up(ref)
    if args.compile:  # generation, scoring and the PPO passes all run the compiled blocks
        # A block runs in ~10 setups here (prefill, decode, scoring, checkpointed training, the
        # reference...), past dynamo's default of 8 compiled variants; past it, it would run eagerly
        # and a checkpointed block's recompute could take another path than its forward.
        if hasattr(torch._dynamo.config, "recompile_limit"):  # (torch >= 2.7; older: cache_size_limit)
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
        compile_blocks(model)
        if ref is not None:
            compile_blocks(ref)
    value_head = ValueHead(model.config.hidden_size).to(device) if args.algo == "ppo" else None
    if value_head is not None and args.resume:
        value_head.load_state_dict(load_file(out / "value_head.safetensors"))
    params = [p for p in model.parameters() if p.requires_grad] + (list(value_head.parameters()) if value_head else [])
    optimizer = torch.optim.AdamW(params, lr=args.lr, fused=True)
    start = load_trainer_state(out, optimizer) if args.resume else 0
    print(f"{sum(p.numel() for p in params):,} trainable parameters ({'LoRA' if args.lora else 'full'}"
          f"{' + value head' if value_head else ''})")

    def reference_logprobs(input_ids, resp_pos, resp_tokens):
        if ref is None:
            with lora_disabled(model):
                return score_responses(model, None, input_ids, resp_pos, resp_tokens)[0]
        return score_responses(ref, None, input_ids, resp_pos, resp_tokens)[0]

    def save(step, metrics):
        extra = {"value_head.safetensors": value_head.state_dict()} if value_head else {}
        adapter = (adapter_state(model), adapter_config(model, args.init)) if args.lora else None
        save_checkpoint(out, model, out if args.resume else source, args, step, optimizer, metrics, adapter, extra)

    def rollouts(picked, step, first):
        """Prompts, responses, engine log-probs (with --on-policy), scores and rightness for the records `picked`;
        rollout j samples with seed [seed, step, first + j]. Under torchrun rank r generates chunks
        r, r + N, ... of --ppo-batch rollouts, and every rank gets them all."""
        prompts = [tok.encode(build_prompt(r["question"], "zero-shot")) for r in picked]
        chunks = range(0, len(prompts), args.ppo_batch)
        ids = [j for c, i in enumerate(chunks) if c % world == rank for j in range(i, i + args.ppo_batch)]
        with autocast:  # one call, --gen-batch rows at a time
            outs = generate(model, [prompts[j] for j in ids], args.max_new_tokens, temperature=args.temperature,
                            stop_ids=tok.stop_ids, seed=[[args.seed, step, first + j] for j in ids],
                            batch_size=args.gen_batch, cuda_graph=not args.plain, return_logprobs=args.on_policy,
                            calculator=args.calculator, tokenizer=tok)
        mine = dict(zip(ids, zip(*outs) if args.on_policy else ((o, None) for o in outs)))
        everyone = [mine]
        if world > 1:  # every rank gets every response (token lists)
            everyone = [None] * world
            dist.all_gather_object(everyone, mine)
        got = {j: v for part in everyone for j, v in part.items()}
        responses, logprobs = [got[j][0] for j in range(len(prompts))], [got[j][1] for j in range(len(prompts))]
        scored = [reward(tok.decode(resp), r, args.wrong_reward, args.step_reward, args.format_bonus)
                  for resp, r in zip(responses, picked)]
        scores, right = torch.tensor([s for s, _ in scored]), torch.tensor([ok for _, ok in scored])
        return prompts, responses, logprobs, scores, right

    # ---- loop
    metrics, t_start, last = {}, time.perf_counter(), args.steps
    n_prompts = args.rollouts // k
    for step in progress(range(start, args.steps), desc=args.algo):
        if args.max_minutes is not None:  # under torchrun every rank stops at the same step
            over = torch.tensor(float(time.perf_counter() - t_start > 60 * args.max_minutes), device=device)
            if world > 1:
                dist.all_reduce(over)
            if over.item():
                last = step
                break
        # 1-2. rollouts and their scores; with dynamic sampling only groups whose rewards differ stay
        t0 = time.perf_counter()
        model.eval()
        prompts, responses, engine_logprobs, kept_scores, seen, seen_right = [], [], [], [], [], []
        for attempt in range(1 + (args.fill_rounds if args.dynamic_sampling == "fill" else 0)):
            # attempt 0: the next prompts of the shuffled order; fill rounds: prompts from its far end
            at = [step * n_prompts + i if attempt == 0 else -1 - ((step * args.fill_rounds + attempt - 1) * n_prompts + i)
                  for i in range(n_prompts)]
            picked = [records[order[i % len(records)]] for i in at for _ in range(k)]  # k samples per prompt
            p, r, lp, scores, right = rollouts(picked, step, attempt * len(picked))
            seen.append(scores)
            seen_right.append(right)
            keep = informative_groups(scores, k) if args.dynamic_sampling != "off" else torch.ones(n_prompts, dtype=torch.bool)
            rows = [g * k + i for g in keep.nonzero()[:, 0].tolist() for i in range(k)]
            prompts, responses = prompts + [p[j] for j in rows], responses + [r[j] for j in rows]
            engine_logprobs, kept_scores = engine_logprobs + [lp[j] for j in rows], kept_scores + scores[rows].tolist()
            if len(prompts) >= args.rollouts:
                break
        n = min(len(prompts), args.rollouts)  # the rollouts this step trains on
        prompts, responses, engine_logprobs = prompts[:n], responses[:n], engine_logprobs[:n]
        scores, seen = torch.tensor(kept_scores[:n]).to(device), torch.cat(seen)
        t_gen = time.perf_counter() - t0
        informative = informative_groups(seen, k)  # (groups generated,)
        record = {"step": step + 1, "rollout/reward_mean": seen.mean().item(), "rollout/generated": len(seen),
                  "rollout/right": torch.cat(seen_right).float().mean().item(),
                  "rollout/frac_same_reward": 1 - informative.float().mean().item()}
        if args.dynamic_sampling != "off":
            record["rollout/groups_skipped"] = int((~informative).sum())
        if n == 0:  # every group's rewards were equal: nothing to learn from
            log_step(out, {**record, "time/generate_s": t_gen})
            if args.save_every and (step + 1) % args.save_every == 0:
                save(step + 1, metrics)
            continue

        # 3. old log-probs, values, reference log-probs (no grad): the rollouts longest first, in chunks
        # of ppo_batch (rank r scores chunks r, r + N, ...), each cut to the columns it uses (`take`).
        # On-policy with no reference: no forward at all, the engine's log-probs are the old ones.
        input_ids, resp_pos, resp_tokens, mask = pack(prompts, responses, tok.pad_id)
        need, n_resp = used_lengths(resp_pos, mask)
        by_length = sorted(range(n), key=lambda j: -need[j])
        batch = {name: torch.zeros(mask.shape, device=device) for name in ("old_logprobs", "old_values", "ref_logprobs")}
        chunks = range(0, n, args.ppo_batch) if not args.on_policy or use_ref else []  # [] : nothing to score
        with torch.no_grad(), autocast:
            for c, i in enumerate(chunks):
                if c % world != rank:
                    continue
                rows = by_length[i:i + args.ppo_batch]
                part = take(dict(input_ids=input_ids, resp_pos=resp_pos, resp_tokens=resp_tokens), rows, need, n_resp)
                part = [t.to(device) for t in part.values()]
                at = (torch.tensor(rows, device=device), slice(0, part[2].shape[1]))  # the (rows, R) it scores
                if not args.on_policy:
                    logprobs, values, _ = score_responses(model, value_head, *part)
                    batch["old_logprobs"][at] = logprobs.float()
                    batch["old_values"][at] = values.float()
                if use_ref:
                    batch["ref_logprobs"][at] = reference_logprobs(*part).float()
        if world > 1:  # other ranks' rows are zeros here: the sum over ranks is the whole batch
            for t in batch.values():
                dist.all_reduce(t)
        if args.on_policy:  # the engine's log-probs of the sampled tokens (tested equal to the trainer's)
            for j, lp in enumerate(engine_logprobs):
                batch["old_logprobs"][j, :len(lp)] = torch.tensor(lp, device=device)
        chosen = mask.clone()  # 1 on the response tokens the policy chose (not the calculator)
        if args.calculator:
            for j, (p, r) in enumerate(zip(prompts, responses)):
                chosen[j, :len(r)] -= torch.tensor(forced_mask(r, tok, p), dtype=torch.float)
        batch.update(input_ids=input_ids.to(device), resp_pos=resp_pos.to(device), resp_tokens=resp_tokens.to(device),
                     mask=mask.to(device), loss_mask=chosen.to(device))
        mask = batch["mask"]

        # 4-5. rewards and advantages
        if args.algo == "ppo":
            rewards, kl = token_rewards(scores, batch["old_logprobs"], batch["ref_logprobs"], mask, args.kl_coef, args.kl)
            advantages, returns = compute_gae(rewards, batch["old_values"], mask, args.gamma, args.lam)
            advantages = whiten(advantages, mask)
        else:
            _, kl = token_rewards(scores, batch["old_logprobs"], batch["ref_logprobs"], mask, 0.0, args.kl)
            advantages = grpo_advantages(scores, k, std=args.adv_std == "on")[:, None] * mask
            returns = torch.zeros_like(mask)
        batch.update(advantages=advantages, returns=returns)

        # 6. PPO epochs
        model.train()
        t1 = time.perf_counter()
        stats = ppo_update(model, value_head, optimizer, batch, args.ppo_epochs, args.minibatch, args.grad_accum,
                           args.clip, args.vf_coef, args.ent_coef, args.max_grad_norm,
                           kl_coef_in_loss=args.kl_coef if args.algo == "grpo" else 0.0, autocast=autocast,
                           seed=args.seed + step, clip_high=args.clip_high,
                           norm_tokens=args.max_new_tokens if args.loss_norm == "constant" else None)
        record.update({"rollout/trained": n, "rollout/response_len": mask.sum(-1).mean().item(),
                       **({"rollout/kl_ref": (kl * mask).sum(-1).mean().item()} if use_ref else {}),
                       **{f"loss/{name}": stats[name] for name in ("policy", "value", "approx_kl", "entropy") if name in stats},
                       **{f"params/{name}": stats[name] for name in ("value_clip_frac", "policy_clip_frac", "grad_norm")
                          if name in stats},
                       "value/explained_variance": explained_variance(batch["old_values"], returns, mask)
                       if value_head else 0.0,
                       "time/generate_s": t_gen, "time/score_s": t1 - t0 - t_gen,  # scoring: old, value, reference
                       "time/train_s": time.perf_counter() - t1,
                       "peak_mem_gb": peak_memory_gb(device)})
        log_step(out, record)
        if args.eval_every and (step + 1) % args.eval_every == 0 and rank == 0:
            metrics = eval_em(model, tok, args.eval_n, args.data_dir, autocast, cuda_graph=not args.plain)
            log_step(out, {"step": step + 1, **metrics})
        if args.save_every and (step + 1) % args.save_every == 0:
            save(step + 1, metrics)
    if last == start or not (args.save_every and last % args.save_every == 0):  # else the loop saved it
        save(last, metrics)
    print(f"saved {out} at step {last}")


if __name__ == "__main__":
    try:
        main(parser.parse_args())
    except ValueError as e:  # user errors: one line, no traceback
        sys.exit(f"error: {e}")
