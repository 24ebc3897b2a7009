//! Graph invariants, checked after elaboration and (in debug builds) after every pass:
//! operand positions are 0..n without gaps, every node's type is what inference says,
//! side tables point at the right nodes, and the graph is acyclic.

use super::graph::Graph;
use super::infer::infer;
use super::op::Op;
use super::types::TensorType;

pub fn verify(g: &Graph) -> Result<(), String> {
    if g.topo_order().len() != g.len() {
        return Err("the graph has a cycle".into());
    }
    for (i, inp) in g.inputs.iter().enumerate() {
        match g.dag.node_weight(inp.node).map(|n| &n.op) {
            Some(Op::Input { index }) if *index as usize == i => {}
            _ => return Err(format!("input `{}` does not point at its input node", inp.name)),
        }
    }
    for (i, p) in g.params.iter().enumerate() {
        match g.dag.node_weight(p.node).map(|n| &n.op) {
            Some(Op::Param { index }) if *index as usize == i => {}
            _ => return Err(format!("parameter `{}` does not point at its node", p.name)),
        }
        if p.ty.shape.iter().any(|d| !d.is_const()) {
            return Err(format!("parameter `{}` has a run-time size: {}", p.name, p.ty));
        }
    }
    for (name, n) in &g.outputs {
        if g.dag.node_weight(*n).is_none() {
            return Err(format!("output `{name}` points at a removed node"));
        }
    }
    for n in g.dag.node_indices() {
        let node = g.node(n);
        let mut positions: Vec<u8> =
            g.dag.edges_directed(n, petgraph::Direction::Incoming).map(|e| *e.weight()).collect();
        positions.sort();
        if positions.iter().enumerate().any(|(i, &p)| p as usize != i) {
            return Err(format!("node {n:?} ({}) has operand positions {positions:?}", node.op.kind()));
        }
        let expected = match &node.op {
            Op::Input { index } => g.inputs.get(*index as usize).map(|i| i.ty.clone()).ok_or("bad input index")?,
            Op::Param { index } => g.params.get(*index as usize).map(|p| p.ty.clone()).ok_or("bad param index")?,
            op => {
                let ops = g.operands(n);
                let tys: Vec<&TensorType> = ops.iter().map(|&o| g.ty(o)).collect();
                infer(op, &tys).map_err(|e| format!("node {n:?} ({}): {e}", op.kind()))?
            }
        };
        if expected != node.ty {
            return Err(format!(
                "node {n:?} ({}) has type {} but its operands give {}",
                node.op.kind(),
                node.ty,
                expected
            ));
        }
    }
    Ok(())
}
