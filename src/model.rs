//! The whole model: embedding → N × [RMSNorm → attention → residual →
//! RMSNorm → MoE → residual] → final RMSNorm → LM head (CONTRACT §3), and its
//! exact backward (§5).
//!
//! All parameters live in one flat buffer laid out by [`ParamLayout`]; all
//! activations live in a [`Workspace`] planned on the first call with a given
//! shape, so later calls with the same shape allocate nothing.

use std::ops::Range;

use crate::attention::{self, AttnDims, KvCache, Qkv, QkvGrad};
use crate::config::ModelConfig;
use crate::error::{MoeError, Result};
use crate::kernels::{self, Write};
use crate::layers::{self, PackedWeights, Rope, RopeDirection, Weights};
use crate::loss;
use crate::moe::{self, MoeActs, MoeDims, MoeScratch};
use crate::params::{LayerRanges, ParamLayout};

/// A batch of token ids and next-token targets, both [B, S], row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Input ids [B·S].
    pub ids: Vec<u32>,
    /// Target ids [B·S].
    pub targets: Vec<u32>,
    /// B.
    pub batch_size: usize,
    /// S.
    pub seq_len: usize,
}

impl Batch {
    /// A batch from flat ids and targets; `ids.len()` must be a positive
    /// multiple of `batch_size` and equal `targets.len()`.
    pub fn new(ids: Vec<u32>, targets: Vec<u32>, batch_size: usize) -> Result<Self> {
        if ids.is_empty() || batch_size == 0 {
            return Err(MoeError::EmptyInput("batch"));
        }
        if !ids.len().is_multiple_of(batch_size) {
            return Err(MoeError::shape(
                "batch ids",
                format!("a multiple of batch size {batch_size}"),
                ids.len(),
            ));
        }
        if targets.len() != ids.len() {
            return Err(MoeError::shape("batch targets", ids.len(), targets.len()));
        }
        let seq_len = ids.len() / batch_size;
        Ok(Batch {
            ids,
            targets,
            batch_size,
            seq_len,
        })
    }

    /// A batch from equal-length rows.
    pub fn from_rows(ids: &[Vec<u32>], targets: &[Vec<u32>]) -> Result<Self> {
        let seq = ids.first().map_or(0, Vec::len);
        if ids.len() != targets.len() {
            return Err(MoeError::shape("batch rows", ids.len(), targets.len()));
        }
        for (b, (i, t)) in ids.iter().zip(targets).enumerate() {
            if i.len() != seq || t.len() != seq {
                return Err(MoeError::shape(
                    format!("batch row {b}"),
                    seq,
                    format!("{} ids and {} targets", i.len(), t.len()),
                ));
            }
        }
        Batch::new(ids.concat(), targets.concat(), ids.len())
    }

    /// Number of tokens, B·S.
    pub fn tokens(&self) -> usize {
        self.ids.len()
    }

    /// A batch from JSON `{"ids": [[...]], "targets": [[...]]}` (rows of equal length).
    pub fn from_json(text: &str) -> Result<Self> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Rows {
            ids: Vec<Vec<u32>>,
            targets: Vec<Vec<u32>>,
        }
        let rows: Rows = serde_json::from_str(text).map_err(|e| MoeError::Json {
            path: "<batch>".into(),
            reason: e.to_string(),
        })?;
        Batch::from_rows(&rows.ids, &rows.targets)
    }

    /// A batch from a JSON file (see [`Batch::from_json`]).
    pub fn load(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| MoeError::io(path, e))?;
        Batch::from_json(&text).map_err(|e| match e {
            MoeError::Json { reason, .. } => MoeError::Json {
                path: path.into(),
                reason,
            },
            other => other,
        })
    }
}

/// The two parts of the training loss of one forward pass.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Losses {
    /// Cross-entropy L_ce.
    pub ce: f32,
    /// Σ over layers of the load-balancing loss α·E·Σ_e f_e·P_e.
    pub aux: f32,
}

impl Losses {
    /// L_ce + Σ L_aux.
    pub fn total(&self) -> f32 {
        self.ce + self.aux
    }
}

/// Activations of one transformer block for T tokens.
#[derive(Debug, Default, Clone)]
struct LayerActs {
    /// Block input (residual stream) [T, h].
    x_in: Vec<f32>,
    /// 1/rms of `x_in` [T].
    attn_rms: Vec<f32>,
    /// RMSNorm_attn(x_in) [T, h].
    xn_attn: Vec<f32>,
    /// Fused projection output q|k|v [T, (H + 2·Hkv)·d], q and k rotated.
    qkv: Vec<f32>,
    /// Attention weights [B, H, S, L].
    probs: Vec<f32>,
    /// Attention output before o_proj [T, H·d].
    attn_out: Vec<f32>,
    /// Residual stream after attention [T, h].
    x_mid: Vec<f32>,
    /// 1/rms of `x_mid` [T].
    moe_rms: Vec<f32>,
    /// RMSNorm_moe(x_mid) [T, h].
    xn_moe: Vec<f32>,
    /// The MoE sublayer's saved state.
    moe: MoeActs,
}

/// Gradient scratch for the backward pass.
#[derive(Debug, Default, Clone)]
struct BackwardScratch {
    /// dL/dlogits [T, V].
    dlogits: Vec<f32>,
    /// dL/d(residual stream) [T, h].
    dx: Vec<f32>,
    /// dL/d(a norm's output) [T, h].
    dxn: Vec<f32>,
    /// dL/d(attention output before o_proj) [T, H·d].
    dattn: Vec<f32>,
    /// dL/d(q|k|v) [T, (H + 2·Hkv)·d].
    dqkv: Vec<f32>,
    /// dL/dP of one head [S, S].
    dp: Vec<f32>,
    /// The MoE backward's scratch.
    moe: MoeScratch,
}

/// Every activation buffer, sized for the last shape seen.
#[derive(Debug, Default, Clone)]
struct Workspace {
    /// B of the last forward.
    batch: usize,
    /// S of the last forward.
    seq: usize,
    /// Ids of the last training forward [T].
    ids: Vec<u32>,
    /// The residual stream [T, h]; after the last block, the final hidden state.
    x: Vec<f32>,
    /// One entry per block when training; inference reuses entry 0.
    layers: Vec<LayerActs>,
    /// 1/rms of the final hidden state [T].
    final_rms: Vec<f32>,
    /// RMSNorm_final(x) [T, h].
    xn_final: Vec<f32>,
    /// Logits [T, V].
    logits: Vec<f32>,
    /// Backward scratch (planned by the first training step).
    back: BackwardScratch,
}

impl Workspace {
    /// Sizes the buffers for T = batch·seq tokens attending over `keys`
    /// positions, with `n_acts` sets of block activations.
    fn plan(&mut self, config: &ModelConfig, batch: usize, seq: usize, keys: usize, n_acts: usize) {
        let tokens = batch * seq;
        let h = config.hidden_dim;
        self.batch = batch;
        self.seq = seq;
        self.x.resize(tokens * h, 0.0);
        if self.layers.len() < n_acts {
            self.layers.resize_with(n_acts, LayerActs::default);
        }
        for acts in &mut self.layers[..n_acts] {
            acts.x_in.resize(tokens * h, 0.0);
            acts.attn_rms.resize(tokens, 0.0);
            acts.xn_attn.resize(tokens * h, 0.0);
            acts.qkv.resize(tokens * config.qkv_dim(), 0.0);
            acts.probs.resize(batch * config.n_heads * seq * keys, 0.0);
            acts.attn_out.resize(tokens * h, 0.0);
            acts.x_mid.resize(tokens * h, 0.0);
            acts.moe_rms.resize(tokens, 0.0);
            acts.xn_moe.resize(tokens * h, 0.0);
            acts.moe.plan(tokens, MoeDims::new(config));
        }
        self.final_rms.resize(tokens, 0.0);
        self.xn_final.resize(tokens * h, 0.0);
        self.logits.resize(tokens * config.vocab_size, 0.0);
    }

    /// Sizes the backward scratch for the planned shape.
    fn plan_backward(&mut self, config: &ModelConfig) {
        let tokens = self.batch * self.seq;
        let h = config.hidden_dim;
        let b = &mut self.back;
        b.dlogits.resize(tokens * config.vocab_size, 0.0);
        b.dx.resize(tokens * h, 0.0);
        b.dxn.resize(tokens * h, 0.0);
        b.dattn.resize(tokens * h, 0.0);
        b.dqkv.resize(tokens * config.qkv_dim(), 0.0);
        b.dp.resize(self.seq * self.seq, 0.0);
        b.moe.plan(tokens, MoeDims::new(config));
    }
}

/// Borrowed pieces every block needs.
#[derive(Clone, Copy)]
struct Ctx<'a> {
    config: &'a ModelConfig,
    weights: Weights<'a>,
    rope: &'a Rope,
}

/// Where a block's attention finds its keys and values.
enum KvSource<'a> {
    /// Keys and values of the current batch only (training, full forward).
    Batch,
    /// A KV cache for one sequence, holding `offset` earlier positions.
    Cache {
        keys: &'a mut [f32],
        values: &'a mut [f32],
        offset: usize,
    },
}

impl KvSource<'_> {
    /// Position of the first new token.
    fn offset(&self) -> usize {
        match self {
            KvSource::Batch => 0,
            KvSource::Cache { offset, .. } => *offset,
        }
    }
}

/// A Mixture-of-Experts Transformer: its config, parameters and workspace.
#[derive(Debug, Clone)]
pub struct Model {
    config: ModelConfig,
    layout: ParamLayout,
    params: Vec<f32>,
    /// Every linear weight's (range, out, in), in the order they are packed.
    linears: Vec<(Range<usize>, usize, usize)>,
    /// Packed copies of the linear weights for inference (stale after any change).
    packed: PackedWeights,
    rope: Rope,
    ws: Workspace,
}

impl Model {
    /// A freshly initialised model (CONTRACT §2): same seed, same weights.
    pub fn new(config: ModelConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        let layout = ParamLayout::new(&config);
        let params = layout.init(seed);
        Ok(Self::assemble(config, layout, params))
    }

    /// A model with the given parameters (flat, in [`ParamLayout`] order).
    pub fn from_params(config: ModelConfig, params: Vec<f32>) -> Result<Self> {
        config.validate()?;
        let layout = ParamLayout::new(&config);
        if params.len() != layout.len {
            return Err(MoeError::shape("parameters", layout.len, params.len()));
        }
        Ok(Self::assemble(config, layout, params))
    }

    fn assemble(config: ModelConfig, layout: ParamLayout, params: Vec<f32>) -> Self {
        let rope = Rope::new(&config);
        let (h, f) = (config.hidden_dim, config.ffn_dim);
        let heads_dim = config.n_heads * config.head_dim;
        let mut linears = vec![(layout.lm_head.clone(), config.vocab_size, h)];
        for l in &layout.layers {
            linears.push((l.qkv.clone(), config.qkv_dim(), h));
            linears.push((l.o_proj.clone(), h, heads_dim));
            linears.push((l.router.clone(), config.n_experts, h));
            for e in &l.experts {
                linears.push((e.gate_up.clone(), 2 * f, h));
                linears.push((e.down.clone(), h, f));
            }
        }
        Model {
            config,
            layout,
            params,
            linears,
            packed: PackedWeights::default(),
            rope,
            ws: Workspace::default(),
        }
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Where each named parameter lives in [`Model::params`].
    pub fn layout(&self) -> &ParamLayout {
        &self.layout
    }

    /// All parameters, flat.
    pub fn params(&self) -> &[f32] {
        &self.params
    }

    /// All parameters, flat and writable (for optimizers and experiments).
    pub fn params_mut(&mut self) -> &mut [f32] {
        self.packed.invalidate();
        &mut self.params
    }

    /// Packs every linear weight for inference, unless already packed for the
    /// current parameters (allocates on the first call only).
    fn ensure_packed(&mut self) {
        if !self.packed.is_valid() {
            self.packed.build(&self.params, &self.linears);
        }
    }

    /// Logits [B, S, V] for token ids [B, S] (flat, `ids.len() = B·S`), without
    /// keeping what backward needs.
    pub fn forward(&mut self, ids: &[u32], batch: usize) -> Result<&[f32]> {
        let seq = self.check_ids(ids, batch)?;
        self.ensure_packed();
        self.run_forward(ids, batch, seq, false);
        Ok(&self.ws.logits[..ids.len() * self.config.vocab_size])
    }

    /// Logits [V] of the last of `ids` (one sequence), reading and extending
    /// `cache`: each token costs one position, earlier ones are not recomputed.
    pub fn forward_cached(&mut self, ids: &[u32], cache: &mut KvCache) -> Result<&[f32]> {
        self.check_ids(ids, 1)?;
        let cache_width = self.config.n_kv_heads * self.config.head_dim;
        if cache.keys.len() != self.config.n_layers
            || cache.keys.first().map(Vec::len) != Some(cache.capacity * cache_width)
        {
            return Err(MoeError::shape(
                "KV cache",
                "a cache built for this model's config",
                "a cache of another shape",
            ));
        }
        let (offset, seq) = (cache.len, ids.len());
        if offset + seq > cache.capacity {
            return Err(MoeError::SequenceTooLong {
                len: offset + seq,
                max: cache.capacity,
            });
        }
        self.ensure_packed();
        let config = &self.config;
        self.ws.plan(config, 1, seq, offset + seq, 1);
        let h = config.hidden_dim;
        let Model {
            layout,
            params,
            packed,
            rope,
            ws,
            ..
        } = self;
        let weights = Weights {
            params,
            packed: Some(packed),
        };
        let ctx = Ctx {
            config,
            weights,
            rope,
        };
        let x = &mut ws.x[..seq * h];
        layers::embedding_forward(x, &params[layout.embed.clone()], ids, h);
        for (l, ranges) in layout.layers.iter().enumerate() {
            let kv = KvSource::Cache {
                keys: &mut cache.keys[l],
                values: &mut cache.values[l],
                offset,
            };
            block_forward(ctx, ranges, &mut ws.layers[0], x, 1, seq, kv);
        }
        cache.len += seq;
        let last = (seq - 1) * h..seq * h;
        let vocab = config.vocab_size;
        let gamma = &params[layout.final_norm.clone()];
        layers::rmsnorm_forward(
            &mut ws.xn_final[..h],
            &mut ws.final_rms[..1],
            &x[last],
            gamma,
            config.rms_norm_eps as f32,
        );
        let w = weights.linear(layout.lm_head.clone());
        let (logits, xn) = (&mut ws.logits[..vocab], &ws.xn_final[..h]);
        layers::linear_forward(logits, xn, w, 1, h, vocab, Write::Overwrite);
        Ok(&ws.logits[..vocab])
    }

    /// Forward with activations kept, cross-entropy + aux loss, and the exact
    /// gradient of the total loss for every parameter, written into `grads`
    /// (flat, [`ParamLayout`] order). Returns the losses and the gradients'
    /// global L2 norm (summed tensor by tensor as each is written, while it is
    /// still in cache); refuses (without touching `grads`) when the loss is
    /// not finite.
    pub fn loss_and_grads(
        &mut self,
        batch: &Batch,
        aux_alpha: f32,
        grads: &mut [f32],
    ) -> Result<(Losses, f32)> {
        if grads.len() != self.params.len() {
            return Err(MoeError::shape(
                "gradient buffer",
                self.params.len(),
                grads.len(),
            ));
        }
        let losses = self.losses(batch, aux_alpha)?;
        if !losses.total().is_finite() {
            return Err(MoeError::NonFinite {
                what: "loss",
                step: 0,
            });
        }
        let sum_sq = self.backward(aux_alpha, grads);
        Ok((losses, sum_sq.sqrt() as f32))
    }

    /// The losses of `batch` (a forward that keeps activations; `dL/dlogits`
    /// is left in the workspace for the backward of [`Model::loss_and_grads`]).
    pub fn losses(&mut self, batch: &Batch, aux_alpha: f32) -> Result<Losses> {
        let seq = self.check_ids(&batch.ids, batch.batch_size)?;
        check_range(&batch.targets, self.config.vocab_size, "target")?;
        if batch.targets.len() != batch.ids.len() {
            return Err(MoeError::shape(
                "batch targets",
                batch.ids.len(),
                batch.targets.len(),
            ));
        }
        self.run_forward(&batch.ids, batch.batch_size, seq, true);
        self.ws.plan_backward(&self.config);
        let vocab = self.config.vocab_size;
        let tokens = batch.tokens();
        let ce = loss::cross_entropy(
            &mut self.ws.back.dlogits[..tokens * vocab],
            &self.ws.logits[..tokens * vocab],
            &batch.targets,
            vocab,
        );
        let experts = self.config.n_experts as f32;
        let balance: f32 = self.ws.layers[..self.config.n_layers]
            .iter()
            .map(|acts| acts.moe.balance())
            .sum();
        Ok(Losses {
            ce,
            aux: aux_alpha * experts * balance,
        })
    }

    /// The logits of the last forward, [B, S, V].
    pub fn logits(&self) -> &[f32] {
        &self.ws.logits[..self.ws.batch * self.ws.seq * self.config.vocab_size]
    }

    /// The experts chosen in `layer` by the last training forward, [T, k], in
    /// descending router probability.
    pub fn routes(&self, layer: usize) -> Option<&[u32]> {
        let acts = self.ws.layers.get(layer)?;
        Some(&acts.moe.experts[..self.ws.batch * self.ws.seq * self.config.top_k])
    }

    /// Checks ids against the vocabulary and length limits; returns S.
    fn check_ids(&self, ids: &[u32], batch: usize) -> Result<usize> {
        if ids.is_empty() || batch == 0 {
            return Err(MoeError::EmptyInput("token ids"));
        }
        if !ids.len().is_multiple_of(batch) {
            return Err(MoeError::shape(
                "token ids",
                format!("a multiple of batch size {batch}"),
                ids.len(),
            ));
        }
        let seq = ids.len() / batch;
        if seq > self.config.max_seq_len {
            return Err(MoeError::SequenceTooLong {
                len: seq,
                max: self.config.max_seq_len,
            });
        }
        check_range(ids, self.config.vocab_size, "token")?;
        Ok(seq)
    }

    /// The full forward over a validated batch; `train` keeps every block's
    /// activations (and the ids) for backward.
    fn run_forward(&mut self, ids: &[u32], batch: usize, seq: usize, train: bool) {
        let config = &self.config;
        let n_acts = if train { config.n_layers } else { 1 };
        self.ws.plan(config, batch, seq, seq, n_acts);
        let (h, vocab, tokens) = (config.hidden_dim, config.vocab_size, batch * seq);
        let Model {
            layout,
            params,
            packed,
            rope,
            ws,
            ..
        } = self;
        if train {
            ws.ids.clear();
            ws.ids.extend_from_slice(ids);
        }
        // Training changes the weights every step, so it packs as it goes;
        // inference reads the packed copies.
        let weights = Weights {
            params,
            packed: (!train && packed.is_valid()).then_some(&*packed),
        };
        let ctx = Ctx {
            config,
            weights,
            rope,
        };
        let x = &mut ws.x[..tokens * h];
        layers::embedding_forward(x, &params[layout.embed.clone()], ids, h);
        for (l, ranges) in layout.layers.iter().enumerate() {
            let acts = &mut ws.layers[if train { l } else { 0 }];
            block_forward(ctx, ranges, acts, x, batch, seq, KvSource::Batch);
        }
        let xn = &mut ws.xn_final[..tokens * h];
        let gamma = &params[layout.final_norm.clone()];
        let eps = config.rms_norm_eps as f32;
        layers::rmsnorm_forward(xn, &mut ws.final_rms[..tokens], x, gamma, eps);
        let logits = &mut ws.logits[..tokens * vocab];
        let w = weights.linear(layout.lm_head.clone());
        layers::linear_forward(logits, xn, w, tokens, h, vocab, Write::Overwrite);
    }

    /// Backward through the whole model from `dlogits` in the workspace;
    /// returns Σ g² over every gradient written.
    fn backward(&mut self, aux_alpha: f32, grads: &mut [f32]) -> f64 {
        let config = &self.config;
        let (h, vocab) = (config.hidden_dim, config.vocab_size);
        let Model {
            layout,
            params,
            rope,
            ws,
            ..
        } = self;
        let (batch, seq) = (ws.batch, ws.seq);
        let tokens = batch * seq;
        let weights = Weights {
            params,
            packed: None,
        };
        let ctx = Ctx {
            config,
            weights,
            rope,
        };
        let back = &mut ws.back;
        let dx = &mut back.dx[..tokens * h];
        let dxn = &mut back.dxn[..tokens * h];
        // logits = xn_final · W_lmᵀ
        layers::linear_backward(
            dxn,
            &mut grads[layout.lm_head.clone()],
            &back.dlogits[..tokens * vocab],
            &ws.xn_final[..tokens * h],
            &params[layout.lm_head.clone()],
            tokens,
            h,
            vocab,
            Write::Overwrite,
        );
        let mut sum_sq = kernels::sum_of_squares(&grads[layout.lm_head.clone()]);
        dx.fill(0.0);
        layers::rmsnorm_backward(
            dx,
            &mut grads[layout.final_norm.clone()],
            dxn,
            &ws.x[..tokens * h],
            &ws.final_rms[..tokens],
            &params[layout.final_norm.clone()],
        );
        sum_sq += kernels::sum_of_squares(&grads[layout.final_norm.clone()]);
        for (ranges, acts) in layout.layers.iter().zip(&ws.layers).rev() {
            let (b, s) = (batch, seq);
            sum_sq += block_backward(ctx, ranges, acts, back, grads, b, s, aux_alpha);
        }
        let dembed = &mut grads[layout.embed.clone()];
        layers::embedding_backward(dembed, &back.dx[..tokens * h], &ws.ids, h);
        sum_sq + kernels::sum_of_squares(dembed)
    }
}

/// Every id must be < `vocab`.
fn check_range(ids: &[u32], vocab: usize, what: &'static str) -> Result<()> {
    match ids.iter().position(|&id| id as usize >= vocab) {
        Some(position) => Err(MoeError::TokenOutOfRange {
            what,
            id: ids[position],
            position,
            vocab_size: vocab,
        }),
        None => Ok(()),
    }
}

/// One transformer block, forward; `x` [T, h] is the residual stream, updated in place.
///   x_mid = x + Attn(RMSNorm_attn(x));   x_out = x_mid + MoE(RMSNorm_moe(x_mid))
fn block_forward(
    ctx: Ctx<'_>,
    ranges: &LayerRanges,
    acts: &mut LayerActs,
    x: &mut [f32],
    batch: usize,
    seq: usize,
    kv: KvSource<'_>,
) {
    let config = ctx.config;
    let (h, d) = (config.hidden_dim, config.head_dim);
    let (heads_dim, kv_dim, width) = (config.n_heads * d, config.n_kv_heads * d, config.qkv_dim());
    let tokens = batch * seq;
    let weights = ctx.weights;
    acts.x_in[..tokens * h].copy_from_slice(x);
    let xn = &mut acts.xn_attn[..tokens * h];
    let gamma = weights.raw(ranges.attn_norm.clone());
    let eps = config.rms_norm_eps as f32;
    layers::rmsnorm_forward(xn, &mut acts.attn_rms[..tokens], x, gamma, eps);
    let qkv = &mut acts.qkv[..tokens * width];
    let w = weights.linear(ranges.qkv.clone());
    layers::linear_forward(qkv, xn, w, tokens, h, width, Write::Overwrite);
    let offset = kv.offset();
    // RoPE on q and k (the first H + Hkv heads of each row), not v.
    for (t, row) in qkv.chunks_exact_mut(width).enumerate() {
        ctx.rope.rotate(
            &mut row[..heads_dim + kv_dim],
            offset + t % seq,
            RopeDirection::Forward,
        );
    }
    let dims = AttnDims::new(config);
    let keys = offset + seq;
    let per_seq_probs = config.n_heads * seq * keys;
    match kv {
        KvSource::Batch => {
            for b in 0..batch {
                let q = &qkv[b * seq * width..(b + 1) * seq * width];
                let view = Qkv {
                    q,
                    q_stride: width,
                    k: &q[heads_dim..],
                    v: &q[heads_dim + kv_dim..],
                    kv_stride: width,
                };
                let out = &mut acts.attn_out[b * seq * heads_dim..(b + 1) * seq * heads_dim];
                let probs = &mut acts.probs[b * per_seq_probs..(b + 1) * per_seq_probs];
                attention::attention_forward(out, probs, view, seq, 0, dims);
            }
        }
        KvSource::Cache {
            keys: cache_k,
            values: cache_v,
            offset,
        } => {
            for (s, row) in qkv.chunks_exact(width).enumerate() {
                let at = (offset + s) * kv_dim;
                cache_k[at..at + kv_dim].copy_from_slice(&row[heads_dim..heads_dim + kv_dim]);
                cache_v[at..at + kv_dim].copy_from_slice(&row[heads_dim + kv_dim..]);
            }
            let view = Qkv {
                q: qkv,
                q_stride: width,
                k: &cache_k[..keys * kv_dim],
                v: &cache_v[..keys * kv_dim],
                kv_stride: kv_dim,
            };
            let out = &mut acts.attn_out[..seq * heads_dim];
            let probs = &mut acts.probs[..per_seq_probs];
            attention::attention_forward(out, probs, view, seq, offset, dims);
        }
    }
    // x_mid = x + attn_out · W_oᵀ
    let attn_out = &acts.attn_out[..tokens * heads_dim];
    let w = weights.linear(ranges.o_proj.clone());
    layers::linear_forward(x, attn_out, w, tokens, heads_dim, h, Write::Accumulate);
    acts.x_mid[..tokens * h].copy_from_slice(x);
    let xn = &mut acts.xn_moe[..tokens * h];
    let gamma = weights.raw(ranges.moe_norm.clone());
    layers::rmsnorm_forward(xn, &mut acts.moe_rms[..tokens], x, gamma, eps);
    let dims = MoeDims::new(config);
    moe::moe_forward(x, &mut acts.moe, xn, weights, ranges, tokens, dims);
}

/// One transformer block, backward. `back.dx` [T, h] holds dL/d(block output)
/// on entry and dL/d(block input) on exit; the block's parameter gradients are
/// written into `grads`. Returns Σ g² over them.
#[allow(clippy::too_many_arguments)]
fn block_backward(
    ctx: Ctx<'_>,
    ranges: &LayerRanges,
    acts: &LayerActs,
    back: &mut BackwardScratch,
    grads: &mut [f32],
    batch: usize,
    seq: usize,
    aux_alpha: f32,
) -> f64 {
    let config = ctx.config;
    let (h, d) = (config.hidden_dim, config.head_dim);
    let (heads_dim, kv_dim, width) = (config.n_heads * d, config.n_kv_heads * d, config.qkv_dim());
    let tokens = batch * seq;
    let params = ctx.weights.params;
    let dx = &mut back.dx[..tokens * h];
    let dxn = &mut back.dxn[..tokens * h];
    // MoE sublayer: x_out = x_mid + MoE(RMSNorm_moe(x_mid)).
    let mut sum_sq = moe::moe_backward(
        dxn,
        grads,
        &mut back.moe,
        dx,
        &acts.xn_moe[..tokens * h],
        &acts.moe,
        params,
        ranges,
        tokens,
        aux_alpha,
        MoeDims::new(config),
    );
    layers::rmsnorm_backward(
        dx,
        &mut grads[ranges.moe_norm.clone()],
        dxn,
        &acts.x_mid[..tokens * h],
        &acts.moe_rms[..tokens],
        &params[ranges.moe_norm.clone()],
    );
    sum_sq += kernels::sum_of_squares(&grads[ranges.moe_norm.clone()]);
    // Attention sublayer: x_mid = x_in + Attn(RMSNorm_attn(x_in)).
    let dattn = &mut back.dattn[..tokens * heads_dim];
    layers::linear_backward(
        dattn,
        &mut grads[ranges.o_proj.clone()],
        dx,
        &acts.attn_out[..tokens * heads_dim],
        &params[ranges.o_proj.clone()],
        tokens,
        heads_dim,
        h,
        Write::Overwrite,
    );
    sum_sq += kernels::sum_of_squares(&grads[ranges.o_proj.clone()]);
    let dims = AttnDims::new(config);
    let dqkv = &mut back.dqkv[..tokens * width];
    for b in 0..batch {
        let q = &acts.qkv[b * seq * width..(b + 1) * seq * width];
        let view = Qkv {
            q,
            q_stride: width,
            k: &q[heads_dim..],
            v: &q[heads_dim + kv_dim..],
            kv_stride: width,
        };
        let grad = QkvGrad {
            buf: &mut dqkv[b * seq * width..(b + 1) * seq * width],
            stride: width,
            k_col: heads_dim,
            v_col: heads_dim + kv_dim,
        };
        let probs = &acts.probs[b * config.n_heads * seq * seq..][..config.n_heads * seq * seq];
        let dout = &dattn[b * seq * heads_dim..(b + 1) * seq * heads_dim];
        attention::attention_backward(grad, &mut back.dp, dout, probs, view, seq, dims);
    }
    for (t, row) in dqkv.chunks_exact_mut(width).enumerate() {
        ctx.rope.rotate(
            &mut row[..heads_dim + kv_dim],
            t % seq,
            RopeDirection::Backward,
        );
    }
    layers::linear_backward(
        dxn,
        &mut grads[ranges.qkv.clone()],
        dqkv,
        &acts.xn_attn[..tokens * h],
        &params[ranges.qkv.clone()],
        tokens,
        h,
        width,
        Write::Overwrite,
    );
    sum_sq += kernels::sum_of_squares(&grads[ranges.qkv.clone()]);
    layers::rmsnorm_backward(
        dx,
        &mut grads[ranges.attn_norm.clone()],
        dxn,
        &acts.x_in[..tokens * h],
        &acts.attn_rms[..tokens],
        &params[ranges.attn_norm.clone()],
    );
    sum_sq + kernels::sum_of_squares(&grads[ranges.attn_norm.clone()])
}
