//! `--help`, `--version` and `help` exit 0; every flag docs/cli.md names exists.

use predicates::prelude::*;

use crate::{peftkit, stdout_of};

/// Every verb of the binary: `--help` must list each, and docs/cli.md must document each.
const VERBS: &[&str] = &[
    "inspect",
    "verify",
    "diff",
    "reshard",
    "merge",
    "extract",
    "remap",
    "convert",
    "completions",
    "man",
];

/// What `--version` prints after `peftkit `: the version and, in a git checkout of this
/// repository, the commit (build.rs).
fn expected_version() -> String {
    let root = env!("CARGO_MANIFEST_DIR");
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(root)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8(o.stdout).unwrap().trim().to_owned())
    };
    let ours = git(&["rev-parse", "--show-toplevel"])
        .is_some_and(|top| std::path::Path::new(&top) == std::path::Path::new(root));
    match std::env::var("PEFTKIT_GIT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| {
            ours.then(|| git(&["rev-parse", "--short=12", "HEAD"]))
                .flatten()
        }) {
        Some(c) => format!("{} (commit {c})", env!("CARGO_PKG_VERSION")),
        None => env!("CARGO_PKG_VERSION").to_owned(),
    }
}

#[test]
fn version_exits_0() {
    for flag in ["--version", "-V"] {
        peftkit()
            .arg(flag)
            .assert()
            .success()
            .stdout(format!("peftkit {}\n", expected_version()))
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
        assert!(
            text.contains("Usage: peftkit [OPTIONS] <COMMAND>"),
            "{text}"
        );
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
        // Every verb has a section (completions has no flag of its own to list).
        let flags = documented_flags(verb);
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

/// The README starts with its two commands (the example merge, then the tests), and every verb
/// of its tour is one `--help` lists.
#[test]
fn readme_starts_with_its_two_commands_and_tours_only_real_verbs() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let blocks: Vec<&str> = readme.split("```").skip(1).step_by(2).collect();
    let before_first = &readme[..readme.find("```").unwrap()];
    assert_eq!(
        before_first.trim(),
        "# peftkit",
        "the README must start with the commands"
    );
    assert!(
        blocks[0]
            .trim()
            .starts_with("cargo run --release -- merge "),
        "{}",
        blocks[0]
    );
    assert_eq!(blocks[1].trim(), "cargo test --workspace");
    let between = &readme[readme.find(blocks[0]).unwrap() + blocks[0].len() + 3
        ..readme.find(blocks[1]).unwrap() - 3];
    assert!(
        between.trim().is_empty(),
        "nothing between the two commands: {between:?}"
    );

    let help = stdout_of(&peftkit().arg("--help").assert().success());
    let tour = &readme[readme.find("## A tour of the verbs").expect("a tour")..];
    let tour_block = tour.split("```").nth(1).unwrap();
    let mut toured = Vec::new();
    for line in tour_block.lines().filter(|l| l.starts_with("peftkit ")) {
        let verb = line.split_whitespace().nth(1).unwrap();
        assert!(
            help.lines()
                .any(|l| l.trim_start().starts_with(&format!("{verb} "))),
            "README tours `{verb}`, which `peftkit --help` does not list"
        );
        toured.push(verb);
    }
    for verb in VERBS {
        assert!(toured.contains(verb), "README's tour misses `{verb}`");
    }
}

/// build.rs unpacked from a tarball (no `.git`): the bare version, or the commit a packager
/// gives in `PEFTKIT_GIT_COMMIT`. The script is compiled on its own, as cargo would.
#[test]
fn a_build_without_git_has_the_bare_version_or_the_packagers_commit() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/build.rs"),
        dir.join("build.rs"),
    )
    .unwrap();
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned());
    let status = std::process::Command::new(rustc)
        .args(["--edition", "2021", "-o"])
        .arg(dir.join("build-script"))
        .arg(dir.join("build.rs"))
        .env("CARGO_MANIFEST_DIR", dir)
        .env("CARGO_PKG_VERSION", "9.8.7")
        .status()
        .unwrap();
    assert!(status.success());
    let run = |commit: Option<&str>| {
        let mut cmd = std::process::Command::new(dir.join("build-script"));
        cmd.current_dir(dir).env_remove("PEFTKIT_GIT_COMMIT");
        if let Some(c) = commit {
            cmd.env("PEFTKIT_GIT_COMMIT", c);
        }
        String::from_utf8(cmd.output().unwrap().stdout).unwrap()
    };
    assert!(
        run(None).contains("cargo:rustc-env=PEFTKIT_VERSION=9.8.7\n"),
        "{}",
        run(None)
    );
    assert!(run(Some("abc123")).contains("cargo:rustc-env=PEFTKIT_VERSION=9.8.7 (commit abc123)\n"));
}
