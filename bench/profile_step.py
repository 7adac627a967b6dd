"""Where one training step spends its time, and whether it waits for the device.

    python -m bench.profile_step                                   # Gemma 3 270M (offline), CPU
    python -m bench.profile_step --shape gemma-2b --seq 512        # GPU: random weights, bf16 autocast
    python -m bench.profile_step --shape gemma-2b --lora --compile --accum 2

It runs `sft_step` from nanogsm/train.py, the step train_sft.py / train_lora.py run, on random
micro-batches built on the host as the training loop builds them, then:
  syncs    on CUDA, every synchronizing call inside one step (torch.cuda.set_sync_debug_mode), with
           the line that made it. The step reads the loss and gradient norm back once (logging,
           the finite-loss check) by waiting on an event, which this mode does not flag; the
           profile's runtime calls count it (cudaEventSynchronize).
  profile  one step under torch.profiler: device time by kind of kernel (CUDA) or op time by kind
           of op (CPU), as ms per step and share of the step's wall time; the rest is time the
           device sat idle (CUDA: with its longest gaps and the kernels around them) or Python
           and framework overhead (CPU). --trace writes the Chrome trace next to the JSON (open
           it in chrome://tracing or ui.perfetto.dev).
--attn-mask passes an all-true pad mask, the masked attention path every step took before
training's plain-causal path existed (for before/after numbers).
"""
import argparse
import collections
import datetime
import gzip
import json
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch
from nanogsm.report import HelpFormatter

parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
parser.add_argument("--model", default="gemma-3-270m", help="model name or checkpoint folder")
parser.add_argument("--shape", choices=["gemma-2b"], help="random weights in this shape instead of --model")
parser.add_argument("--batch", type=int, default=8, help="sequences per micro-batch")
parser.add_argument("--seq", type=int, default=192, help="tokens per sequence")
parser.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
parser.add_argument("--lora", action="store_true", help="LoRA r=16 on all seven projections (as train_lora.py)")
parser.add_argument("--ckpt", action="store_true", help="gradient checkpointing")
parser.add_argument("--compile", action="store_true", help="blocks through torch.compile (as --compile)")
parser.add_argument("--attn-mask", action="store_true", help="force the masked attention path (before/after)")
parser.add_argument("--bf16", choices=["auto", "on", "off"], default="auto", help="bf16 autocast (auto: on CUDA)")
parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
parser.add_argument("--out", help="JSON file (default runs/profile-<time>.json)")
parser.add_argument("--trace", action="store_true", help="also write the Chrome trace beside the JSON (.trace.json.gz)")

# Kernel (CUDA) or op (CPU) name fragments -> kind; the first match wins, the rest is "other".
KINDS = [
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "aten::mm", "aten::bmm", "aten::addmm", "aten::matmul",
                "mkldnn::_linear_pointwise")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("compiled (triton)", ("triton",)),
    ("copy / cast", ("copy", "memcpy", "aten::to", "cat", "index")),
    ("fill / memset", ("memset", "fill", "zero")),
    ("reduction / softmax", ("reduce", "softmax", "logsumexp", "norm", "sum", "mean")),
    ("elementwise", ("elementwise", "aten::")),
]


def kind_of(name):
    lower = name.lower()
    return next((kind for kind, keys in KINDS if any(k in lower for k in keys)), "other")


def own_seconds(event, device):
    """A kernel's device time (CUDA) or an aten or oneDNN op's own CPU time (CPU), in seconds; else None."""
    if device == "cuda" and event.device_type == torch.autograd.DeviceType.CUDA:
        return event.self_device_time_total / 1e6
    if device == "cpu" and event.key.startswith(("aten::", "mkldnn::")):
        return event.self_cpu_time_total / 1e6
    return None


def idle_gaps(prof, n=6):
    """The device's idle stretches between the step's first and last kernel: (total s, count,
    total s in gaps under 20 us, the n longest as (s, kernel before, kernel after)). Many short
    gaps: the host launches kernels slower than they run; a few long ones: the host waited."""
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    gaps, end, before = [], None, None
    for e in kernels:
        if end is not None and e.time_range.start > end:
            gaps.append(((e.time_range.start - end) / 1e6, before, e.name))
        if end is None or e.time_range.end > end:
            end, before = e.time_range.end, e.name
    short = sum(s for s, _, _ in gaps if s < 20e-6)
    return sum(s for s, _, _ in gaps), len(gaps), short, sorted(gaps, reverse=True)[:n]


def build(args, device):
    from bench.suite import random_folder, training_model
    from nanogsm.weights import resolve
    folder = random_folder(args.shape, tokenizer=False) if args.shape else resolve(args.model)
    model = training_model(folder, device, args.lora, args.ckpt, args.compile, args.bf16_on)
    if args.attn_mask:
        plain = model.forward
        model.forward = lambda ids, **kw: plain(ids, pad_mask=torch.ones_like(ids), **kw)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    return model, opt


def main(args):
    from bench.suite import best_time
    from nanogsm.train import bf16_compute, sft_step
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.bf16_on = bf16_compute(args, device)
    model, opt = build(args, device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.bf16_on)
    gen = torch.Generator().manual_seed(0)
    batches = [(x, x.clone()) for x in (torch.randint(3, 32000, (args.batch, args.seq), generator=gen)
                                        for _ in range(args.accum))]  # every token labelled; host tensors
    step = lambda: sft_step(model, opt, batches, device, autocast, clip=1.0, pad_id=0)  # noqa: E731
    step()  # warm-up (and compilation); best_time runs one more
    wall = best_time(step, device, 3)
    tokens = args.accum * args.batch * args.seq
    n_params = sum(p.numel() for p in model.parameters())
    report = {"date": f"{datetime.date.today()}", "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "argv": sys.argv[1:], "step_s": wall, "tok_s": tokens / wall,
              "model_tflop_per_s": (4 if args.lora else 6) * n_params * tokens / wall / 1e12}

    syncs = []
    if device == "cuda":  # every synchronizing call of one step, with the Python line that made it
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        syncs = [f"{'/'.join(Path(w.filename).parts[-2:])}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
    report["syncs"] = dict(collections.Counter(syncs))

    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        t = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        profiled_wall = time.perf_counter() - t

    kinds = collections.defaultdict(lambda: [0.0, 0])  # kind -> [seconds, count]
    timed, runtime = [], collections.Counter()
    for e in prof.key_averages():
        if e.is_user_annotation:  # ranges such as "Optimizer.step#AdamW.step": they span kernels, not add to them
            continue
        seconds = own_seconds(e, device)
        if seconds is not None:
            timed.append((seconds, e))
            kinds[kind_of(e.key)][0] += seconds
            kinds[kind_of(e.key)][1] += e.count
        elif "Synchronize" in e.key or e.key == "cudaMemcpyAsync":  # CUDA runtime calls on the host
            runtime[e.key] += e.count
    busy = sum(s for s, _ in kinds.values())
    report["profiled_step_s"] = profiled_wall
    report["kinds"] = {k: {"s": s, "count": n} for k, (s, n) in sorted(kinds.items(), key=lambda kv: -kv[1][0])}
    report["cuda_runtime_calls"] = dict(runtime)
    report["top"] = [{"name": e.key[:120], "s": s, "count": e.count}
                     for s, e in sorted(timed, key=lambda se: -se[0])[:15]]
    if device == "cuda":
        idle, n_gaps, short, longest = idle_gaps(prof)
        report["idle_between_kernels"] = {"s": idle, "gaps": n_gaps, "s_in_gaps_under_20us": short,
                                          "longest": [{"s": s, "after": a[:80], "before": b[:80]} for s, a, b in longest]}

    out = Path(args.out or f"runs/profile-{datetime.datetime.now():%Y%m%d-%H%M%S}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    trace = out.with_suffix(".trace.json")
    if args.trace:
        prof.export_chrome_trace(str(trace))
        with open(trace, "rb") as src, gzip.open(f"{trace}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        trace.unlink()
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(out)

    what = f"{'LoRA' if args.lora else 'full'}{' + ckpt' if args.ckpt else ''}{' + compile' if args.compile else ''}"
    print(f"{report['device']} | {args.shape or args.model} | {what} | {args.accum} x {args.batch} x {args.seq} | "
          f"{'bf16 autocast' if args.bf16_on else 'fp32'}{' | masked attention' if args.attn_mask else ''}")
    print(f"step {1e3 * wall:.1f} ms, {tokens / wall:,.0f} tok/s, model {report['model_tflop_per_s']:.1f} TFLOP/s; "
          f"profiled step {1e3 * profiled_wall:.1f} ms")
    if device == "cuda":
        print(f"synchronizing calls in one step: {len(syncs)} {report['syncs']}; runtime calls {dict(runtime)}")
    print(f"| kind | ms per step | % of profiled step | {'kernels' if device == 'cuda' else 'ops'} |\n|---|---|---|---|")
    for kind, v in report["kinds"].items():
        print(f"| {kind} | {1e3 * v['s']:.1f} | {100 * v['s'] / profiled_wall:.1f}% | {v['count']} |")
    rest = "device idle" if device == "cuda" else "outside ops (Python, framework)"
    print(f"| {rest} | {1e3 * (profiled_wall - busy):.1f} | {100 * (profiled_wall - busy) / profiled_wall:.1f}% | |")
    if device == "cuda":
        gaps = report["idle_between_kernels"]
        print(f"idle between the first and last kernel: {1e3 * gaps['s']:.1f} ms in {gaps['gaps']} gaps "
              f"({1e3 * gaps['s_in_gaps_under_20us']:.1f} ms in gaps under 20 us); longest:")
        for g in gaps["longest"]:
            print(f"  {1e3 * g['s']:.2f} ms after {g['after'][:50]} before {g['before'][:50]}")
    print("top:", "; ".join(f"{t['name'][:60]} {1e3 * t['s']:.1f} ms x{t['count']}" for t in report["top"][:8]))
    print(f"wrote {out}" + (f" and {trace}.gz" if args.trace else ""))


if __name__ == "__main__":
    main(parser.parse_args())
