//! Build-time facts about the project itself:
//!
//! - the source corpus (`moe train --corpus source`): the README,
//!   documentation and source concatenated, compiled into the binary like
//!   Tiny Shakespeare (`data/tinyshakespeare.txt`, the default corpus, which
//!   `src/data.rs` includes as it is), so training works with no download;
//! - the static metrics the benchmark reports for `src/` (gzip size, SLOC,
//!   function count) and the compiler's version.

use std::fs;
use std::path::{Path, PathBuf};

fn collect(dir: &Path, ext: &str, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = entries.flatten().map(|e| e.path()).collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            collect(&path, ext, out);
        } else if path.extension().is_some_and(|e| e == ext) {
            out.push(path);
        }
    }
}

fn main() {
    let mut files = vec![PathBuf::from("README.md")];
    collect(Path::new("docs"), "md", &mut files);
    collect(Path::new("src"), "rs", &mut files);
    let mut corpus = String::new();
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
        if let Ok(text) = fs::read_to_string(file) {
            corpus.push_str(&text);
            corpus.push('\n');
        }
    }
    println!("cargo:rerun-if-changed=docs");
    println!("cargo:rerun-if-changed=src");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    fs::write(out_dir.join("corpus.txt"), corpus).expect("OUT_DIR is writable");

    let mut sources = Vec::new();
    collect(Path::new("src"), "rs", &mut sources);
    let text: String = sources
        .iter()
        .filter_map(|f| fs::read_to_string(f).ok())
        .collect();
    let metrics = format!(
        "{{\"source_gzip_bytes\": {}, \"sloc\": {}, \"function_count\": {}, \"files\": {}}}",
        gzip_len(text.as_bytes()),
        sloc(&text),
        function_count(&text),
        sources.len()
    );
    fs::write(out_dir.join("static_metrics.json"), metrics).expect("OUT_DIR is writable");

    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let version = std::process::Command::new(rustc)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .unwrap_or_default();
    println!("cargo:rustc-env=MOE_RUSTC_VERSION={}", version.trim());
}

/// Size of `bytes` gzip-compressed at the default level.
fn gzip_len(bytes: &[u8]) -> usize {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).expect("writing to memory");
    encoder.finish().expect("writing to memory").len()
}

/// Source lines that are neither blank nor only a comment.
fn sloc(text: &str) -> usize {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("//"))
        .count()
}

/// Function definitions: the token `fn` followed by a name, outside comments.
fn function_count(text: &str) -> usize {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with("//"))
        .map(|l| {
            let tokens: Vec<&str> = l.split_whitespace().collect();
            tokens
                .windows(2)
                .filter(|w| {
                    w[0] == "fn" && w[1].starts_with(|c: char| c.is_alphabetic() || c == '_')
                })
                .count()
        })
        .sum()
}
