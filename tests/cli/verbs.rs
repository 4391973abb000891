//! Every verb succeeds on the fixtures and writes what the real libraries wrote, byte for byte.

use std::path::Path;

use crate::{
    adapter_dirs, assert_same_adapter, assert_same_dir, entries, fixture, header, human_bytes,
    human_count, human_plural, peft_case, peftkit, read, stdout_of, weight_files,
};

/// Low-rank merges whose result does not depend on the host's float arithmetic (no conv, no
/// DoRA norm): peftkit must reproduce peft's `merged/` bit for bit on any machine.
pub const EXACT_MERGES: &[&str] = &[
    "lora_basic",
    "lora_bf16",
    "lora_f16",
    "rslora",
    "embedding_lora",
    "gpt2_conv1d",
    "modules_to_save",
    "patterns",
    "two_adapters",
];

/// `peftkit merge` of a peft case into `out`, every adapter of the case at weight 1.
pub fn merge_cmd(case: &str, out: &Path) -> assert_cmd::Command {
    let mut cmd = peftkit();
    cmd.arg("merge")
        .arg("--base")
        .arg(peft_case(case).join("base"));
    for dir in adapter_dirs(case) {
        cmd.arg("--adapter").arg(dir);
    }
    cmd.arg("--out").arg(out);
    cmd
}

#[test]
fn merge_writes_peft_merged_checkpoint_byte_for_byte() {
    for case in EXACT_MERGES {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("merged");
        let ok = merge_cmd(case, &out).assert().success();
        let line = stdout_of(&ok);
        assert!(
            line.starts_with(&format!("{}: ", out.display())) && line.contains("tensors merged"),
            "{case}: {line}"
        );
        assert_same_dir(&out, &peft_case(case).join("merged"));
    }
}

/// A synced merge streams its merged tensors block by block through the page cache when its
/// output fits in free memory (every fixture does), and otherwise computes each whole and
/// writes it around the page cache, applying several adapters in turn.
/// `PEFTKIT_WHOLE_DIRECT` forces the second path here: both write peft's bytes.
#[test]
fn both_synced_write_paths_write_peft_merged_checkpoint() {
    for case in EXACT_MERGES {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("merged");
        merge_cmd(case, &out)
            .env("PEFTKIT_WHOLE_DIRECT", "1")
            .assert()
            .success();
        assert_same_dir(&out, &peft_case(case).join("merged"));
    }
}

#[test]
fn merge_no_fsync_and_safe_merge_of_f32_give_the_same_bytes() {
    // --no-fsync skips syncs only. peft's safe_merge rounds the delta to the base dtype before
    // the add, which for an f32 base is the very same arithmetic as the default merge.
    for flag in ["--no-fsync", "--safe-merge"] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("merged");
        merge_cmd("lora_basic", &out).arg(flag).assert().success();
        assert_same_dir(&out, &peft_case("lora_basic").join("merged"));
    }
}

#[test]
fn merge_adapter_weights_scale_the_delta() {
    let case = "lora_basic";
    let adapter = peft_case(case).join("adapter");
    // DIR:1 is peft's merge; DIR:0 adds nothing and gives the base back.
    for (weight, want) in [("1", "merged"), ("1.0", "merged"), ("0", "base")] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        peftkit()
            .arg("merge")
            .arg("--base")
            .arg(peft_case(case).join("base"))
            .arg("--adapter")
            .arg(format!("{}:{weight}", adapter.display()))
            .arg("--out")
            .arg(&out)
            .assert()
            .success();
        assert_same_dir(&out, &peft_case(case).join(want));
    }
}

#[test]
fn merge_with_max_shard_size_equals_resharding_peft_merge() {
    // `merge --max-shard-size` must be transformers' save_pretrained(max_shard_size=...) of the
    // merged model; `reshard` of peft's merged/ is that save (checked against transformers in
    // reshard_reproduces_transformers_save_pretrained).
    let case = "lora_basic";
    let tmp = tempfile::tempdir().unwrap();
    let merged = tmp.path().join("merged");
    merge_cmd(case, &merged)
        .args(["--max-shard-size", "5KB"])
        .assert()
        .success();
    let resharded = tmp.path().join("resharded");
    peftkit()
        .arg("reshard")
        .arg(peft_case(case).join("merged"))
        .arg("--out")
        .arg(&resharded)
        .args(["--max-shard-size", "5KB"])
        .assert()
        .success();
    assert!(merged.join("model.safetensors.index.json").is_file());
    assert!(entries(&merged).len() > 4, "5KB must give several shards");
    assert_same_dir(&merged, &resharded);
}

/// The `from_pretrained` cases of tests/fixtures/checkpoint: `source/` loaded and saved again.
const RESHARD_CASES: &[&str] = &["llama_reloaded_5KB", "llama_reloaded_3KB_fp16variant"];

#[test]
fn reshard_reproduces_transformers_save_pretrained() {
    for case in RESHARD_CASES {
        let dir = fixture("checkpoint").join(case);
        let c = crate::read_json(&dir.join("case.json"));
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let mut cmd = peftkit();
        cmd.arg("reshard")
            .arg(dir.join(c["source"].as_str().unwrap()))
            .arg("--out")
            .arg(&out)
            .arg("--max-shard-size")
            .arg(c["max_shard_size"].as_str().unwrap());
        if let Some(v) = c["variant"].as_str() {
            cmd.args(["--variant", v]);
        }
        let ok = cmd.assert().success();
        let expected = dir.join("expected");
        assert_same_dir(&out, &expected);
        // The report line counts what transformers wrote.
        let index = entries(&expected)
            .into_iter()
            .find(|n| n.contains(".index"))
            .unwrap();
        let shards = weight_files(&expected, Some(&index), "");
        let tensors: Vec<_> = shards
            .iter()
            .flat_map(|s| header(&expected.join(s)))
            .collect();
        let bytes: u64 = tensors.iter().map(|t| t.bytes()).sum();
        assert_eq!(
            stdout_of(&ok),
            format!(
                "{}: {}, {} in {} + {index}\n",
                out.display(),
                human_plural(tensors.len(), "tensor", "tensors"),
                human_bytes(bytes),
                human_plural(shards.len(), "file", "files")
            ),
            "{case}"
        );
    }
}

#[test]
fn reshard_of_a_transformers_save_with_its_own_settings_is_a_fixed_point() {
    // Loading expected/ with from_pretrained and saving it with the same settings gives the
    // same natural-order plan, hence the same files; --input-variant reads the fp16 variant.
    for case in RESHARD_CASES {
        let dir = fixture("checkpoint").join(case);
        let c = crate::read_json(&dir.join("case.json"));
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let mut cmd = peftkit();
        cmd.arg("reshard")
            .arg(dir.join("expected"))
            .arg("--out")
            .arg(&out)
            .arg("--max-shard-size")
            .arg(c["max_shard_size"].as_str().unwrap())
            .arg("--no-fsync");
        if let Some(v) = c["variant"].as_str() {
            cmd.args(["--variant", v, "--input-variant", v]);
        }
        cmd.assert().success();
        assert_same_dir(&out, &dir.join("expected"));
    }
}

#[test]
fn reshard_into_an_existing_folder_replaces_the_old_weights_and_keeps_other_files() {
    // As docs/formats.md says: old shards of the same stem and a stale single file (it would
    // shadow the new shards) go; other files, such as a tokenizer, stay.
    let case = fixture("checkpoint/llama_reloaded_5KB");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    for stale in ["model.safetensors", "model-00001-of-00009.safetensors"] {
        std::fs::write(out.join(stale), b"old").unwrap();
    }
    std::fs::write(out.join("tokenizer.json"), b"{}").unwrap();
    peftkit()
        .arg("reshard")
        .arg(case.join("source"))
        .arg("--out")
        .arg(&out)
        .args(["--max-shard-size", "5KB"])
        .assert()
        .success();
    assert_eq!(read(&out.join("tokenizer.json")), b"{}");
    std::fs::remove_file(out.join("tokenizer.json")).unwrap();
    assert_same_dir(&out, &case.join("expected"));
    assert_eq!(entries(tmp.path()).len(), 1, "nothing left beside --out");
}

#[test]
fn extract_with_peft_config_reproduces_every_adapter_folder() {
    for case in [
        "lora_basic",
        "lora_bf16",
        "rslora",
        "embedding_lora",
        "gpt2_conv1d",
        "modules_to_save",
        "patterns",
        "two_adapters",
        "lora_bias",
        "trainable_tokens",
        "dora",
        "prompt_tuning",
    ] {
        for dir in adapter_dirs(case) {
            let name = if dir == peft_case(case).join("adapter") {
                "default".to_owned()
            } else {
                dir.file_name().unwrap().to_string_lossy().into_owned()
            };
            let tmp = tempfile::tempdir().unwrap();
            let out = tmp.path().join("adapter");
            let ok = peftkit()
                .arg("extract")
                .arg("--from")
                .arg(peft_case(case).join("full_state_dict.safetensors"))
                .arg("--out")
                .arg(&out)
                .args(["--adapter-name", &name])
                .arg("--config")
                .arg(dir.join("adapter_config.json"))
                .assert()
                .success();
            assert_eq!(
                stdout_of(&ok),
                format!("{}: adapter `{name}` (given config)\n", out.display()),
                "{case}/{name}"
            );
            assert_same_adapter(&out, &dir);
            if name == "default" {
                assert!(
                    read(&out.join("README.md")) == read(&dir.join("README.md")),
                    "{case}: README.md differs from peft's"
                );
            }
        }
    }
}

#[test]
fn extract_no_fsync_writes_the_same_adapter_and_base() {
    // --no-fsync skips the syncs of both outputs and changes no byte of either.
    let case = peft_case("lora_basic");
    let tmp = tempfile::tempdir().unwrap();
    let run = |tag: &str, flags: &[&str]| {
        let (out, base) = (tmp.path().join(tag), tmp.path().join(format!("{tag}-base")));
        peftkit()
            .arg("extract")
            .arg("--from")
            .arg(case.join("full_state_dict.safetensors"))
            .arg("--config")
            .arg(case.join("adapter/adapter_config.json"))
            .arg("--out")
            .arg(&out)
            .arg("--base-out")
            .arg(&base)
            .args(flags)
            .assert()
            .success();
        (out, base)
    };
    let (synced, synced_base) = run("synced", &[]);
    let (unsynced, unsynced_base) = run("unsynced", &["--no-fsync"]);
    assert_same_adapter(&unsynced, &case.join("adapter"));
    assert_same_dir(&unsynced, &synced);
    assert_same_dir(&unsynced_base, &synced_base);
    assert!(unsynced_base.join("model.safetensors").is_file());
}

#[test]
fn extract_infers_peft_config_from_the_tensors() {
    // What the tensors cannot say is given on the command line, the rest is inferred.
    for (case, alpha, rslora, name_or_path) in [
        ("lora_basic", "8", false, "peftkit/tiny-llama"),
        ("rslora", "16", true, "peftkit/tiny-llama"),
        ("gpt2_conv1d", "8", false, "peftkit/tiny-gpt2"),
        ("embedding_lora", "8", false, "peftkit/tiny-llama"),
    ] {
        let c = crate::read_json(&peft_case(case).join("case.json"));
        assert_eq!(c["model"]["name_or_path"], name_or_path, "{case}");
        assert_eq!(c["peft_config"]["lora_alpha"].to_string(), alpha, "{case}");
        let tmp = tempfile::tempdir().unwrap();
        let (out, base_out) = (tmp.path().join("adapter"), tmp.path().join("base"));
        let mut cmd = peftkit();
        cmd.arg("extract")
            .arg("--from")
            .arg(peft_case(case).join("full_state_dict.safetensors"))
            .arg("--out")
            .arg(&out)
            .args(["--lora-alpha", alpha, "--base-model", name_or_path])
            .arg("--base-config")
            .arg(peft_case(case).join("base/config.json"))
            .arg("--base-out")
            .arg(&base_out);
        if rslora {
            cmd.arg("--use-rslora");
        }
        let ok = cmd.assert().success();
        assert_eq!(
            stdout_of(&ok),
            format!(
                "{}: adapter `default` (inferred config), base in {}\n",
                out.display(),
                base_out.display()
            ),
            "{case}"
        );
        let theirs = peft_case(case).join("adapter");
        assert_same_adapter(&out, &theirs);
        assert!(read(&out.join("README.md")) == read(&theirs.join("README.md")));
        assert!(
            read(&base_out.join("config.json")) == read(&peft_case(case).join("base/config.json")),
            "{case}: base config.json"
        );
        if case != "gpt2_conv1d" {
            // (GPT-2's state dict also holds the tied lm_head, which base/ does not.)
            assert!(
                read(&base_out.join("model.safetensors"))
                    == read(&peft_case(case).join("base/model.safetensors")),
                "{case}: --base-out differs from the base transformers saved"
            );
        }
    }
}

/// (case, --restore-load-only) for v5 → original.
const TO_ORIGINAL: &[(&str, bool)] = &[
    ("mixtral", false),
    ("qwen2_moe", false),
    ("gpt_neox", false),
    ("vit", false),
    // The Hub's vision_tower.vision_model. level is restored only on request.
    ("llava", true),
];

fn remap_cmd(from: &Path, out: &Path, to: &str) -> assert_cmd::Command {
    let mut cmd = peftkit();
    cmd.arg("remap")
        .arg(from)
        .arg("--out")
        .arg(out)
        .args(["--to", to]);
    cmd
}

#[test]
fn remap_to_v5_equals_transformers_v5_save() {
    for case in [
        "mixtral",
        "qwen2_moe",
        "llava",
        "gpt_neox",
        "vit",
        "bert_legacy",
    ] {
        let dir = fixture("remap").join(case);
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let ok = remap_cmd(&dir.join("original"), &out, "transformers-v5")
            .assert()
            .success();
        let model_type = crate::read_json(&dir.join("case.json"))["model_type"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(
            stdout_of(&ok).starts_with(&format!("{}: model_type {model_type}, ", out.display())),
            "{case}: {}",
            stdout_of(&ok)
        );
        assert_same_dir(&out, &dir.join("v5"));
    }
}

#[test]
fn remap_to_original_equals_transformers_original_save() {
    for (case, restore) in TO_ORIGINAL {
        let dir = fixture("remap").join(case);
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        // Unsynced here (the v5 direction above syncs): --no-fsync changes no byte.
        let mut cmd = remap_cmd(&dir.join("v5"), &out, "original");
        cmd.arg("--no-fsync");
        if *restore {
            cmd.arg("--restore-load-only");
        }
        cmd.assert().success();
        assert_same_dir(&out, &dir.join("original"));
    }
}

#[test]
fn remap_sharded_equals_transformers_sharded_saves() {
    for case in ["mixtral", "qwen2_moe"] {
        let dir = fixture("remap").join(case);
        for size in ["2KB", "5KB", "20KB"] {
            let tmp = tempfile::tempdir().unwrap();
            let out = tmp.path().join("out");
            remap_cmd(&dir.join("v5"), &out, "original")
                .args(["--max-shard-size", size])
                .assert()
                .success();
            assert_same_dir(&out, &dir.join(format!("original_{size}")));
        }
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        remap_cmd(&dir.join("original"), &out, "transformers-v5")
            .args(["--max-shard-size", "2KB"])
            .assert()
            .success();
        assert_same_dir(&out, &dir.join("v5_resaved_2KB"));
    }
}

#[test]
fn remap_of_a_legacy_adapter_equals_peft_conversion() {
    for case in ["mixtral", "mixtral_mixed", "qwen3_moe"] {
        let dir = fixture("convert").join(case);
        let model_type = crate::read_json(&dir.join("case.json"))["model"]["model_type"]
            .as_str()
            .unwrap()
            .to_owned();
        // The table comes from --base's config.json or from --model-type.
        for how in ["--base", "--model-type"] {
            let tmp = tempfile::tempdir().unwrap();
            let out = tmp.path().join("out");
            let mut cmd = remap_cmd(&dir.join("legacy_adapter"), &out, "transformers-v5");
            match how {
                "--base" => cmd.arg("--base").arg(dir.join("base")),
                _ => cmd.args(["--model-type", &model_type]),
            };
            let ok = cmd.assert().success();
            assert!(
                stdout_of(&ok).starts_with(&format!(
                    "{}: legacy {model_type} adapter fused with table ",
                    out.display()
                )),
                "{case}: {}",
                stdout_of(&ok)
            );
            let want = dir.join("converted_adapter");
            assert_eq!(entries(&out), entries(&want), "{case}");
            assert_same_adapter(&out, &want);
            assert!(read(&out.join("README.md")) == read(&want.join("README.md")));
        }
    }
}

#[test]
fn verify_accepts_every_folder_the_libraries_wrote() {
    let mut dirs = vec![];
    for case in EXACT_MERGES {
        for sub in ["base", "merged", "adapter"] {
            dirs.push((peft_case(case).join(sub), None));
        }
    }
    for case in crate::entries(&fixture("checkpoint")) {
        let dir = fixture("checkpoint").join(&case).join("expected");
        if dir.is_dir() {
            let c = crate::read_json(&fixture("checkpoint").join(&case).join("case.json"));
            dirs.push((dir, c["variant"].as_str().map(str::to_owned)));
        }
    }
    for case in ["mixtral", "qwen2_moe"] {
        dirs.push((fixture("remap").join(case).join("original_2KB"), None));
    }
    dirs.push((peft_case("lora_basic").join("base/model.safetensors"), None));
    assert!(dirs.len() > 35);
    for (dir, variant) in dirs {
        let mut cmd = peftkit();
        cmd.arg("verify").arg(&dir);
        if let Some(v) = &variant {
            cmd.args(["--variant", v]);
        }
        let ok = cmd.assert().success();
        assert_eq!(stdout_of(&ok), format!("{}: ok\n", dir.display()));
        assert!(ok.get_output().stderr.is_empty());
    }
}

#[test]
fn inspect_lists_every_tensor_and_the_totals() {
    for (dir, variant, index, single) in [
        (
            peft_case("lora_basic").join("base"),
            None,
            None,
            "model.safetensors",
        ),
        (
            fixture("checkpoint/llama_untied_3KB/expected"),
            None,
            Some("model.safetensors.index.json"),
            "",
        ),
        (
            fixture("checkpoint/mixed_dtypes/expected"),
            None,
            None,
            "model.safetensors",
        ),
        (
            fixture("checkpoint/llama_variant_single/expected"),
            Some("fp16"),
            None,
            "model.fp16.safetensors",
        ),
    ] {
        let mut cmd = peftkit();
        cmd.arg("inspect").arg(&dir);
        if let Some(v) = variant {
            cmd.args(["--variant", v]);
        }
        let ok = cmd.assert().success();
        let text = stdout_of(&ok);
        let files = weight_files(&dir, index, single);
        let tensors: Vec<_> = files.iter().flat_map(|f| header(&dir.join(f))).collect();
        let lines: Vec<&str> = text.lines().collect();
        // A heading, one line per tensor in storage order, the totals.
        assert_eq!(lines.len(), tensors.len() + 2, "{text}");
        for (line, t) in lines[1..].iter().zip(&tensors) {
            let words: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(words[0], t.name);
            assert_eq!(words[1], t.dtype);
            assert!(
                line.contains(&format!(" {} ", human_bytes(t.bytes()))),
                "{line}"
            );
        }
        let params: u64 = tensors.iter().map(|t| t.numel()).sum();
        let bytes: u64 = tensors.iter().map(|t| t.bytes()).sum();
        assert_eq!(
            *lines.last().unwrap(),
            format!(
                "{}, {} parameters, {} in {}{}",
                human_plural(tensors.len(), "tensor", "tensors"),
                human_count(params),
                human_bytes(bytes),
                human_plural(files.len(), "file", "files"),
                index.map(|i| format!(" + {i}")).unwrap_or_default()
            )
        );
    }
}

#[test]
fn inspect_describes_an_adapter_folder() {
    let ok = peftkit()
        .arg("inspect")
        .arg(peft_case("two_adapters").join("adapter"))
        .assert()
        .success();
    let text = stdout_of(&ok);
    for dir in adapter_dirs("two_adapters") {
        let config = crate::read_json(&dir.join("adapter_config.json"));
        let name = if dir.ends_with("adapter") {
            "default".to_owned()
        } else {
            dir.file_name().unwrap().to_string_lossy().into_owned()
        };
        let r = config["r"].as_u64().unwrap();
        let modules = header(&dir.join("adapter_model.safetensors"))
            .iter()
            .filter(|t| t.name.contains(".lora_A."))
            .count();
        let line = format!(
            "adapter `{name}`: {} (adapter file), {modules} modules, r={r} x{modules}",
            config["peft_type"].as_str().unwrap()
        );
        assert!(
            text.lines().any(|l| l == line),
            "no line `{line}` in:\n{text}"
        );
        // The scaling peft applies, alpha / r, from the config.
        let alpha = config["lora_alpha"].as_f64().unwrap();
        let scaling = format!(
            "  scaling: {} (alpha {alpha} / r with r={r}) on {modules} modules",
            (alpha / r as f64) as f32
        );
        assert!(
            text.lines().any(|l| l == scaling),
            "no `{scaling}` in:\n{text}"
        );
    }
}

/// `peftkit merge` into the NF4 bitsandbytes fixture (tests/fixtures/bnb/nf4_nested_bf16):
/// re-quantized by default, `--dequantize`, and `--qlora-base` on the 16-bit original; and into
/// the int8 one (tests/fixtures/bnb8/int8_bf16), re-quantized and `--dequantize`. Each is byte
/// for byte what transformers + bitsandbytes + peft wrote (rows are whole blocks and the rank
/// is 4, so the bytes do not depend on the host). Each runs synced twice: through the page
/// cache (these outputs fit in free memory) and, with `PEFTKIT_WHOLE_DIRECT`, around it (the
/// streamed weights from a writer thread).
#[test]
fn merge_into_bitsandbytes_bases() {
    let (nf4, int8) = ("bnb/nf4_nested_bf16", "bnb8/int8_bf16");
    let kept = "int8 format kept: 4 merged weight(s) re-quantized, the others copied (max abs error vs the float32 merge)";
    let runs: [(&str, &str, &[&str], &str, &str); 5] = [
        (
            nf4,
            "base4",
            &[],
            "merged_requantized",
            "merged weight(s) re-quantized",
        ),
        (
            nf4,
            "base4",
            &["--dequantize"],
            "merged_dequantized",
            "weights dequantized",
        ),
        (
            nf4,
            "base16",
            &["--qlora-base", "nf4", "--qlora-double-quant"],
            "merged_qlora",
            "round trip dequantize(quantize(W)) of 4 weights",
        ),
        (int8, "base8", &[], "merged_requantized", kept),
        (
            int8,
            "base8",
            &["--dequantize"],
            "merged_dequantized",
            "int8 base: 7 weights dequantized to bfloat16",
        ),
    ];
    for ((case, base, flags, want, says), direct) in
        runs.iter().flat_map(|r| [(r, false), (r, true)])
    {
        let case = fixture(case);
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("merged");
        let mut merge = peftkit();
        if direct {
            merge.env("PEFTKIT_WHOLE_DIRECT", "1");
        }
        let ok = merge
            .arg("merge")
            .arg("--base")
            .arg(case.join(base))
            .arg("--adapter")
            .arg(case.join("adapter"))
            .arg("--out")
            .arg(&out)
            .args(*flags)
            .assert()
            .success();
        let text = stdout_of(&ok);
        assert!(text.contains(says), "{want}: {text}");
        assert_same_dir(&out, &case.join(want));
    }
}

/// Two adapters, then DoRA followed by a LoRA, into the NF4 base of
/// tests/fixtures/quant_multi: `--adapter` order is peft's adapter order, each adapter
/// re-quantized in turn, byte for byte what bitsandbytes + peft wrote.
#[test]
fn merge_of_several_adapters_into_a_4bit_base_requantizes_after_each() {
    let case = fixture("quant_multi/nf4_nested_bf16");
    for (order, want) in [(["x", "y"], "merged_xy"), (["dora", "y"], "merged_dora_y")] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("merged");
        let mut cmd = peftkit();
        cmd.arg("merge").arg("--base").arg(case.join("base4"));
        for name in order {
            cmd.arg("--adapter")
                .arg(case.join(format!("adapter_{name}")));
        }
        let ok = cmd.arg("--out").arg(&out).assert().success();
        assert!(stdout_of(&ok).contains("re-quantized"), "{want}");
        assert_same_dir(&out, &case.join(want));
    }
}

#[test]
fn split_then_gather_gives_back_the_checkpoint_byte_for_byte() {
    // A variant checkpoint: `--variant` reads it, the ranks keep its file names, and gather
    // finds them from the rank manifests.
    for (src, n, variant) in [
        ("checkpoint/llama_untied_3KB/expected", "2", &[][..]),
        ("reshard/qwen2_moe/source_original_sharded", "4", &[]),
        (
            "checkpoint/llama_variant_fp16/expected",
            "3",
            &["--variant", "fp16"],
        ),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let ranks = tmp.path().join("ranks");
        let ok = peftkit()
            .args(["split"])
            .arg(fixture(src))
            .args(["--world-size", n, "--out"])
            .arg(&ranks)
            .args(variant)
            .assert()
            .success();
        let line = stdout_of(&ok);
        assert!(
            line.contains(&format!("{n} ranks")) && line.contains("sharded"),
            "{line}"
        );
        let n: usize = n.parse().unwrap();
        let dirs: Vec<_> = (0..n).map(|r| ranks.join(format!("rank{r}"))).collect();
        assert_eq!(entries(&ranks).len(), n);
        for dir in &dirs {
            peftkit()
                .arg("verify")
                .arg(dir)
                .args(variant)
                .assert()
                .success();
        }
        let out = tmp.path().join("full");
        peftkit()
            .arg("gather")
            .args(&dirs)
            .arg("--out")
            .arg(&out)
            .assert()
            .success();
        assert_same_dir(&out, &fixture(src));
    }
}
