"""The whole ladder on one machine, then one table: full-epoch SFT, full-test eval, RL, full-test eval.

    python -m bench.ladder --out runs/ladder                     # a GPU: the 270M at the study's scale, sized for ~8 min
    python -m bench.ladder --out /tmp/ladder --tiny              # any machine: every stage at a toy scale (minutes on a CPU)

Stages (each a script of this project, run as a user would, its output in --out):
  1. train_sft.py: the study's full SFT (lr 1e-5 cosine to 1e-6, 8 x 2, 1 epoch) of --model on all
     7,473 GSM8K main train examples.
  2. evaluate.py: greedy zero-shot EM on the full 1,319-problem test set (strict, 95% CI, format),
     without and with --calculator (exact arithmetic alone lifts a small SFT model: RESULTS.md).
  3. train_ppo.py: GRPO from the SFT model with the study's 512 rollouts per step (32 prompts x 16
     samples) and RESULTS.md's "ours" recipe: rollouts at temperature 0.7 with the calculator, one
     on-policy update per step with mean-centred group rewards, a constant loss normaliser, groups
     of equal rewards skipped, no KL and no entropy bonus, for --rl-minutes.
  4. evaluate.py on the RL model both ways, then `evaluate.py --compare` (McNemar) against the SFT
     model read the same way: with the calculator on both sides is the fair bar for RL.
The table at the end gives each row's EM with its interval, format rate, seconds, and the command.
--tiny: 16 SFT examples, 8 test problems, 2 RL steps of 8 rollouts of 16 tokens: a check that every
stage runs and the table is printed, not a measurement. The GPU sizes are estimates from the H200
figures in docs/BENCHMARKS.md (a study-scale PPO step ~91 s); the ladder has not run on a GPU yet.
"""
import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

from nanogsm.report import HelpFormatter, read_jsonl, wilson_interval

parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
parser.add_argument("--model", default="gemma-3-270m", help="base model to fine-tune")
parser.add_argument("--out", required=True, help="folder for the checkpoints, evaluations and table.md")
parser.add_argument("--rl-minutes", type=float, default=3.0, help="RL time budget (stops after the step past it)")
parser.add_argument("--rl-lr", type=float, default=1e-6, help="RL learning rate (full fine-tuning)")
parser.add_argument("--tiny", action="store_true", help="every stage at a toy scale (a check, not a measurement)")
parser.add_argument("--data-dir", help="folder of GSM8K jsonl files (default NANOGSM_DATA_DIR)")


def run(cmd, log):
    """Run one stage's command, its output appended to log; returns its seconds. One line on failure."""
    print("$ " + shlex.join(cmd), flush=True)
    t0 = time.perf_counter()
    with open(log, "a") as f:
        done = subprocess.run([sys.executable, *cmd], stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"error: {shlex.join(cmd)} failed (exit {done.returncode}); its output is in {log}")
    return time.perf_counter() - t0


def main(args):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log, data = out / "ladder.log", ["--data-dir", args.data_dir] if args.data_dir else []
    sft = ["--max-examples", "16", "--batch-size", "4", "--grad-accum", "2"] if args.tiny else []
    test = ["--n", "8", "--max-new-tokens", "16"] if args.tiny else ["--full", "--batch-size", "256"]
    rl = (["--rollouts", "8", "--group-size", "4", "--ppo-batch", "8", "--minibatch", "4", "--grad-accum", "2",
           "--max-new-tokens", "16", "--steps", "2"] if args.tiny else
          ["--rollouts", "512", "--group-size", "16", "--ppo-batch", "512", "--gen-batch", "512", "--minibatch", "8",
           "--grad-accum", "64", "--steps", "1000", "--max-minutes", str(args.rl_minutes)])
    def evaluate(model, result, *calc):
        return ["evaluate.py", "--model", str(out / model), "--prompt", "zero-shot", *test, *calc,
                "--out", str(out / result), *data]

    stages = [
        ("SFT, 1 epoch", ["train_sft.py", "--data", "main", "--model", args.model, "--out", str(out / "sft"),
                          "--eval-n", "0", "--save-every", "0", "--overwrite", *sft, *data], None),
        ("SFT: eval", evaluate("sft", "sft.jsonl"), out / "sft.jsonl"),
        ("SFT + calculator: eval", evaluate("sft", "sft-calc.jsonl", "--calculator"), out / "sft-calc.jsonl"),
        ("GRPO from SFT", ["train_ppo.py", "--init", str(out / "sft"), "--out", str(out / "rl"), "--algo", "grpo",
                           "--on-policy", "--ppo-epochs", "1", "--adv-std", "off", "--loss-norm", "constant",
                           "--dynamic-sampling", "skip", "--kl-coef", "0", "--ent-coef", "0", "--temperature", "0.7",
                           "--calculator", "--lr", str(args.rl_lr), "--save-every", "0", "--overwrite", *rl, *data],
         None),
        ("GRPO: eval", evaluate("rl", "rl.jsonl"), out / "rl.jsonl"),
        ("GRPO + calculator: eval", evaluate("rl", "rl-calc.jsonl", "--calculator"), out / "rl-calc.jsonl"),
    ]
    rows = ["| stage | EM % (95% CI) | format % | seconds | command |", "|---|---|---|---|---|"]
    for name, cmd, result in stages:
        seconds = run(cmd, log)
        em = fmt = ""
        if result is not None:
            scored = [row for _, row in read_jsonl(result)]
            k, n = sum(r["correct"] for r in scored), len(scored)
            lo, hi = wilson_interval(k, n)
            em = f"{100 * k / n:.1f} ({100 * lo:.1f}-{100 * hi:.1f}) of {n}"
            fmt = f"{100 * sum(r['extracted'] is not None for r in scored) / n:.1f}"
        rows.append(f"| {name} | {em} | {fmt} | {seconds:.0f} | `python {shlex.join(cmd)}` |")
    steps = [row for _, row in read_jsonl(out / "rl" / "log.jsonl")]
    table = "\n".join(rows) + f"\n\nRL steps run: {len(steps)}\n"
    for a, b, name in [("sft", "rl", "SFT (A) vs GRPO (B)"),
                       ("sft-calc", "rl-calc", "SFT + calculator (A) vs GRPO + calculator (B), the fair bar")]:
        compare = subprocess.run([sys.executable, "evaluate.py", "--compare", str(out / f"{a}.jsonl"),
                                  str(out / f"{b}.jsonl")], capture_output=True, text=True)
        if compare.returncode:
            sys.exit(f"error: evaluate.py --compare failed (exit {compare.returncode}): {compare.stderr.strip()}")
        table += f"\n{name}:\n{compare.stdout}"
    (out / "table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main(parser.parse_args())
