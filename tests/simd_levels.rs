//! The same bits at every SIMD level: `moe` run with `MOE_SIMD` set to each
//! level this CPU can run (scalar included) writes byte-identical dumps
//! (logits, losses, every gradient, weights after an AdamW step), trains to
//! byte-identical weights and moments, and samples the same tokens — and
//! the dump is the committed bytes on every CPU this suite runs on (x86-64
//! natively, aarch64 under qemu in `.ci/aarch64`).

use std::path::Path;
use std::process::{Command, Output};

use rosetta_moe::kernels::SimdLevel;

const MOE: &str = env!("CARGO_BIN_EXE_moe");

/// The batch every dump here is taken on: 3 rows of 40 ids below 1000.
fn write_batch(path: &Path) {
    let ids: Vec<Vec<u32>> = (0..3)
        .map(|b| (0..40).map(|i| (i * 37 + b * 101) % 1000).collect())
        .collect();
    let targets: Vec<Vec<u32>> = ids
        .iter()
        .map(|row| row.iter().map(|t| (t * 7 + 3) % 1000).collect())
        .collect();
    let batch = serde_json::json!({ "ids": ids, "targets": targets });
    std::fs::write(path, batch.to_string()).unwrap();
}

fn moe_at(level: &str, args: &[&str]) -> Output {
    let out = Command::new(MOE)
        .env("MOE_SIMD", level)
        .args(args)
        .output()
        .expect("moe runs");
    assert!(
        out.status.success(),
        "MOE_SIMD={level} moe {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// What one level produced: the file bytes and the generated tokens.
fn outputs_at(level: SimdLevel, dir: &Path) -> Vec<(String, Vec<u8>)> {
    let level = level.name();
    let at = |name: &str| dir.join(format!("{level}-{name}")).display().to_string();
    let (init, run, text) = (at("init"), at("run"), dir.join("text.txt"));
    let batch = dir.join("batch.json").display().to_string();
    moe_at(
        level,
        &["init", "--config", "small", "--seed", "3", "--out", &init],
    );
    moe_at(
        level,
        &[
            "dump",
            "--checkpoint",
            &init,
            "--batch",
            &batch,
            "--out",
            &at("dump"),
        ],
    );
    moe_at(
        level,
        &[
            "train",
            "--data",
            &text.display().to_string(),
            "--config",
            "tiny",
            "--out",
            &run,
            "--steps",
            "6",
            "--batch",
            "3",
            "--seq",
            "24",
            "--eval-every",
            "3",
            "--threads",
            "2",
        ],
    );
    let sample = moe_at(
        level,
        &[
            "generate",
            "--checkpoint",
            &run,
            "--prompt",
            "To be",
            "--max-new",
            "24",
            "--temperature",
            "0.9",
            "--top-p",
            "0.95",
            "--seed",
            "5",
            "--json",
        ],
    );
    let tokens: serde_json::Value = serde_json::from_slice(&sample.stdout).unwrap();
    let mut files: Vec<(String, Vec<u8>)> =
        ["dump", "run/model.safetensors", "run/optimizer.safetensors"]
            .iter()
            .map(|name| (name.to_string(), std::fs::read(at(name)).unwrap()))
            .collect();
    files.push(("sample".into(), tokens["tokens"].to_string().into_bytes()));
    files
}

#[test]
fn every_level_writes_the_same_bytes_and_samples_the_same_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let text: String = (0..300)
        .map(|i| format!("{i}: To be, or not to be, that is the question.\n"))
        .collect();
    std::fs::write(dir.path().join("text.txt"), text).unwrap();
    write_batch(&dir.path().join("batch.json"));

    let levels = SimdLevel::supported();
    assert!(levels.contains(&SimdLevel::Scalar));
    let want = outputs_at(SimdLevel::Scalar, dir.path());
    for &level in &levels[1..] {
        for ((name, got), (_, expected)) in outputs_at(level, dir.path()).iter().zip(&want) {
            assert!(got == expected, "{name} at {level} differs from scalar");
        }
    }
}

#[test]
fn a_level_the_cpu_lacks_or_an_unknown_name_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let lacking = SimdLevel::ALL
        .into_iter()
        .find(|l| !SimdLevel::supported().contains(l))
        .expect("no CPU runs both avx512 and neon");
    for (asked, says) in [
        (lacking.name(), "this CPU cannot run it"),
        ("avx3", "is not a level"),
    ] {
        let out = dir.path().join(asked);
        let result = Command::new(MOE)
            .env("MOE_SIMD", asked)
            .args([
                "init",
                "--config",
                "tiny",
                "--out",
                &out.display().to_string(),
            ])
            .output()
            .unwrap();
        assert_eq!(result.status.code(), Some(1), "MOE_SIMD={asked}");
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert!(stderr.contains(says), "MOE_SIMD={asked}: {stderr}");
        assert!(!out.exists(), "MOE_SIMD={asked} wrote {}", out.display());
    }
}

/// SHA-256 of `moe dump` of the `small` model (seed 3) on [`write_batch`]'s
/// batch: logits, losses, every gradient and the weights after one AdamW
/// step. Any change to the arithmetic changes it; regenerate on purpose with
///   moe init --config small --seed 3 --out ck && moe dump --checkpoint ck \
///     --batch batch.json --out dump.safetensors && sha256sum dump.safetensors
/// (batch.json as [`write_batch`] writes it).
const SMALL_DUMP_SHA256: &str = include_str!("fixtures/simd/small-dump.sha256");

#[test]
fn the_dump_is_the_committed_bytes_on_this_cpu() {
    use sha2::{Digest, Sha256};
    let dir = tempfile::tempdir().unwrap();
    let at = |name: &str| dir.path().join(name).display().to_string();
    write_batch(dir.path().join("batch.json").as_path());
    let level = rosetta_moe::kernels::simd_level().name();
    moe_at(
        level,
        &[
            "init",
            "--config",
            "small",
            "--seed",
            "3",
            "--out",
            &at("ck"),
        ],
    );
    moe_at(
        level,
        &[
            "dump",
            "--checkpoint",
            &at("ck"),
            "--batch",
            &at("batch.json"),
            "--out",
            &at("dump"),
        ],
    );
    let digest = Sha256::digest(std::fs::read(at("dump")).unwrap());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        hex,
        SMALL_DUMP_SHA256.trim(),
        "the dump differs from the committed one on {} ({})",
        rosetta_moe::kernels::cpu_model(),
        level
    );
}
