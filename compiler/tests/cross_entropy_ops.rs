//! The cross-entropy normal form in the interpreter: the loss and both backward ops,
//! evaluated naively and by vocabulary chunks of 1, 7, V and more than V, against the
//! unfused primitive spelling (the loss as in `std.tn`, the backward by autodiff of it),
//! within 1e-12 relative L2 in f64; tied `[V, D]` and transposed `[D, V]` tables; token
//! shapes of rank 0, 1 and 2. Finite-difference checks (relative L2 < 1e-6) of the op's
//! gradient rule and of `scatter_add`; the backward ops refuse a second derivative; a
//! target outside the vocabulary is an error.

mod common;

use common::*;
use std::collections::HashMap;
use tnc_compiler::autodiff::{differentiate_wrt, grad_name};
use tnc_compiler::interp::{compare, evaluate, EvalOptions, Tensor};
use tnc_compiler::ir::{
    BinaryOp, CrossEntropy, DType, Dim, EinsumSpec, F64Bits, Graph, NodeId, Op, ReduceOp, TensorType, UnaryOp,
};

const TOL: f64 = 1e-12;

fn add(g: &mut Graph, op: Op, xs: &[NodeId]) -> NodeId {
    g.add(op, xs, None).unwrap_or_else(|e| panic!("{e}"))
}

/// `x` broadcast to `shape` after inserting a size-1 axis at `axis` (or as is if the
/// ranks already agree).
fn expand(g: &mut Graph, x: NodeId, axis: usize, shape: &[Dim]) -> NodeId {
    let mut kept = g.ty(x).shape.clone();
    if kept.len() < shape.len() {
        kept.insert(axis, Dim::constant(1));
    }
    let r = add(g, Op::Reshape { shape: kept }, &[x]);
    add(g, Op::Broadcast { shape: shape.to_vec() }, &[r])
}

fn splat(g: &mut Graph, v: f64, shape: &[Dim]) -> NodeId {
    let c = add(g, Op::Constant { value: F64Bits::new(v), dtype: DType::F32 }, &[]);
    let ones = vec![Dim::constant(1); shape.len()];
    let c = add(g, Op::Reshape { shape: ones }, &[c]);
    add(g, Op::Broadcast { shape: shape.to_vec() }, &[c])
}

/// The per-token cross-entropy `[T…]` spelled with primitives, as `std.tn` does.
fn primitive(g: &mut Graph, x: NodeId, table: NodeId, y: NodeId, transposed: bool) -> NodeId {
    let r = g.ty(x).rank();
    let letters: Vec<u8> = (b'a'..).take(r - 1).collect();
    let mut xl = letters.clone();
    xl.push(b'd');
    let mut out = letters.clone();
    out.push(b'v');
    let tl = if transposed { b"dv".to_vec() } else { b"vd".to_vec() };
    let logits = add(g, Op::Einsum(EinsumSpec { inputs: vec![xl, tl], output: out, pinned: false }), &[x, table]);
    let shape = g.ty(logits).shape.clone();
    let a = r - 1;
    let top = add(g, Op::Reduce { op: ReduceOp::Max, axes: vec![a] }, &[logits]);
    let topb = expand(g, top, a, &shape);
    let d = add(g, Op::Binary(BinaryOp::Sub), &[logits, topb]);
    let e = add(g, Op::Unary(UnaryOp::Exp), &[d]);
    let s = add(g, Op::Reduce { op: ReduceOp::Sum, axes: vec![a] }, &[e]);
    let l = add(g, Op::Unary(UnaryOp::Log), &[s]);
    let lse = add(g, Op::Binary(BinaryOp::Add), &[l, top]);
    let iota = add(g, Op::Iota { len: shape[a].clone(), dtype: DType::I32 }, &[]);
    let iota = {
        let mut ones = vec![Dim::constant(1); r];
        ones[a] = shape[a].clone();
        let i = add(g, Op::Reshape { shape: ones }, &[iota]);
        add(g, Op::Broadcast { shape: shape.clone() }, &[i])
    };
    let yb = expand(g, y, a, &shape);
    let hit = add(g, Op::Binary(BinaryOp::Eq), &[iota, yb]);
    let zero = splat(g, 0.0, &shape);
    let sel = add(g, Op::Select, &[hit, logits, zero]);
    let picked = add(g, Op::Reduce { op: ReduceOp::Sum, axes: vec![a] }, &[sel]);
    add(g, Op::Binary(BinaryOp::Sub), &[lse, picked])
}

struct Case {
    tokens: Vec<usize>,
    v: usize,
    d: usize,
    transposed: bool,
}

fn inputs(c: &Case, tag: &str) -> HashMap<String, Tensor> {
    let mut xshape = c.tokens.clone();
    xshape.push(c.d);
    let tshape = if c.transposed { vec![c.d, c.v] } else { vec![c.v, c.d] };
    // Scaled up so that the softmax is far from uniform.
    let mut x = normal(&format!("{tag} x"), &xshape);
    x.data.iter_mut().for_each(|v| *v *= 2.0);
    HashMap::from([
        ("x".to_string(), x),
        ("table".to_string(), normal(&format!("{tag} table"), &tshape)),
        ("y".to_string(), ints(&format!("{tag} y"), &c.tokens, c.v)),
        ("g".to_string(), normal(&format!("{tag} g"), &c.tokens)),
    ])
}

#[test]
fn fused_ops_match_the_primitive_spelling_naive_and_chunked() {
    let cases = [
        Case { tokens: vec![2, 5], v: 13, d: 4, transposed: false },
        Case { tokens: vec![2, 5], v: 13, d: 4, transposed: true },
        Case { tokens: vec![7], v: 9, d: 3, transposed: false },
        Case { tokens: vec![], v: 6, d: 5, transposed: true },
        Case { tokens: vec![3, 1, 2], v: 1, d: 2, transposed: false },
    ];
    let mut worst = 0.0f64;
    for (k, c) in cases.iter().enumerate() {
        let tag = format!("case {k}: tokens {:?}, V={}, D={}, transposed={}", c.tokens, c.v, c.d, c.transposed);
        let values = inputs(c, &tag);
        let mut g = Graph::new("ce");
        let ty = |dt, s: &Tensor| TensorType::new(dt, dims(&s.shape));
        let x = g.add_input("x", ty(DType::F32, &values["x"]), None);
        let table = g.add_input("table", ty(DType::F32, &values["table"]), None);
        let y = g.add_input("y", ty(DType::I32, &values["y"]), None);
        let gw = g.add_input("g", ty(DType::F32, &values["g"]), None);
        // Reference: the primitive spelling, and autodiff of `sum(ℓ · g)` through it.
        let prim = primitive(&mut g, x, table, y, c.transposed);
        let weighted = add(&mut g, Op::Binary(BinaryOp::Mul), &[prim, gw]);
        let axes: Vec<usize> = (0..c.tokens.len()).collect();
        let loss =
            if axes.is_empty() { weighted } else { add(&mut g, Op::Reduce { op: ReduceOp::Sum, axes }, &[weighted]) };
        g.add_output("prim", prim);
        g.add_output("loss", loss);
        differentiate_wrt(&mut g, loss, &["x", "table"]).unwrap();
        // The fused ops.
        let ce = CrossEntropy { transposed: c.transposed, pinned: false };
        let fused = add(&mut g, Op::CrossEntropy(ce), &[x, table, y]);
        let gx = add(&mut g, Op::CrossEntropyGradX(ce), &[x, table, y, gw]);
        let gt = add(&mut g, Op::CrossEntropyGradTable(ce), &[x, table, y, gw]);
        g.add_output("fused", fused);
        g.add_output("gx", gx);
        g.add_output("gt", gt);
        tnc_compiler::ir::verify::verify(&g).unwrap();

        let reference = evaluate(&g, &values, &[], &EvalOptions::default()).unwrap();
        let pairs = [("fused", "prim".to_string()), ("gx", grad_name("x")), ("gt", grad_name("table"))];
        for chunk in [None, Some(1), Some(7), Some(c.v), Some(c.v + 5)] {
            let opts = EvalOptions { chunk, ..EvalOptions::default() };
            let e = evaluate(&g, &values, &[], &opts).unwrap();
            for (got, want) in &pairs {
                let cl = compare(e.output(&g, got).unwrap(), reference.output(&g, want).unwrap());
                assert!(cl.within(TOL), "{tag}, chunk {chunk:?}: `{got}` vs `{want}`: {cl}");
                worst = worst.max(cl.rel_l2);
            }
        }
    }
    eprintln!("fused cross-entropy ops vs the primitive spelling: worst rel. L2 {worst:.2e}");
}

#[test]
fn gradient_rule_passes_finite_differences() {
    for transposed in [false, true] {
        for chunk in [None, Some(3)] {
            let tag = format!("cross_entropy transposed={transposed} chunk={chunk:?}");
            let tshape = if transposed { [4, 9] } else { [9, 4] };
            let args = vec![
                x("x", normal(&format!("{tag} x"), &[2, 3, 4])),
                x("table", normal(&format!("{tag} t"), &tshape)),
                fixed("y", DType::I32, ints(&format!("{tag} y"), &[2, 3], 9)),
            ];
            let opts = EvalOptions { chunk, ..EvalOptions::default() };
            let op = Op::CrossEntropy(CrossEntropy { transposed, pinned: false });
            gradcheck_with(&tag, args, &opts, &|g, ids| g.add(op.clone(), ids, None));
        }
    }
}

#[test]
fn scatter_add_passes_finite_differences() {
    // Index 2 repeats; row 3 receives nothing.
    let idx = Tensor::new(vec![2, 3], vec![2., 0., 2., 4., 2., 1.]).unwrap();
    let args = vec![x("values", normal("scatter", &[2, 3, 2])), fixed("idx", DType::I32, idx)];
    gradcheck("scatter_add", args, &|g, ids| g.add(Op::ScatterAdd { rows: Dim::constant(5) }, ids, None));
    // Scalar rows, a symbolic index shape.
    let args = vec![
        xs("values", sym(&["N"]), normal("scatter1", &[6])),
        Arg {
            name: "idx",
            ty: TensorType::new(DType::I32, sym(&["N"])),
            value: ints("scatter1 i", &[6], 3),
            diff: false,
        },
    ];
    gradcheck("scatter_add rank-1", args, &|g, ids| g.add(Op::ScatterAdd { rows: Dim::constant(3) }, ids, None));
}

#[test]
fn backward_ops_refuse_second_derivatives_and_bad_targets_are_errors() {
    let mut g = Graph::new("second");
    let x = g.add_input("x", TensorType::new(DType::F32, dims(&[3, 2])), None);
    let t = g.add_input("table", TensorType::new(DType::F32, dims(&[4, 2])), None);
    let y = g.add_input("y", TensorType::new(DType::I32, dims(&[3])), None);
    let w = g.add_input("g", TensorType::new(DType::F32, dims(&[3])), None);
    let ce = CrossEntropy { transposed: false, pinned: false };
    let gx = add(&mut g, Op::CrossEntropyGradX(ce), &[x, t, y, w]);
    let loss = add(&mut g, Op::Reduce { op: ReduceOp::Sum, axes: vec![0, 1] }, &[gx]);
    let err = differentiate_wrt(&mut g.clone(), loss, &["x"]).unwrap_err();
    assert!(err.message.contains("second derivative"), "{}", err.message);

    let fwd = add(&mut g, Op::CrossEntropy(ce), &[x, t, y]);
    g.add_output("ce", fwd);
    let values = HashMap::from([
        ("x".to_string(), normal("bad x", &[3, 2])),
        ("table".to_string(), normal("bad t", &[4, 2])),
        ("y".to_string(), Tensor::new(vec![3], vec![1., 4., 0.]).unwrap()),
        ("g".to_string(), normal("bad g", &[3])),
    ]);
    for chunk in [None, Some(2)] {
        let err = evaluate(&g, &values, &[], &EvalOptions { chunk, ..EvalOptions::default() }).unwrap_err();
        // Refused before any op runs: the target 4 is outside the 4 words of the table.
        assert!(err.contains("input `y` holds 4 at flat index 1, outside 0..4"), "{err}");
    }
    // Shape errors are type errors.
    assert!(g.add(Op::CrossEntropy(ce), &[x, t, w], None).unwrap_err().contains("i32"));
    assert!(g.add(Op::CrossEntropy(CrossEntropy { transposed: true, pinned: false }), &[x, t, y], None).is_err());
}

/// `recognize` on primitive spellings built directly in IR (reductions dropping the
/// axis, unlike `std.tn`'s): the spelling is rewritten, and look-alikes whose axes only
/// happen to have the same size (targets broadcast along the token axis, the max over
/// the wrong axis) are not. Rewritten or not, the values are unchanged.
#[test]
fn recognize_checks_axes_not_just_sizes() {
    use tnc_compiler::passes::{Pass, Recognize};
    // Tokens [2, 5] and V = 5: every axis but the batch has size 5.
    let c = Case { tokens: vec![2, 5], v: 5, d: 3, transposed: false };
    let mut values = inputs(&c, "recognize");
    values.remove("g");
    for variant in ["ce", "targets along n", "max along n"] {
        let mut g = Graph::new("ce");
        let ty = |dt, s: &Tensor| TensorType::new(dt, dims(&s.shape));
        let x = g.add_input("x", ty(DType::F32, &values["x"]), None);
        let table = g.add_input("table", ty(DType::F32, &values["table"]), None);
        let y = g.add_input("y", ty(DType::I32, &values["y"]), None);
        let out = primitive(&mut g, x, table, y, false);
        // Rewire one piece for the look-alikes.
        let sub_ops = g.operands(out);
        match variant {
            "targets along n" => {
                let sum = sub_ops[1];
                let sel = g.operands(sum)[0];
                let eq = g.operands(sel)[0];
                let iota = g.operands(eq)[0];
                let shape = g.ty(iota).shape.clone();
                let wrong = expand(&mut g, y, 1, &shape);
                let eq2 = add(&mut g, Op::Binary(BinaryOp::Eq), &[iota, wrong]);
                let logits = g.operands(sel)[1];
                let zero = g.operands(sel)[2];
                let sel2 = add(&mut g, Op::Select, &[eq2, logits, zero]);
                let picked = add(&mut g, Op::Reduce { op: ReduceOp::Sum, axes: vec![2] }, &[sel2]);
                let out2 = add(&mut g, Op::Binary(BinaryOp::Sub), &[sub_ops[0], picked]);
                g.add_output("out", out2);
            }
            "max along n" => {
                // lse' = log(sum_v(exp(L − max_n(L)))) + max_n(L): not a logsumexp over v.
                let lse = sub_ops[0];
                let log = g.operands(lse)[0];
                let sum = g.operands(log)[0];
                let exp = g.operands(sum)[0];
                let diff = g.operands(exp)[0];
                let logits = g.operands(diff)[0];
                let shape = g.ty(logits).shape.clone();
                let top = add(&mut g, Op::Reduce { op: ReduceOp::Max, axes: vec![1] }, &[logits]);
                let topb = expand(&mut g, top, 1, &shape);
                let d2 = add(&mut g, Op::Binary(BinaryOp::Sub), &[logits, topb]);
                let e2 = add(&mut g, Op::Unary(UnaryOp::Exp), &[d2]);
                let s2 = add(&mut g, Op::Reduce { op: ReduceOp::Sum, axes: vec![2] }, &[e2]);
                let l2 = add(&mut g, Op::Unary(UnaryOp::Log), &[s2]);
                let lse2 = add(&mut g, Op::Binary(BinaryOp::Add), &[l2, top]);
                let out2 = add(&mut g, Op::Binary(BinaryOp::Sub), &[lse2, sub_ops[1]]);
                g.add_output("out", out2);
            }
            _ => g.add_output("out", out),
        }
        if variant != "ce" {
            g.dag.remove_node(out);
        }
        let before = evaluate(&g, &values, &[], &EvalOptions::default()).unwrap();
        let r = Recognize.run(g.clone()).unwrap();
        tnc_compiler::ir::verify::verify(&r).unwrap();
        let fused = r.dag.node_weights().filter(|n| matches!(n.op, Op::CrossEntropy(_))).count();
        assert_eq!(fused, usize::from(variant == "ce"), "{variant}");
        for chunk in [None, Some(2)] {
            let after = evaluate(&r, &values, &[], &EvalOptions { chunk, ..EvalOptions::default() }).unwrap();
            let cl = compare(after.output(&r, "out").unwrap(), before.output(&g, "out").unwrap());
            assert!(cl.within(TOL), "{variant}: {cl}");
        }
    }
}
