//! Warnings about what recognition left unfused, on the graph after `recognize`:
//!
//! - a cumulative sum of outer products, which keeps a `d×e` state for every position
//!   (a recognized linear attention keeps one per chunk, inside its kernel);
//! - a value with two axes of the sequence length, `N×N` (a recognized block attention
//!   keeps its scores per block, inside its kernel).
//!
//! Both run correctly as they are, but their activations cost bytes per token that the
//! normal forms avoid, and nothing else would tell the user. Each warning points at the
//! expression, says what the value costs per token at the sizes asked for, and, for a
//! cumulative sum, which part of the spelling kept `recognize` from applying.

use crate::ir::print::thousands;
use crate::ir::rewrite::dependencies;
use crate::ir::{Dim, Graph, NodeId, Op, TensorType};
use crate::memory::eval;
use tnc_grammar::Diagnostic;

/// Every warning about `g` (a graph after `recognize`), with per-token costs at `batch`, `seq`.
pub fn unfused_state_warnings(g: &Graph, batch: i64, seq: i64) -> Vec<Diagnostic> {
    // `recognize` leaves the spelling it replaced behind, dead, for `dce` to remove.
    let live = dependencies(g, g.outputs.iter().map(|&(_, n)| n));
    let order: Vec<NodeId> = g.topo_order().into_iter().filter(|n| live.contains(n)).collect();
    let mut out: Vec<Diagnostic> = order.iter().filter_map(|&n| scan_of_outer_products(g, n, batch, seq)).collect();
    out.extend(quadratic_values(g, &order, batch, seq));
    out
}

/// Bytes of `ty` per token (`B·N` of them) at the given sizes, when they evaluate.
fn bytes_per_token(ty: &TensorType, batch: i64, seq: i64) -> Option<i64> {
    let numel = ty.shape.iter().try_fold(1i64, |a, d| a.checked_mul(eval(d, batch, seq)?))?;
    Some(numel.checked_mul(ty.dtype.bytes())? / batch.checked_mul(seq)?.max(1))
}

fn mentions_n(d: &Dim) -> bool {
    d.symbols().iter().any(|s| s == "N")
}

/// A reshape, broadcast or permutation: the same values laid out anew.
fn is_relayout(op: &Op) -> bool {
    matches!(op, Op::Reshape { .. } | Op::Broadcast { .. } | Op::Permute { .. })
}

/// Through relayouts to the value that computes `n`.
fn behind_views(g: &Graph, mut n: NodeId) -> NodeId {
    while is_relayout(&g.node(n).op) {
        n = g.operands(n)[0];
    }
    n
}

/// `cumsum(einsum(k, v), …)` where the einsum is an outer product of two operands that
/// each bring an axis of their own (the state's `d` and `e`).
fn scan_of_outer_products(g: &Graph, n: NodeId, batch: i64, seq: i64) -> Option<Diagnostic> {
    let Op::Scan { axis, .. } = g.node(n).op else { return None };
    let ops = g.operands(n);
    let product = behind_views(g, ops[0]);
    let Op::Einsum(spec) = &g.node(product).op else { return None };
    let [a, b] = spec.inputs.as_slice() else { return None };
    if !spec.inputs.iter().flatten().all(|l| spec.output.contains(l)) {
        return None; // it sums something: not a per-position outer product
    }
    let own = |x: &[u8], y: &[u8]| x.iter().any(|l| !y.contains(l));
    if !own(a, b) || !own(b, a) {
        return None;
    }
    let ty = g.ty(n);
    let per_token = bytes_per_token(ty, batch, seq)?;
    let width = |x: &[u8], y: &[u8], input: usize| -> String {
        let t = g.ty(g.operands(product)[input]);
        x.iter().zip(&t.shape).filter(|(l, _)| !y.contains(l)).map(|(_, d)| d.to_string()).collect::<Vec<_>>().join("×")
    };
    let (d, e) = (width(a, b, 0), width(b, a, 1));
    let mut diag = Diagnostic::warning(format!(
        "this cumulative sum keeps a {d}×{e} state for every position: {} bytes per token at B = {batch}, N = {seq}",
        thousands(per_token.max(0) as u128)
    ))
    .with_label("not fused into a linear attention")
    .with_note(format!("it was not recognized as linear attention because {}", why_not_linear_attention(g, n, axis)))
    .with_hint(
        "linear attention is recognized as `einsum(q, cumsum(einsum(k, v), positions))`, with an optional decay \
         constant along the features (one per head, or a gate per position); its kernel keeps the state per \
         chunk, not per position",
    );
    if let Some(span) = g.node(n).span {
        diag = diag.or_at(span);
    }
    Some(diag)
}

/// The first part of `einsum(q, cumsum(einsum(k, v)))` that scan `n` lacks.
fn why_not_linear_attention(g: &Graph, n: NodeId, axis: usize) -> String {
    let ty = g.ty(n);
    if !mentions_n(&ty.shape[axis]) {
        return format!("the sum runs over axis {axis}, of size {}, not over the positions (N)", ty.shape[axis]);
    }
    if let Some(&decay) = g.operands(n).get(1) {
        // The decay as broadcast to the state's shape: its size along an axis before the
        // broadcast says whether it varies there.
        let mut src = decay;
        while matches!(g.node(src).op, Op::Broadcast { .. }) {
            src = g.operands(src)[0];
        }
        let src = g.ty(src);
        if src.rank() != ty.rank() {
            return "its decay is not broadcast to the state's shape from one of size 1 along the positions and \
                    features"
                .into();
        }
        let varies = |i: usize| src.shape[i].as_const() != Some(1);
        if (axis + 1..ty.rank()).any(varies) {
            return "its decay changes along the state's feature axes (a per-channel gate, as GLA's); the fused \
                    linear attention takes one decay per head, or one per head and position"
                .into();
        }
    }
    let users = g.users(n);
    if !users.iter().any(|&u| matches!(g.node(u).op, Op::Einsum(_))) {
        let kinds: Vec<&str> = users.iter().map(|&u| g.node(u).op.kind()).collect();
        let what = if kinds.is_empty() { "nothing (it is an output)".to_string() } else { kinds.join(", ") };
        return format!("its result is not read by an einsum with the queries but by {what}");
    }
    "the einsum that reads it does not contract it with queries over the key feature alone".into()
}

/// Values with two axes of length N: one warning, at the first such value computed.
fn quadratic_values(g: &Graph, order: &[NodeId], batch: i64, seq: i64) -> Option<Diagnostic> {
    let is_quadratic = |n: &NodeId| {
        let node = g.node(*n);
        !is_relayout(&node.op) && node.ty.shape.iter().filter(|d| mentions_n(d)).count() >= 2
    };
    let found: Vec<(NodeId, i64)> = order
        .iter()
        .filter(|n| is_quadratic(n))
        .filter_map(|&n| Some((n, bytes_per_token(g.ty(n), batch, seq)?)))
        .collect();
    // The caret goes to the first of the largest (scores rather than a boolean mask).
    let per_token = found.iter().map(|&(_, b)| b).max()?;
    let (first, _) = *found.iter().find(|&&(_, b)| b == per_token)?;
    let mut diag = Diagnostic::warning(format!(
        "{} value{} of N×N positions: up to {} bytes per token each at B = {batch}, N = {seq}, growing with N",
        found.len(),
        if found.len() == 1 { "" } else { "s" },
        thousands(per_token.max(0) as u128)
    ))
    .with_label(format!("one of them, {}", g.ty(first)))
    .with_note(
        "no attention normal form was recognized here: a causal mask `m ≤ n` (diagonal included) or no mask \
         makes a linear attention, a causal or anticausal one also with a decay matrix `exp(G_n − G_m)` of \
         cumulative log-gates G; softmax or ReLU scores with a constant mask make a block attention",
    )
    .with_hint(
        "a decay matrix of another form (not `exp` of one tensor G read at the later minus at the earlier \
         position), or any mask other than those, is not recognized; write the decay as \
         `cumsum(einsum(k, v), positions, decay = g)`, with g one per head or a gate per head and position",
    );
    if let Some(span) = g.node(first).span {
        diag = diag.or_at(span);
    }
    Some(diag)
}
