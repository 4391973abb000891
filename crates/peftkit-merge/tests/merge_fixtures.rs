//! Merges compared bit for bit with peft 0.21.2's `merge_and_unload()` + transformers'
//! `save_pretrained` (tests/fixtures/peft/<case>/merged, made by the real libraries).

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;

use common::peft_case as case_dir;
use peftkit_checkpoint::dtype_name;
use peftkit_checkpoint::Checkpoint;
use peftkit_merge::{merge, AdapterInput, MergeError, MergeJob, MergeMathError};

fn job(case: &str, out: &Path) -> MergeJob {
    let dir = case_dir(case);
    let mut adapters = vec![AdapterInput {
        dir: dir.join("adapter"),
        weight: 1.0,
    }];
    for sub in fs::read_dir(dir.join("adapter")).unwrap() {
        let p = sub.unwrap().path();
        if p.join("adapter_config.json").is_file() {
            adapters.push(AdapterInput {
                dir: p,
                weight: 1.0,
            });
        }
    }
    MergeJob::new(dir.join("base"), adapters, out)
}

fn names(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// Compares every tensor and reports the number of differing elements per tensor, then the
/// whole files byte for byte.
fn assert_same_merge(case: &str, expected: &Path, actual: &Path) {
    assert_eq!(names(expected), names(actual), "{case}: files");
    let (e, a) = (
        Checkpoint::open(expected).unwrap(),
        Checkpoint::open(actual).unwrap(),
    );
    let mut bad = Vec::new();
    for (name, et) in e.tensors() {
        let at = a
            .get(name)
            .unwrap_or_else(|| panic!("{case}: {name} missing"));
        assert_eq!(
            (dtype_name(et.dtype()), et.shape()),
            (dtype_name(at.dtype()), at.shape()),
            "{case}: {name}"
        );
        let (eb, ab) = (et.bytes().unwrap(), at.bytes().unwrap());
        if eb != ab {
            let w = (et.dtype().bitsize() / 8).max(1);
            let diff = eb
                .chunks(w)
                .zip(ab.chunks(w))
                .filter(|(x, y)| x != y)
                .count();
            bad.push(format!("{name}: {diff}/{} elements differ", eb.len() / w));
        }
    }
    assert!(bad.is_empty(), "{case}: {bad:#?}");
    for f in names(expected) {
        assert!(
            fs::read(expected.join(&f)).unwrap() == fs::read(actual.join(&f)).unwrap(),
            "{case}: {f} differs"
        );
    }
}

const EXACT: &[&str] = &[
    "lora_basic",
    "lora_bf16",
    "lora_f16",
    "rslora",
    "embedding_lora",
    "gpt2_conv1d",
    "modules_to_save",
    "patterns",
    "two_adapters",
    "lora_bias",
    "trainable_tokens",
    "lora_many_targets",
    "dora",
    "dora_bf16",
    "mixtral_experts",
];

/// Both ways merged tensors reach the file: synced saves write the merged bytes (directly
/// where the file system allows), unsynced ones on ext4 or tmpfs merge them in the output
/// file where the kernel copied the base (`InPlaceEdit::apply_in_file`).
#[test]
fn merges_are_bit_identical_to_peft() {
    for (case, durable) in EXACT.iter().flat_map(|c| [(c, true), (c, false)]) {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("merged");
        let mut j = job(case, &out);
        j.durable = durable;
        let summary = merge(&j).unwrap_or_else(|e| panic!("{case}: {e}"));
        assert!(
            summary.tensors_merged + summary.tensors_replaced > 0,
            "{case}: nothing merged"
        );
        assert_same_merge(case, &case_dir(case).join("merged"), &out);
    }
}

/// Several adapters on the same weights, streamed through all of them block by block (one
/// pass), synced and not; the bytes are the same. (A synced save whose output does not fit in
/// free memory applies them to the whole tensor in turn instead: `tests/cli/verbs.rs` holds
/// that path to peft.) The adapter is merged twice, the second time with weight -0.5.
#[test]
fn several_adapters_stream_as_they_merge_in_memory() {
    for case in ["lora_bf16", "lora_basic", "lora_f16"] {
        let tmp = tempfile::tempdir().unwrap();
        let adapter = case_dir(case).join("adapter");
        let adapters = vec![
            AdapterInput {
                dir: adapter.clone(),
                weight: 1.0,
            },
            AdapterInput {
                dir: adapter,
                weight: -0.5,
            },
        ];
        let mut outs = Vec::new();
        for durable in [false, true] {
            let out = tmp.path().join(format!("merged-{durable}"));
            let mut j = MergeJob::new(case_dir(case).join("base"), adapters.clone(), &out);
            j.durable = durable;
            let summary = merge(&j).unwrap_or_else(|e| panic!("{case}: {e}"));
            assert!(summary.tensors_merged > 0, "{case}");
            outs.push(out);
        }
        assert_same_merge(case, &outs[1], &outs[0]);
    }
}

/// The conv2d fixture is deliberately tiny (6x4x3x3, r=4): for such sizes oneDNN and MKL
/// switch to kernels whose summation order is not the sequential FMA peft uses on realistic
/// shapes (realistic convs are exact, see tests/fixtures/numerics). The merged weights agree
/// to f32 rounding of the delta: |ours - peft| <= 2^-22 * max|W|.
#[test]
fn tiny_conv_agrees_to_rounding() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    merge(&job("conv2d", &out)).unwrap();
    let (e, a) = (
        Checkpoint::open(&case_dir("conv2d").join("merged")).unwrap(),
        Checkpoint::open(&out).unwrap(),
    );
    for (name, et) in e.tensors() {
        let f = |b: &[u8]| {
            b.chunks(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect::<Vec<_>>()
        };
        let (x, y) = (
            f(&et.bytes().unwrap()),
            f(&a.get(name).unwrap().bytes().unwrap()),
        );
        let scale = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = x
            .iter()
            .zip(&y)
            .fold(0f32, |m, (p, q)| m.max((p - q).abs()));
        assert!(
            worst <= scale * 2f32.powi(-22),
            "{name}: worst {worst}, max|W| {scale}"
        );
    }
}

#[test]
fn resharded_merge_keeps_every_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let mut j = job("lora_basic", &out);
    j.max_shard_size = Some(5_000);
    merge(&j).unwrap();
    assert!(out.join("model.safetensors.index.json").is_file());
    let (e, a) = (
        Checkpoint::open(&case_dir("lora_basic").join("merged")).unwrap(),
        Checkpoint::open(&out).unwrap(),
    );
    assert_eq!(e.len(), a.len());
    for (name, et) in e.tensors() {
        assert_eq!(
            et.bytes().unwrap(),
            a.get(name).unwrap().bytes().unwrap(),
            "{name}"
        );
    }
}

/// A resharded merge of an original-layout MoE base is planned as transformers plans the save
/// of the merged model: on the fused v5 experts it holds, written back per expert. The
/// reference is `from_pretrained(merged).save_pretrained(out, max_shard_size=…)` of peft's
/// merge (tests/fixtures/reshard/mixtral_merged), every file byte for byte.
#[test]
fn resharded_moe_merge_is_planned_on_the_fused_model() {
    let dir = case_dir("mixtral_experts").join("../../reshard/mixtral_merged");
    let case: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("case.json")).unwrap()).unwrap();
    let mut checked = 0;
    for (folder, expected) in case["expected"].as_object().unwrap() {
        let size = match &expected["max_shard_size"] {
            serde_json::Value::String(s) => peftkit_checkpoint::parse_size(s).unwrap(),
            v => v.as_u64().unwrap(),
        };
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("merged");
        let mut j = job("mixtral_experts", &out);
        j.max_shard_size = Some(size);
        j.durable = false;
        merge(&j).unwrap();
        assert_same_merge(folder, &dir.join(folder), &out);
        checked += 1;
    }
    assert_eq!(checked, 3);
}

#[test]
fn prompt_tuning_is_refused_and_nothing_written() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let err = merge(&job("prompt_tuning", &out)).unwrap_err();
    assert!(matches!(err, MergeError::Unsupported { .. }), "{err}");
    assert!(!out.exists());
}

#[test]
fn adapter_for_another_model_is_refused_naming_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let mut j = job("gpt2_conv1d", &out);
    j.base = case_dir("lora_basic").join("base");
    let err = merge(&j).unwrap_err().to_string();
    assert!(
        err.contains("transformer.h.0.attn.c_attn") && err.contains("has no tensor"),
        "{err}"
    );
    assert!(!out.exists());
}

/// Unmerging the adapter from peft's merged checkpoint gives back the f32 base up to the
/// rounding of one add and one subtract.
#[test]
fn unmerge_recovers_the_base() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("base_again");
    let mut j = job("lora_basic", &out);
    j.base = case_dir("lora_basic").join("merged");
    j.unmerge = true;
    let summary = merge(&j).unwrap();
    assert_eq!(summary.tensors_merged, 4);
    let (orig, back) = (
        Checkpoint::open(&case_dir("lora_basic").join("base")).unwrap(),
        Checkpoint::open(&out).unwrap(),
    );
    for (name, t) in orig.tensors() {
        let f = |b: &[u8]| {
            b.chunks(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect::<Vec<_>>()
        };
        let (x, y) = (
            f(&t.bytes().unwrap()),
            f(&back.get(name).unwrap().bytes().unwrap()),
        );
        // Two roundings of values near max|W|: a few ulp of the largest magnitude.
        let scale = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (p, q) in x.iter().zip(&y) {
            assert!(
                (p - q).abs() <= 4.0 * f32::EPSILON * scale,
                "{name}: {p} vs {q}"
            );
        }
    }
}

#[test]
fn unmerge_of_replacing_adapter_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut j = job("modules_to_save", &tmp.path().join("x"));
    j.unmerge = true;
    assert!(matches!(merge(&j), Err(MergeError::Unsupported { .. })));
}

#[test]
fn safe_merge_rejects_non_finite_results_and_writes_nothing() {
    use peftkit_checkpoint::{save_pretrained, Dtype, SaveOptions, Tensor};
    // An adapter whose B holds an infinity: the merged q_proj would be non-finite.
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad_adapter");
    let src = case_dir("lora_basic").join("adapter");
    let ck = Checkpoint::open_kind(&src, peftkit_checkpoint::WeightsKind::Adapter, None).unwrap();
    let mut sd = ck.state_dict();
    let key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";
    let t = sd[key].clone();
    let mut bytes = t.bytes().unwrap().into_owned();
    bytes[..4].copy_from_slice(&f32::INFINITY.to_le_bytes());
    sd.insert(
        key.into(),
        Tensor::from_bytes(Dtype::F32, t.shape().to_vec(), bytes).unwrap(),
    );
    let opts = SaveOptions {
        kind: peftkit_checkpoint::WeightsKind::Adapter,
        extra_files: vec![(
            "adapter_config.json".into(),
            fs::read(src.join("adapter_config.json")).unwrap(),
        )],
        ..Default::default()
    };
    save_pretrained(&bad, &sd, &opts).unwrap();
    // Row 0 of B holds the infinity: the whole first row of q_proj is non-finite.
    let cols = ck.state_dict()["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
        .shape()[1];
    // Streamed (synced through the page cache, or not) and in memory (`allow_nonfinite` off:
    // the adapter is refused first, by name).
    for (durable, allow) in [(true, true), (false, true), (false, false)] {
        let out = tmp.path().join(format!("merged-{durable}-{allow}"));
        let mut j = job("lora_basic", &out);
        j.adapters = vec![AdapterInput {
            dir: bad.clone(),
            weight: 1.0,
        }];
        j.safe_merge = true;
        j.durable = durable;
        j.allow_nonfinite = allow;
        let err = merge(&j).unwrap_err();
        let source = std::error::Error::source(&err).map(|s| s.to_string());
        let text = format!("{err} / {source:?}");
        assert!(text.contains("q_proj"), "{text}");
        if allow {
            // peft's own check (in the kernel), which counts the whole tensor.
            let kernel = MergeMathError::NonFinite {
                what: "linear weight",
                count: cols,
                first: 0,
            };
            assert!(text.contains(&kernel.to_string()), "{text}");
        }
        assert!(!out.exists());
    }
}

#[test]
fn shape_mismatch_is_refused_naming_the_key() {
    // A copy of the base whose v_proj has another shape than the one the adapter was trained on.
    use peftkit_checkpoint::{save_pretrained, SaveOptions, StateDict};
    let tmp = tempfile::tempdir().unwrap();
    let base = Checkpoint::open(&case_dir("lora_basic").join("base")).unwrap();
    let mut sd = StateDict::new();
    for (k, t) in base.tensors() {
        sd.insert(k.to_owned(), t.clone());
    }
    // Pretend v_proj is q_proj-sized by swapping in the up_proj tensor (32x16 instead of 8x16).
    let up = &sd["model.layers.0.mlp.up_proj.weight"];
    let up = peftkit_checkpoint::Tensor::from_bytes(
        up.dtype(),
        up.shape().to_vec(),
        up.bytes().unwrap().into_owned(),
    )
    .unwrap();
    sd.insert("model.layers.0.self_attn.v_proj.weight".into(), up);
    let fake = tmp.path().join("base");
    save_pretrained(&fake, &sd, &SaveOptions::default()).unwrap();
    let out = tmp.path().join("merged");
    let mut j = job("lora_basic", &out);
    j.base = fake;
    let err = merge(&j).unwrap_err();
    assert!(matches!(err, MergeError::Shape { .. }), "{err}");
    assert!(
        err.to_string().contains("model.layers.0.self_attn.v_proj"),
        "{err}"
    );
    assert!(!out.exists());
}

#[test]
fn unsupported_variants_are_refused() {
    for (field, value) in [
        ("layer_replication", serde_json::json!([[0, 2]])),
        ("use_bdlora", serde_json::json!({"block_size": 2})),
        ("alora_invocation_tokens", serde_json::json!([1, 2])),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let adapter = tmp.path().join("adapter");
        fs::create_dir(&adapter).unwrap();
        let src = case_dir("lora_basic").join("adapter");
        fs::copy(
            src.join("adapter_model.safetensors"),
            adapter.join("adapter_model.safetensors"),
        )
        .unwrap();
        let mut cfg: serde_json::Value =
            serde_json::from_slice(&fs::read(src.join("adapter_config.json")).unwrap()).unwrap();
        cfg[field] = value;
        fs::write(adapter.join("adapter_config.json"), cfg.to_string()).unwrap();
        let out = tmp.path().join("merged");
        let mut j = job("lora_basic", &out);
        j.adapters = vec![AdapterInput {
            dir: adapter,
            weight: 1.0,
        }];
        let err = merge(&j).unwrap_err();
        assert!(
            matches!(err, MergeError::Unsupported { .. } | MergeError::Adapter(_)),
            "{field}: {err}"
        );
        assert!(!out.exists(), "{field}");
    }
}

#[test]
fn adapter_weight_scales_the_delta() {
    let tmp = tempfile::tempdir().unwrap();
    // Weight 0 adds exactly zero: the output is the base, bit for bit.
    let out = tmp.path().join("zero");
    let mut j = job("lora_bf16", &out);
    j.adapters[0].weight = 0.0;
    merge(&j).unwrap();
    let base = case_dir("lora_bf16").join("base");
    assert_eq!(
        fs::read(base.join("model.safetensors")).unwrap(),
        fs::read(out.join("model.safetensors")).unwrap()
    );
    // "DIR:1" is the plain merge.
    let parsed = AdapterInput::parse(&format!(
        "{}:1",
        case_dir("lora_bf16").join("adapter").display()
    ));
    assert_eq!(parsed.weight, 1.0);
    let out = tmp.path().join("one");
    let mut j = job("lora_bf16", &out);
    j.adapters = vec![parsed];
    merge(&j).unwrap();
    let merged = case_dir("lora_bf16").join("merged");
    assert_eq!(
        fs::read(merged.join("model.safetensors")).unwrap(),
        fs::read(out.join("model.safetensors")).unwrap()
    );
}

/// The same expert LoRA merged into a checkpoint kept in the fused v5 layout, then converted
/// back to the on-disk layout, equals peft's merge.
#[test]
fn expert_lora_on_a_fused_v5_checkpoint() {
    use peftkit_remap::{remap, RemapOptions, TensorLayout};
    let tmp = tempfile::tempdir().unwrap();
    let v5 = tmp.path().join("base_v5");
    remap(
        &case_dir("mixtral_experts").join("base"),
        &v5,
        TensorLayout::TransformersV5,
        None,
        &RemapOptions::default(),
    )
    .unwrap();
    let merged_v5 = tmp.path().join("merged_v5");
    let mut j = job("mixtral_experts", &merged_v5);
    j.base = v5;
    let summary = merge(&j).unwrap();
    assert!(summary.tensors_merged >= 4, "{summary:?}");
    let back = tmp.path().join("merged");
    remap(
        &merged_v5,
        &back,
        TensorLayout::Original,
        None,
        &RemapOptions::default(),
    )
    .unwrap();
    let (e, a) = (
        Checkpoint::open(&case_dir("mixtral_experts").join("merged")).unwrap(),
        Checkpoint::open(&back).unwrap(),
    );
    assert_eq!(e.len(), a.len());
    for (name, et) in e.tensors() {
        assert_eq!(
            et.bytes().unwrap(),
            a.get(name)
                .unwrap_or_else(|| panic!("{name}"))
                .bytes()
                .unwrap(),
            "{name}"
        );
    }
}
