//! The `precision` pass (after `autodiff` and `simplify`, on the joint forward + backward
//! graph): decides which values are computed in 16 bits, by policy.
//!
//! Under `--precision bf16` (or `f16`) the operands of every product are narrowed:
//! - every contraction (an einsum of two operands that sums over a letter): the
//!   projections, their input gradients and their weight gradients, and whatever
//!   products the model spells as einsums;
//! - the cross-entropy's hidden states and table (its logits products, forward and both
//!   gradients).
//!
//! Everything else stays f32: a contraction's result (products accumulate in f32), so the
//! values its users see, the norms, softmax and logsumexp, exp, the loss, every gradient
//! that is not a product's operand, the parameters (f32 master weights: a parameter's
//! narrowed copy is one `cast` node, computed once per step, which the forward product and
//! the backward ones share), and the optimizer. The normal-form attention ops keep f32
//! operands too (their kernels compute in f32 on every target; the recurrent state is f32
//! in any case).
//!
//! A product written inside `precision f32 { … }` (`EinsumSpec::pinned`, and the
//! cross-entropy recognized from one) keeps f32 operands, and so do its gradient's
//! products, which autodiff pins in turn.
//!
//! A narrowed operand is one `cast` node per value, shared by all the products that read
//! it, so an activation kept for the backward is kept in 16 bits once. `f32` (the default)
//! changes nothing.

use super::Pass;
use crate::ir::rewrite::{rebuild, remove_dead, replace_all_uses};
use crate::ir::{DType, Graph, NodeId, Op};
use std::collections::HashMap;
use tnc_grammar::Diagnostic;

/// The element type of products' operands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Policy {
    #[default]
    F32,
    Bf16,
    F16,
}

impl Policy {
    pub fn from_name(s: &str) -> Option<Policy> {
        Some(match s {
            "f32" => Policy::F32,
            "bf16" => Policy::Bf16,
            "f16" => Policy::F16,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Policy::F32 => "f32",
            Policy::Bf16 => "bf16",
            Policy::F16 => "f16",
        }
    }

    /// The operands' type, `None` for f32 (nothing to narrow).
    fn narrow_to(self) -> Option<DType> {
        match self {
            Policy::F32 => None,
            Policy::Bf16 => Some(DType::BF16),
            Policy::F16 => Some(DType::F16),
        }
    }
}

pub struct Precision(pub Policy);

impl Pass for Precision {
    fn name(&self) -> &'static str {
        "precision"
    }

    fn run(&self, mut g: Graph) -> Result<Graph, Diagnostic> {
        if let Some(to) = self.0.narrow_to() {
            narrow_products(&mut g, to)
                .map_err(|e| Diagnostic::error(format!("internal error in `precision`: {e}")))?;
        }
        Ok(g)
    }
}

/// The operand positions of `n` that a product reads: both operands of a contraction, the
/// hidden states and the table of a cross-entropy op; none for a product pinned to f32.
fn product_operands(g: &Graph, n: NodeId) -> &'static [usize] {
    match &g.node(n).op {
        Op::Einsum(spec) if spec.pinned => &[],
        Op::CrossEntropy(ce)
        | Op::CrossEntropyGradX(ce)
        | Op::CrossEntropyGradTable(ce)
        | Op::CrossEntropyCorrect(ce)
            if ce.pinned =>
        {
            &[]
        }
        Op::Einsum(spec) if spec.inputs.len() == 2 => {
            let sums = spec.inputs.iter().flatten().any(|l| !spec.output.contains(l));
            if sums {
                &[0, 1]
            } else {
                &[]
            }
        }
        Op::CrossEntropy(_) | Op::CrossEntropyGradX(_) | Op::CrossEntropyGradTable(_) | Op::CrossEntropyCorrect(_) => {
            &[0, 1]
        }
        _ => &[],
    }
}

fn narrow_products(g: &mut Graph, to: DType) -> Result<(), String> {
    let mut narrowed: HashMap<NodeId, NodeId> = HashMap::new();
    for n in g.topo_order() {
        let positions = product_operands(g, n);
        if positions.is_empty() {
            continue;
        }
        let mut operands = g.operands(n);
        if positions.iter().any(|&i| g.ty(operands[i]).dtype != DType::F32) {
            continue; // already narrowed (or not a float product)
        }
        for &i in positions {
            let x = operands[i];
            let cast = match narrowed.get(&x) {
                Some(&c) => c,
                None => {
                    let span = g.node(x).span;
                    let c = g.add(Op::Cast { to }, &[x], span)?;
                    narrowed.insert(x, c);
                    c
                }
            };
            operands[i] = cast;
        }
        let m = rebuild(g, n, &operands)?;
        if g.ty(m) != g.ty(n) {
            return Err(format!("narrowing the operands of a `{}` changed its type", g.node(n).op.kind()));
        }
        replace_all_uses(g, n, m);
    }
    remove_dead(g);
    Ok(())
}
