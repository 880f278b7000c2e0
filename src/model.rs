//! The whole model: embedding → N × [RMSNorm → attention → residual →
//! RMSNorm → MoE → residual] → final RMSNorm → LM head (CONTRACT §3), and its
//! exact backward (§5).
//!
//! All parameters live in one flat buffer laid out by [`ParamLayout`]; each
//! part of the model ([`Embedding`], [`RmsNorm`], [`Attention`], [`MoeBlock`],
//! [`DecoderLayer`], …) is a typed view into it, built per call without
//! allocating. All activations live in a [`Workspace`] planned on the first
//! call with a given shape, so later calls with the same shape allocate nothing.

use crate::attention::{Attention, AttnActs, AttnDims, AttnScratch, KvCache, KvSource};
use crate::config::ModelConfig;
use crate::dropout::{Dropout, Mask, Site};
use crate::error::{MoeError, Result};
use crate::kernels::{self, Buffer, Stream, Write};
use crate::layers::{Embedding, Linear, PackedWeights, Param, RmsNorm, Rope, Shape, Weights};
use crate::loss;
use crate::memory;
use crate::moe::{MoeActs, MoeBlock, MoeDims, MoeScratch};
use crate::params::{Grads, LayerRanges, OuterGrads, ParamLayout};

pub use crate::batch::Batch;

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

/// What one decoder layer saves for backward, for T tokens.
#[derive(Debug, Default, Clone)]
struct LayerActs {
    /// Layer input (residual stream) [T, h].
    x_in: Vec<f32>,
    /// 1/rms of `x_in` [T].
    attn_rms: Vec<f32>,
    /// The attention sublayer's saved state (its input RMSNorm_attn(x_in) included).
    attn: AttnActs,
    /// Residual stream after attention [T, h].
    x_mid: Vec<f32>,
    /// 1/rms of `x_mid` [T].
    moe_rms: Vec<f32>,
    /// The MoE sublayer's saved state (its input RMSNorm_moe(x_mid) included).
    moe: MoeActs,
}

impl LayerActs {
    /// Sizes the buffers for `shape` attending over `keys` positions.
    fn plan(&mut self, config: &ModelConfig, shape: Shape, keys: usize) {
        let (tokens, h) = (shape.tokens(), config.hidden_dim);
        self.x_in.resize(tokens * h, 0.0);
        self.attn_rms.resize(tokens, 0.0);
        self.attn.plan(shape, keys, h, AttnDims::new(config));
        self.x_mid.resize(tokens * h, 0.0);
        self.moe_rms.resize(tokens, 0.0);
        self.moe.plan(tokens, MoeDims::new(config));
    }
}

/// Gradient scratch for the backward pass.
#[derive(Debug, Default, Clone)]
struct BackwardScratch {
    /// dL/dlogits of the LM head [T, V].
    dlogits: Vec<f32>,
    /// Each position's cross-entropy [T], summed in order.
    row_losses: Vec<f32>,
    /// dL/d(residual stream) [T, h].
    dx: Vec<f32>,
    /// dL/d(a norm's output) [T, h].
    dxn: Vec<f32>,
    /// dL/d(a sublayer's output) through a dropout mask [T, h].
    dbranch: Vec<f32>,
    /// The attention backward's scratch.
    attn: AttnScratch,
    /// The MoE backward's scratch.
    moe: MoeScratch,
}

/// Every activation buffer, sized for the last shape seen.
#[derive(Debug, Default, Clone)]
struct Workspace {
    /// Shape of the last forward.
    shape: Shape,
    /// Ids of the last training forward [T].
    ids: Vec<u32>,
    /// The residual stream [T, h]; after the last layer, the final hidden state.
    x: Vec<f32>,
    /// A sublayer's output before its dropout mask [T, h].
    branch: Vec<f32>,
    /// The dropout of the last training forward, for its backward.
    dropout: Option<Dropout>,
    /// One entry per layer when training; inference reuses entry 0.
    layers: Vec<LayerActs>,
    /// Entries of `layers` the last forward filled, one per layer (1 for inference).
    kept_layers: usize,
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
    /// Sizes the buffers for `shape` attending over `keys` positions, with
    /// `n_acts` sets of layer activations.
    fn plan(&mut self, config: &ModelConfig, shape: Shape, keys: usize, n_acts: usize) {
        let (tokens, h) = (shape.tokens(), config.hidden_dim);
        self.shape = shape;
        self.kept_layers = n_acts;
        self.x.resize(tokens * h, 0.0);
        self.branch.resize(tokens * h, 0.0);
        if self.layers.len() < n_acts {
            self.layers.resize_with(n_acts, LayerActs::default);
        }
        for acts in &mut self.layers[..n_acts] {
            acts.plan(config, shape, keys);
        }
        self.final_rms.resize(tokens, 0.0);
        self.xn_final.resize(tokens * h, 0.0);
        self.logits.resize(tokens * config.vocab_size, 0.0);
    }

    /// Sizes the backward scratch for the planned shape.
    fn plan_backward(&mut self, config: &ModelConfig) {
        let (tokens, h) = (self.shape.tokens(), config.hidden_dim);
        let b = &mut self.back;
        b.dlogits.resize(tokens * config.vocab_size, 0.0);
        b.row_losses.resize(tokens, 0.0);
        b.dx.resize(tokens * h, 0.0);
        b.dxn.resize(tokens * h, 0.0);
        b.dbranch.resize(tokens * h, 0.0);
        b.attn.plan(self.shape, AttnDims::new(config));
        b.moe.plan(tokens, MoeDims::new(config));
    }
}

/// One decoder layer: `layers.{l}.*`.
///   x_mid = x + Attn(RMSNorm_attn(x));   x_out = x_mid + MoE(RMSNorm_moe(x_mid))
#[derive(Debug, Clone)]
struct DecoderLayer<'a> {
    /// `attn_norm`.
    attn_norm: RmsNorm<'a>,
    /// `attn`.
    attn: Attention<'a>,
    /// `moe_norm`.
    moe_norm: RmsNorm<'a>,
    /// `moe`.
    moe: MoeBlock<'a>,
    /// h.
    hidden: usize,
}

impl<'a> DecoderLayer<'a> {
    /// The layer at `ranges` of `weights`.
    fn new(
        weights: Weights<'a>,
        ranges: &'a LayerRanges,
        config: &ModelConfig,
        rope: &'a Rope,
    ) -> Self {
        DecoderLayer {
            attn_norm: RmsNorm {
                weight: Param::new(weights, &ranges.attn_norm),
                eps: config.rms_norm_eps as f32,
            },
            attn: Attention::new(weights, ranges, config, rope),
            moe_norm: RmsNorm {
                weight: Param::new(weights, &ranges.moe_norm),
                eps: config.rms_norm_eps as f32,
            },
            moe: MoeBlock::new(weights, ranges, MoeDims::new(config)),
            hidden: config.hidden_dim,
        }
    }

    /// Forward; `x` [T, h] is the residual stream, updated in place. With
    /// `drop` (training with dropout), each sublayer's output goes through its
    /// mask, by way of the scratch `branch` [T, h].
    fn forward(
        &self,
        x: &mut [f32],
        acts: &mut LayerActs,
        shape: Shape,
        kv: KvSource<'_>,
        drop: Option<(LayerMasks, &mut [f32])>,
    ) {
        let tokens = shape.tokens();
        let (masks, branch) = drop.unzip();
        let mut branch = branch;
        acts.x_in[..x.len()].copy_from_slice(x);
        let xn = &mut acts.attn.xn[..x.len()];
        self.attn_norm.forward(xn, &mut acts.attn_rms[..tokens], x);
        let attn = masks.map(|m| m.attention).zip(branch.as_deref_mut());
        add_output(x, attn, |out| {
            self.attn.forward(out, &mut acts.attn, shape, kv)
        });
        acts.x_mid[..x.len()].copy_from_slice(x);
        let xn = &mut acts.moe.xn[..x.len()];
        self.moe_norm.forward(xn, &mut acts.moe_rms[..tokens], x);
        let moe = masks.map(|m| m.moe).zip(branch);
        add_output(x, moe, |out| self.moe.forward(out, &mut acts.moe));
    }

    /// Backward. `back.dx` [T, h] holds dL/d(layer output) on entry and
    /// dL/d(layer input) on exit; the layer's weight gradients go to `grads`,
    /// counted as one subtotal.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        acts: &LayerActs,
        back: &mut BackwardScratch,
        grads: &mut Grads<'_>,
        shape: Shape,
        aux_alpha: f32,
        masks: Option<LayerMasks>,
    ) {
        let (tokens, n) = (shape.tokens(), shape.tokens() * self.hidden);
        let (dx, dxn) = (&mut back.dx[..n], &mut back.dxn[..n]);
        let dbranch = &mut back.dbranch[..n];
        grads.subtotal(|grads| {
            // x_out = x_mid + m_moe ⊙ MoE(RMSNorm_moe(x_mid))
            let dout = output_grad(dx, masks.map(|m| m.moe), dbranch);
            self.moe
                .backward(dxn, dout, &acts.moe, &mut back.moe, grads, aux_alpha);
            let (x_mid, moe_rms) = (&acts.x_mid[..n], &acts.moe_rms[..tokens]);
            self.moe_norm.backward(dx, dxn, x_mid, moe_rms, grads);
            // x_mid = x_in + m_attn ⊙ Attn(RMSNorm_attn(x_in))
            let dout = output_grad(dx, masks.map(|m| m.attention), dbranch);
            self.attn
                .backward(dxn, dout, &acts.attn, &mut back.attn, grads, shape);
            let (x_in, attn_rms) = (&acts.x_in[..n], &acts.attn_rms[..tokens]);
            self.attn_norm.backward(dx, dxn, x_in, attn_rms, grads);
        });
    }
}

/// The dropout masks of one decoder layer's two sublayer outputs.
#[derive(Debug, Clone, Copy)]
struct LayerMasks {
    attention: Mask,
    moe: Mask,
}

impl LayerMasks {
    /// Layer `l`'s masks under `dropout`.
    fn of(dropout: Dropout, l: usize) -> Self {
        LayerMasks {
            attention: dropout.mask(l, Site::Attention),
            moe: dropout.mask(l, Site::Moe),
        }
    }
}

/// x += the output that `sublayer` adds into the buffer it is given: into x
/// itself, or with a dropout mask into `branch` first (zeroed), then
///   x ← x + m ⊙ branch
fn add_output(x: &mut [f32], drop: Option<(Mask, &mut [f32])>, sublayer: impl FnOnce(&mut [f32])) {
    match drop {
        None => sublayer(x),
        Some((mask, branch)) => {
            let branch = &mut branch[..x.len()];
            branch.fill(0.0);
            sublayer(branch);
            mask.add_dropped(x, branch);
        }
    }
}

/// dL/d(a sublayer's output) from dL/dx: dx itself, or m ⊙ dx in `dbranch`.
fn output_grad<'b>(dx: &'b [f32], mask: Option<Mask>, dbranch: &'b mut [f32]) -> &'b [f32] {
    match mask {
        None => dx,
        Some(mask) => {
            mask.apply(dbranch, dx);
            dbranch
        }
    }
}

/// The whole model as named parts, viewing one parameter buffer.
#[derive(Debug, Clone)]
struct ModelView<'a> {
    /// Sizes.
    config: &'a ModelConfig,
    /// Where each layer's tensors live.
    layout: &'a ParamLayout,
    /// The parameters (with packed copies for inference).
    weights: Weights<'a>,
    /// Rotary-embedding tables.
    rope: &'a Rope,
    /// `embed`.
    embed: Embedding<'a>,
    /// `final_norm`.
    final_norm: RmsNorm<'a>,
    /// `lm_head` [V, h].
    lm_head: Linear<'a>,
}

impl<'a> ModelView<'a> {
    fn new(
        config: &'a ModelConfig,
        layout: &'a ParamLayout,
        weights: Weights<'a>,
        rope: &'a Rope,
    ) -> Self {
        let (h, vocab) = (config.hidden_dim, config.vocab_size);
        ModelView {
            config,
            layout,
            weights,
            rope,
            embed: Embedding {
                weight: Param::new(weights, &layout.embed),
                hidden: h,
            },
            final_norm: RmsNorm {
                weight: Param::new(weights, &layout.final_norm),
                eps: config.rms_norm_eps as f32,
            },
            lm_head: Linear::new(weights, &layout.lm_head, vocab, h),
        }
    }

    /// Decoder layer `l` (`layers.{l}`).
    fn layer(&self, l: usize) -> DecoderLayer<'a> {
        DecoderLayer::new(self.weights, &self.layout.layers[l], self.config, self.rope)
    }
}

/// What a forward pass is for.
enum Pass<'c> {
    /// Keep every layer's activations and the ids, for backward.
    Train,
    /// Logits of every position, nothing kept.
    Infer,
    /// One sequence continuing the positions in a KV cache, which it extends;
    /// logits of its last position only.
    Decode(&'c mut KvCache),
}

impl Pass<'_> {
    /// Positions already cached before the new tokens.
    fn offset(&self) -> usize {
        match self {
            Pass::Decode(cache) => cache.len,
            _ => 0,
        }
    }

    /// Where layer `l` finds its keys and values.
    fn kv(&mut self, l: usize) -> KvSource<'_> {
        match self {
            Pass::Decode(cache) => KvSource::Cache {
                offset: cache.len,
                keys: &mut cache.keys[l],
                values: &mut cache.values[l],
            },
            _ => KvSource::Batch,
        }
    }
}

/// A Mixture-of-Experts Transformer: its config, parameters and workspace.
#[derive(Debug, Clone)]
pub struct Model {
    config: ModelConfig,
    layout: ParamLayout,
    /// All parameters, flat, in the parameters' quarter of a page (see
    /// `kernels::Stream`).
    params: Buffer,
    /// Every linear weight's (range, out, in), in the order they are packed.
    linears: Vec<(std::ops::Range<usize>, usize, usize)>,
    /// Packed copies of the linear weights for inference (stale after any change).
    packed: PackedWeights,
    rope: Rope,
    ws: Workspace,
    /// The dropout of the gradient passes ([`Model::set_dropout`]).
    dropout: Option<Dropout>,
}

impl Model {
    /// A freshly initialised model (CONTRACT §2): same seed, same weights.
    pub fn new(config: ModelConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        ensure_model_fits(&config)?;
        let layout = ParamLayout::new(&config);
        let params = layout.init(seed);
        Ok(Self::assemble(config, layout, params))
    }

    /// A model with the given parameters (flat, in [`ParamLayout`] order).
    pub fn from_params(config: ModelConfig, params: Vec<f32>) -> Result<Self> {
        config.validate()?;
        ensure_model_fits(&config)?;
        let layout = ParamLayout::new(&config);
        if params.len() != layout.len {
            return Err(MoeError::shape("parameters", layout.len, params.len()));
        }
        Ok(Self::assemble(config, layout, params))
    }

    fn assemble(config: ModelConfig, layout: ParamLayout, params: Vec<f32>) -> Self {
        let params = Buffer::from_vec(params, Stream::Params);
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
            dropout: None,
        }
    }

    /// The residual dropout of the next gradient passes
    /// ([`Model::loss_and_grads`], [`Model::loss_and_factored_grads`]; see
    /// [`crate::dropout`]); `None` (the default) or p = 0 drops nothing.
    /// Inference and [`Model::losses`] never drop. A rate outside [0, 1) is
    /// refused (and the setting left as it was).
    pub fn set_dropout(&mut self, dropout: Option<Dropout>) -> Result<()> {
        if let Some(d) = dropout.filter(|d| !(0.0..1.0).contains(&d.p)) {
            return Err(MoeError::InvalidTraining(format!(
                "dropout = {} must be in [0, 1)",
                d.p
            )));
        }
        self.dropout = dropout.filter(|d| d.p > 0.0);
        Ok(())
    }

    /// The dropout of the gradient passes (`None` when nothing is dropped).
    pub fn dropout(&self) -> Option<Dropout> {
        self.dropout
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
    /// current parameters (allocates on the first call only). Refuses, before
    /// allocating, when the weights and their packed copy do not fit together.
    fn ensure_packed(&mut self) -> Result<()> {
        if !self.packed.is_valid() {
            memory::ensure_fits(
                || {
                    format!(
                        "inference with a model of {} parameters (its weights, tables and packed copy)",
                        self.config.param_count()
                    )
                },
                self.inference_bytes(),
                "",
            )?;
            self.packed.build(&self.params, &self.linears);
        }
        Ok(())
    }

    /// Bytes an inference model holds: weights and RoPE tables
    /// ([`ModelConfig::model_bytes`]) plus the packed copy of every linear
    /// weight (`kernels::packed_weight_len` f32 each, rows padded to whole
    /// panels); `None` when the sum overflows.
    pub fn inference_bytes(&self) -> Option<u64> {
        let packed = self.linears.iter().try_fold(0u64, |sum, (_, out, inp)| {
            sum.checked_add(u64::try_from(kernels::packed_weight_len(*out, *inp)).ok()?)
        })?;
        packed
            .checked_mul(4)?
            .checked_add(self.config.model_bytes())
    }

    /// The model's named parts and its workspace. Training changes the
    /// weights every step, so it packs as it goes (`packed` false); inference
    /// reads the packed copies.
    fn split(&mut self, packed: bool) -> (ModelView<'_>, &mut Workspace) {
        let weights = Weights {
            params: &self.params,
            packed: (packed && self.packed.is_valid()).then_some(&self.packed),
        };
        let view = ModelView::new(&self.config, &self.layout, weights, &self.rope);
        (view, &mut self.ws)
    }

    /// Logits [B, S, V] for token ids [B, S] (flat, `ids.len() = B·S`), without
    /// keeping what backward needs.
    pub fn forward(&mut self, ids: &[u32], batch: usize) -> Result<&[f32]> {
        let seq = self.check_ids(ids, batch, false)?;
        self.ensure_packed()?;
        self.run_forward(ids, Shape { batch, seq }, Pass::Infer);
        Ok(&self.ws.logits[..ids.len() * self.config.vocab_size])
    }

    /// Logits [V] of the last of `ids` (one sequence), reading and extending
    /// `cache`: each token costs one position, earlier ones are not recomputed.
    pub fn forward_cached(&mut self, ids: &[u32], cache: &mut KvCache) -> Result<&[f32]> {
        self.check_ids(ids, 1, false)?;
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
        self.ensure_packed()?;
        self.run_forward(ids, Shape { batch: 1, seq }, Pass::Decode(cache));
        cache.len += seq;
        Ok(&self.ws.logits[..self.config.vocab_size])
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
        self.check_gradient_buffer(grads)?;
        self.loss_and_backward(batch, aux_alpha, Grads::new(grads))
    }

    /// As [`Model::loss_and_grads`], but a linear weight's gradient
    /// dW = dyᵀ·x is kept in `factored` as dy and x whenever they are smaller
    /// than dW (few tokens): its part of `grads` is then left as it was, and
    /// the optimizer forms dW in cache ([`crate::kernels::adamw_tensors`]).
    /// The training step's path.
    pub fn loss_and_factored_grads(
        &mut self,
        batch: &Batch,
        aux_alpha: f32,
        grads: &mut [f32],
        factored: &mut OuterGrads,
    ) -> Result<(Losses, f32)> {
        self.check_gradient_buffer(grads)?;
        self.loss_and_backward(batch, aux_alpha, Grads::factoring(grads, factored))
    }

    fn check_gradient_buffer(&self, grads: &[f32]) -> Result<()> {
        if grads.len() != self.params.len() {
            return Err(MoeError::shape(
                "gradient buffer",
                self.params.len(),
                grads.len(),
            ));
        }
        Ok(())
    }

    /// Losses, then the backward into `grads`; refuses a non-finite loss.
    fn loss_and_backward(
        &mut self,
        batch: &Batch,
        aux_alpha: f32,
        mut grads: Grads<'_>,
    ) -> Result<(Losses, f32)> {
        let losses = self.losses_with_dropout(batch, aux_alpha, self.dropout)?;
        if !losses.total().is_finite() {
            return Err(MoeError::NonFiniteValue { what: "loss" });
        }
        self.backward(aux_alpha, &mut grads);
        Ok((losses, grads.sum_sq().sqrt() as f32))
    }

    /// The losses of `batch` (a forward that keeps activations; `dL/dlogits`
    /// is left in the workspace for the backward of [`Model::loss_and_grads`]).
    pub fn losses(&mut self, batch: &Batch, aux_alpha: f32) -> Result<Losses> {
        self.losses_with_dropout(batch, aux_alpha, None)
    }

    /// [`Model::losses`] of a training forward with `dropout` on the sublayer
    /// outputs: the loss a gradient pass under that dropout differentiates.
    pub fn losses_with_dropout(
        &mut self,
        batch: &Batch,
        aux_alpha: f32,
        dropout: Option<Dropout>,
    ) -> Result<Losses> {
        let seq = self.check_ids(&batch.ids, batch.batch_size, true)?;
        check_range(&batch.targets, self.config.vocab_size, "target")?;
        if batch.targets.len() != batch.ids.len() {
            return Err(MoeError::shape(
                "batch targets",
                batch.ids.len(),
                batch.targets.len(),
            ));
        }
        let shape = Shape {
            batch: batch.batch_size,
            seq,
        };
        self.ws.dropout = dropout.filter(|d| d.p > 0.0);
        self.run_forward(&batch.ids, shape, Pass::Train);
        self.ws.plan_backward(&self.config);
        let vocab = self.config.vocab_size;
        let tokens = batch.tokens();
        // L_ce = mean_t −log softmax(logits_t)[target_t]; dL/dlogits kept for backward.
        let back = &mut self.ws.back;
        let ce = loss::cross_entropy(
            &mut back.dlogits[..tokens * vocab],
            &mut back.row_losses[..tokens],
            &self.ws.logits[..tokens * vocab],
            &batch.targets,
        );
        // L_aux = Σ_layers α·E·Σ_e f_e·P_e
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
        &self.ws.logits[..self.ws.shape.tokens() * self.config.vocab_size]
    }

    /// The experts chosen in `layer` by the last forward, [T, k], in
    /// descending router probability; `None` for a layer the last forward did
    /// not keep (an inference forward keeps none of a multi-layer model's).
    pub fn routes(&self, layer: usize) -> Option<&[u32]> {
        if self.ws.kept_layers < self.config.n_layers {
            return None;
        }
        let acts = self.ws.layers.get(layer)?;
        Some(&acts.moe.experts[..self.ws.shape.tokens() * self.config.top_k])
    }

    /// Checks ids against the vocabulary, length and memory limits (of a
    /// training forward when `train`); returns S.
    fn check_ids(&self, ids: &[u32], batch: usize, train: bool) -> Result<usize> {
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
        let need = self.config.activation_bytes(batch, seq, seq, train);
        memory::ensure_fits(
            || format!("a forward over {batch} × {seq} tokens"),
            need,
            "",
        )?;
        Ok(seq)
    }

    /// The one forward over validated ids, for training, inference and
    /// KV-cached decoding alike (see [`Pass`]). Logits go to the workspace:
    /// all T rows, or with a cache only the last position's.
    fn run_forward(&mut self, ids: &[u32], shape: Shape, mut pass: Pass<'_>) {
        let train = matches!(pass, Pass::Train);
        let n_layers = self.config.n_layers;
        let offset = pass.offset();
        let n_acts = if train { n_layers } else { 1 };
        self.ws
            .plan(&self.config, shape, offset + shape.seq, n_acts);
        let (view, ws) = self.split(!train);
        if train {
            ws.ids.clear();
            ws.ids.extend_from_slice(ids);
        }
        let h = view.config.hidden_dim;
        let x = &mut ws.x[..shape.tokens() * h];
        view.embed.forward(x, ids);
        let dropout = ws.dropout.filter(|_| train);
        for l in 0..n_layers {
            let acts = &mut ws.layers[if train { l } else { 0 }];
            let drop = dropout.map(|d| (LayerMasks::of(d, l), &mut ws.branch[..]));
            view.layer(l).forward(x, acts, shape, pass.kv(l), drop);
        }
        // Decoding needs the logits of the last position only.
        let first = match pass {
            Pass::Decode(_) => shape.tokens() - 1,
            _ => 0,
        };
        let rows = shape.tokens() - first;
        let xn = &mut ws.xn_final[..rows * h];
        view.final_norm
            .forward(xn, &mut ws.final_rms[..rows], &x[first * h..]);
        // logits = xn_final · W_lmᵀ
        let logits = &mut ws.logits[..rows * view.config.vocab_size];
        view.lm_head.forward(logits, xn, Write::Overwrite);
    }

    /// Backward through the whole model from dL/dlogits in the workspace,
    /// every gradient written into (and counted by) `grads`.
    fn backward(&mut self, aux_alpha: f32, grads: &mut Grads<'_>) {
        let (view, ws) = self.split(false);
        let shape = ws.shape;
        let (tokens, h) = (shape.tokens(), view.config.hidden_dim);
        let vocab = view.config.vocab_size;
        let back = &mut ws.back;
        let (dx, dxn) = (&mut back.dx[..tokens * h], &mut back.dxn[..tokens * h]);
        // logits = xn_final · W_lmᵀ
        let (dlogits, xn_final) = (&back.dlogits[..tokens * vocab], &ws.xn_final[..tokens * h]);
        view.lm_head
            .backward(dxn, dlogits, xn_final, Write::Overwrite, grads);
        dx.fill(0.0);
        let (x, final_rms) = (&ws.x[..tokens * h], &ws.final_rms[..tokens]);
        view.final_norm.backward(dx, dxn, x, final_rms, grads);
        for (l, acts) in ws.layers[..view.config.n_layers].iter().enumerate().rev() {
            let masks = ws.dropout.map(|d| LayerMasks::of(d, l));
            view.layer(l)
                .backward(acts, back, grads, shape, aux_alpha, masks);
        }
        view.embed.backward(&back.dx[..tokens * h], &ws.ids, grads);
    }
}

/// Refuses a config whose weights and tables do not fit in memory.
fn ensure_model_fits(config: &ModelConfig) -> Result<()> {
    memory::ensure_model_fits(config, 0, 0)
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
