"""Solutions to lesson 9's "Try it" (checked by lessons/exercises/l09_scaling_up.py)."""
import math


def flops_per_token(depth, vocab_size, seq_len, aspect_ratio=64, head_dim=128):
    n_head = math.ceil(depth * aspect_ratio / head_dim)  # the width, rounded up to whole heads
    C = n_head * head_dim
    per_block = 4 * C * C + 8 * C * C  # c_q, c_k, c_v, c_proj (no grouping: as many k/v heads as heads); the MLP
    matmul_params = depth * per_block + C * vocab_size  # the blocks and wte as the head (its lookup is free)
    return 6 * matmul_params + 12 * depth * n_head * head_dim * seq_len


def grad_accum(total_batch, device_batch, seq_len, world_size):
    per_micro_step = device_batch * seq_len * world_size  # tokens all processes read in one micro-step
    if total_batch % per_micro_step:
        raise ValueError(f"{total_batch} tokens is not a whole number of micro-steps of {per_micro_step}")
    return total_batch // per_micro_step


WRONG = dict(  # a plausible mistake per exercise: each must fail its check
    # 6 FLOPs for every parameter, the embedding included
    flops_per_token=lambda depth, vocab_size, seq_len, aspect_ratio=64, head_dim=128: (
        flops_per_token(depth, vocab_size, seq_len, aspect_ratio, head_dim)
        + 6 * vocab_size * math.ceil(depth * aspect_ratio / head_dim) * head_dim),
    # the micro-steps of one process alone, as if the other ranks read nothing
    grad_accum=lambda total_batch, device_batch, seq_len, world_size: grad_accum(total_batch, device_batch, seq_len, 1),
)
