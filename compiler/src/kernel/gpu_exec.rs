//! The GPU-semantics executor: runs block kernels (`Kernel::threads`) on the CPU the way
//! a GPU may, and reports what a GPU would silently get wrong. Used by the reference
//! executor ([`super::exec::run`]) for every block kernel, evaluating each thread with its
//! machine (`machine.rs`),, so schedules for GPUs are tested
//! on machines without one.
//!
//! Each block runs its threads together, statement by statement, in a random order
//! (seeded by the block index, so runs are reproducible). A statement with no collective
//! (a barrier, a warp's matrix product) inside runs to its end on one thread before the
//! next thread starts — one of the interleavings a GPU allows between barriers.
//! Structured statements that contain a collective (a loop, an `if`) must be uniform
//! across the block, and are stepped through by all threads together.
//!
//! A warp's matrix product (`Stmt::Mma`) gathers the fragments of each warp's 32 threads,
//! multiplies as `kernel::mma` defines, and hands each thread its elements of D, so a
//! fragment loaded from the wrong place gives a wrong number here.
//!
//! Shared memory is checked element by element (`shared_memory.rs`):
//! - an index outside the array is an error;
//! - reading an element no thread has written is an error (shared memory is not
//!   initialized on a GPU);
//! - two threads touching one element between the same two barriers, one of them
//!   writing, is a race and an error (the missing-barrier bug).
//!
//! Global memory is checked for bounds by the reference executor, as for every kernel.

use super::ir::{Elem, Stmt, Var};
use super::machine::Machine;
use super::mma;
use super::shared_memory::BlockState;
use super::value::{Slots, Val};

/// Each thread's own variables and local arrays.
#[derive(Default)]
struct ThreadState {
    vars: Slots<Val>,
    arrays: Slots<Vec<Val>>,
}

/// A small deterministic generator for thread orders (xorshift64*).
struct Order(u64);

impl Order {
    fn shuffled(&mut self, threads: &[u32]) -> Vec<u32> {
        let mut v = threads.to_vec();
        for i in (1..v.len()).rev() {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let r = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
            v.swap(i, (r % (i as u64 + 1)) as usize);
        }
        v
    }
}

/// Run blocks `begin..end` of a block kernel with `threads` threads each.
pub(super) fn run_blocks(m: &mut Machine, threads: u32, begin: i64, end: i64) -> Result<(), String> {
    let kernel = m.kernel;
    let name = &kernel.name;
    for block in begin..end {
        let mut states: Vec<ThreadState> = (0..threads).map(|_| ThreadState::default()).collect();
        for s in &mut states {
            s.vars.insert(kernel.index, Val::I(block));
        }
        m.gpu = Some(BlockState::new());
        let mut run = Block { states, order: Order(0x9e37_79b9_7f4a_7c15 ^ (block as u64).wrapping_mul(0x1000_0001)) };
        run.stmts(m, &kernel.body).map_err(|e| format!("kernel `{name}`, block {block}: {e}"))?;
    }
    m.gpu = None;
    Ok(())
}

struct Block {
    states: Vec<ThreadState>,
    order: Order,
}

/// Whether a collective statement (a barrier, a warp's matrix product) lies anywhere in
/// `body`, nested loops and branches included.
pub(crate) fn has_collective(body: &[Stmt]) -> bool {
    body.iter().any(|s| match s {
        Stmt::For { body, .. } => has_collective(body),
        Stmt::If { then, otherwise, .. } => has_collective(then) || has_collective(otherwise),
        s => s.is_collective(),
    })
}

impl Block {
    /// Run `f` on the machine as thread `t` (its variables and arrays swapped in).
    fn as_thread<R>(&mut self, m: &mut Machine, t: u32, f: impl FnOnce(&mut Machine) -> R) -> R {
        let s = &mut self.states[t as usize];
        std::mem::swap(&mut m.vars, &mut s.vars);
        std::mem::swap(&mut m.arrays, &mut s.arrays);
        m.gpu.as_mut().expect("in a block").thread = t;
        let r = f(m);
        let s = &mut self.states[t as usize];
        std::mem::swap(&mut m.vars, &mut s.vars);
        std::mem::swap(&mut m.arrays, &mut s.arrays);
        r
    }

    /// The block's threads.
    fn threads(&self) -> std::ops::Range<u32> {
        0..self.states.len() as u32
    }

    /// A value every thread of the block must agree on (a barrier's control flow).
    fn uniform(&mut self, m: &mut Machine, what: &str, e: &super::ir::Expr) -> Result<Val, String> {
        let mut seen: Option<Val> = None;
        for t in self.threads() {
            let v = self.as_thread(m, t, |m| m.eval(e))?;
            match seen {
                Some(s) if s != v => {
                    return Err(format!(
                        "{what} around a barrier or warp product differs between threads ({s:?} and {v:?})"
                    ))
                }
                _ => seen = Some(v),
            }
        }
        seen.ok_or_else(|| "a block with no threads".to_string())
    }

    /// Run `body` on every thread of the block. Only uniform control flow leads here (a
    /// loop or `if` around a barrier is checked by [`Block::uniform`]); a barrier or shared
    /// array under thread-dependent control flow is an error of the per-thread machine.
    fn stmts(&mut self, m: &mut Machine, body: &[Stmt]) -> Result<(), String> {
        for s in body {
            match s {
                Stmt::Barrier => m.gpu.as_mut().expect("in a block").barrier(),
                Stmt::Shared { var, len, .. } => m.gpu.as_mut().expect("in a block").declare(*var, *len),
                Stmt::Mma { input, acc, a, b } => self.mma(*input, acc, a, b)?,
                Stmt::For { var, extent, body, .. } if has_collective(body) => {
                    let n = self.uniform(m, "a loop's extent", extent)?.i()?;
                    for i in 0..n {
                        for state in &mut self.states {
                            state.vars.insert(*var, Val::I(i));
                        }
                        self.stmts(m, body)?;
                    }
                }
                Stmt::If { cond, then, otherwise } if has_collective(then) || has_collective(otherwise) => {
                    let c = self.uniform(m, "an `if` condition", cond)?.b()?;
                    self.stmts(m, if c { then } else { otherwise })?;
                }
                _ => {
                    let all: Vec<u32> = self.threads().collect();
                    for t in self.order.shuffled(&all) {
                        self.as_thread(m, t, |m| m.stmt(s)).map_err(|e| format!("thread {t}: {e}"))?;
                    }
                }
            }
        }
        Ok(())
    }

    /// A warp's matrix product for every warp of the block (see `kernel::mma`).
    fn mma(&mut self, input: Elem, acc: &[Var; 4], a: &[Var; 8], b: &[Var; 4]) -> Result<(), String> {
        let threads = self.states.len();
        if !threads.is_multiple_of(mma::WARP) {
            return Err(format!("a warp's matrix product in a block of {threads} threads, not whole warps"));
        }
        let read = |state: &ThreadState, v: Var| -> Result<f32, String> {
            match state.vars.get(v) {
                Some(Val::F(x)) => Ok(*x),
                Some(other) => Err(format!("a warp's matrix product reads {v} = {other:?}, not an f32")),
                None => Err(format!("a warp's matrix product reads {v}, which this thread has not defined")),
            }
        };
        for warp in self.states.chunks_mut(mma::WARP) {
            let (mut fa, mut fb, mut fc) = ([[0f32; 8]; mma::WARP], [[0f32; 4]; mma::WARP], [[0f32; 4]; mma::WARP]);
            for (lane, state) in warp.iter().enumerate() {
                for i in 0..8 {
                    fa[lane][i] = read(state, a[i])?;
                }
                for i in 0..4 {
                    fb[lane][i] = read(state, b[i])?;
                    fc[lane][i] = read(state, acc[i])?;
                }
            }
            mma::warp_product(input, &fa, &fb, &mut fc)?;
            for (lane, state) in warp.iter_mut().enumerate() {
                for i in 0..4 {
                    state.vars.insert(acc[i], Val::F(fc[lane][i]));
                }
            }
        }
        Ok(())
    }
}
