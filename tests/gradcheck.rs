//! Finite-difference check of the hand-written backward, for every parameter tensor.
//!
//! Metric: for a sampled entry with analytic gradient a and central difference
//! n(ε) = (L(p+ε) − L(p−ε)) / 2ε, the relative error is
//!   |a − n| / max(|a|, |n|, floor),  floor = 100·q,  q = ulp(L) / 2ε,
//! with ulp(L) the f32 spacing at the loss (4.8e-7 at L ≈ 7.7).
//! Why these numbers: the forward is f32, so L carries rounding of order one
//! ulp; a difference of two losses carries a few, and n a few q. Below the
//! floor a difference is rounding, not a wrong formula: an error of 2e-2 of
//! the floor is 2 q, about 2 ulps of L in L(p+ε) − L(p−ε).
//! Two measures keep n well inside that: L_ce is recomputed in f64 from the
//! f32 logits (the library's f32 loss adds two more roundings of up to half an
//! ulp each, L_ce's and L_ce + L_aux's), and ε starts at 2e-2 (q = 1.2e-5).
//! With the f32 loss and ε = 1e-2 the scalar kernels failed on an entry of
//! |a| = 1.19e-3 whose loss difference is only 52 ulps: n was off by 2.2 q.
//! Truncation error of the central difference is O(ε²). Each estimate n(ε)
//! is used only when it agrees with n(ε/2) to the tolerance (converged:
//! neither rounding, which doubles as ε halves, nor truncation, which
//! quarters, dominates it); otherwise the next smaller ε is tried. The worst
//! error measured over every checked entry is 8e-3, on the scalar kernels and
//! the AVX-512 ones alike, so a tolerance of 2e-2 sits above rounding and
//! truncation, and below what a wrong term produces: dropping SwiGLU's
//! 1 + g·(1 − σ(g)) factor from the backward fails both checks, at 2.3e-2 and
//! 1.2e-1, already at the embedding (the first tensor checked).
//! Entries whose perturbation changes any top-k routing choice are skipped (the
//! loss is not differentiable across a routing change) and retried with a
//! smaller ε, then replaced by another entry.

pub mod common;

use common::{Lcg, gqa_config, random_batch};
use rosetta_moe::dropout::Dropout;
use rosetta_moe::{Batch, Model, ModelConfig};

const TOLERANCE: f64 = 2e-2;

fn all_routes(model: &Model) -> Vec<u32> {
    (0..model.config().n_layers)
        .flat_map(|l| model.routes(l).unwrap().to_vec())
        .collect()
}

/// L_ce of the last forward recomputed in f64 from its f32 logits (the
/// max-subtracted log-sum-exp of CONTRACT §4), so that the loss carries no
/// f32 rounding of its own beyond that of the logits.
fn cross_entropy_f64(model: &Model, batch: &Batch) -> f64 {
    let vocab = model.config().vocab_size;
    let rows = model.logits().chunks_exact(vocab).zip(&batch.targets);
    let total: f64 = rows
        .map(|(z, &y)| {
            let max = f64::from(z.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)));
            let sum: f64 = z.iter().map(|&v| (f64::from(v) - max).exp()).sum();
            max + sum.ln() - f64::from(z[y as usize])
        })
        .sum();
    total / batch.targets.len() as f64
}

/// Total loss (L_ce in f64, plus the aux loss) with parameter `idx` shifted
/// by `delta`, or None when routing changes.
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
    let dropout = model.dropout();
    let aux = model
        .losses_with_dropout(batch, alpha, dropout)
        .unwrap()
        .aux;
    let loss = cross_entropy_f64(model, batch) + f64::from(aux);
    let same = all_routes(model) == routes;
    model.params_mut()[idx] = orig;
    same.then_some(loss)
}

/// The central difference (L(p+ε) − L(p−ε)) / 2ε, over the step actually
/// taken in f32; None when either side changes routing.
fn central_difference(
    model: &mut Model,
    batch: &Batch,
    alpha: f32,
    idx: usize,
    eps: f32,
    routes: &[u32],
) -> Option<f64> {
    let p = model.params()[idx];
    let plus = shifted_loss(model, batch, alpha, idx, eps, routes)?;
    let minus = shifted_loss(model, batch, alpha, idx, -eps, routes)?;
    Some((plus - minus) / (f64::from(p + eps) - f64::from(p - eps)))
}

/// |a − b| / max(|a|, |b|, floor).
fn relative_error(a: f64, b: f64, floor: f64) -> f64 {
    (a - b).abs() / a.abs().max(b.abs()).max(floor)
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
            // The largest ε whose estimate agrees with the one at ε/2: a
            // converged numeric derivative, not one dominated by rounding
            // (which doubles as ε halves) or by truncation (which quarters).
            for eps in [2e-2f32, 5e-3, 1.25e-3] {
                let coarse = central_difference(model, batch, alpha, idx, eps, &routes);
                let fine = central_difference(model, batch, alpha, idx, eps / 2.0, &routes);
                let (Some(coarse), Some(fine)) = (coarse, fine) else {
                    continue;
                };
                let floor = |step: f32| 100.0 * ulp / (2.0 * f64::from(step));
                if relative_error(coarse, fine, floor(eps / 2.0)) > TOLERANCE {
                    continue;
                }
                let analytic = f64::from(grads[idx]);
                let err = relative_error(analytic, coarse, floor(eps));
                assert!(
                    err <= TOLERANCE,
                    "{}[{i}]: analytic {analytic:e}, numeric {coarse:e} (ε {eps:e}; {fine:e} at ε/2), \
                     relative error {err:e}",
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
fn every_tensor_of_tiny_matches_finite_differences_with_dropout() {
    // The masks are fixed by (seed, step), so the loss is a smooth function
    // of the weights and its derivative is the masked backward's.
    let config = ModelConfig::tiny();
    let mut model = Model::new(config.clone(), 3).unwrap();
    let batch = random_batch(&config, 2, 6, 11);
    let dropout = Dropout {
        p: 0.3,
        seed: 5,
        step: 2,
    };
    model.set_dropout(Some(dropout)).unwrap();
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
