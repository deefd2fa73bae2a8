"""Solutions to lesson 2's "Try it" (checked by lessons/exercises/l02_model.py)."""
import torch


def count_parameters(config):
    C, V = config.n_embd, config.vocab_size
    head_dim = C // config.n_head
    attention = C * C + 2 * C * config.n_kv_head * head_dim + C * C  # c_q, c_k and c_v, c_proj
    mlp = C * 4 * C + 4 * C * C  # c_fc, c_proj
    smear = config.n_kv_head  # one weight per key head
    return V * C + config.n_layer * (attention + mlp + smear)  # wte (also the head), the blocks


def rope(x, base=10000):
    T, D = x.shape[-2], x.shape[-1]
    inv_freq = base ** (-torch.arange(0, D, 2, dtype=torch.float32) / D)  # (D/2,): base^(-2i/D)
    angles = torch.arange(T, dtype=torch.float32)[:, None] * inv_freq  # (T, D/2)
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x[..., :D // 2], x[..., D // 2:]
    return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], dim=-1)


def count_parameters_without_grouping(config):
    C, V = config.n_embd, config.vocab_size
    return 2 * V * C + config.n_layer * (4 * C * C + 8 * C * C)  # k and v as wide as q


def rope_interleaved(x, base=10000):
    T, D = x.shape[-2], x.shape[-1]
    inv_freq = base ** (-torch.arange(0, D, 2, dtype=torch.float32) / D)
    angles = torch.arange(T, dtype=torch.float32)[:, None] * inv_freq
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x[..., 0::2], x[..., 1::2]  # neighbours pair up, as in the RoPE paper; the model pairs the halves
    return torch.stack([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], dim=-1).flatten(-2)


WRONG = dict(  # a plausible mistake per exercise: each must fail its check
    count_parameters=count_parameters_without_grouping,
    rope=rope_interleaved,
)
