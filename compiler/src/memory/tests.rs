use super::*;
use crate::frontend::{self, Input, Request};
use crate::fusion::{fuse, unfused};
use crate::ir::{DType, TensorType, UnaryOp};
use crate::passes;
use std::path::PathBuf;

fn optimized(name: &str, sets: &[&str]) -> Graph {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models").join(name);
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    let (sources, g) = frontend::elaborate(Input::Path(&path), &Request { sets: &sets, model: None });
    let g = g.unwrap_or_else(|d| panic!("{}", d.render(&sources)));
    let last = passes::pipeline().last().expect("a pipeline").name();
    passes::run_until(g, last).expect("a pass").unwrap_or_else(|d| panic!("{}", d.render(&sources)))
}

fn report(g: &Graph) -> (MemoryPlan, MemoryReport) {
    let plan = fuse(g).unwrap();
    let mem = plan_memory(g, &plan).unwrap();
    let r = mem.report();
    (mem, r)
}

/// T1 at vocab 4096, B = 1: memory is linear in N.
#[test]
fn t1_memory_is_linear_in_n() {
    let g = optimized("transnormer_t1.tn", &["vocab=4096"]);
    let (mem, r) = report(&g);
    let a = r.eval(1, 8192).unwrap();
    let b = r.eval(1, 16384).unwrap();
    eprintln!("{}", r.to_text(1, 8192));
    eprintln!("{}", r.to_text(1, 16384));
    eprintln!("live peak: {:?} / {:?}", mem.live_peak(1, 8192), mem.live_peak(1, 16384));
    assert!((b.peak as f64) <= 2.1 * a.peak as f64, "{} vs {}", b.peak, a.peak);
    let ratio = b.activation_bytes_per_token / a.activation_bytes_per_token;
    assert!((ratio - 1.0).abs() < 0.05, "{} vs {}", a.activation_bytes_per_token, b.activation_bytes_per_token);
    assert_eq!(r.growth_in_n(), "grows linearly with N");
    // Parameters: every param and buffer once.
    let params: i64 = g.params.iter().map(|p| eval(&value_bytes(&g, p.node).unwrap(), 1, 1).unwrap()).sum();
    assert_eq!(a.parameters, params);
    assert!(mem.live_peak(1, 8192).unwrap() <= a.peak);
}

/// Softmax attention as written (before `recognize` fuses it into `block_attention`)
/// materializes its `[B, H, N, N]` scores.
#[test]
fn transformer_memory_grows_quadratically() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/transformer.tn");
    let sets: Vec<String> =
        ["vocab=32", "dim=16", "heads=2", "layers=2", "glu_dim=24"].iter().map(|s| s.to_string()).collect();
    let (_, g) = frontend::elaborate(Input::Path(&path), &Request { sets: &sets, model: None });
    let g = passes::differentiate_loss(g.unwrap()).unwrap();
    let (_, r) = report(&g);
    assert_eq!(r.peak().degree_in("N"), 2, "{}", r.peak());
    assert!(r.to_text(1, 2048).contains("grows quadratically with N"), "{}", r.to_text(1, 2048));
}

/// x → exp → neg → exp → … as one kernel per op: a few buffers serve every value.
#[test]
fn a_chain_of_kernels_reuses_buffers() {
    let mut g = Graph::new("chain");
    let ty = TensorType::new(DType::F32, vec![Dim::sym("B"), Dim::sym("N"), Dim::constant(4)]);
    let mut x = g.add_input("x", ty, None);
    for i in 0..6 {
        let u = if i % 2 == 0 { UnaryOp::Exp } else { UnaryOp::Neg };
        x = g.add(Op::Unary(u), &[x], None).unwrap();
    }
    g.add_output("y", x);
    let plan = unfused(&g).unwrap();
    assert_eq!(plan.kernels(), 6);
    let mem = plan_memory(&g, &plan).unwrap();
    let activations = mem.values.iter().filter(|v| v.class == MemClass::Activation).count();
    let buffers = mem.buffers.iter().filter(|b| b.class == MemClass::Activation).count();
    assert_eq!(activations, 7, "the input and six kernel outputs");
    // The input and two ping-pong buffers (the output takes one of them).
    assert!(buffers < activations, "{buffers} buffers for {activations} values");
    assert_eq!(buffers, 3);
    // Fused, the chain is one kernel writing only its output.
    let fused = fuse(&g).unwrap();
    assert_eq!(fused.kernels(), 1);
    let mem = plan_memory(&g, &fused).unwrap();
    assert_eq!(mem.buffers.len(), 2);
    let r = mem.report();
    assert_eq!(r.activations.to_string(), "32*B*N");
    assert_eq!(r.eval(2, 10).unwrap().activation_bytes_per_token, 32.0);
}

#[test]
fn different_sizes_reuse_only_when_dominated() {
    let n = Dim::sym("N");
    let b = Dim::sym("B");
    let big = b.checked_mul(&n).unwrap().checked_scale(8).unwrap();
    let small = big.checked_sub(&b).unwrap();
    assert!(big.dominates(&small) && !small.dominates(&big));
}
