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
    """accuracy_stats(222, 400) -> "55.5% +- 2.5 [50.6, 60.3] (N=400)": the standard error in percentage
    points, then the Wilson 95% interval in percent. At 0% and 100% the standard error is 0 and says
    nothing, so the interval alone: accuracy_stats(0, 200) -> "0.0% [0.0, 1.9] (N=200)". Stats with no
    interval (a report from before the intervals) show the standard error alone."""
    text = f"{stats['accuracy']:.1%}"
    if 0 < stats["accuracy"] < 1 or "interval" not in stats:
        text += f" +- {100 * stats['stderr']:.1f}"
    if "interval" in stats:
        text += " [{:.1f}, {:.1f}]".format(*(100 * end for end in stats["interval"]))
    return text + f" (N={stats['items']})"


def format_change(change):
    """A paired_difference of per-problem scores: "+0.071 +- 0.027, z +2.6 (40 lower, 85 higher)"."""
    return (f"{change['difference']:+.3f} +- {change['stderr']:.3f}, z {change['z']:+.1f} "
            f"({change['lost']} lower, {change['gained']} higher)")


def system_info():
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    gpu = torch.cuda.get_device_name(0) + f" x{torch.cuda.device_count()}" if torch.cuda.is_available() else "none"
    return dict(cpu=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", gpu=gpu,
                python=platform.python_version(), torch=torch.__version__, commit=commit, bpe_backend=bpe.BACKEND)


def markdown(reports, real_eval_lines=(), final=None, samples=(), wall_seconds=None, reward_curve=None, changes=None):
    """The report's text. reports: {stage name: its report}; real_eval_lines: the CORE and real chat
    task sections; samples: (question, reply) pairs from the `final` stage's model; wall_seconds:
    the whole run as speedrun.sh measured it; reward_curve: the path of RL's plot, if any; changes:
    {"mid -> sft": {task: paired_difference}}, the chat tasks' changes item by item, if any."""
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
        lines += ["", "Each accuracy +- one standard error, sqrt(p(1-p)/N), over N held-out items, then in brackets "
                  "its Wilson 95% interval, which stays within 0-100% and, unlike the standard error, is not zero "
                  "at 0% or 100% (there only the interval is shown). Multiple choice by "
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
                  "as the first (ratio near 1). Base trains on copy drills of the same kind (--copy-drills: other "
                  "random ids, none that write a number, each sequence written twice), so after base the ratio "
                  "measures the skill they teach; whether it lasts through the chat stages shows in the rows below, "
                  "whether it reaches text in the two columns after it."]
    if changes:
        lines += ["", "## Changes on the same items (paired)", "", "| change | task | after - before (points) | "
                  "paired s.e. | z | right only before (lost) | right only after (gained) |", "|---" * 7 + "|"]
        lines += [f"| {name} | {task} | {100 * c['difference']:+.1f} | {100 * c['stderr']:.1f} | {c['z']:+.1f} | "
                  f"{c['lost']} | {c['gained']} |" for name, tasks in changes.items() for task, c in tasks.items()]
        lines += ["", "Every stage is scored on the same held-out items, so a change is measured item by item: the "
                  "per-item differences d (-1, 0 or +1) share each item's difficulty, and their standard error "
                  "sqrt(var(d)/N) is usually smaller than that of two independent samples. z is McNemar's, "
                  "(gained - lost) / sqrt(gained + lost): the change against its spread were nothing to change; "
                  "beyond about 2 it is unlikely to be noise. One run, one seed: nothing here measures how much "
                  "another seed would move."]
    lines += list(real_eval_lines)
    if "rl" in reports:
        r, k = reports["rl"], reports["rl"]["pass_k"]
        first, last = r["history"][0], r["history"][-1]
        lines += ["", "## RL (GRPO) on word problems", "",
                  f"{r['steps']} steps x {r['prompts_per_step']} problems x {r['num_samples']} samples; pass@1 and pass@{k} "
                  f"from {k} samples of each of {r['held_out']} held-out problems "
                  f"(sampled at the RL temperature; +- one standard error over the problems).", "",
                  f"| | pass@1 | pass@{k} |", "|---|---|---|"]
        for label, h in (("before", first), ("after", last)):
            passk = f"{h['passk']:.3f}" + (f" +- {h['passk_stderr']:.3f}" if "passk_stderr" in h else "")
            lines.append(f"| {label} (step {h['step']}) | {h['pass1']:.3f} +- {h['pass1_stderr']:.3f} | {passk} |")
        if "change" in r:  # paired: each problem's score before against its score after
            lines += ["", f"After - before, problem by problem on the same {r['held_out']} problems: pass@1 "
                      f"{format_change(r['change']['pass1'])}; pass@{k} {format_change(r['change']['passk'])}."]
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
