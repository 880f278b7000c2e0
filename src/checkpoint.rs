//! Checkpoints (CONTRACT §9): a directory holding
//!
//! - `config.json`: the model config (§1 keys);
//! - `model.safetensors`: every parameter under its §2 name, f32;
//! - for training, `optimizer.safetensors` (AdamW moments as `<name>.m` and
//!   `<name>.v`) and `state.json` (step, training settings, data and sampler state).
//!
//! A save is a transaction. The whole set is written and synced into a fresh
//! staging directory `.checkpoint-new/`, which one rename turns into
//! `.checkpoint-commit/`: that rename is the commit point. The files are then
//! moved over the old ones (`state.json` last) and the commit directory is
//! removed. A crash before the commit point leaves the previous checkpoint as
//! it was (the staging directory is deleted by the next save or
//! [`recover`]); a crash after it is rolled forward by the next save or
//! [`recover`], and meanwhile readers take each file from the commit directory
//! when it is still there, so they always see one complete set. Both
//! safetensors files also record the step in their metadata, so a directory
//! whose files come from different saves (e.g. copied by hand) is detected on
//! load. A missing, truncated, corrupt or mismatched file gives a
//! [`MoeError::Checkpoint`] naming the file and the problem.
//!
//! One writer per directory is assumed (`moe train` holds a lock on it).

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

use crate::atomic_write::{readable_by_all, sync_dir, sync_file};
use crate::config::{ModelConfig, TrainConfig};
use crate::data::DataState;
use crate::error::{LOCK_FILE, MoeError, Result, parse_json};
use crate::memory;
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

/// Where a save builds its set before the commit point.
const STAGING_DIR: &str = ".checkpoint-new";
/// A complete set whose files are being moved into place.
const COMMIT_DIR: &str = ".checkpoint-commit";
/// The files of a set, in the order they are moved into place.
const SET_FILES: [&str; 4] = [CONFIG_FILE, MODEL_FILE, OPTIMIZER_FILE, STATE_FILE];

/// Writes `config.json` and `model.safetensors` for `model` into `dir`
/// (created if needed), as one transaction.
pub fn save_model(model: &Model, dir: &Path) -> Result<()> {
    save_set(dir, |staging| write_model_files(staging, model, 0))
}

/// `config.json` and `model.safetensors` of `model` into `staging`, tagged with `step`.
fn write_model_files(staging: &Path, model: &Model, step: u64) -> Result<()> {
    write_new(
        &staging.join(CONFIG_FILE),
        model.config().to_json().as_bytes(),
    )?;
    write_tensors(
        &staging.join(MODEL_FILE),
        model.layout(),
        &[("", model.params())],
        step,
    )
}

/// Reads a model from `dir`, checking every name, shape and value. Its
/// memory need (the model, a staging copy of the weights and the file) is
/// checked before the weights are read.
pub fn load_model(dir: &Path) -> Result<Model> {
    let config = load_config(dir)?;
    memory::ensure_model_fits(&config, 1, current_len(dir, MODEL_FILE))?;
    let weights = read_current(dir, MODEL_FILE)?;
    model_from_bytes(config, &weights, &dir.join(MODEL_FILE))
}

/// A model of `config` from the bytes of its `model.safetensors` (`path`
/// names the file in errors); the memory check comes first.
pub fn model_from_bytes(config: ModelConfig, weights: &[u8], path: &Path) -> Result<Model> {
    memory::ensure_model_fits(&config, 1, weights.len() as u64)?;
    let layout = ParamLayout::new(&config);
    let (mut tensors, _) = decode_tensors(path, weights, &layout, &[""])?;
    Model::from_params(config, tensors.remove(0))
}

/// Writes a full training checkpoint — model, optimizer moments and state —
/// as one transaction: afterwards `dir` holds either this set or, if the save
/// failed, the previous one untouched.
pub fn save_training(trainer: &Trainer, data: Option<&DataState>, dir: &Path) -> Result<()> {
    let model = trainer.model();
    let step = trainer.step();
    let state = TrainState {
        step,
        train: trainer.config().clone(),
        data: data.cloned(),
    };
    let json = serde_json::to_string_pretty(&state).expect("state always serialises");
    let opt = trainer.optimizer();
    save_set(dir, |staging| {
        write_model_files(staging, model, step)?;
        let moments = [(".m", &opt.m[..]), (".v", &opt.v[..])];
        write_tensors(
            &staging.join(OPTIMIZER_FILE),
            model.layout(),
            &moments,
            step,
        )?;
        write_new(&staging.join(STATE_FILE), json.as_bytes())
    })
}

/// Makes `dir` hold one complete checkpoint again after a crash: finishes a
/// committed save and deletes an uncommitted one and any stray temporary
/// file. For the directory's one writer (a reader needs no recovery).
pub fn recover(dir: &Path) -> Result<()> {
    finish_commit(dir)?;
    remove_if_present(&dir.join(STAGING_DIR))?;
    let entries = fs::read_dir(dir).map_err(|e| MoeError::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| MoeError::io(dir, e))?;
        // `.tmpXXXXXX` is how `tempfile` (used by atomic writes) names its files.
        if entry.file_name().to_string_lossy().starts_with(".tmp") {
            remove_if_present(&entry.path())?;
        }
    }
    Ok(())
}

/// The exclusive right to write a checkpoint directory, held until dropped
/// (an advisory `flock` on its lock file, released by the kernel even when
/// the process is killed).
#[derive(Debug)]
pub struct WriterLock {
    _lock: Flock<fs::File>,
}

/// Takes the writer's lock on the directory `dir`, or fails at once with
/// [`MoeError::DirectoryBusy`] when another process holds it.
pub fn lock(dir: &Path) -> Result<WriterLock> {
    if !dir.is_dir() {
        return Err(MoeError::checkpoint(dir, "not a directory"));
    }
    let path = dir.join(LOCK_FILE);
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| MoeError::io(&path, e))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(WriterLock { _lock: lock }),
        Err((_, Errno::EWOULDBLOCK)) => Err(MoeError::DirectoryBusy { path: dir.into() }),
        Err((_, errno)) => Err(MoeError::io(&path, errno.into())),
    }
}

/// The transaction: `write` fills the staging directory; the rename to the
/// commit directory commits it; then the files move into place.
fn save_set(dir: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| MoeError::io(dir, e))?;
    recover(dir)?;
    let staging = dir.join(STAGING_DIR);
    fs::create_dir(&staging).map_err(|e| MoeError::io(&staging, e))?;
    let commit = dir.join(COMMIT_DIR);
    let committed = write(&staging)
        .and_then(|()| sync_dir(&staging))
        .and_then(|()| fs::rename(&staging, &commit).map_err(|e| MoeError::io(&commit, e)));
    if let Err(e) = committed {
        // Not committed: the previous set is untouched; drop the partial one.
        let _ = fs::remove_dir_all(&staging);
        return Err(e);
    }
    sync_dir(dir)?;
    finish_commit(dir)
}

/// Moves the files of a committed set over the old ones, then removes the
/// commit directory. Idempotent: a crash part-way is finished by a rerun.
fn finish_commit(dir: &Path) -> Result<()> {
    let commit = dir.join(COMMIT_DIR);
    if !commit.is_dir() {
        return Ok(());
    }
    for name in SET_FILES {
        let from = commit.join(name);
        if from.exists() {
            let to = dir.join(name);
            fs::rename(&from, &to).map_err(|e| MoeError::io(&to, e))?;
        }
    }
    sync_dir(dir)?;
    fs::remove_dir_all(&commit).map_err(|e| MoeError::io(&commit, e))?;
    sync_dir(dir)
}

/// Deletes a file or directory tree if it exists.
fn remove_if_present(path: &Path) -> Result<()> {
    let removed = match fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => Err(e),
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
    };
    removed.map_err(|e| MoeError::io(path, e))
}

/// The length of the current version of checkpoint file `name` in `dir`
/// (0 when it cannot be read: reading it then reports why).
fn current_len(dir: &Path, name: &str) -> u64 {
    fs::metadata(current(dir, name))
        .or_else(|_| fs::metadata(dir.join(name)))
        .map_or(0, |m| m.len())
}

/// The current version of checkpoint file `name` in `dir`: the committed copy
/// while a save is moving files into place, else the file itself.
fn current(dir: &Path, name: &str) -> PathBuf {
    let committed = dir.join(COMMIT_DIR).join(name);
    if committed.exists() {
        committed
    } else {
        dir.join(name)
    }
}

/// Reads checkpoint file `name` of `dir` (see [`current`]), once its length
/// is known to fit in memory; a file moved into place between the look and
/// the read is read at its new place.
fn read_current(dir: &Path, name: &str) -> Result<Vec<u8>> {
    let path = dir.join(name);
    let len = current_len(dir, name);
    memory::ensure_fits(|| format!("reading {}", path.display()), Some(len), "")?;
    fs::read(current(dir, name))
        .or_else(|_| fs::read(&path))
        .map_err(|e| MoeError::checkpoint(&path, format!("cannot read: {e}")))
}

/// Writes a new file of a staging directory and syncs it.
fn write_new(path: &Path, bytes: &[u8]) -> Result<()> {
    fs::write(path, bytes).map_err(|e| MoeError::io(path, e))?;
    fs::set_permissions(path, readable_by_all()).map_err(|e| MoeError::io(path, e))?;
    sync_file(path)
}

/// The window length S a training checkpoint in `dir` was trained with:
/// `None` for a directory without `state.json` (a model saved alone, or a
/// Hugging Face export) or a run that samples no text.
pub fn trained_seq_len(dir: &Path, config: &ModelConfig) -> Result<Option<usize>> {
    if !current(dir, STATE_FILE).exists() {
        return Ok(None);
    }
    let bytes = read_current(dir, STATE_FILE)?;
    let state = state_from_bytes(&bytes, config, &dir.join(STATE_FILE))?;
    Ok(state.data.map(|d| d.seq_len))
}

/// Reads a full training checkpoint; continuing from it is bit-identical to
/// never having stopped. Its memory need (the model, its two moments and
/// gradients, and the files) is checked before the tensors are read.
pub fn load_training(dir: &Path) -> Result<(Trainer, TrainState)> {
    let config = load_config(dir)?;
    let files: u64 = [MODEL_FILE, OPTIMIZER_FILE, STATE_FILE]
        .iter()
        .map(|name| current_len(dir, name))
        .fold(0, u64::saturating_add);
    memory::ensure_model_fits(&config, 3, files)?;
    let state = read_current(dir, STATE_FILE)?;
    let weights = read_current(dir, MODEL_FILE)?;
    let moments = read_current(dir, OPTIMIZER_FILE)?;
    training_from_bytes(dir, config, &weights, &moments, &state)
}

/// A trainer and its state from the bytes of a training checkpoint's
/// `model.safetensors`, `optimizer.safetensors` and `state.json` (the files
/// of `dir`, named in errors); the memory check comes first.
pub fn training_from_bytes(
    dir: &Path,
    config: ModelConfig,
    weights: &[u8],
    moments: &[u8],
    state: &[u8],
) -> Result<(Trainer, TrainState)> {
    let files = [weights, moments, state]
        .iter()
        .map(|b| b.len() as u64)
        .fold(0, u64::saturating_add);
    memory::ensure_model_fits(&config, 3, files)?;
    let state = state_from_bytes(state, &config, &dir.join(STATE_FILE))?;
    let layout = ParamLayout::new(&config);
    let (mut params, model_step) = decode_tensors(&dir.join(MODEL_FILE), weights, &layout, &[""])?;
    let (moments, opt_step) =
        decode_tensors(&dir.join(OPTIMIZER_FILE), moments, &layout, &[".m", ".v"])?;
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
    let optimizer = AdamW::from_moments(&layout, &moments[0], &moments[1])?;
    let trainer = Trainer::resume(model, state.train.clone(), optimizer, state.step)?;
    Ok((trainer, state))
}

/// Parses `state.json` (`path` names it in errors) and checks its data shape
/// against the model: a window batch of B × S ids and targets must be valid
/// for `max_seq_len` and fit in memory.
pub fn state_from_bytes(bytes: &[u8], config: &ModelConfig, path: &Path) -> Result<TrainState> {
    let bad = |reason: String| MoeError::checkpoint(path, reason);
    let text = std::str::from_utf8(bytes).map_err(|_| bad("unreadable: not UTF-8".into()))?;
    let state: TrainState = parse_json(text, path).map_err(|e| match e {
        MoeError::Json { reason, .. } => bad(format!("unreadable: {reason}")),
        other => other,
    })?;
    state
        .train
        .validate()
        .map_err(|e| bad(format!("invalid training settings: {e}")))?;
    if let Some(data) = &state.data {
        let (b, s) = (data.batch_size, data.seq_len);
        if b == 0 || s == 0 || s > config.max_seq_len || b.checked_mul(s).is_none() {
            return Err(bad(format!(
                "batch_size {b} × seq_len {s} is not a valid batch for max_seq_len {}",
                config.max_seq_len
            )));
        }
        // The run's window batch: ids and targets, 4 bytes each per token.
        let need = (b as u64)
            .checked_mul(s as u64)
            .and_then(|t| t.checked_mul(8));
        memory::ensure_fits(
            || format!("{}: a batch of {b} × {s} tokens", path.display()),
            need,
            "",
        )?;
    }
    Ok(state)
}

/// Reads and validates `config.json` of a checkpoint directory.
pub fn load_config(dir: &Path) -> Result<ModelConfig> {
    if !dir.is_dir() {
        return Err(MoeError::checkpoint(dir, "not a directory"));
    }
    let bytes = read_current(dir, CONFIG_FILE)?;
    config_from_bytes(&bytes, &dir.join(CONFIG_FILE))
}

/// Parses and validates the bytes of our `config.json` (`path` names it in
/// errors): a syntax error is [`MoeError::JsonSyntax`], a wrong key or value
/// a [`MoeError::Checkpoint`].
pub fn config_from_bytes(bytes: &[u8], path: &Path) -> Result<ModelConfig> {
    let text = std::str::from_utf8(bytes)
        .map_err(|_| MoeError::checkpoint(path, "unreadable: not UTF-8"))?;
    ModelConfig::from_json_at(text, path).map_err(|e| match e {
        MoeError::Json { reason, .. } => {
            MoeError::checkpoint(path, format!("unreadable: {reason}"))
        }
        MoeError::InvalidConfig(reason) => {
            MoeError::checkpoint(path, format!("invalid config: {reason}"))
        }
        other => other,
    })
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
    // serialize_to_file creates the file owner-only, so widen it after.
    safetensors::serialize_to_file(views, Some(metadata), path)
        .map_err(|e| MoeError::checkpoint(path, format!("cannot write: {e}")))?;
    fs::set_permissions(path, readable_by_all()).map_err(|e| MoeError::io(path, e))?;
    sync_file(path)
}

/// Decodes a safetensors file (`path` names it in errors) that must hold exactly `<name><suffix>` for every
/// tensor of `layout` and every suffix, f32 and of the right shape; returns one
/// flat buffer per suffix and the step recorded in the metadata.
fn decode_tensors(
    path: &Path,
    bytes: &[u8],
    layout: &ParamLayout,
    suffixes: &[&str],
) -> Result<(Vec<Vec<f32>>, u64)> {
    let bad = |reason: String| MoeError::checkpoint(path, reason);
    let (_, metadata) = SafeTensors::read_metadata(bytes)
        .map_err(|e| bad(format!("truncated or corrupt safetensors file: {e}")))?;
    let file = SafeTensors::deserialize(bytes)
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
        let mut flat = crate::kernels::zeroed(layout.len);
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
            // A second moment is a running mean of squares: never negative.
            if *suffix == ".v"
                && let Some(i) = out.iter().position(|v| *v < 0.0)
            {
                return Err(bad(format!(
                    "{name}: negative second moment {} at index {i}",
                    out[i]
                )));
            }
        }
        buffers.push(flat);
    }
    Ok((buffers, step))
}
