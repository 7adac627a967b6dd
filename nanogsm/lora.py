"""LoRA (Hu et al. 2021): y = W x + (alpha / r) * B A x, with W frozen and only A (r x in) and
B (out x r) trained. A starts Kaiming-uniform and B at zero, so training starts from the base model.

The adapters can be switched off (`lora_enabled(model, False)`), which makes the same weights act as
the base model: PPO uses that as its reference policy without a second copy of the base.
"""
import json
import math
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file

from nanogsm.model import Gemma

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter.safetensors"


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r, alpha, dropout=0.0):
        super().__init__()
        self.base = base
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        like = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, **like))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, **like))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.dropout = nn.Dropout(dropout)
        self.enabled = True

    def forward(self, x):
        y = self.base(x)
        if self.enabled:
            xa = self.dropout(x) @ self.lora_A.T * self.scale  # (.., in) -> (.., r), scaled while it is small
            y = y + xa @ self.lora_B.T  # (.., out)
        return y


def lora_modules(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model, r=16, alpha=32, dropout=0.0, targets=None):
    """Swap every nn.Linear whose name ends in one of `targets` for a LoRALinear, in place; freeze
    every other parameter. Returns the model."""
    targets = tuple(targets or DEFAULT_TARGETS)
    for p in model.parameters():
        p.requires_grad_(False)
    swapped = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child_name in targets:
                setattr(module, child_name, LoRALinear(child, r, alpha, dropout))
                swapped += 1
    if swapped == 0:
        raise ValueError(f"--targets {','.join(targets)}: no linear layer of the model has such a name")
    return model


def store_base_in(model, dtype):
    """Store the frozen base projections in `dtype`. Under bf16 autocast these are the very values
    autocast would cast the fp32 weights to in every forward (and again in each checkpointed
    recompute), so the results are unchanged: half the weight memory, no per-step casts. Frozen
    weights are never updated, so nothing is lost by not keeping them in fp32."""
    for m in lora_modules(model).values():
        m.base.to(dtype)
    return model


def merge_lora(model):
    """Fold each adapter into its base weight (W += scale * B A) and put the plain nn.Linear back."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                with torch.no_grad():
                    delta = (child.lora_B.float() @ child.lora_A.float()) * child.scale  # (out, in)
                    child.base.weight += delta.to(child.base.weight.dtype)
                setattr(module, child_name, child.base)
    return model


@contextmanager
def lora_disabled(model):
    """Inside this block the model computes exactly its base model."""
    modules = lora_modules(model).values()
    for m in modules:
        m.enabled = False
    try:
        yield model
    finally:
        for m in modules:
            m.enabled = True


def count_parameters(model):
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


# ---- adapter folders -----------------------------------------------------------------------------

def load_model(name_or_path, dtype=torch.float32, device="cpu"):
    """A full checkpoint (see Gemma.from_pretrained), or an adapter folder: its base model with the
    adapter applied."""
    folder = Path(str(name_or_path)).expanduser()
    if (folder / ADAPTER_CONFIG).is_file():
        base = json.loads((folder / ADAPTER_CONFIG).read_text())["base_model"]
        return load_adapter(Gemma.from_pretrained(base, dtype=dtype, device=device), folder)
    return Gemma.from_pretrained(name_or_path, dtype=dtype, device=device)


def adapter_state(model):
    """The adapter tensors, named by their module (`layers.0.self_attn.q_proj.lora_A`)."""
    return {f"{name}.{part}": getattr(m, part) for name, m in lora_modules(model).items() for part in ("lora_A", "lora_B")}


def adapter_config(model, base_model):
    some = next(iter(lora_modules(model).values()))
    targets = sorted({name.rsplit(".", 1)[-1] for name in lora_modules(model)})
    return {"base_model": str(base_model), "r": some.r, "alpha": some.alpha, "targets": targets}


def load_adapter(model, folder):
    """Apply LoRA as described by folder/adapter_config.json and load its tensors, checking that
    every module exists in the model with the shapes the adapter was trained on."""
    folder = Path(folder)
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    apply_lora(model, config["r"], config["alpha"], targets=config["targets"])
    expected = adapter_state(model)
    try:
        tensors = load_file(folder / ADAPTER_WEIGHTS)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{folder / ADAPTER_WEIGHTS}: not a readable safetensors file ({e})") from None
    for key, value in tensors.items():
        if key not in expected:
            raise ValueError(f"{folder / ADAPTER_WEIGHTS}: adapter module {key!r} does not exist in the base model")
        if value.shape != expected[key].shape:
            raise ValueError(f"{folder / ADAPTER_WEIGHTS}: {key!r} has shape {tuple(value.shape)}, the base model's "
                             f"module needs {tuple(expected[key].shape)} (an adapter for another model?)")
        with torch.no_grad():
            expected[key].copy_(value)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"{folder / ADAPTER_WEIGHTS}: missing adapter tensor(s) {missing[:4]}")
    return model
