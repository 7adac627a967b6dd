"""Training step (forward + backward + AdamW) tokens/s and peak memory: nanogsm vs HF transformers.

    python -m bench.train_step                        # Gemma 3 270M, batch 8 x 192, fp32, CPU threads
    python -m bench.train_step --batch 4 --seq 128 --grad-checkpointing

Each side runs in its own fresh process (so peak RSS is its own) on the same weights, the same
random batch (every token labelled) and the same threads; the ratio is from this one run.
"""
import argparse
import json
import subprocess
import sys
import time

import torch

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="gemma-3-270m", help="model name or checkpoint folder")
parser.add_argument("--batch", type=int, default=8, help="sequences per step")
parser.add_argument("--seq", type=int, default=192, help="tokens per sequence")
parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads (both sides)")
parser.add_argument("--grad-checkpointing", action="store_true", help="checkpoint every block on both sides")
parser.add_argument("--side", choices=["nanogsm", "hf"], help=argparse.SUPPRESS)  # the measured child
args = parser.parse_args()

if args.side:
    from nanogsm.train import peak_memory_gb, token_loss_sum
    from nanogsm.weights import resolve
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    folder = resolve(args.model)
    x = torch.randint(0, 32000, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(device)
    if args.side == "nanogsm":
        from nanogsm.model import Gemma
        model = Gemma.from_pretrained(folder, device=device).train()
        model.grad_checkpointing = args.grad_checkpointing
        loss_fn = lambda: token_loss_sum(model, x, x) / (x.numel() - x.shape[0])  # noqa: E731
    else:
        import transformers
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).train()
        if args.grad_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        loss_fn = lambda: model(input_ids=x, labels=x).loss  # noqa: E731
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
    times = []
    for step in range(args.steps + 1):
        t = time.perf_counter()
        loss_fn().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    print(json.dumps({"tok_s": args.batch * args.seq / min(times[1:]), "peak_gb": peak_memory_gb(device)}))
    sys.exit()

results = {}
for side in ("nanogsm", "hf"):
    cmd = [sys.executable, "-m", "bench.train_step", "--side", side, *sys.argv[1:]]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    results[side] = json.loads(out.strip().splitlines()[-1])
ours, hf = results["nanogsm"], results["hf"]
print(f"{args.model} | batch {args.batch} x {args.seq} | fp32 + AdamW | threads {args.threads} | "
      f"checkpointing {args.grad_checkpointing}")
print("| | nanogsm | HF transformers | ratio |\n|---|---|---|---|")
print(f"| tokens/s | {ours['tok_s']:.1f} | {hf['tok_s']:.1f} | {ours['tok_s'] / hf['tok_s']:.2f} |")
print(f"| peak memory GiB | {ours['peak_gb']:.2f} | {hf['peak_gb']:.2f} | {ours['peak_gb'] / hf['peak_gb']:.2f} |")
