//! Classifying attention masks by evaluating them. A mask that depends on nothing but
//! sizes, iotas and constants is a fixed function of positions, however it is spelled
//! (`iota(n)[:, None] >= iota(n)`, a comparison the other way round, a cumsum of ones…).
//! Evaluating it at a few lengths with the reference interpreter tells which of the
//! masks linear attention accepts it is, without looking at its spelling.

use crate::interp::{evaluate, EvalOptions, Tensor};
use crate::ir::{Direction, Graph, NodeId, Op};
use std::collections::{HashMap, HashSet};

/// The lengths a mask is evaluated at; several, so that a mask that only happens to
/// agree at one length is not accepted.
const PROBE_LENGTHS: &[i64] = &[1, 2, 5, 8];

/// If `mask` (a bool tensor, or an f32 tensor of 0/1) depends only on constants and every
/// slice over its axes (`n_axis`, `m_axis`) is the same mask `m ≤ n`, `m ≥ n` or all
/// ones, say which.
pub fn classify(g: &Graph, mask: NodeId, n_axis: usize, m_axis: usize) -> Option<Direction> {
    let sub = constant_subgraph(g, mask)?;
    let symbols: Vec<String> = {
        let mut s: Vec<String> = g.ty(mask).shape.iter().flat_map(|d| d.symbols()).collect();
        for n in &sub {
            if let Op::Iota { len, .. } | Op::SizeOf { size: len, .. } = &g.node(*n).op {
                s.extend(len.symbols());
            }
        }
        s.sort();
        s.dedup();
        s
    };
    let mut remaining = vec![Direction::Causal, Direction::Anticausal, Direction::Full];
    for &len in PROBE_LENGTHS {
        let values: HashMap<String, i64> = symbols.iter().map(|s| (s.clone(), len)).collect();
        let t = eval_node(g, &sub, mask, &values)?;
        let fits = consistent_with(&t, n_axis, m_axis)?;
        remaining.retain(|d| fits.contains(d));
    }
    // Lengths above 1 tell the three apart, so at most one remains.
    remaining.first().copied()
}

/// The ancestors of `n`, if none of them is an input or a parameter.
fn constant_subgraph(g: &Graph, n: NodeId) -> Option<Vec<NodeId>> {
    let mut seen = HashSet::new();
    let mut stack = vec![n];
    while let Some(x) = stack.pop() {
        if !seen.insert(x) {
            continue;
        }
        match g.node(x).op {
            Op::Input { .. } | Op::Param { .. } | Op::Dropout { .. } | Op::LinearAttention(_) => return None,
            _ => stack.extend(g.operands(x)),
        }
    }
    Some(seen.into_iter().collect())
}

fn eval_node(g: &Graph, sub: &[NodeId], root: NodeId, symbols: &HashMap<String, i64>) -> Option<Tensor> {
    // A copy of the graph holding only the mask's sub-graph.
    let mut copy = Graph::new("mask");
    let mut map: HashMap<NodeId, NodeId> = HashMap::new();
    let keep: HashSet<NodeId> = sub.iter().copied().collect();
    for n in g.topo_order().into_iter().filter(|n| keep.contains(n)) {
        let operands: Vec<NodeId> = g.operands(n).iter().map(|o| map[o]).collect();
        map.insert(n, copy.add(g.node(n).op.clone(), &operands, None).ok()?);
    }
    copy.add_output("mask", map[&root]);
    let opts = EvalOptions { symbols: symbols.clone(), ..EvalOptions::default() };
    let e = evaluate(&copy, &HashMap::new(), &[], &opts).ok()?;
    e.get(map[&root]).cloned()
}

/// The masks `t` agrees with (`None` if it is not a 0/1 tensor).
fn consistent_with(t: &Tensor, n_axis: usize, m_axis: usize) -> Option<Vec<Direction>> {
    let (causal, anti, full) = (Direction::Causal, Direction::Anticausal, Direction::Full);
    let mut candidates = vec![causal, anti, full];
    let rank = t.rank();
    let mut index = vec![0usize; rank];
    for (flat, &v) in t.data.iter().enumerate() {
        let mut rem = flat;
        for a in (0..rank).rev() {
            index[a] = rem % t.shape[a];
            rem /= t.shape[a];
        }
        let (n, m) = (index[n_axis], index[m_axis]);
        let on = match v {
            x if x == 1.0 => true,
            x if x == 0.0 => false,
            _ => return None,
        };
        candidates.retain(|c| match c {
            Direction::Causal => on == (m <= n),
            Direction::Anticausal => on == (m >= n),
            Direction::Full => on,
        });
    }
    Some(candidates)
}
