"""What the training scripts share: device choice, SFT examples and batching, the token loss, the
LR schedule, step logging, and checkpoints that resume exactly. Plain functions, no trainer class."""
import atexit
import functools
import json
import math
import os
import random
import resource
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor, distribute_tensor

from nanogsm import weights
from nanogsm.gsm8k import evaluate, load_gsm8k, seeded_subset

IGNORE = -100  # label of tokens that carry no loss (prompt, padding)


def pick_device():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device {device}" + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else
                                f" ({torch.get_num_threads()} threads)"))
    return device


# ---- several processes (torchrun) ---------------------------------------------------------------

def setup_distributed():
    """Under `torchrun` (WORLD_SIZE > 1): join the process group (NCCL on GPUs, gloo on CPU) and
    return (rank, world). Ranks other than 0 print nothing. Plain `python` is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    atexit.register(dist.destroy_process_group)
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (for the life of the process)
    return dist.get_rank(), world


def rank_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def shard_model(model, device):
    """FSDP2 (PyTorch's `fully_shard`): each block, then the rest (embedding = tied head, final
    norm), is sharded over the ranks, so parameters, gradients and AdamW state take 1/world of
    their size on each. A block's full weights exist only while it computes. On CUDA the shards
    are gathered in bf16 and gradients reduced in fp32; the fp32 master weights stay sharded."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device == "cuda"
          else MixedPrecisionPolicy())
    for block in model.layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)


def full(tensor):
    """A sharded tensor (DTensor) gathered whole (a collective: every rank calls it); others as is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def sft_arguments(parser):
    """The flags train_sft.py and train_lora.py share (the study's SFT defaults)."""
    add = parser.add_argument
    add("--data", default="main", help="GSM8K config to train on: main | socratic")
    add("--model", default="google/gemma-2b-it",
        help="model to start from (name, folder, Hub id; an adapter folder: its base with the adapter merged in)")
    add("--out", help="checkpoint folder (default ckpt/<method>-<data>)")
    add("--data-dir", help="folder of GSM8K jsonl files (default NANOGSM_DATA_DIR, else the Hub)")
    add("--max-examples", type=int, help="train on a seeded subset of N examples only (CPU runs)")
    add("--epochs", type=int, default=1, help="passes over the training set")
    add("--batch-size", type=int, default=8, help="micro-batch size (sequences per forward)")
    add("--grad-accum", type=int, default=2, help="micro-batches per optimizer step")
    add("--max-seq-length", type=int, default=512, help="longer examples are truncated (counted)")
    add("--lr", type=float, default=1e-5, help="peak learning rate")
    add("--min-lr", type=float, default=1e-6, help="learning rate at the end of the cosine")
    add("--warmup-frac", type=float, default=0.03, help="fraction of steps of linear warmup")
    add("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    add("--clip", type=float, default=1.0, help="gradient-norm clipping")
    add("--bf16", default="auto", choices=["auto", "on", "off"],
        help="bf16 autocast with fp32 master weights: auto = on CUDA only (the study); on = on CPU too (faster "
             "where the CPU has bf16 matmuls)")
    add("--grad-checkpointing", action="store_true", help="recompute activations in backward (non-reentrant)")
    add("--compile", action="store_true", help="torch.compile every transformer block (same results; the "
                                               "first steps are slow while it compiles)")
    add("--plain", action="store_true", help="the reference path only: no oneDNN layer on a CPU (nanogsm/cpu.py), no CUDA-graph decode steps")
    add("--seed", type=int, default=0, help="data order and init seed")
    add("--eval-every", type=int, default=0, help="every N steps: EM on --eval-n test problems")
    add("--eval-n", type=int, default=64, help="test problems (seeded subset) for --eval-every / the end; 0: none")
    add("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    add("--stop-after-steps", type=int, default=0, help="stop and save after N steps, as if interrupted")
    add("--resume", action="store_true", help="continue the run in --out")
    add("--overwrite", action="store_true", help="replace an existing --out")
    add("--wandb", action="store_true", help="also log to Weights & Biases (if installed)")
    return parser


def start_run(args, method):
    """Checks, out folder, device, autocast and seeds: everything before data. Returns
    (out folder, device, autocast context, wandb or None)."""
    if args.data not in ("main", "socratic"):
        raise ValueError(f"--data {args.data!r}: expected main or socratic")
    args.out = args.out or f"ckpt/{method}-{args.data}"
    out = prepare_out_dir(args.out, args.resume, args.overwrite)
    device = pick_device()
    bf16 = bf16_compute(args, device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=bf16)
    print(f"fp32 master weights; compute {'bf16 autocast' if bf16 else 'fp32'}")
    seed_everything(args.seed)
    wandb = None
    if args.wandb:
        try:
            import wandb
        except ImportError:
            raise ValueError("--wandb: the wandb package is not installed (pip install wandb)") from None
        wandb.init(project="nanogsm", name=str(out), config=vars(args))
    return out, device, autocast, wandb


def bf16_compute(args, device):
    """--bf16: on, off, or auto (on CUDA only)."""
    return args.bf16 == "on" or (args.bf16 == "auto" and device == "cuda")


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


def sft_data(tok, args):
    """Tokenized examples and the micro-batches of the whole run, in order (index lists), plus
    the number of optimizer steps. Prints the truncation count and the padding fraction."""
    world = rank_world()[1]
    if args.grad_accum % world:
        raise ValueError(f"--grad-accum {args.grad_accum} must be a multiple of the {world} ranks: each rank takes "
                         "grad_accum / world of a step's micro-batches")
    records = load_gsm8k(args.data, "train", args.data_dir)
    if args.max_examples:
        records = seeded_subset(records, min(args.max_examples, len(records)), args.seed)
    examples = [sft_example(tok, r["question"], r["answer"], args.max_seq_length) for r in records]
    n_truncated = sum(t for _, _, t in examples)
    examples = [(ids, labels) for ids, labels, _ in examples]
    lengths = [len(ids) for ids, _ in examples]
    epoch_batches = [length_grouped_batches(lengths, args.batch_size, args.seed, e) for e in range(args.epochs)]
    steps_per_epoch = len(epoch_batches[0]) // args.grad_accum
    micro_batches = [b for batches in epoch_batches for b in batches[:steps_per_epoch * args.grad_accum]]
    total_steps = steps_per_epoch * args.epochs
    if total_steps == 0:
        raise ValueError(f"{len(examples)} examples make no step of {args.batch_size} x {args.grad_accum}")
    padded = sum(len(b) * max(lengths[i] for i in b) for b in micro_batches)
    real = sum(lengths[i] for b in micro_batches for i in b)
    print(f"{len(examples)} examples ({args.data}/train), {n_truncated} truncated at {args.max_seq_length} tokens; "
          f"{total_steps} steps of {args.batch_size} x {args.grad_accum}; padding {100 * (1 - real / padded):.1f}% "
          "of batch tokens")
    return examples, micro_batches, total_steps


def sft_step(model, optimizer, batches, device, autocast, clip, pad_id, compiled=False):
    """One optimizer step over micro-batches [(input_ids, labels)]; returns the logged numbers.

    The loss is normalised by the answer tokens of the whole effective batch, not per micro-batch:
    a mean of per-micro-batch means would weight tokens in short micro-batches more than those in
    long ones, and would change with the micro-batch split.
    """
    t0 = time.perf_counter()
    rank, world = rank_world()
    n_tokens = sum(n_target_tokens(labels) for _, labels in batches)  # of the whole step, all ranks
    mine = batches[rank::world]  # under torchrun each rank takes its share of the micro-batches
    loss_sum = torch.zeros((), device=device)
    for i, (input_ids, labels) in enumerate(mine):
        if world > 1:  # FSDP: reduce-scatter the gradients once, after the rank's last micro-batch
            model.set_requires_gradient_sync(i == len(mine) - 1)
        with autocast:
            loss = token_loss_sum(model, input_ids.to(device, non_blocking=True), labels, compiled=compiled) / n_tokens
        (loss * world).backward()  # FSDP averages gradients over ranks; this loss is already global
        loss_sum += loss.detach()  # no .item() here: one host-device sync per step, below
    if world > 1:
        dist.all_reduce(loss_sum)
    params = [p for p in model.parameters() if p.requires_grad]
    grad_norm = full(torch.nn.utils.clip_grad_norm_(params, clip))  # of the whole gradient, all shards
    # The step's one read-back (logging, the finite-loss check) must not leave the device idle: the
    # copy is queued before the optimizer step and waited for after it, so AdamW runs meanwhile.
    logged = torch.stack([loss_sum, grad_norm.float()]).to("cpu", non_blocking=True)  # pinned on CUDA
    copied = torch.cuda.Event() if loss_sum.is_cuda else None
    if copied is not None:
        copied.record()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if copied is not None:
        copied.synchronize()
    loss_sum, grad_norm = logged.tolist()
    if not math.isfinite(loss_sum):  # the update is applied; the caller stops, keeping the last checkpoint
        raise FloatingPointError(f"loss is {loss_sum}")
    seen = sum(int((ids != pad_id).sum()) for ids, _ in batches)
    return {"loss": loss_sum, "grad_norm": grad_norm, "tok_per_s": round(seen / (time.perf_counter() - t0))}


def eval_em(model, tok, n, data_dir=None, autocast=None, cuda_graph=True):
    """Greedy EM on the seeded test subset with the zero-shot prompt (the format SFT trains)."""
    model.eval()
    records = seeded_subset(load_gsm8k("main", "test", data_dir), n)
    with autocast or torch.autocast("cpu", enabled=False):
        rows = evaluate(model, tok, records, "zero-shot", batch_size=16, max_new_tokens=256, cuda_graph=cuda_graph)
    model.train()
    return {"eval_em": sum(r["correct"] for r in rows) / len(rows),
            "eval_format": sum(r["extracted"] is not None for r in rows) / len(rows), "eval_n": len(rows)}


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


def token_loss_sum(model, input_ids, labels, chunk=None, compiled=False):
    """Sum (not mean) of next-token cross-entropy over labelled tokens, in fp32. Callers divide by
    the labelled-token count of the whole effective batch.

    The LM head and the loss are fused (`HeadLoss`): they run only on labelled positions, `chunk`
    of them at a time. With Gemma's 256k vocabulary, full fp32 logits (and their gradient) would
    be the largest tensors of the step (8 x 512 x 256k x 4 bytes = 4 GiB each). A chunk's fp32
    logits take chunk x 1 MiB: 1024 positions by default; 4096 on a GPU when the head itself is
    trained (full SFT), where each chunk adds its fp32 (vocab, d) head gradient into the total
    (fewer, larger additions: docs/BENCHMARKS.md#gpu). compiled=True (`--compile`): a chunk's
    softmax arithmetic through torch.compile too. The head's products are `model.head.mm_t`.

    Labels may stay on the CPU (the training loop keeps them there): the labelled positions are
    then found on the host, and the step never waits for the device to count them.
    """
    hidden = model(input_ids, head=False)[:, :-1].flatten(0, 1)  # (B*(T-1), d): position t predicts token t+1
    targets = labels[:, 1:].flatten()  # (B*(T-1),)
    keep = (targets != IGNORE).nonzero().squeeze(1)  # (N,) labelled positions; a sync only if labels are on the device
    keep, targets = (t.to(hidden.device, non_blocking=True) for t in (keep, targets))
    weight = model.embed_tokens.weight
    if not torch.is_grad_enabled():  # evaluation: detached inputs tell HeadLoss to skip the gradients
        hidden, weight = hidden.detach(), weight.detach()
    chunk = chunk or (4096 if hidden.is_cuda and weight.requires_grad else 1024)
    xent = compiled_chunk_cross_entropy() if compiled else chunk_cross_entropy
    return HeadLoss.apply(hidden[keep], weight, targets[keep], model.config.final_softcap, chunk, xent,
                          model.head.mm_t)


class HeadLoss(torch.autograd.Function):
    """sum_n cross_entropy(softcap(hidden[n] @ weight.T), targets[n]), chunk by chunk, with both
    gradients computed in the forward while each chunk's logits exist (so backward only scales
    them: no logits are kept and none are recomputed).

    Per chunk, z = h W^T (C, V); `xent` (`chunk_cross_entropy`, compiled or not) gives the chunk's
    loss and g = dloss/dz; then dloss/dh = g W and dloss/dW = g^T h; mm_t(a, b) = a @ b.T.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, cap, chunk, xent, mm_t):  # (N, d), (V, d), (N,)
        need_h, need_w = ctx.needs_input_grad[:2]
        grad_h = torch.zeros_like(hidden, dtype=torch.float32) if need_h else None
        grad_w = None  # (V, d) fp32: the first chunk's product, later ones added to it
        total = hidden.new_zeros((), dtype=torch.float32)
        for i in range(0, len(targets), chunk):
            h = hidden[i:i + chunk]
            z = mm_t(h, weight)  # (C, V); bf16 matmul under autocast
            loss, g = xent(z, targets[i:i + chunk], cap, need_h or need_w)  # g: dloss/dz (C, V), z's dtype
            total += loss
            if need_h:  # the matmuls below run in z's dtype, as the forward's
                grad_h[i:i + chunk] = mm_t(g, weight.T)  # (C, d)
            if need_w:
                part = mm_t(g.T, h.to(weight.dtype).T).float()  # (V, d)
                grad_w = part if grad_w is None else grad_w.add_(part)
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w = ctx.saved_tensors
        grad_h = grad_h * grad_total if grad_h is not None else None
        grad_w = grad_w * grad_total if grad_w is not None else None
        return grad_h, grad_w, None, None, None, None, None


def chunk_cross_entropy(z, targets, cap, need_grad):
    """One chunk of HeadLoss: z = h W^T (C, V) and targets (C,) -> the summed loss (fp32) and, if
    need_grad, dloss/dz (C, V) in z's dtype, all arithmetic in fp32.

    logits = cap * tanh(z / cap) (or z); loss = logsumexp - logit of the target.
    dloss/dlogits = softmax - onehot; dlogits/dz = 1 - tanh^2.
    """
    dtype, z = z.dtype, z.float()
    if cap is not None:
        squashed = torch.tanh(z / cap)
        z = squashed * cap
    rows = torch.arange(len(targets), device=targets.device)
    target_logit = z[rows, targets]  # (C,)
    # logsumexp and softmax in z's own memory (HeadLoss does not use z again): on a CPU each new
    # (C, V) tensor costs more than the pass that fills it (docs/BENCHMARKS.md#cpu-layer).
    top = z.amax(-1, keepdim=True)  # (C, 1)
    e = z.sub_(top).exp_()  # (C, V): exp(logits - max)
    e_sum = e.sum(-1, keepdim=True)  # (C, 1)
    loss = (top + e_sum.log()).sum() - target_logit.sum()  # sum of logsumexp - target logit
    if not need_grad:
        return loss, None
    g = e.div_(e_sum)  # (C, V): softmax
    g[rows, targets] -= 1
    if cap is not None:
        g *= 1 - squashed ** 2
    return loss, g.to(dtype)


@functools.cache  # made on first use: torch.compile imports its compiler (~0.65 s) for every script
def compiled_chunk_cross_entropy():
    """chunk_cross_entropy through torch.compile. Compiled, its ~8 passes over fp32 logits become one
    kernel that reads the bf16 logits (an online max and sum, then g written; docs/BENCHMARKS.md#gpu)."""
    return torch.compile(chunk_cross_entropy)


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
    """One line with fixed fields to stdout, the same record appended to out_dir/log.jsonl. On a
    terminal the line first clears the progress bar that `report.progress` draws on stderr.
    Under torchrun only rank 0 logs."""
    if rank_world()[0] != 0:
        return
    print("\r\033[K" if sys.stdout.isatty() else "", end="")
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
    if out_dir.exists() and not resume and not overwrite:
        raise ValueError(f"--out {out_dir} exists; pass --resume to continue it or --overwrite to replace it")
    if resume and not (out_dir / "trainer_state.json").is_file():
        raise ValueError(f"--resume: {out_dir} has no trainer_state.json to resume from")
    if dist.is_initialized():
        dist.barrier()  # every rank has checked before rank 0 changes anything
    if rank_world()[0] == 0:
        if out_dir.exists() and not resume:
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()  # the folder is ready for every rank
    return out_dir


def save_checkpoint(out_dir, model, source_folder, args, step, optimizer, metrics=None, adapter=None,
                    extra_tensors=None):
    """An HF-style folder: config.json, model.safetensors, the tokenizer files of the source
    checkpoint, args.json, metrics.json; plus optimizer.safetensors and trainer_state.json to
    resume. With `adapter` (tensors, config): PEFT's adapter_model.safetensors + adapter_config.json instead of
    the full model; extra_tensors: more safetensors files (name -> state). Written to a temp folder
    and renamed, so a crash never leaves half a checkpoint. Under torchrun every rank calls it: the
    shards are gathered into whole tensors, rank 0 writes the same single folder as one process."""
    state = {k: full(v) for k, v in model.state_dict().items()} if adapter is None else None
    adapter = None if adapter is None else ({k: full(v) for k, v in adapter[0].items()}, adapter[1])
    opt_tensors, opt_meta = flatten_optimizer(optimizer)
    if rank_world()[0] != 0:
        return
    out_dir, source_folder = Path(out_dir), Path(source_folder)
    texts = {name: (source_folder / name).read_text() for name in TOKENIZER_FILES if (source_folder / name).is_file()}
    log = out_dir / "log.jsonl"
    if log.is_file():
        texts["log.jsonl"] = log.read_text()
    texts["args.json"] = json.dumps(vars(args), indent=2, default=str)
    texts["metrics.json"] = json.dumps(metrics or {}, indent=2)
    texts["trainer_state.json"] = json.dumps({"step": step, "optimizer": opt_meta}, indent=2)
    tensors = {"optimizer.safetensors": {**opt_tensors, "torch_rng": torch.get_rng_state()}, **(extra_tensors or {})}
    if adapter is None:
        model.save_pretrained(out_dir, text_files=texts, tensor_files=tensors, state=state)
    else:
        state, config = adapter
        texts["adapter_config.json"] = json.dumps(config, indent=2)
        weights.save_folder(out_dir, {"adapter_model.safetensors": state, **tensors}, texts)


def flatten_optimizer(optimizer):
    """Optimizer state dict -> (flat tensors for safetensors, JSON-able rest). No pickles. Sharded
    state is gathered whole, so any number of ranks can resume it."""
    sd = optimizer.state_dict()
    tensors = {f"state.{i}.{k}": full(v) for i, s in sd["state"].items() for k, v in s.items()}
    return tensors, {"param_groups": sd["param_groups"], "state_keys": {str(i): list(s) for i, s in sd["state"].items()}}


def load_trainer_state(out_dir, optimizer):
    """Restore optimizer and RNG state saved by save_checkpoint; returns the step to continue at."""
    out_dir = Path(out_dir)
    state = json.loads((out_dir / "trainer_state.json").read_text())
    tensors = load_file(out_dir / "optimizer.safetensors")
    meta = state["optimizer"]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    opt_state = {int(i): {k: shard_like(tensors[f"state.{i}.{k}"], params[int(i)]) for k in keys}
                 for i, keys in meta["state_keys"].items()}
    optimizer.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["torch_rng"])
    return state["step"]


def shard_like(tensor, param):
    """A whole saved state tensor cut into this rank's shard when its parameter is sharded."""
    if isinstance(param, DTensor) and tensor.shape == param.shape:
        return distribute_tensor(tensor.to(param.device), param.device_mesh, param.placements)
    return tensor
