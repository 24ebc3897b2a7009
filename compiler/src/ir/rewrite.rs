//! Graph mutation helpers for passes: redirect the uses of a value, delete what no output
//! needs, add a node "like" another (same span), recognize and build splatted constants,
//! fold scalar constant arithmetic, and drive local rewrite rules to a fixed point.
//!
//! Invariants the helpers keep: `Param` and `Input` nodes are never removed (the side
//! tables `Graph::params[i].node` / `inputs[i].node` stay valid), edges keep their operand
//! positions, and outputs follow replaced values.

use super::dim::Dim;
use super::graph::{Graph, NodeId};
use super::op::{F64Bits, Op};
use super::types::{DType, TensorType};
use petgraph::visit::EdgeRef;
use petgraph::Direction;
use std::collections::HashMap;

/// Make every user of `old` (and every output naming it) use `new` instead, at the same
/// operand positions. `old` stays in the graph, now unused. The caller guarantees that
/// `new` has `old`'s type and does not depend on `old`.
pub fn replace_all_uses(g: &mut Graph, old: NodeId, new: NodeId) {
    if old == new {
        return;
    }
    debug_assert_eq!(g.ty(old), g.ty(new), "replacing a value by one of another type");
    let edges: Vec<_> =
        g.dag.edges_directed(old, Direction::Outgoing).map(|e| (e.id(), e.target(), *e.weight())).collect();
    for (id, target, pos) in edges {
        g.dag.remove_edge(id);
        g.dag.add_edge(new, target, pos);
    }
    for (_, o) in &mut g.outputs {
        if *o == old {
            *o = new;
        }
    }
}

/// `true` for nodes that must never be removed: parameters and inputs.
pub fn is_pinned(op: &Op) -> bool {
    matches!(op, Op::Input { .. } | Op::Param { .. })
}

/// `roots` and every node they depend on.
pub fn dependencies(g: &Graph, roots: impl IntoIterator<Item = NodeId>) -> std::collections::HashSet<NodeId> {
    let mut live = std::collections::HashSet::with_capacity(g.len());
    let mut stack: Vec<NodeId> = roots.into_iter().collect();
    while let Some(n) = stack.pop() {
        if live.insert(n) {
            stack.extend(g.dag.neighbors_directed(n, Direction::Incoming));
        }
    }
    live
}

/// Remove every node that no output depends on, except parameters and inputs.
/// Returns how many nodes were removed.
pub fn remove_dead(g: &mut Graph) -> usize {
    let live = dependencies(g, g.outputs.iter().map(|&(_, n)| n));
    let dead: Vec<NodeId> = g.dag.node_indices().filter(|n| !live.contains(n) && !is_pinned(&g.node(*n).op)).collect();
    for &n in &dead {
        g.dag.remove_node(n);
    }
    dead.len()
}

/// Remove the given nodes if nothing uses them (no users, not an output, not pinned).
pub fn remove_if_unused(g: &mut Graph, nodes: &[NodeId]) -> usize {
    let mut removed = 0;
    for &n in nodes {
        let Some(node) = g.dag.node_weight(n) else { continue };
        let used = is_pinned(&node.op)
            || g.dag.neighbors_directed(n, Direction::Outgoing).next().is_some()
            || g.outputs.iter().any(|&(_, o)| o == n);
        if !used {
            g.dag.remove_node(n);
            removed += 1;
        }
    }
    removed
}

/// Add `op` applied to `operands`, with the source span of `like` (type inferred).
pub fn add_like(g: &mut Graph, like: NodeId, op: Op, operands: &[NodeId]) -> Result<NodeId, String> {
    let span = g.node(like).span;
    g.add(op, operands, span)
}

/// A copy of `id`'s op applied to new operands (same span).
pub fn rebuild(g: &mut Graph, id: NodeId, operands: &[NodeId]) -> Result<NodeId, String> {
    let op = g.node(id).op.clone();
    add_like(g, id, op, operands)
}

/// Whether a value is a user-visible output.
pub fn is_output(g: &Graph, id: NodeId) -> bool {
    g.outputs.iter().any(|&(_, o)| o == id)
}

/// The only user of `id`, if it has exactly one (counting an output as a user).
pub fn single_user(g: &Graph, id: NodeId) -> Option<NodeId> {
    let users = g.users(id);
    (users.len() == 1 && !is_output(g, id)).then(|| users[0])
}

/// The scalar a value is made of if it is a constant, possibly reshaped, broadcast or
/// permuted ("splatted"): elaboration spells a scalar used with a tensor as
/// `broadcast(reshape(const))`.
pub fn splat_value(g: &Graph, mut id: NodeId) -> Option<(F64Bits, DType)> {
    loop {
        match &g.node(id).op {
            Op::Constant { value, dtype } => return Some((*value, *dtype)),
            Op::Reshape { .. } | Op::Broadcast { .. } | Op::Permute { .. } => {
                id = *g.operands(id).first()?;
            }
            _ => return None,
        }
    }
}

/// The splat's value as an f64 (`None` if `id` is not a splat).
pub fn splat_f64(g: &Graph, id: NodeId) -> Option<f64> {
    splat_value(g, id).map(|(v, _)| v.get())
}

/// Whether `id` is a splat in the canonical spelling [`splat`] produces.
pub fn is_canonical_splat(g: &Graph, id: NodeId) -> bool {
    let ones = |shape: &[Dim]| shape.iter().all(|d| d.as_const() == Some(1));
    let is_const = |n: NodeId| matches!(g.node(n).op, Op::Constant { .. });
    let is_ones_reshape_of_const = |n: NodeId| match &g.node(n).op {
        Op::Reshape { shape } => {
            ones(shape) && !shape.is_empty() && g.operands(n).first().is_some_and(|&c| is_const(c))
        }
        _ => false,
    };
    match &g.node(id).op {
        Op::Constant { .. } => true,
        Op::Reshape { .. } => is_ones_reshape_of_const(id),
        Op::Broadcast { shape } => !ones(shape) && g.operands(id).first().is_some_and(|&r| is_ones_reshape_of_const(r)),
        _ => false,
    }
}

/// A constant of the given type in the canonical spelling: a scalar `const`, reshaped to
/// all-ones of the rank, broadcast to the shape (steps that would be identities are left
/// out). The span is `like`'s.
pub fn splat(g: &mut Graph, like: NodeId, value: F64Bits, ty: &TensorType) -> Result<NodeId, String> {
    let mut n = add_like(g, like, Op::Constant { value, dtype: ty.dtype }, &[])?;
    if ty.shape.is_empty() {
        return Ok(n);
    }
    let ones = vec![Dim::constant(1); ty.rank()];
    n = add_like(g, like, Op::Reshape { shape: ones.clone() }, &[n])?;
    if ty.shape != ones {
        n = add_like(g, like, Op::Broadcast { shape: ty.shape.clone() }, &[n])?;
    }
    Ok(n)
}

/// Evaluate `op` on scalar constant operands with the reference interpreter (so folding
/// has exactly the interpreter's semantics: i32 wrapping, NaN rules, …). The result is
/// computed in f64; f32-typed constants are rounded where they are used, as any constant
/// is. `None` if the op cannot be evaluated (e.g. an integer division by zero).
pub fn fold_scalar(op: &Op, operands: &[(F64Bits, DType)]) -> Option<(F64Bits, DType)> {
    let mut m = Graph::new("fold");
    let ids: Vec<NodeId> = operands
        .iter()
        .map(|&(value, dtype)| m.add(Op::Constant { value, dtype }, &[], None))
        .collect::<Result<_, _>>()
        .ok()?;
    let r = m.add(op.clone(), &ids, None).ok()?;
    if m.ty(r).rank() != 0 {
        return None;
    }
    let dtype = m.ty(r).dtype;
    let ev = crate::interp::evaluate(&m, &HashMap::new(), &[], &Default::default()).ok()?;
    let v = ev.get(r)?.item()?;
    Some((F64Bits::new(v), dtype))
}

/// A local rewrite rule: the value to replace a node by, or `None` to leave it.
pub type Rule<'a> = dyn FnMut(&mut Graph, NodeId) -> Option<NodeId> + 'a;

/// Apply `rule` to every live node in topological order, replacing a node by the value
/// the rule returns, and repeat until nothing changes (at most `max_rounds` rounds).
/// Dead nodes are removed after every round. A rule must return `None` for a node
/// already in its target form, and a replacement of the node's own type that does not
/// depend on the node. Returns the number of replacements.
pub fn rewrite_to_fixpoint(g: &mut Graph, rule: &mut Rule<'_>, max_rounds: usize) -> Result<usize, String> {
    let mut total = 0;
    remove_dead(g);
    for _ in 0..max_rounds {
        let mut changed = 0;
        for n in g.topo_order() {
            if g.dag.node_weight(n).is_none() || is_pinned(&g.node(n).op) {
                continue;
            }
            let used = g.dag.neighbors_directed(n, Direction::Outgoing).next().is_some() || is_output(g, n);
            if !used {
                continue;
            }
            if let Some(r) = rule(g, n) {
                if r == n {
                    continue;
                }
                if g.ty(r) != g.ty(n) {
                    return Err(format!(
                        "a rewrite replaced `{}` of type {} by `{}` of type {}",
                        g.node(n).op.kind(),
                        g.ty(n),
                        g.node(r).op.kind(),
                        g.ty(r)
                    ));
                }
                replace_all_uses(g, n, r);
                changed += 1;
            }
        }
        remove_dead(g);
        total += changed;
        if changed == 0 {
            break;
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{BinaryOp, UnaryOp};

    fn f32s(shape: &[i64]) -> TensorType {
        TensorType::new(DType::F32, shape.iter().map(|&d| Dim::constant(d)).collect())
    }

    #[test]
    fn replace_keeps_positions_and_outputs() {
        let mut g = Graph::new("t");
        let x = g.add_input("x", f32s(&[3]), None);
        let y = g.add_input("y", f32s(&[3]), None);
        let a = g.add(Op::Unary(UnaryOp::Exp), &[x], None).unwrap();
        let s = g.add(Op::Binary(BinaryOp::Sub), &[y, a], None).unwrap();
        g.add_output("a", a);
        g.add_output("s", s);
        let b = g.add(Op::Unary(UnaryOp::Neg), &[x], None).unwrap();
        replace_all_uses(&mut g, a, b);
        assert_eq!(g.operands(s), vec![y, b]);
        assert_eq!(g.outputs[0].1, b);
        assert_eq!(remove_dead(&mut g), 1);
        assert!(g.dag.node_weight(a).is_none());
        crate::ir::verify::verify(&g).unwrap();
    }

    #[test]
    fn dead_params_and_inputs_stay() {
        let mut g = Graph::new("t");
        let x = g.add_input("x", f32s(&[3]), None);
        let unused = g.add_input("unused", f32s(&[3]), None);
        let e = g.add(Op::Unary(UnaryOp::Exp), &[unused], None).unwrap();
        g.add_output("x", x);
        assert_eq!(remove_dead(&mut g), 1);
        assert!(g.dag.node_weight(e).is_none());
        assert!(g.dag.node_weight(unused).is_some());
        crate::ir::verify::verify(&g).unwrap();
    }

    #[test]
    fn splats_round_trip() {
        let mut g = Graph::new("t");
        let x = g.add_input("x", f32s(&[2, 3]), None);
        let s = splat(&mut g, x, F64Bits::new(2.5), &f32s(&[2, 3])).unwrap();
        assert_eq!(splat_f64(&g, s), Some(2.5));
        assert!(is_canonical_splat(&g, s));
        assert!(!is_canonical_splat(&g, x));
        let one = splat(&mut g, x, F64Bits::new(1.0), &f32s(&[1, 1])).unwrap();
        assert!(is_canonical_splat(&g, one));
        assert_eq!(g.node(one).op.kind(), "reshape");
    }

    #[test]
    fn folding_uses_interpreter_semantics() {
        let c = |v: f64, d| (F64Bits::new(v), d);
        let add = Op::Binary(BinaryOp::Add);
        assert_eq!(fold_scalar(&add, &[c(1.5, DType::F32), c(2.0, DType::F32)]), Some(c(3.5, DType::F32)));
        let wrap = fold_scalar(&add, &[c(i32::MAX as f64, DType::I32), c(1.0, DType::I32)]);
        assert_eq!(wrap, Some(c(i32::MIN as f64, DType::I32)));
        assert_eq!(fold_scalar(&Op::Binary(BinaryOp::Div), &[c(1.0, DType::I32), c(0.0, DType::I32)]), None);
        let lt = fold_scalar(&Op::Binary(BinaryOp::Lt), &[c(1.0, DType::F32), c(2.0, DType::F32)]);
        assert_eq!(lt, Some(c(1.0, DType::Bool)));
    }
}
