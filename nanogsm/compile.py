"""torch.compile for the model's blocks (`--compile` in the scripts): fused kernels for the
elementwise work between the matmuls (docs/BENCHMARKS.md#gpu).

    compile_blocks(model)  # in place: parameter names, and so checkpoints, are unchanged

Training losses then compile their head arithmetic too (`token_loss_sum(..., compiled=True)`).
"""
import torch


def compile_blocks(model):
    """torch.compile every transformer block, the final norm and `attention_inputs` (a batch-1 GPU
    decode step is bound by its many small kernels, even replayed from a CUDA graph). The cache
    write compiles with its block; a recorded decode step holds the compiled kernels. Returns model."""
    for block in model.layers:
        block.compile()
    model.norm.compile()
    model.attention_inputs = torch.compile(model.attention_inputs)
    return model
