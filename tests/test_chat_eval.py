"""The chat evaluation: cloze multiple choice against the model's own loss, the report card's
accuracies with their errors, and whole-word mentions."""
import torch

import nanochat_one as nc
import tinyworld
from conftest import tiny_chat_model


def test_cloze_multiple_choice_picks_the_choice_with_the_lowest_mean_loss(tok):
    """Each option scored in its own forward, by the model's own loss (oracle), against one padded batch."""
    model = tiny_chat_model(tok)
    picks = []
    for item in tinyworld.tinyworld_eval_items("multiple_choice", n=12):
        prompt = nc.render_for_completion(tok, dict(messages=[dict(role="user", content=item["question"])]))
        shared, endings = item["cloze"]
        losses = []
        for ending in endings:  # the whole sentence encoded at once: the same tokens as its two halves
            ids = prompt + tok.encode_ordinary(f"{shared} {ending}")
            prompt_len = len(prompt) + len(tok.encode_ordinary(shared))
            assert ids[prompt_len:] == tok.encode_ordinary(" " + ending)
            targets = [-1] * (prompt_len - 1) + ids[prompt_len:]
            with torch.no_grad():
                losses.append(model(torch.tensor([ids[:-1]]), torch.tensor([targets])).item())
        right = min(range(len(losses)), key=losses.__getitem__) == item["answer"]
        assert nc.evaluate_multiple_choice_cloze(model, tok, [item], nc.Dist())["accuracy"] == float(right)
        picks.append(right)
    assert 0 < sum(picks) < len(picks)  # the test sees both outcomes


def test_chat_report_card_gives_each_accuracy_with_its_items_and_error(tok):
    results = nc.evaluate_chat(tiny_chat_model(tok), tok, nc.Dist(), n=3)
    assert list(results) == ["multiple_choice_letter", "multiple_choice_cloze", "world_knowledge", "arithmetic",
                             "word_problem", "hard_word_problem", "names_subject", "keeps_name", "completes_fact"]
    for stats in results.values():  # each item's outcome kept, in item order
        assert stats == nc.accuracy_stats(sum(stats["outcomes"]), len(stats["outcomes"]), stats["outcomes"])
    facts = tinyworld.tinyworld_eval_items("fact", n=3)
    assert results["world_knowledge"]["items"] + results["arithmetic"]["items"] == len(facts)
    assert results["names_subject"]["items"] == results["world_knowledge"]["items"]
    assert results["completes_fact"]["items"] == results["world_knowledge"]["items"]
    assert results["keeps_name"]["items"] == results["hard_word_problem"]["items"] == 3


def test_mentions_finds_whole_words_case_aside():
    assert nc.mentions("A cat meows.", "cat") and nc.mentions("Kenya is in Africa.", "kenya")
    assert not nc.mentions("Cats meow.", "cat") and not nc.mentions("The capital is Paris.", "Kenya")
    assert nc.mentions("The opposite of up is down.", "up") and not nc.mentions("Upstairs.", "up")


def test_every_fact_kind_has_its_answer_sentence_begun_before_its_answer():
    """answer_sentence_start + the answer begins the reply, for every kind of world fact; completing it
    with the answer is graded right, with another answer of its kind wrong."""
    kinds = {}
    for item in tinyworld.tinyworld_eval_items("fact", n=400):
        kind = item["key"].split(":")[0]
        if kind in tinyworld.ARITHMETIC_KINDS:
            continue
        kinds[kind] = kinds.get(kind, 0) + 1
        start = tinyworld.answer_sentence_start(item)
        assert item["reply"].startswith(f"{start} {item['answer']}") and start == start.strip()
        assert tinyworld.fact_is_correct(f"{start} {item['answer']}.", item)
        other = next(a for a in tinyworld.FACT_ANSWERS[kind] if a.lower() not in item["reply"].lower())
        assert not tinyworld.fact_is_correct(f"{start} {other}.", item)
    assert set(kinds) == set(tinyworld.FACT_KINDS) - set(tinyworld.ARITHMETIC_KINDS)
    assert tinyworld.answer_sentence_start(dict(reply="The capital of Kenya is Nairobi.", answer="Nairobi")) \
        == "The capital of Kenya is"


def test_world_replies_name_their_subject_after_the_words_their_questions_put_before_it():
    """In every wording of every world fact, the word before the subject ("of" in "the country of
    Ghana") is the same in the reply as in the question, case aside, and the subject never opens the
    reply: a look back that matches the word copies the subject in the same tokens. (A reply that
    opened with "Ghana" would need "G" "hana" where the question has " Ghana".)"""
    rng, seen = tinyworld.random.Random(0), set()
    for kind in set(tinyworld.FACT_KINDS) - set(tinyworld.ARITHMETIC_KINDS):
        for _ in range(300):
            fact = tinyworld._fact(rng, kind)[0]
            last = fact["key"].split(":", 1)[1].split()[-1]  # "a banana" -> "banana"

            def word_before(text):
                words = text.lower().replace("?", " ").replace(".", " ").split()
                return words[words.index(last.lower()) - 1] if words.index(last.lower()) else None

            assert word_before(fact["reply"]) == word_before(fact["question"]) is not None, fact
            seen.add((kind, fact["question"].replace(fact["key"].split(":", 1)[1], "{}")))
    assert len({kind for kind, _ in seen}) == 11 and len(seen) >= 29  # every kind in all its 2-4 wordings


def test_completes_fact_grades_each_question_with_its_answer_begun(tok):
    """completes_fact against an oracle: each prompt is the question rendered by hand with the start of
    its answer sentence after it, and each outcome is the grader on that start plus the greedy
    continuation."""
    model = tiny_chat_model(tok)
    results = nc.evaluate_chat(model, tok, nc.Dist(), n=12)
    world = [item for item in tinyworld.tinyworld_eval_items("fact", n=12)
             if item["key"].split(":")[0] not in tinyworld.ARITHMETIC_KINDS]
    for item in world:
        by_hand = nc.render_for_completion(tok, dict(messages=[dict(role="user", content=item["question"])]))
        by_hand += tok.encode_ordinary(tinyworld.answer_sentence_start(item))
        assert nc.answer_begun_prompt(tok, item) == by_hand
        assert tok.decode(by_hand).endswith("<|assistant_start|>" + tinyworld.answer_sentence_start(item))
    continued = nc.greedy_replies(model, tok, world, nc.Dist(), 8, nc.answer_begun_prompt)
    assert [item for item, _ in continued] == world and len({text for _, text in continued}) > 1
    grades = [tinyworld.fact_is_correct(tinyworld.answer_sentence_start(item) + text, item) for item, text in continued]
    assert len(world) > 3 and results["completes_fact"]["outcomes"] == grades


def test_letter_multiple_choice_grades_the_letter_the_reply_ends_with(tok, monkeypatch):
    """The card's letter column against worked replies: the prompt is the question and lettered list
    rendered by hand, and an item is right exactly when its greedy reply ends with its letter."""
    items = tinyworld.tinyworld_eval_items("multiple_choice", n=8)
    def reply(i, item):
        right, wrong = tinyworld.LETTERS[item["answer"]], tinyworld.LETTERS[(item["answer"] + 1) % 4]
        return [tinyworld.multiple_choice_reply(item), tinyworld.multiple_choice_reply(item)[:-2] + wrong + ".",
                item["choices"][item["answer"]], right][i % 4]
    real = nc.greedy_replies
    def greedy_replies(model, tokenizer, asked, ddp, max_tokens=96, prompt=nc.question_prompt):
        if prompt is not nc.multiple_choice_prompt:
            return real(model, tokenizer, asked, ddp, max_tokens, prompt)
        assert asked == items
        for item in asked:
            question = f"{item['question']}\n{tinyworld.lettered_choices(item['choices'])}\nAnswer with the letter."
            assert prompt(tokenizer, item) == nc.render_for_completion(
                tokenizer, dict(messages=[dict(role="user", content=question)]))
        return [(item, reply(i, item)) for i, item in enumerate(asked)]
    monkeypatch.setattr(nc, "greedy_replies", greedy_replies)
    results = nc.evaluate_chat(tiny_chat_model(tok), tok, nc.Dist(), n=8)
    assert results["multiple_choice_letter"]["outcomes"] == [True, False, False, True] * 2
