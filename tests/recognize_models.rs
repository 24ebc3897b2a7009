//! `recognize` on every model: each NormAttention becomes one linear-attention op, its
//! backward at most three more; each DiagAttention (and each softmax attention of the
//! baseline) one block-attention op each way; and the optimized graph computes the same loss and
//! gradients as the unoptimized one (f64, within 1e-10), with the normal form evaluated
//! naively and by chunks of 1, 7 and ≥ N tokens.

mod common;
use common::*;
use std::collections::HashMap;
use tnc_compiler::interp::{compare, evaluate, EvalOptions, Tensor};
use tnc_compiler::ir::{Graph, Op};
use tnc_compiler::passes;

fn tiny(path: &std::path::Path) -> Graph {
    let (sources, g) = elaborate_path(path, &tiny_sets(path));
    g.unwrap_or_else(|d| panic!("{}", d.render(&sources)))
}

fn count_linear_attention(g: &Graph) -> usize {
    g.dag.node_weights().filter(|n| matches!(n.op, Op::LinearAttention(_))).count()
}

fn count_kind(g: &Graph, kind: &str) -> usize {
    g.dag.node_weights().filter(|n| n.op.kind() == kind).count()
}

/// Softmax/ReLU attentions (DiagAttention layers, or every layer of the baseline).
fn expected_block_attentions(path: &std::path::Path) -> usize {
    let name = path.file_stem().unwrap().to_string_lossy().into_owned();
    match name.as_str() {
        "transformer" => 2,
        "tnl" | "t1_all_norm" | "gla_simple" | "retnet" => 0,
        _ => 1,
    }
}

/// NormAttention layers in a model's tiny configuration (2 layers), by model.
fn expected_linear_attentions(path: &std::path::Path) -> usize {
    let name = path.file_stem().unwrap().to_string_lossy().into_owned();
    match name.as_str() {
        "transformer" => 0,
        "tnl" | "t1_all_norm" | "gla_simple" | "retnet" => 2,
        _ => 1, // T1, T2 and the other ablations: the second of two layers
    }
}

fn run(g: &Graph, params: &[Tensor], tokens: &Tensor, chunk: Option<usize>) -> HashMap<String, Tensor> {
    let inputs = HashMap::from([("tokens".to_string(), tokens.clone())]);
    let opts = EvalOptions { chunk, ..EvalOptions::default() };
    let e = evaluate(g, &inputs, params, &opts).unwrap_or_else(|e| panic!("{}: {e}", g.name));
    e.outputs(g).into_iter().collect()
}

#[test]
fn every_norm_attention_becomes_one_op_and_numerics_are_preserved() {
    for path in model_files() {
        let g = tiny(&path);
        let reference = passes::run_until(g.clone(), "elaborate").unwrap().unwrap();
        let reference = passes::differentiate_loss(reference).unwrap();
        let forward = passes::run_until(g.clone(), "recognize").unwrap().unwrap();
        let optimized = passes::run_until(g, "autodiff").unwrap().unwrap();
        let expected = expected_linear_attentions(&path);
        assert_eq!(count_linear_attention(&forward), expected, "{}: forward", path.display());
        let blocks = expected_block_attentions(&path);
        assert_eq!(count_kind(&forward, "block_attention"), blocks, "{}", path.display());
        assert_eq!(count_kind(&optimized, "block_attention"), blocks, "{}: one op forward", path.display());
        assert_eq!(count_kind(&optimized, "block_attention_grad"), blocks, "{}: one op backward", path.display());
        let total = count_linear_attention(&optimized);
        assert!(total <= 4 * expected && total >= 2 * expected, "{}: {total} in forward+backward", path.display());

        let params = perturbed_params(&reference, 11);
        let vocab = reference.params.iter().find(|p| p.name == "embedding").unwrap().ty.shape[0].as_const().unwrap();
        for n in [5usize, 13] {
            let tokens = token_tensor(2, n, vocab as usize, n as u64);
            let want = run(&reference, &params, &tokens, None);
            for chunk in [None, Some(1), Some(7), Some(64)] {
                let got = run(&optimized, &params, &tokens, chunk);
                assert_eq!(got.len(), want.len());
                for (name, w) in &want {
                    let c = compare(&got[name], w);
                    // Zero in exact arithmetic (softmax attention's key bias) is roundoff
                    // whose relative error means nothing: every entry within 1e-14.
                    if w.data.iter().map(|v| v * v).sum::<f64>().sqrt() < 1e-12 {
                        assert!(!c.has_nan && c.max_abs <= 1e-14, "{} N={n} `{name}`: {c:?}", path.display());
                        continue;
                    }
                    assert!(c.within(1e-10), "{} N={n} chunk={chunk:?} `{name}`: {c:?}", path.display());
                }
            }
        }
    }
}
