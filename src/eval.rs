//! Held-out evaluation over a whole token stream: strided windows, each
//! token scored once, reported as nats/token, perplexity and bits per byte.

use serde::Serialize;

use crate::error::{MoeError, Result};
use crate::model::Model;

/// The figures of one evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct EvalReport {
    /// Tokens scored (every token but the first).
    pub tokens: usize,
    /// Bytes those tokens decode to.
    pub bytes: usize,
    /// Windows run through the model.
    pub windows: usize,
    /// Mean cross-entropy, nats/token: L = (1/N) Σ_j −log p(x_j | x_<j).
    pub loss: f64,
    /// exp(L).
    pub perplexity: f64,
    /// Σ_j −log₂ p(x_j | x_<j) / bytes.
    pub bits_per_byte: f64,
}

/// Window starts for `n` tokens: windows of `seq` inputs, `stride` apart,
/// until one reaches the last target. Window w covers inputs
/// [begin, end) and predicts targets begin+1 ..= end.
pub fn window_starts(n: usize, seq: usize, stride: usize) -> Vec<usize> {
    let last_target = n.saturating_sub(1);
    let mut starts = vec![0];
    let mut begin = 0;
    while begin + seq < last_target {
        begin += stride;
        starts.push(begin);
    }
    starts
}

/// Scores every token of `tokens` after the first, once: each window of at
/// most `seq` tokens (`stride` ≤ `seq` apart) scores only the targets no
/// earlier window scored, so with stride < seq every scored token sees at
/// least seq − stride tokens of context. `bytes_of(id)` gives a token's byte
/// length; `progress(done, total)` is called after each window.
pub fn evaluate(
    model: &mut Model,
    tokens: &[u32],
    seq: usize,
    stride: usize,
    bytes_of: impl Fn(u32) -> usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<EvalReport> {
    if tokens.len() < 2 {
        return Err(MoeError::DataTooSmall {
            what: "evaluation text",
            tokens: tokens.len(),
            needed: 2,
        });
    }
    if seq == 0 || stride == 0 || stride > seq {
        return Err(MoeError::InvalidConfig(format!(
            "--seq {seq} and --stride {stride} must satisfy 0 < stride ≤ seq"
        )));
    }
    let vocab = model.config().vocab_size;
    let starts = window_starts(tokens.len(), seq, stride);
    let (mut nats, mut scored, mut bytes, mut done_until) = (0.0f64, 0, 0, 0);
    for (w, &begin) in starts.iter().enumerate() {
        let end = (begin + seq).min(tokens.len() - 1);
        let logits = model.forward(&tokens[begin..end], 1)?;
        for (p, row) in logits.chunks_exact(vocab).enumerate() {
            let j = begin + p + 1;
            if j > done_until {
                nats += nll(row, tokens[j] as usize);
                bytes += bytes_of(tokens[j]);
                scored += 1;
            }
        }
        done_until = end;
        progress(w + 1, starts.len());
    }
    let loss = nats / scored as f64;
    Ok(EvalReport {
        tokens: scored,
        bytes,
        windows: starts.len(),
        loss,
        perplexity: loss.exp(),
        bits_per_byte: nats / std::f64::consts::LN_2 / bytes.max(1) as f64,
    })
}

/// −log softmax(z)_y = log Σ_v exp(z_v − m) + m − z_y, with m = max_v z_v (in f64).
fn nll(z: &[f32], y: usize) -> f64 {
    let m = z.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = z.iter().map(|&v| (v as f64 - m).exp()).sum();
    sum.ln() + m - z[y] as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;

    #[test]
    fn windows_cover_every_target_once() {
        assert_eq!(window_starts(10, 4, 4), vec![0, 4, 8]);
        assert_eq!(window_starts(10, 4, 2), vec![0, 2, 4, 6]);
        assert_eq!(window_starts(3, 8, 8), vec![0]);
    }

    #[test]
    fn one_window_equals_the_training_cross_entropy() {
        let mut model = Model::new(ModelConfig::tiny(), 3).unwrap();
        let tokens: Vec<u32> = (0..33).map(|i| (i * 37 % 1000) as u32).collect();
        let report = evaluate(&mut model, &tokens, 32, 32, |_| 2, |_, _| {}).unwrap();
        let batch = crate::Batch::new(tokens[..32].to_vec(), tokens[1..].to_vec(), 1).unwrap();
        let ce = model.losses(&batch, 0.0).unwrap().ce as f64;
        assert_eq!((report.tokens, report.bytes, report.windows), (32, 64, 1));
        assert!((report.loss - ce).abs() < 1e-5, "{} vs {ce}", report.loss);
        assert!((report.bits_per_byte - ce / 2.0 / std::f64::consts::LN_2).abs() < 1e-5);
        let strided = evaluate(&mut model, &tokens, 8, 4, |_| 2, |_, _| {}).unwrap();
        assert_eq!(strided.tokens, 32);
        assert_ne!(strided.loss, report.loss, "less context, another loss");
    }
}
