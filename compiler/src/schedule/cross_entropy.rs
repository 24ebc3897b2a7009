//! Kernels of the fused cross-entropy (`ir/cross_entropy.rs`): none materializes the
//! logits. A first kernel computes each token's logsumexp with an online maximum over
//! the whole vocabulary (one pass, `m ← max(m, z)`, `s ← s·e^{m_old−m} + e^{z−m}`) into a
//! workspace vector; the op's kernel then sweeps the vocabulary again:
//! - loss: `lse_t − z_{t,y_t}`, parallel over tokens;
//! - dX: `g_t (Σ_v p_tv E_v − E_{y_t})`, parallel over tokens, the row accumulated in a
//!   local array of width D;
//! - dE: `Σ_t g_t (p_tv − [y_t = v]) x_t`, parallel over words, serial over tokens (so
//!   the sum's order, and the result, do not depend on the thread count);
//! - correct: `z_{t,y_t} ≥ max_v z_tv`, parallel over tokens, one sweep (no logsumexp).

use super::element::{Lowering, Source};
use super::emit::{bin, mul, sub};
use crate::ir::{CeOp, NodeId, Op};
use crate::kernel::{Access, Binary, Elem, Expr, Kernel, LoopKind, Scalar, Stmt, Unary};

pub(super) fn which(op: &Op) -> Option<(CeOp, bool)> {
    match op {
        Op::CrossEntropy(c) => Some((CeOp::Loss, c.transposed)),
        Op::CrossEntropyGradX(c) => Some((CeOp::GradX, c.transposed)),
        Op::CrossEntropyGradTable(c) => Some((CeOp::GradTable, c.transposed)),
        Op::CrossEntropyCorrect(c) => Some((CeOp::Correct, c.transposed)),
        _ => None,
    }
}

pub fn is_cross_entropy(op: &Op) -> bool {
    which(op).is_some()
}

/// Whether the op's kernel reads the logsumexp of [`lse_kernel`].
pub fn needs_lse(op: &Op) -> bool {
    matches!(which(op), Some((kind, _)) if kind != CeOp::Correct)
}

/// The per-token accuracy kernel: 1 where the target's logit is a largest one, else 0.
pub fn correct_kernel(lw: &mut Lowering, n: NodeId, name: String) -> Result<(Kernel, Vec<usize>), String> {
    let (_, transposed) = which(&lw.g.node(n).op).ok_or("not a cross-entropy op")?;
    let ops = lw.g.operands(n);
    let x_ty = lw.g.ty(ops[0]).clone();
    let tokens = x_ty.shape[..x_ty.rank() - 1].to_vec();
    let t = lw.unravel(Expr::Var(lw.e.index), &tokens)?;
    let best = lw.e.accumulator(0, Scalar::F32, Expr::F32(f32::NEG_INFINITY));
    let words = lw.e.dim(&vocab(lw, &ops, transposed))?;
    let v = lw.e.open();
    let z = logit(lw, &ops, transposed, &t, Expr::Var(v))?;
    lw.e.push(Stmt::Assign { var: best, value: bin(Binary::Max, Expr::Var(best), z) });
    lw.e.close(v, words, LoopKind::Serial);
    let y = target(lw, &ops, transposed, &t)?;
    let zy = logit(lw, &ops, transposed, &t, y)?;
    let value = Expr::Select(
        Box::new(bin(Binary::Ge, zy, Expr::Var(best))),
        Box::new(Expr::F32(1.0)),
        Box::new(Expr::F32(0.0)),
    );
    let global = lw.stored[&n];
    let out = lw.e.buffer(global, &format!("b{global}"), Elem::F32, Access::Write);
    lw.e.push(Stmt::Store { buffer: out, index: Expr::Var(lw.e.index), value });
    let mut extent = Expr::I64(1);
    for d in &tokens {
        extent = mul(extent, lw.e.dim(d)?);
    }
    super::finish(lw, name, extent)
}

/// `E_v[d]`.
fn table(lw: &mut Lowering, table: NodeId, transposed: bool, v: Expr, d: Expr) -> Result<Expr, String> {
    let at = if transposed { vec![d, v] } else { vec![v, d] };
    lw.value(Source::Node(table), &at)
}

/// `z = x_t · E_v`, accumulated over the hidden width.
fn logit(lw: &mut Lowering, ops: &[NodeId], transposed: bool, t: &[Expr], v: Expr) -> Result<Expr, String> {
    let x_ty = lw.g.ty(ops[0]).clone();
    let width = x_ty.shape[x_ty.rank() - 1].clone();
    let mut at = t.to_vec();
    at.push(v.clone());
    lw.accumulate(Scalar::F32, Expr::F32(0.0), Binary::Add, &at, &[width], |lw, loops| {
        let d = Expr::Var(loops[0]);
        let mut xi = t.to_vec();
        xi.push(d.clone());
        let x = lw.value(Source::Node(ops[0]), &xi)?;
        let e = table(lw, ops[1], transposed, v.clone(), d)?;
        Ok(bin(Binary::Mul, x, e))
    })
}

fn vocab(lw: &Lowering, ops: &[NodeId], transposed: bool) -> crate::ir::Dim {
    let t = &lw.g.ty(ops[1]).shape;
    if transposed {
        t[1].clone()
    } else {
        t[0].clone()
    }
}

/// The target of token `t`, clamped into the vocabulary, as an I64.
pub(super) fn target(lw: &mut Lowering, ops: &[NodeId], transposed: bool, t: &[Expr]) -> Result<Expr, String> {
    let y = lw.value(Source::Node(ops[2]), t)?;
    let v = lw.e.dim(&vocab(lw, ops, transposed))?;
    Ok(lw.e.bind(bin(
        Binary::Max,
        bin(Binary::Min, Expr::Cast(Scalar::I64, Box::new(y)), sub(v, Expr::I64(1))),
        Expr::I64(0),
    )))
}

/// The logsumexp kernel: `lse[t]` for every token, into global buffer `lse`.
pub fn lse_kernel(lw: &mut Lowering, n: NodeId, lse: usize, name: String) -> Result<(Kernel, Vec<usize>), String> {
    let (_, transposed) = which(&lw.g.node(n).op).ok_or("not a cross-entropy op")?;
    let ops = lw.g.operands(n);
    let x_ty = lw.g.ty(ops[0]).clone();
    let tokens = x_ty.shape[..x_ty.rank() - 1].to_vec();
    let t = lw.unravel(Expr::Var(lw.e.index), &tokens)?;
    let m = lw.e.accumulator(0, Scalar::F32, Expr::F32(f32::NEG_INFINITY));
    let s = lw.e.accumulator(0, Scalar::F32, Expr::F32(0.0));
    let words = lw.e.dim(&vocab(lw, &ops, transposed))?;
    let v = lw.e.open();
    let z = logit(lw, &ops, transposed, &t, Expr::Var(v))?;
    let m_new = lw.e.bind(bin(Binary::Max, Expr::Var(m), z.clone()));
    let rescaled = bin(
        Binary::Mul,
        Expr::Var(s),
        Expr::Unary(Unary::Exp, Box::new(bin(Binary::Sub, Expr::Var(m), m_new.clone()))),
    );
    let fresh = Expr::Unary(Unary::Exp, Box::new(bin(Binary::Sub, z, m_new.clone())));
    lw.e.push(Stmt::Assign { var: s, value: bin(Binary::Add, rescaled, fresh) });
    lw.e.push(Stmt::Assign { var: m, value: m_new });
    lw.e.close(v, words, LoopKind::Serial);
    let b = lw.e.buffer(lse, &format!("b{lse}"), Elem::F32, Access::Write);
    let value = bin(Binary::Add, Expr::Var(m), Expr::Unary(Unary::Log, Box::new(Expr::Var(s))));
    lw.e.push(Stmt::Store { buffer: b, index: Expr::Var(lw.e.index), value });
    let mut extent = Expr::I64(1);
    for d in &tokens {
        extent = mul(extent, lw.e.dim(d)?);
    }
    super::finish(lw, name, extent)
}

/// The op's own kernel, reading `lse` (global buffer) computed by [`lse_kernel`].
pub fn op_kernel(lw: &mut Lowering, n: NodeId, lse: usize, name: String) -> Result<(Kernel, Vec<usize>), String> {
    let (kind, transposed) = which(&lw.g.node(n).op).ok_or("not a cross-entropy op")?;
    let ops = lw.g.operands(n);
    let out_ty = lw.g.ty(n).clone();
    let x_ty = lw.g.ty(ops[0]).clone();
    let tokens = x_ty.shape[..x_ty.rank() - 1].to_vec();
    let width = x_ty.shape[x_ty.rank() - 1].clone();
    let d_len = width.as_const().ok_or("the hidden width must be a constant")? as usize;
    let lse_b = lw.e.buffer(lse, &format!("b{lse}"), Elem::F32, Access::Read);
    let global = lw.stored[&n];
    let out = lw.e.buffer(global, &format!("b{global}"), Elem::F32, Access::Write);
    let words = lw.e.dim(&vocab(lw, &ops, transposed))?;
    let mut token_count = Expr::I64(1);
    for d in &tokens {
        token_count = mul(token_count, lw.e.dim(d)?);
    }
    match kind {
        CeOp::Loss => {
            let t = lw.unravel(Expr::Var(lw.e.index), &tokens)?;
            let y = target(lw, &ops, transposed, &t)?;
            let z = logit(lw, &ops, transposed, &t, y)?;
            let lse = Expr::Load { buffer: lse_b, index: Box::new(Expr::Var(lw.e.index)) };
            lw.e.push(Stmt::Store { buffer: out, index: Expr::Var(lw.e.index), value: bin(Binary::Sub, lse, z) });
            super::finish(lw, name, token_count)
        }
        CeOp::GradX => {
            // Σ_v (p_tv − [v = y_t]) E_v, accumulated term by term: subtracting E_y at the
            // end instead would cancel catastrophically when p_ty is close to 1.
            let t = lw.unravel(Expr::Var(lw.e.index), &tokens)?;
            let acc = lw.e.fresh();
            lw.e.push(Stmt::Array { var: acc, elem: Scalar::F32, len: d_len });
            let lse = lw.e.bind(Expr::Load { buffer: lse_b, index: Box::new(Expr::Var(lw.e.index)) });
            let y = target(lw, &ops, transposed, &t)?;
            let v = lw.e.open();
            let z = logit(lw, &ops, transposed, &t, Expr::Var(v))?;
            let p = Expr::Unary(Unary::Exp, Box::new(bin(Binary::Sub, z, lse.clone())));
            let hit = Expr::Select(
                Box::new(bin(Binary::Eq, y.clone(), Expr::Var(v))),
                Box::new(Expr::F32(1.0)),
                Box::new(Expr::F32(0.0)),
            );
            let c = lw.e.bind(bin(Binary::Sub, p, hit));
            let d = lw.e.open();
            let e = table(lw, ops[1], transposed, Expr::Var(v), Expr::Var(d))?;
            let old = Expr::LoadArray { array: acc, index: Box::new(Expr::Var(d)) };
            lw.e.push(Stmt::StoreArray {
                array: acc,
                index: Expr::Var(d),
                value: bin(Binary::Add, old, bin(Binary::Mul, c, e)),
            });
            lw.e.close(d, Expr::I64(d_len as i64), LoopKind::Vector);
            lw.e.close(v, words, LoopKind::Serial);
            let g = lw.value(Source::Node(ops[3]), &t)?;
            let d = lw.e.open();
            let sum = Expr::LoadArray { array: acc, index: Box::new(Expr::Var(d)) };
            let mut at = t.clone();
            at.push(Expr::Var(d));
            let lin = lw.linear(&at, &out_ty.shape)?;
            lw.e.push(Stmt::Store { buffer: out, index: lin, value: bin(Binary::Mul, g, sum) });
            lw.e.close(d, Expr::I64(d_len as i64), LoopKind::Vector);
            super::finish(lw, name, token_count)
        }
        CeOp::GradTable => {
            let v = Expr::Var(lw.e.index);
            let acc = lw.e.fresh();
            lw.e.push(Stmt::Array { var: acc, elem: Scalar::F32, len: d_len });
            let tt = lw.e.open();
            let t = lw.unravel(Expr::Var(tt), &tokens)?;
            let z = logit(lw, &ops, transposed, &t, v.clone())?;
            let lse = Expr::Load { buffer: lse_b, index: Box::new(Expr::Var(tt)) };
            let p = Expr::Unary(Unary::Exp, Box::new(bin(Binary::Sub, z, lse)));
            let y = target(lw, &ops, transposed, &t)?;
            let hit = Expr::Select(
                Box::new(bin(Binary::Eq, y, v.clone())),
                Box::new(Expr::F32(1.0)),
                Box::new(Expr::F32(0.0)),
            );
            let g = lw.value(Source::Node(ops[3]), &t)?;
            let c = lw.e.bind(bin(Binary::Mul, g, bin(Binary::Sub, p, hit)));
            let d = lw.e.open();
            let mut xi = t.clone();
            xi.push(Expr::Var(d));
            let x = lw.value(Source::Node(ops[0]), &xi)?;
            let old = Expr::LoadArray { array: acc, index: Box::new(Expr::Var(d)) };
            lw.e.push(Stmt::StoreArray {
                array: acc,
                index: Expr::Var(d),
                value: bin(Binary::Add, old, bin(Binary::Mul, c, x)),
            });
            lw.e.close(d, Expr::I64(d_len as i64), LoopKind::Vector);
            lw.e.close(tt, token_count, LoopKind::Serial);
            let d = lw.e.open();
            let at = if transposed { vec![Expr::Var(d), v] } else { vec![v, Expr::Var(d)] };
            let lin = lw.linear(&at, &out_ty.shape)?;
            let value = Expr::LoadArray { array: acc, index: Box::new(Expr::Var(d)) };
            lw.e.push(Stmt::Store { buffer: out, index: lin, value });
            lw.e.close(d, Expr::I64(d_len as i64), LoopKind::Vector);
            super::finish(lw, name, words)
        }
        CeOp::Correct => Err("the accuracy op has its own kernel (correct_kernel)".into()),
    }
}
