"""TinyWorld: deterministic, self-consistent, and its splits never leak into training text."""
import ast
import hashlib
import itertools
import json
import random
import re
from pathlib import Path

import nanochat_one as nc
import tinyworld


def test_documents_are_deterministic():
    assert tinyworld.tinyworld_document(random.Random(42)) == tinyworld.tinyworld_document(random.Random(42))
    first = [text for _, text in zip(range(5), (t for _, t in tinyworld.tinyworld_documents("train")))]
    again = [text for _, text in zip(range(5), (t for _, t in tinyworld.tinyworld_documents("train")))]
    assert first == again


def test_word_problems_check_out_with_the_calculator():
    rng = random.Random(1)
    for _ in range(500):
        wp = tinyworld.tinyworld_word_problem(rng)
        spans = re.findall(r"<<([^=]+)=(\d+)>>", wp["answer_text"])
        assert len(spans) == len(wp["steps"])
        for (expr, result), (span_expr, span_result) in zip(wp["steps"], spans):
            assert nc.calculator(expr) == (True, str(result)) and int(span_result) == result
            assert span_expr == expr.replace(" ", "")
        assert nc.answer_is_correct(wp["answer_text"], wp["answer"])


def test_multiple_choice_items_are_well_formed():
    rng = random.Random(2)
    for _ in range(500):
        mc = tinyworld.tinyworld_multiple_choice(rng)
        assert len(mc["choices"]) == 4 == len(set(mc["choices"])) and 0 <= mc["answer"] < 4


def test_conversations_alternate_roles():
    rng = random.Random(3)
    for _ in range(300):
        roles = [m["role"] for m in tinyworld.tinyworld_conversation(rng)["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and roles


def test_split_fractions():
    keys = [f"k{i}" for i in range(10_000)]
    counts = {s: sum(tinyworld.tinyworld_split(k) == s for k in keys) for s in ("train", "val", "test")}
    assert 7600 < counts["train"] < 8400 and 800 < counts["val"] < 1200 and 800 < counts["test"] < 1200


def test_held_out_questions_never_appear_in_pretraining_text():
    held_out = [item["question"] for item in tinyworld.tinyworld_eval_items("multiple_choice", "test", n=100)]
    held_out += [item["question"] for item in tinyworld.tinyworld_eval_items("fact", "test", n=100)]
    text = "\n".join(t for _, t in zip(range(3000), (t for _, t in tinyworld.tinyworld_documents("train"))))
    quizzed = set(re.findall(r'asked the class, "(.*?)"', text))
    assert len(quizzed) > 50  # the documents do quote questions...
    assert not quizzed & set(held_out)  # ...but never held-out ones


def digest(items):
    return hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()


# sha256 of the first items of every TinyWorld stream, recorded once. Any change to a table, a
# template, a seed or the split moves a digest: if the change is meant, record the new digests.
DIGESTS = {
    ("documents", "train"): "d84d55eaae735018dd4e3f1b82bc302a56587da0decce1d8be442240a0407027",
    ("documents", "val"): "e35f39eab3d0628f42936a6c54ec2a6d8b1394e5e18f12fc37834b0f82a961e4",
    ("documents", "test"): "6f3c91e0d24ae872c9d8ec2afd0a614c5447feba501d5362a2e2351da361549d",
    ("chat", "train"): "9f138825313ecbf28a5b4e92416b732f6b1e4d1cbec98664a8298ff8e6f39a13",
    ("chat", "val"): "1e94c31dce63b7d4d5264b343572c7a4df9d7056932e70b2d5758205dde7a2cf",
    ("chat", "test"): "b87393c0e3ba7d2cd0a54dc10d5b06c33c3eaad2e3ddda02c5118e62330f51c1",
    ("eval", "fact"): "b8c3b5706d7d47a740a5da516ab68a886914db572235ffe66a3bfa8c98741dc0",
    ("eval", "multiple_choice"): "1227a78294db7ca24ea07de95a9366bbe8aacdf2a03f5c99fc21aa571612d552",
    ("eval", "word_problem"): "e1b9378c83d95457f33c7835f2bc24f4cadbe02582a581cbdc6f9a84363ff5ad",
}


def test_generated_data_is_unchanged():
    for split in ("train", "val", "test"):
        assert digest(list(itertools.islice(tinyworld.tinyworld_documents(split), 200))) == DIGESTS["documents", split]
        assert digest(list(itertools.islice(tinyworld.tinyworld_chat_examples(split), 100))) == DIGESTS["chat", split]
    for task in ("fact", "multiple_choice", "word_problem"):
        assert digest(tinyworld.tinyworld_eval_items(task, "test", n=100)) == DIGESTS["eval", task]


def test_tinyworld_imports_only_the_standard_library():
    tree = ast.parse(Path(tinyworld.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"random", "re", "zlib"}  # nothing from nanochat_one.py: the arrow goes one way


def test_training_conversations_never_ask_a_held_out_question():
    rng, held_out = random.Random(0), set()
    for _ in range(200_000):  # nearly every phrasing of every fact question
        fact = tinyworld.tinyworld_fact_question(rng)
        if tinyworld.tinyworld_split(fact["key"]) != "train":
            held_out.add(fact["question"])
    asked, several = set(), 0
    for _, conversation in itertools.islice(tinyworld.tinyworld_chat_examples("train"), 4000):
        questions = [m["content"].split("\n")[0] for m in conversation["messages"] if m["role"] == "user"]
        asked.update(questions)
        several += len(questions) > 1
    assert several > 300 and len(asked & held_out) == 0, sorted(asked & held_out)[:5]


def test_400_distinct_held_out_items_per_task():
    for task in ("fact", "multiple_choice", "word_problem"):
        items = tinyworld.tinyworld_eval_items(task, "test", n=400)
        assert len(items) == 400 == len({item["question"] for item in items})
        assert {tinyworld.tinyworld_split(item["key"]) for item in items} == {"test"}
