//! Errors keep their type on the way out of a merge: a kernel's `MergeMathError` raised while
//! the output is written, and the refusals of the plan, `UnsupportedMerge`.

mod common;

use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use common::peft_case as case_dir;
use peftkit_checkpoint::{save_pretrained, Checkpoint, Dtype, SaveOptions, Tensor, WeightsKind};
use peftkit_merge::{merge, AdapterInput, MergeError, MergeJob, MergeMathError, UnsupportedMerge};

/// `lora_basic`'s adapter with an infinity in the first element of q_proj's `lora_B`.
fn broken_adapter(dir: &Path) {
    let src = case_dir("lora_basic").join("adapter");
    let ck = Checkpoint::open_kind(&src, WeightsKind::Adapter, None).unwrap();
    let mut sd = ck.state_dict();
    let key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";
    let t = sd[key].clone();
    let mut bytes = t.bytes().unwrap().into_owned();
    bytes[..4].copy_from_slice(&f32::INFINITY.to_le_bytes());
    let broken = Tensor::from_bytes(Dtype::F32, t.shape().to_vec(), bytes).unwrap();
    sd.insert(key.into(), broken);
    let opts = SaveOptions {
        kind: WeightsKind::Adapter,
        extra_files: vec![(
            "adapter_config.json".into(),
            fs::read(src.join("adapter_config.json")).unwrap(),
        )],
        ..Default::default()
    };
    save_pretrained(dir, &sd, &opts).unwrap();
}

#[test]
fn a_kernel_error_is_the_typed_source_of_the_merge_error() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad_adapter");
    broken_adapter(&bad);
    let base = case_dir("lora_basic").join("base");
    let adapters = vec![AdapterInput::parse(bad.to_str().unwrap())];
    // Non-finite values allowed, so that peft's own check (`safe_merge`, in the kernel) fires.
    let job = MergeJob::new(base, adapters, tmp.path().join("merged"))
        .safe_merge(true)
        .allow_nonfinite(true);
    let err = merge(&job).unwrap_err();
    let source = std::error::Error::source(&err).expect("a source");
    let math = source
        .downcast_ref::<MergeMathError>()
        .expect("a MergeMathError");
    assert!(matches!(math, MergeMathError::NonFinite { .. }), "{math}");
    // The chain reads as one message: tensor, adapter, then the kernel's reason.
    let chain = format!("{err}: {math}");
    assert!(chain.starts_with("tensor `model.layers.0.self_attn.q_proj.weight`: merging "));
}

#[test]
fn a_refusal_names_its_feature() {
    let tmp = tempfile::tempdir().unwrap();
    let case = case_dir("prompt_tuning");
    let adapters = vec![AdapterInput::parse(case.join("adapter").to_str().unwrap())];
    let job = MergeJob::new(case.join("base"), adapters, tmp.path().join("merged"));
    match merge(&job).unwrap_err() {
        MergeError::Unsupported {
            what: UnsupportedMerge::NotAModuleTensor { peft_type, .. },
            ..
        } => assert_eq!(peft_type, "PROMPT_TUNING"),
        other => panic!("{other}"),
    }
}

#[test]
fn progress_is_told_every_byte_written() {
    let tmp = tempfile::tempdir().unwrap();
    let case = case_dir("lora_basic");
    let adapters = vec![AdapterInput::parse(case.join("adapter").to_str().unwrap())];
    let total = Arc::new(AtomicU64::new(0));
    let seen = total.clone();
    let job = MergeJob::new(case.join("base"), adapters, tmp.path().join("merged"))
        .durable(false)
        .progress(move |n| {
            seen.fetch_add(n, Ordering::Relaxed);
        });
    let summary = merge(&job).unwrap();
    assert!(summary.bytes > 0);
    assert_eq!(total.load(Ordering::Relaxed), summary.bytes);
}

/// By default the infinity is refused before anything is computed, naming the adapter tensor.
#[test]
fn a_non_finite_adapter_tensor_is_refused_by_default() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad_adapter");
    broken_adapter(&bad);
    let adapters = vec![AdapterInput::parse(bad.to_str().unwrap())];
    let job = MergeJob::new(
        case_dir("lora_basic").join("base"),
        adapters,
        tmp.path().join("m"),
    );
    match merge(&job).unwrap_err() {
        MergeError::NonFiniteAdapter {
            key, count, first, ..
        } => {
            assert_eq!(
                key,
                "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
            );
            assert_eq!((count, first), (1, 0));
        }
        other => panic!("{other}"),
    }
    assert!(!tmp.path().join("m").exists());
}
