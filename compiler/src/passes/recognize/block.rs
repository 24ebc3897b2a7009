//! Matching softmax/ReLU attention within blocks: `einsum(weights(einsum(q, k)), v)`
//! where `weights` is any chain of region ops of the scores alone (scaling, a constant
//! mask, ReLU, a softmax over the key axis, …). DiagAttention's blocks appear as one more
//! batch axis; vanilla attention is the case of one block.

use super::linear::{Operand, Role};
use super::region;
use crate::ir::{EinsumSpec, Graph, NodeId, Op, Region};
use std::collections::HashMap;

pub struct BlockFound {
    pub q: Operand,
    pub k: Operand,
    pub v: Operand,
    pub out: Vec<Role>,
    pub batch_axes: usize,
    pub weights: Region,
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

fn without(a: &[u8], b: &[u8]) -> Vec<u8> {
    a.iter().copied().filter(|x| !b.contains(x)).collect()
}

fn roles(letters: &[u8], batch: &[u8], pos: u8, feat: u8) -> Option<Vec<Role>> {
    letters
        .iter()
        .map(|l| match *l {
            x if x == pos => Some(Role::Pos),
            x if x == feat => Some(Role::Feat),
            x => batch.iter().position(|b| *b == x).map(Role::Batch),
        })
        .collect()
}

pub fn block_form(g: &Graph, o: NodeId, order: &HashMap<NodeId, usize>) -> Option<BlockFound> {
    let (spec2, a, b) = einsum2(g, o)?;
    for (p_idx, p_node, v_node) in [(0usize, a, b), (1, b, a)] {
        if einsum2(g, p_node).is_some() {
            continue; // unweighted scores: linear attention's business
        }
        let (weights, args) = region::prologue(g, p_node, order);
        let [scores] = args.as_slice() else { continue };
        let Some((spec1, s0, s1)) = einsum2(g, *scores) else { continue };
        let sout = &spec1.output;
        let (pl, vl, outl) = (&spec2.inputs[p_idx], &spec2.inputs[1 - p_idx], &spec2.output);
        for (qi, qn, kn) in [(0usize, s0, s1), (1, s1, s0)] {
            let (ql, kl) = (&spec1.inputs[qi], &spec1.inputs[1 - qi]);
            let summed: Vec<u8> = without(ql, sout);
            let [d] = summed.as_slice() else { continue };
            if !kl.contains(d) || kl.iter().any(|l| !sout.contains(l) && l != d) {
                continue;
            }
            let batch: Vec<u8> = sout.iter().copied().filter(|l| ql.contains(l) && kl.contains(l)).collect();
            let (nq, mk) = (without(&without(ql, kl), &[*d]), without(&without(kl, ql), &[*d]));
            let ([n], [m]) = (nq.as_slice(), mk.as_slice()) else { continue };
            // The scores must be laid out [batch…, query, key] so the weights region
            // (written against that layout) can be reused as it is.
            let mut canonical = batch.clone();
            canonical.extend([*n, *m]);
            if *sout != canonical {
                continue;
            }
            let ren = |l: u8| sout.iter().position(|x| *x == l).map(|i| pl[i]);
            let (pn, pm) = (ren(*n)?, ren(*m)?);
            let batch_o: Vec<u8> = batch.iter().map(|&l| ren(l)).collect::<Option<_>>()?;
            let e_letters = without(&without(vl, &batch_o), &[pm]);
            let [e] = e_letters.as_slice() else { continue };
            if vl.len() != batch_o.len() + 2 || outl.len() != batch_o.len() + 2 || outl.contains(&pm) {
                continue;
            }
            if !outl.contains(&pn) || !outl.contains(e) || batch_o.iter().any(|l| !outl.contains(l) || !vl.contains(l))
            {
                continue;
            }
            return Some(BlockFound {
                q: Operand { node: qn, roles: roles(ql, &batch, *n, *d)? },
                k: Operand { node: kn, roles: roles(kl, &batch, *m, *d)? },
                v: Operand { node: v_node, roles: roles(vl, &batch_o, pm, *e)? },
                out: roles(outl, &batch_o, pn, *e)?,
                batch_axes: batch.len(),
                weights,
            });
        }
    }
    None
}
