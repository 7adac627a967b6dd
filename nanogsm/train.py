"""What the training scripts share: device choice, SFT examples and batching, the token loss, the
LR schedule, step logging, and checkpoints that resume exactly. Plain functions, no trainer class."""
import json
import math
import random
import resource
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

IGNORE = -100  # label of tokens that carry no loss (prompt, padding)


def pick_device():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device {device}" + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else
                                f" ({torch.get_num_threads()} threads)"))
    return device


def seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)


# ---- data ------------------------------------------------------------------------------------

def sft_example(tok, question, answer, max_len):
    """(input ids, labels) for `Question: <q>\\nAnswer:` + ` <answer>` + EOS; prompt tokens get label
    -100, so only the answer (and EOS) is learned. Returns also whether it was truncated."""
    prompt = tok.encode(f"Question: {question}\nAnswer:")
    target = tok.encode(" " + answer, bos=False) + [tok.eos_id]
    if len(prompt) >= max_len:
        raise ValueError(f"--max-seq-length {max_len} is shorter than a prompt ({len(prompt)} tokens)")
    ids = (prompt + target)[:max_len]
    labels = ([IGNORE] * len(prompt) + target)[:max_len]
    return ids, labels, len(prompt) + len(target) > max_len


def length_grouped_batches(lengths, batch_size, seed, epoch, group=64):
    """Shuffle, sort by length inside groups of `group` batches (so a batch pads little), then
    shuffle the batches. Deterministic in (seed, epoch): resuming reproduces the order."""
    rng = random.Random(seed * 1000 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = batch_size * group
    batches = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start:start + chunk], key=lambda i: lengths[i])
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(examples, pad_id):
    """Right-pad (ids, labels) pairs -> input_ids, labels (B, T); padding has label -100."""
    T = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for i, (ids, lab) in enumerate(examples):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, :len(lab)] = torch.tensor(lab)
    return input_ids, labels


def n_target_tokens(labels):
    """Tokens that carry loss: position t predicts labels[t + 1]."""
    return int((labels[:, 1:] != IGNORE).sum())


def token_loss_sum(model, input_ids, labels):
    """Sum (not mean) of next-token cross-entropy over labelled tokens, in fp32. Callers divide by
    the labelled-token count of the whole effective batch."""
    logits = model(input_ids)[:, :-1]  # (B, T-1, V): position t predicts token t+1
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE, reduction="sum")


# ---- schedule and logging --------------------------------------------------------------------

def lr_at(step, total_steps, warmup_steps, max_lr, min_lr):
    """Linear warmup to max_lr over warmup_steps, then cosine decay to min_lr at the last step."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - 1 - warmup_steps)
    return min_lr + 0.5 * (max_lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def peak_memory_gb(device):
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def log_step(out_dir, record, wandb=None):
    """One line with fixed fields to stdout, the same record appended to out_dir/log.jsonl."""
    print(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()), flush=True)
    with open(Path(out_dir) / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    if wandb is not None:
        wandb.log(record)


# ---- checkpoints -------------------------------------------------------------------------------

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def prepare_out_dir(out_dir, resume, overwrite):
    """Refuse to clobber a previous run unless asked; returns the Path."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not resume:
        if not overwrite:
            raise ValueError(f"--out {out_dir} exists; pass --resume to continue it or --overwrite to replace it")
        shutil.rmtree(out_dir)
    if resume and not (out_dir / "trainer_state.json").is_file():
        raise ValueError(f"--resume: {out_dir} has no trainer_state.json to resume from")
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def save_checkpoint(out_dir, model, source_folder, args, step, optimizer, metrics=None):
    """An HF-style folder: config.json, model.safetensors, the tokenizer files of the source
    checkpoint, args.json, metrics.json; plus optimizer.safetensors and trainer_state.json to
    resume. Written to a temp folder and renamed, so a crash never leaves half a checkpoint."""
    out_dir, source_folder = Path(out_dir), Path(source_folder)
    texts = {name: (source_folder / name).read_text() for name in TOKENIZER_FILES if (source_folder / name).is_file()}
    log = out_dir / "log.jsonl"
    if log.is_file():
        texts["log.jsonl"] = log.read_text()
    opt_tensors, opt_meta = flatten_optimizer(optimizer)
    texts["args.json"] = json.dumps(vars(args), indent=2, default=str)
    texts["metrics.json"] = json.dumps(metrics or {}, indent=2)
    texts["trainer_state.json"] = json.dumps({"step": step, "optimizer": opt_meta}, indent=2)
    rng = {"torch_rng": torch.get_rng_state()}
    model.save_pretrained(out_dir, text_files=texts, tensor_files={"optimizer.safetensors": {**opt_tensors, **rng}})


def flatten_optimizer(optimizer):
    """Optimizer state dict -> (flat tensors for safetensors, JSON-able rest). No pickles."""
    sd = optimizer.state_dict()
    tensors = {f"state.{i}.{k}": v for i, s in sd["state"].items() for k, v in s.items()}
    return tensors, {"param_groups": sd["param_groups"], "state_keys": {str(i): list(s) for i, s in sd["state"].items()}}


def load_trainer_state(out_dir, optimizer):
    """Restore optimizer and RNG state saved by save_checkpoint; returns the step to continue at."""
    out_dir = Path(out_dir)
    state = json.loads((out_dir / "trainer_state.json").read_text())
    tensors = load_file(out_dir / "optimizer.safetensors")
    meta = state["optimizer"]
    opt_state = {int(i): {k: tensors[f"state.{i}.{k}"] for k in keys} for i, keys in meta["state_keys"].items()}
    optimizer.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["torch_rng"])
    return state["step"]
