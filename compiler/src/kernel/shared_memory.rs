//! A block's shared memory as the GPU-semantics executor checks it, element by element:
//! an index outside the array, a read of an element no thread has written, and two
//! threads touching one element between the same two barriers, one of them writing (a
//! race), are errors.

use super::ir::Var;
use super::value::{Slots, Val};

/// One shared array of a block.
struct SharedArray {
    values: Vec<Option<Val>>,
    /// The last write of each element: (thread, epoch).
    written: Vec<Option<(u32, u64)>>,
    /// The reads of each element in its last-read epoch.
    read: Vec<Reads>,
}

/// Who read an element in one epoch: the first reader, and whether another thread did
/// too (all a write needs to know to tell a race).
#[derive(Clone, Copy)]
struct Reads {
    epoch: u64,
    first: u32,
    others: bool,
}

impl Reads {
    const NONE: Reads = Reads { epoch: u64::MAX, first: 0, others: false };
}

/// A block's shared memory and the thread now running.
pub(super) struct BlockState {
    pub(super) thread: u32,
    /// Barriers passed so far: accesses in one epoch are not ordered between threads.
    epoch: u64,
    shared: Slots<SharedArray>,
}

impl BlockState {
    /// A block's state before its first statement: no shared arrays, thread 0.
    pub(super) fn new() -> BlockState {
        BlockState { thread: 0, epoch: 0, shared: Slots::default() }
    }

    /// A barrier: what follows it is ordered after what came before, on every thread.
    pub(super) fn barrier(&mut self) {
        self.epoch += 1;
    }

    /// Declares shared array `array` of `len` elements (once per block; later
    /// declarations, one per thread, find it there).
    pub(super) fn declare(&mut self, array: Var, len: usize) {
        if !self.shared.contains(array) {
            let a = SharedArray { values: vec![None; len], written: vec![None; len], read: vec![Reads::NONE; len] };
            self.shared.insert(array, a);
        }
    }

    pub(super) fn is_shared(&self, array: Var) -> bool {
        self.shared.contains(array)
    }

    fn element(&mut self, array: Var, i: i64) -> Result<(&mut SharedArray, usize), String> {
        let a = self.shared.get_mut(array).ok_or_else(|| format!("shared array {array} is not declared"))?;
        let len = a.values.len();
        let at = usize::try_from(i).ok().filter(|&i| i < len);
        let at = at.ok_or_else(|| format!("shared {array}[{i}] is out of bounds (length {len})"))?;
        Ok((a, at))
    }

    pub(super) fn read(&mut self, array: Var, i: i64) -> Result<Val, String> {
        let (thread, epoch) = (self.thread, self.epoch);
        let (a, at) = self.element(array, i)?;
        let v = a.values[at].ok_or_else(|| {
            format!("thread {thread} reads shared {array}[{i}], which no thread has written (it is uninitialized)")
        })?;
        if let Some((w, e)) = a.written[at] {
            if w != thread && e == epoch {
                return Err(format!(
                    "race: thread {thread} reads shared {array}[{i}], written by thread {w} with no barrier between"
                ));
            }
        }
        let r = &mut a.read[at];
        if r.epoch != epoch {
            *r = Reads { epoch, first: thread, others: false };
        } else if r.first != thread {
            r.others = true;
        }
        Ok(v)
    }

    pub(super) fn write(&mut self, array: Var, i: i64, v: Val) -> Result<(), String> {
        let (thread, epoch) = (self.thread, self.epoch);
        let (a, at) = self.element(array, i)?;
        if let Some((w, e)) = a.written[at] {
            if w != thread && e == epoch {
                return Err(format!(
                    "race: threads {w} and {thread} write shared {array}[{i}] with no barrier between"
                ));
            }
        }
        let r = a.read[at];
        if r.epoch == epoch && (r.others || r.first != thread) {
            let reader = if r.first != thread { format!("thread {}", r.first) } else { "another thread".into() };
            return Err(format!(
                "race: thread {thread} writes shared {array}[{i}], read by {reader} with no barrier between"
            ));
        }
        a.values[at] = Some(v);
        a.written[at] = Some((thread, epoch));
        Ok(())
    }
}
