"""Graders: a fact reply is right on its answer alone, a word problem on its last '####' line."""
import itertools
import json
import random

import pytest

import nanochat_one as nc
import tinyworld
from conftest import run_stage

FACT_REPLIES = [  # (key, answer, reply, right?)
    ("day_before:Sunday", "Saturday", "The day before Sunday is Saturday.", True),
    ("day_before:Sunday", "Saturday", "Saturday", True),
    ("day_before:Sunday", "Saturday", "the day before sunday is SATURDAY!", True),  # case and punctuation aside
    ("day_before:Sunday", "Saturday", "  The day before Sunday is Saturday . ", True),
    ("day_before:Sunday", "Saturday", "The day before Saturday is Friday.", False),  # substring grading passed it
    ("day_after:Friday", "Saturday", "The day before Saturday is Friday.", False),  # true, but not the answer
    ("day_before:Saturday", "Friday", "The day before Saturday is Friday.", True),
    ("day_before:Sunday", "Saturday", "Saturdays.", False),
    ("day_before:Sunday", "Saturday", "Saturdayish.", False),
    ("day_before:Sunday", "Saturday", "Friday or Saturday.", False),  # two candidates
    ("day_before:Sunday", "Saturday", "Saturday or Friday.", False),
    ("day_before:Sunday", "Saturday", "Saturday or Sunday.", False),  # the subject comes last
    ("day_before:Sunday", "Saturday", "I think it is Friday. Saturday!", False),  # only the first sentence counts
    ("day_before:Sunday", "Saturday", "", False),
    ("capital:Kenya", "Nairobi", "The capital of Kenya is Nairobi.", True),
    ("capital:Kenya", "Nairobi", "The capital of Kenya is Nairobi. Cairo is the capital of Egypt.", True),
    ("capital:Kenya", "Nairobi", "The capital of Kenya is Cairo or Nairobi.", False),
    ("capital:Kenya", "Nairobi", "The capital of Kenya is Nai robi.", False),
    ("capital:Mexico", "Mexico City", "The capital of Mexico is Mexico City.", True),
    ("capital:Mexico", "Mexico City", "The capital of Mexico is Mexico.", False),
    ("country:Mexico City", "Mexico", "Mexico City is the capital of Mexico.", True),
    ("country:Mexico City", "Mexico", "Mexico City.", False),  # the subject, not the answer
    ("continent:Mexico", "North America", "Mexico is in North America.", True),
    ("continent:Mexico", "North America", "Mexico is in South America.", False),
    ("colour:a panda", "black and white", "A panda is black and white.", True),
    ("colour:a crow", "black", "A crow is black and white.", False),
    ("colour:a crow", "black", "A crow is black.", True),
    ("legs:snake", "no", "A snake has no legs.", True),
    ("legs:dog", "four", "A dog has four legs.", True),
    ("legs:dog", "four", "A dog has four or two legs.", False),
    ("young:chicken", "chick", "A young chicken is called a chick.", True),
    ("young:chicken", "chick", "A young chick is called a chicken.", False),
    ("opposite:in", "out", "The opposite of in is out.", True),
    ("opposite:in", "out", "The opposite of out is in.", False),
    ("add:5+7", "12", "5 plus 7 is 12.", True),
    ("add:5+7", "12", "5 plus 7 is 120.", False),
    ("add:5+7", "12", "5 plus 7 is 112.", False),
    ("add:5+7", "12", "5 plus 7 is 12 or 13.", False),
    ("add:7+0", "7", "7 plus 0 is 7.", True),  # the answer may also be an operand
    ("add:7+0", "7", "7 plus 0 is 0.", False),
    ("sub:12-0", "12", "12", True),
]


@pytest.mark.parametrize("key,answer,reply,expected", FACT_REPLIES)
def test_fact_grader(key, answer, reply, expected):
    assert tinyworld.fact_is_correct(reply, dict(key=key, answer=answer)) is expected


def test_fact_grader_on_every_trained_reply():
    """Each fact's own reply is right; another fact's reply of the same kind with another answer is wrong."""
    rng, facts = random.Random(0), {}
    for _ in range(20_000):
        fact = tinyworld.tinyworld_fact_question(rng)
        facts[fact["key"]] = fact
    assert len(facts) > 1000
    for fact in facts.values():
        assert tinyworld.fact_is_correct(fact["reply"], fact), fact
    by_kind = itertools.groupby(sorted(facts.values(), key=lambda f: f["key"]), key=lambda f: f["key"].split(":")[0])
    for _, group in by_kind:
        group = list(group)
        for fact, other in zip(group, group[1:] + group[:1]):
            if other["answer"] != fact["answer"]:
                assert not tinyworld.fact_is_correct(other["reply"], fact), (fact, other["reply"])


@pytest.mark.parametrize("text,reference,expected", [
    ("so 18\n#### 18", 18, True), ("#### 18.0", "18", True), ("#### 18.00", 18, True), ("#### 1,000", 1000, True),
    ("#### 1 000", "1000", True), ("#### -5", -5, True), ("#### 17", 18, False), ("the answer is 18", 18, False),
    ("####", 1, False), ("##### 18", 18, False), ("#### 12.", 12, True), ("#### 18 apples", 18, True),
    ("#### 7<|assistant_end|>", 7, True),  # RL decodes its samples with the stop token
    # the last '####' line counts, and it must hold one number
    ("#### 3\n#### 4", 4, True), ("#### 4\n#### 3", 4, False), ("#### 18\n#### I am not sure", 18, False),
    ("#### 18 or 19", 18, False), ("#### 18 or 19", 19, False), ("####\n18", 18, False)])
def test_word_problem_grader(text, reference, expected):
    assert nc.answer_is_correct(text, reference) is expected


def test_accuracy_with_its_standard_error():
    stats = nc.accuracy_stats(3, 4)
    assert stats["accuracy"] == 0.75 and stats["items"] == 4 and stats["stderr"] == pytest.approx(0.2165, abs=1e-4)
    assert nc.format_accuracy(nc.accuracy_stats(222, 400)) == "55.5% +- 2.5 [50.6, 60.3] (N=400)"
    assert nc.format_accuracy(nc.accuracy_stats(0, 200)) == "0.0% [0.0, 1.9] (N=200)"  # no "+- 0.0" at 0%
    assert nc.format_accuracy(dict(accuracy=0.5, items=4, stderr=0.25)) == "50.0% +- 25.0 (N=4)"  # an older report
    assert nc.accuracy_stats(0, 0) == dict(accuracy=0.0, items=0, stderr=0.0, interval=[0.0, 1.0])
    # the standard error is the spread of the accuracy over many draws of N items
    rng = random.Random(0)
    draws = [sum(rng.random() < 0.3 for _ in range(400)) / 400 for _ in range(2000)]
    mean = sum(draws) / len(draws)
    spread = (sum((d - mean) ** 2 for d in draws) / len(draws)) ** 0.5
    assert spread == pytest.approx(nc.accuracy_stats(120, 400)["stderr"], rel=0.1)


def test_report_table_shows_each_accuracy_with_its_error(base_dir, tmp_path):
    chat_eval = dict(multiple_choice_letter=nc.accuracy_stats(100, 400), multiple_choice_cloze=nc.accuracy_stats(222, 400),
                     world_knowledge=nc.accuracy_stats(120, 160), arithmetic=nc.accuracy_stats(180, 240),
                     word_problem=nc.accuracy_stats(40, 400), names_subject=nc.accuracy_stats(152, 160))
    (base_dir / "report").mkdir(parents=True)
    (base_dir / "report" / "mid.json").write_text(json.dumps(dict(chat_eval=chat_eval)))
    run_stage("--stage", "report", "--report-path", str(tmp_path / "report.md"))
    markdown = (tmp_path / "report.md").read_text()
    assert ("| mid | 25.0% +- 2.2 [21.0, 29.5] (N=400) | 55.5% +- 2.5 [50.6, 60.3] (N=400) | "
            "75.0% +- 3.4 [67.8, 81.1] (N=160) | 75.0% +- 2.8 [69.2, 80.1] (N=240) | 10.0% +- 1.5 [7.4, 13.3] (N=400) |"
            ) in markdown
    assert "| mid | - | - | 95.0% +- 1.7 [90.4, 97.4] (N=160) | - |" in markdown  # no induction score saved
