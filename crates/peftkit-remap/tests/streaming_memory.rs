//! A remap's memory does not grow with its tensors: fused expert tensors are written from
//! their experts' file ranges, never built in memory. Measured as the process's peak resident
//! set (Linux: `VmHWM`, reset through `/proc/self/clear_refs`), not with time.
#![cfg(target_os = "linux")]

use peftkit_checkpoint::{save_pretrained, Checkpoint, Dtype, SaveOptions, StateDict, Tensor};
use peftkit_remap::{remap, RemapOptions, TensorLayout};

/// A field of `/proc/self/status`, in bytes.
fn status_bytes(field: &str) -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    let kib: usize = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib << 10
}

/// How far the resident set rose above its level before `f`, at its peak during `f`.
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    // "5" resets the peak (VmHWM) to the current resident set.
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let before = status_bytes("VmRSS:");
    let out = f();
    (out, status_bytes("VmHWM:").saturating_sub(before))
}

/// A Mixtral layer with `experts` experts whose w1/w3/w2 are `[rows, cols]` bf16, saved by
/// peftkit in the original layout, with distinct bytes in every expert.
fn mixtral(dir: &std::path::Path, experts: usize, rows: usize, cols: usize) {
    let mut sd = StateDict::new();
    let mut seed = 1u8;
    for e in 0..experts {
        for w in ["w1", "w2", "w3"] {
            let shape = if w == "w2" {
                [cols, rows]
            } else {
                [rows, cols]
            };
            let s = seed;
            let bytes = move || (0..rows * cols * 2).map(|i| (i as u8) ^ s).collect();
            seed = seed.wrapping_add(37);
            let name = format!("model.layers.0.block_sparse_moe.experts.{e}.{w}.weight");
            // Computed when written, so the test itself holds no model in memory.
            let t = Tensor::lazy(Dtype::BF16, shape.to_vec(), move || Ok(bytes()));
            sd.insert(name, t.unwrap());
        }
    }
    let config = br#"{"model_type": "mixtral", "num_local_experts": 4}"#.to_vec();
    let options = SaveOptions::default()
        .extra_files(vec![("config.json".into(), config)])
        .durable(false);
    save_pretrained(dir, &sd, &options).unwrap();
}

#[test]
fn a_fused_remap_takes_memory_independent_of_its_tensors() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("original");
    // Four experts of 8 MiB per weight: gate_up_proj is 64 MiB, down_proj 32 MiB.
    let (experts, rows, cols) = (4, 1024, 4096);
    mixtral(&src, experts, rows, cols);
    let fused = experts * 2 * rows * cols * 2;
    let opts = RemapOptions::default().save(SaveOptions::default().durable(false));
    let v5 = tmp.path().join("v5");
    let (report, peak) =
        peak_of(|| remap(&src, &v5, TensorLayout::TransformersV5, None, &opts).unwrap());
    assert_eq!(report.tensors_converted, 2);
    assert!(
        peak < fused / 4,
        "remap to v5 allocated {peak} bytes at its peak for a {fused}-byte fused tensor"
    );
    // And back: each expert is a range of a fused tensor.
    let back = tmp.path().join("back");
    let (_, peak) = peak_of(|| remap(&v5, &back, TensorLayout::Original, None, &opts).unwrap());
    assert!(peak < fused / 4, "remap to original allocated {peak} bytes");
    // The bytes: the round trip gives the original tensors, and gate_up_proj[e] is w1 then w3.
    let (orig, v5) = (
        Checkpoint::open(&src).unwrap(),
        Checkpoint::open(&v5).unwrap(),
    );
    let back = Checkpoint::open(&back).unwrap();
    let gate_up = v5
        .get("model.layers.0.mlp.experts.gate_up_proj")
        .unwrap()
        .bytes()
        .unwrap()
        .into_owned();
    let expert = rows * cols * 2;
    for e in 0..experts {
        for (w, at) in [("w1", 2 * e * expert), ("w3", (2 * e + 1) * expert)] {
            let name = format!("model.layers.0.block_sparse_moe.experts.{e}.{w}.weight");
            let want = orig.get(&name).unwrap().bytes().unwrap();
            assert!(gate_up[at..at + expert] == *want, "{name} in gate_up_proj");
            assert!(
                *back.get(&name).unwrap().bytes().unwrap() == *want,
                "{name}"
            );
        }
    }
}
