//! Where every parameter lives.
//!
//! All parameters of a model sit in one flat `Vec<f32>`; gradients and the two
//! AdamW moments use the same layout, so clipping and the optimizer are single
//! passes over flat buffers (as in llm.c). [`ParamLayout`] maps each checkpoint
//! name of CONTRACT §2 to its range in that buffer.
//!
//! Two layout choices make the forward pass cheaper without changing any name:
//! `q_proj`, `k_proj`, `v_proj` are adjacent, so together they form one
//! `[(H + 2·Hkv)·d, h]` matrix applied by a single matrix multiply; and each
//! expert's `gate_proj` and `up_proj` are adjacent, forming one `[2F, h]` matrix.

use std::ops::Range;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use crate::config::ModelConfig;
use crate::kernels::{self, Mat, MatMut, Outer, Write};

/// One named tensor inside the flat parameter buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    /// Checkpoint name (CONTRACT §2).
    pub name: String,
    /// Shape, `[out, in]` for linear weights.
    pub shape: Vec<usize>,
    /// Position in the flat buffer.
    pub range: Range<usize>,
}

impl TensorSpec {
    /// RMSNorm gains are vectors and are neither decayed nor randomly initialised.
    pub fn is_matrix(&self) -> bool {
        self.shape.len() == 2
    }
}

/// Ranges of one expert's weights.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertRanges {
    /// `gate_proj` [F, h] followed by `up_proj` [F, h]: one [2F, h] matrix.
    pub gate_up: Range<usize>,
    /// `down_proj` [h, F].
    pub down: Range<usize>,
}

/// Ranges of one transformer block's weights.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerRanges {
    /// `attn_norm.weight` [h].
    pub attn_norm: Range<usize>,
    /// `q_proj`, `k_proj`, `v_proj` stacked: one [(H + 2·Hkv)·d, h] matrix.
    pub qkv: Range<usize>,
    /// `o_proj` [h, H·d].
    pub o_proj: Range<usize>,
    /// `moe_norm.weight` [h].
    pub moe_norm: Range<usize>,
    /// `moe.router.weight` [E, h].
    pub router: Range<usize>,
    /// One entry per expert.
    pub experts: Vec<ExpertRanges>,
}

/// The complete map from names to ranges for one config.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamLayout {
    /// Every tensor in buffer order.
    pub tensors: Vec<TensorSpec>,
    /// `embed.weight` [V, h].
    pub embed: Range<usize>,
    /// One entry per layer.
    pub layers: Vec<LayerRanges>,
    /// `final_norm.weight` [h].
    pub final_norm: Range<usize>,
    /// `lm_head.weight` [V, h].
    pub lm_head: Range<usize>,
    /// Total number of parameters.
    pub len: usize,
}

impl ParamLayout {
    /// Lays out every tensor of `config` in the order of CONTRACT §2.
    pub fn new(config: &ModelConfig) -> Self {
        let (vocab, h) = (config.vocab_size, config.hidden_dim);
        let mut b = LayoutBuilder::default();
        let embed = b.push("embed.weight".into(), vec![vocab, h]);
        let layers = (0..config.n_layers).map(|l| b.layer(l, config)).collect();
        let final_norm = b.push("final_norm.weight".into(), vec![h]);
        let lm_head = b.push("lm_head.weight".into(), vec![vocab, h]);
        ParamLayout {
            len: b.next,
            tensors: b.tensors,
            embed,
            layers,
            final_norm,
            lm_head,
        }
    }

    /// The tensor with this checkpoint name, if any.
    pub fn find(&self, name: &str) -> Option<&TensorSpec> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Fresh parameters (CONTRACT §2 init): gains 1, every matrix drawn from
    /// N(0, 2/fan_in) with its own random stream derived from (seed, name).
    pub fn init(&self, seed: u64) -> Vec<f32> {
        let mut params = kernels::zeroed(self.len);
        for spec in &self.tensors {
            let values = &mut params[spec.range.clone()];
            if spec.is_matrix() {
                // fan_in is the `in` size; for the embedding [V, h] that is h.
                let fan_in = spec.shape[1] as f64;
                let std = (2.0 / fan_in).sqrt() as f32;
                let normal = Normal::new(0.0f32, std).expect("std is finite and > 0");
                let mut rng = tensor_rng(seed, &spec.name);
                for v in values.iter_mut() {
                    *v = normal.sample(&mut rng);
                }
            } else {
                values.fill(1.0);
            }
        }
        params
    }
}

/// The flat gradient buffer (laid out like the parameters) and the running
/// Σ g² of every tensor written so far, summed while the tensor is still in
/// cache: the global norm for clipping costs no extra pass. A training step
/// may also keep linear weights' gradients as their factors ([`OuterGrads`]):
/// those never reach the buffer.
#[derive(Debug)]
pub struct Grads<'g> {
    /// dL/dθ, flat, [`ParamLayout`] order.
    values: &'g mut [f32],
    /// Where weight gradients are kept as factors, when the caller allows it.
    factored: Option<&'g mut OuterGrads>,
    /// Σ g² so far.
    sum_sq: f64,
}

impl<'g> Grads<'g> {
    /// A gradient buffer with nothing counted yet; every gradient is written into it.
    pub fn new(values: &'g mut [f32]) -> Self {
        Grads {
            values,
            factored: None,
            sum_sq: 0.0,
        }
    }

    /// As [`Grads::new`], but a linear weight's gradient is kept in `factored`
    /// as dy and x whenever that is smaller than dW (see [`Grads::outer`]).
    pub fn factoring(values: &'g mut [f32], factored: &'g mut OuterGrads) -> Self {
        factored.clear();
        Grads {
            factored: Some(factored),
            ..Self::new(values)
        }
    }

    /// The gradient of the tensor at `range`, to write without counting it
    /// yet (see [`Grads::count`]).
    pub fn tensor(&mut self, range: &Range<usize>) -> &mut [f32] {
        &mut self.values[range.clone()]
    }

    /// Adds Σ g² of the (written) gradient at `range` to the running sum.
    pub fn count(&mut self, range: &Range<usize>) {
        self.sum_sq += kernels::sum_of_squares(&self.values[range.clone()]);
    }

    /// Lets `write` overwrite the gradient at `range`, then counts it.
    pub fn write(&mut self, range: &Range<usize>, write: impl FnOnce(&mut [f32])) {
        write(self.tensor(range));
        self.count(range);
    }

    /// The gradient of the [out, in] weight at `range` of y = x·Wᵀ,
    ///   dW = dyᵀ·x   (dy [T, out], x [T, in]),
    /// counted. Kept as its factors when the caller allows it and they are
    /// smaller than the product, T·(out + in) ≤ out·in (their norm is then
    /// read from Gram matrices, [`kernels::outer_sq_norm`]); otherwise
    /// multiplied out into the buffer.
    pub fn outer(&mut self, range: &Range<usize>, dy: &[f32], x: &[f32], out: usize, inp: usize) {
        let tokens = x.len() / inp;
        let (dy_mat, x_mat) = (Mat::new(dy, tokens, out), Mat::new(x, tokens, inp));
        match self.factored.as_deref_mut() {
            Some(factored) if tokens * (out + inp) <= out * inp => {
                self.sum_sq += kernels::outer_sq_norm(Outer::new(dy_mat, x_mat));
                factored.push(range, &dy[..tokens * out], &x[..tokens * inp], (out, inp));
            }
            _ => self.write(range, |dw| {
                kernels::matmul(
                    MatMut::new(dw, out, inp),
                    dy_mat.t(),
                    x_mat,
                    Write::Overwrite,
                )
            }),
        }
    }

    /// Runs `part` with a fresh running sum, then adds its subtotal: one
    /// subtotal per decoder layer, the summation order the norm has always had.
    pub fn subtotal(&mut self, part: impl FnOnce(&mut Self)) {
        let outer = std::mem::replace(&mut self.sum_sq, 0.0);
        part(self);
        self.sum_sq += outer; // = outer + subtotal (IEEE addition commutes)
    }

    /// Σ g² over every gradient counted.
    pub fn sum_sq(&self) -> f64 {
        self.sum_sq
    }
}

/// Linear weights' gradients kept as the factors of dW = dyᵀ·x: with few
/// tokens, dy [T, out] and x [T, in] are far smaller than dW [out, in], and
/// the optimizer forms dW a block at a time in cache
/// ([`kernels::adamw_tensors`]) instead of streaming it through memory twice.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OuterGrads {
    /// dy then x of every product, back to back.
    factors: Vec<f32>,
    /// One entry per weight, in the order the backward reached them.
    products: Vec<Factored>,
}

/// Where one weight's factors sit in [`OuterGrads::factors`].
#[derive(Debug, Clone, PartialEq)]
struct Factored {
    /// The weight's range in the parameter buffer.
    range: Range<usize>,
    /// First float of dy; x follows it.
    start: usize,
    tokens: usize,
    out: usize,
    inp: usize,
}

impl OuterGrads {
    /// No gradients with capacity for `floats` factor values (so that steady
    /// training steps allocate nothing).
    pub fn reserve(&mut self, floats: usize, weights: usize) {
        self.factors
            .reserve(floats.saturating_sub(self.factors.len()));
        self.products
            .reserve(weights.saturating_sub(self.products.len()));
    }

    /// Forgets every gradient (keeping the capacity).
    pub fn clear(&mut self) {
        self.factors.clear();
        self.products.clear();
    }

    /// Keeps dy [T, out] and x [T, in] (row-major) as the gradient at `range`.
    fn push(&mut self, range: &Range<usize>, dy: &[f32], x: &[f32], (out, inp): (usize, usize)) {
        let start = self.factors.len();
        self.factors.extend_from_slice(dy);
        self.factors.extend_from_slice(x);
        let tokens = dy.len() / out;
        self.products.push(Factored {
            range: range.clone(),
            start,
            tokens,
            out,
            inp,
        });
    }

    /// The factors of the gradient of the tensor at `range`, if it was kept
    /// so: a whole weight, or a band of rows of a stacked one (`q_proj` of
    /// `q|k|v`, `gate_proj` of `gate|up`).
    pub fn get(&self, range: &Range<usize>) -> Option<Outer<'_>> {
        let f = self
            .products
            .iter()
            .find(|f| f.range.start <= range.start && range.end <= f.range.end)?;
        let dy_len = f.tokens * f.out;
        let dy = &self.factors[f.start..f.start + dy_len];
        let x = &self.factors[f.start + dy_len..f.start + dy_len + f.tokens * f.inp];
        let whole = Outer::new(Mat::new(dy, f.tokens, f.out), Mat::new(x, f.tokens, f.inp));
        let (first, rows) = (range.start - f.range.start, range.len());
        assert!(
            first % f.inp == 0 && rows % f.inp == 0,
            "a band of whole rows"
        );
        Some(whole.rows(first / f.inp, rows / f.inp))
    }

    /// Factor values a step over `tokens` tokens can keep at most: every
    /// matrix's (out + in) per token, `top_k` times over (an expert sees up to
    /// all of a step's T·k routed rows).
    pub fn bound(layout: &ParamLayout, tokens: usize, top_k: usize) -> usize {
        let per_token: usize = layout
            .tensors
            .iter()
            .filter(|t| t.is_matrix())
            .map(|t| t.shape.iter().sum::<usize>())
            .sum();
        per_token
            .saturating_mul(tokens)
            .saturating_mul(top_k.max(1))
    }
}

/// A finished backward's gradients: the flat buffer, except for the weights
/// whose gradient `factored` holds.
#[derive(Debug, Clone, Copy)]
pub struct Gradients<'a> {
    /// dL/dθ, flat, [`ParamLayout`] order.
    pub values: &'a [f32],
    /// Weights whose gradient is kept as factors (their part of `values` is unused).
    pub factored: &'a OuterGrads,
}

/// No factored gradients.
static NONE_FACTORED: OuterGrads = OuterGrads {
    factors: Vec::new(),
    products: Vec::new(),
};

impl<'a> From<&'a [f32]> for Gradients<'a> {
    /// Every gradient in the flat buffer.
    fn from(values: &'a [f32]) -> Self {
        Gradients {
            values,
            factored: &NONE_FACTORED,
        }
    }
}

/// Lays tensors out one after the other.
#[derive(Default)]
struct LayoutBuilder {
    /// Tensors so far.
    tensors: Vec<TensorSpec>,
    /// First free index.
    next: usize,
}

impl LayoutBuilder {
    /// Appends a tensor; returns its range.
    fn push(&mut self, name: String, shape: Vec<usize>) -> Range<usize> {
        let len: usize = shape.iter().product();
        let range = self.next..self.next + len;
        self.next += len;
        let spec = TensorSpec {
            name,
            shape,
            range: range.clone(),
        };
        self.tensors.push(spec);
        range
    }

    /// Appends every tensor of layer `l`, in checkpoint order.
    fn layer(&mut self, l: usize, config: &ModelConfig) -> LayerRanges {
        let (h, d) = (config.hidden_dim, config.head_dim);
        let (hd, kvd) = (config.n_heads * d, config.n_kv_heads * d);
        let p = format!("layers.{l}");
        let attn_norm = self.push(format!("{p}.attn_norm.weight"), vec![h]);
        let q = self.push(format!("{p}.attn.q_proj.weight"), vec![hd, h]);
        self.push(format!("{p}.attn.k_proj.weight"), vec![kvd, h]);
        let v = self.push(format!("{p}.attn.v_proj.weight"), vec![kvd, h]);
        let o_proj = self.push(format!("{p}.attn.o_proj.weight"), vec![h, hd]);
        let moe_norm = self.push(format!("{p}.moe_norm.weight"), vec![h]);
        let router = self.push(format!("{p}.moe.router.weight"), vec![config.n_experts, h]);
        let experts = (0..config.n_experts)
            .map(|e| self.expert(&format!("{p}.moe.experts.{e}"), config))
            .collect();
        LayerRanges {
            attn_norm,
            qkv: q.start..v.end,
            o_proj,
            moe_norm,
            router,
            experts,
        }
    }

    /// Appends one expert's tensors, named `{prefix}.*_proj.weight`.
    fn expert(&mut self, prefix: &str, config: &ModelConfig) -> ExpertRanges {
        let (h, f) = (config.hidden_dim, config.ffn_dim);
        let gate = self.push(format!("{prefix}.gate_proj.weight"), vec![f, h]);
        let up = self.push(format!("{prefix}.up_proj.weight"), vec![f, h]);
        let down = self.push(format!("{prefix}.down_proj.weight"), vec![h, f]);
        ExpertRanges {
            gate_up: gate.start..up.end,
            down,
        }
    }
}

/// The random stream of one tensor: ChaCha8 seeded by `seed`, on the stream
/// numbered by the 64-bit FNV-1a hash of the tensor's name.
fn tensor_rng(seed: u64, name: &str) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(fnv1a(name.as_bytes()));
    rng
}

/// 64-bit FNV-1a: a stable hash (unlike `std`'s, which may change between releases).
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preset_param_counts_match_the_contract() {
        for (config, total, active) in [
            (ModelConfig::tiny(), 542_528, 345_920),
            (ModelConfig::small(), 7_134_464, 3_988_736),
            (ModelConfig::default_6_9b(), 6_882_678_528, 1_786_599_168),
        ] {
            assert_eq!(config.param_count(), total);
            assert_eq!(config.active_param_count(), active);
        }
        assert_eq!(ParamLayout::new(&ModelConfig::tiny()).len, 542_528);
    }

    #[test]
    fn tensors_tile_the_buffer_and_names_are_unique() {
        let layout = ParamLayout::new(&ModelConfig::tiny());
        let mut end = 0;
        for t in &layout.tensors {
            assert_eq!(t.range.start, end);
            assert_eq!(t.range.len(), t.shape.iter().product::<usize>());
            end = t.range.end;
        }
        assert_eq!(end, layout.len);
        let mut names: Vec<_> = layout.tensors.iter().map(|t| &t.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), layout.tensors.len());
    }

    #[test]
    fn init_is_seeded_per_tensor() {
        let layout = ParamLayout::new(&ModelConfig::tiny());
        let a = layout.init(42);
        assert_eq!(a, layout.init(42));
        assert_ne!(a, layout.init(43));
        let q = layout.find("layers.0.attn.q_proj.weight").unwrap();
        let o = layout.find("layers.0.attn.o_proj.weight").unwrap();
        assert_ne!(a[q.range.clone()], a[o.range.clone()]);
        let gain = layout.find("final_norm.weight").unwrap();
        assert!(a[gain.range.clone()].iter().all(|&g| g == 1.0));
        let embed = &a[layout.embed.clone()];
        let var = embed.iter().map(|v| v * v).sum::<f32>() / embed.len() as f32;
        assert!((var - 2.0 / 64.0).abs() < 0.002, "variance {var}");
    }
}
