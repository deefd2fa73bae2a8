"""Adapting the pipeline without editing it: your own conversations for mid/SFT (--data-dir),
your own problems (--problems) and reward (--reward module:function) for RL."""
import json
import random
import types

import pytest

import nanochat_one as nc
import realdata
from conftest import TINY, TINY_TOK, cli_args, run_stage, train_in

SECRET = [dict(messages=[dict(role="user", content=q), dict(role="assistant", content="The secret word is zebra.")])
          for q in ("What is the secret word?", "Tell me the secret word.", "Do you know the secret word?")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """tok -> base -> mid -> sft on tiny settings, in a module-wide artifacts folder. No copy drills: in 20
    steps they would only take a third of the text's tokens, and these tests are about the chat stages."""
    return train_in(tmp_path_factory.mktemp("adapt") / "runs",
                    TINY_TOK,
                    ["--stage", "base", *TINY, "--num-iterations", "20", "--eval-every", "0", "--copy-drills", "0"],
                    ["--stage", "mid", *TINY, "--num-iterations", "20", "--eval-every", "0", "--eval-items", "4",
                     "--copy-drills", "0"],
                    ["--stage", "sft", *TINY, "--num-iterations", "10", "--eval-every", "0", "--eval-items", "4"])


@pytest.fixture
def in_runs(runs, monkeypatch, tmp_path):
    """Work in `runs` from an empty current folder (where --reward finds its module)."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(runs))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def greedy_reply(question):
    tokenizer = nc.get_tokenizer()
    model, _ = nc.load_trained(cli_args("--stage", "chat", "--depth", "2"), nc.Dist(), "sft", tokenizer)
    prompt = nc.render_for_completion(tokenizer, dict(messages=[dict(role="user", content=question)]))
    (reply,), _ = nc.Engine(model.eval(), tokenizer).generate_batch(prompt, 1, 20, temperature=0.0)
    return tokenizer.decode(reply)


def test_own_conversations_replace_every_other_training_example(in_runs):
    folder = in_runs / "mine"
    folder.mkdir()
    write_jsonl(folder / "secret.jsonl", SECRET)
    args = types.SimpleNamespace(data="tinyworld", data_dir=str(folder), replay=0.0)
    train = [c for _, c in zip(range(400), (c for _, c in nc.chat_examples(args, "train", stage="sft")))]
    own = [c for c in train if c in SECRET]
    assert 160 <= len(own) <= 240  # half of 400 by a hash: 200 +- 10 for one standard deviation
    assert {json.dumps(c) for c in own} == {json.dumps(c) for c in SECRET}
    assert not any(c in SECRET for _, c in zip(range(100), (c for _, c in nc.chat_examples(args, "val", stage="sft"))))
    for rank in range(2):  # sharded by position over two ranks, each rank still gets both kinds
        shard = [c for _, (p, c) in zip(range(200), nc.chat_examples(args, "train", stage="sft")) if p % 2 == rank]
        assert 0 < sum(c in SECRET for c in shard) < len(shard)


def test_sft_on_own_conversations_learns_them(in_runs):
    """The same SFT run without and with three conversations of our own: only the second knows
    the secret word, and says it to a question phrased in a way it never saw."""
    folder = in_runs / "mine"
    folder.mkdir()
    write_jsonl(folder / "secret.jsonl", SECRET)
    for own in (False, True):
        run_stage("--stage", "sft", *TINY, "--num-iterations", "30", "--eval-every", "0", "--eval-items", "4", "--lr-scale", "1",
                  *(["--data-dir", str(folder)] if own else []))
        replies = [greedy_reply(q) for q in ("What is the secret word?", "What's the secret word, please?")]
        assert replies == ["The secret word is zebra."] * 2 if own else not any("zebra" in r for r in replies), (own, replies)


@pytest.mark.parametrize("line,needle", [
    ("{not json", "JSONDecodeError"),
    ('{"messages": [{"role": "assistant", "content": "hi"}]}', "alternate"),
    ('{"conversation": []}', "KeyError"),
    ('{"messages": [{"role": "user", "content": 3}]}', "user content must be a string"),
])
def test_a_bad_conversation_line_stops_with_its_file_and_line(in_runs, line, needle):
    folder = in_runs / "bad"
    folder.mkdir()
    (folder / "a.jsonl").write_text(json.dumps(SECRET[0]) + "\n\n" + line + "\n")
    nc.own_conversations.cache_clear()
    with pytest.raises(realdata.DataError, match=f"a.jsonl, line 3: .*{needle}"):
        run_stage("--stage", "sft", *TINY, "--num-iterations", "1", "--eval-every", "0", "--data-dir", str(folder))


def arithmetic_problems(path, n=300):
    rng = random.Random(0)
    return write_jsonl(path, [dict(question=f"What is {a} plus {b}?", answer=a + b)
                              for a, b in ((rng.randrange(1, 50), rng.randrange(1, 50)) for _ in range(n))])


def test_own_problems_split_by_hash(tmp_path):
    train, held_out = realdata.own_problems(arithmetic_problems(tmp_path / "p.jsonl"))
    assert len(train) + len(held_out) == 300 and 10 <= len(held_out) <= 50
    assert not {p["question"] for p in train} & {p["question"] for p in held_out}
    assert all(isinstance(p["answer"], str) for p in train)  # numbers become the strings graders compare
    write_jsonl(tmp_path / "one.jsonl", [dict(question="What is 1 plus 1?", answer="2")])
    with pytest.raises(realdata.DataError, match="at least one of each"):
        realdata.own_problems(tmp_path / "one.jsonl")
    write_jsonl(tmp_path / "bad.jsonl", [dict(question="q")])
    with pytest.raises(realdata.DataError, match="bad.jsonl, line 1: KeyError"):
        realdata.own_problems(tmp_path / "bad.jsonl")


def test_reward_flag_errors(in_runs):
    (in_runs / "my_rewards.py").write_text("def text(question, reply, answer):\n    return 'good'\n")
    with pytest.raises(realdata.DataError, match="ModuleNotFoundError"):
        realdata.load_reward("no_such_module:f")
    with pytest.raises(realdata.DataError, match="AttributeError"):
        realdata.load_reward("my_rewards:missing")
    with pytest.raises(realdata.DataError, match="must return a finite number"):
        realdata.load_reward("my_rewards:text")("q", "reply", "a")
    for argv, needle in ((["--stage", "rl", "--reward", "my_rewards"], "module:function"),
                         (["--stage", "sft", "--reward", "my_rewards:text"], "for --stage rl"),
                         (["--stage", "rl", "--problems", "missing.jsonl"], "not a file")):
        with pytest.raises(nc.UserError, match=needle):
            nc.finalize_args(nc.build_parser().parse_args(argv))


def test_a_custom_reward_changes_what_rl_reinforces(in_runs):
    """The same toy RL run from the same SFT model with two opposite rewards, one preferring short
    replies and one long: the held-out mean reward (here -length/100 or +length/100) rises in
    both, so the replies get shorter in one and longer in the other."""
    arithmetic_problems(in_runs / "problems.jsonl")
    (in_runs / "lengths.py").write_text("def shorter(question, reply, answer):\n    return -len(reply) / 100\n\n\n"
                                        "def longer(question, reply, answer):\n    return len(reply) / 100\n")
    lengths = {}
    for reward in ("shorter", "longer"):
        summary = run_stage("--stage", "rl", *TINY, "--problems", "problems.jsonl", "--reward", f"lengths:{reward}",
                            "--num-iterations", "15", "--prompts-per-step", "8", "--num-samples", "4", "--max-new-tokens", "32",
                            "--pass-k", "2", "--pass-k-problems", "30", "--eval-every", "0", "--lr-scale", "1",
                            "--save-every", "0", "--eval-items", "4")
        first, last = summary["history"][0], summary["history"][-1]
        assert last["pass1"] - first["pass1"] > 3 * (first["pass1_stderr"] ** 2 + last["pass1_stderr"] ** 2) ** 0.5
        lengths[reward] = [100 * abs(h["pass1"]) for h in (first, last)]  # mean reply length in characters
    print(f"\nheld-out mean reply length (characters), before -> after 15 RL steps: preferring short replies "
          f"{lengths['shorter'][0]:.1f} -> {lengths['shorter'][1]:.1f}; preferring long ones {lengths['longer'][0]:.1f} -> "
          f"{lengths['longer'][1]:.1f}")
    assert lengths["shorter"][0] == lengths["longer"][0]  # the same start
    assert lengths["shorter"][1] < lengths["shorter"][0] < lengths["longer"][1]


def reward_module(folder, name, body):
    """Write folder/name.py with one reward `score(question, reply, answer)` that also records its calls."""
    (folder / f"{name}.py").write_text(f"calls = []\n\n\ndef score(question, reply, answer):\n    calls.append(reply)\n"
                                       f"    return {body}\n")


def test_the_reward_reads_the_same_reply_in_training_and_evaluation(in_runs, monkeypatch):
    """Greedy sampling, one problem both to train on and to evaluate, the same batch shape (1 prompt x 2
    samples): the tokens are the same, so the reward must receive the same text in both, and no special
    token. Every group has equal rewards (greedy), so no step changes the model between the two."""
    problem = dict(question="What is 12 plus 7?", answer="19")
    monkeypatch.setattr(nc, "rl_problems", lambda args: ((lambda rng: problem), [problem], 1))
    reward_module(in_runs, "recorder", "0.0")
    run_stage("--stage", "rl", *TINY, "--reward", "recorder:score", "--num-iterations", "2", "--prompts-per-step", "1",
              "--num-samples", "2", "--max-new-tokens", "48", "--temperature", "0", "--pass-k", "2",
              "--pass-k-problems", "1", "--eval-every", "0", "--save-every", "0", "--eval-items", "4")
    import recorder
    evaluation, training = recorder.calls[:2] + recorder.calls[-2:], recorder.calls[2:-2]  # evaluated at start and end
    assert len(training) == 4 and len(set(recorder.calls)) == 1, recorder.calls
    assert "<|" not in recorder.calls[0]


def test_a_reward_on_the_end_of_the_reply_rises_in_training(in_runs):
    """A reward that reads the reply's end (1 for a reply under 20 characters that ends with a full stop)
    rises over 15 steps: the mean training reward of the last 5 is above that of the first 5 by more
    than 3 combined standard errors (each a mean over 5 x 8 x 4 = 160 samples), and above 0.25. (Handed
    the stop token, the reward would pay nothing: a reply cut off at 32 tokens is not that short.)"""
    arithmetic_problems(in_runs / "problems.jsonl")
    reward_module(in_runs, "short_sentence", "float(len(reply) < 20 and reply.endswith('.'))")
    summary = run_stage("--stage", "rl", *TINY, "--problems", "problems.jsonl", "--reward", "short_sentence:score",
                        "--num-iterations", "15", "--prompts-per-step", "8", "--num-samples", "4",
                        "--max-new-tokens", "32", "--pass-k", "2", "--pass-k-problems", "30", "--eval-every", "0",
                        "--lr-scale", "1", "--save-every", "0", "--eval-items", "4")
    first, last = ([c["mean_reward"] for c in summary["reward_curve"][s]] for s in (slice(0, 5), slice(10, 15)))
    p_first, p_last = sum(first) / 5, sum(last) / 5
    stderr = (p_first * (1 - p_first) / 160 + p_last * (1 - p_last) / 160) ** 0.5
    print(f"\ntraining reward (a short reply ending with a full stop), steps 1-5 -> 11-15: {p_first:.3f} -> "
          f"{p_last:.3f} (+- {stderr:.3f})")
    assert p_last - p_first > 3 * stderr and p_last > 0.25


def test_rl_says_when_the_reward_never_varies(in_runs, capsys):
    arithmetic_problems(in_runs / "problems.jsonl")
    reward_module(in_runs, "constant", "1.0")
    run_stage("--stage", "rl", *TINY, "--problems", "problems.jsonl", "--reward", "constant:score",
              "--num-iterations", str(nc.NO_SIGNAL_STEPS), "--prompts-per-step", "2", "--num-samples", "2",
              "--max-new-tokens", "8", "--pass-k", "1", "--pass-k-problems", "2", "--eval-every", "0",
              "--save-every", "0", "--eval-items", "4")
    out = capsys.readouterr().out
    assert f"for {nc.NO_SIGNAL_STEPS} steps in a row every group's rewards were all equal" in out
    assert out.count("  reward 1.000 for the reply") >= 1


def test_rl_resumed_past_its_end_stops_with_one_line(in_runs):
    """A checkpoint at step 3 resumed with --num-iterations 2 would never meet its last step, train with a
    negative learning rate and delete the good checkpoint at its next save."""
    arithmetic_problems(in_runs / "problems.jsonl")
    flags = [*TINY, "--problems", "problems.jsonl", "--prompts-per-step", "2", "--num-samples", "2",
             "--max-new-tokens", "8", "--pass-k", "1", "--pass-k-problems", "2", "--eval-every", "0", "--eval-items", "4"]
    run_stage("--stage", "rl", *flags, "--num-iterations", "3")
    with pytest.raises(nc.UserError, match="past --num-iterations 2"):
        run_stage("--stage", "rl", *flags, "--num-iterations", "2", "--resume")


def test_own_conversations_not_in_utf8_stop_with_their_file_and_line(tmp_path, base_dir):
    """A .jsonl saved as Latin-1 (the é of "café" as the one byte 0xe9) is one line naming the file
    and the line, not a UnicodeDecodeError traceback."""
    run_stage("--stage", "tok", "--vocab-size", "300", "--tok-chars", "5000")
    folder = tmp_path / "mine"
    folder.mkdir()
    cafe = dict(messages=[dict(role="user", content="Where do we meet?"),
                          dict(role="assistant", content="At the café.")])
    lines = [json.dumps(SECRET[0]), json.dumps(cafe, ensure_ascii=False)]
    (folder / "latin1.jsonl").write_bytes("\n".join(lines).encode("latin-1"))
    nc.own_conversations.cache_clear()
    with pytest.raises(realdata.DataError) as info:
        nc.own_conversations(str(folder))
    message = str(info.value)
    assert "latin1.jsonl, line 2:" in message and "UTF-8" in message and "\n" not in message
    (folder / "latin1.jsonl").write_bytes("\n".join(lines).encode("utf-8"))  # saved as UTF-8, it reads
    nc.own_conversations.cache_clear()
    assert nc.own_conversations(str(folder)) == [SECRET[0], cafe]
    nc.own_conversations.cache_clear()


def test_own_problem_with_a_lone_surrogate_stops_with_its_file_and_line(tmp_path):
    r"""JSON can spell half of a UTF-16 pair ("\ud800"), which is no character: the line says so,
    instead of a UnicodeEncodeError traceback when the question is hashed or tokenized."""
    path = arithmetic_problems(tmp_path / "problems.jsonl", n=30)
    with path.open("a") as f:
        f.write('{"question": "What is \\ud800 plus 1?", "answer": "2"}\n')
    with pytest.raises(realdata.DataError) as info:
        realdata.own_problems(path)
    message = str(info.value)
    assert "problems.jsonl, line 31:" in message and "\n" not in message
    message.encode("utf-8")  # the message itself prints: it names the escape, it does not hold the half pair
