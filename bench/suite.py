"""The benchmark suite: one entry point, a markdown table, a JSON file. nanogsm vs HF transformers
on the same weights, inputs, dtype and threads, in the same run; ratio = nanogsm / HF speed.

    python -m bench.suite                                   # Gemma 3 270M (offline) on this device
    python -m bench.suite --only decode --batches 1 16      # one workload
    python -m bench.suite --shape gemma-2b --train-seq 512  # GPU: random weights in gemma-2b's shape

Workloads (every measurement runs in a fresh process, so a peak memory is that measurement's own):
  train    forward + backward + AdamW, tokens/s, peak memory, MFU; full and LoRA (r=16 on all seven
           projections), each with and without gradient checkpointing. MFU = model FLOPs / time /
           peak FLOP/s with model FLOPs = 6 x params x tokens (full) or 4 x params x tokens (LoRA:
           no weight gradients for the frozen base); checkpointing's recompute is not counted.
           Peak: the data-sheet dense bf16 figure on a known GPU, else the best measured matmul.
           --train-accum N: N micro-batches per optimizer step (AdamW's cost spread over N).
           LoRA under bf16 keeps its frozen base in bf16, as train_lora.py does.
           HF has no LoRA without `peft` (not a dependency): LoRA rows are nanogsm only, and so are
           +compile rows (compare them with the eager row above them).
           --train-data gsm8k: instead of random tokens all labelled, the GSM8K train micro-batch that
           train_sft.py would build (prompt and padding labelled -100) whose padded length is the
           median of one epoch's; HF gets the same ids, labels and its attention mask, as a Trainer
           would. Tokens/s counts the padded batch on both sides.
  prefill  one forward over --prompt-len random tokens at each --batches size (last-position logits
           on both sides), tokens/s. With decode it is measured in the decode process.
  decode   greedy continuation by --new-tokens tokens (no early stop) after that prefill; with
           --decode-temperature T, sampled at T from the full softmax (seeded) on both sides:
           decode tokens/s = batch x new tokens / (generate time - prefill time). At batch 1 also
           the fraction of the memory-bandwidth bound: per step the weights and the mean KV cache
           are read once; bound = those bytes / measured copy bandwidth (2 x bytes / copy time);
           against the decode time above, and "per step" against the slope between generate calls
           of --new-tokens / 4 and --new-tokens tokens (without a call's one-off costs: its
           prefill, recording the CUDA graph, setting up).
           On CUDA nanogsm replays recorded decode steps (CUDA graphs); its eager steps are timed
           in the same process for comparison. --decode-pad K left-pads the first row by K tokens
           (the prefill is still timed unpadded): real batches are padded, and on CPU HF's bf16
           decode takes a much slower attention path when no row is.
  eval     (only when asked) evaluate.py's generation: the --eval-n seeded GSM8K test prompts
           (--eval-prompt strategy), greedy, up to --eval-new-tokens each, stopping as evaluate.py
           stops (EOS / end of turn or '\nQuestion:'). nanogsm: one `generate` call decoding 16 rows
           at a time, a finished row taking the next prompt (continuous batching); HF: `generate`
           on batches of 16 (longest first), with the same stop rules. Tokens/s = generated tokens / time of the whole run (prefill
           included), with each side's exact-match score and the share of identical outputs.
  ppo      one `train_ppo.py` step at reduced scale (--ppo-rollouts, 64 new tokens, minibatch 2 x
           accumulation rollouts/2, 2 epochs): seconds and the share spent generating (nanogsm only).
With --hf-compile B.., HF decode also runs with a static cache and torch.compile at those batch
sizes (slow to build). A prefill row measured in a decode process shows that process's peak memory.
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from nanogsm.report import HelpFormatter

WORKLOADS = ["train", "prefill", "decode", "ppo"]
GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, data sheets (SXM)

parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
parser.add_argument("--model", default="gemma-3-270m", help="model name or checkpoint folder")
parser.add_argument("--shape", choices=["gemma-2b"], help="random weights in this shape instead of --model")
parser.add_argument("--only", nargs="+", choices=WORKLOADS + ["eval"], default=WORKLOADS, help="workloads to run")
parser.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64, 256], help="prefill/decode batch sizes")
parser.add_argument("--prompt-len", type=int, default=128, help="prefill/decode prompt tokens")
parser.add_argument("--new-tokens", type=int, default=256, help="decode tokens per row")
parser.add_argument("--decode-pad", type=int, default=0,
                    help="decode: the first row's prompt this many tokens shorter (left padding, as real batches)")
parser.add_argument("--decode-temperature", type=float, default=0.0,
                    help="decode: sample at this temperature (full softmax, seeded) instead of greedy")
parser.add_argument("--train-batch", type=int, default=8, help="sequences per training step")
parser.add_argument("--train-seq", type=int, default=192, help="tokens per training sequence")
parser.add_argument("--train-variants", nargs="+", default=["full", "full+ckpt", "lora", "lora+ckpt"],
                    choices=["full", "full+ckpt", "lora", "lora+ckpt", "full+compile", "full+ckpt+compile",
                             "lora+compile", "lora+ckpt+compile"],
                    help="training rows to run (+compile: nanogsm's blocks through torch.compile, as --compile)")
parser.add_argument("--train-accum", type=int, default=1,
                    help="micro-batches per optimizer step (the study: 2); tokens/s counts every micro-batch")
parser.add_argument("--train-data", choices=["random", "gsm8k"], default="random",
                    help="training batch: random tokens all labelled, or a real GSM8K SFT micro-batch (see above)")
parser.add_argument("--eval-n", type=int, default=32, help="eval: seeded GSM8K test problems")
parser.add_argument("--eval-prompt", default="one-shot-instruct", help="eval: prompt strategy (as evaluate.py)")
parser.add_argument("--eval-new-tokens", type=int, default=256, help="eval: generation budget per answer")
parser.add_argument("--steps", type=int, default=3, help="timed repeats after one warm-up (best is reported)")
parser.add_argument("--ppo-rollouts", type=int, default=16, help="rollouts of the reduced PPO step (even)")
parser.add_argument("--dtype", help="bfloat16 (autocast in training, bf16 weights in inference) or float32; "
                                    "default bfloat16 on CUDA, float32 on CPU")
parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
parser.add_argument("--hf-compile", nargs="+", type=int, default=[], metavar="BATCH",
                    help="at these batch sizes also HF decode with static cache + torch.compile")
parser.add_argument("--compile-decode", action="store_true",
                    help="nanogsm prefill/decode with its blocks through torch.compile (as --compile)")
parser.add_argument("--plain", action="store_true",
                    help="nanogsm without its speed layers (the scripts' --plain: no nanogsm/cpu.py, no CUDA graphs)")
parser.add_argument("--out", help="JSON file (default runs/bench-<time>.json)")
parser.add_argument("--child", help=argparse.SUPPRESS)  # one measurement, as JSON; prints a JSON result


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def best_time(fn, device, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return min(times)


def measure(job):
    """Runs in the child process: one workload on one side; returns a dict of numbers."""
    from nanogsm.model import Gemma
    from nanogsm.train import peak_memory_gb
    torch.set_num_threads(job["threads"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = job["dtype"] == "bfloat16"
    folder, side, work = Path(job["folder"]), job["side"], job["work"]
    gen = torch.Generator().manual_seed(0)
    if work == "train":
        from nanogsm.train import n_target_tokens, token_loss_sum
        if job["data"] == "gsm8k":
            x_host, labels, pad_mask = gsm8k_sft_batch(folder, job["batch"])
        else:
            x_host = torch.randint(0, 32000, (job["batch"], job["seq"]), generator=gen)
            labels, pad_mask = x_host, None
        x = x_host.to(device)
        if side == "nanogsm":
            model = training_model(folder, device, job["lora"], job["ckpt"], job["compile"], bf16, job["plain"])
            # labels on the host, as the training loop keeps them: no host-device sync in the step
            loss_fn = lambda: token_loss_sum(model, x, labels, compiled=job["compile"]) / n_target_tokens(labels)  # noqa: E731
        else:
            import transformers
            model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).train()
            if job["ckpt"]:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            hf_labels, hf_mask = labels.to(device), None if pad_mask is None else pad_mask.long().to(device)
            loss_fn = lambda: model(input_ids=x, attention_mask=hf_mask, labels=hf_labels).loss  # noqa: E731
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
        autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=bf16)

        def step():  # --train-accum micro-batches (the same one again), then one optimizer step
            for _ in range(job["accum"]):
                with autocast:
                    loss = loss_fn()
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        t = best_time(step, device, job["steps"]) / job["accum"]  # per micro-batch
        n_params = sum(p.numel() for p in model.parameters())
        flops = (4 if job["lora"] else 6) * n_params * x.numel()
        return {"tok_s": x.numel() / t, "peak_gb": peak_memory_gb(device), "flops_per_s": flops / t,
                "shape": list(x.shape), "labelled": n_target_tokens(labels) / x.numel()}
    dtype = torch.bfloat16 if bf16 else torch.float32
    if work == "eval":
        return gsm8k_generation(job, folder, side, device, dtype)
    B, P, N = job["batch"], job["prompt_len"], job["new_tokens"]
    prompts = torch.randint(0, 32000, (B, P), generator=gen)
    rows = prompts.tolist()
    rows[0] = rows[0][job["pad"]:]  # --decode-pad: the first row's prompt shorter, left-padded
    mask = torch.ones_like(prompts)
    mask[0, :job["pad"]] = 0
    with torch.inference_mode():
        if side == "nanogsm":
            from nanogsm.generate import generate
            model = speed_layers(Gemma.from_pretrained(folder, dtype=dtype, device=device), device, job)
            x = prompts.to(device)
            t_prefill = best_time(lambda: model(x, last_only=True), device, job["steps"])
            run = lambda n=N: generate(model, rows, n, temperature=job["temperature"], seed=0, stop_ids=(),  # noqa: E731
                                       cuda_graph=not job["plain"])
        else:
            import transformers
            model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
            x = prompts.to(device)
            t_prefill = best_time(lambda: model(x, logits_to_keep=1), device, job["steps"])
            kwargs = {"do_sample": False}
            if job["temperature"] > 0:  # the full softmax, as nanogsm samples it (no top-k / top-p)
                kwargs = {"do_sample": True, "temperature": job["temperature"], "top_k": 0, "top_p": 1.0}
            if job.get("compile"):  # on CUDA, generate compiles its own decode step for a static cache
                if device == "cpu":   # ("reduce-overhead" mode, CUDA graphs); on CPU it is compiled here
                    model.forward = torch.compile(model.forward)
                kwargs["cache_implementation"] = "static"
            x_gen = (prompts * mask).to(device)  # padding id 0
            run = lambda n=N: model.generate(input_ids=x_gen, attention_mask=mask.to(device), max_new_tokens=n,  # noqa: E731
                                             min_new_tokens=n, eos_token_id=None, pad_token_id=0, **kwargs)
        if work == "prefill":
            return {"tok_s": B * P / t_prefill, "peak_gb": peak_memory_gb(device)}
        t_gen = best_time(run, device, 1)  # one warm-up run, one timed
        result = {"tok_s": B * N / (t_gen - t_prefill), "peak_gb": peak_memory_gb(device),
                  "prefill_tok_s": B * P / t_prefill}
        if side == "nanogsm" and device == "cuda":
            t_eager = best_time(lambda: generate(model, rows, N, temperature=job["temperature"], seed=0, stop_ids=(),
                                                 cuda_graph=False), device, 1)
            result["eager_tok_s"] = B * N / (t_eager - t_prefill)
        if B == 1:
            n_params = sum(p.numel() for p in model.parameters())
            bound = bandwidth_bound(n_params, folder, dtype, P, N, device)
            result["bandwidth_frac"] = bound / ((t_gen - t_prefill) / N)
            # per decode step: the slope between calls of N / 4 and N new tokens, without what a call
            # costs once (its prefill, recording a CUDA graph, setting up the cache)
            t_short = best_time(lambda: run(N // 4), device, 1)
            result["bandwidth_frac_step"] = bound / (max(t_gen - t_short, 1e-9) / (N - N // 4))
        return result


def speed_layers(model, device, job):
    """nanogsm's speed layers as the scripts apply them: the CPU layer unless --plain, --compile."""
    from nanogsm import cpu
    from nanogsm.compile import compile_blocks
    if device == "cpu" and not job["plain"]:
        cpu.speed_up(model)
    return compile_blocks(model) if job["compile"] else model


def training_model(folder, device, lora, ckpt, compile_, bf16, plain=False):
    """nanogsm set up as train_sft.py / train_lora.py set it up (also used by bench/profile_step.py)."""
    from nanogsm.lora import apply_lora, store_base_in
    from nanogsm.model import Gemma
    model = Gemma.from_pretrained(folder, device=device).train()
    model.grad_checkpointing = ckpt
    if lora:
        apply_lora(model)
        if bf16:  # as train_lora.py: the frozen base in the dtype autocast would cast it to
            store_base_in(model, torch.bfloat16)
    return speed_layers(model, device, {"plain": plain, "compile": compile_})


def gsm8k_sft_batch(folder, batch):
    """The train_sft.py micro-batch of `batch` GSM8K train examples (seed 0, first epoch) whose
    padded length is the median: input ids, labels (prompt and padding -100), pad mask; on the host."""
    from nanogsm.gsm8k import load_gsm8k
    from nanogsm.tokenizer import Tokenizer
    from nanogsm.train import collate, length_grouped_batches, sft_example
    tok = Tokenizer.from_pretrained(folder)
    examples = [sft_example(tok, r["question"], r["answer"], 512)[:2] for r in load_gsm8k("main", "train")]
    lengths = [len(ids) for ids, _ in examples]
    batches = [b for b in length_grouped_batches(lengths, batch, seed=0, epoch=0) if len(b) == batch]
    median = sorted(batches, key=lambda b: max(lengths[i] for i in b))[len(batches) // 2]
    input_ids, labels = collate([examples[i] for i in median], tok.pad_id)
    return input_ids, labels, input_ids != tok.pad_id


def gsm8k_generation(job, folder, side, device, dtype):
    """evaluate.py's generation workload on one side; returns speed, exact match and the outputs."""
    from nanogsm.gsm8k import STOP_STRINGS, build_prompt, finish, is_correct, load_gsm8k, seeded_subset
    from nanogsm.model import Gemma
    from nanogsm.tokenizer import Tokenizer
    from nanogsm.train import peak_memory_gb
    tok = Tokenizer.from_pretrained(folder)
    records = seeded_subset(load_gsm8k("main", "test"), job["n"])
    prompts = [tok.encode(build_prompt(r["question"], job["prompt"])) for r in records]
    if side == "nanogsm":  # as evaluate.py runs it: one call, job["batch"] rows at a time, refilled as they finish
        from nanogsm.generate import generate
        model = speed_layers(Gemma.from_pretrained(folder, dtype=dtype, device=device), device, job)

        def run(rows, n_new):
            return generate(model, rows, n_new, stop_ids=tok.stop_ids, stop_strings=STOP_STRINGS, tokenizer=tok,
                            batch_size=job["batch"], cuda_graph=not job["plain"])
    else:  # HF generate runs batches of job["batch"] prompts (longest first), each until its last row stops
        import transformers
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
        hf_tok = transformers.AutoTokenizer.from_pretrained(folder)

        def run(rows, n_new):  # left-padded, as generate() pads; finished rows are filled with padding
            P = max(len(p) for p in rows)
            x = torch.tensor([[tok.pad_id] * (P - len(p)) + p for p in rows], device=device)
            y = model.generate(input_ids=x, attention_mask=(x != tok.pad_id).long(), max_new_tokens=n_new,
                               do_sample=False, stop_strings=list(STOP_STRINGS), tokenizer=hf_tok,
                               eos_token_id=tok.stop_ids, pad_token_id=tok.pad_id)
            return [[t for t in row if t != tok.pad_id] for row in y[:, P:].tolist()]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    size = len(order) if side == "nanogsm" else job["batch"]  # prompts per call
    batches = [order[i:i + size] for i in range(0, len(order), size)]
    with torch.inference_mode():
        run([prompts[i] for i in order[:job["batch"]]], 8)  # warm-up (and compile)
        sync(device)
        start = time.perf_counter()
        outputs = {i: out for b in batches for i, out in zip(b, run([prompts[i] for i in b], job["new_tokens"]))}
        sync(device)
        seconds = time.perf_counter() - start
    outputs = [outputs[i] for i in range(len(records))]
    correct = sum(is_correct(finish(out, tok, job["new_tokens"])[0], r["answer"]) for out, r in zip(outputs, records))
    tokens = sum(len(out) for out in outputs)
    return {"tok_s": tokens / seconds, "seconds": seconds, "tokens": tokens, "em": correct / len(records),
            "peak_gb": peak_memory_gb(device), "outputs": outputs}


def bandwidth_bound(n_params, folder, dtype, P, N, device):
    """Seconds per decode step if it only read the weights and the mean KV cache at the measured
    copy bandwidth of this device."""
    from nanogsm.model import GemmaConfig
    cfg, size = GemmaConfig.from_json(Path(folder) / "config.json"), torch.finfo(dtype).bits // 8
    context = P + N / 2
    windows = [cfg.sliding_window if kind == "sliding_attention" else None for kind in cfg.layer_types]
    kv_bytes = sum(2 * cfg.num_kv_heads * cfg.head_dim * size * min(context, w or context) for w in windows)
    src = torch.empty(2**28, dtype=torch.uint8, device=device)  # 256 MiB
    dst = torch.empty_like(src)
    t = best_time(lambda: dst.copy_(src), device, 5)
    bandwidth = 2 * src.numel() / t  # bytes read + written per second
    return (n_params * size + kv_bytes) / bandwidth


def ppo_step(folder, args):
    """One reduced train_ppo.py step; its own log gives the generation and training seconds."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "train_ppo.py", "--init", str(folder), "--out", out, "--overwrite", "--steps", "1",
               "--rollouts", str(args.ppo_rollouts), "--ppo-batch", str(args.ppo_rollouts), "--minibatch", "2",
               "--grad-accum", str(args.ppo_rollouts // 2), "--max-new-tokens", "64", "--save-every", "0"]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        t = time.perf_counter()
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).parents[1],
                                check=False)
        if result.returncode != 0:
            raise SystemExit(f"error: the PPO step failed:\n{result.stderr[-3000:]}")
        total = time.perf_counter() - t
        row = json.loads((Path(out) / "log.jsonl").read_text().splitlines()[0])
    step = row["time/generate_s"] + row["time/train_s"]
    return {"step_s": step, "generate_share": row["time/generate_s"] / step, "process_s": total,
            "peak_gb": row["peak_mem_gb"]}


def run_child(job):
    result = subprocess.run([sys.executable, "-m", "bench.suite", "--child", json.dumps(job)], capture_output=True,
                            text=True, cwd=Path(__file__).parents[1], check=False)
    if result.returncode != 0:
        raise SystemExit(f"error: {job['work']} on {job['side']} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def random_folder(shape, tokenizer):
    """A checkpoint folder with random weights in `shape` (and, if asked, the offline model's tokenizer)."""
    import shutil

    from nanogsm.model import SHAPES, Gemma, GemmaConfig, ours_to_hf
    from nanogsm.weights import resolve, save_folder
    folder = Path(tempfile.gettempdir()) / f"nanogsm-random-{shape}"
    if not (folder / "model.safetensors").is_file():
        cfg = GemmaConfig.from_hf(SHAPES[shape])
        with torch.device("meta"):
            shapes = {ours_to_hf(cfg, k): v.shape for k, v in Gemma(cfg).state_dict().items()}
        state = {k: (torch.randn(s) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
        save_folder(folder, {"model.safetensors": state}, {"config.json": json.dumps(SHAPES[shape], indent=2)})
    if tokenizer and not (folder / "tokenizer.json").is_file():
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(resolve("gemma-3-270m") / name, folder / name)
    return folder


def peak_flops(device, dtype):
    """(peak FLOP/s for MFU, where it comes from, best measured square matmul FLOP/s). On a CPU the
    faster of PyTorch's default GEMM and oneDNN's (nanogsm/cpu.py: 2x MKL's fp32 GEMM on AMD CPUs)."""
    from nanogsm.cpu import mm_t
    n = 2048 if device == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    measured = 2 * n**3 / min(best_time(lambda: a @ a, device, 3), best_time(lambda: mm_t(a, a), device, 3))
    name = torch.cuda.get_device_name() if device == "cuda" else ""
    for key, flops in GPU_PEAK_BF16.items():
        if key in name:
            return flops, f"{name} data sheet, dense bf16; measured {n}^3 matmul {measured / 1e12:.0f}", measured
    return measured, f"best measured {n}x{n} {dtype} matmul", measured


def cpu_name():
    """The CPU's model name, family and model (/proc/cpuinfo), for the report: hosts of one machine
    kind differ (the dev machine's 2048^3 fp32 GEMM in oneDNN: 0.46 TFLOP/s one day, 0.21 another)."""
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().splitlines()[:30] if ":" in line)
    except OSError:
        return platform.processor() or "cpu"
    info = {k.strip(): v.strip() for k, v in info.items()}
    return f"{info.get('model name', 'cpu')} (family {info.get('cpu family', '?')}, model {info.get('model', '?')})"


def main(args):
    from nanogsm.weights import resolve
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    torch.set_num_threads(args.threads)
    folder = random_folder(args.shape, tokenizer={"ppo", "eval"} & set(args.only)) if args.shape else resolve(args.model)
    name = args.shape or args.model
    base = {"folder": str(folder), "dtype": dtype, "threads": args.threads, "steps": args.steps, "plain": args.plain}
    peak, peak_source, matmul = peak_flops(device, getattr(torch, dtype))
    rows, cpu = [], cpu_name()
    print(f"device {torch.cuda.get_device_name() if device == 'cuda' else cpu} | "
          f"threads {args.threads} | {name} | {dtype} | MFU peak {peak / 1e12:.2f} TFLOP/s ({peak_source})")
    print(HEADER, flush=True)
    if "train" in args.only:
        for variant in args.train_variants:
            lora, ckpt, compile_ = variant.startswith("lora"), "+ckpt" in variant, "+compile" in variant
            job = {**base, "work": "train", "lora": lora, "ckpt": ckpt, "compile": compile_, "batch": args.train_batch,
                   "seq": args.train_seq, "accum": args.train_accum, "data": args.train_data}
            ours = run_child({**job, "side": "nanogsm"})
            hf = None if lora or compile_ else run_child({**job, "side": "hf"})
            label = f"{'LoRA' if lora else 'full'}{' + ckpt' if ckpt else ''}{' + compile' if compile_ else ''}"
            accum = f"{args.train_accum}x" if args.train_accum > 1 else ""
            batch, seq = ours["shape"]
            data = f" GSM8K ({100 * ours['labelled']:.0f}% labelled)" if args.train_data == "gsm8k" else ""
            rows.append({"workload": "train", "variant": label, "batch": f"{accum}{batch}x{seq}{data}",
                         "nanogsm": ours, "hf": hf,
                         "mfu": ours["flops_per_s"] / peak})
            print_row(rows[-1])
    works = [w for w in ("decode", "prefill") if w in args.only]
    for batch in args.batches if works else ():
        job = {**base, "work": works[0], "batch": batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
               "pad": args.decode_pad, "temperature": args.decode_temperature}
        ours = run_child({**job, "side": "nanogsm", "compile": args.compile_decode})
        hf = run_child({**job, "side": "hf"})
        compiled = ", compiled blocks" if args.compile_decode else ""
        if "prefill" in args.only:  # a decode process measured the prefill too
            rows.append({"workload": "prefill", "variant": compiled.removeprefix(", "), "batch": str(batch),
                         "nanogsm": {**ours, "tok_s": ours.get("prefill_tok_s", ours["tok_s"])},
                         "hf": {**hf, "tok_s": hf.get("prefill_tok_s", hf["tok_s"])}})
            print_row(rows[-1])
        if "decode" in args.only:
            padded = f", first row {args.decode_pad} padding" if args.decode_pad else ""
            mode = f"sampled at T={args.decode_temperature:g}" if args.decode_temperature > 0 else "greedy"
            rows.append({"workload": "decode", "variant": mode + compiled + padded, "batch": str(batch), "nanogsm": ours,
                         "hf": hf})
            print_row(rows[-1])
            if batch in args.hf_compile:
                hf = run_child({**job, "side": "hf", "compile": True})
                rows.append({**rows[-1], "variant": "vs HF static cache + compile", "hf": hf})
                print_row(rows[-1])
    if "eval" in args.only:
        job = {**base, "work": "eval", "n": args.eval_n, "prompt": args.eval_prompt, "batch": 16,
               "new_tokens": args.eval_new_tokens, "compile": args.compile_decode}
        ours, hf = run_child({**job, "side": "nanogsm"}), run_child({**job, "side": "hf"})
        same = sum(a == b for a, b in zip(ours.pop("outputs"), hf.pop("outputs"))) / args.eval_n
        rows.append({"workload": "eval", "variant": f"{args.eval_prompt}, {args.eval_n} problems, greedy"
                     f"{', compiled blocks' if args.compile_decode else ''}", "batch": "16", "nanogsm": ours,
                     "hf": hf, "same_outputs": same})
        print_row(rows[-1])
    if "ppo" in args.only:
        rows.append({"workload": "ppo", "variant": f"{args.ppo_rollouts} rollouts x 64 tokens, 2 epochs",
                     "batch": str(args.ppo_rollouts), "nanogsm": ppo_step(folder, args), "hf": None})
        print_row(rows[-1])
    out = Path(args.out or f"runs/bench-{datetime.datetime.now():%Y%m%d-%H%M%S}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"date": f"{datetime.date.today()}", "device": device, "cpu": cpu, "model": name, "dtype": dtype,
              "threads": args.threads, "peak_flops": peak, "peak_source": peak_source,
              "measured_matmul_flops": matmul, "argv": sys.argv[1:],
              "rows": rows}
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(out)
    print(f"wrote {out}")


HEADER = ("| workload | variant | batch | nanogsm | HF | ratio | nanogsm peak GB | HF peak GB | MFU / bandwidth |\n"
          "|---|---|---|---|---|---|---|---|---|")


def print_row(row):
    ours, hf = row["nanogsm"], row["hf"] or {}
    if "step_s" in ours:
        cells = [f"{ours['step_s']:.1f} s/step", "-", "-"]
    else:
        cells = [f"{ours['tok_s']:.1f} tok/s", f"{hf['tok_s']:.1f} tok/s" if hf else "-",
                 f"{ours['tok_s'] / hf['tok_s']:.2f}" if hf else "-"]
    cells += [f"{ours['peak_gb']:.2f}", f"{hf['peak_gb']:.2f}" if hf else "-"]
    if "mfu" in row:
        cells.append(f"MFU {100 * row['mfu']:.1f}%")
    elif "bandwidth_frac" in ours and row["workload"] == "decode":
        cells.append(f"{100 * ours['bandwidth_frac']:.0f}% of bound, {100 * ours['bandwidth_frac_step']:.0f}% per step "
                     f"(HF {100 * hf['bandwidth_frac']:.0f}%, {100 * hf['bandwidth_frac_step']:.0f}%)")
    elif "same_outputs" in row:
        cells.append(f"EM {100 * ours['em']:.1f}% (HF {100 * hf['em']:.1f}%), {100 * row['same_outputs']:.0f}% same outputs")
    elif "generate_share" in ours:
        cells.append(f"{100 * ours['generate_share']:.0f}% generating")
    else:
        cells.append("")
    if "eager_tok_s" in ours and row["workload"] == "decode":
        cells[-1] += f"; eager steps {ours['eager_tok_s']:.1f} tok/s"
    print(f"| {row['workload']} | {row['variant']} | {row['batch']} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(json.loads(args.child))))
    else:
        main(args)
