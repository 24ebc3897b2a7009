//! The `cse` pass: common-subexpression elimination. Two nodes are the same value when
//! they have equal ops (`Op` derives `Hash`/`Eq`), equal operand lists and equal types;
//! the later one (in topological order) is replaced by the earlier.
//!
//! Commutative ops compare with their operands in either order: `add`, `mul`, `eq`,
//! `ne`, `and`, `or` (exactly commutative in IEEE arithmetic; `max`/`min` are not quite,
//! they pick between `-0` and `+0` by position), and two-operand einsums, whose key is
//! the canonically lettered spec of the smaller of the two operand orders (the product
//! of two elements commutes; only the summation order may differ).
//!
//! Inputs and parameters are never merged (each is its own value). `dropout` nodes merge
//! only when their salt (part of the op) and operand are equal, i.e. when they draw the
//! same mask and so have the same value.

use super::canonicalize::normalize_spec;
use super::Pass;
use crate::ir::rewrite::{is_pinned, remove_if_unused, replace_all_uses};
use crate::ir::{BinaryOp, EinsumSpec, Graph, NodeId, Op, TensorType};
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use tnc_grammar::Diagnostic;

pub struct Cse;

impl Pass for Cse {
    fn name(&self) -> &'static str {
        "cse"
    }

    fn run(&self, mut g: Graph) -> Result<Graph, Diagnostic> {
        cse(&mut g);
        Ok(g)
    }
}

type Key = (Op, Vec<NodeId>, TensorType);

/// The structural identity of node `n`, with commutative operands in a canonical order.
fn key(g: &Graph, n: NodeId) -> Key {
    let node = g.node(n);
    let mut ops = g.operands(n);
    let op = match &node.op {
        Op::Binary(BinaryOp::Add | BinaryOp::Mul | BinaryOp::Eq | BinaryOp::Ne | BinaryOp::And | BinaryOp::Or) => {
            ops.sort();
            node.op.clone()
        }
        Op::Einsum(spec) if ops.len() == 2 => {
            let swapped = EinsumSpec { inputs: vec![spec.inputs[1].clone(), spec.inputs[0].clone()], ..spec.clone() };
            let a = (vec![ops[0], ops[1]], normalize_spec(spec));
            let b = (vec![ops[1], ops[0]], normalize_spec(&swapped));
            let (o, s) = std::cmp::min(a, b);
            ops = o;
            Op::Einsum(s)
        }
        Op::Einsum(spec) => Op::Einsum(normalize_spec(spec)),
        op => op.clone(),
    };
    (op, ops, node.ty.clone())
}

/// Merge structurally equal nodes. Returns the number of nodes removed.
pub fn cse(g: &mut Graph) -> usize {
    let mut seen: HashMap<Key, NodeId> = HashMap::with_capacity(g.len());
    let mut merged = Vec::new();
    // In topological order every operand has already been replaced by its
    // representative, so equal subtrees meet bottom-up in one sweep.
    for n in g.topo_order() {
        if is_pinned(&g.node(n).op) {
            continue;
        }
        match seen.entry(key(g, n)) {
            Entry::Occupied(e) => {
                replace_all_uses(g, n, *e.get());
                merged.push(n);
            }
            Entry::Vacant(e) => {
                e.insert(n);
            }
        }
    }
    remove_if_unused(g, &merged)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::verify::verify;
    use crate::ir::{DType, Dim, F64Bits, UnaryOp};

    fn f32s(shape: &[i64]) -> TensorType {
        TensorType::new(DType::F32, shape.iter().map(|&d| Dim::constant(d)).collect())
    }

    fn spec(s: &str) -> Op {
        let (ins, out) = s.split_once("->").unwrap();
        Op::Einsum(EinsumSpec {
            inputs: ins.split(',').map(|s| s.as_bytes().to_vec()).collect(),
            output: out.as_bytes().to_vec(),
            pinned: false,
        })
    }

    #[test]
    fn merges_equal_subtrees_and_commuted_operands() {
        let mut g = Graph::new("t");
        let x = g.add_input("x", f32s(&[3, 4]), None);
        let y = g.add_input("y", f32s(&[4, 5]), None);
        let e1 = g.add(Op::Unary(UnaryOp::Exp), &[x], None).unwrap();
        let e2 = g.add(Op::Unary(UnaryOp::Exp), &[x], None).unwrap();
        let c1 = g.add(Op::Constant { value: F64Bits::new(1.0), dtype: DType::F32 }, &[], None).unwrap();
        let c2 = g.add(Op::Constant { value: F64Bits::new(1.0), dtype: DType::F32 }, &[], None).unwrap();
        let s1 = g.add(Op::Binary(BinaryOp::Add), &[c1, c2], None).unwrap();
        let m1 = g.add(Op::Binary(BinaryOp::Mul), &[e1, x], None).unwrap();
        let m2 = g.add(Op::Binary(BinaryOp::Mul), &[x, e2], None).unwrap();
        let d1 = g.add(Op::Binary(BinaryOp::Sub), &[e1, x], None).unwrap();
        let d2 = g.add(Op::Binary(BinaryOp::Sub), &[x, e2], None).unwrap();
        let p1 = g.add(spec("ij,jk->ik"), &[m1, y], None).unwrap();
        let p2 = g.add(spec("ab,ca->cb"), &[y, m2], None).unwrap();
        for (i, n) in [s1, p1, p2, d1, d2].into_iter().enumerate() {
            g.add_output(format!("o{i}"), n);
        }
        let before = g.len();
        // The second exp, const, mul and einsum go; the two subs differ.
        assert_eq!(cse(&mut g), 4);
        verify(&g).unwrap();
        assert_eq!(g.len(), before - 4);
        assert_eq!(g.outputs[1].1, g.outputs[2].1);
        assert_ne!(g.outputs[3].1, g.outputs[4].1);
        assert_eq!(g.operands(s1), vec![c1, c1]);
    }

    #[test]
    fn inputs_params_and_dropouts_with_other_salts_stay() {
        let mut g = Graph::new("t");
        let x = g.add_input("x", f32s(&[3]), None);
        let x2 = g.add_input("x2", f32s(&[3]), None);
        let rate = F64Bits::new(0.5);
        let d1 = g.add(Op::Dropout { rate, salt: 1 }, &[x], None).unwrap();
        let d2 = g.add(Op::Dropout { rate, salt: 2 }, &[x], None).unwrap();
        let d3 = g.add(Op::Dropout { rate, salt: 1 }, &[x], None).unwrap();
        g.add_output("a", d1);
        g.add_output("b", d2);
        g.add_output("c", d3);
        g.add_output("x2", x2);
        assert_eq!(cse(&mut g), 1);
        verify(&g).unwrap();
        assert_eq!(g.outputs[2].1, d1);
        assert_ne!(g.outputs[1].1, d1);
        assert_eq!(g.inputs.len(), 2);
        assert_eq!(g.len(), 4);
    }
}
