"""What lessons 04-08 share: one model, one chain of checkpoints, one way to run a stage.

    import common
    nc = common.nc                      # nanochat_one, imported from the repository root
    common.setup()                      # seeds, threads, plot style
    common.ensure("base")               # lesson 5's starting point: lesson 4's checkpoint (and tokenizer)

The lessons train one model, stage after stage, in lessons/runs/ (never your ./runs): lesson 4
pretrains it, lesson 5 mid-trains that checkpoint, and so on. ensure(stage) finds the checkpoints
an earlier lesson left there; when one is missing (a lesson run on its own, or a tokenizer that
changed) it trains the missing stages with the same settings as their lessons, and says so.
"""
import contextlib
import io
import json
import os
import sys
import time
from pathlib import Path

LESSONS = Path(__file__).resolve().parent
sys.path.insert(0, str(LESSONS.parent))  # the repository root: nanochat_one.py, bpe.py, tinyworld.py
os.environ["NANOCHAT_BASE_DIR"] = str(LESSONS / "runs")  # lessons/runs, never your ./runs
# the lessons' figures are a CPU's, whatever else the machine has (NANOCHAT_DEVICE=cuda to use a GPU)
os.environ.setdefault("NANOCHAT_DEVICE", "cpu")

import torch  # noqa: E402

import nanochat_one as nc  # noqa: E402
import report  # noqa: E402

# The lessons' model and batches: the speedrun's tiny model (depth 4, width 128, context 256,
# vocabulary 4096), 8,192 tokens per optimizer step, validation on 4 batches.
FLAGS = ["--depth", "4", "--max-seq-len", "256", "--device-batch-size", "16", "--total-batch-size", "8192",
         "--eval-batches", "4", "--eval-every", "0", "--save-every", "0", "--log-every", "10"]
TAG = "d4"
# Each stage as its lesson runs it (the chain ensure() rebuilds): the speedrun's settings, with
# fewer base steps (200 of 320) and RL steps (50 of 100) so that each lesson stays within minutes.
STAGE_FLAGS = dict(
    tok=["--vocab-size", "4096", "--tok-chars", "2000000"],
    base=["--num-iterations", "200", "--compile", "off"],
    mid=["--num-iterations", "100"],
    sft=[],
    rl=["--num-iterations", "50"],
)
CHAIN = list(STAGE_FLAGS)


def setup(seed=0):
    """Seeds, plots small enough for a notebook, and PyTorch's threads: one per core (a model this
    small is limited by memory and Python, not arithmetic; more threads than cores only wait)."""
    import matplotlib.pyplot as plt
    plt.rcParams.update({"figure.dpi": 72, "figure.figsize": (6, 3.2)})
    torch.manual_seed(seed)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 0)) or (os.cpu_count() or 1))


def run_stage(stage, *flags):
    """Run a stage as `python nanochat_one.py --stage <stage> <FLAGS> <flags>` does (nc.run), with its log
    captured; return (summary, log text)."""
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        summary = nc.run(["--stage", stage, *FLAGS, *flags])
    return summary, log.getvalue()


def ready(stage):
    """Is there a checkpoint of this stage (or, for tok, a tokenizer) that the next stage can use?"""
    if not nc.tokenizer_path().exists():
        return False
    if stage == "tok":
        return True
    directory = nc.checkpoint_dir(stage, TAG)
    step = nc.last_checkpoint_step(directory) if directory.exists() else None
    if step is None:
        return False
    meta = json.loads((directory / f"meta_{step:06d}.json").read_text())
    return meta["tokenizer"] == nc.tokenizer_id(nc.get_tokenizer())


def ensure(stage):
    """Make sure `stage` and every stage before it have their checkpoints: reuse what earlier
    lessons left in lessons/runs/, train the rest with their lessons' settings. Says which."""
    missing = False
    for earlier in CHAIN[:CHAIN.index(stage) + 1]:
        missing = missing or not ready(earlier)  # a retrained stage makes every later one stale
        if missing:
            t0 = time.time()
            run_stage(earlier, *STAGE_FLAGS[earlier])
            print(f"{earlier}: not in lessons/runs/, trained it as its lesson does ({time.time() - t0:.0f} s)")
        else:
            print(f"{earlier}: found in lessons/runs/ (left by its lesson)")


def load(stage):
    """(model in eval mode, its checkpoint's metadata) of the lessons' checkpoint of a stage."""
    model, _, meta = nc.load_checkpoint(stage, TAG, torch.device("cpu"))
    return model.eval(), meta


def answer(model, tokenizer, question, max_tokens=80):
    """The model's greedy reply to one user message, as a chat would ask it (calculator included)."""
    prompt = nc.render_for_completion(tokenizer, {"messages": [{"role": "user", "content": question}]})
    (tokens,), _ = nc.Engine(model, tokenizer).generate_batch(prompt, 1, max_tokens, temperature=0.0)
    return tokenizer.decode(tokens)


def gap(before, after):
    """(after - before, its standard error, z, how it was compared) for two accuracy_stats dicts.
    When both carry outcomes for the same number of items (nc.evaluate_chat on two checkpoints with
    the same n: the same items), item by item (nc.paired_difference): the standard error of the
    per-item differences, and McNemar's z, which stays finite at 0% and 100%. Otherwise as two
    independent samples: z = difference / sqrt(se1^2 + se2^2). Beyond about 2, unlikely to be noise."""
    if "outcomes" in before and "outcomes" in after and len(before["outcomes"]) == len(after["outcomes"]):
        change = nc.paired_difference(before["outcomes"], after["outcomes"])
        how = f"paired: {change['lost']} right only before, {change['gained']} only after"
        return change["difference"], change["stderr"], change["z"], how
    difference = after["accuracy"] - before["accuracy"]
    se = (before["stderr"] ** 2 + after["stderr"] ** 2) ** 0.5
    if se == 0:  # both exactly 0 or 1: no gap, or one no amount of noise explains
        return difference, se, 0.0 if difference == 0 else float("inf") if difference > 0 else float("-inf"), "unpaired"
    return difference, se, difference / se, "unpaired"


def plot_accuracies(results, tasks=None, title="held-out accuracy"):
    """Bars with their Wilson 95% intervals for {label: nc.evaluate_chat(...) results}, side by side per
    task; then one line per task with every accuracy and the last label's change over the first (gap)."""
    import matplotlib.pyplot as plt
    labels = list(results)
    tasks = tasks or list(results[labels[0]])
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(1.6 * len(tasks) + 1.5, 2.8))
    for i, label in enumerate(labels):
        stats = [results[label][t] for t in tasks]
        # the interval, not +- 2 s.e.: that would be zero-width at 0% and 100% and could pass below 0 or above 1
        ends = [report.wilson_interval(round(s["accuracy"] * s["items"]), s["items"]) for s in stats]
        ax.bar([k + (i - (len(labels) - 1) / 2) * width for k in range(len(tasks))], [s["accuracy"] for s in stats],
               width, yerr=[[s["accuracy"] - low for s, (low, _) in zip(stats, ends)],
                            [high - s["accuracy"] for s, (_, high) in zip(stats, ends)]], capsize=3, label=label)
    ax.set(xticks=range(len(tasks)), xticklabels=[t.replace("multiple_choice", "choice").replace("_", " ") for t in tasks],
           ylabel="accuracy", ylim=(0, 1.05), title=f"{title} (Wilson 95%)")
    ax.legend(fontsize=8)
    plt.show()
    first, last = labels[0], labels[-1]
    for t in tasks:
        difference, se, z, how = gap(results[first][t], results[last][t])
        row = "  ".join(f"{label} {nc.format_accuracy(results[label][t]):34s}" for label in labels)
        print(f"{t:22s} {row} {last} - {first}: {100 * difference:+.1f} +- {100 * se:.1f} points, z {z:+.1f} ({how})")
