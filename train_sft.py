"""Full supervised fine-tuning of a Gemma model on GSM8K (the study's best run).

    python train_sft.py --data main                      # study defaults: google/gemma-2b-it, 1 epoch, 8 x 2
    python train_sft.py --data socratic --out ckpt/sft-socratic
    python train_sft.py --data main --model gemma-3-270m --max-examples 1000 --out ckpt/sft-270m   # CPU-sized
    python evaluate.py --model ckpt/sft-main --prompt zero-shot        # SFT learns the zero-shot format

Each example is `Question: <q>\\nAnswer:` + ` <gold answer>` + EOS; only the answer tokens carry loss.
Precision: fp32 master weights and AdamW state; on CUDA the forward/backward run under bf16
autocast (norms, softmax and the loss stay fp32). For gemma-2b that is 2.5B x (4 weights + 4 grads
+ 8 Adam) = 40 GB before activations; the alternative, pure bf16 weights and optimizer state
(~20 GB), loses small updates at lr 1e-5 to bf16 rounding, so it is not what we do.
"""
import argparse
import sys
import time

import torch

from nanogsm.gsm8k import seeded_subset, evaluate, load_gsm8k
from nanogsm.model import Gemma
from nanogsm.tokenizer import Tokenizer
from nanogsm.train import (collate, length_grouped_batches, load_trainer_state, log_step, lr_at, n_target_tokens,
                           peak_memory_gb, pick_device, prepare_out_dir, save_checkpoint, seed_everything,
                           sft_example, token_loss_sum)
from nanogsm.weights import resolve

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--data", default="main", help="GSM8K config to train on: main | socratic")
parser.add_argument("--model", default="google/gemma-2b-it", help="model to start from (name, folder, Hub id)")
parser.add_argument("--out", help="checkpoint folder (default ckpt/sft-<data>)")
parser.add_argument("--data-dir", help="folder of GSM8K jsonl files (default NANOGSM_DATA_DIR, else the Hub)")
parser.add_argument("--max-examples", type=int, help="train on the first N shuffled examples only (CPU runs)")
parser.add_argument("--epochs", type=int, default=1, help="passes over the training set")
parser.add_argument("--batch-size", type=int, default=8, help="micro-batch size (sequences per forward)")
parser.add_argument("--grad-accum", type=int, default=2, help="micro-batches per optimizer step")
parser.add_argument("--max-seq-length", type=int, default=512, help="longer examples are truncated (counted)")
parser.add_argument("--lr", type=float, default=1e-5, help="peak learning rate")
parser.add_argument("--min-lr", type=float, default=1e-6, help="learning rate at the end of the cosine")
parser.add_argument("--warmup-frac", type=float, default=0.03, help="fraction of steps of linear warmup")
parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
parser.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping")
parser.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward")
parser.add_argument("--seed", type=int, default=0, help="data order and init seed")
parser.add_argument("--eval-every", type=int, default=0, help="every N steps: EM on --eval-n test problems")
parser.add_argument("--eval-n", type=int, default=64, help="test problems (seeded subset) for --eval-every / the end")
parser.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
parser.add_argument("--stop-after-steps", type=int, default=0, help="stop and save after N steps, as if interrupted")
parser.add_argument("--resume", action="store_true", help="continue the run in --out")
parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
parser.add_argument("--wandb", action="store_true", help="also log to Weights & Biases (if installed)")


def main(args):
    # ---- setup
    if args.data not in ("main", "socratic"):
        raise ValueError(f"--data {args.data!r}: expected main or socratic")
    args.out = args.out or f"ckpt/sft-{args.data}"
    out = prepare_out_dir(args.out, args.resume, args.overwrite)
    device = pick_device()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")
    print(f"fp32 master weights; compute {'bf16 autocast' if device == 'cuda' else 'fp32'}")
    seed_everything(args.seed)
    wandb = None
    if args.wandb:
        try:
            import wandb
        except ImportError:
            raise ValueError("--wandb: the wandb package is not installed (pip install wandb)") from None
        wandb.init(project="nanogsm", config=vars(args))

    # ---- data
    source = resolve(args.model)
    tok = Tokenizer.from_pretrained(source)
    records = load_gsm8k(args.data, "train", args.data_dir)
    if args.max_examples:
        records = seeded_subset(records, min(args.max_examples, len(records)), args.seed)
    examples = [sft_example(tok, r["question"], r["answer"], args.max_seq_length) for r in records]
    n_truncated = sum(t for _, _, t in examples)
    examples = [(ids, labels) for ids, labels, _ in examples]
    lengths = [len(ids) for ids, _ in examples]
    epoch_batches = [length_grouped_batches(lengths, args.batch_size, args.seed, e) for e in range(args.epochs)]
    steps_per_epoch = len(epoch_batches[0]) // args.grad_accum
    micro_batches = [b for batches in epoch_batches for b in batches[:steps_per_epoch * args.grad_accum]]
    total_steps = steps_per_epoch * args.epochs
    if total_steps == 0:
        raise ValueError(f"{len(examples)} examples make no step of {args.batch_size} x {args.grad_accum}")
    padded = sum(len(b) * max(lengths[i] for i in b) for b in micro_batches)
    print(f"{len(examples)} examples ({args.data}/train), {n_truncated} truncated at {args.max_seq_length} tokens; "
          f"{total_steps} steps of {args.batch_size} x {args.grad_accum}; "
          f"padding {100 * (1 - sum(lengths[i] for b in micro_batches for i in b) / padded):.1f}% of batch tokens")

    # ---- model and optimizer
    model = Gemma.from_pretrained(out if args.resume else source, dtype=torch.float32, device=device)
    model.grad_checkpointing = args.grad_checkpointing
    model.train()
    print(f"{model.num_params() / 1e6:.1f}M parameters, all trained")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                  fused=device == "cuda", foreach=None if device == "cuda" else True)
    start = load_trainer_state(out, optimizer) if args.resume else 0
    warmup = max(1, int(args.warmup_frac * total_steps))

    # ---- loop
    metrics = {}
    for step in range(start, total_steps):
        t0 = time.perf_counter()
        lr = lr_at(step, total_steps, warmup, args.lr, args.min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batches = [collate([examples[i] for i in b], tok.pad_id) for b in
                   micro_batches[step * args.grad_accum:(step + 1) * args.grad_accum]]
        # Normalise by the answer tokens of the whole effective batch, not per micro-batch: a mean of
        # per-micro-batch means would weight tokens in short micro-batches more than long ones, and
        # the result would change with the micro-batch split.
        n_tokens = sum(n_target_tokens(labels) for _, labels in batches)
        loss_sum = 0.0
        for input_ids, labels in batches:
            with autocast:
                loss = token_loss_sum(model, input_ids.to(device), labels.to(device)) / n_tokens
            loss.backward()
            loss_sum += loss.item()
        if not torch.isfinite(torch.tensor(loss_sum)):
            raise SystemExit(f"step {step}: loss is {loss_sum}; stopping. The last good checkpoint in {out} is kept.")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seen = sum(int((ids != tok.pad_id).sum()) for ids, _ in batches)
        log_step(out, {"step": step + 1, "loss": loss_sum, "lr": lr, "grad_norm": grad_norm,
                       "tok_per_s": round(seen / (time.perf_counter() - t0)), "peak_mem_gb": peak_memory_gb(device)},
                 wandb)
        if args.eval_every and (step + 1) % args.eval_every == 0:
            metrics = eval_em(model, tok, args)
            log_step(out, {"step": step + 1, **metrics}, wandb)
        if (args.save_every and (step + 1) % args.save_every == 0) or step + 1 == args.stop_after_steps:
            save_checkpoint(out, model, source if not args.resume else out, args, step + 1, optimizer, metrics)
        if step + 1 == args.stop_after_steps:
            print(f"stopped after step {step + 1} as asked; continue with --resume")
            return

    # ---- eval and save
    if args.eval_n:
        metrics = eval_em(model, tok, args)
        print(f"final: {metrics}")
    save_checkpoint(out, model, source if not args.resume else out, args, total_steps, optimizer, metrics)
    print(f"saved {out}")


def eval_em(model, tok, args):
    """Greedy EM on the seeded test subset, zero-shot prompt (the format SFT trains)."""
    model.eval()
    records = seeded_subset(load_gsm8k("main", "test", args.data_dir), args.eval_n)
    rows = evaluate(model, tok, records, "zero-shot", batch_size=16, max_new_tokens=256)
    model.train()
    return {"eval_em": sum(r["correct"] for r in rows) / len(rows),
            "eval_format": sum(r["extracted"] is not None for r in rows) / len(rows), "eval_n": len(rows)}


if __name__ == "__main__":
    try:
        main(parser.parse_args())
    except ValueError as e:  # user errors: one line, no traceback
        sys.exit(f"error: {e}")
