//! What every verb shares: completions, man pages, `-q`, and the forms of `--max-shard-size`.

use predicates::prelude::*;

use crate::verbs::merge_cmd;
use crate::{entries, files, fixture, peftkit, stdout_of};

/// The verbs, as `--help` lists them (help.rs checks that list against docs/cli.md).
const VERBS: &[&str] = &[
    "inspect",
    "verify",
    "diff",
    "reshard",
    "merge",
    "extract",
    "remap",
    "completions",
    "man",
];

#[test]
fn completions_of_every_shell_know_every_verb() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let ok = peftkit()
            .args(["completions", shell])
            .assert()
            .success()
            .stderr(predicate::str::is_empty());
        let script = stdout_of(&ok);
        for verb in VERBS {
            assert!(script.contains(verb), "{shell}: no {verb}");
        }
        // Flags of a verb are completed too.
        assert!(script.contains("max-shard-size"), "{shell}");
    }
    peftkit()
        .args(["completions", "tcsh"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("bash"));
}

#[test]
fn man_prints_the_page_and_writes_one_per_verb() {
    let ok = peftkit().arg("man").assert().success();
    let page = stdout_of(&ok);
    assert!(
        page.starts_with(".ie") || page.contains(".TH peftkit 1"),
        "{page}"
    );
    assert!(page.contains(".TH peftkit 1"));
    for verb in VERBS {
        assert!(page.contains(verb), "no {verb} in the man page");
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("man1");
    peftkit()
        .arg("man")
        .arg("--out")
        .arg(&out)
        .assert()
        .success();
    let written = entries(&out);
    assert!(written.contains("peftkit.1"), "{written:?}");
    for verb in VERBS {
        assert!(
            written.contains(&format!("peftkit-{verb}.1")),
            "{verb}: {written:?}"
        );
    }
    let merge = std::fs::read_to_string(out.join("peftkit-merge.1")).unwrap();
    assert!(merge.contains("safe\\-merge"), "{merge}");
}

#[test]
fn quiet_leaves_only_what_was_asked_for() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    // A writing verb: no summary line, no notes.
    merge_cmd("lora_basic", &out)
        .arg("-q")
        .assert()
        .success()
        .stdout(predicate::str::is_empty())
        .stderr(predicate::str::is_empty());
    let loud = merge_cmd("lora_basic", &out).assert().success();
    assert!(stdout_of(&loud).contains("merged"));
    // --json is asked for: it stays.
    let json = merge_cmd("lora_basic", &out)
        .args(["-q", "--json"])
        .assert()
        .success();
    assert!(stdout_of(&json).starts_with('{'));
    // -q and -v contradict each other.
    peftkit()
        .args(["-q", "-v", "inspect"])
        .arg(&out)
        .assert()
        .code(2);
}

#[test]
fn max_shard_size_takes_bytes_or_a_decimal_size_and_names_what_it_refuses() {
    let src = fixture("checkpoint/llama_reloaded_5KB/source");
    let tmp = tempfile::tempdir().unwrap();
    let resharded = |size: &str| {
        let out = tmp.path().join(size.replace(' ', "_"));
        peftkit()
            .arg("reshard")
            .arg(&src)
            .arg("--out")
            .arg(&out)
            .args(["--max-shard-size", size, "--no-fsync"])
            .assert()
            .success();
        files(&out)
    };
    // transformers' max_shard_size=5000 (an int) is "5KB".
    let bytes = resharded("5000");
    assert!(bytes.len() > 3, "{:?}", bytes.keys());
    assert_eq!(bytes, resharded("5KB"));
    assert_eq!(bytes, resharded("5 kb"));
    for (bad, named) in [
        ("5 GiB", "`GiB` is a binary unit"),
        ("5G", "`G` is not a unit"),
    ] {
        peftkit()
            .arg("reshard")
            .arg(&src)
            .arg("--out")
            .arg(tmp.path().join("bad"))
            .args(["--max-shard-size", bad])
            .assert()
            .code(2)
            .stderr(
                predicate::str::contains(named)
                    .and(predicate::str::contains("\"10000\""))
                    .and(predicate::str::contains("\"50GB\""))
                    .and(predicate::str::contains("IB").count(0)),
            );
    }
    assert!(!tmp.path().join("bad").exists());
}
