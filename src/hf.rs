//! Hugging Face Mixtral interop: our checkpoints ↔ directories that
//! `transformers.MixtralForCausalLM.from_pretrained` reads and
//! `save_pretrained` writes.
//!
//! The architectures are the same (pre-norm RMSNorm, GQA with RoPE, softmax
//! router with renormalised top-k gates, SwiGLU experts, untied head); three
//! things differ and are bridged here:
//!
//! - **names**: [`hf_name`] maps each CONTRACT §2 name to Hugging Face's;
//! - **RoPE pairs**: we rotate interleaved pairs (2i, 2i+1), transformers
//!   rotates halves (i, i + d/2). Reordering the rows of `q_proj` and `k_proj`
//!   inside each head so that HF row j holds our row
//!   π(j) = 2j (j < d/2), 2(j − d/2) + 1 (j ≥ d/2)
//!   makes rotate-half compute our rotation on the same pairs; q·k is
//!   unchanged because q and k are reordered alike ([`permute_rope_rows`]);
//! - **NTK scaling**: Hugging Face has no `rope_alpha`; the exported
//!   `rope_theta` is our effective base b' ([`ModelConfig::effective_rope_base`]).
//!
//! What our model cannot represent (sliding-window attention, biases, RoPE
//! scaling, tied embeddings, another activation) is a
//! [`MoeError::HfUnsupported`] naming the field.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde_json::{Value, json};

use crate::checkpoint::{self, CONFIG_FILE, MODEL_FILE};
use crate::config::ModelConfig;
use crate::error::{MoeError, Result, check_json_syntax};
use crate::memory;
use crate::model::Model;
use crate::params::ParamLayout;
use crate::tokenizer::Tokenizer;

/// `model_type` of the directories this module reads and writes.
pub const MODEL_TYPE: &str = "mixtral";
/// The tokenizer file of a Hugging Face directory (same format as ours).
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// What `AutoTokenizer` reads to pick the tokenizer class.
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";

/// The Hugging Face name of a CONTRACT §2 tensor name.
///
/// | ours | Hugging Face |
/// |---|---|
/// | `embed.weight` | `model.embed_tokens.weight` |
/// | `layers.L.attn_norm.weight` | `model.layers.L.input_layernorm.weight` |
/// | `layers.L.attn.{q,k,v,o}_proj.weight` | `model.layers.L.self_attn.{q,k,v,o}_proj.weight` |
/// | `layers.L.moe_norm.weight` | `model.layers.L.post_attention_layernorm.weight` |
/// | `layers.L.moe.router.weight` | `model.layers.L.block_sparse_moe.gate.weight` |
/// | `layers.L.moe.experts.E.{gate,down,up}_proj.weight` | `model.layers.L.block_sparse_moe.experts.E.{w1,w2,w3}.weight` |
/// | `final_norm.weight` | `model.norm.weight` |
/// | `lm_head.weight` | `lm_head.weight` |
pub fn hf_name(ours: &str) -> String {
    let Some((layer, tail)) = ours
        .strip_prefix("layers.")
        .and_then(|rest| rest.split_once('.'))
    else {
        return match ours {
            "embed.weight" => "model.embed_tokens.weight".into(),
            "final_norm.weight" => "model.norm.weight".into(),
            other => other.into(),
        };
    };
    let tail = match tail {
        "attn_norm.weight" => "input_layernorm.weight".into(),
        "moe_norm.weight" => "post_attention_layernorm.weight".into(),
        "moe.router.weight" => "block_sparse_moe.gate.weight".into(),
        t => match (t.strip_prefix("attn."), t.strip_prefix("moe.experts.")) {
            (Some(proj), _) => format!("self_attn.{proj}"),
            (_, Some(expert)) => format!(
                "block_sparse_moe.experts.{}",
                expert
                    .replace("gate_proj", "w1")
                    .replace("down_proj", "w2")
                    .replace("up_proj", "w3")
            ),
            _ => t.into(),
        },
    };
    format!("model.layers.{layer}.{tail}")
}

/// True for the tensors whose rows RoPE rotates (`q_proj`, `k_proj`).
fn is_rope_rotated(ours: &str) -> bool {
    ours.ends_with("attn.q_proj.weight") || ours.ends_with("attn.k_proj.weight")
}

/// Which way [`permute_rope_rows`] reorders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeOrder {
    /// Our interleaved rows → Hugging Face's rotate-half rows.
    ToHf,
    /// The inverse.
    FromHf,
}

/// Reorders the rows of a head-major projection w [n·d, cols] inside each
/// head: HF row j ↔ our row π(j) = 2j (j < d/2), 2(j − d/2) + 1 (j ≥ d/2).
/// A pure permutation, so ToHf followed by FromHf is the identity, bit for bit.
pub fn permute_rope_rows(w: &[f32], d: usize, cols: usize, order: RopeOrder) -> Vec<f32> {
    let mut out = vec![0.0; w.len()];
    let row = |r: usize| r * cols..(r + 1) * cols;
    for (from, to) in w.chunks_exact(d * cols).zip(out.chunks_exact_mut(d * cols)) {
        for j in 0..d {
            let ours = if j < d / 2 {
                2 * j
            } else {
                2 * (j - d / 2) + 1
            };
            let (src, dst) = match order {
                RopeOrder::ToHf => (ours, j),
                RopeOrder::FromHf => (j, ours),
            };
            to[row(dst)].copy_from_slice(&from[row(src)]);
        }
    }
    out
}

/// The Hugging Face `config.json` of `config` (every field transformers'
/// MixtralConfig needs, and none that would change the model).
pub fn hf_config(config: &ModelConfig, aux_alpha: f64) -> Value {
    let theta = config.effective_rope_base();
    json!({
        "architectures": ["MixtralForCausalLM"],
        "model_type": MODEL_TYPE,
        "hidden_size": config.hidden_dim,
        "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "num_local_experts": config.n_experts,
        "num_experts_per_tok": config.top_k,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "max_position_embeddings": config.max_seq_len,
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": false,
        "sliding_window": null,
        "attention_dropout": 0.0,
        "router_aux_loss_coef": aux_alpha,
        "router_jitter_noise": 0.0,
        "output_router_logits": false,
        "bos_token_id": null,
        "eos_token_id": null,
        "pad_token_id": null,
        "dtype": "float32",
    })
}

/// Our config from a Hugging Face Mixtral `config.json` (parsed), refusing
/// every field whose value our model cannot represent. `path` names the file
/// in errors.
pub fn config_from_hf(hf: &Value, path: &Path) -> Result<ModelConfig> {
    let unsupported = |field: &str, value: &Value, reason: &str| MoeError::HfUnsupported {
        path: path.into(),
        field: field.into(),
        value: value.to_string(),
        reason: reason.into(),
    };
    let get = |field: &str| hf.get(field).filter(|v| !v.is_null());
    let size = |field: &str| -> Result<usize> {
        let value = get(field).ok_or_else(|| {
            MoeError::checkpoint(
                path,
                format!("missing `{field}` (a Mixtral config.json has it)"),
            )
        })?;
        value
            .as_u64()
            .and_then(|v| usize::try_from(v).ok())
            .ok_or_else(|| MoeError::checkpoint(path, format!("`{field}` = {value} is not a size")))
    };
    let model_type = get("model_type").cloned().unwrap_or(Value::Null);
    if model_type != MODEL_TYPE {
        return Err(unsupported(
            "model_type",
            &model_type,
            "only \"mixtral\" is read",
        ));
    }
    refuse_features(hf, &unsupported)?;
    let (hidden, heads) = (size("hidden_size")?, size("num_attention_heads")?);
    let head_dim = match get("head_dim") {
        Some(_) => size("head_dim")?,
        None => hidden / heads.max(1),
    };
    let n_kv_heads = match get("num_key_value_heads") {
        Some(_) => size("num_key_value_heads")?,
        None => heads,
    };
    let float = |field: &str, default: f64| -> Result<f64> {
        get(field).map_or(Ok(default), |v| {
            v.as_f64().ok_or_else(|| {
                MoeError::checkpoint(path, format!("`{field}` = {v} is not a number"))
            })
        })
    };
    let theta = match hf.pointer("/rope_parameters/rope_theta") {
        Some(v) => v.as_f64().ok_or_else(|| {
            MoeError::checkpoint(
                path,
                format!("`rope_parameters.rope_theta` = {v} is not a number"),
            )
        })?,
        // Mixtral's default base (transformers' MixtralConfig.default_theta).
        None => float("rope_theta", 1e6)?,
    };
    let config = ModelConfig {
        hidden_dim: hidden,
        n_layers: size("num_hidden_layers")?,
        n_heads: heads,
        n_kv_heads,
        head_dim,
        n_experts: size("num_local_experts")?,
        top_k: size("num_experts_per_tok")?,
        ffn_dim: size("intermediate_size")?,
        vocab_size: size("vocab_size")?,
        max_seq_len: size("max_position_embeddings")?,
        rope_base: theta,
        rope_alpha: 1.0,
        rms_norm_eps: float("rms_norm_eps", 1e-5)?,
    };
    config
        .validate()
        .map_err(|e| MoeError::checkpoint(path, e.to_string()))?;
    Ok(config)
}

/// Refuses the Hugging Face features that change the model's function in a
/// way ours cannot follow.
fn refuse_features(
    hf: &Value,
    unsupported: &impl Fn(&str, &Value, &str) -> MoeError,
) -> Result<()> {
    let get = |field: &str| hf.get(field).filter(|v| !v.is_null());
    if let Some(act) = get("hidden_act").filter(|v| *v != "silu") {
        return Err(unsupported("hidden_act", act, "experts use SwiGLU (silu)"));
    }
    if let Some(tied) = get("tie_word_embeddings").filter(|v| *v != false) {
        return Err(unsupported(
            "tie_word_embeddings",
            tied,
            "the LM head is its own matrix",
        ));
    }
    for bias in ["attention_bias", "mlp_bias"] {
        if let Some(v) = get(bias).filter(|v| *v != false) {
            return Err(unsupported(bias, v, "the model has no biases"));
        }
    }
    if let Some(window) = get("sliding_window") {
        let sizes = window
            .as_u64()
            .zip(get("max_position_embeddings").and_then(Value::as_u64));
        if sizes.is_none_or(|(w, max)| w < max) {
            return Err(unsupported(
                "sliding_window",
                window,
                "attention is full causal",
            ));
        }
    }
    if let Some(scaling) = get("rope_scaling") {
        return Err(unsupported(
            "rope_scaling",
            scaling,
            "only plain RoPE is read",
        ));
    }
    if let Some(kind) = hf
        .pointer("/rope_parameters/rope_type")
        .filter(|v| *v != "default")
    {
        return Err(unsupported(
            "rope_parameters.rope_type",
            kind,
            "only \"default\" RoPE is read",
        ));
    }
    Ok(())
}

/// True when `dir/config.json` is a Hugging Face config (it has `model_type`).
pub fn is_hf_dir(dir: &Path) -> bool {
    memory::read_text(&dir.join(CONFIG_FILE))
        .ok()
        .and_then(|text| serde_json::from_str::<Value>(&text).ok())
        .is_some_and(|v| v.get("model_type").is_some())
}

/// A model from a checkpoint directory of either kind: ours (CONTRACT §9) or
/// a Hugging Face Mixtral one (detected by `model_type` in `config.json`).
/// A `config.json` that is not JSON at all is reported as such, with the
/// line and column of the syntax error, whichever kind it was meant to be.
pub fn load_model(dir: &Path) -> Result<Model> {
    let path = dir.join(CONFIG_FILE);
    // Unreadable here (absent, or mid-commit): our loader says why.
    let Ok(text) = memory::read_text(&path) else {
        return checkpoint::load_model(dir);
    };
    check_json_syntax(&text, &path)?;
    let hf: Value = serde_json::from_str(&text).map_err(|e| MoeError::Json {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    if hf.get("model_type").is_some() {
        import_config(dir, &hf)
    } else {
        checkpoint::load_model(dir)
    }
}

/// Reads a Hugging Face Mixtral directory (`config.json` + `model.safetensors`,
/// f32 or bf16) into our model, undoing the RoPE row order.
pub fn import(dir: &Path) -> Result<Model> {
    let path = dir.join(CONFIG_FILE);
    let text = memory::read_text(&path)?;
    check_json_syntax(&text, &path)?;
    let hf: Value = serde_json::from_str(&text).map_err(|e| MoeError::Json {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    import_config(dir, &hf)
}

/// [`import`] with `config.json` already parsed: the config is checked and
/// its memory need (the model, staging copies and the weights file) is
/// checked before the weights are read.
fn import_config(dir: &Path, hf: &Value) -> Result<Model> {
    let config = config_from_hf(hf, &dir.join(CONFIG_FILE))?;
    let path = dir.join(MODEL_FILE);
    if !path.exists() && dir.join("model.safetensors.index.json").exists() {
        return Err(MoeError::checkpoint(
            &path,
            "sharded checkpoints (model.safetensors.index.json) are not read yet; merge the shards into one file",
        ));
    }
    memory::ensure_model_fits(&config, STAGING_COPIES, memory::file_len(&path)?)?;
    let bytes = memory::read_file(&path)?;
    model_from_hf_bytes(config, &bytes, &path)
}

/// Weight-sized buffers an import holds besides the model: the flat buffer
/// it fills, and at most one tensor's f32 copy and its RoPE reordering.
const STAGING_COPIES: u64 = 2;

/// Our config from the text of a Hugging Face `config.json` (`path` names
/// it in errors): a syntax error is [`MoeError::JsonSyntax`].
pub fn config_from_hf_json(text: &str, path: &Path) -> Result<ModelConfig> {
    check_json_syntax(text, path)?;
    let hf: Value = serde_json::from_str(text).map_err(|e| MoeError::Json {
        path: path.into(),
        reason: e.to_string(),
    })?;
    config_from_hf(&hf, path)
}

/// A model of `config` from the bytes of a Hugging Face `model.safetensors`
/// (`path` names it in errors); the memory check comes first.
pub fn model_from_hf_bytes(config: ModelConfig, weights: &[u8], path: &Path) -> Result<Model> {
    memory::ensure_model_fits(&config, STAGING_COPIES, weights.len() as u64)?;
    let file = SafeTensors::deserialize(weights).map_err(|e| {
        MoeError::checkpoint(path, format!("truncated or corrupt safetensors file: {e}"))
    })?;
    let layout = ParamLayout::new(&config);
    let params = read_params(&file, &layout, config.head_dim, path)?;
    Model::from_params(config, params)
}

/// Every tensor of `layout`, read under its Hugging Face name; any tensor of
/// the file left over (a bias, say) is an error naming it.
fn read_params(
    file: &SafeTensors<'_>,
    layout: &ParamLayout,
    d: usize,
    path: &Path,
) -> Result<Vec<f32>> {
    let bad = |reason: String| MoeError::checkpoint(path, reason);
    let wanted: BTreeMap<String, usize> = layout
        .tensors
        .iter()
        .enumerate()
        .map(|(i, t)| (hf_name(&t.name), i))
        .collect();
    let found: BTreeSet<&str> = file.names().into_iter().collect();
    if let Some(extra) = found.iter().find(|n| !wanted.contains_key(**n)) {
        return Err(MoeError::HfUnsupported {
            path: path.into(),
            field: (*extra).into(),
            value: "a tensor".into(),
            reason: "it has no counterpart here (biases and extra modules are not supported)"
                .into(),
        });
    }
    let missing: Vec<_> = wanted
        .keys()
        .filter(|n| !found.contains(n.as_str()))
        .take(5)
        .collect();
    if !missing.is_empty() {
        return Err(bad(format!("missing tensors (wrong config?): {missing:?}")));
    }
    let mut params = crate::kernels::zeroed(layout.len);
    for (name, &i) in &wanted {
        let spec = &layout.tensors[i];
        let view = file.tensor(name).map_err(|e| bad(format!("{name}: {e}")))?;
        if view.shape() != spec.shape.as_slice() {
            return Err(bad(format!(
                "{name}: shape {:?}, expected {:?} (wrong config?)",
                view.shape(),
                spec.shape
            )));
        }
        let values = to_f32(&view).ok_or_else(|| {
            bad(format!(
                "{name}: dtype {:?}, expected F32 or BF16",
                view.dtype()
            ))
        })?;
        if let Some(at) = values.iter().position(|v| !v.is_finite()) {
            return Err(bad(format!("{name}: non-finite value at index {at}")));
        }
        let values = if is_rope_rotated(&spec.name) {
            permute_rope_rows(&values, d, spec.shape[1], RopeOrder::FromHf)
        } else {
            values
        };
        params[spec.range.clone()].copy_from_slice(&values);
    }
    Ok(params)
}

/// A tensor's values as f32 (exact for F32 and BF16), or None for other dtypes.
fn to_f32(view: &TensorView<'_>) -> Option<Vec<f32>> {
    let data = view.data();
    match view.dtype() {
        Dtype::F32 => Some(
            data.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        ),
        // bf16 is the top half of an f32.
        Dtype::BF16 => Some(
            data.chunks_exact(2)
                .map(|b| f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16))
                .collect(),
        ),
        _ => None,
    }
}

/// Writes `model` as a Hugging Face Mixtral directory: `config.json`,
/// `model.safetensors` (Hugging Face names, RoPE rows reordered) and, given a
/// tokenizer, `tokenizer.json` + `tokenizer_config.json`.
pub fn export(
    model: &Model,
    tokenizer: Option<&Tokenizer>,
    aux_alpha: f64,
    dir: &Path,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| MoeError::io(dir, e))?;
    let config = model.config();
    let hf = hf_config(config, aux_alpha);
    let text = serde_json::to_string_pretty(&hf).expect("json values serialise");
    crate::atomic_write::write_atomic(&dir.join(CONFIG_FILE), text.as_bytes())?;
    write_hf_tensors(model, &dir.join(MODEL_FILE))?;
    if let Some(tokenizer) = tokenizer {
        tokenizer.save(&dir.join(TOKENIZER_FILE))?;
        let tokenizer_config = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": config.max_seq_len,
            "clean_up_tokenization_spaces": false,
        });
        let text = serde_json::to_string_pretty(&tokenizer_config).expect("json values serialise");
        crate::atomic_write::write_atomic(&dir.join(TOKENIZER_CONFIG_FILE), text.as_bytes())?;
    }
    Ok(())
}

/// `model.safetensors` with every parameter under its Hugging Face name.
fn write_hf_tensors(model: &Model, path: &Path) -> Result<()> {
    let d = model.config().head_dim;
    let tensors: Vec<(String, Vec<usize>, Vec<f32>)> = model
        .layout()
        .tensors
        .iter()
        .map(|spec| {
            let values = &model.params()[spec.range.clone()];
            let values = if is_rope_rotated(&spec.name) {
                permute_rope_rows(values, d, spec.shape[1], RopeOrder::ToHf)
            } else {
                values.to_vec()
            };
            (hf_name(&spec.name), spec.shape.clone(), values)
        })
        .collect();
    let views = tensors.iter().map(|(name, shape, values)| {
        let view = TensorView::new(Dtype::F32, shape.clone(), bytemuck::cast_slice(values))
            .expect("shape and byte length agree by construction");
        (name.clone(), view)
    });
    // transformers checks this key to know the file holds PyTorch tensors.
    let metadata = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(metadata), path)
        .map_err(|e| MoeError::checkpoint(path, format!("cannot write: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_permutation_round_trips_bit_exactly_and_pairs_halves() {
        let (heads, d, cols) = (3, 8, 5);
        let w: Vec<f32> = (0..heads * d * cols)
            .map(|i| i as f32 * 0.37 - 3.0)
            .collect();
        let hf = permute_rope_rows(&w, d, cols, RopeOrder::ToHf);
        assert_ne!(hf, w);
        assert_eq!(permute_rope_rows(&hf, d, cols, RopeOrder::FromHf), w);
        // Head 1, pair i = 2: our rows 2i, 2i+1 become HF rows i, i + d/2.
        let (head, i) = (1, 2);
        let ours = |r: usize| &w[(head * d + r) * cols..(head * d + r + 1) * cols];
        let theirs = |r: usize| &hf[(head * d + r) * cols..(head * d + r + 1) * cols];
        assert_eq!(theirs(i), ours(2 * i));
        assert_eq!(theirs(i + d / 2), ours(2 * i + 1));
    }

    #[test]
    fn names_are_distinct_and_follow_transformers() {
        let layout = ParamLayout::new(&ModelConfig::tiny());
        let names: BTreeSet<String> = layout.tensors.iter().map(|t| hf_name(&t.name)).collect();
        assert_eq!(names.len(), layout.tensors.len());
        for expected in [
            "model.embed_tokens.weight",
            "model.layers.1.self_attn.k_proj.weight",
            "model.layers.0.block_sparse_moe.gate.weight",
            "model.layers.1.block_sparse_moe.experts.3.w1.weight",
            "model.layers.1.block_sparse_moe.experts.3.w2.weight",
            "model.layers.1.block_sparse_moe.experts.3.w3.weight",
            "model.layers.0.post_attention_layernorm.weight",
            "model.norm.weight",
            "lm_head.weight",
        ] {
            assert!(names.contains(expected), "{expected}");
        }
        assert_eq!(
            hf_name("layers.0.moe.experts.2.up_proj.weight"),
            "model.layers.0.block_sparse_moe.experts.2.w3.weight"
        );
    }

    #[test]
    fn config_round_trips_through_hf_with_the_effective_base() {
        let ours = ModelConfig {
            rope_alpha: 4.0,
            rms_norm_eps: 1e-5,
            ..ModelConfig::tiny()
        };
        let back = config_from_hf(&hf_config(&ours, 0.01), Path::new("c")).unwrap();
        assert_eq!(back.rope_alpha, 1.0);
        assert_eq!(back.rope_base, ours.effective_rope_base());
        assert_eq!(
            ModelConfig {
                rope_base: ours.rope_base,
                rope_alpha: 4.0,
                ..back
            },
            ours
        );
    }

    #[test]
    fn unrepresentable_fields_are_named() {
        let base = hf_config(&ModelConfig::tiny(), 0.01);
        for (field, value) in [
            ("sliding_window", json!(4)),
            ("hidden_act", json!("gelu")),
            ("tie_word_embeddings", json!(true)),
            ("rope_scaling", json!({"type": "linear", "factor": 2.0})),
            ("attention_bias", json!(true)),
            ("model_type", json!("llama")),
        ] {
            let mut hf = base.clone();
            hf[field] = value;
            match config_from_hf(&hf, Path::new("c")) {
                Err(MoeError::HfUnsupported { field: named, .. }) => assert_eq!(named, field),
                other => panic!("{field}: {other:?}"),
            }
        }
        let mut hf = base.clone();
        hf["rope_parameters"]["rope_type"] = json!("yarn");
        assert!(matches!(
            config_from_hf(&hf, Path::new("c")),
            Err(MoeError::HfUnsupported { .. })
        ));
        let mut hf = base;
        hf["sliding_window"] = json!(512);
        assert!(
            config_from_hf(&hf, Path::new("c")).is_ok(),
            "a window covering max_seq_len changes nothing"
        );
    }
}
