//! `moe init`: write a freshly initialised checkpoint.

use std::path::PathBuf;

use rosetta_moe::{Model, ModelConfig, Result, checkpoint};

/// Write a freshly initialised model (config.json + model.safetensors) to a directory.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Preset (tiny, small, default_6_9b) or path to a config JSON file.
    #[arg(long, default_value = "tiny")]
    config: String,
    /// Seed of the initialisation.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// Overwrite a directory that already holds files.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    json: super::JsonArg,
}

pub fn run(args: Args) -> Result<()> {
    args.json.check()?;
    let config = ModelConfig::from_preset_or_file(&args.config)?;
    super::ensure_fresh_dir(&args.out, args.force)?;
    let model = Model::new(config, args.seed)?;
    checkpoint::save_model(&model, &args.out)?;
    let params = model.params().len();
    args.json.say(format_args!(
        "wrote {} ({params} parameters, seed {})",
        args.out.display(),
        args.seed
    ));
    args.json.emit(&serde_json::json!({
        "out": args.out, "seed": args.seed, "params": params, "config": model.config(),
    }))
}
