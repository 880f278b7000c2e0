//! The equation map (docs/equations.md) names only code that exists: every
//! `[`path` · `function`](link)` reference names a file that exists and a
//! function defined in it (a method or nested item as `Type::method`, in
//! Python `outer.inner` or `Class.method`, in Go `Type.method` by the
//! receiver's type), every derivation link lands on a heading of
//! docs/derivations.md, every backward row has one, and every row names Go and
//! NumPy code. A rename breaks this test.

use std::fs;
use std::path::Path;

const MAP: &str = "docs/equations.md";
const DERIVATIONS: &str = "docs/derivations.md";

/// One code reference of the map: the file and the (possibly qualified) item.
#[derive(Debug)]
struct CodeRef {
    path: String,
    item: String,
    link: String,
}

/// Every `[`path` · `item`](link)` in `text`.
fn code_refs(text: &str) -> Vec<CodeRef> {
    let mut refs = Vec::new();
    for piece in text.split("[`").skip(1) {
        let Some((path, rest)) = piece.split_once("` · `") else {
            continue;
        };
        let (item, rest) = rest
            .split_once("`](")
            .expect("a reference ends in `](link)");
        let (link, _) = rest.split_once(')').expect("a link is closed");
        refs.push(CodeRef {
            path: path.into(),
            item: item.into(),
            link: link.into(),
        });
    }
    refs
}

/// The language of a named file, by its extension.
#[derive(Clone, Copy, PartialEq)]
enum Lang {
    Rust,
    Python,
    Go,
}

impl Lang {
    fn of(path: &str) -> Lang {
        match path.rsplit_once('.').map(|(_, ext)| ext) {
            Some("py") => Lang::Python,
            Some("go") => Lang::Go,
            _ => Lang::Rust,
        }
    }

    /// What joins a container and an item nested in it. Go nests nothing: a
    /// method is top-level and `defines` reads `Type.method` off its receiver.
    fn separator(self) -> Option<&'static str> {
        match self {
            Lang::Rust => Some("::"),
            Lang::Python => Some("."),
            Lang::Go => None,
        }
    }
}

/// Leading spaces of a line.
fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// True when the (trimmed) line defines function `name`: `fn name` (Rust),
/// `def name` (Python), `func name` or, for `name` = `Type.f`, `func (r *Type) f` (Go).
fn defines(line: &str, name: &str, lang: Lang) -> bool {
    let line = line.trim_start();
    let line = line
        .strip_prefix("pub(crate) ")
        .or_else(|| line.strip_prefix("pub "))
        .unwrap_or(line);
    let keyword = match lang {
        Lang::Rust => "fn ",
        Lang::Python => "def ",
        Lang::Go => "func ",
    };
    let Some(rest) = line.strip_prefix(keyword) else {
        return false;
    };
    let (receiver, rest) = match rest.strip_prefix('(').and_then(|r| r.split_once(") ")) {
        Some((receiver, rest)) => (receiver.rsplit([' ', '*']).next(), rest),
        None => (None, rest),
    };
    let (ty, name) = match name.split_once('.') {
        Some((ty, name)) => (Some(ty), name),
        None => (None, name),
    };
    receiver == ty
        && rest
            .strip_prefix(name)
            .is_some_and(|rest| rest.starts_with('(') || rest.starts_with('<'))
}

/// True when the line opens the container `name`: `impl … Name … {`,
/// `mod name {` (Rust), `def name(` or `class Name:` / `class Name(` (Python).
fn opens(line: &str, name: &str, lang: Lang) -> bool {
    let t = line.trim_start();
    if lang == Lang::Python {
        let class = t.strip_prefix("class ").and_then(|r| r.strip_prefix(name));
        return defines(line, name, lang) || class.is_some_and(|r| r.starts_with([':', '(']));
    }
    let t = t.strip_prefix("pub ").unwrap_or(t);
    if let Some(rest) = t.strip_prefix("mod ") {
        return rest.trim_end_matches(" {").trim() == name;
    }
    if !t.starts_with("impl") || !t.ends_with('{') {
        return false;
    }
    // The implemented type: after " for " if any, else after `impl<…>`.
    let target = match t.split_once(" for ") {
        Some((_, ty)) => ty,
        None => t
            .trim_start_matches("impl")
            .trim_start_matches(|c| c != ' '),
    };
    let ident: String = target
        .trim_start()
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    ident == name
}

/// Whether `source` defines `item` (`f`, `Type::f`, `module::f`, `outer.f`,
/// `Class.f`, Go's `Type.f`).
fn has_item(source: &str, item: &str, lang: Lang) -> bool {
    let lines: Vec<&str> = source.lines().collect();
    let Some((container, name)) = lang.separator().and_then(|s| item.rsplit_once(s)) else {
        // An unqualified name (or a Go method) is a top-level function.
        return lines
            .iter()
            .any(|l| indent(l) == 0 && defines(l, item, lang));
    };
    for (i, line) in lines.iter().enumerate() {
        if !opens(line, container, lang) {
            continue;
        }
        let depth = indent(line);
        // The container's body: the lines indented deeper, up to its end.
        let body = lines[i + 1..]
            .iter()
            .take_while(|l| l.trim().is_empty() || indent(l) > depth);
        if body.into_iter().any(|l| defines(l, name, lang)) {
            return true;
        }
    }
    false
}

/// GitHub's anchor of a heading: lower case, spaces to '-', other punctuation dropped.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

#[test]
fn every_function_the_map_names_exists_in_its_file() {
    let map = fs::read_to_string(MAP).unwrap();
    let refs = code_refs(&map);
    assert!(refs.len() > 150, "only {} references parsed", refs.len());
    let mut missing = Vec::new();
    for r in &refs {
        assert_eq!(r.link, format!("../{}", r.path), "link of {r:?}");
        let source = fs::read_to_string(&r.path)
            .unwrap_or_else(|e| panic!("{} (named in {MAP}): {e}", r.path));
        if !has_item(&source, &r.item, Lang::of(&r.path)) {
            missing.push(format!("{} · {}", r.path, r.item));
        }
    }
    assert!(
        missing.is_empty(),
        "named in {MAP} but not found: {missing:#?}"
    );
}

#[test]
fn every_backward_and_extension_row_links_to_a_derivation_that_exists() {
    let map = fs::read_to_string(MAP).unwrap();
    let derivations = fs::read_to_string(DERIVATIONS).unwrap();
    let anchors: Vec<String> = derivations
        .lines()
        .filter_map(|l| l.strip_prefix("## "))
        .map(slug)
        .collect();
    let rows: Vec<&str> = map
        .lines()
        .filter(|l| l.starts_with("| B") || l.starts_with("| X"))
        .collect();
    assert!(
        rows.len() >= 14,
        "{} backward and extension rows",
        rows.len()
    );
    for row in rows {
        let (_, rest) = row
            .split_once("(derivations.md#")
            .unwrap_or_else(|| panic!("no derivation link in: {row}"));
        let anchor = rest.split(')').next().unwrap();
        assert!(
            anchors.iter().any(|a| a == anchor),
            "#{anchor} is not a heading of {DERIVATIONS}"
        );
    }
}

#[test]
fn every_row_names_go_and_numpy_code() {
    let map = fs::read_to_string(MAP).unwrap();
    let rows: Vec<&str> = map
        .lines()
        .filter(|l| l.starts_with("| F") || l.starts_with("| B"))
        .collect();
    assert!(rows.len() >= 34, "{} rows", rows.len());
    for row in rows {
        // The last two cells: Go, then NumPy.
        let cells: Vec<&str> = row.trim_end_matches('|').rsplit('|').take(2).collect();
        assert!(
            cells[1].contains("](../tracks/go/") && cells[0].contains("](../tracks/python/"),
            "no Go and NumPy code in: {row}"
        );
    }
}

#[test]
fn the_readme_links_the_map_and_the_checker_sees_a_renamed_function() {
    let readme = fs::read_to_string("README.md").unwrap();
    assert!(readme.contains("(docs/equations.md)"));
    assert!(Path::new(DERIVATIONS).exists());
    // The checker itself: it finds what exists and misses what does not.
    let source = "impl<'a> Router<'a> {\n    pub fn backward(&self) {}\n}\n\
                  pub mod reference {\n    pub fn adamw() {}\n}\nfn route() {}\n";
    assert!(has_item(source, "Router::backward", Lang::Rust));
    assert!(has_item(source, "reference::adamw", Lang::Rust));
    assert!(has_item(source, "route", Lang::Rust));
    assert!(!has_item(source, "Router::forward", Lang::Rust));
    assert!(!has_item(source, "reference::route", Lang::Rust));
    assert!(!has_item(source, "routes", Lang::Rust));
    let python = "def moe(x):\n    def expert(e):\n        return e\n    return x\n\
                  class AdamW:\n    def update(self):\n        pass\n";
    assert!(has_item(python, "moe.expert", Lang::Python));
    assert!(has_item(python, "AdamW.update", Lang::Python));
    assert!(!has_item(python, "expert", Lang::Python));
    assert!(!has_item(python, "moe.update", Lang::Python));
    let go = "func (m *Model) forward(ids []int) {}\nfunc (Rope) rotate() {}\nfunc route() {}\n";
    assert!(has_item(go, "Model.forward", Lang::Go));
    assert!(has_item(go, "Rope.rotate", Lang::Go));
    assert!(has_item(go, "route", Lang::Go));
    assert!(!has_item(go, "forward", Lang::Go));
    assert!(!has_item(go, "Pass.forward", Lang::Go));
    assert!(!has_item(go, "routes", Lang::Go));
}
