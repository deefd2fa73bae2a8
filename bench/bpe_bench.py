"""Benchmark bpe.py's backends (and rustbpe / tiktoken when they are importable).

    python bench/bpe_bench.py FILE [--vocab-size 32768] [--heldout FILE] [--python-too]

Trains on FILE (as one text) and encodes FILE, with the C backend; prints seconds (median of
--repeat runs), MB/s, peak RSS during the step and bytes/token (on --heldout when given).
rustbpe (training, RAYON_NUM_THREADS=1) and tiktoken (encoding rustbpe's vocabulary with
encode_ordinary, one thread) are timed in the same run if installed; neither is a dependency.
--python-too also times the pure-Python backend, on a slice (--python-bytes, vocab
--python-vocab) because training it at full size takes far too long; C is timed on the same
slice next to it. Encoding always starts from a fresh tokenizer (empty chunk cache).
"""

import argparse
import gc
import os
import statistics
import sys
import time

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # before rustbpe starts its thread pool
for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(var, "1")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import bpe  # noqa: E402

try:
    import rustbpe
except ImportError:
    rustbpe = None
try:
    import tiktoken
except ImportError:
    tiktoken = None


def peak_reset():
    """Reset the peak-RSS mark (Linux); returns False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def status_mb(field):
    """VmHWM (peak RSS) or VmRSS in MB from /proc (Linux); ru_maxrss elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, repeat):
    """Run fn() repeat times; -> (median seconds, (RSS before, peak RSS) in MB, last result)."""
    times, result = [], None
    gc.collect()
    peak_reset()
    before = status_mb("VmRSS")
    for _ in range(repeat):
        result = None
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), (before, status_mb("VmHWM")), result


def read_text(path):
    with open(path, "rb") as f:
        return bpe.bytes_to_text(f.read())


def slice_text(text, nbytes):
    """About the first nbytes of text, cut at a line end."""
    data = bpe.text_to_bytes(text)[:nbytes]
    return bpe.bytes_to_text(data[: data.rfind(b"\n") + 1] or data)


ROWS = []


def row(impl, step, data_desc, seconds, nbytes, rss, note=""):
    ROWS.append((impl, step, data_desc, seconds, nbytes / 1e6 / seconds, rss, note))


def print_table(repeat):
    print()
    print(f"{'implementation':<12} {'step':<7} {'data':<26} {'seconds':>8} {'MB/s':>6} {'peak RSS':>9} {'(+step)':>8}  note")
    for impl, step, data_desc, seconds, mbs, (before, peak), note in ROWS:
        print(f"{impl:<12} {step:<7} {data_desc:<26} {seconds:>8.2f} {mbs:>6.1f} {peak:>6.0f} MB {peak - before:>+5.0f} MB  {note}")
    print(f"seconds: median of {repeat} runs. peak RSS: the whole process during the step (the text and "
          "anything\nkept from earlier steps included); (+step): peak minus the RSS just before the step.")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file")
    ap.add_argument("--vocab-size", type=int, default=32768)
    ap.add_argument("--heldout", help="file for bytes/token (default: FILE itself)")
    ap.add_argument("--python-too", action="store_true", help="also time the pure-Python backend on a slice")
    ap.add_argument("--python-bytes", type=int, default=1_000_000)
    ap.add_argument("--python-vocab", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=3, help="runs per timing (median is printed)")
    args = ap.parse_args()

    text = read_text(args.file)
    nbytes = len(bpe.text_to_bytes(text))
    heldout = read_text(args.heldout) if args.heldout else text
    held_name = os.path.basename(args.heldout or args.file)
    held_bytes = len(bpe.text_to_bytes(heldout))
    name = os.path.basename(args.file)
    desc = f"{name} {nbytes / 1e6:.1f} MB"
    print(f"file {args.file}: {nbytes} bytes; vocab {args.vocab_size}; bytes/token on {held_name}")
    print(f"python {sys.version.split()[0]}, cpus {os.cpu_count()}, RAYON_NUM_THREADS={os.environ['RAYON_NUM_THREADS']}")
    print(f"rustbpe: {'yes' if rustbpe else 'not installed'}; tiktoken: {'yes' if tiktoken else 'not installed'}")

    have_c = True
    try:
        bpe.set_backend("c")
    except ImportError:
        have_c = False
        print("the C backend (_bpe) is not built: only pure Python can be timed")
    results = {}
    if have_c:
        bpe.set_backend("c")
        counts = bpe.Tokenizer.count_chunks([text])
        print(f"unique chunks: {len(counts)}, {sum(map(len, counts)) / 1e6:.2f} MB of bytes")
        del counts
        sec, peak, tok = timed(lambda: bpe.Tokenizer.train([text], args.vocab_size), args.repeat)
        row("bpe C", "train", desc, sec, nbytes, peak, "pre-split + count + merges")
        sec, peak, ids = timed(lambda: bpe.Tokenizer(tok.merges).encode_ordinary(text), args.repeat)
        row("bpe C", "encode", desc, sec, nbytes, peak, "encode_ordinary, one string")
        assert tok.decode(ids) == text
        del ids
        held_ids = tok.encode_ordinary(heldout)
        results["c"] = (tok, held_bytes / len(held_ids), held_ids)

    if rustbpe is not None:
        def train_rust():
            r = rustbpe.Tokenizer()
            r.train_from_iterator(iter([text]), args.vocab_size, pattern=bpe.SPLIT_PATTERN)
            return r
        sec, peak, rtok = timed(train_rust, args.repeat)
        row("rustbpe", "train", desc, sec, nbytes, peak, "RAYON_NUM_THREADS=1")
        ranks = dict(rtok.get_mergeable_ranks())
        held_ids = rtok.encode(heldout)
        results["rustbpe"] = (ranks, held_bytes / len(held_ids))
        if tiktoken is not None:
            enc = tiktoken.Encoding("rustbpe", pat_str=bpe.SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens={})
            sec, peak, ids = timed(lambda: enc.encode_ordinary(text), args.repeat)
            row("tiktoken", "encode", desc, sec, nbytes, peak, "rustbpe's vocab, encode_ordinary")
            del ids

    if args.python_too:
        small = slice_text(text, args.python_bytes)
        small_bytes = len(bpe.text_to_bytes(small))
        sdesc = f"{name} first {small_bytes / 1e6:.1f} MB"
        note = f"vocab {args.python_vocab}"
        for backend in (["c"] if have_c else []) + ["python"]:
            bpe.set_backend(backend)
            sec, peak, stok = timed(lambda: bpe.Tokenizer.train([small], args.python_vocab), args.repeat)
            label = "bpe C" if backend == "c" else "bpe python"
            row(label, "train", sdesc, sec, small_bytes, peak, note)
            sec, peak, ids = timed(lambda: bpe.Tokenizer(stok.merges).encode_ordinary(small), args.repeat)
            row(label, "encode", sdesc, sec, small_bytes, peak, note)
            results[f"small-{backend}"] = (stok.merges, ids)
        if have_c:
            bpe.set_backend("c")

    print_table(args.repeat)
    print()
    secs = {(r[0], r[1]): r[3] for r in ROWS if r[2] == desc}
    if ("bpe C", "train") in secs and ("rustbpe", "train") in secs:
        ratio = secs[("bpe C", "train")] / secs[("rustbpe", "train")]
        print(f"train: bpe C / rustbpe time = {ratio:.2f}  (target <= 1.5)")
    if ("bpe C", "encode") in secs and ("tiktoken", "encode") in secs:
        ratio = secs[("tiktoken", "encode")] / secs[("bpe C", "encode")]
        print(f"encode: bpe C / tiktoken MB/s = {ratio:.2f}  (target >= 0.7)")
    if "c" in results:
        print(f"bytes/token on {held_name}: bpe C {results['c'][1]:.4f}", end="")
        if "rustbpe" in results:
            c_bpt, r_bpt = results["c"][1], results["rustbpe"][1]
            print(f", rustbpe {r_bpt:.4f} (difference {100 * (c_bpt - r_bpt) / r_bpt:+.2f}%)", end="")
        print()
    if "c" in results and "rustbpe" in results:
        same = results["c"][0].mergeable_ranks() == results["rustbpe"][0]
        print(f"same vocabulary as rustbpe: {same}")
        if tiktoken is not None:
            tok = results["c"][0]
            enc = tiktoken.Encoding("ours", pat_str=bpe.SPLIT_PATTERN, mergeable_ranks=tok.mergeable_ranks(),
                                    special_tokens={})
            print(f"tiktoken with bpe's vocab gives the same ids on {held_name}: "
                  f"{enc.encode_ordinary(heldout) == results['c'][2]}")
    if "small-c" in results and "small-python" in results:
        same = results["small-c"] == results["small-python"]
        print(f"pure Python vs C on the slice: identical merges and ids: {same}")
        small = {(r[0], r[1]): r[3] for r in ROWS if r[2] == sdesc}
        print(f"on the slice, C is {small[('bpe python', 'train')] / small[('bpe C', 'train')]:.0f}x faster "
              f"at training and {small[('bpe python', 'encode')] / small[('bpe C', 'encode')]:.0f}x faster "
              "at encoding than pure Python")


if __name__ == "__main__":
    main()
