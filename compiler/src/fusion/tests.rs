use super::fuser::{is_elementwise, is_view};
use super::*;
use crate::frontend::{self, Input, Request};
use crate::ir::print::op_counts;
use crate::ir::{BinaryOp, ReduceOp, UnaryOp};
use crate::ir::{Graph, NodeId, Op};
use crate::passes;
use std::path::PathBuf;

fn model(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models").join(name)
}

fn sets(s: &[&str]) -> Vec<String> {
    s.iter().map(|x| x.to_string()).collect()
}

/// Elaborate and run the whole pipeline.
fn optimized(name: &str, sets: &[String]) -> Graph {
    let (sources, g) = frontend::elaborate(Input::Path(&model(name)), &Request { sets, model: None });
    let g = g.unwrap_or_else(|d| panic!("{}", d.render(&sources)));
    let last = passes::pipeline().last().expect("a pipeline").name();
    passes::run_until(g, last).expect("a pass").unwrap_or_else(|d| panic!("{}", d.render(&sources)))
}

fn tiny_t1() -> Graph {
    optimized("transnormer_t1.tn", &sets(&["vocab=32", "dim=16", "heads=2", "layers=2", "glu_dim=24", "block=4"]))
}

fn is_leaf(g: &Graph, n: NodeId) -> bool {
    matches!(g.node(n).op, Op::Input { .. } | Op::Param { .. })
}

/// Every node is owned by one group or is a leaf; reads are produced outside the group and
/// written by an earlier group; graph outputs are written.
fn check_consistent(g: &Graph, plan: &FusionPlan) {
    let mut owned = 0;
    for n in g.dag.node_indices() {
        match plan.group_of(n) {
            None => assert!(is_leaf(g, n), "node {n:?} ({}) is in no group", g.node(n).op.kind()),
            Some(k) => {
                assert!(!is_leaf(g, n));
                assert!(plan.group(k).contains(n));
                owned += 1;
            }
        }
    }
    assert_eq!(owned, plan.groups.iter().map(|gr| gr.nodes.len()).sum::<usize>(), "a node is in two groups");
    for (k, grp) in plan.groups.iter().enumerate() {
        assert!(!grp.nodes.is_empty());
        for &i in &grp.inputs {
            assert!(!grp.contains(i) && !grp.recomputed.contains(&i), "group {k} reads its own value");
            if let Some(p) = plan.group_of(i) {
                assert!(p < k, "group {k} reads a value of the later group {p}");
                assert!(plan.group(p).outputs.contains(&i), "group {k} reads a value group {p} does not write");
            }
        }
        for &o in &grp.outputs {
            assert!(grp.contains(o));
        }
        for &r in &grp.recomputed {
            let op = &g.node(r).op;
            assert!(is_elementwise(op), "only cheap ops are recomputed, not {}", op.kind());
        }
        // Every operand of an op in the group is inside it or an input.
        for &n in grp.nodes.iter().chain(&grp.recomputed) {
            for o in g.operands(n) {
                assert!(grp.contains(o) || grp.recomputed.contains(&o) || grp.inputs.contains(&o));
            }
        }
    }
    for (_, o) in &g.outputs {
        if let Some(k) = plan.group_of(*o) {
            assert!(plan.group(k).outputs.contains(o), "graph output not written");
        }
    }
    for (kind, count) in op_counts(g) {
        if kind != "param" && kind != "input" {
            assert_eq!(plan.count_ops(kind), count, "{kind}");
        }
    }
}

#[test]
fn tiny_t1_plan_is_consistent() {
    let g = tiny_t1();
    let plan = fuse(&g).unwrap();
    check_consistent(&g, &plan);
    let base = unfused(&g).unwrap();
    check_consistent(&g, &base);
    assert!(plan.kernels() * 2 < base.kernels(), "{} vs {} kernels", plan.kernels(), base.kernels());
    assert!(!plan.groups_with(GroupKind::Row).is_empty());
    assert!(!plan.groups_with(GroupKind::Contraction).is_empty());
    // Every anchor is alone in its group.
    for grp in &plan.groups {
        let anchors = grp.nodes.iter().filter(|&&n| !is_elementwise(&g.node(n).op)).count();
        let reduces = grp.count_ops("reduce_sum") + grp.count_ops("reduce_max") + grp.count_ops("reduce_min");
        match grp.kind {
            GroupKind::Elementwise => assert_eq!(anchors, 0),
            GroupKind::Row | GroupKind::Reduce => assert_eq!(anchors, reduces),
            _ => assert_eq!(anchors, 1, "{:?}", grp.ops),
        }
    }
}

/// The forward SRMSNorms: `x / (sqrt(reduce_sum(x * x) / d) + eps)`; the norm's ops and
/// the residual add producing `x` land in one row group.
#[test]
fn srms_norm_and_residual_form_one_row_group() {
    let g = tiny_t1();
    let plan = fuse(&g).unwrap();
    let mut norms = 0;
    let mut with_residual = 0;
    for n in g.dag.node_indices() {
        let Op::Reduce { op: ReduceOp::Sum, axes } = &g.node(n).op else { continue };
        let [sq] = g.operands(n)[..] else { continue };
        if axes.as_slice() != [g.ty(sq).rank() - 1] || g.node(sq).op != Op::Binary(BinaryOp::Mul) {
            continue;
        }
        let [x, x2] = g.operands(sq)[..] else { continue };
        if x != x2 {
            continue;
        }
        let k = plan.group_of(n).unwrap();
        let grp = plan.group(k);
        assert_eq!(grp.kind, GroupKind::Row);
        assert_eq!(plan.group_of(sq), Some(k), "x * x");
        // sqrt, + eps and the final division x / (…) are in the row group.
        let sqrt = grp.nodes.iter().find(|&&m| g.node(m).op == Op::Unary(UnaryOp::Sqrt));
        assert!(sqrt.is_some(), "sqrt in {:?}", grp.ops);
        let div = g.users(x).into_iter().find(|&u| g.node(u).op == Op::Binary(BinaryOp::Div));
        if let Some(d) = div {
            assert_eq!(plan.group_of(d), Some(k), "x / norm");
        }
        norms += 1;
        if g.node(x).op == Op::Binary(BinaryOp::Add) && plan.group_of(x) == Some(k) {
            with_residual += 1;
        }
    }
    // Two layers: 4 norms inside layers + the final one; all but the first read a residual.
    assert!(norms >= 5, "{norms} norms");
    assert!(with_residual >= 4, "{with_residual} of {norms} norms hold their residual add");
}

/// The GLU gate `a * g` lands in a contraction group (epilogue or prologue).
#[test]
fn glu_gate_lands_with_an_einsum() {
    let g = tiny_t1();
    let plan = fuse(&g).unwrap();
    let mut gates = 0;
    for p in g.params.iter().filter(|p| p.name.ends_with("glu.w3")) {
        for e in g.users(p.node) {
            // The forward projection contracts the hidden width (w3's first axis).
            let first = g.operands(e)[0];
            if !matches!(g.node(e).op, Op::Einsum(_))
                || first == p.node
                || g.ty(first).shape.last() != p.ty.shape.first()
            {
                continue;
            }
            // The operand through views.
            let mut h = g.operands(e)[0];
            while is_view(&g.node(h).op) {
                h = g.operands(h)[0];
            }
            assert_eq!(g.node(h).op, Op::Binary(BinaryOp::Mul), "the gate");
            let grp = plan.group(plan.group_of(h).unwrap());
            assert_eq!(grp.kind, GroupKind::Contraction, "{:?}", grp.ops);
            gates += 1;
        }
    }
    assert_eq!(gates, 2);
}

#[test]
fn tiny_tnl_plan_snapshot() {
    let g = optimized("tnl.tn", &sets(&["vocab=8", "dim=4", "heads=2", "layers=1", "glu_dim=6"]));
    let plan = fuse(&g).unwrap();
    check_consistent(&g, &plan);
    insta::assert_snapshot!("tiny_tnl_fusion", to_text(&g, &plan));
}

#[test]
fn every_model_fuses_consistently() {
    for name in ["transnormer_t1.tn", "transnormer_t2.tn", "transformer.tn", "tnl.tn"] {
        let mut s = sets(&["vocab=32", "dim=16", "heads=2", "layers=2", "glu_dim=24"]);
        if name.starts_with("transnormer") {
            s.push("block=4".into());
        }
        let g = optimized(name, &s);
        let plan = fuse(&g).unwrap();
        check_consistent(&g, &plan);
    }
}
