//! `moe export`: write a checkpoint in another framework's format.

use std::path::PathBuf;

use rosetta_moe::checkpoint::{STATE_FILE, TrainState};
use rosetta_moe::{MoeError, Result, Tokenizer, TrainConfig, hf};

use super::JsonArg;
use super::train::TOKENIZER_FILE;

/// The formats `--format` names.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Format {
    /// A Hugging Face transformers Mixtral directory (MixtralForCausalLM,
    /// AutoTokenizer).
    Hf,
}

/// Export a checkpoint for another framework: `--format hf` writes a directory
/// that transformers' MixtralForCausalLM.from_pretrained and
/// AutoTokenizer.from_pretrained load, computing the same logits.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Target format.
    #[arg(long, value_enum, default_value_t = Format::Hf)]
    format: Format,
    /// Checkpoint directory (as written by `moe train` or `moe init`).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// Overwrite a directory that already holds files.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    json: JsonArg,
}

pub fn run(args: Args) -> Result<()> {
    let Format::Hf = args.format;
    args.json.check()?;
    let model = hf::load_model(&args.checkpoint)?;
    let tokenizer_path = args.checkpoint.join(TOKENIZER_FILE);
    let tokenizer = if tokenizer_path.exists() {
        Some(Tokenizer::load(&tokenizer_path)?)
    } else {
        None
    };
    let aux_alpha = training_settings(&args.checkpoint)?.aux_loss_alpha;
    super::ensure_fresh_dir(&args.out, args.force)?;
    hf::export(&model, tokenizer.as_ref(), aux_alpha, &args.out)?;
    args.json.say(format_args!(
        "wrote {} (Hugging Face Mixtral, {} parameters{})",
        args.out.display(),
        model.params().len(),
        if tokenizer.is_some() {
            ", with tokenizer"
        } else {
            "; no tokenizer.json in the checkpoint, so none exported"
        }
    ));
    args.json.emit(&serde_json::json!({
        "out": args.out, "format": "hf", "params": model.params().len(),
        "tokenizer": tokenizer.is_some(), "config": hf::hf_config(model.config(), aux_alpha),
    }))
}

/// The run's training settings (for the aux-loss weight), or the defaults
/// for a checkpoint that never trained.
fn training_settings(dir: &std::path::Path) -> Result<TrainConfig> {
    let path = dir.join(STATE_FILE);
    if !path.exists() {
        return Ok(TrainConfig::default());
    }
    let text = std::fs::read_to_string(&path).map_err(|e| MoeError::io(&path, e))?;
    let state: TrainState = serde_json::from_str(&text)
        .map_err(|e| MoeError::checkpoint(&path, format!("unreadable: {e}")))?;
    Ok(state.train)
}
