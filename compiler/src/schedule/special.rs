//! Kernels for ops with a loop structure of their own. Each writes the op's whole value
//! to its buffer; operands are read through element expressions, so producers fused into
//! the op's group (and the op's own regions) are computed on the fly.

use super::element::{elem_of, Lowering, Source};
use super::emit::{bin, mul, sub};
use crate::ir::{NodeId, Op};
use crate::kernel::{Access, Binary, Expr, Kernel, LoopKind, Scalar, Stmt};

pub fn kernel(lw: &mut Lowering, n: NodeId, name: String) -> Result<(Kernel, Vec<usize>), String> {
    match &lw.g.node(n).op {
        Op::Scan { axis, reverse } => scan(lw, n, *axis, *reverse, name),
        Op::ScatterAdd { .. } => scatter_add(lw, n, name),
        other => Err(format!("no kernel template for `{}` yet", other.kind())),
    }
}

/// Inclusive scan along `axis`: parallel over every other axis, a serial loop with an
/// accumulator along it (`s = x + d·s` with a decay operand).
fn scan(
    lw: &mut Lowering,
    n: NodeId,
    axis: usize,
    reverse: bool,
    name: String,
) -> Result<(Kernel, Vec<usize>), String> {
    let g = lw.g;
    let ty = g.ty(n).clone();
    let operands = g.operands(n);
    let outer: Vec<_> = ty.shape.iter().enumerate().filter(|(i, _)| *i != axis).map(|(_, d)| d.clone()).collect();
    let outer_idx = lw.unravel(Expr::Var(lw.e.index), &outer)?;
    let acc = lw.e.accumulator(0, Scalar::F32, Expr::F32(0.0));
    let len = lw.e.dim(&ty.shape[axis])?;
    let t = lw.e.open();
    // Position along the axis, from the end when reversed.
    let pos = if reverse { sub(sub(len.clone(), Expr::I64(1)), Expr::Var(t)) } else { Expr::Var(t) };
    let pos = lw.e.bind(pos);
    let mut idx = outer_idx.clone();
    idx.insert(axis, pos);
    let x = lw.value(Source::Node(operands[0]), &idx)?;
    let next = match operands.get(1) {
        Some(&d) => {
            let decay = lw.value(Source::Node(d), &idx)?;
            bin(Binary::Add, x, bin(Binary::Mul, decay, Expr::Var(acc)))
        }
        None => bin(Binary::Add, x, Expr::Var(acc)),
    };
    lw.e.push(Stmt::Assign { var: acc, value: next });
    let global = lw.stored[&n];
    let b = lw.e.buffer(global, &format!("b{global}"), elem_of(ty.dtype), Access::Write);
    let lin = lw.linear(&idx, &ty.shape)?;
    lw.e.push(Stmt::Store { buffer: b, index: lin, value: Expr::Var(acc) });
    lw.e.close(t, len, LoopKind::Serial);
    let mut extent = Expr::I64(1);
    for d in &outer {
        extent = mul(extent, lw.e.dim(d)?);
    }
    super::finish(lw, name, extent)
}

/// `out[index[i], r] += values[i, r]`: parallel over the trailing index `r`, serial over
/// `i` in order, so repeated indices accumulate deterministically.
fn scatter_add(lw: &mut Lowering, n: NodeId, name: String) -> Result<(Kernel, Vec<usize>), String> {
    let g = lw.g;
    let ty = g.ty(n).clone();
    let operands = g.operands(n);
    let index_ty = g.ty(operands[1]).clone();
    let rest = ty.shape[1..].to_vec();
    let r_idx = lw.unravel(Expr::Var(lw.e.index), &rest)?;
    let global = lw.stored[&n];
    let b = lw.e.buffer(global, &format!("b{global}"), elem_of(ty.dtype), Access::ReadWrite);
    // Zero this column.
    let rows = lw.e.dim(&ty.shape[0])?;
    let v = lw.e.open();
    let mut at = vec![Expr::Var(v)];
    at.extend(r_idx.iter().cloned());
    let lin = lw.linear(&at, &ty.shape)?;
    lw.e.push(Stmt::Store { buffer: b, index: lin, value: Expr::F32(0.0) });
    lw.e.close(v, rows.clone(), LoopKind::Serial);
    // Accumulate every source row, in order.
    let count: Vec<Expr> = index_ty.shape.iter().map(|d| lw.e.dim(d)).collect::<Result<_, _>>()?;
    let mut total = Expr::I64(1);
    for c in &count {
        total = mul(total, c.clone());
    }
    let i = lw.e.open();
    let i_idx = lw.unravel(Expr::Var(i), &index_ty.shape)?;
    let row = lw.value(Source::Node(operands[1]), &i_idx)?;
    let row = bin(
        Binary::Max,
        bin(Binary::Min, Expr::Cast(Scalar::I64, Box::new(row)), sub(rows, Expr::I64(1))),
        Expr::I64(0),
    );
    let row = lw.e.bind(row);
    let mut src = i_idx.clone();
    src.extend(r_idx.iter().cloned());
    let x = lw.value(Source::Node(operands[0]), &src)?;
    let mut dst = vec![row];
    dst.extend(r_idx.iter().cloned());
    let lin = lw.linear(&dst, &ty.shape)?;
    let old = Expr::Load { buffer: b, index: Box::new(lin.clone()) };
    lw.e.push(Stmt::Store { buffer: b, index: lin, value: bin(Binary::Add, old, x) });
    lw.e.close(i, total, LoopKind::Serial);
    let mut extent = Expr::I64(1);
    for d in &rest {
        extent = mul(extent, lw.e.dim(d)?);
    }
    super::finish(lw, name, extent)
}
