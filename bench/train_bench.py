"""Training throughput of nanochat_one's GPT: tokens/s, MFU and peak memory for one device.

    python bench/train_bench.py --depth 20 --device-batch-size 32 --seq-len 2048          # one GPU
    python bench/train_bench.py --depth 4 --device-batch-size 16 --seq-len 256 \\
        --head-dim 32 --aspect-ratio 32 --vocab-size 4096                                # the laptop tier

Builds the model with the depth dial (nanochat's defaults: aspect ratio 64, head dim 128) and
the real optimizers (Muon + AdamW), runs --warmup full training steps (forward, backward,
optimizer step) on random tokens, the first of which includes torch.compile's compilation, then
times --steps more. The device is synchronised only before and after the timed steps.

It also times a large square matmul on the same device and threads (--matmul-size, fp32 on a CPU,
COMPUTE_DTYPE on a GPU): what this machine really does, as opposed to a datasheet. Prints one JSON
line: tok_per_s, mfu (percent of the GPU's bf16 datasheet peak, from model.estimate_flops(); null
without a known peak, e.g. on CPU), matmul_gflops and matmul_mfu (the step's FLOP/s as a percent of
that measured matmul rate: the "CPU MFU", a ratio that travels between machines), peak_memory_mb
(torch.cuda.max_memory_allocated on a GPU, the process's peak RSS elsewhere), compile_s, and the
settings. --repo DIR imports nanochat_one from another checkout, to compare two versions in one run.
"""

import argparse
import json
import os
import resource
import statistics
import sys
import time

import torch

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
if "--repo" in sys.argv[:-1]:  # before the import: which nanochat_one.py to measure
    REPO = sys.argv[sys.argv.index("--repo") + 1]
sys.path.insert(0, REPO)
import nanochat_one as nc  # noqa: E402


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def matmul_flops_per_second(device, n, dtype, repeats=10):
    """FLOP/s of an (n, n) @ (n, n) matmul on this device: the median of `repeats` timings."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for _ in range(repeats + 1):  # the first one warms up
        synchronize(device)
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times[1:])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--depth", type=int, required=True, help="transformer blocks; width = depth x aspect ratio")
    p.add_argument("--device-batch-size", type=int, required=True, help="sequences per forward pass")
    p.add_argument("--seq-len", type=int, required=True, help="tokens per sequence (also the model's context)")
    p.add_argument("--steps", type=int, default=10, help="timed training steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (the first one compiles)")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"], help="torch.compile the model (auto: on for CUDA only)")
    p.add_argument("--vocab-size", type=int, default=65536, help="vocabulary size (nanochat: 65536)")
    p.add_argument("--aspect-ratio", type=int, default=64, help="width per layer of depth (nanochat: 64)")
    p.add_argument("--head-dim", type=int, default=128, help="attention head dimension (nanochat: 128)")
    p.add_argument("--matmul-size", type=int, default=2048, help="side of the square matmul that measures the device")
    p.add_argument("--repo", default=REPO, help="the checkout whose nanochat_one.py is measured")
    p.add_argument("--eval", action="store_true", help="also one validation pass on the same batch, as the stages run "
                   "it (uncompiled, nc.token_losses): its seconds and peak memory")
    args = p.parse_args()
    if args.steps < 1 or args.warmup < 1:
        p.error("--steps and --warmup must be at least 1")

    device = torch.device("cuda", 0) if nc.DEVICE_TYPE == "cuda" else torch.device(nc.DEVICE_TYPE)
    if hasattr(nc, "hardware"):  # malloc kept as the CLI keeps it (older versions, measured with --repo, lack it)
        nc.hardware.keep_freed_memory(nc.DEVICE_TYPE)
    elif hasattr(nc, "keep_freed_memory"):
        nc.keep_freed_memory()
    B, T = args.device_batch_size, args.seq_len
    config = nc.config_from_depth(args.depth, args.vocab_size, T, args.aspect_ratio, args.head_dim)
    with torch.device(device):
        model = nc.GPT(config)
    model.init_weights()
    optimizers = nc.setup_optimizers(model)
    use_compile = args.compile == "on" or (args.compile == "auto" and nc.DEVICE_TYPE == "cuda")
    train_model = torch.compile(model) if use_compile else model
    tokens = torch.randint(0, args.vocab_size, (B, T + 1), device=device)
    x, y = tokens[:, :-1], tokens[:, 1:]  # (B, T) each

    def train_step():
        loss = train_model(x, y)
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    train_step()  # includes compilation when compiling
    synchronize(device)
    first_step = time.perf_counter() - t0
    for _ in range(args.warmup - 1):
        train_step()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        train_step()
    synchronize(device)
    seconds = time.perf_counter() - t0

    evaluation = {}
    if args.eval:  # the stages' validation: the uncompiled model, the loss per token, in slices of rows
        model.eval()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            losses = nc.token_losses(model, x, y)
        synchronize(device)
        evaluation = dict(eval_s=round(time.perf_counter() - t0, 3), eval_loss=round(losses.mean().item(), 4),
                          eval_peak_memory_mb=round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None)
    matmul_rate = matmul_flops_per_second(device, args.matmul_size, torch.float32 if device.type == "cpu" else nc.COMPUTE_DTYPE)
    step_seconds = seconds / args.steps
    tok_per_s = B * T / step_seconds
    flops_per_token = model.estimate_flops()
    peak = nc.hardware.peak_flops(device) if hasattr(nc, "hardware") else nc.peak_flops(device)
    if device.type == "cuda":
        peak_memory, memory_kind = torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    else:  # ru_maxrss is in KiB on Linux, in bytes on macOS
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak_memory, memory_kind = rss if sys.platform == "darwin" else rss * 1024, "peak_rss"
    print(json.dumps(dict(
        tok_per_s=round(tok_per_s, 1), step_ms=round(1000 * step_seconds, 2),
        mfu=round(100 * flops_per_token * tok_per_s / peak, 2) if peak else None,
        matmul_gflops=round(matmul_rate / 1e9, 1), matmul_mfu=round(100 * flops_per_token * tok_per_s / matmul_rate, 2),
        peak_memory_mb=round(peak_memory / 2**20, 1), memory=memory_kind,
        compile_s=round(first_step - step_seconds, 2) if use_compile else None, first_step_s=round(first_step, 3),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        dtype=str(nc.COMPUTE_DTYPE).removeprefix("torch."), compile=use_compile, depth=args.depth,
        n_embd=config.n_embd, n_head=config.n_head, params=sum(p.numel() for p in model.parameters()),
        flops_per_token=flops_per_token, device_batch_size=B, seq_len=T, vocab_size=args.vocab_size,
        steps=args.steps, warmup=args.warmup, torch=torch.__version__, **evaluation)))


if __name__ == "__main__":
    main()
