"""Peak RAM of Gemma.from_pretrained on a gemma-2b-shaped checkpoint (random bf16 weights, ~5 GB).

    python -m bench.load_memory [--dir /tmp/gemma-2b-random]

Writes the checkpoint once (HF names, gemma-2b's config.json), then loads it in a fresh process
and prints that process's peak resident memory next to the size of the weights. Loading goes
through the meta device, so no random init is materialised before the weights arrive.
"""
import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from nanogsm.model import SHAPES
from nanogsm.report import HelpFormatter

GEMMA_2B = SHAPES["gemma-2b"]


parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
parser.add_argument("--dir", default="/tmp/gemma-2b-random", help="where the random checkpoint is written")
parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # the measured load
args = parser.parse_args()
folder = Path(args.dir)

if args.child:
    from nanogsm.model import Gemma
    t = time.perf_counter()
    model = Gemma.from_pretrained(folder, dtype=torch.bfloat16)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    weights_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    print(f"| {sum(p.numel() for p in model.parameters()) / 1e9:.3f} B | {weights_gb:.2f} GiB | {peak_gb:.2f} GiB | "
          f"{time.perf_counter() - t:.1f} s |")
    sys.exit()

if not (folder / "model.safetensors").is_file():
    from nanogsm.model import Gemma, GemmaConfig, ours_to_hf
    cfg = GemmaConfig.from_hf(GEMMA_2B)
    with torch.device("meta"):
        shapes = {ours_to_hf(cfg, k): v.shape for k, v in Gemma(cfg).state_dict().items()}
    state = {k: (torch.randn(s) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
    from nanogsm.weights import save_folder
    save_folder(folder, {"model.safetensors": state}, {"config.json": json.dumps(GEMMA_2B, indent=2)})
    del state
print("| params | bf16 weights | peak RSS of the loading process | load time |\n|---|---|---|---|")
subprocess.run([sys.executable, "-m", "bench.load_memory", "--child", "--dir", str(folder)], check=True)
