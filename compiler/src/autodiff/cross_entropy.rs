//! Gradients of the cross-entropy normal form, written with its two backward normal-form
//! ops, so the backward never materializes the `[T…, V]` logits either:
//!
//! ```text
//! ℓ_t = lse_t − x_t·E_{y_t}        (p_tv = softmax_v(x_t·E_v))
//! dx_t = g_t (Σ_v p_tv E_v − E_{y_t})          cross_entropy_grad_x(x, E, y, g)
//! dE_v = Σ_t g_t (p_tv − [y_t = v]) x_t         cross_entropy_grad_table(x, E, y, g)
//! ```
//!
//! The targets are integers and get no cotangent. The backward ops themselves have no
//! rule: differentiating them would be a second derivative, which `tnc` does not need.
//!
//! Also here: the rules of `scatter_add` and `gather`, each the other's adjoint, so that
//! the embedding lookup's backward does not build a `[T…, V]` one-hot either.

use super::builder::{Builder, R};
use crate::ir::cross_entropy::CrossEntropy;
use crate::ir::{NodeId, Op};

pub(crate) fn cross_entropy(
    b: &mut Builder,
    ce: &CrossEntropy,
    xs: &[NodeId],
    gy: NodeId,
    out: &mut [Option<NodeId>],
    needs: &[bool],
) -> R<()> {
    let operands = [xs[0], xs[1], xs[2], gy];
    if needs.first() == Some(&true) {
        out[0] = Some(b.add(Op::CrossEntropyGradX(*ce), &operands)?);
    }
    if needs.get(1) == Some(&true) {
        out[1] = Some(b.add(Op::CrossEntropyGradTable(*ce), &operands)?);
    }
    Ok(())
}

/// The backward ops are not differentiated again.
pub(crate) fn second_derivative(b: &Builder, op: &Op) -> super::AutodiffError {
    b.err(format!(
        "`{}` is the backward of cross-entropy; differentiating it (a second derivative of the loss) is not \
         supported",
        op.kind()
    ))
}

/// `gather(table, index)`: the table's cotangent scatter-adds the rows of `gy` back into
/// the rows they were read from.
pub(crate) fn gather(b: &mut Builder, table: NodeId, index: NodeId, gy: NodeId) -> R<NodeId> {
    let rows = b.shape(table)[0].clone();
    b.add(Op::ScatterAdd { rows }, &[gy, index])
}

/// `scatter_add(values, index)`: each value's cotangent is the cotangent of the row it was
/// added into.
pub(crate) fn scatter_add(b: &mut Builder, index: NodeId, gy: NodeId) -> R<NodeId> {
    b.add(Op::Gather, &[gy, index])
}
