//! The kept-FP8 merge by each of the writer's paths gives the fixture's files
//! (`tests/fixtures/quant/*/merged_fp8`, made with transformers' `Fp8Quantize` and peft):
//! unsynced, each re-quantized weight is edited where the writer copied it in the output file;
//! synced, in memory and written around the page cache. `quant_fixtures.rs` covers the
//! unsynced path with the report; this one the synced path, and that a weight whose scale lies
//! in another shard than the weight (its scale is then computed first) comes out the same.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use peftkit_merge::{merge, set_reduction_order, AdapterInput, HostOrder, MergeJob};
use serde_json::Value;

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
    set_reduction_order(Some(made_on.order));
}

/// Every file of `expected` is in `actual` with the same bytes.
fn assert_same_files(case: &str, expected: &Path, actual: &Path) {
    for entry in fs::read_dir(expected).unwrap() {
        let name = entry.unwrap().file_name();
        let (e, a) = (expected.join(&name), actual.join(&name));
        assert!(
            fs::read(&e).unwrap() == fs::read(&a).unwrap(),
            "{case}: {name:?} differs"
        );
    }
}

#[test]
fn a_synced_kept_merge_writes_the_fixture() {
    use_fixture_host_order();
    for case in ["fp8_llama", "fp8_llama_ue8m0", "fp8_qwen3_moe"] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("merged");
        let dir = case_dir(case);
        let adapter = AdapterInput::parse(dir.join("adapter").to_str().unwrap());
        let job = MergeJob::new(dir.join("base"), vec![adapter], &out).durable(true);
        merge(&job).unwrap_or_else(|e| panic!("{case}: {e}"));
        assert_same_files(case, &dir.join("merged_fp8"), &out);
    }
}

/// The fixture's base resharded so that the scales, which come first in the state dict, fill
/// the first shards and the weights the later ones.
fn scales_apart(case: &str, dir: &Path) -> PathBuf {
    use peftkit_checkpoint::{save_pretrained, Checkpoint, SaveOptions, StateDict};
    let base = case_dir(case).join("base");
    let ckpt = Checkpoint::open(&base).unwrap();
    let state: StateDict = ckpt
        .tensors()
        .map(|(n, t)| (n.to_owned(), t.clone()))
        .collect();
    let out = dir.join("base");
    save_pretrained(
        &out,
        &state,
        &SaveOptions::default().max_shard_size(4096u64),
    )
    .unwrap();
    for f in ["config.json", "generation_config.json"] {
        fs::copy(base.join(f), out.join(f)).unwrap();
    }
    out
}

#[test]
fn scales_written_before_their_weights_give_the_same_tensors() {
    use peftkit_checkpoint::Checkpoint;
    use_fixture_host_order();
    let case = "fp8_llama";
    let tmp = tempfile::tempdir().unwrap();
    let base = scales_apart(case, tmp.path());
    let index: Value =
        serde_json::from_slice(&fs::read(base.join("model.safetensors.index.json")).unwrap())
            .unwrap();
    let map = index["weight_map"].as_object().unwrap();
    let apart = map.iter().any(|(name, file)| {
        let weight = name.replace(".weight_scale_inv", ".weight");
        name.ends_with("_scale_inv") && map[&weight] != *file
    });
    assert!(apart, "some scale is in another shard than its weight");
    for durable in [false, true] {
        let out = tmp.path().join(format!("merged-{durable}"));
        let adapter = AdapterInput::parse(case_dir(case).join("adapter").to_str().unwrap());
        let job = MergeJob::new(&base, vec![adapter], &out).durable(durable);
        merge(&job).unwrap();
        let (want, got) = (
            Checkpoint::open(&case_dir(case).join("merged_fp8")).unwrap(),
            Checkpoint::open(&out).unwrap(),
        );
        assert_eq!(want.len(), got.len());
        for (name, t) in want.tensors() {
            let g = got.get(name).unwrap();
            assert!(t.bytes().unwrap() == g.bytes().unwrap(), "{name} differs");
        }
    }
}
