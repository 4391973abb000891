//! One computation, several output tensors: a re-quantized weight and what is stored beside it.
//!
//! Re-quantizing a merged weight (FP8, bitsandbytes int8 or 4-bit) yields, from one
//! computation, the weight's bytes and a few small tensors stored beside it (FP8's
//! `weight_scale_inv`, int8's `SCB`, 4-bit's `absmax` and `nested_absmax`). Each is a tensor of
//! the output, written by whichever worker reaches it. A [`Joint`] computation lets them share
//! the work:
//!
//! * the **main** tensor (the weight, [`main_tensor`]) is an edit of its base tensor, of its
//!   dtype and shape: the writer hands it the base bytes (in memory, or where it copied them
//!   in the output file) and [`Joint::compute`] turns them into the output's, leaving the
//!   **parts** (the small tensors) in a slot;
//! * each part ([`part_tensor`]) is [`Tensor::written_after`] its main tensor: a safetensors
//!   file lists `F32` scales before `I8`/`U8`/`F8_E4M3` weights, and the writer takes such a
//!   tensor right after its weight, on the weight's worker (after the rest of its file when the
//!   weight lies in another); a part whose weight is being computed waits for it (one `turn`
//!   per computation) instead of starting a second computation;
//! * a part that still comes first (its weight in a later file) runs the computation itself on
//!   a copy of the base bytes and leaves the main tensor's bytes for the main tensor's write.
//!
//! Memory stays bounded: whatever is held for a later write (parts, a main tensor computed by a
//! part or ahead of the writes, [`JointSlot::leave`]) counts against one [`KeepBudget`] per
//! merge; what does not fit goes to its spill file when it has one (`quant::spill`), or is
//! dropped and computed again by its own write, so the result never depends on the budget.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use peftkit_checkpoint::{
    buffers, CheckpointError, Dtype, InPlaceEdit, OutputRegion, SourceRegion, Tensor,
};

pub(crate) use super::spill::Spill;
use super::spill::Spilled;

/// Bytes a merge holds for later writes (see [`KeepBudget`]): main tensors computed ahead of
/// their writes, and parts.
pub(crate) const KEEP_BUDGET: usize = 128 << 20;
/// The share of [`KEEP_BUDGET`] kept for parts. A part written right after its main tensor
/// ([`part_tensor`]) is held only between the two writes, but it must find room then: main
/// tensors computed ahead (a double-quantized weight's, while planning) may fill theirs.
const PARTS_BUDGET: usize = 32 << 20;

/// The bytes one merge may hold for later writes, shared by all its joint computations: one
/// pool for main tensors, one for parts, and optionally a file for what does not fit them
/// ([`KeepBudget::spilling`]).
pub(crate) struct KeepBudget {
    mains: Pool,
    parts: Pool,
    spill: Option<Spill>,
}

impl Default for KeepBudget {
    fn default() -> Self {
        KeepBudget::new(KEEP_BUDGET - PARTS_BUDGET, PARTS_BUDGET)
    }
}

impl KeepBudget {
    /// A budget of `mains` bytes for main tensors and `parts` for parts.
    pub(crate) fn new(mains: usize, parts: usize) -> Self {
        KeepBudget {
            mains: Pool::new(mains),
            parts: Pool::new(parts),
            spill: None,
        }
    }

    /// This budget, with what does not fit its pools written to `spill` instead of dropped.
    pub(crate) fn spilling(self, spill: Option<Spill>) -> Self {
        KeepBudget { spill, ..self }
    }

    /// The pool of `of`'s bytes.
    fn pool(&self, of: Of) -> &Pool {
        match of {
            Of::Main => &self.mains,
            Of::Part => &self.parts,
        }
    }

    /// Keeps `bytes` (of `of`) in `slot`: in memory if its pool allows, else in the spill file
    /// if there is one and it takes them; else they are dropped.
    fn keep(&self, of: Of, slot: &mut Option<Kept>, bytes: Vec<u8>) {
        if slot.is_some() {
            buffers::give(bytes);
        } else if self.pool(of).reserve(bytes.len()) {
            *slot = Some(Kept::Memory(bytes));
        } else {
            *slot = self
                .spill
                .as_ref()
                .and_then(|s| s.put(&bytes))
                .map(Kept::Spilled);
            buffers::give(bytes);
        }
    }

    /// Takes the bytes (of `of`) out of `slot`, and out of their pool or the file.
    fn take(&self, of: Of, slot: &mut Option<Kept>) -> Option<Vec<u8>> {
        match slot.take()? {
            Kept::Memory(bytes) => {
                self.pool(of).release(bytes.len());
                Some(bytes)
            }
            Kept::Spilled(at) => self.spill.as_ref()?.take(at),
        }
    }

    /// Drops what `slot` (of `of`) holds.
    fn discard(&self, of: Of, slot: &mut Option<Kept>) {
        match slot.take() {
            Some(Kept::Memory(bytes)) => self.pool(of).release(bytes.len()),
            Some(Kept::Spilled(at)) => self.spill.iter().for_each(|s| s.discard(at)),
            None => {}
        }
    }

    /// Bytes held now.
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.mains.held.load(Ordering::Acquire) + self.parts.held.load(Ordering::Acquire)
    }
}

/// Whose bytes a slot holds: a main tensor's or a part's (they have a pool each).
#[derive(Clone, Copy)]
enum Of {
    Main,
    Part,
}

/// A tensor's bytes held for its write.
enum Kept {
    Memory(Vec<u8>),
    Spilled(Spilled),
}

/// Bytes held against a limit.
struct Pool {
    held: AtomicUsize,
    limit: usize,
}

impl Pool {
    fn new(limit: usize) -> Self {
        Pool {
            held: AtomicUsize::new(0),
            limit,
        }
    }

    /// Reserves `n` bytes if they fit.
    fn reserve(&self, n: usize) -> bool {
        let reserved = self
            .held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                (held + n <= self.limit).then_some(held + n)
            });
        reserved.is_ok()
    }

    /// Gives back `n` reserved bytes.
    fn release(&self, n: usize) {
        self.held.fetch_sub(n, Ordering::AcqRel);
    }
}

/// A computation that makes a main output tensor out of its base tensor's bytes and, on the
/// way, the bytes of some parts (see the module docs).
pub(crate) trait Joint: Send + Sync + 'static {
    /// The slot and turn the computation's tensors share.
    fn shared(&self) -> &JointSlot;

    /// The base tensor the main output tensor is an edit of (same dtype and shape).
    fn base(&self) -> &Tensor;

    /// Turns `main`, the base tensor's bytes, into the main output tensor's, and returns the
    /// bytes of every part, by index.
    fn compute(&self, main: &mut [u8]) -> Result<Vec<Vec<u8>>, CheckpointError>;

    /// Writes the main output tensor into `out` piece by piece, reading the base tensor from
    /// `source` as it goes, and returns the bytes of every part; `None`, having written
    /// nothing, when it cannot (the default).
    fn stream(
        &self,
        _source: SourceRegion<'_>,
        _out: &OutputRegion<'_>,
    ) -> Result<Option<Vec<Vec<u8>>>, CheckpointError> {
        Ok(None)
    }

    /// Whether [`Joint::compute`] reads the base bytes in `main` (`false`: it overwrites them
    /// whole, having read what it needs elsewhere), so that they need not be read for it.
    fn reads_base(&self) -> bool {
        true
    }
}

/// What the tensors of one [`Joint`] computation share.
pub(crate) struct JointSlot {
    budget: Arc<KeepBudget>,
    /// Held while the computation runs, so that another tensor of it waits and takes what it
    /// left instead of computing again.
    turn: Mutex<()>,
    held: Mutex<Held>,
}

/// What a computation left for the tensors not yet written.
#[derive(Default)]
struct Held {
    /// The main tensor's bytes, computed by a part's write or ahead of the writes.
    main: Option<Kept>,
    /// Whether the main tensor was computed by its own write.
    main_written: bool,
    /// Each part's bytes, until its write takes them.
    parts: Vec<Option<Kept>>,
    /// Which parts were written.
    parts_written: Vec<bool>,
}

impl JointSlot {
    /// An empty slot whose held bytes count against `budget`.
    pub(crate) fn new(budget: Arc<KeepBudget>) -> Self {
        JointSlot {
            budget,
            turn: Mutex::new(()),
            held: Mutex::default(),
        }
    }

    fn turn(&self) -> MutexGuard<'_, ()> {
        self.turn.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn held(&self) -> MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Leaves the parts not yet written (but `except`) for their writes.
    fn leave_parts(&self, held: &mut Held, parts: Vec<Vec<u8>>, except: Option<usize>) {
        let n = parts.len();
        held.parts.resize_with(n.max(held.parts.len()), || None);
        held.parts_written
            .resize(n.max(held.parts_written.len()), false);
        for (i, bytes) in parts.into_iter().enumerate() {
            if Some(i) != except && !held.parts_written[i] {
                self.budget.keep(Of::Part, &mut held.parts[i], bytes);
            }
        }
    }

    /// Keeps what a computation made before any of its tensors was written (the main tensor's
    /// bytes and the parts) for their writes to take, as far as the budget allows. What does
    /// not fit is computed again when written.
    pub(crate) fn leave(&self, main: Vec<u8>, parts: Vec<Vec<u8>>) {
        let mut held = self.held();
        self.leave_parts(&mut held, parts, None);
        if held.main_written {
            buffers::give(main);
            return;
        }
        self.budget.keep(Of::Main, &mut held.main, main);
    }

    /// The main tensor's bytes, computed by a part's write, of length `len`.
    fn kept_main(&self, len: usize) -> Option<Vec<u8>> {
        let mut held = self.held();
        let kept = self.budget.take(Of::Main, &mut held.main)?;
        if kept.len() == len {
            held.main_written = true;
            return Some(kept);
        }
        buffers::give(kept);
        None
    }

    /// Records the main tensor as written, and the `parts` its computation made.
    fn main_done(&self, parts: Vec<Vec<u8>>) {
        let mut held = self.held();
        held.main_written = true;
        self.leave_parts(&mut held, parts, None);
    }

    /// The main tensor's edit: `bytes`, the base tensor's, become the output's.
    fn write_main(&self, joint: &dyn Joint, bytes: &mut [u8]) -> Result<(), CheckpointError> {
        let _turn = self.turn();
        if let Some(kept) = self.kept_main(bytes.len()) {
            bytes.copy_from_slice(&kept);
            buffers::give(kept);
            return Ok(());
        }
        self.main_done(joint.compute(bytes)?);
        Ok(())
    }

    /// The main tensor written into `out` by [`Joint::stream`] (or from what a part's write
    /// left); `false`, having written nothing, when it cannot stream.
    fn stream_main(
        &self,
        joint: &dyn Joint,
        source: SourceRegion<'_>,
        out: &OutputRegion<'_>,
    ) -> Result<bool, CheckpointError> {
        let _turn = self.turn();
        if let Some(kept) = self.kept_main(out.len()) {
            out.write_at(0, &kept)?;
            buffers::give(kept);
            return Ok(true);
        }
        let Some(parts) = joint.stream(source, out)? else {
            return Ok(false);
        };
        self.main_done(parts);
        Ok(true)
    }

    /// The bytes of part `index`: left by the computation, or computed now.
    fn write_part(&self, joint: &dyn Joint, index: usize) -> Result<Vec<u8>, CheckpointError> {
        let _turn = self.turn();
        {
            let mut held = self.held();
            let slot = held.parts.get_mut(index);
            let slot = slot.and_then(|s| self.budget.take(Of::Part, s));
            if let Some(bytes) = slot {
                held.parts_written[index] = true;
                return Ok(bytes);
            }
        }
        let mut main = match joint.reads_base() {
            true => joint.base().bytes()?.into_owned(),
            false => buffers::take(joint.base().byte_len()),
        };
        let mut parts = joint.compute(&mut main)?;
        let Some(mine) = parts.get_mut(index).map(std::mem::take) else {
            return Err(CheckpointError::TensorData {
                tensor: String::new(),
                reason: format!(
                    "a joint computation made {} parts, not {}",
                    parts.len(),
                    index + 1
                ),
            });
        };
        let mut held = self.held();
        self.leave_parts(&mut held, parts, Some(index));
        held.parts_written[index] = true;
        if held.main_written {
            buffers::give(main);
        } else {
            self.budget.keep(Of::Main, &mut held.main, main);
        }
        Ok(mine)
    }
}

impl Drop for JointSlot {
    fn drop(&mut self) {
        // Bytes nobody took (a tensor computed twice, or a failed save) leave the budget.
        let mut held = std::mem::take(self.held.get_mut().unwrap_or_else(|e| e.into_inner()));
        self.budget.discard(Of::Main, &mut held.main);
        for part in &mut held.parts {
            self.budget.discard(Of::Part, part);
        }
    }
}

/// The main output tensor of `joint`: its base tensor, edited by the computation.
pub(crate) fn main_tensor<J: Joint>(joint: &Arc<J>) -> Tensor {
    Tensor::edited(joint.base().clone(), MainEdit(joint.clone()))
}

/// Part `index` of `joint`, of `dtype` and `shape`, written right after the main tensor, named
/// `main` in the output, when that lies in the same file, else after the rest of its file
/// ([`Tensor::written_after`]).
pub(crate) fn part_tensor<J: Joint>(
    joint: &Arc<J>,
    main: &str,
    index: usize,
    dtype: Dtype,
    shape: Vec<usize>,
) -> Result<Tensor, CheckpointError> {
    let joint = joint.clone();
    let produce = move || joint.shared().write_part(joint.as_ref(), index);
    Ok(Tensor::lazy(dtype, shape, produce)?.written_after(main))
}

/// The edit of a main tensor (see [`main_tensor`]): in memory, or where the writer copied the
/// base bytes in the output file.
struct MainEdit<J>(Arc<J>);

impl<J: Joint> InPlaceEdit for MainEdit<J> {
    fn apply(&self, bytes: &mut [u8]) -> Result<(), CheckpointError> {
        self.0.shared().write_main(self.0.as_ref(), bytes)
    }

    fn apply_in_file(
        &self,
        source: SourceRegion<'_>,
        out: &OutputRegion<'_>,
    ) -> Result<bool, CheckpointError> {
        if self.0.shared().stream_main(self.0.as_ref(), source, out)? {
            return Ok(true);
        }
        let Some((file, offset)) = out.mappable()? else {
            return Ok(false);
        };
        crate::mapped::edit_file_range(file, offset, out.len(), |bytes| {
            if self.0.reads_base() {
                source.read_at(0, bytes)?;
            }
            self.apply(bytes)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Negates a 4-byte base and reports its sum and its first byte as parts; counts its runs.
    struct Toy {
        slot: JointSlot,
        base: Tensor,
        runs: AtomicUsize,
    }

    impl Joint for Toy {
        fn shared(&self) -> &JointSlot {
            &self.slot
        }
        fn base(&self) -> &Tensor {
            &self.base
        }
        fn compute(&self, main: &mut [u8]) -> Result<Vec<Vec<u8>>, CheckpointError> {
            self.runs.fetch_add(1, Ordering::Relaxed);
            let sum = main.iter().map(|&b| u32::from(b)).sum::<u32>();
            main.iter_mut().for_each(|b| *b = b.wrapping_neg());
            Ok(vec![sum.to_le_bytes().to_vec(), vec![main[0]]])
        }
    }

    /// A toy with room for `mains` bytes of main tensors and `parts` of parts.
    fn toy((mains, parts): (usize, usize)) -> (Arc<Toy>, Arc<KeepBudget>) {
        let budget = Arc::new(KeepBudget::new(mains, parts));
        let base = Tensor::from_bytes(Dtype::U8, vec![4], vec![1, 2, 3, 4]).unwrap();
        let slot = JointSlot::new(budget.clone());
        let runs = AtomicUsize::new(0);
        (Arc::new(Toy { slot, base, runs }), budget)
    }

    /// Writes the tensors of `joint` in `order` (0: main, 1 and 2: parts); returns their bytes
    /// in tensor order.
    fn write(joint: &Arc<Toy>, order: &[usize]) -> Vec<Vec<u8>> {
        let tensors = [
            main_tensor(joint),
            part_tensor(joint, "main", 0, Dtype::U32, vec![1]).unwrap(),
            part_tensor(joint, "main", 1, Dtype::U8, vec![1]).unwrap(),
        ];
        assert!(tensors[1].is_written_last() && !tensors[0].is_written_last());
        let mut out = vec![vec![]; 3];
        for &i in order {
            out[i] = tensors[i].bytes().unwrap().into_owned();
        }
        out
    }

    #[test]
    fn one_computation_in_any_order_within_the_budget() {
        let expected = vec![
            vec![255, 254, 253, 252],
            10u32.to_le_bytes().to_vec(),
            vec![255],
        ];
        for order in [[0, 1, 2], [1, 0, 2], [2, 1, 0], [1, 2, 0]] {
            let (joint, budget) = toy((KEEP_BUDGET, KEEP_BUDGET));
            assert_eq!(write(&joint, &order), expected, "{order:?}");
            assert_eq!(joint.runs.load(Ordering::Relaxed), 1, "{order:?}");
            assert_eq!(budget.held(), 0, "everything taken: {order:?}");
        }
    }

    #[test]
    fn what_does_not_fit_the_budget_is_computed_again() {
        // Room for one byte of each: the parts left behind and the main tensor computed by a
        // part do not fit, so each write computes.
        let (joint, budget) = toy((1, 1));
        let expected = vec![
            vec![255, 254, 253, 252],
            10u32.to_le_bytes().to_vec(),
            vec![255],
        ];
        assert_eq!(write(&joint, &[2, 1, 0]), expected);
        assert_eq!(joint.runs.load(Ordering::Relaxed), 3);
        assert_eq!(budget.held(), 0);
        // A part left behind and never written leaves the budget with its computation.
        let (joint, budget) = toy((KEEP_BUDGET, KEEP_BUDGET));
        write(&joint, &[0]);
        assert_eq!(budget.held(), 5);
        drop(joint);
        assert_eq!(budget.held(), 0);
    }

    /// What a computation made before any write (`JointSlot::leave`), as the first computation.
    fn computed_before(joint: &Toy) {
        let mut main = joint.base.bytes().unwrap().into_owned();
        let parts = joint.compute(&mut main).unwrap();
        joint.slot.leave(main, parts);
    }

    #[test]
    fn a_computation_made_before_the_writes_serves_them_within_the_budget() {
        let expected = vec![
            vec![255, 254, 253, 252],
            10u32.to_le_bytes().to_vec(),
            vec![255],
        ];
        for order in [[0, 1, 2], [2, 1, 0]] {
            let (joint, budget) = toy((KEEP_BUDGET, KEEP_BUDGET));
            computed_before(&joint);
            assert_eq!(budget.held(), 9);
            assert_eq!(write(&joint, &order), expected, "{order:?}");
            assert_eq!(joint.runs.load(Ordering::Relaxed), 1, "{order:?}");
            assert_eq!(budget.held(), 0, "{order:?}");
        }
        // Room for the parts only: the main tensor is computed again by its write.
        let (joint, budget) = toy((0, 5));
        computed_before(&joint);
        assert_eq!(budget.held(), 5);
        assert_eq!(write(&joint, &[1, 2, 0]), expected);
        assert_eq!(joint.runs.load(Ordering::Relaxed), 2);
        assert_eq!(budget.held(), 0);
    }
}
