"""The engine: the calculator tool loop, seeded sampling, the scores it returns, and sample_next's
draws against their softmax probabilities."""
import math

import pytest
import torch

import nanochat_one as nc
from conftest import tiny_chat_model


class ScriptedModel(torch.nn.Module):
    """A stand-in model that strongly prefers a scripted next token depending on how many tokens
    it has seen; used to drive the engine's tool state machine deterministically."""

    def __init__(self, vocab_size, script):
        super().__init__()
        self.config = nc.GPTConfig(sequence_len=64, vocab_size=vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=8)
        self.register_buffer("cos", torch.zeros(1))
        self.script, self.fed = script, []

    def forward(self, idx, kv_cache=None):
        self.fed.append(idx[0].tolist())
        B, T = idx.shape
        logits = torch.zeros(B, T, self.config.vocab_size)
        target = self.script[min(len(self.fed) - 1, len(self.script) - 1)]
        logits[:, -1, target] = 100.0
        kv_cache.pos += T
        return logits


def test_engine_tool_loop_forces_output(tok):
    s = tok.special_tokens
    script = [s["<|python_start|>"], *tok.encode_ordinary("6*7"), s["<|python_end|>"],
              # while the engine forces the output these scripted choices are ignored:
              *[tok.encode_ordinary("x")[0]] * 4, *tok.encode_ordinary(" done"), s["<|assistant_end|>"]]
    model = ScriptedModel(tok.vocab_size, script)
    engine = nc.Engine(model, tok)
    (tokens,), (sampled,) = engine.generate_batch([s["<|bos|>"]], 1, max_tokens=30, temperature=1.0)
    forced = [s["<|output_start|>"], *tok.encode_ordinary("42"), s["<|output_end|>"]]
    i = tokens.index(s["<|output_start|>"])
    assert tokens[i:i + len(forced)] == forced
    assert sampled[i:i + len(forced)] == [0] * len(forced)  # forced tokens are marked as not sampled
    assert all(sampled[:i]) and all(sampled[i + len(forced):])
    assert tok.decode(tokens).startswith("<|python_start|>6*7<|python_end|><|output_start|>42<|output_end|>")


def test_engine_seeded_determinism_and_independent_first_tokens(tok):
    model = tiny_chat_model(tok)
    engine = nc.Engine(model, tok)
    prompt = [tok.special_tokens["<|bos|>"]]
    a = engine.generate_batch(prompt, 8, max_tokens=6, temperature=1.0, seed=3)
    b = engine.generate_batch(prompt, 8, max_tokens=6, temperature=1.0, seed=3)
    c = engine.generate_batch(prompt, 8, max_tokens=6, temperature=1.0, seed=4)
    assert a == b and a != c
    first_tokens = [row[0] for row in a[0] if row]
    assert len(set(first_tokens)) > 4  # rows draw their first token independently
    greedy = engine.generate_batch(prompt, 3, max_tokens=6, temperature=0.0)[0]
    assert greedy[0] == greedy[1] == greedy[2]


def test_engine_scores_are_the_models_log_softmax_and_change_no_token(tok):
    """Asked for scores, the engine samples the same tokens (same seed), and each score is the log_softmax of
    the logits of one full forward pass over prompt + reply at that token's position (the oracle: no cache)."""
    model = tiny_chat_model(tok)
    engine = nc.Engine(model, tok)
    prompt = [tok.special_tokens["<|bos|>"], *tok.encode_ordinary("hi")]
    plain = engine.generate_batch(prompt, 3, max_tokens=8, temperature=0.9, top_k=20, seed=5)
    tokens, masks, scores = engine.generate_batch(prompt, 3, max_tokens=8, temperature=0.9, top_k=20, seed=5,
                                                  top_logprobs=5)
    assert (tokens, masks) == plain
    for reply, reply_scores in zip(tokens, scores):
        assert len(reply_scores) == len(reply) > 0
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([prompt + reply]))[0].float(), dim=-1)  # (T, vocab)
        for i, (token, (logprob, alternatives)) in enumerate(zip(reply, reply_scores)):
            expected = logprobs[len(prompt) - 1 + i]
            assert abs(logprob - expected[token].item()) < 1e-4
            assert [t for t, _ in alternatives] == expected.topk(5).indices.tolist()
            assert all(abs(lp - expected[t].item()) < 1e-4 for t, lp in alternatives)


# zero-probability tokens first, inside and last in a row: the edges of the inverse CDF
SAMPLING_LOGITS = torch.tensor([[-math.inf, 1.5, 0.2, 0.9, -2.0, 0.0],
                                [1.0, 0.0, -math.inf, 2.0, 0.5, -1.0],
                                [0.4, 3.0, 0.1, 0.2, 0.0, -math.inf]])


def softmax_by_hand(row, temperature, top_k=None):
    """The oracle: exp(logit / temperature) over the top_k largest logits (these rows have no ties), normalised."""
    kept = sorted(row, reverse=True)[:top_k or len(row)]
    weights = [math.exp(x / temperature) if x >= kept[-1] else 0.0 for x in row]
    return [w / sum(weights) for w in weights]


@pytest.mark.parametrize("temperature,top_k", [(1.0, None), (0.7, 3)])
def test_sample_next_draws_each_token_with_its_softmax_probability(temperature, top_k):
    n = 20_000
    draws = nc.sample_next(SAMPLING_LOGITS.repeat(n, 1), torch.Generator().manual_seed(0), temperature, top_k)
    again = nc.sample_next(SAMPLING_LOGITS.repeat(n, 1), torch.Generator().manual_seed(0), temperature, top_k)
    assert torch.equal(draws, again)  # a seeded generator decides every draw
    for r, row in enumerate(SAMPLING_LOGITS.tolist()):
        counts = torch.bincount(draws.view(n, 3)[:, r], minlength=6).tolist()
        for count, p in zip(counts, softmax_by_hand(row, temperature, top_k)):
            if p == 0:  # a -inf logit, or outside the top_k
                assert count == 0
            else:  # a binomial count: 5 standard errors of the frequency, sqrt(p(1-p)/n) (false alarm ~6e-7 each)
                assert abs(count / n - p) < 5 * math.sqrt(p * (1 - p) / n), (r, counts, p)


@pytest.mark.parametrize("u", [0.0, 1 - 2 ** -24])  # the smallest and largest values torch.rand gives in float32
def test_sample_next_at_the_ends_of_the_uniform_draw(monkeypatch, u):
    """Inverse CDF at its extremes: never a zero-probability token, first or last, nor one outside the top_k."""
    monkeypatch.setattr(torch, "rand", lambda *size, generator=None, device=None: torch.full(size, u))
    for top_k in (None, 3):
        picked = nc.sample_next(SAMPLING_LOGITS, torch.Generator(), 1.0, top_k).tolist()
        for row, token in zip(SAMPLING_LOGITS.tolist(), picked):
            probability = softmax_by_hand(row, 1.0, top_k)
            assert probability[token] > 0
            nonzero = [i for i, q in enumerate(probability) if q > 0]
            assert token == (nonzero[0] if u == 0 else nonzero[-1])


def test_sample_next_greedy_is_the_argmax():
    for top_k in (None, 1, 3):
        greedy = nc.sample_next(SAMPLING_LOGITS, torch.Generator().manual_seed(0), 0.0, top_k)
        assert greedy.tolist() == [max(range(6), key=row.__getitem__) for row in SAMPLING_LOGITS.tolist()] == [1, 3, 1]
    # top_k=1 at any temperature is the argmax too
    assert nc.sample_next(SAMPLING_LOGITS.repeat(100, 1), torch.Generator().manual_seed(0), 1.0, 1).tolist() == [1, 3, 1] * 100


class FixedModel(torch.nn.Module):
    """A stand-in model whose next-token distribution is the same at every step: each token's logit is
    `logits`, whatever it reads, so every row writes its stop token with the same chance each step."""

    def __init__(self, vocab_size, logits):
        super().__init__()
        self.config = nc.GPTConfig(sequence_len=64, vocab_size=vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=8)
        self.register_buffer("cos", torch.zeros(1))
        self.logits = logits

    def forward(self, idx, kv_cache=None):
        return self.logits.expand(idx.size(0), idx.size(1), -1)


def test_a_finished_row_yields_minus_one_and_no_score_until_all_are_done(tok):
    """Rows stop at different steps (a stop token drawn with probability 1/4 a step); from the step after
    its stop token a row's token is -1 and its score None, while the batch sheds finished rows."""
    s = tok.special_tokens
    logits = torch.zeros(tok.vocab_size)
    logits[s["<|assistant_end|>"]] = math.log(0.25 / 0.75 * (tok.vocab_size - 1))  # softmax: 1/4 on the stop token
    engine = nc.Engine(FixedModel(tok.vocab_size, logits), tok)
    steps = list(engine.generate([s["<|bos|>"]], num_samples=16, max_tokens=40, temperature=1.0, seed=0,
                                 top_logprobs=2))
    stopped_at = [next(i for i, (tokens, _, _) in enumerate(steps) if tokens[row] == s["<|assistant_end|>"])
                  for row in range(16)]
    assert len(set(stopped_at)) > 3  # the rows finish at different steps
    assert len(steps) == max(stopped_at) + 1  # generation ends with the last row's stop token
    for i, (tokens, _, scores) in enumerate(steps):
        for row in range(16):
            finished = i > stopped_at[row]
            assert (tokens[row] == -1) == finished and (scores[row] is None) == finished, (i, row)
    replies, _ = engine.generate_batch([s["<|bos|>"]], 16, 40, temperature=1.0, seed=0)
    assert [len(reply) for reply in replies] == stopped_at  # the same rows, cut before their stop token
