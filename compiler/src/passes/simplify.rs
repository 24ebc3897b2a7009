//! The `simplify` pass (after `autodiff`, on the joint forward + backward graph):
//! algebraic identities, plus every `canonicalize` rule (shape-chain folding, einsum
//! permute folding and lettering, constant folding) and CSE, to a fixed point.
//!
//! "0" and "1" below are constants, possibly splatted (reshaped / broadcast).
//!
//! * `x + 0`, `0 + x`, `x - 0` → `x`. Exact except for the sign of a zero result:
//!   `-0 + 0` is `+0` but folds to `-0`. Nothing downstream of a sum distinguishes them
//!   except a division by that exact zero, which a well-defined model does not do.
//! * `x * 1`, `1 * x`, `x / 1` → `x` (exact).
//! * `x * 0`, `0 * x`, and an einsum with a zero operand → `0`. **Not exact** for
//!   non-finite `x`: `inf * 0` and `NaN * 0` are NaN, and a negative `x` gives `-0`. We
//!   fold anyway, because autodiff produces these for gradients that are structurally
//!   zero, and folding them is what lets DCE drop whole dead backward chains; a NaN or
//!   inf in the forward values still shows in the loss, which is not touched.
//! * `neg(neg(x))` → `x`; `select(c, x, x)` → `x`.
//! * a reduction over size-1 axes only → `reshape` (the value is the one element).

use super::canonicalize::{canonical_rule, MAX_ROUNDS};
use super::cse::cse;
use super::Pass;
use crate::ir::rewrite::{add_like, rewrite_to_fixpoint, splat, splat_f64};
use crate::ir::{BinaryOp, F64Bits, Graph, NodeId, Op, UnaryOp};
use tnc_grammar::Diagnostic;

pub struct Simplify;

impl Pass for Simplify {
    fn name(&self) -> &'static str {
        "simplify"
    }

    fn run(&self, mut g: Graph) -> Result<Graph, Diagnostic> {
        simplify(&mut g).map_err(|e| Diagnostic::error(format!("internal error in `simplify`: {e}")))?;
        Ok(g)
    }
}

/// Algebraic identities and canonicalization rules, then CSE, until neither applies.
pub fn simplify(g: &mut Graph) -> Result<(), String> {
    let mut rule = |g: &mut Graph, n: NodeId| algebraic_rule(g, n).or_else(|| canonical_rule(g, n));
    for _ in 0..MAX_ROUNDS {
        rewrite_to_fixpoint(g, &mut rule, MAX_ROUNDS)?;
        if cse(g) == 0 {
            break;
        }
    }
    Ok(())
}

fn is_const(g: &Graph, x: NodeId, v: f64) -> bool {
    // `==` on f64: -0 counts as 0.
    splat_f64(g, x) == Some(v)
}

fn zero_like(g: &mut Graph, n: NodeId) -> Option<NodeId> {
    let ty = g.ty(n).clone();
    splat(g, n, F64Bits::new(0.0), &ty).ok()
}

/// One algebraic simplification at node `n`: the value to replace it by, or `None`.
pub(crate) fn algebraic_rule(g: &mut Graph, n: NodeId) -> Option<NodeId> {
    let op = g.node(n).op.clone();
    let ops = g.operands(n);
    match op {
        Op::Binary(BinaryOp::Add) => {
            if is_const(g, ops[1], 0.0) {
                Some(ops[0])
            } else if is_const(g, ops[0], 0.0) {
                Some(ops[1])
            } else {
                None
            }
        }
        Op::Binary(BinaryOp::Sub) => is_const(g, ops[1], 0.0).then_some(ops[0]),
        Op::Binary(BinaryOp::Mul) => {
            if is_const(g, ops[1], 1.0) {
                Some(ops[0])
            } else if is_const(g, ops[0], 1.0) {
                Some(ops[1])
            } else if is_const(g, ops[0], 0.0) || is_const(g, ops[1], 0.0) {
                // Both constants is constant folding's business (it is exact).
                if splat_f64(g, ops[0]).is_some() && splat_f64(g, ops[1]).is_some() {
                    return None;
                }
                zero_like(g, n)
            } else {
                None
            }
        }
        Op::Binary(BinaryOp::Div) => is_const(g, ops[1], 1.0).then_some(ops[0]),
        Op::Einsum(_) if ops.iter().any(|&o| is_const(g, o, 0.0)) => zero_like(g, n),
        Op::Unary(UnaryOp::Neg) => match g.node(ops[0]).op {
            Op::Unary(UnaryOp::Neg) => Some(g.operands(ops[0])[0]),
            _ => None,
        },
        Op::Select if ops[1] == ops[2] => Some(ops[1]),
        Op::Reduce { axes, .. } => {
            let shape = &g.ty(ops[0]).shape;
            if axes.iter().all(|&a| shape[a].as_const() == Some(1)) {
                let out = g.ty(n).shape.clone();
                add_like(g, n, Op::Reshape { shape: out }, &[ops[0]]).ok()
            } else {
                None
            }
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interp::{compare, evaluate, EvalOptions, Tensor};
    use crate::ir::print::op_counts;
    use crate::ir::verify::verify;
    use crate::ir::{DType, Dim, ReduceOp, TensorType};
    use std::collections::HashMap;

    fn f32s(shape: &[i64]) -> TensorType {
        TensorType::new(DType::F32, shape.iter().map(|&d| Dim::constant(d)).collect())
    }

    fn count(g: &Graph, kind: &str) -> usize {
        op_counts(g).into_iter().find(|(k, _)| *k == kind).map_or(0, |(_, c)| c)
    }

    fn constant(g: &mut Graph, v: f64, shape: &[i64]) -> NodeId {
        let c = g.add(Op::Constant { value: F64Bits::new(v), dtype: DType::F32 }, &[], None).unwrap();
        let r = g.add(Op::Reshape { shape: vec![Dim::constant(1); shape.len()] }, &[c], None).unwrap();
        g.add(Op::Broadcast { shape: f32s(shape).shape }, &[r], None).unwrap()
    }

    fn bin(g: &mut Graph, b: BinaryOp, x: NodeId, y: NodeId) -> NodeId {
        g.add(Op::Binary(b), &[x, y], None).unwrap()
    }

    fn run(g: &Graph, x: &Tensor) -> Graph {
        let mut h = g.clone();
        simplify(&mut h).unwrap();
        verify(&h).unwrap();
        let inputs = HashMap::from([("x".to_string(), x.clone())]);
        let a = evaluate(g, &inputs, &[], &EvalOptions::default()).unwrap().outputs(g);
        let b = evaluate(&h, &inputs, &[], &EvalOptions::default()).unwrap().outputs(&h);
        for ((_, a), (_, b)) in a.iter().zip(&b) {
            let c = compare(b, a);
            assert!(c.within(1e-15), "{c}");
        }
        h
    }

    fn x3() -> Tensor {
        Tensor::new(vec![3], vec![0.5, -1.5, 2.0]).unwrap()
    }

    #[test]
    fn additive_and_multiplicative_identities() {
        let mut g = Graph::new("t");
        let x = g.add_input("x", f32s(&[3]), None);
        let zero = constant(&mut g, 0.0, &[3]);
        let one = constant(&mut g, 1.0, &[3]);
        let a = bin(&mut g, BinaryOp::Add, x, zero);
        let a = bin(&mut g, BinaryOp::Add, zero, a);
        let a = bin(&mut g, BinaryOp::Sub, a, zero);
        let a = bin(&mut g, BinaryOp::Mul, a, one);
        let a = bin(&mut g, BinaryOp::Mul, one, a);
        let a = bin(&mut g, BinaryOp::Div, a, one);
        g.add_output("y", a);
        let h = run(&g, &x3());
        assert_eq!(h.outputs[0].1, x);
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn multiplication_by_zero_is_zero() {
        let mut g = Graph::new("t");
        let x = g.add_input("x", f32s(&[3]), None);
        let zero = constant(&mut g, 0.0, &[3]);
        let e = g.add(Op::Unary(UnaryOp::Exp), &[x], None).unwrap();
        let m = bin(&mut g, BinaryOp::Mul, e, zero);
        let s = bin(&mut g, BinaryOp::Add, x, m);
        g.add_output("y", s);
        let h = run(&g, &x3());
        assert_eq!(h.outputs[0].1, x);
        assert_eq!(count(&h, "exp"), 0);
    }

    #[test]
    fn double_negation_select_and_unit_reductions() {
        let mut g = Graph::new("t");
        let x = g.add_input("x", f32s(&[3]), None);
        let n1 = g.add(Op::Unary(UnaryOp::Neg), &[x], None).unwrap();
        let n2 = g.add(Op::Unary(UnaryOp::Neg), &[n1], None).unwrap();
        let e1 = g.add(Op::Unary(UnaryOp::Exp), &[n2], None).unwrap();
        let e2 = g.add(Op::Unary(UnaryOp::Exp), &[x], None).unwrap();
        let zero = constant(&mut g, 0.0, &[3]);
        let c = bin(&mut g, BinaryOp::Gt, x, zero);
        let s = g.add(Op::Select, &[c, e1, e2], None).unwrap();
        let r = g.add(Op::Reshape { shape: f32s(&[3, 1]).shape }, &[s], None).unwrap();
        let red = g.add(Op::Reduce { op: ReduceOp::Sum, axes: vec![1] }, &[r], None).unwrap();
        g.add_output("y", red);
        let h = run(&g, &x3());
        assert_eq!(count(&h, "neg") + count(&h, "select") + count(&h, "reduce_sum") + count(&h, "gt"), 0);
        assert_eq!(count(&h, "exp"), 1);
        // The reduce became a reshape, and reshape∘reshape back to [3] is the identity.
        assert_eq!(h.len(), 2);
    }

    #[test]
    fn zeros_flow_through_einsum_pad_and_sum() {
        // sum(pad(einsum(x, 0))) is a zero splat; the einsum and x's exp are dropped.
        let mut g = Graph::new("t");
        let x = g.add_input("x", f32s(&[3]), None);
        let e = g.add(Op::Unary(UnaryOp::Exp), &[x], None).unwrap();
        let r = g.add(Op::Reshape { shape: f32s(&[3, 1]).shape }, &[e], None).unwrap();
        let zero = constant(&mut g, 0.0, &[1, 2]);
        let spec = crate::ir::EinsumSpec {
            inputs: vec![b"ij".to_vec(), b"jk".to_vec()],
            output: b"ik".to_vec(),
            pinned: false,
        };
        let p = g.add(Op::Einsum(spec), &[r, zero], None).unwrap();
        let p = g.add(Op::Pad { axis: 0, before: Dim::constant(1), after: Dim::constant(0) }, &[p], None).unwrap();
        let p = g.add(Op::Reduce { op: ReduceOp::Sum, axes: vec![0] }, &[p], None).unwrap();
        let p = g.add(Op::Reshape { shape: f32s(&[2, 1]).shape }, &[p], None).unwrap();
        let p = g.add(Op::Broadcast { shape: f32s(&[2, 3]).shape }, &[p], None).unwrap();
        let s = g.add(Op::Reduce { op: ReduceOp::Sum, axes: vec![0] }, &[p], None).unwrap();
        let y = bin(&mut g, BinaryOp::Add, x, s);
        g.add_output("y", y);
        let h = run(&g, &x3());
        assert_eq!(h.outputs[0].1, x);
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn broadcast_of_broadcast_folds() {
        let mut g = Graph::new("t");
        let x = g.add_input("x", f32s(&[1, 1]), None);
        let b1 = g.add(Op::Broadcast { shape: f32s(&[1, 4]).shape }, &[x], None).unwrap();
        let b2 = g.add(Op::Broadcast { shape: f32s(&[3, 4]).shape }, &[b1], None).unwrap();
        g.add_output("y", b2);
        let h = run(&g, &Tensor::new(vec![1, 1], vec![2.5]).unwrap());
        assert_eq!(count(&h, "broadcast"), 1);
        assert_eq!(h.operands(h.outputs[0].1), vec![x]);
    }
}
