//! Kernels for ops with a loop structure of their own. Each writes the op's whole value
//! to its buffer; operands are read through element expressions, so producers fused into
//! the op's group (and the op's own regions) are computed on the fly.

use super::compose::{letters, Composer};
use super::element::{elem_of, Lowering, Source};
use super::emit::{add, bin, div, mul, sub};
use crate::ir::{BlockAttention, NodeId, Op, Region, RegionValue, TensorType};
use crate::kernel::{Access, Binary, Expr, Kernel, LoopKind, Scalar, Stmt};

pub fn kernel(
    lw: &mut Lowering,
    n: NodeId,
    opts: &super::ScheduleOptions,
    name: String,
) -> Result<(Kernel, Vec<usize>), String> {
    match &lw.g.node(n).op {
        Op::Scan { axis, reverse } => scan(lw, n, *axis, *reverse, name),
        Op::ScatterAdd { .. } => scatter_add(lw, n, if opts.gpu_blocks { 1 } else { SCATTER_COLUMNS }, name),
        Op::LinearAttention(la) if opts.gpu_blocks => {
            match super::linear_attention_gpu::kernel(lw, n, la, opts.chunk, name.clone())? {
                Some(k) => Ok(k),
                None => super::linear_attention::kernel(lw, n, la, opts, name),
            }
        }
        Op::LinearAttention(la) => super::linear_attention::kernel(lw, n, la, opts, name),
        // Small constant block widths (DiagAttention): staged per block. The whole sequence
        // as one block (softmax baseline, w = N, or a decode step's long KV-cache window):
        // one composed region per output element.
        Op::BlockAttention(ba) if super::block_attention::staged_widths(ba).is_some() => {
            super::block_attention::forward(lw, n, ba, opts, name)
        }
        Op::BlockAttentionGrad(bg) if super::block_attention::staged_widths(&bg.forward).is_some() => {
            super::block_attention::backward(lw, n, bg, opts, name)
        }
        Op::BlockAttention(_) | Op::BlockAttentionGrad(_) => {
            Err("full-sequence block attention is scheduled by `block_attention_full`".into())
        }
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
/// The scatter-add kernel, a parallel iteration per block of `block` columns.
fn scatter_add(lw: &mut Lowering, n: NodeId, block: i64, name: String) -> Result<(Kernel, Vec<usize>), String> {
    let g = lw.g;
    let ty = g.ty(n).clone();
    let operands = g.operands(n);
    let index_ty = g.ty(operands[1]).clone();
    let rest = ty.shape[1..].to_vec();
    let mut columns = Expr::I64(1);
    for d in &rest {
        columns = mul(columns, lw.e.dim(d)?);
    }
    let columns = lw.e.bind(columns);
    let width = Expr::I64(block);
    let first = lw.e.bind(mul(Expr::Var(lw.e.index), width.clone()));
    let in_block = lw.e.bind(bin(Binary::Min, width, sub(columns.clone(), first.clone())));
    let global = lw.stored[&n];
    let b = lw.e.buffer(global, &format!("b{global}"), elem_of(ty.dtype), Access::ReadWrite);
    let rows = lw.e.dim(&ty.shape[0])?;
    // Zero the block's columns of every row.
    let v = lw.e.open();
    let c = lw.e.open();
    let r_idx = lw.unravel(add(first.clone(), Expr::Var(c)), &rest)?;
    let mut at = vec![Expr::Var(v)];
    at.extend(r_idx);
    let lin = lw.linear(&at, &ty.shape)?;
    lw.e.push(Stmt::Store { buffer: b, index: lin, value: Expr::F32(0.0) });
    lw.e.close(c, in_block.clone(), LoopKind::Vector);
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
    let c = lw.e.open();
    let r_idx = lw.unravel(add(first, Expr::Var(c)), &rest)?;
    let mut src = i_idx.clone();
    src.extend(r_idx.iter().cloned());
    let x = lw.value(Source::Node(operands[0]), &src)?;
    let mut dst = vec![row];
    dst.extend(r_idx.iter().cloned());
    let lin = lw.linear(&dst, &ty.shape)?;
    let old = Expr::Load { buffer: b, index: Box::new(lin.clone()) };
    lw.e.push(Stmt::Store { buffer: b, index: lin, value: bin(Binary::Add, old, x) });
    lw.e.close(c, in_block, LoopKind::Vector);
    lw.e.close(i, total, LoopKind::Serial);
    let extent = div(add(columns, Expr::I64(block - 1)), Expr::I64(block));
    super::finish(lw, name, extent)
}

/// Columns per parallel iteration of a scatter-add on CPUs: 16 f32, one 64-byte cache
/// line of every row, so that walking the source rows in order moves whole lines (one
/// column per iteration strided through memory at a line per element). GPU threads take
/// one column each.
const SCATTER_COLUMNS: i64 = 16;

/// Whether node `n` is block attention (or its backward) over the whole sequence (a
/// run-time block width): scheduled by [`block_attention_full`], not [`kernel`].
pub fn is_full_block_attention(op: &Op) -> bool {
    forward_of(op).is_some_and(|ba| super::block_attention::staged_widths(ba).is_none())
}

/// The forward attention of a block attention or its backward.
fn forward_of(op: &Op) -> Option<&BlockAttention> {
    match op {
        Op::BlockAttention(ba) => Some(ba),
        Op::BlockAttentionGrad(bg) => Some(&bg.forward),
        _ => None,
    }
}

/// The prologue values q', k', v' of a full-sequence block attention: each region with
/// its slice of the operands, and its type. The schedule stores them in workspace buffers
/// first ([`materialize`]) so the attention kernel reads them instead of recomputing
/// the projections for every score it needs.
pub fn block_attention_prologues(lw: &Lowering, n: NodeId) -> Result<Vec<(Source, TensorType)>, String> {
    let ba = forward_of(&lw.g.node(n).op).ok_or("not block attention")?;
    let ops = lw.g.operands(n);
    let (na, nb, nc) = (ba.q.args.len(), ba.k.args.len(), ba.v.args.len());
    let part = |r: &Region, from: usize, count: usize| {
        (Source::region(std::rc::Rc::new(r.clone()), &ops[from..from + count]), r.result_type().clone())
    };
    Ok(vec![part(&ba.q, 0, na), part(&ba.k, na, nb), part(&ba.v, na + nb, nc)])
}

/// A kernel storing `source` (of type `ty`) into global buffer `global`: parallel over
/// all axes but the last, a vector loop over the last.
pub fn materialize(
    lw: &mut Lowering,
    source: Source,
    ty: &TensorType,
    global: usize,
    name: String,
) -> Result<(Kernel, Vec<usize>), String> {
    let rows = ty.shape[..ty.rank() - 1].to_vec();
    let row_idx = lw.unravel(Expr::Var(lw.e.index), &rows)?;
    let last = lw.e.dim(&ty.shape[ty.rank() - 1])?;
    let j = lw.e.open();
    let mut idx = row_idx;
    idx.push(Expr::Var(j));
    let value = lw.value(source, &idx)?;
    let b = lw.e.buffer(global, &format!("b{global}"), elem_of(ty.dtype), Access::Write);
    let lin = lw.linear(&idx, &ty.shape)?;
    lw.e.push(Stmt::Store { buffer: b, index: lin, value });
    lw.e.close(j, last, LoopKind::Vector);
    let mut extent = Expr::I64(1);
    for d in &rows {
        extent = mul(extent, lw.e.dim(d)?);
    }
    super::finish(lw, name, extent)
}

/// An argument of a [`Stage`]: a prologue value (0 = q', 1 = k', 2 = v'), an earlier
/// stage's value, or a graph node (the backward's dO).
#[derive(Clone, Copy, Debug)]
pub enum StageArg {
    Prologue(usize),
    Stage(usize),
    Node(NodeId),
}

/// One kernel of full-sequence attention: `region` over `args`, stored whole.
pub struct Stage {
    pub region: Region,
    pub args: Vec<StageArg>,
}

/// Full-sequence block attention (the softmax baseline, w = N) as a few materialized
/// stages over q', k', v' (stored by [`materialize`] first): `S = q'k'ᵀ`, `P = weights(S)`,
/// `O = P v'`; backward also `dP = dO v'ᵀ`, `dS = weights_vjp(S, dP)` and the output
/// `[dS k' | dSᵀ q' | Pᵀ dO]`. Each stage reads whole rows of the one before, so nothing
/// is recomputed per element; S and P take `N²` memory per head, which DESIGN.md allows
/// for the quadratic baseline only. The last stage is the op's value.
pub fn full_attention_stages(lw: &Lowering, n: NodeId, prologues: &[TensorType]) -> Result<Vec<Stage>, String> {
    let op = &lw.g.node(n).op;
    let ba = forward_of(op).ok_or("not block attention")?;
    let (qt, kt, vt) = (&prologues[0], &prologues[1], &prologues[2]);
    let l = |x: &str| letters(qt.rank() - 2, x);
    let mut stages = Vec::new();
    let mut c = Composer::new(vec![qt.clone(), kt.clone()]);
    let s = c.einsum((&l("ix"), RegionValue::Arg(0)), (&l("jx"), RegionValue::Arg(1)), &l("ij"))?;
    stages.push(Stage { region: c.finish(s), args: vec![StageArg::Prologue(0), StageArg::Prologue(1)] });
    stages.push(Stage { region: ba.weights.clone(), args: vec![StageArg::Stage(0)] });
    let probs = ba.weights.result_type().clone();
    match op {
        Op::BlockAttentionGrad(bg) => {
            let d_o = *lw.g.operands(n).last().ok_or("no output cotangent")?;
            let dot = lw.g.ty(d_o).clone();
            let mut c = Composer::new(vec![dot.clone(), vt.clone()]);
            let dp = c.einsum((&l("iy"), RegionValue::Arg(0)), (&l("jy"), RegionValue::Arg(1)), &l("ij"))?;
            stages.push(Stage { region: c.finish(dp), args: vec![StageArg::Node(d_o), StageArg::Prologue(2)] });
            stages.push(Stage { region: bg.weights_vjp.clone(), args: vec![StageArg::Stage(0), StageArg::Stage(2)] });
            let ds_ty = bg.weights_vjp.result_type().clone();
            let mut c = Composer::new(vec![ds_ty, kt.clone(), qt.clone(), probs, dot]);
            let (ds, k, q, p, go) = (
                RegionValue::Arg(0),
                RegionValue::Arg(1),
                RegionValue::Arg(2),
                RegionValue::Arg(3),
                RegionValue::Arg(4),
            );
            let dq = c.einsum((&l("ij"), ds), (&l("jx"), k), &l("ix"))?;
            let dk = c.einsum((&l("ij"), ds), (&l("ix"), q), &l("jx"))?;
            let dv = c.einsum((&l("ij"), p), (&l("iy"), go), &l("jy"))?;
            let out = c.add(Op::Concat { axis: qt.rank() - 1 }, &[dq, dk, dv])?;
            let args = vec![
                StageArg::Stage(3),
                StageArg::Prologue(1),
                StageArg::Prologue(0),
                StageArg::Stage(1),
                StageArg::Node(d_o),
            ];
            stages.push(Stage { region: c.finish(out), args });
        }
        _ => {
            let mut c = Composer::new(vec![probs, vt.clone()]);
            let o = c.einsum((&l("ij"), RegionValue::Arg(0)), (&l("jy"), RegionValue::Arg(1)), &l("iy"))?;
            stages.push(Stage { region: c.finish(o), args: vec![StageArg::Stage(1), StageArg::Prologue(2)] });
        }
    }
    Ok(stages)
}
