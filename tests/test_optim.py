"""Muon against an SVD, the AdamW groups against torch.optim.AdamW, and the schedules."""
import types

import pytest
import torch

import nanochat_one as nc
from conftest import tiny_gpt


@pytest.mark.parametrize("shape", [(64, 64), (32, 96), (96, 32)])
def test_newton_schulz_approximates_polar_factor(shape):
    torch.manual_seed(0)
    G = torch.randn(shape)
    X = nc.newton_schulz_orthogonalize(G)
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    assert torch.linalg.svdvals(X).max() < 1.25  # 5 steps of the quintic map [0, 1] into [0, 1.203]
    # each of G's singular directions keeps its vectors; its value is pushed towards 1 (not
    # exactly 1), except directions too weak for 5 iterations (a square Gaussian has some)
    s_new = torch.diagonal(U.T @ X @ Vh.T)
    strong = S / G.norm() > 0.01
    assert strong.float().mean() > 0.9
    assert s_new[strong].min() > 0.6 and s_new.min() >= 0
    # same singular vectors as U V^T: X ~= U diag(s') V^T with s' ~ 1
    polar = U @ Vh
    cosine = (X * polar).sum() / (X.norm() * polar.norm())
    assert cosine > 0.95  # a random matrix would give ~0
    inner = U.T @ X @ Vh.T  # diagonal in G's singular basis
    off = inner - torch.diag(torch.diagonal(inner))
    # X is a polynomial in G: off-diagonal entries are 0 but for float32 rounding, ~1e-6 per step,
    # which the later steps can grow at most 141-fold (the largest slope of 4 steps of the quintic
    # on [0, 1.21]), so ~1.5e-4 at most; an iteration that is not a polynomial in G leaves 0.07 or more
    assert off.abs().max() < 1e-3


def test_compiled_newton_schulz_gives_the_eager_result():
    """On a GPU Muon runs a torch.compile'd Newton-Schulz; Inductor compiles it for a CPU too. A
    batch of matrices of one shape, as Muon stacks them: the compiled result is the eager one up
    to float32 rounding (~1e-6 a step, grown at most 141-fold by the later steps, as above)."""
    torch.manual_seed(0)
    G = torch.randn(3, 48, 96)
    compiled = torch.compile(nc.newton_schulz_orthogonalize)(G)
    assert compiled.shape == G.shape
    assert (compiled - nc.newton_schulz_orthogonalize(G)).abs().max() < 2e-4


def test_muon_step_by_hand():
    # Gradients in quarters and momentum 3/4 keep every momentum sum exact in float32, so Muon's lerp
    # and the formula below give Newton-Schulz the same input bit for bit. (With momentum 0.9 they
    # differ in the last bit, and the iteration can grow an input difference up to 485-fold, the
    # largest slope of 5 steps of its quintic on [0, 1].) What is left is rounding the final
    # subtraction, about an ulp of |p| < 4 per step, far below the default atol of 1e-5.
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8, 4))
    start = p.detach().clone()
    opt = nc.Muon([p], lr=0.1, momentum=0.75)
    grads = [torch.randint(-8, 9, (8, 4)) / 4, torch.randint(-8, 9, (8, 4)) / 4]
    buf = torch.zeros(8, 4)
    expected = start.clone()
    for g in grads:
        p.grad = g.clone()
        opt.step()
        buf = 0.75 * buf + 0.25 * g
        update = 0.25 * g + 0.75 * buf  # Nesterov
        expected -= 0.1 * (8 / 4) ** 0.5 * nc.newton_schulz_orthogonalize(update)
    torch.testing.assert_close(p.detach(), expected)


def test_optimizer_groups_match_torch_adamw():
    model = tiny_gpt(20, sequence_len=8)
    reference = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    adamw, muon = nc.setup_optimizers(model)
    scale = (32 / 768) ** -0.5
    assert [g["lr"] for g in adamw.param_groups] == pytest.approx([0.05 * scale, 0.05])
    muon_params = {id(p) for g in muon.param_groups for p in g["params"]}
    smear = "transformer.h.0.attn.smear"
    assert muon_params == {id(p) for n, p in model.named_parameters() if n.startswith("transformer.h.") and n != smear}
    assert all(p.ndim == 2 for p in muon.param_groups[0]["params"])
    oracle = torch.optim.AdamW([dict(params=[reference["transformer.wte.weight"]], lr=0.05 * scale),
                                dict(params=[reference[smear]], lr=0.05)],
                               betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0)
    for _ in range(3):
        idx = torch.randint(0, 20, (2, 8))
        for m in (model,):
            m.zero_grad()
            m(idx, idx).backward()
        oracle.zero_grad()
        reference["transformer.wte.weight"].grad = model.transformer.wte.weight.grad.clone()
        reference[smear].grad = dict(model.named_parameters())[smear].grad.clone()
        adamw.step()
        oracle.step()
        # Without CUDA both run torch's single-tensor AdamW and agree bit for bit. Where CUDA is the
        # device, setup_optimizers picks the fused kernel (for these CPU tensors too), which rounds
        # differently: a few ulps (5e-7 each for weights up to ~6) per step, not amplified since both
        # get the same gradients; the default tolerance (1e-5 + 1.3e-6 |w|) covers 3 steps.
        for name in ("transformer.wte.weight", smear):
            torch.testing.assert_close(dict(model.named_parameters())[name].detach(), reference[name].detach())


def test_lr_schedule():
    f = nc.lr_multiplier
    assert [f(s, 10, warmup_ratio=0.2) for s in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert f(7, 10, warmdown_ratio=0.5) == pytest.approx(0.6)  # (10 - 7) / 5
    assert f(9, 10, warmdown_ratio=0.5, final_lr_frac=0.1) == pytest.approx(0.2 + 0.8 * 0.1)
    assert nc.muon_momentum(0) == pytest.approx(0.85)
    assert nc.muon_momentum(150) == pytest.approx(0.90)
    assert nc.muon_momentum(1000) == pytest.approx(0.95)
    config = nc.GPTConfig(sequence_len=8, vocab_size=20, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    opts = nc.setup_optimizers(nc.GPT(config))
    args = types.SimpleNamespace(warmup_ratio=0.0, warmdown_ratio=0.5, final_lr_frac=0.0)
    nc.apply_schedules(opts, 7, 10, args)
    assert opts[1].param_groups[0]["lr"] == pytest.approx(0.02 * 0.6)
    assert opts[1].param_groups[0]["momentum"] == pytest.approx(nc.muon_momentum(7))
