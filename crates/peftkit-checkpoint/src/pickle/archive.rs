//! The containers `torch.save` writes: the zip format (torch ≥ 1.6) and the legacy stream of
//! pickles before it. Each yields the pickled state dict and where every storage's bytes are.
//!
//! The zip directory is read by the `zip` crate; entries are never decompressed (torch stores
//! them uncompressed, which is what lets a tensor be a byte range of the file).

use std::path::Path;

use super::torch::{self, StorageRef, TensorRef};
use super::vm::{self, Value, VmError};
use super::{invalid, vm_error, Storages};
use crate::error::{CheckpointError, Result};
use crate::tensor::{dtype_size, SourceFile};

/// The largest `data.pkl` read: the pickle of a state dict is a few hundred bytes per tensor.
const MAX_PICKLE: u64 = 1 << 30;

/// The state dict entries and storage locations of the file.
pub(super) fn read(path: &Path, file: &SourceFile) -> Result<(Vec<(String, TensorRef)>, Storages)> {
    let mut magic = [0u8; 6];
    let len = std::fs::metadata(path)
        .map_err(|e| CheckpointError::io(path, e))?
        .len();
    if len < magic.len() as u64 {
        return Err(invalid(path, "too short to be a torch.save file"));
    }
    file.read_exact_at(&mut magic, 0)?;
    if magic.starts_with(b"PK\x03\x04") {
        read_zip(path, file)
    } else if magic[0] == 0x80 && magic[1] == 2 {
        read_legacy(path, file, len)
    } else {
        Err(invalid(path, "neither torch's zip format nor its legacy pickle format (the tar format of torch < 0.4 is not read: load it with torch and save it again)"))
    }
}

fn read_range(file: &SourceFile, start: u64, len: u64, path: &Path) -> Result<Vec<u8>> {
    if len > MAX_PICKLE {
        return Err(invalid(path, "a pickle larger than 1 GiB"));
    }
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, start)?;
    Ok(buf)
}

fn read_zip(path: &Path, file: &SourceFile) -> Result<(Vec<(String, TensorRef)>, Storages)> {
    let zip_err = |e: zip::result::ZipError| invalid(path, format!("unreadable zip archive: {e}"));
    let f = std::fs::File::open(path).map_err(|e| CheckpointError::io(path, e))?;
    let mut archive = zip::ZipArchive::new(f).map_err(zip_err)?;
    // name -> (absolute data offset, size)
    let mut entries = std::collections::HashMap::new();
    for i in 0..archive.len() {
        let e = archive.by_index_raw(i).map_err(zip_err)?;
        let name = e.name().map_err(zip_err)?.into_owned();
        if e.compression() != zip::CompressionMethod::Stored {
            return Err(invalid(
                path,
                format!("entry `{name}` is compressed; torch.save stores every entry uncompressed"),
            ));
        }
        let start = e
            .data_start()
            .ok_or_else(|| invalid(path, format!("entry `{name}` has no data offset")))?;
        entries.insert(name, (start, e.size()));
    }
    let pkl = entries
        .keys()
        .filter(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
        .min()
        .cloned()
        .ok_or_else(|| {
            invalid(
                path,
                "a zip archive without <name>/data.pkl: not a torch.save file",
            )
        })?;
    let prefix = pkl.trim_end_matches("data.pkl").to_owned();
    if let Some(&(start, size)) = entries.get(&format!("{prefix}byteorder")) {
        let order = read_range(file, start, size.min(16), path)?;
        if order != b"little" {
            return Err(invalid(
                path,
                "the tensors are stored big-endian; only little-endian files are read",
            ));
        }
    }
    let (start, size) = entries[&pkl];
    let data = read_range(file, start, size, path)?;
    let mut storages = Storages::new();
    let mut load = |pid: Value| -> Result<Value, VmError> {
        let s = torch::storage_of(pid)?;
        let &(start, len) = entries
            .get(&format!("{prefix}data/{}", s.key))
            .ok_or_else(|| {
                VmError::Invalid(format!("storage `{}` has no entry data/{}", s.key, s.key))
            })?;
        storages.insert(s.key.clone(), (start, len));
        Ok(Value::Storage(s))
    };
    let (value, _) =
        vm::run(&data, 0, torch::allowed, torch::call, &mut load).map_err(|e| vm_error(path, e))?;
    let sd = torch::state_dict_entries(value).map_err(|r| invalid(path, r))?;
    Ok((sd, storages))
}

/// The magic number that opens a legacy file, as little-endian bytes.
const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];

/// The legacy format: pickles of the magic number, the protocol version and the system info,
/// the state dict, the list of storage keys; then each storage as an 8-byte element count and
/// its bytes, in that list's order.
fn read_legacy(
    path: &Path,
    file: &SourceFile,
    len: u64,
) -> Result<(Vec<(String, TensorRef)>, Storages)> {
    // The pickles come first and are small; the storages after them are never read whole.
    // Read a first megabyte, and more only if the pickles do not fit in it.
    let mut n = len.min(1 << 20);
    loop {
        let head = read_range(file, 0, n, path)?;
        match legacy_pickles(&head) {
            Err(VmError::Truncated) if n < len.min(MAX_PICKLE) => {
                n = (n * 4).min(len).min(MAX_PICKLE)
            }
            Err(e) => return Err(vm_error(path, e)),
            Ok((header, sd, keys, found, at)) => {
                if !matches!(&header[0], Value::Long(b) if b[..] == LEGACY_MAGIC) {
                    return Err(invalid(path, "no torch magic number"));
                }
                if !matches!(header[1], Value::Int(1001)) {
                    return Err(invalid(
                        path,
                        "a legacy torch file of an unknown protocol version",
                    ));
                }
                let sd = torch::state_dict_entries(sd).map_err(|r| invalid(path, r))?;
                let storages = legacy_storages(path, file, len, keys, &found, at as u64)?;
                return Ok((sd, storages));
            }
        }
    }
}

type LegacyPickles = (Vec<Value>, Value, Value, Vec<StorageRef>, usize);

/// Runs the five pickles of a legacy file: header values, state dict, storage keys, the
/// storages the state dict named, and where the storage data starts.
fn legacy_pickles(head: &[u8]) -> Result<LegacyPickles, VmError> {
    let mut none = |_: Value| -> Result<Value, VmError> {
        Err(VmError::Invalid(
            "a persistent id in a header pickle".into(),
        ))
    };
    let mut pos = 0;
    let mut header = Vec::new();
    for _ in 0..3 {
        let (v, next) = vm::run(head, pos, torch::allowed, torch::call, &mut none)?;
        header.push(v);
        pos = next;
    }
    let mut found: Vec<StorageRef> = Vec::new();
    let mut load = |pid: Value| -> Result<Value, VmError> {
        let s = torch::storage_of(pid)?;
        if !found.contains(&s) {
            found.push(s.clone());
        }
        Ok(Value::Storage(s))
    };
    let (sd, next) = vm::run(head, pos, torch::allowed, torch::call, &mut load)?;
    let (keys, at) = vm::run(head, next, torch::allowed, torch::call, &mut none)?;
    Ok((header, sd, keys, found, at))
}

/// Where each storage of a legacy file is: they follow the pickles in the order of `keys`.
fn legacy_storages(
    path: &Path,
    file: &SourceFile,
    len: u64,
    keys: Value,
    found: &[StorageRef],
    mut at: u64,
) -> Result<Storages> {
    let Value::List(keys) = keys else {
        return Err(invalid(
            path,
            "no list of storage keys after the state dict",
        ));
    };
    let mut storages = Storages::new();
    for key in keys.borrow().iter() {
        let Value::Str(key) = key else {
            return Err(invalid(path, "a storage key that is not a string"));
        };
        let s = found.iter().find(|s| &s.key == key).ok_or_else(|| {
            invalid(
                path,
                format!("storage `{key}` is listed but no tensor uses it"),
            )
        })?;
        let mut count = [0u8; 8];
        file.read_exact_at(&mut count, at)?;
        let bytes = u64::from_le_bytes(count)
            .checked_mul(dtype_size(s.dtype).unwrap_or(1) as u64)
            .filter(|b| at + 8 + b <= len)
            .ok_or_else(|| {
                invalid(
                    path,
                    format!("storage `{key}` reaches past the end of the file"),
                )
            })?;
        storages.insert(key.clone(), (at + 8, bytes));
        at += 8 + bytes;
    }
    Ok(storages)
}
