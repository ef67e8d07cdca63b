//! SQL is built only with bound parameters. sqlx 0.9 refuses any query string that is not a
//! `'static` literal unless it is wrapped in `AssertSqlSafe`, so the wrapped ones are the only
//! places where text could reach SQL unbound. This test finds every one in the sources and
//! checks that it interpolates nothing but reviewed names: the column-list constants and scratch
//! database names made from a UUID by the test fixtures, the benchmark and the chaos harness.
//! A new `AssertSqlSafe` fails here until it is reviewed and listed.

use std::path::Path;

/// What an `AssertSqlSafe` string may interpolate, and why that is safe.
const REVIEWED: &[(&str, &str)] = &[
    ("COLUMNS", "a `const` column list"),
    ("name", "a scratch database name: a fixed prefix and a UUID in hex"),
    ("db_name", "a scratch database name: a fixed prefix and a UUID in hex"),
    (
        "scratch_name(tag)",
        "a scratch database name: a fixed prefix and a UUID in hex",
    ),
];

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The placeholders (`{x}`) and positional arguments of the `format!` that builds the string.
fn interpolations(text: &str) -> Vec<String> {
    let Some(start) = text.find("format!(") else {
        return Vec::new();
    };
    let rest = &text[start + 8..];
    let mut depth = 1;
    let mut end = rest.len();
    for (i, c) in rest.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    end = i;
                    break;
                }
            }
            _ => {}
        }
    }
    let call = &rest[..end];
    let (literal, args) = match call.rfind('"') {
        Some(q) => (&call[..q], &call[q + 1..]),
        None => (call, ""),
    };
    let mut out: Vec<String> = Vec::new();
    let mut chars = literal.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c == '{' {
            let close = literal[i..].find('}').map(|j| i + j).unwrap_or(literal.len());
            let inner = &literal[i + 1..close];
            if !inner.is_empty() {
                out.push(inner.split(':').next().unwrap().to_owned());
            }
        }
    }
    out.extend(args.split(',').map(|a| a.trim().to_owned()).filter(|a| !a.is_empty()));
    out
}

#[test]
fn every_unbound_sql_string_interpolates_only_reviewed_names() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    for krate in ["seaport", "seaport-sea"] {
        rust_files(&root.join(krate).join("src"), &mut files);
    }
    let mut found = 0;
    for file in files {
        let source = std::fs::read_to_string(&file).unwrap();
        for (at, _) in source.match_indices("AssertSqlSafe(") {
            found += 1;
            let after = &source[at..(at + 400).min(source.len())];
            // Either the string is built right here, or in a `let` just before.
            let built_here = after[..after.find(')').unwrap_or(after.len())].contains("format!");
            let text = if built_here || after.starts_with("AssertSqlSafe(format!") {
                after.to_owned()
            } else {
                // `AssertSqlSafe(var)`: find `let var = ...` before it; it must be a `format!`
                // or a literal.
                let var = after["AssertSqlSafe(".len()..].split(')').next().unwrap().trim();
                let before = &source[at.saturating_sub(600)..at];
                let def = before
                    .rfind(&format!("let {var} ="))
                    .unwrap_or_else(|| panic!("{}: cannot find how `{var}` is built", file.display()));
                let def = &before[def..];
                assert!(
                    def.contains("format!(")
                        || def
                            .trim_start_matches(&format!("let {var} ="))
                            .trim_start()
                            .starts_with('"'),
                    "{}: `{var}` is not built by format! or a literal",
                    file.display()
                );
                def.to_owned()
            };
            for used in interpolations(&text) {
                assert!(
                    REVIEWED.iter().any(|(name, _)| *name == used),
                    "{}: AssertSqlSafe interpolates `{used}`, which is not a reviewed name; bind it as a parameter",
                    file.display()
                );
            }
        }
    }
    assert!(found >= 5, "the scan found the known AssertSqlSafe uses ({found})");
}

#[test]
fn the_scanner_catches_an_interpolated_value() {
    assert_eq!(
        interpolations(r#"format!("SELECT {COLUMNS} FROM t WHERE id = '{id}'")"#),
        ["COLUMNS", "id"]
    );
    assert_eq!(
        interpolations(r#"format!("DROP DATABASE {} X", scratch_name(tag))"#),
        ["scratch_name(tag)"]
    );
}
