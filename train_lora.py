"""LoRA fine-tuning of a Gemma model on GSM8K (the study's r=16, alpha=32 run), self-written LoRA.

    python train_lora.py --data main --r 16 --alpha 32                 # study defaults, google/gemma-2b-it
    python train_lora.py --data main --model gemma-3-270m --max-examples 480 --lr 1e-4 --out ckpt/lora-270m
    python train_lora.py --data main --merge                           # also save ckpt/lora-main/merged
    python evaluate.py --model ckpt/lora-main --prompt zero-shot       # loads the base, then the adapter

Same data, loop, schedule and logging as train_sft.py; only the LoRA A and B matrices of the chosen
projections train, the base weights are frozen (so AdamW state is tiny). The checkpoint is
adapter-only, in PEFT's format (adapter_model.safetensors + adapter_config.json) + the tokenizer.
"""
import argparse
import sys

import torch

from nanogsm import cpu
from nanogsm.compile import compile_blocks
from nanogsm.lora import (DEFAULT_TARGETS, adapter_config, adapter_state, apply_lora,
                          count_parameters, load_adapter, load_model, merge_lora, store_base_in)
from nanogsm.report import HelpFormatter, progress
from nanogsm.tokenizer import Tokenizer
from nanogsm.train import (bf16_compute, collate, eval_em, load_trainer_state, log_step, lr_at, peak_memory_gb,
                           rank_world, save_checkpoint, setup_distributed, sft_arguments, sft_data, sft_step,
                           shard_model, start_run)
from nanogsm.weights import resolve

parser = sft_arguments(argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter))
parser.add_argument("--r", type=int, default=16, help="LoRA rank")
parser.add_argument("--alpha", type=float, default=32, help="LoRA scale numerator: updates are scaled by alpha / r")
parser.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA input")
parser.add_argument("--targets", default=",".join(DEFAULT_TARGETS), help="comma-separated projection names")
parser.add_argument("--merge", action="store_true", help="also save the merged full model to <out>/merged")


def main(args):
    # ---- setup
    world = setup_distributed()[1]  # torchrun: one process per device; plain python: rank 0 of 1
    out, device, autocast, wandb = start_run(args, "lora")

    # ---- data
    source = resolve(args.model)
    tok = Tokenizer.from_pretrained(source)
    examples, micro_batches, total_steps = sft_data(tok, args)

    # ---- model and optimizer
    model = merge_lora(load_model(source, dtype=torch.float32, device=device))  # an adapter --model: folded in
    if args.resume:
        load_adapter(model, out)
    else:
        apply_lora(model, args.r, args.alpha, args.lora_dropout, args.targets.split(","))
    if bf16_compute(args, device) and world == 1:  # (FSDP shards blocks of one dtype)
        store_base_in(model, torch.bfloat16)  # what autocast would cast the frozen weights to, once
    model.grad_checkpointing = args.grad_checkpointing
    if device == "cpu" and not args.plain:  # (before sharding: FSDP gathers weights into the modules it sees)
        cpu.speed_up(model)  # oneDNN products, the same results faster (nanogsm/cpu.py)
    if world > 1:
        shard_model(model, device)
    if args.compile:
        compile_blocks(model)
    model.train()
    trainable, total = count_parameters(model)
    print(f"LoRA r={args.r} alpha={args.alpha} on {args.targets}: {trainable:,} trainable of {total:,} parameters "
          f"({100 * trainable / total:.2f}%)")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, fused=True)
    start = load_trainer_state(out, optimizer) if args.resume else 0
    warmup = max(1, int(args.warmup_frac * total_steps))
    save = lambda step, metrics: save_checkpoint(  # noqa: E731
        out, model, out if args.resume else source, args, step, optimizer, metrics,
        adapter=(adapter_state(model), adapter_config(model, args.model)))

    # ---- loop
    metrics = {}
    for step in progress(range(start, total_steps), desc="lora"):
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
    if args.merge and rank_world()[0] == 0:  # from the saved adapter: the same with one rank or many
        texts = {name: (out / name).read_text() for name in ("tokenizer.json", "args.json", "metrics.json")}
        merge_lora(load_model(out)).save_pretrained(out / "merged", text_files=texts)
        print(f"saved the merged model to {out / 'merged'}")


if __name__ == "__main__":
    try:
        main(parser.parse_args())
    except ValueError as e:  # user errors: one line, no traceback
        sys.exit(f"error: {e}")
