//! Property tests (issue 12): save → load round trips over random dtypes, shapes, names and
//! shard sizes, and the invariants of the shard planner. Few cases each, to keep CI short;
//! `PROPTEST_CASES=N` runs more.

use std::collections::BTreeSet;

use peftkit_checkpoint::{
    plan_shards, save_pretrained, verify, Checkpoint, Dtype, PlanItem, SaveOptions, StateDict,
    Tensor, WeightsKind,
};
use proptest::prelude::*;

fn dtype() -> impl Strategy<Value = Dtype> {
    prop::sample::select(vec![
        Dtype::F32,
        Dtype::F16,
        Dtype::BF16,
        Dtype::F64,
        Dtype::I64,
        Dtype::I32,
        Dtype::I8,
        Dtype::U8,
        Dtype::BOOL,
    ])
}

/// A tensor name: dotted identifiers with digits, as in a model.
fn name() -> impl Strategy<Value = String> {
    prop::collection::vec("[a-z_][a-z0-9_]{0,6}|[0-9]{1,2}", 1..4).prop_map(|p| p.join("."))
}

/// (dtype, shape, bytes) with bytes of exactly the right length (booleans 0 or 1).
fn tensor() -> impl Strategy<Value = (Dtype, Vec<usize>, Vec<u8>)> {
    (dtype(), prop::collection::vec(0usize..5, 0..4)).prop_flat_map(|(d, shape)| {
        let n: usize = shape.iter().product::<usize>() * peftkit_checkpoint::dtype_size(d).unwrap();
        let byte = if d == Dtype::BOOL {
            (0u8..2).boxed()
        } else {
            any::<u8>().boxed()
        };
        (Just(d), Just(shape), prop::collection::vec(byte, n))
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Whatever is saved, with whatever shard size, opens again with the same names, dtypes,
    /// shapes and bytes, and `verify` finds nothing.
    #[test]
    fn save_then_load_round_trips(
        tensors in prop::collection::btree_map(name(), tensor(), 1..12),
        max_shard_size in 1u64..400,
    ) {
        let mut sd = StateDict::new();
        for (n, (d, shape, bytes)) in &tensors {
            sd.insert(n.clone(), Tensor::from_bytes(*d, shape.clone(), bytes.clone()).unwrap());
        }
        let dir = tempfile::tempdir().unwrap();
        let opts = SaveOptions { max_shard_size, durable: false, ..Default::default() };
        save_pretrained(dir.path(), &sd, &opts).unwrap();
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        prop_assert_eq!(ckpt.len(), tensors.len());
        for (n, (d, shape, bytes)) in &tensors {
            let t = ckpt.get(n).unwrap();
            prop_assert_eq!(t.dtype(), *d);
            prop_assert_eq!(t.shape(), shape.as_slice());
            prop_assert_eq!(&*t.bytes().unwrap(), bytes.as_slice());
        }
        prop_assert!(verify(dir.path(), WeightsKind::Model, None).unwrap().is_empty());
    }

    /// The planner's promises: every name once, in no empty shard; a shard over the limit holds
    /// one item; the other shards, in order, hold the other items in input order, each started
    /// because the next item did not fit the previous one.
    #[test]
    fn shard_plan_invariants(
        sizes in prop::collection::vec(0u64..50, 0..40),
        max in 1u64..60,
    ) {
        let items: Vec<PlanItem> = sizes
            .iter()
            .enumerate()
            .map(|(i, s)| PlanItem { names: vec![format!("t{i}")], size: *s })
            .collect();
        let size_of = |n: &str| sizes[n[1..].parse::<usize>().unwrap()];
        let shards = plan_shards(&items, max);
        let all: Vec<&String> = shards.iter().flatten().collect();
        prop_assert_eq!(all.len(), items.len());
        prop_assert_eq!(all.iter().collect::<BTreeSet<_>>().len(), items.len());
        let mut normal: Vec<&Vec<String>> = Vec::new();
        for s in &shards {
            prop_assert!(!s.is_empty());
            let total: u64 = s.iter().map(|n| size_of(n)).sum();
            if total > max {
                prop_assert_eq!(s.len(), 1, "an over-size shard holds one item");
            } else {
                normal.push(s);
            }
        }
        let in_order: Vec<&String> = normal.iter().copied().flatten().collect();
        let expected: Vec<&String> = items
            .iter()
            .filter(|i| i.size <= max)
            .map(|i| &i.names[0])
            .collect();
        prop_assert_eq!(in_order, expected);
        for pair in normal.windows(2) {
            let total: u64 = pair[0].iter().map(|n| size_of(n)).sum();
            prop_assert!(total + size_of(&pair[1][0]) > max, "greedy: the next item fitted");
        }
    }
}
