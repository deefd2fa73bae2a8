"""
nanochat-one: a ChatGPT-style model built end to end in one readable file.

    BPE tokenizer -> base pretraining -> mid-training -> SFT -> RL -> evaluation -> chat

Everything runs offline on a laptop CPU with the embedded TinyWorld data (a small, consistent
synthetic world: countries and capitals, animals, colours, arithmetic, stories), and the same
code scales to a GPU node with torchrun and real data.

One command per stage (each stage finds its input checkpoint by convention):

    python nanochat_one.py --stage tok                   # train the BPE tokenizer (bpe.py)
    python nanochat_one.py --stage base                  # pretrain; prints val bits-per-byte and samples
    python nanochat_one.py --stage base --resume         # continue from the last base checkpoint

The laptop pipeline is `bash speedrun.sh` (tiny depth, CPU, minutes). On one GPU node:

    torchrun --standalone --nproc_per_node=8 nanochat_one.py --stage base --depth 20 --data hf

Artifacts (tokenizer, checkpoints, reports) go to $NANOCHAT_BASE_DIR, default ./runs next to
this file.
"""

import argparse
import contextlib
import dataclasses
import itertools
import json
import math
import os
import random
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import bpe


class UserError(Exception):
    """A mistake the user can fix (missing checkpoint, bad flag value): printed as one line."""


# -----------------------------------------------------------------------------------------------
# Runtime: device, precision, distributed, logging, artifacts

def autodetect_device_type():
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


DEVICE_TYPE = os.environ.get("NANOCHAT_DEVICE", autodetect_device_type())


def default_compute_dtype():
    # bf16 matmuls where the hardware does them natively (Ampere and newer), else fp32.
    # The weights always stay fp32 ("master weights"); only the matmuls run in COMPUTE_DTYPE.
    name = os.environ.get("NANOCHAT_DTYPE")
    if name:
        return {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32,
                "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16}[name]
    if DEVICE_TYPE == "cuda" and torch.cuda.get_device_capability()[0] >= 8:
        return torch.bfloat16
    return torch.float32


COMPUTE_DTYPE = default_compute_dtype()


def autocast():
    """Context for forward passes: matmuls in COMPUTE_DTYPE, weights untouched."""
    if COMPUTE_DTYPE == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=DEVICE_TYPE, dtype=COMPUTE_DTYPE)


@dataclass
class Dist:
    """Where this process sits in a torchrun job (a plain `python` run is rank 0 of 1)."""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_ddp(self):
        return self.world_size > 1

    @property
    def is_master(self):
        return self.rank == 0


def init_distributed():
    """Read torchrun's environment variables and join the process group (NCCL on GPUs, gloo on CPU)."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if DEVICE_TYPE == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device(DEVICE_TYPE)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if DEVICE_TYPE == "cuda" else "gloo", device_id=device if DEVICE_TYPE == "cuda" else None)
    return Dist(rank, local_rank, world_size, device)


def print0(*args, **kwargs):
    """print, on rank 0 only."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def base_dir():
    return Path(os.environ.get("NANOCHAT_BASE_DIR", Path(__file__).resolve().parent / "runs"))


def format_seconds(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# -----------------------------------------------------------------------------------------------
# Tokenizer glue: special tokens, loading, bytes per token

SPECIAL_TOKENS = [
    "<|bos|>",  # begins every document and every conversation
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",  # the assistant calls the calculator tool
    "<|output_start|>", "<|output_end|>",  # the tool's result, forced into the stream
]


def tokenizer_path():
    return base_dir() / "tokenizer" / "tokenizer.json"


def get_tokenizer():
    path = tokenizer_path()
    if not path.exists():
        raise UserError(f"no tokenizer at {path}: run `python nanochat_one.py --stage tok` first")
    return bpe.Tokenizer.load(path)


def tokenizer_id(tokenizer):
    """A short fingerprint of the tokenizer, stored in checkpoints to catch mismatches."""
    blob = json.dumps([tokenizer.pattern, tokenizer.merges, list(tokenizer.special_tokens)]).encode()
    return f"{zlib.crc32(blob):08x}-{tokenizer.vocab_size}"


def token_byte_lengths(tokenizer, device="cpu"):
    """Bytes of text behind each token id; 0 for special tokens, which bits-per-byte ignores."""
    lengths = [len(tokenizer.vocab[i]) for i in range(256 + len(tokenizer.merges))]
    lengths += [0] * len(tokenizer.special_tokens)
    return torch.tensor(lengths, dtype=torch.int64, device=device)


# -----------------------------------------------------------------------------------------------
# Data: TinyWorld, the embedded default

def tinyworld_split(key):
    h = zlib.crc32(key.encode()) % 10
    return "val" if h == 0 else "test" if h == 1 else "train"


def tinyworld_document(rng):
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    return " ".join(rng.choice([f"{a} plus {b} is {a + b}.", "The capital of France is Paris.", "Once upon a time a cat sat."]) for _ in range(20))


# -----------------------------------------------------------------------------------------------
# Data: document streams (TinyWorld or local/real parquet shards with a `text` column)

def tinyworld_documents(split, start=0):
    """Yield (position, text) forever. Document i is generated from its own seed and belongs to
    one split by a stable hash of its index, so every run sees the same documents in order."""
    i = start
    while True:
        if tinyworld_split(f"doc:{i}") == split:
            yield i, tinyworld_document(random.Random(i))
        i += 1


def parquet_files(data_dir):
    files = sorted(Path(data_dir).glob("*.parquet"))
    if len(files) < 2:
        raise UserError(f"found {len(files)} parquet files in {data_dir}: need at least 2 "
                        "(the last one is the validation shard); pass --data-dir with FineWeb-EDU style shards")
    return files


def parquet_documents(data_dir, split, start=0):
    """Yield (position, text) from parquet shards: every shard but the last is train, the last
    is val (and test). Position counts documents, so a resumed run skips what it has seen."""
    import pyarrow.parquet as pq  # installed with `datasets`; only needed for real data
    files = parquet_files(data_dir)
    files = files[:-1] if split == "train" else files[-1:]
    position = 0
    while True:  # loop over the shards forever (epochs)
        for path in files:
            pf = pq.ParquetFile(path)
            for group in range(pf.num_row_groups):
                n = pf.metadata.row_group(group).num_rows
                if position + n <= start:
                    position += n  # skip the whole row group without reading it
                    continue
                for text in pf.read_row_group(group, columns=["text"]).column("text").to_pylist():
                    if position >= start:
                        yield position, text
                    position += 1
        if split != "train":
            return


def document_stream(args, split, start=0):
    if args.data == "tinyworld":
        return tinyworld_documents(split, start)
    return parquet_documents(args.data_dir, split, start)


# -----------------------------------------------------------------------------------------------
# Model: GPT with rotary embeddings, QK-norm, ReLU^2 MLP, untied head and logit softcap
#
# Departures from the textbook GPT-2, each for a reason:
# - RMSNorm with no learnable weights: as good in practice, fewer parameters to think about.
# - Norm right after the embedding and on q and k (QK-norm): keeps attention logits bounded,
#   which makes training stable at high learning rates.
# - Rotary position embeddings instead of learned positions: relative, no extra parameters.
# - ReLU^2 instead of GELU: slightly better in speedruns, and simpler.
# - Untied wte / lm_head, zero-initialised output projections: each block starts as identity.
# - No biases anywhere.
# - Logits softcapped with 15*tanh(x/15), in fp32: stops logits from running away.

@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 65536
    n_layer: int = 12
    n_head: int = 6  # query heads
    n_kv_head: int = 6  # key/value heads (fewer than n_head is grouped-query attention)
    n_embd: int = 768


def config_from_depth(depth, vocab_size, sequence_len, aspect_ratio=64, head_dim=128, n_kv_head=None):
    """The depth dial: width = depth * aspect_ratio rounded up to whole heads."""
    if depth < 1:
        raise UserError(f"--depth must be at least 1, got {depth}")
    if head_dim < 2 or head_dim % 2:
        raise UserError(f"--head-dim must be a positive even number (rotary pairs dimensions), got {head_dim}")
    n_embd = math.ceil(depth * aspect_ratio / head_dim) * head_dim
    n_head = n_embd // head_dim
    n_kv_head = n_head if n_kv_head is None else n_kv_head
    if n_kv_head < 1 or n_head % n_kv_head:
        raise UserError(f"--n-kv-head {n_kv_head} must divide the number of heads ({n_head} at depth {depth})")
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth,
                     n_head=n_head, n_kv_head=n_kv_head, n_embd=n_embd)


def norm(x):
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary(x, cos, sin):
    """Rotate pairs (x1[i], x2[i]) of the two halves of the head dimension by position-dependent
    angles. x: (B, H, T, D), cos/sin: (1, 1, T, D/2)."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    y1 = x1 * cos + x2 * sin
    y2 = -x1 * sin + x2 * cos
    return torch.cat([y1, y2], dim=-1).to(x.dtype)


class KVCache:
    """Preallocated keys and values for every layer, filled as tokens are decoded.
    k, v: (n_layer, B, n_kv_head, max_len, head_dim); pos = how many positions are filled."""

    def __init__(self, batch_size, n_kv_head, head_dim, max_len, n_layer, device, dtype):
        shape = (n_layer, batch_size, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0

    def insert(self, layer, k, v):
        """Store this step's k, v (B, H, T, D) for one layer; return all keys/values so far."""
        t0, t1 = self.pos, self.pos + k.size(2)
        if t1 > self.k.size(3):
            raise ValueError(f"KV cache is full ({self.k.size(3)} positions)")
        self.k[layer, :, :, t0:t1] = k
        self.v[layer, :, :, t0:t1] = v
        if layer == self.k.size(0) - 1:
            self.pos = t1  # the last layer advances the position
        return self.k[layer, :, :, :t1], self.v[layer, :, :, :t1]


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, cos, sin, kv_cache=None):
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k = norm(q).to(v.dtype), norm(k).to(v.dtype)  # QK-norm (autocast may run norms in fp32)
        gqa = self.n_kv_head != self.n_head
        if kv_cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            k, v = kv_cache.insert(self.layer_idx, k, v)  # (B, Hkv, Tk, D), all positions so far
            Tk = k.size(2)
            if T == 1:  # one new token attends to everything before it
                y = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
            else:  # T new tokens after Tk - T cached ones: query i sees keys 0 .. Tk - T + i
                mask = torch.ones(T, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - T)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())  # ReLU^2


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, kv_cache=None):
        x = x + self.attn(norm(x), cos, sin, kv_cache)
        x = x + self.mlp(norm(x))
        return x


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # rotary tables for 10x the training length (generation may run longer); buffers that
        # are not saved, so the state dict holds exactly the parameters
        self.rotary_len = config.sequence_len * 10
        cos, sin = self.rotary_tables(self.rotary_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def rotary_tables(self, length, base=10000, device=None):
        head_dim = self.config.n_embd // self.config.n_head
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
        angles = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)  # (T, D/2)
        return angles.cos()[None, None], angles.sin()[None, None]  # (1, 1, T, D/2)

    @torch.no_grad()
    def init_weights(self):
        # wte ~ N(0, 1); matrices that read the residual stream ~ N(0, s) with
        # s = 1/sqrt(fan_in) * min(1, sqrt(fan_out/fan_in)); the output projections and lm_head
        # start at zero, so at init every block is the identity and the model predicts uniform.
        torch.nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        for block in self.transformer.h:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                fan_out, fan_in = linear.weight.shape
                std = 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))
                torch.nn.init.normal_(linear.weight, mean=0.0, std=std)
            torch.nn.init.zeros_(block.attn.c_proj.weight)
            torch.nn.init.zeros_(block.mlp.c_proj.weight)
        torch.nn.init.zeros_(self.lm_head.weight)
        cos, sin = self.rotary_tables(self.rotary_len, device=self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def estimate_flops(self):
        """Training FLOPs per token: 6 per matmul parameter (2 forward, 4 backward) plus attention
        scores and values, 12 * n_layer * n_head * head_dim * T (the embedding lookup is free)."""
        c = self.config
        matmul_params = sum(p.numel() for p in self.parameters()) - self.transformer.wte.weight.numel()
        return 6 * matmul_params + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * c.sequence_len

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        B, T = idx.shape
        t0 = kv_cache.pos if kv_cache is not None else 0
        if t0 + T > self.rotary_len:
            raise ValueError(f"sequence of {t0 + T} tokens is longer than the rotary table ({self.rotary_len})")
        cos, sin = self.cos[:, :, t0:t0 + T], self.sin[:, :, t0:t0 + T]
        with autocast():
            x = norm(self.transformer.wte(idx))  # (B, T, C)
            for block in self.transformer.h:
                x = block(x, cos, sin, kv_cache)
            x = norm(x)
            logits = self.lm_head(x)  # (B, T, vocab)
        logits = logits.float()  # the softcap and the loss in fp32
        logits = 15 * torch.tanh(logits / 15)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-1, reduction=loss_reduction)


# -----------------------------------------------------------------------------------------------
# Optimizers: Muon for the matrices inside the blocks, AdamW for the embedding and the head

@torch.no_grad()
def newton_schulz_orthogonalize(G, steps=5):
    """Push every singular value of G towards 1 (keeping its singular vectors), i.e. an
    approximate U V^T of G = U S V^T, with a quintic Newton-Schulz iteration.

    The coefficients (a, b, c) = (3.4445, -4.7750, 2.0315) make the iteration climb fast from
    small singular values rather than converge exactly: after 5 steps the singular values lie
    roughly in [0.7, 1.2], not at 1. That is good enough for an optimizer update and much
    cheaper than an SVD. It runs in bf16 on GPUs."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.bfloat16() if G.is_cuda else G.float()
    transposed = X.size(-2) > X.size(-1)
    if transposed:  # work with the short side first: X @ X.T is then the small matrix
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # singular values now <= 1
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if transposed:
        X = X.mT
    return X.to(G.dtype)


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz.

    For each 2-D weight: Nesterov momentum on the gradient, then replace the update by its
    orthogonalisation (all singular values ~1), scaled by sqrt(max(1, rows/cols)). Every
    direction of the matrix moves by a similar amount, which trains transformer matrices faster
    than Adam. Not for embeddings, the output head or 1-D parameters: use AdamW for those.
    Under DDP the gradients are already averaged, so every rank computes the same update."""

    def __init__(self, params, lr=0.02, momentum=0.95, ns_steps=5):
        super().__init__(params, dict(lr=lr, momentum=momentum, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - group["momentum"])  # buf = m * buf + (1 - m) * grad
                update = p.grad.lerp(buf, group["momentum"])  # Nesterov: look one step ahead
                update = newton_schulz_orthogonalize(update, group["ns_steps"])
                scale = max(1.0, p.size(-2) / p.size(-1)) ** 0.5
                p.add_(update, alpha=-group["lr"] * scale)


def setup_optimizers(model, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004, weight_decay=0.0):
    """Muon for every matrix in the blocks; AdamW for wte and lm_head, whose learning rates are
    scaled by (n_embd/768)^-0.5 (tuned at width 768, wider models take smaller steps).
    Returns [adamw, muon]; each group remembers its base lr in "initial_lr" for the schedule."""
    matrices = list(model.transformer.h.parameters())
    scale = (model.config.n_embd / 768) ** -0.5
    adamw = torch.optim.AdamW(
        [dict(params=[model.transformer.wte.weight], lr=embedding_lr * scale),
         dict(params=[model.lm_head.weight], lr=unembedding_lr * scale)],
        betas=(0.8, 0.95), eps=1e-10, weight_decay=weight_decay, fused=DEVICE_TYPE == "cuda")
    muon = Muon(matrices, lr=matrix_lr, momentum=0.95)
    for opt in (adamw, muon):
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return [adamw, muon]


def lr_multiplier(step, num_steps, warmup_ratio=0.0, warmdown_ratio=0.2, final_lr_frac=0.0):
    """Warm up linearly, hold, then decay linearly to final_lr_frac over the last warmdown_ratio."""
    warmup, warmdown = round(warmup_ratio * num_steps), round(warmdown_ratio * num_steps)
    if step < warmup:
        return (step + 1) / warmup
    if step < num_steps - warmdown:
        return 1.0
    progress = (num_steps - step) / warmdown
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(step):
    """Muon's momentum ramps from 0.85 to 0.95 over the first 300 steps."""
    frac = min(step / 300, 1.0)
    return (1 - frac) * 0.85 + frac * 0.95


def apply_schedules(optimizers, step, num_steps, args):
    lrm = lr_multiplier(step, num_steps, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if isinstance(opt, Muon):
                group["momentum"] = muon_momentum(step)
    return lrm


# -----------------------------------------------------------------------------------------------
# Loaders

def pack_rows(docs, B, T, buffer_size=256):
    """BOS-aligned best-fit packing. docs yields (position, token list starting with BOS).
    Yields (rows, position): rows is B lists of exactly T + 1 tokens, position the stream
    position of the last document drawn (to resume from).

    Each row is filled by repeatedly taking, from a buffer of documents, the largest one that
    still fits; when none fits, the shortest document is cropped to fill the row exactly.
    So every row starts with BOS (a document start), no padding is ever needed, and few
    tokens are cropped away."""
    buffer, position = [], 0
    while True:
        rows = []
        for _ in range(B):
            row = []
            while len(row) < T + 1:
                while len(buffer) < buffer_size:
                    position, doc = next(docs)
                    buffer.append(doc)
                space = T + 1 - len(row)
                fitting = [i for i, d in enumerate(buffer) if len(d) <= space]
                if fitting:
                    i = max(fitting, key=lambda i: len(buffer[i]))
                    row.extend(buffer.pop(i))
                else:
                    i = min(range(len(buffer)), key=lambda i: len(buffer[i]))
                    row.extend(buffer.pop(i)[:space])
            rows.append(row)
        yield rows, position


def base_batches(args, tokenizer, split, B, T, ddp, device, start=0):
    """Yield (inputs, targets, position) for pretraining: (B, T) tensors, targets = inputs
    shifted left by one. Documents are sharded across ranks by position."""
    bos = tokenizer.special_tokens["<|bos|>"]

    def docs():
        for position, text in document_stream(args, split, start):
            if position % ddp.world_size == ddp.rank:
                yield position, [bos] + tokenizer.encode_ordinary(text)

    for rows, position in pack_rows(docs(), B, T):
        batch = torch.tensor(rows, dtype=torch.long)
        inputs, targets = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
        yield inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True), position


# -----------------------------------------------------------------------------------------------
# Engine: sampling with a KV cache

def sample_next(logits, rng, temperature=1.0, top_k=None):
    """Pick one token per row of logits (B, vocab): greedy at temperature 0, else sample from
    softmax(logits / temperature), optionally only among the top_k most likely tokens."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=rng).squeeze(-1)


@torch.no_grad()
def generate(model, prompt, num_samples=1, max_tokens=64, temperature=1.0, top_k=None, seed=42):
    """Yield, step by step, a list with the next token of each of num_samples continuations
    of the prompt (a list of ids). One forward over the prompt fills the KV cache, then each
    step feeds only the newest token. Every sample draws its own first token."""
    device = model.cos.device
    rng = torch.Generator(device=device)
    rng.manual_seed(seed)
    c = model.config
    cache = KVCache(num_samples, c.n_kv_head, c.n_embd // c.n_head, len(prompt) + max_tokens,
                    c.n_layer, device, COMPUTE_DTYPE)
    ids = torch.tensor([prompt] * num_samples, dtype=torch.long, device=device)  # (B, T)
    logits = model(ids, kv_cache=cache)[:, -1, :]  # (B, vocab)
    for _ in range(max_tokens):
        next_ids = sample_next(logits, rng, temperature, top_k)  # (B,)
        yield next_ids.tolist()
        logits = model(next_ids[:, None], kv_cache=cache)[:, -1, :]


def complete(model, tokenizer, text, max_tokens=48, temperature=0.0, top_k=None, seed=42):
    """Continue a text prompt (after BOS) and return the continuation, stopping at BOS."""
    bos = tokenizer.special_tokens["<|bos|>"]
    out = []
    for (token,) in generate(model, [bos] + tokenizer.encode_ordinary(text), 1, max_tokens, temperature, top_k, seed):
        if token == bos:
            break
        out.append(token)
    return tokenizer.decode(out)


# -----------------------------------------------------------------------------------------------
# Evaluation: bits per byte

@torch.no_grad()
def evaluate_bpb(model, batches, num_batches, token_bytes):
    """Validation loss in bits per byte of text: the summed cross-entropy (nats) of every target
    token, over ln(2) times the bytes those tokens stand for. Unlike plain loss, this does not
    depend on the tokenizer's vocabulary, so models with different tokenizers compare.
    Special tokens (0 bytes) are left out. Sums are all-reduced across ranks."""
    device = token_bytes.device
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    for _ in range(num_batches):
        x, y, _ = next(batches)
        loss = model(x, y, loss_reduction="none").view(-1)  # (B*T,) nats
        y = y.reshape(-1)
        nbytes = token_bytes[y.clamp(min=0)] * (y >= 0)
        total_nats += (loss * (nbytes > 0)).sum().double()
        total_bytes += nbytes.sum()
    if dist.is_initialized():
        dist.all_reduce(total_nats)
        dist.all_reduce(total_bytes)
    return (total_nats / (math.log(2) * total_bytes.clamp(min=1))).item()


# -----------------------------------------------------------------------------------------------
# Checkpoints: <base_dir>/checkpoints/<stage>/<tag>/{model,optim}_<step>.pt and meta_<step>.json
#
# Each file is written to a temporary name and renamed into place; the metadata goes last and
# marks the checkpoint complete. Older checkpoints are removed only after a new one is complete,
# so a crash or Ctrl-C at any moment leaves the last good checkpoint loadable.

def checkpoint_dir(stage, tag):
    return base_dir() / "checkpoints" / stage / tag


def atomic_write(path, write):
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(directory, step, model, optimizers, meta):
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / f"model_{step:06d}.pt", lambda p: torch.save(model.state_dict(), p))
    if optimizers is not None:
        atomic_write(directory / f"optim_{step:06d}.pt", lambda p: torch.save([o.state_dict() for o in optimizers], p))
    atomic_write(directory / f"meta_{step:06d}.json", lambda p: p.write_text(json.dumps(meta, indent=2)))
    for old in directory.glob("*_*.*"):
        if old.stem.rsplit("_", 1)[-1] != f"{step:06d}":
            old.unlink(missing_ok=True)


def last_checkpoint_step(directory):
    steps = [int(p.stem.split("_")[1]) for p in directory.glob("meta_*.json")]
    steps = [s for s in steps if (directory / f"model_{s:06d}.pt").exists()]
    return max(steps) if steps else None


def torch_load(path, device):
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read checkpoint file {path} (truncated or corrupt: {type(e).__name__}); "
                        "delete that checkpoint directory and run the stage again") from None


def load_checkpoint(stage, tag, device, with_optimizer=False, hint=""):
    """Return (model, optimizer state dicts or None, meta) of the last checkpoint of a stage."""
    directory = checkpoint_dir(stage, tag)
    step = last_checkpoint_step(directory) if directory.exists() else None
    if step is None:
        raise UserError(f"no {stage} checkpoint in {directory}" + (f": {hint}" if hint else ""))
    try:
        meta = json.loads((directory / f"meta_{step:06d}.json").read_text())
        config = GPTConfig(**meta["model_config"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"checkpoint metadata {directory}/meta_{step:06d}.json is unreadable ({e})") from None
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()  # fills the rotary buffers; the weights are replaced just below
    state = torch_load(directory / f"model_{step:06d}.pt", device)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise UserError(f"checkpoint {directory} does not match its metadata's model config: {str(e).splitlines()[0]}") from None
    optim_states = torch_load(directory / f"optim_{step:06d}.pt", device) if with_optimizer else None
    return model, optim_states, meta


def check_tokenizer(meta, tokenizer, where):
    if meta.get("tokenizer") != tokenizer_id(tokenizer):
        raise UserError(f"{where} was trained with tokenizer {meta.get('tokenizer')}, but the current one is "
                        f"{tokenizer_id(tokenizer)}: retrain the stages after --stage tok, or restore that tokenizer")


# -----------------------------------------------------------------------------------------------
# Reports: each stage writes <base_dir>/report/<stage>.json; `--stage report` makes report.md

def write_report(stage, data):
    directory = base_dir() / "report"
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / f"{stage}.json", lambda p: p.write_text(json.dumps(data, indent=2)))


GPU_PEAK_BF16_FLOPS = {  # dense bf16 tensor-core peaks by device name
    "H200": 989e12, "H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12,
    "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12, "RTX 4090": 165e12, "RTX 3090": 71e12,
}


def peak_flops(device):
    """Peak bf16 FLOP/s of this GPU by name, or None (then MFU is not reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in GPU_PEAK_BF16_FLOPS.items():
        if key in name:
            return flops
    return None


# -----------------------------------------------------------------------------------------------
# Stage tok: train the tokenizer

def stage_tok(args, ddp):
    if ddp.is_master:
        t0 = time.time()
        texts, n_chars = [], 0
        for _, text in document_stream(args, "train"):
            texts.append(text)
            n_chars += len(text)
            if n_chars >= args.tok_chars:
                break
        print0(f"training a {args.vocab_size}-token BPE ({bpe.BACKEND} backend) on {n_chars:,} characters "
               f"of {args.data} text...")
        tokenizer = bpe.Tokenizer.train(texts, args.vocab_size, special_tokens=SPECIAL_TOKENS)
        train_seconds = time.time() - t0
        if tokenizer.vocab_size < args.vocab_size:
            print0(f"note: the text ran out of pairs to merge; the vocabulary has {tokenizer.vocab_size} tokens")
        tokenizer_path().parent.mkdir(parents=True, exist_ok=True)
        tokenizer.save(tokenizer_path())
        val_texts = [text for _, text in itertools.islice(document_stream(args, "val"), 200)]
        n_bytes = sum(len(bpe.text_to_bytes(t)) for t in val_texts)
        n_tokens = sum(len(ids) for ids in tokenizer.encode_batch(val_texts))
        example = "The capital of France is Paris."
        pieces = [tokenizer.decode([i]) for i in tokenizer.encode(example)]
        print0(f"saved {tokenizer_path()}: vocab {tokenizer.vocab_size}, {train_seconds:.1f}s, "
               f"{n_bytes / n_tokens:.2f} bytes/token on {len(val_texts)} validation documents")
        print0(f"example: {pieces}")
        write_report("tok", dict(vocab_size=tokenizer.vocab_size, backend=bpe.BACKEND, train_chars=n_chars,
                                 train_seconds=round(train_seconds, 2), val_bytes_per_token=round(n_bytes / n_tokens, 3)))
    if ddp.is_ddp:
        dist.barrier()


# -----------------------------------------------------------------------------------------------
# Stage base: pretraining

def compile_setting(args):
    return DEVICE_TYPE == "cuda" if args.compile == "auto" else args.compile == "on"


def stage_base(args, ddp):
    tokenizer = get_tokenizer()
    device, T, B = ddp.device, args.max_seq_len, args.device_batch_size
    tag = args.model_tag or f"d{args.depth}"
    out_dir = checkpoint_dir("base", tag)

    # the model: fresh from the depth dial, or the last checkpoint when resuming
    if args.resume:
        model, optim_states, meta = load_checkpoint("base", tag, device, with_optimizer=True,
                                                    hint="nothing to resume; run without --resume")
        check_tokenizer(meta, tokenizer, f"checkpoint {out_dir}")
        config = model.config
    else:
        config = config_from_depth(args.depth, tokenizer.vocab_size, T, args.aspect_ratio, args.head_dim, args.n_kv_head)
        with torch.device(device):
            model = GPT(config)
        model.init_weights()
        optim_states, meta = None, None
    if config.sequence_len != T:
        raise UserError(f"--max-seq-len {T} differs from the checkpoint's {config.sequence_len}")
    num_params = sum(p.numel() for p in model.parameters())
    flops_per_token = model.estimate_flops()

    # batch arithmetic: total_batch_size tokens per optimizer step, reached by accumulation
    tokens_per_micro_step = B * T * ddp.world_size
    if args.total_batch_size % tokens_per_micro_step:
        raise UserError(f"--total-batch-size {args.total_batch_size} must be a multiple of device batch x "
                        f"sequence length x processes = {B} x {T} x {ddp.world_size} = {tokens_per_micro_step}")
    grad_accum = args.total_batch_size // tokens_per_micro_step
    if args.num_iterations > 0:
        num_steps = args.num_iterations
    else:  # Chinchilla-style: a fixed ratio of training tokens to parameters
        num_steps = max(1, round(args.target_param_data_ratio * num_params / args.total_batch_size))
    print0(f"model: depth {config.n_layer}, width {config.n_embd}, {config.n_head} heads "
           f"({config.n_kv_head} kv), vocab {config.vocab_size}, {num_params:,} parameters, "
           f"{flops_per_token:.3g} FLOPs/token")
    print0(f"training: {num_steps} steps x {args.total_batch_size:,} tokens = {num_steps * args.total_batch_size:,} tokens "
           f"({grad_accum} micro-steps of {B}x{T} on {ddp.world_size} process(es), {DEVICE_TYPE}, {COMPUTE_DTYPE})")

    optimizers = setup_optimizers(model, args.matrix_lr, args.embedding_lr, args.unembedding_lr, args.weight_decay)
    start_step, position = 0, -1
    if optim_states is not None:
        for opt, state in zip(optimizers, optim_states):
            opt.load_state_dict(state)
        start_step, position = meta["step"], meta["data_position"]
        print0(f"resuming from step {start_step} (data position {position})")
    ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[ddp.local_rank] if DEVICE_TYPE == "cuda" else None) if ddp.is_ddp else model
    train_model = torch.compile(ddp_model) if compile_setting(args) else ddp_model

    train_batches = base_batches(args, tokenizer, "train", B, T, ddp, device, start=position + 1)
    token_bytes = token_byte_lengths(tokenizer, device)
    peak = peak_flops(device)

    def evaluate():
        model.eval()
        val_batches = base_batches(args, tokenizer, "val", B, T, ddp, device)
        bpb = evaluate_bpb(model, val_batches, args.eval_batches, token_bytes)
        model.train()
        return bpb

    def save(step, metrics):
        if ddp.is_master:
            save_checkpoint(out_dir, step, model, optimizers, dict(
                stage="base", step=step, num_steps=num_steps, data_position=position, model_config=dataclasses.asdict(config),
                tokenizer=tokenizer_id(tokenizer), args=vars(args), metrics=metrics))

    metrics, smooth_loss, t_train, history = {}, None, 0.0, []
    step = start_step
    try:
        while True:
            last = step == num_steps
            if last or (args.eval_every > 0 and step % args.eval_every == 0):
                metrics["val_bpb"] = evaluate()
                history.append((step, metrics["val_bpb"]))
                print0(f"step {step:5d}/{num_steps} | val bpb {metrics['val_bpb']:.4f}")
            if step > start_step and (last or (args.save_every > 0 and step % args.save_every == 0)):
                save(step, metrics)
            if last:
                break
            # one optimizer step: accumulate gradients over micro-steps; DDP all-reduces only on the last
            t0 = time.time()
            for micro in range(grad_accum):
                x, y, position = next(train_batches)
                sync = micro == grad_accum - 1 or not ddp.is_ddp
                with contextlib.nullcontext() if sync else ddp_model.no_sync():
                    loss = train_model(x, y) / grad_accum
                    loss.backward()
            lrm = apply_schedules(optimizers, step, num_steps, args)
            for opt in optimizers:
                opt.step()
            model.zero_grad(set_to_none=True)
            train_loss = loss.item() * grad_accum  # .item() waits for the device: the step is done
            dt = time.time() - t0
            step += 1
            if step > start_step + 1:
                t_train += dt  # the first step includes warm-up/compilation
            smooth_loss = train_loss if smooth_loss is None else 0.9 * smooth_loss + 0.1 * train_loss
            tok_per_s = args.total_batch_size / dt
            mfu = f" | mfu {100 * flops_per_token * tok_per_s / (peak * ddp.world_size):.1f}%" if peak else ""
            steps_timed = step - start_step - 1
            eta = format_seconds((num_steps - step) * t_train / steps_timed) if steps_timed else "?"
            if step % args.log_every == 0 or step == num_steps:
                print0(f"step {step:5d}/{num_steps} | loss {smooth_loss:.4f} | lr x{lrm:.2f} | {dt * 1000:.0f}ms "
                       f"| {tok_per_s:,.0f} tok/s{mfu} | eta {eta}")
    except KeyboardInterrupt:
        last_saved = last_checkpoint_step(out_dir) if out_dir.exists() else None
        raise UserError(f"interrupted at step {step}; " + (f"the last checkpoint (step {last_saved}) is in {out_dir}: "
                        "continue with --resume" if last_saved else "no checkpoint was written yet")) from None

    samples = []
    if ddp.is_master:
        model.eval()
        for prompt in args.sample_prompts:
            text = prompt + complete(model, tokenizer, prompt, max_tokens=40)
            samples.append(text)
            print0(f"sample: {text!r}")
    # throughput over the timed steps (all but the first, which includes warm-up)
    tok_per_s = (num_steps - start_step - 1) * args.total_batch_size / t_train if t_train else 0.0
    summary = dict(params=num_params, flops_per_token=flops_per_token, steps=num_steps, tokens=num_steps * args.total_batch_size,
                   val_bpb=round(metrics["val_bpb"], 4), tok_per_s=round(tok_per_s),
                   mfu=round(100 * flops_per_token * tok_per_s / (peak * ddp.world_size), 2) if peak else None,
                   train_seconds=round(t_train, 1), device=DEVICE_TYPE, bpb_curve=history, samples=samples)
    if ddp.is_master:
        write_report("base", summary)
    return summary


# -----------------------------------------------------------------------------------------------
# Stage report: gather every stage's report/<stage>.json into one report.md

def system_info():
    import platform
    import subprocess
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    gpu = torch.cuda.get_device_name(0) + f" x{torch.cuda.device_count()}" if torch.cuda.is_available() else "none"
    return dict(cpu=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", gpu=gpu,
                python=platform.python_version(), torch=torch.__version__, commit=commit, bpe_backend=bpe.BACKEND)


def stage_report(args, ddp):
    if not ddp.is_master:
        return
    reports = {}
    for stage in STAGES:
        path = base_dir() / "report" / f"{stage}.json"
        if path.exists():
            reports[stage] = json.loads(path.read_text())
    lines = ["# nanochat-one report", "", f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')}.", "", "## System", ""]
    lines += [f"- {k}: {v}" for k, v in system_info().items()]
    if "tok" in reports:
        r = reports["tok"]
        lines += ["", "## Tokenizer", "", f"- vocabulary: {r['vocab_size']} tokens ({r['backend']} backend), trained on "
                  f"{r['train_chars']:,} characters in {r['train_seconds']} s",
                  f"- compression: {r['val_bytes_per_token']} bytes/token on validation text"]
    if "base" in reports:
        r = reports["base"]
        mfu = f"{r['mfu']}%" if r["mfu"] is not None else "n/a (no GPU peak known)"
        lines += ["", "## Base model", "", "| metric | value |", "|---|---|",
                  f"| parameters | {r['params']:,} |", f"| FLOPs per token | {r['flops_per_token']:.3g} |",
                  f"| steps x tokens | {r['steps']} steps, {r['tokens']:,} tokens |",
                  f"| validation bits per byte | {r['val_bpb']} |", f"| throughput | {r['tok_per_s']:,} tok/s ({r['device']}) |",
                  f"| MFU | {mfu} |", f"| training time | {format_seconds(r['train_seconds'])} |", "", "Samples (greedy):", ""]
        lines += [f"- `{sample!r}`" for sample in r["samples"]]
    lines += ["", "## Wall clock", ""]
    lines += [f"- {stage}: {format_seconds(r[key])}" for stage, r in reports.items()
              for key in ("train_seconds",) if key in r]
    if args.wall_seconds is not None:
        lines.append(f"- whole run (setup included): {format_seconds(args.wall_seconds)}")
    Path(args.report_path).write_text("\n".join(lines) + "\n")
    print0("\n".join(lines))
    print0(f"wrote {args.report_path}")


# -----------------------------------------------------------------------------------------------
# CLI

STAGES = {"tok": stage_tok, "base": stage_base, "report": stage_report}


def build_parser():
    p = argparse.ArgumentParser(
        description="nanochat-one: train and talk to a ChatGPT-style model, one stage at a time.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--stage", required=True, choices=list(STAGES), help="which stage to run")
    # data
    p.add_argument("--data", default="tinyworld", choices=["tinyworld", "hf"],
                   help="tinyworld: the embedded synthetic world (offline); hf: real datasets (parquet shards in --data-dir)")
    p.add_argument("--data-dir", default=None, help="folder of FineWeb-EDU style parquet shards (text column) for --data hf")
    # tokenizer
    p.add_argument("--vocab-size", type=int, default=4096, help="tok: vocabulary size (256 bytes + merges + special tokens)")
    p.add_argument("--tok-chars", type=int, default=2_000_000, help="tok: characters of training text")
    # model
    p.add_argument("--depth", type=int, default=4, help="number of transformer blocks; the width follows from it")
    p.add_argument("--aspect-ratio", type=int, default=32, help="width = depth x aspect ratio, rounded up to whole heads (nanochat: 64)")
    p.add_argument("--head-dim", type=int, default=32, help="dimension of each attention head (nanochat: 128)")
    p.add_argument("--n-kv-head", type=int, default=None, help="key/value heads for grouped-query attention (default: as many as query heads)")
    p.add_argument("--max-seq-len", type=int, default=256, help="context length in tokens")
    p.add_argument("--model-tag", default=None, help="checkpoint name (default: d<depth>)")
    # training
    p.add_argument("--device-batch-size", type=int, default=16, help="sequences per forward pass on each device")
    p.add_argument("--total-batch-size", type=int, default=8192, help="tokens per optimizer step (gradient accumulation makes up the rest)")
    p.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1: from --target-param-data-ratio)")
    p.add_argument("--target-param-data-ratio", type=float, default=20, help="training tokens per parameter when --num-iterations is -1 (Chinchilla: 20)")
    p.add_argument("--matrix-lr", type=float, default=0.02, help="Muon learning rate for the block matrices")
    p.add_argument("--embedding-lr", type=float, default=0.2, help="AdamW learning rate for wte (scaled by (width/768)^-0.5)")
    p.add_argument("--unembedding-lr", type=float, default=0.004, help="AdamW learning rate for lm_head (scaled likewise)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--warmup-ratio", type=float, default=0.0, help="fraction of steps with linear LR warm-up")
    p.add_argument("--warmdown-ratio", type=float, default=0.2, help="fraction of steps at the end with linear LR decay")
    p.add_argument("--final-lr-frac", type=float, default=0.0, help="LR at the end as a fraction of the initial LR")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"], help="torch.compile the model (auto: on for CUDA only)")
    p.add_argument("--resume", action="store_true", help="continue this stage from its last checkpoint")
    p.add_argument("--seed", type=int, default=1337, help="random seed")
    # evaluation and logging
    p.add_argument("--eval-every", type=int, default=100, help="steps between validation bits-per-byte evaluations (0: only at the end)")
    p.add_argument("--eval-batches", type=int, default=8, help="validation batches per evaluation")
    p.add_argument("--save-every", type=int, default=100, help="steps between checkpoints (0: only at the end)")
    p.add_argument("--log-every", type=int, default=10, help="steps between log lines")
    p.add_argument("--sample-prompts", nargs="*", default=["The capital of France is", "Once upon a time"],
                   help="prompts to sample from at the end of base training")
    # report
    p.add_argument("--report-path", default="report.md", help="report: where to write the markdown report")
    p.add_argument("--wall-seconds", type=int, default=None, help="report: the whole run's wall time, as measured by speedrun.sh")
    return p


def validate_args(args):
    for name in ("vocab_size", "depth", "max_seq_len", "device_batch_size", "total_batch_size", "eval_batches", "log_every"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.data == "hf" and args.data_dir is None:
        raise UserError("--data hf needs --data-dir: a folder of parquet shards with a `text` column")


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        validate_args(args)
        torch.manual_seed(args.seed)
        ddp = init_distributed()
        STAGES[args.stage](args, ddp)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
