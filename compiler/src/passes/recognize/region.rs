//! Choosing a prologue region: the position-local ops that compute an attention operand
//! and are used by nothing else. The region grows upward from the operand through ops a
//! kernel can evaluate on a chunk of positions, and stops at values other ops also need
//! (so no work is duplicated), at contractions, scans and gathers, and at parameters and
//! inputs; those become the region's arguments. Cheap leaves (constants, iotas, sizes,
//! and elementwise ops of them only) are copied into every region that uses them.

use crate::ir::{Graph, NodeId, Op, Region};
use std::collections::{HashMap, HashSet};

/// Ops a region may contain.
fn region_op(op: &Op) -> bool {
    matches!(
        op,
        Op::Unary(_)
            | Op::Binary(_)
            | Op::Select
            | Op::Cast { .. }
            | Op::Reshape { .. }
            | Op::Broadcast { .. }
            | Op::Permute { .. }
            | Op::Slice { .. }
            | Op::Pad { .. }
            | Op::Concat { .. }
            | Op::Constant { .. }
            | Op::Iota { .. }
            | Op::SizeOf { .. }
            | Op::Reduce { .. }
            | Op::Dropout { .. }
    )
}

/// A value computed from constants only (no inputs, parameters or other data).
fn is_cheap(g: &Graph, n: NodeId, memo: &mut HashMap<NodeId, bool>) -> bool {
    if let Some(&c) = memo.get(&n) {
        return c;
    }
    let op = &g.node(n).op;
    let cheap = match op {
        Op::Constant { .. } | Op::Iota { .. } | Op::SizeOf { .. } => true,
        Op::Unary(_) | Op::Binary(_) | Op::Select | Op::Cast { .. } | Op::Reshape { .. } | Op::Broadcast { .. } => {
            g.operands(n).iter().all(|&o| is_cheap(g, o, memo))
        }
        _ => false,
    };
    memo.insert(n, cheap);
    cheap
}

/// The region computing `root`, with its arguments (the nodes it reads) in a stable order.
/// `root` itself must be a region op whose only user will be the new attention.
pub fn prologue(g: &Graph, root: NodeId, order: &HashMap<NodeId, usize>) -> (Region, Vec<NodeId>) {
    if !region_op(&g.node(root).op) {
        return (Region::identity(g.ty(root).clone()), vec![root]);
    }
    let mut inside: HashSet<NodeId> = HashSet::new();
    let mut memo = HashMap::new();
    // Candidates: ancestors reachable through region ops, visited from the latest to the
    // earliest so that every user of a candidate is decided before the candidate.
    let mut candidates: Vec<NodeId> = Vec::new();
    let mut seen = HashSet::new();
    let mut stack = vec![root];
    while let Some(n) = stack.pop() {
        if !seen.insert(n) || !region_op(&g.node(n).op) {
            continue;
        }
        candidates.push(n);
        stack.extend(g.operands(n));
    }
    candidates.sort_by_key(|n| std::cmp::Reverse(order.get(n).copied().unwrap_or(usize::MAX)));
    for n in candidates {
        let users = g.users(n);
        let take = n == root
            || (!users.is_empty() && users.iter().all(|u| inside.contains(u)))
            || (is_cheap(g, n, &mut memo) && users.iter().any(|u| inside.contains(u)));
        if take {
            inside.insert(n);
        }
    }
    // Arguments: values read by the region but computed outside it, in first-use order.
    let mut args: Vec<NodeId> = Vec::new();
    let mut visit = vec![root];
    let mut visited = HashSet::new();
    while let Some(n) = visit.pop() {
        if !visited.insert(n) {
            continue;
        }
        for o in g.operands(n) {
            if inside.contains(&o) {
                visit.push(o);
            } else if !args.contains(&o) {
                args.push(o);
            }
        }
    }
    args.sort_by_key(|n| order.get(n).copied().unwrap_or(usize::MAX));
    let region = Region::extract(g, root, &args, &|op| region_op(op))
        .expect("every node between the arguments and the root is a region op");
    (region, args)
}
