//! Checkpoints (CONTRACT §9): a directory holding
//!
//! - `config.json`: the model config (§1 keys);
//! - `model.safetensors`: every parameter under its §2 name, f32;
//! - for training, `optimizer.safetensors` (AdamW moments as `<name>.m` and
//!   `<name>.v`) and `state.json` (step, training settings, data and sampler state).
//!
//! Every file is written to a temporary file in the same directory and renamed
//! into place, `state.json` last; both safetensors files record the step in
//! their metadata, so a directory whose files come from different saves is
//! detected on load. A missing, truncated, corrupt or mismatched file gives a
//! [`MoeError::Checkpoint`] naming the file and the problem.

use std::collections::{BTreeSet, HashMap};
use std::io::Write as _;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

use crate::config::{ModelConfig, TrainConfig};
use crate::data::DataState;
use crate::error::{MoeError, Result};
use crate::model::Model;
use crate::optim::AdamW;
use crate::params::ParamLayout;
use crate::train::Trainer;

const _: () = assert!(
    cfg!(target_endian = "little"),
    "safetensors stores little-endian f32; this code writes native-endian bytes"
);

/// File names inside a checkpoint directory.
pub const CONFIG_FILE: &str = "config.json";
/// Parameters.
pub const MODEL_FILE: &str = "model.safetensors";
/// AdamW moments.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// Step, settings and RNG state.
pub const STATE_FILE: &str = "state.json";

/// The position of a ChaCha random stream, enough to continue it exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    /// The seed the stream started from.
    pub seed: u64,
    /// The stream number.
    pub stream: u64,
    /// Words consumed so far (as a decimal string: JSON numbers cannot hold u128).
    #[serde(with = "u128_string")]
    pub word_pos: u128,
}

mod u128_string {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(v: &u128, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u128, D::Error> {
        String::deserialize(d)?.parse().map_err(D::Error::custom)
    }
}

/// Contents of `state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainState {
    /// Steps completed.
    pub step: u64,
    /// Training hyper-parameters (schedule included).
    pub train: TrainConfig,
    /// The run's data and sampler position, if it samples data.
    pub data: Option<DataState>,
}

/// Writes `config.json` and `model.safetensors` for `model` into `dir`
/// (created if needed).
pub fn save_model(model: &Model, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| MoeError::io(dir, e))?;
    write_atomic(&dir.join(CONFIG_FILE), model.config().to_json().as_bytes())?;
    write_tensors(
        &dir.join(MODEL_FILE),
        model.layout(),
        &[("", model.params())],
        0,
    )
}

/// Reads a model from `dir`, checking every name, shape and value.
pub fn load_model(dir: &Path) -> Result<Model> {
    let config = load_config(dir)?;
    let layout = ParamLayout::new(&config);
    let (mut tensors, _) = read_tensors(&dir.join(MODEL_FILE), &layout, &[""])?;
    Model::from_params(config, tensors.remove(0))
}

/// Writes a full training checkpoint: model, optimizer moments and state.
pub fn save_training(trainer: &Trainer, data: Option<&DataState>, dir: &Path) -> Result<()> {
    let model = trainer.model();
    let step = trainer.step();
    std::fs::create_dir_all(dir).map_err(|e| MoeError::io(dir, e))?;
    write_atomic(&dir.join(CONFIG_FILE), model.config().to_json().as_bytes())?;
    write_tensors(
        &dir.join(MODEL_FILE),
        model.layout(),
        &[("", model.params())],
        step,
    )?;
    let opt = trainer.optimizer();
    let moments = [(".m", opt.m.as_slice()), (".v", opt.v.as_slice())];
    write_tensors(&dir.join(OPTIMIZER_FILE), model.layout(), &moments, step)?;
    let state = TrainState {
        step,
        train: trainer.config().clone(),
        data: data.cloned(),
    };
    let json = serde_json::to_string_pretty(&state).expect("state always serialises");
    write_atomic(&dir.join(STATE_FILE), json.as_bytes())
}

/// Reads a full training checkpoint; continuing from it is bit-identical to
/// never having stopped.
pub fn load_training(dir: &Path) -> Result<(Trainer, TrainState)> {
    let config = load_config(dir)?;
    let layout = ParamLayout::new(&config);
    let state_path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&state_path).map_err(|e| MoeError::io(&state_path, e))?;
    let state: TrainState = serde_json::from_str(&text)
        .map_err(|e| MoeError::checkpoint(&state_path, format!("unreadable: {e}")))?;
    let (mut params, model_step) = read_tensors(&dir.join(MODEL_FILE), &layout, &[""])?;
    let (mut moments, opt_step) = read_tensors(&dir.join(OPTIMIZER_FILE), &layout, &[".m", ".v"])?;
    for (file, step) in [(MODEL_FILE, model_step), (OPTIMIZER_FILE, opt_step)] {
        if step != state.step {
            return Err(MoeError::checkpoint(
                dir.join(file),
                format!(
                    "written at step {step} but {STATE_FILE} says step {} (files from different saves)",
                    state.step
                ),
            ));
        }
    }
    let model = Model::from_params(config, params.remove(0))?;
    let mut optimizer = AdamW::new(&layout);
    optimizer.v = moments.remove(1);
    optimizer.m = moments.remove(0);
    let trainer = Trainer::resume(model, state.train.clone(), optimizer, state.step)?;
    Ok((trainer, state))
}

/// Reads and validates `config.json` of a checkpoint directory.
pub fn load_config(dir: &Path) -> Result<ModelConfig> {
    let path = dir.join(CONFIG_FILE);
    if !dir.is_dir() {
        return Err(MoeError::checkpoint(dir, "not a directory"));
    }
    ModelConfig::load(&path).map_err(|e| match e {
        MoeError::Io { source, .. } => {
            MoeError::checkpoint(&path, format!("cannot read: {source}"))
        }
        MoeError::Json { reason, .. } => {
            MoeError::checkpoint(&path, format!("unreadable: {reason}"))
        }
        MoeError::InvalidConfig(reason) => {
            MoeError::checkpoint(&path, format!("invalid config: {reason}"))
        }
        other => other,
    })
}

/// Writes `bytes` to `path` via a temporary file in the same directory, synced
/// and then renamed over `path`: readers see the old file or the new, never half.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .permissions(readable_by_all())
        .tempfile_in(dir)
        .map_err(|e| MoeError::io(dir, e))?;
    tmp.write_all(bytes)
        .map_err(|e| MoeError::io(tmp.path(), e))?;
    tmp.as_file()
        .sync_all()
        .map_err(|e| MoeError::io(tmp.path(), e))?;
    tmp.persist(path).map_err(|e| MoeError::io(path, e.error))?;
    Ok(())
}

/// Writes one safetensors file holding, for each (suffix, buffer), every
/// tensor of `layout` as `<name><suffix>`, with the step in its metadata.
fn write_tensors(
    path: &Path,
    layout: &ParamLayout,
    buffers: &[(&str, &[f32])],
    step: u64,
) -> Result<()> {
    let mut views = Vec::with_capacity(layout.tensors.len() * buffers.len());
    for (suffix, buffer) in buffers {
        for spec in &layout.tensors {
            let bytes: &[u8] = bytemuck::cast_slice(&buffer[spec.range.clone()]);
            let view = TensorView::new(Dtype::F32, spec.shape.clone(), bytes)
                .expect("shape and byte length agree by construction");
            views.push((format!("{}{suffix}", spec.name), view));
        }
    }
    // One metadata key only: safetensors writes the metadata map in HashMap
    // order, so two keys would make identical checkpoints differ byte-wise.
    let metadata = HashMap::from([("step".to_string(), step.to_string())]);
    // serialize_to_file writes a temporary file in the same directory and
    // renames it into place; it creates that file owner-only, so widen it after.
    safetensors::serialize_to_file(views, Some(metadata), path)
        .map_err(|e| MoeError::checkpoint(path, format!("cannot write: {e}")))?;
    std::fs::set_permissions(path, readable_by_all()).map_err(|e| MoeError::io(path, e))
}

/// rw-r--r--: checkpoints are data to share, like any file `cp` would write.
fn readable_by_all() -> std::fs::Permissions {
    use std::os::unix::fs::PermissionsExt;
    std::fs::Permissions::from_mode(0o644)
}

/// Reads a safetensors file that must hold exactly `<name><suffix>` for every
/// tensor of `layout` and every suffix, f32 and of the right shape; returns one
/// flat buffer per suffix and the step recorded in the metadata.
fn read_tensors(
    path: &Path,
    layout: &ParamLayout,
    suffixes: &[&str],
) -> Result<(Vec<Vec<f32>>, u64)> {
    let bad = |reason: String| MoeError::checkpoint(path, reason);
    let bytes = std::fs::read(path).map_err(|e| bad(format!("cannot read: {e}")))?;
    let (_, metadata) = SafeTensors::read_metadata(&bytes)
        .map_err(|e| bad(format!("truncated or corrupt safetensors file: {e}")))?;
    let file = SafeTensors::deserialize(&bytes)
        .map_err(|e| bad(format!("truncated or corrupt safetensors file: {e}")))?;
    let step = metadata
        .metadata()
        .as_ref()
        .and_then(|m| m.get("step"))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let expected: BTreeSet<String> = suffixes
        .iter()
        .flat_map(|s| layout.tensors.iter().map(move |t| format!("{}{s}", t.name)))
        .collect();
    let found: BTreeSet<String> = file.names().into_iter().map(String::from).collect();
    let missing: Vec<_> = expected.difference(&found).take(5).collect();
    if !missing.is_empty() {
        return Err(bad(format!("missing tensors (wrong config?): {missing:?}")));
    }
    let extra: Vec<_> = found.difference(&expected).take(5).collect();
    if !extra.is_empty() {
        return Err(bad(format!(
            "unexpected tensors (wrong config?): {extra:?}"
        )));
    }
    let mut buffers = Vec::with_capacity(suffixes.len());
    for suffix in suffixes {
        let mut flat = vec![0.0f32; layout.len];
        for spec in &layout.tensors {
            let name = format!("{}{suffix}", spec.name);
            let view = file
                .tensor(&name)
                .map_err(|e| bad(format!("{name}: {e}")))?;
            if view.dtype() != Dtype::F32 {
                return Err(bad(format!(
                    "{name}: dtype {:?}, expected F32",
                    view.dtype()
                )));
            }
            if view.shape() != spec.shape.as_slice() {
                return Err(bad(format!(
                    "{name}: shape {:?}, expected {:?} (wrong config?)",
                    view.shape(),
                    spec.shape
                )));
            }
            let out = &mut flat[spec.range.clone()];
            for (v, b) in out.iter_mut().zip(view.data().chunks_exact(4)) {
                *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
            if let Some(i) = out.iter().position(|v| !v.is_finite()) {
                return Err(bad(format!(
                    "{name}: non-finite value {} at index {i}",
                    out[i]
                )));
            }
        }
        buffers.push(flat);
    }
    Ok((buffers, step))
}
