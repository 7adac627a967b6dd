"""Evaluate a Gemma model on GSM8K with batched KV-cache generation.

    python evaluate.py --model gemma-3-270m --n 32                    # quick offline check
    python evaluate.py --model gemma-3-270m --prompt all              # the study's ICL grid, 256 subset
    python evaluate.py --model ckpt/sft-main --full --out runs/sft.jsonl
    python evaluate.py --model google/gemma-2b-it --samples 8 --temperature 0.7   # maj@8 and pass@8
    python evaluate.py --compare runs/base.jsonl runs/sft.jsonl       # paired error analysis
    python evaluate.py --compare runs/base.jsonl runs/sft.jsonl --by-steps   # ... per length of the gold solution
    python evaluate.py --model ckpt/sft-main --full --part 1/2 --out runs/sft.1.jsonl   # and 2/2 beside it
    python evaluate.py --summary runs/sft.1.jsonl runs/sft.2.jsonl    # EM with CI of the joined rows
    python evaluate.py --model ckpt/lora-270m --heldout --n 128       # train problems it did not see
    python evaluate.py --model ckpt/lora-270m --heldout --n 128 --answer-loss   # their gold answers' loss

Strict exact match (the number after '####' equals the gold number) is the score; the flexible
score (last number in the text) is printed next to it, never mixed in.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

from nanogsm import cpu
from nanogsm.compile import compile_blocks
from nanogsm.gsm8k import (STRATEGIES, SUBSET_SEED, SUBSET_SIZE, evaluate, heldout_subset, load_gsm8k,
                           seeded_subset, solution_steps, summarize)
from nanogsm.lora import load_model, read_adapter_config
from nanogsm.report import HelpFormatter, mcnemar_exact, read_jsonl, write_jsonl
from nanogsm.tokenizer import Tokenizer
from nanogsm.weights import resolve

parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
parser.add_argument("--model", help="model name, checkpoint or LoRA adapter folder (nanogsm's or PEFT's), .gguf file or Hub id")
parser.add_argument("--base-model", help="with an adapter --model: its base model instead of the one its config names")
parser.add_argument("--config", default="main", help="GSM8K config: main | socratic")
parser.add_argument("--prompt", default="one-shot-instruct", help=f"one of {', '.join(STRATEGIES)}, or all")
parser.add_argument("--n", type=int, default=SUBSET_SIZE, help=f"seeded test subset size (seed {SUBSET_SEED})")
parser.add_argument("--full", action="store_true", help="all 1,319 test problems instead of --n")
parser.add_argument("--part", default=None, metavar="K/N",
                    help="only problems K, K + N, K + 2N, ... (1-based) of the selection: one evaluation split "
                         "over N processes (--summary takes their --out files; cat them into one for --compare)")
parser.add_argument("--heldout", action="store_true",
                    help="score --n train problems outside the model's --max-examples training subset "
                         "(read from its args.json) instead of test: for choosing hyperparameters")
parser.add_argument("--answer-loss", action="store_true",
                    help="instead of generating: the teacher-forced loss of the gold answers (nats/token), "
                         "finer than EM for comparing checkpoints")
parser.add_argument("--data-dir", help="folder of GSM8K jsonl files (default NANOGSM_DATA_DIR, else the Hub)")
parser.add_argument("--batch-size", type=int, default=16,
                    help="prompts decoded at once, a finished one making room for the next (continuous "
                         "batching); also the --answer-loss batch")
parser.add_argument("--max-new-tokens", type=int, default=256, help="generation budget per answer")
parser.add_argument("--chat", default="auto", choices=["auto", "on", "off"],
                    help="wrap prompts in the chat template (auto: on when the model name contains '-it')")
parser.add_argument("--samples", type=int, default=1, help="k samples per problem: reports maj@k and pass@k")
parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (needs --samples 1)")
parser.add_argument("--seed", type=int, default=0, help="sampling seed")
parser.add_argument("--calculator", action="store_true", help="compute <<expr= annotations and force the result")
parser.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bf16 on CUDA, fp32 on CPU)")
parser.add_argument("--compile", action="store_true", help="torch.compile every transformer block: fused kernels in "
                                                           "prefill and decode steps (slow to start)")
parser.add_argument("--plain", action="store_true", help="the reference path only: no oneDNN layer on a CPU (nanogsm/cpu.py), no CUDA-graph decode steps")
parser.add_argument("--out", help="JSONL file, one row per problem (with --prompt all: one file per strategy)")
parser.add_argument("--compare", nargs=2, metavar=("A", "B"), help="paired comparison of two --out files")
parser.add_argument("--by-steps", action="store_true", help="with --compare: also A's and B's right answers by the "
                    "reasoning lines of each problem's reference answer (the --config test split's)")
parser.add_argument("--summary", nargs="+", metavar="FILE", help="EM (with CI), format and failures of --out files "
                                                                 "(the parts of one evaluation)")


def read_rows(path, fields):
    """The rows of an --out file, each checked for the fields the caller reads."""
    rows = []
    for where, row in read_jsonl(path):
        missing = [field for field in fields if not isinstance(row, dict) or field not in row]
        if missing:
            raise ValueError(f"{where}: no {', '.join(missing)} (expected a row of evaluate.py --out)")
        rows.append(row)
    return rows


def compare(path_a, path_b, test=None):
    """A vs B on their shared problems; with `test` (the split's records) also by reasoning lines."""
    rows_a, rows_b = (read_rows(path, ("id", "correct", "completion")) for path in (path_a, path_b))
    a = {r["id"]: r["correct"] for r in rows_a}
    b = {r["id"]: r["correct"] for r in rows_b}
    shared = sorted(a.keys() & b.keys())
    if not shared:
        raise ValueError(f"{path_a} and {path_b} share no problem ids")
    if test is not None:  # --by-steps reads each problem's reference answer: the rows must be of this split
        for path, rows in ((path_a, rows_a), (path_b, rows_b)):
            for row in rows:
                record = test[row["id"]] if row["id"] < len(test) else None
                if record is None or row.get("question", record["question"]) != record["question"]:
                    raise ValueError(f"{path}: problem {row['id']} is not that of the GSM8K test split "
                                     "(--config, --data-dir)")
    cells = {"both right": (True, True), "only A": (True, False), "only B": (False, True), "both wrong": (False, False)}
    groups = {name: [i for i in shared if (a[i], b[i]) == cell] for name, cell in cells.items()}
    print(f"A = {path_a}\nB = {path_b}\n{len(shared)} shared problems: "
          f"A {100 * sum(a[i] for i in shared) / len(shared):.1f}%, B {100 * sum(b[i] for i in shared) / len(shared):.1f}%")
    print("| outcome | problems | example ids |\n|---|---|---|")
    for name, ids in groups.items():
        print(f"| {name} | {len(ids)} | {', '.join(map(str, ids[:6]))} |")
    print(f"McNemar exact p = {mcnemar_exact(len(groups['only A']), len(groups['only B'])):.4f}")
    for side, rows in (("A", rows_a), ("B", rows_b)):  # what RL changes first: the length of the answers
        texts = [r["completion"] for r in rows if r["id"] in a and r["id"] in b]
        print(f"{side} answers: {sum(map(len, texts)) / len(texts):.0f} characters, "
              f"{sum(map(solution_steps, texts)) / len(texts):.2f} lines before '####' on average")
    if test is None:
        return
    steps = {i: solution_steps(test[i]["answer"]) for i in shared}
    print("| reasoning lines | problems | A right | B right | only A | only B |\n|---|---|---|---|---|---|")
    for n in sorted(set(steps.values())):
        ids = [i for i in shared if steps[i] == n]
        print(f"| {n} | {len(ids)} | {sum(a[i] for i in ids)} | {sum(b[i] for i in ids)} | "
              f"{sum(a[i] and not b[i] for i in ids)} | {sum(b[i] and not a[i] for i in ids)} |")


def read_parts(paths):
    """The rows of one evaluation's --out files (its --part files), each problem once."""
    fields = ("id", "correct", "flexible_correct", "extracted", "kind")  # what summarize reads
    rows = [row for path in paths for row in read_rows(path, fields)]
    if not rows:
        raise ValueError(f"{' '.join(map(str, paths))}: no rows")
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{' '.join(map(str, paths))}: a problem id appears twice (parts of different evaluations?)")
    return sorted(rows, key=lambda r: r["id"])


def parse_part(text):
    """'K/N' -> (K, N) with 1 <= K <= N."""
    k, _, n = (text or "").partition("/")
    if not (k.isdigit() and n.isdigit() and 1 <= int(k) <= int(n)):
        raise ValueError(f"--part {text!r}: expected K/N with 1 <= K <= N, e.g. 1/2")
    return int(k), int(n)


def heldout_records(folder, args):
    """--n train problems the run in `folder` did not train on (its args.json: max_examples, seed)."""
    path = Path(folder) / "args.json"
    run = json.loads(path.read_text()) if path.is_file() else {}
    if not run.get("max_examples"):
        raise ValueError(f"--heldout needs a run trained on a --max-examples subset; {path} "
                         "has no max_examples (a run on all of train has no held-out train problems)")
    config = run.get("data", args.config)
    train = load_gsm8k(config, "train", args.data_dir)
    records = heldout_subset(train, run["max_examples"], run["seed"], None if args.full else args.n)
    print(f"GSM8K {config}/train held out: {len(records)} problems outside the "
          f"run's {run['max_examples']} training examples (seed {run['seed']})")
    return records


@torch.no_grad()
def answer_loss(model, tok, records, batch_size, device):
    """Mean next-token loss of `Question: <q>\nAnswer: <gold answer><eos>` over the answer tokens:
    the SFT objective on these problems."""
    from nanogsm.train import collate, n_target_tokens, sft_example, token_loss_sum
    total, n_tokens = 0.0, 0
    for i in range(0, len(records), batch_size):
        examples = [sft_example(tok, r["question"], r["answer"], 1024)[:2] for r in records[i:i + batch_size]]
        input_ids, labels = collate(examples, tok.pad_id)
        total += token_loss_sum(model, input_ids.to(device), labels).item()
        n_tokens += n_target_tokens(labels)
    return total / n_tokens, n_tokens


def main(args):
    if args.by_steps and not args.compare:
        raise ValueError("--by-steps needs --compare A B")
    if args.compare:
        return compare(*args.compare, load_gsm8k(args.config, "test", args.data_dir) if args.by_steps else None)
    if args.summary:
        rows = read_parts(args.summary)
        return summarize(rows, " + ".join(args.summary), len(rows[0].get("completions", [None])))
    if not args.model:
        raise ValueError("--model is required (or --compare A B)")
    if args.prompt != "all" and args.prompt not in STRATEGIES:
        raise ValueError(f"--prompt {args.prompt!r}: expected one of {', '.join(STRATEGIES)}, or all")
    if args.n < 1 or args.batch_size < 1 or args.max_new_tokens < 1:
        raise ValueError("--n, --batch-size and --max-new-tokens must be at least 1")
    if args.samples < 1 or (args.samples > 1 and args.temperature == 0.0):
        raise ValueError("--samples k > 1 needs --temperature > 0 (greedy samples are all the same)")
    part = parse_part(args.part) if args.part else None  # (K, N): checked before any compute
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    print(f"device {device} | dtype {dtype} | threads {torch.get_num_threads()}")
    source = resolve(args.model)  # once: a Hub id is downloaded, a GGUF converted, only here
    if args.heldout:
        records = heldout_records(source, args)
    else:
        records = seeded_subset(load_gsm8k(args.config, "test", args.data_dir), None if args.full else args.n)
        print(f"GSM8K {args.config}/test: {len(records)} problems" +
              ("" if args.full else f" (seeded subset, seed {SUBSET_SEED})"))
    if part:
        k, n = part
        records = records[k - 1::n]
        print(f"part {k}/{n}: {len(records)} of them")
    tok_source = source
    if not (source / "tokenizer.json").is_file() and (source / "adapter_config.json").is_file():  # a PEFT adapter
        tok_source = resolve(args.base_model or read_adapter_config(source)["base"])  # its base's tokenizer
    tok = Tokenizer.from_pretrained(tok_source)
    model = load_model(source, dtype=dtype, device=device, base=args.base_model)
    if device == "cpu" and not args.plain:
        cpu.speed_up(model)  # oneDNN products, the same results faster (nanogsm/cpu.py)
    if args.compile:
        print("torch.compile: every transformer block (the first batches are slow while it compiles)")
        compile_blocks(model)
    if args.answer_loss:
        loss, n_tokens = answer_loss(model, tok, records, args.batch_size, device)
        print(f"answer loss {loss:.4f} nats/token over {n_tokens} gold-answer tokens of {len(records)} problems")
        return
    chat = args.chat == "on" or (args.chat == "auto" and "-it" in str(args.model))
    strategies = STRATEGIES if args.prompt == "all" else [args.prompt]
    summaries = []
    for strategy in strategies:
        rows = evaluate(model, tok, records, strategy, chat=chat, batch_size=args.batch_size,
                        max_new_tokens=args.max_new_tokens, samples=args.samples, temperature=args.temperature,
                        seed=args.seed, calculator=args.calculator, cuda_graph=not args.plain,
                        data_dir=args.data_dir)
        summaries.append(summarize(rows, strategy, args.samples))
        if args.out:
            out = Path(args.out)
            out = out.with_name(f"{out.stem}.{strategy}{out.suffix}") if len(strategies) > 1 else out
            write_jsonl(out, rows)
            print(f"  wrote {out}")
    if len(strategies) > 1:
        print("\n| prompt | strict EM % (95% CI) | flexible % | '####' format % |\n|---|---|---|---|")
        for s in summaries:
            print(f"| {s['strategy']} | {100 * s['em']:.1f} ({100 * s['ci'][0]:.1f}-{100 * s['ci'][1]:.1f}) | "
                  f"{100 * s['flexible']:.1f} | {100 * s['format']:.1f} |")


if __name__ == "__main__":
    try:
        main(parser.parse_args())
    except ValueError as e:  # user errors: one line, no traceback
        sys.exit(f"error: {e}")
