"""Prefill (forward-only) tokens/s of nanogsm vs HF transformers on the same weights and threads.

    python -m bench.forward                       # Gemma 3 270M offline, batch 8 x 256, fp32 and bf16
    python -m bench.forward --model PATH --batch 4 --seq 128 --threads 2

Both models load the same HF-style folder (the converted GGUF for gemma-3-270m). Prints a
markdown table with the ratio nanogsm / HF measured in this one run.
"""
import argparse
import time

import torch

from nanogsm import weights
from nanogsm.model import Gemma

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="gemma-3-270m", help="model name or checkpoint folder")
parser.add_argument("--batch", type=int, default=8, help="sequences per forward")
parser.add_argument("--seq", type=int, default=256, help="tokens per sequence")
parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads (both sides)")
parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated torch dtypes")
parser.add_argument("--repeats", type=int, default=3, help="timed forwards per model (best is reported)")
args = parser.parse_args()

import transformers  # noqa: E402  (bench-only reference)

torch.set_num_threads(args.threads)
device = "cuda" if torch.cuda.is_available() else "cpu"
folder = weights.resolve(args.model)


def best_time(model, x):
    with torch.inference_mode():
        model(x)  # warm-up
        times = []
        for _ in range(args.repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            model(x)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    return min(times)


print(f"device {device} | threads {args.threads} | model {args.model} | batch {args.batch} x {args.seq}")
print("| dtype | nanogsm tok/s | HF tok/s | ratio |\n|---|---|---|---|")
for name in args.dtypes.split(","):
    dtype = getattr(torch, name)
    x = torch.randint(0, 32000, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(device)
    ours = Gemma.from_pretrained(folder, dtype=dtype, device=device)
    t_ours = best_time(ours, x)
    del ours
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    t_hf = best_time(lambda ids: hf(ids).logits, x)
    del hf
    n = args.batch * args.seq
    print(f"| {name} | {n / t_ours:.0f} | {n / t_hf:.0f} | {t_hf / t_ours:.2f} |", flush=True)
