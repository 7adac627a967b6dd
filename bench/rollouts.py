"""PPO's rollouts two ways: in chunks (one `generate` call per --chunk prompts) and in one call with --gen-batch rows decoding at once, a finished row taking
the next prompt (continuous batching, train_ppo.py now). Zero-shot GSM8K train prompts, temperature
1, each rollout seeded as train_ppo.py seeds it.

    NANOGSM_DATA_DIR=../shared/gsm8k python -m bench.rollouts                    # Gemma 3 270M, CPU
    python -m bench.rollouts --model ckpt/sft-main --n 512 --chunk 32 --gen-batch 32 64 256   # a GPU
    python -m bench.rollouts --simulate 512 --max-new-tokens 256 --chunk 32 --gen-batch 32 64 256

It prints a table: seconds, decode steps, rows per step (the batch's mean fill), tokens and
tokens/s. `--simulate N` instead counts the decode steps both ways for N responses as long as
GSM8K's gold answers (N seeded train records; what an SFT model writes), without a model. A batch of a few rows is compute-bound on this CPU (a step costs about its rows), so
fuller steps gain little there; on a GPU a decode step of up to a few hundred rows costs about
the same as one of a few (bandwidth-bound), so the number of steps is what counts. On CUDA the
policy runs as train_ppo.py runs it: fp32 weights under bf16 autocast.
"""
import argparse
import datetime
import heapq
import json
import random
import sys
import time
from pathlib import Path

import torch
from nanogsm.report import HelpFormatter

parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
parser.add_argument("--model", default="gemma-3-270m", help="model name or checkpoint folder (an SFT one stops)")
parser.add_argument("--data-dir", help="folder of GSM8K jsonl files (default NANOGSM_DATA_DIR, else the Hub)")
parser.add_argument("--n", type=int, default=64, help="rollouts (the first n train questions)")
parser.add_argument("--max-new-tokens", type=int, default=128, help="response budget")
parser.add_argument("--chunk", type=int, default=16, help="prompts per generate call, the chunked way")
parser.add_argument("--gen-batch", type=int, nargs="+", default=[16, 32],
                    help="rows decoding at once in the one call (several: a variant each)")
parser.add_argument("--repeats", type=int, default=2, help="rounds of all variants, alternated")
parser.add_argument("--simulate", type=int, metavar="N", help="count steps for N gold-answer lengths instead")
parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
parser.add_argument("--out", help="JSON file (default runs/rollouts-<time>.json)")


class CountedSteps:
    """Counts `generate`'s sampled decode steps and their rows, by wrapping the module's `draws`
    (called once a step, with one key per row)."""

    def __init__(self, engine):
        self.steps = self.rows = 0
        draws = engine.draws

        def counted(keys, steps):
            self.steps, self.rows = self.steps + 1, self.rows + len(keys)
            return draws(keys, steps)
        engine.draws = counted


def decode_steps(lengths, chunk=None, rows=None):
    """The decode steps `generate` takes for responses of these lengths (tokens): in chunks of
    `chunk` prompts, a call each, as long as its longest response; or in one call of `rows` rows,
    where a finished row takes the next prompt at the next step."""
    if chunk:
        return sum(max(lengths[i:i + chunk]) for i in range(0, len(lengths), chunk))
    free = [0] * rows  # a heap: the step after which each row is free
    for n in lengths:
        heapq.heapreplace(free, free[0] + n)  # the first free row takes the next prompt
    return max(free)


def simulate(args):
    from nanogsm.gsm8k import load_gsm8k
    from nanogsm.tokenizer import Tokenizer
    from nanogsm.weights import resolve
    tok = Tokenizer.from_pretrained(resolve(args.model))
    records = random.Random(0).sample(load_gsm8k("main", "train", args.data_dir), args.simulate)
    lengths = [min(len(tok.encode(r["answer"], bos=False)) + 1, args.max_new_tokens) for r in records]  # + EOS
    print(f"{args.simulate} responses as long as seeded train gold answers (+ EOS, at most {args.max_new_tokens}): "
          f"mean {sum(lengths) / len(lengths):.0f} tokens\n| rollouts | decode steps |\n|---|---|")
    print(f"| chunks of {args.chunk}, a call each | {decode_steps(lengths, chunk=args.chunk)} |")
    for rows in args.gen_batch:
        print(f"| one call, {rows} rows | {decode_steps(lengths, rows=rows)} |")


def main(args):
    import nanogsm.generate as engine
    from nanogsm import cpu
    from nanogsm.gsm8k import build_prompt, load_gsm8k
    from nanogsm.model import Gemma
    from nanogsm.tokenizer import Tokenizer
    from nanogsm.weights import resolve
    if args.simulate:
        return simulate(args)
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    folder = resolve(args.model)
    model, tok = Gemma.from_pretrained(folder, device=device), Tokenizer.from_pretrained(folder)
    if device == "cpu":
        cpu.speed_up(model)  # as train_ppo.py runs it
    records = load_gsm8k("main", "train", args.data_dir)[:args.n]
    prompts = [tok.encode(build_prompt(r["question"], "zero-shot")) for r in records]
    seeds = [[0, 0, j] for j in range(len(prompts))]  # train_ppo.py's (--seed, step, rollout)
    counter = CountedSteps(engine)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")

    def rollouts(chunk, rows):
        kw = dict(temperature=1.0, stop_ids=tok.stop_ids)
        with autocast:
            if chunk:
                return [out for i in range(0, len(prompts), chunk) for out in
                        engine.generate(model, prompts[i:i + chunk], args.max_new_tokens, seed=seeds[i:i + chunk], **kw)]
            return engine.generate(model, prompts, args.max_new_tokens, seed=seeds, batch_size=rows, **kw)

    variants = [(f"chunks of {args.chunk}, a call each", args.chunk, None)]
    variants += [(f"one call, {rows} rows", None, rows) for rows in args.gen_batch]
    with autocast:
        engine.generate(model, prompts[:2], 4, temperature=1.0)  # warm-up
    results = {name: [] for name, _, _ in variants}
    for _ in range(args.repeats):
        for name, chunk, rows in variants:
            counter.steps = counter.rows = 0
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            outs = rollouts(chunk, rows)
            seconds = time.perf_counter() - t
            tokens = sum(len(o) for o in outs)
            results[name].append({"s": seconds, "steps": counter.steps, "rows_per_step": counter.rows / counter.steps,
                                  "tokens": tokens, "tok_s": tokens / seconds,
                                  "stopped": sum(len(o) < args.max_new_tokens for o in outs)})

    report = {"date": f"{datetime.date.today()}", "argv": sys.argv[1:], "threads": args.threads,
              "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "results": results}
    out = Path(args.out or f"runs/rollouts-{datetime.datetime.now():%Y%m%d-%H%M%S}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(out)
    print(f"{report['device']} | {args.model} | {args.n} rollouts, up to {args.max_new_tokens} tokens, temperature 1 "
          f"| {args.threads} threads")
    print("| rollouts | round | seconds | decode steps | rows per step | tokens (stopped early) | tok/s |\n"
          "|---|---|---|---|---|---|---|")
    for name, runs in results.items():
        for i, r in enumerate(runs):
            print(f"| {name} | {i + 1} | {r['s']:.1f} | {r['steps']} | {r['rows_per_step']:.1f} | "
                  f"{r['tokens']} ({r['stopped']}) | {r['tok_s']:.1f} |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main(parser.parse_args())
