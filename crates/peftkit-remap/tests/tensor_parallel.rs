//! `split` and `gather` on checkpoints transformers wrote: the round trip gives back every
//! file byte for byte, and each rank holds what transformers' tensor-parallel loading reads
//! for that rank (checked here on the tiny fixtures' shapes; `tests/interop/live_checks.py`
//! compares the slices with transformers' own slicing code).

mod common;

use std::path::{Path, PathBuf};

use common::{assert_same_dir, fixture_root};
use peftkit_checkpoint::Checkpoint;
use peftkit_remap::{gather, split, GatherOptions, RankManifest, SplitOptions, TpPlans};

/// Sources: a single-file, a sharded and a tied (no `lm_head` on disk) Llama, and Qwen2-MoE in
/// both layouts, each single-file and sharded.
fn sources() -> Vec<PathBuf> {
    let ckpt = fixture_root("checkpoint");
    let moe = fixture_root("reshard").join("qwen2_moe");
    vec![
        ckpt.join("llama_bf16_single/expected"),
        ckpt.join("llama_untied_3KB/expected"),
        ckpt.join("llama_tied_5KB/expected"),
        moe.join("source_original"),
        moe.join("source_original_sharded"),
        moe.join("source_v5"),
        moe.join("source_v5_sharded"),
    ]
}

fn options(world_size: usize) -> SplitOptions {
    SplitOptions {
        world_size,
        durable: false,
        ..Default::default()
    }
}

fn round_trip(src: &Path, world_size: usize) {
    let tmp = tempfile::tempdir().unwrap();
    let ranks = tmp.path().join("ranks");
    let report = split(src, &ranks, &options(world_size)).unwrap();
    assert_eq!(report.ranks.len(), world_size);
    assert!(report.sharded > 0, "{}: nothing sharded", src.display());
    for (r, dir) in report.ranks.iter().enumerate() {
        let ckpt = Checkpoint::open(dir).unwrap();
        let problems =
            peftkit_checkpoint::verify(dir, peftkit_checkpoint::WeightsKind::Model, None).unwrap();
        assert!(problems.is_empty(), "{}: {problems:?}", dir.display());
        assert_eq!(RankManifest::read(dir).unwrap().rank, r);
        assert_eq!(ckpt.total_bytes(), report.rank_bytes[r]);
    }
    // Ranks given in any order.
    let mut given = report.ranks.clone();
    given.reverse();
    let out = tmp.path().join("gathered");
    let options = GatherOptions {
        durable: false,
        ..Default::default()
    };
    gather(&given, &out, &options).unwrap();
    assert_same_dir(
        &format!("gather(split({}, {world_size}))", src.display()),
        &out,
        src,
    );
}

#[test]
fn gather_of_split_is_the_source_byte_for_byte() {
    for src in sources() {
        for n in [2, 3, 4] {
            round_trip(&src, n);
        }
    }
}

/// The slices of a few tensors, by hand from the fixtures' shapes and transformers' plan.
#[test]
fn ranks_hold_transformers_slices() {
    let tmp = tempfile::tempdir().unwrap();
    let moe = fixture_root("reshard").join("qwen2_moe");
    let full = Checkpoint::open(&moe.join("source_v5")).unwrap();
    let report = split(&moe.join("source_v5"), &tmp.path().join("v5"), &options(4)).unwrap();
    let rank1 = Checkpoint::open(&report.ranks[1]).unwrap();
    let rows = |c: &Checkpoint, name: &str| c.get(name).unwrap().shape().to_vec();
    // gate_up_proj [E, 2I, H] is packed_colwise: rank 1 holds its chunk of gate and of up.
    let gate_up = "model.layers.0.mlp.experts.gate_up_proj";
    let [e, two_i, h] = rows(&full, gate_up)[..] else {
        panic!()
    };
    let i = two_i / 2;
    let chunk = i.div_ceil(4);
    let held = |r: usize| (chunk * r).min(i)..(chunk * r + chunk).min(i);
    assert_eq!(rows(&rank1, gate_up), vec![e, 2 * held(1).len(), h]);
    let m = RankManifest::read(&report.ranks[1]).unwrap();
    let ranges = m.tensors[gate_up].ranges();
    let want: Vec<_> = [held(1), i + held(1).start..i + held(1).end]
        .into_iter()
        .filter(|r| !r.is_empty())
        .collect();
    assert_eq!(ranges, want);
    // Bytes: rank 1's gate_up rows are the full tensor's rows at those ranges.
    let full_bytes = full.get(gate_up).unwrap().bytes().unwrap().into_owned();
    let got = rank1.get(gate_up).unwrap().bytes().unwrap().into_owned();
    let row = h * 4;
    let mut expect = Vec::new();
    for x in 0..e {
        for r in &want {
            let start = (x * two_i + r.start) * row;
            expect.extend_from_slice(&full_bytes[start..start + r.len() * row]);
        }
    }
    assert_eq!(got, expect);
    // down_proj is rowwise (last dim); biases of colwise layers are sharded, norms replicated.
    let down = "model.layers.0.mlp.experts.down_proj";
    assert_eq!(rows(&rank1, down)[2], held(1).len());
    let q_bias = "model.layers.0.self_attn.q_proj.bias";
    assert_eq!(rows(&rank1, q_bias)[0], rows(&full, q_bias)[0].div_ceil(4));
    assert_eq!(
        rows(&rank1, "model.norm.weight"),
        rows(&full, "model.norm.weight")
    );
}

#[test]
fn a_per_expert_checkpoint_is_cut_like_its_fused_parameter() {
    let tmp = tempfile::tempdir().unwrap();
    let moe = fixture_root("reshard").join("qwen2_moe");
    let v5 = split(&moe.join("source_v5"), &tmp.path().join("v5"), &options(2)).unwrap();
    let orig = split(
        &moe.join("source_original"),
        &tmp.path().join("o"),
        &options(2),
    )
    .unwrap();
    for r in 0..2 {
        let fused = Checkpoint::open(&v5.ranks[r]).unwrap();
        let per_expert = Checkpoint::open(&orig.ranks[r]).unwrap();
        let gate_up = fused
            .get("model.layers.1.mlp.experts.gate_up_proj")
            .unwrap();
        let bytes = gate_up.bytes().unwrap();
        let [_, rows, h] = gate_up.shape()[..] else {
            panic!()
        };
        // Expert 3's slice: gate rows then up rows of the fused rank slice.
        let expert = &bytes[3 * rows * h * 4..4 * rows * h * 4];
        let gate = per_expert
            .get("model.layers.1.mlp.experts.3.gate_proj.weight")
            .unwrap();
        let up = per_expert
            .get("model.layers.1.mlp.experts.3.up_proj.weight")
            .unwrap();
        let joined = [
            gate.bytes().unwrap().into_owned(),
            up.bytes().unwrap().into_owned(),
        ]
        .concat();
        assert_eq!(expert, &joined[..], "rank {r}");
    }
}

#[test]
fn gather_refuses_an_incomplete_or_mixed_set_of_ranks() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixture_root("checkpoint").join("llama_bf16_single/expected");
    let two = split(&src, &tmp.path().join("two"), &options(2)).unwrap();
    let three = split(&src, &tmp.path().join("three"), &options(3)).unwrap();
    let out = tmp.path().join("out");
    let opts = GatherOptions::default();
    let err = gather(&two.ranks[..1], &out, &opts)
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing [1]"), "{err}");
    let mixed = vec![two.ranks[0].clone(), three.ranks[1].clone()];
    assert!(gather(&mixed, &out, &opts).is_err());
    let twice = vec![two.ranks[0].clone(), two.ranks[0].clone()];
    assert!(gather(&twice, &out, &opts).is_err());
    assert!(!out.exists(), "a refused gather writes nothing");
    // A split of a rank folder is refused too.
    let err = split(&two.ranks[0], &tmp.path().join("again"), &options(2)).unwrap_err();
    assert!(err.to_string().contains("rank folder"), "{err}");
}

#[test]
fn a_plan_file_replaces_the_model_types_plan() {
    let tmp = tempfile::tempdir().unwrap();
    let plan_path = tmp.path().join("plan.json");
    std::fs::write(&plan_path, r#"{"model.layers.*.mlp.down_proj": "rowwise"}"#).unwrap();
    let plans = TpPlans::builtin().unwrap();
    let plan = plans.plan_from_file(&plan_path).unwrap();
    let src = fixture_root("checkpoint").join("llama_bf16_single/expected");
    let report = split(
        &src,
        &tmp.path().join("r"),
        &SplitOptions {
            plan: Some(plan),
            ..options(2)
        },
    )
    .unwrap();
    assert_eq!(report.sharded, 2, "one down_proj per layer");
    std::fs::write(
        &plan_path,
        r#"{"model.layers.*.mlp.down_proj": "diagonal"}"#,
    )
    .unwrap();
    let err = plans.plan_from_file(&plan_path).unwrap_err().to_string();
    assert!(
        err.contains("diagonal") && err.contains("plan.json"),
        "{err}"
    );
}

/// A variant checkpoint (`model.fp16-…` shards and `model.safetensors.index.fp16.json`, or one
/// `model.fp16.safetensors`, as transformers' `save_pretrained(variant="fp16")` writes them):
/// split reads it only when told the variant, every rank keeps the variant's file names, and
/// gather finds them from the manifest alone and gives back the source byte for byte.
#[test]
fn a_variant_is_read_kept_in_every_rank_and_gathered_back() {
    let ckpt = fixture_root("checkpoint");
    for (case, files) in [
        ("llama_variant_fp16", "model.safetensors.index.fp16.json"),
        ("llama_variant_single", "model.fp16.safetensors"),
    ] {
        let src = ckpt.join(case).join("expected");
        let tmp = tempfile::tempdir().unwrap();
        // Without the variant there is no checkpoint to read, and the error says what to pass.
        let err = split(&src, &tmp.path().join("plain"), &options(2))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--variant fp16"), "{case}: {err}");
        assert!(!tmp.path().join("plain").exists());
        let variant = || SplitOptions {
            variant: Some("fp16".into()),
            ..options(2)
        };
        let report = split(&src, &tmp.path().join("ranks"), &variant()).unwrap();
        for (r, dir) in report.ranks.iter().enumerate() {
            assert!(dir.join(files).is_file(), "{case} rank {r}");
            assert!(!dir.join("model.safetensors").exists());
            let manifest = RankManifest::read(dir).unwrap();
            assert_eq!(manifest.variant.as_deref(), Some("fp16"));
            let (_, opened) = peftkit_remap::open_rank(dir).unwrap();
            assert_eq!(opened.total_bytes(), report.rank_bytes[r]);
            let problems = peftkit_checkpoint::verify(
                dir,
                peftkit_checkpoint::WeightsKind::Model,
                Some("fp16"),
            )
            .unwrap();
            assert!(problems.is_empty(), "{}: {problems:?}", dir.display());
        }
        assert!(report.sharded > 0);
        let out = tmp.path().join("gathered");
        let opts = GatherOptions {
            durable: false,
            ..Default::default()
        };
        gather(&report.ranks, &out, &opts).unwrap();
        assert_same_dir(&format!("gather(split({case}))"), &out, &src);
        // Ranks of a variant split and of a plain one are not one split.
        let plain_src = ckpt.join("llama_tied_5KB/expected");
        let plain = split(&plain_src, &tmp.path().join("p"), &options(2)).unwrap();
        let mixed = vec![report.ranks[0].clone(), plain.ranks[1].clone()];
        assert!(gather(&mixed, &tmp.path().join("mixed"), &opts).is_err());
    }
}

/// A manifest without a variant is written without the key, so plain splits are unchanged.
#[test]
fn a_plain_manifest_has_no_variant_key() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixture_root("checkpoint").join("llama_bf16_single/expected");
    let report = split(&src, &tmp.path().join("r"), &options(2)).unwrap();
    let text = std::fs::read_to_string(report.ranks[0].join(peftkit_remap::MANIFEST_NAME)).unwrap();
    assert!(!text.contains("variant"), "{text}");
}
