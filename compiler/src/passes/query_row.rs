//! One query row of an attention's weights region: the decode step's softmax attention
//! over a KV cache scores the step's query against the `C` cached keys (`[…, 1, C]`)
//! instead of the whole `C×C` window, and this evaluates the weights region (scaling,
//! mask, softmax: any region) on that row.
//!
//! The region maps the scores `S [batch…, C, C]` (query axis, key axis) to the weights of
//! the same shape. Its value at query row `slot` is the region with every value
//! restricted to that row along the axis that carries the query — found backwards from
//! the result, whose query axis is the second to last: an elementwise op passes it to its
//! operands (equal shapes), a broadcast to its operand unless the operand has size 1
//! there (then the operand is needed whole), a reshape that only adds or drops size-1
//! axes to the matching axis, a reduction to the kept axis; `iota` along the query axis
//! becomes `[slot]`. A value used along both axes (the causal mask's `iota`) is emitted
//! once per use. Anything else — a reduction over the queries, a reshape that merges the
//! query axis, the scores needed whole — has no row form: `None`, and the step evaluates
//! the whole window instead.

use crate::ir::region::{Region, RegionValue};
use crate::ir::{DType, Dim, Graph, NodeId, Op};
use std::collections::HashMap;

/// The weights region `r` (sized to the window) at query row `slot` (an i32 scalar of
/// `g`), given that row of its argument, `s_row [batch…, 1, C]`.
pub fn query_row(g: &mut Graph, r: &Region, s_row: NodeId, slot: NodeId) -> Option<NodeId> {
    let [arg] = &r.args[..] else { return None };
    let query = arg.rank().checked_sub(2)?;
    let mut row = Row { g, r, s_row, slot, done: HashMap::new() };
    row.value(r.result, Some(query))
}

struct Row<'a> {
    g: &'a mut Graph,
    r: &'a Region,
    s_row: NodeId,
    slot: NodeId,
    /// (region value, its query axis or `None` for the whole value) → the emitted node.
    done: HashMap<(RegionValue, Option<usize>), NodeId>,
}

impl Row<'_> {
    /// Region value `v` restricted to the query row along axis `query` (`None`: whole).
    fn value(&mut self, v: RegionValue, query: Option<usize>) -> Option<NodeId> {
        if let Some(&n) = self.done.get(&(v, query)) {
            return Some(n);
        }
        let n = match v {
            RegionValue::Arg(_) => (query == Some(self.r.args[0].rank() - 2)).then_some(self.s_row)?,
            RegionValue::Node(i) => self.node(i as usize, query)?,
        };
        self.done.insert((v, query), n);
        Some(n)
    }

    fn ty(&self, v: RegionValue) -> &crate::ir::TensorType {
        match v {
            RegionValue::Arg(i) => &self.r.args[i as usize],
            RegionValue::Node(i) => &self.r.nodes[i as usize].ty,
        }
    }

    fn node(&mut self, i: usize, query: Option<usize>) -> Option<NodeId> {
        let n = &self.r.nodes[i];
        let (op, operands) = (n.op.clone(), n.operands.clone());
        let Some(q) = query else {
            let ops = operands.iter().map(|&o| self.value(o, None)).collect::<Option<Vec<_>>>()?;
            return self.g.add(op, &ops, None).ok();
        };
        if n.ty.shape.get(q).is_none_or(|d| d.as_const() == Some(1)) {
            return None;
        }
        let one = |shape: &[Dim]| {
            let mut s = shape.to_vec();
            s[q] = Dim::constant(1);
            s
        };
        let (op, ops) = match op {
            Op::Unary(_) | Op::Binary(_) | Op::Select | Op::Cast { .. } => {
                let ops = operands.iter().map(|&o| self.value(o, Some(q))).collect::<Option<Vec<_>>>()?;
                (op, ops)
            }
            Op::Broadcast { shape } => {
                let whole = self.ty(operands[0]).shape[q].as_const() == Some(1);
                let o = self.value(operands[0], (!whole).then_some(q))?;
                (Op::Broadcast { shape: one(&shape) }, vec![o])
            }
            Op::Reshape { shape } => {
                let from = &self.ty(operands[0]).shape;
                let axis = matching_axis(from, &shape, q)?;
                let o = self.value(operands[0], Some(axis))?;
                (Op::Reshape { shape: one(&shape) }, vec![o])
            }
            Op::Reduce { op: reduce, axes } => {
                let rank = self.ty(operands[0]).rank();
                let axis = (0..rank).filter(|a| !axes.contains(a)).nth(q)?;
                let o = self.value(operands[0], Some(axis))?;
                (Op::Reduce { op: reduce, axes }, vec![o])
            }
            Op::Iota { dtype, .. } => {
                let slot = if dtype == DType::I32 {
                    self.slot
                } else {
                    self.g.add(Op::Cast { to: dtype }, &[self.slot], None).ok()?
                };
                return self.g.add(Op::Reshape { shape: vec![Dim::constant(1)] }, &[slot], None).ok();
            }
            _ => return None,
        };
        self.g.add(op, &ops, None).ok()
    }
}

/// The axis of `from` that axis `q` of `to` is, when the reshape only adds or drops
/// size-1 axes (the other sizes, in order, are equal).
fn matching_axis(from: &[Dim], to: &[Dim], q: usize) -> Option<usize> {
    let big =
        |s: &[Dim]| s.iter().enumerate().filter(|(_, d)| d.as_const() != Some(1)).map(|(i, _)| i).collect::<Vec<_>>();
    let (f, t) = (big(from), big(to));
    if f.len() != t.len() || f.iter().zip(&t).any(|(&a, &b)| from[a] != to[b]) {
        return None;
    }
    Some(f[t.iter().position(|&b| b == q)?])
}
