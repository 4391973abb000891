//! `diff_checkpoints` on checkpoints and adapters written by the real transformers and peft
//! (tests/fixtures/remap, tests/fixtures/peft): layouts and file splits that hold the same
//! tensors compare identical, and a changed byte or a merge is found where it is.

use peftkit_checkpoint::Checkpoint;
use peftkit_remap::{diff_checkpoints, DiffLayout, DiffOptions};

mod common;
use common::fixture_root;

fn mixtral(dir: &str) -> std::path::PathBuf {
    fixture_root("remap").join("mixtral").join(dir)
}

#[test]
fn one_model_in_other_files_or_layouts_is_identical() {
    // One file vs seven shards, both written by transformers from one model.
    let d = diff_checkpoints(
        &mixtral("original"),
        &mixtral("original_2KB"),
        &DiffOptions::default(),
    )
    .unwrap();
    assert!(d.diff.is_identical(), "{d:?}");
    assert_eq!((d.layout, d.kinds), ("stored", ["model", "model"]));
    assert!(d.diff.identical > 0);

    // The Hub layout against the v5 layout transformers saves: equal through the tables.
    let d = diff_checkpoints(
        &mixtral("original"),
        &mixtral("v5"),
        &DiffOptions::default(),
    )
    .unwrap();
    assert!(d.diff.is_identical(), "{d:?}");
    assert_eq!(d.layout, "transformers-v5");

    // Compared as stored, the expert names differ on both sides.
    let stored = DiffOptions::default().layout(DiffLayout::Stored);
    let d = diff_checkpoints(&mixtral("original"), &mixtral("v5"), &stored).unwrap();
    assert!(
        d.diff
            .missing
            .iter()
            .any(|n| n.contains("block_sparse_moe.experts.0.")),
        "{d:?}"
    );
    assert!(
        d.diff
            .extra
            .iter()
            .any(|n| n.contains("mlp.experts.gate_up_proj")),
        "{d:?}"
    );
}

#[test]
fn a_changed_byte_is_found_in_its_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(mixtral("v5").join(f), tmp.path().join(f)).unwrap();
    }
    let ckpt = Checkpoint::open(tmp.path()).unwrap();
    let (name, tensor) = ckpt.state_dict().into_iter().last().unwrap();
    let (file, offset) = tensor
        .file_source()
        .map(|(p, o)| (p.to_owned(), o))
        .unwrap();
    let mut bytes = std::fs::read(&file).unwrap();
    // The last byte of the first element: the sign bit of a little-endian float.
    let width = tensor.byte_len() / tensor.numel();
    bytes[offset as usize + width - 1] ^= 0x80;
    std::fs::write(&file, bytes).unwrap();

    // Against the original layout: compared through the tables, one element of one tensor.
    let d = diff_checkpoints(&mixtral("original"), tmp.path(), &DiffOptions::default()).unwrap();
    assert_eq!(d.diff.value_differs.len(), 1, "{d:?}");
    let v = &d.diff.value_differs[0];
    assert_eq!((v.name.as_str(), v.differing), (name.as_str(), 1));
    assert!(d.diff.missing.is_empty() && d.diff.extra.is_empty());
}

#[test]
fn a_merge_changes_only_the_targeted_weights_and_adapters_compare_by_peft_keys() {
    let case = fixture_root("peft").join("lora_basic");
    let d = diff_checkpoints(
        &case.join("base"),
        &case.join("merged"),
        &DiffOptions::default(),
    )
    .unwrap();
    assert!(d.diff.missing.is_empty() && d.diff.extra.is_empty());
    assert!(!d.diff.value_differs.is_empty());
    for v in &d.diff.value_differs {
        assert!(
            v.name.contains("q_proj") || v.name.contains("v_proj"),
            "{}",
            v.name
        );
        assert!(v.max_abs_diff.unwrap() > 0.0 && v.max_ulp.unwrap() > 0);
    }

    let adapter = case.join("adapter");
    let d = diff_checkpoints(&adapter, &adapter, &DiffOptions::default()).unwrap();
    assert!(d.diff.is_identical());
    assert_eq!(d.kinds, ["adapter", "adapter"]);
    assert!(d.diff.identical > 0);
    let other = fixture_root("peft").join("lora_bias").join("adapter");
    let d = diff_checkpoints(&adapter, &other, &DiffOptions::default()).unwrap();
    assert!(!d.diff.is_identical());
    assert!(
        d.diff
            .extra
            .iter()
            .all(|k| k.starts_with("base_model.model.")),
        "{d:?}"
    );
}
