"""
The machine under the code: what a GPU can do and what a run will cost on it (--stage plan, MFU in
the training log); two settings that make a small CPU faster (glibc's malloc, when torch.compile
pays for itself); and files written so that a crash or a power cut never leaves half of one
(checkpoints, reports). Only compile_setting touches the numbers the model computes: a compiled
model does the same arithmetic in another order, which rounds differently. This module imports
nothing from nanochat_one.py.
"""
import ctypes
import math
import os
import shutil
import sys

import torch

import realdata

# -----------------------------------------------------------------------------------------------
# GPUs: peak throughput, for MFU (the share of the peak that the model's own FLOPs use)

# dense bf16 tensor-core peaks by device name; the first key found in the name counts
GPU_PEAK_BF16_FLOPS = {
    "H200": 989e12, "H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12,
    "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12, "RTX 4090": 165e12,
    "RTX 3090": 71e12,
}


def peak_flops(device):
    """Peak bf16 FLOP/s of this GPU by name, or None (then MFU is not reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in GPU_PEAK_BF16_FLOPS.items() if key in name), None)


# -----------------------------------------------------------------------------------------------
# CPUs: memory reuse and when compiling pays

def keep_freed_memory(device_type):
    """On a CPU under Linux, make glibc's malloc keep freed memory for reuse instead of returning
    large blocks to the kernel, so a new (B, T, vocab) tensor costs no page faults (2 cores: a tanh
    of 4096 x 4096 floats 29-58 ms -> 8-11 ms). The process then keeps its peak memory until exit."""
    if device_type != "cpu" or sys.platform != "linux":
        return
    libc = ctypes.CDLL(None)  # this process's C library
    if hasattr(libc, "mallopt"):  # glibc's; M_MMAP_MAX = -4, M_TRIM_THRESHOLD = -1 in its malloc.h
        libc.mallopt(-4, 0)  # every block from the heap, none from mmap
        libc.mallopt(-1, 2 ** 31 - 1)  # and never give the heap's top back


CPU_COMPILE_MIN_STEPS = 300  # where compiling pays for itself on a CPU (see compile_setting)


def compile_setting(mode, device_type, num_steps=0, fixed_shapes=True):
    """(compile?, why) for the training model, mode the --compile flag. auto: on CUDA; on a CPU for
    runs of at least CPU_COMPILE_MIN_STEPS steps of one batch shape (tiny tier, 2 cores: ~22 s to
    compile with a cold cache, then ~0.15 s saved a step of 8,192 tokens, so mid's 100 steps would
    lose ~7 s; each new shape, as SFT's padded rows, compiles again)."""
    if mode != "auto":
        return mode == "on", f"--compile {mode}"
    if not fixed_shapes:
        return False, ("auto: off for batches of varying width, each of which would compile again "
                       "(as nanochat's SFT)")
    if device_type == "cuda":
        return True, "auto: on CUDA"
    if num_steps < CPU_COMPILE_MIN_STEPS:
        return False, f"auto: not worth its compile time for {num_steps} steps on {device_type}"
    compilers = (os.environ.get("CXX", "g++"), "g++", "clang++")
    if device_type == "cpu" and not any(shutil.which(c) for c in compilers):
        return False, "auto: no C++ compiler for torch.compile's CPU code"
    return True, f"auto: {num_steps} steps on {device_type} pay back the compile time (--compile off to skip)"


# -----------------------------------------------------------------------------------------------
# Disks: a file is replaced whole or not at all

def flush_to_disk(path):
    """fsync a file (its bytes) or a folder (the names in it): until then the operating system may
    hold a write or a rename in memory only, and a power cut undoes it after it has returned."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def atomic_write(path, write):
    """write(a temporary path), then rename it to `path`: a reader sees the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        # the bytes before the rename: else the disk may get the new name on an empty file
        flush_to_disk(tmp)
        os.replace(tmp, path)
        flush_to_disk(path.parent)  # the rename itself
    finally:
        tmp.unlink(missing_ok=True)


def checkpoint_file_is_intact(path):
    """Whether a file torch.save wrote is whole: a zip archive whose every entry matches its
    checksum. A file cut short fails (zip keeps its table of contents at the end); a good file that
    could not be loaded for another reason (not enough memory, say) passes."""
    import zipfile  # needed only after a failed load
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (zipfile.BadZipFile, EOFError):  # what an archive cut short or garbled raises
        return False


# -----------------------------------------------------------------------------------------------
# What a run costs: --stage plan

CHARS_PER_TOKEN, CHARS_PER_SHARD = 4.8, 250e6  # FineWeb-EDU under a 65,536-token BPE; one shard's text
# mid's and SFT's estimates assume this many tokens a conversation (the stages count the real ones)
PLAN_TOKENS_PER_CONVERSATION = 500


def shards_needed(tokens):
    """FineWeb-EDU shards that hold `tokens` training tokens, with a 10% margin, plus the validation
    shard."""
    return math.ceil(tokens * CHARS_PER_TOKEN / CHARS_PER_SHARD * 1.1) + 1


def plan(args, config, params, flops, steps, accum):
    """What a run costs (stage_plan): the model's config, its parameters and training FLOPs per
    token, base's optimizer steps and micro-steps per step, on args.gpus H100s at args.mfu percent.
    Returns (the plan as a dict, its markdown table with a heading and a footnote)."""
    gpus, peak = args.gpus, GPU_PEAK_BF16_FLOPS["H100"]

    def hours(tokens):
        return flops * tokens / (gpus * peak * args.mfu / 100) / 3600

    mixtures, hub_rows = realdata.MIXTURES, realdata.HUB_ROWS
    mid_rows = sum(hub_rows[name] for name in mixtures["mid"]["train"])
    sft_rows = sum(min(hub_rows[name], n or math.inf) for name, n in mixtures["sft"]["train"].items())
    mid_tokens, sft_steps = mid_rows * PLAN_TOKENS_PER_CONVERSATION, sft_rows // (4 * gpus)
    base_tokens = steps * args.total_batch_size
    plan = dict(params=params, flops_per_token=flops,
                base=dict(steps=steps, tokens=base_tokens, accumulation=accum,
                          shards=shards_needed(base_tokens)),
                mid=dict(conversations=mid_rows, steps=math.ceil(mid_tokens / args.total_batch_size)),
                sft=dict(conversations=sft_rows, steps=sft_steps),
                rl=dict(steps=hub_rows["gsm8k"] // 16))
    shards, batch = plan["base"]["shards"], f"{args.total_batch_size:,} tokens"
    heading = (f"plan: depth {config.n_layer} (width {config.n_embd}, {config.n_head} heads of "
               f"{config.n_embd // config.n_head}), vocab {config.vocab_size:,}, context "
               f"{config.sequence_len:,}: {params:,} parameters, {flops:.4g} FLOPs per token (training); "
               f"{gpus} GPU(s) at {peak / 1e12:.0f} TFLOP/s bf16 peak (H100), hours at an assumed "
               f"{args.mfu:g}% MFU")
    rows = [("base", f"{base_tokens / 1e9:.2f}B tokens ({base_tokens / params:.1f} per parameter)",
             f"{steps:,}", f"{batch}: {args.device_batch_size} x {args.max_seq_len} x {gpus} GPUs x {accum}",
             f"{shards} FineWeb-EDU shards (~{shards / 10:.0f} GB)", f"{hours(base_tokens):.1f}"),
            ("mid", f"one epoch: ~{mid_rows / 1e3:.0f}K conversations (SmolTalk, MMLU, GSM8K)",
             f"~{plan['mid']['steps']:,}", f"{batch}, as base", "from the hub", f"~{hours(mid_tokens):.1f}"),
            ("sft", f"one epoch: ~{sft_rows / 1e3:.1f}K conversations (ARC, GSM8K, SmolTalk)",
             f"{sft_steps:,}", f"{4 * gpus} conversations: 4 x {gpus} GPUs x 1", "from the hub",
             f"~{hours(sft_rows * PLAN_TOKENS_PER_CONVERSATION):.2f}"),
            ("rl", "one epoch of GSM8K train: 16 problems x 16 samples a step", f"{plan['rl']['steps']:,}",
             "up to 256 new tokens a sample", "from the hub", "(sampling-bound; not estimated)")]
    table = ["| stage | trains on | steps | batch | data | hours |", "|---|---|---|---|---|---|"]
    table += ["| " + " | ".join(row) + " |" for row in rows]
    footnote = (f"~: mid's and SFT's steps and hours assume {PLAN_TOKENS_PER_CONVERSATION} tokens a "
                "conversation; the stages count the real ones when they start. The FineWeb-EDU shards "
                f"hold ~{CHARS_PER_SHARD / 1e6:.0f}M characters each, ~{CHARS_PER_TOKEN} a token (+10% and "
                "the validation shard).")
    return plan, "\n\n".join([heading, "\n".join(table), footnote])
