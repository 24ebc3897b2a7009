//! Reverse-mode automatic differentiation on the graph IR.
//!
//! [`differentiate`] appends the backward pass to the same graph as ordinary primitive
//! ops and registers each gradient as an output `grad.<name>`. Keeping forward and
//! backward in one graph lets later passes (CSE, recognition, fusion) share work
//! between them — e.g. a backward `exp` reuses the forward value.
//!
//! Only values that both depend on a differentiated leaf and are f32 get cotangents
//! ("active" values); integer and bool values, iotas, sizes and constants are constants
//! to autodiff. The per-op rules and their conventions at kinks are in `rules.rs`.

mod builder;
mod cross_entropy;
mod normal_form;
mod rules;

use crate::ir::{DType, Graph, NodeId, Op};
use builder::Builder;
use std::collections::{HashMap, HashSet};
use std::fmt;
use tnc_grammar::Span;

#[derive(Clone, Debug, Default)]
pub struct GradOptions {
    /// Also differentiate w.r.t. every f32 input (integer and bool inputs, such as token
    /// ids, are skipped). Use [`differentiate_wrt`] to name inputs explicitly.
    pub wrt_inputs: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AutodiffError {
    pub message: String,
    /// The source of the node the error is about, when it has one.
    pub span: Option<Span>,
}

impl fmt::Display for AutodiffError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.message)
    }
}

impl std::error::Error for AutodiffError {}

/// The output name of a gradient.
pub fn grad_name(name: &str) -> String {
    format!("grad.{name}")
}

/// Add the gradient of the scalar f32 `loss` w.r.t. every trainable parameter (and every
/// f32 input if `opts.wrt_inputs`) to `g`, as outputs `grad.<name>`.
pub fn differentiate(g: &mut Graph, loss: NodeId, opts: &GradOptions) -> Result<(), AutodiffError> {
    let inputs: Vec<usize> = if opts.wrt_inputs {
        (0..g.inputs.len()).filter(|&i| g.inputs[i].ty.dtype == DType::F32).collect()
    } else {
        Vec::new()
    };
    run(g, loss, &inputs)
}

/// Like [`differentiate`], w.r.t. the trainable parameters and the named inputs. An
/// unknown or non-f32 input is an error (pointing at the input's declaration).
pub fn differentiate_wrt(g: &mut Graph, loss: NodeId, inputs: &[&str]) -> Result<(), AutodiffError> {
    let mut chosen = Vec::new();
    for name in inputs {
        let i = g.inputs.iter().position(|x| x.name == *name).ok_or_else(|| AutodiffError {
            message: format!("graph `{}` has no input `{name}` to differentiate with respect to", g.name),
            span: None,
        })?;
        let info = &g.inputs[i];
        if info.ty.dtype != DType::F32 {
            return Err(AutodiffError {
                message: format!(
                    "cannot differentiate with respect to `{name}`: it is {}, only f32 values have gradients",
                    info.ty
                ),
                span: info.span,
            });
        }
        chosen.push(i);
    }
    run(g, loss, &chosen)
}

fn run(g: &mut Graph, loss: NodeId, inputs: &[usize]) -> Result<(), AutodiffError> {
    let Some(loss_node) = g.dag.node_weight(loss) else {
        return Err(AutodiffError { message: "the loss is not a node of the graph".into(), span: None });
    };
    if loss_node.ty.dtype != DType::F32 || loss_node.ty.rank() != 0 {
        return Err(AutodiffError {
            message: format!("the loss must be an f32 scalar, got {}", loss_node.ty),
            span: loss_node.span,
        });
    }
    // The leaves, with the output name of each gradient.
    let mut leaves: Vec<(String, NodeId, Option<Span>)> = Vec::new();
    for p in g.params.iter().filter(|p| p.trainable) {
        if p.ty.dtype != DType::F32 {
            return Err(AutodiffError {
                message: format!("trainable parameter `{}` is {}; only f32 parameters can be trained", p.name, p.ty),
                span: p.span,
            });
        }
        leaves.push((grad_name(&p.name), p.node, p.span));
    }
    for &i in inputs {
        let info = &g.inputs[i];
        leaves.push((grad_name(&info.name), info.node, info.span));
    }
    for (name, _, span) in &leaves {
        if g.outputs.iter().any(|(n, _)| n == name) {
            return Err(AutodiffError {
                message: format!("the graph already has an output `{name}`; was it differentiated twice?"),
                span: *span,
            });
        }
    }

    let order = g.topo_order();
    let leaf_set: HashSet<NodeId> = leaves.iter().map(|l| l.1).collect();
    let active = active_values(g, &order, &leaf_set);

    // Cotangents, accumulated with `Add` where a value has several users.
    let mut cot: HashMap<NodeId, NodeId> = HashMap::new();
    if active.contains(&loss) {
        let span = g.node(loss).span;
        let mut b = Builder { g: &mut *g, span };
        cot.insert(loss, b.scalar(1.0)?);
    }
    for &y in order.iter().rev() {
        if leaf_set.contains(&y) {
            continue;
        }
        let Some(&gy) = cot.get(&y) else { continue };
        let operands = g.operands(y);
        let needs: Vec<bool> = operands.iter().map(|o| active.contains(o)).collect();
        if !needs.iter().any(|&n| n) {
            continue;
        }
        let span = g.node(y).span;
        let mut b = Builder { g: &mut *g, span };
        let grads = rules::vjp(&mut b, y, gy, &needs)?;
        for (x, gx) in operands.into_iter().zip(grads) {
            let Some(gx) = gx else { continue };
            let acc = match cot.get(&x) {
                Some(&prev) => b.sum(prev, gx)?,
                None => gx,
            };
            cot.insert(x, acc);
        }
    }

    for (name, node, span) in leaves {
        let grad = match cot.get(&node) {
            Some(&c) => c,
            // The loss does not depend on this leaf: its gradient is exactly zero.
            None => {
                let shape = g.ty(node).shape.clone();
                Builder { g: &mut *g, span }.splat(0.0, &shape)?
            }
        };
        g.add_output(name, grad);
    }
    Ok(())
}

/// Values that are f32 and depend on a leaf through ops that carry gradients.
fn active_values(g: &Graph, order: &[NodeId], leaves: &HashSet<NodeId>) -> HashSet<NodeId> {
    let mut active: HashSet<NodeId> = HashSet::new();
    for &n in order {
        let node = g.node(n);
        let is_active = leaves.contains(&n)
            || (node.ty.dtype == DType::F32
                && !matches!(node.op, Op::Constant { .. } | Op::Iota { .. } | Op::SizeOf { .. })
                && g.operands(n).iter().any(|o| active.contains(o)));
        if is_active {
            active.insert(n);
        }
    }
    active
}
