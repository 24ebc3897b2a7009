//! The one idiom of block kernels' schedules (`linear_attention_gpu.rs`, the GPU path of
//! `block_attention.rs`): a phase's elements dealt to the block's threads, element
//! `round·T + thread` in each round, so every element has one owner and neighbouring
//! threads take neighbouring elements. Phases that exchange data through shared memory
//! are separated by barriers, which the callers place.

use super::element::Lowering;
use super::emit::{add, bin, div, mul, rem};
use crate::kernel::{Binary, Expr, LoopKind};

/// Threads per block (four warps).
pub const THREADS: u32 = 128;

/// `for round { if round·T + thread < count { body(element) } }`.
pub fn deal(
    lw: &mut Lowering,
    count: Expr,
    body: impl FnOnce(&mut Lowering, Expr) -> Result<(), String>,
) -> Result<(), String> {
    let t = Expr::I64(i64::from(THREADS));
    let rounds = lw.e.bind(div(add(count.clone(), Expr::I64(i64::from(THREADS) - 1)), t.clone()));
    let round = lw.e.open();
    let element = add(mul(Expr::Var(round), t), Expr::Thread);
    let x = lw.e.open_if(element.clone());
    body(lw, Expr::Var(x))?;
    lw.e.close_if(bin(Binary::Lt, element, count));
    lw.e.close(round, rounds, LoopKind::Serial);
    Ok(())
}

/// (row, column) of element `x` of a row-major tile `width` wide.
pub fn split(lw: &mut Lowering, x: &Expr, width: &Expr) -> (Expr, Expr) {
    (lw.e.bind(div(x.clone(), width.clone())), lw.e.bind(rem(x.clone(), width.clone())))
}
