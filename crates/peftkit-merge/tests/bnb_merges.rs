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

#[test]
fn requantizing_refuses_what_peft_would_requantize_twice() {
    // peft re-quantizes after each adapter: two adapters on one 4-bit weight are refused (and
    // merge with --dequantize, as into any 16-bit base).
    let name = CASES[0];
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let mut twice = job(name, "base4", &out);
    twice.adapters.push(twice.adapters[0].clone());
    let err = merge(&twice).unwrap_err();
    assert!(err.to_string().contains("more than one adapter"), "{err}");
    assert!(!out.exists());
    let summary = merge(&twice.dequantize(true)).unwrap();
    assert_eq!(summary.tensors_merged, 4);
}
