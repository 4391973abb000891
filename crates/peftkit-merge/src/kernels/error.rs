//! The one error type of the merge kernels.

use safetensors::Dtype;

/// Why a merge kernel refused its inputs or its result.
///
/// Every variant names the tensor it is about (`what`), so that a caller merging hundreds of
/// layers can report which one was wrong without adding context of its own.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MergeMathError {
    /// The base tensor's bytes could not be read while merging (the reader reports why).
    #[error("{what}: the base tensor could not be read")]
    BaseUnread {
        /// The tensor being merged.
        what: &'static str,
    },
    /// A tensor's shape does not fit the others (e.g. `lora_A` columns ≠ base in-features).
    #[error("{what}: expected shape {expected:?}, got {got:?}")]
    ShapeMismatch {
        /// The tensor whose shape is wrong.
        what: &'static str,
        /// The shape the other operands imply.
        expected: Vec<usize>,
        /// The shape that was passed.
        got: Vec<usize>,
    },
    /// A tensor has the wrong number of dimensions for this layer kind.
    #[error("{what}: expected a {expected}-D tensor, got shape {got:?}")]
    Rank {
        /// The tensor whose rank is wrong.
        what: &'static str,
        /// The expected number of dimensions (a description such as `"2"` or `"3 to 5"`).
        expected: &'static str,
        /// The shape that was passed.
        got: Vec<usize>,
    },
    /// The element buffer does not hold exactly `product(shape)` elements.
    #[error("{what}: shape {shape:?} needs {expected} elements, the buffer holds {got}")]
    ElementCount {
        /// The tensor whose buffer is wrong.
        what: &'static str,
        /// Its declared shape.
        shape: Vec<usize>,
        /// `product(shape)`.
        expected: usize,
        /// Elements actually present.
        got: usize,
    },
    /// A byte buffer is not a whole number of elements of its dtype.
    #[error("{what}: {len} bytes is not a whole number of {dtype:?} elements")]
    ByteLength {
        /// The tensor whose bytes are wrong.
        what: &'static str,
        /// The dtype the bytes were read as.
        dtype: Dtype,
        /// The byte length.
        len: usize,
    },
    /// The kernels only compute in F32/BF16/F16 (and F64 where documented).
    #[error("{what}: dtype {dtype:?} is not supported here")]
    UnsupportedDtype {
        /// The tensor with the unsupported dtype.
        what: &'static str,
        /// Its dtype.
        dtype: Dtype,
    },
    /// A scalar parameter or a combination of parameters is invalid (rank 0, groups, …).
    #[error("{what}: {reason}")]
    Invalid {
        /// The parameter or tensor concerned.
        what: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// `safe_merge`: the merged tensor has NaN or ±Inf entries (peft raises `ValueError` here).
    #[error("{what}: {count} non-finite values after merging (first at flat index {first}); the adapter looks broken")]
    NonFinite {
        /// The merged tensor.
        what: &'static str,
        /// How many entries are NaN or infinite.
        count: usize,
        /// Flat (row-major) index of the first one.
        first: usize,
    },
    /// `product(shape)` does not fit in `usize`.
    #[error("{what}: the element count of shape {shape:?} overflows")]
    Overflow {
        /// The tensor concerned.
        what: &'static str,
        /// Its shape.
        shape: Vec<usize>,
    },
}

/// Result alias of the merge kernels.
pub type Result<T, E = MergeMathError> = std::result::Result<T, E>;

/// `product(shape)`, or [`MergeMathError::Overflow`].
pub(crate) fn numel(what: &'static str, shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| MergeMathError::Overflow {
            what,
            shape: shape.to_vec(),
        })
}

/// Checks that a buffer of `len` elements matches `shape`.
pub(crate) fn check_len(what: &'static str, shape: &[usize], len: usize) -> Result<()> {
    let expected = numel(what, shape)?;
    if expected != len {
        return Err(MergeMathError::ElementCount {
            what,
            shape: shape.to_vec(),
            expected,
            got: len,
        });
    }
    Ok(())
}

/// Checks that `shape` equals `expected`.
pub(crate) fn check_shape(what: &'static str, got: &[usize], expected: &[usize]) -> Result<()> {
    if got != expected {
        return Err(MergeMathError::ShapeMismatch {
            what,
            expected: expected.to_vec(),
            got: got.to_vec(),
        });
    }
    Ok(())
}

/// Checks the number of dimensions is within `min..=max`.
pub(crate) fn check_rank(
    what: &'static str,
    shape: &[usize],
    min: usize,
    max: usize,
    expected: &'static str,
) -> Result<()> {
    if shape.len() < min || shape.len() > max {
        return Err(MergeMathError::Rank {
            what,
            expected,
            got: shape.to_vec(),
        });
    }
    Ok(())
}

/// A zero rank, as the kernels report every invalid parameter (the message merge errors have
/// always carried).
impl From<peftkit_peft::ZeroRank> for MergeMathError {
    fn from(_: peftkit_peft::ZeroRank) -> Self {
        MergeMathError::Invalid {
            what: "r",
            reason: "the LoRA rank must be positive".into(),
        }
    }
}
