//! Model configuration (CONTRACT §1) and training hyper-parameters (§6).
//!
//! Both are plain structs that load from and save to JSON with exactly the
//! contract's keys; unknown keys are an error. `validate` turns every
//! inconsistent combination into [`MoeError::InvalidConfig`].

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{MoeError, Result, parse_json};

/// Bytes of bookkeeping counted per named tensor, an upper bound on what a
/// model and its loaders keep for each: its `TensorSpec` (name, shape,
/// range), its entry in the list of linear weights and in a loader's map
/// from file names to tensors.
pub const BYTES_PER_TENSOR: u64 = 512;

/// The shape of a model: every size the parameters and activations depend on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Width of the residual stream, h.
    pub hidden_dim: usize,
    /// Number of transformer blocks.
    pub n_layers: usize,
    /// Query heads, H.
    pub n_heads: usize,
    /// Key/value heads, Hkv (1 = multi-query attention).
    pub n_kv_heads: usize,
    /// Size of one head, d (H·d must equal h; d must be even for RoPE pairs).
    pub head_dim: usize,
    /// Experts per MoE layer, E.
    pub n_experts: usize,
    /// Experts each token is routed to, k.
    pub top_k: usize,
    /// Hidden size of one SwiGLU expert, F.
    pub ffn_dim: usize,
    /// Vocabulary size, V.
    pub vocab_size: usize,
    /// Longest sequence (including any KV cache) the model accepts.
    pub max_seq_len: usize,
    /// RoPE base frequency.
    pub rope_base: f64,
    /// NTK-aware RoPE scaling factor (≤ 1 means no scaling).
    pub rope_alpha: f64,
    /// RMSNorm ε inside the square root (Hugging Face Mixtral uses 1e-5).
    /// Written only when it is not the default, so configs of the contract's
    /// twelve keys stay readable by every strict reader (the Rosetta tracks).
    #[serde(
        default = "ModelConfig::default_rms_norm_eps",
        skip_serializing_if = "ModelConfig::has_default_rms_norm_eps"
    )]
    pub rms_norm_eps: f64,
}

impl ModelConfig {
    /// The `tiny` preset: h = 64, 2 layers, 4 experts (542,528 parameters).
    pub fn tiny() -> Self {
        ModelConfig {
            hidden_dim: 64,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: 1,
            head_dim: 16,
            n_experts: 4,
            top_k: 2,
            ffn_dim: 256,
            vocab_size: 1000,
            max_seq_len: 512,
            rope_base: 10000.0,
            rope_alpha: 1.0,
            rms_norm_eps: Self::default_rms_norm_eps(),
        }
    }

    /// RMSNorm ε of configs that do not name one (CONTRACT §3).
    pub fn default_rms_norm_eps() -> f64 {
        1e-6
    }

    fn has_default_rms_norm_eps(eps: &f64) -> bool {
        *eps == Self::default_rms_norm_eps()
    }

    /// The `small` preset: h = 256, 2 layers, 4 experts (7,134,464 parameters).
    pub fn small() -> Self {
        ModelConfig {
            hidden_dim: 256,
            head_dim: 64,
            ffn_dim: 1024,
            ..Self::tiny()
        }
    }

    /// The `default_6_9b` preset: h = 768, 30 layers, 16 experts
    /// (6,882,678,528 parameters — about 27.5 GB in f32).
    pub fn default_6_9b() -> Self {
        ModelConfig {
            hidden_dim: 768,
            n_layers: 30,
            n_heads: 12,
            n_kv_heads: 1,
            head_dim: 64,
            n_experts: 16,
            top_k: 4,
            ffn_dim: 6144,
            vocab_size: 32000,
            max_seq_len: 32768,
            rope_base: 10000.0,
            rope_alpha: 8.0,
            rms_norm_eps: Self::default_rms_norm_eps(),
        }
    }

    /// Names accepted by [`ModelConfig::preset`].
    pub const PRESETS: [&'static str; 3] = ["tiny", "small", "default_6_9b"];

    /// A preset by name.
    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "tiny" => Ok(Self::tiny()),
            "small" => Ok(Self::small()),
            "default_6_9b" => Ok(Self::default_6_9b()),
            other => Err(MoeError::InvalidConfig(format!(
                "unknown preset {other:?} (expected one of {:?} or a JSON file)",
                Self::PRESETS
            ))),
        }
    }

    /// A preset name, or else the path of a JSON config file.
    pub fn from_preset_or_file(spec: &str) -> Result<Self> {
        if Self::PRESETS.contains(&spec) {
            Self::preset(spec)
        } else if Path::new(spec).exists() {
            Self::load(Path::new(spec))
        } else {
            Self::preset(spec)
        }
    }

    /// Parses and validates a config from JSON text.
    pub fn from_json(text: &str) -> Result<Self> {
        Self::from_json_at(text, Path::new("<config>"))
    }

    /// [`ModelConfig::from_json`], naming `path` in errors.
    pub fn from_json_at(text: &str, path: &Path) -> Result<Self> {
        let config: ModelConfig = parse_json(text, path)?;
        config.validate()?;
        Ok(config)
    }

    /// Reads and validates `config.json`-style file.
    pub fn load(path: &Path) -> Result<Self> {
        Self::from_json_at(&crate::memory::read_text(path)?, path)
    }

    /// The config as pretty JSON with exactly the contract's keys.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a config always serialises")
    }

    /// Checks every constraint of CONTRACT §1 (and what RoPE needs).
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(MoeError::InvalidConfig(msg));
        let sizes = [
            ("hidden_dim", self.hidden_dim),
            ("n_layers", self.n_layers),
            ("n_heads", self.n_heads),
            ("n_kv_heads", self.n_kv_heads),
            ("head_dim", self.head_dim),
            ("n_experts", self.n_experts),
            ("top_k", self.top_k),
            ("ffn_dim", self.ffn_dim),
            ("vocab_size", self.vocab_size),
            ("max_seq_len", self.max_seq_len),
        ];
        for (name, value) in sizes {
            if value == 0 {
                return bad(format!("{name} must be > 0"));
            }
        }
        if self.n_heads.checked_mul(self.head_dim) != Some(self.hidden_dim) {
            return bad(format!(
                "n_heads·head_dim = {}·{} must equal hidden_dim = {}",
                self.n_heads, self.head_dim, self.hidden_dim
            ));
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad(format!(
                "n_heads = {} must be divisible by n_kv_heads = {}",
                self.n_heads, self.n_kv_heads
            ));
        }
        if self.top_k > self.n_experts {
            return bad(format!(
                "top_k = {} must be ≤ n_experts = {}",
                self.top_k, self.n_experts
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head_dim = {} must be even (RoPE rotates pairs)",
                self.head_dim
            ));
        }
        if self.vocab_size > u32::MAX as usize {
            return bad(format!("vocab_size = {} exceeds u32", self.vocab_size));
        }
        if !(self.rope_base.is_finite() && self.rope_base > 0.0) {
            return bad(format!(
                "rope_base = {} must be finite and > 0",
                self.rope_base
            ));
        }
        if !(self.rope_alpha.is_finite() && self.rope_alpha > 0.0) {
            return bad(format!(
                "rope_alpha = {} must be finite and > 0",
                self.rope_alpha
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return bad(format!(
                "rms_norm_eps = {} must be finite and > 0",
                self.rms_norm_eps
            ));
        }
        if self.rope_alpha > 1.0 && self.head_dim == 2 {
            return bad("NTK RoPE scaling (rope_alpha > 1) needs head_dim > 2".into());
        }
        if self.checked_param_count().is_none() || self.checked_model_bytes().is_none() {
            return bad("the parameter count or the model's size in bytes overflows".into());
        }
        Ok(())
    }

    /// The RoPE base after NTK scaling (CONTRACT §3):
    /// b' = base if α ≤ 1 else base·α^(d/(d−2)).
    pub fn effective_rope_base(&self) -> f64 {
        let d = self.head_dim as f64;
        if self.rope_alpha <= 1.0 {
            self.rope_base
        } else {
            self.rope_base * self.rope_alpha.powf(d / (d - 2.0))
        }
    }

    /// Number of query heads sharing one key/value head, H / Hkv.
    pub fn group_size(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }

    /// Width of the fused q|k|v projection output, (H + 2·Hkv)·d.
    pub fn qkv_dim(&self) -> usize {
        (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
    }

    /// Total number of parameters (all experts).
    pub fn param_count(&self) -> usize {
        self.checked_param_count()
            .expect("validated configs do not overflow")
    }

    /// Parameters touched per token (only k of E experts).
    pub fn active_param_count(&self) -> usize {
        let idle = self.n_experts - self.top_k;
        self.param_count() - self.n_layers * idle * 3 * self.ffn_dim * self.hidden_dim
    }

    /// Bytes of the parameters in f32.
    pub fn weight_bytes(&self) -> u64 {
        self.param_count() as u64 * 4
    }

    /// Bytes a model takes in memory: its weights and RoPE tables (cos and
    /// sin of max_seq_len × head_dim/2 angles), f32, and the bookkeeping of
    /// its tensors (names, shapes, ranges: [`BYTES_PER_TENSOR`] each, which
    /// outweighs the weights of a config of many tiny experts). Training adds
    /// three times the weights (gradients and the two AdamW moments).
    pub fn model_bytes(&self) -> u64 {
        self.checked_model_bytes()
            .expect("validated configs do not overflow")
    }

    fn checked_model_bytes(&self) -> Option<u64> {
        let params = u64::try_from(self.checked_param_count()?).ok()?;
        let rope = (self.max_seq_len as u64).checked_mul(self.head_dim as u64)?;
        let floats = params.checked_add(rope)?;
        // ×16 must fit too: a trainer holds weights, gradients and two moments.
        floats.checked_mul(16)?;
        let bookkeeping = self.checked_tensor_count()?.checked_mul(BYTES_PER_TENSOR)?;
        floats.checked_mul(4)?.checked_add(bookkeeping)
    }

    /// Number of named tensors: embedding, final norm and head, and per layer
    /// two norms, four attention projections, the router and three per expert.
    pub fn tensor_count(&self) -> u64 {
        self.checked_tensor_count()
            .expect("validated configs do not overflow")
    }

    fn checked_tensor_count(&self) -> Option<u64> {
        let per_layer = (self.n_experts as u64).checked_mul(3)?.checked_add(7)?;
        (self.n_layers as u64)
            .checked_mul(per_layer)?
            .checked_add(3)
    }

    /// Bytes of the activations of a forward over `batch` × `seq` tokens whose
    /// attention reads `keys` positions, with everything backward needs when
    /// `train` (f32; `None` when the size overflows u64):
    ///   per layer and token  6h + (H + 2·Hkv)·d + E + k·(2h + 3F) + O(1)
    ///   per layer            B·H·S·keys attention probabilities
    ///   per token            (1 + train)·V logits (+ their gradient)
    pub fn activation_bytes(
        &self,
        batch: usize,
        seq: usize,
        keys: usize,
        train: bool,
    ) -> Option<u64> {
        let n = |x: usize| x as u64;
        let (h, k) = (n(self.hidden_dim), n(self.top_k));
        let tokens = n(batch).checked_mul(n(seq))?;
        let expert = k.checked_mul(2 * h + 3 * n(self.ffn_dim) + 4)?;
        let per_token = (6 * h + n(self.qkv_dim()) + n(self.n_experts) + 2).checked_add(expert)?;
        let probs = tokens.checked_mul(n(self.n_heads))?.checked_mul(n(keys))?;
        let layer = tokens.checked_mul(per_token)?.checked_add(probs)?;
        let layers = if train { n(self.n_layers) } else { 1 };
        let logits = tokens.checked_mul(n(self.vocab_size) * (1 + u64::from(train)) + h + 1)?;
        let backward = if train {
            tokens
                .checked_mul(per_token)?
                .checked_add(n(seq).checked_mul(n(seq))?)?
        } else {
            0
        };
        layers
            .checked_mul(layer)?
            .checked_add(logits)?
            .checked_add(backward)?
            .checked_mul(4)
    }

    fn checked_param_count(&self) -> Option<usize> {
        let h = self.hidden_dim;
        let mul = |a: usize, b: usize| a.checked_mul(b);
        let embed_and_head = mul(2, mul(self.vocab_size, h)?)?.checked_add(h)?;
        let attn = mul(self.qkv_dim(), h)?.checked_add(mul(h, self.n_heads * self.head_dim)?)?;
        let experts = mul(self.n_experts, mul(3, mul(self.ffn_dim, h)?)?)?;
        let layer = (2 * h)
            .checked_add(attn)?
            .checked_add(mul(self.n_experts, h)?)?
            .checked_add(experts)?;
        mul(self.n_layers, layer)?.checked_add(embed_and_head)
    }
}

/// Training hyper-parameters (CONTRACT §6), loadable from `train.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warm-up length in steps.
    pub warmup_steps: u64,
    /// Length of the cosine schedule in steps.
    pub total_steps: u64,
    /// Floor of the cosine schedule as a fraction of `lr`, in [0, 1]
    /// (min_lr = min_lr_ratio·lr).
    pub min_lr_ratio: f64,
    /// AdamW first-moment decay.
    pub beta1: f64,
    /// AdamW second-moment decay.
    pub beta2: f64,
    /// AdamW denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay (2-D weights only).
    pub weight_decay: f64,
    /// Global-norm clipping threshold (≤ 0 disables).
    pub grad_clip: f64,
    /// Weight α of the load-balancing loss.
    pub aux_loss_alpha: f64,
    /// Seed of the run: [`crate::Trainer::from_seed`] initialises the model
    /// from it and `moe train` seeds its window sampler with it (a trainer
    /// given a ready model only records it, in the checkpoint's state).
    pub seed: u64,
    /// Residual dropout rate p in [0, 1): the probability that an element of
    /// the attention or MoE sublayer's output is dropped before the residual
    /// add while training (contract extension, [`crate::dropout`]); 0 (the
    /// default, left out of saved settings) is the contract's model exactly.
    #[serde(skip_serializing_if = "is_zero")]
    pub dropout: f64,
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            lr: 1e-3,
            warmup_steps: 10,
            total_steps: 1200,
            min_lr_ratio: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            grad_clip: 1.0,
            aux_loss_alpha: 0.01,
            seed: 42,
            dropout: 0.0,
        }
    }
}

impl TrainConfig {
    /// Parses and validates training settings from JSON (missing keys take defaults).
    pub fn from_json(text: &str) -> Result<Self> {
        Self::from_json_at(text, Path::new("<train config>"))
    }

    /// [`TrainConfig::from_json`], naming `path` in errors.
    pub fn from_json_at(text: &str, path: &Path) -> Result<Self> {
        let config: TrainConfig = parse_json(text, path)?;
        config.validate()?;
        Ok(config)
    }

    /// Reads and validates a `train.json` file.
    pub fn load(path: &Path) -> Result<Self> {
        Self::from_json_at(&crate::memory::read_text(path)?, path)
    }

    /// Checks that every value is finite and in range.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(MoeError::InvalidTraining(msg));
        let finite = [
            ("lr", self.lr),
            ("min_lr_ratio", self.min_lr_ratio),
            ("beta1", self.beta1),
            ("beta2", self.beta2),
            ("eps", self.eps),
            ("weight_decay", self.weight_decay),
            ("grad_clip", self.grad_clip),
            ("aux_loss_alpha", self.aux_loss_alpha),
            ("dropout", self.dropout),
        ];
        for (name, value) in finite {
            if !value.is_finite() {
                return bad(format!("{name} = {value} must be finite"));
            }
        }
        if self.lr < 0.0 {
            return bad(format!("lr = {} must be ≥ 0", self.lr));
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return bad(format!(
                "min_lr_ratio = {} must be in [0, 1]",
                self.min_lr_ratio
            ));
        }
        for (name, beta) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&beta) {
                return bad(format!("{name} = {beta} must be in [0, 1)"));
            }
        }
        if self.eps <= 0.0 {
            return bad(format!("eps = {} must be > 0", self.eps));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!("dropout = {} must be in [0, 1)", self.dropout));
        }
        if self.weight_decay < 0.0 || self.aux_loss_alpha < 0.0 {
            return bad("weight_decay and aux_loss_alpha must be ≥ 0".into());
        }
        Ok(())
    }
}
