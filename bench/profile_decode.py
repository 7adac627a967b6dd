"""Where a decode step spends its time: the kernels (CUDA) or ops (CPU) of greedy generation.

    python -m bench.profile_decode                                        # Gemma 3 270M (offline), CPU, batch 16
    python -m bench.profile_decode --shape gemma-2b --batch 1 --compile   # GPU: bf16, recorded steps, compiled blocks

It runs `generate` from nanogsm/generate.py (on CUDA: decode steps recorded once as a CUDA graph
and replayed) on random prompts, once to warm up (compile, record) and once under torch.profiler,
then prints the device time per decode step by kind of kernel (the kinds of bench/profile_step.py),
the heaviest kernels with their time per call, and at batch 1 the bandwidth bound of
bench/suite.py: the weights and the mean KV cache read once per step at the measured copy
bandwidth. The prefill is profiled too and is ~1 step's worth of the total at 128-token prompts;
it is not subtracted.
"""
import argparse
import collections
import datetime
import json
import sys
from pathlib import Path

import torch

from bench.profile_step import kind_of, own_seconds
from nanogsm.report import HelpFormatter

parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
parser.add_argument("--model", default="gemma-3-270m", help="model name or checkpoint folder")
parser.add_argument("--shape", choices=["gemma-2b"], help="random weights in this shape instead of --model")
parser.add_argument("--batch", type=int, default=16, help="prompts per batch")
parser.add_argument("--prompt-len", type=int, default=128, help="tokens per prompt")
parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per prompt (no early stop)")
parser.add_argument("--dtype", choices=["bfloat16", "float32"], help="weights' dtype (default: bf16 on CUDA, fp32 on CPU)")
parser.add_argument("--compile", action="store_true", help="blocks through torch.compile (as evaluate.py --compile)")
parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
parser.add_argument("--out", help="JSON file (default runs/profile-decode-<time>.json)")


def main(args):
    from bench.suite import bandwidth_bound, best_time, random_folder, speed_layers, sync
    from nanogsm.generate import generate
    from nanogsm.model import Gemma
    from nanogsm.weights import resolve
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    folder = random_folder(args.shape, tokenizer=False) if args.shape else resolve(args.model)
    model = speed_layers(Gemma.from_pretrained(folder, dtype=dtype, device=device), device,
                         {"plain": False, "compile": args.compile})
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 32000, (args.batch, args.prompt_len), generator=gen).tolist()
    run = lambda: generate(model, prompts, args.new_tokens, stop_ids=())  # noqa: E731  same shapes every call: no recompile
    wall_step = best_time(run, device, 1) / args.new_tokens  # after a warm-up run: compile, record the step
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        run()
        sync(device)

    steps = args.new_tokens
    kinds = collections.defaultdict(lambda: [0.0, 0])  # kind -> [seconds, count]
    timed = []
    for e in prof.key_averages():
        seconds = None if e.is_user_annotation else own_seconds(e, device)
        if seconds is not None:
            timed.append((seconds, e))
            kinds[kind_of(e.key)][0] += seconds
            kinds[kind_of(e.key)][1] += e.count
    busy = sum(s for s, _ in kinds.values()) / steps
    # one sequence's KV cache: the bound of bench/suite.py, meaningful at batch 1
    bound = bandwidth_bound(sum(p.numel() for p in model.parameters()), folder, dtype, args.prompt_len, steps, device) if args.batch == 1 else None
    report = {"date": f"{datetime.date.today()}", "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "argv": sys.argv[1:], "wall_step_s": wall_step, "busy_step_s": busy, "bound_step_s": bound,
              "kinds": {k: {"s_per_step": s / steps, "per_step": n / steps} for k, (s, n) in
                        sorted(kinds.items(), key=lambda kv: -kv[1][0])},
              "top": [{"name": e.key[:120], "s_per_step": s / steps, "calls_per_step": e.count / steps,
                       "us_per_call": 1e6 * s / e.count} for s, e in sorted(timed, key=lambda se: -se[0])[:20]]}
    out = Path(args.out or f"runs/profile-decode-{datetime.datetime.now():%Y%m%d-%H%M%S}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(out)

    unit = "kernels" if device == "cuda" else "ops"
    print(f"{report['device']} | {args.shape or args.model} | {dtype} | batch {args.batch} | prompt {args.prompt_len} "
          f"| {steps} new tokens{' | compiled blocks' if args.compile else ''}")
    print(f"per decode step: wall {1e3 * wall_step:.3f} ms, {'device busy' if device == 'cuda' else 'in ops'} "
          f"{1e3 * busy:.3f} ms" + ("" if bound is None else
                                    f", bandwidth bound {1e3 * bound:.3f} ms ({100 * bound / wall_step:.0f}% of it reached)"))
    print(f"| kind | ms per step | {unit} per step |\n|---|---|---|")
    for kind, v in report["kinds"].items():
        print(f"| {kind} | {1e3 * v['s_per_step']:.3f} | {v['per_step']:.1f} |")
    print(f"\n| heaviest {unit} | ms per step | calls per step | µs per call |\n|---|---|---|---|")
    for t in report["top"][:12]:
        print(f"| `{t['name'][:70]}` | {1e3 * t['s_per_step']:.3f} | {t['calls_per_step']:.1f} | {t['us_per_call']:.1f} |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main(parser.parse_args())
