"""AdamW with PyTorch semantics, global-norm clipping, the warm-up + cosine
schedule (CONTRACT §6) and the training step that ties them together."""

import math
from dataclasses import dataclass

import numpy as np

from .errors import NonFiniteError


def learning_rate(train, t):
    """lr at step t (1-based): t ≤ warmup: lr·t/warmup; after it
    progress = min(1, (t − warmup)/(total − warmup)),  lr_t = min_lr + ½(lr − min_lr)(1 + cos(π·progress)),
    min_lr = min_lr_ratio·lr."""
    lr, warmup, total = train.lr, train.warmup_steps, train.total_steps
    if t <= warmup:
        return lr * t / warmup
    progress = min(1.0, (t - warmup) / (total - warmup)) if total > warmup else 1.0
    min_lr = train.min_lr_ratio * lr
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def global_norm(grads):
    """sqrt(Σ g²) over every gradient, accumulated in float64."""
    return math.sqrt(sum(float(np.dot(g.ravel().astype(np.float64), g.ravel())) for g in grads.values()))


def clip_scale(norm, clip):
    """c/(norm + 1e-6) when norm > c > 0, else 1: what clipping multiplies every gradient by."""
    return clip / (norm + 1e-6) if clip > 0 and norm > clip else 1.0


class AdamW:
    """First and second moments per parameter: zero at the start, or a resumed run's (m, v)."""

    def __init__(self, params, moments=None):
        if moments is None:
            moments = tuple({n: np.zeros_like(p) for n, p in params.items()} for _ in "mv")
        self.m, self.v = moments

    def update(self, params, grads, scale, lr, t, train):
        """One step t (1-based), in place, on gradients multiplied by `scale`:
        g ← s·g;  m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g²;
        p ← p − lr·wd·p (2-D weights only);  p ← p − lr·(m/(1−β1ᵗ)) / (sqrt(v/(1−β2ᵗ)) + eps)."""
        b1, b2 = train.beta1, train.beta2
        inv_bias1, inv_bias2 = 1.0 / (1.0 - b1**t), 1.0 / (1.0 - b2**t)
        for name, p in params.items():
            g = grads[name] * np.float32(scale)
            m, v = self.m[name], self.v[name]
            m *= np.float32(b1)
            m += np.float32(1 - b1) * g
            v *= np.float32(b2)
            v += np.float32(1 - b2) * g * g
            if p.ndim == 2:
                p -= np.float32(lr * train.weight_decay) * p
            p -= np.float32(lr) * (m * np.float32(inv_bias1)) / (np.sqrt(v * np.float32(inv_bias2)) + np.float32(train.eps))


@dataclass
class StepStats:
    """What one training step reports: the pre-update loss parts, the norm before clipping, lr."""

    loss: float
    ce: float
    aux: float
    grad_norm: float
    lr: float


class Trainer:
    """A model, its optimizer, its settings and the number of steps taken
    (`moments` (m, v) continue a saved run, else they start at zero)."""

    def __init__(self, model, train, step=0, moments=None):
        self.model, self.train, self.step = model, train, step
        self.optimizer = AdamW(model.params, moments)

    def train_step(self, batch):
        """forward → loss → backward → clip → AdamW. A non-finite loss or gradient
        raises NonFiniteError and leaves weights, moments and step untouched."""
        t = self.step + 1
        losses, grads, _, _ = self.model.loss_and_grads(batch, self.train.aux_loss_alpha)
        return self.apply(losses, grads, t)

    def apply(self, losses, grads, t):
        """Clips `grads` and takes AdamW step t."""
        norm = global_norm(grads)
        if not (math.isfinite(float(losses.total)) and math.isfinite(norm)):
            raise NonFiniteError(f"non-finite loss or gradient at step {t}: step refused")
        lr = learning_rate(self.train, t)
        self.optimizer.update(self.model.params, grads, clip_scale(norm, self.train.grad_clip), lr, t, self.train)
        self.step = t
        return StepStats(float(losses.total), float(losses.ce), float(losses.aux), norm, lr)
