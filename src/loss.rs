//! Cross-entropy, fused with its gradient (CONTRACT §4).

use crate::kernels;

/// Cross-entropy over T positions, and its gradient in the same pass.
/// logits [T, V], targets [T] → dlogits [T, V] (overwritten); returns L_ce.
///   lse_t = log Σ_v exp(z_tv)   (max-subtracted)
///   L_ce = (1/T) Σ_t (lse_t − z_{t,y_t})
///   dL/dz_tv = (softmax(z_t)_v − [v = y_t]) / T
pub fn cross_entropy(dlogits: &mut [f32], logits: &[f32], targets: &[u32], vocab: usize) -> f32 {
    let inv_t = 1.0 / targets.len() as f32;
    let rows = dlogits
        .chunks_exact_mut(vocab)
        .zip(logits.chunks_exact(vocab));
    let total: f64 = rows
        .zip(targets)
        .map(|((dz, z), &y)| f64::from(kernels::cross_entropy_row(dz, z, y as usize, inv_t)))
        .sum();
    (total / targets.len() as f64) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_logits_give_log_v_and_a_centred_gradient() {
        let logits = vec![0.5f32; 2 * 4];
        let mut d = vec![0.0; 8];
        let loss = cross_entropy(&mut d, &logits, &[1, 3], 4);
        assert!((loss - 4f32.ln()).abs() < 1e-6);
        assert!((d[1] - (0.25 - 1.0) / 2.0).abs() < 1e-7);
        assert!((d[0] - 0.125).abs() < 1e-7);
        assert!(d.iter().sum::<f32>().abs() < 1e-6);
    }
}
