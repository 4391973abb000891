//! `.bin` inputs and repo ids (tests/fixtures/hub/, fixturegen/hub_cases.py): `convert` and
//! `reshard --dtype` write what transformers and peft saved after loading the same files; every
//! verb takes `.bin` inputs and cached repo ids; a code-running pickle is refused by every verb
//! and runs nothing.

use std::path::{Path, PathBuf};

use crate::{assert_same_dir, entries, fixture, peftkit, read, stderr_of, stdout_of};

fn hub(rel: &str) -> PathBuf {
    fixture("hub").join(rel)
}

fn convert(input: &Path, out: &Path, extra: &[&str]) {
    peftkit()
        .arg("convert")
        .arg(input)
        .arg("--out")
        .arg(out)
        .args(extra)
        .assert()
        .success();
}

#[test]
fn convert_writes_what_transformers_saves_after_loading_the_bin() {
    let cases: &[(&str, &[&str], &str)] = &[
        ("llama_tied/source", &[], "llama_tied/expected"),
        (
            "llama_tied/source",
            &["--dtype", "bf16"],
            "llama_tied/expected_bf16",
        ),
        (
            "llama_tied/source",
            &["--dtype", "f16"],
            "llama_tied/expected_f16",
        ),
        (
            "llama_f16/source",
            &["--dtype", "f32"],
            "llama_f16/expected_f32",
        ),
        (
            "llama_f16/source",
            &["--dtype", "bfloat16"],
            "llama_f16/expected_bf16",
        ),
        (
            "llama_bf16/source",
            &["--dtype", "fp32"],
            "llama_bf16/expected_f32",
        ),
        (
            "llama_bf16/source",
            &["--dtype", "float16"],
            "llama_bf16/expected_f16",
        ),
        ("llama_sharded/source", &[], "llama_sharded/expected"),
        (
            "llama_sharded/source",
            &["--max-shard-size", "3KB"],
            "llama_sharded/expected_3KB",
        ),
        ("llama_sharded/legacy", &[], "llama_sharded/expected"),
    ];
    for (src, extra, expected) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        convert(&hub(src), &out, extra);
        assert_same_dir(&out, &hub(expected));
    }
}

/// peft's save of a loaded adapter: the same weights (float32), or float16 ones upcast.
#[test]
fn convert_writes_what_peft_saves_after_loading_the_adapter_bin() {
    for (src, extra, expected) in [
        ("adapter/source_f32", &[][..], "adapter/expected_f32"),
        (
            "adapter/source_f16",
            &["--dtype", "f32"][..],
            "adapter/expected_f16",
        ),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        convert(&hub(src), &out, extra);
        let name = "adapter_model.safetensors";
        assert!(
            read(&out.join(name)) == read(&hub(expected).join(name)),
            "{src}"
        );
        let config = "adapter_config.json";
        assert_eq!(
            read(&out.join(config)),
            read(&hub(src).join(config)),
            "copied"
        );
        assert_eq!(entries(&out).len(), 2, "{:?}", entries(&out));
    }
}

/// `reshard --dtype` casts a safetensors checkpoint as `from_pretrained(dtype=...)` does.
#[test]
fn reshard_dtype_equals_transformers_loading_with_that_dtype() {
    for (dtype, expected) in [("bf16", "expected_bf16"), ("f16", "expected_f16")] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        peftkit()
            .arg("reshard")
            .arg(hub("llama_tied/expected"))
            .arg("--out")
            .arg(&out)
            .args(["--dtype", dtype])
            .assert()
            .success();
        assert_same_dir(&out, &hub(&format!("llama_tied/{expected}")));
    }
    peftkit()
        .args(["reshard", "x", "--out", "y", "--dtype", "int8"])
        .assert()
        .code(2)
        .stderr(predicates::str::contains("use bf16, f16 or f32"));
}

/// Every verb reads `.bin` checkpoints and adapters: merging them equals merging the
/// safetensors files transformers and peft saved from them; extract from a `.bin` full state
/// dict gives peft's adapter file.
#[test]
fn verbs_take_bin_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let merge = |base: &Path, adapter: &Path, out: &Path| {
        peftkit()
            .arg("merge")
            .arg("--base")
            .arg(base)
            .arg("--adapter")
            .arg(adapter)
            .arg("--out")
            .arg(out)
            .assert()
            .success();
    };
    let (from_bin, from_st) = (tmp.path().join("bin"), tmp.path().join("st"));
    merge(
        &hub("llama_sharded/source"),
        &hub("adapter/source_f32"),
        &from_bin,
    );
    merge(
        &hub("llama_sharded/expected"),
        &hub("adapter/expected_f32"),
        &from_st,
    );
    assert_same_dir(&from_bin, &from_st);
    // A tied .bin base: its tie is written once, as from a safetensors base.
    let (tied_bin, tied_st) = (tmp.path().join("tb"), tmp.path().join("ts"));
    merge(
        &hub("llama_tied/source"),
        &hub("adapter/source_f32"),
        &tied_bin,
    );
    merge(
        &hub("llama_tied/expected"),
        &hub("adapter/expected_f32"),
        &tied_st,
    );
    assert_same_dir(&tied_bin, &tied_st);

    let out = tmp.path().join("extracted");
    peftkit()
        .arg("extract")
        .arg("--from")
        .arg(hub("adapter/full_state_dict.bin"))
        .arg("--config")
        .arg(hub("adapter/source_f32/adapter_config.json"))
        .arg("--out")
        .arg(&out)
        .assert()
        .success();
    let name = "adapter_model.safetensors";
    assert!(read(&out.join(name)) == read(&hub("adapter/expected_f32").join(name)));

    for input in [
        "llama_sharded/source",
        "llama_sharded/legacy",
        "adapter/source_f16",
    ] {
        peftkit().arg("verify").arg(hub(input)).assert().code(0);
        let run = peftkit().arg("inspect").arg(hub(input)).assert().success();
        assert!(stdout_of(&run).contains(".bin"), "{input}");
    }
}

/// The pickles of tests/fixtures/hub/evil would run `touch peftkit-pwned` if unpickled by
/// Python: every verb refuses them naming the global, writes nothing and runs nothing.
#[test]
fn code_running_pickles_are_refused_by_every_verb() {
    for (file, global) in [
        ("os_system.bin", "`os.system`"),
        ("posix_system.bin", "`posix.system`"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let evil = tmp.path().join("evil");
        std::fs::create_dir(&evil).unwrap();
        std::fs::copy(hub(&format!("evil/{file}")), evil.join("pytorch_model.bin")).unwrap();
        let out = tmp.path().join("out");
        let runs: Vec<Vec<&std::ffi::OsStr>> = vec![
            vec!["inspect".as_ref(), evil.as_os_str()],
            vec![
                "convert".as_ref(),
                evil.as_os_str(),
                "--out".as_ref(),
                out.as_os_str(),
            ],
            vec![
                "reshard".as_ref(),
                evil.as_os_str(),
                "--out".as_ref(),
                out.as_os_str(),
            ],
        ];
        for args in runs {
            let run = peftkit()
                .current_dir(tmp.path())
                .args(&args)
                .assert()
                .code(2);
            assert!(
                stderr_of(&run).contains(global),
                "{args:?}: {}",
                stderr_of(&run)
            );
        }
        let run = peftkit()
            .current_dir(tmp.path())
            .arg("verify")
            .arg(&evil)
            .assert()
            .code(1);
        assert!(stdout_of(&run).contains(global), "{}", stdout_of(&run));
        assert_eq!(
            entries(tmp.path()),
            ["evil".to_owned()].into(),
            "nothing written, nothing run"
        );
    }
}

fn with_cache(cmd: &mut assert_cmd::Command) -> &mut assert_cmd::Command {
    cmd.env("HF_HUB_CACHE", hub("cache")).env_remove("HF_HOME")
}

/// Repo ids name snapshots of the cache huggingface_hub wrote; `merge --adapter ID` finds its
/// base from `base_model_name_or_path` there.
#[test]
fn repo_ids_resolve_from_the_hf_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    with_cache(&mut peftkit())
        .args([
            "merge",
            "--adapter",
            "peftkit-test/tiny-llama-lora",
            "--out",
        ])
        .arg(&out)
        .assert()
        .success();
    let local = tmp.path().join("local");
    peftkit()
        .arg("merge")
        .arg("--base")
        .arg(hub("llama_sharded/expected"))
        .arg("--adapter")
        .arg(hub("adapter/expected_f32"))
        .arg("--out")
        .arg(&local)
        .assert()
        .success();
    assert_same_dir(&out, &local);

    let run = with_cache(&mut peftkit())
        .args(["inspect", "peftkit-test/tiny-llama@v1.0"])
        .assert()
        .success();
    assert!(stdout_of(&run).contains("model-00006-of-00006.safetensors"));
    with_cache(&mut peftkit())
        .args(["verify", "peftkit-test/tiny-llama"])
        .assert()
        .code(0);
    let converted = tmp.path().join("converted");
    with_cache(&mut peftkit())
        .args(["convert", "peftkit-test/tiny-llama-lora", "--out"])
        .arg(&converted)
        .assert()
        .success();
    let name = "adapter_model.safetensors";
    assert!(read(&converted.join(name)) == read(&hub("adapter/expected_f32").join(name)));
}

#[test]
fn an_uncached_repo_id_names_the_cache_and_the_download_command() {
    for (spec, command) in [
        (
            "peftkit-test/not-cached",
            "hf download peftkit-test/not-cached",
        ),
        (
            "peftkit-test/tiny-llama@v2.0",
            "hf download peftkit-test/tiny-llama --revision v2.0",
        ),
    ] {
        let run = with_cache(&mut peftkit())
            .args(["inspect", spec])
            .assert()
            .code(2);
        let err = stderr_of(&run);
        assert!(err.contains(&hub("cache").display().to_string()), "{err}");
        assert!(err.contains(command), "{err}");
    }
    // The base named by an adapter that is not cached: the message says so and what to do.
    let tmp = tempfile::tempdir().unwrap();
    let adapter = tmp.path().join("adapter");
    std::fs::create_dir(&adapter).unwrap();
    let config = String::from_utf8(read(&hub("adapter/source_f32/adapter_config.json"))).unwrap();
    std::fs::write(
        adapter.join("adapter_config.json"),
        config.replace("peftkit-test/tiny-llama", "peftkit-test/elsewhere"),
    )
    .unwrap();
    std::fs::copy(
        hub("adapter/source_f32/adapter_model.bin"),
        adapter.join("adapter_model.bin"),
    )
    .unwrap();
    let run = with_cache(&mut peftkit())
        .arg("merge")
        .arg("--adapter")
        .arg(&adapter)
        .arg("--out")
        .arg(tmp.path().join("out"))
        .assert()
        .code(2);
    let err = stderr_of(&run);
    assert!(
        err.contains("pass --base") && err.contains("hf download peftkit-test/elsewhere"),
        "{err}"
    );
}
