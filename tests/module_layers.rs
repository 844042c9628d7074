//! The library's modules sit on floors (`docs/architecture.md`, "Module
//! layers"): a module may use only modules on floors below its own. This test
//! reads every `crate::` path in `src/` (imports, inline paths and the
//! `serde(with = "crate::...")` strings alike; comments are skipped) and fails
//! on a path that goes up or sideways, on a module missing from the floors,
//! and on a path through a crate-root re-export (`crate::EventBus`), which
//! would hide where the item lives.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

/// The floors, from `docs/architecture.md`: the fenced block after the
/// `<!-- module-layers -->` marker, one floor per line, top floor first.
fn floors(doc: &str) -> Result<BTreeMap<String, usize>, String> {
    let after = doc.split_once("<!-- module-layers -->").ok_or("no <!-- module-layers --> marker")?.1;
    let block = after.split_once("```text\n").ok_or("no ```text block after the marker")?.1;
    let block = block.split_once("```").ok_or("unterminated block")?.0;
    let lines: Vec<&str> = block.lines().map(|l| l.split('#').next().unwrap_or("").trim()).collect();
    let lines: Vec<&str> = lines.into_iter().filter(|l| !l.is_empty()).collect();
    let mut floor_of = BTreeMap::new();
    for (i, line) in lines.iter().enumerate() {
        // Top floor first in the file; floor 0 is the ground.
        let floor = lines.len() - 1 - i;
        for module in line.split_whitespace() {
            if floor_of.insert(module.to_string(), floor).is_some() {
                return Err(format!("module {module} is on two floors"));
            }
        }
    }
    Ok(floor_of)
}

/// The source with comments removed; string contents kept (a
/// `serde(with = "crate::config::millis")` is a real dependency).
fn strip_comments(src: &str) -> String {
    let c: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let ident = |ch: char| ch.is_alphanumeric() || ch == '_';
    let mut i = 0;
    while i < c.len() {
        let next = c.get(i + 1).copied();
        match c[i] {
            '/' if next == Some('/') => {
                while i < c.len() && c[i] != '\n' {
                    i += 1;
                }
            }
            '/' if next == Some('*') => {
                let mut depth = 0;
                while i < c.len() {
                    if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                        depth += 1;
                        i += 2;
                    } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
                out.push(' ');
            }
            'r' if (i == 0 || !ident(c[i - 1])) && matches!(next, Some('"') | Some('#')) => {
                // A raw string r"..." / r#"..."#, kept whole.
                let mut j = i + 1;
                while c.get(j) == Some(&'#') {
                    j += 1;
                }
                if c.get(j) != Some(&'"') {
                    out.push(c[i]);
                    i += 1;
                    continue;
                }
                let hashes = j - i - 1;
                let start = i;
                j += 1;
                while j < c.len() && !(c[j] == '"' && (1..=hashes).all(|k| c.get(j + k) == Some(&'#'))) {
                    j += 1;
                }
                let end = (j + 1 + hashes).min(c.len());
                out.extend(&c[start..end]);
                i = end;
            }
            '"' => {
                let start = i;
                i += 1;
                while i < c.len() && c[i] != '"' {
                    i += if c[i] == '\\' { 2 } else { 1 };
                }
                i = (i + 1).min(c.len());
                out.extend(&c[start..i]);
            }
            '\'' => {
                // A char literal ('x', '\n', '"'), or a lifetime ('a).
                let len = if next == Some('\\') {
                    let mut j = i + 2;
                    while j < c.len() && c[j] != '\'' {
                        j += 1;
                    }
                    j + 1 - i
                } else if c.get(i + 2) == Some(&'\'') {
                    3
                } else {
                    1
                };
                let end = (i + len).min(c.len());
                out.extend(&c[i..end]);
                i = end;
            }
            ch => {
                out.push(ch);
                i += 1;
            }
        }
    }
    out
}

/// The first path segment after each `crate::` (and after a `super::` chain
/// that climbs to the crate root from a file `depth` modules deep), with its
/// line; `crate::{a::X, b}` yields `a` and `b`.
fn crate_paths(code: &str, depth: usize) -> Vec<(usize, String)> {
    let ident = |ch: char| ch.is_alphanumeric() || ch == '_';
    let mut found = Vec::new();
    let bytes: Vec<char> = code.chars().collect();
    let line_at = |pos: usize| bytes[..pos].iter().filter(|&&c| c == '\n').count() + 1;
    let mut i = 0;
    while i < bytes.len() {
        let rest: String = bytes[i..bytes.len().min(i + 7)].iter().collect();
        let boundary = i == 0 || !ident(bytes[i - 1]);
        let mut after = None;
        if boundary && rest == "crate::" {
            after = Some(i + 7);
        } else if boundary && depth > 0 && rest.starts_with("super::") {
            let mut j = i;
            let mut climbs = 0;
            while bytes[j..].iter().take(7).collect::<String>() == "super::" {
                climbs += 1;
                j += 7;
            }
            if climbs >= depth {
                after = Some(j);
            }
            i = j.max(i + 1) - 1;
        }
        let Some(start) = after else {
            i += 1;
            continue;
        };
        let line = line_at(i);
        let mut j = start;
        while j < bytes.len() && bytes[j].is_whitespace() {
            j += 1;
        }
        if bytes.get(j) == Some(&'{') {
            // A group: the first segment of every top-level item.
            let mut level = 0;
            let mut expect_item = true;
            while j < bytes.len() {
                let ch = bytes[j];
                match ch {
                    '{' => {
                        level += 1;
                        if level == 1 {
                            expect_item = true;
                        }
                    }
                    '}' => {
                        level -= 1;
                        if level == 0 {
                            break;
                        }
                    }
                    ',' if level == 1 => expect_item = true,
                    ch if level == 1 && expect_item && ident(ch) => {
                        let end = (j..bytes.len()).find(|&k| !ident(bytes[k])).unwrap_or(bytes.len());
                        found.push((line_at(j), bytes[j..end].iter().collect()));
                        expect_item = false;
                        j = end;
                        continue;
                    }
                    _ => {}
                }
                j += 1;
            }
        } else {
            let end = (j..bytes.len()).find(|&k| !ident(bytes[k])).unwrap_or(bytes.len());
            if end > j {
                found.push((line, bytes[j..end].iter().collect()));
            }
        }
        i = start;
    }
    found
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every path of one file that does not go down: `(line, message)`.
fn violations(module: &str, depth: usize, src: &str, floors: &BTreeMap<String, usize>) -> Vec<(usize, String)> {
    let Some(&own) = floors.get(module) else {
        return vec![(1, format!("module `{module}` is on no floor of docs/architecture.md (\"Module layers\")"))];
    };
    let mut out = Vec::new();
    for (line, target) in crate_paths(&strip_comments(src), depth) {
        if target == module || target == "self" {
            continue;
        }
        match floors.get(&target) {
            None => out.push((
                line,
                format!("`crate::{target}` is not a module on a floor: name the module that defines it"),
            )),
            Some(&floor) if floor >= own => out.push((
                line,
                format!(
                    "`{module}` (floor {own}) uses `crate::{target}` (floor {floor}): a module uses only floors below its own"
                ),
            )),
            Some(_) => {}
        }
    }
    out
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn no_module_uses_a_module_on_its_floor_or_above() {
    let doc = fs::read_to_string(root().join("docs/architecture.md")).unwrap();
    let floors = floors(&doc).unwrap();
    let src = root().join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut problems = Vec::new();
    for file in &files {
        let rel = file.strip_prefix(&src).unwrap();
        let parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
        if parts == ["lib.rs"] {
            continue; // the root declares and re-exports every module
        }
        let module = parts[0].trim_end_matches(".rs").to_string();
        let depth = if parts.last().unwrap() == "mod.rs" { parts.len() - 1 } else { parts.len() };
        let text = fs::read_to_string(file).unwrap();
        for (line, message) in violations(&module, depth, &text, &floors) {
            problems.push(format!("src/{}:{line}: {message}", rel.display()));
        }
    }
    // Every floor's module exists.
    for module in floors.keys() {
        if !src.join(format!("{module}.rs")).exists() && !src.join(module).join("mod.rs").exists() {
            problems.push(format!("docs/architecture.md names module `{module}`, which src/ does not have"));
        }
    }
    assert!(problems.is_empty(), "module layers broken:\n{}", problems.join("\n"));
}

/// The checker itself: it must catch what it exists to catch.
#[test]
fn an_upward_import_is_caught() {
    let floors = floors("<!-- module-layers -->\n```text\nbus\ncallbacks  # note\nerror other\n```\n").unwrap();
    // The import this layering removed (the callbacks took PublishError from the façade).
    let src = "use crate::backlog::X;\nuse crate::bus::PublishError;\n";
    let floors_with_backlog = {
        let mut f = floors.clone();
        f.insert("backlog".into(), 0);
        f
    };
    assert_eq!(
        violations("callbacks", 1, src, &floors_with_backlog),
        vec![(2, "`callbacks` (floor 1) uses `crate::bus` (floor 2): a module uses only floors below its own".into())]
    );
    // Grouped, inline, in a serde string, through `super::`; sideways too.
    let src = "use crate::{error::E,\n  bus::{B, C}};\nfn f() { crate::other::g(); }\n#[serde(with = \"crate::bus::m\")]\nuse super::bus::D;";
    let lines: Vec<usize> = violations("error", 1, src, &floors).into_iter().map(|(l, _)| l).collect();
    assert_eq!(lines, vec![2, 3, 4, 5]);
    // Comments, doc links and look-alikes are not uses; a crate-root re-export is refused.
    let src =
        "//! [`crate::bus::EventBus`]\n/* crate::bus */ let s = '\"'; // crate::bus\nlet t = \"x\"; mycrate::bus::f();";
    assert!(violations("error", 1, src, &floors).is_empty());
    assert_eq!(violations("error", 1, "use crate::EventBus;", &floors).len(), 1);
    // A module on no floor is reported.
    assert_eq!(violations("context", 1, "", &floors).len(), 1);
}
