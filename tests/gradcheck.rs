//! Finite-difference check of the hand-written backward, for every parameter tensor.
//!
//! Metric: for a sampled entry with analytic gradient a and central difference
//! n = (L(p+ε) − L(p−ε)) / 2ε, the relative error is
//!   |a − n| / max(|a|, |n|, floor),  floor = 100·q,  q = ulp(L) / 2ε.
//! Why these numbers: the model is f32, so L is known to about one ulp
//! (≈ 1e-6 at L ≈ 8) and n only to q ≈ 5e-5 for ε = 1e-2; below the floor a
//! difference is rounding, not a wrong formula. Truncation error of the central
//! difference is O(ε²) ≈ 1e-4 relative. A tolerance of 2e-2 sits well above
//! both, and far below what a wrong term produces (errors of order 1).
//! Entries whose perturbation changes any top-k routing choice are skipped (the
//! loss is not differentiable across a routing change) and retried with a
//! smaller ε, then replaced by another entry.

pub mod common;

use common::{Lcg, gqa_config, random_batch};
use rosetta_moe::{Batch, Model, ModelConfig};

const TOLERANCE: f64 = 2e-2;

fn all_routes(model: &Model) -> Vec<u32> {
    (0..model.config().n_layers)
        .flat_map(|l| model.routes(l).unwrap().to_vec())
        .collect()
}

/// Total loss with parameter `idx` shifted by `delta`, or None when routing changes.
fn shifted_loss(
    model: &mut Model,
    batch: &Batch,
    alpha: f32,
    idx: usize,
    delta: f32,
    routes: &[u32],
) -> Option<f64> {
    let orig = model.params()[idx];
    model.params_mut()[idx] = orig + delta;
    let loss = model.losses(batch, alpha).unwrap().total();
    let same = all_routes(model) == routes;
    model.params_mut()[idx] = orig;
    same.then_some(f64::from(loss))
}

/// Checks `per_tensor` sampled entries (the largest |gradient| first, then random
/// ones) of every tensor; returns the worst relative error per tensor.
fn check(model: &mut Model, batch: &Batch, alpha: f32, seed: u64) -> Vec<(String, f64)> {
    let mut grads = vec![0.0; model.params().len()];
    let base = model
        .loss_and_grads(batch, alpha, &mut grads)
        .unwrap()
        .0
        .total();
    let routes = all_routes(model);
    let ulp = f64::from(f32::from_bits(base.to_bits() + 1) - base);
    let mut rng = Lcg(seed);
    let layout = model.layout().clone();
    let mut report = Vec::new();
    for spec in &layout.tensors {
        let g = &grads[spec.range.clone()];
        let largest = (0..g.len())
            .max_by(|&i, &j| g[i].abs().total_cmp(&g[j].abs()))
            .unwrap();
        let mut candidates = vec![largest];
        candidates.extend((0..40).map(|_| rng.below(g.len())));
        let (mut checked, mut worst) = (0, 0.0f64);
        for i in candidates {
            if checked == 4 {
                break;
            }
            let idx = spec.range.start + i;
            for eps in [1e-2f32, 1e-3] {
                let plus = shifted_loss(model, batch, alpha, idx, eps, &routes);
                let minus = shifted_loss(model, batch, alpha, idx, -eps, &routes);
                let (Some(plus), Some(minus)) = (plus, minus) else {
                    continue;
                };
                let numeric = (plus - minus) / (2.0 * f64::from(eps));
                let analytic = f64::from(grads[idx]);
                let floor = 100.0 * ulp / (2.0 * f64::from(eps));
                let err = (analytic - numeric).abs() / analytic.abs().max(numeric.abs()).max(floor);
                assert!(
                    err <= TOLERANCE,
                    "{}[{i}]: analytic {analytic:e}, numeric {numeric:e}, relative error {err:e}",
                    spec.name
                );
                worst = worst.max(err);
                checked += 1;
                break;
            }
        }
        assert!(
            checked >= 2,
            "{}: too few entries kept their routing",
            spec.name
        );
        report.push((spec.name.clone(), worst));
    }
    report
}

#[test]
fn every_tensor_of_tiny_matches_finite_differences() {
    let config = ModelConfig::tiny();
    let mut model = Model::new(config.clone(), 3).unwrap();
    let batch = random_batch(&config, 2, 6, 11);
    let report = check(&mut model, &batch, 0.01, 5);
    assert_eq!(report.len(), model.layout().tensors.len());
}

#[test]
fn every_tensor_of_a_gqa_ntk_config_matches_finite_differences_with_a_strong_aux_loss() {
    // α = 0.5 makes the load-balancing term a large part of the router's gradient.
    let config = gqa_config();
    let mut model = Model::new(config.clone(), 7).unwrap();
    let batch = random_batch(&config, 3, 5, 1);
    check(&mut model, &batch, 0.5, 9);
}

#[test]
fn the_aux_loss_reaches_the_router_and_only_the_router_directly() {
    let config = gqa_config();
    let batch = random_batch(&config, 2, 5, 4);
    let mut model = Model::new(config.clone(), 7).unwrap();
    let n = model.params().len();
    let (mut without, mut with) = (vec![0.0; n], vec![0.0; n]);
    model.loss_and_grads(&batch, 0.0, &mut without).unwrap();
    model.loss_and_grads(&batch, 1.0, &mut with).unwrap();
    let layout = model.layout().clone();
    let router = layout
        .find("layers.1.moe.router.weight")
        .unwrap()
        .range
        .clone();
    let diff: f32 = router.clone().map(|i| (with[i] - without[i]).abs()).sum();
    assert!(
        diff > 1e-3,
        "aux loss changed the router gradient by only {diff}"
    );
    // The forward does not depend on α, so the gradients of what lies after
    // the last router (its experts, the final norm, the LM head) are unchanged.
    for name in [
        "layers.1.moe.experts.0.down_proj.weight",
        "final_norm.weight",
        "lm_head.weight",
    ] {
        let range = layout.find(name).unwrap().range.clone();
        assert_eq!(with[range.clone()], without[range], "{name}");
    }
}
