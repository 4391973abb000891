//! Crash tests (issue 12): merge, reshard and remap of a few-hundred-MB checkpoint killed with
//! SIGKILL at random moments, many times. Afterwards the output folder is absent, the previous
//! output, or a complete one `verify` accepts; and the next run leaves no staging litter.
//!
//! CI runs a short round (a 192 MB checkpoint, 9 kills); `PEFTKIT_CRASH_ROUNDS=N` runs N kills
//! per verb and `PEFTKIT_CRASH_MB` sets the size, `PEFTKIT_CRASH_SEED` the random seed.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::reliability::staging_litter;
use crate::{files, header, peft_case, read};

/// A small deterministic generator (the test needs no statistical quality, only variety).
pub struct Lcg(u64);

impl Lcg {
    pub fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 17
    }
}

/// Writes a safetensors file of `tensors` (name, dtype, shape, bytes) in the given order.
pub fn write_safetensors(path: &Path, tensors: &[(String, &str, Vec<u64>, Vec<u8>)]) {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut at = 0u64;
    for (name, dtype, shape, bytes) in tensors {
        let end = at + bytes.len() as u64;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [at, end]}),
        );
        at = end;
    }
    let mut json = serde_json::to_vec(&header).unwrap();
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend(json);
    for (_, _, _, bytes) in tensors {
        out.extend(bytes);
    }
    std::fs::write(path, out).unwrap();
}

/// A sharded checkpoint in `dir`: the tiny llama of `lora_basic` (so its adapter merges) in
/// the first shard, then `fillers` shards of one random F32 tensor of `filler_bytes` each.
pub fn big_checkpoint(dir: &Path, fillers: usize, filler_bytes: usize) {
    let src = peft_case("lora_basic").join("base");
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let n = fillers + 1;
    let shard = |i: usize| format!("model-{:05}-of-{n:05}.safetensors", i + 1);
    let raw = read(&src.join("model.safetensors"));
    let data_start = 8 + u64::from_le_bytes(raw[..8].try_into().unwrap()) as usize;
    let small: Vec<_> = header(&src.join("model.safetensors"))
        .into_iter()
        .map(|t| {
            let bytes = raw[data_start + t.begin as usize..data_start + t.end as usize].to_vec();
            (t.name, "F32", t.shape, bytes)
        })
        .collect();
    let mut weight_map = serde_json::Map::new();
    let mut total = 0;
    for t in &small {
        weight_map.insert(t.0.clone(), shard(0).into());
        total += t.3.len();
    }
    write_safetensors(&dir.join(shard(0)), &small);
    let mut rng = Lcg(filler_bytes as u64 ^ fillers as u64);
    for i in 0..fillers {
        let name = format!("model.filler.{i}.weight");
        let rows = filler_bytes / 4096;
        // Random finite floats (exponent kept below all-ones).
        let bytes: Vec<u8> = (0..rows * 1024)
            .flat_map(|_| ((rng.next() as u32) & 0xBFFF_FFFF).to_le_bytes())
            .collect();
        total += bytes.len();
        weight_map.insert(name.clone(), shard(i + 1).into());
        write_safetensors(
            &dir.join(shard(i + 1)),
            &[(name, "F32", vec![rows as u64, 1024], bytes)],
        );
    }
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_vec_pretty(&index).unwrap(),
    )
    .unwrap();
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The command of one verb writing `out`.
fn verb(kind: usize, base: &Path, adapter: &Path, out: &Path) -> Command {
    let mut c = Command::new(assert_cmd::cargo::cargo_bin!("peftkit"));
    match kind {
        0 => c
            .args(["merge", "--base"])
            .arg(base)
            .arg("--adapter")
            .arg(adapter),
        1 => c
            .arg("reshard")
            .arg(base)
            .args(["--max-shard-size", "40MB"]),
        _ => c.arg("remap").arg(base).args(["--to", "transformers-v5"]),
    };
    c.arg("--out")
        .arg(out)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    c
}

/// `peftkit verify DIR` exits 0.
fn verifies(dir: &Path) -> bool {
    Command::new(assert_cmd::cargo::cargo_bin!("peftkit"))
        .arg("verify")
        .arg(dir)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap()
        .success()
}

#[test]
fn sigkill_at_random_moments_leaves_old_or_new_output_and_no_litter() {
    let mb = env_num("PEFTKIT_CRASH_MB", 192) as usize;
    let rounds = env_num("PEFTKIT_CRASH_ROUNDS", 3);
    let seed = env_num("PEFTKIT_CRASH_SEED", 0x5EED);
    eprintln!("crash test: {mb} MB, {rounds} kill(s) per verb, seed {seed}");
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    big_checkpoint(&base, 6, (mb << 20) / 6);
    let adapter = peft_case("lora_basic").join("adapter");
    let mut rng = Lcg(seed);
    for kind in 0..3 {
        let out = tmp.path().join(format!("out{kind}"));
        // A complete run first: its duration bounds the kill times, its files are the
        // "previous output" every later state is compared with.
        let start = Instant::now();
        assert!(verb(kind, &base, &adapter, &out)
            .status()
            .unwrap()
            .success());
        let full = start.elapsed();
        let complete = files(&out);
        for round in 0..rounds {
            let delay = Duration::from_micros(rng.next() % (full.as_micros() as u64).max(1));
            let mut child = verb(kind, &base, &adapter, &out).spawn().unwrap();
            std::thread::sleep(delay);
            let _ = child.kill();
            let _ = child.wait();
            let state = format!("verb {kind}, round {round}, killed after {delay:?}");
            // Old and new outputs are the same bytes here (same inputs): either way, the
            // folder holds exactly them, and verify accepts it.
            assert!(out.is_dir(), "{state}: the output disappeared");
            assert!(files(&out) == complete, "{state}: the output is a mix");
            assert!(verifies(&out), "{state}: verify refuses the output");
        }
        // A kill into a fresh output folder: afterwards no folder or a complete one.
        let fresh = tmp.path().join(format!("fresh{kind}"));
        let delay = Duration::from_micros(rng.next() % (full.as_micros() as u64).max(1));
        let mut child = verb(kind, &base, &adapter, &fresh).spawn().unwrap();
        std::thread::sleep(delay);
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            !fresh.exists() || files(&fresh) == complete,
            "verb {kind}: fresh output"
        );
    }
    // The next run of each verb removes whatever the killed runs left.
    for kind in 0..3 {
        let out = tmp.path().join(format!("out{kind}"));
        assert!(verb(kind, &base, &adapter, &out)
            .status()
            .unwrap()
            .success());
    }
    assert!(
        staging_litter(tmp.path()).is_empty(),
        "{:?}",
        staging_litter(tmp.path())
    );
}
