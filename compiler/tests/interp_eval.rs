//! The reference interpreter on whole graphs: hand-computed values, symbol binding and
//! its errors, f32 rounding, dropout, parameter initialization, safetensors round trips,
//! and evaluation speed on a graph of realistic size.

mod common;

use common::*;
use std::collections::HashMap;
use tnc_compiler::interp::*;
use tnc_compiler::ir::{
    BinaryOp, DType, Dim, EinsumSpec, F64Bits, Graph, Init, NodeId, Op, ParamInfo, TensorType, UnaryOp,
};

fn t(shape: &[usize], data: &[f64]) -> Tensor {
    Tensor::new(shape.to_vec(), data.to_vec()).unwrap()
}

fn run1(g: &Graph, y: NodeId, inputs: &[(&str, Tensor)]) -> Result<Tensor, String> {
    let vals = inputs.iter().map(|(n, v)| (n.to_string(), v.clone())).collect();
    Ok(evaluate(g, &vals, &[], &EvalOptions::default())?.get(y).unwrap().clone())
}

#[test]
fn einsum_attention_state_by_hand() {
    // S[d,e] = Σ_n k[n,d] v[n,e]; o[n,e] = Σ_d q[n,d] S[d,e].
    let mut g = Graph::new("attn");
    let ty = |s: &[&str]| TensorType::new(DType::F32, sym(s));
    let q = g.add_input("q", ty(&["N", "2"]), None);
    let k = g.add_input("k", ty(&["N", "2"]), None);
    let v = g.add_input("v", ty(&["N", "1"]), None);
    let spec = |a: &str, b: &str, o: &str| {
        Op::Einsum(EinsumSpec {
            inputs: vec![a.as_bytes().to_vec(), b.as_bytes().to_vec()],
            output: o.as_bytes().to_vec(),
            pinned: false,
        })
    };
    let s = g.add(spec("nd", "ne", "de"), &[k, v], None).unwrap();
    let o = g.add(spec("nd", "de", "ne"), &[q, s], None).unwrap();
    let out = run1(
        &g,
        o,
        &[("q", t(&[2, 2], &[1., 0., 0., 1.])), ("k", t(&[2, 2], &[1., 2., 3., 4.])), ("v", t(&[2, 1], &[10., 100.]))],
    )
    .unwrap();
    // S = [1·10 + 3·100, 2·10 + 4·100] = [310, 420]; q picks rows.
    assert_eq!(out, t(&[2, 1], &[310., 420.]));
}

#[test]
fn decayed_reverse_scan_by_hand() {
    let mut g = Graph::new("scan");
    let ty = TensorType::new(DType::F32, sym(&["N"]));
    let x = g.add_input("x", ty.clone(), None);
    let d = g.add_input("d", ty, None);
    let s = g.add(Op::Scan { axis: 0, reverse: true }, &[x, d], None).unwrap();
    let out = run1(&g, s, &[("x", t(&[3], &[1., 2., 3.])), ("d", t(&[3], &[0.5, 2., 7.]))]).unwrap();
    // s_2 = 3; s_1 = 2 + 2·3 = 8; s_0 = 1 + 0.5·8 = 5 (d_2 multiplies nothing).
    assert_eq!(out.data, vec![5., 8., 3.]);
}

#[test]
fn symbols_bind_from_inputs_and_mismatches_name_the_tensor() {
    let mut g = Graph::new("bind");
    let a = g.add_input("a", TensorType::new(DType::F32, sym(&["B", "N"])), None);
    let n2 = Dim::sym("N").checked_scale(2).unwrap();
    let b = g.add_input("b", TensorType::new(DType::F32, vec![n2]), None);
    let size = g.add(Op::SizeOf { size: Dim::sym("B"), dtype: DType::I32 }, &[], None).unwrap();
    let _ = (a, b);
    let ok = run1(&g, size, &[("a", Tensor::zeros(vec![3, 2])), ("b", Tensor::zeros(vec![4]))]);
    assert_eq!(ok.unwrap().data, vec![3.]);
    let err = run1(&g, size, &[("a", Tensor::zeros(vec![3, 2])), ("b", Tensor::zeros(vec![5]))]).unwrap_err();
    assert!(err.contains("`b`") && err.contains("[2*N]") && err.contains("[5]"), "{err}");
    let err = run1(&g, size, &[("a", Tensor::zeros(vec![3])), ("b", Tensor::zeros(vec![4]))]).unwrap_err();
    assert!(err.contains("`a`") && err.contains("[B, N]"), "{err}");
    let err = run1(&g, size, &[("a", Tensor::zeros(vec![3, 2]))]).unwrap_err();
    assert!(err.contains("missing input `b`"), "{err}");
}

#[test]
fn out_of_range_gather_is_an_error_not_a_panic() {
    let mut g = Graph::new("gather");
    let table = g.add_input("table", TensorType::new(DType::F32, dims(&[3, 2])), None);
    let idx = g.add_input("idx", TensorType::new(DType::I32, sym(&["N"])), None);
    let y = g.add(Op::Gather, &[table, idx], None).unwrap();
    let err = run1(&g, y, &[("table", Tensor::zeros(vec![3, 2])), ("idx", t(&[2], &[0., 3.]))]).unwrap_err();
    // An input index is refused before any op runs (`ir::index_bounds`).
    assert!(err.contains("input `idx` holds 3 at flat index 1, outside 0..3"), "{err}");
}

#[test]
fn f32_precision_rounds_after_every_op() {
    let mut g = Graph::new("round");
    let x = g.add_input("x", TensorType::new(DType::F32, dims(&[1])), None);
    let y = g.add(Op::Unary(UnaryOp::Exp), &[x], None).unwrap();
    let z = g.add(Op::Binary(BinaryOp::Mul), &[y, y], None).unwrap();
    let vals = HashMap::from([("x".to_string(), t(&[1], &[0.1]))]);
    let opts = EvalOptions { precision: Precision::F32, ..EvalOptions::default() };
    let ev = evaluate(&g, &vals, &[], &opts).unwrap();
    let e = (0.1f32 as f64).exp() as f32;
    assert_eq!(ev.get(z).unwrap().data[0], ((e as f64) * (e as f64)) as f32 as f64);
    let exact = evaluate(&g, &vals, &[], &EvalOptions::default()).unwrap();
    assert_eq!(exact.get(z).unwrap().data[0], 0.1f64.exp() * 0.1f64.exp());
}

#[test]
fn dropout_is_deterministic_scaled_and_identity_in_eval() {
    let mut g = Graph::new("drop");
    let x = g.add_input("x", TensorType::new(DType::F32, dims(&[1000])), None);
    let y = g.add(Op::Dropout { rate: F64Bits::new(0.25), salt: 5 }, &[x], None).unwrap();
    let vals = HashMap::from([("x".to_string(), Tensor::full(vec![1000], 1.0))]);
    let train = |seed, step| EvalOptions { dropout: Some((seed, step)), ..EvalOptions::default() };
    let a = evaluate(&g, &vals, &[], &train(1, 2)).unwrap().get(y).unwrap().clone();
    let b = evaluate(&g, &vals, &[], &train(1, 2)).unwrap().get(y).unwrap().clone();
    let c = evaluate(&g, &vals, &[], &train(1, 3)).unwrap().get(y).unwrap().clone();
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert!(a.data.iter().all(|&v| v == 0.0 || v == 1.0 / 0.75));
    let kept = a.data.iter().filter(|&&v| v != 0.0).count();
    assert!((650..850).contains(&kept), "kept {kept}");
    let eval = evaluate(&g, &vals, &[], &EvalOptions::default()).unwrap();
    assert_eq!(eval.get(y).unwrap(), &vals["x"]);
}

fn param(name: &str, shape: &[usize], init: Init, seed: Option<u64>) -> ParamInfo {
    ParamInfo {
        name: name.into(),
        ty: TensorType::new(DType::F32, dims(shape)),
        init,
        trainable: true,
        attrs: vec![],
        seed,
        span: None,
        node: NodeId::new(0),
    }
}

#[test]
fn initialization_is_deterministic_and_follows_each_init() {
    let mut theta = Graph::new("theta");
    let i = theta.add(Op::Iota { len: Dim::constant(4), dtype: DType::F32 }, &[], None).unwrap();
    let e = theta.add(Op::Unary(UnaryOp::Neg), &[i], None).unwrap();
    theta.add_output("theta", e);
    let mut g = Graph::new("init");
    for p in [
        param("w", &[300, 200], Init::Xavier { gain: 1.0 }, None),
        param("emb", &[100, 100], Init::Normal { mean: 0.5, std: 0.02 }, None),
        param("u", &[50], Init::Uniform { lo: -1.0, hi: 3.0 }, None),
        param("fixed", &[8], Init::Normal { mean: 0.0, std: 1.0 }, Some(99)),
        param("c", &[2, 2], Init::Constant(0.25), None),
        param("theta", &[4], Init::Computed(Box::new(theta)), None),
    ] {
        g.add_param(p);
    }
    let a = init_params(&g, 1).unwrap();
    assert_eq!(a, init_params(&g, 1).unwrap());
    let b = init_params(&g, 2).unwrap();
    assert_ne!(a[0], b[0]);
    // A parameter with its own seed ignores the run seed.
    assert_eq!(a[3], b[3]);

    let bound = (6.0f64 / 500.0).sqrt();
    assert!(a[0].data.iter().all(|v| v.abs() <= bound));
    let max = a[0].data.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    assert!(max > 0.99 * bound, "Xavier values should fill the range");

    let n = a[1].numel() as f64;
    let mean = a[1].data.iter().sum::<f64>() / n;
    let std = (a[1].data.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt();
    assert!((mean - 0.5).abs() < 0.001 && (std - 0.02).abs() < 0.001, "{mean} {std}");
    assert!(a[2].data.iter().all(|&v| (-1.0..3.0).contains(&v)));
    assert_eq!(a[4].data, vec![0.25; 4]);
    assert_eq!(a[5].data, vec![0., -1., -2., -3.]);

    // Rank-1 Xavier is an error naming the parameter.
    let mut bad = Graph::new("bad");
    bad.add_param(param("bias", &[3], Init::Xavier { gain: 1.0 }, None));
    let err = init_params(&bad, 0).unwrap_err();
    assert!(err.contains("bias"), "{err}");
}

#[test]
fn safetensors_round_trip() {
    let dir = std::env::temp_dir().join(format!("tnc-st-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let a = normal("st a", &[3, 4]);
    let b = t(&[], &[2.5]);
    let ids = t(&[2, 2], &[0., 7., -3., 100000.]);
    let p64 = dir.join("x64.safetensors");
    write_safetensors(&p64, &[("a".into(), &a), ("b".into(), &b)], FileDType::F64).unwrap();
    let back: HashMap<String, Tensor> = read_safetensors(&p64).unwrap().into_iter().collect();
    assert_eq!(back["a"], a);
    assert_eq!(back["b"], b);

    let p32 = dir.join("x32.safetensors");
    write_safetensors(&p32, &[("a".into(), &a)], FileDType::F32).unwrap();
    let back = read_safetensors(&p32).unwrap();
    let rounded = Tensor::new(a.shape.clone(), a.data.iter().map(|&v| v as f32 as f64).collect());
    assert_eq!(back[0].1, rounded.unwrap());
    assert!(compare(&back[0].1, &a).within(1e-7));

    let pi = dir.join("ids.safetensors");
    write_safetensors(&pi, &[("ids".into(), &ids)], FileDType::I32).unwrap();
    assert_eq!(read_safetensors(&pi).unwrap()[0].1, ids);
    let err = write_safetensors(&pi, &[("frac".into(), &a)], FileDType::I32).unwrap_err();
    assert!(err.contains("frac") && err.contains("ids.safetensors"), "{err}");

    let missing = dir.join("missing.safetensors");
    assert!(read_safetensors(&missing).unwrap_err().contains("missing.safetensors"));
    std::fs::write(dir.join("junk.safetensors"), b"not a safetensors file").unwrap();
    assert!(read_safetensors(&dir.join("junk.safetensors")).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A residual stack of `blocks` blocks of 10 ops on `[N, 64]` tensors, a matmul each, with
/// its result as output `y`.
fn residual_stack(blocks: usize) -> Graph {
    let mut g = Graph::new("stack");
    let x0 = g.add_input("x", TensorType::new(DType::F32, sym(&["N", "64"])), None);
    let w = g.add_input("w", TensorType::new(DType::F32, dims(&[64, 64])), None);
    let mm =
        Op::Einsum(EinsumSpec { inputs: vec![b"nd".to_vec(), b"de".to_vec()], output: b"ne".to_vec(), pinned: false });
    let mut x = x0;
    for _ in 0..blocks {
        let h = g.add(mm.clone(), &[x, w], None).unwrap();
        let h = g.add(Op::Unary(UnaryOp::Tanh), &[h], None).unwrap();
        let s = g.add(Op::Unary(UnaryOp::Sigmoid), &[h], None).unwrap();
        let h = g.add(Op::Binary(BinaryOp::Mul), &[h, s], None).unwrap();
        let m = g.add(Op::Reduce { op: tnc_compiler::ir::ReduceOp::Max, axes: vec![1] }, &[h], None).unwrap();
        let m = g.add(Op::Reshape { shape: sym(&["N", "1"]) }, &[m], None).unwrap();
        let m = g.add(Op::Broadcast { shape: sym(&["N", "64"]) }, &[m], None).unwrap();
        let h = g.add(Op::Binary(BinaryOp::Sub), &[h, m], None).unwrap();
        let h = g.add(Op::Scan { axis: 0, reverse: false }, &[h], None).unwrap();
        x = g.add(Op::Binary(BinaryOp::Add), &[x, h], None).unwrap();
    }
    g.add_output("y", x);
    g
}

/// A 2,000-node graph evaluates (no recursion that overflows the stack, no work that grows
/// faster than the graph: it used to be timed here, and timings belong in benchmarks) and
/// gives exactly what 200 evaluations of one of its blocks give, each fed the last's output.
#[test]
fn two_thousand_node_graph_equals_its_blocks_one_by_one() {
    let (big, block) = (residual_stack(200), residual_stack(1));
    assert!(big.len() >= 2000);
    let w = normal("big w", &[64, 64]);
    let run = |g: &Graph, x: Tensor| {
        let vals = HashMap::from([("x".to_string(), x), ("w".to_string(), w.clone())]);
        let e = evaluate(g, &vals, &[], &EvalOptions::default()).unwrap();
        e.outputs(g).into_iter().find(|(n, _)| n == "y").unwrap().1
    };
    let x = normal("big x", &[64, 64]);
    let whole = run(&big, x.clone());
    let stepped = (0..200).fold(x.clone(), |x, _| run(&block, x));
    assert_eq!(whole.shape, vec![64, 64]);
    assert!(whole.data.iter().all(|v| v.is_finite()));
    assert_ne!(whole.data, x.data);
    assert_eq!(whole.data, stepped.data, "the stack differs from its blocks applied one by one");
}

#[test]
fn unused_constant_and_iota_values() {
    let mut g = Graph::new("c");
    let c = g.add(Op::Constant { value: F64Bits::new(-0.0), dtype: DType::F32 }, &[], None).unwrap();
    let one = g.add(Op::Constant { value: F64Bits::new(1.0), dtype: DType::F32 }, &[], None).unwrap();
    let r = g.add(Op::Binary(BinaryOp::Div), &[one, c], None).unwrap();
    assert_eq!(run1(&g, r, &[]).unwrap().data, vec![f64::NEG_INFINITY]);
    let cmp = g.add(Op::Binary(BinaryOp::Lt), &[c, one], None).unwrap();
    assert_eq!(run1(&g, cmp, &[]).unwrap().data, vec![1.0]);
}
