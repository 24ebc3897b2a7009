//! The cost model: estimated FLOPs and workspace of one op (see "Estimates" in the module
//! documentation, `fusion/mod.rs`).

use super::fuser::{is_outer_product, is_view};
use crate::ir::cross_entropy::CrossEntropy;
use crate::ir::dim::numel;
use crate::ir::normal_form::{BlockAttention, LinearAttention};
use crate::ir::region::Region;
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
        Op::BlockAttention(ba) => (block_attention_flops(ba, None)?, zero),
        Op::BlockAttentionGrad(bg) => (block_attention_flops(&bg.forward, Some(&bg.weights_vjp))?, zero),
        Op::CrossEntropy(ce) | Op::CrossEntropyCorrect(ce) => (cross_entropy_flops(g, id, ce, false)?, zero),
        Op::CrossEntropyGradX(ce) | Op::CrossEntropyGradTable(ce) => (cross_entropy_flops(g, id, ce, true)?, zero),
        _ => (out, zero),
    })
}

/// One FLOP per element of every computing node of a region (its views are free).
fn region_flops(r: &Region) -> Option<Dim> {
    r.nodes.iter().filter(|n| !is_view(&n.op)).try_fold(Dim::constant(0), |f, n| f.checked_add(&numel(&n.ty.shape)?))
}

/// Block attention over `rows = batch·w` query positions with keys of width `d` and
/// values of width `e`: the forward's products `S = q'k'ᵀ` and `O = P v'` are
/// `2·rows·w·(d + e)`; the backward recomputes S and P and adds `dV = Pᵀ dO`,
/// `dP = dO v'ᵀ`, `dQ = dS k'` and `dK = dSᵀ q'`: `2·rows·w·(3d + 2e)`. The regions
/// (q', k', v' staging, the weights and their derivative) add one FLOP per element. So
/// the softmax baseline (one block of w = N) grows as N², DiagAttention (w constant) as N.
fn block_attention_flops(ba: &BlockAttention, weights_vjp: Option<&Region>) -> Option<Dim> {
    let (q, v) = (ba.q.result_type(), ba.v.result_type());
    let r = q.rank();
    if r < 2 || v.rank() != r {
        return None;
    }
    let rows = numel(&q.shape[..r - 1])?;
    let (w, d, e) = (&q.shape[r - 2], &q.shape[r - 1], &v.shape[r - 1]);
    let widths = match weights_vjp {
        None => d.checked_add(e)?.checked_scale(2)?,
        Some(_) => d.checked_scale(6)?.checked_add(&e.checked_scale(4)?)?,
    };
    let mut flops = rows.checked_mul(w)?.checked_mul(&widths)?;
    let mut regions = vec![&ba.q, &ba.k, &ba.v, &ba.weights];
    regions.extend(weights_vjp);
    for region in regions {
        flops = flops.checked_add(&region_flops(region)?)?;
    }
    Some(flops)
}

/// The cross-entropy of `T` tokens against `V` words of width `D`: the logits product
/// `2·T·V·D` and a few FLOPs per logit (maximum, exponential, sum); a gradient adds its
/// own product (`P·E` or `Pᵀ·X`, `2·T·V·D`). Counted as the chunked algorithm computes
/// it, each op its own logits: where the schedule keeps the logits for the backward
/// (`schedule/cross_entropy_chunks.rs`), each gradient op does `2·T·V·D` less.
fn cross_entropy_flops(g: &Graph, id: NodeId, ce: &CrossEntropy, gradient: bool) -> Option<Dim> {
    let ops = g.operands(id);
    let (x, table) = (g.ty(*ops.first()?), g.ty(*ops.get(1)?));
    let (vocab, width) = ce.vocab_and_width(&table.shape)?;
    let logits = numel(&x.shape[..x.rank().checked_sub(1)?])?.checked_mul(vocab)?;
    let products = if gradient { 4 } else { 2 };
    logits.checked_mul(width)?.checked_scale(products)?.checked_add(&logits.checked_scale(4)?)
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
