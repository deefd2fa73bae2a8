"""TinyWorld: deterministic, self-consistent, and its splits never leak into training text."""
import random
import re

import nanochat_one as nc


def test_documents_are_deterministic():
    assert nc.tinyworld_document(random.Random(42)) == nc.tinyworld_document(random.Random(42))
    first = [text for _, text in zip(range(5), (t for _, t in nc.tinyworld_documents("train")))]
    again = [text for _, text in zip(range(5), (t for _, t in nc.tinyworld_documents("train")))]
    assert first == again


def test_word_problems_check_out_with_the_calculator():
    rng = random.Random(1)
    for _ in range(500):
        wp = nc.tinyworld_word_problem(rng)
        spans = re.findall(r"<<([^=]+)=(\d+)>>", wp["answer_text"])
        assert len(spans) == len(wp["steps"])
        for (expr, result), (span_expr, span_result) in zip(wp["steps"], spans):
            assert nc.calculator(expr) == (True, str(result)) and int(span_result) == result
            assert span_expr == expr.replace(" ", "")
        assert nc.answer_is_correct(wp["answer_text"], wp["answer"])


def test_multiple_choice_items_are_well_formed():
    rng = random.Random(2)
    for _ in range(500):
        mc = nc.tinyworld_multiple_choice(rng)
        assert len(mc["choices"]) == 4 == len(set(mc["choices"])) and 0 <= mc["answer"] < 4


def test_conversations_alternate_roles():
    rng = random.Random(3)
    for _ in range(300):
        roles = [m["role"] for m in nc.tinyworld_conversation(rng)["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and roles


def test_split_fractions():
    keys = [f"k{i}" for i in range(10_000)]
    counts = {s: sum(nc.tinyworld_split(k) == s for k in keys) for s in ("train", "val", "test")}
    assert 7600 < counts["train"] < 8400 and 800 < counts["val"] < 1200 and 800 < counts["test"] < 1200


def test_held_out_questions_never_appear_in_pretraining_text():
    held_out = [item["question"] for item in nc.tinyworld_eval_items("multiple_choice", "test", n=100)]
    held_out += [item["question"] for item in nc.tinyworld_eval_items("fact", "test", n=100)]
    text = "\n".join(t for _, t in zip(range(3000), (t for _, t in nc.tinyworld_documents("train"))))
    quizzed = set(re.findall(r'asked the class, "(.*?)"', text))
    assert len(quizzed) > 50  # the documents do quote questions...
    assert not quizzed & set(held_out)  # ...but never held-out ones
