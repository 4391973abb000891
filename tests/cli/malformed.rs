//! The malformed-input suite (issue 12): every kind of broken or hostile input gets a specific
//! error, a non-zero exit, no panic, nothing written, and inputs byte-identical afterwards.
//! Checkpoint-level damage is also a finding of `verify` (exit 1).

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::reliability::{adapter_with, copy_tree, staging_litter};
use crate::{files, fixture, peft_case, peftkit, stderr_of};

/// The header JSON and data of a safetensors file.
fn split(path: &Path) -> (serde_json::Map<String, Value>, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    (header, bytes[8 + n..].to_vec())
}

/// Writes a header (raw bytes, padded to 8) and data.
fn join(path: &Path, mut header: Vec<u8>, data: &[u8]) {
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend(header);
    out.extend(data);
    std::fs::write(path, out).unwrap();
}

/// Sets `field` of `tensor`'s header entry, keeping the data.
pub fn set_header_field(path: &Path, tensor: &str, field: &str, value: Value) {
    let (mut h, data) = split(path);
    h[tensor][field] = value;
    join(path, serde_json::to_vec(&h).unwrap(), &data);
}

/// The names of a header's tensors, sorted by offset.
fn by_offset(path: &Path) -> Vec<String> {
    crate::header(path).into_iter().map(|t| t.name).collect()
}

type Damage = Box<dyn Fn(&Path)>;

/// What a case runs: a merge of the (damaged) `lora_basic` copy, or a reshard of a (damaged)
/// copy of the sharded `llama_tied_5KB` checkpoint.
#[derive(Clone, Copy)]
enum Run {
    Merge,
    Reshard,
}

struct Case {
    name: &'static str,
    run: Run,
    damage: Damage,
    /// Words the error must contain.
    needles: &'static [&'static str],
    /// `verify` of the damaged checkpoint finds it too.
    verify_finds: bool,
}

fn base_file(root: &Path) -> PathBuf {
    root.join("base/model.safetensors")
}

fn shard(root: &Path, i: usize) -> PathBuf {
    root.join(format!("ckpt/model-0000{i}-of-00006.safetensors"))
}

fn index(root: &Path) -> PathBuf {
    root.join("ckpt/model.safetensors.index.json")
}

fn edit_index(root: &Path, edit: impl Fn(&mut Value)) {
    let mut v: Value = serde_json::from_slice(&std::fs::read(index(root)).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(index(root), v.to_string()).unwrap();
}

fn edit_json(path: &Path, edit: impl Fn(&mut Value)) {
    let mut v: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
}

/// An adapter tensor of `lora_basic`.
const FIRST_KEY: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "truncated file",
            run: Run::Merge,
            damage: Box::new(|r| {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(base_file(r))
                    .unwrap();
                let len = f.metadata().unwrap().len();
                f.set_len(len - 5).unwrap();
            }),
            needles: &["model.safetensors", "truncated"],
            verify_finds: true,
        },
        Case {
            name: "header length past the end of the file",
            run: Run::Merge,
            damage: Box::new(|r| {
                let mut b = std::fs::read(base_file(r)).unwrap();
                let len = b.len() as u64;
                b[..8].copy_from_slice(&(len + 100).to_le_bytes());
                std::fs::write(base_file(r), b).unwrap();
            }),
            needles: &["header length", "runs past the end"],
            verify_finds: true,
        },
        Case {
            name: "header length over the limit",
            run: Run::Merge,
            damage: Box::new(|r| {
                let mut b = std::fs::read(base_file(r)).unwrap();
                b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
                std::fs::write(base_file(r), b).unwrap();
            }),
            needles: &["header length", "exceeds"],
            verify_finds: true,
        },
        Case {
            name: "invalid header JSON",
            run: Run::Merge,
            damage: Box::new(|r| {
                let (_, data) = split(&base_file(r));
                join(&base_file(r), b"{\"a\": [1, 2".to_vec(), &data);
            }),
            needles: &["not valid JSON"],
            verify_finds: true,
        },
        Case {
            name: "overlapping offsets",
            run: Run::Merge,
            damage: Box::new(|r| {
                let names = by_offset(&base_file(r));
                let (h, _) = split(&base_file(r));
                let prev = h[&names[0]]["data_offsets"].clone();
                set_header_field(&base_file(r), &names[1], "data_offsets", prev);
            }),
            needles: &["overlaps the previous tensor"],
            verify_finds: true,
        },
        Case {
            name: "holey offsets",
            run: Run::Merge,
            damage: Box::new(|r| {
                let names = by_offset(&base_file(r));
                let (h, _) = split(&base_file(r));
                let (b, e) = (
                    h[&names[1]]["data_offsets"][0].as_u64().unwrap(),
                    h[&names[1]]["data_offsets"][1].as_u64().unwrap(),
                );
                // Shift one tensor right by 4 bytes, leaving a hole, and shrink it back.
                set_header_field(&base_file(r), &names[1], "data_offsets", json!([b + 4, e]));
            }),
            needles: &["leaves a gap"],
            verify_finds: true,
        },
        Case {
            name: "dtype x shape disagrees with the byte size",
            run: Run::Merge,
            damage: Box::new(|r| {
                set_header_field(&base_file(r), "lm_head.weight", "dtype", json!("F16"));
            }),
            needles: &["lm_head.weight", "needs", "bytes"],
            verify_finds: true,
        },
        Case {
            name: "the same tensor in two shards",
            run: Run::Reshard,
            damage: Box::new(|r| {
                let names = by_offset(&shard(r, 1));
                let (mut h, data) = split(&shard(r, 2));
                let (h1, d1) = split(&shard(r, 1));
                // Append shard 1's first tensor to shard 2.
                let mut entry = h1[&names[0]].clone();
                let (b, e) = (
                    entry["data_offsets"][0].as_u64().unwrap() as usize,
                    entry["data_offsets"][1].as_u64().unwrap() as usize,
                );
                let at = data.len();
                entry["data_offsets"] = json!([at, at + e - b]);
                h.insert(names[0].clone(), entry);
                let mut data = data;
                data.extend(&d1[b..e]);
                join(&shard(r, 2), serde_json::to_vec(&h).unwrap(), &data);
            }),
            needles: &["also stored in another shard"],
            verify_finds: true,
        },
        Case {
            name: "an index entry whose file is missing",
            run: Run::Reshard,
            damage: Box::new(|r| std::fs::remove_file(shard(r, 3)).unwrap()),
            needles: &["model-00003-of-00006.safetensors"],
            verify_finds: true,
        },
        Case {
            name: "an index entry with ../",
            run: Run::Reshard,
            damage: Box::new(|r| {
                edit_index(r, |v| {
                    let k = v["weight_map"]
                        .as_object()
                        .unwrap()
                        .keys()
                        .next()
                        .unwrap()
                        .clone();
                    v["weight_map"][k] = json!("../base/model.safetensors");
                })
            }),
            needles: &["../base/model.safetensors", "not a plain file name"],
            verify_finds: true,
        },
        Case {
            name: "an index entry with an absolute path",
            run: Run::Reshard,
            damage: Box::new(|r| {
                let abs = base_file(r).display().to_string();
                edit_index(r, move |v| {
                    let k = v["weight_map"]
                        .as_object()
                        .unwrap()
                        .keys()
                        .next()
                        .unwrap()
                        .clone();
                    v["weight_map"][k] = json!(abs.clone());
                })
            }),
            needles: &["not a plain file name"],
            verify_finds: true,
        },
        Case {
            name: "an index entry that is a symlink leading outside",
            run: Run::Reshard,
            damage: Box::new(|r| {
                let link = shard(r, 4);
                std::fs::rename(&link, r.join("outside.safetensors")).unwrap();
                std::os::unix::fs::symlink(r.join("outside.safetensors"), &link).unwrap();
            }),
            needles: &["leads outside the checkpoint folder"],
            verify_finds: true,
        },
        Case {
            name: "config.json with a wrong type",
            run: Run::Merge,
            damage: Box::new(|r| {
                std::fs::write(r.join("base/config.json"), "[1, 2]").unwrap();
            }),
            needles: &["config.json"],
            verify_finds: true,
        },
        Case {
            name: "adapter_config.json with a wrong type",
            run: Run::Merge,
            damage: Box::new(|r| {
                edit_json(&r.join("adapter/adapter_config.json"), |v| {
                    v["r"] = json!("four")
                })
            }),
            needles: &["adapter_config.json", "`r`"],
            verify_finds: false,
        },
        Case {
            name: "a missing peft_type",
            run: Run::Merge,
            damage: Box::new(|r| {
                edit_json(&r.join("adapter/adapter_config.json"), |v| {
                    v.as_object_mut().unwrap().remove("peft_type");
                })
            }),
            needles: &["adapter_config.json", "peft_type"],
            verify_finds: false,
        },
        Case {
            name: "an unknown peft_type",
            run: Run::Merge,
            damage: Box::new(|r| {
                edit_json(&r.join("adapter/adapter_config.json"), |v| {
                    v["peft_type"] = json!("NOPE")
                })
            }),
            needles: &["adapter_config.json", "NOPE"],
            verify_finds: false,
        },
        Case {
            name: "an adapter that matches no base tensor",
            run: Run::Merge,
            damage: Box::new(|r| {
                let p = r.join("adapter/adapter_model.safetensors");
                let (h, data) = split(&p);
                let renamed: serde_json::Map<String, Value> = h
                    .into_iter()
                    .map(|(k, v)| (k.replace("q_proj", "zz_proj"), v))
                    .collect();
                join(&p, serde_json::to_vec(&renamed).unwrap(), &data);
            }),
            needles: &["zz_proj", "has no tensor"],
            verify_finds: false,
        },
        Case {
            name: "a shape mismatch",
            run: Run::Merge,
            damage: Box::new(move |r| {
                // lora_B of q_proj claims 8 output rows (the base has 16), same byte count.
                let p = r.join("adapter/adapter_model.safetensors");
                set_header_field(&p, FIRST_KEY, "shape", json!([8, 8]));
            }),
            needles: &[FIRST_KEY, "does not fit"],
            verify_finds: false,
        },
        Case {
            name: "non-finite values",
            run: Run::Merge,
            damage: Box::new(move |r| adapter_with(&r.join("adapter"), FIRST_KEY, f32::NAN)),
            needles: &[FIRST_KEY, "NaN or infinite"],
            verify_finds: false,
        },
    ]
}

/// A temporary folder with `base/` and `adapter/` (lora_basic) and `ckpt/` (a sharded llama).
fn inputs() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    copy_tree(
        &peft_case("lora_basic").join("base"),
        &tmp.path().join("base"),
    );
    copy_tree(
        &peft_case("lora_basic").join("adapter"),
        &tmp.path().join("adapter"),
    );
    copy_tree(
        &fixture("checkpoint/llama_tied_5KB/expected"),
        &tmp.path().join("ckpt"),
    );
    tmp
}

#[test]
fn every_malformed_input_gets_a_specific_error_and_changes_nothing() {
    for case in cases() {
        let tmp = inputs();
        let root = tmp.path();
        (case.damage)(root);
        let before = files(root);
        let out = root.join("out");
        let mut cmd = peftkit();
        match case.run {
            Run::Merge => cmd
                .args(["merge", "--base"])
                .arg(root.join("base"))
                .arg("--adapter")
                .arg(root.join("adapter")),
            Run::Reshard => cmd.arg("reshard").arg(root.join("ckpt")),
        };
        let run = cmd.arg("--out").arg(&out).assert().code(2);
        let err = stderr_of(&run);
        assert!(!err.contains("panicked"), "{}: {err}", case.name);
        for n in case.needles {
            assert!(err.contains(n), "{}: `{n}` not in: {err}", case.name);
        }
        assert!(!out.exists(), "{}: output written", case.name);
        assert!(staging_litter(root).is_empty(), "{}: litter", case.name);
        assert!(files(root) == before, "{}: an input changed", case.name);
        if case.verify_finds {
            let target = match case.run {
                Run::Merge => root.join("base"),
                Run::Reshard => root.join("ckpt"),
            };
            let run = peftkit().arg("verify").arg(&target).assert().code(1);
            assert!(
                !stderr_of(&run).contains("panicked"),
                "{}: verify panicked",
                case.name
            );
        }
        // Adapter damage: verify of the adapter folder finds config problems.
        if !case.verify_finds && case.needles[0] == "adapter_config.json" {
            peftkit()
                .arg("verify")
                .arg(root.join("adapter"))
                .assert()
                .code(1);
        }
    }
}

/// `--out` on an input, for every verb that writes (the overlap cases themselves are in
/// `failures::an_output_overlapping_an_input_is_refused_and_inputs_are_untouched`): here the
/// reshard and remap of a sharded checkpoint into a sub-folder of itself.
#[test]
fn an_output_on_an_input_writes_nothing() {
    let tmp = inputs();
    let ckpt = tmp.path().join("ckpt");
    let before = files(tmp.path());
    for args in [
        vec!["reshard", "--max-shard-size", "3KB"],
        vec!["remap", "--to", "transformers-v5"],
    ] {
        let run = peftkit()
            .arg(args[0])
            .arg(&ckpt)
            .args(&args[1..])
            .arg("--out")
            .arg(ckpt.join("sub"))
            .assert()
            .code(2);
        assert!(stderr_of(&run).contains("lies inside the input"));
        assert!(files(tmp.path()) == before);
    }
}
