//! `peftkit diff`: exit codes, lines and `--json`, with the differences recomputed here from
//! the raw bytes of files written by transformers and peft (never from peftkit's reader).

use std::path::Path;

use predicates::prelude::*;
use serde_json::Value;

use crate::{fixture, header, peft_case, peftkit, read, stdout_json, stdout_of};

fn diff(a: &Path, b: &Path) -> assert_cmd::Command {
    let mut cmd = peftkit();
    cmd.arg("diff").arg(a).arg(b);
    cmd
}

/// For each tensor of the single-file F32 checkpoints `a` and `b` whose bytes differ: (name,
/// differing elements, largest |a - b|), from the files' raw bytes.
fn f32_differences(a: &Path, b: &Path) -> Vec<(String, u64, f64)> {
    let (fa, fb) = (read(a), read(b));
    let data = |f: &[u8]| 8 + u64::from_le_bytes(f[..8].try_into().unwrap()) as usize;
    let (da, db) = (data(&fa), data(&fb));
    let hb = header(b);
    let mut out = Vec::new();
    for ta in header(a) {
        let tb = hb.iter().find(|t| t.name == ta.name).unwrap();
        assert_eq!(ta.dtype, "F32", "{}", ta.name);
        let xa = &fa[da + ta.begin as usize..da + ta.end as usize];
        let xb = &fb[db + tb.begin as usize..db + tb.end as usize];
        let (mut n, mut max) = (0u64, 0f64);
        for (x, y) in xa.chunks_exact(4).zip(xb.chunks_exact(4)) {
            if x != y {
                n += 1;
                let (x, y) = (
                    f32::from_le_bytes(x.try_into().unwrap()),
                    f32::from_le_bytes(y.try_into().unwrap()),
                );
                max = max.max((f64::from(x) - f64::from(y)).abs());
            }
        }
        if n > 0 {
            out.push((ta.name.clone(), n, max));
        }
    }
    out
}

#[test]
fn a_merge_differs_from_its_base_where_peft_changed_it_and_exits_1() {
    let case = peft_case("lora_basic");
    let (base, merged) = (case.join("base"), case.join("merged"));
    let expected = f32_differences(
        &base.join("model.safetensors"),
        &merged.join("model.safetensors"),
    );
    assert!(!expected.is_empty());

    let json = stdout_json(&diff(&base, &merged).arg("--json").assert().code(1));
    crate::json::check_diff_json(&json, "diff base merged");
    let got: Vec<(String, u64, f64)> = json["value_differs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap().to_owned(),
                v["differing"].as_u64().unwrap(),
                v["max_abs_diff"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, expected);
    let total = header(&base.join("model.safetensors")).len() as u64;
    assert_eq!(
        json["identical"].as_u64().unwrap() + expected.len() as u64,
        total
    );
    assert_eq!(json["kinds"], serde_json::json!(["model", "model"]));

    // The lines name the same tensors, then the summary.
    let text = stdout_of(&diff(&base, &merged).assert().code(1));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), expected.len() + 1, "{text}");
    for ((name, n, _), line) in expected.iter().zip(&lines) {
        assert!(
            line.starts_with(&format!("~ {name} (F32): {n} of ")),
            "{line}"
        );
    }
    assert!(
        lines
            .last()
            .unwrap()
            .ends_with(&format!("{} different", expected.len())),
        "{text}"
    );
    // -q keeps the difference lines, drops the summary.
    let quiet = stdout_of(&diff(&base, &merged).arg("-q").assert().code(1));
    assert_eq!(quiet.lines().count(), expected.len(), "{quiet}");
}

#[test]
fn one_model_in_other_shards_or_layouts_is_identical_and_exits_0() {
    let mixtral = fixture("remap/mixtral");
    // Single file vs 7 shards, both written by transformers.
    diff(&mixtral.join("original"), &mixtral.join("original_2KB"))
        .assert()
        .success()
        .stdout(
            predicate::str::contains("(stored names)").and(predicate::str::contains("0 different")),
        );
    // The Hub layout vs the v5 layout: compared through the conversion table.
    let json = stdout_json(
        &diff(&mixtral.join("original"), &mixtral.join("v5"))
            .arg("--json")
            .assert()
            .success(),
    );
    crate::json::check_diff_json(&json, "diff original v5");
    assert_eq!(json["layout"], "transformers-v5");
    assert_eq!(
        json["identical"].as_u64(),
        Some(header(&mixtral.join("v5/model.safetensors")).len() as u64)
    );
    // As stored, every per-expert name is only in A and every fused one only in B.
    let text = stdout_of(
        &diff(&mixtral.join("original"), &mixtral.join("v5"))
            .args(["--layout", "stored"])
            .assert()
            .code(1),
    );
    for t in header(&mixtral.join("original/model.safetensors")) {
        if t.name.contains("experts.") {
            assert!(
                text.contains(&format!("- {} (only in A)\n", t.name)),
                "{}",
                t.name
            );
        }
    }
    assert!(
        text.contains("+ model.layers.0.mlp.experts.gate_up_proj (only in B)\n"),
        "{text}"
    );
}

#[test]
fn variants_and_adapters_are_compared_and_errors_exit_2() {
    let variant = fixture("checkpoint/llama_variant_fp16/expected");
    diff(&variant, &variant)
        .args(["--variant", "fp16"])
        .assert()
        .success();
    // Without the variant there is nothing to read: an error naming what to pass.
    diff(&variant, &variant)
        .assert()
        .code(2)
        .stderr(predicate::str::contains("error:").and(predicate::str::contains("fp16")));
    diff(&variant, &fixture("missing"))
        .args(["--variant", "fp16"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("missing"));

    // Adapters compare by peft's on-disk keys.
    let (a, b) = (
        peft_case("lora_basic").join("adapter"),
        peft_case("lora_f16").join("adapter"),
    );
    let json = stdout_json(&diff(&a, &b).arg("--json").assert().code(1));
    crate::json::check_diff_json(&json, "diff adapters");
    assert_eq!(json["kinds"], serde_json::json!(["adapter", "adapter"]));
    let names = |v: &Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|d| d["name"].as_str().unwrap().to_owned())
            .collect()
    };
    let mut changed = names(&json["dtype_differs"]);
    changed.extend(names(&json["shape_differs"]));
    changed.extend(names(&json["value_differs"]));
    assert!(
        changed.iter().all(|n| n.starts_with("base_model.model.")),
        "{changed:?}"
    );
    diff(&a, &a).assert().success();
}
