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

/// The decay of a decayed scan before broadcasting: a tensor whose shape is the kv
/// state's with size 1 on both feature axes.
pub struct ScanDecay {
    pub node: NodeId,
    /// The positions of the batch axes in it, in batch order.
    pub batch: Vec<usize>,
    /// The position axis in it when the decay varies along positions (a gate); `None`
    /// when it has size 1 there too (one λ per batch index).
    pub pos: Option<usize>,
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
                    Some(ScanDecay { node: src, batch: batch_kv.iter().map(|&l| at(l)).collect(), pos })
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
/// scores are bidirectional attention.
pub fn quadratic_form(g: &Graph, o: NodeId) -> Option<Found> {
    let (spec2, a, b) = einsum2(g, o)?;
    for (p_idx, p_node, v_node) in [(0usize, a, b), (1, b, a)] {
        // The scores, masked or not.
        let (scores, mask_node) = match g.node(p_node).op {
            Op::Select => {
                let ops = g.operands(p_node);
                if !is_splat(g, ops[2], 0.0) {
                    continue;
                }
                (ops[1], Some(ops[0]))
            }
            Op::Binary(crate::ir::BinaryOp::Mul) => {
                let ops = g.operands(p_node);
                if einsum2(g, ops[0]).is_some() {
                    (ops[0], Some(ops[1]))
                } else {
                    (ops[1], Some(ops[0]))
                }
            }
            Op::Einsum(_) => (p_node, None),
            _ => continue,
        };
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
            let direction = match mask_node {
                None => Direction::Full,
                Some(m) => match mask::classify(g, m, n_axis, m_axis) {
                    Some(d) => d,
                    None => continue,
                },
            };
            return Some(Found {
                direction,
                q: Operand { node: qn, roles: roles(ql, &batch_s, n, d)? },
                k: Operand { node: kn, roles: roles(kl, &batch_s, m, d)? },
                v: Operand { node: v_node, roles: roles(vl, &batch_o, pm, e)? },
                out: roles(outl, &batch_o, pn, e)?,
                batch_axes: common.len(),
                decay: None,
                anchor: scores,
            });
        }
    }
    None
}
