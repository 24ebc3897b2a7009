//! The generation program (`passes/next_token.rs`, `tnc compile --next-token`): the
//! logits of the token after the last position. Checked against the loss itself: for a
//! causal model, the cross-entropy of the last position's prediction is what the summed
//! loss gains from one more token, `B·N·loss(N+1 tokens) − B·(N−1)·loss(N tokens)`.

mod common;
use common::*;
use std::collections::HashMap;
use tnc_compiler::backend::{backend_for, CodeGen, Target};
use tnc_compiler::driver;
use tnc_compiler::interp::{evaluate, EvalOptions, Tensor};
use tnc_compiler::ir::Graph;
use tnc_compiler::passes::Policy;
use tnc_compiler::pipeline::{Pipeline, Program};

fn eval(g: &Graph, params: &[Tensor], tokens: &Tensor, output: &str) -> Tensor {
    let inputs = HashMap::from([("tokens".to_string(), tokens.clone())]);
    let e = evaluate(g, &inputs, params, &EvalOptions::default()).expect("evaluates");
    e.outputs(g).into_iter().find(|(n, _)| n == output).expect("the output").1
}

/// The first `n` positions of `[b, m]` tokens.
fn prefix(t: &Tensor, n: usize) -> Tensor {
    let (b, m) = (t.shape[0], t.shape[1]);
    let data = (0..b).flat_map(|i| t.data[i * m..i * m + n].to_vec()).collect();
    Tensor::new(vec![b, n], data).expect("shape")
}

/// `Σ_b lse(L_b) − L_b[y_b]` for logits `[b, 1, v]`.
fn summed_cross_entropy(logits: &Tensor, targets: &[f64]) -> f64 {
    let v = logits.shape[2];
    targets
        .iter()
        .enumerate()
        .map(|(b, &y)| {
            let row = &logits.data[b * v..(b + 1) * v];
            let top = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = top + row.iter().map(|x| (x - top).exp()).sum::<f64>().ln();
            lse - row[y as usize]
        })
        .sum()
}

/// The graph passes of a generation bundle.
fn next_token_graph(g: Graph) -> Graph {
    let backend = backend_for(&Target::parse("x86-64-v3").unwrap(), CodeGen::default()).unwrap();
    Pipeline::new(&*backend, false, Policy::F32)
        .program(Program::NextToken)
        .run_until(g, "dce")
        .expect("the passes run")
        .graph
}

#[test]
fn next_token_logits_agree_with_the_loss_for_every_model() {
    for path in model_files() {
        let (sources, g) = elaborate_path(&path, &tiny_sets(&path));
        let g = g.unwrap_or_else(|d| panic!("{}", d.render(&sources)));
        let generation = next_token_graph(g.clone());
        assert_eq!(generation.outputs.len(), 1, "{}", path.display());
        let params = perturbed_params(&g, 5);
        let vocab = g.params.iter().find(|p| p.name == "embedding").unwrap().ty.shape[0].as_const().unwrap();
        // N = 6 and 7: neither a multiple of DiagAttention's tiny block (4).
        let (b, n) = (2, 6);
        let tokens = token_tensor(b, n + 1, vocab as usize, 17);
        let logits = eval(&generation, &params, &prefix(&tokens, n), "logits");
        assert_eq!(logits.shape, vec![b, 1, vocab as usize], "{}", path.display());
        let targets: Vec<f64> = (0..b).map(|i| tokens.data[i * (n + 1) + n]).collect();
        let (longer, shorter) =
            (eval(&g, &params, &tokens, "loss").data[0], eval(&g, &params, &prefix(&tokens, n), "loss").data[0]);
        let want = (b * n) as f64 * longer - (b * (n - 1)) as f64 * shorter;
        let got = summed_cross_entropy(&logits, &targets);
        assert!((got - want).abs() <= 1e-9 * want.abs(), "{}: {got} against {want}", path.display());
    }
}

#[test]
fn a_generation_bundle_matches_the_interpreter() {
    let path = repo().join("models/transnormer_t1.tn");
    let (sources, g) = elaborate_path(&path, &tiny_sets(&path));
    let g = g.unwrap_or_else(|d| panic!("{}", d.render(&sources)));
    let dir = std::env::temp_dir().join(format!("tnc-next-token-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    driver::compile(
        g.clone(),
        "native",
        &dir,
        driver::Options { program: Program::NextToken, ..Default::default() },
        Vec::new(),
    )
    .unwrap();
    let bundle = tnc_runtime::Bundle::load_cpu(&dir).unwrap();
    assert!(bundle.manifest.entry_points["backward"].is_empty());
    let mut exec = tnc_runtime::Executor::cpu(&bundle, 2).unwrap();
    let params = rounded_to_f32(perturbed_params(&g, 5));
    for (p, t) in g.params.iter().zip(&params) {
        exec.set_param(&p.name, &t.data.iter().map(|&x| x as f32).collect::<Vec<_>>()).unwrap();
    }
    let generation = next_token_graph(g);
    // One executor, prompts of several lengths (a block of 4 and not).
    for n in [3, 8, 11] {
        let tokens = token_tensor(2, n, 32, n as u64);
        let want = eval(&generation, &params, &tokens, "logits");
        let t = tnc_runtime::Tensor::i32(tokens.shape.clone(), tokens.data.iter().map(|&x| x as i32).collect());
        exec.forward(&[("tokens", &t)]).unwrap();
        let got = exec.output("logits").unwrap();
        let got: Vec<f64> = got.as_f32().unwrap().iter().map(|&x| x as f64).collect();
        let err = got.iter().zip(&want.data).map(|(a, b)| (a - b).powi(2)).sum::<f64>().sqrt();
        let norm = want.data.iter().map(|b| b * b).sum::<f64>().sqrt();
        assert!(err <= 1e-5 * norm, "N {n}: relative L2 {}", err / norm);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_model_without_a_language_model_loss_cannot_generate() {
    let (sources, g) = elaborate_text(
        "regression.tn",
        "model regression(dim = 4) {\n  input x: [B, N, 4]\n  param w: [4, 4] ~ xavier\n  output loss = mean((x @ w) ** 2)\n}\n",
        &[],
    );
    let g = g.unwrap_or_else(|d| panic!("{}", d.render(&sources)));
    let backend = backend_for(&Target::parse("x86-64-v3").unwrap(), CodeGen::default()).unwrap();
    let err = Pipeline::new(&*backend, false, Policy::F32)
        .program(Program::NextToken)
        .run_until(g, "dce")
        .err()
        .expect("refused");
    assert!(
        err.message.contains("cannot generate text") && err.message.contains("0 cross-entropies"),
        "{}",
        err.message
    );
    assert!(err.hint.as_deref().is_some_and(|h| h.contains("lm_loss")));
}
