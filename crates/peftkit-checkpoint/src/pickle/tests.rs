//! The machine on hand-written pickles, and views of storages on a scratch file.

use std::collections::HashMap;
use std::sync::Arc;

use super::torch::{self, StorageRef, TensorRef};
use super::vm::{self, Value, VmError};
use super::{build, Storages};
use crate::tensor::{Dtype, SourceFile};
use crate::CheckpointError;

fn run(pkl: &[u8]) -> Result<Value, VmError> {
    let mut load = |pid: Value| torch::storage_of(pid).map(Value::Storage);
    vm::run(pkl, 0, torch::allowed, torch::call, &mut load).map(|(v, _)| v)
}

fn refused(pkl: &[u8]) -> String {
    match run(pkl) {
        Err(VmError::Refused(g)) => g,
        other => panic!("not refused: {other:?}"),
    }
}

#[test]
fn every_way_to_name_a_global_goes_through_the_allow_list() {
    assert_eq!(
        refused(b"\x80\x02cbuiltins\neval\nX\x01\x00\x00\x001\x85R."),
        "builtins.eval"
    );
    // STACK_GLOBAL (protocol 4) and INST (protocol 0).
    assert_eq!(
        refused(b"\x80\x04\x8c\nsubprocess\x8c\x05Popen\x93."),
        "subprocess.Popen"
    );
    assert_eq!(refused(b"(ios\nsystem\n."), "os.system");
    // A storage class name that torch does not have is not a storage.
    assert_eq!(refused(b"\x80\x02ctorch\nload\n."), "torch.load");
    assert_eq!(
        refused(b"\x80\x02ctorch._utils\n_rebuild_from_type_v2\n."),
        "torch._utils._rebuild_from_type_v2"
    );
}

#[test]
fn malformed_pickles_are_errors() {
    assert!(matches!(run(b"\x80\x02}q\x00"), Err(VmError::Truncated)));
    assert!(
        matches!(run(b"\x80\x02."), Err(VmError::Invalid(_))),
        "pop from an empty stack"
    );
    assert!(
        matches!(
            run(b"\x80\x02ccollections\nOrderedDict\n)\x81."),
            Err(VmError::Invalid(_))
        ),
        "NEWOBJ"
    );
    assert!(matches!(
        run(b"\x80\x02K\x01N b."),
        Err(VmError::Invalid(_))
    ));
    assert!(
        matches!(run(b"\x80\x02h\x07."), Err(VmError::Invalid(_))),
        "memo miss"
    );
    assert!(
        matches!(run(b"\x80\x09N."), Err(VmError::Invalid(_))),
        "protocol 9"
    );
}

/// `{"a": <tensor>}` as torch.save writes it, with the memo and an OrderedDict with state.
#[test]
fn a_state_dict_pickle() {
    let pkl = b"\x80\x02ccollections\nOrderedDict\nq\x00)Rq\x01X\x01\x00\x00\x00aq\x02ctorch._utils\n_rebuild_tensor_v2\nq\x03((X\x07\x00\x00\x00storageq\x04ctorch\nFloatStorage\nq\x05X\x01\x00\x00\x000q\x06X\x03\x00\x00\x00cpuq\x07K\x06tq\x08QK\x01K\x02K\x02\x86K\x01K\x03\x86\x89h\x00)Rtq\tRq\ns}X\t\x00\x00\x00_metadataq\x0bh\x00)Rsb.";
    let entries = torch::state_dict_entries(run(pkl).unwrap()).unwrap();
    assert_eq!(entries.len(), 1);
    let (name, t) = &entries[0];
    assert_eq!(name, "a");
    assert_eq!(
        (t.offset, t.shape.as_slice(), t.stride.as_slice()),
        (1, &[2, 2][..], &[1, 3][..])
    );
    assert_eq!(t.storage.dtype, Dtype::F32);
    let not_sd = run(b"\x80\x02K\x05.").unwrap();
    assert!(torch::state_dict_entries(not_sd).is_err());
}

fn view(key: &str, numel: u64, offset: u64, shape: &[usize], stride: &[usize]) -> TensorRef {
    TensorRef {
        storage: StorageRef {
            key: key.into(),
            dtype: Dtype::F32,
            numel,
        },
        offset,
        shape: shape.to_vec(),
        stride: stride.to_vec(),
    }
}

/// Identical views are ties, overlapping different views are copies, strided views are
/// gathered, views past their storage are refused.
#[test]
fn views_of_storages() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.bin");
    let data: Vec<u8> = (0..8u32).flat_map(|i| (i as f32).to_le_bytes()).collect();
    std::fs::write(&path, [vec![0u8; 4], data].concat()).unwrap();
    let file = SourceFile::open(&path).unwrap();
    let storages: Storages = HashMap::from([("0".to_owned(), (4, 32))]);
    let entries = vec![
        ("a".to_owned(), view("0", 8, 0, &[2, 2], &[2, 1])),
        ("b".to_owned(), view("0", 8, 0, &[2, 2], &[2, 1])),
        ("c".to_owned(), view("0", 8, 1, &[3], &[1])),
        ("t".to_owned(), view("0", 8, 4, &[2, 2], &[1, 2])),
    ];
    let w = build(&path, &file, entries, &storages).unwrap();
    assert_eq!(w.ties, [("b".to_owned(), "a".to_owned())]);
    let floats = |i: usize| -> Vec<f32> {
        w.tensors[i]
            .1
            .bytes()
            .unwrap()
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    assert_eq!(floats(0), [0.0, 1.0, 2.0, 3.0]);
    assert_eq!(w.tensors[0].1.storage_key(), w.tensors[1].1.storage_key());
    assert!(w.tensors[2].1.is_computed(), "overlaps `a`: its own copy");
    assert_eq!(floats(2), [1.0, 2.0, 3.0]);
    assert_eq!(
        floats(3),
        [4.0, 6.0, 5.0, 7.0],
        "transposed view gathered row-major"
    );
    let past = vec![("x".to_owned(), view("0", 8, 6, &[3], &[1]))];
    let err = build(&path, &file, past, &storages).err().unwrap();
    assert!(
        matches!(err, CheckpointError::InvalidTensor { ref tensor, .. } if tensor == "x"),
        "{err}"
    );
    let _ = Arc::strong_count(&file);
}
