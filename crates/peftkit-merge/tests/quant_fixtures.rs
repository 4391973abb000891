//! Merges into FP8 block-scaled bases, compared bit for bit with `tests/fixtures/quant` (made by
//! `tests/interop/fixturegen/quant_cases.py` with transformers' own `Fp8Quantize` on CPU, the
//! real CPU load, peft's merge and `save_pretrained`):
//!
//! * `--dequantize` equals transformers + peft's bf16 save (`merged_dequantized/`);
//! * the default re-quantizes the merged weights as `Fp8Quantize` does (`merged_fp8/`), copies
//!   everything else, keeps `quantization_config`, and reports each weight's error;
//! * the elementwise conversions equal torch's on every bf16 value;
//! * quantization methods the merge cannot write into are refused, nothing written.
//!
//! The merged weights hold a low-rank product, rounded as the fixture host's MKL does: the
//! merges run in that host's reduction order (`HOST.json`), whatever CPU runs the test. The
//! live checks (`tests/interop/live_checks.py`) compare with peft on the running host.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use peftkit_checkpoint::Checkpoint;
use peftkit_checkpoint::Dtype;
use peftkit_merge::{
    decode_f32, dequantize_fp8, e8m0_to_f32, f32_to_e4m3, merge, set_reduction_order,
    ue8m0_round_up, AdapterInput, Bnb4Type, BnbError, Fp8Grid, HostOrder, MergeError, MergeJob,
    QloraBase,
};
use serde_json::Value;

const CASES: &[&str] = &["fp8_llama", "fp8_llama_ue8m0", "fp8_qwen3_moe"];

fn case_dir(case: &str) -> PathBuf {
    common::fixture_root("quant").join(case)
}

/// Runs this process's merges in the reduction order of the host that made the fixtures.
fn use_fixture_host_order() {
    let text = fs::read_to_string(common::fixture_root("HOST.json")).unwrap();
    let host: Value = serde_json::from_str(&text).unwrap();
    let vendor = host["vendor_id"].as_str().unwrap();
    let avx512 = host["isa"]["avx512f"].as_bool().unwrap();
    let made_on = HostOrder::for_cpu(vendor, avx512);
    assert!(made_on.measured, "fixtures made on an unmeasured CPU");
    set_reduction_order(Some(made_on.order));
}

fn job(case: &str, out: &Path) -> MergeJob {
    let dir = case_dir(case);
    MergeJob::new(
        dir.join("base"),
        vec![AdapterInput::parse(dir.join("adapter").to_str().unwrap())],
        out,
    )
    .durable(false)
}

/// Every file of `expected` is in `actual` with the same bytes, and no other file.
fn assert_same_folder(case: &str, expected: &Path, actual: &Path) {
    let names = |d: &Path| -> Vec<String> {
        let mut n: Vec<String> = fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        n.sort();
        n
    };
    assert_eq!(names(expected), names(actual), "{case}: files");
    let (e, a) = (
        Checkpoint::open(expected).unwrap(),
        Checkpoint::open(actual).unwrap(),
    );
    let differing: Vec<&str> = e
        .tensors()
        .filter(|(name, t)| a.get(name).map(|x| x.bytes().unwrap()) != Some(t.bytes().unwrap()))
        .map(|(name, _)| name)
        .collect();
    assert!(
        differing.is_empty(),
        "{case}: tensors differ: {differing:?}"
    );
    for f in names(expected) {
        assert!(
            fs::read(expected.join(&f)).unwrap() == fs::read(actual.join(&f)).unwrap(),
            "{case}: {f} differs"
        );
    }
}

fn requantized_in_case(case: &str) -> Vec<String> {
    let meta: Value =
        serde_json::from_slice(&fs::read(case_dir(case).join("case.json")).unwrap()).unwrap();
    meta["requantized"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect()
}

/// `max |dequantize(merged_fp8) - merged_dequantized|` of weight `name`, from the fixtures.
fn reference_error(case: &str, name: &str) -> f64 {
    let fp8 = Checkpoint::open(&case_dir(case).join("merged_fp8")).unwrap();
    let bf16 = Checkpoint::open(&case_dir(case).join("merged_dequantized")).unwrap();
    let (w, s) = (
        fp8.get(name).unwrap(),
        fp8.get(&name.replace(".weight", ".weight_scale_inv"))
            .unwrap(),
    );
    let scales: Vec<f32> = match s.dtype() {
        Dtype::F8_E8M0 => s.bytes().unwrap().iter().map(|&b| e8m0_to_f32(b)).collect(),
        d => decode_f32("scale", d, &s.bytes().unwrap()).unwrap(),
    };
    let grid = Fp8Grid::new(w.shape(), s.shape()).unwrap();
    let back = dequantize_fp8(&w.bytes().unwrap(), &scales, &grid).unwrap();
    let t = bf16.get(name).unwrap();
    let merged = decode_f32("merged", t.dtype(), &t.bytes().unwrap()).unwrap();
    back.iter()
        .zip(&merged)
        .map(|(b, m)| f64::from((b - m).abs()))
        .fold(0.0, f64::max)
}

#[test]
fn dequantized_merges_equal_transformers_and_peft() {
    use_fixture_host_order();
    for case in CASES {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("merged");
        let summary =
            merge(&job(case, &out).dequantize(true)).unwrap_or_else(|e| panic!("{case}: {e}"));
        assert_same_folder(case, &case_dir(case).join("merged_dequantized"), &out);
        // Changed weights are merged, scales dropped, every other tensor copied (dequantized).
        let n = requantized_in_case(case).len();
        let written = Checkpoint::open(&out).unwrap().len();
        assert_eq!(
            (summary.tensors_merged, summary.tensors_copied),
            (n, written - n)
        );
        let q = summary.quantization.expect("an FP8 base is reported");
        assert_eq!(
            (
                q.method.as_str(),
                q.output.as_str(),
                q.dtype.as_deref().unwrap_or_default()
            ),
            ("fp8", "dequantized", "bfloat16")
        );
        assert!(q.requantized.is_empty());
    }
}

#[test]
fn kept_merges_requantize_as_fp8quantize_and_report_the_error() {
    use_fixture_host_order();
    for case in CASES {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("merged");
        let summary = merge(&job(case, &out)).unwrap_or_else(|e| panic!("{case}: {e}"));
        assert_same_folder(case, &case_dir(case).join("merged_fp8"), &out);
        // Each re-quantized weight and its scale are merged; the rest is copied.
        let n = requantized_in_case(case).len();
        let base = Checkpoint::open(&case_dir(case).join("base"))
            .unwrap()
            .len();
        assert_eq!(
            (summary.tensors_merged, summary.tensors_copied),
            (2 * n, base - 2 * n)
        );
        let q = summary.quantization.expect("an FP8 base is reported");
        assert_eq!(q.output, "kept");
        let reported: BTreeMap<String, f64> = q
            .requantized
            .into_iter()
            .map(|t| (t.tensor, t.max_abs_error.expect("measured for FP8")))
            .collect();
        let names: Vec<String> = reported.keys().cloned().collect();
        assert_eq!(names, requantized_in_case(case), "{case}");
        for (name, err) in &reported {
            assert_eq!(*err, reference_error(case, name), "{case}: {name}");
            assert!(*err > 0.0, "{case}: {name}");
        }
    }
}

/// Several adapters into an FP8 base (`tests/fixtures/quant_multi/fp8_llama`, made by
/// quant_multi_cases.py): transformers dequantizes the base on CPU, so peft merges them one after
/// another in bf16 as into any bf16 model, and the kept format is `Fp8Quantize` applied once to
/// that merge. Both outputs equal the references; each changed weight is re-quantized once.
#[test]
fn several_adapters_into_fp8_merge_in_bf16_then_requantize_once() {
    use_fixture_host_order();
    let dir = common::fixture_root("quant_multi").join("fp8_llama");
    let meta: Value = serde_json::from_slice(&fs::read(dir.join("case.json")).unwrap()).unwrap();
    let adapters: Vec<AdapterInput> = meta["order"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| AdapterInput {
            dir: dir.join(format!("adapter_{}", n.as_str().unwrap())),
            weight: 1.0,
        })
        .collect();
    assert_eq!(adapters.len(), 2);
    for (dequantize, want) in [(false, "merged_fp8"), (true, "merged_dequantized")] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("merged");
        let job = MergeJob::new(dir.join("base"), adapters.clone(), &out)
            .durable(false)
            .dequantize(dequantize);
        let summary = merge(&job).unwrap_or_else(|e| panic!("{want}: {e}"));
        assert_same_folder(want, &dir.join(want), &out);
        let q = summary.quantization.expect("an FP8 base is reported");
        if !dequantize {
            let names: Vec<&str> = q.requantized.iter().map(|t| t.tensor.as_str()).collect();
            let want: Vec<&str> = meta["requantized"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect();
            assert_eq!(names, want);
        }
    }
}

/// The fixture's tensor `name` of `conversions.safetensors`, as bytes.
fn conversion(name: &str) -> (Dtype, Vec<u8>) {
    let c =
        Checkpoint::open(&common::fixture_root("quant").join("conversions.safetensors")).unwrap();
    let t = c.get(name).unwrap();
    (t.dtype(), t.bytes().unwrap().into_owned())
}

#[test]
fn e4m3_casts_equal_torch_on_every_bf16_value() {
    let (dtype, x) = conversion("x");
    let x = decode_f32("x", dtype, &x).unwrap();
    let (dtype, expected) = conversion("e4m3");
    assert_eq!(dtype, Dtype::F8_E4M3);
    assert_eq!(x.len(), 2 << 16);
    let wrong: Vec<(f32, u8, u8)> = x
        .iter()
        .zip(&expected)
        .filter(|(v, e)| f32_to_e4m3(**v) != **e)
        .map(|(v, e)| (*v, f32_to_e4m3(*v), *e))
        .take(5)
        .collect();
    assert!(wrong.is_empty(), "(value, ours, torch): {wrong:?}");
}

#[test]
fn ue8m0_rounding_equals_fp8quantize() {
    let (dtype, inv) = conversion("inv");
    let inv = decode_f32("inv", dtype, &inv).unwrap();
    let (dtype, expected) = conversion("inv_ue8m0");
    assert_eq!(dtype, Dtype::F8_E8M0);
    for (v, e) in inv.iter().zip(&expected) {
        assert_eq!(ue8m0_round_up(*v), e8m0_to_f32(*e), "inv {v:e}");
    }
}

/// A copy of `case`'s base with `edit` applied to its config.
fn base_with_config(case: &str, dir: &Path, edit: impl FnOnce(&mut Value)) -> PathBuf {
    let base = dir.join("base");
    fs::create_dir_all(&base).unwrap();
    for f in fs::read_dir(case_dir(case).join("base")).unwrap() {
        let f = f.unwrap().path();
        fs::copy(&f, base.join(f.file_name().unwrap())).unwrap();
    }
    let mut config: Value =
        serde_json::from_slice(&fs::read(base.join("config.json")).unwrap()).unwrap();
    edit(&mut config);
    fs::write(
        base.join("config.json"),
        serde_json::to_vec(&config).unwrap(),
    )
    .unwrap();
    base
}

fn merge_into(base: &Path, out: &Path, dequantize: bool) -> Result<(), Box<MergeError>> {
    let adapter = case_dir("fp8_llama").join("adapter");
    let job = MergeJob::new(
        base,
        vec![AdapterInput::parse(adapter.to_str().unwrap())],
        out,
    )
    .durable(false)
    .dequantize(dequantize);
    merge(&job).map(|_| ()).map_err(Box::new)
}

#[test]
fn other_quantization_methods_are_refused_and_nothing_written() {
    for method in ["gptq", "awq", "compressed-tensors"] {
        let tmp = tempfile::tempdir().unwrap();
        let base = base_with_config("fp8_llama", tmp.path(), |c| {
            c["quantization_config"] = serde_json::json!({"quant_method": method, "bits": 4});
        });
        let out = tmp.path().join("out");
        let err = merge_into(&base, &out, false).unwrap_err();
        assert!(
            matches!(*err, MergeError::QuantizedBase { .. }),
            "{method}: {err}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains(method)
                && msg.contains("original 16-bit")
                && msg.contains("fp8, bitsandbytes"),
            "{msg}"
        );
        assert!(!out.exists(), "{method}: output written");
    }
}

/// `bitsandbytes` is one of the accepted methods, but only over its 4-bit weights: a config
/// that claims it over FP8 tensors must not merge into them as if they were plain.
#[test]
fn a_bitsandbytes_config_without_4bit_weights_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let base = base_with_config("fp8_llama", tmp.path(), |c| {
        c["quantization_config"] =
            serde_json::json!({"quant_method": "bitsandbytes", "load_in_4bit": true});
    });
    let out = tmp.path().join("out");
    for dequantize in [false, true] {
        let err = merge_into(&base, &out, dequantize).unwrap_err();
        assert!(
            matches!(*err, MergeError::Bnb(BnbError::NoWeights { .. })),
            "{err}"
        );
        assert!(!out.exists());
    }
}

/// `--qlora-base` rounds a 16-bit base through 4 bits; an FP8 base is refused, naming it.
#[test]
fn qlora_base_of_an_fp8_base_is_refused() {
    let adapter = case_dir("fp8_llama").join("adapter");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let job = MergeJob::new(
        case_dir("fp8_llama").join("base"),
        vec![AdapterInput::parse(adapter.to_str().unwrap())],
        &out,
    )
    .qlora_base(Some(QloraBase {
        kind: Bnb4Type::Nf4,
        double_quant: false,
    }));
    let err = merge(&job).unwrap_err();
    assert!(
        matches!(&err, MergeError::Bnb(BnbError::AlreadyQuantized { method, .. }) if method == "fp8"),
        "{err}"
    );
    assert!(!out.exists());
}

#[test]
fn dequantize_of_an_unquantized_base_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let base = base_with_config("fp8_llama", tmp.path(), |c| {
        c.as_object_mut().unwrap().remove("quantization_config");
    });
    let err = merge_into(&base, &tmp.path().join("out"), true).unwrap_err();
    assert!(matches!(*err, MergeError::NotQuantized { .. }), "{err}");
}

#[test]
fn a_block_size_the_scales_do_not_follow_is_refused_for_requantization() {
    let tmp = tempfile::tempdir().unwrap();
    let base = base_with_config("fp8_llama", tmp.path(), |c| {
        c["quantization_config"]["weight_block_size"] = serde_json::json!([16, 16]);
    });
    let out = tmp.path().join("out");
    let err = merge_into(&base, &out, false).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(*err, MergeError::Fp8Layout { .. }) && msg.contains("--dequantize"),
        "{msg}"
    );
    assert!(!out.exists());
    // Dequantizing follows the scales' grid, as transformers does.
    merge_into(&base, &out, true).unwrap();
}

#[test]
fn a_config_without_dtype_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let base = base_with_config("fp8_llama", tmp.path(), |c| {
        c.as_object_mut().unwrap().remove("dtype");
    });
    let err = merge_into(&base, &tmp.path().join("out"), true).unwrap_err();
    assert!(err.to_string().contains("no dtype"), "{err}");
}
