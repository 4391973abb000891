//! Issue 12: inputs are never modified (`--in-place` stays atomic), non-finite values are
//! refused, staging folders never outlive their run (stale ones removed, signals, a full disk
//! or a file-size limit), and `verify --json`.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{
    entries, files, fixture, peft_case, peftkit, read_json, stderr_of, stdout_json, stdout_of,
};

/// A copy of a fixture folder (recursively).
pub fn copy_tree(src: &Path, dest: &Path) {
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

/// Entries of `dir` that are staging folders.
pub fn staging_litter(dir: &Path) -> Vec<String> {
    entries(dir)
        .into_iter()
        .filter(|n| n.contains(".peftkit-staging-"))
        .collect()
}

/// `lora_basic` copied into a fresh temporary folder: (tmp, base, adapter, peft's merge).
fn lora_case() -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let case = tmp.path().join("case");
    copy_tree(&peft_case("lora_basic"), &case);
    (
        tmp,
        case.join("base"),
        case.join("adapter"),
        case.join("merged"),
    )
}

/// `merge --in-place` writes what `merge --out` writes (peft's merged model, byte for byte)
/// over the base, and leaves nothing beside it; reshard and remap `--in-place` write what
/// their `--out` runs write.
#[test]
fn in_place_writes_what_out_writes() {
    let (tmp, base, adapter, merged) = lora_case();
    peftkit()
        .args(["merge", "--in-place", "--no-fsync", "--base"])
        .arg(&base)
        .arg("--adapter")
        .arg(&adapter)
        .assert()
        .code(0);
    assert_eq!(
        std::fs::read(base.join("model.safetensors")).unwrap(),
        std::fs::read(merged.join("model.safetensors")).unwrap()
    );
    for (verb, extra) in [
        ("reshard", vec!["--max-shard-size", "5KB"]),
        ("remap", vec!["--to", "transformers-v5"]),
    ] {
        let copy = tmp.path().join(format!("{verb}-in-place"));
        copy_tree(&merged, &copy);
        let out = tmp.path().join(format!("{verb}-out"));
        peftkit()
            .arg(verb)
            .arg(&merged)
            .arg("--out")
            .arg(&out)
            .args(&extra)
            .assert()
            .code(0);
        peftkit()
            .arg(verb)
            .arg(&copy)
            .arg("--in-place")
            .args(&extra)
            .assert()
            .code(0);
        assert_eq!(files(&copy), files(&out), "{verb}");
    }
    assert!(staging_litter(tmp.path()).is_empty());
    assert!(staging_litter(&tmp.path().join("case")).is_empty());
}

/// `--in-place` with `--out` is a usage error; a failing in-place merge leaves the base as it
/// was; an in-place merge still refuses an adapter inside the base.
#[test]
fn in_place_refusals_leave_the_input_untouched() {
    let (tmp, base, adapter, _) = lora_case();
    peftkit()
        .args(["merge", "--in-place", "--base"])
        .arg(&base)
        .arg("--adapter")
        .arg(&adapter)
        .arg("--out")
        .arg(tmp.path().join("x"))
        .assert()
        .code(2)
        .stderr(predicates::str::contains("cannot be used with"));
    let before = files(&base);
    let run = peftkit()
        .args(["merge", "--in-place", "--base"])
        .arg(&base)
        .arg("--adapter")
        .arg(peft_case("gpt2_conv1d").join("adapter"))
        .assert()
        .code(2);
    assert!(stderr_of(&run).contains("c_attn"), "{}", stderr_of(&run));
    let inner = base.join("adapter");
    copy_tree(&adapter, &inner);
    let before_inner = files(&base);
    peftkit()
        .args(["merge", "--in-place", "--base"])
        .arg(&base)
        .arg("--adapter")
        .arg(&inner)
        .assert()
        .code(2)
        .stderr(predicates::str::contains("contains the input"));
    assert_eq!(files(&base), before_inner);
    std::fs::remove_dir_all(&inner).unwrap();
    assert_eq!(files(&base), before);
    assert!(staging_litter(base.parent().unwrap()).is_empty());
}

/// The adapter of `lora_basic` with the first value of `tensor` set to `value`.
pub fn adapter_with(dir: &Path, tensor: &str, value: f32) {
    let path = dir.join("adapter_model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let t = crate::header(&path)
        .into_iter()
        .find(|t| t.name == tensor)
        .unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let at = 8 + n + t.begin as usize;
    bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
    std::fs::write(&path, bytes).unwrap();
}

/// A NaN or Inf in an adapter tensor, or produced by the merge, is refused naming the tensor;
/// `--allow-nonfinite` merges as peft does; `--safe-merge` still refuses (peft's check).
#[test]
fn non_finite_values_are_refused_unless_allowed() {
    let key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";
    for bad in [f32::NAN, f32::INFINITY] {
        let (tmp, base, adapter, _) = lora_case();
        adapter_with(&adapter, key, bad);
        let before = files(tmp.path());
        let out = tmp.path().join("out");
        let merge = || {
            let mut c = peftkit();
            c.args(["merge", "--no-fsync", "--base"])
                .arg(&base)
                .arg("--adapter")
                .arg(&adapter)
                .arg("--out")
                .arg(&out);
            c
        };
        let run = merge().assert().code(2);
        let err = stderr_of(&run);
        assert!(
            err.contains(key) && err.contains("--allow-nonfinite"),
            "{err}"
        );
        assert!(!out.exists());
        merge()
            .arg("--safe-merge")
            .assert()
            .code(2)
            .stderr(predicates::str::contains(key));
        merge().arg("--allow-nonfinite").assert().code(0);
        let merged = files(&out);
        assert!(merged.contains_key("model.safetensors"));
        std::fs::remove_dir_all(&out).unwrap();
        assert_eq!(files(tmp.path()), before, "inputs modified");
    }
    // A finite adapter whose merge overflows f32: the merged tensor is named.
    let (tmp, base, adapter, _) = lora_case();
    let out = tmp.path().join("out");
    let run = peftkit()
        .args(["merge", "--no-fsync", "--base"])
        .arg(&base)
        .arg("--adapter")
        .arg(format!("{}:3e38", adapter.display()))
        .arg("--out")
        .arg(&out)
        .assert()
        .code(2);
    let err = stderr_of(&run);
    assert!(
        err.contains("model.layers.0.self_attn.q_proj.weight")
            && err.contains("NaN or infinite value(s) after merging that the base did not hold"),
        "{err}"
    );
    assert!(!out.exists() && staging_litter(tmp.path()).is_empty());
}

/// A merge into a bitsandbytes base (kept, `--dequantize`) or into the QLoRA round trip of a
/// 16-bit one that overflows is refused naming a merged weight, and writes nothing: the merged
/// weights there are computed band by band, and the check spans the whole weight.
/// `--allow-nonfinite` writes what peft would.
#[test]
fn bitsandbytes_merges_that_overflow_are_refused_unless_allowed() {
    let (nf4, int8) = (fixture("bnb/nf4_nested_bf16"), fixture("bnb8/int8_bf16"));
    let runs: [(PathBuf, PathBuf, &[&str]); 5] = [
        (nf4.join("base4"), nf4.join("adapter"), &[]),
        (nf4.join("base4"), nf4.join("adapter"), &["--dequantize"]),
        (
            nf4.join("base16"),
            nf4.join("adapter"),
            &["--qlora-base", "nf4"],
        ),
        (int8.join("base8"), int8.join("adapter"), &[]),
        (int8.join("base8"), int8.join("adapter"), &["--dequantize"]),
    ];
    for (base, adapter, flags) in runs {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let merge = || {
            let mut c = peftkit();
            c.args(["merge", "--no-fsync", "--base"])
                .arg(&base)
                .arg("--adapter")
                .arg(format!("{}:3e38", adapter.display()))
                .arg("--out")
                .arg(&out)
                .args(flags);
            c
        };
        let err = stderr_of(&merge().assert().code(2));
        assert!(
            err.contains("proj.weight")
                && err
                    .contains("NaN or infinite value(s) after merging that the base did not hold"),
            "{flags:?}: {err}"
        );
        assert!(
            !out.exists() && staging_litter(tmp.path()).is_empty(),
            "{flags:?}"
        );
        merge().arg("--allow-nonfinite").assert().code(0);
        assert!(out.join("config.json").exists(), "{flags:?}");
    }
}

/// A staging folder of a dead process beside the output is removed before the run, which
/// says so; one whose owner still runs is left alone.
#[test]
fn stale_staging_folders_of_dead_runs_are_removed_and_reported() {
    let (tmp, base, _, _) = lora_case();
    let dead = tmp.path().join(".out.peftkit-staging-0-abcdef");
    std::fs::create_dir(&dead).unwrap();
    std::fs::write(
        dead.join("model-00001-of-00002.safetensors"),
        vec![0u8; 4096],
    )
    .unwrap();
    let legacy = tmp.path().join(".old.peftkit-staging-XYZ123");
    std::fs::create_dir(&legacy).unwrap();
    let alive = tmp
        .path()
        .join(format!(".out.peftkit-staging-{}-keep", std::process::id()));
    std::fs::create_dir(&alive).unwrap();
    let run = peftkit()
        .arg("reshard")
        .arg(&base)
        .arg("--out")
        .arg(tmp.path().join("out"))
        .arg("--no-fsync")
        .assert()
        .code(0);
    let err = stderr_of(&run);
    for d in [&dead, &legacy] {
        assert!(
            err.contains(&format!("removed stale staging folder {}", d.display())),
            "{err}"
        );
        assert!(!d.exists());
    }
    assert!(err.contains("process 0, which no longer runs"), "{err}");
    assert!(
        alive.exists(),
        "a live process's staging folder was removed"
    );
}

/// Runs `script` in bash with `$PEFTKIT` set to the binary; returns (code, stdout, stderr).
fn bash(script: &str) -> (i32, String, String) {
    let out = Command::new("bash")
        .arg("-c")
        .arg(script)
        .env("PEFTKIT", assert_cmd::cargo::cargo_bin!("peftkit"))
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A merge that reaches the file-size limit (`ulimit -f`, SIGXFSZ then EFBIG) mid-save
/// reports it, removes its partial files and leaves the previous output as it was.
#[test]
fn a_file_size_limit_during_a_save_keeps_the_previous_output() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    crate::crash::big_checkpoint(&base, 4, 64 * 1024);
    let out = tmp.path().join("out");
    // A previous, smaller output that fits under the limit.
    peftkit()
        .arg("reshard")
        .arg(peft_case("lora_basic").join("base"))
        .arg("--out")
        .arg(&out)
        .assert()
        .code(0);
    let before = files(&out);
    // 100 blocks of 1 KiB: the 64 KiB shards of `base` fit, the 256 KiB single file does not.
    let (code, _, err) = bash(&format!(
        "ulimit -f 100; exec \"$PEFTKIT\" reshard '{}' --out '{}' --no-fsync",
        base.display(),
        out.display()
    ));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("File too large") && err.contains("is as it was"),
        "{err}"
    );
    // The cause is printed once, not repeated by the error chain.
    assert_eq!(err.matches("File too large").count(), 1, "{err}");
    assert_eq!(files(&out), before);
    assert!(
        staging_litter(tmp.path()).is_empty(),
        "{:?}",
        entries(tmp.path())
    );
}

/// A full disk (ENOSPC) during a save: reported, partial files removed, previous output
/// intact. Runs in a user and mount namespace with a small tmpfs (`unshare -Urm`); where the
/// system forbids user namespaces, the test says so and checks nothing (set
/// PEFTKIT_REQUIRE_USERNS=1 to make that a failure).
#[test]
fn a_full_disk_during_a_save_keeps_the_previous_output() {
    let (code, _, _) = bash("unshare -Urm true");
    if code != 0 {
        assert!(
            std::env::var_os("PEFTKIT_REQUIRE_USERNS").is_none(),
            "unshare -Urm is not permitted here"
        );
        eprintln!("skipped: unshare -Urm is not permitted on this system");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    crate::crash::big_checkpoint(&base, 4, 256 * 1024);
    let small = peft_case("lora_basic").join("base");
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    // In the namespace: a 600 KiB tmpfs, a small previous output, then a 1 MiB reshard into it.
    let script = format!(
        r#"set -e
mount -t tmpfs -o size=600k none '{mnt}'
"$PEFTKIT" reshard '{small}' --out '{mnt}/out' --no-fsync >/dev/null
before=$(cd '{mnt}/out' && sha256sum * | sha256sum)
set +e
"$PEFTKIT" reshard '{base}' --out '{mnt}/out' --no-fsync
echo "code=$?"
after=$(cd '{mnt}/out' && sha256sum * | sha256sum)
[ "$before" = "$after" ] && echo "intact"
ls -A '{mnt}'
"#,
        mnt = mnt.display(),
        small = small.display(),
        base = base.display()
    );
    let (code, out, err) = bash(&format!(
        "unshare -Urm bash -c '{}'",
        script.replace('\'', "'\\''")
    ));
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("code=2"), "{out}\n{err}");
    assert!(
        err.contains("No space left on device") && err.contains("is as it was"),
        "{err}"
    );
    assert!(out.contains("intact"), "{out}");
    let listing: Vec<&str> = out.lines().skip_while(|l| *l != "intact").skip(1).collect();
    assert_eq!(listing, ["out"], "{out}");
}

/// SIGTERM (and SIGINT) during a save: the partial output is removed, the process says so
/// and exits with 128 + the signal number, the previous output is as it was.
#[test]
fn sigterm_and_sigint_remove_the_partial_output() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    crate::crash::big_checkpoint(&base, 8, 8 << 20);
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("previous.txt"), "previous").unwrap();
    for (signal, code) in [("TERM", 143), ("INT", 130)] {
        // Signal as soon as the staging folder exists; retry if the run was too quick.
        let mut interrupted = false;
        for _ in 0..20 {
            let mut child = Command::new(assert_cmd::cargo::cargo_bin!("peftkit"))
                .arg("reshard")
                .arg(&base)
                .arg("--out")
                .arg(&out)
                .arg("--max-shard-size")
                .arg("10MB")
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            while staging_litter(tmp.path()).is_empty() {
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                std::thread::yield_now();
            }
            let _ = Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(child.id().to_string())
                .status();
            let done = child.wait_with_output().unwrap();
            let err = String::from_utf8_lossy(&done.stderr).into_owned();
            let removed = err.contains("interrupted: removed the partial output");
            if done.status.code() == Some(code) && !removed {
                // The signal came after the swap (a loaded host can delay it that long): the
                // save was complete, nothing was left to remove, and the output is the new one.
                assert!(staging_litter(tmp.path()).is_empty(), "{signal}: litter");
                assert!(!out.join("previous.txt").exists(), "{err}");
                assert!(out.join("model.safetensors.index.json").is_file(), "{err}");
                std::fs::remove_dir_all(&out).unwrap();
                std::fs::create_dir(&out).unwrap();
                std::fs::write(out.join("previous.txt"), "previous").unwrap();
                continue;
            }
            if done.status.code() == Some(code) {
                assert!(
                    err.contains("interrupted: removed the partial output"),
                    "{err}"
                );
                interrupted = true;
            } else {
                assert_eq!(done.status.code(), Some(0), "{err}");
                // Completed before the signal: start again from the previous output.
                std::fs::remove_dir_all(&out).unwrap();
                std::fs::create_dir(&out).unwrap();
                std::fs::write(out.join("previous.txt"), "previous").unwrap();
                continue;
            }
            assert!(staging_litter(tmp.path()).is_empty(), "{signal}: litter");
            assert_eq!(
                entries(&out).into_iter().collect::<Vec<_>>(),
                ["previous.txt"]
            );
            break;
        }
        assert!(interrupted, "SIG{signal} never arrived during a save");
    }
}

/// `verify --json`: the documented schema (docs/cli.md), every problem listed with its file
/// and tensor, exit 1; `ok: true` and exit 0 for a sound folder.
#[test]
fn verify_json_lists_every_problem() {
    let (tmp, base, _, _) = lora_case();
    let run = peftkit()
        .args(["verify", "--json"])
        .arg(&base)
        .assert()
        .code(0);
    let doc = stdout_json(&run);
    assert_eq!(doc["ok"], true);
    assert_eq!(doc["problems"], serde_json::json!([]));
    assert_eq!(doc["path"], base.to_str().unwrap());
    // Two problems: a config field of the wrong type and a tensor whose size is wrong.
    let mut config = read_json(&base.join("config.json"));
    config["tie_word_embeddings"] = "yes".into();
    std::fs::write(base.join("config.json"), config.to_string()).unwrap();
    crate::malformed::set_header_field(
        &base.join("model.safetensors"),
        "lm_head.weight",
        "shape",
        serde_json::json!([1, 1]),
    );
    let run = peftkit()
        .args(["verify", "--json"])
        .arg(&base)
        .assert()
        .code(1);
    assert!(stderr_of(&run).is_empty());
    let doc = stdout_json(&run);
    let keys: Vec<&String> = doc.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["path", "ok", "problems"]);
    assert_eq!(doc["ok"], false);
    let problems = doc["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 2, "{doc:#}");
    for p in problems {
        let keys: Vec<&String> = p.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["file", "tensor", "message"]);
        assert!(p["message"].is_string());
    }
    assert_eq!(
        problems[0]["file"],
        base.join("config.json").to_str().unwrap()
    );
    assert_eq!(problems[0]["tensor"], serde_json::Value::Null);
    assert!(problems[0]["message"]
        .as_str()
        .unwrap()
        .contains("tie_word_embeddings"));
    assert_eq!(
        problems[1]["file"],
        base.join("model.safetensors").to_str().unwrap()
    );
    assert_eq!(problems[1]["tensor"], "lm_head.weight");
    // docs/cli.md's example has the same shape.
    let examples = crate::json::doc_examples("verify");
    assert_eq!(examples.len(), 1);
    let ex = &examples[0];
    assert_eq!(ex.as_object().unwrap().keys().collect::<Vec<_>>(), keys);
    assert_eq!(ex["problems"][0]["tensor"], serde_json::Value::Null);
    assert!(ex["problems"][1]["tensor"].is_string() && ex["ok"] == false);
    for p in ex["problems"].as_array().unwrap() {
        let k: Vec<&String> = p.as_object().unwrap().keys().collect();
        assert_eq!(k, ["file", "tensor", "message"]);
    }
    // The text form prints the same problems, one line each.
    let text = stdout_of(&peftkit().arg("verify").arg(&base).assert().code(1));
    assert_eq!(text.lines().count(), 2);
    drop(tmp);
}
