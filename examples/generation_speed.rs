//! Generation speed: 256 new tokens on `tiny` and `small`, with the KV cache
//! (`generate`, one position per token) and by recomputing the whole prefix
//! for every token (what a model without a cache must do).
//!
//!     cargo run --release --example generation_speed [-- --json FILE]
//!
//! Prints a table and, last, one JSON line with every figure (also written to
//! FILE with `--json`; the README quotes docs/generation-speed.json). Greedy
//! decoding from an 8-token prompt; both ways must produce the same tokens.

use std::time::Instant;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rosetta_moe::sampling::{generate, pick_token};
use rosetta_moe::{Model, ModelConfig, Result, SamplingStrategy, kernels};

const PROMPT: usize = 8;
const NEW: usize = 256;
const RUNS: usize = 5;

/// Greedy decoding that recomputes the full prefix for every new token.
fn generate_recompute(model: &mut Model, prompt: &[u32], max_len: usize) -> Result<Vec<u32>> {
    let vocab = model.config().vocab_size;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut tokens = prompt.to_vec();
    while tokens.len() < max_len {
        let logits = model.forward(&tokens, 1)?;
        let last = &logits[(tokens.len() - 1) * vocab..];
        tokens.push(pick_token(last, SamplingStrategy::Greedy, &mut rng)?);
    }
    Ok(tokens)
}

/// Median seconds of `RUNS` calls of `f` (after one warm-up), and its output.
fn time(mut f: impl FnMut() -> Result<Vec<u32>>) -> Result<(f64, Vec<u32>)> {
    let out = f()?;
    let mut secs = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let start = Instant::now();
        f()?;
        secs.push(start.elapsed().as_secs_f64());
    }
    secs.sort_by(f64::total_cmp);
    Ok((secs[RUNS / 2], out))
}

/// The file named by `--json FILE`, if any.
fn json_path() -> Option<std::path::PathBuf> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [] => None,
        [flag, path] if flag == "--json" => Some(path.into()),
        _ => {
            eprintln!("usage: generation_speed [--json FILE]");
            std::process::exit(2);
        }
    }
}

fn main() -> Result<()> {
    let out = json_path();
    kernels::set_threads(1);
    let mut json = Vec::new();
    println!(
        "{:<6} {:>16} {:>16} {:>8}",
        "config", "cached tok/s", "recompute tok/s", "ratio"
    );
    for (name, config) in [
        ("tiny", ModelConfig::tiny()),
        ("small", ModelConfig::small()),
    ] {
        let mut model = Model::new(config, 42)?;
        let prompt: Vec<u32> = (1..=PROMPT as u32).collect();
        let max_len = PROMPT + NEW;
        let (cached, a) =
            time(|| generate(&mut model, &prompt, max_len, SamplingStrategy::Greedy, 0))?;
        let (recompute, b) = time(|| generate_recompute(&mut model, &prompt, max_len))?;
        assert_eq!(a, b, "the KV cache changed the greedy tokens");
        let (cached_tps, recompute_tps) = (NEW as f64 / cached, NEW as f64 / recompute);
        println!(
            "{name:<6} {cached_tps:>16.0} {recompute_tps:>16.0} {:>7.1}×",
            cached_tps / recompute_tps
        );
        json.push(format!(
            r#"{{"config":"{name}","new_tokens":{NEW},"prompt_tokens":{PROMPT},"cached_tokens_per_sec":{cached_tps:.1},"recompute_tokens_per_sec":{recompute_tps:.1},"ratio":{:.2}}}"#,
            cached_tps / recompute_tps
        ));
    }
    let json = format!("[{}]\n", json.join(","));
    print!("{json}");
    if let Some(path) = out {
        std::fs::write(&path, &json).map_err(|e| rosetta_moe::MoeError::io(&path, e))?;
    }
    Ok(())
}
