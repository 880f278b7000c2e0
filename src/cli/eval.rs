//! `moe eval`: loss, perplexity and bits per byte over a whole text file.

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::time::Instant;

use rosetta_moe::data::{builtin_corpus, split};
use rosetta_moe::eval::{self, EvalReport};
use rosetta_moe::{MoeError, Result, Tokenizer, checkpoint, hf};
use serde::Serialize;

use super::JsonArg;
use super::train::TOKENIZER_FILE;

/// Evaluate a checkpoint (ours or a Hugging Face Mixtral directory) on a
/// text file or a built-in corpus, or on the training or validation split
/// `moe train` makes of it: loss in nats/token, perplexity and bits per
/// byte, scoring every token once with strided windows.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Checkpoint directory with tokenizer.json.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Text file to evaluate on.
    #[arg(long, value_name = "FILE", required_unless_present = "corpus")]
    data: Option<PathBuf>,
    /// A corpus compiled into the binary instead of --data: `shakespeare`
    /// or `source` (as `moe train --corpus`).
    #[arg(long, value_name = "NAME", conflicts_with = "data",
          value_parser = clap::builder::PossibleValuesParser::new(["shakespeare", "source"]))]
    corpus: Option<String>,
    /// What to score: `all` of the text, or the `train` or `val` split that
    /// `moe train` makes of it (the first 90 % of its tokens, the rest).
    #[arg(long, default_value = "all",
          value_parser = clap::builder::PossibleValuesParser::new(["all", "train", "val"]))]
    split: String,
    /// Tokens per window [default: the window the checkpoint was trained
    /// with (its state.json), else the model's max_seq_len, at most 256].
    #[arg(long)]
    seq: Option<usize>,
    /// Tokens between window starts; a smaller stride gives each scored
    /// token more context [default: --seq, no overlap].
    #[arg(long)]
    stride: Option<usize>,
    #[command(flatten)]
    threads: super::ThreadsArg,
    #[command(flatten)]
    json: JsonArg,
}

#[derive(Serialize)]
struct Report {
    checkpoint: PathBuf,
    /// The file's path, or `built-in:NAME`.
    data: String,
    /// all, train or val.
    split: String,
    seq: usize,
    stride: usize,
    threads: usize,
    seconds: f64,
    #[serde(flatten)]
    figures: EvalReport,
}

pub fn run(args: Args) -> Result<()> {
    args.json.check()?;
    let threads = args.threads.apply();
    let mut model = hf::load_model(&args.checkpoint)?;
    let max = model.config().max_seq_len;
    let trained = checkpoint::trained_seq_len(&args.checkpoint, model.config())?;
    let seq = args.seq.or(trained).unwrap_or(max.min(256));
    if seq > max {
        return Err(MoeError::SequenceTooLong { len: seq, max });
    }
    let stride = args.stride.unwrap_or(seq);
    let tokenizer_path = args.checkpoint.join(TOKENIZER_FILE);
    if !tokenizer_path.exists() {
        return Err(MoeError::checkpoint(
            &tokenizer_path,
            "missing: `moe eval` needs the checkpoint's tokenizer",
        ));
    }
    let tokenizer = Tokenizer::load(&tokenizer_path)?;
    let (data, text) = match (&args.data, &args.corpus) {
        (Some(path), _) => (
            path.display().to_string(),
            std::fs::read(path).map_err(|e| MoeError::io(path, e))?,
        ),
        (None, name) => {
            let name = name.as_deref().expect("clap requires --data or --corpus");
            let text = builtin_corpus(name).expect("clap checks --corpus");
            (format!("built-in:{name}"), text.as_bytes().to_vec())
        }
    };
    let all = tokenizer.encode(&text)?;
    let tokens = match args.split.as_str() {
        "train" => split(&all).0,
        "val" => split(&all).1,
        _ => &all,
    };
    let start = Instant::now();
    let bar = super::progress(
        0,
        "{bar:30} window {pos}/{len} [{elapsed_precise} < {eta_precise}]",
    );
    let terminal = std::io::stderr().is_terminal();
    let mut next_log = 0.0;
    let figures = eval::evaluate(
        &mut model,
        tokens,
        seq,
        stride,
        |id| tokenizer.token_bytes(id).len(),
        |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
            let fraction = done as f64 / total as f64;
            if !terminal && fraction >= next_log {
                eprintln!(
                    "eval: window {done}/{total} ({:.0} s)",
                    start.elapsed().as_secs_f64()
                );
                next_log += 0.1;
            }
        },
    )?;
    bar.finish_and_clear();
    let report = Report {
        checkpoint: args.checkpoint.clone(),
        data,
        split: args.split.clone(),
        seq,
        stride,
        threads,
        seconds: start.elapsed().as_secs_f64(),
        figures,
    };
    args.json.say(format_args!(
        "{} ({}): {} tokens ({} bytes) in {} windows of {seq} (stride {stride}), {:.1} s",
        report.data, report.split, figures.tokens, figures.bytes, figures.windows, report.seconds
    ));
    args.json.say(format_args!(
        "loss {:.4} nats/token   perplexity {:.2}   {:.4} bits/byte",
        figures.loss, figures.perplexity, figures.bits_per_byte
    ));
    args.json.emit(&report)
}
