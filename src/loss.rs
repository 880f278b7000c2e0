//! Cross-entropy, fused with its gradient (CONTRACT §4).

use crate::kernels;

/// Cross-entropy over T positions, and its gradient in the same pass.
/// logits [T, V], targets [T] → dlogits [T, V] (overwritten), each
/// position's loss into `row_losses` [T]; returns L_ce.
///   lse_t = log Σ_v exp(z_tv)   (max-subtracted)
///   L_ce = (1/T) Σ_t (lse_t − z_{t,y_t})   (summed in f64, in order of t)
///   dL/dz_tv = (softmax(z_t)_v − [v = y_t]) / T
/// The rows run on the intra-op threads; the sum, in position order, does not.
pub fn cross_entropy(
    dlogits: &mut [f32],
    row_losses: &mut [f32],
    logits: &[f32],
    targets: &[u32],
) -> f32 {
    let inv_t = 1.0 / targets.len() as f32;
    kernels::cross_entropy_rows(dlogits, row_losses, logits, targets, inv_t);
    let total: f64 = row_losses.iter().map(|&l| f64::from(l)).sum();
    (total / targets.len() as f64) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_logits_give_log_v_and_a_centred_gradient() {
        let logits = vec![0.5f32; 2 * 4];
        let (mut d, mut rows) = (vec![0.0; 8], vec![0.0; 2]);
        let loss = cross_entropy(&mut d, &mut rows, &logits, &[1, 3]);
        assert!(rows.iter().all(|&l| (l - 4f32.ln()).abs() < 1e-6));
        assert!((loss - 4f32.ln()).abs() < 1e-6);
        assert!((d[1] - (0.25 - 1.0) / 2.0).abs() < 1e-7);
        assert!((d[0] - 0.125).abs() < 1e-7);
        assert!(d.iter().sum::<f32>().abs() < 1e-6);
    }
}
