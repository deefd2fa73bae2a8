"""
The numbers and report.md: the statistics behind every accuracy the stages print (standard errors,
Wilson intervals, paired comparisons of two checkpoints on the same items), and every stage's report
(<base_dir>/report/<stage>.json, written as the stage ends) on one markdown page, for
`python nanochat_one.py --stage report`, with which speedrun.sh ends.

This module imports nothing from nanochat_one.py: the stages hand it their numbers.
"""
import math
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

import bpe
import realdata


# -----------------------------------------------------------------------------------------------
# Statistics: an accuracy's standard error and interval, a change measured item by item

def wilson_interval(correct, total, z=1.96):
    """The Wilson score interval (low, high) of an accuracy, 95% for z = 1.96: every true accuracy q
    that puts the measured p within z of its own spreads sqrt(q(1-q)/N). Unlike p +- z * stderr it stays
    within [0, 1], and it is not empty at 0% or 100%, where the standard error is 0:
    wilson_interval(0, 200) -> (0.0, 0.0188), the closed form z^2 / (N + z^2) = 3.8416 / 203.8416;
    wilson_interval(222, 400) -> (0.5060, 0.6030), near 0.555 +- 1.96 * 0.0248 = (0.5063, 0.6037)
    where p(1-p)N is large. No items: (0.0, 1.0), nothing known."""
    if total == 0:
        return 0.0, 1.0
    p, zz = correct / total, z * z / total
    center = (p + zz / 2) / (1 + zz)
    half = z * math.sqrt(p * (1 - p) / total + zz / (4 * total)) / (1 + zz)
    return (0.0 if correct == 0 else center - half), (1.0 if correct == total else center + half)  # exact ends


def accuracy_stats(correct, total, outcomes=None):
    """An accuracy with its number of items, its standard error sqrt(p(1-p)/N), the spread of the
    accuracy of N items drawn at random, and its Wilson 95% interval: accuracy_stats(3, 4) ->
    accuracy 0.75, items 4, stderr 0.2165, interval [0.3006, 0.9544]. Two accuracies differ beyond
    noise when they are several stderrs apart; at 0% and 100% the stderr is 0 and only the interval
    says how sure we are (0 of 200: [0, 0.0188]). outcomes, when given: each item's 1 (right) or 0,
    in item order, kept for comparing two checkpoints scored on the same items (paired_difference)."""
    accuracy = correct / max(total, 1)
    stats = dict(accuracy=accuracy, items=total, stderr=math.sqrt(accuracy * (1 - accuracy) / max(total, 1)),
                 interval=list(wilson_interval(correct, total)))  # a list, as JSON gives it back
    if outcomes is not None:
        stats["outcomes"] = [int(o) for o in outcomes]
    return stats


def share_of(hits):
    """accuracy_stats of per-item booleans in item order, kept as the outcomes: [True, False] -> 50%."""
    return accuracy_stats(sum(hits), len(hits), hits)


def mean_and_stderr(values):
    """The mean of per-item values and its standard error sqrt(var / n), var the sample variance
    (divided by n - 1): [1, 0.5, 0] -> (0.5, sqrt(0.25 / 3) = 0.2887)."""
    n = len(values)
    mean = sum(values) / max(n, 1)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / max(n - 1, 1) / max(n, 1))


def paired_difference(before, after):
    """after - before, item by item, for two checkpoints scored on the same items (before and after:
    per-item scores in the same item order, such as accuracy_stats' outcomes). The two share each
    item's luck (an easy item is easy for both), so the per-item differences d usually vary less than
    two independent samples would: their standard error sqrt(var(d) / n) is the error of the change.
    z weighs the change against its spread were nothing to change, sum(d) / sqrt(sum(d^2)): for 0/1
    outcomes McNemar's (gained - lost) / sqrt(gained + lost), finite even when every item moved the
    same way. lost: items that scored lower after (right before, wrong after); gained: higher after.
    before [1, 1, 0, 0, 0], after [1, 0, 1, 1, 0]: d = [0, -1, 1, 1, 0], difference 0.2, stderr
    sqrt(0.7 / 5) = 0.374, 1 lost, 2 gained, z (2 - 1) / sqrt(2 + 1) = 0.577."""
    if len(before) != len(after):
        raise ValueError(f"a paired comparison needs the same items: {len(before)} before, {len(after)} after")
    d = [a - b for b, a in zip(before, after)]
    difference, stderr = mean_and_stderr(d)
    spread = math.sqrt(sum(x * x for x in d))  # 0 only when no item changed
    return dict(difference=difference, stderr=stderr, z=sum(d) / spread if spread else 0.0, items=len(d),
                lost=sum(x < 0 for x in d), gained=sum(x > 0 for x in d))


def pass_at_k_stats(rewards):
    """pass@1 and pass@k with their standard errors, from each problem's k sampled rewards: pass@1
    the mean over problems of a problem's mean reward, pass@k of its best. The problems are the
    sample (other problems would move both), so each error is over per-problem values:
    [[1, 1], [1, 0], [0, 0]] -> pass@1 0.5 +- 0.2887 (per problem 1, 0.5, 0), pass@2 0.6667 +- 0.3333
    (per problem 1, 1, 0)."""
    pass1, pass1_stderr = mean_and_stderr([sum(r) / len(r) for r in rewards])
    passk, passk_stderr = mean_and_stderr([max(r) for r in rewards])
    return dict(pass1=pass1, pass1_stderr=pass1_stderr, passk=passk, passk_stderr=passk_stderr)


# -----------------------------------------------------------------------------------------------
# report.md

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
                  "letter: the letter the greedy reply ends with, as trained (\"The capital of Japan is Tokyo B.\": it "
                  "names its choice, then copies the letter the list wrote after it; no letter is wrong); by cloze: "
                  "the choice that best completes "
                  "the answer sentence (what the model knows, whatever its letter). World knowledge and arithmetic: "
                  "each held-out fact asked once, in one of its wordings; held-out facts are stated in the "
                  "pretraining text, but no chat stage trains on their questions."]
        lines += ["", "## Reading the context", "", "| after stage | induction: loss of a repeated random sequence, "
                  "first copy -> second (nats/token) | ratio | reply names the question's subject | word problem "
                  "reply keeps the person's name | world knowledge, the answer begun for it |",
                  "|---|---|---|---|---|---|"]
        for name, r in rows:
            induction = reports[sources[name]].get("induction")
            copy = (f"{induction['first']:.2f} -> {induction['second']:.2f} | {induction['ratio']:.2f}"
                    if induction else "- | -")
            lines.append(f"| {name} | {copy} | " + " | ".join(format_accuracy(r[task]) if task in r else "-"
                                                             for task in ("names_subject", "keeps_name",
                                                                          "completes_fact")) + " |")
        lines += ["", "Induction: 16 rows of <|bos|> and 50 random token ids, then the same 50 again; a model that "
                  "reads its context predicts the second copy (ratio near 0), one that does not finds it as hard "
                  "as the first (ratio near 1). Base trains on copy drills of the same kind (--copy-drills: other "
                  "random ids, none that write a number, each sequence written twice), so after base the ratio "
                  "measures the skill they teach; whether it lasts through the chat stages shows in the rows below, "
                  "whether it reaches text in the two columns after it. The last column asks the world knowledge "
                  "questions again with each answer begun for the model up to the answer (\"What is the capital of "
                  "Kenya?\" then \"The capital of Kenya is\"): what it knows, whether or not it can begin the "
                  "answer itself; its gap to the world knowledge column above, on the same facts, is what the model "
                  "knows but does not say unaided, and its fall from base what the chat stages cost the facts."]
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


def chat_changes(reports):
    """Each TinyWorld chat task's change from mid to sft and from mid to rl on the same held-out items,
    item by item: {"mid -> sft": {task: paired_difference}, ...}, for the tasks whose outcomes both
    reports kept over the same number of items (evaluate_chat with the same --eval-items)."""
    changes = {}
    for before, after in (("mid", "sft"), ("mid", "rl")):
        old, new = (reports.get(stage, {}).get("chat_eval", {}) for stage in (before, after))
        tasks = {task: paired_difference(old[task]["outcomes"], new[task]["outcomes"]) for task in old
                 if "outcomes" in old[task] and "outcomes" in new.get(task, {})
                 and len(old[task]["outcomes"]) == len(new[task]["outcomes"])}
        if tasks:
            changes[f"{before} -> {after}"] = tasks
    return changes


def real_eval_report_lines(reports):
    """report.md sections for CORE (eval_base) and the real chat tasks with ChatCORE (eval_mid,
    eval_sft, eval_rl), from the reports `--stage eval` writes."""
    lines = []
    core = reports.get("eval_base", {})
    if "CORE" in core:
        lines += ["", "## CORE of the base model (DCLM tasks, centered accuracy)", "",
                  f"CORE = {core['CORE']:.4f}, the mean centered accuracy over {len(core['core_tasks'])} tasks.", "",
                  "| task | type | shots | items | accuracy | centered |", "|---|---|---|---|---|---|"]
        lines += [f"| {label} | {r['type']} | {r['shots']} | {r['items']} | {r['accuracy']:.4f} | {r['centered']:.4f} |"
                  for label, r in core["core_tasks"].items()]
    stages = [(stage, reports[f"eval_{stage}"]) for stage in ("mid", "sft", "rl")
              if reports.get(f"eval_{stage}", {}).get("chat_tasks")]
    if stages:
        names = [task for task in realdata.CHAT_EVAL_TASKS if any(task in r["chat_tasks"] for _, r in stages)]
        lines += ["", "## Chat evaluations (real tasks; ChatCORE = mean centered accuracy over the tasks run)", "",
                  "| after stage | " + " | ".join(names) + " | ChatCORE |", "|---|" + "---|" * (len(names) + 1)]
        for stage, r in stages:
            cells = [format_accuracy(r["chat_tasks"][t]) if t in r["chat_tasks"] else "-" for t in names]
            lines.append(f"| {stage} | " + " | ".join(cells) + f" | {r['ChatCORE']:.4f} |")
    return lines


def plot_reward_curve(summary, path):
    """Mean reward per step and held-out pass@1 / pass@k, as a PNG (when matplotlib is installed)."""
    try:
        from matplotlib.figure import Figure  # no pyplot: the caller's plotting backend stays as it was
    except ImportError:
        return
    fig = Figure(figsize=(6, 3.5), dpi=80)
    ax = fig.add_subplot()
    ax.plot([c["step"] for c in summary["reward_curve"]], [c["mean_reward"] for c in summary["reward_curve"]],
            alpha=0.5, label="train mean reward")
    steps = [h["step"] for h in summary["history"]]
    ax.errorbar(steps, [h["pass1"] for h in summary["history"]], yerr=[2 * h["pass1_stderr"] for h in summary["history"]],
                marker="o", capsize=3, label="held-out pass@1 (+-2 s.e.)")
    ax.errorbar(steps, [h["passk"] for h in summary["history"]],
                yerr=[2 * h["passk_stderr"] for h in summary["history"]], marker="s", capsize=3,
                label=f"held-out pass@{summary['pass_k']} (+-2 s.e.)")
    ax.set_xlabel("RL step")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
