//! The cost model: estimated FLOPs and workspace of one op (see "Estimates" in the module
//! documentation, `fusion/mod.rs`).

use super::fuser::{is_outer_product, is_view};
use crate::ir::dim::numel;
use crate::ir::normal_form::LinearAttention;
use crate::ir::{Dim, Graph, NodeId, Op};

/// The chunk length assumed by the linear-attention cost estimate.
pub const CHUNK: i64 = 64;

/// Estimated FLOPs and workspace bytes of one op.
pub(super) fn op_cost(g: &Graph, id: NodeId) -> Option<(Dim, Dim)> {
    let node = g.node(id);
    let out = numel(&node.ty.shape)?;
    let zero = Dim::constant(0);
    let operands = g.operands(id);
    Some(match &node.op {
        Op::Input { .. } | Op::Param { .. } | Op::Constant { .. } | Op::Iota { .. } | Op::SizeOf { .. } => {
            (zero.clone(), zero)
        }
        op if is_view(op) => (zero.clone(), zero),
        Op::Gather => (zero.clone(), zero),
        Op::Reduce { .. } => (numel(&g.ty(operands[0]).shape)?, zero),
        Op::Scan { .. } => (out.checked_scale(if operands.len() > 1 { 2 } else { 1 })?, zero),
        Op::Einsum(spec) => {
            if is_outer_product(&node.op) {
                (out, zero)
            } else {
                let mut sizes: std::collections::BTreeMap<u8, Dim> = Default::default();
                for (letters, &o) in spec.inputs.iter().zip(&operands) {
                    for (l, d) in letters.iter().zip(&g.ty(o).shape) {
                        sizes.insert(*l, d.clone());
                    }
                }
                let prod = sizes.values().try_fold(Dim::constant(2), |a, d| a.checked_mul(d))?;
                (prod, zero)
            }
        }
        Op::LinearAttention(la) => linear_attention_cost(la, &node.ty.shape)?,
        _ => (out, zero),
    })
}

fn linear_attention_cost(la: &LinearAttention, out_shape: &[Dim]) -> Option<(Dim, Dim)> {
    let q = la.q.result_type();
    let rank = q.rank();
    let d = q.shape[rank - 1].clone();
    let e = out_shape[rank - 1].clone();
    let batch = numel(&q.shape[..rank - 2])?;
    let tokens = q.shape[rank - 2].clone();
    let per_token = d.checked_add(&e)?.checked_scale(2 * CHUNK)?.checked_add(&d.checked_mul(&e)?.checked_scale(4)?)?;
    let mut flops = batch.checked_mul(&tokens)?.checked_mul(&per_token)?;
    for r in [&la.q, &la.k, &la.v] {
        for n in &r.nodes {
            if !is_view(&n.op) {
                flops = flops.checked_add(&numel(&n.ty.shape)?)?;
            }
        }
    }
    let workspace = batch.checked_mul(&d)?.checked_mul(&e)?.checked_scale(4)?;
    Some((flops, workspace))
}
