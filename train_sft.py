"""Full supervised fine-tuning of a Gemma model on GSM8K (the study's best run).

    python train_sft.py --data main                      # study defaults: google/gemma-2b-it, 1 epoch, 8 x 2
    python train_sft.py --data socratic --out ckpt/sft-socratic
    python train_sft.py --data main --model gemma-3-270m --max-examples 480 --out ckpt/sft-270m   # CPU-sized
    python evaluate.py --model ckpt/sft-main --prompt zero-shot        # SFT learns the zero-shot format

Each example is `Question: <q>\\nAnswer:` + ` <gold answer>` + EOS; only the answer tokens carry loss.
Precision: fp32 master weights and AdamW state; on CUDA the forward/backward run under bf16
autocast (norms, softmax and the loss stay fp32). For gemma-2b that is 2.5B x (4 weights + 4 grads
+ 8 Adam) = 40 GB before activations; the alternative, pure bf16 weights and optimizer state
(~20 GB), loses small updates at lr 1e-5 to bf16 rounding, so it is not what we do.
"""
import argparse
import sys

import torch

from nanogsm import cpu
from nanogsm.compile import compile_blocks
from nanogsm.lora import load_model, merge_lora
from nanogsm.report import HelpFormatter, progress
from nanogsm.tokenizer import Tokenizer
from nanogsm.train import (collate, eval_em, load_trainer_state, log_step, lr_at, peak_memory_gb, save_checkpoint,
                           setup_distributed, sft_arguments, sft_data, sft_step, shard_model, start_run)
from nanogsm.weights import resolve

parser = sft_arguments(argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter))


def main(args):
    # ---- setup
    world = setup_distributed()[1]  # torchrun: one process per device; plain python: rank 0 of 1
    out, device, autocast, wandb = start_run(args, "sft")

    # ---- data
    source = resolve(args.model)
    tok = Tokenizer.from_pretrained(source)
    examples, micro_batches, total_steps = sft_data(tok, args)

    # ---- model and optimizer
    model = merge_lora(load_model(out if args.resume else source, dtype=torch.float32, device=device))
    model.requires_grad_(True)  # every weight trains (an adapter --model comes merged into its frozen base)
    model.grad_checkpointing = args.grad_checkpointing
    if device == "cpu" and not args.plain:  # (before sharding: FSDP gathers weights into the modules it sees)
        cpu.speed_up(model)  # oneDNN products, the same results faster (nanogsm/cpu.py)
    if world > 1:
        shard_model(model, device)
    if args.compile:
        compile_blocks(model)
    model.train()
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, all trained")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=True)
    start = load_trainer_state(out, optimizer) if args.resume else 0
    warmup = max(1, int(args.warmup_frac * total_steps))
    save = lambda step, metrics: save_checkpoint(out, model, out if args.resume else source, args,  # noqa: E731
                                                 step, optimizer, metrics)

    # ---- loop
    metrics = {}
    for step in progress(range(start, total_steps), desc="sft"):
        lr = lr_at(step, total_steps, warmup, args.lr, args.min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batches = [collate([examples[i] for i in b], tok.pad_id)
                   for b in micro_batches[step * args.grad_accum:(step + 1) * args.grad_accum]]
        try:
            stats = sft_step(model, optimizer, batches, device, autocast, args.clip, tok.pad_id, compiled=args.compile)
        except FloatingPointError as e:
            raise SystemExit(f"step {step + 1}: {e}; stopping. The last good checkpoint in {out} is kept.")
        log_step(out, {"step": step + 1, "loss": stats["loss"], "lr": lr, "grad_norm": stats["grad_norm"],
                       "tok_per_s": stats["tok_per_s"], "peak_mem_gb": peak_memory_gb(device)}, wandb)
        if args.eval_every and (step + 1) % args.eval_every == 0:
            metrics = eval_em(model, tok, args.eval_n, args.data_dir, autocast, cuda_graph=not args.plain)
            log_step(out, {"step": step + 1, **metrics}, wandb)
        if (args.save_every and (step + 1) % args.save_every == 0) or step + 1 == args.stop_after_steps:
            save(step + 1, metrics)
        if step + 1 == args.stop_after_steps:
            print(f"stopped after step {step + 1} as asked; continue with --resume")
            return

    # ---- eval and save
    if args.eval_n:
        metrics = eval_em(model, tok, args.eval_n, args.data_dir, autocast, cuda_graph=not args.plain)
        print(f"final: {metrics}")
    save(total_steps, metrics)
    print(f"saved {out}")


if __name__ == "__main__":
    try:
        main(parser.parse_args())
    except ValueError as e:  # user errors: one line, no traceback
        sys.exit(f"error: {e}")
