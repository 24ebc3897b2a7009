//! Gradients at non-differentiable points (pinned to the conventions documented in
//! `autodiff/rules.rs`), gradients of parameters, and autodiff's error reporting.

mod common;

use common::*;
use std::collections::HashMap;
use tnc_compiler::autodiff::{differentiate, differentiate_wrt, grad_name, GradOptions};
use tnc_compiler::interp::{compare, evaluate, init_params, EvalOptions, Tensor};
use tnc_compiler::ir::verify::verify;
use tnc_compiler::ir::{
    BinaryOp, DType, Dim, EinsumSpec, F64Bits, Graph, Init, NodeId, Op, ParamInfo, ReduceOp, TensorType, UnaryOp,
};
use tnc_grammar::{FileId, Span};

fn t(shape: &[usize], data: &[f64]) -> Tensor {
    Tensor::new(shape.to_vec(), data.to_vec()).unwrap()
}

fn sum_all(g: &mut Graph, y: NodeId) -> NodeId {
    let axes = (0..g.ty(y).rank()).collect();
    g.add(Op::Reduce { op: ReduceOp::Sum, axes }, &[y], None).unwrap()
}

/// Gradients of `sum(f(inputs))` w.r.t. each input, by autodiff in f64.
fn grads_of_sum(inputs: &[(&str, Tensor)], f: impl Fn(&mut Graph, &[NodeId]) -> NodeId) -> Vec<Tensor> {
    let mut g = Graph::new("kink");
    let ids: Vec<NodeId> =
        inputs.iter().map(|(n, v)| g.add_input(*n, TensorType::new(DType::F32, dims(&v.shape)), None)).collect();
    let y = f(&mut g, &ids);
    let loss = sum_all(&mut g, y);
    let names: Vec<&str> = inputs.iter().map(|(n, _)| *n).collect();
    differentiate_wrt(&mut g, loss, &names).unwrap();
    verify(&g).unwrap();
    let vals: HashMap<String, Tensor> = inputs.iter().map(|(n, v)| (n.to_string(), v.clone())).collect();
    let ev = evaluate(&g, &vals, &[], &EvalOptions::default()).unwrap();
    names.iter().map(|n| ev.output(&g, &grad_name(n)).unwrap().clone()).collect()
}

fn unary_grad(u: UnaryOp, xs: &[f64]) -> Tensor {
    let x = t(&[xs.len()], xs);
    grads_of_sum(&[("x", x)], |g, ids| g.add(Op::Unary(u), &[ids[0]], None).unwrap()).remove(0)
}

fn eval_unary(u: UnaryOp, x: f64) -> f64 {
    let mut g = Graph::new("f");
    let i = g.add_input("x", TensorType::scalar(DType::F32), None);
    let y = g.add(Op::Unary(u), &[i], None).unwrap();
    let vals = HashMap::from([("x".to_string(), Tensor::scalar(x))]);
    evaluate(&g, &vals, &[], &EvalOptions::default()).unwrap().get(y).unwrap().data[0]
}

#[test]
fn derivatives_at_zero_follow_the_documented_branch() {
    let at = [0.0, -0.5, 0.7];
    let close = |a: &Tensor, e: &[f64]| compare(a, &t(&[e.len()], e)).within(1e-12);
    // relu'(0) = 0: the left derivative.
    let g = unary_grad(UnaryOp::Relu, &at);
    assert!(close(&g, &[0.0, 0.0, 1.0]), "{g:?}");
    // elu'(x) = exp(x) for x ≤ 0, so elu'(0) = 1 (both one-sided derivatives agree).
    let g = unary_grad(UnaryOp::Elu, &at);
    assert!(close(&g, &[1.0, (-0.5f64).exp(), 1.0]), "{g:?}");
    // silu is smooth: silu'(0) = 1/2.
    let g = unary_grad(UnaryOp::Silu, &at);
    let s = |x: f64| 1.0 / (1.0 + (-x).exp());
    let ds = |x: f64| s(x) * (1.0 + x * (1.0 - s(x)));
    assert!(close(&g, &[0.5, ds(-0.5), ds(0.7)]), "{g:?}");
    // abs'(0) = 0 (the subgradient midpoint).
    let g = unary_grad(UnaryOp::Abs, &at);
    assert!(close(&g, &[0.0, -1.0, 1.0]), "{g:?}");

    // sqrt'(0) = 0, not +inf: a norm of an all-zero row must not produce NaN.
    let g = unary_grad(UnaryOp::Sqrt, &[0.0, 0.25]);
    assert!(close(&g, &[0.0, 1.0]), "{g:?}");
    let x = t(&[2], &[0.0, 0.0]);
    let g = grads_of_sum(&[("x", x)], |g, ids| {
        // sum(x / (sqrt(sum(x * x)) + eps)) at x = 0 has gradient 1/eps per element.
        let sq = g.add(Op::Binary(BinaryOp::Mul), &[ids[0], ids[0]], None).unwrap();
        let ss = sum_all(g, sq);
        let r = g.add(Op::Unary(UnaryOp::Sqrt), &[ss], None).unwrap();
        let eps = g.add(Op::Constant { value: F64Bits::new(1e-3), dtype: DType::F32 }, &[], None).unwrap();
        let d = g.add(Op::Binary(BinaryOp::Add), &[r, eps], None).unwrap();
        let d = g.add(Op::Reshape { shape: dims(&[1]) }, &[d], None).unwrap();
        let d = g.add(Op::Broadcast { shape: dims(&[2]) }, &[d], None).unwrap();
        g.add(Op::Binary(BinaryOp::Div), &[ids[0], d], None).unwrap()
    });
    assert!(close(&g[0], &[1e3, 1e3]), "{:?}", g[0]);

    // The same values against one-sided differences from the documented side.
    let h = 1e-7;
    let left = |u| (eval_unary(u, 0.0) - eval_unary(u, -h)) / h;
    assert_eq!(left(UnaryOp::Relu), 0.0);
    assert!((left(UnaryOp::Elu) - 1.0).abs() < 1e-6);
    let central = (eval_unary(UnaryOp::Silu, h) - eval_unary(UnaryOp::Silu, -h)) / (2.0 * h);
    assert!((central - 0.5).abs() < 1e-6);
}

#[test]
fn ties_go_to_the_first_operand_and_to_every_maximum() {
    let a = t(&[3], &[1.0, 2.0, 3.0]);
    let b = t(&[3], &[1.0, 5.0, 0.0]);
    for (op, ga, gb) in
        [(BinaryOp::Max, [1.0, 0.0, 1.0], [0.0, 1.0, 0.0]), (BinaryOp::Min, [1.0, 1.0, 0.0], [0.0, 0.0, 1.0])]
    {
        let g = grads_of_sum(&[("a", a.clone()), ("b", b.clone())], |g, ids| {
            g.add(Op::Binary(op), &[ids[0], ids[1]], None).unwrap()
        });
        assert_eq!(g[0].data, ga, "{op:?}");
        assert_eq!(g[1].data, gb, "{op:?}");
    }
    // reduce_max: both tied maxima get the full cotangent.
    let x = t(&[2, 3], &[1.0, 3.0, 3.0, -1.0, -2.0, -1.0]);
    for (op, want) in [(ReduceOp::Max, [0.0, 1.0, 1.0, 1.0, 0.0, 1.0]), (ReduceOp::Min, [1.0, 0.0, 0.0, 0.0, 1.0, 0.0])]
    {
        let g = grads_of_sum(&[("x", x.clone())], |g, ids| {
            g.add(Op::Reduce { op, axes: vec![1] }, &[ids[0]], None).unwrap()
        });
        assert_eq!(g[0].data, want, "{op:?}");
    }
}

#[test]
fn pow_with_a_zero_base_has_a_finite_exponent_gradient() {
    let a = t(&[2], &[0.0, 2.0]);
    let b = t(&[2], &[2.5, 3.0]);
    let g = grads_of_sum(&[("a", a), ("b", b)], |g, ids| {
        g.add(Op::Binary(BinaryOp::Pow), &[ids[0], ids[1]], None).unwrap()
    });
    // d/da: b·a^(b-1) = [0, 3·4]; d/db: y·log(a) = [0 (log 0 read as 0), 8·log 2].
    assert!(compare(&g[0], &t(&[2], &[0.0, 12.0])).within(1e-12), "{:?}", g[0]);
    assert!(compare(&g[1], &t(&[2], &[0.0, 8.0 * 2f64.ln()])).within(1e-12), "{:?}", g[1]);
}

fn param(g: &mut Graph, name: &str, shape: &[usize], trainable: bool) -> NodeId {
    g.add_param(ParamInfo {
        name: name.into(),
        ty: TensorType::new(DType::F32, dims(shape)),
        init: Init::Normal { mean: 0.0, std: 0.5 },
        trainable,
        attrs: vec![],
        seed: None,
        span: None,
        node: NodeId::new(0),
    })
}

/// A two-layer MLP `sum(silu(x @ w1) @ w2 * scale)` with a frozen `scale` buffer, an
/// unused parameter, and an i32 input.
fn mlp() -> (Graph, NodeId) {
    let mut g = Graph::new("mlp");
    let x = g.add_input("x", TensorType::new(DType::F32, sym(&["B", "3"])), None);
    let _ids = g.add_input("ids", TensorType::new(DType::I32, sym(&["B"])), None);
    let w1 = param(&mut g, "w1", &[3, 4], true);
    let w2 = param(&mut g, "w2", &[4, 2], true);
    let scale = param(&mut g, "scale", &[], false);
    let _unused = param(&mut g, "unused", &[5, 1], true);
    let mm = |ins: [&str; 2], out: &str| {
        Op::Einsum(EinsumSpec {
            inputs: ins.iter().map(|s| s.as_bytes().to_vec()).collect(),
            output: out.as_bytes().to_vec(),
            pinned: false,
        })
    };
    let h = g.add(mm(["bi", "ij"], "bj"), &[x, w1], None).unwrap();
    let h = g.add(Op::Unary(UnaryOp::Silu), &[h], None).unwrap();
    let o = g.add(mm(["bj", "jk"], "bk"), &[h, w2], None).unwrap();
    let s = g.add(Op::Reshape { shape: dims(&[1, 1]) }, &[scale], None).unwrap();
    let s = g.add(Op::Broadcast { shape: sym(&["B", "2"]) }, &[s], None).unwrap();
    let o = g.add(Op::Binary(BinaryOp::Mul), &[o, s], None).unwrap();
    let loss = sum_all(&mut g, o);
    g.add_output("loss", loss);
    (g, loss)
}

#[test]
fn parameter_gradients_match_finite_differences() {
    let (g0, loss) = mlp();
    let mut g = g0.clone();
    differentiate(&mut g, loss, &GradOptions { wrt_inputs: true }).unwrap();
    verify(&g).unwrap();
    let names: Vec<&str> = g.outputs.iter().map(|(n, _)| n.as_str()).collect();
    // Trainable parameters and the f32 input; not the buffer, not the i32 input.
    assert_eq!(names, ["loss", "grad.w1", "grad.w2", "grad.unused", "grad.x"]);

    let params = init_params(&g, 3).unwrap();
    let inputs =
        HashMap::from([("x".to_string(), normal("mlp x", &[2, 3])), ("ids".to_string(), ints("mlp ids", &[2], 9))]);
    let opts = EvalOptions::default();
    let ev = evaluate(&g, &inputs, &params, &opts).unwrap();
    let loss_at = |ps: &[Tensor]| {
        let e = evaluate(&g0, &inputs, ps, &opts).unwrap();
        e.output(&g0, "loss").unwrap().data[0]
    };
    for (i, name) in ["w1", "w2"].iter().enumerate() {
        let mut ps = params.clone();
        let mut fd = Tensor::zeros(ps[i].shape.clone());
        for k in 0..fd.numel() {
            let v = params[i].data[k];
            let h = 1e-6 * v.abs().max(1.0);
            ps[i].data[k] = v + h;
            let up = loss_at(&ps);
            ps[i].data[k] = v - h;
            let down = loss_at(&ps);
            ps[i].data[k] = v;
            fd.data[k] = (up - down) / (2.0 * h);
        }
        let ad = ev.output(&g, &grad_name(name)).unwrap();
        let c = compare(ad, &fd);
        assert!(c.within(FD_TOL), "{name}: {c}");
    }
    // A parameter the loss ignores has an exactly-zero gradient of its own shape.
    let z = ev.output(&g, "grad.unused").unwrap();
    assert_eq!(z, &Tensor::zeros(vec![5, 1]));
}

#[test]
fn errors_carry_the_span_of_the_offending_node() {
    let span = Span { file: FileId(0), start: 3, end: 9 };
    let mut g = Graph::new("bad");
    let tok = g.add_input("tokens", TensorType::new(DType::I32, sym(&["N"])), Some(span));
    let x = g.add_input("x", TensorType::new(DType::F32, sym(&["N"])), None);
    let e = differentiate_wrt(&mut g, x, &[]).unwrap_err();
    assert!(e.message.contains("scalar"), "{e}");

    let loss = sum_all(&mut g, x);
    let e = differentiate_wrt(&mut g, loss, &["tokens"]).unwrap_err();
    assert_eq!(e.span, Some(span));
    assert!(e.message.contains("tokens") && e.message.contains("i32"), "{e}");
    assert!(differentiate_wrt(&mut g, loss, &["nope"]).is_err());
    let _ = tok;

    // A non-scalar loss points at the loss expression.
    let mut g2 = Graph::new("vec");
    let v = g2.add_input("v", TensorType::new(DType::F32, vec![Dim::constant(2)]), None);
    let y = g2.add(Op::Unary(UnaryOp::Exp), &[v], Some(span)).unwrap();
    let e = differentiate(&mut g2, y, &GradOptions::default()).unwrap_err();
    assert_eq!(e.span, Some(span));

    // Differentiating twice would register the same gradient outputs twice.
    differentiate_wrt(&mut g, loss, &["x"]).unwrap();
    assert!(differentiate_wrt(&mut g, loss, &["x"]).is_err());
}
