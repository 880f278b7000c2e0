"""Turning logits into tokens (CONTRACT §7): greedy, temperature, top-k, top-p,
and KV-cached generation."""

import math
from dataclasses import dataclass

import numpy as np

from .attention import KvCache
from .errors import InputError


@dataclass(frozen=True)
class Greedy:
    """The most likely token (ties to the lowest id)."""

    t: float = 0.0


@dataclass(frozen=True)
class Temperature:
    """Sample from softmax(logits / t); t ≤ 0 is greedy."""

    t: float


@dataclass(frozen=True)
class TopK:
    """Sample among the k largest logits (k = 0 or k ≥ V: no filter)."""

    k: int
    t: float


@dataclass(frozen=True)
class TopP:
    """Sample among the most likely tokens until their cumulative probability first
    reaches p (the crossing token kept; at least one)."""

    p: float
    t: float


def validate(strategy, vocab):
    """t finite and ≥ 0; p ∈ (0, 1]; 0 ≤ k ≤ V."""
    if not (math.isfinite(strategy.t) and strategy.t >= 0):
        raise InputError(f"temperature t = {strategy.t} must be finite and ≥ 0")
    if isinstance(strategy, TopK) and not 0 <= strategy.k <= vocab:
        raise InputError(f"top-k k = {strategy.k} must be in [0, vocab_size = {vocab}]")
    if isinstance(strategy, TopP) and not 0 < strategy.p <= 1:
        raise InputError(f"top-p p = {strategy.p} is outside (0, 1]")


def pick_token(logits, strategy, rng):
    """The next token id for logits [V] under `strategy`, drawing u ~ U[0, 1) from `rng`."""
    logits = np.asarray(logits, np.float32)
    if logits.size == 0:
        raise InputError("empty logits")
    validate(strategy, logits.size)
    if strategy.t <= 0:
        return int(np.argmax(logits))  # the first maximum: ties to the lowest id
    # Candidates by descending logit, ties to the lower id; p_i ∝ exp((z_i − z_max)/t) in float64.
    order = np.argsort(-logits, kind="stable")
    if isinstance(strategy, TopK) and strategy.k > 0:
        order = order[:strategy.k]
    z = logits[order].astype(np.float64)
    probs = np.exp((z - z[0]) / strategy.t)
    probs /= probs.sum()
    if isinstance(strategy, TopP):
        keep = int(np.searchsorted(np.cumsum(probs), strategy.p)) + 1
        probs = probs[:min(keep, len(probs))]
        probs /= probs.sum()
    u = rng.random()
    i = int(np.searchsorted(np.cumsum(probs), u, side="right"))
    return int(order[min(i, len(probs) - 1)])


def generate(model, prompt, max_len, strategy, seed):
    """prompt + new tokens up to `max_len` in total. Same seed → same tokens.

    The model sees the last max_seq_len tokens (CONTRACT §7): a longer prompt is cut
    from the left and `max_len` may exceed max_seq_len. Until the cache is full each
    new token costs one cached position; after it, each new token re-prefills the
    last max_seq_len tokens into the emptied cache (one window-long forward per token).
    """
    c = model.config
    if len(prompt) == 0:
        raise InputError("empty prompt")
    validate(strategy, c.vocab_size)
    if max_len < len(prompt):
        raise InputError(f"max_len {max_len} is shorter than the prompt ({len(prompt)})")
    tokens = [int(t) for t in prompt]
    if max_len == len(tokens):
        return tokens
    window = c.max_seq_len
    cache = KvCache(c, 1, min(max_len, window))
    rng = np.random.default_rng(seed)
    logits = model.forward(np.asarray([tokens[-window:]]), cache)
    while True:
        tokens.append(pick_token(logits[0, -1], strategy, rng))
        if len(tokens) == max_len:
            return tokens
        if cache.length < cache.capacity:
            logits = model.forward(np.asarray([tokens[-1:]]), cache)
        else:  # the cache is full: slide the window
            cache.length = 0
            logits = model.forward(np.asarray([tokens[-window:]]), cache)


def generate_greedy(model, prompt, max_len):
    return generate(model, prompt, max_len, Greedy(), 0)


def generate_sample(model, prompt, max_len, t, seed):
    return generate(model, prompt, max_len, Temperature(t), seed)


def generate_topk(model, prompt, max_len, k, t, seed):
    return generate(model, prompt, max_len, TopK(k, t), seed)


def generate_topp(model, prompt, max_len, p, t, seed):
    return generate(model, prompt, max_len, TopP(p, t), seed)
