"""TinyWorld: deterministic, self-consistent, and its splits never leak into training text."""
import ast
import hashlib
import itertools
import json
import random
import re
from pathlib import Path

import pytest

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


# An oracle for the hard word problems, written from their wording alone: a number in digits or
# words, the events that change the amount, and the sentences that do not matter.
N = r"(\d+|one hundred|[a-z]+(?:-[a-z]+)?)"  # checked by read_number
HWP = {kind: re.compile(pattern) for kind, pattern in dict(
    gain=rf"(She|He) (?:finds|buys) {N} more\.", gift=rf"\S+ gives (her|him) {N} more\.",
    give=rf"(She|He) gives {N} to \S+\.", lose=rf"(She|He) (?:loses|sells) {N}\.",
    half=r"(She|He) gives half of them to \S+\.", packs=rf"(She|He) buys {N} packs with {N} (.+) in each pack\.",
    things=rf"(\S+) has {N} (.+)\.", age=rf"\S+ is {N} years old\.", distance=rf"The shop is {N} minutes away\.",
).items()}


def read_number(text):
    return int(text) if text.isdigit() else tinyworld.NUMBER_WORDS.index(text)  # ValueError if neither


def solve_hard_word_problem(question):
    """(start, steps, answer, event kinds, distractor kinds) read from the question: "finds N more",
    "X gives her N more", "buys N more" add; "gives N to X", "loses N", "sells N" subtract; "buys K
    packs with N ... in each pack" adds K*N; "gives half of them" halves; anything else must be
    one of the three distractors (someone else's other things, an age, a distance), and is ignored."""
    first, *sentences, last = re.split(r"(?<=[.?]) ", question)
    items, name = re.fullmatch(r"How many (.+) does (\S+) have now\?", last).groups()
    m = HWP["things"].fullmatch(first)
    assert m.group(1) == name and m.group(3) == items, question
    have = start = read_number(m.group(2))
    she = tinyworld.cap(tinyworld.PRONOUN[name])
    steps, kinds, distractors = [], [], []
    for sentence in sentences:
        kind, m = next(((kind, m) for kind, pattern in HWP.items() if (m := pattern.fullmatch(sentence))), (None, None))
        assert kind, f"a sentence the oracle cannot read: {sentence!r}"
        if kind in ("gain", "gift", "give", "lose", "half", "packs"):  # an event: about the one who has the things
            assert m.group(1) in (she, {"She": "her", "He": "him"}[she]), sentence
        if kind in ("gain", "gift"):
            n = read_number(m.group(2))
            steps.append((f"{have}+{n}", have + n)); have += n; kinds.append("gain")
        elif kind in ("give", "lose"):
            n = read_number(m.group(2))
            steps.append((f"{have}-{n}", have - n)); have -= n; kinds.append("lose")
        elif kind == "half":
            assert have % 2 == 0, question  # only an even amount is ever halved
            steps.append((f"{have}/2", have // 2)); have //= 2; kinds.append("half")
        elif kind == "packs":
            k, n = read_number(m.group(2)), read_number(m.group(3))
            assert m.group(4) == items, sentence
            steps += [(f"{k}*{n}", k * n), (f"{have}+{k * n}", have + k * n)]; have += k * n; kinds.append("packs")
        else:
            read_number(m.group(2) if kind == "things" else m.group(1))
            assert kind != "things" or (m.group(1) != name and m.group(3) != items), sentence
            distractors.append(kind)
    return start, steps, have, kinds, distractors


def test_hard_word_problems_check_out_with_the_calculator_and_a_reading_of_the_question():
    seen_kinds, distractors, in_words, expected, variance = set(), set(), 0, 0.0, 0.0
    for seed in range(2000):
        item = tinyworld.tinyworld_hard_word_problem(random.Random(seed))
        question, steps, answer = item["question"], item["steps"], item["answer"]
        assert 3 <= len(steps) <= 6
        for expr, result in steps:
            assert nc.calculator(expr) == (True, str(result))
            assert result == int(result) and 0 <= result <= 1000
        # the results chain: each step starts from the amount so far, a pack count first multiplies
        have = start = int(re.search(r"starts with (\d+) ", item["answer_text"]).group(1))
        i, events = 0, 0
        while i < len(steps):
            if "*" in steps[i][0]:
                assert steps[i + 1][0] == f"{have}+{steps[i][1]}"
                i += 1
            else:
                assert re.fullmatch(rf"{have}[-+/]\d+", steps[i][0])
            have, i, events = steps[i][1], i + 1, events + 1
        assert events == 3 and have == answer == steps[-1][1]
        assert nc.answer_is_correct(item["answer_text"], answer)
        assert re.search(rf"\b({start}|{tinyworld.number_to_words(start)})\b", question)
        # the oracle, from the wording alone, finds the same start, steps and answer
        read_start, read_steps, read_answer, kinds, ignored = solve_hard_word_problem(question)
        assert (read_start, read_steps, read_answer) == (start, steps, answer), question
        assert len(ignored) == 1 and len(kinds) == 3
        seen_kinds.update(kinds)
        distractors.update(ignored)
        in_words += any(word in tinyworld.NUMBER_WORDS for word in re.findall(r"[\w-]+", question))
        k = 2 + sum(dict(gain=1, lose=1, half=0, packs=2)[kind] for kind in kinds)  # the start, the distractor, the events'
        expected, variance = expected + 1 - 0.6 ** k, variance + (1 - 0.6 ** k) * 0.6 ** k
    # the oracle met every kind of event and of distractor, and numbers both in words and in digits
    assert seen_kinds == {"gain", "lose", "half", "packs"} and distractors == {"things", "age", "distance"}
    # k numbers (all at most 100), each in words with probability 0.4: some word with p = 1 - 0.6**k; 5 standard errors
    assert abs(in_words - expected) < 5 * variance ** 0.5 and variance > 50


def test_hard_word_problem_chats_call_the_calculator_for_each_step():
    for seed in range(300):
        item = tinyworld.tinyworld_hard_word_problem(random.Random(seed))
        chat = tinyworld.tinyworld_hard_word_problem_chat(random.Random(seed))
        assert chat["key"] == item["key"] and chat["messages"][0] == dict(role="user", content=item["question"])
        parts = chat["messages"][1]["content"]
        calls = [(p["text"], int(o["text"])) for p, o in zip(parts, parts[1:]) if p["type"] == "python"]
        assert [p["type"] for p in parts if p["type"] != "text"] == ["python", "python_output"] * len(item["steps"])
        assert calls == item["steps"]
        assert all(nc.calculator(expr) == (True, str(result)) for expr, result in calls)
        assert parts[-1]["type"] == "text" and parts[-1]["text"].endswith(f"\n#### {item['answer']}")


def test_multiple_choice_items_are_well_formed():
    rng = random.Random(2)
    for _ in range(500):
        mc = tinyworld.tinyworld_multiple_choice(rng)
        assert len(mc["choices"]) == 4 == len(set(mc["choices"])) and 0 <= mc["answer"] < 4
        shared, endings = mc["cloze"]
        assert shared and len(set(endings)) == 4
        assert all(re.search(rf"(?<!\w){re.escape(choice)}(?!\w)", ending) for choice, ending in zip(mc["choices"], endings))


@pytest.mark.parametrize("reply, answer, choices, expected", [
    ("A young cat is called a kitten.", "kitten", ["eaglet", "kitten"], ("A young cat is called", ["an eaglet.", "a kitten."])),
    ("A young cat is called a kitten.", "kitten", ["lamb", "kitten"], ("A young cat is called a", ["lamb.", "kitten."])),
    ("A dog has four legs.", "four", ["four", "six"], ("A dog has", ["four legs.", "six legs."])),
    ("10 minus 9 is 1.", "1", ["11", "1"], ("10 minus 9 is", ["11.", "1."])),  # the last "1", not the one in "10"
    ("Coal is black.", "black", ["black and white", "black"], ("Coal is", ["black and white.", "black."])),
    ("After Monday comes Tuesday.", "Tuesday", ["Tuesday", "Friday"], ("After Monday comes", ["Tuesday.", "Friday."])),
])
def test_choice_sentences_worked_examples(reply, answer, choices, expected):
    assert tinyworld.choice_sentences(reply, answer, choices) == expected


def test_conversations_alternate_roles():
    rng = random.Random(3)
    for _ in range(300):
        roles = [m["role"] for m in tinyworld.tinyworld_conversation(rng)["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and roles


def test_split_fractions():
    keys = [f"k{i}" for i in range(10_000)]
    counts = {s: sum(tinyworld.tinyworld_split(k) == s for k in keys) for s in ("train", "val", "test")}
    assert 7600 < counts["train"] < 8400 and 800 < counts["val"] < 1200 and 800 < counts["test"] < 1200
    keys = [f"capital:k{i}" for i in range(10_000)]  # fact questions: 60/5/35, each bound about 4 standard deviations
    counts = {s: sum(tinyworld.tinyworld_split(k) == s for k in keys) for s in ("train", "val", "test")}
    assert 5800 < counts["train"] < 6200 and 410 < counts["val"] < 590 and 3310 < counts["test"] < 3690


def test_at_least_150_distinct_world_facts_are_held_out():
    facts = tinyworld.tinyworld_eval_items("fact", "test", n=1000)
    world = {f["key"] for f in facts if f["key"].split(":")[0] not in tinyworld.ARITHMETIC_KINDS}
    assert len(world) >= 150 and len(facts) == len({f["key"] for f in facts})


def test_copying_paragraphs_repeat_what_they_drew():
    rng = random.Random(0)
    for _ in range(200):
        game = tinyworld.copy_memory_game(rng)
        first, second = re.findall(r": ([^:]*)\.", game)
        assert first == second and len(first.split(", ")) >= 5
        card = tinyworld.copy_secret_code(rng)
        code = re.search(r"on a card: (.*?)\. ", card).group(1)
        assert card.count(code) == 2 and len(code.split()) >= 4
    documents = [t for _, t in zip(range(400), (t for _, t in tinyworld.tinyworld_documents("train")))]
    paragraphs = [p for d in documents for p in d.split("\n\n")]
    copying = sum(("memory game" in p or "secret code" in p or "some questions." in p or p.startswith("Quiz:"))
                  for p in paragraphs)
    n, share = len(paragraphs), tinyworld.COPY_SHARE  # the share of paragraphs, within 4 standard errors
    assert abs(copying / n - share) < 4 * (share * (1 - share) / n) ** 0.5



def test_held_out_questions_never_appear_in_pretraining_text():
    held_out = [item["question"] for item in tinyworld.tinyworld_eval_items("multiple_choice", "test", n=100)]
    held_out += [item["question"] for item in tinyworld.tinyworld_eval_items("fact", "test", n=100)]
    text = "\n".join(t for _, t in zip(range(3000), (t for _, t in tinyworld.tinyworld_documents("train"))))
    quizzed = set(re.findall(r'asked the class, "(.*?)"', text)) | set(re.findall(r'"([^"]*\?)" \w+ answered', text))
    assert len(quizzed) > 50  # the documents do quote questions...
    assert not quizzed & set(held_out)  # ...but never held-out ones


def digest(items):
    return hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()


# sha256 of the first items of every TinyWorld stream, recorded once. Any change to a table, a
# template, a seed or the split moves a digest: if the change is meant, record the new digests.
DIGESTS = {
    ("documents", "train"): "3c6b6c65a145a74e1b6159ed5f0c1baf7afd5844c325042b8a2d8029e4134f01",
    ("documents", "val"): "a965c0b8f2945d7b11bcc5b1322b0f633d235a662c83051490b8a082e90b3495",
    ("documents", "test"): "0f3ea64890ba505ecbc6d5075d95b9f7d1052129bdcf29bdbe47da58527ea606",
    ("chat", "train"): "0ba9071be9ddbb13a0c9bd39b7ba9f3f1c1b33e80ee83b52775124795c867ba2",
    ("chat", "val"): "9702d572a4433a92bccbc7d5c1503d0bbe8be5af37fc0c05005b4658bd08a311",
    ("chat", "test"): "e50418bcf7e39cd32e79c66528c4f18d35a9e6278528bb5e6ef18b3e298c7e27",
    ("chat-sft", "train"): "9432401a80e93aec5cb5ab1e025e0fc532791f5496b1c9477b48e1193436e418",
    ("chat-sft", "val"): "f69d4bda6067fea526324b1e92b4ecde4b168602e2be8547e830b8bef3fac536",
    ("chat-sft", "test"): "21e52798e8ece33795c0e36f6272fe3031f9b94997ecaeaccd96a2fc23642f0e",
    ("eval", "fact"): "e179f3eeaf75bf34dee1fe7d80e09f346edeee745802d78a7d7b88c4f0872757",
    ("eval", "multiple_choice"): "25b84cf46d2c464255f95b65a31823585ae03d9affcae4776a7391c451042d16",
    ("eval", "word_problem"): "e1b9378c83d95457f33c7835f2bc24f4cadbe02582a581cbdc6f9a84363ff5ad",
    ("eval", "hard_word_problem"): "eb7faade84c275adc3aaadbf00a207ecc790a66ea0dbe8b5cd3e11cf6cfc88bd",
}


def test_generated_data_is_unchanged():
    for split in ("train", "val", "test"):
        assert digest(list(itertools.islice(tinyworld.tinyworld_documents(split), 200))) == DIGESTS["documents", split]
        assert digest(list(itertools.islice(tinyworld.tinyworld_chat_examples(split), 100))) == DIGESTS["chat", split]
        sft = itertools.islice(tinyworld.tinyworld_chat_examples(split, stage="sft"), 100)
        assert digest(list(sft)) == DIGESTS["chat-sft", split]
    for task in ("fact", "multiple_choice", "word_problem", "hard_word_problem"):
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


def test_distinct_held_out_items_per_task():
    """Word problems: 400 distinct questions. Facts and multiple choice: each held-out fact once (about 400)."""
    for task in ("fact", "multiple_choice", "word_problem", "hard_word_problem"):
        items = tinyworld.tinyworld_eval_items(task, "test", n=400)
        distinct = {item["key"] if task in ("fact", "multiple_choice") else item["question"] for item in items}
        assert len(items) == len(distinct) and (len(items) == 400 if "word" in task else 380 <= len(items) <= 400)
        assert {tinyworld.tinyworld_split(item["key"]) for item in items} == {"test"}


@pytest.mark.parametrize("reply, letter", [
    ("The capital of Japan is Tokyo B.", "B"), ("A pig has four legs: four D.", "D"), ("C", "C"), (" B. ", "B"),
    ("A young cat is called a kitten.", None),  # "A" opens it: the letter must be the last word
    ("The capital of Japan is Tokyo.", None), ("Tokyo B is the answer.", None), ("", None)])
def test_reply_letter_worked_examples(reply, letter):
    assert tinyworld.reply_letter(reply) == letter


def test_a_multiple_choice_reply_copies_the_letter_its_choice_has_in_the_list(tok):
    """In the tokens the model sees: the reply's letter follows the same token that the right choice's
    letter follows in the list, and no other choice ends with that word, so one look back finds it."""
    rng = random.Random(4)
    for _ in range(300):
        item = tinyworld.tinyworld_multiple_choice(rng)
        reply = tinyworld.multiple_choice_reply(item)
        question, choices = item["question"], item["choices"]
        conversation = tinyworld.multiple_choice_conversation(question, choices, item["answer"], reply)
        assert conversation["messages"][1]["content"] == reply
        assert tinyworld.reply_letter(reply) == tinyworld.LETTERS[item["answer"]]
        assert nc.mentions(reply, choices[item["answer"]])  # the reply names its choice
        # each option line is tokenized on its own (a line break splits chunks), so the list is its
        # lines' tokens with the line break's between them
        lines = [tok.encode_ordinary(line) for line in tinyworld.lettered_choices(choices).split("\n")]
        assert tok.encode_ordinary(tinyworld.lettered_choices(choices)) == [
            i for line in lines for i in line + tok.encode_ordinary("\n")][:-1]
        letter, before = lines[item["answer"]][-1], lines[item["answer"]][-2]
        assert tok.decode([letter]) == " " + tinyworld.LETTERS[item["answer"]]  # one token, as in the reply
        said = tok.encode_ordinary(reply)
        assert said[-3:] == [before, letter, tok.encode_ordinary(".")[0]]
        last = [choice.split()[-1] for choice in choices]
        assert last.count(last[item["answer"]]) == 1


def test_multiple_choice_chat_works_a_sum_out_with_the_calculator():
    rng, sums = random.Random(6), 0
    for _ in range(300):
        conversation = tinyworld.tinyworld_multiple_choice_chat(rng)
        user, reply = (message["content"] for message in conversation["messages"])
        kind, subject = conversation["key"].split(":", 1)
        if kind not in tinyworld.ARITHMETIC_KINDS:
            assert isinstance(reply, str) and tinyworld.reply_letter(reply)
            continue
        sums += 1
        text, python, output, last = reply
        assert (python["type"], output["type"]) == ("python", "python_output") and python["text"] == subject
        assert nc.calculator(python["text"]) == (True, output["text"])
        letter = tinyworld.reply_letter(last["text"])
        assert last["text"] == f"{output['text']} {letter}." and f"- {output['text']} {letter}\n" in user
    assert sums > 20
