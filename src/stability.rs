//! The numerical stability report (`moe stability`): predefined stress inputs
//! under which forward and sampling must stay finite and training must detect
//! divergence and refuse the step. Each case returns what it measured; the
//! report and the tests run the same functions.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::config::{ModelConfig, TrainConfig};
use crate::error::{MoeError, Result};
use crate::layers;
use crate::loss;
use crate::model::{Batch, Model};
use crate::sampling::{SamplingStrategy, pick_token};
use crate::train::Trainer;

/// The outcome of one stress case.
#[derive(Debug, Clone, Serialize)]
pub struct CaseReport {
    /// Short name (also the test's).
    pub name: &'static str,
    /// The stress applied.
    pub stress: &'static str,
    /// True when everything stayed finite and behaved as specified.
    pub passed: bool,
    /// What was measured, in words and numbers.
    pub detail: String,
}

/// A stress case: runs and reports (`Err` only for an unexpected error).
pub type Case = fn() -> Result<(bool, String)>;

/// Every case: name, stress, function.
pub const CASES: [(&str, &str, Case); 10] = [
    (
        "logits_1e4",
        "lm_head scaled so logits reach ±1e4",
        logits_1e4,
    ),
    (
        "equal_logits",
        "all-equal logits into softmax, cross-entropy and every sampler",
        equal_logits,
    ),
    (
        "zero_hidden_rmsnorm",
        "an all-zero hidden state through RMSNorm forward and backward",
        zero_hidden,
    ),
    (
        "max_seq_len",
        "a training forward of a sequence of exactly max_seq_len",
        max_seq_len,
    ),
    (
        "one_visible_key",
        "sequences of length 1: every attention row sees one key",
        one_visible_key,
    ),
    (
        "tied_router",
        "a zero router: all router probabilities tied",
        tied_router,
    ),
    (
        "lr_10_divergence",
        "training at learning rate 10 without clipping: divergence detected, the step refused, nothing non-finite stored",
        lr_10,
    ),
    (
        "temperature_1e-6",
        "sampling at temperature 1e-6 (must equal greedy)",
        temperature_tiny,
    ),
    (
        "temperature_1e6",
        "sampling at temperature 1e6 (near uniform)",
        temperature_huge,
    ),
    (
        "top_p_bounds",
        "top-p at p = 1, at the smallest positive p, and at 0 (refused)",
        top_p_bounds,
    ),
];

/// Runs every case.
pub fn run_all() -> Vec<CaseReport> {
    CASES
        .iter()
        .map(|&(name, stress, case)| run_case(name, stress, case))
        .collect()
}

/// Runs one case; an unexpected error is a failed case naming it.
pub fn run_case(name: &'static str, stress: &'static str, case: Case) -> CaseReport {
    let (passed, detail) = case().unwrap_or_else(|e| (false, format!("unexpected error: {e}")));
    CaseReport {
        name,
        stress,
        passed,
        detail,
    }
}

fn all_finite(x: &[f32]) -> bool {
    x.iter().all(|v| v.is_finite())
}

fn tiny() -> Result<Model> {
    Model::new(ModelConfig::tiny(), 42)
}

fn batch(seq: usize) -> Result<Batch> {
    let ids: Vec<u32> = (0..seq as u32).map(|i| i * 7 % 1000).collect();
    let targets = ids.iter().map(|i| (i + 1) % 1000).collect();
    Batch::new(ids, targets, 1)
}

fn logits_1e4() -> Result<(bool, String)> {
    let mut model = tiny()?;
    let head = model.layout().lm_head.clone();
    model.params_mut()[head].iter_mut().for_each(|w| *w *= 1e4);
    let b = batch(16)?;
    let peak = model
        .forward(&b.ids, 1)?
        .iter()
        .fold(0.0f32, |m, z| m.max(z.abs()));
    let finite = all_finite(model.logits());
    let losses = model.losses(&b, 0.01)?;
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let last = &model.logits()[15 * 1000..];
    let sampled = pick_token(last, SamplingStrategy::TopP { p: 0.9, t: 1.0 }, &mut rng)?;
    let ok = peak >= 1e4 && finite && losses.total().is_finite();
    Ok((
        ok,
        format!(
            "max |logit| {peak:.3e}, all finite {finite}, loss {:.4e}, sampled id {sampled}",
            losses.total()
        ),
    ))
}

fn equal_logits() -> Result<(bool, String)> {
    let v = 1000;
    let logits = vec![3.25f32; v];
    let mut dlogits = vec![0.0; v];
    let ce = loss::cross_entropy(&mut dlogits, &mut [0.0], &logits, &[7]);
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let mut picked = Vec::new();
    for s in [
        SamplingStrategy::Greedy,
        SamplingStrategy::Temperature { t: 1.0 },
        SamplingStrategy::TopK { k: 10, t: 1.0 },
        SamplingStrategy::TopP { p: 0.5, t: 1.0 },
    ] {
        picked.push(pick_token(&logits, s, &mut rng)?);
    }
    let ln_v = (v as f32).ln();
    let ok = (ce - ln_v).abs() < 1e-4 && all_finite(&dlogits) && picked[0] == 0 && picked[2] < 10;
    Ok((
        ok,
        format!(
            "cross-entropy {ce:.6} (ln V = {ln_v:.6}); greedy id {}, top-k id {}, picks {picked:?}",
            picked[0], picked[2]
        ),
    ))
}

fn zero_hidden() -> Result<(bool, String)> {
    let h = 64;
    let eps = ModelConfig::default_rms_norm_eps() as f32;
    let (x, gamma, dy) = (vec![0.0f32; 2 * h], vec![1.0f32; h], vec![1.0f32; 2 * h]);
    let (mut y, mut inv_rms) = (vec![0.0; 2 * h], vec![0.0; 2]);
    layers::rmsnorm_forward(&mut y, &mut inv_rms, &x, &gamma, eps);
    let (mut dx, mut dgamma) = (vec![0.0; 2 * h], vec![0.0; h]);
    layers::rmsnorm_backward(&mut dx, &mut dgamma, &dy, &x, &inv_rms, &gamma);
    let ok = y.iter().all(|&v| v == 0.0)
        && all_finite(&inv_rms)
        && all_finite(&dx)
        && all_finite(&dgamma);
    Ok((
        ok,
        format!(
            "output all zero, 1/rms = {:.1} (1/sqrt(eps)), dx finite {}",
            inv_rms[0],
            all_finite(&dx)
        ),
    ))
}

fn max_seq_len() -> Result<(bool, String)> {
    let mut model = tiny()?;
    let s = model.config().max_seq_len;
    let losses = model.losses(&batch(s)?, 0.01)?;
    let ok = all_finite(model.logits()) && losses.total().is_finite();
    Ok((
        ok,
        format!("S = {s}: logits finite, loss {:.4}", losses.total()),
    ))
}

fn one_visible_key() -> Result<(bool, String)> {
    let mut model = tiny()?;
    let ids: Vec<u32> = (0..8).collect();
    let logits = model.forward(&ids, 8)?.to_vec();
    let b = Batch::new(ids.clone(), ids.iter().map(|i| i + 1).collect(), 8)?;
    let losses = model.losses(&b, 0.01)?;
    let ok = all_finite(&logits) && losses.total().is_finite();
    Ok((
        ok,
        format!(
            "8 sequences of 1 token: logits finite, loss {:.4}",
            losses.total()
        ),
    ))
}

fn tied_router() -> Result<(bool, String)> {
    let mut model = tiny()?;
    let routers: Vec<_> = model
        .layout()
        .layers
        .iter()
        .map(|l| l.router.clone())
        .collect();
    for r in routers {
        model.params_mut()[r].fill(0.0);
    }
    let losses = model.losses(&batch(16)?, 0.01)?;
    let routes = model.routes(0).unwrap_or(&[]);
    let lowest = routes.chunks(2).all(|r| r == [0, 1]);
    let ok = all_finite(model.logits()) && losses.total().is_finite() && lowest;
    Ok((
        ok,
        format!(
            "ties go to the lowest experts ([0, 1] for every token: {lowest}); aux loss {:.6}",
            losses.aux
        ),
    ))
}

fn lr_10() -> Result<(bool, String)> {
    let model = tiny()?;
    let config = TrainConfig {
        lr: 10.0,
        warmup_steps: 0,
        grad_clip: 0.0,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(model, config)?;
    let b = batch(32)?;
    let mut losses: Vec<f32> = Vec::new();
    for _ in 0..200 {
        let before = trainer.clone();
        let refused = match trainer.train_step(&b) {
            Ok(stats) => {
                losses.push(stats.loss);
                continue;
            }
            Err(e @ (MoeError::Diverged { .. } | MoeError::NonFinite { .. })) => e,
            Err(e) => return Err(e),
        };
        let opt = trainer.optimizer();
        let untouched = trainer.step() == before.step()
            && trainer.model().params() == before.model().params()
            && opt == before.optimizer();
        let finite =
            all_finite(trainer.model().params()) && all_finite(&opt.m) && all_finite(&opt.v);
        return Ok((
            untouched && finite,
            format!(
                "losses {losses:?}, then refused: {refused}; weights and moments untouched: {untouched}, all finite: {finite}"
            ),
        ));
    }
    Ok((
        false,
        format!("no divergence in 200 steps (last loss {:?})", losses.last()),
    ))
}

/// The last-position logits of a tiny model on a fixed prompt.
fn some_logits() -> Result<Vec<f32>> {
    let mut model = tiny()?;
    let b = batch(8)?;
    Ok(model.forward(&b.ids, 1)?[7 * 1000..].to_vec())
}

fn temperature_tiny() -> Result<(bool, String)> {
    let logits = some_logits()?;
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let greedy = pick_token(&logits, SamplingStrategy::Greedy, &mut rng)?;
    let picks: Vec<u32> = (0..20)
        .map(|_| pick_token(&logits, SamplingStrategy::Temperature { t: 1e-6 }, &mut rng))
        .collect::<Result<_>>()?;
    let ok = picks.iter().all(|&p| p == greedy);
    Ok((ok, format!("20 draws all equal greedy id {greedy}: {ok}")))
}

fn temperature_huge() -> Result<(bool, String)> {
    let logits = some_logits()?;
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let picks: Vec<u32> = (0..200)
        .map(|_| pick_token(&logits, SamplingStrategy::Temperature { t: 1e6 }, &mut rng))
        .collect::<Result<_>>()?;
    let mut distinct = picks.clone();
    distinct.sort_unstable();
    distinct.dedup();
    let ok = distinct.len() > 150 && picks.iter().all(|&p| p < 1000);
    Ok((
        ok,
        format!(
            "200 draws gave {} distinct ids (near uniform over 1000)",
            distinct.len()
        ),
    ))
}

fn top_p_bounds() -> Result<(bool, String)> {
    let logits = some_logits()?;
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let greedy = pick_token(&logits, SamplingStrategy::Greedy, &mut rng)?;
    let full = pick_token(&logits, SamplingStrategy::TopP { p: 1.0, t: 1.0 }, &mut rng)?;
    let tiny_p = pick_token(
        &logits,
        SamplingStrategy::TopP {
            p: f32::MIN_POSITIVE,
            t: 1.0,
        },
        &mut rng,
    )?;
    let zero = pick_token(&logits, SamplingStrategy::TopP { p: 0.0, t: 1.0 }, &mut rng);
    let refused = matches!(zero, Err(MoeError::InvalidSampling(_)));
    let ok = full < 1000 && tiny_p == greedy && refused;
    Ok((
        ok,
        format!(
            "p = 1 sampled id {full}; smallest p gave greedy id {tiny_p} (greedy {greedy}); p = 0 refused with a typed error: {refused}"
        ),
    ))
}
