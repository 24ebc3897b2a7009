//! Shared harness for numerical tests: deterministic test data and a finite-difference
//! gradient check of `loss = sum(op(x) * w)` for a graph built by a closure.
#![allow(dead_code)]

pub mod kernels;

use std::collections::HashMap;
use tnc_bundle::rng;
use tnc_compiler::autodiff::{differentiate_wrt, grad_name};
use tnc_compiler::interp::{compare, evaluate, EvalOptions, Tensor};
use tnc_compiler::ir::verify::verify;
use tnc_compiler::ir::{DType, Dim, Graph, NodeId, Op, ReduceOp, TensorType};

/// The tolerance every finite-difference check in f64 must meet (relative L2).
pub const FD_TOL: f64 = 1e-6;

pub fn dims(shape: &[usize]) -> Vec<Dim> {
    shape.iter().map(|&n| Dim::constant(n as i64)).collect()
}

/// A symbolic shape from names and numbers: `sym(&["B", "3"])` is `[B, 3]`.
pub fn sym(shape: &[&str]) -> Vec<Dim> {
    shape
        .iter()
        .map(|s| match s.parse::<i64>() {
            Ok(n) => Dim::constant(n),
            Err(_) => Dim::sym(*s),
        })
        .collect()
}

fn stream(tag: &str) -> u64 {
    rng::stable_hash(tag)
}

/// Standard normal values, keyed by `tag` so every test draws its own data.
pub fn normal(tag: &str, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let data = (0..n as u64).map(|i| rng::normal(1, stream(tag), i, 0)).collect();
    Tensor::new(shape.to_vec(), data).unwrap()
}

/// Uniform in `[lo, hi)`.
pub fn uniform(tag: &str, shape: &[usize], lo: f64, hi: f64) -> Tensor {
    let n: usize = shape.iter().product();
    let data = (0..n as u64).map(|i| lo + (hi - lo) * rng::uniform(1, stream(tag), i, 0)).collect();
    Tensor::new(shape.to_vec(), data).unwrap()
}

/// Distinct values `±0.05, ±0.15, …` in random order: no two within 0.1 of each other
/// and none within 0.05 of zero, so max/min/abs/relu/elu have no kink within reach of a
/// finite-difference step.
pub fn spaced(tag: &str, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let mut keys: Vec<(f64, usize)> = (0..n).map(|i| (rng::uniform(1, stream(tag), i as u64, 0), i)).collect();
    keys.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut data = vec![0.0; n];
    for (rank, (_, i)) in keys.into_iter().enumerate() {
        data[i] = (rank as f64 - n as f64 / 2.0 + 0.5) * 0.1;
        if data[i].abs() < 0.05 {
            data[i] = 0.05;
        }
    }
    Tensor::new(shape.to_vec(), data).unwrap()
}

/// Integers in `0..hi`, stored as f64 (for i32 inputs).
pub fn ints(tag: &str, shape: &[usize], hi: usize) -> Tensor {
    let t = uniform(tag, shape, 0.0, hi as f64);
    Tensor::new(t.shape, t.data.iter().map(|x| x.floor()).collect()).unwrap()
}

/// Builds the op under test from the input nodes.
pub type Build<'a> = dyn Fn(&mut Graph, &[NodeId]) -> Result<NodeId, String> + 'a;

/// One input of a gradient check.
pub struct Arg {
    pub name: &'static str,
    pub ty: TensorType,
    pub value: Tensor,
    /// Differentiate w.r.t. this input (it must be f32).
    pub diff: bool,
}

/// An f32 input to differentiate, with a constant shape.
pub fn x(name: &'static str, value: Tensor) -> Arg {
    let ty = TensorType::new(DType::F32, dims(&value.shape));
    Arg { name, ty, value, diff: true }
}

/// An f32 input to differentiate whose graph shape is symbolic.
pub fn xs(name: &'static str, shape: Vec<Dim>, value: Tensor) -> Arg {
    Arg { name, ty: TensorType::new(DType::F32, shape), value, diff: true }
}

/// An input that is not differentiated (indices, conditions).
pub fn fixed(name: &'static str, dtype: DType, value: Tensor) -> Arg {
    let ty = TensorType::new(dtype, dims(&value.shape));
    Arg { name, ty, value, diff: false }
}

/// Build `loss = sum(op(args) * w)` with a fixed random `w` shaped like the op's result.
/// Returns the graph, the loss node, and the input values (including `w`).
pub fn loss_graph(
    tag: &str,
    args: &[Arg],
    build: &Build<'_>,
    opts: &EvalOptions,
) -> (Graph, NodeId, HashMap<String, Tensor>) {
    let mut g = Graph::new(tag);
    let ids: Vec<NodeId> = args.iter().map(|a| g.add_input(a.name, a.ty.clone(), None)).collect();
    let y = build(&mut g, &ids).unwrap_or_else(|e| panic!("{tag}: building the op: {e}"));
    let mut values: HashMap<String, Tensor> = args.iter().map(|a| (a.name.to_string(), a.value.clone())).collect();
    // The op's concrete result shape decides the weights' shape.
    let ev = evaluate(&g, &values, &[], opts).unwrap_or_else(|e| panic!("{tag}: {e}"));
    let yshape = ev.get(y).unwrap().shape.clone();
    let wty = TensorType::new(DType::F32, g.ty(y).shape.clone());
    let w = g.add_input("w", wty, None);
    values.insert("w".into(), normal(&format!("{tag}/w"), &yshape));
    let p = g.add(Op::Binary(tnc_compiler::ir::BinaryOp::Mul), &[y, w], None).unwrap();
    let axes: Vec<usize> = (0..yshape.len()).collect();
    let loss = g.add(Op::Reduce { op: ReduceOp::Sum, axes }, &[p], None).unwrap();
    g.add_output("loss", loss);
    (g, loss, values)
}

/// Loss value of the forward graph.
pub fn loss_value(g: &Graph, values: &HashMap<String, Tensor>, opts: &EvalOptions) -> f64 {
    let ev = evaluate(g, values, &[], opts).unwrap();
    ev.output(g, "loss").unwrap().item().unwrap()
}

/// Central differences of the loss w.r.t. every element of input `name`.
pub fn finite_difference(g: &Graph, values: &HashMap<String, Tensor>, name: &str, opts: &EvalOptions) -> Tensor {
    let mut vals = values.clone();
    let x0 = values[name].clone();
    let mut grad = Tensor::zeros(x0.shape.clone());
    for i in 0..x0.numel() {
        let h = 1e-6 * x0.data[i].abs().max(1.0);
        vals.get_mut(name).unwrap().data[i] = x0.data[i] + h;
        let up = loss_value(g, &vals, opts);
        vals.get_mut(name).unwrap().data[i] = x0.data[i] - h;
        let down = loss_value(g, &vals, opts);
        vals.get_mut(name).unwrap().data[i] = x0.data[i];
        grad.data[i] = (up - down) / (2.0 * h);
    }
    grad
}

/// Autodiff gradients of every `diff` input, from the differentiated graph.
pub fn autodiff_grads(
    tag: &str,
    g: &Graph,
    loss: NodeId,
    args: &[Arg],
    values: &HashMap<String, Tensor>,
    opts: &EvalOptions,
) -> HashMap<String, Tensor> {
    let mut gd = g.clone();
    let names: Vec<&str> = args.iter().filter(|a| a.diff).map(|a| a.name).collect();
    differentiate_wrt(&mut gd, loss, &names).unwrap_or_else(|e| panic!("{tag}: {e}"));
    verify(&gd).unwrap_or_else(|e| panic!("{tag}: the differentiated graph is invalid: {e}"));
    let ev = evaluate(&gd, values, &[], opts).unwrap_or_else(|e| panic!("{tag}: {e}"));
    names.iter().map(|n| (n.to_string(), ev.output(&gd, &grad_name(n)).unwrap().clone())).collect()
}

/// Check autodiff against central differences in f64 for every differentiated input.
pub fn gradcheck_with(tag: &str, args: Vec<Arg>, opts: &EvalOptions, build: &Build<'_>) {
    let (g, loss, values) = loss_graph(tag, &args, build, opts);
    let grads = autodiff_grads(tag, &g, loss, &args, &values, opts);
    for a in args.iter().filter(|a| a.diff) {
        let fd = finite_difference(&g, &values, a.name, opts);
        let ad = &grads[a.name];
        let c = compare(ad, &fd);
        assert!(c.within(FD_TOL), "{tag}: gradient of `{}`: {c}\n autodiff {ad:?}\n fin.diff {fd:?}", a.name);
    }
}

pub fn gradcheck(tag: &str, args: Vec<Arg>, build: &Build<'_>) {
    gradcheck_with(tag, args, &EvalOptions::default(), build)
}

/// The tiny configuration of a model (its source `text`): small sizes for each of the
/// usual hyper-parameters the model declares (`NAME = ` in its header).
pub fn tiny_sets_of(text: &str) -> Vec<String> {
    const TINY: [(&str, u32); 7] =
        [("vocab", 32), ("dim", 16), ("heads", 2), ("layers", 2), ("glu_dim", 24), ("ffn_dim", 24), ("block", 4)];
    TINY.iter().filter(|(k, _)| text.contains(&format!("{k} = "))).map(|(k, v)| format!("{k}={v}")).collect()
}
