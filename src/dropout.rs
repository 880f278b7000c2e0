//! Residual dropout (a contract extension, off by default): while training,
//! each element of a sublayer's output is kept with probability 1 − p and
//! scaled by 1/(1 − p), or dropped, before it joins the residual stream:
//!   x ← x + m ⊙ y,   m_i = 1/(1 − p) with probability 1 − p, else 0
//!   dL/dy = m ⊙ dL/dx   (and dL/dx passes to the sublayer's input unchanged)
//!
//! The mask is not stored: m_i is a hash of (seed, step, layer, site, i), so
//! the backward regenerates it, and it is the same for any thread count, SIMD
//! level or machine. Inference (generation, evaluation, validation) never
//! drops anything.

/// The dropout of one training step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout {
    /// Drop probability p in (0, 1).
    pub p: f32,
    /// The run's seed.
    pub seed: u64,
    /// The step being computed (a new mask every step).
    pub step: u64,
}

/// Which sublayer output of a decoder layer a mask covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Site {
    /// Attention's output (before `x_mid = x + …`).
    Attention = 0,
    /// The MoE block's output (before `x_out = x_mid + …`).
    Moe = 1,
}

/// The mask of one site of one layer in one step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mask {
    /// Hash of (seed, step, layer, site): the stream the elements index into.
    key: u64,
    /// Elements whose 24-bit draw is below this are dropped (p·2²⁴).
    threshold: u32,
    /// 1/(1 − p), the kept elements' scale.
    scale: f32,
}

/// SplitMix64's finaliser: a bijective mix of all 64 bits.
fn mix(z: u64) -> u64 {
    let z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Dropout {
    /// The mask of `site` in `layer`.
    pub fn mask(&self, layer: usize, site: Site) -> Mask {
        let key = mix(mix(mix(self.seed) ^ self.step) ^ (2 * layer as u64 + site as u64));
        Mask {
            key,
            threshold: (f64::from(self.p) * f64::from(1u32 << 24)) as u32,
            scale: 1.0 / (1.0 - self.p),
        }
    }
}

impl Mask {
    /// m_i: 0 (dropped) or 1/(1 − p) (kept).
    pub fn factor(&self, i: usize) -> f32 {
        let draw = (mix(self.key ^ i as u64) >> 40) as u32;
        if draw < self.threshold {
            0.0
        } else {
            self.scale
        }
    }

    /// x ← x + m ⊙ y (forward of the residual add).
    pub fn add_dropped(&self, x: &mut [f32], y: &[f32]) {
        for (i, (x, &y)) in x.iter_mut().zip(y).enumerate() {
            *x += self.factor(i) * y;
        }
    }

    /// dy = m ⊙ dx (backward into the sublayer's output).
    pub fn apply(&self, dy: &mut [f32], dx: &[f32]) {
        for (i, (dy, &dx)) in dy.iter_mut().zip(dx).enumerate() {
            *dy = self.factor(i) * dx;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_drop_about_p_and_differ_by_step_layer_and_site() {
        let d = Dropout {
            p: 0.25,
            seed: 7,
            step: 3,
        };
        let n = 100_000;
        let m = d.mask(1, Site::Moe);
        let dropped = (0..n).filter(|&i| m.factor(i) == 0.0).count();
        assert!((dropped as f64 / n as f64 - 0.25).abs() < 0.01, "{dropped}");
        assert!((0..n).all(|i| [0.0, 1.0 / 0.75].contains(&m.factor(i))));
        let others = [
            Dropout { step: 4, ..d }.mask(1, Site::Moe),
            d.mask(0, Site::Moe),
            d.mask(1, Site::Attention),
            Dropout { seed: 8, ..d }.mask(1, Site::Moe),
        ];
        for other in others {
            let same = (0..1000)
                .filter(|&i| other.factor(i) == m.factor(i))
                .count();
            assert!(same < 800, "{same} of 1000 alike");
        }
        assert_eq!(d.mask(1, Site::Moe), m, "a mask is a function of its key");
    }
}
