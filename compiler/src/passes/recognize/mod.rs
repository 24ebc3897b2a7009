//! `recognize`: rewrite every spelling of linear attention into one normal-form op
//! (`Op::LinearAttention`), with the feature map, LRPE and head splitting carried inside
//! as prologue regions. Runs after `canonicalize` and before `autodiff`, so the op's own
//! backward (three linear attentions) replaces the naive backward of its spelling.
//!
//! Recognized spellings (any index names, operand order and axis order):
//! - `einsum(q, cumsum(einsum(k, v)))`: the cumulative sum of outer products (causal, or
//!   anticausal for a reverse scan), with an optional decay: constant along positions
//!   (one λ per head) or a gate per position (its logarithm becomes the op's log-gates);
//! - `einsum(where(mask, einsum(q, k), 0), v)` or `einsum(einsum(q, k) * mask, v)`: the
//!   authors' quadratic form, with a constant mask found by evaluation to be `m ≤ n`,
//!   `m ≥ n` or all ones; a causal or anticausal one may carry a decay matrix
//!   `exp(G_n − G_m)` of cumulative log-gates (gated attention's segment-sum mask), whose
//!   increments become the op's log-gates;
//! - `einsum(q, einsum(k, v))` summing over positions: bidirectional `Q (Kᵀ V)`.
//!
//! Look-alikes are left alone because they do not have these structures: an exclusive
//! cumsum (`cumsum(kv) - kv` is not a scan feeding the einsum), a cumsum over a feature
//! axis (the scanned letter is not shared by k and v), a nonlinearity between scores and
//! v (the scores are not masked by `where`/`*` alone), a mask without its diagonal (its
//! values are none of the accepted masks), a decay matrix of the opposite sign
//! (`exp(G_m − G_n)` under a causal mask: the inverse of the gates' product) or reads G along other axes.

mod block;
mod cross_entropy;
mod linear;
mod mask;
mod region;

use super::Pass;
use crate::ir::{BinaryOp, BlockAttention, Decay, Dim, Direction, Graph, LinearAttention, NodeId, Op, UnaryOp};
use linear::{Found, GateForm, Role, ScanDecay};
use petgraph::visit::EdgeRef;
use std::collections::HashMap;
use tnc_grammar::Diagnostic;

pub struct Recognize;

impl Pass for Recognize {
    fn name(&self) -> &'static str {
        "recognize"
    }

    fn run(&self, mut g: Graph) -> Result<Graph, Diagnostic> {
        for o in g.topo_order() {
            if g.dag.node_weight(o).is_none() || !matches!(g.node(o).op, Op::Einsum(_)) {
                continue;
            }
            // A product of einsums can often be read as attention in more than one way
            // (e.g. Q (Kᵀ V) also as attention over the feature axis); the normal form
            // wants the run-time axis as positions and constant features.
            let ok = |f: &Found| features_are_constant(&g, f);
            let found = linear::cumsum_form(&g, o)
                .filter(ok)
                .or_else(|| linear::quadratic_form(&g, o).filter(ok))
                .or_else(|| linear::bidirectional_form(&g, o).filter(ok));
            if let Some(f) = found {
                rewrite(&mut g, o, f)?;
                continue;
            }
            let order: HashMap<NodeId, usize> = g.topo_order().into_iter().enumerate().map(|(i, n)| (n, i)).collect();
            if let Some(f) = block::block_form(&g, o, &order) {
                rewrite_block(&mut g, o, f)?;
            }
        }
        cross_entropy::run(&mut g)?;
        Ok(g)
    }
}

/// Are the feature widths of q, k and v compile-time constants?
fn features_are_constant(g: &Graph, f: &Found) -> bool {
    [&f.q, &f.k, &f.v].iter().all(|o| {
        let i = o.roles.iter().position(|r| *r == Role::Feat).expect("a feature axis");
        g.ty(o.node).shape[i].is_const()
    })
}

/// The permutation taking axes with `roles` to the canonical order
/// `[Batch(0), …, Batch(nb−1), Pos, Feat]`.
fn to_canonical(roles: &[Role], nb: usize) -> Vec<usize> {
    let mut canonical: Vec<Role> = (0..nb).map(Role::Batch).collect();
    canonical.extend([Role::Pos, Role::Feat]);
    canonical.iter().map(|r| roles.iter().position(|x| x == r).expect("every role is present")).collect()
}

fn permute(g: &mut Graph, n: NodeId, perm: Vec<usize>, span: Option<tnc_grammar::Span>) -> Result<NodeId, Diagnostic> {
    if perm.iter().enumerate().all(|(i, &p)| i == p) {
        return Ok(n);
    }
    g.add(Op::Permute { perm }, &[n], span).map_err(internal)
}

fn internal(e: String) -> Diagnostic {
    Diagnostic::error(format!("internal error in `recognize`: {e}"))
}

/// Does `n` depend on a trainable parameter?
fn depends_on_trainable(g: &Graph, n: NodeId) -> bool {
    let mut stack = vec![n];
    let mut seen = std::collections::HashSet::new();
    while let Some(x) = stack.pop() {
        if !seen.insert(x) {
            continue;
        }
        if let Op::Param { index } = g.node(x).op {
            if g.params[index as usize].trainable {
                return true;
            }
        }
        stack.extend(g.operands(x));
    }
    false
}

fn rewrite(g: &mut Graph, o: NodeId, f: Found) -> Result<(), Diagnostic> {
    let span = g.node(o).span;
    let nb = f.batch_axes;
    let parts = operand_regions(g, [&f.q, &f.k, &f.v], nb, span)?;
    let mut lambda = None;
    let mut decay = Decay::None;
    if let Some(ScanDecay { node: src, batch, pos: Some(pos), form }) = &f.decay {
        lambda = Some(log_gates(g, *src, batch, *pos, *form, f.direction, span)?);
        decay = Decay::PerToken;
    } else if let Some(ScanDecay { node: src, batch, pos: None, .. }) = &f.decay {
        if depends_on_trainable(g, *src) {
            let at = g.node(f.anchor).span;
            let mut d = Diagnostic::error("a trainable per-head decay λ is not supported").with_hint(
                "make λ a constant or a buffer, or make the decay a gate per position (shaped like the \
                 state with its position axis, e.g. sigmoid of a projection of x): tnc trains gates",
            );
            if let Some(s) = at {
                d = d.or_at(s).with_label("this decayed cumulative sum uses a trained parameter");
            }
            return Err(d);
        }
        lambda = Some(batch_and_positions(g, *src, batch, None, span)?);
        decay = Decay::PerHead;
    }
    let [(q, qa), (k, ka), (v, va)] = <[_; 3]>::try_from(parts).map_err(|_| internal("three operands".into()))?;
    let la = LinearAttention { direction: f.direction, decay, q, k, v };
    let mut operands: Vec<NodeId> = qa.into_iter().chain(ka).chain(va).collect();
    operands.extend(lambda);
    let attn = g.add(Op::LinearAttention(Box::new(la)), &operands, span).map_err(internal)?;
    finish(g, o, attn, &f.out, nb)
}

/// The op's log-gates `[batch…, N]` from a gate found in a spelling: `src` with the given
/// batch and position axes, holding values of `form`.
fn log_gates(
    g: &mut Graph,
    src: NodeId,
    batch: &[Option<usize>],
    pos: usize,
    form: GateForm,
    direction: Direction,
    span: Option<tnc_grammar::Span>,
) -> Result<NodeId, Diagnostic> {
    let laid = batch_and_positions(g, src, batch, Some(pos), span)?;
    let axis = batch.len();
    Ok(match form {
        GateForm::LogGate => laid,
        // a_n = G_n − G_(n−1); a_0 is never read by the op's weights.
        GateForm::CumulativeLogGate => {
            let earlier = shift_later(g, laid, axis, span)?;
            g.add(Op::Binary(BinaryOp::Sub), &[laid, earlier], span).map_err(internal)?
        }
        GateForm::Factor => {
            let log = g.add(Op::Unary(UnaryOp::Log), &[laid], span).map_err(internal)?;
            if direction == Direction::Anticausal {
                // A reverse scan `s_n = x_n + d_n s_{n+1}` weighs key m ≥ n by the gates
                // on [n, m); the op's weights take them on (n, m]: shift them one
                // position later.
                shift_later(g, log, axis, span)?
            } else {
                log
            }
        }
    })
}

/// `x` shifted one position later along `axis`: `[0, x_0, …, x_(N−2)]`.
fn shift_later(g: &mut Graph, x: NodeId, axis: usize, span: Option<tnc_grammar::Span>) -> Result<NodeId, Diagnostic> {
    let n = g.ty(x).shape[axis].clone();
    let end = n.checked_sub(&Dim::constant(1)).ok_or_else(|| internal("size overflow".into()))?;
    let head = g.add(Op::Slice { axis, start: Dim::constant(0), end }, &[x], span).map_err(internal)?;
    let pad = Op::Pad { axis, before: Dim::constant(1), after: Dim::constant(0) };
    g.add(pad, &[head], span).map_err(internal)
}

/// `src` laid out as `[batch…]` or `[batch…, N]`: its batch axes in batch order (size 1
/// where it has none), then its position axis; every other axis has size 1.
fn batch_and_positions(
    g: &mut Graph,
    src: NodeId,
    batch: &[Option<usize>],
    pos: Option<usize>,
    span: Option<tnc_grammar::Span>,
) -> Result<NodeId, Diagnostic> {
    let mut perm: Vec<usize> = batch.iter().flatten().copied().chain(pos).collect();
    perm.extend((0..g.ty(src).rank()).filter(|i| !perm.contains(i)).collect::<Vec<_>>());
    let src_shape = g.ty(src).shape.clone();
    let mut shape: Vec<Dim> = batch.iter().map(|b| b.map_or(Dim::constant(1), |i| src_shape[i].clone())).collect();
    shape.extend(pos.map(|p| src_shape[p].clone()));
    let laid = permute(g, src, perm, span)?;
    g.add(Op::Reshape { shape }, &[laid], span).map_err(internal)
}

/// The regions of q, k and v: each operand permuted to the canonical layout, then its
/// prologue region grown upward from there.
fn operand_regions(
    g: &mut Graph,
    operands: [&linear::Operand; 3],
    nb: usize,
    span: Option<tnc_grammar::Span>,
) -> Result<Vec<(crate::ir::Region, Vec<NodeId>)>, Diagnostic> {
    let order: HashMap<NodeId, usize> = g.topo_order().into_iter().enumerate().map(|(i, n)| (n, i)).collect();
    let mut parts = Vec::new();
    for operand in operands {
        let root = permute(g, operand.node, to_canonical(&operand.roles, nb), span)?;
        parts.push(region::prologue(g, root, &order));
    }
    Ok(parts)
}

/// Permute the new op's canonical result back to the replaced einsum's layout and
/// redirect the einsum's users to it.
fn finish(g: &mut Graph, o: NodeId, attn: NodeId, out_roles: &[Role], nb: usize) -> Result<(), Diagnostic> {
    let span = g.node(o).span;
    let canonical_to_out = {
        let canon = to_canonical(out_roles, nb);
        let mut inv = vec![0; canon.len()];
        for (i, &c) in canon.iter().enumerate() {
            inv[c] = i;
        }
        inv
    };
    let result = permute(g, attn, canonical_to_out, span)?;
    if g.ty(result) != g.ty(o) {
        return Err(internal(format!("the rewrite changed the type {} to {}", g.ty(o), g.ty(result))));
    }
    replace_uses(g, o, result);
    Ok(())
}

fn rewrite_block(g: &mut Graph, o: NodeId, f: block::BlockFound) -> Result<(), Diagnostic> {
    let span = g.node(o).span;
    let parts = operand_regions(g, [&f.q, &f.k, &f.v], f.batch_axes, span)?;
    let [(q, qa), (k, ka), (v, va)] = <[_; 3]>::try_from(parts).map_err(|_| internal("three operands".into()))?;
    let operands: Vec<NodeId> = qa.into_iter().chain(ka).chain(va).collect();
    let ba = BlockAttention { q, k, v, weights: f.weights };
    let attn = g.add(Op::BlockAttention(Box::new(ba)), &operands, span).map_err(internal)?;
    finish(g, o, attn, &f.out, f.batch_axes)
}

/// Point every user of `old` (and any output) at `new`.
fn replace_uses(g: &mut Graph, old: NodeId, new: NodeId) {
    let edges: Vec<(NodeId, u8, petgraph::stable_graph::EdgeIndex<u32>)> =
        g.dag.edges_directed(old, petgraph::Direction::Outgoing).map(|e| (e.target(), *e.weight(), e.id())).collect();
    for (user, pos, id) in edges {
        g.dag.remove_edge(id);
        g.dag.add_edge(new, user, pos);
    }
    for (_, n) in g.outputs.iter_mut() {
        if *n == old {
            *n = new;
        }
    }
}
