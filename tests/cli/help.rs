//! `--help`, `--version` and `help` exit 0; every flag docs/cli.md names exists.

use predicates::prelude::*;

use crate::{peftkit, stdout_of};

const VERBS: &[&str] = &[
    "inspect", "verify", "reshard", "merge", "extract", "remap", "convert",
];

#[test]
fn version_exits_0() {
    for flag in ["--version", "-V"] {
        peftkit()
            .arg(flag)
            .assert()
            .success()
            .stdout(format!("peftkit {}\n", env!("CARGO_PKG_VERSION")))
            .stderr(predicate::str::is_empty());
    }
}

#[test]
fn help_exits_0_and_lists_every_verb() {
    for args in [vec!["--help"], vec!["-h"], vec!["help"]] {
        let ok = peftkit()
            .args(&args)
            .assert()
            .success()
            .stderr(predicate::str::is_empty());
        let text = stdout_of(&ok);
        assert!(text.contains("Usage: peftkit <COMMAND>"), "{text}");
        for verb in VERBS {
            assert!(
                text.lines().any(|l| l.trim_start().starts_with(verb)),
                "{args:?}: {verb} missing from\n{text}"
            );
        }
    }
}

/// The flags that docs/cli.md shows for `verb`: those in its section's heading and prose.
fn documented_flags(verb: &str) -> Vec<String> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/cli.md")).unwrap();
    let start = doc
        .find(&format!("## `peftkit {verb} "))
        .unwrap_or_else(|| panic!("docs/cli.md has no section for {verb}"));
    let rest = &doc[start + 3..];
    let section = &rest[..rest.find("\n## ").unwrap_or(rest.len())];
    let mut flags: Vec<String> = Vec::new();
    let mut i = 0;
    let bytes = section.as_bytes();
    while let Some(pos) = section[i..].find("--") {
        let s = i + pos;
        let e = s
            + 2
            + section[s + 2..]
                .find(|c: char| !(c.is_ascii_lowercase() || c == '-'))
                .unwrap_or(section.len() - s - 2);
        let flag = &section[s..e];
        // Skip `cp -r`-like text and prose dashes: a flag is `--` then a letter.
        if flag.len() > 2 && bytes[s + 2].is_ascii_lowercase() && !flags.iter().any(|f| f == flag) {
            flags.push(flag.to_owned());
        }
        i = e;
    }
    flags
}

#[test]
fn every_verb_help_exits_0_and_has_the_documented_flags() {
    for verb in VERBS {
        let flags = documented_flags(verb);
        assert!(!flags.is_empty(), "{verb}: no flag found in docs/cli.md");
        for help in [vec![*verb, "--help"], vec!["help", *verb]] {
            let ok = peftkit()
                .args(&help)
                .assert()
                .success()
                .stderr(predicate::str::is_empty());
            let text = stdout_of(&ok);
            assert!(
                text.contains(&format!("Usage: peftkit {verb}")),
                "{help:?}: {text}"
            );
            for flag in &flags {
                assert!(
                    text.contains(&format!("{flag} ")) || text.contains(&format!("{flag}\n")),
                    "{verb}: docs/cli.md names {flag}, `peftkit {verb} --help` does not:\n{text}"
                );
            }
        }
    }
}
