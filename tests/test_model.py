"""The GPT against naive oracles: a hand-written attention, full forwards for the KV cache."""
import math
import shutil
import types

import pytest
import torch
import torch.nn.functional as F

import nanochat_one as nc


def tiny_model(n_kv_head=4, seed=0, vocab=97, T=32):
    torch.manual_seed(seed)
    config = nc.GPTConfig(sequence_len=T, vocab_size=vocab, n_layer=2, n_head=4, n_kv_head=n_kv_head, n_embd=64)
    model = nc.GPT(config)
    model.init_weights()
    # the zero-initialised projections would hide bugs: give every weight some signal
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return model.eval()


def test_state_dict_names_and_shapes():
    config = nc.GPTConfig(sequence_len=16, vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    sd = nc.GPT(config).state_dict()
    expected = {"transformer.wte.weight": (50, 64)}  # the head is wte (tied)
    for i in range(2):
        expected |= {f"transformer.h.{i}.attn.smear": (2,), f"transformer.h.{i}.attn.c_q.weight": (64, 64), f"transformer.h.{i}.attn.c_k.weight": (32, 64),
                     f"transformer.h.{i}.attn.c_v.weight": (32, 64), f"transformer.h.{i}.attn.c_proj.weight": (64, 64),
                     f"transformer.h.{i}.mlp.c_fc.weight": (256, 64), f"transformer.h.{i}.mlp.c_proj.weight": (64, 256)}
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected


def test_depth_dial():
    c = nc.config_from_depth(20, 65536, 2048)  # nanochat d20: 1280 wide, 10 heads of 128
    assert (c.n_layer, c.n_embd, c.n_head, c.n_kv_head) == (20, 1280, 10, 10)
    c = nc.config_from_depth(3, 100, 64, aspect_ratio=64, head_dim=128)  # 192 rounds up to 256
    assert (c.n_embd, c.n_head) == (256, 2)
    with pytest.raises(nc.UserError):
        nc.config_from_depth(0, 100, 64)
    with pytest.raises(nc.UserError):
        nc.config_from_depth(4, 100, 64, head_dim=32, aspect_ratio=32, n_kv_head=3)


def test_init_blocks_are_the_identity_under_the_tied_head():
    config = nc.GPTConfig(sequence_len=16, vocab_size=50, n_layer=2, n_head=2, n_kv_head=2, n_embd=32)
    model = nc.GPT(config)
    model.init_weights()
    idx = torch.randint(0, 50, (2, 16))
    # zero output projections: every block is the identity, so each position's logits are its own
    # token's normalised embedding read by the tied head, wte . rms(wte[t]) / sqrt(32), softcapped
    wte = model.transformer.wte.weight
    e = wte[idx] / wte[idx].pow(2).mean(-1, keepdim=True).sqrt()
    expected = 15 * torch.tanh(e / e.pow(2).mean(-1, keepdim=True).sqrt() @ wte.T / math.sqrt(32) / 15)
    torch.testing.assert_close(model(idx), expected, rtol=1e-5, atol=1e-5)  # float32 rounding of 32-term dots
    assert all((block.attn.smear == 0).all() for block in model.transformer.h)  # keys start half smeared


def test_each_key_head_starts_as_its_first_query_head():
    config = nc.GPTConfig(sequence_len=16, vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
    model = nc.GPT(config)
    model.init_weights()
    for block in model.transformer.h:
        q, k = block.attn.c_q.weight.view(4, 8, 32), block.attn.c_k.weight.view(2, 8, 32)
        assert torch.equal(k[0], q[0]) and torch.equal(k[1], q[2])  # query heads 0-1 read key head 0, 2-3 key head 1
        assert not torch.equal(q[0], q[1])
    w = model.transformer.h[0].attn.c_q.weight
    assert w.std().item() == pytest.approx(1 / math.sqrt(32), rel=0.15)  # 1024 samples: 2% standard error


def test_logits_shape_and_softcap():
    model = tiny_model()
    idx = torch.randint(0, 97, (3, 10))
    logits = model(idx)
    assert logits.shape == (3, 10, 97) and logits.dtype == torch.float32
    assert logits.abs().max() <= 15
    targets = idx.clone()
    targets[:, :5] = -1  # ignored positions
    expected = F.cross_entropy(logits[:, 5:].reshape(-1, 97), idx[:, 5:].reshape(-1))
    # the same logits; only the order of adding 15 positive losses may differ: <= 15 u = 1e-6 relative
    assert model(idx, targets).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_softcap_cross_entropy_equals_the_plain_ops(reduction):
    """The hand-written loss head against autograd through the plain ops, in float64 (where both
    are exact to ~1e-15 relative) with targets of -1 ignored, values and gradients; then the model's
    loss in every reduction against F.cross_entropy of its softcapped logits."""
    torch.manual_seed(0)
    logits = (torch.randn(40, 50, dtype=torch.float64) * 20).requires_grad_()  # many past the softcap
    targets = torch.randint(0, 50, (40,))
    targets[::6] = -1
    weights = torch.rand(40, dtype=torch.float64)  # a different gradient for every row
    mine = nc.SoftcapCrossEntropy.apply(logits, targets, 15.0)
    plain = F.cross_entropy(15 * torch.tanh(logits / 15), targets, ignore_index=-1, reduction="none")
    torch.testing.assert_close(mine, plain, rtol=1e-12, atol=1e-12)
    (grad_mine,) = torch.autograd.grad((mine * weights).sum(), logits)
    (grad_plain,) = torch.autograd.grad((plain * weights).sum(), logits)
    torch.testing.assert_close(grad_mine, grad_plain, rtol=1e-12, atol=1e-12)
    assert (mine[targets < 0] == 0).all() and (grad_mine[targets < 0] == 0).all()

    model = tiny_model()
    idx = torch.randint(0, 97, (3, 10))
    idx_targets = idx.clone()
    idx_targets[:, :4] = -1
    expected = F.cross_entropy(model(idx).reshape(-1, 97), idx_targets.reshape(-1), ignore_index=-1, reduction=reduction)
    # float32: the two differ in how they round the log-sum-exp over 97 terms, ~1e-7 relative each
    torch.testing.assert_close(model(idx, idx_targets, loss_reduction=reduction), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "clang++")), reason="torch.compile on a CPU needs a C++ compiler")
def test_compiled_loss_and_gradients_equal_eager():
    """torch.compile (which the speedrun's base stage uses on a CPU) through the hand-written loss
    head: the same loss and gradients as eager. Inductor fuses and reorders the float32 sums, so
    they agree to rounding: ~1e-6 relative on the loss, 1e-5 of each gradient's scale."""
    model = tiny_model().train()
    idx = torch.randint(0, 97, (2, 32))
    targets = torch.randint(0, 97, (2, 32))
    targets[:, :3] = -1
    eager_loss = model(idx, targets)
    eager = torch.autograd.grad(eager_loss, list(model.parameters()))
    compiled_loss = torch.compile(model)(idx, targets)
    compiled = torch.autograd.grad(compiled_loss, list(model.parameters()))
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=0)
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e, rtol=0, atol=1e-5 * e.abs().max().item())


def naive_forward(model, idx):
    """Oracle: the same architecture written out with explicit loops over heads and a masked
    softmax, complex-number rotary embeddings and repeat-interleaved GQA."""
    c = model.config
    hd = c.n_embd // c.n_head
    B, T = idx.shape
    rms = lambda x: x / torch.sqrt((x * x).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps)
    pos = torch.arange(T, dtype=torch.float32)
    freqs = 1.0 / 10000 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    rot = torch.polar(torch.ones(T, hd // 2), torch.outer(pos, freqs))  # e^{i theta}

    def rope(x):  # x: (T, hd); pairs are (x[j], x[j + hd/2]); rotate by -theta in this convention
        z = torch.complex(x[:, : hd // 2], x[:, hd // 2:]) * rot.conj()
        return torch.cat([z.real, z.imag], dim=-1)

    x = rms(model.transformer.wte.weight[idx])
    for block in model.transformer.h:
        a = block.attn
        h = rms(x)
        q = (h @ a.c_q.weight.T).view(B, T, c.n_head, hd)
        k = (h @ a.c_k.weight.T).view(B, T, c.n_kv_head, hd)
        v = (h @ a.c_v.weight.T).view(B, T, c.n_kv_head, hd)
        out = torch.zeros(B, T, c.n_head, hd)
        for b in range(B):
            for head in range(c.n_head):
                kv = head // (c.n_head // c.n_kv_head)
                qh, kh = rms(rope(q[b, :, head])), rms(rope(k[b, :, kv]))
                w = torch.sigmoid(a.smear[kv])  # each key mixed with the previous position's key
                kh = torch.stack([(1 - w) * kh[t] + w * (kh[t - 1] if t else 0 * kh[t]) for t in range(T)])
                scores = qh @ kh.T / math.sqrt(hd)
                scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
                out[b, :, head] = torch.softmax(scores, -1) @ v[b, :, kv]
        x = x + out.reshape(B, T, c.n_embd) @ a.c_proj.weight.T
        x = x + torch.relu(rms(x) @ block.mlp.c_fc.weight.T).square() @ block.mlp.c_proj.weight.T
    logits = rms(x) @ model.transformer.wte.weight.T / math.sqrt(c.n_embd)  # tied head
    return 15 * torch.tanh(logits / 15)


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_matches_naive_attention(n_kv_head):
    model = tiny_model(n_kv_head)
    idx = torch.randint(0, 97, (2, 12))
    # float32 rounding only: either forward is ~1e-6 from the exact logits (|logit| < 2, dot products of
    # <= 256 terms, ~sqrt(256) u = 1e-6 relative each); a rotary base 2% off already moves them by 2e-4
    torch.testing.assert_close(model(idx), naive_forward(model, idx), atol=1e-5, rtol=1e-5)


def test_causality():
    model = tiny_model()
    idx = torch.randint(0, 97, (1, 20))
    changed = idx.clone()
    changed[0, 12:] = (changed[0, 12:] + 1) % 97
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_kv_cache_decoding_equals_full_forward(n_kv_head):
    model = tiny_model(n_kv_head)
    B, T = 2, 20
    idx = torch.randint(0, 97, (B, T))
    full = model(idx)
    c = model.config
    cache = nc.KVCache(B, c.n_kv_head, c.n_embd // c.n_head, T, c.n_layer, "cpu", torch.float32)
    pieces = [model(idx[:, :7], kv_cache=cache)]  # a prefill of 7 tokens
    pieces.append(model(idx[:, 7:10], kv_cache=cache))  # a chunk of 3 after a cached prefix
    for t in range(10, T):  # then one token at a time
        pieces.append(model(idx[:, t:t + 1], kv_cache=cache))
    assert cache.pos == T
    # matmuls of other shapes round differently: ~1e-6 apart (as in test_matches_naive_attention)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_left_padded_prompts_decode_as_if_alone():
    """Rows of different lengths padded on the left (KVCache.valid) give each row the logits it
    gets alone, at every prompt position and every decoded step (oracle: the full forward of the
    unpadded row). Rotary scores depend on distances only, so the shift changes only rounding."""
    model = tiny_model(2)
    c = model.config
    rows = [torch.randint(0, 97, (n,)).tolist() for n in (12, 5, 9)]
    width, steps = 12, 6
    valid = torch.ones(len(rows), width + steps, dtype=torch.bool)
    for i, row in enumerate(rows):
        valid[i, :width - len(row)] = False
    cache = nc.KVCache(len(rows), c.n_kv_head, c.n_embd // c.n_head, width + steps, c.n_layer, "cpu", torch.float32, valid)
    prefill = model(torch.tensor([[0] * (width - len(r)) + r for r in rows]), kv_cache=cache)
    new = torch.randint(0, 97, (len(rows), steps))
    decoded = [model(new[:, t:t + 1], kv_cache=cache) for t in range(steps)]
    for i, row in enumerate(rows):
        alone = model(torch.tensor([row + new[i].tolist()]))[0]
        got = torch.cat([prefill[i, width - len(row):]] + [d[i] for d in decoded])
        # as in test_kv_cache_decoding_equals_full_forward: other shapes and positions round ~1e-6 apart
        torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-5)


def test_engine_batches_prompts_of_different_lengths():
    """Greedy answers to several prompts in one padded batch equal each prompt's answer alone."""
    tok = type("Tok", (), {"special_tokens": {n: 200 + i for i, n in enumerate(
        ["<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>", "<|assistant_end|>", "<|bos|>"])}})()  # out of the vocabulary: never sampled
    engine = nc.Engine(tiny_model(2), tok)
    prompts = [torch.randint(0, 90, (n,)).tolist() for n in (3, 11, 7)]
    together = engine.generate_batch(prompts, 2, max_tokens=8, temperature=0.0)[0]
    alone = [engine.generate_batch(p, 1, max_tokens=8, temperature=0.0)[0][0] for p in prompts]
    assert together == [a for a in alone for _ in range(2)]


def test_a_batch_without_targets_has_zero_loss_and_gradient():
    """SFT crops long conversations: a micro-batch may keep no assistant token at all. Its mean loss
    is 0 (not 0/0 = NaN, which would poison every weight) and so is its gradient."""
    model = tiny_model()
    loss = model(torch.randint(0, 97, (2, 8)), torch.full((2, 8), -1))
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_evaluation_in_slices_of_rows_equals_one_pass(monkeypatch):
    """token_losses keeps evaluation's (rows, T, vocab) tensors under EVAL_LOGITS numbers by
    running a few rows at a time; each row's losses do not depend on the others, so they are the
    one-pass losses up to float32 rounding of the differently blocked matmuls (~1e-6 of a few nats)."""
    model = tiny_model()
    x, y = torch.randint(0, 97, (5, 16)), torch.randint(0, 97, (5, 16))
    with torch.no_grad():
        whole = model(x, y, loss_reduction="none")
        monkeypatch.setattr(nc, "EVAL_LOGITS", 2 * 16 * 97)  # two rows a slice: 2 + 2 + 1
        sliced = nc.token_losses(model, x, y)
    assert sliced.shape == whole.shape == (80,)
    torch.testing.assert_close(sliced, whole, rtol=1e-5, atol=1e-5)


def test_estimate_flops_by_hand():
    config = nc.GPTConfig(sequence_len=32, vocab_size=100, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    model = nc.GPT(config)
    per_layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 2 * 64 * 256  # q, k+v (GQA), proj, mlp
    matmul_params = 2 * per_layer + 100 * 64  # + wte as the tied head (its lookup is free)
    assert model.estimate_flops() == 6 * matmul_params + 12 * 2 * 4 * 16 * 32


def test_bf16_autocast_path_runs_on_cpu(monkeypatch):
    monkeypatch.setattr(nc, "COMPUTE_DTYPE", torch.bfloat16)
    monkeypatch.setattr(nc, "DEVICE_TYPE", "cpu")
    model = tiny_model()
    idx = torch.randint(0, 97, (2, 8))
    logits = model(idx)
    assert logits.dtype == torch.float32  # softcap and loss in fp32
    assert model.transformer.wte.weight.dtype == torch.float32  # master weights stay fp32
    # bf16 keeps 8 significant bits: logits in [1, 2) come out of the head in steps of 2^-7 = 0.008,
    # and the bf16 forward lands within ~2 such steps of the fp32 one; 0.05 allows 6
    torch.testing.assert_close(logits, naive_forward(model, idx), atol=0.05, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kv_cache_on_gpu(monkeypatch):
    # the suite's stages run on the CPU (conftest); here the precision a GPU run uses
    monkeypatch.setattr(nc, "DEVICE_TYPE", "cuda")
    if torch.cuda.get_device_capability()[0] >= 8:
        monkeypatch.setattr(nc, "COMPUTE_DTYPE", torch.bfloat16)
    model = tiny_model().cuda()
    idx = torch.randint(0, 97, (1, 16), device="cuda")
    c = model.config
    cache = nc.KVCache(1, c.n_kv_head, c.n_embd // c.n_head, 16, c.n_layer, "cuda", nc.COMPUTE_DTYPE)
    steps = [model(idx[:, :8], kv_cache=cache)] + [model(idx[:, t:t + 1], kv_cache=cache) for t in range(8, 16)]
    # in bf16 (COMPUTE_DTYPE on recent GPUs) logits in [1, 2) move in steps of 2^-7 = 0.008 and the two
    # paths differ by 1-2 of them (measured through the CPU's bf16 autocast); 5e-2 allows 6 or more
    torch.testing.assert_close(torch.cat(steps, 1), model(idx), atol=5e-2, rtol=5e-2)


class LookBack(torch.nn.Module):
    """An oracle for induction_score: uniform logits, except that from position `lag` on it puts logit
    `boost` on the token `lag` positions back (a perfect copier of a sequence repeated after `lag`)."""

    def __init__(self, vocab, lag, boost):
        super().__init__()
        self.config = nc.GPTConfig(sequence_len=256, vocab_size=vocab, n_layer=1, n_head=1, n_kv_head=1, n_embd=8)
        self.register_buffer("cos", torch.zeros(1))
        self.lag, self.boost = lag, boost

    def forward(self, idx, targets, loss_reduction="mean"):
        logits = torch.zeros(*idx.shape, self.config.vocab_size)
        for t in range(self.lag, idx.size(1)):  # position t predicts t + 1, which repeats t + 1 - lag
            logits[torch.arange(idx.size(0)), t, idx[:, t + 1 - self.lag]] = self.boost
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction=loss_reduction)


@pytest.mark.parametrize("boost", [0.0, 12.0])
def test_induction_score_by_hand(boost):
    vocab = 4096
    tokenizer = types.SimpleNamespace(special_tokens={s: vocab - len(nc.SPECIAL_TOKENS) + i
                                                      for i, s in enumerate(nc.SPECIAL_TOKENS)},
                                      decode=lambda ids: "word")
    first, second, ratio = nc.induction_score(LookBack(vocab, 50, boost), tokenizer, length=50)
    assert first == pytest.approx(math.log(vocab), rel=1e-6)  # nothing predicts the first copy
    p = math.exp(boost) / (math.exp(boost) + vocab - 1)  # the copied token's probability in the second
    # float32: the softmax's sum of 4096 terms carries up to 4096 x 2^-24 of relative error, 2.5e-4 of a loss
    # of 12, absolute; the second copy's loss is that small difference (0.025 at a boost of 12)
    assert second == pytest.approx(-math.log(p), abs=4096 * 2 ** -24 * 12) and ratio == pytest.approx(second / first)
    assert (ratio == pytest.approx(1.0)) == (boost == 0.0)


def test_induction_score_ids_are_merged_tokens_below_the_special_ones():
    """With a vocabulary of 512 (256 bytes, 247 merges, 9 specials) the ids are merges: 300..502, less
    those that write a number (here the odd ones, decoded as digits)."""
    seen = []
    model = LookBack(512, 10, 0.0)
    forward = model.forward
    model.forward = lambda idx, targets, **kw: (seen.append(idx), forward(idx, targets, **kw))[1]
    tokenizer = types.SimpleNamespace(special_tokens={s: 503 + i for i, s in enumerate(nc.SPECIAL_TOKENS)},
                                      decode=lambda ids: str(ids[0]) if ids[0] % 2 else " word")
    nc.induction_score(model, tokenizer, length=10)
    ids = seen[0]
    assert (ids[:, 0] == 503).all() and ids[:, 1:].min() >= 300 and ids[:, 1:].max() < 503
    assert (ids[:, 1:] % 2 == 0).all()
    assert torch.equal(ids[:, 1:10], ids[:, 11:20])  # the model reads all but the last token
