"""
report.md: every stage's report (<base_dir>/report/<stage>.json, written as the stage ends) on one
markdown page, for `python nanochat_one.py --stage report`, with which speedrun.sh ends.

Formatting only: the numbers come from the stages, and this module imports nothing from
nanochat_one.py.
"""
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

import bpe


def format_seconds(s):
    """3725 -> "1h02m", 207 -> "3m27s"."""
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def format_accuracy(stats):
    """accuracy_stats(222, 400) -> "55.5% +- 2.5 (N=400)" (the standard error in percentage points)"""
    return f"{stats['accuracy']:.1%} +- {100 * stats['stderr']:.1f} (N={stats['items']})"


def system_info():
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    gpu = torch.cuda.get_device_name(0) + f" x{torch.cuda.device_count()}" if torch.cuda.is_available() else "none"
    return dict(cpu=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", gpu=gpu,
                python=platform.python_version(), torch=torch.__version__, commit=commit, bpe_backend=bpe.BACKEND)


def markdown(reports, real_eval_lines=(), final=None, samples=(), wall_seconds=None, reward_curve=None):
    """The report's text. reports: {stage name: its report}; real_eval_lines: the CORE and real chat
    task sections; samples: (question, reply) pairs from the `final` stage's model; wall_seconds:
    the whole run as speedrun.sh measured it; reward_curve: the path of RL's plot, if any."""
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
    sources = dict(base="eval_base", mid="mid", sft="sft", rl="rl")  # the report that holds each stage's chat scores
    rows = [(name, reports[key].get("chat_eval", reports[key])) for name, key in sources.items() if key in reports]
    rows = [(name, r) for name, r in rows if "multiple_choice_letter" in r]
    if rows:
        columns = dict(multiple_choice_letter="multiple choice, letter (chance 25%)",
                       multiple_choice_cloze="multiple choice, cloze (chance 25%)",
                       world_knowledge="world knowledge (each fact once)", arithmetic="mental arithmetic",
                       word_problem="word problems (calculator)", hard_word_problem="harder word problems (SFT, RL)")
        columns = {task: title for task, title in columns.items() if all(task in r for _, r in rows)}
        lines += ["", "## Chat evaluations (held-out TinyWorld items, greedy)", "",
                  "| after stage | " + " | ".join(columns.values()) + " |", "|---" * (len(columns) + 1) + "|"]
        lines += [f"| {name} | " + " | ".join(format_accuracy(r[task]) for task in columns) + " |" for name, r in rows]
        lines += ["", "Each accuracy +- one standard error, sqrt(p(1-p)/N), over N held-out items. Multiple choice by "
                  "letter: the highest-logit letter after the lettered list; by cloze: the choice that best completes "
                  "the answer sentence (what the model knows, whatever its letter). World knowledge and arithmetic: "
                  "each held-out fact asked once, in one of its wordings; held-out facts are stated in the "
                  "pretraining text, but no chat stage trains on their questions."]
        lines += ["", "## Reading the context", "", "| after stage | induction: loss of a repeated random sequence, "
                  "first copy -> second (nats/token) | ratio | reply names the question's subject | word problem "
                  "reply keeps the person's name |", "|---|---|---|---|---|"]
        for name, r in rows:
            induction = reports[sources[name]].get("induction")
            copy = (f"{induction['first']:.2f} -> {induction['second']:.2f} | {induction['ratio']:.2f}"
                    if induction else "- | -")
            lines.append(f"| {name} | {copy} | " + " | ".join(format_accuracy(r[task]) if task in r else "-"
                                                             for task in ("names_subject", "keeps_name")) + " |")
        lines += ["", "Induction: 16 rows of <|bos|> and 50 random token ids, then the same 50 again; a model that "
                  "reads its context predicts the second copy (ratio near 0), one that does not finds it as hard "
                  "as the first (ratio near 1)."]
    lines += list(real_eval_lines)
    if "rl" in reports:
        r, k = reports["rl"], reports["rl"]["pass_k"]
        first, last = r["history"][0], r["history"][-1]
        lines += ["", "## RL (GRPO) on word problems", "",
                  f"{r['steps']} steps x {r['prompts_per_step']} problems x {r['num_samples']} samples; pass@1 and pass@{k} "
                  f"from {k} samples of each of {r['held_out']} held-out problems "
                  f"(sampled at the RL temperature; +- one standard error).", "",
                  f"| | pass@1 | pass@{k} |", "|---|---|---|",
                  f"| before (step {first['step']}) | {first['pass1']:.3f} +- {first['pass1_stderr']:.3f} | {first['passk']:.3f} |",
                  f"| after (step {last['step']}) | {last['pass1']:.3f} +- {last['pass1_stderr']:.3f} | {last['passk']:.3f} |"]
        curve = r["reward_curve"]
        lines += ["", "Mean training reward per 10 steps: " + ", ".join(
            f"{sum(c['mean_reward'] for c in curve[i:i + 10]) / len(curve[i:i + 10]):.2f}" for i in range(0, len(curve), 10)) + "."]
        if reward_curve is not None:
            lines += ["", f"Reward curve: {reward_curve}"]
    if final is not None:
        lines += ["", f"## Sample conversations (the {final} model, greedy)", ""]
        for question, reply in samples:
            lines += [f"**user:** {question}", "", "**assistant:**", "", "```", reply, "```", ""]
    lines += ["", "## Wall clock", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {stage} | {seconds:.0f} |" for stage, seconds in reports.get("wall", {}).items()]
    if wall_seconds is not None:
        lines.append(f"| whole run (setup included) | {wall_seconds} |")
    return "\n".join(lines) + "\n"
