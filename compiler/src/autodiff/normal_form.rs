//! Gradients of normal-form ops, written with normal-form ops again so the backward is as
//! fused as the forward (DESIGN.md, "Recognize before differentiating").
//!
//! Linear attention with prologue regions `q' = P_q(q…)` (likewise k', v') and decay λ:
//!
//! ```text
//! O  = causal(q', k', v')       dq' = causal(dO, v', k')
//! dk' = anticausal(v', dO, q')  dv' = anticausal(k', q', dO)
//! ```
//!
//! (anticausal and full mirror this), each with the forward's weights (decay or gate;
//! a gate's own gradient is in `gate_gradient`). The backward ops reuse the forward's regions, so
//! q', k', v' are recomputed inside them rather than stored. What remains is the
//! gradient of each region w.r.t. its own arguments: the region is inlined once
//! (recomputed) and differentiated with the primitive rules, by a local reverse sweep.

use super::builder::{Builder, R};
use crate::ir::{BlockAttention, BlockAttentionGrad, Decay, Direction, Graph, LinearAttention, NodeId, Op, Region};
use std::collections::HashMap;

pub(crate) fn linear_attention(
    b: &mut Builder,
    la: &LinearAttention,
    xs: &[NodeId],
    gy: NodeId,
    out: &mut [Option<NodeId>],
    needs: &[bool],
) -> R<()> {
    let (na, nb, nc) = (la.q.args.len(), la.k.args.len(), la.v.args.len());
    let (qa, ka, va, decay) = la.split(xs);
    let need_decay = la.decay != Decay::None && needs.get(na + nb + nc).copied().unwrap_or(false);
    if la.decay == Decay::PerHead && need_decay {
        return Err(b.err(
            "the decay λ of this linear attention depends on trained parameters; a trainable per-head decay is \
             not supported (make λ a constant or a buffer, or make it a per-token gate: `cumsum(kv, decay = g)` \
             with g shaped per position, whose gradient tnc derives)",
        ));
    }
    let need_gate = la.decay == Decay::PerToken && need_decay;
    let need_q = needs[..na].iter().any(|&n| n);
    let need_k = needs[na..na + nb].iter().any(|&n| n);
    let need_v = needs[na + nb..na + nb + nc].iter().any(|&n| n);
    let reverse = match la.direction {
        Direction::Causal => Direction::Anticausal,
        Direction::Anticausal => Direction::Causal,
        Direction::Full => Direction::Full,
    };
    let identity = |t: &crate::ir::TensorType| Region::identity(t.clone());
    let dy_ty = b.g.ty(gy).clone();
    // A backward attention: three regions with their argument lists, the same weights.
    let attend = |b: &mut Builder, dir, parts: [(&Region, Vec<NodeId>); 3]| -> R<NodeId> {
        let [(q, qv), (k, kv), (v, vv)] = parts;
        let op = LinearAttention { direction: dir, decay: la.decay, q: q.clone(), k: k.clone(), v: v.clone() };
        let mut operands: Vec<NodeId> = qv.into_iter().chain(kv).chain(vv).collect();
        operands.extend(decay.copied());
        b.add(Op::LinearAttention(Box::new(op)), &operands)
    };
    let dy = identity(&dy_ty);
    let mut dq = None;
    let mut dk = None;
    if need_q || need_gate {
        let g = attend(b, la.direction, [(&dy, vec![gy]), (&la.v, va.to_vec()), (&la.k, ka.to_vec())])?;
        dq = Some(g);
        if need_q {
            region_vjp(b, &la.q, qa, g, &needs[..na], &mut out[..na])?;
        }
    }
    if need_k || need_gate {
        let g = attend(b, reverse, [(&la.v, va.to_vec()), (&dy, vec![gy]), (&la.q, qa.to_vec())])?;
        dk = Some(g);
        if need_k {
            region_vjp(b, &la.k, ka, g, &needs[na..na + nb], &mut out[na..na + nb])?;
        }
    }
    if need_v {
        let dv = attend(b, reverse, [(&la.k, ka.to_vec()), (&la.q, qa.to_vec()), (&dy, vec![gy])])?;
        region_vjp(b, &la.v, va, dv, &needs[na + nb..na + nb + nc], &mut out[na + nb..na + nb + nc])?;
    }
    if let (true, Some(dq), Some(dk), Some(&a)) = (need_gate, dq, dk, decay) {
        out[na + nb + nc] = Some(gate_gradient(b, la, qa, ka, dq, dk, a)?);
    }
    Ok(())
}

/// The gradient of a gated attention's log-gates `a` (`Decay::PerToken`). With
/// `G = cumsum(a)` the weights are `exp(G_n − G_m)`; the pairs in which position n is
/// the query add `q'_n·dq'_n` to `∂L/∂G_n` and those in which it is the key subtract
/// `k'_n·dk'_n` (causal; the signs swap for anticausal), the diagonal cancelling; then
/// `∂L/∂a_j = Σ_{n ≥ j} ∂L/∂G_n`, an exclusive cumulative sum (0 for `j = 0`). Summed over the batch axes
/// the gates broadcast along.
fn gate_gradient(
    b: &mut Builder,
    la: &LinearAttention,
    qa: &[NodeId],
    ka: &[NodeId],
    dq: NodeId,
    dk: NodeId,
    a: NodeId,
) -> R<NodeId> {
    let q = la.q.inline(b.g, qa, b.span).map_err(|e| b.err(format!("inlining a region: {e}")))?;
    let k = la.k.inline(b.g, ka, b.span).map_err(|e| b.err(format!("inlining a region: {e}")))?;
    let feat = b.shape(q).len() - 1;
    let qdq = b.mul(q, dq)?;
    let qdq = b.reduce_sum(qdq, vec![feat])?;
    let kdk = b.mul(k, dk)?;
    let kdk = b.reduce_sum(kdk, vec![feat])?;
    let dg = if la.direction == Direction::Anticausal { b.sub(kdk, qdq)? } else { b.sub(qdq, kdk)? };
    let pos = feat - 1;
    // `Σ_{n ≥ j} ∂L/∂G_n = −Σ_{n < j} ∂L/∂G_n` (the whole sum is 0: every pair adds to
    // one position and subtracts from another); the exclusive form makes the gradient of
    // `a_0`, which weighs no pair, exactly 0 rather than the rounding of that sum.
    let inclusive = b.add(Op::Scan { axis: pos, reverse: false }, &[dg])?;
    let da = b.sub(dg, inclusive)?;
    // Sum over the batch axes along which the gates broadcast.
    let want = b.shape(a);
    let full = b.shape(da);
    let axes: Vec<usize> = (0..full.len()).filter(|&i| want[i] != full[i]).collect();
    if axes.is_empty() {
        return Ok(da);
    }
    let summed = b.reduce_sum(da, axes)?;
    b.add(Op::Reshape { shape: want }, &[summed])
}

/// Gradients of a region's arguments given the cotangent of its result: inline the region
/// and sweep its nodes in reverse with the primitive rules.
fn region_vjp(
    b: &mut Builder,
    r: &Region,
    args: &[NodeId],
    g_out: NodeId,
    needs: &[bool],
    out: &mut [Option<NodeId>],
) -> R<()> {
    if r.is_identity() {
        if needs[0] {
            out[0] = Some(g_out);
        }
        return Ok(());
    }
    let (result, inlined) = r.inline_nodes(b.g, args, b.span).map_err(|e| b.err(format!("inlining a region: {e}")))?;
    let mut cot: HashMap<NodeId, NodeId> = HashMap::new();
    cot.insert(result, g_out);
    // Arguments that need gradients, and the inlined values that depend on them.
    let mut active: std::collections::HashSet<NodeId> =
        args.iter().zip(needs).filter(|(_, &n)| n).map(|(&a, _)| a).collect();
    for &n in &inlined {
        if b.g.ty(n).dtype == crate::ir::DType::F32 && b.g.operands(n).iter().any(|o| active.contains(o)) {
            active.insert(n);
        }
    }
    for &y in inlined.iter().rev() {
        let Some(&gy) = cot.get(&y) else { continue };
        let operands = b.g.operands(y);
        let op_needs: Vec<bool> = operands.iter().map(|o| active.contains(o)).collect();
        if !op_needs.iter().any(|&n| n) {
            continue;
        }
        let grads = super::rules::vjp(b, y, gy, &op_needs)?;
        for (x, gx) in operands.into_iter().zip(grads) {
            let Some(gx) = gx else { continue };
            let acc = match cot.get(&x) {
                Some(&prev) => b.sum(prev, gx)?,
                None => gx,
            };
            cot.insert(x, acc);
        }
    }
    for (i, a) in args.iter().enumerate() {
        if needs[i] {
            out[i] = cot.get(a).copied();
        }
    }
    Ok(())
}

/// Block attention: one backward op computing `[dq' | dk' | dv']` (with the weights
/// region's VJP as a region of its own), then the prologue regions' VJPs.
pub(crate) fn block_attention(
    b: &mut Builder,
    ba: &BlockAttention,
    xs: &[NodeId],
    gy: NodeId,
    out: &mut [Option<NodeId>],
    needs: &[bool],
) -> R<()> {
    // dS from (S, dP): the weights region differentiated in a scratch graph, then
    // extracted as a region of those two arguments.
    let scores = ba.weights.args[0].clone();
    let mut scratch = Graph::new("weights_vjp");
    let s = scratch.add_input("scores", scores.clone(), None);
    let dp = scratch.add_input("d_weights", scores.clone(), None);
    let ds = {
        let mut sb = Builder { g: &mut scratch, span: b.span };
        let mut ds = [None];
        region_vjp(&mut sb, &ba.weights, &[s], dp, &[true], &mut ds)?;
        match ds[0] {
            Some(d) => d,
            None => sb.splat(0.0, &scores.shape)?,
        }
    };
    let weights_vjp = Region::extract(&scratch, ds, &[s, dp], &|op| !op.is_normal_form())
        .ok_or_else(|| b.err("the attention weights' gradient is not expressible as a region"))?;
    let grad = BlockAttentionGrad { forward: ba.clone(), weights_vjp };
    let mut operands = xs.to_vec();
    operands.push(gy);
    let packed = b.add(Op::BlockAttentionGrad(Box::new(grad)), &operands)?;
    // Unpack along the feature axis.
    let (q, k) = (ba.q.result_type().clone(), ba.k.result_type().clone());
    let r = q.rank();
    let (dq_w, dk_w) = (q.shape[r - 1].clone(), k.shape[r - 1].clone());
    let two = dq_w.checked_add(&dk_w).ok_or_else(|| b.err("size overflow"))?;
    let end = b.g.ty(packed).shape[r - 1].clone();
    let bounds = [(crate::ir::Dim::constant(0), dq_w.clone()), (dq_w, two.clone()), (two, end)];
    let (na, nb) = (ba.q.args.len(), ba.k.args.len());
    let (qa, ka, va) = ba.split(xs);
    let parts: [(&Region, &[NodeId], std::ops::Range<usize>); 3] =
        [(&ba.q, qa, 0..na), (&ba.k, ka, na..na + nb), (&ba.v, va, na + nb..xs.len())];
    for ((region, args, range), (start, end)) in parts.into_iter().zip(bounds) {
        if !needs[range.clone()].iter().any(|&n| n) {
            continue;
        }
        let g_part = b.add(Op::Slice { axis: r - 1, start, end }, &[packed])?;
        region_vjp(b, region, args, g_part, &needs[range.clone()], &mut out[range])?;
    }
    Ok(())
}
