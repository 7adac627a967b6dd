"""Batched greedy generation tokens/s: nanogsm's KV-cache engine vs HF transformers `generate`.

    python -m bench.generate                 # Gemma 3 270M offline, 16 GSM8K prompts, 128 new tokens
    python -m bench.generate --batch 32 --new-tokens 64 --threads 2

Same weights (the converted folder), same prompts (left-padded for HF), same threads, greedy,
no early stop on either side, so both produce batch x new-tokens tokens. Needs NANOGSM_DATA_DIR
(or Hub access) for the GSM8K questions.
"""
import argparse
import time

import torch

from nanogsm import weights
from nanogsm.generate import generate
from nanogsm.gsm8k import build_prompt, load_gsm8k
from nanogsm.model import Gemma
from nanogsm.tokenizer import Tokenizer

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="gemma-3-270m", help="model name or checkpoint folder")
parser.add_argument("--batch", type=int, default=16, help="prompts generated together")
parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per prompt")
parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads (both sides)")
parser.add_argument("--dtype", default="float32", help="torch dtype of both models")
args = parser.parse_args()

import transformers  # noqa: E402  (bench-only reference)

torch.set_num_threads(args.threads)
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = getattr(torch, args.dtype)
folder = weights.resolve(args.model)
tok = Tokenizer.from_pretrained(folder)
prompts = [tok.encode(build_prompt(r["question"], "zero-shot")) for r in load_gsm8k("main", "test")[:args.batch]]


def timed(fn):
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


ours = Gemma.from_pretrained(folder, dtype=dtype, device=device)
out_ours, t_ours = timed(lambda: generate(ours, prompts, args.new_tokens))
del ours

hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
P = max(map(len, prompts))
ids = torch.tensor([[tok.pad_id] * (P - len(p)) + p for p in prompts], device=device)
mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts], device=device)
with torch.inference_mode():
    out_hf, t_hf = timed(lambda: hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                             min_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None,
                                             pad_token_id=tok.pad_id))
same = sum(a == b for a, b in zip(out_ours, out_hf[:, P:].tolist()))
n = args.batch * args.new_tokens
print(f"device {device} | threads {args.threads} | {args.model} {args.dtype} | batch {args.batch} x {args.new_tokens} "
      f"new tokens, greedy | identical rows {same}/{args.batch}")
print("| nanogsm tok/s | HF generate tok/s | ratio |\n|---|---|---|")
print(f"| {n / t_ours:.1f} | {n / t_hf:.1f} | {t_hf / t_ours:.2f} |")
