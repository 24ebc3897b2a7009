//! Matching the spellings of linear attention. Each matcher looks only at the structure
//! of the graph — op kinds, einsum index roles, scan axes, and the *values* of constant
//! masks — never at names or spans. A match describes every operand by the role of each
//! of its axes, so that any index names and any axis order meet in one normal form.

use super::mask;
use crate::ir::{Direction, EinsumSpec, Graph, NodeId, Op};

/// What an axis means to linear attention.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The i-th batch axis (batch, heads, …), shared by q, k, v and the output.
    Batch(usize),
    /// The sequence position (n for q and the output, m for k and v).
    Pos,
    /// The feature axis (d for q and k, e for v and the output).
    Feat,
}

pub struct Operand {
    pub node: NodeId,
    pub roles: Vec<Role>,
}

pub struct Found {
    pub direction: Direction,
    pub q: Operand,
    pub k: Operand,
    pub v: Operand,
    /// Roles of the replaced einsum's output axes.
    pub out: Vec<Role>,
    pub batch_axes: usize,
    /// The decay of a decayed scan (`None` without).
    pub decay: Option<ScanDecay>,
    /// The node a diagnostic about this attention should point at.
    pub anchor: NodeId,
}

/// A decay found in a spelling: a tensor `node` whose axes other than `batch` and `pos`
/// have size 1.
pub struct ScanDecay {
    pub node: NodeId,
    /// The axes of `node` holding the batch axes, in batch order (`None`: the decay is
    /// the same along that batch axis, and `node` lacks it).
    pub batch: Vec<Option<usize>>,
    /// The position axis in it when the decay varies along positions (a gate); `None`
    /// when it has size 1 there too (one λ per batch index).
    pub pos: Option<usize>,
    pub form: GateForm,
}

/// What the values of a found decay are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GateForm {
    /// A scan's factor `d_n` in `s_n = x_n + d_n s_(n∓1)`.
    Factor,
    /// Log-gates `a_j` whose sum over `(min(n, m), max(n, m)]` is the log-weight.
    LogGate,
    /// Cumulative log-gates `G_n`, the log-weight being `G_later − G_earlier`.
    CumulativeLogGate,
}

fn einsum2(g: &Graph, n: NodeId) -> Option<(&EinsumSpec, NodeId, NodeId)> {
    match &g.node(n).op {
        Op::Einsum(spec) if spec.inputs.len() == 2 => {
            let ops = g.operands(n);
            Some((spec, ops[0], ops[1]))
        }
        _ => None,
    }
}

fn set(letters: &[u8]) -> Vec<u8> {
    let mut s = letters.to_vec();
    s.sort();
    s.dedup();
    s
}

fn minus(a: &[u8], b: &[u8]) -> Vec<u8> {
    a.iter().copied().filter(|x| !b.contains(x)).collect()
}

fn roles(letters: &[u8], batch: &[u8], pos: u8, feat: u8) -> Option<Vec<Role>> {
    letters
        .iter()
        .map(|l| {
            if *l == pos {
                Some(Role::Pos)
            } else if *l == feat {
                Some(Role::Feat)
            } else {
                batch.iter().position(|b| b == l).map(Role::Batch)
            }
        })
        .collect()
}

/// Letters of `from` renamed through the positional correspondence `from[i] ↔ to[i]`.
fn rename(letters: &[u8], from: &[u8], to: &[u8]) -> Option<Vec<u8>> {
    letters.iter().map(|l| from.iter().position(|f| f == l).map(|i| to[i])).collect()
}

/// `einsum(q, scan(einsum(k, v)))`: the cumulative sum of outer products, causal (or
/// anticausal for a reverse scan), optionally decayed.
pub fn cumsum_form(g: &Graph, o: NodeId) -> Option<Found> {
    let (spec_o, a, b) = einsum2(g, o)?;
    for (x_idx, s_node) in [(0usize, b), (1, a)] {
        let Op::Scan { axis, reverse } = g.node(s_node).op else { continue };
        let scan_ops = g.operands(s_node);
        let Some((spec_kv, k0, k1)) = einsum2(g, scan_ops[0]) else { continue };
        let x_node = if x_idx == 0 { a } else { b };
        let kvout = &spec_kv.output;
        if set(kvout) != set(&[spec_kv.inputs[0].clone(), spec_kv.inputs[1].clone()].concat()) {
            continue; // the outer product sums nothing
        }
        let t = kvout[axis];
        let s_letters = &spec_o.inputs[1 - x_idx];
        let xl = &spec_o.inputs[x_idx];
        let outl = &spec_o.output;
        for (ki, kn, vn) in [(0usize, k0, k1), (1, k1, k0)] {
            let (kl, vl) = (&spec_kv.inputs[ki], &spec_kv.inputs[1 - ki]);
            let common: Vec<u8> = kl.iter().copied().filter(|l| vl.contains(l)).collect();
            let (dk, ev) = (minus(kl, vl), minus(vl, kl));
            if dk.len() != 1 || ev.len() != 1 || !common.contains(&t) {
                continue;
            }
            let m = |l: u8| rename(&[l], kvout, s_letters).map(|v| v[0]);
            let (mt, md, me) = (m(t)?, m(dk[0])?, m(ev[0])?);
            let batch_kv: Vec<u8> = kvout.iter().copied().filter(|l| common.contains(l) && *l != t).collect();
            let batch_o = rename(&batch_kv, kvout, s_letters)?;
            let mut want_x = batch_o.clone();
            want_x.extend([mt, md]);
            let mut want_out = batch_o.clone();
            want_out.extend([mt, me]);
            if set(xl) != set(&want_x)
                || xl.len() != want_x.len()
                || set(outl) != set(&want_out)
                || outl.len() != want_out.len()
            {
                continue;
            }
            let decay = match scan_ops.get(1) {
                None => None,
                Some(&dec) => {
                    // The decay must be constant along the features: a broadcast of a
                    // tensor with size 1 there. Constant along positions too, it is one
                    // λ per batch index; else a gate per position.
                    let Op::Broadcast { .. } = g.node(dec).op else { continue };
                    let src = g.operands(dec)[0];
                    let shape = &g.ty(src).shape;
                    let one = crate::ir::Dim::constant(1);
                    let at = |l: u8| kvout.iter().position(|x| *x == l).expect("a letter of the state");
                    if [dk[0], ev[0]].iter().any(|&l| shape[at(l)] != one) {
                        continue;
                    }
                    let pos = (shape[at(t)] != one).then(|| at(t));
                    let batch = batch_kv.iter().map(|&l| Some(at(l))).collect();
                    Some(ScanDecay { node: src, batch, pos, form: GateForm::Factor })
                }
            };
            return Some(Found {
                direction: if reverse { Direction::Anticausal } else { Direction::Causal },
                q: Operand { node: x_node, roles: roles(xl, &batch_o, mt, md)? },
                k: Operand { node: kn, roles: roles(kl, &batch_kv, t, dk[0])? },
                v: Operand { node: vn, roles: roles(vl, &batch_kv, t, ev[0])? },
                out: roles(outl, &batch_o, mt, me)?,
                batch_axes: batch_kv.len(),
                decay,
                anchor: s_node,
            });
        }
    }
    None
}

/// `einsum(q, einsum(k, v))` where the inner einsum sums over positions: bidirectional
/// attention `Q (Kᵀ V)`.
pub fn bidirectional_form(g: &Graph, o: NodeId) -> Option<Found> {
    let (spec_o, a, b) = einsum2(g, o)?;
    for (x_idx, kv) in [(0usize, b), (1, a)] {
        let Some((spec_kv, k0, k1)) = einsum2(g, kv) else { continue };
        let x_node = if x_idx == 0 { a } else { b };
        for (ki, kn, vn) in [(0usize, k0, k1), (1, k1, k0)] {
            let (kl, vl, kvout) = (&spec_kv.inputs[ki], &spec_kv.inputs[1 - ki], &spec_kv.output);
            let summed = minus(&set(&[kl.clone(), vl.clone()].concat()), kvout);
            let [t] = summed.as_slice() else { continue };
            let t = *t;
            if !kl.contains(&t) || !vl.contains(&t) {
                continue;
            }
            let common: Vec<u8> = kl.iter().copied().filter(|l| vl.contains(l) && *l != t).collect();
            let (dk, ev) = (minus(kl, vl), minus(vl, kl));
            if dk.len() != 1 || ev.len() != 1 {
                continue;
            }
            let s_letters = &spec_o.inputs[1 - x_idx];
            let (xl, outl) = (&spec_o.inputs[x_idx], &spec_o.output);
            let m = |l: u8| rename(&[l], kvout, s_letters).map(|v| v[0]);
            let (md, me) = (m(dk[0])?, m(ev[0])?);
            let batch_kv: Vec<u8> = kvout.iter().copied().filter(|l| common.contains(l)).collect();
            let batch_o = rename(&batch_kv, kvout, s_letters)?;
            // The query position: the one letter of x that is neither batch nor feature.
            let rest = minus(&minus(xl, &batch_o), &[md]);
            let [n] = rest.as_slice() else { continue };
            let n = *n;
            let mut want_out = batch_o.clone();
            want_out.extend([n, me]);
            if xl.len() != batch_o.len() + 2
                || !xl.contains(&md)
                || set(outl) != set(&want_out)
                || outl.len() != want_out.len()
            {
                continue;
            }
            // Queries and keys must run over the same positions.
            let kpos = kl.iter().position(|l| *l == t)?;
            let qpos = xl.iter().position(|l| *l == n)?;
            if g.ty(kn).shape[kpos] != g.ty(x_node).shape[qpos] {
                continue;
            }
            return Some(Found {
                direction: Direction::Full,
                q: Operand { node: x_node, roles: roles(xl, &batch_o, n, md)? },
                k: Operand { node: kn, roles: roles(kl, &batch_kv, t, dk[0])? },
                v: Operand { node: vn, roles: roles(vl, &batch_kv, t, ev[0])? },
                out: roles(outl, &batch_o, n, me)?,
                batch_axes: batch_kv.len(),
                decay: None,
                anchor: kv,
            });
        }
    }
    None
}

/// A splat of the constant `value` (a constant, possibly reshaped and broadcast).
fn is_splat(g: &Graph, mut n: NodeId, value: f64) -> bool {
    loop {
        match &g.node(n).op {
            Op::Constant { value: v, .. } => return v.get() == value,
            Op::Reshape { .. } | Op::Broadcast { .. } => n = g.operands(n)[0],
            _ => return false,
        }
    }
}

/// The authors' spelling: scores `q·k` masked by a constant lower-triangular mask
/// (diagonal included) with `where(mask, s, 0)` or `s * mask`, then `· v`; unmasked
/// scores are bidirectional attention. A causal or anticausal mask may carry a decay
/// matrix `exp(G_n − G_m)` of cumulative log-gates (the segment-sum mask of gated
/// attention): `s * where(mask, exp(G_n − G_m), 0)` or `where(mask, s * exp(G_n − G_m), 0)`.
pub fn quadratic_form(g: &Graph, o: NodeId) -> Option<Found> {
    let (spec2, a, b) = einsum2(g, o)?;
    for (p_idx, p_node, v_node) in [(0usize, a, b), (1, b, a)] {
        let Some((scores, weights)) = masked_scores(g, p_node) else { continue };
        let Some((spec1, s0, s1)) = einsum2(g, scores) else { continue };
        let sout = &spec1.output;
        let pl = &spec2.inputs[p_idx];
        let vl = &spec2.inputs[1 - p_idx];
        let outl = &spec2.output;
        for (qi, qn, kn) in [(0usize, s0, s1), (1, s1, s0)] {
            let (ql, kl) = (&spec1.inputs[qi], &spec1.inputs[1 - qi]);
            let summed = minus(&set(&[ql.clone(), kl.clone()].concat()), sout);
            let [d] = summed.as_slice() else { continue };
            let d = *d;
            let common: Vec<u8> = ql.iter().copied().filter(|l| kl.contains(l) && *l != d).collect();
            let (nq, mk) = (minus(&minus(ql, kl), &[d]), minus(&minus(kl, ql), &[d]));
            let ([n], [m]) = (nq.as_slice(), mk.as_slice()) else { continue };
            let (n, m) = (*n, *m);
            let mut want_s = common.clone();
            want_s.extend([n, m]);
            if set(sout) != set(&want_s) || sout.len() != want_s.len() {
                continue;
            }
            // In the second einsum the key position is summed with v.
            let ren = |l: u8| rename(&[l], sout, pl).map(|v| v[0]);
            let (pn, pm) = (ren(n)?, ren(m)?);
            let batch_s: Vec<u8> = sout.iter().copied().filter(|l| common.contains(l)).collect();
            let batch_o = rename(&batch_s, sout, pl)?;
            let e_letters = minus(&minus(vl, &batch_o), &[pm]);
            let [e] = e_letters.as_slice() else { continue };
            let e = *e;
            let mut want_v = batch_o.clone();
            want_v.extend([pm, e]);
            let mut want_out = batch_o.clone();
            want_out.extend([pn, e]);
            if set(vl) != set(&want_v)
                || vl.len() != want_v.len()
                || set(outl) != set(&want_out)
                || outl.len() != want_out.len()
            {
                continue;
            }
            let (n_axis, m_axis) = (sout.iter().position(|l| *l == n)?, sout.iter().position(|l| *l == m)?);
            let shape = &g.ty(scores).shape;
            if shape[n_axis] != shape[m_axis] {
                continue;
            }
            let direction = match &weights.mask {
                None => Direction::Full,
                Some(m) => {
                    let (Some(n_at), Some(m_at)) = (m.axes[n_axis], m.axes[m_axis]) else { continue };
                    match mask::classify(g, m.node, n_at, m_at) {
                        Some(d) => d,
                        None => continue,
                    }
                }
            };
            let batch_axes: Vec<usize> =
                batch_s.iter().map(|l| sout.iter().position(|x| x == l)).collect::<Option<_>>()?;
            let decay = match &weights.decay {
                None => None,
                Some(_) if direction == Direction::Full => continue,
                Some(d) => {
                    let (later, earlier) =
                        if direction == Direction::Causal { (n_axis, m_axis) } else { (m_axis, n_axis) };
                    match segment_sum(g, d, later, earlier, &batch_axes) {
                        Some(found) => Some(found),
                        None => continue,
                    }
                }
            };
            return Some(Found {
                direction,
                q: Operand { node: qn, roles: roles(ql, &batch_s, n, d)? },
                k: Operand { node: kn, roles: roles(kl, &batch_s, m, d)? },
                v: Operand { node: v_node, roles: roles(vl, &batch_o, pm, e)? },
                out: roles(outl, &batch_o, pn, e)?,
                batch_axes: common.len(),
                decay,
                anchor: scores,
            });
        }
    }
    None
}

/// A node seen through reshapes, permutations and broadcasts: `axes[i]` is the axis of `node` that
/// axis i of the viewed value reads (`None`: the value is constant along axis i).
pub struct View {
    pub node: NodeId,
    pub axes: Vec<Option<usize>>,
}

/// Follow broadcasts, permutations and the reshapes that only insert or drop size-1 axes
/// down to the node they view.
fn view_source(g: &Graph, n: NodeId) -> View {
    let one = crate::ir::Dim::constant(1);
    let mut view = View { node: n, axes: (0..g.ty(n).rank()).map(Some).collect() };
    loop {
        let out = &g.ty(view.node).shape;
        let step: Vec<Option<usize>> = match &g.node(view.node).op {
            Op::Broadcast { .. } => {
                let src = &g.ty(g.operands(view.node)[0]).shape;
                (0..out.len()).map(|i| (src[i] != one).then_some(i)).collect()
            }
            Op::Reshape { .. } => {
                let src = &g.ty(g.operands(view.node)[0]).shape;
                let kept = |s: &[crate::ir::Dim]| -> Vec<usize> { (0..s.len()).filter(|&i| s[i] != one).collect() };
                let (out_kept, src_kept) = (kept(out), kept(src));
                if out_kept.len() != src_kept.len() || out_kept.iter().zip(&src_kept).any(|(&o, &i)| out[o] != src[i]) {
                    return view;
                }
                (0..out.len()).map(|i| out_kept.iter().position(|&o| o == i).map(|j| src_kept[j])).collect()
            }
            Op::Permute { perm } => perm.iter().map(|&p| Some(p)).collect(),
            _ => return view,
        };
        view.axes = view.axes.iter().map(|a| a.and_then(|j| step[j])).collect();
        view.node = g.operands(view.node)[0];
    }
}

/// How the scores are weighted before `· v`: by a 0/1 mask and possibly a decay matrix,
/// each seen as a view whose axes are the scores' axes.
struct ScoreWeights {
    mask: Option<View>,
    decay: Option<View>,
}

/// The scores einsum behind `p` and what weighs them: `p` itself (unweighted),
/// `where(mask, s, 0)`, `s * mask`, `where(mask, s * D, 0)` or `s * where(mask, D, 0)`
/// with D a decay matrix (`exp` of something).
fn masked_scores(g: &Graph, p: NodeId) -> Option<(NodeId, ScoreWeights)> {
    let identity = |n: NodeId| View { node: n, axes: (0..g.ty(n).rank()).map(Some).collect() };
    let is_exp = |v: &View| matches!(g.node(v.node).op, Op::Unary(crate::ir::UnaryOp::Exp));
    // `a * b` with one factor an einsum: (the einsum, the other factor).
    let product = |n: NodeId| -> Option<(NodeId, NodeId)> {
        let Op::Binary(crate::ir::BinaryOp::Mul) = g.node(n).op else { return None };
        let ops = g.operands(n);
        if einsum2(g, ops[0]).is_some() {
            Some((ops[0], ops[1]))
        } else {
            Some((ops[1], ops[0]))
        }
    };
    match g.node(p).op {
        Op::Einsum(_) => Some((p, ScoreWeights { mask: None, decay: None })),
        Op::Select => {
            let ops = g.operands(p);
            if !is_splat(g, ops[2], 0.0) {
                return None;
            }
            let mask = Some(identity(ops[0]));
            if let Some((s, d)) = product(ops[1]) {
                let d = view_source(g, d);
                return is_exp(&d).then_some((s, ScoreWeights { mask, decay: Some(d) }));
            }
            Some((ops[1], ScoreWeights { mask, decay: None }))
        }
        Op::Binary(crate::ir::BinaryOp::Mul) => {
            let (s, w) = product(p)?;
            let seen = view_source(g, w);
            if let Op::Select = g.node(seen.node).op {
                let ops = g.operands(seen.node);
                let inner = view_source(g, ops[1]);
                if is_splat(g, ops[2], 0.0) && is_exp(&inner) {
                    // Both the mask and the decay matrix are read through the view.
                    let through = |v: View| View {
                        node: v.node,
                        axes: seen.axes.iter().map(|a| a.and_then(|j| v.axes[j])).collect(),
                    };
                    let mask = through(identity(ops[0]));
                    return Some((s, ScoreWeights { mask: Some(mask), decay: Some(through(inner)) }));
                }
            }
            Some((s, ScoreWeights { mask: Some(identity(w)), decay: None }))
        }
        _ => None,
    }
}

/// A decay matrix `exp(G_later − G_earlier)` (viewed with the scores' axes): the same
/// cumulative log-gates G read along the later and the earlier position, constant along
/// the other. Returns G's log-gates: the scan's input when G is a plain cumulative sum
/// along positions, else G itself as cumulative log-gates.
fn segment_sum(g: &Graph, d: &View, later: usize, earlier: usize, batch_axes: &[usize]) -> Option<ScanDecay> {
    let Op::Binary(crate::ir::BinaryOp::Sub) = g.node(g.operands(d.node)[0]).op else { return None };
    let diff = g.operands(d.node)[0];
    let [x, y] = g.operands(diff)[..] else { return None };
    let (x, y) = (view_source(g, x), view_source(g, y));
    if x.node != y.node {
        return None;
    }
    let at = |v: &View, axis: usize| d.axes[axis].and_then(|j| v.axes[j]);
    let (Some(pos), None, None, Some(pos_y)) = (at(&x, later), at(&x, earlier), at(&y, later), at(&y, earlier)) else {
        return None;
    };
    let batch: Vec<Option<usize>> = batch_axes.iter().map(|&b| at(&x, b)).collect();
    if pos != pos_y || batch_axes.iter().any(|&b| at(&y, b) != at(&x, b)) {
        return None;
    }
    // Every other axis of G must have size 1 (it is read nowhere else).
    let shape = &g.ty(x.node).shape;
    let used: Vec<usize> = batch.iter().flatten().copied().chain([pos]).collect();
    if (0..shape.len()).any(|i| !used.contains(&i) && shape[i] != crate::ir::Dim::constant(1)) {
        return None;
    }
    let plain_cumsum =
        matches!(g.node(x.node).op, Op::Scan { axis, reverse: false } if axis == pos) && g.operands(x.node).len() == 1;
    if plain_cumsum {
        return Some(ScanDecay { node: g.operands(x.node)[0], batch, pos: Some(pos), form: GateForm::LogGate });
    }
    Some(ScanDecay { node: x.node, batch, pos: Some(pos), form: GateForm::CumulativeLogGate })
}
