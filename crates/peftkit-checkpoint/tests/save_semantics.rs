//! What save_pretrained does beyond the bytes: ties, aliasing, main process, stale files,
//! atomicity.

use std::collections::BTreeSet;
use std::fs;
use std::sync::Arc;

mod common;
use common::file_names;

use peftkit_checkpoint::{save_pretrained, CheckpointError, Dtype, SaveOptions, StateDict, Tensor};

fn f32s(vals: &[f32]) -> Tensor {
    Tensor::from_bytes(
        Dtype::F32,
        vec![vals.len()],
        vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
    )
    .unwrap()
}

fn sd(items: Vec<(&str, Tensor)>) -> StateDict {
    items.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

fn tie() -> Vec<(String, String)> {
    vec![("lm_head.weight".into(), "embed.weight".into())]
}

#[test]
fn declared_tie_keeps_the_source_name() {
    let emb = f32s(&[1.0, 2.0]);
    let state = sd(vec![("embed.weight", emb.clone()), ("lm_head.weight", emb)]);
    let tmp = tempfile::tempdir().unwrap();
    let report = save_pretrained(
        tmp.path(),
        &state,
        &SaveOptions {
            tied_weights: tie(),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(report.dropped_ties, vec!["lm_head.weight"]);
    let ck = peftkit_checkpoint::Checkpoint::open(tmp.path()).unwrap();
    assert!(ck.get("embed.weight").is_some() && ck.get("lm_head.weight").is_none());
}

#[test]
fn declared_tie_with_equal_copies_is_deduplicated() {
    let state = sd(vec![
        ("embed.weight", f32s(&[1.0, 2.0])),
        ("lm_head.weight", f32s(&[1.0, 2.0])),
    ]);
    let tmp = tempfile::tempdir().unwrap();
    let report = save_pretrained(
        tmp.path(),
        &state,
        &SaveOptions {
            tied_weights: tie(),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(report.tensors, 1);
}

#[test]
fn declared_tie_with_different_values_is_refused() {
    let state = sd(vec![
        ("embed.weight", f32s(&[1.0, 2.0])),
        ("lm_head.weight", f32s(&[1.0, 3.0])),
    ]);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let err = save_pretrained(
        &out,
        &state,
        &SaveOptions {
            tied_weights: tie(),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(
        matches!(err, CheckpointError::TiedTensorsDiffer { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("lm_head.weight") && err.to_string().contains("embed.weight"));
    assert!(!out.exists());
}

#[test]
fn undeclared_aliasing_is_refused_naming_both_keys() {
    let t = f32s(&[1.0]);
    let state = sd(vec![("a.weight", t.clone()), ("b.weight", t)]);
    let tmp = tempfile::tempdir().unwrap();
    let err = save_pretrained(tmp.path(), &state, &SaveOptions::default()).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("`a.weight`") && msg.contains("`b.weight`"),
        "{msg}"
    );
}

#[test]
fn disjoint_views_of_one_buffer_are_separate_tensors_but_overlaps_are_refused() {
    let buf = Arc::new(vec![0u8; 16]);
    let a = Tensor::from_shared(Dtype::F32, vec![2], buf.clone(), 0..8).unwrap();
    let b = Tensor::from_shared(Dtype::F32, vec![2], buf.clone(), 8..16).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    save_pretrained(
        tmp.path(),
        &sd(vec![("a", a.clone()), ("b", b)]),
        &SaveOptions::default(),
    )
    .unwrap();
    let c = Tensor::from_shared(Dtype::F32, vec![2], buf, 4..12).unwrap();
    let err = save_pretrained(
        tmp.path(),
        &sd(vec![("a", a), ("c", c)]),
        &SaveOptions::default(),
    )
    .unwrap_err();
    assert!(
        matches!(err, CheckpointError::PartialOverlap { .. }),
        "{err}"
    );
}

#[test]
fn non_main_process_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let report = save_pretrained(
        &out,
        &sd(vec![("w", f32s(&[1.0]))]),
        &SaveOptions {
            is_main_process: false,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(report.weight_files.is_empty());
    assert!(!out.exists());
    assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 0);
}

fn many() -> StateDict {
    (0..6)
        .map(|i| (format!("t{i}"), f32s(&[i as f32; 250])))
        .collect()
}

#[test]
fn stale_files_of_this_stem_are_replaced_and_other_variants_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    fs::create_dir(&dir).unwrap();
    for f in [
        "model-00001-of-00009.safetensors",
        "model.fp16-00001-of-00002.safetensors",
        "model.safetensors.index.fp16.json",
        "modelX-00001-of-00002.safetensors",
        "model.safetensors",
        "tokenizer.json",
    ] {
        fs::write(dir.join(f), "old").unwrap();
    }
    save_pretrained(
        &dir,
        &many(),
        &SaveOptions {
            max_shard_size: 2000,
            ..Default::default()
        },
    )
    .unwrap();
    let expected: BTreeSet<String> = [
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
        "model.safetensors.index.json",
        // Not ours to delete (transformers deletes the first two):
        "model.fp16-00001-of-00002.safetensors",
        "model.safetensors.index.fp16.json",
        "modelX-00001-of-00002.safetensors",
        "tokenizer.json",
    ]
    .map(String::from)
    .into();
    // The stale single model.safetensors is gone: it would shadow the new shards.
    assert_eq!(file_names(&dir), expected);
    // A single-file save then removes the now-stale index and shards.
    save_pretrained(&dir, &many(), &SaveOptions::default()).unwrap();
    let names_now = file_names(&dir);
    assert!(names_now.contains("model.safetensors"));
    assert!(!names_now.contains("model.safetensors.index.json"));
    assert!(!names_now.iter().any(|n| n.starts_with("model-0000")));
    assert!(
        names_now.contains("tokenizer.json")
            && names_now.contains("model.safetensors.index.fp16.json")
    );
}

#[test]
fn a_failure_half_way_leaves_the_previous_checkpoint_intact() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    save_pretrained(
        &dir,
        &many(),
        &SaveOptions {
            max_shard_size: 2000,
            ..Default::default()
        },
    )
    .unwrap();
    let before: Vec<(String, Vec<u8>)> = file_names(&dir)
        .into_iter()
        .map(|n| (n.clone(), fs::read(dir.join(&n)).unwrap()))
        .collect();
    let mut broken = many();
    broken.insert(
        "t9".into(),
        Tensor::lazy(Dtype::F32, vec![1], || {
            Err(CheckpointError::TensorData {
                tensor: String::new(),
                reason: "disk on fire".into(),
            })
        })
        .unwrap(),
    );
    let err = save_pretrained(&dir, &broken, &SaveOptions::default()).unwrap_err();
    assert!(
        err.to_string().contains("t9") && err.to_string().contains("disk on fire"),
        "{err}"
    );
    let after: Vec<(String, Vec<u8>)> = file_names(&dir)
        .into_iter()
        .map(|n| (n.clone(), fs::read(dir.join(&n)).unwrap()))
        .collect();
    assert_eq!(before, after);
    assert_eq!(
        file_names(tmp.path()),
        ["ckpt".to_string()].into(),
        "staging folder left behind"
    );
}

#[test]
fn empty_state_dict_and_file_target_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    assert!(matches!(
        save_pretrained(tmp.path(), &StateDict::new(), &SaveOptions::default()),
        Err(CheckpointError::EmptyStateDict(_))
    ));
    let file = tmp.path().join("f");
    fs::write(&file, "x").unwrap();
    assert!(matches!(
        save_pretrained(&file, &many(), &SaveOptions::default()),
        Err(CheckpointError::NotADirectory(_))
    ));
}

#[test]
fn config_dtype_follows_the_first_floating_point_tensor() {
    use peftkit_checkpoint::ModelConfig;
    let ids = Tensor::from_bytes(Dtype::I64, vec![1], vec![0; 8]).unwrap();
    let w = Tensor::from_bytes(Dtype::BF16, vec![2], vec![0; 4]).unwrap();
    let config = ModelConfig::from_json(r#"{"model_type":"llama","dtype":"float32"}"#).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    save_pretrained(
        tmp.path(),
        &sd(vec![("ids", ids), ("w", w)]),
        &SaveOptions {
            config: Some(config),
            ..Default::default()
        },
    )
    .unwrap();
    let written = ModelConfig::read(&tmp.path().join("config.json")).unwrap();
    assert_eq!(written.fields["dtype"], "bfloat16");
}

#[test]
fn non_durable_save_writes_the_same_files() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let opts = SaveOptions {
        max_shard_size: 2000,
        ..Default::default()
    };
    save_pretrained(&a, &many(), &opts).unwrap();
    save_pretrained(
        &b,
        &many(),
        &SaveOptions {
            durable: false,
            ..opts
        },
    )
    .unwrap();
    assert_eq!(file_names(&a), file_names(&b));
    for n in file_names(&a) {
        assert_eq!(
            fs::read(a.join(&n)).unwrap(),
            fs::read(b.join(&n)).unwrap(),
            "{n}"
        );
    }
}

#[test]
fn with_several_failures_the_report_does_not_depend_on_timing() {
    // Tensors are written by parallel workers; the error must not depend on their timing.
    let failing = |what: &'static str, after_ms: u64| {
        Tensor::lazy(Dtype::F32, vec![1], move || {
            std::thread::sleep(std::time::Duration::from_millis(after_ms));
            Err(CheckpointError::TensorData {
                tensor: String::new(),
                reason: what.into(),
            })
        })
        .unwrap()
    };
    for _ in 0..5 {
        let tmp = tempfile::tempdir().unwrap();
        let mut state = many();
        // "t1" sorts before "t7" and lands in an earlier shard, but fails later in time: the
        // other worker reaches "t7" meanwhile.
        state.insert("t1".into(), failing("first", 30));
        state.insert("t7".into(), failing("second", 0));
        let err = save_pretrained(
            &tmp.path().join("out"),
            &state,
            &SaveOptions {
                max_shard_size: 2000,
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("t1") && err.to_string().contains("first"),
            "{err}"
        );
        assert_eq!(
            file_names(tmp.path()),
            BTreeSet::new(),
            "output or staging left behind"
        );
    }
}

/// A tensor of parts (file ranges copied in the kernel, computed parts) lands byte for byte,
/// synced (computed parts partly written around the page cache) or not, and a failing part
/// is reported with the tensor's name.
#[test]
fn tensors_of_parts_are_written_part_by_part() {
    use peftkit_checkpoint::{Part, SourceFile};
    let dir = tempfile::tempdir().unwrap();
    // A source file of 3 MB + 5 bytes, so ranges start and end unaligned.
    let src: Vec<u8> = (0..(3 << 20) + 5).map(|i| (i * 7 % 251) as u8).collect();
    let path = dir.path().join("src.bin");
    fs::write(&path, &src).unwrap();
    let file = SourceFile::open(&path).unwrap();
    let range = |offset: usize, len: usize| Part::File {
        file: Arc::clone(&file),
        offset: offset as u64,
        len,
    };
    let computed = |len: usize, byte: u8| Part::Computed {
        len,
        produce: Arc::new(move || Ok(vec![byte; len])),
    };
    let parts = vec![
        range(3, 1 << 20),
        computed((2 << 20) + 1, 0xAB),
        range(5, (2 << 20) + 3),
        computed(7, 1),
    ];
    let mut expected = src[3..3 + (1 << 20)].to_vec();
    expected.extend(vec![0xAB; (2 << 20) + 1]);
    expected.extend(&src[5..5 + (2 << 20) + 3]);
    expected.extend([1; 7]);
    let t = Tensor::from_parts(Dtype::U8, vec![expected.len()], parts).unwrap();
    for durable in [true, false] {
        let out = dir.path().join(format!("out-{durable}"));
        let state = sd(vec![("a", f32s(&[1.0])), ("w", t.clone())]);
        save_pretrained(&out, &state, &SaveOptions::default().durable(durable)).unwrap();
        let ckpt = peftkit_checkpoint::Checkpoint::open(&out).unwrap();
        assert!(*ckpt.get("w").unwrap().bytes().unwrap() == expected[..]);
    }
    let failing = Part::Computed {
        len: 4,
        produce: Arc::new(|| Ok(vec![0; 3])),
    };
    let bad = Tensor::from_parts(Dtype::U8, vec![4], vec![failing]).unwrap();
    let e = save_pretrained(
        &dir.path().join("bad"),
        &sd(vec![("bad", bad)]),
        &SaveOptions::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("bad"), "{e}");
    assert!(Tensor::from_parts(Dtype::U8, vec![5], vec![computed(4, 0)]).is_err());
}
