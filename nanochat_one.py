"""
nanochat-one: a ChatGPT-style model built end to end in one readable file.

    BPE tokenizer -> base pretraining -> mid-training -> SFT -> RL (GRPO) -> evaluation -> chat

Everything runs offline on a laptop CPU with the embedded TinyWorld data (tinyworld.py: a small,
consistent synthetic world of countries and capitals, animals, colours, arithmetic, stories and
word problems), and the same code scales to a GPU node with torchrun and real data.

One command per stage; each finds its input checkpoint by convention (base -> mid -> sft -> rl):

    python nanochat_one.py --stage tok             # train the BPE tokenizer (bpe.py)
    python nanochat_one.py --stage base            # pretrain; val bits-per-byte and samples
    python nanochat_one.py --stage mid             # conversations, multiple choice, tool use
    python nanochat_one.py --stage sft             # supervised fine-tuning on assistant turns
    python nanochat_one.py --stage rl              # simplified GRPO on word problems
    python nanochat_one.py --stage eval --source sft
    python nanochat_one.py --stage eval --source base --core-bundle eval_bundle  # CORE (DCLM tasks)
    python nanochat_one.py --stage chat -p "What is the capital of France?"
    python nanochat_one.py --stage serve --source rl  # chat in a browser at http://127.0.0.1:8000/
    python nanochat_one.py --stage report          # gather everything into report.md

Any training stage continues from its last checkpoint with --resume. The laptop pipeline is
`bash speedrun.sh` (tiny depth, CPU, minutes); `bash speedrun.sh d20` is nanochat's speedrun on one
node with 8 GPUs. What such a run costs, before paying for it, and its base stage by hand:

    python nanochat_one.py --stage plan --depth 20 --aspect-ratio 64 --head-dim 128 \
        --max-seq-len 2048 --vocab-size 65536 --device-batch-size 32 --total-batch-size 524288 \
        --target-param-data-ratio 20 --gpus 8
    torchrun --standalone --nproc_per_node=8 nanochat_one.py --stage base --data hf --depth 20 \
        --aspect-ratio 64 --head-dim 128 --max-seq-len 2048 --device-batch-size 32 \
        --total-batch-size 524288 --target-param-data-ratio 20

Artifacts (tokenizer, checkpoints, reports) go to $NANOCHAT_BASE_DIR, default ./runs next to
this file. The sections below are in dependency order: runtime, tokenizer glue, data, model (and
its fused loss), optimizers, loaders, engine, evaluation, checkpoints and reports, training, the
training stages (tok, base, mid, sft, rl), the public benchmarks, the other stages, CLI. The
companion modules each hold one job a learner does not come for, and none imports this file:
bpe.py (the tokenizer), tinyworld.py (the synthetic data), realdata.py (the real datasets and your
own files), sandbox.py (the calculator and HumanEval's model-written code), serve.py (HTTP for
--stage serve), report.py (the statistics behind each accuracy, and report.md) and hardware.py
(GPU peaks and a run's cost, CPU settings, crash-safe files).
"""
import argparse
import contextlib
import dataclasses
import functools
import itertools
import json
import math
import os
import random
import re
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import bpe
import hardware
import realdata
import report
import sandbox
import serve
import tinyworld
# the numbers every stage prints: an accuracy as "55.5% +- 2.5 [50.6, 60.3] (N=400)" (+- one
# standard error, [the Wilson 95% interval]), a change measured item by item, pass@k, a time as
# "3m27s"
from report import (accuracy_stats, format_accuracy, format_seconds, paired_difference,
                    pass_at_k_stats, share_of)


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
if DEVICE_TYPE == "cuda":
    # fp32 matmuls (outside autocast) on TF32 tensor cores
    torch.set_float32_matmul_precision("high")


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
    """Read torchrun's environment variables and join the process group (NCCL on GPUs, gloo
    on CPU)."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if DEVICE_TYPE == "cuda" else torch.device(DEVICE_TYPE)
    if DEVICE_TYPE == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if DEVICE_TYPE == "cuda" else "gloo",
                                device_id=device if DEVICE_TYPE == "cuda" else None)
    return Dist(rank, local_rank, world_size, device)


def print0(*args, **kwargs):
    """print, on rank 0 only."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def base_dir():
    return Path(os.environ.get("NANOCHAT_BASE_DIR", Path(__file__).resolve().parent / "runs"))


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
    # a file that bpe.py cannot read (a ValueError) is remade by the tok stage: say so in one line
    try:
        return bpe.Tokenizer.load(path)
    except ValueError as e:
        raise UserError(f"{e}: run `python nanochat_one.py --stage tok` again") from None


def tokenizer_id(tokenizer):
    """A short fingerprint of the tokenizer, stored in checkpoints to catch mismatches."""
    # everything that decides which ids a text gets: the split pattern, the merges in their order
    # and the special tokens
    blob = json.dumps([tokenizer.pattern, tokenizer.merges, list(tokenizer.special_tokens)]).encode()
    return f"{zlib.crc32(blob):08x}-{tokenizer.vocab_size}"


def token_byte_lengths(tokenizer, device="cpu"):
    """Bytes of text behind each token id; 0 for special tokens, which bits-per-byte ignores."""
    # ids 0-255 are the single bytes, each merge adds the next id, and the special tokens come last
    lengths = [len(tokenizer.vocab[i]) for i in range(256 + len(tokenizer.merges))]
    lengths += [0] * len(tokenizer.special_tokens)
    return torch.tensor(lengths, dtype=torch.int64, device=device)


def render_conversation(tokenizer, conversation, max_tokens=None, assistant_only=True):
    """Turn a conversation into token ids and a loss mask (1 = the model learns to say this).

    conversation: {"messages": [{"role": "user"|"assistant"|"system", "content": ...}, ...]}.
    Assistant content is a string, or a list of parts {"type": "text"|"python"|"python_output",
    "text": ...} for answers that call the calculator. For example
        user "1+1?" / assistant [text "Sure: ", python "1+1", python_output "2", text "2"]
    renders as (mask underneath)
        <|bos|> <|user_start|> 1+1? <|user_end|> <|assistant_start|> Sure: <|python_start|> 1+1
           0          0          0        0               0            1          1          1
        <|python_end|> <|output_start|> 2 <|output_end|> 2 <|assistant_end|>
              1               0         0       0        1        1
    The model learns the assistant's words, its tool calls and when to stop; never the user's
    words, nor the tool's output, which the engine forces in at inference time. With
    assistant_only=False (mid-training) the mask is 1 on every token but the tool's output, so
    the model also learns the user turns and the special tokens around them. Message text
    is encoded as ordinary text, so a user typing "<|assistant_start|>" cannot inject the token."""
    messages = list(conversation["messages"])
    # no system role: fold it into the first user turn
    if messages and messages[0]["role"] == "system":
        if len(messages) < 2 or messages[1]["role"] != "user":
            raise ValueError("a system message must be followed by a user message")
        messages = [dict(role="user",
                         content=messages[0]["content"] + "\n\n" + messages[1]["content"])] + messages[2:]
    special = tokenizer.special_tokens
    # for <|bos|>, the user's turns and <|assistant_start|>
    prompt_mask = 0 if assistant_only else 1
    ids, mask = [special["<|bos|>"]], [prompt_mask]

    # every token is added with its mask flag, so ids and mask always have the same length
    def add(tokens, supervised):
        ids.extend(tokens)
        mask.extend([supervised] * len(tokens))

    # after the fold, even turns are the user's and odd turns the assistant's
    for i, message in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise ValueError(f"message {i} has role {message['role']!r}; roles must alternate user, "
                             "assistant, ... starting with user (after an optional system message)")
        content = message["content"]
        if expected == "user":
            if not isinstance(content, str):
                raise ValueError(f"message {i}: user content must be a string")
            add([special["<|user_start|>"]] + tokenizer.encode_ordinary(content)
                + [special["<|user_end|>"]], prompt_mask)
            continue
        # <|assistant_start|> belongs to the prompt: at inference render_for_completion writes it,
        # so the model never has to
        add([special["<|assistant_start|>"]], prompt_mask)
        # a plain string is one text part, so both forms of an answer go through the same loop
        parts = [dict(type="text", text=content)] if isinstance(content, str) else content
        for part in parts:
            text = tokenizer.encode_ordinary(part["text"])
            if part["type"] == "text":
                add(text, 1)
            elif part["type"] == "python":
                add([special["<|python_start|>"]] + text + [special["<|python_end|>"]], 1)
            elif part["type"] == "python_output":
                add([special["<|output_start|>"]] + text + [special["<|output_end|>"]], 0)
            else:
                raise ValueError(f"message {i}: unknown content part type {part['type']!r}")
        add([special["<|assistant_end|>"]], 1)
    return ids[:max_tokens], mask[:max_tokens]  # max_tokens=None keeps them whole


def render_for_completion(tokenizer, conversation):
    """The prompt for the model's next answer: the conversation without its last assistant
    message (if any), then <|assistant_start|>."""
    messages = list(conversation["messages"])
    # a conversation from the data ends with its reference answer: drop it, the model writes its own
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    ids, _ = render_conversation(tokenizer, dict(messages=messages))
    # the prompt ends with <|assistant_start|>, so the model's next token is the answer's first
    return ids + [tokenizer.special_tokens["<|assistant_start|>"]]


# -----------------------------------------------------------------------------------------------
# Data: documents for pretraining, from TinyWorld (tinyworld.py) or parquet shards with a `text`
# column (a local folder, or FineWeb-EDU downloaded from the hub: realdata.py)

def base_data_dir(args):
    """The folder of base-data shards: --data-dir, else <base_dir>/base_data (filled by
    download_shards)."""
    return Path(args.data_dir) if args.data_dir else base_dir() / "base_data"


def document_stream(args, split, start=0, rank=0, world_size=1):
    """This rank's (position, text) documents from position `start` on: every world_size-th of
    TinyWorld's, or the parquet row groups it owns (no rank reads another's text)."""
    if args.data == "tinyworld":
        return ((p, text) for p, text in tinyworld.tinyworld_documents(split, start)
                if p % world_size == rank)
    return realdata.parquet_documents(base_data_dir(args), split, start, rank, world_size)


# -----------------------------------------------------------------------------------------------
# Data: conversations for mid-training and SFT, from TinyWorld's chat mixture, real chat data
# (SmolTalk, MMLU and GSM8K: realdata.py) or your own


@functools.cache
def own_conversations(data_dir):
    """Your own conversations for mid-training and SFT: the lines of the *.jsonl files at the top of
    --data-dir, {"messages": [{"role": ..., "content": ...}, ...]} as in SmolTalk, all read and
    rendered (so checked) before training starts."""
    paths = sorted(Path(data_dir).glob("*.jsonl")) if data_dir else []
    tokenizer = get_tokenizer() if paths else None

    def read(conversation):
        render_conversation(tokenizer, conversation)  # ValueError, KeyError, ... when malformed
        return dict(messages=conversation["messages"])

    expected = '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}'
    return [conversation for path in paths for conversation in realdata.read_jsonl(path, read, expected)]


def chat_examples(args, split, start=0, stage="mid"):
    """Yield (position, conversation) forever: TinyWorld's chat mixture or the real chat data; in
    training, with --data-dir's own conversations (own_conversations) in place of every other one,
    and a --replay share of TinyWorld pretraining documents, {"document": text}, each chosen by a
    hash of the position (so every rank and every resume agree)."""
    named = (tinyworld.tinyworld_chat_examples(split, start, stage) if args.data == "tinyworld"
             else realdata.chat_examples(args.data_dir, split, start, stage))
    own = own_conversations(args.data_dir) if split == "train" else []
    replay = args.replay if split == "train" else 0.0
    for position, conversation in named:
        if own and zlib.crc32(b"own-%d" % position) % 2:  # every other one, by a hash every rank agrees on
            conversation = own[position % len(own)]
        if zlib.crc32(b"replay-%d" % position) < replay * 2**32:
            conversation = dict(document=tinyworld.tinyworld_document(random.Random(f"replay:{position}")))
        yield position, conversation


def render_example(tokenizer, example, max_tokens=None, assistant_only=True):
    """A chat stage's training example as (ids, mask): a conversation as render_conversation renders
    it, a replayed pretraining document (chat_examples) as base reads it, every token trained (its
    <|bos|> too, where packing puts it after another example, as in base and in mid's conversations)."""
    if "document" not in example:
        return render_conversation(tokenizer, example, max_tokens, assistant_only)
    ids = ([tokenizer.special_tokens["<|bos|>"]] + tokenizer.encode_ordinary(example["document"]))[:max_tokens]
    return ids, [1] * len(ids)


# -----------------------------------------------------------------------------------------------
# Model: GPT with rotary embeddings, QK-norm, smeared keys, ReLU^2 MLP, tied head and logit softcap
#
# Departures from the textbook GPT-2, each for a reason:
# - RMSNorm with no learnable weights: as good in practice, fewer parameters to think about.
# - Norm right after the embedding and on q and k (QK-norm): keeps attention logits bounded,
#   which makes training stable at high learning rates.
# - Rotary position embeddings instead of learned positions: relative, no extra parameters.
# - ReLU^2 instead of GELU: slightly better in speedruns, and simpler.
# - Zero-initialised output projections: each block starts as the identity.
# - The head is the embedding read backwards (tied, as GPT-2; nanochat unties them). A head that
#   copies a token from the context then copies any token: whatever moves wte[t] into the
#   residual stream scores t. Untied, each token's pair must line up on its own, and the tiny
#   model never learned to copy a token it had not copied in training.
# - Smeared keys: each head's key mixes in the previous position's key with a learned weight,
#   so one layer can find "the token after the last time this token appeared" and copy it:
#   the induction head (Olsson et al. 2022), which a 4-layer model otherwise did not form
#   within the laptop's 320 steps. Lesson 04 measures the smear's effect on pure copying.
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
        raise UserError("--head-dim must be a positive even number (rotary pairs dimensions), "
                        f"got {head_dim}")
    n_embd = math.ceil(depth * aspect_ratio / head_dim) * head_dim
    n_head = n_embd // head_dim
    n_kv_head = n_head if n_kv_head is None else n_kv_head
    if n_kv_head < 1 or n_head % n_kv_head:
        raise UserError(f"--n-kv-head {n_kv_head} must divide the number of heads "
                        f"({n_head} at depth {depth})")
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
    k, v: (n_layer, B, n_kv_head, max_len, head_dim); pos = how many positions are filled.
    valid: None, or (B, max_len) bool, False where a row's prompt is padded on the left: prompts of
    different lengths then share one batch, and no token attends to the padding. (Rotary
    attention depends only on distances, so a row shifted right by its padding scores the same.)"""

    def __init__(self, batch_size, n_kv_head, head_dim, max_len, n_layer, device, dtype, valid=None):
        shape = (n_layer, batch_size, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos, self.valid = 0, valid

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

    def repeat_rows(self, n):
        """Each row n times in a row: a prompt read once, then continued in n samples."""
        self.k, self.v = self.k.repeat_interleave(n, dim=1), self.v.repeat_interleave(n, dim=1)
        self.valid = None if self.valid is None else self.valid.repeat_interleave(n, dim=0)

    def keep_rows(self, keep):
        """Only the rows at the indices `keep` (a tensor): finished rows leave the batch."""
        self.k, self.v = self.k[:, keep], self.v[:, keep]
        self.valid = None if self.valid is None else self.valid[keep]


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
        # the previous key's weight, sigmoid(0) = 0.5
        self.smear = nn.Parameter(torch.zeros(self.n_kv_head))

    def smeared(self, k, valid=None):
        """k_t <- (1 - w) k_t + w k_{t-1}, w = sigmoid(smear) per key head; k: (B, Hkv, T, D).
        There is no key before the first position, nor before the first of a padded row's tokens
        (valid: (B, T))."""
        previous = F.pad(k, (0, 0, 1, 0))[:, :, :-1]
        if valid is not None:
            previous = previous * F.pad(valid, (1, 0))[:, None, :-1, None]
        w = torch.sigmoid(self.smear).to(k.dtype)[None, :, None, None]
        return torch.lerp(k, previous, w)

    def forward(self, x, cos, sin, kv_cache=None):
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k = norm(q).to(v.dtype), norm(k).to(v.dtype)  # QK-norm (autocast may run norms in fp32)
        gqa = self.n_kv_head != self.n_head
        if kv_cache is None:
            y = F.scaled_dot_product_attention(q, self.smeared(k), v, is_causal=True, enable_gqa=gqa)
        else:
            # (B, Hkv, Tk, D), all positions so far, unsmeared
            k, v = kv_cache.insert(self.layer_idx, k, v)
            Tk = k.size(2)
            k = self.smeared(k, None if kv_cache.valid is None else kv_cache.valid[:, :Tk])
            # T new tokens after Tk - T cached ones: query i sees keys 0 .. Tk - T + i
            mask = (None if T == 1 else
                    torch.ones(T, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - T))
            # and not the padding; a pad sees itself (a row of -inf gives NaN)
            if kv_cache.valid is not None:
                itself = (torch.arange(Tk, device=q.device)
                          == torch.arange(Tk - T, Tk, device=q.device)[:, None])
                mask = (kv_cache.valid[:, None, None, :Tk] | itself) & (True if mask is None else mask)
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
        # rotary tables for 10x the training length (generation may run longer); buffers that
        # are not saved, so the state dict holds exactly the parameters
        self.rotary_len = config.sequence_len * 10
        cos, sin = self.rotary_tables(self.rotary_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def rotary_tables(self, length, base=10000, device=None):
        head_dim = self.config.n_embd // self.config.n_head
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
        # (T, D/2)
        angles = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)
        return angles.cos()[None, None], angles.sin()[None, None]  # (1, 1, T, D/2)

    @torch.no_grad()
    def init_weights(self):
        # wte ~ N(0, 1); matrices that read the residual stream ~ N(0, s) with
        # s = 1/sqrt(fan_in) * min(1, sqrt(fan_out/fan_in)); the output projections start at zero,
        # so at init every block is the identity. Each key head starts as a copy of its first query
        # head (c_k = c_q), so a query scores highest the keys of its own token, and keys start half
        # smeared (sigmoid(0)): from the first step a head prefers the position after an earlier
        # occurrence of its token, the match an induction head needs, and training only has to
        # sharpen it (measured once on the speedrun's base stage: val bpb 0.42 -> 0.32, most of it
        # on the copying paragraphs).
        torch.nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        for block in self.transformer.h:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                fan_out, fan_in = linear.weight.shape
                std = 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))
                torch.nn.init.normal_(linear.weight, mean=0.0, std=std)
            torch.nn.init.zeros_(block.attn.c_proj.weight)
            torch.nn.init.zeros_(block.mlp.c_proj.weight)
            attn = block.attn
            group = attn.n_head // attn.n_kv_head  # query heads per key head
            attn.c_k.weight.copy_(attn.c_q.weight.view(attn.n_head, attn.head_dim, -1)[::group].flatten(0, 1))
            torch.nn.init.zeros_(attn.smear)
        cos, sin = self.rotary_tables(self.rotary_len, device=self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def estimate_flops(self):
        """Training FLOPs per token: 6 per matmul parameter (2 forward, 4 backward) plus attention
        scores and values, 12 * n_layer * n_head * head_dim * T. wte counts once, as the head: the
        embedding lookup is free (and the smear weights, a few scalars, are not matrices)."""
        c = self.config
        matmul_params = sum(p.numel() for p in self.parameters() if p.ndim == 2)
        return 6 * matmul_params + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * c.sequence_len

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        B, T = idx.shape
        t0 = kv_cache.pos if kv_cache is not None else 0
        if t0 + T > self.rotary_len:
            raise ValueError(f"sequence of {t0 + T} tokens is longer than the rotary table "
                             f"({self.rotary_len})")
        cos, sin = self.cos[:, :, t0:t0 + T], self.sin[:, :, t0:t0 + T]
        with autocast():
            x = norm(self.transformer.wte(idx))  # (B, T, C)
            for block in self.transformer.h:
                x = block(x, cos, sin, kv_cache)
            x = norm(x)
            # (B, T, vocab), tied
            logits = F.linear(x, self.transformer.wte.weight) * self.config.n_embd ** -0.5
        logits = logits.float()  # the softcap and the loss in fp32
        if targets is None:
            return 15 * torch.tanh(logits / 15)
        targets = targets.reshape(-1)
        # loss = F.cross_entropy(15 * tanh(logits / 15), targets, ignore_index=-1,
        # reduction="none"), the textbook formula, computed in one fused step that saves most of its
        # memory (SoftcapCrossEntropy, below)
        loss = SoftcapCrossEntropy.apply(logits.view(-1, logits.size(-1)), targets, 15.0)  # (B*T,)
        if loss_reduction == "none":
            return loss
        if loss_reduction == "sum":
            return loss.sum()
        # the mean over the tokens that have a target (0 if none)
        return loss.sum() / (targets >= 0).sum().clamp(min=1)


# -----------------------------------------------------------------------------------------------
# The loss, fused: GPT.forward's cross-entropy of the softcapped logits, the same numbers in a
# fraction of the memory (a speed-up, not a new idea: tests/test_model.py equates the two)

class SoftcapCrossEntropy(torch.autograd.Function):
    """Per-row loss -log softmax(z)[target] of the softcapped logits z = cap * tanh(logits / cap), 0
    where the target is -1; logits (N, V) fp32, targets (N,) -> (N,). The arithmetic of
    F.cross_entropy(cap * torch.tanh(logits / cap), targets, ignore_index=-1, reduction="none"),
    written out because the (N, V) tensors are most of a small model's step: autograd through the
    plain ops makes about nine, this makes one (the tanh, kept, then overwritten by the gradient):
        d loss / d z = softmax(z) - onehot(target),     d z / d logits = 1 - tanh(logits / cap)^2
    On a CPU it works in blocks of rows that stay in the cache (in one block on a GPU or under
    torch.compile, where the CPU code gets tanh(u) as 2 sigmoid(2u) - 1: Inductor's CPU tanh runs
    one float at a time, its exp 16). As |z| <= cap, sum(exp(z)) <= V e^cap (2e11 at V = 65536)
    needs no max subtracted first. tests/test_model.py checks it against the plain ops."""

    @staticmethod
    def blocks(n_rows, n_cols, device):  # slices of at most 2^18 floats on a CPU
        rows = n_rows if device.type != "cpu" or torch.compiler.is_compiling() else max(1, 2 ** 18 // n_cols)
        return [slice(r, r + rows) for r in range(0, n_rows, rows)]

    @staticmethod
    def forward(ctx, logits, targets, cap):
        squashed = torch.empty_like(logits)  # (N, V) tanh(logits / cap)
        sum_exp = logits.new_empty(logits.size(0))  # (N,) sum of exp(z) over the vocabulary
        for rows in SoftcapCrossEntropy.blocks(*logits.shape, logits.device):
            # 2x faster, see above
            if torch.compiler.is_compiling() and logits.device.type == "cpu":
                block = squashed[rows] = torch.sigmoid(logits[rows] * (2 / cap)) * 2 - 1
            else:
                block = torch.div(logits[rows], cap, out=squashed[rows]).tanh_()
            sum_exp[rows] = block.mul(cap).exp_().sum(dim=-1)
        valid, safe_targets = targets >= 0, targets.clamp_min(0)
        # (N,)
        loss = (sum_exp.log() - cap * squashed.gather(1, safe_targets[:, None]).squeeze(1)) * valid
        ctx.save_for_backward(squashed, sum_exp, safe_targets, valid)
        ctx.cap = cap
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        squashed, sum_exp, safe_targets, valid = ctx.saved_tensors
        scale = (grad_loss * valid)[:, None]  # (N, 1)
        # (N, 1) tanh at the target, before it is overwritten
        at_target = squashed.gather(1, safe_targets[:, None])
        for rows in SoftcapCrossEntropy.blocks(*squashed.shape, squashed.device):
            block = squashed[rows]
            softmax = block.mul(ctx.cap).exp_().div_(sum_exp[rows, None])
            # (1 - tanh^2) softmax(z), in place
            block.square_().neg_().add_(1).mul_(softmax).mul_(scale[rows])
        # - (1 - tanh^2) onehot
        squashed.scatter_add_(1, safe_targets[:, None], -(1 - at_target.square()) * scale)
        return squashed, None, None  # the gradient, in the memory of the saved tanh


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
    # one quintic step, X <- a X + b (X X^T) X + c (X X^T)^2 X: each singular value s becomes
    # a s + b s^3 + c s^5, and the singular vectors stay
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if transposed:
        X = X.mT
    return X.to(G.dtype)


# compiled on CUDA, as nanochat does (one graph per matrix shape; on a CPU compiling would cost more
# than it saves)
orthogonalize = (torch.compile(newton_schulz_orthogonalize) if DEVICE_TYPE == "cuda"
                 else newton_schulz_orthogonalize)


def orthogonalize_shared(updates, steps):
    """orthogonalize() of a stack (n, rows, cols); under torch.distributed each of the W ranks does
    ceil(n / W) of the matrices (the stack padded with zeros, which stay zero) and all-gathers the
    rest."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return orthogonalize(updates, steps)
    world, n = dist.get_world_size(), updates.size(0)
    # ceil(n / world), by floor division of negatives
    share = -(-n // world)
    # all_gather takes equal chunks: pad the stack to share * world matrices
    padded = torch.cat([updates, updates.new_zeros(share * world - n, *updates.shape[1:])])
    gathered = list(torch.empty_like(padded).chunk(world))
    dist.all_gather(gathered, orthogonalize(
        padded[dist.get_rank() * share:(dist.get_rank() + 1) * share], steps))
    # the results in stack order on every rank, less the padding's
    return torch.cat(gathered)[:n]


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz.

    For each 2-D weight: Nesterov momentum on the gradient, then replace the update by its
    orthogonalisation (all singular values ~1), scaled by sqrt(max(1, rows/cols)). Every
    direction of the matrix moves by a similar amount, which trains transformer matrices faster
    than Adam. Not for embeddings, the output head or 1-D parameters: use AdamW for those.
    Under DDP the gradients are already averaged, so every rank would compute the same update;
    instead each orthogonalises its share of the matrices and they exchange the results (as
    nanochat's DistMuon shares the work), so no rank does the whole Newton-Schulz."""

    def __init__(self, params, lr=0.02, momentum=0.95, ns_steps=5):
        super().__init__(params, dict(lr=lr, momentum=momentum, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            # a parameter without a gradient keeps its weights and its momentum this step
            params = [p for p in group["params"] if p.grad is not None]
            # matrices of one shape are orthogonalised together, as one batch: a few large matmuls
            # instead of many small ones (the same arithmetic, matrix by matrix)
            for shape in dict.fromkeys(p.shape for p in params):
                same = [p for p in params if p.shape == shape]
                updates = []
                for p in same:
                    buf = self.state[p].get("momentum_buffer")
                    if buf is None:  # the first step
                        buf = self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                    buf.lerp_(p.grad, 1 - group["momentum"])  # buf = m * buf + (1 - m) * grad
                    # Nesterov: look one step ahead
                    updates.append(p.grad.lerp(buf, group["momentum"]))
                # (n, rows, cols)
                updates = orthogonalize_shared(torch.stack(updates), group["ns_steps"])
                # the orthogonalisation threw away the gradient's magnitude: the step's size is set
                # by lr and this shape factor alone
                scale = max(1.0, shape[-2] / shape[-1]) ** 0.5
                for p, update in zip(same, updates):
                    p.add_(update, alpha=-group["lr"] * scale)


def setup_optimizers(model, matrix_lr=0.02, embedding_lr=0.05, smear_lr=0.05, weight_decay=0.0):
    """Muon for every matrix in the blocks; AdamW for wte (the embedding and the head), its
    learning rate scaled by (n_embd/768)^-0.5 (wider models take smaller steps), and for the
    smear weights. Returns [adamw, muon]; each group remembers its base lr in "initial_lr"."""
    # only the blocks' matrices: wte is 2-D too, but it is the embedding and the head, which Muon
    # is not for (see its docstring)
    matrices = [p for p in model.transformer.h.parameters() if p.ndim == 2]
    # one scalar per key head (1-D), so AdamW's as well
    smears = [block.attn.smear for block in model.transformer.h]
    # 1 at width 768 (GPTConfig's default), where embedding_lr applies as given
    scale = (model.config.n_embd / 768) ** -0.5
    adamw = torch.optim.AdamW(
        [dict(params=[model.transformer.wte.weight], lr=embedding_lr * scale),
         dict(params=smears, lr=smear_lr)],
        betas=(0.8, 0.95), eps=1e-10, weight_decay=weight_decay, fused=DEVICE_TYPE == "cuda")
    muon = Muon(matrices, lr=matrix_lr, momentum=0.95)
    # the schedules (set_lr) multiply initial_lr, never the current lr, so a decay does not compound
    for opt in (adamw, muon):
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return [adamw, muon]


def lr_multiplier(step, num_steps, warmup_ratio=0.0, warmdown_ratio=0.2, final_lr_frac=0.0):
    """Warm up linearly, hold, then decay linearly to final_lr_frac over the last warmdown_ratio."""
    warmup, warmdown = round(warmup_ratio * num_steps), round(warmdown_ratio * num_steps)
    # step + 1: the first step already trains, at 1/warmup of the rate
    if step < warmup:
        return (step + 1) / warmup
    # with no warm-down every step (< num_steps) returns here, so the division below never sees 0
    if step < num_steps - warmdown:
        return 1.0
    # progress falls from 1 to 1/warmdown at the last step, which still trains a little
    progress = (num_steps - step) / warmdown
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(step):
    """Muon's momentum ramps from 0.85 to 0.95 over the first 300 steps."""
    frac = min(step / 300, 1.0)
    return (1 - frac) * 0.85 + frac * 0.95


def set_lr(optimizers, lrm):
    """Every parameter group's learning rate: its initial_lr times the multiplier lrm."""
    for opt in optimizers:
        for param_group in opt.param_groups:
            param_group["lr"] = param_group["initial_lr"] * lrm


def apply_schedules(optimizers, step, num_steps, args):
    """The learning rates (lr_multiplier of the flags' warm-up and warm-down) and Muon's momentum
    for `step`; returns the multiplier."""
    lrm = lr_multiplier(step, num_steps, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
    set_lr(optimizers, lrm)
    # Muon's momentum is scheduled too; AdamW's betas stay as setup_optimizers set them
    for opt in optimizers:
        if isinstance(opt, Muon):
            for param_group in opt.param_groups:
                param_group["momentum"] = muon_momentum(step)
    return lrm


# -----------------------------------------------------------------------------------------------
# Loaders

def pack_rows(docs_from, B, T, state=None, buffer_size=256):
    """BOS-aligned best-fit packing. docs_from(start) yields (position, token list starting with
    BOS) from stream position `start` on. Yields (rows, state): rows is B lists of exactly T + 1
    tokens; state = dict(last=position of the last document drawn, buffer=positions of the
    documents waiting in the buffer, in order) is all the packer remembers, so
    pack_rows(docs_from, B, T, state) continues exactly where that batch left off.

    Each row starts with the longest document in a buffer, then repeatedly takes the largest
    one that still fits; when none fits, the shortest document is cropped to fill the row
    exactly. So every row starts with BOS (a document start), no padding is ever needed, few
    tokens are cropped away, and long documents are not starved by short ones."""
    if state is None:  # a fresh start has drawn nothing and keeps nothing waiting
        last, waiting = -1, []
    else:
        last, waiting = state["last"], state["buffer"]
    # a resumed packer reads the stream again from its oldest waiting document (a fresh one from
    # the next new document), takes the waiting ones back as they pass, and stops at `last`, the
    # newest document drawn before the checkpoint: the buffer is then as it was
    docs = docs_from(min(waiting, default=last + 1))
    found = {}
    if waiting:
        for position, doc in docs:
            found[position] = doc
            if position == last:
                break
    buffer = [(position, found[position]) for position in waiting]  # (position, tokens)
    while True:
        rows = []
        for _ in range(B):
            row = []
            # T + 1 tokens: the inputs are row[:-1] and the targets row[1:], T of each
            while len(row) < T + 1:
                # top the buffer up first, so each pick is the best fit among buffer_size documents
                while len(buffer) < buffer_size:
                    try:
                        last, doc = next(docs)
                    except StopIteration:  # only a finite (validation) stream ends
                        raise UserError("the validation documents ran out before an evaluation was "
                                        "complete: lower --eval-batches or --device-batch-size, or "
                                        "use a larger validation shard") from None
                    buffer.append((last, doc))
                space = T + 1 - len(row)
                lengths = [len(doc) for _, doc in buffer]
                fitting = [i for i, n in enumerate(lengths) if n <= space]
                # a new row starts with the longest document (cropped if longer than a row)
                if not row:
                    i = max(range(len(buffer)), key=lambda i: lengths[i])
                elif fitting:  # then the largest document that still fits
                    i = max(fitting, key=lambda i: lengths[i])
                else:  # the gap at the end is filled with a crop of the shortest document
                    i = min(range(len(buffer)), key=lambda i: lengths[i])
                # what does not fit is dropped, not carried over: every row starts at a BOS
                row.extend(buffer.pop(i)[1][:space])
            rows.append(row)
        # positions only, not tokens: a checkpoint stores a small state, and a resume re-reads them
        yield rows, dict(last=last, buffer=[position for position, _ in buffer])


def to_device(batch, device):
    """A contiguous copy of a CPU batch on `device`; to a GPU from pinned (page-locked) memory,
    asynchronously, so the copy overlaps the GPU's work instead of waiting for it."""
    if torch.device(device).type == "cuda":
        return batch.contiguous().pin_memory().to(device, non_blocking=True)
    return batch.contiguous().to(device)


def drill_ids(tokenizer):
    """The token ids of copy drills and of the induction score: merged tokens rather than raw bytes,
    from 300 up to 4000 or the special tokens (which come after the merges), less those that write a
    number ("17", "twenty", "-six"). Digits and number words copied at random cost the model its
    reading of numbers: with them in the drills, the lessons' model read "twenty-six" as 24 and
    solved 35.5% of the harder word problems after SFT."""
    # the special tokens follow the merges: the smallest of their ids counts the ordinary tokens
    vocab = min(tokenizer.special_tokens.values())
    words = " ".join(tinyworld.NUMBER_WORDS).replace("-", " ")

    def writes_number(text):
        text = text.strip(" -").lower()
        # a substring test: below 3 letters a piece ("on") would match inside many number words
        return any(c.isdigit() for c in text) or (len(text) >= 3 and text in words)

    # from 300, or in a vocabulary too small for that from halfway between the bytes and its end
    return [i for i in range(min(300, (256 + vocab) // 2), min(4000, vocab))
            if not writes_number(tokenizer.decode([i]))]


def copy_drill(rng, ids, bos, length=256):
    """A drill in reading the context: `bos` then random sequences of 5-40 of the `ids` (drill_ids),
    each written twice, `length` ids or a few more. Only a look back predicts a second copy, so
    copying pays on every one of them. TinyWorld's text repeats its names at the same places of the
    same templates, which a model predicts without looking back; with a fifth of the base documents
    drills (about a third of its tokens), the speedrun's model forms induction heads (its induction
    score 0.96 -> 0.07) and carries names and subjects into its replies."""
    drill = [bos]
    while len(drill) < length:
        sequence = [ids[rng.randrange(len(ids))] for _ in range(rng.randint(5, 40))]
        drill += sequence + sequence
    return drill


def with_drills(docs, share, tokenizer, as_document=list):
    """(position, ids) documents with a `share` of them, chosen by a hash of the position (so a
    resumed run sees the same), replaced by a copy drill of the same seed, as_document(drill)."""
    ids, bos = drill_ids(tokenizer) if share else [], tokenizer.special_tokens["<|bos|>"]
    for position, doc in docs:
        # seeded by the position alone: the same choice and the same drill on every run and resume
        rng = random.Random(f"drill:{position}")
        if rng.random() < share:
            doc = as_document(copy_drill(rng, ids, bos))
        yield position, doc


def base_batches(args, tokenizer, split, B, T, ddp, device, state=None):
    """Yield (inputs, targets, state) for pretraining: (B, T) tensors, targets = inputs shifted
    left by one, and the packer's state to resume from. Each rank reads its own share
    (document_stream)."""
    bos = tokenizer.special_tokens["<|bos|>"]

    def docs_from(start):
        docs = document_stream(args, split, start, ddp.rank, ddp.world_size)
        docs = ((position, [bos] + tokenizer.encode_ordinary(text)) for position, text in docs)
        # validation: text only
        return with_drills(docs, args.copy_drills if split == "train" else 0.0, tokenizer)

    for rows, state in pack_rows(docs_from, B, T, state):
        # (B, T + 1): inputs the first T tokens, targets the last T
        batch = torch.tensor(rows, dtype=torch.long)
        yield to_device(batch[:, :-1], device), to_device(batch[:, 1:], device), state


def mid_batches(args, tokenizer, split, B, T, ddp, device, state=None):
    """Mid-training batches: conversations packed like documents (BOS-aligned best fit), with
    the loss on every token except the calculator's outputs, which are never trained on."""

    def docs_from(start):
        share = args.copy_drills if split == "train" else 0.0
        # a drill trains on every token
        yield from with_drills(conversations_from(start), share, tokenizer,
                               lambda drill: [(token, 1) for token in drill])

    def conversations_from(start):
        for position, conversation in chat_examples(args, split, start, "mid"):
            if position % ddp.world_size == ddp.rank:
                ids, mask = render_example(tokenizer, conversation, assistant_only=False)
                yield position, list(zip(ids, mask))  # (token, trained on?) pairs, packed as one

    for rows, state in pack_rows(docs_from, B, T, state):
        # (B, T+1)
        ids = torch.tensor([[token for token, _ in row] for row in rows], dtype=torch.long)
        trained = torch.tensor([[flag for _, flag in row] for row in rows], dtype=torch.bool)
        # a target is trained on when the token it predicts was flagged (trained[:, 1:]); -1 is
        # the loss's ignore_index
        yield (to_device(ids[:, :-1], device),
               to_device(ids[:, 1:].masked_fill(~trained[:, 1:], -1), device), state)


def sft_batches(args, tokenizer, split, B, T, ddp, device, state=None):
    """SFT batches: one conversation per row, cropped to T + 1 tokens and padded on the right;
    targets are -1 (ignored) wherever the render mask is 0 and on the padding. The state to
    resume from is the position of the last conversation used."""
    bos = tokenizer.special_tokens["<|bos|>"]
    # resume after the last conversation a checkpointed batch used
    last = -1 if state is None else state["last"]
    examples = ((p, c) for p, c in chat_examples(args, split, last + 1, "sft")
                if p % ddp.world_size == ddp.rank)
    while True:
        rows = []
        # the loop leaves `last` at this batch's last conversation: the state yielded with it
        for last, conversation in itertools.islice(examples, B):
            rows.append(render_example(tokenizer, conversation, max_tokens=T + 1))
        # as wide as this batch's longest row (at most T + 1), so every batch has its own shape
        width = max(len(ids) for ids, _ in rows)
        # padding on the right with bos does no harm: its targets are -1, and causal attention
        # keeps a row's own tokens from seeing it
        ids = torch.full((B, width), bos, dtype=torch.long)
        targets = torch.full((B, width), -1, dtype=torch.long)
        for i, (row_ids, mask) in enumerate(rows):
            ids[i, :len(row_ids)] = torch.tensor(row_ids)
            # aligned with ids here, shifted with them below: target t is token t + 1 if trained on
            targets[i, :len(row_ids)] = torch.tensor(row_ids).masked_fill(torch.tensor(mask) == 0, -1)
        yield to_device(ids[:, :-1], device), to_device(targets[:, 1:], device), dict(last=last)


# -----------------------------------------------------------------------------------------------
# Engine: sampling with a KV cache, and the calculator tool

# the tool: arithmetic read from its syntax tree, never executed (sandbox.py)
calculator = sandbox.calculator


def sample_next(logits, rng, temperature=1.0, top_k=None):
    """Pick one token per row of logits (B, vocab): greedy at temperature 0, else sample from
    softmax(logits / temperature), optionally only among the top_k most likely tokens."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        # (B, 1): each row's k-th largest logit; the logits tied with it stay in
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    # by the inverse CDF: one uniform draw per row (torch.multinomial draws one per vocabulary
    # entry, and on a CPU that was 40% of generation time); right=True never lands on a
    # zero-probability token
    cdf = F.softmax(logits, dim=-1).cumsum(dim=-1)
    # scaled by the cdf's own total (1 up to rounding) rather than by 1, so u never lies beyond it
    u = torch.rand(cdf.size(0), 1, generator=rng, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp(max=cdf.size(-1) - 1).squeeze(-1)


@dataclass
class Reply:
    """What Engine.generate remembers of one row's reply as it is written."""
    # tokens the tool queued, sent before sampling again
    forced: list = dataclasses.field(default_factory=list)
    expression: list = None  # the tokens of a calculator call being written, else None
    done: bool = False  # it wrote a stop token


class Engine:
    """Batched generation with a KV cache and calculator tool use.

    One forward over the prompt (repeated num_samples times) fills the cache; then each step
    feeds only the newest token of every row. Each row samples its own tokens, the first one
    included. When a row writes <|python_start|> expression <|python_end|>, the engine
    evaluates the expression with `calculator` and forces <|output_start|> result
    <|output_end|> into that row, token by token, instead of sampling."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        s = tokenizer.special_tokens
        self.python_start, self.python_end = s["<|python_start|>"], s["<|python_end|>"]
        self.output_start, self.output_end = s["<|output_start|>"], s["<|output_end|>"]
        self.stop_tokens = {s["<|assistant_end|>"], s["<|bos|>"]}

    @torch.no_grad()
    def generate(self, prompt, num_samples=1, max_tokens=64, temperature=1.0, top_k=None, seed=42,
                 top_logprobs=None):
        """Yield, step by step, (tokens, sampled): the next token of every row, and for each whether
        it was sampled (True) or forced by the tool (False). A row that has written its stop token
        (<|assistant_end|> or <|bos|>) gets -1 from the next step on; generation stops when every
        row has, or after max_tokens. `prompt` is one token list, or a list of them: then rows
        i*num_samples .. (i+1)*num_samples-1 answer prompt i, the shorter prompts padded on the left
        (KVCache.valid).

        With top_logprobs=k (0 to 20) each step yields (tokens, sampled, scores) instead:
        scores[row] is (logprob, alternatives) for that row's token, or None for a finished row. The
        logprob is the model's own: log_softmax of its logits at temperature 1 over the whole
        vocabulary, whatever the temperature and top_k that sampled the token (so it says what the
        model believes, not how this sample was drawn; OpenAI reports the same). alternatives are
        the k most likely tokens there, as (token, logprob) pairs, most likely first. A token the
        tool forced is scored too: how likely the model found it. Asking for scores changes no
        token: the same seed samples the same reply."""
        model, device = self.model, self.model.cos.device
        # a generator of its own: a seed gives the same reply whatever else drew random numbers
        rng = torch.Generator(device=device)
        rng.manual_seed(seed)
        c = model.config
        # one prompt (a list of ids) or several (a list of lists)
        prompts = [prompt] if isinstance(prompt[0], int) else prompt
        width = max(len(p) for p in prompts)
        valid = None
        # padded on the left, every prompt ends at the same position: one step samples every row
        if any(len(p) < width for p in prompts):
            valid = torch.ones(len(prompts), width + max_tokens, dtype=torch.bool, device=device)
            for row, p in enumerate(prompts):
                valid[row, :width - len(p)] = False
        # room for the longest prompt and every token that may follow it
        cache = KVCache(len(prompts), c.n_kv_head, c.n_embd // c.n_head, width + max_tokens,
                        c.n_layer, device, COMPUTE_DTYPE, valid)
        # (P, width); the padding repeats a prompt's first token; `valid` hides it from attention
        ids = torch.tensor([[p[0]] * (width - len(p)) + p for p in prompts], dtype=torch.long, device=device)
        # each prompt is read once, (P, T) -> logits (P, vocab), then copied for its samples
        logits = model(ids, kv_cache=cache)[:, -1, :]
        cache.repeat_rows(num_samples)
        logits = logits.repeat_interleave(num_samples, dim=0)  # (B, vocab)
        replies = [Reply() for _ in range(len(prompts) * num_samples)]
        live = list(range(len(replies)))  # the rows still in the cache, in its order
        for _ in range(max_tokens):
            # one draw per row in the cache; a finished row's is unused until the batch sheds it
            drawn = dict(zip(live, sample_next(logits, rng, temperature, top_k).tolist()))
            # a row with tool tokens queued feeds the next of them, and its draw goes unused
            sampled = [not reply.forced for reply in replies]
            fed = [reply.forced.pop(0) if reply.forced else drawn.get(row)
                   for row, reply in enumerate(replies)]
            # a finished row reports -1, though it still feeds a token while it stays in the cache
            tokens = [-1 if reply.done else token for reply, token in zip(replies, fed)]
            if top_logprobs is None:
                yield tokens, sampled
            else:
                yield tokens, sampled, self.scores(logits, live, tokens, top_logprobs)
            for reply, token in zip(replies, tokens):
                if not reply.done:
                    self.advance(reply, token)
            if all(reply.done for reply in replies):
                return
            # a batch that is a quarter finished sheds its finished rows: less to compute each step
            if sum(not replies[row].done for row in live) <= 3 * len(live) // 4:
                cache.keep_rows(torch.tensor(
                    [i for i, row in enumerate(live) if not replies[row].done], device=device))
                live = [row for row in live if not replies[row].done]
            # only the newest token of each live row, (len(live), 1); the cache holds the rest
            logits = model(torch.tensor([fed[row] for row in live], device=device)[:, None],
                           kv_cache=cache)[:, -1]

    def advance(self, reply, token):
        """One row's state after its token: finished at a stop token; at <|python_end|> the
        calculator runs on the expression written since <|python_start|>, and its result is queued
        to be forced."""
        if token in self.stop_tokens:
            reply.done = True
        elif token == self.python_start:
            reply.expression = []
        elif token == self.python_end and reply.expression is not None:
            # a refusal is shown too
            _, result = calculator(self.tokenizer.decode(reply.expression))
            reply.forced = [self.output_start] + self.tokenizer.encode_ordinary(result) + [self.output_end]
            reply.expression = None
        elif reply.expression is not None:
            reply.expression.append(token)

    @staticmethod
    def scores(logits, live, tokens, k):
        """(logprob, [(token, logprob)] * k) for each row's token, None for finished rows
        (token -1): see generate. logits (len(live), vocab) are the cache's rows, in the order
        of `live`."""
        logprobs = F.log_softmax(logits.float(), dim=-1)  # (len(live), vocab)
        top = logprobs.topk(k, dim=-1)
        scores = [None] * len(tokens)
        for i, row in enumerate(live):
            if tokens[row] != -1:
                alternatives = list(zip(top.indices[i].tolist(), top.values[i].tolist()))
                scores[row] = (logprobs[i, tokens[row]].item(), alternatives)
        return scores

    def generate_batch(self, prompt, num_samples=1, max_tokens=64, temperature=1.0, top_k=None,
                       seed=42, keep_stop_token=False, top_logprobs=None):
        """Return (token lists, sampled masks), one per row, each ending before its stop token (or
        with it, if keep_stop_token: RL trains the model to stop). With top_logprobs=k, also each
        row's scores, one per token kept (see generate): (token lists, sampled masks, scores)."""
        # one row per sample of each prompt, in generate's order
        rows = num_samples * (1 if isinstance(prompt[0], int) else len(prompt))
        results, masks, finished = [[] for _ in range(rows)], [[] for _ in range(rows)], [False] * rows
        scores = [[] for _ in range(rows)]
        for step in self.generate(prompt, num_samples, max_tokens, temperature, top_k, seed, top_logprobs):
            tokens, sampled = step[:2]
            for row, (token, was_sampled) in enumerate(zip(tokens, sampled)):
                if finished[row]:
                    continue
                # a row ends at its first stop token; after it generate gives -1, skipped above
                finished[row] = token in self.stop_tokens
                if finished[row] and not keep_stop_token:
                    continue
                results[row].append(token)
                masks[row].append(int(was_sampled))
                if top_logprobs is not None:
                    scores[row].append(step[2][row])
        return (results, masks) if top_logprobs is None else (results, masks, scores)


def complete(model, tokenizer, text, max_tokens=48, temperature=0.0, seed=42):
    """Continue a text prompt (after BOS), greedily by default, stopping at BOS."""
    bos = tokenizer.special_tokens["<|bos|>"]
    (tokens,), _ = Engine(model, tokenizer).generate_batch(
        [bos] + tokenizer.encode_ordinary(text), 1, max_tokens, temperature, seed=seed)
    return tokenizer.decode(tokens)


# -----------------------------------------------------------------------------------------------
# Evaluation: bits per byte

# at most this many logits at once in evaluation: 4 GB in fp32 (B=32, T=2048, V=65536 makes 4.3e9)
EVAL_LOGITS = 2 ** 30


def token_losses(model, x, y):
    """model(x, y, loss_reduction="none"), (B*T,), computed a slice of rows at a time so that no
    (rows, T, vocab) tensor holds more than EVAL_LOGITS numbers (a tiny model's batch is
    one slice)."""
    rows = max(1, EVAL_LOGITS // (x.size(1) * model.config.vocab_size))
    return torch.cat([model(x[i:i + rows], y[i:i + rows], loss_reduction="none")
                      for i in range(0, x.size(0), rows)])


@torch.no_grad()
def evaluate_bpb(model, batches, num_batches, token_bytes):
    """Validation loss in bits per byte of text: the summed cross-entropy (nats) of every target
    token, over ln(2) times the bytes those tokens stand for. Unlike plain loss, this does not
    depend on the tokenizer's vocabulary, so models with different tokenizers compare.
    Special tokens (0 bytes) are left out. Sums are all-reduced across ranks."""
    # running sums on the device (no wait for the CPU each batch), in 64 bits against rounding
    total_nats = torch.zeros((), dtype=torch.float64, device=token_bytes.device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=token_bytes.device)
    for _ in range(num_batches):
        x, y, _ = next(batches)
        loss = token_losses(model, x, y)  # (B*T,) nats
        y = y.reshape(-1)
        # (B*T,); an ignored target (-1) is clamped to a valid index, then counts 0 bytes
        nbytes = token_bytes[y.clamp(min=0)] * (y >= 0)
        # a target of 0 bytes (special or ignored) adds no nats either: only text is measured
        total_nats += (loss * (nbytes > 0)).sum().double()
        total_bytes += nbytes.sum()
    if dist.is_initialized():
        dist.all_reduce(total_nats)
        dist.all_reduce(total_bytes)
    return (total_nats / (math.log(2) * total_bytes.clamp(min=1))).item()


@torch.no_grad()
def evaluate_loss(model, batches, num_batches):
    """Mean cross-entropy over the targets that are not ignored (-1), all-reduced across ranks."""
    device = model.cos.device
    total, count = (torch.zeros((), dtype=torch.float64, device=device),
                    torch.zeros((), dtype=torch.int64, device=device))
    for _ in range(num_batches):
        x, y, _ = next(batches)
        total += token_losses(model, x, y).sum().double()
        count += (y >= 0).sum()
    if dist.is_initialized():
        dist.all_reduce(total)
        dist.all_reduce(count)
    return (total / count.clamp(min=1)).item()


@torch.no_grad()
def induction_score(model, tokenizer, num_sequences=16, length=50, seed=0):
    """Does the model read its context? Each row is <|bos|> then `length` random token ids, then the
    same ids again. Nothing can predict the first copy; a model with induction heads (attend to the
    token after the previous occurrence of the current token, and copy it) predicts the second.
    Returns (mean loss of the first copy, of the second, second / first): about 1.0 without
    induction heads, near 0 with perfect copying. The ids are those of the copy drills (drill_ids),
    with another generator: base trains on drills, so for it this is a held-out measure of the skill
    the drills teach; the chat tasks' names_subject and keeps_name measure whether it carries over
    to text."""
    ids = torch.tensor(drill_ids(tokenizer))
    copy = ids[torch.randint(len(ids), (num_sequences, length),
                             generator=torch.Generator().manual_seed(seed))]
    bos = torch.full((num_sequences, 1), tokenizer.special_tokens["<|bos|>"], dtype=torch.long)
    ids = torch.cat([bos, copy, copy], dim=1).to(model.cos.device)  # (N, 1 + 2 * length)
    losses = token_losses(model, ids[:, :-1], ids[:, 1:]).view(num_sequences, 2 * length)
    first, second = losses[:, :length].mean().item(), losses[:, length:].mean().item()
    return first, second, second / first


# -----------------------------------------------------------------------------------------------
# Evaluation: chat tasks (multiple choice, factual questions, word problems with the tool)

def extract_answer(text):
    """The number after the last '####', with thousands separators removed, or None when that
    '####' has no number after it or a second one on its line: "... so 15 apples.\\n#### 1,015"
    -> "1015"; "#### 3\\n#### 4" -> "4" (only the last line counts); "#### 18 or 19" -> None."""
    lines = re.findall(r"(?<!#)####(?!#)(.*)", text)  # what follows each '####' on its line
    match = re.match(r"\s*([-+]?[\d, ]*\.?\d+)(?!.*\d)", lines[-1]) if lines else None
    return match.group(1).replace(",", "").replace(" ", "") if match else None


def answer_is_correct(text, reference):
    """Grade a worked answer against the reference number: "18", "18.0" and "18.00" agree, "1,000"
    equals 1000, and a missing '####' line (or a malformed one like '#####') scores as wrong."""
    got = extract_answer(text)
    if got is None:
        return False
    try:
        return abs(float(got) - float(str(reference).replace(",", "").strip())) < 1e-6
    except ValueError:
        return False


def shard(items, ddp):
    """This rank's share of a list of evaluation items (every world_size-th item)."""
    return items[ddp.rank::ddp.world_size]


# rows sampled together by evaluation: on a CPU 128 rows cost ~7x one row, not 128x
GENERATE_ROWS = 128


def batched(items, n):
    """[1, 2, 3, 4, 5], 2 -> [[1, 2], [3, 4], [5]]"""
    return [items[i:i + n] for i in range(0, len(items), n)]


def all_reduce_counts(correct, total, device):
    counts = torch.tensor([correct, total], dtype=torch.int64, device=device)
    if dist.is_initialized():
        dist.all_reduce(counts)
    return counts[0].item(), counts[1].item()


def gather_in_order(ddp, mine):
    """This rank's results for shard(items, ddp) and every other rank's, back in item order, on
    every rank: of W ranks, rank r scored items r, r + W, r + 2W, ..., so item i is result i // W of
    rank i % W. With one process, `mine` as it is. Per-item results in item order let two
    checkpoints scored on the same items be compared item by item (paired_difference)."""
    if not ddp.is_ddp:
        return list(mine)
    shares = [None] * ddp.world_size
    dist.all_gather_object(shares, list(mine))
    return [shares[i % ddp.world_size][i // ddp.world_size]
            for i in range(sum(len(share) for share in shares))]


def forward_padded(model, rows, spans, pad_id, device):
    """One forward over token rows of different lengths, right-padded with pad_id (never scored).
    A row longer than the model's context loses tokens from the left, and its [start, end) span
    moves with it. Returns ids (N, L), logits (N, L, vocab) and the spans."""
    crops = [max(0, len(row) - model.config.sequence_len) for row in rows]
    rows = [row[crop:] for row, crop in zip(rows, crops)]
    # a span starts at 1 at the earliest: token 0 has no position before it to predict it
    spans = [(max(1, start - crop), end - crop) for (start, end), crop in zip(spans, crops)]
    # (N, L)
    ids = torch.full((len(rows), max(len(row) for row in rows)), pad_id, dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, device=device)
    return ids, model(ids), spans  # logits (N, L, vocab): position t predicts token t+1


def mean_span_losses(ids, logits, spans):
    """The mean loss of each row's tokens [start, end), (N,): how unlikely the model finds them."""
    # (N, L-1); cross_entropy wants the classes in dim 1, hence (N, vocab, L-1)
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    # token t is predicted at position t - 1, so the span [start, end) is losses[start-1:end-1]
    return torch.stack([losses[i, start - 1:end - 1].mean() for i, (start, end) in enumerate(spans)])


def question_prompt(tokenizer, item):
    """The chat prompt that asks item["question"] (a fact, a word problem), for the assistant's
    reply: the user's message, then <|assistant_start|>."""
    return render_for_completion(tokenizer, dict(messages=[dict(role="user", content=item["question"])]))


def multiple_choice_prompt(tokenizer, item):
    return render_for_completion(tokenizer, tinyworld.multiple_choice_conversation(item["question"], item["choices"]))


@torch.no_grad()
def evaluate_multiple_choice(model, tokenizer, items, ddp):
    """Accuracy (share_of, with each item's outcome) on MMLU-style items whose reply is the letter
    alone (ARC, MMLU): after the question and lettered choices, the letter with the highest logit as
    the first assistant token (no sampling). Chance 1 / choices."""
    outcomes = []
    for item in shard(items, ddp):
        ids = multiple_choice_prompt(tokenizer, item)
        logits = model(torch.tensor([ids], device=ddp.device))[0, -1]  # (vocab,)
        letters = [tokenizer.encode_ordinary(tinyworld.LETTERS[i])[0] for i in range(len(item["choices"]))]
        # the best among the letters only: a model that would have written something else still
        # picks one, and what is measured is which letter it prefers
        outcomes.append(logits[letters].argmax().item() == item["answer"])
    return share_of(gather_in_order(ddp, outcomes))


@torch.no_grad()
def evaluate_multiple_choice_cloze(model, tokenizer, items, ddp):
    """Accuracy (share_of, with each item's outcome) on the same items scored as CORE scores
    multiple choice: after the bare question, the answer sentence begun in the words all choices
    share, then each choice's ending (item["cloze"]: "The capital of Japan is" + " Tokyo." /
    " Seoul." / ...) in one batch; the lowest mean loss per token wins. What the model knows,
    whether or not it can answer by letter. Chance 1 / choices."""
    outcomes = []
    for item in shard(items, ddp):
        shared, endings = item["cloze"]
        prompt = question_prompt(tokenizer, item)
        # the shared words are prompt, not scored: the choices compare on the words that differ
        prompt += tokenizer.encode_ordinary(shared)
        # a space before the ending when shared words come before it
        rows = [prompt + tokenizer.encode_ordinary(" " * bool(shared) + ending) for ending in endings]
        spans = [(len(prompt), len(row)) for row in rows]
        ids, logits, spans = forward_padded(model, rows, spans,
                                            tokenizer.special_tokens["<|bos|>"], ddp.device)
        # the mean per token, not the sum: a longer ending is not penalised for its length
        outcomes.append(mean_span_losses(ids, logits, spans).argmin().item() == item["answer"])
    return share_of(gather_in_order(ddp, outcomes))


def answer_begun_prompt(tokenizer, item):
    """A fact's question, then its answer sentence begun up to the answer
    (tinyworld.answer_sentence_start): "What is the capital of Kenya?" -> "The capital of Kenya is"."""
    return question_prompt(tokenizer, item) + tokenizer.encode_ordinary(tinyworld.answer_sentence_start(item))


def greedy_replies(model, tokenizer, items, ddp, max_tokens=96, prompt=question_prompt):
    """Greedy replies (the calculator available) to the items' prompts (by default their questions,
    asked in the chat format), [(item, reply)] in item order on every rank: each rank answers its
    share, and the shares are gathered."""
    engine, pairs = Engine(model, tokenizer), []
    # prompts of different lengths share a batch, padded left
    for chunk in batched(shard(items, ddp), GENERATE_ROWS):
        prompts = [prompt(tokenizer, item) for item in chunk]
        # greedy (temperature 0): no sampling noise in the grade; [0]: the tokens, not the masks
        replies = engine.generate_batch(prompts, 1, max_tokens, temperature=0.0)[0]
        pairs += zip(chunk, (tokenizer.decode(tokens) for tokens in replies))
    return gather_in_order(ddp, pairs)


def evaluate_generative(model, tokenizer, items, ddp, task, max_tokens=96):
    """Accuracy (share_of, with each item's outcome) of greedy answers: facts graded by
    tinyworld.fact_is_correct, word problems by their '####' number (answer_is_correct; the
    calculator tool is available)."""
    pairs = greedy_replies(model, tokenizer, items, ddp, max_tokens)
    return share_of([answer_is_correct(reply, item["answer"]) if task == "word_problem"
                     else tinyworld.fact_is_correct(reply, item) for item, reply in pairs])


def mentions(reply, name):
    """Whether the reply names `name` as a whole word, case aside: mentions("A cat meows.", "cat")
    -> True."""
    return re.search(r"(?<!\w)" + re.escape(name.lower()) + r"(?!\w)", reply.lower()) is not None


def evaluate_chat(model, tokenizer, ddp, n=400):
    """The TinyWorld chat report card on held-out (test split) items: accuracy_stats per task, with
    multiple choice scored twice (by the letter and by cloze), each fact asked once, world knowledge
    and mental arithmetic apart; two measures of reading the context: whether a reply to a world
    knowledge question names its subject ("Kenya" in a reply to "What is the capital of Kenya?") and
    whether a reply to a harder word problem names its person; and completes_fact, what the model
    knows of the same world facts whether or not it can answer their questions unaided: each
    question with its answer begun for the model, up to the answer ("What is the capital of Kenya?"
    then "The capital of Kenya is" -> " Nairobi."). Every checkpoint
    evaluated with the same n meets the same items (drawn with a fixed seed), and each task keeps
    its items' outcomes in item order, so two checkpoints compare item by item (paired_difference).
    Every rank gets the card."""
    model.eval()
    multiple_choice = tinyworld.tinyworld_eval_items("multiple_choice", n=n)
    # the facts are answered once and graded in two groups: a fact's key starts with its kind
    facts = greedy_replies(model, tokenizer, tinyworld.tinyworld_eval_items("fact", n=n), ddp)
    world = [(item, reply) for item, reply in facts
             if item["key"].split(":")[0] not in tinyworld.ARITHMETIC_KINDS]
    arithmetic = [(item, reply) for item, reply in facts
                  if item["key"].split(":")[0] in tinyworld.ARITHMETIC_KINDS]
    hard = greedy_replies(model, tokenizer,
                          tinyworld.tinyworld_eval_items("hard_word_problem", n=n), ddp, 128)
    # the same world facts with their answers begun for the model ("The capital of Kenya is"): what
    # it knows, whether or not it can say it unaided; 8 tokens hold the longest answer
    completed = greedy_replies(model, tokenizer, [item for item, _ in world], ddp, 8, answer_begun_prompt)
    # the same multiple-choice items twice: by letter, answered as trained (a sentence that names the
    # choice, then the letter the list wrote after it; 32 tokens hold the longest, a sum worked out
    # with the calculator), and by cloze (what the model knows, whether or not it can answer by letter)
    lettered = greedy_replies(model, tokenizer, multiple_choice, ddp, 32, multiple_choice_prompt)
    return dict(
        multiple_choice_letter=share_of([tinyworld.reply_letter(reply) == tinyworld.LETTERS[item["answer"]]
                                         for item, reply in lettered]),
        multiple_choice_cloze=evaluate_multiple_choice_cloze(model, tokenizer, multiple_choice, ddp),
        world_knowledge=share_of([tinyworld.fact_is_correct(reply, item) for item, reply in world]),
        arithmetic=share_of([tinyworld.fact_is_correct(reply, item) for item, reply in arithmetic]),
        word_problem=evaluate_generative(model, tokenizer,
                                         tinyworld.tinyworld_eval_items("word_problem", n=n), ddp,
                                         "word_problem"),
        hard_word_problem=share_of([answer_is_correct(reply, item["answer"]) for item, reply in hard]),
        # reading the context: a world fact's key is "<kind>:<subject>"; a harder problem has
        # a person's name
        names_subject=share_of([mentions(reply, item["key"].split(":", 1)[1]) for item, reply in world]),
        keeps_name=share_of([mentions(reply, item["name"]) for item, reply in hard]),
        completes_fact=share_of([tinyworld.fact_is_correct(tinyworld.answer_sentence_start(item) + text, item)
                                 for item, text in completed]),
    )


def chat_report_card(model, tokenizer, ddp, n, heading):
    """evaluate_chat and the induction score, printed under `heading`: (the chat results, the
    induction score as a dict of the first copy's loss, the second's and their ratio)."""
    results = evaluate_chat(model, tokenizer, ddp, n)
    first, second, ratio = induction_score(model, tokenizer)
    print0(f"{heading} (+- one standard error, [Wilson 95% interval]):")
    for task, stats in results.items():
        print0(f"  {task:22s} {format_accuracy(stats)}")
    print0(f"  induction: a repeated random sequence's loss {first:.2f} -> {second:.2f} nats/token "
           f"(ratio {ratio:.2f})")
    return results, dict(first=round(first, 3), second=round(second, 3), ratio=round(ratio, 3))


# -----------------------------------------------------------------------------------------------
# Checkpoints (<base_dir>/checkpoints/<stage>/<tag>/{model,optim}_<step>.pt and meta_<step>.json)
# and reports
#
# Each file is written to a temporary name, flushed to the disk and renamed into place, and the
# rename flushed too; the metadata goes last and marks the checkpoint complete. Older checkpoints
# are removed only after a new one is complete and on the disk, so a crash, a Ctrl-C or a power cut
# at any moment leaves the last good checkpoint loadable. Other files in the folder are left alone.

def checkpoint_dir(stage, tag):
    return base_dir() / "checkpoints" / stage / tag


def checkpoint_step(path):
    """The step of a checkpoint file (model_000004.pt, optim_000004.pt, meta_000004.json -> 4), None
    for any other name: your own files beside them (model_final.pt, meta_best.json) are neither read
    nor deleted."""
    match = re.fullmatch(r"(?:model|optim)_(\d{6,})\.pt|meta_(\d{6,})\.json", path.name)
    return int(match[1] or match[2]) if match else None


def last_checkpoint_step(directory):
    # the meta file is written last, so a step with its meta and its model file is complete
    steps = [checkpoint_step(p) for p in directory.glob("meta_*.json")]
    return max((s for s in steps if s is not None and (directory / f"model_{s:06d}.pt").exists()),
               default=None)


def save_checkpoint(directory, step, model, optimizers, meta):
    """Write the checkpoint of `step`, then delete older ones. A write that fails (a full disk,
    say) leaves the last complete checkpoint in place and says so."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # the model, the optimizers, then the meta file, which marks the step complete
        hardware.atomic_write(directory / f"model_{step:06d}.pt", lambda p: torch.save(model.state_dict(), p))
        if optimizers is not None:
            hardware.atomic_write(directory / f"optim_{step:06d}.pt",
                                  lambda p: torch.save([o.state_dict() for o in optimizers], p))
        hardware.atomic_write(directory / f"meta_{step:06d}.json",
                              lambda p: p.write_text(json.dumps(meta, indent=2)))
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        # nothing was deleted yet: the last complete checkpoint is still there to resume from
        kept = last_checkpoint_step(directory) if directory.is_dir() else None
        raise UserError(f"could not write the step {step} checkpoint in {directory} "
                        f"({str(e).splitlines()[0]}); "
                        + (f"the step {kept} checkpoint is kept: free some space and continue with --resume"
                           if kept is not None
                           else "no earlier checkpoint exists: free some space and run again")) from None
    for old in directory.iterdir():  # the new step is on the disk now (atomic_write flushed it)
        if checkpoint_step(old) not in (None, step):
            old.unlink(missing_ok=True)


def interrupted(step, directory):
    """The error for Ctrl-C during training: where the last complete checkpoint is."""
    last = last_checkpoint_step(directory) if directory.is_dir() else None
    where = (f"the last checkpoint (step {last}) is in {directory}: continue with --resume"
             if last is not None else None)
    return UserError(f"interrupted at step {step}; {where or 'no checkpoint was written yet'}")


def torch_load(path, device):
    """torch.load of the weights only (reading a checkpoint runs no code from it). A file that fails
    to load is called corrupt only when hardware.checkpoint_file_is_intact finds it damaged; a whole
    file (one too big for the memory left, say) is kept, and the error says why it did not load."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        # a damaged file and a whole one that could not be loaded fail alike: ask the file itself,
        # so that a good checkpoint is never called corrupt
        try:
            intact = hardware.checkpoint_file_is_intact(path)
        except OSError as read_error:  # it cannot be read at all: permissions, a failing disk
            raise UserError(f"cannot read checkpoint file {path} ({read_error})") from None
        if not intact:
            raise UserError(f"cannot read checkpoint file {path} (truncated or corrupt: {type(e).__name__}); "
                            "delete that checkpoint directory and run the stage again") from None
        # the error's type and first line: the rest of a torch error can run to many lines
        cause = type(e).__name__ + (f": {str(e).splitlines()[0]}" if str(e).strip() else "")
        out_of_memory = isinstance(e, (MemoryError, torch.OutOfMemoryError))
        what_to_do = (f"free memory on {device} (another process may hold it)" if out_of_memory
                      else "fix that cause")
        raise UserError(f"cannot load checkpoint file {path} onto {device} ({cause}); "
                        f"the file is whole, so keep it: {what_to_do} and run again") from None


def load_checkpoint(stage, tag, device, with_optimizer=False, hint=""):
    """Return (model, optimizer state dicts or None, meta) of the last checkpoint of a stage."""
    directory = checkpoint_dir(stage, tag)
    step = last_checkpoint_step(directory) if directory.exists() else None
    if step is None:
        raise UserError(f"no {stage} checkpoint in {directory}" + (f": {hint}" if hint else ""))
    # the shape comes from the meta file: the weights alone do not tell n_head from head_dim
    try:
        meta = json.loads((directory / f"meta_{step:06d}.json").read_text())
        config = GPTConfig(**meta["model_config"])
        # a damaged or hand-edited config fails here, in one line, not somewhere inside GPT()
        if not all(type(v) is int and v > 0 for v in dataclasses.astuple(config)):
            raise ValueError(f"model_config {meta['model_config']} is not positive whole numbers")
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"checkpoint metadata {directory}/meta_{step:06d}.json is unreadable "
                        f"({type(e).__name__}: {e}); "
                        "delete that checkpoint directory and run the stage again") from None
    # built on the meta device (no memory, no random init), then given memory once, on `device`
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()  # fills the rotary buffers; the weights are replaced just below
    state = torch_load(directory / f"model_{step:06d}.pt", device)
    # strict: every parameter there and none extra; assign: the loaded tensors become the weights,
    # with no second copy
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise UserError(f"checkpoint {directory} does not match its metadata's model config: "
                        f"{str(e).splitlines()[0]}") from None
    optim_states = torch_load(directory / f"optim_{step:06d}.pt", device) if with_optimizer else None
    return model, optim_states, meta


def check_tokenizer(meta, tokenizer, where):
    # under another tokenizer an id stands for other text: the model would read and write nonsense
    if meta.get("tokenizer") != tokenizer_id(tokenizer):
        raise UserError(f"{where} was trained with tokenizer {meta.get('tokenizer')}, but the "
                        f"current one is {tokenizer_id(tokenizer)}: retrain the stages "
                        "after --stage tok, or restore that tokenizer")


# each stage writes <base_dir>/report/<stage>.json; `--stage report` makes report.md of them all

def write_report(stage, data):
    directory = base_dir() / "report"
    directory.mkdir(parents=True, exist_ok=True)
    hardware.atomic_write(directory / f"{stage}.json", lambda p: p.write_text(json.dumps(data, indent=2)))


def record_wall_time(stage, seconds):
    """Keep each stage's last wall time in report/wall.json, for the report's timing table."""
    path = base_dir() / "report" / "wall.json"
    # read, update, write back: the other stages' times stay
    times = json.loads(path.read_text()) if path.exists() else {}
    times[stage] = round(seconds, 1)
    write_report("wall", times)


# -----------------------------------------------------------------------------------------------
# Training: the loop shared by base, mid and sft

# What each stage does with the flags left unset: one table, which finalize_args applies and --help
# quotes. steps: a stage's optimizer steps when --num-iterations is -1 (with --data hf, mid, sft and
# rl train one epoch instead, and base --target-param-data-ratio's tokens when it is given). SFT
# teaches new sums, not new words: its matrix rate is 4x the other stages', its tied embedding's
# 1/4, both then times its --lr-scale of 0.125 (0.01 and 0.0016 in all). On the speedrun's tiny
# tier, SFT at the base rates learned the harder word problems to 21% and forgot facts; at these,
# 60%, the facts kept (one seed each). Copy drills in TinyWorld's base: induction score 0.96 ->
# 0.07. In mid, 0.15 keeps it (0.06, else 0.89) and lifts names_subject after SFT 56% -> 68%, but
# the harder word problems fall 62% -> 52% (one seed each): off. The chat stages forget facts that
# base learned from its text: held-out world facts with their answers begun, 73% after base, 54%
# after mid. A tenth of mid's conversations replaced by pretraining documents (--replay 0.1) keeps
# and adds to them (83%): world knowledge after mid 52% -> 83% (0.25: 86%, but easy word problems
# 98.5% -> 96.5%). SFT then forgot facts (83% -> 76%, paired z -2.4). With --replay 0.1 it kept
# them but learned the harder word problems to 26% (47% without); at 0.03, 32%, and 49% in 200
# steps, the facts kept (lowest paired z of any task -1.6; one seed each, from the same mid).
DEFAULTS = dict(lr_scale=1.0, matrix_lr=0.02, embedding_lr=0.05, copy_drills=0.0, replay=0.0, temperature=0.6,
                max_new_tokens=256)
STAGE_DEFAULTS = dict(
    base=dict(steps=320, copy_drills=0.2),  # the drills on TinyWorld only
    mid=dict(steps=100, replay=0.1),
    # SFT nudges a model that chats
    sft=dict(steps=200, lr_scale=0.125, matrix_lr=0.08, embedding_lr=0.0125, replay=0.03),
    # RL: 100 steps, not 70: from one SFT checkpoint pass@1 rose +0.092 in 70 steps and +0.124 to +0.127
    # in 110 (3 seeds; 0.79-0.80 by step 100); twice the rate for 70 steps, +0.093 to +0.120 (3 seeds)
    rl=dict(steps=100, lr_scale=0.05, temperature=1.0, max_new_tokens=128),
    chat=dict(top_k=50),
    serve=dict(top_k=50),
)


def defaults_help(name):
    """A flag's defaults as --help words them: defaults_help("lr_scale") -> "default 1.0; sft 0.125,
    rl 0.05"."""
    stages = ", ".join(f"{stage} {values[name]}" for stage, values in STAGE_DEFAULTS.items()
                       if name in values)
    return "; ".join(part for part in (f"default {DEFAULTS[name]}" if name in DEFAULTS else "",
                                       stages) if part)


def load_trained(args, ddp, stage, tokenizer):
    """The last checkpoint of `stage` for --model-tag, checked against the tokenizer: (model, meta).
    Says which stage to run first when there is none."""
    model, _, meta = load_checkpoint(stage, args.model_tag, ddp.device,
                                     hint=f"run `python nanochat_one.py --stage {stage}` first (or "
                                          "pass the --model-tag / --depth it was trained with)")
    check_tokenizer(meta, tokenizer, f"the {stage} checkpoint")
    return model, meta


class Start(NamedTuple):
    """Where a training stage starts: a model, and when it resumes, its optimizer states and
    metadata."""
    model: GPT
    optim_states: list = None
    meta: dict = None


def start_model(args, ddp, stage, tokenizer, source=None):
    """The model a stage trains, and where it starts (a Start): --resume: this stage's own last
    checkpoint, with optimizer state and data position; else source=None (base): a fresh model from
    the depth dial; else the source stage's checkpoint."""
    if args.resume:
        model, optim_states, meta = load_checkpoint(stage, args.model_tag, ddp.device, with_optimizer=True,
                                                    hint="nothing to resume; run without --resume")
        check_tokenizer(meta, tokenizer, f"the {stage} checkpoint")
        return Start(model, optim_states, meta)
    if source is not None:
        return Start(load_trained(args, ddp, source, tokenizer)[0])
    config = config_from_depth(args.depth, tokenizer.vocab_size, args.max_seq_len,
                               args.aspect_ratio, args.head_dim, args.n_kv_head)
    with torch.device(ddp.device):
        model = GPT(config)
    model.init_weights()
    return Start(model)


def stage_optimizers(args, start):
    """setup_optimizers with the flags' learning rates times --lr-scale, restored when resuming."""
    optimizers = setup_optimizers(start.model, args.matrix_lr * args.lr_scale,
                                  args.embedding_lr * args.lr_scale, args.smear_lr * args.lr_scale,
                                  args.weight_decay)
    for opt, state in zip(optimizers, start.optim_states or []):
        opt.load_state_dict(state)
    return optimizers


def first_step(start, num_steps):
    """The step a stage starts at: 0, or a resumed checkpoint's (which must not be past num_steps:
    the loop would never meet its last step, and the learning rate would turn negative)."""
    step = start.meta["step"] if start.optim_states is not None else 0
    if step > num_steps:
        raise UserError(f"the checkpoint is at step {step}, past --num-iterations {num_steps}: "
                        f"give --num-iterations above {step} to train on")
    if step:
        print0(f"resuming from step {step}")
    return step


def wrap_ddp(model, ddp):
    """Under torchrun, DistributedDataParallel averages gradients across ranks during backward."""
    if not ddp.is_ddp:
        return model
    # the only buffers are the rotary tables, the same on every rank:
    # nothing to broadcast each forward
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[ddp.local_rank] if DEVICE_TYPE == "cuda" else None, broadcast_buffers=False)


def grad_accum_steps(args, world_size):
    """Micro-steps per optimizer step: --total-batch-size tokens are reached by accumulation."""
    tokens_per_micro_step = args.device_batch_size * args.max_seq_len * world_size
    if args.total_batch_size % tokens_per_micro_step:
        raise UserError(f"--total-batch-size {args.total_batch_size} must be a multiple of device "
                        f"batch x sequence length x processes = {args.device_batch_size} x "
                        f"{args.max_seq_len} x {world_size} = {tokens_per_micro_step}")
    return args.total_batch_size // tokens_per_micro_step


def resume_data_state(meta, ddp):
    """This rank's loader state from a checkpoint's metadata."""
    states = meta.get("data_state")
    if states is None or len(states) != ddp.world_size:
        raise UserError(f"the checkpoint's data position was saved by {len(states or [])} process(es), "
                        f"not {ddp.world_size}: resume with the same number of processes")
    return states[ddp.rank]


def save_stage(args, ddp, stage, step, num_steps, model, optimizers, tokenizer, metrics, data_state=None):
    """A training stage's checkpoint (rank 0 writes it) and what resumes it: the step, the model's
    shape, the tokenizer, the flags, the last metrics and, for a loader that keeps a position,
    every rank's data state in rank order (data_state: this rank's)."""
    meta = dict(stage=stage, step=step, num_steps=num_steps)
    if data_state is not None:
        meta["data_state"] = [data_state]
        if ddp.is_ddp:  # every rank takes part in the gather, rank 0 writes
            meta["data_state"] = [None] * ddp.world_size
            dist.all_gather_object(meta["data_state"], data_state)
    meta |= dict(model_config=dataclasses.asdict(model.config), tokenizer=tokenizer_id(tokenizer),
                 args=vars(args), metrics=metrics)
    if ddp.is_master:
        save_checkpoint(checkpoint_dir(stage, args.model_tag), step, model, optimizers, meta)


def periodic(step, every, num_steps):
    """Whether an evaluation or a checkpoint falls on `step`: every `every` steps (0: none on the
    way) and at the last step. Every training stage evaluates at its first step too, and saves none
    there."""
    return step == num_steps or (every > 0 and step % every == 0)


def train(args, ddp, stage, start, tokenizer, make_batches, evaluate, num_steps, fixed_shapes=True):
    """Train start.model for num_steps optimizer steps of args.total_batch_size tokens: base, mid
    and sft.

    make_batches(split, state=None) yields (inputs, targets, state) micro-batches of
    (device_batch_size, max_seq_len); make_batches(split, state) continues right after that one, so
    checkpoints (<base_dir>/checkpoints/<stage>/<tag>) keep every rank's state and a resumed run
    sees exactly the data of an uninterrupted one. evaluate(model) returns a dict of validation
    metrics (at the start, every --eval-every steps and at the end). fixed_shapes: whether every
    batch has the same shape (SFT's padded rows do not), which decides whether compiling pays.
    Returns the report's summary."""
    model, B, T, config = start.model, args.device_batch_size, args.max_seq_len, start.model.config
    # what the run is, before it starts: the model's size and FLOPs, its tokens and their batches
    if config.sequence_len < T:
        raise UserError(f"--max-seq-len {T} is longer than the model's context ({config.sequence_len})")
    num_params = sum(p.numel() for p in model.parameters())
    flops_per_token = model.estimate_flops()
    grad_accum = grad_accum_steps(args, ddp.world_size)
    print0(f"model: depth {config.n_layer}, width {config.n_embd}, {config.n_head} heads "
           f"({config.n_kv_head} kv), vocab {config.vocab_size}, {num_params:,} parameters, "
           f"{flops_per_token:.3g} FLOPs/token")
    print0(f"{stage}: {num_steps} steps x {args.total_batch_size:,} tokens = "
           f"{num_steps * args.total_batch_size:,} tokens ({grad_accum} micro-steps of {B}x{T} on "
           f"{ddp.world_size} process(es), {DEVICE_TYPE}, {str(COMPUTE_DTYPE)[6:]})")

    # a resumed run continues with its optimizers' moments and its loaders' positions, so that it
    # trains on exactly what an uninterrupted run would have
    optimizers = stage_optimizers(args, start)
    start_step = first_step(start, num_steps)
    data_state = resume_data_state(start.meta, ddp) if start_step else None
    ddp_model = wrap_ddp(model, ddp)
    use_compile, why = hardware.compile_setting(args.compile, DEVICE_TYPE, num_steps - start_step,
                                                fixed_shapes)
    print0(f"torch.compile: {'on' if use_compile else 'off'} ({why})")
    # training runs the compiled model; evaluation and checkpoints use `model`, its same weights
    train_model = torch.compile(ddp_model) if use_compile else ddp_model
    train_batches = make_batches("train", data_state)
    batch = next(train_batches)  # (inputs, targets, the loader's state after them)
    peak = hardware.peak_flops(ddp.device)

    # model FLOPs utilisation: the share of the GPUs' peak that the model's FLOPs use
    def mfu(tok_per_s):
        return 100 * flops_per_token * tok_per_s / (peak * ddp.world_size)

    metrics = {}  # the last evaluation's
    history = []  # every evaluation: the step and its metrics
    train_curve = []  # (step, loss) of every step
    smooth_loss = None  # an exponential moving average of the loss, for the log
    # time and tokens of the steps after the first (which warms up, compiles)
    t_train, tokens_timed = 0.0, 0
    first_step_seconds = None
    step = start_step
    model.train()
    try:
        while True:
            # evaluate at the start (so that a validation set too small fails before any training),
            # every --eval-every steps and at the end
            if step == start_step or periodic(step, args.eval_every, num_steps):
                model.eval()
                metrics = evaluate(model)
                model.train()
                history.append(dict(step=step, **metrics))
                print0(f"step {step:5d}/{num_steps} | "
                       + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            # a checkpoint every --save-every steps and at the end (none at the step it resumed at)
            if step > start_step and periodic(step, args.save_every, num_steps):
                save_stage(args, ddp, stage, step, num_steps, model, optimizers, tokenizer, metrics,
                           data_state)
            if step == num_steps:
                break
            # one optimizer step of --total-batch-size tokens: gradients summed over micro-steps,
            # each micro-batch's mean loss divided by their number (the mean of the whole batch when
            # every micro-batch has as many targets); DDP all-reduces once, on the last micro-step
            t0, step_tokens = time.time(), 0
            for micro in range(grad_accum):
                x, y, batch_state = batch
                # SFT rows are shorter than T: count what ran
                step_tokens += x.numel() * ddp.world_size
                sync = micro == grad_accum - 1 or not ddp.is_ddp
                with contextlib.nullcontext() if sync else ddp_model.no_sync():
                    loss = train_model(x, y) / grad_accum
                    loss.backward()
                # the next batch is built on the CPU while the GPU still works on this one (its
                # kernels are queued, not finished); the loader's state saved with a checkpoint is
                # that of the trained batch
                batch, data_state = next(train_batches), batch_state
            # this step's learning rates and Muon's momentum (the schedules), then the update itself
            lrm = apply_schedules(optimizers, step, num_steps, args)
            for opt in optimizers:
                opt.step()
            model.zero_grad(set_to_none=True)
            train_loss = loss.item() * grad_accum  # .item() waits for the device: the step is done
            dt = time.time() - t0
            step += 1
            # throughput and the ETA leave out the first step, which warms up (and compiles)
            if step > start_step + 1:
                t_train += dt
                tokens_timed += step_tokens
            elif use_compile:
                first_step_seconds = dt
                print0(f"first step {dt:.1f}s, most of it compiling (counted in this stage's wall time)")
            # one batch's loss is noisy: the log shows a moving average
            smooth_loss = train_loss if smooth_loss is None else 0.9 * smooth_loss + 0.1 * train_loss
            train_curve.append((step, train_loss))
            tok_per_s = step_tokens / dt
            timed_steps = step - start_step - 1
            eta = format_seconds((num_steps - step) * t_train / timed_steps) if timed_steps else "?"
            if step % args.log_every == 0 or step == num_steps:
                print0(f"step {step:5d}/{num_steps} | loss {smooth_loss:.4f} | lr x{lrm:.2f} | "
                       f"{dt * 1000:.0f}ms | {tok_per_s:,.0f} tok/s"
                       + (f" | mfu {mfu(tok_per_s):.1f}%" if peak else "") + f" | eta {eta}")
    except KeyboardInterrupt:  # Ctrl-C: one line that says where the last good checkpoint is
        raise interrupted(step, checkpoint_dir(stage, args.model_tag)) from None
    tok_per_s = tokens_timed / t_train if t_train else 0.0  # over the timed steps
    return dict(params=num_params, flops_per_token=flops_per_token, steps=num_steps,
                tokens=num_steps * args.total_batch_size, tok_per_s=round(tok_per_s),
                train_seconds=round(t_train, 1), device=DEVICE_TYPE, compiled=use_compile,
                first_step_seconds=first_step_seconds and round(first_step_seconds, 1),
                mfu=round(mfu(tok_per_s), 2) if peak else None,
                metrics=metrics, history=history, train_loss=train_curve)


# -----------------------------------------------------------------------------------------------
# Stages tok and base: the tokenizer, then pretraining (the data they need, how long base trains)

def meta_model(args, vocab_size):
    """The model the flags describe, built on the meta device: its shapes and parameters, no
    memory."""
    config = config_from_depth(args.depth, vocab_size, args.max_seq_len, args.aspect_ratio,
                               args.head_dim, args.n_kv_head)
    with torch.device("meta"):
        return GPT(config)


def base_steps(args, num_params):
    """Base pretraining's optimizer steps: --num-iterations; else --target-param-data-ratio training
    tokens per parameter (Chinchilla: 20; all parameters, embeddings included, as nanochat counts);
    else STAGE_DEFAULTS' 320, the laptop's."""
    if args.num_iterations > 0:
        return args.num_iterations
    # tokens = ratio x parameters, in steps of --total-batch-size tokens
    if args.target_param_data_ratio is not None:
        return max(1, int(args.target_param_data_ratio * num_params // args.total_batch_size))
    return STAGE_DEFAULTS["base"]["steps"]


def prepare_base_data(args, ddp):
    """--data hf without --data-dir: rank 0 downloads the FineWeb-EDU shards into
    <base_dir>/base_data (the shards already there are kept) while the other ranks wait:
    --num-shards, by default those the base run's tokens need (hardware.shards_needed), with
    the vocabulary of the tokenizer if there is one, else of --vocab-size (--stage tok,
    before it trains one)."""
    if args.data != "hf" or args.data_dir:
        return
    if ddp.is_master:
        num_shards = args.num_shards
        if num_shards is None:
            # the vocabulary sizes wte, so the parameter count and the tokens base will read
            vocab_size = get_tokenizer().vocab_size if tokenizer_path().exists() else args.vocab_size
            num_params = sum(p.numel() for p in meta_model(args, vocab_size).parameters())
            num_shards = hardware.shards_needed(base_steps(args, num_params) * args.total_batch_size)
        realdata.download_shards(base_data_dir(args), num_shards)
    # no rank reads a shard before rank 0 has finished writing it
    if ddp.is_ddp:
        dist.barrier()


# the tokenizer: --stage tok

def stage_tok(args, ddp):
    prepare_base_data(args, ddp)
    # one process trains and saves the tokenizer; the others wait at the barrier at the end
    if ddp.is_master:
        t0 = time.time()
        # whole documents until --tok-chars characters are reached
        texts, n_chars = [], 0
        for _, text in document_stream(args, "train"):
            texts.append(text)
            n_chars += len(text)
            if n_chars >= args.tok_chars:
                break
        print0(f"training a {args.vocab_size}-token BPE ({bpe.BACKEND} backend) on {n_chars:,} "
               f"characters of {args.data} text...")
        tokenizer = bpe.Tokenizer.train(texts, args.vocab_size, special_tokens=SPECIAL_TOKENS)
        train_seconds = time.time() - t0
        if tokenizer.vocab_size < args.vocab_size:
            print0(f"note: the text ran out of pairs to merge; the vocabulary has "
                   f"{tokenizer.vocab_size} tokens")
        tokenizer_path().parent.mkdir(parents=True, exist_ok=True)
        tokenizer.save(tokenizer_path())
        # bytes per token on text it was not trained on: how well the tokenizer compresses
        val_texts = [text for _, text in itertools.islice(document_stream(args, "val"), 200)]
        n_bytes = sum(len(bpe.text_to_bytes(t)) for t in val_texts)
        n_tokens = sum(len(ids) for ids in tokenizer.encode_batch(val_texts))
        # one sentence cut into its tokens, to see the merges at work
        pieces = [tokenizer.decode([i]) for i in tokenizer.encode("The capital of France is Paris.")]
        print0(f"saved {tokenizer_path()}: vocab {tokenizer.vocab_size}, {train_seconds:.1f}s, "
               f"{n_bytes / n_tokens:.2f} bytes/token on {len(val_texts)} validation documents")
        print0(f"example: {pieces}")
        write_report("tok", dict(vocab_size=tokenizer.vocab_size, backend=bpe.BACKEND,
                                 train_chars=n_chars, train_seconds=round(train_seconds, 2),
                                 val_bytes_per_token=round(n_bytes / n_tokens, 3)))
    if ddp.is_ddp:
        dist.barrier()


# pretraining: --stage base

def stage_base(args, ddp):
    prepare_base_data(args, ddp)
    tokenizer = get_tokenizer()
    start = start_model(args, ddp, "base", tokenizer)
    model = start.model
    num_steps = base_steps(args, sum(p.numel() for p in model.parameters()))
    # the bytes behind each token id, for bits per byte
    token_bytes = token_byte_lengths(tokenizer, ddp.device)

    def make_batches(split, state=None):
        return base_batches(args, tokenizer, split, args.device_batch_size, args.max_seq_len, ddp,
                            ddp.device, state)

    # induction_score()[2]: the second copy's loss over the first's, near 0 when the model copies
    def evaluate(model):
        return dict(val_bpb=evaluate_bpb(model, make_batches("val"), args.eval_batches, token_bytes),
                    induction=induction_score(model, tokenizer)[2])

    summary = train(args, ddp, "base", start, tokenizer, make_batches, evaluate, num_steps)
    summary["val_bpb"] = round(summary["metrics"]["val_bpb"], 4)
    summary["samples"] = []
    # every rank trained; rank 0 alone samples the prompts and writes the report
    if ddp.is_master:
        model.eval()
        for prompt in args.sample_prompts:
            text = prompt + complete(model, tokenizer, prompt, max_tokens=40)
            summary["samples"].append(text)
            print0(f"sample: {text!r}")
        write_report("base", summary)
    return summary


# -----------------------------------------------------------------------------------------------
# Stages mid and sft: teach the base model to chat
#
# Mid-training continues pretraining on conversations packed like documents, with the loss on
# every token: the model learns the special tokens, the turn structure, multiple choice and
# calling the calculator. This was nanochat's original recipe; upstream later folded it into
# SFT. We keep it as its own stage because it shows a student the two separate jobs: learning
# the chat *format* from lots of packed data (mid), then learning to *answer* with the loss
# only on the assistant's words, one conversation per row (SFT).

def epoch_steps(args, ddp, stage, tokenizer):
    """--data hf: the optimizer steps of one epoch of the stage's mixture, as nanochat trains mid
    and SFT: for SFT its conversations over the conversations per step; for mid its tokens (each
    rank renders its share once) over --total-batch-size."""
    epoch = len(realdata.mixture(args.data_dir, "train", stage)[1])
    if stage == "sft":
        return max(1, epoch // (args.device_batch_size * ddp.world_size
                                * grad_accum_steps(args, ddp.world_size)))
    mine = (c for p, c in itertools.islice(chat_examples(args, "train", 0, stage), epoch)
            if p % ddp.world_size == ddp.rank)
    tokens = torch.tensor(sum(len(render_conversation(tokenizer, c)[0]) for c in mine), device=ddp.device)
    if dist.is_initialized():
        dist.all_reduce(tokens)
    print0(f"{stage}: one epoch is {epoch:,} conversations, {tokens.item():,} tokens")
    return max(1, math.ceil(tokens.item() / args.total_batch_size))


def chat_stage(args, ddp, stage, source, make_loader, fixed_shapes=True):
    """Train a chat stage (mid, sft) from the source stage's checkpoint on make_loader's batches."""
    tokenizer = get_tokenizer()
    start = start_model(args, ddp, stage, tokenizer, source=source)

    def make_batches(split, state=None):
        return make_loader(args, tokenizer, split, args.device_batch_size, args.max_seq_len, ddp,
                           ddp.device, state)

    def evaluate(model):
        return dict(val_loss=evaluate_loss(model, make_batches("val"), args.eval_batches))

    if args.num_iterations > 0:
        num_steps = args.num_iterations
    elif args.data == "hf":
        num_steps = epoch_steps(args, ddp, stage, tokenizer)
    else:
        num_steps = STAGE_DEFAULTS[stage]["steps"]
    summary = train(args, ddp, stage, start, tokenizer, make_batches, evaluate, num_steps, fixed_shapes)
    summary["chat_eval"] = {}
    if args.data == "tinyworld":  # real-data chat tasks: --stage eval --data hf
        summary["chat_eval"], summary["induction"] = chat_report_card(
            start.model, tokenizer, ddp, args.eval_items, f"{stage} held-out accuracy")
    if ddp.is_master:
        write_report(stage, summary)
    return summary


def stage_mid(args, ddp):
    return chat_stage(args, ddp, "mid", "base", mid_batches)


def stage_sft(args, ddp):
    # one conversation per row, padded to the batch's longest: every batch has its own width
    return chat_stage(args, ddp, "sft", "mid", sft_batches, fixed_shapes=False)


# -----------------------------------------------------------------------------------------------
# Stage rl: simplified GRPO on problems with checkable answers
#
# Each step: take some problems, sample G answers to each from the current model (tools
# included), reward 1 if the '####' answer is right else 0, and push up the log-probability of
# answers that beat their group's mean reward, down for those below it:
#     advantage_i = reward_i - mean(rewards of the group)
#     loss = -sum over sampled tokens of logp(token) * advantage / number of sampled tokens
# This is GRPO with its machinery removed, and each simplification is acceptable here:
# - no division by the group's reward std: with 0/1 rewards it would only reweight groups, and
#   it inflates groups where one lucky sample differs (a known bias of the original);
# - fully on-policy (one optimizer step per batch of samples), so the importance ratio is 1
#   and PPO-style clipping has nothing to clip;
# - no KL penalty to a reference model: the LR is small and the run short, and dropping it
#   saves a second model in memory;
# - token-level normalisation (divide by all sampled tokens, not per answer), so long answers
#   are not favoured or penalised per token.
# Groups whose rewards are all equal have zero advantage everywhere: they carry no signal and
# are skipped. Tokens forced in by the calculator and the prompt are never trained on.

def reply_text(tokenizer, tokens):
    """A sampled reply as its reader sees it, and as a reward receives it in training and in
    evaluation alike: the text before the stop token, each calculator call written as the server's
    whole replies write it, and no other special token. E.g. the tokens of
    'It is <|python_start|>2*3<|python_end|> <|output_start|>6<|output_end|> 6.<|assistant_end|>'
    give 'It is [calculator: 2*3 = 6] 6.'"""
    s = tokenizer.special_tokens
    shown = {s["<|python_start|>"]: b"[calculator: ", s["<|output_start|>"]: b" = ",
             s["<|output_end|>"]: b"]"}
    special, stop = set(s.values()), {s["<|assistant_end|>"], s["<|bos|>"]}
    pieces = []
    for token in tokens:
        if token in stop:
            break
        pieces.append(shown.get(token, b"") if token in special else tokenizer.token_to_bytes(token))
    return b"".join(pieces).decode("utf-8", errors="replace")


def correct_answer_reward(question, reply, answer):
    """The default reward: 1.0 if the reply's '####' answer is the reference answer, else 0.0."""
    return float(answer_is_correct(reply, answer))


def pass_at_k(model, tokenizer, problems, ddp, k, max_tokens, temperature, seed=0,
              reward=correct_answer_reward):
    """Sample k answers per problem; return (pass_at_k_stats, each problem's k rewards in problem
    order). pass@1 is the mean reward of a sample and pass@k the mean over problems of the best of
    its k rewards: with 0/1 rewards, the fraction of correct samples and of problems with any
    correct."""
    engine, rewards = Engine(model, tokenizer), []
    for i, chunk in enumerate(batched(shard(problems, ddp), max(1, GENERATE_ROWS // k))):
        prompts = [question_prompt(tokenizer, problem) for problem in chunk]
        answers, _ = engine.generate_batch(prompts, k, max_tokens, temperature, seed=seed + i)
        for j, problem in enumerate(chunk):
            replies = [reply_text(tokenizer, a) for a in answers[j * k:(j + 1) * k]]
            rewards.append([reward(problem["question"], reply, problem["answer"]) for reply in replies])
    rewards = gather_in_order(ddp, rewards)
    return pass_at_k_stats(rewards), rewards


class GRPORow(NamedTuple):
    """One sampled answer as a training row: the prompt and answer tokens (but the last), each
    position's target (-1: not trained: the prompt, the tool's forced tokens) and its advantage."""
    ids: list
    targets: list
    advantage: float


def grpo_sequences(prompt, answers, sampled_masks, rewards):
    """Turn one group of G sampled answers into GRPORows, the advantage of each its reward less
    the group's mean, trained on its sampled tokens only. Returns [] when the group carries no
    signal."""
    mean = sum(rewards) / len(rewards)
    if all(r == rewards[0] for r in rewards):
        return []
    rows = []
    for answer, sampled, reward in zip(answers, sampled_masks, rewards):
        ids = prompt + answer
        targets = [-1] * (len(prompt) - 1) + [t if m else -1 for t, m in zip(answer, sampled)]
        rows.append(GRPORow(ids[:-1], targets, reward - mean))
    return rows


def grpo_loss(model, rows, num_sampled_tokens, device, pad_id):
    """-sum(logp * advantage) / num_sampled_tokens over the rows (right-padded into a batch)."""
    width = max(len(row.ids) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row.ids)] = torch.tensor(row.ids)
        targets[i, :len(row.targets)] = torch.tensor(row.targets)
    advantages = torch.tensor([row.advantage for row in rows], dtype=torch.float32, device=device)
    # -logp of each target, 0 where ignored: (rows, width)
    nll = model(ids.to(device), targets.to(device), loss_reduction="none").view(len(rows), width)
    return (nll * advantages[:, None]).sum() / num_sampled_tokens


def rl_problems(args):
    """(draw_problem, held_out, size): a function drawing a training problem {"question", "answer"}
    with a random.Random, the held-out problems for pass@k, and how many training problems there
    are (None: TinyWorld's never run out). --problems, TinyWorld word problems or GSM8K."""
    if args.problems is not None:
        train, held_out = realdata.own_problems(args.problems)
        return (lambda rng: train[rng.randrange(len(train))]), held_out[:args.pass_k_problems], len(train)
    if args.data == "tinyworld":
        def draw_problem(rng):
            return tinyworld.train_item(tinyworld.tinyworld_hard_word_problem, rng)

        return draw_problem, tinyworld.tinyworld_eval_items("hard_word_problem", "test",
                                                            n=args.pass_k_problems), None
    train, test = (realdata.load_rows("gsm8k", "train", args.data_dir),
                   realdata.load_rows("gsm8k", "test", args.data_dir))

    def draw_problem(rng):
        row = train[rng.randrange(len(train))]
        return dict(question=row["question"], answer=extract_answer(row["answer"]))

    held_out = test.select(range(min(args.pass_k_problems, len(test))))
    return draw_problem, [dict(question=row["question"], answer=extract_answer(row["answer"]))
                          for row in held_out], len(train)


# steps in a row in which every group's rewards were all equal before RL says so
NO_SIGNAL_STEPS = 5


def warn_no_signal(steps, mean_reward, examples):
    """Say once that nothing is being learned, with a few of the last step's replies and their
    rewards."""
    print0(f"rl: for {steps} steps in a row every group's rewards were all equal "
           f"(mean {mean_reward:.3f}): the reward never varies, so no step changes the model. "
           "Check the reward on replies like these from the last step:")
    for reward, reply in examples[:3]:
        print0(f"  reward {reward:.3f} for the reply {reply[:200]!r}")


def rollout(engine, tokenizer, problems, args, seed, reward):
    """Sample args.num_samples replies to each problem with the current policy (all the groups in
    one batch) and score them with `reward`. Returns, problem by problem, (prompt, answers, sampled
    masks, replies, rewards): answers as tokens, with the stop token (RL teaches when to stop too);
    replies as text, as pass_at_k reads them."""
    G = args.num_samples
    prompts = [question_prompt(tokenizer, problem) for problem in problems]
    answers, sampled = (engine.generate_batch(prompts, G, args.max_new_tokens, args.temperature,
                                              args.top_k, seed=seed, keep_stop_token=True)
                        if prompts else ([], []))
    groups = []
    for i, (problem, prompt) in enumerate(zip(problems, prompts)):
        group_answers, group_sampled = answers[i * G:(i + 1) * G], sampled[i * G:(i + 1) * G]
        replies = [reply_text(tokenizer, a) for a in group_answers]
        rewards = [reward(problem["question"], reply, problem["answer"]) for reply in replies]
        groups.append((prompt, group_answers, group_sampled, replies, rewards))
    return groups


def policy_step(ddp_model, ddp, rows, num_tokens, micro_batch, pad_id):
    """The gradient of grpo_loss over this rank's rows, micro_batch rows at a time, each divided by
    num_tokens / world_size (num_tokens: the sampled tokens of all ranks), so that DDP's average
    over the ranks divides by num_tokens. DDP ends every backward pass in an all-reduce, so every
    rank runs as many as the busiest rank (a rank out of rows backpropagates a zero loss). Returns
    the number of micro-steps: 0 when no rank had a row."""
    most_rows = torch.tensor(len(rows), device=ddp.device)
    if dist.is_initialized():
        dist.all_reduce(most_rows, op=dist.ReduceOp.MAX)
    micro_steps = (most_rows.item() + micro_batch - 1) // micro_batch
    chunks = batched(rows, micro_batch)
    for j in range(micro_steps):
        sync = j == micro_steps - 1 or not ddp.is_ddp
        with contextlib.nullcontext() if sync else ddp_model.no_sync():
            if j < len(chunks):
                # DDP averages the ranks' gradients:
                # per rank, divide by its share of all the sampled tokens
                loss = grpo_loss(ddp_model, chunks[j], num_tokens / ddp.world_size, ddp.device, pad_id)
            else:
                loss = ddp_model(torch.tensor([[pad_id]], device=ddp.device)).sum() * 0.0
            loss.backward()
    return micro_steps


def stage_rl(args, ddp):
    """Simplified GRPO from the SFT checkpoint (see the section's comment): each step samples a group
    of answers per problem, rewards them, and pushes the model towards the better ones."""
    tokenizer = get_tokenizer()
    start = start_model(args, ddp, "rl", tokenizer, source="sft")
    model = start.model
    optimizers = stage_optimizers(args, start)
    ddp_model = wrap_ddp(model, ddp)
    G, P = args.num_samples, args.prompts_per_step
    draw_problem, held_out, num_train = rl_problems(args)
    if args.num_iterations > 0:
        num_steps = args.num_iterations
    else:  # with GSM8K an epoch's worth of problems, as nanochat (drawn at random here)
        num_steps = (max(1, num_train // P) if args.data == "hf" and args.problems is None
                     else STAGE_DEFAULTS["rl"]["steps"])
    start_step = first_step(start, num_steps)
    reward = realdata.load_reward(args.reward) if args.reward else correct_answer_reward
    print0(f"rl: {num_steps} steps x {P} problems x {G} samples, temperature {args.temperature}, "
           f"max {args.max_new_tokens} new tokens, lr x{args.lr_scale}, pass@k on {len(held_out)} "
           "held-out problems")
    history = []  # each evaluation: the step, pass@1 and pass@k with their errors
    evaluated = []  # each evaluation's rewards, problem by problem
    curve = []  # each step's mean reward, share of groups without signal, trained tokens
    engine = Engine(model, tokenizer)
    pad_id = tokenizer.special_tokens["<|bos|>"]
    t_start, t_steps = time.time(), 0.0
    step, steps_without_signal = start_step, 0
    try:
        while True:
            # pass@1 and pass@k on the held-out problems (as train() evaluates), with the same seed
            # each time, so that two evaluations differ by the model alone
            if step == start_step or periodic(step, args.eval_every, num_steps):
                model.eval()
                stats, rewards = pass_at_k(model, tokenizer, held_out, ddp, args.pass_k,
                                           args.max_new_tokens, args.temperature, 10_000, reward)
                history.append(dict(step=step, **stats))
                evaluated.append(rewards)
                print0(f"step {step:4d}/{num_steps} | held-out pass@1 {stats['pass1']:.3f} +- "
                       f"{stats['pass1_stderr']:.3f} | pass@{args.pass_k} {stats['passk']:.3f} +- "
                       f"{stats['passk_stderr']:.3f}")
            if step > start_step and periodic(step, args.save_every, num_steps):
                save_stage(args, ddp, "rl", step, num_steps, model, optimizers, tokenizer, history[-1])
            if step == num_steps:
                break
            t0 = time.time()
            # 1) rollout: G answers to each of this rank's problems from the current policy, and
            # their rewards; a step's problems and samples depend on the step alone (and the rank),
            # so a resumed run draws the same
            model.eval()
            rng = random.Random(f"rl-{args.seed}-{step}")
            problems = [draw_problem(rng) for _ in range(P)][ddp.rank::ddp.world_size]
            groups = rollout(engine, tokenizer, problems, args,
                             args.seed * 100_003 + step * ddp.world_size + ddp.rank, reward)
            # 2) advantages: each answer's reward less its group's mean; a group whose rewards are
            # all equal has none, so it carries no signal
            rows, rewards_all, zero_signal, examples = [], [], 0, []
            for prompt, answers, sampled, replies, rewards in groups:
                rewards_all += rewards
                examples += list(zip(rewards, replies))[:2]
                group_rows = grpo_sequences(prompt, answers, sampled, rewards)
                zero_signal += not group_rows
                rows += group_rows
            # micro-batches of similar lengths: less padding to compute
            rows.sort(key=lambda row: len(row.ids))
            # 3) one policy-gradient step on the groups with signal, normalised by all their sampled
            # tokens on every rank: the counts (and the logged mean reward) are sums over ranks
            model.train()
            counts = torch.tensor([sum(t >= 0 for row in rows for t in row.targets),
                                   sum(rewards_all), len(rewards_all), zero_signal],
                                  dtype=torch.float64, device=ddp.device)
            if dist.is_initialized():
                dist.all_reduce(counts)  # summed over ranks
            num_tokens, reward_sum, num_rewards, zero_groups = counts.tolist()
            # when no rank had a group with signal there is no gradient: no step, no new rate
            if policy_step(ddp_model, ddp, rows, num_tokens, args.device_batch_size, pad_id):
                set_lr(optimizers, 1.0 - step / num_steps)  # a linear decay to zero
                for opt in optimizers:
                    opt.step()
            model.zero_grad(set_to_none=True)
            step += 1
            dt = time.time() - t0
            t_steps += dt
            mean_reward = reward_sum / max(num_rewards, 1)
            curve.append(dict(step=step, mean_reward=mean_reward, zero_signal=zero_groups / P,
                              sampled_tokens=int(num_tokens)))
            eta = format_seconds((num_steps - step) * t_steps / (step - start_step))
            print0(f"step {step:4d}/{num_steps} | reward {mean_reward:.3f} | zero-signal groups "
                   f"{zero_groups / P:.2f} | trained tokens {int(num_tokens)} | {dt:.1f}s | "
                   f"eta {eta} (+ evaluations)")
            # a reward that never varies teaches nothing: say so once, with replies to look at
            steps_without_signal = steps_without_signal + 1 if zero_groups == P else 0
            if steps_without_signal == NO_SIGNAL_STEPS:
                warn_no_signal(steps_without_signal, mean_reward, examples)
    except KeyboardInterrupt:  # Ctrl-C: one line that says where the last good checkpoint is
        raise interrupted(step, checkpoint_dir("rl", args.model_tag)) from None
    summary = dict(history=history, reward_curve=curve, steps=num_steps, num_samples=G,
                   pass_k=args.pass_k, prompts_per_step=P, held_out=len(held_out),
                   train_seconds=round(time.time() - t_start, 1), chat_eval={})
    # the same held-out problems at the first and last evaluation: compared problem by problem
    if len(evaluated) > 1:
        first, last = ([sum(r) / len(r) for r in rewards] for rewards in (evaluated[0], evaluated[-1]))
        best_first, best_last = ([max(r) for r in rewards] for rewards in (evaluated[0], evaluated[-1]))
        summary["change"] = dict(pass1=paired_difference(first, last),
                                 passk=paired_difference(best_first, best_last))
    if args.data == "tinyworld":
        summary["chat_eval"], summary["induction"] = chat_report_card(
            model, tokenizer, ddp, args.eval_items, "rl held-out accuracy")
    if ddp.is_master:
        write_report("rl", summary)
        report.plot_reward_curve(summary, base_dir() / "report" / "rl.png")
    return summary


# -----------------------------------------------------------------------------------------------
# Public benchmarks, run by --stage eval alone: CORE (DCLM) for a base model, given DCLM's eval
# bundle; ARC, MMLU, GSM8K, HumanEval and ChatCORE for a chat model, with --data hf.
#
# CORE is the score the DCLM paper gives a base model: in-context learning on 22 public tasks,
# read from an "eval bundle" of jsonl files. Nothing is sampled; every item is decided by the
# model's per-token loss on candidate texts, in one of three ways:
# - multiple_choice: one question, several answers; the model picks the answer whose tokens
#   have the lowest mean loss after the question.
# - schema: several contexts, one shared continuation; the model picks the context after which
#   the continuation has the lowest mean loss.
# - language_modeling: one context and its continuation; right only if greedy prediction
#   reproduces every token of the continuation.
# A task's accuracy is centered on its random baseline, (acc - baseline) / (1 - baseline), so
# chance scores 0 and perfection 1 on every task alike; CORE is the mean over the tasks.

@torch.no_grad()
def score_core_item(model, tokenizer, task, data, index, device):
    """True when the model gets CORE item data[index] right (see the section comment)."""
    item = data[index]
    texts = realdata.core_texts(item, task["type"], task["delimiter"],
                               realdata.core_fewshot(data, index, task["num_fewshot"]))
    rows, spans = realdata.core_spans(tokenizer, texts, task["type"])
    # all the candidates of one item in one forward; too long a row loses its oldest few-shot text
    ids, logits, spans = forward_padded(model, rows, spans, tokenizer.special_tokens["<|bos|>"], device)
    if task["type"] == "language_modeling":
        (start, end), = spans
        return torch.equal(logits[0, start - 1:end - 1].argmax(dim=-1), ids[0, start:end])
    return mean_span_losses(ids, logits, spans).argmin().item() == item["gold"]


def evaluate_core_task(model, tokenizer, task, data, ddp):
    """(correct, total) on one CORE task, summed over ranks: each rank scores every
    world_size-th item, with the whole task at hand for drawing few-shot examples."""
    mine = shard(list(range(len(data))), ddp)
    correct = sum(score_core_item(model, tokenizer, task, data, index, ddp.device) for index in mine)
    return all_reduce_counts(correct, len(mine), ddp.device)


def evaluate_core(model, tokenizer, bundle_dir, ddp, max_per_task=-1):
    """CORE of a base model on the bundle in bundle_dir; prints one line per task."""
    tasks = realdata.load_core_bundle(bundle_dir, max_per_task)
    print0(f"CORE on {len(tasks)} tasks from {bundle_dir}:")
    print0(f"  {'task':34s} {'type':17s} {'shots':>5s} {'items':>6s} {'accuracy':>9s} {'centered':>9s}")
    table = {}
    for task in tasks:
        correct, total = evaluate_core_task(model, tokenizer, task, task["items"], ddp)
        accuracy = correct / max(total, 1)
        centered = realdata.centered_accuracy(accuracy, task["random_baseline"])
        table[task["label"]] = dict(type=task["type"], shots=task["num_fewshot"], items=total,
                                    accuracy=accuracy, centered=centered)
        print0(f"  {task['label']:34s} {task['type']:17s} {task['num_fewshot']:5d} {total:6d} "
               f"{accuracy:9.4f} {centered:9.4f}")
    core = sum(row["centered"] for row in table.values()) / max(len(table), 1)
    print0(f"  {'CORE (mean centered accuracy)':34s} {'':17s} {'':5s} {'':6s} {'':9s} {core:9.4f}")
    return dict(CORE=core, core_tasks=table)


def find_core_bundle(args, ddp):
    """The CORE bundle folder: --core-bundle, else <base_dir>/eval_bundle, downloaded there with
    --data hf. Returns None after saying, in one line, what is missing and how to supply it."""
    if args.core_bundle:
        if not (Path(args.core_bundle) / "core.yaml").exists():
            raise UserError(f"--core-bundle {args.core_bundle} has no core.yaml: pass the folder "
                            "that holds core.yaml, eval_meta_data.csv and eval_data/")
        return Path(args.core_bundle)
    directory = base_dir() / "eval_bundle"
    if not (directory / "core.yaml").exists() and args.data == "hf":
        if ddp.is_master:
            try:
                realdata.download_eval_bundle(directory)
            except realdata.DataError as e:
                print0(f"CORE skipped: {e}; download it by hand, unzip it and pass --core-bundle DIR")
        if ddp.is_ddp:
            dist.barrier()
    elif not (directory / "core.yaml").exists():
        print0(f"CORE skipped: no eval bundle in {directory}; pass --core-bundle DIR (a folder "
               "with core.yaml, eval_meta_data.csv, eval_data/, unzipped from "
               f"{realdata.EVAL_BUNDLE_URL}), or use --data hf to download it")
    return directory if (directory / "core.yaml").exists() else None


# The chat model's report card on real data (nanochat's choice of tasks): ARC-Easy,
# ARC-Challenge and MMLU as multiple choice, read off the letter logits; GSM8K generated
# greedily with the calculator tool; HumanEval, when asked for, generated and run in a sandbox.
# ChatCORE is, like CORE, the mean centered accuracy, here over the tasks that ran.

def chat_eval_item(task, row):
    """One test row in the item format of the evaluators above: multiple choice with the index of
    its answer, GSM8K with the number after '####', HumanEval with its prompt and tests."""
    if task == "GSM8K":
        return dict(question=row["question"], answer=extract_answer(row["answer"]))
    if task == "HumanEval":
        return dict(prompt=row["prompt"], test=row["test"], entry_point=row["entry_point"])
    choices = row["choices"] if task == "MMLU" else row["choices"]["text"]
    return dict(question=row["question"], choices=choices, answer=realdata.answer_index(row))


def evaluate_humaneval(model, tokenizer, items, ddp, max_tokens=256):
    """pass@1 of greedy answers to HumanEval, each checked by its tests in the sandbox
    (accuracy_stats). An answer passes only if its program ran past check() (require_end): exiting
    with status 0 is not enough, since an answer can call os._exit(0) or sys.exit() before the tests
    run."""
    engine, passed, mine = Engine(model, tokenizer), 0, shard(items, ddp)
    for item in mine:
        prompt = render_for_completion(tokenizer, dict(messages=[dict(role="user", content=item["prompt"])]))
        (tokens,), _ = engine.generate_batch(prompt, 1, max_tokens, temperature=0.0)
        passed += sandbox.run_sandboxed(sandbox.humaneval_program(item, tokenizer.decode(tokens)),
                                        require_end=True)
    return accuracy_stats(*all_reduce_counts(passed, len(mine), ddp.device))


def evaluate_real_chat(args, model, tokenizer, ddp):
    """Accuracy on each real chat task that can run here, and ChatCORE over them; a task whose
    data cannot be loaded is skipped with one line saying how to supply it."""
    tasks = {}
    for task, (source, chance) in realdata.CHAT_EVAL_TASKS.items():
        if task == "HumanEval":
            problem = sandbox.sandbox_problem() if args.humaneval else None
            if not args.humaneval or problem:
                print0("HumanEval skipped: " + (f"no sandbox on this machine ({problem})" if problem else
                       "it runs model-written code; pass --humaneval to run it in a sandbox (bubblewrap)"))
                continue
        try:
            rows = realdata.load_rows(source, "test", args.data_dir)
        except realdata.DataError as e:
            print0(f"{task} skipped: {e}")
            continue
        if args.max_per_task > 0:
            rows = rows.select(range(min(args.max_per_task, len(rows))))
        items = [chat_eval_item(task, row) for row in rows]
        if task == "GSM8K":
            stats = evaluate_generative(model, tokenizer, items, ddp, "word_problem", args.max_new_tokens)
        elif task == "HumanEval":
            stats = evaluate_humaneval(model, tokenizer, items, ddp, args.max_new_tokens)
        else:
            stats = evaluate_multiple_choice(model, tokenizer, items, ddp)
        tasks[task] = dict(stats, centered=realdata.centered_accuracy(stats["accuracy"], chance))
        print0(f"  {task:14s} {format_accuracy(stats):40s} centered {tasks[task]['centered']:.4f}")
    if not tasks:
        return {}
    chatcore = sum(row["centered"] for row in tasks.values()) / len(tasks)
    print0(f"  ChatCORE (mean centered accuracy over {len(tasks)} tasks) {chatcore:.4f}")
    return dict(chat_tasks=tasks, ChatCORE=chatcore)


# -----------------------------------------------------------------------------------------------
# Stages eval, chat, serve, report and plan: use the checkpoints, or price a run before it starts

def stage_eval(args, ddp):
    tokenizer = get_tokenizer()
    tag = args.model_tag
    model, meta = load_trained(args, ddp, args.source, tokenizer)
    model.eval()
    results = {}
    # a base model is measured on text (bits per byte, and CORE with a bundle); a chat model on
    # the real chat tasks with --data hf
    if args.source == "base":
        token_bytes = token_byte_lengths(tokenizer, ddp.device)
        batches = base_batches(args, tokenizer, "val", args.device_batch_size, args.max_seq_len,
                               ddp, ddp.device)
        results["val_bpb"] = evaluate_bpb(model, batches, args.eval_batches, token_bytes)
        bundle = find_core_bundle(args, ddp)
        real = evaluate_core(model, tokenizer, bundle, ddp, args.max_per_task) if bundle else {}
    elif args.data == "hf":
        real = evaluate_real_chat(args, model, tokenizer, ddp)
    else:
        real = {}
    print0(f"{args.source} checkpoint {tag} (step {meta['step']})"
           + (f": validation bits per byte {results['val_bpb']:.4f}" if "val_bpb" in results else ""))
    if args.data == "tinyworld":
        chat, results["induction"] = chat_report_card(model, tokenizer, ddp, args.eval_items,
                                                      "held-out accuracy")
        results |= chat
    if ddp.is_master:
        write_report(f"eval_{args.source}", results | real)
    return results | real


def stage_chat(args, ddp):
    """Talk to a checkpoint: `-p "..."` answers once, otherwise an interactive prompt.
    Calculator calls are shown inline as [calculator: 12*7 = 84]."""
    tokenizer = get_tokenizer()
    tag = args.model_tag
    model, _ = load_trained(args, ddp, args.source, tokenizer)
    model.eval()
    engine, messages = Engine(model, tokenizer), []
    # what is printed when a part of each type begins; a tool output is closed by "]"
    opening = dict(text="", python="[calculator: ", python_output=" = ")
    if args.prompt is None:
        print(f"chatting with the {args.source} model {tag}; an empty line or Ctrl-D quits, "
              "/clear starts over")
    while True:
        if args.prompt is not None:
            user = args.prompt
        else:
            try:
                user = input("\nuser> ").strip()
            except (EOFError, KeyboardInterrupt):
                print()
                return
            if not user:
                return
            if user == "/clear":
                messages = []
                continue
        messages.append(dict(role="user", content=user))
        # the whole conversation is rendered again each turn: the model keeps no state between turns
        prompt, parts = render_for_completion(tokenizer, dict(messages=messages)), []
        print("assistant> " if args.prompt is None else "", end="", flush=True)
        for text, part in serve.reply_pieces(engine, prompt, args.max_new_tokens, args.temperature,
                                             args.top_k, args.seed):
            shown = parts[-1]["type"] if parts else "text"
            # a part of another type begins: close a tool output, then open the new part
            if text and part != shown:
                print(("]" if shown == "python_output" else "") + opening[part], end="")
            print(text, end="", flush=True)
            serve.add_piece(parts, text, part)
        print("]" if parts and parts[-1]["type"] == "python_output" else "")
        messages.append(dict(role="assistant", content=parts))  # the calculator calls kept as calls
        if args.prompt is not None:
            return


def stage_serve(args, ddp):
    """The chat page (chat.html) and an OpenAI-style API over HTTP (serve.py) for every checkpoint
    of the model tag: base, mid, sft and rl, those that exist, each loaded once; --source is the one
    a request gets unless it names another."""
    tokenizer = get_tokenizer()
    tag = args.model_tag
    models = {}
    # every stage with a checkpoint, and --source even without one: load_trained then says which
    # stage to run first
    for stage in TRAINING_STAGES:
        directory = checkpoint_dir(stage, tag)
        if stage != args.source and (not directory.exists() or last_checkpoint_step(directory) is None):
            continue
        model, meta = load_trained(args, ddp, stage, tokenizer)
        written = (directory / f"model_{meta['step']:06d}.pt").stat().st_mtime
        # the context is the length the model was trained on
        # (its rotary tables run 10x longer, to positions it never saw)
        models[stage] = serve.Checkpoint(Engine(model.eval(), tokenizer), meta["step"],
                                         model.config.sequence_len, int(written))
        params = list(model.parameters())
        print(f"loaded the {stage} checkpoint (step {meta['step']}): "
              f"{sum(p.numel() for p in params) / 1e6:.1f}M parameters, "
              f"{sum(p.numel() * p.element_size() for p in params) / 2**20:.0f} MiB", flush=True)
    info = dict(model=tag, stage=args.source,
                defaults=dict(temperature=args.temperature, top_k=args.top_k, max_tokens=args.max_new_tokens))
    limits = serve.Limits(max_new_tokens=args.max_new_tokens, max_queue=args.max_queue)
    # serve.py imports nothing from this file: it gets the two renderers as functions
    try:
        serve.serve(models, lambda messages: render_for_completion(tokenizer, dict(messages=messages)),
                    lambda messages: render_conversation(tokenizer, dict(messages=messages)),
                    info, args.host, args.port, limits, log=lambda line: print(line, flush=True),
                    allowed_hosts=args.allow_host)
    except OSError as e:
        raise UserError(str(e)) from None


# report.md: every stage's report/<stage>.json on one page (report.py)

def stage_report(args, ddp):
    if not ddp.is_master:
        return
    # every stage's report/<stage>.json (and wall.json), keyed by its file name
    reports = {path.stem: json.loads(path.read_text())
               for path in sorted((base_dir() / "report").glob("*.json"))}
    final, samples = next((stage for stage in ("rl", "sft") if stage in reports), None), []
    if final is not None:  # two sample conversations with the last chat model
        tokenizer = get_tokenizer()
        model, _ = load_trained(args, ddp, final, tokenizer)
        engine = Engine(model.eval(), tokenizer)
        for question in ("What is the capital of Japan?",
                         tinyworld.tinyworld_eval_items("hard_word_problem", n=1)[0]["question"]):
            prompt = render_for_completion(tokenizer, dict(messages=[dict(role="user", content=question)]))
            # greedy, not sampled: the report shows the model's most likely token at each step
            (reply,), _ = engine.generate_batch(prompt, 1, 128, temperature=0.0)
            samples.append((question, tokenizer.decode(reply)))
    reward_curve = base_dir() / "report" / "rl.png"
    text = report.markdown(reports, report.real_eval_report_lines(reports), final, samples,
                           args.wall_seconds, reward_curve if reward_curve.exists() else None,
                           report.chat_changes(reports))
    Path(args.report_path).write_text(text)
    print0(text, end="")
    print0(f"wrote {args.report_path}")


# what a run will cost, before paying for it (hardware.plan)

def stage_plan(args, ddp):
    """For the model the flags describe, on --gpus GPUs at an assumed --mfu: every stage's tokens,
    steps, batch, data and hours (hardware.plan). Nothing is loaded or downloaded (meta_model:
    shapes, no memory). `speedrun.sh d20|d26|d32` prints it before it starts."""
    model = meta_model(args, args.vocab_size)
    params = sum(p.numel() for p in model.parameters())
    plan, table = hardware.plan(args, model.config, params, model.estimate_flops(),
                                base_steps(args, params), grad_accum_steps(args, args.gpus))
    print0(table)
    return plan


# -----------------------------------------------------------------------------------------------
# CLI

# the stages that train and checkpoint a model, in order
TRAINING_STAGES = ("base", "mid", "sft", "rl")
STAGES = {"tok": stage_tok, "base": stage_base, "mid": stage_mid, "sft": stage_sft, "rl": stage_rl,
          "eval": stage_eval, "chat": stage_chat, "serve": stage_serve, "report": stage_report,
          "plan": stage_plan}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except where the default (None) means "decided per stage"."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


# What a numeric flag's value must be, (test, the words of its error), given where the flag is added
# (add_argument(...).must = ...) and checked by finalize_args; a flag left at None passes.
AT_LEAST_1, POSITIVE, NOT_NEGATIVE = (lambda v: v >= 1, "at least 1"), \
    (lambda v: v > 0, "positive"), (lambda v: v >= 0, "0 or more")
FRACTION = (lambda v: 0 <= v <= 1, "between 0 and 1")
STEPS_OR_ALL = (lambda v: v >= 1 or v == -1, "at least 1, or -1 (the default)")


def build_parser():
    p = argparse.ArgumentParser(
        description="nanochat-one: train and talk to a ChatGPT-style model, one stage at a time. "
                    "Flags are grouped by the stages that read them.",
        formatter_class=HelpFormatter)
    p.add_argument("--stage", required=True, choices=list(STAGES), help="which stage to run")
    # where every stage's text, conversations and problems come from, and what replaces them
    g = p.add_argument_group("data")
    g.add_argument("--data", default="tinyworld", choices=["tinyworld", "hf"],
                   help="tinyworld: the embedded synthetic world (offline); hf: real datasets "
                        "(FineWeb-EDU, SmolTalk, MMLU, GSM8K)")
    g.add_argument("--data-dir", default=None, help="--data hf: folder of FineWeb-EDU style "
                   "parquet shards (a text column) and of smoltalk/, mmlu/, gsm8k/, arc_easy/, "
                   "arc_challenge/ subfolders (default: <base_dir>/base_data, downloaded there; "
                   "chat data from the hub). mid and sft, either --data: its *.jsonl files of your "
                   'own {"messages": [...]} conversations replace every other training '
                   "conversation")
    g.add_argument("--problems", default=None,
                   help='rl: your own problems instead: a .jsonl file of {"question", "answer"} '
                        "lines (one in ten held out for pass@k, by a hash of the question)")
    g.add_argument("--reward", default=None, help="rl: module:function, your own reward (question, "
                   "reply, answer) -> float in place of 1.0 for the right '####' answer, else 0.0 "
                   "(module: a .py file in the current folder); reply is the text a reader sees, "
                   "the same in training and evaluation: no stop token, calculator calls as "
                   "[calculator: 2*3 = 6]")
    g.add_argument("--num-shards", type=int, default=None,
                   help="--data hf without --data-dir: FineWeb-EDU shards to download (about 100 "
                        "MB each): the first N-1 for training, plus the pinned validation shard "
                        "(default: those the base run's tokens need, with a 10%% margin)"
                   ).must = (lambda v: v >= 2, "at least 2 (one train shard and the validation shard)")
    g.add_argument("--replay", type=float, default=None, help="mid and sft: the share of training "
                   "conversations replaced by a TinyWorld pretraining document, trained on every token, so "
                   "that chat training does not overwrite the facts base learned from that text (default: "
                   f"{defaults_help('replay')}; TinyWorld only)"
                   ).must = (lambda v: 0 <= v < 1, "at least 0 and below 1")
    g.add_argument("--copy-drills", type=float, default=None, help="base and mid: the share of "
                   "training documents (conversations) replaced by a copy drill, random token ids "
                   "written twice, which teaches reading the context (default: 0.2 for TinyWorld's "
                   "base, else 0)").must = (lambda v: 0 <= v < 1, "at least 0 and below 1")
    # the BPE that --stage tok trains; the stages after it take the vocabulary from its file
    # (plan, which loads nothing, reads --vocab-size)
    g = p.add_argument_group("tokenizer (tok)")
    g.add_argument("--vocab-size", type=int, default=4096,
                   help="vocabulary size (256 bytes + merges + special tokens)"
                   ).must = (lambda v: v > 256 + len(SPECIAL_TOKENS),
                             f"more than {256 + len(SPECIAL_TOKENS)} (256 bytes + "
                             f"{len(SPECIAL_TOKENS)} special tokens + at least one merge)")
    g.add_argument("--tok-chars", type=int, default=2_000_000,
                   help="characters of training text").must = (lambda v: v >= 1000, "at least 1000")
    # the shape of a new base model (the depth dial, config_from_depth) and its checkpoint's name;
    # the stages after base load the shape from their source checkpoint
    g = p.add_argument_group("model")
    g.add_argument("--depth", type=int, default=4,
                   help="number of transformer blocks; the width follows from it").must = AT_LEAST_1
    g.add_argument("--aspect-ratio", type=int, default=32, help="width = depth x aspect ratio, "
                   "rounded up to whole heads (nanochat: 64)").must = AT_LEAST_1
    g.add_argument("--head-dim", type=int, default=32, help="dimension of each attention head "
                   "(nanochat: 128)").must = (lambda v: v >= 2 and v % 2 == 0, "even and "
                                              "at least 2 (rotary embeddings rotate pairs)")
    g.add_argument("--n-kv-head", type=int, default=None, help="key/value heads for grouped-query "
                   "attention (default: as many as query heads)").must = AT_LEAST_1
    g.add_argument("--max-seq-len", type=int, default=256,
                   help="context length in tokens").must = (lambda v: v >= 2, "at least 2")
    g.add_argument("--model-tag", default=None, help="checkpoint name (default: d<depth>)")
    # batch, learning rates and schedule, and how often to evaluate, save and log; a flag left at
    # None takes its stage's value (DEFAULTS, STAGE_DEFAULTS) in finalize_args
    g = p.add_argument_group("training (base, mid, sft, rl)")
    g.add_argument("--device-batch-size", type=int, default=16,
                   help="sequences per forward pass on each device").must = AT_LEAST_1
    g.add_argument("--total-batch-size", type=int, default=8192, help="tokens per optimizer step "
                   "(gradient accumulation makes up the rest)").must = AT_LEAST_1
    g.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1: the "
                   f"stage's default: {defaults_help('steps')}; with --data hf one epoch of mid's, "
                   "SFT's or RL's data, as nanochat)").must = STEPS_OR_ALL
    g.add_argument("--target-param-data-ratio", type=float, default=None, help="base: training tokens per "
                   "parameter, used when --num-iterations is -1 (Chinchilla: 20)").must = POSITIVE
    g.add_argument("--lr-scale", type=float, default=None, help="multiply every learning rate "
                   f"({defaults_help('lr_scale')})").must = POSITIVE
    g.add_argument("--matrix-lr", type=float, default=None, help="Muon learning rate for the block "
                   f"matrices, times --lr-scale ({defaults_help('matrix_lr')})").must = POSITIVE
    g.add_argument("--embedding-lr", type=float, default=None, help="AdamW learning rate for wte, "
                   "the embedding and the head, times --lr-scale and scaled by (width/768)^-0.5 "
                   f"({defaults_help('embedding_lr')})").must = POSITIVE
    g.add_argument("--smear-lr", type=float, default=0.05,
                   help="AdamW learning rate for the keys' smear weights").must = POSITIVE
    g.add_argument("--weight-decay", type=float, default=0.0,
                   help="AdamW weight decay").must = NOT_NEGATIVE
    g.add_argument("--warmup-ratio", type=float, default=0.0,
                   help="fraction of steps with linear LR warm-up").must = FRACTION
    g.add_argument("--warmdown-ratio", type=float, default=0.2,
                   help="fraction of steps at the end with linear LR decay").must = FRACTION
    g.add_argument("--final-lr-frac", type=float, default=0.0,
                   help="LR at the end as a fraction of the initial LR").must = FRACTION
    g.add_argument("--compile", default="auto", choices=["auto", "on", "off"], help="torch.compile the model "
                   "(auto: on CUDA; on a CPU for long runs of one batch shape, see the log)")
    g.add_argument("--resume", action="store_true", help="continue this stage from its last checkpoint")
    g.add_argument("--seed", type=int, default=1337, help="random seed")
    g.add_argument("--eval-every", type=int, default=100,
                   help="steps between validation evaluations (bits per byte, loss, or rl's "
                        "pass@k; 0: start and end only)").must = NOT_NEGATIVE
    g.add_argument("--eval-batches", type=int, default=8,
                   help="validation batches per evaluation").must = AT_LEAST_1
    g.add_argument("--save-every", type=int, default=100,
                   help="steps between checkpoints (0: only at the end)").must = NOT_NEGATIVE
    g.add_argument("--log-every", type=int, default=10, help="steps between log lines").must = AT_LEAST_1
    g.add_argument("--sample-prompts", nargs="*", default=["The capital of France is", "Once upon a time"],
                   help="base: prompts to continue at the end of training")
    # the group size, the problems per step, the held-out pass@k, and sampling (which chat uses too)
    g = p.add_argument_group("rl (simplified GRPO)")
    g.add_argument("--num-samples", type=int, default=8, help="answers sampled per training "
                   "problem: the group size G").must = (lambda v: v >= 2, "at least 2 (GRPO "
                                                        "compares the answers within a group)")
    g.add_argument("--prompts-per-step", type=int, default=16,
                   help="problems per optimizer step (split across ranks)").must = AT_LEAST_1
    g.add_argument("--pass-k", type=int, default=4,
                   help="answers sampled per held-out problem: the k of pass@k").must = AT_LEAST_1
    g.add_argument("--pass-k-problems", type=int, default=400, help="held-out harder word problems "
                   "for pass@1 and pass@k before, during (--eval-every) and after RL").must = AT_LEAST_1
    g.add_argument("--temperature", type=float, default=None, help="sampling temperature for rl "
                   f"and chat (0: greedy; {defaults_help('temperature')})"
                   ).must = (lambda v: v >= 0, "0 (greedy) or more")
    g.add_argument("--max-new-tokens", type=int, default=None, help="longest sampled answer "
                   f"in tokens ({defaults_help('max_new_tokens')})").must = AT_LEAST_1
    # which checkpoint, how much of each evaluation to run, the one-shot chat prompt, and top-k
    g = p.add_argument_group("eval and chat")
    g.add_argument("--source", default="sft", choices=TRAINING_STAGES,
                   help="which stage's checkpoint to load")
    g.add_argument("--eval-items", type=int, default=400, help="held-out items per task in chat evaluations "
                   "(TinyWorld's test split holds 398 facts, each asked once)").must = AT_LEAST_1
    g.add_argument("--core-bundle", default=None,
                   help="eval --source base: folder of the DCLM eval bundle for CORE (core.yaml, "
                        "eval_meta_data.csv, eval_data/); default <base_dir>/eval_bundle, "
                        "downloaded there with --data hf")
    g.add_argument("--max-per-task", type=int, default=-1, help="eval: at most this many items "
                   "per CORE task and per real chat task (-1: all)").must = STEPS_OR_ALL
    g.add_argument("--humaneval", action="store_true", help="eval --data hf: also run HumanEval, "
                   "executing the model's code in a sandbox (Linux, bubblewrap: read-only system "
                   "files only, no other processes, no network, limits)")
    g.add_argument("-p", "--prompt", default=None, help="chat: answer this one message and exit")
    g.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (default: "
                   f"all tokens; {defaults_help('top_k')}; nanochat's rl: 50)").must = AT_LEAST_1
    # where the server listens, how many requests may wait, and which Host names it answers
    g = p.add_argument_group("serve (the chat page and an OpenAI-style API over HTTP: see serve.py)")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every "
                   "network interface; there is no login)")
    g.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port)"
                   ).must = (lambda v: 0 <= v <= 65535, "from 0 (any free port) to 65535")
    g.add_argument("--max-queue", type=int, default=32, help="requests that may wait while one is "
                   "answered; more get 503 busy").must = NOT_NEGATIVE
    g.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also answer requests whose Host or Origin header names NAME, as behind a "
                        "proxy (repeatable; the --host address needs none)")
    # the machine a planned run assumes; plan reads the model and training flags above as well
    g = p.add_argument_group("plan (what a run will cost: --stage plan with the model's and the "
                             "training flags)")
    g.add_argument("--gpus", type=int, default=int(os.environ.get("WORLD_SIZE", 1)),
                   help="GPUs the run will use").must = AT_LEAST_1
    g.add_argument("--mfu", type=float, default=40.0, help="model FLOPs utilisation to assume, in "
                   "percent (nanochat measures about 43 at depth 12 and 20 on H100s)"
                   ).must = (lambda v: 0 < v <= 100, "a percentage above 0, at most 100")
    # where report.md goes, and the total time that speedrun.sh measured around all the stages
    g = p.add_argument_group("report")
    g.add_argument("--report-path", default="report.md", help="where to write the markdown report")
    g.add_argument("--wall-seconds", type=int, default=None,
                   help="the whole run's wall time, as measured by speedrun.sh")
    return p


def finalize_args(args, parser=None):
    """Check the flags (raising UserError, before any work starts) and fill in the per-stage
    defaults."""
    defaults = DEFAULTS | STAGE_DEFAULTS.get(args.stage, {})
    if args.data != "tinyworld":  # copy drills are made for TinyWorld's text, replay is its text
        defaults["copy_drills"] = defaults["replay"] = 0.0
    # only flags left unset (None) take a default; "steps" is no flag: --num-iterations -1 means it
    for name, value in defaults.items():
        if name != "steps" and getattr(args, name) is None:
            setattr(args, name, value)
    args.model_tag = args.model_tag or f"d{args.depth}"
    for action in (parser or build_parser())._actions:  # each flag's rule, .must where it was added
        value = getattr(args, action.dest, None)
        # isfinite first: nan fails every comparison and inf passes some (inf > 0), so refuse both
        if (hasattr(action, "must") and value is not None
                and not (math.isfinite(value) and action.must[0](value))):
            raise UserError(f"--{action.dest.replace('_', '-')} must be {action.must[1]}, got {value}")
    if COMPUTE_DTYPE == torch.float16 and args.stage in TRAINING_STAGES:
        raise UserError("NANOCHAT_DTYPE=fp16 would need loss scaling (a GradScaler) to train, "
                        "which this file leaves out: use bf16 (Ampere GPUs and newer) or fp32")
    if args.warmup_ratio + args.warmdown_ratio > 1:
        raise UserError(f"--warmup-ratio {args.warmup_ratio} + "
                        f"--warmdown-ratio {args.warmdown_ratio} must be at most 1")
    # the same check as train()'s, before any work starts
    if args.stage in ("base", "mid", "sft", "plan"):
        grad_accum_steps(args, args.gpus if args.stage == "plan" else int(os.environ.get("WORLD_SIZE", "1")))
    if args.resume and args.stage not in TRAINING_STAGES:
        raise UserError(f"--resume continues a training stage (base, mid, sft, rl), not --stage {args.stage}")
    if args.humaneval and (args.stage != "eval" or args.data != "hf"):
        raise UserError("--humaneval runs with --stage eval --data hf")
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise UserError(f"--data-dir {args.data_dir} is not a folder")
    if args.replay and args.data != "tinyworld":
        raise UserError(f"--replay replays TinyWorld's pretraining text: with --data {args.data} leave it at 0")
    if (args.problems or args.reward) and args.stage != "rl":
        raise UserError("--problems and --reward are for --stage rl")
    if args.problems is not None and not Path(args.problems).is_file():
        raise UserError(f"--problems {args.problems} is not a file")
    if args.reward is not None and not re.fullmatch(r"[\w.]+:\w+", args.reward):
        raise UserError(f"--reward must be module:function (e.g. my_rewards:shorter), got {args.reward!r}")


def run(argv, record_time=False):
    """Run one stage as the command line does and return its summary: parse and check the flags,
    seed, join torchrun's process group if there is one, run the stage. main(), the tests and the
    lessons all start stages here. record_time: keep the stage's wall time for report.md (main)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    finalize_args(args, parser)
    # seeded before the stage builds anything: --seed decides a fresh model's initial weights
    torch.manual_seed(args.seed)
    ddp = init_distributed()
    t0 = time.time()
    summary = STAGES[args.stage](args, ddp)
    # the stages that train or evaluate: one entry each (eval per source) in report.md's timings
    if record_time and ddp.is_master and args.stage not in ("chat", "serve", "report", "plan"):
        record_wall_time(args.stage if args.stage != "eval" else f"eval_{args.source}", time.time() - t0)
    return summary


def main(argv=None):
    hardware.keep_freed_memory(DEVICE_TYPE)
    try:
        run(sys.argv[1:] if argv is None else argv, record_time=True)
    # a mistake the user can fix is one line on stderr and exit status 2, not a traceback
    except (UserError, realdata.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
