//! Turning logits into tokens (CONTRACT §7): greedy, temperature, top-k and
//! top-p sampling, and generation with a KV cache.

use std::ops::ControlFlow;

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::attention::KvCache;
use crate::error::{MoeError, Result};
use crate::memory;
use crate::model::Model;

/// How the next token is chosen from the logits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SamplingStrategy {
    /// The most likely token (ties to the lowest id).
    Greedy,
    /// Sample from softmax(logits / t); t ≤ 0 is greedy.
    Temperature {
        /// Temperature t ≥ 0.
        t: f32,
    },
    /// Sample among the k largest logits (k = 0 or k ≥ V: no filter).
    TopK {
        /// How many candidates to keep, ≤ V.
        k: usize,
        /// Temperature t ≥ 0.
        t: f32,
    },
    /// Sample among the most likely tokens whose cumulative probability
    /// first reaches p (the crossing token is kept; at least one token).
    TopP {
        /// Cumulative probability p ∈ (0, 1].
        p: f32,
        /// Temperature t ≥ 0.
        t: f32,
    },
}

impl SamplingStrategy {
    /// Checks the parameters for a vocabulary of `vocab` tokens:
    /// t ≥ 0 (and finite), p ∈ (0, 1], k ≤ V.
    pub fn validate(&self, vocab: usize) -> Result<()> {
        let t = match *self {
            SamplingStrategy::Greedy => return Ok(()),
            SamplingStrategy::Temperature { t } => t,
            SamplingStrategy::TopK { k, t } => {
                if k > vocab {
                    return Err(MoeError::InvalidSampling(format!(
                        "top-k k = {k} exceeds vocab_size {vocab}"
                    )));
                }
                t
            }
            SamplingStrategy::TopP { p, t } => {
                if !(p > 0.0 && p <= 1.0) {
                    return Err(MoeError::InvalidSampling(format!(
                        "top-p p = {p} is outside (0, 1]"
                    )));
                }
                t
            }
        };
        if !(t >= 0.0 && t.is_finite()) {
            return Err(MoeError::InvalidSampling(format!(
                "temperature t = {t} must be finite and ≥ 0"
            )));
        }
        Ok(())
    }

    fn temperature(&self) -> f32 {
        match *self {
            SamplingStrategy::Greedy => 0.0,
            SamplingStrategy::Temperature { t }
            | SamplingStrategy::TopK { t, .. }
            | SamplingStrategy::TopP { t, .. } => t,
        }
    }
}

/// The next token for `logits` [V] under `strategy`, drawing from `rng`.
pub fn pick_token(logits: &[f32], strategy: SamplingStrategy, rng: &mut ChaCha8Rng) -> Result<u32> {
    if logits.is_empty() {
        return Err(MoeError::EmptyInput("logits"));
    }
    strategy.validate(logits.len())?;
    if !logits.iter().all(|z| z.is_finite()) {
        return Err(MoeError::NonFiniteValue { what: "logits" });
    }
    let t = strategy.temperature();
    if t <= 0.0 {
        return Ok(argmax(logits));
    }
    // Candidates in descending logit order (ties: lower id first).
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    order.sort_by(|&a, &b| {
        logits[b as usize]
            .total_cmp(&logits[a as usize])
            .then(a.cmp(&b))
    });
    // Top-k: keep the k largest logits.
    if let SamplingStrategy::TopK { k, .. } = strategy
        && k > 0
    {
        order.truncate(k);
    }
    // p_i = exp((z_i − z_max)/t) / Σ_j exp((z_j − z_max)/t), in f64.
    let max = logits[order[0] as usize];
    let mut probs: Vec<f64> = order
        .iter()
        .map(|&i| f64::from((logits[i as usize] - max) / t).exp())
        .collect();
    let sum: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= sum);
    // Top-p: keep the shortest prefix with Σ p_i ≥ p, then p_i ← p_i / Σ_kept p.
    if let SamplingStrategy::TopP { p, .. } = strategy {
        let mut cumulative = 0.0;
        let keep = probs
            .iter()
            .position(|&q| {
                cumulative += q;
                cumulative >= f64::from(p)
            })
            .map_or(probs.len(), |i| i + 1);
        probs.truncate(keep);
        let kept: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= kept);
    }
    // Inverse CDF: the first token whose cumulative probability exceeds u ~ U[0, 1).
    let u: f64 = rng.random();
    let mut cumulative = 0.0;
    for (i, q) in probs.iter().enumerate() {
        cumulative += q;
        if u < cumulative {
            return Ok(order[i]);
        }
    }
    Ok(order[probs.len() - 1])
}

/// Index of the largest value (ties to the lowest index).
fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u32
}

/// `prompt` followed by new tokens up to `max_len` tokens in total; same
/// seed → same tokens. `on_token` sees each new token as it is chosen and
/// ends generation early by returning `ControlFlow::Break` (the token it was
/// given is kept).
///
/// The context is the last `max_seq_len` tokens (a longer prompt is cut from
/// the left), so `max_len` may exceed `max_seq_len`. While the sequence fits,
/// each new token costs one position of a KV cache. Once the cache holds
/// `max_seq_len` positions, the window slides: the cache is emptied and the
/// last `max_seq_len` tokens are prefilled again, so every later token costs a
/// forward over a whole window (O(max_seq_len) tokens instead of one).
/// Shifting the cache instead would not be exact: the cached keys and values
/// of layers above the first were computed with the tokens that left the
/// window, and their RoPE positions would no longer start at 0.
pub fn generate_streaming(
    model: &mut Model,
    prompt: &[u32],
    max_len: usize,
    strategy: SamplingStrategy,
    seed: u64,
    mut on_token: impl FnMut(u32) -> ControlFlow<()>,
) -> Result<Vec<u32>> {
    let config = model.config();
    let window = config.max_seq_len;
    if prompt.is_empty() {
        return Err(MoeError::EmptyInput("prompt"));
    }
    strategy.validate(config.vocab_size)?;
    if max_len < prompt.len() {
        return Err(MoeError::shape(
            "max_len (total length)",
            format!("≥ prompt length {}", prompt.len()),
            max_len,
        ));
    }
    memory::ensure_fits(
        || format!("a sequence of {max_len} tokens"),
        (max_len as u64).checked_mul(std::mem::size_of::<u32>() as u64),
        " (ask for fewer new tokens)",
    )?;
    if let Some(position) = prompt.iter().position(|&t| t as usize >= config.vocab_size) {
        return Err(MoeError::TokenOutOfRange {
            what: "token",
            id: prompt[position],
            position,
            vocab_size: config.vocab_size,
        });
    }
    let mut tokens = prompt.to_vec();
    if max_len == prompt.len() {
        return Ok(tokens);
    }
    let mut cache = KvCache::new(config, max_len);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut logits = model.forward_cached(last_window(prompt, window), &mut cache)?;
    loop {
        let next = pick_token(logits, strategy, &mut rng)?;
        tokens.push(next);
        if on_token(next).is_break() || tokens.len() == max_len {
            return Ok(tokens);
        }
        logits = if cache.len() < cache.capacity() {
            model.forward_cached(&[next], &mut cache)?
        } else {
            // The cache is full: slide the window (see the doc comment).
            cache.clear();
            model.forward_cached(last_window(&tokens, window), &mut cache)?
        };
    }
}

/// The last `window` tokens of `tokens` (all of them when shorter).
fn last_window(tokens: &[u32], window: usize) -> &[u32] {
    &tokens[tokens.len().saturating_sub(window)..]
}

/// [`generate_streaming`] without a callback (CONTRACT §7's `generate`).
pub fn generate(
    model: &mut Model,
    prompt: &[u32],
    max_len: usize,
    strategy: SamplingStrategy,
    seed: u64,
) -> Result<Vec<u32>> {
    generate_streaming(model, prompt, max_len, strategy, seed, |_| {
        ControlFlow::Continue(())
    })
}

/// Greedy decoding.
pub fn generate_greedy(model: &mut Model, prompt: &[u32], max_len: usize) -> Result<Vec<u32>> {
    generate(model, prompt, max_len, SamplingStrategy::Greedy, 0)
}

/// Sampling at temperature `t`.
pub fn generate_sample(
    model: &mut Model,
    prompt: &[u32],
    max_len: usize,
    t: f32,
    seed: u64,
) -> Result<Vec<u32>> {
    generate(
        model,
        prompt,
        max_len,
        SamplingStrategy::Temperature { t },
        seed,
    )
}

/// Top-k sampling at temperature `t`.
pub fn generate_topk(
    model: &mut Model,
    prompt: &[u32],
    max_len: usize,
    k: usize,
    t: f32,
    seed: u64,
) -> Result<Vec<u32>> {
    generate(
        model,
        prompt,
        max_len,
        SamplingStrategy::TopK { k, t },
        seed,
    )
}

/// Top-p (nucleus) sampling at temperature `t`.
pub fn generate_topp(
    model: &mut Model,
    prompt: &[u32],
    max_len: usize,
    p: f32,
    t: f32,
    seed: u64,
) -> Result<Vec<u32>> {
    generate(
        model,
        prompt,
        max_len,
        SamplingStrategy::TopP { p, t },
        seed,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng() -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(1)
    }

    #[test]
    fn greedy_takes_the_lowest_id_among_ties_and_t_zero_is_greedy() {
        let logits = [0.5, 2.0, 2.0, -1.0];
        assert_eq!(
            pick_token(&logits, SamplingStrategy::Greedy, &mut rng()).unwrap(),
            1
        );
        assert_eq!(
            pick_token(
                &logits,
                SamplingStrategy::Temperature { t: 0.0 },
                &mut rng()
            )
            .unwrap(),
            1
        );
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy() {
        let logits = [0.1, 0.3, 3.0, 0.2];
        for seed in 0..20 {
            let mut r = ChaCha8Rng::seed_from_u64(seed);
            assert_eq!(
                pick_token(&logits, SamplingStrategy::TopK { k: 1, t: 1.0 }, &mut r).unwrap(),
                2
            );
            assert_eq!(
                pick_token(&logits, SamplingStrategy::TopP { p: 1e-6, t: 1.0 }, &mut r).unwrap(),
                2
            );
        }
    }

    #[test]
    fn top_p_keeps_the_crossing_token() {
        // probabilities ≈ [0.6, 0.3, 0.1] at t = 1; p = 0.7 keeps {0, 1}.
        let logits = [0.6f32.ln(), 0.3f32.ln(), 0.1f32.ln()];
        let mut r = rng();
        let picks: Vec<u32> = (0..300)
            .map(|_| {
                pick_token(&logits, SamplingStrategy::TopP { p: 0.7, t: 1.0 }, &mut r).unwrap()
            })
            .collect();
        assert!(picks.contains(&0) && picks.contains(&1) && !picks.contains(&2));
    }

    #[test]
    fn temperature_sampling_follows_the_distribution() {
        let logits = [0.0, 1.0f32.ln() + 0.0, 2.0f32.ln()]; // p ∝ 1, 1, 2
        let mut r = rng();
        let mut counts = [0usize; 3];
        for _ in 0..8000 {
            counts[pick_token(&logits, SamplingStrategy::Temperature { t: 1.0 }, &mut r).unwrap()
                as usize] += 1;
        }
        let share = counts[2] as f64 / 8000.0;
        assert!((share - 0.5).abs() < 0.03, "{counts:?}");
    }

    #[test]
    fn out_of_range_parameters_are_typed_errors() {
        let logits = [0.0; 4];
        for bad in [
            SamplingStrategy::Temperature { t: -0.1 },
            SamplingStrategy::Temperature { t: f32::NAN },
            SamplingStrategy::TopK { k: 5, t: 1.0 },
            SamplingStrategy::TopP { p: 0.0, t: 1.0 },
            SamplingStrategy::TopP { p: 1.5, t: 1.0 },
        ] {
            assert!(
                matches!(
                    pick_token(&logits, bad, &mut rng()),
                    Err(MoeError::InvalidSampling(_))
                ),
                "{bad:?}"
            );
        }
        assert!(matches!(
            pick_token(&[], SamplingStrategy::Greedy, &mut rng()),
            Err(MoeError::EmptyInput(_))
        ));
    }
}
