//! The golden fixture: a small GQA + NTK-RoPE model and the JAX reference's
//! float64 outputs for one batch (written by `reference/make_fixture`). It
//! catches a broken gradient on machines without Python.

pub mod common;

use std::path::Path;

use rosetta_moe::optim::{self, AdamW};
use rosetta_moe::{Batch, TrainConfig, checkpoint};
use safetensors::SafeTensors;

const DIR: &str = "tests/fixtures/gqa_ntk";

struct Reference {
    bytes: Vec<u8>,
}

impl Reference {
    fn load() -> Self {
        Reference {
            bytes: std::fs::read(Path::new(DIR).join("reference.safetensors")).unwrap(),
        }
    }

    /// Tensor `name` as f64 (stored as f64, or i32 for routes and the step).
    fn get(&self, name: &str) -> Vec<f64> {
        let file = SafeTensors::deserialize(&self.bytes).unwrap();
        let view = file
            .tensor(name)
            .unwrap_or_else(|_| panic!("{name} missing"));
        match view.dtype() {
            safetensors::Dtype::F64 => view
                .data()
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
                .collect(),
            safetensors::Dtype::I32 => view
                .data()
                .chunks_exact(4)
                .map(|b| f64::from(i32::from_le_bytes(b.try_into().unwrap())))
                .collect(),
            other => panic!("{name}: unexpected dtype {other:?}"),
        }
    }
}

fn norm(v: impl Iterator<Item = f64>) -> f64 {
    v.map(|x| x * x).sum::<f64>().sqrt()
}

/// ‖ours − reference‖ / ‖reference‖
fn rel(ours: &[f32], reference: &[f64]) -> f64 {
    assert_eq!(ours.len(), reference.len());
    norm(ours.iter().zip(reference).map(|(&a, &b)| f64::from(a) - b))
        / norm(reference.iter().copied())
}

#[test]
fn forward_losses_gradients_and_routes_match_the_reference() {
    let reference = Reference::load();
    let mut model = checkpoint::load_model(Path::new(DIR)).unwrap();
    let batch = Batch::load(&Path::new(DIR).join("batch.json")).unwrap();
    let train = TrainConfig::load(&Path::new(DIR).join("train.json")).unwrap();
    let mut grads = vec![0.0; model.params().len()];
    let (losses, grad_norm) = model
        .loss_and_grads(&batch, train.aux_loss_alpha as f32, &mut grads)
        .unwrap();
    let exact_norm = common::global_norm(&grads);
    assert!(
        (grad_norm - exact_norm).abs() <= 1e-6 * exact_norm,
        "{grad_norm} vs {exact_norm}"
    );

    assert!(rel(model.logits(), &reference.get("logits")) <= 1e-5);
    for (name, ours) in [
        ("ce", losses.ce),
        ("aux", losses.aux),
        ("total", losses.total()),
    ] {
        let want = reference.get(&format!("loss.{name}"))[0];
        assert!(
            (f64::from(ours) - want).abs() <= 1e-5 * want.abs(),
            "loss.{name}: {ours} vs {want}"
        );
    }
    for layer in 0..model.config().n_layers {
        let ours: Vec<f64> = model
            .routes(layer)
            .unwrap()
            .iter()
            .map(|&e| f64::from(e))
            .collect();
        assert_eq!(
            ours,
            reference.get(&format!("route.{layer}")),
            "route.{layer}"
        );
    }
    let layout = model.layout().clone();
    let ref_grads: Vec<Vec<f64>> = layout
        .tensors
        .iter()
        .map(|t| reference.get(&format!("grad.{}", t.name)))
        .collect();
    let floor = 1e-6
        * ref_grads
            .iter()
            .map(|g| norm(g.iter().copied()))
            .fold(0.0, f64::max);
    for (spec, want) in layout.tensors.iter().zip(&ref_grads) {
        let ours = &grads[spec.range.clone()];
        let diff = norm(ours.iter().zip(want).map(|(&a, &b)| f64::from(a) - b));
        let allowed = (1e-4 * norm(want.iter().copied())).max(floor);
        assert!(
            diff <= allowed,
            "grad.{}: ‖diff‖ {diff:e} > {allowed:e}",
            spec.name
        );
    }
}

#[test]
fn adamw_step_matches_the_reference_given_the_same_gradients() {
    let reference = Reference::load();
    let model = checkpoint::load_model(Path::new(DIR)).unwrap();
    let train = TrainConfig::load(&Path::new(DIR).join("train.json")).unwrap();
    let step = reference.get("adamw.step")[0] as u64;
    let layout = model.layout().clone();
    // The reference's own gradients are the input, so this checks the
    // optimizer alone (see docs/verification.md).
    let mut grads = vec![0.0f32; layout.len];
    for spec in &layout.tensors {
        let g = reference.get(&format!("grad.{}", spec.name));
        for (dst, v) in grads[spec.range.clone()].iter_mut().zip(g) {
            *dst = v as f32;
        }
    }
    let mut params = model.params().to_vec();
    let scale = optim::clip_scale(common::global_norm(&grads), train.grad_clip);
    let lr = optim::learning_rate(&train, step);
    AdamW::new(&layout)
        .update(&mut params, grads[..].into(), scale, lr, step, &train)
        .unwrap();
    for spec in &layout.tensors {
        let want = reference.get(&format!("after.{}", spec.name));
        let worst = params[spec.range.clone()]
            .iter()
            .zip(&want)
            .map(|(&a, &b)| (f64::from(a) - b).abs())
            .fold(0.0, f64::max);
        assert!(worst <= 1e-6, "after.{}: max |diff| {worst:e}", spec.name);
    }
}
