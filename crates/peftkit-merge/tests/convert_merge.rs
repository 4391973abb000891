//! Legacy (transformers v4, per-expert) MoE LoRA adapters, converted to the fused v5 layout by
//! `peftkit_peft::convert_legacy_adapter_dir`, then merged (`tests/fixtures/convert/<case>/`, made by
//! `tests/interop/fixturegen/convert_cases.py`):
//!
//! * merging the converted adapter into the per-expert base is bit for bit peft's
//!   `merge_and_unload()`; merging the legacy adapter directly (plain LoRA on each expert's
//!   tensors) agrees to rounding;
//! * bare parameter names next to a router parameter are matched by shape.

mod common;

use std::fs;
use std::path::Path;

use common::convert_case as case_dir;
use peftkit_checkpoint::{Checkpoint, Dtype, Tensor};
use peftkit_merge::{merge, AdapterInput, MergeJob};
use peftkit_peft::convert_legacy_adapter_dir;
use serde_json::Value;

/// The cases merged bit for bit. `mixtral_mixed` (bare parameter names next to the router's
/// `gate.weight`) has 8-wide experts, where torch's matmul rounds without FMA; it is checked
/// to rounding in `mixed_parameter_targets_merge_to_rounding`.
const MERGE_CASES: &[&str] = &["mixtral", "qwen3_moe"];

fn model_type(case: &str) -> String {
    let text = fs::read_to_string(case_dir(case).join("case.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v["model"]["model_type"].as_str().unwrap().to_owned()
}

fn convert_case(case: &str, out: &Path) {
    convert_legacy_adapter_dir(
        &case_dir(case).join("legacy_adapter"),
        out,
        Some(&model_type(case)),
    )
    .unwrap_or_else(|e| panic!("{case}: {e}"));
}

fn merge_into_base(case: &str, adapter: &Path, out: &Path) {
    let job = MergeJob::new(
        case_dir(case).join("base"),
        vec![AdapterInput {
            dir: adapter.to_owned(),
            weight: 1.0,
        }],
        out,
    );
    merge(&job).unwrap_or_else(|e| panic!("{case}: merging {}: {e}", adapter.display()));
}

fn f32s(t: &Tensor) -> Vec<f32> {
    assert_eq!(t.dtype(), Dtype::F32);
    t.bytes()
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[test]
fn merging_the_converted_adapter_is_peft_bit_for_bit() {
    for case in MERGE_CASES {
        let tmp = tempfile::tempdir().unwrap();
        let converted = tmp.path().join("converted");
        convert_case(case, &converted);
        let merged = tmp.path().join("merged");
        merge_into_base(case, &converted, &merged);
        let expected = case_dir(case).join("merged");
        for f in ["model.safetensors", "config.json", "generation_config.json"] {
            let (e, a) = (
                fs::read(expected.join(f)).unwrap(),
                fs::read(merged.join(f)).unwrap(),
            );
            if e != a && f == "model.safetensors" {
                let (ec, ac) = (
                    Checkpoint::open(&expected).unwrap(),
                    Checkpoint::open(&merged).unwrap(),
                );
                let bad: Vec<&str> = ec
                    .tensors()
                    .filter(|(n, t)| {
                        ac.get(n)
                            .map(|u| u.bytes().unwrap() != t.bytes().unwrap())
                            .unwrap_or(true)
                    })
                    .map(|(n, _)| n)
                    .collect();
                panic!("{case}: merged tensors differ from peft's: {bad:?}");
            }
            assert!(e == a, "{case}: merged {f} differs");
        }
    }
}

/// The legacy adapter merged as plain LoRA on each expert's tensors gives the same weights up to
/// rounding (peft's fused merge sums over the doubled rank in another order).
#[test]
fn merging_the_legacy_adapter_directly_agrees_to_rounding() {
    for case in MERGE_CASES {
        let tmp = tempfile::tempdir().unwrap();
        let (legacy_out, fused_out) = (tmp.path().join("legacy"), tmp.path().join("fused"));
        merge_into_base(case, &case_dir(case).join("legacy_adapter"), &legacy_out);
        let converted = tmp.path().join("converted");
        convert_case(case, &converted);
        merge_into_base(case, &converted, &fused_out);
        let (l, f, base) = (
            Checkpoint::open(&legacy_out).unwrap(),
            Checkpoint::open(&fused_out).unwrap(),
            Checkpoint::open(&case_dir(case).join("base")).unwrap(),
        );
        let (mut max_diff, mut changed, mut differing) = (0f32, 0usize, 0usize);
        for (name, lt) in l.tensors() {
            let (lv, fv, bv) = (
                f32s(lt),
                f32s(f.get(name).unwrap()),
                f32s(base.get(name).unwrap()),
            );
            if lv != bv {
                changed += 1;
            }
            if lv != fv {
                differing += 1;
            }
            for (x, y) in lv.iter().zip(&fv) {
                max_diff = max_diff.max((x - y).abs());
            }
        }
        eprintln!(
            "{case}: legacy vs converted merge: {changed} tensors changed by the adapter, {differing} not bit-identical, max abs diff {max_diff:e}"
        );
        assert!(changed > 0, "{case}: the legacy merge changed nothing");
        assert!(max_diff < 1e-6, "{case}: max abs diff {max_diff}");
    }
}

/// Bare parameter names (`gate_up_proj`, `down_proj`) next to a 2-D router parameter
/// (`gate.weight`) and a plain module target: every wrapper is matched to the parameter whose
/// shape fits, not to the nesting depth alone. The experts here are 8 wide, where torch rounds
/// `B @ A` without FMA, so the result agrees with peft to rounding, not bit for bit.
#[test]
fn mixed_parameter_targets_merge_to_rounding() {
    let case = "mixtral_mixed";
    let tmp = tempfile::tempdir().unwrap();
    let converted = tmp.path().join("converted");
    convert_case(case, &converted);
    let merged = tmp.path().join("merged");
    merge_into_base(case, &converted, &merged);
    let (e, a, base) = (
        Checkpoint::open(&case_dir(case).join("merged")).unwrap(),
        Checkpoint::open(&merged).unwrap(),
        Checkpoint::open(&case_dir(case).join("base")).unwrap(),
    );
    let mut changed = 0;
    for (name, et) in e.tensors() {
        let (ev, av, bv) = (
            f32s(et),
            f32s(a.get(name).unwrap()),
            f32s(base.get(name).unwrap()),
        );
        if ev != bv {
            changed += 1;
            assert_ne!(av, bv, "{name}: peft changed it, peftkit did not");
        }
        let scale = ev.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (x, y) in ev.iter().zip(&av) {
            assert!(
                (x - y).abs() <= scale * 2f32.powi(-21),
                "{name}: {x} vs {y}"
            );
        }
    }
    assert!(changed > 0);
}
