//! The `canonicalize` pass (before `recognize` and `autodiff`): make equivalent spellings
//! of one computation meet, without changing any value.
//!
//! Rules, applied node by node in topological order until nothing changes:
//!
//! * shape chains: `reshape∘reshape` → one reshape, `permute∘permute` → one permute,
//!   `broadcast∘broadcast` → one broadcast; identity reshapes, permutes and broadcasts
//!   disappear;
//! * splats: a constant reshaped / broadcast / permuted / sliced in any way becomes the
//!   canonical `broadcast(reshape(const))` (see [`crate::ir::rewrite::splat`]);
//! * einsum: a `permute` feeding an operand is folded into that operand's index letters;
//!   a `permute` of an einsum result (when the einsum has no other user) is folded into
//!   the output letters; a one-operand einsum that only permutes becomes a `permute`;
//!   index letters are renamed in order of first appearance (inputs, then output), so
//!   specs that differ only in letter names are identical. Operands of a two-operand
//!   einsum are not reordered in the graph; CSE compares both orders instead (see
//!   [`super::cse`]), which is all that reordering would buy;
//! * nested einsums are flattened where the result still has at most two operands (the
//!   IR's einsums have one or two) and costs no more: a one-operand einsum (a transposition,
//!   or a sum of a one-operand value) feeding an einsum or consuming one is merged into it
//!   when the inner value has no other user — `einsum("ji,jk->ik", einsum("ij->ji", x), y)`
//!   is `einsum("ij,jk->ik", x, y)` — but a sum is not folded into a product where it would
//!   sum a letter of one operand alone (that costs a factor of the letter's size and is
//!   no longer a matrix product);
//!   Two chained two-operand contractions are three operands, more than an einsum holds:
//!   their canonical form is the chain rebuilt in its cheapest association (FLOPs with
//!   every size symbol at 1024; ties go to the operands' order in the graph), so that
//!   `(A·B)·C` and `A·(B·C)` — and `(Q·Kᵀ)·V` and `Q·(Kᵀ·V)` — meet (this pass only, not
//!   `simplify`'s use of these rules after `autodiff`);
//! * constant folding: unary, binary, cast and select of (splatted) constants, a
//!   `sizeof` of a constant size, reductions of splats where the value is exact;
//! * CSE ([`super::cse::cse`]) and removal of values no output needs.
//!
//! Values are exactly preserved up to floating-point reassociation: folding a permute
//! into an einsum can change the order in which an einsum sums, and folded constants
//! are computed in f64 (an f32 constant is rounded where it is used, as any constant).

use super::cse::cse;
use super::Pass;
use crate::ir::rewrite::{
    add_like, fold_scalar, is_canonical_splat, rewrite_to_fixpoint, single_user, splat, splat_value,
};
use crate::ir::{EinsumSpec, F64Bits, Graph, NodeId, Op, ReduceOp};
use tnc_grammar::Diagnostic;

pub struct Canonicalize;

impl Pass for Canonicalize {
    fn name(&self) -> &'static str {
        "canonicalize"
    }

    fn run(&self, mut g: Graph) -> Result<Graph, Diagnostic> {
        canonicalize(&mut g).map_err(|e| Diagnostic::error(format!("internal error in `canonicalize`: {e}")))?;
        Ok(g)
    }
}

/// Rounds of rule application before giving up on a fixed point (each round is linear).
pub(crate) const MAX_ROUNDS: usize = 32;

/// Run the canonicalization rules and CSE until neither changes the graph.
pub fn canonicalize(g: &mut Graph) -> Result<(), String> {
    let mut rule = |g: &mut Graph, n: NodeId| canonical_rule(g, n).or_else(|| reassociate(g, n));
    for _ in 0..MAX_ROUNDS {
        rewrite_to_fixpoint(g, &mut rule, MAX_ROUNDS)?;
        if cse(g) == 0 {
            break;
        }
    }
    Ok(())
}

/// Rename einsum letters in order of first appearance (inputs left to right, then the
/// output), so that specs differing only in letter names are equal.
pub fn normalize_spec(spec: &EinsumSpec) -> EinsumSpec {
    let mut map = [0u8; 26];
    let mut next = b'a';
    let mut rename = |l: u8| -> u8 {
        let slot = &mut map[(l - b'a') as usize];
        if *slot == 0 {
            *slot = next;
            next += 1;
        }
        *slot
    };
    let inputs: Vec<Vec<u8>> = spec.inputs.iter().map(|i| i.iter().map(|&l| rename(l)).collect()).collect();
    let output = spec.output.iter().map(|&l| rename(l)).collect();
    EinsumSpec { inputs, output, pinned: spec.pinned }
}

fn is_identity(perm: &[usize]) -> bool {
    perm.iter().enumerate().all(|(i, &p)| i == p)
}

/// The canonical splat of `value` with `n`'s type, unless `n` already is one.
fn resplat(g: &mut Graph, n: NodeId, value: F64Bits) -> Option<NodeId> {
    if is_canonical_splat(g, n) && splat_value(g, n).map(|v| v.0) == Some(value) {
        return None;
    }
    let ty = g.ty(n).clone();
    splat(g, n, value, &ty).ok()
}

/// One canonicalization step at node `n`: the value to replace it by, or `None`.
pub(crate) fn canonical_rule(g: &mut Graph, n: NodeId) -> Option<NodeId> {
    let op = g.node(n).op.clone();
    let ops = g.operands(n);
    let first = ops.first().copied();
    match op {
        Op::SizeOf { size, dtype } => {
            let c = size.as_const()?;
            add_like(g, n, Op::Constant { value: F64Bits::new(c as f64), dtype }, &[]).ok()
        }
        Op::Reshape { shape } => {
            let x = first?;
            if g.ty(x) == g.ty(n) {
                return Some(x);
            }
            if let Some((v, _)) = splat_value(g, x) {
                return resplat(g, n, v);
            }
            if let Op::Reshape { .. } = g.node(x).op {
                let y = g.operands(x)[0];
                if g.ty(y) == g.ty(n) {
                    return Some(y);
                }
                return add_like(g, n, Op::Reshape { shape }, &[y]).ok();
            }
            None
        }
        Op::Broadcast { shape } => {
            let x = first?;
            if g.ty(x) == g.ty(n) {
                return Some(x);
            }
            if let Some((v, _)) = splat_value(g, x) {
                return resplat(g, n, v);
            }
            if let Op::Broadcast { .. } = g.node(x).op {
                let y = g.operands(x)[0];
                return add_like(g, n, Op::Broadcast { shape }, &[y]).ok();
            }
            None
        }
        Op::Permute { perm } => {
            let x = first?;
            if is_identity(&perm) {
                return Some(x);
            }
            if let Some((v, _)) = splat_value(g, x) {
                return resplat(g, n, v);
            }
            match g.node(x).op.clone() {
                Op::Permute { perm: inner } => {
                    let y = g.operands(x)[0];
                    let composed: Vec<usize> = perm.iter().map(|&p| inner[p]).collect();
                    if is_identity(&composed) {
                        return Some(y);
                    }
                    add_like(g, n, Op::Permute { perm: composed }, &[y]).ok()
                }
                // Fold into the output letters, unless the einsum result is used elsewhere
                // (then both the einsum and the permute would be computed).
                Op::Einsum(spec) if single_user(g, x) == Some(n) => {
                    let output = perm.iter().map(|&p| spec.output[p]).collect();
                    let spec = normalize_spec(&EinsumSpec { inputs: spec.inputs, output, pinned: spec.pinned });
                    let operands = g.operands(x);
                    add_like(g, n, Op::Einsum(spec), &operands).ok()
                }
                _ => None,
            }
        }
        Op::Einsum(spec) => einsum_rule(g, n, &spec, &ops),
        Op::Unary(_) | Op::Cast { .. } | Op::Binary(_) => {
            let vals: Vec<(F64Bits, crate::ir::DType)> =
                ops.iter().map(|&o| splat_value(g, o)).collect::<Option<_>>()?;
            let (v, _) = fold_scalar(&op, &vals)?;
            resplat(g, n, v)
        }
        Op::Select => {
            let (c, _) = splat_value(g, ops[0])?;
            Some(if c.get() != 0.0 { ops[1] } else { ops[2] })
        }
        Op::Slice { .. } => {
            let (v, _) = splat_value(g, first?)?;
            resplat(g, n, v)
        }
        Op::Pad { .. } => {
            let (v, _) = splat_value(g, first?)?;
            // Padding adds +0, so only a splat of +0 stays a splat.
            (v == F64Bits::new(0.0)).then(|| resplat(g, n, v)).flatten()
        }
        Op::Reduce { op: rop, axes } => {
            let x = first?;
            let (v, _) = splat_value(g, x)?;
            let shape = &g.ty(x).shape;
            let exact = match rop {
                // A sum of +0 is +0 whatever the count (an empty sum included).
                ReduceOp::Sum => v == F64Bits::new(0.0),
                // max/min of copies of v is v when there is at least one copy.
                ReduceOp::Max | ReduceOp::Min => axes.iter().all(|&a| shape[a].as_const().is_some_and(|s| s >= 1)),
            };
            exact.then(|| resplat(g, n, v)).flatten()
        }
        _ => None,
    }
}

/// Einsum rules: fold permuted operands into the letters, turn a pure permutation into
/// a `permute`, and rename the letters canonically.
fn einsum_rule(g: &mut Graph, n: NodeId, spec: &EinsumSpec, ops: &[NodeId]) -> Option<NodeId> {
    if let Some(flat) = flatten(g, n, spec, ops) {
        return Some(flat);
    }
    let mut inputs = spec.inputs.clone();
    let mut operands = ops.to_vec();
    let mut folded = false;
    for k in 0..operands.len() {
        if let Op::Permute { perm } = &g.node(operands[k]).op {
            // Axis i of the permuted value is axis perm[i] of its operand.
            let mut letters = vec![0u8; perm.len()];
            for (i, &p) in perm.iter().enumerate() {
                letters[p] = inputs[k][i];
            }
            inputs[k] = letters;
            operands[k] = g.operands(operands[k])[0];
            folded = true;
        }
    }
    let spec = EinsumSpec { inputs, output: spec.output.clone(), pinned: spec.pinned };
    // One operand, every letter kept: a permutation (or the identity).
    if spec.inputs.len() == 1 && spec.output.len() == spec.inputs[0].len() {
        let perm: Vec<usize> =
            spec.output.iter().map(|l| spec.inputs[0].iter().position(|m| m == l)).collect::<Option<_>>()?;
        if is_identity(&perm) {
            return Some(operands[0]);
        }
        return add_like(g, n, Op::Permute { perm }, &operands).ok();
    }
    let normal = normalize_spec(&spec);
    if !folded && normal == spec {
        return None;
    }
    add_like(g, n, Op::Einsum(normal), &operands).ok()
}

/// Substitute einsum `inner` (spec `is`, operands `xs`) whose output axes are named by
/// `letters` in an outer spec already using `taken`: the inner operands' letters in the
/// outer naming, the inner sum's letters renamed to fresh ones. `None` when out of letters.
fn inline_letters(is: &EinsumSpec, letters: &[u8], taken: &mut Vec<u8>) -> Option<Vec<Vec<u8>>> {
    let mut map: Vec<(u8, u8)> = is.output.iter().copied().zip(letters.iter().copied()).collect();
    let mut inputs = Vec::new();
    for input in &is.inputs {
        let mut renamed = Vec::new();
        for &l in input {
            let to = match map.iter().find(|(from, _)| *from == l) {
                Some(&(_, to)) => to,
                None => {
                    let fresh = (b'a'..=b'z').find(|c| !taken.contains(c))?;
                    taken.push(fresh);
                    map.push((l, fresh));
                    fresh
                }
            };
            renamed.push(to);
        }
        inputs.push(renamed);
    }
    Some(inputs)
}

/// Whether a two-operand einsum sums a letter of one operand alone: a sum folded into a
/// product, which is no longer a plain matrix product (a library GEMM on CPUs) and costs
/// a factor of that letter's size more than summing first.
fn sums_one_sided(spec: &EinsumSpec) -> bool {
    spec.inputs.len() == 2
        && spec
            .inputs
            .iter()
            .flatten()
            .any(|l| !spec.output.contains(l) && !(spec.inputs[0].contains(l) && spec.inputs[1].contains(l)))
}

/// Nested einsums merged while at most two operands result and the merge costs nothing
/// (see the module notes).
fn flatten(g: &mut Graph, n: NodeId, spec: &EinsumSpec, ops: &[NodeId]) -> Option<NodeId> {
    let einsum_of = |g: &Graph, x: NodeId| match &g.node(x).op {
        Op::Einsum(s) if single_user(g, x) == Some(n) => Some(s.clone()),
        _ => None,
    };
    let mut taken: Vec<u8> = spec.inputs.iter().flatten().chain(&spec.output).copied().collect();
    // A one-operand einsum consuming an einsum: the inner one with the outer's output.
    if let [x] = ops {
        let inner = einsum_of(g, *x)?;
        let inputs = inline_letters(&inner, &spec.inputs[0], &mut taken)?;
        // A product merged with a pinned one is pinned.
        let pinned = spec.pinned || inner.pinned;
        let merged = normalize_spec(&EinsumSpec { inputs, output: spec.output.clone(), pinned });
        if sums_one_sided(&merged) {
            return None;
        }
        return add_like(g, n, Op::Einsum(merged), &g.operands(*x)).ok();
    }
    // An operand that is a one-operand einsum: its operand, with its letters.
    for (k, &x) in ops.iter().enumerate() {
        let Some(inner) = einsum_of(g, x).filter(|s| s.inputs.len() == 1) else { continue };
        let mut inputs = spec.inputs.clone();
        inputs[k] = inline_letters(&inner, &spec.inputs[k], &mut taken)?.remove(0);
        let mut operands = ops.to_vec();
        operands[k] = g.operands(x)[0];
        let pinned = spec.pinned || inner.pinned;
        let merged = normalize_spec(&EinsumSpec { inputs, output: spec.output.clone(), pinned });
        if sums_one_sided(&merged) {
            continue;
        }
        return add_like(g, n, Op::Einsum(merged), &operands).ok();
    }
    None
}

/// A chain of two products (see the module notes) in its cheapest association.
fn reassociate(g: &mut Graph, n: NodeId) -> Option<NodeId> {
    let Op::Einsum(spec) = g.node(n).op.clone() else { return None };
    let ops = g.operands(n);
    if ops.len() != 2 {
        return None;
    }
    for k in 0..2 {
        let x = ops[k];
        let inner = match &g.node(x).op {
            Op::Einsum(s) if s.inputs.len() == 2 && single_user(g, x) == Some(n) && ops[1 - k] != x => s.clone(),
            _ => continue,
        };
        let mut taken: Vec<u8> = spec.inputs.iter().flatten().chain(&spec.output).copied().collect();
        let Some(inner_inputs) = inline_letters(&inner, &spec.inputs[k], &mut taken) else { continue };
        let xs = g.operands(x);
        let three = [
            (xs[0], inner_inputs[0].clone()),
            (xs[1], inner_inputs[1].clone()),
            (ops[1 - k], spec.inputs[1 - k].clone()),
        ];
        let mut extent: Vec<(u8, f64)> = Vec::new();
        for (node, letters) in &three {
            for (l, d) in letters.iter().zip(&g.ty(*node).shape) {
                // A size that does not evaluate counts as huge (never the cheap side).
                extent.push((*l, d.eval(&|_| Some(1024)).map_or(f64::MAX, |v| v as f64)));
            }
        }
        let size = |l: &u8| extent.iter().find(|(m, _)| m == l).map_or(1.0, |e| e.1);
        // Pair (i, j) first, then with l: the pair keeps the letters l or the output needs.
        let plan = |(i, j, l): (usize, usize, usize)| {
            let mut pair: Vec<u8> = three[i].1.clone();
            pair.extend(three[j].1.iter().filter(|c| !three[i].1.contains(c)));
            let kept: Vec<u8> =
                pair.iter().copied().filter(|c| three[l].1.contains(c) || spec.output.contains(c)).collect();
            let mut last: Vec<u8> = kept.clone();
            last.extend(three[l].1.iter().filter(|c| !kept.contains(c)));
            let cost = pair.iter().map(size).product::<f64>() + last.iter().map(size).product::<f64>();
            let mut nodes = [three[i].0.index(), three[j].0.index()];
            nodes.sort();
            (cost, nodes, (i, j, l), kept)
        };
        let plans = [plan((0, 1, 2)), plan((0, 2, 1)), plan((1, 2, 0))];
        let Some(best) = plans.iter().min_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1))) else { continue };
        if best.2 == (0, 1, 2) {
            // Already the cheapest; the other operand may head a chain of its own.
            continue;
        }
        let (i, j, l) = best.2;
        let pair_spec = normalize_spec(&EinsumSpec {
            inputs: vec![three[i].1.clone(), three[j].1.clone()],
            output: best.3.clone(),
            pinned: spec.pinned || inner.pinned,
        });
        let pair = add_like(g, n, Op::Einsum(pair_spec), &[three[i].0, three[j].0]).ok()?;
        let outer = normalize_spec(&EinsumSpec {
            inputs: vec![best.3.clone(), three[l].1.clone()],
            output: spec.output.clone(),
            pinned: spec.pinned || inner.pinned,
        });
        return add_like(g, n, Op::Einsum(outer), &[pair, three[l].0]).ok();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interp::{compare, evaluate, EvalOptions, Tensor};
    use crate::ir::print::op_counts;
    use crate::ir::verify::verify;
    use crate::ir::{BinaryOp, DType, Dim, TensorType, UnaryOp};
    use std::collections::HashMap;

    fn f32s(shape: &[i64]) -> TensorType {
        TensorType::new(DType::F32, shape.iter().map(|&d| Dim::constant(d)).collect())
    }

    fn count(g: &Graph, kind: &str) -> usize {
        op_counts(g).into_iter().find(|(k, _)| *k == kind).map_or(0, |(_, c)| c)
    }

    fn data(shape: &[usize], seed: f64) -> Tensor {
        let n: usize = shape.iter().product();
        Tensor::new(shape.to_vec(), (0..n).map(|i| ((i as f64 + 1.0) * seed).sin()).collect()).unwrap()
    }

    fn eval(g: &Graph, inputs: &HashMap<String, Tensor>) -> Vec<Tensor> {
        let ev = evaluate(g, inputs, &[], &EvalOptions::default()).unwrap();
        ev.outputs(g).into_iter().map(|(_, t)| t).collect()
    }

    /// Canonicalize a copy, verify it, and check every output is unchanged.
    fn check_same(g: &Graph, inputs: &HashMap<String, Tensor>) -> Graph {
        let mut h = g.clone();
        canonicalize(&mut h).unwrap();
        verify(&h).unwrap();
        for (a, b) in eval(&h, inputs).iter().zip(eval(g, inputs)) {
            let c = compare(a, &b);
            assert!(c.within(1e-14), "{c}");
        }
        h
    }

    #[test]
    fn reshape_and_permute_chains_fold() {
        let mut g = Graph::new("t");
        let x = g.add_input("x", f32s(&[2, 3, 4]), None);
        let r1 = g.add(Op::Reshape { shape: f32s(&[6, 4]).shape }, &[x], None).unwrap();
        let r2 = g.add(Op::Reshape { shape: f32s(&[4, 6]).shape }, &[r1], None).unwrap();
        let r3 = g.add(Op::Reshape { shape: f32s(&[2, 3, 4]).shape }, &[r2], None).unwrap();
        let p1 = g.add(Op::Permute { perm: vec![1, 2, 0] }, &[r3], None).unwrap();
        let p2 = g.add(Op::Permute { perm: vec![2, 0, 1] }, &[p1], None).unwrap();
        let p3 = g.add(Op::Permute { perm: vec![0, 2, 1] }, &[p2], None).unwrap();
        let p4 = g.add(Op::Permute { perm: vec![1, 0, 2] }, &[p3], None).unwrap();
        let b = g.add(Op::Broadcast { shape: f32s(&[4, 2, 3]).shape }, &[p4], None).unwrap();
        let e = g.add(Op::Unary(UnaryOp::Exp), &[b], None).unwrap();
        g.add_output("y", e);
        let h = check_same(&g, &HashMap::from([("x".into(), data(&[2, 3, 4], 0.3))]));
        assert_eq!(count(&h, "reshape"), 0);
        assert_eq!(count(&h, "permute"), 1);
        assert_eq!(count(&h, "broadcast"), 0);
        assert_eq!(h.len(), 3);
    }

    #[test]
    fn reshape_chain_keeps_one_reshape() {
        let mut g = Graph::new("t");
        let x = g.add_input("x", f32s(&[2, 6]), None);
        let r1 = g.add(Op::Reshape { shape: f32s(&[3, 4]).shape }, &[x], None).unwrap();
        let r2 = g.add(Op::Reshape { shape: f32s(&[12]).shape }, &[r1], None).unwrap();
        g.add_output("y", r2);
        let h = check_same(&g, &HashMap::from([("x".into(), data(&[2, 6], 0.7))]));
        assert_eq!(count(&h, "reshape"), 1);
        let y = h.outputs[0].1;
        assert_eq!(h.operands(y), vec![x]);
    }

    fn einsum(g: &mut Graph, spec: &str, ops: &[NodeId]) -> NodeId {
        let (ins, out) = spec.split_once("->").unwrap();
        let spec = EinsumSpec {
            inputs: ins.split(',').map(|s| s.as_bytes().to_vec()).collect(),
            output: out.as_bytes().to_vec(),
            pinned: false,
        };
        g.add(Op::Einsum(spec), ops, None).unwrap()
    }

    /// Every einsum's spec, sorted.
    fn einsum_specs(g: &Graph) -> Vec<String> {
        let mut specs: Vec<String> = g
            .dag
            .node_weights()
            .filter_map(|n| match &n.op {
                Op::Einsum(s) => Some(s.to_string()),
                _ => None,
            })
            .collect();
        specs.sort();
        specs
    }

    fn only_einsum_spec(g: &Graph) -> String {
        let specs = einsum_specs(g);
        assert_eq!(specs.len(), 1, "{specs:?}");
        specs[0].clone()
    }

    #[test]
    fn einsum_letters_are_renamed() {
        let build = |spec: &str| {
            let mut g = Graph::new("t");
            let k = g.add_input("k", f32s(&[2, 3, 5, 4]), None);
            let v = g.add_input("v", f32s(&[2, 3, 5, 6]), None);
            let e = einsum(&mut g, spec, &[k, v]);
            g.add_output("y", e);
            g
        };
        let inputs = HashMap::from([("k".into(), data(&[2, 3, 5, 4], 0.2)), ("v".into(), data(&[2, 3, 5, 6], 0.9))]);
        let a = check_same(&build("bhnd,bhne->bhnde"), &inputs);
        let b = check_same(&build("xyzw,xyzv->xyzwv"), &inputs);
        assert_eq!(only_einsum_spec(&a), "abcd,abce->abcde");
        assert_eq!(only_einsum_spec(&a), only_einsum_spec(&b));
    }

    #[test]
    fn permutes_fold_into_einsums() {
        // einsum(permute(x), y) and the same product written on x directly meet.
        let mut g = Graph::new("t");
        let x = g.add_input("x", f32s(&[4, 3]), None);
        let y = g.add_input("y", f32s(&[4, 5]), None);
        let xt = g.add(Op::Permute { perm: vec![1, 0] }, &[x], None).unwrap();
        let a = einsum(&mut g, "ij,jk->ik", &[xt, y]);
        let b = einsum(&mut g, "pq,pr->qr", &[x, y]);
        // A permute of an einsum result folds into its output letters.
        let c = einsum(&mut g, "ji,jk->ki", &[x, y]);
        let ct = g.add(Op::Permute { perm: vec![1, 0] }, &[c], None).unwrap();
        let s = g.add(Op::Binary(BinaryOp::Add), &[a, b], None).unwrap();
        let s = g.add(Op::Binary(BinaryOp::Add), &[s, ct], None).unwrap();
        g.add_output("y", s);
        let inputs = HashMap::from([("x".into(), data(&[4, 3], 0.4)), ("y".into(), data(&[4, 5], 1.1))]);
        let h = check_same(&g, &inputs);
        assert_eq!(count(&h, "permute"), 0);
        assert_eq!(only_einsum_spec(&h), "ab,ac->bc");
    }

    #[test]
    fn nested_einsums_flatten_while_two_operands_suffice() {
        let mut g = Graph::new("t");
        let x = g.add_input("x", f32s(&[2, 3, 4]), None);
        let y = g.add_input("y", f32s(&[3, 5]), None);
        // A sum of a sum: one einsum.
        let summed = einsum(&mut g, "ijl->ij", &[x]);
        let rows = einsum(&mut g, "ij->i", &[summed]);
        g.add_output("rows", rows);
        // A transposition feeding a product: one einsum.
        let xt = einsum(&mut g, "ijl->lji", &[x]);
        let p = einsum(&mut g, "lji,jk->lik", &[xt, y]);
        g.add_output("p", p);
        let inputs = HashMap::from([("x".into(), data(&[2, 3, 4], 0.3)), ("y".into(), data(&[3, 5], 0.8))]);
        let h = check_same(&g, &inputs);
        assert_eq!(einsum_specs(&h), vec!["abc,bd->cad", "abc->a"]);
    }

    #[test]
    fn a_sum_is_not_folded_into_a_product() {
        // Σ_l x_ijl, then a product over j: folded, l would be summed in x alone (a factor
        // |l| more work, and no longer a matrix product).
        let mut g = Graph::new("t");
        let x = g.add_input("x", f32s(&[2, 3, 4]), None);
        let y = g.add_input("y", f32s(&[3, 5]), None);
        let summed = einsum(&mut g, "ijl->ij", &[x]);
        let a = einsum(&mut g, "ij,jk->ik", &[summed, y]);
        g.add_output("a", a);
        let inputs = HashMap::from([("x".into(), data(&[2, 3, 4], 0.3)), ("y".into(), data(&[3, 5], 0.8))]);
        let h = check_same(&g, &inputs);
        assert_eq!(count(&h, "einsum"), 2);
    }

    #[test]
    fn chained_products_meet_in_the_cheapest_association() {
        let mut g = Graph::new("t");
        let a = g.add_input("a", f32s(&[4, 5]), None);
        let b = g.add_input("b", f32s(&[5, 6]), None);
        let c = g.add_input("c", f32s(&[6, 2]), None);
        // (A·B)·C costs 4·5·6 + 4·6·2 = 168, A·(B·C) 5·6·2 + 4·5·2 = 100.
        let ab = einsum(&mut g, "ij,jk->ik", &[a, b]);
        let left = einsum(&mut g, "ik,kl->il", &[ab, c]);
        let bc = einsum(&mut g, "jk,kl->jl", &[b, c]);
        let right = einsum(&mut g, "ij,jl->il", &[a, bc]);
        g.add_output("left", left);
        g.add_output("right", right);
        let inputs = HashMap::from([
            ("a".into(), data(&[4, 5], 0.3)),
            ("b".into(), data(&[5, 6], 0.8)),
            ("c".into(), data(&[6, 2], 1.3)),
        ]);
        let h = check_same(&g, &inputs);
        // One chain serves both outputs, through B·C.
        assert_eq!(count(&h, "einsum"), 2);
        assert_eq!(h.outputs[0].1, h.outputs[1].1);
        let out = h.outputs[0].1;
        let inner = h.operands(out).into_iter().find(|&o| matches!(h.node(o).op, Op::Einsum(_))).unwrap();
        let mut pair = h.operands(inner);
        pair.sort();
        assert_eq!(pair, vec![b, c]);
    }

    #[test]
    fn a_shared_inner_einsum_is_not_flattened() {
        let mut g = Graph::new("t");
        let x = g.add_input("x", f32s(&[3, 4]), None);
        let y = g.add_input("y", f32s(&[3, 5]), None);
        let summed = einsum(&mut g, "ij->i", &[x]);
        let a = einsum(&mut g, "i,ik->k", &[summed, y]);
        g.add_output("a", a);
        g.add_output("summed", summed);
        let inputs = HashMap::from([("x".into(), data(&[3, 4], 0.3)), ("y".into(), data(&[3, 5], 0.8))]);
        let h = check_same(&g, &inputs);
        assert_eq!(count(&h, "einsum"), 2);
    }

    #[test]
    fn permuting_einsum_becomes_permute() {
        let mut g = Graph::new("t");
        let x = g.add_input("x", f32s(&[4, 3]), None);
        let t = einsum(&mut g, "ij->ji", &[x]);
        let e = g.add(Op::Unary(UnaryOp::Exp), &[t], None).unwrap();
        let id = einsum(&mut g, "ij->ij", &[e]);
        g.add_output("y", id);
        let h = check_same(&g, &HashMap::from([("x".into(), data(&[4, 3], 0.4))]));
        assert_eq!(count(&h, "einsum"), 0);
        assert_eq!(count(&h, "permute"), 1);
    }

    #[test]
    fn splatted_constants_fold() {
        // (broadcast(reshape(2)) * broadcast(reshape(3))) + x  →  broadcast(reshape(6)) + x
        let mut g = Graph::new("t");
        let x = g.add_input("x", f32s(&[2, 3]), None);
        let splat_of = |g: &mut Graph, v: f64| {
            let c = g.add(Op::Constant { value: F64Bits::new(v), dtype: DType::F32 }, &[], None).unwrap();
            let r = g.add(Op::Reshape { shape: f32s(&[1, 1]).shape }, &[c], None).unwrap();
            g.add(Op::Broadcast { shape: f32s(&[2, 3]).shape }, &[r], None).unwrap()
        };
        let a = splat_of(&mut g, 2.0);
        let b = splat_of(&mut g, 3.0);
        let m = g.add(Op::Binary(BinaryOp::Mul), &[a, b], None).unwrap();
        let neg = g.add(Op::Unary(UnaryOp::Neg), &[m], None).unwrap();
        let s = g.add(Op::Binary(BinaryOp::Add), &[x, neg], None).unwrap();
        // A splat reached through a permute and a slice is still a splat.
        let p = g.add(Op::Permute { perm: vec![1, 0] }, &[a], None).unwrap();
        let p = g.add(Op::Slice { axis: 0, start: Dim::constant(0), end: Dim::constant(2) }, &[p], None).unwrap();
        let p = g.add(Op::Reshape { shape: f32s(&[2, 2]).shape }, &[p], None).unwrap();
        g.add_output("y", s);
        g.add_output("p", p);
        let h = check_same(&g, &HashMap::from([("x".into(), data(&[2, 3], 0.5))]));
        assert_eq!(count(&h, "const"), 2, "{}", crate::ir::print::to_text(&h));
        assert_eq!(count(&h, "mul") + count(&h, "neg") + count(&h, "permute") + count(&h, "slice"), 0);
        let consts: Vec<f64> = h
            .dag
            .node_indices()
            .filter_map(|n| match h.node(n).op {
                Op::Constant { value, .. } => Some(value.get()),
                _ => None,
            })
            .collect();
        assert!(consts.contains(&-6.0) && consts.contains(&2.0), "{consts:?}");
    }

    #[test]
    fn constant_select_and_sizes_fold() {
        let mut g = Graph::new("t");
        let x = g.add_input("x", f32s(&[3]), None);
        let y = g.add_input("y", f32s(&[3]), None);
        let one = g.add(Op::SizeOf { size: Dim::constant(1), dtype: DType::F32 }, &[], None).unwrap();
        let two = g.add(Op::Constant { value: F64Bits::new(2.0), dtype: DType::F32 }, &[], None).unwrap();
        let lt = g.add(Op::Binary(BinaryOp::Lt), &[one, two], None).unwrap();
        let lt = g.add(Op::Reshape { shape: vec![Dim::constant(1)] }, &[lt], None).unwrap();
        let c = g.add(Op::Broadcast { shape: vec![Dim::constant(3)] }, &[lt], None).unwrap();
        let s = g.add(Op::Select, &[c, x, y], None).unwrap();
        g.add_output("s", s);
        let inputs = HashMap::from([("x".into(), data(&[3], 0.5)), ("y".into(), data(&[3], 0.6))]);
        let h = check_same(&g, &inputs);
        assert_eq!(h.outputs[0].1, x);
        assert_eq!(h.len(), 2);
    }

    #[test]
    fn common_subexpressions_merge() {
        let mut g = Graph::new("t");
        let x = g.add_input("x", f32s(&[3]), None);
        let a = g.add(Op::Unary(UnaryOp::Exp), &[x], None).unwrap();
        let b = g.add(Op::Unary(UnaryOp::Exp), &[x], None).unwrap();
        let s = g.add(Op::Binary(BinaryOp::Mul), &[a, b], None).unwrap();
        g.add_output("s", s);
        let h = check_same(&g, &HashMap::from([("x".into(), data(&[3], 0.5))]));
        assert_eq!(count(&h, "exp"), 1);
    }
}
