//! Merges into bitsandbytes 4-bit bases compared bit for bit with transformers + bitsandbytes +
//! peft on the CPU (tests/fixtures/bnb/<case>, made by bnb_cases.py): re-quantized, dequantized
//! and into the QLoRA round trip of the 16-bit base. Run as on the fixtures' host
//! (tests/fixtures/HOST.json): MKL's reduction order and bitsandbytes' AVX-512 kernel.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use peftkit_merge::{merge, AdapterInput, Bnb4Type, MergeError, MergeJob, QloraBase};
use serde_json::Value;

const CASES: &[&str] = &["nf4_nested_bf16", "fp4_f16"];

fn case(name: &str) -> PathBuf {
    common::fixture_root("bnb").join(name)
}

fn case_json(name: &str) -> Value {
    serde_json::from_str(&fs::read_to_string(case(name).join("case.json")).unwrap()).unwrap()
}

fn job(name: &str, base: &str, out: &Path) -> MergeJob {
    let adapter = AdapterInput {
        dir: case(name).join("adapter"),
        weight: 1.0,
    };
    MergeJob::new(case(name).join(base), vec![adapter], out).durable(false)
}

#[test]
fn requantized_merge_equals_peft_on_a_4bit_model() {
    common::as_fixture_host();
    for name in CASES {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let summary = merge(&job(name, "base4", &out)).unwrap();
        let report = summary.quantization.expect("a bitsandbytes report");
        assert_eq!(
            (report.method.as_str(), report.output.as_str()),
            ("bitsandbytes", "kept"),
            "{name}"
        );
        assert_eq!(report.requantized.len(), 4, "{name}");
        assert!(report.requantized.iter().all(|t| t.max_abs_error.is_none()));
        common::assert_same(name, &case(name).join("merged_requantized"), &out);
    }
}

#[test]
fn dequantized_merge_equals_dequantize_then_peft() {
    common::as_fixture_host();
    for name in CASES {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let summary = merge(&job(name, "base4", &out).dequantize(true)).unwrap();
        let report = summary.quantization.expect("a bitsandbytes report");
        assert_eq!(report.output, "dequantized");
        assert!(report.tensors_dequantized > 0 && report.requantized.is_empty());
        common::assert_same(name, &case(name).join("merged_dequantized"), &out);
    }
}

#[test]
fn qlora_base_merge_equals_the_round_trip_plus_peft() {
    common::as_fixture_host();
    for name in CASES {
        let c = case_json(name);
        let q = QloraBase {
            kind: c["qlora_base"]
                .as_str()
                .unwrap()
                .parse::<Bnb4Type>()
                .unwrap(),
            double_quant: c["qlora_double_quant"].as_bool().unwrap(),
        };
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let summary = merge(&job(name, "base16", &out).qlora_base(Some(q))).unwrap();
        let report = summary.quantization.expect("a bitsandbytes report");
        assert_eq!(
            (report.output.as_str(), report.requantized.len()),
            ("qlora-base", 4),
            "{name}"
        );
        common::assert_same(name, &case(name).join("merged_qlora"), &out);
    }
}

#[test]
fn misuse_is_refused_before_writing() {
    let name = CASES[0];
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let q = QloraBase {
        kind: Bnb4Type::Nf4,
        double_quant: false,
    };
    let err = merge(&job(name, "base4", &out).qlora_base(Some(q))).unwrap_err();
    assert!(matches!(err, MergeError::Bnb(_)), "{err}");
    assert!(
        err.to_string().contains("already quantized (bitsandbytes)"),
        "{err}"
    );
    // The one `--dequantize` refusal of every method: nothing to dequantize.
    let err = merge(&job(name, "base16", &out).dequantize(true)).unwrap_err();
    assert!(matches!(err, MergeError::NotQuantized { .. }), "{err}");
    assert!(!out.exists());
}

/// The merges of `tests/fixtures/quant_multi/<case>` (quant_multi_cases.py): several adapters
/// into one 4-bit base, each re-quantized after its adapter as peft's `Linear4bit.merge` does,
/// in the order given (peft's active adapters).
fn multi_merges(case_name: &str) -> Vec<(String, Vec<String>)> {
    let dir = common::fixture_root("quant_multi").join(case_name);
    let c: Value =
        serde_json::from_str(&fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
    c["merges"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(out, order)| {
            let order = order.as_array().unwrap();
            let names = order.iter().map(|n| n.as_str().unwrap().to_owned());
            (out.clone(), names.collect())
        })
        .collect()
}

fn multi_job(case_name: &str, order: &[String], out: &Path) -> MergeJob {
    let dir = common::fixture_root("quant_multi").join(case_name);
    let adapters = order
        .iter()
        .map(|n| AdapterInput {
            dir: dir.join(format!("adapter_{n}")),
            weight: 1.0,
        })
        .collect();
    MergeJob::new(dir.join("base4"), adapters, out).durable(false)
}

/// Several adapters (each re-quantized in turn, in the order given), and DoRA alone or followed
/// by a LoRA (its norm from the dequantized weight, its result cast back to the weight's dtype,
/// which the re-quantized state keeps).
#[test]
fn several_adapters_and_dora_are_requantized_one_after_another_as_peft_does() {
    common::as_fixture_host();
    let mut runs = 0;
    for name in CASES {
        for (want, order) in multi_merges(name) {
            let tmp = tempfile::tempdir().unwrap();
            let out = tmp.path().join("out");
            let summary = merge(&multi_job(name, &order, &out)).unwrap();
            let report = summary.quantization.expect("a bitsandbytes report");
            assert_eq!(report.output, "kept", "{name} {want}");
            let dir = common::fixture_root("quant_multi").join(name);
            common::assert_same(&format!("{name} {want}"), &dir.join(want), &out);
            runs += 1;
        }
    }
    assert!(runs >= 7, "{runs} merges of several adapters or DoRA");
}

#[test]
fn requantizing_refuses_what_it_does_not_reproduce() {
    // DoRA after another adapter of one 4-bit weight: peft unmerges and re-merges the earlier
    // adapters (each through 4 bits) for DoRA's norm, which is not reproduced. Refused before
    // writing; --dequantize merges it as into any 16-bit base.
    let name = CASES[0];
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let late = multi_job(name, &["y".to_owned(), "dora".to_owned()], &out);
    let err = merge(&late).unwrap_err();
    assert!(
        err.to_string().contains("DoRA after another adapter"),
        "{err}"
    );
    assert!(err.to_string().contains("q_proj"), "{err}");
    assert!(!out.exists());
    let summary = merge(&late.dequantize(true)).unwrap();
    assert!(summary.tensors_merged > 0);
}
