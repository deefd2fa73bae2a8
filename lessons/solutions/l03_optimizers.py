"""Solutions to lesson 3's "Try it" (checked by lessons/exercises/l03_optimizers.py)."""
import torch

import nanochat_one as nc


def adamw(weight, grads, lr, betas, eps, weight_decay):
    beta1, beta2 = betas
    w = weight.clone()
    m, v = torch.zeros_like(w), torch.zeros_like(w)  # the running means of g and g^2
    for t, g in enumerate(grads, start=1):
        w = w * (1 - lr * weight_decay)  # decoupled weight decay: apart from the gradient
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        m_hat, v_hat = m / (1 - beta1 ** t), v / (1 - beta2 ** t)  # undo the pull towards the zero start
        w = w - lr * m_hat / (v_hat.sqrt() + eps)
    return w


def muon(weight, grads, lr, momentum):
    w, buf = weight.clone(), torch.zeros_like(weight)
    scale = max(1.0, w.size(0) / w.size(1)) ** 0.5  # tall matrices take larger steps
    for g in grads:
        buf = momentum * buf + (1 - momentum) * g
        update = (1 - momentum) * g + momentum * buf  # Nesterov: the gradient one step ahead
        w = w - lr * scale * nc.newton_schulz_orthogonalize(update)
    return w


def adam_with_l2(weight, grads, lr, betas, eps, weight_decay):
    beta1, beta2 = betas
    w = weight.clone()
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        g = g + weight_decay * w  # the decay goes through m and v: Adam with L2, not AdamW
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        w = w - lr * (m / (1 - beta1 ** t)) / ((v / (1 - beta2 ** t)).sqrt() + eps)
    return w


def muon_without_nesterov(weight, grads, lr, momentum):
    w, buf = weight.clone(), torch.zeros_like(weight)
    scale = max(1.0, w.size(0) / w.size(1)) ** 0.5
    for g in grads:
        buf = momentum * buf + (1 - momentum) * g
        w = w - lr * scale * nc.newton_schulz_orthogonalize(buf)  # the buffer itself, no look-ahead
    return w


WRONG = dict(  # a plausible mistake per exercise: each must fail its check
    adamw=adam_with_l2,
    muon=muon_without_nesterov,
)
