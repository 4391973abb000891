//! A rank-aware save by several processes on one machine gives the files a single-process
//! save gives, byte for byte. The test binary runs itself once per rank (the ignored
//! `rank_process` test, told its rank by environment variables), with a barrier made of files.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use peftkit_checkpoint::{
    save_pretrained, save_pretrained_distributed, Barrier, Checkpoint, ModelConfig, Rank,
    SaveOptions, StateDict,
};

const RANK: &str = "PEFTKIT_TEST_RANK";
const WORLD: &str = "PEFTKIT_TEST_WORLD";
const OUT: &str = "PEFTKIT_TEST_OUT";
const BARRIER: &str = "PEFTKIT_TEST_BARRIER";

/// A barrier of marker files: each rank creates `<step>.<rank>` and waits for every rank's.
struct FileBarrier {
    dir: PathBuf,
    rank: Rank,
}

impl Barrier for FileBarrier {
    fn wait(&self, step: &str) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        std::fs::write(self.dir.join(format!("{step}.{}", self.rank.rank)), b"")?;
        let deadline = Instant::now() + Duration::from_secs(120);
        while !(0..self.rank.world_size).all(|r| self.dir.join(format!("{step}.{r}")).exists()) {
            if Instant::now() > deadline {
                return Err(format!("timed out waiting for every rank at `{step}`").into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }
}

fn source() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/checkpoint/llama_untied_3KB/expected")
}

/// What every rank saves: the fixture's tensors (read lazily from its files), its config, and
/// shards small enough that every rank owns several.
fn job() -> (StateDict, SaveOptions) {
    let src = source();
    let state = Checkpoint::open(&src).unwrap().natural_state_dict();
    let options = SaveOptions {
        max_shard_size: 2000,
        config: Some(ModelConfig::read(&src.join("config.json")).unwrap()),
        durable: false,
        ..Default::default()
    };
    (state, options)
}

/// One rank's part, when run by `ranks_in_separate_processes_write_what_one_process_writes`.
#[test]
#[ignore = "run once per rank by the multi-process test"]
fn rank_process() {
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} is not set"));
    let rank = Rank {
        rank: var(RANK).parse().unwrap(),
        world_size: var(WORLD).parse().unwrap(),
    };
    let out = PathBuf::from(var(OUT));
    let barrier = FileBarrier {
        dir: PathBuf::from(var(BARRIER)),
        rank,
    };
    let (state, options) = job();
    let report = save_pretrained_distributed(&out, &state, &options, rank, &barrier).unwrap();
    // Tell the parent which files this rank wrote.
    let list = barrier.dir.join(format!("wrote.{}", rank.rank));
    std::fs::write(list, report.weight_files.join("\n")).unwrap();
}

#[test]
fn ranks_in_separate_processes_write_what_one_process_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let world = 3;
    let out = tmp.path().join("distributed");
    let barrier = tmp.path().join("barrier");
    std::fs::create_dir(&barrier).unwrap();
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..world)
        .map(|r| {
            Command::new(&exe)
                .args(["rank_process", "--exact", "--ignored", "--quiet"])
                .env(RANK, r.to_string())
                .env(WORLD, world.to_string())
                .env(OUT, &out)
                .env(BARRIER, &barrier)
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for (r, mut child) in children.into_iter().enumerate() {
        assert!(child.wait().unwrap().success(), "rank {r} failed");
    }
    let single = tmp.path().join("single");
    let (state, options) = job();
    let report = save_pretrained(&single, &state, &options).unwrap();
    assert!(
        report.weight_files.len() >= 2 * world,
        "every rank owns several shards"
    );

    // The same files, byte for byte, and no staging folder left behind.
    let files = |d: &Path| -> Vec<(String, Vec<u8>)> {
        let mut v: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    };
    assert_eq!(files(&out), files(&single));
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(left.iter().all(|n| !n.contains("staging")), "{left:?}");

    // Each rank wrote its own shards, together all of them.
    let mut wrote: Vec<String> = Vec::new();
    for r in 0..world {
        let text = std::fs::read_to_string(barrier.join(format!("wrote.{r}"))).unwrap();
        let mine: Vec<String> = text.lines().map(str::to_owned).collect();
        let expect: Vec<String> = report
            .weight_files
            .iter()
            .skip(r)
            .step_by(world)
            .cloned()
            .collect();
        assert_eq!(mine, expect, "rank {r}");
        wrote.extend(mine);
    }
    wrote.sort();
    let mut all = report.weight_files.clone();
    all.sort();
    assert_eq!(wrote, all);
}

#[test]
fn a_rank_outside_the_world_is_refused() {
    struct Never;
    impl Barrier for Never {
        fn wait(&self, _: &str) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
            Err("unreachable".into())
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let (state, options) = job();
    let bad = Rank {
        rank: 2,
        world_size: 2,
    };
    let err = save_pretrained_distributed(tmp.path(), &state, &options, bad, &Never).unwrap_err();
    assert!(err.to_string().contains("rank 2 of a world of 2"), "{err}");
    // A failing barrier stops the save and leaves no staging folder.
    let out = tmp.path().join("out");
    let rank0 = Rank {
        rank: 0,
        world_size: 2,
    };
    let err = save_pretrained_distributed(&out, &state, &options, rank0, &Never).unwrap_err();
    assert!(err.to_string().contains("barrier `staging`"), "{err}");
    assert!(!out.exists());
    assert!(std::fs::read_dir(tmp.path()).unwrap().count() == 0);
}
