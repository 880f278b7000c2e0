//! AdamW with PyTorch semantics, global-norm clipping and the warm-up + cosine
//! schedule (CONTRACT §6). Parameters, gradients and both moments share one
//! flat layout, so the update is a single pass.

use std::ops::Range;

use crate::config::TrainConfig;
use crate::error::MoeError;
use crate::kernels::{self, AdamWStep, Buffer, Stream, TensorGrad, TensorStep};
use crate::params::{Gradients, ParamLayout};

/// Learning rate at step `t` (1-based):
///   t ≤ warmup:  lr·t/warmup
///   after:       progress = min(1, (t − warmup)/(total − warmup))
///                lr_t = min_lr + ½(lr − min_lr)(1 + cos(π·progress)),
///                min_lr = min_lr_ratio·lr  (0.1 by default)
pub fn learning_rate(config: &TrainConfig, t: u64) -> f64 {
    let (lr, warmup, total) = (config.lr, config.warmup_steps, config.total_steps);
    if t <= warmup {
        return lr * t as f64 / warmup as f64;
    }
    let progress = if total > warmup {
        ((t - warmup) as f64 / (total - warmup) as f64).min(1.0)
    } else {
        1.0
    };
    let min_lr = config.min_lr_ratio * lr;
    min_lr + 0.5 * (lr - min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// The factor that clipping multiplies every gradient by:
/// c/(norm + 1e-6) when norm > c > 0, else 1.
pub fn clip_scale(norm: f32, clip: f64) -> f32 {
    if clip > 0.0 && f64::from(norm) > clip {
        (clip / (f64::from(norm) + 1e-6)) as f32
    } else {
        1.0
    }
}

/// AdamW state: the two moments and which tensors are decayed.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamW {
    /// First moment m, flat (parameter layout).
    pub m: Buffer,
    /// Second moment v, flat (parameter layout).
    pub v: Buffer,
    /// Every tensor's range and whether it is weight-decayed (2-D weights only).
    segments: Vec<(Range<usize>, bool)>,
}

impl AdamW {
    /// Zeroed moments for `layout`.
    pub fn new(layout: &ParamLayout) -> Self {
        Self::with_moments(
            layout,
            Buffer::zeroed(layout.len, Stream::FirstMoment),
            Buffer::zeroed(layout.len, Stream::SecondMoment),
        )
    }

    /// Saved moments m and v for `layout` (copied); refuses moments of
    /// another length with [`MoeError::ShapeMismatch`].
    pub fn from_moments(layout: &ParamLayout, m: &[f32], v: &[f32]) -> crate::error::Result<Self> {
        for moment in [m, v] {
            if moment.len() != layout.len {
                return Err(MoeError::shape(
                    "optimizer moments",
                    layout.len,
                    moment.len(),
                ));
            }
        }
        Ok(Self::with_moments(
            layout,
            Buffer::from_slice(m, Stream::FirstMoment),
            Buffer::from_slice(v, Stream::SecondMoment),
        ))
    }

    /// m and v each in their own quarter of a page: p[i], m[i] and v[i]
    /// never share their low 12 address bits, which would stall AdamW's
    /// loads behind its stores (see `kernels::Buffer`).
    fn with_moments(layout: &ParamLayout, m: Buffer, v: Buffer) -> Self {
        AdamW {
            m,
            v,
            segments: layout
                .tensors
                .iter()
                .map(|t| (t.range.clone(), t.is_matrix()))
                .collect(),
        }
    }

    /// One AdamW update at step `t` (1-based) with learning rate `lr`, on
    /// gradients multiplied by `grad_scale` (the clipping factor):
    ///   g ← s·g;  m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g²
    ///   p ← p − lr·wd·p            (2-D weights only)
    ///   p ← p − lr·(m/(1−β1ᵗ)) / (sqrt(v/(1−β2ᵗ)) + eps)
    ///
    /// Nothing non-finite is ever stored: the update is first computed on
    /// copies, a chunk at a time on the stack, and when any new weight or
    /// moment would be NaN or infinite it is refused with the name of what
    /// overflowed ("weights" or "moments"), leaving `params` and the moments
    /// untouched. Both passes run the same kernel on the same inputs.
    pub fn update(
        &mut self,
        params: &mut [f32],
        grads: Gradients<'_>,
        grad_scale: f32,
        lr: f64,
        t: u64,
        config: &TrainConfig,
    ) -> Result<(), &'static str> {
        for (range, step) in tensor_steps(&self.segments, grad_scale, lr, t, config) {
            let (p, m, v) = (
                &params[range.clone()],
                &self.m[range.clone()],
                &self.v[range.clone()],
            );
            match grads.factored.get(&range) {
                None => dry_run(p, &grads.values[range], m, v, step)?,
                Some(product) => kernels::try_for_each_outer_block(product, |r0, g| {
                    let at = r0 * product.x_width()..r0 * product.x_width() + g.len();
                    dry_run(&p[at.clone()], g, &m[at.clone()], &v[at], step)
                })?,
            }
        }
        self.update_unchecked(params, grads, grad_scale, lr, t, config);
        Ok(())
    }

    /// [`AdamW::update`] without the dry run, for a caller that has proved the
    /// result finite (see `Trainer`): one pass over p, g, m, v — or, for a
    /// gradient kept as factors, over p, m, v with g formed in cache — as one
    /// call on the intra-op threads ([`kernels::adamw_tensors`]).
    pub(crate) fn update_unchecked(
        &mut self,
        params: &mut [f32],
        grads: Gradients<'_>,
        grad_scale: f32,
        lr: f64,
        t: u64,
        config: &TrainConfig,
    ) {
        let steps = tensor_steps(&self.segments, grad_scale, lr, t, config);
        let ranges = self.segments.iter().map(|(range, _)| range.clone());
        let slices = tensor_slices(params, ranges.clone())
            .zip(tensor_slices(&mut self.m, ranges.clone()))
            .zip(tensor_slices(&mut self.v, ranges));
        let tensors = steps.zip(slices).map(|((range, step), ((p, m), v))| {
            let grad = match grads.factored.get(&range) {
                None => TensorGrad::Stored(&grads.values[range]),
                Some(product) => TensorGrad::Outer(product),
            };
            TensorStep {
                p,
                m,
                v,
                grad,
                step,
            }
        });
        kernels::adamw_tensors(tensors);
    }
}

/// `values` cut into the consecutive `ranges` (which start at 0 and cover it in order).
fn tensor_slices(
    values: &mut [f32],
    ranges: impl Iterator<Item = Range<usize>>,
) -> impl Iterator<Item = &mut [f32]> {
    let (mut rest, mut at) = (values, 0);
    ranges.map(move |range| {
        assert_eq!(range.start, at, "tensors in layout order, without gaps");
        let (tensor, tail) = std::mem::take(&mut rest).split_at_mut(range.len());
        (rest, at) = (tail, range.end);
        tensor
    })
}

/// Every tensor's range with its AdamW constants (decay on 2-D weights only).
fn tensor_steps(
    segments: &[(Range<usize>, bool)],
    grad_scale: f32,
    lr: f64,
    t: u64,
    config: &TrainConfig,
) -> impl Iterator<Item = (Range<usize>, AdamWStep)> {
    let step = AdamWStep {
        grad_scale,
        ..AdamWStep::new((config.beta1, config.beta2), config.eps, lr, t)
    };
    let decay = (lr * config.weight_decay) as f32;
    segments.iter().map(move |(range, decayed)| {
        let decay = if *decayed { decay } else { 0.0 };
        (range.clone(), AdamWStep { decay, ..step })
    })
}

/// Elements of one dry-run chunk (a multiple of the kernels' 16 lanes).
const DRY_RUN_CHUNK: usize = 256;

/// Runs the AdamW kernel on stack copies of (p, m, v) chunk by chunk and
/// reports what would become non-finite, without writing anything.
fn dry_run(
    p: &[f32],
    g: &[f32],
    m: &[f32],
    v: &[f32],
    step: AdamWStep,
) -> Result<(), &'static str> {
    let mut buf = [[0.0f32; DRY_RUN_CHUNK]; 3];
    for start in (0..p.len()).step_by(DRY_RUN_CHUNK) {
        let n = DRY_RUN_CHUNK.min(p.len() - start);
        let [bp, bm, bv] = &mut buf;
        let (bp, bm, bv) = (&mut bp[..n], &mut bm[..n], &mut bv[..n]);
        bp.copy_from_slice(&p[start..start + n]);
        bm.copy_from_slice(&m[start..start + n]);
        bv.copy_from_slice(&v[start..start + n]);
        kernels::adamw(bp, &g[start..start + n], bm, bv, step);
        if any_non_finite(bm) || any_non_finite(bv) {
            return Err("moments");
        }
        if any_non_finite(bp) {
            return Err("weights");
        }
    }
    Ok(())
}

/// True when some value is NaN or ±∞ (all exponent bits set), tested without
/// branching so that the loop runs on vectors.
fn any_non_finite(values: &[f32]) -> bool {
    const EXPONENT: u32 = 0x7f80_0000;
    values.iter().fold(0u32, |seen, x| {
        seen | u32::from(x.to_bits() & EXPONENT == EXPONENT)
    }) != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_a_tenth() {
        let c = TrainConfig::default();
        assert!((learning_rate(&c, 1) - 1e-4).abs() < 1e-12);
        assert!((learning_rate(&c, 10) - 1e-3).abs() < 1e-12);
        assert!((learning_rate(&c, 605) - 5.5e-4).abs() < 1e-9);
        assert!((learning_rate(&c, 1200) - 1e-4).abs() < 1e-12);
        assert!((learning_rate(&c, 5000) - 1e-4).abs() < 1e-12);
    }

    #[test]
    fn the_schedule_floor_is_min_lr_ratio_times_lr() {
        for ratio in [0.0, 0.25, 1.0] {
            let c = TrainConfig {
                min_lr_ratio: ratio,
                ..TrainConfig::default()
            };
            let floor = ratio * 1e-3;
            assert!((learning_rate(&c, 1200) - floor).abs() < 1e-12, "{ratio}");
            assert!((learning_rate(&c, 605) - (floor + 1e-3) / 2.0).abs() < 1e-9);
            assert!((learning_rate(&c, 10) - 1e-3).abs() < 1e-12);
        }
    }

    #[test]
    fn moments_of_another_length_are_refused() {
        let layout = ParamLayout::new(&crate::ModelConfig::tiny());
        let (good, short) = (vec![0.5; layout.len], vec![0.5; layout.len - 1]);
        let opt = AdamW::from_moments(&layout, &good, &good).unwrap();
        assert!(opt.m[..] == good[..] && opt.v[..] == good[..]);
        for (m, v) in [(&short, &good), (&good, &short)] {
            assert!(matches!(
                AdamW::from_moments(&layout, m, v),
                Err(MoeError::ShapeMismatch { .. })
            ));
        }
    }

    #[test]
    fn clipping_only_above_the_threshold() {
        assert_eq!(clip_scale(0.5, 1.0), 1.0);
        assert!((clip_scale(4.0, 1.0) - 1.0 / 4.000001).abs() < 1e-7);
        assert_eq!(clip_scale(4.0, 0.0), 1.0);
    }

    #[test]
    fn first_step_moves_each_weight_by_about_lr() {
        let layout = ParamLayout::new(&crate::ModelConfig::tiny());
        let mut opt = AdamW::new(&layout);
        let mut p = vec![1.0f32; layout.len];
        let g: Vec<f32> = (0..layout.len)
            .map(|i| if i % 2 == 0 { 0.3 } else { -2.0 })
            .collect();
        let config = TrainConfig {
            weight_decay: 0.0,
            ..TrainConfig::default()
        };
        opt.update(&mut p, g[..].into(), 1.0, 1e-3, 1, &config)
            .unwrap();
        // Bias-corrected first step: m̂/sqrt(v̂) = sign(g).
        assert!((p[0] - (1.0 - 1e-3)).abs() < 1e-6);
        assert!((p[1] - (1.0 + 1e-3)).abs() < 1e-6);
    }
}
