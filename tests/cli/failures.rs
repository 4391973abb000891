//! Exit codes (docs/cli.md, "Exit codes"): 1 when `verify` finds problems, 2 for usage errors
//! (clap) and for every other error; a failed command writes nothing.

use std::path::Path;

use predicates::prelude::*;

use crate::verbs::merge_cmd;
use crate::{entries, fixture, peft_case, peftkit, stderr_of, stdout_of};

/// The last line of clap's usage errors.
const USAGE_HINT: &str = "For more information, try '--help'.\n";

/// Usage errors: clap's exit code 2, `error: ...` on stderr ending with a pointer to --help,
/// nothing on stdout.
#[test]
fn usage_errors_exit_2_with_a_usage_line() {
    let base = peft_case("lora_basic").join("base");
    let adapter = peft_case("lora_basic").join("adapter");
    let (base, adapter) = (base.to_str().unwrap(), adapter.to_str().unwrap());
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["frobnicate"], "unrecognized subcommand"),
        (vec!["inspect"], "<PATH>"),
        (vec!["inspect", base, "--bogus"], "--bogus"),
        (vec!["verify"], "<PATH>"),
        (vec!["reshard", base], "--out"),
        (vec!["reshard", base, "--out"], "--out"),
        (vec!["merge", "--base", base, "--out", "x"], "--adapter"),
        (vec!["merge", "--base", base, "--adapter", adapter], "--out"),
        (vec!["extract", "--out", "x"], "--from"),
        (
            vec![
                "extract",
                "--from",
                base,
                "--out",
                "x",
                "--lora-alpha",
                "8",
                "--config",
                "c",
            ],
            "cannot be used with",
        ),
        (vec!["remap", base, "--out", "x"], "--to"),
        (
            vec!["remap", base, "--out", "x", "--to", "sideways"],
            "sideways",
        ),
    ];
    for (args, needle) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let run = peftkit()
            .current_dir(tmp.path())
            .args(&args)
            .assert()
            .code(2)
            .stdout(predicate::str::is_empty())
            .stderr(predicate::str::starts_with("error: "))
            .stderr(predicate::str::contains(needle));
        // What tells a usage error from a runtime error with the same code.
        assert!(
            stderr_of(&run).ends_with(USAGE_HINT),
            "{args:?}: {}",
            stderr_of(&run)
        );
        assert!(entries(tmp.path()).is_empty(), "{args:?} wrote something");
    }
}

#[test]
fn no_subcommand_prints_the_help_and_exits_2() {
    peftkit()
        .assert()
        .code(2)
        .stdout(predicate::str::is_empty())
        .stderr(predicate::str::contains("Usage: peftkit <COMMAND>"))
        .stderr(predicate::str::contains("merge"));
}

/// A runtime error: exit 2, one `error: ...` message on stderr with every `needle` and no
/// usage text, nothing on stdout.
fn assert_error(cmd: &mut assert_cmd::Command, needles: &[&str]) {
    let run = cmd
        .assert()
        .code(2)
        .stdout(predicate::str::is_empty())
        .stderr(predicate::str::starts_with("error: "))
        .stderr(predicate::str::contains("Usage:").not())
        .stderr(predicate::str::contains(USAGE_HINT).not());
    let err = stderr_of(&run);
    for n in needles {
        assert!(err.contains(n), "`{n}` not in: {err}");
    }
}

#[test]
fn merge_of_an_adapter_for_another_model_names_the_module_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let gpt2 = peft_case("gpt2_conv1d").join("adapter");
    assert_error(
        peftkit()
            .arg("merge")
            .arg("--base")
            .arg(peft_case("lora_basic").join("base"))
            .arg("--adapter")
            .arg(&gpt2)
            .arg("--out")
            .arg(&out),
        &[
            gpt2.to_str().unwrap(),
            "`transformer.h.0.attn.c_attn`",
            "`transformer.h.0.attn.c_attn.weight`",
        ],
    );
    assert!(!out.exists(), "a failed merge created --out");
    assert!(
        entries(tmp.path()).is_empty(),
        "a failed merge left files beside --out"
    );
}

#[test]
fn failed_merge_leaves_an_existing_output_folder_as_it_was() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), b"previous content").unwrap();
    assert_error(
        peftkit()
            .arg("merge")
            .arg("--base")
            .arg(peft_case("lora_basic").join("base"))
            .arg("--adapter")
            .arg(peft_case("gpt2_conv1d").join("adapter"))
            .arg("--out")
            .arg(&out),
        &["transformer.h.0.attn.c_attn"],
    );
    assert_eq!(entries(tmp.path()).len(), 1);
    assert_eq!(entries(&out).into_iter().collect::<Vec<_>>(), ["keep.txt"]);
    assert_eq!(
        std::fs::read(out.join("keep.txt")).unwrap(),
        b"previous content"
    );
}

#[test]
fn merge_refusals_exit_2_and_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("missing");
    let out = tmp.path().join("out");
    let lora_base = peft_case("lora_basic").join("base");
    let lora_adapter = peft_case("lora_basic").join("adapter");
    // Missing base.
    assert_error(
        peftkit()
            .arg("merge")
            .arg("--base")
            .arg(&missing)
            .arg("--adapter")
            .arg(&lora_adapter)
            .arg("--out")
            .arg(&out),
        &[missing.to_str().unwrap(), "no checkpoint found"],
    );
    // Missing adapter.
    assert_error(
        peftkit()
            .arg("merge")
            .arg("--base")
            .arg(&lora_base)
            .arg("--adapter")
            .arg(&missing)
            .arg("--out")
            .arg(&out),
        &[missing.to_str().unwrap(), "adapter_config.json"],
    );
    // Prompt learning has nothing to merge.
    assert_error(
        &mut merge_cmd("prompt_tuning", &out),
        &["prompt_embeddings", "PROMPT_TUNING"],
    );
    // An invalid shard size.
    assert_error(
        merge_cmd("lora_basic", &out).args(["--max-shard-size", "5GiB"]),
        &["5GiB", "50GB"],
    );
    // --unmerge cannot restore what modules_to_save replaced.
    assert_error(
        merge_cmd("modules_to_save", &out).arg("--unmerge"),
        &["unmerge"],
    );
    assert!(entries(tmp.path()).is_empty(), "{:?}", entries(tmp.path()));
}

#[test]
fn other_verbs_refuse_bad_input_with_exit_2_and_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("missing");
    let out = tmp.path().join("out");
    let reloaded = fixture("checkpoint/llama_reloaded_5KB/source");
    // inspect: nothing there.
    assert_error(
        peftkit().arg("inspect").arg(&missing),
        &["cannot open", missing.to_str().unwrap()],
    );
    // reshard: a missing folder, a size in binary units.
    assert_error(
        peftkit()
            .arg("reshard")
            .arg(&missing)
            .arg("--out")
            .arg(&out),
        &[missing.to_str().unwrap()],
    );
    assert_error(
        peftkit()
            .arg("reshard")
            .arg(&reloaded)
            .arg("--out")
            .arg(&out)
            .args(["--max-shard-size", "5GiB"]),
        &["invalid shard size `5GiB`", "\"50GB\""],
    );
    // verify: a variant that is not a file-name part is an error, not a finding.
    assert_error(
        peftkit()
            .arg("verify")
            .arg(&reloaded)
            .args(["--variant", "a/b"]),
        &["variant"],
    );
    // extract: lora_alpha is not in the tensors.
    assert_error(
        peftkit()
            .arg("extract")
            .arg("--from")
            .arg(peft_case("lora_basic").join("full_state_dict.safetensors"))
            .arg("--out")
            .arg(&out),
        &["lora_alpha", "--lora-alpha", "--config"],
    );
    // remap: an original checkpoint cannot go to the original layout again...
    let original = fixture("remap/mixtral/original");
    assert_error(
        peftkit()
            .arg("remap")
            .arg(&original)
            .arg("--out")
            .arg(&out)
            .args(["--to", "original"]),
        &[
            "already in the original on-disk layout",
            "--to transformers-v5",
        ],
    );
    // ... and an adapter only goes to the v5 layout.
    assert_error(
        peftkit()
            .arg("remap")
            .arg(fixture("convert/mixtral/legacy_adapter"))
            .arg("--out")
            .arg(&out)
            .args(["--to", "original"]),
        &["is an adapter"],
    );
    assert!(entries(tmp.path()).is_empty(), "{:?}", entries(tmp.path()));
}

/// A copy of a fixture folder to damage.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn truncate_by(path: &Path, n: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len - n).unwrap();
}

#[test]
fn verify_of_a_damaged_sharded_copy_exits_1_listing_every_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    copy_dir(&fixture("checkpoint/llama_tied_5KB/expected"), &dir);
    let shards: Vec<String> = entries(&dir)
        .into_iter()
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    assert!(shards.len() >= 3);
    // Three independent problems: a truncated shard, trailing bytes, a wrong total_size.
    truncate_by(&dir.join(&shards[0]), 4);
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.join(&shards[1]))
        .unwrap();
    std::io::Write::write_all(&mut f, b"xx").unwrap();
    let index = dir.join("model.safetensors.index.json");
    let mut idx = crate::read_json(&index);
    let total = idx["metadata"]["total_size"].as_u64().unwrap();
    idx["metadata"]["total_size"] = (total + 1).into();
    std::fs::write(&index, serde_json::to_vec_pretty(&idx).unwrap()).unwrap();

    let run = peftkit().arg("verify").arg(&dir).assert().code(1);
    let out = stdout_of(&run);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    let shard0 = dir.join(&shards[0]).display().to_string();
    let shard1 = dir.join(&shards[1]).display().to_string();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&shard0) && l.contains("truncated")),
        "{out}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&shard1) && l.contains("trailing bytes")),
        "{out}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&index.display().to_string())
                && l.contains(&format!("total_size is {}", total + 1))
                && l.contains(&total.to_string())),
        "{out}"
    );
    assert_eq!(
        stderr_of(&run),
        format!("{}: 3 problem(s)\n", dir.display())
    );
}

#[test]
fn verify_reports_damage_a_loader_would_trip_on() {
    let base = peft_case("lora_basic").join("base");
    // (damage, what the problem line says)
    type Damage = fn(&Path);
    let cases: Vec<(Damage, &str)> = vec![
        (
            |d| truncate_by(&d.join("model.safetensors"), 1),
            "truncated",
        ),
        (
            |d| std::fs::write(d.join("model.safetensors"), b"").unwrap(),
            "8-byte header",
        ),
        (
            |d| {
                let mut bytes = std::fs::read(d.join("model.safetensors")).unwrap();
                bytes[8..16].copy_from_slice(b"garbage!");
                std::fs::write(d.join("model.safetensors"), bytes).unwrap();
            },
            "not valid JSON",
        ),
        (
            |d| std::fs::remove_file(d.join("model.safetensors")).unwrap(),
            "no checkpoint found",
        ),
        (
            // A stale single file next to an index shadows the shards.
            |d| {
                std::fs::write(
                    d.join("model.safetensors.index.json"),
                    br#"{"metadata": {}, "weight_map": {}}"#,
                )
                .unwrap()
            },
            "both model.safetensors and model.safetensors.index.json exist",
        ),
    ];
    for (damage, needle) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("base");
        copy_dir(&base, &dir);
        damage(&dir);
        let run = peftkit()
            .arg("verify")
            .arg(&dir)
            .assert()
            .code(1)
            .stdout(predicate::str::contains(needle))
            .stderr(predicate::str::ends_with("problem(s)\n"));
        assert!(
            stdout_of(&run).lines().count() >= 1,
            "{needle}: {}",
            stdout_of(&run)
        );
    }
    // A path that does not exist holds no checkpoint: a finding too (exit 1, not 2).
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("missing");
    peftkit()
        .arg("verify")
        .arg(&missing)
        .assert()
        .code(1)
        .stdout(predicate::str::contains("no checkpoint found"))
        .stderr(format!("{}: 1 problem(s)\n", missing.display()));
}

#[test]
fn verify_of_a_damaged_adapter_exits_1() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("adapter");
    copy_dir(&peft_case("lora_basic").join("adapter"), &dir);
    truncate_by(&dir.join("adapter_model.safetensors"), 3);
    peftkit()
        .arg("verify")
        .arg(&dir)
        .assert()
        .code(1)
        .stdout(predicate::str::contains("adapter_model.safetensors"))
        .stdout(predicate::str::contains("truncated"));
}

/// Copies a fixture folder (recursively) into `dest`, so a test can point outputs at it.
fn copy_tree(src: &Path, dest: &Path) {
    std::fs::create_dir_all(dest).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        let to = dest.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &to);
        } else {
            std::fs::copy(entry.path(), &to).unwrap();
        }
    }
}

/// Every verb that writes a folder refuses an `--out` that is an input, lies inside one or
/// contains one, also through a symlink or `..`: exit 2, both paths named, and every input
/// byte-identical afterwards (a merge into its own base used to replace the base).
#[test]
fn an_output_overlapping_an_input_is_refused_and_inputs_are_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let case = tmp.path().join("case");
    copy_tree(&peft_case("lora_basic"), &case);
    let (base, adapter) = (case.join("base"), case.join("adapter"));
    std::os::unix::fs::symlink(&base, tmp.path().join("link")).unwrap();
    let before = crate::files(&case);
    let s = |p: &Path| p.to_str().unwrap().to_owned();
    let merge = |out: &Path| -> Vec<String> {
        [
            "merge",
            "--base",
            &s(&base),
            "--adapter",
            &s(&adapter),
            "--out",
            &s(out),
        ]
        .map(String::from)
        .to_vec()
    };
    let cases: Vec<(Vec<String>, &str)> = vec![
        (merge(&base), "is the input"),
        (merge(&adapter), "is the input"),
        (merge(&adapter.join("merged")), "lies inside the input"),
        (merge(&case), "contains the input"),
        (merge(&tmp.path().join("link")), "is the input"),
        (merge(&base.join("../base")), "is the input"),
        (
            [
                "reshard",
                &s(&base),
                "--out",
                &s(&base),
                "--max-shard-size",
                "5KB",
            ]
            .map(String::from)
            .to_vec(),
            "is the input",
        ),
        (
            [
                "remap",
                &s(&base),
                "--out",
                &s(&base.join("v5")),
                "--to",
                "transformers-v5",
            ]
            .map(String::from)
            .to_vec(),
            "lies inside the input",
        ),
        (
            [
                "extract",
                "--from",
                &s(&case.join("full_state_dict.safetensors")),
                "--out",
                &s(&case),
                "--lora-alpha",
                "8",
            ]
            .map(String::from)
            .to_vec(),
            "contains the input",
        ),
    ];
    for (args, needle) in cases {
        let run = peftkit().args(&args).assert().code(2);
        let err = stderr_of(&run);
        assert!(
            err.contains(needle) && err.contains("--out"),
            "{args:?}: {err}"
        );
        assert_eq!(crate::files(&case), before, "{args:?} modified an input");
    }
}

/// `--adapter DIR:nan` (or `:inf`) used to exit 0 and write all-NaN weights.
#[test]
fn a_non_finite_adapter_weight_is_refused_and_nothing_is_written() {
    let case = peft_case("lora_basic");
    for w in ["nan", "inf", "-inf"] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("merged");
        let adapter = format!("{}:{w}", case.join("adapter").display());
        let run = peftkit()
            .args(["merge", "--base"])
            .arg(case.join("base"))
            .args(["--adapter", &adapter, "--out"])
            .arg(&out)
            .assert()
            .code(2);
        assert!(stderr_of(&run).contains("not a finite number"), "{w}");
        assert!(!out.exists(), "{w}: output written");
    }
}

/// `verify` reads the configs a loader reads: a `config.json`, `generation_config.json` or
/// `adapter_config.json` that is not JSON, or an adapter config peft would refuse, is a problem
/// (exit 1, the file named), where it used to say "ok".
#[test]
fn verify_lists_broken_configs() {
    let tmp = tempfile::tempdir().unwrap();
    let case = peft_case("lora_basic");
    let good_adapter = std::fs::read_to_string(case.join("adapter/adapter_config.json")).unwrap();
    let with_r0 = {
        let mut v: serde_json::Value = serde_json::from_str(&good_adapter).unwrap();
        v["r"] = serde_json::json!(0);
        v.to_string()
    };
    let with_unknown_type = good_adapter.replace("\"LORA\"", "\"NOPE\"");
    let cases: Vec<(&str, &str, String, &str)> = vec![
        ("base", "config.json", "{not json".into(), "config.json"),
        (
            "base",
            "generation_config.json",
            "[]".into(),
            "generation_config.json",
        ),
        (
            "adapter",
            "adapter_config.json",
            "{not json".into(),
            "adapter_config.json",
        ),
        ("adapter", "adapter_config.json", with_r0, "`r`"),
        ("adapter", "adapter_config.json", with_unknown_type, "NOPE"),
    ];
    for (i, (folder, file, text, needle)) in cases.into_iter().enumerate() {
        let dir = tmp.path().join(format!("{i}"));
        copy_tree(&case.join(folder), &dir);
        std::fs::write(dir.join(file), text).unwrap();
        let run = peftkit().arg("verify").arg(&dir).assert().code(1);
        let out = stdout_of(&run);
        assert!(out.contains(file) && out.contains(needle), "{file}: {out}");
    }
    // The unbroken folders still verify.
    for folder in ["base", "adapter"] {
        peftkit()
            .arg("verify")
            .arg(case.join(folder))
            .assert()
            .code(0);
    }
}

/// Wrong kinds of input get an error that says what the input is and what to do, not a bare
/// "no checkpoint found" or a nonsensical header length.
#[test]
fn wrong_kinds_of_input_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let bins = tmp.path().join("bins");
    std::fs::create_dir(&bins).unwrap();
    std::fs::write(bins.join("pytorch_model.bin"), b"PK\x03\x04").unwrap();
    let variant = tmp.path().join("variant");
    std::fs::create_dir(&variant).unwrap();
    std::fs::copy(
        peft_case("lora_basic").join("base/model.safetensors"),
        variant.join("model.fp16.safetensors"),
    )
    .unwrap();
    let json = tmp.path().join("config.safetensors");
    std::fs::write(&json, br#"{"model_type": "llama"}"#).unwrap();
    let cases: Vec<(String, &str)> = vec![
        (
            bins.display().to_string(),
            "not a readable torch.save state dict",
        ),
        (variant.display().to_string(), "pass --variant fp16"),
        (
            "no-such-org/no-such-model".into(),
            "hf download no-such-org/no-such-model",
        ),
        (
            json.display().to_string(),
            "this is a JSON file, not a safetensors file",
        ),
    ];
    for (input, needle) in cases {
        let run = peftkit()
            .current_dir(tmp.path())
            .args(["inspect", &input])
            .assert()
            .code(2);
        assert!(
            stderr_of(&run).contains(needle),
            "{input}: {}",
            stderr_of(&run)
        );
    }
}
