//! A rewrite of the kernel IR for CPUs: a vector loop over axes that a reshape merged
//! (heads × head width = 256 channels, say) is split into a serial loop over the outer
//! axis and a vector loop over the inner one, when its body takes the merged index apart
//! with `/ C` and `% C`:
//!
//! ```text
//! for vector c in 0..256 {              for o in 0..4 {
//!   let h = c / 64                        for vector i in 0..64 {
//!   let d = c % 64                   →      let c = o·64 + i
//!   … x[d + 64·n + h·64·N] …                let h = o; let d = i
//! }                                         … x[d + 64·n + h·64·N] …
//!                                         }
//!                                       }
//! ```
//!
//! Before it, each lane's index into the per-head layout was `c % 64 + (c / 64)·64·N`,
//! which the vectorizer cannot prove contiguous, so every load was a gather (or the loop
//! stayed scalar). After it the inner loop reads and writes contiguous runs: bf16 casts
//! that merge heads (a linear attention's gradient into the projection's layout) went
//! from 2 ms to a fraction of that per launch (T1, 2,048 tokens × 256 channels).
//!
//! It applies to vector loops of constant extent whose body only binds values and stores
//! (no accumulators: the order of every operation is unchanged, so results are bit for
//! bit the same), and whose index is divided or reduced by exactly one constant `C` that
//! divides the extent and is at least one vector register of f32 wide.

use super::ir::{Binary, Expr, Kernel, LoopKind, Stmt, Var};

/// The narrowest inner loop worth making: one AVX-512 register of f32.
const MIN_INNER: i64 = 16;

/// `k` with every qualifying vector loop split.
pub fn split_vector_loops(k: &Kernel) -> Kernel {
    if k.gemm.is_some() || k.threads.is_some() {
        return k.clone();
    }
    let mut next = k.next_var();
    Kernel { body: block(&k.body, &mut next), ..k.clone() }
}

fn block(stmts: &[Stmt], next: &mut u32) -> Vec<Stmt> {
    stmts.iter().map(|s| stmt(s, next)).collect()
}

fn stmt(s: &Stmt, next: &mut u32) -> Stmt {
    match s {
        Stmt::For { var, extent: Expr::I64(e), kind: LoopKind::Vector, body } => match inner_width(*var, *e, body) {
            Some(c) => {
                let (outer, inner) = (Var(*next), Var(*next + 1));
                *next += 2;
                let index = Expr::binary(
                    Binary::Add,
                    Expr::binary(Binary::Mul, Expr::Var(outer), Expr::I64(c)),
                    Expr::Var(inner),
                );
                let mut inner_body = vec![Stmt::Let { var: *var, value: index }];
                inner_body.extend(body.iter().map(|s| split_index(s, *var, c, (outer, inner))));
                Stmt::For {
                    var: outer,
                    extent: Expr::I64(e / c),
                    kind: LoopKind::Serial,
                    body: vec![Stmt::For {
                        var: inner,
                        extent: Expr::I64(c),
                        kind: LoopKind::Vector,
                        body: inner_body,
                    }],
                }
            }
            None => s.clone(),
        },
        Stmt::For { var, extent, kind, body } => {
            Stmt::For { var: *var, extent: extent.clone(), kind: *kind, body: block(body, next) }
        }
        Stmt::If { cond, then, otherwise } => {
            Stmt::If { cond: cond.clone(), then: block(then, next), otherwise: block(otherwise, next) }
        }
        _ => s.clone(),
    }
}

/// The constant `C` to split a vector loop over `v` in `0..extent` by, if it qualifies.
fn inner_width(v: Var, extent: i64, body: &[Stmt]) -> Option<i64> {
    let mut widths = Vec::new();
    for s in body {
        match s {
            Stmt::Let { value, .. } => divisors(value, v, &mut widths),
            Stmt::Store { index, value, .. } => {
                divisors(index, v, &mut widths);
                divisors(value, v, &mut widths)
            }
            _ => return None,
        }
    }
    widths.sort_unstable();
    widths.dedup();
    match widths[..] {
        [c] if c >= MIN_INNER && c < extent && extent % c == 0 => Some(c),
        _ => None,
    }
}

/// Every `C` in `v / C` or `v % C` within `e`.
fn divisors(e: &Expr, v: Var, out: &mut Vec<i64>) {
    if let Expr::Binary(Binary::Div | Binary::Rem, a, b) = e {
        if let (Expr::Var(x), Expr::I64(c)) = (&**a, &**b) {
            if *x == v {
                out.push(*c);
                return;
            }
        }
    }
    match e {
        Expr::Load { index, .. } | Expr::LoadArray { index, .. } => divisors(index, v, out),
        Expr::Unary(_, a) | Expr::Cast(_, a) => divisors(a, v, out),
        Expr::Binary(_, a, b) => {
            divisors(a, v, out);
            divisors(b, v, out)
        }
        Expr::Select(c, a, b) | Expr::MulAdd(c, a, b) => {
            divisors(c, v, out);
            divisors(a, v, out);
            divisors(b, v, out)
        }
        Expr::DropoutKeep { seed, index, step, .. } => {
            divisors(seed, v, out);
            divisors(index, v, out);
            divisors(step, v, out)
        }
        Expr::Var(_) | Expr::F32(_) | Expr::I64(_) | Expr::Bool(_) | Expr::Size(_) | Expr::Thread => {}
    }
}

/// A statement of the loop's body (a `Let` or a `Store`) with `v / c` read as `outer` and
/// `v % c` as `inner`, which they equal where `v = outer·c + inner`, `0 ≤ inner < c`.
fn split_index(s: &Stmt, v: Var, c: i64, parts: (Var, Var)) -> Stmt {
    let e = |x: &Expr| split_expr(x, v, c, parts);
    match s {
        Stmt::Let { var, value } => Stmt::Let { var: *var, value: e(value) },
        Stmt::Store { buffer, index, value } => Stmt::Store { buffer: *buffer, index: e(index), value: e(value) },
        _ => unreachable!("inner_width admits only lets and stores"),
    }
}

fn split_expr(x: &Expr, v: Var, c: i64, parts: (Var, Var)) -> Expr {
    if let Expr::Binary(op @ (Binary::Div | Binary::Rem), a, b) = x {
        if matches!((&**a, &**b), (Expr::Var(y), Expr::I64(d)) if *y == v && *d == c) {
            return Expr::Var(if *op == Binary::Div { parts.0 } else { parts.1 });
        }
    }
    let r = |y: &Expr| Box::new(split_expr(y, v, c, parts));
    match x {
        Expr::Load { buffer, index } => Expr::Load { buffer: *buffer, index: r(index) },
        Expr::LoadArray { array, index } => Expr::LoadArray { array: *array, index: r(index) },
        Expr::Unary(u, a) => Expr::Unary(*u, r(a)),
        Expr::Cast(t, a) => Expr::Cast(*t, r(a)),
        Expr::Binary(op, a, b) => Expr::Binary(*op, r(a), r(b)),
        Expr::Select(p, a, b) => Expr::Select(r(p), r(a), r(b)),
        Expr::MulAdd(a, b, c) => Expr::MulAdd(r(a), r(b), r(c)),
        Expr::DropoutKeep { seed, salt, index, step, rate } => {
            Expr::DropoutKeep { seed: r(seed), salt: *salt, index: r(index), step: r(step), rate: *rate }
        }
        Expr::Var(_) | Expr::F32(_) | Expr::I64(_) | Expr::Bool(_) | Expr::Size(_) | Expr::Thread => x.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::exec::{self, Buffer};
    use crate::kernel::ir::{Access, BufferDecl, Elem};
    use crate::kernel::print::to_text;

    fn buffer(name: &str, access: Access) -> BufferDecl {
        BufferDecl { name: name.into(), elem: Elem::F32, access }
    }

    /// A kernel that merges 4 heads of 64 channels into rows of 256 (`y[n, h·64 + d] =
    /// 2·x[h, n, d]`), the shape of a bf16 cast after a linear attention.
    fn merge_heads(n: i64) -> Kernel {
        let (v, c, h, d) = (Var(0), Var(1), Var(2), Var(3));
        let var = |x: Var| Expr::Var(x);
        let bin = Expr::binary;
        let src = bin(
            Binary::Add,
            bin(Binary::Add, var(d), bin(Binary::Mul, var(v), Expr::I64(64))),
            bin(Binary::Mul, var(h), Expr::I64(64 * n)),
        );
        let dst = bin(Binary::Add, var(c), bin(Binary::Mul, var(v), Expr::I64(256)));
        let value = bin(Binary::Mul, Expr::F32(2.0), Expr::Load { buffer: 0, index: Box::new(src) });
        Kernel {
            name: "merge".into(),
            buffers: vec![buffer("x", Access::Read), buffer("y", Access::Write)],
            sizes: vec![],
            scalars: vec![],
            index: v,
            extent: Expr::I64(n),
            body: vec![Stmt::For {
                var: c,
                extent: Expr::I64(256),
                kind: LoopKind::Vector,
                body: vec![
                    Stmt::Let { var: h, value: bin(Binary::Div, var(c), Expr::I64(64)) },
                    Stmt::Let { var: d, value: bin(Binary::Rem, var(c), Expr::I64(64)) },
                    Stmt::Store { buffer: 1, index: dst, value },
                ],
            }],
            gemm: None,
            threads: None,
        }
    }

    #[test]
    fn a_merged_axis_is_split_and_gives_the_same_values() {
        let k = merge_heads(3);
        let split = split_vector_loops(&k);
        let Stmt::For { kind: LoopKind::Serial, extent: Expr::I64(4), body, .. } = &split.body[0] else {
            panic!("expected a serial loop over the 4 heads:\n{}", to_text(&split));
        };
        assert!(
            matches!(&body[0], Stmt::For { kind: LoopKind::Vector, extent: Expr::I64(64), .. }),
            "expected a vector loop over 64 channels:\n{}",
            to_text(&split)
        );
        let x: Vec<f32> = (0..4 * 3 * 64).map(|i| i as f32 * 0.5 - 7.0).collect();
        let run = |k: &Kernel| {
            let mut bufs = [Buffer::F32(x.clone()), Buffer::F32(vec![0.0; 3 * 256])];
            exec::run_all(k, &mut bufs, &[]).unwrap();
            bufs[1].widened().unwrap()
        };
        let (want, got) = (run(&k), run(&split));
        assert_eq!(got, want);
        assert_eq!(want[256 + 64 + 5], 2.0 * x[64 * 3 + 64 + 5], "y[1, 1·64 + 5] = 2·x[1, 1, 5]");
    }

    #[test]
    fn loops_with_accumulators_or_two_widths_stay_as_they_are() {
        let mut k = merge_heads(2);
        let Stmt::For { body, .. } = &mut k.body[0] else { unreachable!() };
        // `c / 32` beside `c % 64`: two widths.
        body[0] = Stmt::Let { var: Var(2), value: Expr::binary(Binary::Div, Expr::Var(Var(1)), Expr::I64(32)) };
        assert_eq!(split_vector_loops(&k), k);
        let mut k = merge_heads(2);
        let Stmt::For { body, .. } = &mut k.body[0] else { unreachable!() };
        body.push(Stmt::Assign { var: Var(9), value: Expr::F32(0.0) });
        assert_eq!(split_vector_loops(&k), k);
    }
}
