//! `moe generate`: stream text from a trained checkpoint.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use rosetta_moe::sampling::{self, SamplingStrategy};
use rosetta_moe::{MoeError, Result, Tokenizer, hf};
use serde::Serialize;

use super::train::TOKENIZER_FILE;

/// Which sampling rule `--strategy` names.
#[derive(Debug, Clone, Copy, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Strategy {
    Greedy,
    Temperature,
    TopK,
    TopP,
}

/// Generate text from a checkpoint written by `moe train`, streaming it as it is produced.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Checkpoint directory (with tokenizer.json, as written by `moe train`).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Text to continue.
    #[arg(long)]
    prompt: String,
    /// Tokens to generate after the prompt.
    #[arg(long, default_value_t = 200)]
    max_new: usize,
    /// How to pick each token.
    #[arg(long, value_enum, default_value_t = Strategy::TopP)]
    strategy: Strategy,
    /// Softmax temperature (0 = greedy).
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Candidates kept by top-k (0 = all).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Cumulative probability kept by top-p, in (0, 1].
    #[arg(long, default_value_t = 0.9)]
    top_p: f32,
    /// Seed of the sampler: same seed, same text.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Print one JSON object at the end instead of streaming text.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Report<'a> {
    prompt: &'a str,
    completion: String,
    prompt_tokens: usize,
    new_tokens: usize,
    tokens: &'a [u32],
    strategy: Strategy,
    temperature: f32,
    top_k: usize,
    top_p: f32,
    seed: u64,
    seconds: f64,
    tokens_per_sec: f64,
}

/// Prints the longest complete UTF-8 prefix of `pending`, keeping the rest
/// (a character split across tokens waits for its next bytes).
fn flush_utf8(pending: &mut Vec<u8>, out: &mut impl std::io::Write) {
    let valid = match std::str::from_utf8(pending) {
        Ok(s) => s.len(),
        Err(e) if e.error_len().is_some() => pending.len(),
        Err(e) => e.valid_up_to(),
    };
    let _ = out.write_all(String::from_utf8_lossy(&pending[..valid]).as_bytes());
    let _ = out.flush();
    pending.drain(..valid);
}

pub fn run(args: Args) -> Result<()> {
    let strategy = match args.strategy {
        Strategy::Greedy => SamplingStrategy::Greedy,
        Strategy::Temperature => SamplingStrategy::Temperature {
            t: args.temperature,
        },
        Strategy::TopK => SamplingStrategy::TopK {
            k: args.top_k,
            t: args.temperature,
        },
        Strategy::TopP => SamplingStrategy::TopP {
            p: args.top_p,
            t: args.temperature,
        },
    };
    let mut model = hf::load_model(&args.checkpoint)?;
    let tokenizer_path = args.checkpoint.join(TOKENIZER_FILE);
    if !tokenizer_path.exists() {
        return Err(MoeError::checkpoint(
            &tokenizer_path,
            "missing: `moe generate` needs a checkpoint written by `moe train`",
        ));
    }
    let tokenizer = Tokenizer::load(&tokenizer_path)?;
    let prompt = tokenizer.encode(args.prompt.as_bytes())?;
    strategy.validate(model.config().vocab_size)?;
    let max_seq_len = model.config().max_seq_len;
    if prompt.is_empty() {
        return Err(MoeError::EmptyInput("prompt"));
    }
    if prompt.len() > max_seq_len {
        return Err(MoeError::SequenceTooLong {
            len: prompt.len(),
            max: max_seq_len,
        });
    }
    let room = max_seq_len - prompt.len();
    if args.max_new > room {
        return Err(MoeError::shape(
            "--max-new",
            format!(
                "≤ {room} (max_seq_len {max_seq_len} minus the prompt's {} tokens)",
                prompt.len()
            ),
            args.max_new,
        ));
    }
    let max_len = prompt.len() + args.max_new;
    let mut stdout = std::io::stdout().lock();
    if !args.json {
        let _ = write!(stdout, "{}", args.prompt);
    }
    let mut pending = Vec::new();
    let start = Instant::now();
    let tokens =
        sampling::generate_streaming(&mut model, &prompt, max_len, strategy, args.seed, |id| {
            if !args.json {
                pending.extend_from_slice(tokenizer.token_bytes(id));
                flush_utf8(&mut pending, &mut stdout);
            }
        })?;
    let seconds = start.elapsed().as_secs_f64();
    let new = &tokens[prompt.len()..];
    if args.json {
        let report = Report {
            prompt: &args.prompt,
            completion: String::from_utf8_lossy(&tokenizer.decode(new)).into_owned(),
            prompt_tokens: prompt.len(),
            new_tokens: new.len(),
            tokens: &tokens,
            strategy: args.strategy,
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            seed: args.seed,
            seconds,
            tokens_per_sec: new.len() as f64 / seconds,
        };
        println!(
            "{}",
            serde_json::to_string(&report).expect("report serialises")
        );
    } else {
        let _ = stdout.write_all(String::from_utf8_lossy(&pending).as_bytes());
        let _ = writeln!(stdout);
        eprintln!(
            "[{} tokens in {:.2} s, {:.0} tokens/s]",
            new.len(),
            seconds,
            new.len() as f64 / seconds
        );
    }
    Ok(())
}
