//! A rewrite of the kernel IR for CPUs: a vector loop over output columns whose body
//! reduces over an inner serial loop (a dot product per column, with its Kahan
//! compensation) is turned inside out, so the columns become the innermost loop:
//!
//! The reduction may be a nest of serial loops (a sum over batch and tokens: a weight's
//! gradient); the column loop goes inside the innermost one.
//!
//! ```text
//! for vector c in 0..E {                  acc[E], comp[E] (local arrays)
//!   var acc = 0; var comp = 0             for vector c { acc[c] = 0; comp[c] = 0 }
//!   for k in 0..K { acc, comp ← … }   →   for k in 0..K { for vector c { acc[c], comp[c] ← … } }
//!   out[c] = f(acc)                       for vector c { out[c] = f(acc[c]) }
//! }
//! ```
//!
//! Each column still adds its terms in the same order, so results are bit-identical; but
//! the inner loop now has no loop-carried dependence across iterations, which LLVM's loop
//! vectorizer turns into SIMD code (a serial reduction cannot be vectorized without
//! reassociating floating-point sums). Only constant column counts are rewritten (the
//! accumulators become arrays of that length). GPU schedules are left as they are.

use super::ir::{Expr, Kernel, LoopKind, Stmt, Var};
use std::collections::HashMap;

/// Columns above this stay as they are (the accumulator arrays live on the stack).
const MAX_COLUMNS: i64 = 4096;

/// `k` with every matching vector loop interchanged with its reduction.
pub fn interchange_reductions(k: &Kernel) -> Kernel {
    let mut next = k.next_var();
    let body = rewrite(k.body.clone(), &mut next);
    Kernel { body, ..k.clone() }
}

fn rewrite(stmts: Vec<Stmt>, next: &mut u32) -> Vec<Stmt> {
    let mut out = Vec::with_capacity(stmts.len());
    for s in stmts {
        match s {
            Stmt::For { var, extent: Expr::I64(e), kind: LoopKind::Vector, body } if e > 0 && e <= MAX_COLUMNS => {
                match interchange(var, e, &body, next) {
                    Some(stmts) => out.extend(stmts),
                    None => out.push(Stmt::For {
                        var,
                        extent: Expr::I64(e),
                        kind: LoopKind::Vector,
                        body: rewrite(body, next),
                    }),
                }
            }
            Stmt::For { var, extent, kind, body } => {
                out.push(Stmt::For { var, extent, kind, body: rewrite(body, next) })
            }
            Stmt::If { cond, then, otherwise } => {
                out.push(Stmt::If { cond, then: rewrite(then, next), otherwise: rewrite(otherwise, next) })
            }
            other => out.push(other),
        }
    }
    out
}

/// The interchanged form of `for vector c in 0..e { body }`, if `body` is
/// `Let…/Mut… ; for k { Let…/Assign… } ; rest` with the loop's assignments all to those
/// accumulators, its extent independent of the column, and `rest` not assigning them.
fn interchange(c: Var, e: i64, body: &[Stmt], next: &mut u32) -> Option<Vec<Stmt>> {
    let split = body.iter().position(|s| matches!(s, Stmt::For { .. }))?;
    let (prefix, rest) = body.split_at(split);
    let reduction = &rest[0];
    let suffix = &rest[1..];
    let mut accs: Vec<(Var, crate::kernel::Scalar, Expr)> = Vec::new();
    // The prefix's lets that depend on the column (directly or through another).
    let mut lets: Vec<Var> = Vec::new();
    for s in prefix {
        match s {
            Stmt::Mut { var, ty, init } => accs.push((*var, *ty, init.clone())),
            Stmt::Let { var, value } => {
                let mut d = false;
                value.visit_vars(&mut |v| d |= v == c || lets.contains(&v) || accs.iter().any(|(a, _, _)| *a == v));
                if d {
                    lets.push(*var);
                }
            }
            _ => return None,
        }
    }
    if accs.is_empty() {
        return None;
    }
    let is_acc = |v: &Var| accs.iter().any(|(a, _, _)| a == v);
    // The reduction's extents (and what they read) must not depend on the column.
    let depends = |x: &Expr| {
        let mut d = false;
        x.visit_vars(&mut |v| d |= v == c || lets.contains(&v) || is_acc(&v));
        d
    };
    let (innermost, assigned) = innermost_body(reduction, &depends, &is_acc)?;
    if !assigned || assigns_any(suffix, &is_acc) {
        return None;
    }
    // One array per accumulator.
    let arrays: HashMap<Var, Var> = accs
        .iter()
        .map(|(a, _, _)| {
            *next += 1;
            (*a, Var(*next))
        })
        .collect();
    let col = Expr::Var(c);
    // Lets of the column stay in each column loop; the others (the reduction's extents
    // may read them) come first, once.
    let column_let = |s: &&Stmt| matches!(s, Stmt::Let { var, .. } if lets.contains(var));
    let lets_only: Vec<Stmt> = prefix.iter().filter(column_let).cloned().collect();
    let mut out: Vec<Stmt> =
        prefix.iter().filter(|s| matches!(s, Stmt::Let { .. }) && !column_let(s)).cloned().collect();
    out.extend(accs.iter().map(|(a, ty, _)| Stmt::Array { var: arrays[a], elem: *ty, len: e as usize }));
    let mut init = lets_only.clone();
    for (a, _, value) in &accs {
        init.push(Stmt::StoreArray { array: arrays[a], index: col.clone(), value: subst(value, &arrays, &col) });
    }
    out.push(Stmt::For { var: c, extent: Expr::I64(e), kind: LoopKind::Vector, body: init });
    let mut inner = lets_only.clone();
    inner.extend(innermost.iter().map(|s| subst_stmt(s, &arrays, &col)));
    let columns = Stmt::For { var: c, extent: Expr::I64(e), kind: LoopKind::Vector, body: inner };
    out.push(with_innermost(reduction, columns));
    let mut tail = lets_only;
    tail.extend(suffix.iter().map(|s| subst_stmt(s, &arrays, &col)));
    out.push(Stmt::For { var: c, extent: Expr::I64(e), kind: LoopKind::Vector, body: rewrite(tail, next) });
    Some(out)
}

/// The innermost body of a reduction nest — serial loops, each body either `Let…` then
/// one inner loop, or (innermost) `Let…/Assign…` to accumulators — and whether it
/// assigns one. `None` when `s` is not such a nest, or an extent or a `Let` between
/// loops `depends` on the column (those stay outside the column loop).
fn innermost_body<'a>(
    s: &'a Stmt,
    depends: &dyn Fn(&Expr) -> bool,
    is_acc: &dyn Fn(&Var) -> bool,
) -> Option<(&'a [Stmt], bool)> {
    let Stmt::For { extent, kind: LoopKind::Serial, body, .. } = s else { return None };
    if depends(extent) {
        return None;
    }
    if let Some((last @ Stmt::For { .. }, lets)) = body.split_last() {
        let pure_lets = lets.iter().all(|s| matches!(s, Stmt::Let { value, .. } if !depends(value)));
        return if pure_lets { innermost_body(last, depends, is_acc) } else { None };
    }
    let mut assigned = false;
    for s in body {
        match s {
            Stmt::Let { .. } => {}
            Stmt::Assign { var, .. } if is_acc(var) => assigned = true,
            _ => return None,
        }
    }
    Some((body, assigned))
}

/// The nest `s` (accepted by [`innermost_body`]) with its innermost body replaced by `inner`.
fn with_innermost(s: &Stmt, inner: Stmt) -> Stmt {
    let Stmt::For { var, extent, kind, body } = s else { unreachable!("a loop nest") };
    let body = match body.split_last() {
        Some((last @ Stmt::For { .. }, lets)) => {
            let mut b = lets.to_vec();
            b.push(with_innermost(last, inner));
            b
        }
        _ => vec![inner],
    };
    Stmt::For { var: *var, extent: extent.clone(), kind: *kind, body }
}

fn assigns_any(stmts: &[Stmt], is_acc: &dyn Fn(&Var) -> bool) -> bool {
    stmts.iter().any(|s| match s {
        Stmt::Assign { var, .. } | Stmt::Mut { var, .. } | Stmt::Let { var, .. } => is_acc(var),
        Stmt::For { body, .. } => assigns_any(body, is_acc),
        Stmt::If { then, otherwise, .. } => assigns_any(then, is_acc) || assigns_any(otherwise, is_acc),
        _ => false,
    })
}

/// `s` with accumulator reads turned into array loads and assignments into array stores.
pub(crate) fn subst_stmt(s: &Stmt, arrays: &HashMap<Var, Var>, col: &Expr) -> Stmt {
    let e = |x: &Expr| subst(x, arrays, col);
    match s {
        Stmt::Assign { var, value } if arrays.contains_key(var) => {
            Stmt::StoreArray { array: arrays[var], index: col.clone(), value: e(value) }
        }
        Stmt::Assign { var, value } => Stmt::Assign { var: *var, value: e(value) },
        Stmt::Let { var, value } => Stmt::Let { var: *var, value: e(value) },
        Stmt::Mut { var, ty, init } => Stmt::Mut { var: *var, ty: *ty, init: e(init) },
        Stmt::Store { buffer, index, value } => Stmt::Store { buffer: *buffer, index: e(index), value: e(value) },
        Stmt::StoreArray { array, index, value } => {
            Stmt::StoreArray { array: *array, index: e(index), value: e(value) }
        }
        Stmt::For { var, extent, kind, body } => Stmt::For {
            var: *var,
            extent: e(extent),
            kind: *kind,
            body: body.iter().map(|s| subst_stmt(s, arrays, col)).collect(),
        },
        Stmt::If { cond, then, otherwise } => Stmt::If {
            cond: e(cond),
            then: then.iter().map(|s| subst_stmt(s, arrays, col)).collect(),
            otherwise: otherwise.iter().map(|s| subst_stmt(s, arrays, col)).collect(),
        },
        // Block-kernel statements: CPU loop nests, which this pass rewrites, have none.
        Stmt::Array { .. } | Stmt::Shared { .. } | Stmt::Barrier | Stmt::Mma { .. } => s.clone(),
    }
}

fn subst(x: &Expr, arrays: &HashMap<Var, Var>, col: &Expr) -> Expr {
    let r = |y: &Expr| Box::new(subst(y, arrays, col));
    match x {
        Expr::Var(v) if arrays.contains_key(v) => Expr::LoadArray { array: arrays[v], index: Box::new(col.clone()) },
        Expr::Var(_) | Expr::F32(_) | Expr::I64(_) | Expr::Bool(_) | Expr::Size(_) | Expr::Thread => x.clone(),
        Expr::Load { buffer, index } => Expr::Load { buffer: *buffer, index: r(index) },
        Expr::LoadArray { array, index } => Expr::LoadArray { array: *array, index: r(index) },
        Expr::Unary(u, a) => Expr::Unary(*u, r(a)),
        Expr::Binary(b, a, c) => Expr::Binary(*b, r(a), r(c)),
        Expr::Select(c, a, b) => Expr::Select(r(c), r(a), r(b)),
        Expr::MulAdd(a, b, c) => Expr::MulAdd(r(a), r(b), r(c)),
        Expr::Cast(t, a) => Expr::Cast(*t, r(a)),
        Expr::DropoutKeep { seed, salt, index, step, rate } => {
            Expr::DropoutKeep { seed: r(seed), salt: *salt, index: r(index), step: r(step), rate: *rate }
        }
    }
}
