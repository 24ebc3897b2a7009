//! Vector-Jacobian products, one rule per op. Each rule receives the forward node `y`,
//! its cotangent `gy`, and which operands need a gradient, and returns one optional
//! cotangent per operand position. Rules are written only in primitive IR ops, so later
//! passes (simplify, recognize, fuse) treat forward and backward alike.
//!
//! Conventions at non-differentiable points (the interpreter's gradient checks pin these):
//! - `relu'(0) = 0`; `abs'(0) = 0`; `elu'(x) = exp(x)` for `x <= 0` (so `elu'(0) = 1`,
//!   consistent with `elu`'s branch condition `x > 0`).
//! - `max(a, b)` sends the gradient to `a` when `a >= b`, `min(a, b)` to `a` when `a <= b`:
//!   at a tie the first operand gets all of it.
//! - `reduce_max/min`: every position equal to the result gets the full cotangent (ties
//!   are not split).
//! - `sqrt'(0) = 0` instead of +inf. Square roots of exact zeros come from norms of
//!   all-zero rows (`sqrt(mean(x²))` after a ReLU feature map), where the inner
//!   derivative `2x` is 0 too: the chain rule's `inf · 0` would be NaN, while 0 gives
//!   the true derivative of `x / (sqrt(mean(x²)) + ε)` at `x = 0`, namely `1/ε`.
//! - `pow(a, b)` w.r.t. `b` is `y · log(a)` with `log(0)` read as 0 (as JAX does), so
//!   `0 ** b` has a zero, not NaN, gradient in `b`.

use super::builder::{Builder, R};
use crate::ir::{BinaryOp, DType, Dim, EinsumSpec, NodeId, Op, ReduceOp, UnaryOp};

pub(crate) fn vjp(b: &mut Builder, y: NodeId, gy: NodeId, needs: &[bool]) -> R<Vec<Option<NodeId>>> {
    let op = b.g.node(y).op.clone();
    let xs = b.g.operands(y);
    let mut out: Vec<Option<NodeId>> = vec![None; xs.len()];
    let need = |i: usize| needs.get(i).copied().unwrap_or(false);
    match op {
        // Leaves and values without a derivative.
        Op::Input { .. } | Op::Param { .. } | Op::Constant { .. } | Op::Iota { .. } => {}
        Op::SizeOf { .. } => {}
        Op::LinearAttention(la) => super::normal_form::linear_attention(b, &la, &xs, gy, &mut out, needs)?,
        Op::CrossEntropy(ce) => super::cross_entropy::cross_entropy(b, &ce, &xs, gy, &mut out, needs)?,
        Op::CrossEntropyGradX(_) | Op::CrossEntropyGradTable(_) => {
            return Err(super::cross_entropy::second_derivative(b, &op));
        }
        // A 0/1 count: piecewise constant, so no cotangent flows through it.
        Op::CrossEntropyCorrect(_) => {}
        Op::BlockAttention(ba) => super::normal_form::block_attention(b, &ba, &xs, gy, &mut out, needs)?,
        Op::BlockAttentionGrad(_) => {
            return Err(b.err("second derivatives of block attention are not supported"));
        }
        Op::Unary(u) => {
            if need(0) {
                out[0] = Some(unary(b, u, xs[0], y, gy)?);
            }
        }
        Op::Binary(op) => binary(b, op, &xs, y, gy, need(0), need(1), &mut out)?,
        Op::Select => {
            let (on, off) = b.route(xs[0], gy)?;
            out[1] = need(1).then_some(on);
            out[2] = need(2).then_some(off);
        }
        Op::Cast { to } => {
            // Only f32 → f32 carries a gradient; ints and bools are constants to autodiff.
            if need(0) && to == DType::F32 && b.g.ty(xs[0]).dtype == DType::F32 {
                out[0] = Some(gy);
            }
        }
        Op::Reduce { op, axes } => {
            if need(0) {
                let full = b.shape(xs[0]);
                let g = b.expand(gy, &axes, &full)?;
                out[0] = Some(match op {
                    ReduceOp::Sum => g,
                    ReduceOp::Max | ReduceOp::Min => {
                        let ybar = b.expand(y, &axes, &full)?;
                        let hit = b.bin(BinaryOp::Eq, xs[0], ybar)?;
                        b.route(hit, g)?.0
                    }
                });
            }
        }
        Op::Einsum(spec) => {
            for (k, slot) in out.iter_mut().enumerate() {
                if need(k) {
                    *slot = Some(einsum(b, &spec, &xs, k, gy)?);
                }
            }
        }
        Op::Scan { axis, reverse } => scan(b, axis, reverse, &xs, y, gy, needs, &mut out)?,
        Op::Reshape { .. } => {
            if need(0) {
                let s = b.shape(xs[0]);
                out[0] = Some(b.add(Op::Reshape { shape: s }, &[gy])?);
            }
        }
        Op::Broadcast { shape } => {
            if need(0) {
                let from = b.shape(xs[0]);
                let axes: Vec<usize> = (0..from.len()).filter(|&i| from[i] != shape[i]).collect();
                let g = b.reduce_sum(gy, axes.clone())?;
                out[0] = Some(if axes.is_empty() { g } else { b.add(Op::Reshape { shape: from }, &[g])? });
            }
        }
        Op::Permute { perm } => {
            if need(0) {
                let mut inv = vec![0; perm.len()];
                for (i, &p) in perm.iter().enumerate() {
                    inv[p] = i;
                }
                out[0] = Some(b.add(Op::Permute { perm: inv }, &[gy])?);
            }
        }
        Op::Slice { axis, start, end } => {
            if need(0) {
                let n = b.shape(xs[0])[axis].clone();
                let after = n.checked_sub(&end).ok_or_else(|| b.err("size overflow"))?;
                out[0] = Some(b.pad(gy, axis, start, after)?);
            }
        }
        Op::Pad { axis, before, .. } => {
            if need(0) {
                let n = b.shape(xs[0])[axis].clone();
                let end = before.checked_add(&n).ok_or_else(|| b.err("size overflow"))?;
                out[0] = Some(b.slice(gy, axis, before, end)?);
            }
        }
        Op::Concat { axis } => {
            let mut start = Dim::constant(0);
            for (k, &x) in xs.iter().enumerate() {
                let n = b.shape(x)[axis].clone();
                let end = start.checked_add(&n).ok_or_else(|| b.err("size overflow"))?;
                if need(k) {
                    out[k] = Some(b.slice(gy, axis, start.clone(), end.clone())?);
                }
                start = end;
            }
        }
        Op::Gather => {
            if need(0) {
                out[0] = Some(super::cross_entropy::gather(b, xs[0], xs[1], gy)?);
            }
        }
        Op::ScatterAdd { .. } => {
            if need(0) {
                out[0] = Some(super::cross_entropy::scatter_add(b, xs[1], gy)?);
            }
        }
        Op::Dropout { rate, salt } => {
            // The mask is a function of (seed, step, salt, element index) only, so the
            // same op applied to the cotangent multiplies by exactly the same mask/scale.
            if need(0) {
                out[0] = Some(b.add(Op::Dropout { rate, salt }, &[gy])?);
            }
        }
    }
    Ok(out)
}

fn unary(b: &mut Builder, u: UnaryOp, x: NodeId, y: NodeId, gy: NodeId) -> R<NodeId> {
    use UnaryOp::*;
    match u {
        Neg => b.un(Neg, gy),
        Exp => b.mul(gy, y),
        Log => b.div(gy, x),
        // d sqrt(x) = 1 / (2 sqrt(x)), taken as 0 at x = 0 (see the module comment).
        Sqrt => {
            let two_y = b.scale(y, 2.0)?;
            let d = b.div(gy, two_y)?;
            let m = b.positive(y)?;
            Ok(b.route(m, d)?.0)
        }
        // d x^{-1/2} = -1/2 · x^{-3/2} = -1/2 · y³.
        Rsqrt => {
            let y2 = b.mul(y, y)?;
            let y3 = b.mul(y2, y)?;
            let d = b.scale(y3, -0.5)?;
            b.mul(gy, d)
        }
        // d (1/x) = -1/x² = -y².
        Recip => {
            let y2 = b.mul(y, y)?;
            let d = b.un(Neg, y2)?;
            b.mul(gy, d)
        }
        Abs => {
            // sign(x) with sign(0) = 0, built from two masks.
            let z = b.like(0.0, x)?;
            let pos = b.bin(BinaryOp::Gt, x, z)?;
            let neg = b.bin(BinaryOp::Lt, x, z)?;
            let pos = b.add(Op::Cast { to: DType::F32 }, &[pos])?;
            let neg = b.add(Op::Cast { to: DType::F32 }, &[neg])?;
            let sign = b.sub(pos, neg)?;
            b.mul(gy, sign)
        }
        Relu => {
            let m = b.positive(x)?;
            Ok(b.route(m, gy)?.0)
        }
        Elu => {
            // exp(x) rather than y + 1: accurate for very negative x. The branch not
            // taken may overflow, but `select` never reads it.
            let m = b.positive(x)?;
            let e = b.un(Exp, x)?;
            let ge = b.mul(gy, e)?;
            b.select(m, gy, ge)
        }
        // silu' = s · (1 + x · (1 − s)) with s = sigmoid(x).
        Silu => {
            let s = b.un(Sigmoid, x)?;
            let one_minus = {
                let n = b.un(Neg, s)?;
                b.shift(n, 1.0)?
            };
            let t = b.mul(x, one_minus)?;
            let t = b.shift(t, 1.0)?;
            let d = b.mul(s, t)?;
            b.mul(gy, d)
        }
        Sigmoid => {
            let n = b.un(Neg, y)?;
            let one_minus = b.shift(n, 1.0)?;
            let d = b.mul(y, one_minus)?;
            b.mul(gy, d)
        }
        Tanh => {
            let y2 = b.mul(y, y)?;
            let n = b.un(Neg, y2)?;
            let d = b.shift(n, 1.0)?;
            b.mul(gy, d)
        }
        Sin => {
            let c = b.un(Cos, x)?;
            b.mul(gy, c)
        }
        Cos => {
            let s = b.un(Sin, x)?;
            let s = b.un(Neg, s)?;
            b.mul(gy, s)
        }
        Not => Err(b.err("`not` has no gradient")),
    }
}

#[allow(clippy::too_many_arguments)]
fn binary(
    b: &mut Builder,
    op: BinaryOp,
    xs: &[NodeId],
    y: NodeId,
    gy: NodeId,
    need_a: bool,
    need_b: bool,
    out: &mut [Option<NodeId>],
) -> R<()> {
    let (x0, x1) = (xs[0], xs[1]);
    let (ga, gb) = match op {
        BinaryOp::Add => (Some(gy), Some(gy)),
        BinaryOp::Sub => (Some(gy), need_b.then(|| b.un(UnaryOp::Neg, gy)).transpose()?),
        BinaryOp::Mul => (need_a.then(|| b.mul(gy, x1)).transpose()?, need_b.then(|| b.mul(gy, x0)).transpose()?),
        // d(a/b)/da = 1/b; d(a/b)/db = -a/b² = -y/b.
        BinaryOp::Div => {
            let ga = need_a.then(|| b.div(gy, x1)).transpose()?;
            let gb = if need_b {
                let t = b.mul(gy, y)?;
                let t = b.div(t, x1)?;
                Some(b.un(UnaryOp::Neg, t)?)
            } else {
                None
            };
            (ga, gb)
        }
        BinaryOp::Pow => {
            let ga = if need_a {
                let bm1 = b.shift(x1, -1.0)?;
                let p = b.bin(BinaryOp::Pow, x0, bm1)?;
                let d = b.mul(x1, p)?;
                Some(b.mul(gy, d)?)
            } else {
                None
            };
            let gb = if need_b {
                let z = b.like(0.0, x0)?;
                let one = b.like(1.0, x0)?;
                let is0 = b.bin(BinaryOp::Eq, x0, z)?;
                let safe = b.select(is0, one, x0)?;
                let l = b.un(UnaryOp::Log, safe)?;
                let t = b.mul(gy, y)?;
                Some(b.mul(t, l)?)
            } else {
                None
            };
            (ga, gb)
        }
        BinaryOp::Max | BinaryOp::Min => {
            let cmp = if op == BinaryOp::Max { BinaryOp::Ge } else { BinaryOp::Le };
            let first = b.bin(cmp, x0, x1)?;
            let (on, off) = b.route(first, gy)?;
            (Some(on), Some(off))
        }
        // Comparisons and logic produce bools: no gradient flows through them.
        _ => (None, None),
    };
    out[0] = ga.filter(|_| need_a);
    out[1] = gb.filter(|_| need_b);
    Ok(())
}

/// For `y = einsum(x_0[, x_1])`, the cotangent of operand `k` is the einsum of `gy` with
/// the other operand onto `k`'s letters. A letter of `k` that appears neither in the
/// output nor in the other operand was summed over inside `k` alone, so `y` does not
/// vary along it: compute without it and broadcast along it.
fn einsum(b: &mut Builder, spec: &EinsumSpec, xs: &[NodeId], k: usize, gy: NodeId) -> R<NodeId> {
    let mine = &spec.inputs[k];
    let mut inputs = vec![spec.output.clone()];
    let mut operands = vec![gy];
    for (j, letters) in spec.inputs.iter().enumerate() {
        if j != k {
            inputs.push(letters.clone());
            operands.push(xs[j]);
        }
    }
    let available = |l: &u8| inputs.iter().any(|ls| ls.contains(l));
    let kept: Vec<u8> = mine.iter().copied().filter(available).collect();
    let dropped: Vec<usize> = (0..mine.len()).filter(|&i| !available(&mine[i])).collect();
    let g = if inputs.len() == 1 && inputs[0] == kept {
        gy
    } else {
        // A pinned product's gradient products are pinned too.
        b.add(Op::Einsum(EinsumSpec { inputs, output: kept, pinned: spec.pinned }), &operands)?
    };
    let full = b.shape(xs[k]);
    b.expand(g, &dropped, &full)
}

/// Scans. With `t` the cotangent pushed back through the recurrence:
/// forward `s_n = x_n + d_n s_{n-1}`:  `t_m = g_m + d_{m+1} t_{m+1}` (a reverse scan
/// with the decay shifted one step earlier), `dx = t`, `dd_n = t_n · s_{n-1}`;
/// reverse `s_n = x_n + d_n s_{n+1}`:  `t_m = g_m + d_{m-1} t_{m-1}`, `dd_n = t_n · s_{n+1}`.
/// The missing end values (`d_N`, `s_{-1}`, …) are zeros from `Pad`.
#[allow(clippy::too_many_arguments)]
fn scan(
    b: &mut Builder,
    axis: usize,
    reverse: bool,
    xs: &[NodeId],
    y: NodeId,
    gy: NodeId,
    needs: &[bool],
    out: &mut [Option<NodeId>],
) -> R<()> {
    let back = Op::Scan { axis, reverse: !reverse };
    let Some(&d) = xs.get(1) else {
        if needs.first() == Some(&true) {
            out[0] = Some(b.add(back, &[gy])?);
        }
        return Ok(());
    };
    let e = if reverse { b.shift_prev(d, axis)? } else { b.shift_next(d, axis)? };
    let t = b.add(back, &[gy, e])?;
    if needs.first() == Some(&true) {
        out[0] = Some(t);
    }
    if needs.get(1) == Some(&true) {
        let s_before = if reverse { b.shift_next(y, axis)? } else { b.shift_prev(y, axis)? };
        out[1] = Some(b.mul(t, s_before)?);
    }
    Ok(())
}
