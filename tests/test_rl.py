"""RL: GRPO advantages, masks and loss against hand computations; one step moves the policy."""
import math

import pytest
import torch
import torch.nn.functional as F

import bpe
import nanochat_one as nc
from conftest import tiny_gpt


@pytest.fixture(scope="module")
def tok():
    return bpe.Tokenizer.train(["the cat sat on the mat " * 20], 300, special_tokens=nc.SPECIAL_TOKENS)


def test_grpo_sequences_by_hand(tok):
    prompt = [10, 11, 12]
    answers = [[20, 21, 22], [30, 31]]
    sampled = [[1, 0, 1], [1, 1]]  # token 21 was forced in by the calculator
    rows = nc.grpo_sequences(prompt, answers, sampled, rewards=[1.0, 0.0])
    assert rows == [
        ([10, 11, 12, 20, 21], [-1, -1, 20, -1, 22], 0.5),  # inputs, targets (prompt and forced ignored), advantage
        ([10, 11, 12, 30], [-1, -1, 30, 31], -0.5),
    ]


def test_zero_signal_groups_are_skipped(tok):
    assert nc.grpo_sequences([1], [[2], [3]], [[1], [1]], [1.0, 1.0]) == []
    assert nc.grpo_sequences([1], [[2], [3]], [[1], [1]], [0.0, 0.0]) == []


def tiny_policy(vocab, seed=0):
    model = tiny_gpt(vocab, sequence_len=16, seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def sequence_logp(model, prompt, answer):
    ids = torch.tensor([prompt + answer])
    logp = F.log_softmax(model(ids[:, :-1]), dim=-1)[0]
    return sum(logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(answer))


def test_grpo_loss_matches_hand_computation(tok):
    model = tiny_policy(tok.vocab_size)
    prompt, answers = [1, 2, 3], [[4, 5, 6], [7, 8]]
    rows = nc.grpo_sequences(prompt, answers, [[1, 1, 1], [1, 1]], [1.0, 0.0])
    loss = nc.grpo_loss(model, rows, num_sampled_tokens=5, device="cpu", pad_id=0)
    expected = -(0.5 * sequence_logp(model, prompt, answers[0]) - 0.5 * sequence_logp(model, prompt, answers[1])) / 5
    # one padded batch against one sequence at a time: matmuls of other shapes, so each log-prob
    # (~ -6, logits < 1 from 32-term dot products) differs by <~1e-6 and the loss (0.65) by <~1e-6 relative
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_one_step_raises_logp_of_rewarded_answer(tok):
    model = tiny_policy(tok.vocab_size, seed=1)
    prompt, good, bad = [1, 2, 3], [40, 41, 42], [50, 51, 52]
    before = sequence_logp(model, prompt, good), sequence_logp(model, prompt, bad)
    optimizers = nc.setup_optimizers(model, matrix_lr=0.01, embedding_lr=0.05)
    rows = nc.grpo_sequences(prompt, [good, bad], [[1] * 3, [1] * 3], [1.0, 0.0])
    nc.grpo_loss(model, rows, 6, "cpu", 0).backward()
    for opt in optimizers:
        opt.step()
    after = sequence_logp(model, prompt, good), sequence_logp(model, prompt, bad)
    assert after[0] > before[0] + 0.01
    assert after[1] < before[1] - 0.01


def test_pass_at_k_by_hand(tok, monkeypatch):
    # a stand-in engine answers problem i correctly in a known number of its k = 4 samples
    correct_counts = {"q0": 4, "q1": 2, "q2": 0, "q3": 1}

    class ScriptedEngine:
        def __init__(self, model, tokenizer):
            pass

        def generate_batch(self, prompts, k, max_tokens, temperature, seed=0):  # rows: k per prompt, in order
            rows = []
            for prompt in prompts:
                n = correct_counts[tok.decode(prompt).split("<|user_start|>")[1].split("<|user_end|>")[0]]
                rows += [tok.encode_ordinary("#### 7")] * n + [tok.encode_ordinary("#### 8")] * (k - n)
            return rows, None

    monkeypatch.setattr(nc, "Engine", ScriptedEngine)
    problems = [dict(question=q, answer=7) for q in correct_counts]
    stats, rewards = nc.pass_at_k(None, tok, problems, nc.Dist(), k=4, max_tokens=8, temperature=1.0)
    pass1, stderr, passk = stats["pass1"], stats["pass1_stderr"], stats["passk"]
    assert [sum(r) for r in rewards] == list(correct_counts.values())  # each problem's rewards, in problem order
    fractions = [1.0, 0.5, 0.0, 0.25]
    mean = sum(fractions) / 4
    assert pass1 == pytest.approx(mean)
    assert stderr == pytest.approx(math.sqrt(sum((f - mean) ** 2 for f in fractions) / 4 / 3))
    assert passk == pytest.approx(3 / 4)
    assert stats["passk_stderr"] == pytest.approx(math.sqrt((3 * (1 / 4) ** 2 + (3 / 4) ** 2) / 3 / 4))
