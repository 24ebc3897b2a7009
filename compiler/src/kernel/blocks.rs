//! A rewrite of the kernel IR for GPUs: row kernels become block kernels whose threads
//! share each row's vector loops, so that neighbouring threads touch neighbouring
//! elements (coalesced memory access) instead of each thread walking a row of its own.
//!
//! ```text
//! parallel r in 0..R {                    parallel block r in 0..R, threads 0..T {
//!   let s = Σ …                             let s = Σ …            (every thread)
//!   for vector c in 0..E {          →       for cc in 0..ceil(E/T) {
//!     out[r, c] = f(x[r, c], s)               let c = cc·T + thread
//!   }                                         if c < E { out[r, c] = f(x[r, c], s) }
//! }                                         }
//!                                         }
//! ```
//!
//! A vector loop's iterations are independent by definition (`LoopKind::Vector`), so
//! dealing them to threads is always correct. What stays outside the vector loops (row
//! reductions, lets) is computed by every thread, redundantly but without any
//! communication; kernels whose statements outside vector loops write memory, that read
//! and write one buffer, or that stage values in local arrays (a thread would read
//! another's elements), are left as they are. CPU schedules are not rewritten.

use super::ir::{Binary, Expr, Kernel, LoopKind, Stmt, Var};

/// Threads per block at most (four warps).
pub const MAX_THREADS: u32 = 128;

/// `k` as a block kernel when it qualifies (see the module notes), else unchanged.
pub fn coalesce_rows(k: &Kernel) -> Kernel {
    // A buffer both read and written: a row reduction of one warp could read what another
    // warp's vector loop already overwrote (there is no barrier between them).
    let in_place = k.buffers.iter().any(|b| b.access == super::ir::Access::ReadWrite);
    if k.gemm.is_some() || k.threads.is_some() || in_place || !qualifies(&k.body) {
        return k.clone();
    }
    let threads = threads_for(&k.body);
    let mut next = k.next_var();
    let body = k.body.iter().map(|s| deal(s, threads, &mut next)).collect();
    Kernel { body, threads: Some(threads), ..k.clone() }
}

/// Top-level vector loops to deal, no local arrays anywhere, and no store outside them.
fn qualifies(body: &[Stmt]) -> bool {
    let mut vector_loops = 0;
    for s in body {
        match s {
            Stmt::For { kind: LoopKind::Vector, body, .. } => {
                vector_loops += 1;
                if uses_arrays(body) {
                    return false;
                }
            }
            other => {
                if writes_memory(std::slice::from_ref(other)) || uses_arrays(std::slice::from_ref(other)) {
                    return false;
                }
            }
        }
    }
    vector_loops > 0
}

/// One warp per 32 columns of the widest constant vector loop, up to [`MAX_THREADS`];
/// [`MAX_THREADS`] when a loop's extent is only known at run time.
fn threads_for(body: &[Stmt]) -> u32 {
    let mut widest = 0i64;
    for s in body {
        if let Stmt::For { kind: LoopKind::Vector, extent, .. } = s {
            widest = widest.max(match extent {
                Expr::I64(e) => *e,
                _ => i64::from(MAX_THREADS),
            });
        }
    }
    let warps = (widest.clamp(1, i64::from(MAX_THREADS)) + 31) / 32;
    (warps * 32) as u32
}

fn deal(s: &Stmt, threads: u32, next: &mut u32) -> Stmt {
    let Stmt::For { var, extent, kind: LoopKind::Vector, body } = s else { return s.clone() };
    let t = i64::from(threads);
    let round = Var(*next);
    *next += 1;
    let bin = |op, a, b| Expr::Binary(op, Box::new(a), Box::new(b));
    let rounds = bin(Binary::Div, bin(Binary::Add, extent.clone(), Expr::I64(t - 1)), Expr::I64(t));
    let column = bin(Binary::Add, bin(Binary::Mul, Expr::Var(round), Expr::I64(t)), Expr::Thread);
    Stmt::For {
        var: round,
        extent: rounds,
        kind: LoopKind::Serial,
        body: vec![
            Stmt::Let { var: *var, value: column },
            Stmt::If { cond: bin(Binary::Lt, Expr::Var(*var), extent.clone()), then: body.clone(), otherwise: vec![] },
        ],
    }
}

fn writes_memory(body: &[Stmt]) -> bool {
    body.iter().any(|s| match s {
        Stmt::Store { .. } => true,
        Stmt::For { body, .. } => writes_memory(body),
        Stmt::If { then, otherwise, .. } => writes_memory(then) || writes_memory(otherwise),
        _ => false,
    })
}

fn uses_arrays(body: &[Stmt]) -> bool {
    body.iter().any(|s| match s {
        Stmt::Array { .. } | Stmt::StoreArray { .. } | Stmt::Shared { .. } | Stmt::Barrier => true,
        Stmt::For { extent, body, .. } => reads_array(extent) || uses_arrays(body),
        Stmt::If { cond, then, otherwise } => reads_array(cond) || uses_arrays(then) || uses_arrays(otherwise),
        Stmt::Let { value, .. } | Stmt::Assign { value, .. } => reads_array(value),
        Stmt::Mut { init, .. } => reads_array(init),
        Stmt::Store { index, value, .. } => reads_array(index) || reads_array(value),
    })
}

fn reads_array(e: &Expr) -> bool {
    match e {
        Expr::LoadArray { .. } => true,
        Expr::F32(_) | Expr::I64(_) | Expr::Bool(_) | Expr::Var(_) | Expr::Size(_) | Expr::Thread => false,
        Expr::Load { index, .. } => reads_array(index),
        Expr::Unary(_, a) | Expr::Cast(_, a) => reads_array(a),
        Expr::Binary(_, a, b) => reads_array(a) || reads_array(b),
        Expr::Select(c, a, b) => reads_array(c) || reads_array(a) || reads_array(b),
        Expr::DropoutKeep { seed, index, step, .. } => reads_array(seed) || reads_array(index) || reads_array(step),
    }
}
