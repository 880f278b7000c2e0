//! Concatenates the project's own documentation and source into the built-in
//! training corpus (`moe train` without `--data`), so training works on a
//! fresh machine with no download.

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
    let out =
        PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("corpus.txt");
    fs::write(out, corpus).expect("OUT_DIR is writable");
}
