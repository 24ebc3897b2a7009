//! `recognize` turns the language-model loss into the fused cross-entropy op: on every
//! model exactly one `cross_entropy` forward and its two backward ops after `autodiff`,
//! and no value anywhere in the forward+backward graph shaped like the `[B, N, V]` logits
//! (so the embedding's gather backward is a `scatter_add`, not a one-hot contraction).
//! Loss and every gradient match the unoptimized graph (f64, relative L2 ≤ 1e-10) with
//! the fused ops evaluated naively and by vocabulary chunks of 1, 7, V and more than V
//! (gradients that are zero in exact arithmetic: every entry within 1e-14 instead).
//! Untied projections and the spelling without the max shift are recognized too;
//! look-alikes (label smoothing, logits through a ReLU, a wrong fill value) are not, and
//! still compute the same numbers.

mod common;
use common::*;
use std::collections::HashMap;
use tnc_compiler::interp::{compare, evaluate, EvalOptions, Tensor};
use tnc_compiler::ir::{Graph, Op};
use tnc_compiler::passes;

const TOL: f64 = 1e-10;
/// A gradient whose reference has an L2 norm below `ZERO` is zero in exact arithmetic (the
/// key bias of softmax attention: softmax ignores a shift shared by a row); its values are
/// roundoff, so a relative error means nothing and every entry must be within `ZERO_ABS`.
const ZERO: f64 = 1e-12;
const ZERO_ABS: f64 = 1e-14;

fn count(g: &Graph, f: impl Fn(&Op) -> bool) -> usize {
    g.dag.node_weights().filter(|n| f(&n.op)).count()
}

/// Values whose shape holds the vocabulary size next to a size that depends on `N`.
fn logits_like(g: &Graph, vocab: i64) -> Vec<String> {
    g.dag
        .node_weights()
        .filter(|n| {
            let shape = &n.ty.shape;
            shape.iter().any(|d| d.as_const() == Some(vocab))
                && shape.iter().any(|d| d.symbols().iter().any(|s| s == "N"))
        })
        .map(|n| format!("{} : {}", n.op.kind(), n.ty))
        .collect()
}

fn run(g: &Graph, params: &[Tensor], tokens: &Tensor, chunk: Option<usize>) -> HashMap<String, Tensor> {
    let inputs = HashMap::from([("tokens".to_string(), tokens.clone())]);
    let opts = EvalOptions { chunk, ..EvalOptions::default() };
    let e = evaluate(g, &inputs, params, &opts).unwrap_or_else(|e| panic!("{}: {e}", g.name));
    e.outputs(g).into_iter().collect()
}

/// The unoptimized reference (elaborate → autodiff) and the optimized graph (up to
/// `autodiff`) agree on the loss and every gradient, naive and chunked. Returns the
/// largest relative L2 error seen.
fn check_numerics(tag: &str, g: &Graph, vocab: usize) -> f64 {
    let reference = passes::differentiate_loss(g.clone()).unwrap();
    let optimized = passes::run_until(g.clone(), "autodiff").unwrap().unwrap();
    let params = perturbed_params(&reference, 11);
    let mut worst = 0.0f64;
    for n in [5usize, 13] {
        let tokens = token_tensor(2, n, vocab, n as u64);
        let want = run(&reference, &params, &tokens, None);
        for chunk in [None, Some(1), Some(7), Some(vocab), Some(vocab + 9)] {
            let got = run(&optimized, &params, &tokens, chunk);
            assert_eq!(got.len(), want.len(), "{tag}");
            for (name, w) in &want {
                let c = compare(&got[name], w);
                let norm = w.data.iter().map(|v| v * v).sum::<f64>().sqrt();
                if norm < ZERO {
                    // Zero in exact arithmetic (softmax attention's key bias): only roundoff.
                    assert!(!c.has_nan && c.max_abs <= ZERO_ABS, "{tag} N={n} chunk={chunk:?} `{name}`: {c}");
                    continue;
                }
                assert!(c.within(TOL), "{tag} N={n} chunk={chunk:?} `{name}`: {c}");
                worst = worst.max(c.rel_l2);
            }
        }
    }
    worst
}

fn vocab_of(g: &Graph) -> i64 {
    g.params.iter().find(|p| p.name == "embedding").unwrap().ty.shape[0].as_const().unwrap()
}

#[test]
fn every_model_gets_one_fused_cross_entropy_and_no_logits() {
    for path in model_files() {
        let (sources, g) = elaborate_path(&path, &tiny_sets(&path));
        let g = g.unwrap_or_else(|d| panic!("{}", d.render(&sources)));
        let vocab = vocab_of(&g);
        let tag = path.file_stem().unwrap().to_string_lossy().into_owned();
        let elaborated_logits = logits_like(&g, vocab);
        assert!(!elaborated_logits.is_empty(), "{tag}: the elaborated loss has [B, N, V] logits");

        let optimized = passes::run_until(g.clone(), "autodiff").unwrap().unwrap();
        assert_eq!(count(&optimized, |o| matches!(o, Op::CrossEntropy(_))), 1, "{tag}");
        assert!(count(&optimized, |o| matches!(o, Op::CrossEntropyGradX(_))) >= 1, "{tag}");
        assert!(count(&optimized, |o| matches!(o, Op::CrossEntropyGradTable(_))) >= 1, "{tag}");
        assert!(count(&optimized, |o| matches!(o, Op::ScatterAdd { .. })) >= 1, "{tag}: the embedding's backward");
        let left = logits_like(&optimized, vocab);
        assert!(left.is_empty(), "{tag}: values shaped like the logits remain: {left:#?}");
        let worst = check_numerics(&tag, &g, vocab as usize);
        eprintln!("{tag}: loss and gradients within rel. L2 {worst:.2e} of the unoptimized graph");
    }
}

/// A small language model around the loss function `loss_fn`, with a tied table
/// `embedding [vocab, dim]` and an untied `w_out [dim, vocab]`.
fn model(functions: &str, loss: &str) -> Graph {
    let text = format!(
        "use std\n{functions}\nmodel m(vocab = 11, dim = 6) {{\n  input tokens: i32[B, N]\n  \
         param embedding: [vocab, dim] ~ normal(0.5)\n  param w_out: [dim, vocab] ~ normal(0.5)\n  \
         x = srms_norm(embed(tokens, embedding))\n  h = x[:, :-1]\n  y = tokens[:, 1:]\n  \
         output loss = {loss}\n}}\n"
    );
    let (sources, g) = elaborate_text("ce.tn", &text, &[]);
    g.unwrap_or_else(|d| panic!("{}\n{text}", d.render(&sources)))
}

const NO_SHIFT: &str = "fn ce_no_shift(logits, targets) {
  lse = log(sum(exp(logits), -1))
  picked = sum(where(unsqueeze(targets, -1) == iota(size(logits, -1)), logits, 0.0), -1)
  mean(lse - picked)
}";

const SMOOTHED: &str = "fn ce_smoothed(logits, targets, eps = 0.1) {
  top = max(logits, -1)
  lse = log(sum(exp(logits - top), -1)) + top
  q = where(iota(size(logits, -1)) == unsqueeze(targets, -1), 1.0 - eps + eps / 11.0, eps / 11.0)
  mean(lse - sum(q * logits, -1))
}";

const WRONG_FILL: &str = "fn ce_fill_one(logits, targets) {
  top = max(logits, -1)
  lse = log(sum(exp(logits - top), -1)) + top
  mean(lse - sum(where(iota(size(logits, -1)) == unsqueeze(targets, -1), logits, 1.0), -1))
}";

#[test]
fn spellings_are_recognized_and_look_alikes_are_not() {
    let cases: &[(&str, &str, &str, bool)] = &[
        ("tied", "", "lm_loss(x, embedding, tokens)", true),
        ("untied x @ W", "", "cross_entropy(h @ w_out, y)", true),
        ("einsum with other letters", "", "cross_entropy(einsum(\"tsk,wk->tsw\", h, embedding), y)", true),
        ("table first, transposed", "", "cross_entropy(einsum(\"kw,tsk->tsw\", w_out, h), y)", true),
        ("no max shift", NO_SHIFT, "ce_no_shift(h @ w_out, y)", true),
        ("label smoothing", SMOOTHED, "ce_smoothed(tied_logits(h, embedding), y)", false),
        ("relu(logits)", "", "cross_entropy(relu(tied_logits(h, embedding)), y)", false),
        ("fill value 1", WRONG_FILL, "ce_fill_one(tied_logits(h, embedding), y)", false),
    ];
    for &(tag, functions, loss, fused) in cases {
        let g = model(functions, loss);
        let optimized = passes::run_until(g.clone(), "autodiff").unwrap().unwrap();
        let n = count(&optimized, |o| matches!(o, Op::CrossEntropy(_)));
        assert_eq!(n, usize::from(fused), "{tag}: cross_entropy ops");
        let grads = count(&optimized, |o| matches!(o, Op::CrossEntropyGradX(_) | Op::CrossEntropyGradTable(_)));
        if fused {
            assert_eq!(grads, 2, "{tag}: backward ops");
            assert!(logits_like(&optimized, 11).is_empty(), "{tag}: {:#?}", logits_like(&optimized, 11));
        } else {
            assert_eq!(grads, 0, "{tag}");
        }
        let worst = check_numerics(tag, &g, 11);
        eprintln!("{tag}: fused = {fused}, within rel. L2 {worst:.2e}");
    }
}
