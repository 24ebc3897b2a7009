//! Recognizing the per-token cross-entropy against a vocabulary table and rewriting it
//! into the normal-form op `cross_entropy(x, E, y)` (`ir/cross_entropy.rs`), so neither
//! the forward nor the backward materializes the `[T…, V]` logits.
//!
//! The match is anchored at the subtraction `lse − picked` and checks only structure:
//! - `L = einsum(x, E)` contracting one letter `d` of `x` with a rank-2 table whose other
//!   letter `v` is an output axis `a` of `L` (tied `…d,vd->…v`, or untied `x @ W`, which
//!   is the table `[D, V]`, marked `transposed`); any index names and axis orders;
//! - `lse = log(sum_a(exp(L − top))) + top` with `top = max_a(L)` (the same node added
//!   back as subtracted, broadcast along `a` only), or `log(sum_a(exp(L)))` without the
//!   max shift; the reductions may keep the reduced axis as size 1 or drop it;
//! - `picked = sum_a(where(iota(V) == y, L, 0))`, the iota running along axis `a` with
//!   `V = L.shape[a]`, the i32 targets `y` broadcast along `a` only (either side of `==`).
//!
//! Everything is checked through broadcasts and size-1 reshapes by tracking which axis of
//! the source each axis of the broadcast value reads, so a target broadcast along the
//! wrong axis, an iota of another axis, a different `top`, a nonlinearity on the logits
//! (`relu(L)` is not an einsum), or label smoothing (`picked` weighs all of `L`, not a
//! `where` with 0) is left alone. The reduction after it (the mean) stays primitive.

use super::{internal, permute, replace_uses};
use crate::ir::cross_entropy::CrossEntropy;
use crate::ir::{BinaryOp, DType, Dim, Graph, NodeId, Op, ReduceOp, UnaryOp};
use tnc_grammar::Diagnostic;

pub struct Found {
    x: NodeId,
    table: NodeId,
    targets: NodeId,
    transposed: bool,
    /// Permutes `x` to `[L's axes except a…, d]`.
    x_perm: Vec<usize>,
    /// The logits product is pinned to f32 (`precision f32 { … }`).
    pinned: bool,
}

/// Rewrite every cross-entropy in `g`.
pub fn run(g: &mut Graph) -> Result<(), Diagnostic> {
    for o in g.topo_order() {
        if g.dag.node_weight(o).is_none() || !matches!(g.node(o).op, Op::Binary(BinaryOp::Sub)) {
            continue;
        }
        if let Some(f) = matches(g, o) {
            rewrite(g, o, f)?;
        }
    }
    Ok(())
}

fn one() -> Dim {
    Dim::constant(1)
}

/// `n = reduce(op, [a])(x)`, optionally reshaped to keep axis `a` with size 1:
/// `(x, a, kept)`.
fn reduced(g: &Graph, n: NodeId, op: ReduceOp) -> Option<(NodeId, usize, bool)> {
    let (r, kept) = match &g.node(n).op {
        Op::Reshape { shape } => {
            let r = g.operands(n)[0];
            let Op::Reduce { axes, .. } = &g.node(r).op else { return None };
            let [a] = axes[..] else { return None };
            let mut want = g.ty(g.operands(r)[0]).shape.clone();
            want[a] = one();
            if *shape != want {
                return None;
            }
            (r, true)
        }
        _ => (n, false),
    };
    match &g.node(r).op {
        Op::Reduce { op: o, axes } if *o == op && axes.len() == 1 => Some((g.operands(r)[0], axes[0], kept)),
        _ => None,
    }
}

/// One step of a broadcast chain: for each axis of `n`, the axis of its operand it reads
/// (`None`: an expanded or size-1 axis). Only `Broadcast` and reshapes that insert or
/// remove size-1 axes qualify.
fn unit_step(g: &Graph, n: NodeId) -> Option<(NodeId, Vec<Option<usize>>)> {
    let src = *g.operands(n).first()?;
    let (from, to) = (&g.ty(src).shape, &g.ty(n).shape);
    match &g.node(n).op {
        Op::Broadcast { .. } => Some((src, (0..to.len()).map(|i| (from[i] == to[i]).then_some(i)).collect())),
        Op::Reshape { .. } => {
            let nz = |s: &[Dim]| -> Vec<usize> { (0..s.len()).filter(|&i| s[i] != one()).collect() };
            let (nf, nt) = (nz(from), nz(to));
            if nf.len() != nt.len() || nf.iter().zip(&nt).any(|(&i, &j)| from[i] != to[j]) {
                return None;
            }
            let mut map = vec![None; to.len()];
            for (&i, &j) in nf.iter().zip(&nt) {
                map[j] = Some(i);
            }
            Some((src, map))
        }
        _ => None,
    }
}

/// Walk from `n` down its broadcast chain, calling `stop(node, map)` at every node
/// (`map[i]`: the node's axis that `n`'s axis `i` reads); the first `Some` wins.
fn walk<T>(g: &Graph, n: NodeId, mut stop: impl FnMut(NodeId, &[Option<usize>]) -> Option<T>) -> Option<T> {
    let mut cur = n;
    let mut map: Vec<Option<usize>> = (0..g.ty(n).rank()).map(Some).collect();
    loop {
        if let Some(t) = stop(cur, &map) {
            return Some(t);
        }
        let (src, step) = unit_step(g, cur)?;
        map = map.iter().map(|m| m.and_then(|j| step[j])).collect();
        cur = src;
    }
}

/// Does `map` (from the axes of a value shaped like `logits`) read a tensor shaped like
/// `logits` without axis `a` (`kept`: with size 1 there) along the other axes in order,
/// constant along `a`?
fn along_all_but(logits: &[Dim], a: usize, kept: bool, src: &[Dim], map: &[Option<usize>]) -> bool {
    let want: Vec<Dim> =
        (0..logits.len()).filter_map(|i| if i == a { kept.then(one) } else { Some(logits[i].clone()) }).collect();
    if src != want {
        return false;
    }
    (0..logits.len()).all(|i| {
        if logits[i] == one() {
            return true;
        }
        let expect = if i == a { None } else { Some(if kept || i < a { i } else { i - 1 }) };
        map[i] == expect
    })
}

/// `n` is `c` broadcast along axis `a` of `logits` only.
fn broadcast_of(g: &Graph, n: NodeId, c: NodeId, logits: &[Dim], a: usize) -> bool {
    if g.ty(n).shape != logits {
        return false;
    }
    let kept = g.ty(c).rank() == logits.len();
    walk(g, n, |cur, map| (cur == c).then(|| along_all_but(logits, a, kept, &g.ty(c).shape, map))).unwrap_or(false)
}

/// `lse` over axis `a` of `L`: `(L, a, kept)`.
fn logsumexp(g: &Graph, n: NodeId) -> Option<(NodeId, usize, bool)> {
    let log_of = |n: NodeId| -> Option<NodeId> {
        match g.node(n).op {
            Op::Unary(UnaryOp::Log) => Some(g.operands(n)[0]),
            _ => None,
        }
    };
    let exp_of = |n: NodeId| -> Option<NodeId> {
        match g.node(n).op {
            Op::Unary(UnaryOp::Exp) => Some(g.operands(n)[0]),
            _ => None,
        }
    };
    // Without the shift: log(sum_a(exp(L))).
    if let Some(s) = log_of(n) {
        let (e, a, kept) = reduced(g, s, ReduceOp::Sum)?;
        return Some((exp_of(e)?, a, kept));
    }
    // With it: log(sum_a(exp(L − top))) + top, top = max_a(L).
    let Op::Binary(BinaryOp::Add) = g.node(n).op else { return None };
    let ops = g.operands(n);
    for (l, top) in [(ops[0], ops[1]), (ops[1], ops[0])] {
        let Some(s) = log_of(l) else { continue };
        let Some((e, a, kept)) = reduced(g, s, ReduceOp::Sum) else { continue };
        let Some(d) = exp_of(e) else { continue };
        let Op::Binary(BinaryOp::Sub) = g.node(d).op else { continue };
        let dops = g.operands(d);
        let logits = dops[0];
        let Some((m, ma, mkept)) = reduced(g, top, ReduceOp::Max) else { continue };
        if m != logits || ma != a || mkept != kept || !broadcast_of(g, dops[1], top, &g.ty(logits).shape, a) {
            continue;
        }
        return Some((logits, a, kept));
    }
    None
}

/// `picked = sum_a(where(iota == y, L, 0))`: `(L, a, kept, y)`.
fn picked(g: &Graph, n: NodeId) -> Option<(NodeId, usize, bool, NodeId)> {
    let (sel, a, kept) = reduced(g, n, ReduceOp::Sum)?;
    let Op::Select = g.node(sel).op else { return None };
    let [mask, logits, zero] = g.operands(sel)[..] else { return None };
    let shape = g.ty(logits).shape.clone();
    let is_zero = walk(g, zero, |cur, _| match g.node(cur).op {
        Op::Constant { value, .. } => Some(value.get() == 0.0),
        _ => None,
    });
    if is_zero != Some(true) {
        return None;
    }
    let Op::Binary(BinaryOp::Eq) = g.node(mask).op else { return None };
    let mops = g.operands(mask);
    for (i, t) in [(mops[0], mops[1]), (mops[1], mops[0])] {
        // The iota runs along axis a and has V entries.
        let iota_ok = walk(g, i, |cur, map| match &g.node(cur).op {
            Op::Iota { len, dtype: DType::I32 } => {
                Some(*len == shape[a] && (0..shape.len()).all(|k| shape[k] == one() || map[k] == (k == a).then_some(0)))
            }
            _ => None,
        });
        if iota_ok != Some(true) {
            continue;
        }
        // The targets: the first value on the chain shaped like L without axis a.
        let mut want = shape.clone();
        want.remove(a);
        let targets = walk(g, t, |cur, map| {
            let ty = g.ty(cur);
            (ty.dtype == DType::I32 && ty.shape == want && along_all_but(&shape, a, false, &ty.shape, map))
                .then_some(cur)
        });
        if let Some(y) = targets {
            return Some((logits, a, kept, y));
        }
    }
    None
}

/// `L = einsum(x, E)` with `v` (output axis `a`) the table's only free letter.
fn projection(g: &Graph, l: NodeId, a: usize) -> Option<(NodeId, NodeId, bool, Vec<usize>)> {
    let Op::Einsum(spec) = &g.node(l).op else { return None };
    if spec.inputs.len() != 2 {
        return None;
    }
    let ops = g.operands(l);
    let v = spec.output[a];
    for (xi, ti) in [(0usize, 1usize), (1, 0)] {
        let (xl, tl) = (&spec.inputs[xi], &spec.inputs[ti]);
        let [t0, t1] = tl[..] else { continue };
        let d = if t0 == v {
            t1
        } else if t1 == v {
            t0
        } else {
            continue;
        };
        if spec.output.contains(&d) || xl.contains(&v) {
            continue;
        }
        let mut want: Vec<u8> = spec.output.iter().copied().filter(|&c| c != v).collect();
        want.push(d);
        if xl.len() != want.len() {
            continue;
        }
        let Some(perm) = want.iter().map(|c| xl.iter().position(|x| x == c)).collect::<Option<Vec<_>>>() else {
            continue;
        };
        return Some((ops[xi], ops[ti], t0 == d, perm));
    }
    None
}

pub fn matches(g: &Graph, o: NodeId) -> Option<Found> {
    let [lhs, rhs] = g.operands(o)[..] else { return None };
    let (l, a, kept) = logsumexp(g, lhs)?;
    let (l2, a2, kept2, targets) = picked(g, rhs)?;
    if l != l2 || a != a2 || kept != kept2 {
        return None;
    }
    let (x, table, transposed, x_perm) = projection(g, l, a)?;
    let pinned = matches!(&g.node(l).op, Op::Einsum(spec) if spec.pinned);
    Some(Found { x, table, targets, transposed, x_perm, pinned })
}

fn rewrite(g: &mut Graph, o: NodeId, f: Found) -> Result<(), Diagnostic> {
    let span = g.node(o).span;
    let x = permute(g, f.x, f.x_perm, span)?;
    let ce = CrossEntropy { transposed: f.transposed, pinned: f.pinned };
    let loss = g.add(Op::CrossEntropy(ce), &[x, f.table, f.targets], span).map_err(internal)?;
    let want = g.ty(o).clone();
    let result = if g.ty(loss).shape == want.shape {
        loss
    } else {
        g.add(Op::Reshape { shape: want.shape.clone() }, &[loss], span).map_err(internal)?
    };
    if *g.ty(result) != want {
        return Err(internal(format!("the cross-entropy rewrite changed the type {want} to {}", g.ty(result))));
    }
    replace_uses(g, o, result);
    remove_dead(g, o);
    Ok(())
}

/// Remove `n` and then every ancestor left without users (never inputs, parameters or
/// outputs), so the replaced logits do not linger until `dce` (autodiff runs before it
/// and would differentiate nothing dead, but the graph should not show `[T…, V]` values).
fn remove_dead(g: &mut Graph, n: NodeId) {
    let mut stack = vec![n];
    while let Some(x) = stack.pop() {
        let Some(node) = g.dag.node_weight(x) else { continue };
        let dead = !matches!(node.op, Op::Input { .. } | Op::Param { .. })
            && g.users(x).is_empty()
            && !g.outputs.iter().any(|(_, o)| *o == x);
        if dead {
            stack.extend(g.operands(x));
            g.dag.remove_node(x);
        }
    }
}
