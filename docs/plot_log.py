"""Plot logged training curves (a run's log.jsonl) to a PNG for these docs.

    python docs/plot_log.py ckpt/ppo-270m/log.jsonl ckpt/grpo-270m/log.jsonl --out docs/rl-270m.png
    python docs/plot_log.py ckpt/sft-270m-main/log.jsonl --keys loss grad_norm --out docs/sft-270m.png
    python docs/plot_log.py a/log.jsonl b/log.jsonl --x minutes --out docs/ab.png   # runs at equal cost

One panel per key, one line per run (labelled by its folder), step on the x axis. Rows of a log
without a key (e.g. eval rows) are skipped for that key. Needs matplotlib (requirements-dev.txt:
plotting is for the docs only, nothing in nanogsm/ imports it).
"""
import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

RL_KEYS = ["rollout/reward_mean", "rollout/kl_ref", "loss/policy", "loss/value", "loss/entropy",
           "params/policy_clip_frac", "params/grad_norm", "rollout/response_len", "rollout/frac_same_reward"]

parser = argparse.ArgumentParser(description=__doc__, formatter_class=type(
    "HelpFormatter", (argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter), {}))  # as nanogsm.report's
parser.add_argument("logs", nargs="+", help="log.jsonl files (one line per run)")
parser.add_argument("--keys", nargs="+", default=RL_KEYS, help="logged fields to plot, one panel each")
parser.add_argument("--x", default="step", choices=["step", "minutes"],
                    help="x axis: the step, or the run's minutes so far (its logged time/generate_s, time/score_s, time/train_s)")
parser.add_argument("--out", required=True, help="PNG file to write")


def minutes(rows):
    """Per row, the minutes spent generating, scoring and training up to the end of its step."""
    total, out = 0.0, []
    for row in rows:
        total += sum(row.get(f"time/{part}_s", 0.0) for part in ("generate", "score", "train"))
        out.append(total / 60)
    return out


def main(args):
    runs = {}
    for path in map(Path, args.logs):
        if not path.is_file():
            raise SystemExit(f"error: {path} does not exist")
        runs[path.parent.name] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    keys = [k for k in args.keys if any(k in row for rows in runs.values() for row in rows)]
    if not keys:
        raise SystemExit(f"error: none of --keys {args.keys} is in {args.logs}")
    cols = min(3, len(keys))
    fig, axes = plt.subplots(math.ceil(len(keys) / cols), cols, figsize=(4 * cols, 3 * math.ceil(len(keys) / cols)),
                             squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for i, (name, rows) in enumerate(runs.items()):
            xs = minutes(rows) if args.x == "minutes" else [row.get("step") for row in rows]
            points = [(x, row[key]) for x, row in zip(xs, rows) if key in row]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=name, color=f"C{i}")  # one colour per run
        ax.set_title(key, fontsize=10)
        ax.set_xlabel(args.x)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    tmp = Path(args.out).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90)
    tmp.replace(args.out)
    print(f"wrote {args.out} ({len(keys)} panels, {len(runs)} runs)")


if __name__ == "__main__":
    main(parser.parse_args())
