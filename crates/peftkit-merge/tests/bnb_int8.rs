//! bitsandbytes 8-bit (LLM.int8) bases: the kernels and the merges compared bit for bit with
//! transformers + bitsandbytes + peft on the CPU (tests/fixtures/bnb8, made by bnb8_cases.py):
//! re-quantized as peft's `Linear8bitLt.merge` does, and dequantized as `model.dequantize()`
//! then peft's merge.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use peftkit_checkpoint::{Checkpoint, Dtype};
use peftkit_merge::{
    bnb_int8_dequantize, bnb_int8_quantize, decode_f32, merge, AdapterInput, Bnb4Type, BnbError,
    Int8RangeError, MergeError, MergeJob, QloraBase,
};

const CASES: &[&str] = &["int8_bf16", "int8_f16"];
/// The targeted Linear weights of every case (q, v, gate and down projections).
const TARGETED: usize = 4;

fn case(name: &str) -> PathBuf {
    common::fixture_root("bnb8").join(name)
}

fn job(name: &str, base: &Path, out: &Path, weight: f64) -> MergeJob {
    let adapter = AdapterInput {
        dir: case(name).join("adapter"),
        weight,
    };
    MergeJob::new(base, vec![adapter], out).durable(false)
}

fn tensor(ck: &Checkpoint, name: &str) -> (Dtype, Vec<u8>) {
    let t = ck.get(name).unwrap_or_else(|| panic!("{name} missing"));
    (t.dtype(), t.bytes().unwrap().into_owned())
}

#[test]
fn kernels_equal_int8params_and_int8_vectorwise_dequant() {
    let ck = Checkpoint::open(&common::fixture_root("bnb8").join("kernels.safetensors")).unwrap();
    for dtype in ["float32", "bfloat16", "float16"] {
        let key = |part: &str| format!("int8.{dtype}.{part}");
        let (in_dtype, input) = tensor(&ck, &key("input"));
        let shape = ck.get(&key("input")).unwrap().shape().to_vec();
        let values = decode_f32("input", in_dtype, &input).unwrap();
        let q = bnb_int8_quantize(&values, &shape).unwrap();
        let codes: Vec<u8> = q.weight.iter().map(|&c| c as u8).collect();
        assert_eq!(codes, tensor(&ck, &key("weight")).1, "{dtype}: weight");
        let scb: Vec<u8> = q.scb.iter().flat_map(|s| s.to_le_bytes()).collect();
        assert_eq!(scb, tensor(&ck, &key("SCB")).1, "{dtype}: SCB");
        let back = bnb_int8_dequantize(&q.weight, &q.scb, &shape).unwrap();
        let back: Vec<u8> = back.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(
            back,
            tensor(&ck, &key("dequantized")).1,
            "{dtype}: dequantized"
        );
    }
}

#[test]
fn requantized_merge_equals_peft_on_an_int8_model() {
    common::as_fixture_host();
    for name in CASES {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let summary = merge(&job(name, &case(name).join("base8"), &out, 1.0)).unwrap();
        let report = summary.quantization.expect("a bitsandbytes report");
        assert_eq!(
            (report.format.as_str(), report.output.as_str()),
            ("int8", "kept"),
            "{name}"
        );
        assert_eq!(report.dtype.as_deref(), Some("float32"));
        assert_eq!(report.requantized.len(), TARGETED, "{name}");
        // An int8 step of the largest row is about 1/127 of its absmax: errors are measured,
        // not zero, and below half a step of the weights' scale.
        for t in &report.requantized {
            let e = t.max_abs_error.expect("a measured error");
            assert!(e > 0.0 && e < 0.01, "{name}: {}: {e}", t.tensor);
        }
        common::assert_same(name, &case(name).join("merged_requantized"), &out);
    }
}

#[test]
fn dequantized_merge_equals_dequantize_then_peft() {
    common::as_fixture_host();
    for name in CASES {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let summary =
            merge(&job(name, &case(name).join("base8"), &out, 1.0).dequantize(true)).unwrap();
        let report = summary.quantization.expect("a bitsandbytes report");
        assert_eq!(
            (report.format.as_str(), report.output.as_str()),
            ("int8", "dequantized")
        );
        assert!(report.tensors_dequantized > TARGETED && report.requantized.is_empty());
        common::assert_same(name, &case(name).join("merged_dequantized"), &out);
    }
}

#[test]
fn a_merge_beyond_float16_is_refused_unless_allowed() {
    // An adapter weight of 1e6 takes merged values past ±65504: bitsandbytes' float16 cast
    // would store those rows as zeros with an infinite scale.
    let name = CASES[0];
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let huge = job(name, &case(name).join("base8"), &out, 1e6);
    let err = merge(&huge).unwrap_err();
    let chain = std::iter::successors(std::error::Error::source(&err), |e| e.source());
    assert!(
        chain.clone().any(|e| e.is::<Int8RangeError>()),
        "{err}: {:?}",
        chain.collect::<Vec<_>>()
    );
    assert!(!out.exists());
    merge(&huge.allow_nonfinite(true)).unwrap();
    let merged = Checkpoint::open(&out).unwrap();
    let (_, scb) = tensor(&merged, "model.layers.0.self_attn.q_proj.SCB");
    let scb = decode_f32("SCB", Dtype::F32, &scb).unwrap();
    assert!(scb.iter().any(|s| s.is_infinite()));
}

#[test]
fn misuse_is_refused_before_writing() {
    let name = CASES[0];
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let base8 = case(name).join("base8");
    // DoRA (the tiny Llama of the 4-bit fixtures has the same shapes): its norm would be taken
    // from the dequantized weight, which is not reproduced when re-quantizing.
    let mut dora = job(name, &base8, &out, 1.0);
    dora.adapters[0].dir = common::fixture_root("quant_multi").join("nf4_nested_bf16/adapter_dora");
    let err = merge(&dora).unwrap_err();
    assert!(
        err.to_string().contains("DoRA into a 8-bit weight"),
        "{err}"
    );
    let q = QloraBase {
        kind: Bnb4Type::Nf4,
        double_quant: false,
    };
    let err = merge(&job(name, &base8, &out, 1.0).qlora_base(Some(q))).unwrap_err();
    assert!(
        err.to_string().contains("already quantized (bitsandbytes)"),
        "{err}"
    );

    // A copy without config.json's dtype cannot be dequantized; without quantization_config
    // its int8 weights are not merged as plain tensors.
    let copy = tmp.path().join("base8");
    fs::create_dir(&copy).unwrap();
    for f in ["model.safetensors", "generation_config.json"] {
        fs::copy(base8.join(f), copy.join(f)).unwrap();
    }
    let mut config: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(base8.join("config.json")).unwrap()).unwrap();
    config.as_object_mut().unwrap().remove("dtype");
    fs::write(copy.join("config.json"), config.to_string()).unwrap();
    let err = merge(&job(name, &copy, &out, 1.0).dequantize(true)).unwrap_err();
    assert!(
        matches!(
            err,
            MergeError::Bnb(BnbError::Int8Dtype { found: None, .. })
        ),
        "{err}"
    );
    config
        .as_object_mut()
        .unwrap()
        .remove("quantization_config");
    fs::write(copy.join("config.json"), config.to_string()).unwrap();
    let err = merge(&job(name, &copy, &out, 1.0)).unwrap_err();
    assert!(
        matches!(err, MergeError::Bnb(BnbError::Int8WithoutConfig { .. })),
        "{err}"
    );
    assert!(!out.exists());
}

/// The merges of `tests/fixtures/bnb8_multi/<case>` (bnb8_multi_cases.py): several adapters into
/// one int8 base, each re-quantized after its adapter as peft's `Linear8bitLt.merge` does, in
/// the order given (peft's active adapters), bit for bit.
#[test]
fn several_adapters_are_requantized_one_after_another_as_peft_does() {
    let mut runs = 0;
    for name in ["int8_bf16"] {
        let dir = common::fixture_root("bnb8_multi").join(name);
        let case: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
        for (want, order) in case["merges"].as_object().unwrap() {
            let adapters = order
                .as_array()
                .unwrap()
                .iter()
                .map(|n| AdapterInput {
                    dir: dir.join(format!("adapter_{}", n.as_str().unwrap())),
                    weight: 1.0,
                })
                .collect();
            let tmp = tempfile::tempdir().unwrap();
            let out = tmp.path().join("out");
            let job = MergeJob::new(dir.join("base8"), adapters, &out).durable(false);
            let report = merge(&job).unwrap().quantization.unwrap();
            assert_eq!(
                (report.output.as_str(), report.format.as_str()),
                ("kept", "int8")
            );
            common::assert_same(&format!("{name} {want}"), &dir.join(want), &out);
            runs += 1;
        }
    }
    assert!(runs >= 3, "{runs} merges of several adapters");
}
