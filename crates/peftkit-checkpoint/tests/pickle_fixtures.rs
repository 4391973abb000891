//! `.bin` files written by `torch.save` (tests/fixtures/hub/, made by fixturegen/hub_cases.py)
//! read by the restricted unpickler: the same tensors transformers loads from them, ties found,
//! code-running pickles refused; and the dtype casts against transformers' casts.

mod common;

use std::path::{Path, PathBuf};

use common::fixture_root;
use peftkit_checkpoint::{
    cast_tensor, Checkpoint, CheckpointError, Dtype, WeightFormat, WeightsKind,
};

fn hub(rel: &str) -> PathBuf {
    fixture_root("hub").join(rel)
}

/// Every tensor of `expected` (what transformers saved after loading the `.bin`) has the same
/// dtype, shape and bytes in `actual`.
fn assert_same_tensors(actual: &Checkpoint, expected: &Path) {
    let expected = Checkpoint::open(expected).unwrap();
    for (name, t) in expected.tensors() {
        let a = actual.get(name).unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!((a.dtype(), a.shape()), (t.dtype(), t.shape()), "{name}");
        assert_eq!(a.bytes().unwrap(), t.bytes().unwrap(), "{name}");
    }
}

#[test]
fn zip_format_single_file_with_a_tie() {
    let ck = Checkpoint::open(&hub("llama_tied/source")).unwrap();
    assert!(ck.is_pickle());
    assert_eq!(ck.files[0].format, WeightFormat::Pickle);
    assert_eq!(
        ck.ties(),
        [(
            "lm_head.weight".to_owned(),
            "model.embed_tokens.weight".to_owned()
        )]
    );
    assert!(ck.get("lm_head.weight").is_some());
    assert_same_tensors(&ck, &hub("llama_tied/expected"));
}

#[test]
fn sharded_zip_files_with_views_and_the_legacy_format() {
    for src in ["llama_sharded/source", "llama_sharded/legacy"] {
        let ck = Checkpoint::open(&hub(src)).unwrap();
        assert!(ck.ties().is_empty(), "{src}");
        // q_proj is a transposed view (gathered), k/v two views of one storage.
        let q = ck.get("model.layers.0.self_attn.q_proj.weight").unwrap();
        assert!(q.is_computed(), "{src}");
        assert_same_tensors(&ck, &hub("llama_sharded/expected"));
    }
    let sharded = Checkpoint::open(&hub("llama_sharded/source")).unwrap();
    assert_eq!(sharded.files.len(), 7);
    assert!(sharded.index.is_some());
}

#[test]
fn adapter_bin_opens_as_adapter_weights() {
    let ck = Checkpoint::open_kind(&hub("adapter/source_f32"), WeightsKind::Adapter, None).unwrap();
    assert_eq!(ck.len(), 4);
    let expected = hub("adapter/expected_f32/adapter_model.safetensors");
    assert_same_tensors(&ck, &expected);
}

#[test]
fn verify_reads_bin_checkpoints() {
    for src in [
        "llama_tied/source",
        "llama_sharded/source",
        "llama_sharded/legacy",
    ] {
        let problems = peftkit_checkpoint::verify(&hub(src), WeightsKind::Model, None).unwrap();
        assert!(problems.is_empty(), "{src}: {problems:?}");
    }
    let problems =
        peftkit_checkpoint::verify(&hub("evil/os_system.bin"), WeightsKind::Model, None).unwrap();
    assert!(problems[0].contains("`os.system`"), "{problems:?}");
}

/// A pickle that would run `touch peftkit-pwned` is refused naming the global, and nothing ran.
#[test]
fn code_running_pickles_are_refused_and_run_nothing() {
    let cwd = std::env::current_dir().unwrap();
    for (file, global) in [
        ("os_system.bin", "os.system"),
        ("posix_system.bin", "posix.system"),
    ] {
        let err = Checkpoint::open(&hub(&format!("evil/{file}"))).unwrap_err();
        match &err {
            CheckpointError::RefusedGlobal { global: g, .. } => assert_eq!(g, global),
            other => panic!("{file}: {other}"),
        }
        assert!(err.to_string().contains(&format!("`{global}`")), "{err}");
        assert!(!cwd.join("peftkit-pwned").exists());
    }
}

/// `--dtype` casts: transformers' `from_pretrained(dtype=...)` saves, NaN payloads, infinities,
/// subnormals and rounding ties included (q_proj holds them).
#[test]
fn casts_match_transformers() {
    let src = Checkpoint::open(&hub("llama_tied/expected")).unwrap();
    for (dtype, folder) in [(Dtype::BF16, "expected_bf16"), (Dtype::F16, "expected_f16")] {
        let expected = Checkpoint::open(&hub(&format!("llama_tied/{folder}"))).unwrap();
        for (name, t) in expected.tensors() {
            let cast = cast_tensor(name, src.get(name).unwrap(), dtype).unwrap();
            assert_eq!(cast.dtype(), t.dtype(), "{name}");
            assert_eq!(
                cast.bytes().unwrap(),
                t.bytes().unwrap(),
                "{folder}: {name}"
            );
        }
    }
    // From float16 and bfloat16 sources (NaN payloads in q_proj).
    for (src, targets) in [
        ("llama_f16", [(Dtype::F32, "f32"), (Dtype::BF16, "bf16")]),
        ("llama_bf16", [(Dtype::F32, "f32"), (Dtype::F16, "f16")]),
    ] {
        let source = Checkpoint::open(&hub(&format!("{src}/source"))).unwrap();
        for (dtype, name) in targets {
            let expected = Checkpoint::open(&hub(&format!("{src}/expected_{name}"))).unwrap();
            for (tensor, t) in expected.tensors() {
                let cast = cast_tensor(tensor, source.get(tensor).unwrap(), dtype).unwrap();
                assert_eq!(
                    cast.bytes().unwrap(),
                    t.bytes().unwrap(),
                    "{src} -> {name}: {tensor}"
                );
            }
        }
    }
    // float16 -> float32, as peft loads a float16 adapter into float32 parameters.
    let f16 =
        Checkpoint::open_kind(&hub("adapter/source_f16"), WeightsKind::Adapter, None).unwrap();
    let f32 = Checkpoint::open(&hub("adapter/expected_f16/adapter_model.safetensors")).unwrap();
    for (name, t) in f32.tensors() {
        let cast = cast_tensor(name, f16.get(name).unwrap(), Dtype::F32).unwrap();
        assert_eq!(cast.bytes().unwrap(), t.bytes().unwrap(), "{name}");
    }
}

/// `tensor.to(dtype)` on 37-element tensors, special values in the vectorised part and in the
/// scalar tail (casts.safetensors).
#[test]
fn casts_match_torch_in_the_vector_tail_too() {
    let casts = Checkpoint::open(&hub("casts.safetensors")).unwrap();
    let mut checked = 0;
    for (name, expected) in casts.tensors() {
        let Some((from, to)) = name.split_once("_to_") else {
            continue;
        };
        let dtype = |n: &str| match n {
            "f32" => Dtype::F32,
            "f16" => Dtype::F16,
            _ => Dtype::BF16,
        };
        let src = casts.get(from).unwrap();
        let cast = cast_tensor(name, src, dtype(to)).unwrap();
        assert_eq!(cast.bytes().unwrap(), expected.bytes().unwrap(), "{name}");
        checked += 1;
    }
    assert_eq!(checked, 6);
}
