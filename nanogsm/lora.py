"""LoRA (Hu et al. 2021): y = W x + (alpha / r) * B A x, with W frozen and only A (r x in) and
B (out x r) trained. A starts Kaiming-uniform and B at zero, so training starts from the base model.
rsLoRA (Kalajdzievski 2023) scales by alpha / sqrt(r) instead.

Adapter folders are PEFT's (huggingface/peft): adapter_model.safetensors with keys
`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` and adapter_config.json with
`peft_type: "LORA"`, so PEFT and vLLM load nanogsm's adapters and nanogsm loads PEFT's. Folders of
nanogsm's earlier format (adapter.safetensors; config keys base_model, r, alpha, targets) still load.

The adapters can be switched off (`with lora_disabled(model):`), which makes the same weights act as
the base model: PPO uses that as its reference policy without a second copy of the base.
"""
import json
import math
import re
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file

from nanogsm import weights
from nanogsm.model import Gemma

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # PEFT's names
LEGACY_WEIGHTS = "adapter.safetensors"  # nanogsm's earlier format
PEFT_PREFIX = "base_model.model.model."  # PEFT's wrapper + the causal LM's `model.` before our names


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r, alpha, dropout=0.0, rslora=False):
        super().__init__()
        self.base = base
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.scale = alpha / math.sqrt(r) if rslora else alpha / r
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


def apply_lora(model, r=16, alpha=32, dropout=0.0, targets=None, rslora=False):
    """Swap every nn.Linear whose name ends in one of `targets` (or, targets a string, whose HF name
    `model.<name>` the regular expression matches whole, as PEFT matches) for a LoRALinear, in
    place; freeze every other parameter. Returns the model."""
    targets = targets or DEFAULT_TARGETS
    wanted = ((lambda full, leaf: re.fullmatch(targets, "model." + full) is not None) if isinstance(targets, str)
              else (lambda full, leaf: leaf in targets))
    for p in model.parameters():
        p.requires_grad_(False)
    swapped = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and wanted(f"{name}.{child_name}".lstrip("."), child_name):
                setattr(module, child_name, LoRALinear(child, r, alpha, dropout, rslora))
                swapped += 1
    if swapped == 0:
        shown = targets if isinstance(targets, str) else ",".join(targets)
        raise ValueError(f"--targets {shown}: no linear layer of the model has such a name")
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


# ---- adapter folders (PEFT's format) ------------------------------------------------------------

def load_model(name_or_path, dtype=torch.float32, device="cpu", base=None):
    """A full checkpoint (see Gemma.from_pretrained), or an adapter folder or Hub repo: its base model
    (`base_model_name_or_path`, or `base` when given) with the adapter applied. A base that is itself
    an adapter folder (an RL adapter trained on an SFT adapter) is loaded and merged first."""
    folder = weights.resolve(name_or_path)
    if not (folder / ADAPTER_CONFIG).is_file():
        return Gemma.from_pretrained(folder, dtype=dtype, device=device)
    config = read_adapter_config(folder)
    return load_adapter(merge_lora(load_model(base or config["base"], dtype, device)), folder)


def adapter_state(model):
    """The adapter tensors under PEFT's names (A (r, in), B (out, r))."""
    return {f"{PEFT_PREFIX}{name}.{part}.weight": getattr(m, part)
            for name, m in lora_modules(model).items() for part in ("lora_A", "lora_B")}


def adapter_config(model, base_model):
    """adapter_config.json as PEFT writes it for a causal LM."""
    some = next(iter(lora_modules(model).values()))
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_model),
            "r": some.r, "lora_alpha": some.alpha, "lora_dropout": some.dropout.p,
            "target_modules": sorted({name.rsplit(".", 1)[-1] for name in lora_modules(model)}),
            "use_rslora": some.rslora, "use_dora": False, "bias": "none", "modules_to_save": None,
            "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True}


def read_adapter_config(folder):
    """adapter_config.json -> {base, r, alpha, dropout, targets, rslora, weights file}; one clear line
    for what nanogsm does not support."""
    path = Path(folder) / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({e})") from None
    if "peft_type" not in config:  # nanogsm's earlier format
        return {"base": config["base_model"], "r": config["r"], "alpha": config["alpha"], "dropout": 0.0,
                "targets": config["targets"], "rslora": False, "file": LEGACY_WEIGHTS}
    unsupported = {"peft_type": config["peft_type"] != "LORA", "use_dora": config.get("use_dora"),
                   "modules_to_save": config.get("modules_to_save"), "bias": config.get("bias", "none") != "none",
                   "fan_in_fan_out": config.get("fan_in_fan_out"), "layers_to_transform": config.get("layers_to_transform"),
                   "rank_pattern": config.get("rank_pattern"), "alpha_pattern": config.get("alpha_pattern")}
    for field, bad in unsupported.items():
        if bad:
            raise ValueError(f"{path}: {field} = {config[field]!r} is not supported; nanogsm reads plain LoRA "
                             "adapters of the linear projections")
    targets = config.get("target_modules")
    names = [targets] if isinstance(targets, str) else list(targets or [])
    if not names or any(n in ("embed_tokens", "lm_head") or n.endswith(("embed_tokens", "lm_head")) for n in names):
        raise ValueError(f"{path}: target_modules = {targets!r}; nanogsm reads adapters of the linear "
                         "projections (q/k/v/o_proj, gate/up/down_proj), not of the embedding or the head")
    if not config.get("base_model_name_or_path"):
        raise ValueError(f"{path}: no base_model_name_or_path; pass the base model explicitly")
    return {"base": config["base_model_name_or_path"], "r": config["r"], "alpha": config["lora_alpha"],
            "dropout": config.get("lora_dropout", 0.0), "targets": targets, "rslora": config.get("use_rslora", False),
            "file": ADAPTER_WEIGHTS}


def load_adapter(model, folder):
    """Apply LoRA as folder/adapter_config.json describes it and load its tensors, checking that
    every module exists in the model with the shapes the adapter was trained on."""
    folder = Path(folder)
    config = read_adapter_config(folder)
    apply_lora(model, config["r"], config["alpha"], config["dropout"], config["targets"], config["rslora"])
    mine = {name: m for name, m in lora_modules(model).items()}
    path = folder / config["file"]
    if not path.is_file() and (folder / "adapter_model.bin").is_file():
        raise ValueError(f"{folder}: the adapter is a pickle (adapter_model.bin); nanogsm loads safetensors only")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    seen = set()
    for key, value in tensors.items():
        name = key.removeprefix(PEFT_PREFIX).removesuffix(".weight")  # layers.0.self_attn.q_proj.lora_A
        module, part = name.rsplit(".", 1)
        if module not in mine or part not in ("lora_A", "lora_B"):
            raise ValueError(f"{path}: adapter tensor {key!r} has no LoRA module {module!r} in the base model")
        target = getattr(mine[module], part)
        if value.shape != target.shape:
            raise ValueError(f"{path}: {name!r} has shape {tuple(value.shape)}, the base model's module needs "
                             f"{tuple(target.shape)} (an adapter for another model?)")
        with torch.no_grad():
            target.copy_(value)
        seen.add(name)
    missing = sorted({f"{m}.{part}" for m in mine for part in ("lora_A", "lora_B")} - seen)
    if missing:
        raise ValueError(f"{path}: missing adapter tensor(s) {missing[:4]}")
    return model
