//! A rewrite of the kernel IR for CPUs: a serial reduction loop (a row norm's sum of
//! squares, a softmax's maximum and sum, a mean) is dealt to [`LANES`] interleaved
//! partial results, so that its body becomes a vector loop over the lanes:
//!
//! ```text
//! var s = 0; var c = 0                  var s = 0; var c = 0
//! for x in 0..E {                       S[LANES] = 0; C[LANES] = 0   (local arrays)
//!   s, c ← Kahan(s, c, f(x))      →     for xo in 0..E/LANES { for vector l { x = xo·LANES + l; S[l], C[l] ← Kahan(…, f(x)) } }
//! }                                     for vector l in 0..E mod LANES { x = E/LANES·LANES + l; … }
//!                                       for l in 0..LANES { s, c ← Kahan(s, c, S[l] − C[l]) }
//! ```
//!
//! The loops it applies to are those `kernel::blocks` deals to a GPU block's threads
//! ([`reduction`]): serial loops whose only effects are updates of accumulators declared
//! before them, `a = a ⊕ e` (⊕ = +, max, min) or a Kahan sum, here from any value (a sum
//! carried over from an earlier loop: the lanes start from the identity and are folded
//! into it). A serial
//! sum is a chain of dependent additions (four per term when compensated, ~16 cycles),
//! which no compiler may reorder; the lanes are independent, and LLVM keeps them in one
//! vector register. The result is deterministic (element `x` always goes to lane
//! `x mod LANES`) but adds in another order than the serial loop: maxima and minima are
//! the same, sums agree to rounding (a compensated sum stays compensated, lane by lane
//! and in the combination).

use super::blocks::{reduction, Accumulator};
use super::interchange::subst_stmt;
use super::ir::{Binary, Expr, Kernel, LoopKind, Scalar, Stmt, Var};
use std::collections::HashMap;

/// Partial results per reduction: one AVX-512 register of f32.
pub const LANES: i64 = 16;

/// Loops shorter than this stay serial (their lanes would be mostly empty).
const MIN_EXTENT: i64 = 2 * LANES;

/// `k` with every qualifying reduction dealt to lanes.
pub fn deal_reductions(k: &Kernel) -> Kernel {
    if k.gemm.is_some() || k.threads.is_some() {
        return k.clone();
    }
    let mut next = k.next_var();
    Kernel { body: rewrite(&k.body, &HashMap::new(), &mut next), ..k.clone() }
}

/// `stmts` rewritten; `declared` holds the accumulators declared in enclosing scopes
/// (the lanes fold into an accumulator's current value, so it may hold anything).
fn rewrite(stmts: &[Stmt], declared: &HashMap<Var, Expr>, next: &mut u32) -> Vec<Stmt> {
    let mut declared = declared.clone();
    let mut out = Vec::with_capacity(stmts.len());
    for s in stmts {
        if let Stmt::Mut { var, init, .. } = s {
            declared.insert(*var, init.clone());
        }
        // Innermost loops only: dealing an outer loop (a batch axis around the tokens) to
        // lanes would vectorize nothing.
        let long = matches!(s, Stmt::For { extent, body, .. }
            if !matches!(extent, Expr::I64(e) if *e < MIN_EXTENT) && !body.iter().any(|s| matches!(s, Stmt::For { .. })));
        match reduction(s, &declared, false).filter(|_| long) {
            Some(accumulators) => out.extend(dealt(s, &accumulators, next)),
            None => out.push(match s {
                Stmt::For { var, extent, kind, body } => {
                    Stmt::For { var: *var, extent: extent.clone(), kind: *kind, body: rewrite(body, &declared, next) }
                }
                Stmt::If { cond, then, otherwise } => Stmt::If {
                    cond: cond.clone(),
                    then: rewrite(then, &declared, next),
                    otherwise: rewrite(otherwise, &declared, next),
                },
                other => other.clone(),
            }),
        }
    }
    out
}

fn fresh(next: &mut u32) -> Var {
    let v = Var(*next);
    *next += 1;
    v
}

/// The lane form of reduction loop `s` (see the module documentation).
fn dealt(s: &Stmt, accumulators: &[Accumulator], next: &mut u32) -> Vec<Stmt> {
    let Stmt::For { var: x, extent, body, .. } = s else { unreachable!("a reduction is a loop") };
    // One lane array per accumulator and per compensation.
    let mut arrays: HashMap<Var, Var> = HashMap::new();
    let mut out = Vec::new();
    let lanes = Expr::I64(LANES);
    let l = fresh(next);
    let mut init = Vec::new();
    for a in accumulators {
        for (v, value) in std::iter::once((a.var, identity(a.op))).chain(a.comp.map(|c| (c, Expr::F32(0.0)))) {
            let arr = fresh(next);
            arrays.insert(v, arr);
            out.push(Stmt::Array { var: arr, elem: Scalar::F32, len: LANES as usize });
            init.push(Stmt::StoreArray { array: arr, index: Expr::Var(l), value });
        }
    }
    out.push(Stmt::For { var: l, extent: lanes.clone(), kind: LoopKind::Vector, body: init });
    let lane_body = |first: Expr, l: Var| -> Vec<Stmt> {
        let mut b = vec![Stmt::Let { var: *x, value: Expr::binary(Binary::Add, first, Expr::Var(l)) }];
        b.extend(body.iter().map(|s| subst_stmt(s, &arrays, &Expr::Var(l))));
        b
    };
    // Whole rounds of LANES elements, then the rest.
    let full = Expr::binary(Binary::Div, extent.clone(), lanes.clone());
    let (xo, l) = (fresh(next), fresh(next));
    let round = lane_body(Expr::binary(Binary::Mul, Expr::Var(xo), lanes.clone()), l);
    out.push(Stmt::For {
        var: xo,
        extent: full.clone(),
        kind: LoopKind::Serial,
        body: vec![Stmt::For { var: l, extent: lanes.clone(), kind: LoopKind::Vector, body: round }],
    });
    let l = fresh(next);
    let rest = lane_body(Expr::binary(Binary::Mul, full, lanes.clone()), l);
    let rest_len = Expr::binary(Binary::Rem, extent.clone(), lanes.clone());
    out.push(Stmt::For { var: l, extent: rest_len, kind: LoopKind::Vector, body: rest });
    // The lanes into the accumulators, in lane order.
    let l = fresh(next);
    let mut fold = Vec::new();
    for a in accumulators {
        let lane = Expr::load_array(arrays[&a.var], Expr::Var(l));
        match a.comp {
            None => fold.push(Stmt::Assign { var: a.var, value: Expr::binary(a.op, Expr::Var(a.var), lane) }),
            Some(c) => {
                // The lane's value is its sum less its compensation; added compensated.
                let term = Expr::binary(Binary::Sub, lane, Expr::load_array(arrays[&c], Expr::Var(l)));
                let (y, t) = (fresh(next), fresh(next));
                fold.push(Stmt::Let { var: y, value: Expr::binary(Binary::Sub, term, Expr::Var(c)) });
                fold.push(Stmt::Let { var: t, value: Expr::binary(Binary::Add, Expr::Var(a.var), Expr::Var(y)) });
                let lost =
                    Expr::binary(Binary::Sub, Expr::binary(Binary::Sub, Expr::Var(t), Expr::Var(a.var)), Expr::Var(y));
                fold.push(Stmt::Assign { var: c, value: lost });
                fold.push(Stmt::Assign { var: a.var, value: Expr::Var(t) });
            }
        }
    }
    out.push(Stmt::For { var: l, extent: lanes, kind: LoopKind::Serial, body: fold });
    out
}

fn identity(op: Binary) -> Expr {
    Expr::F32(match op {
        Binary::Max => f32::NEG_INFINITY,
        Binary::Min => f32::INFINITY,
        _ => 0.0,
    })
}
