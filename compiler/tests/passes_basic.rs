//! The graph-cleanup passes on every model: canonicalize → autodiff → simplify → cse →
//! dce computes the same loss and every gradient as the unoptimized graph (elaborate →
//! autodiff) in f64 within 1e-10 relative L2, the graph stays valid after each pass, and
//! it gets smaller. Also: the whole pipeline (with `recognize`) through `dce`, and
//! snapshots of the tiny TNL model after `canonicalize` and after `dce`.

mod common;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tnc_bundle::rng;
use tnc_compiler::frontend::{elaborate, Input, Request};
use tnc_compiler::interp::{compare, evaluate, init_params, EvalOptions, Tensor};
use tnc_compiler::ir::print::to_text;
use tnc_compiler::ir::verify::verify;
use tnc_compiler::ir::Graph;
use tnc_compiler::passes::{self, Autodiff, Canonicalize, Cse, Dce, Pass, Simplify};

const BATCH: usize = 2;
const LENGTHS: [usize; 2] = [7, 13];
const TOL: f64 = 1e-10;

fn models() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models")
}

fn model_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    for dir in [models(), models().join("ablations")] {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "tn") && p.file_name().is_some_and(|n| n != "std.tn") {
                files.push(p);
            }
        }
    }
    files.sort();
    files
}

fn tiny_sets(path: &Path) -> Vec<String> {
    common::tiny_sets_of(&std::fs::read_to_string(path).expect("model readable"))
}

fn elaborate_with(path: &Path, sets: &[String]) -> Graph {
    let (sources, g) = elaborate(Input::Path(path), &Request { sets, model: None });
    g.unwrap_or_else(|d| panic!("{}", d.render(&sources)))
}

/// Run passes in order, verifying the graph after each.
fn run_passes(mut g: Graph, passes: &[&dyn Pass]) -> Graph {
    for p in passes {
        g = p.run(g).unwrap_or_else(|d| panic!("pass `{}`: {}", p.name(), d.message));
        verify(&g).unwrap_or_else(|e| panic!("after `{}`: {e}", p.name()));
    }
    g
}

fn optimize(g: Graph) -> Graph {
    run_passes(g, &[&Canonicalize, &Autodiff, &Simplify, &Cse, &Dce])
}

/// Initial values plus noise, so zero-initialized biases are not zero.
fn perturbed_params(g: &Graph) -> Vec<Tensor> {
    let mut ps = init_params(g, 3).unwrap();
    for (info, t) in g.params.iter().zip(&mut ps) {
        let stream = rng::stable_hash(&format!("passes_basic/{}", info.name));
        for (i, x) in t.data.iter_mut().enumerate() {
            *x += 0.1 * rng::normal(17, stream, i as u64, 0);
        }
    }
    ps
}

fn tokens(n: usize, vocab: usize) -> Tensor {
    let data = (0..BATCH * n).map(|i| (rng::uniform(n as u64, 29, i as u64, 0) * vocab as f64).floor()).collect();
    Tensor::new(vec![BATCH, n], data).unwrap()
}

fn outputs(g: &Graph, params: &[Tensor], tokens: &Tensor) -> HashMap<String, Tensor> {
    let inputs = HashMap::from([("tokens".to_string(), tokens.clone())]);
    let ev = evaluate(g, &inputs, params, &EvalOptions::default()).unwrap_or_else(|e| panic!("{}: {e}", g.name));
    ev.outputs(g).into_iter().collect()
}

fn assert_same_outputs(tag: &str, reference: &Graph, optimized: &Graph) {
    let params = perturbed_params(reference);
    let vocab = reference.params.iter().find(|p| p.name == "embedding").unwrap().ty.shape[0].as_const().unwrap();
    for n in LENGTHS {
        let t = tokens(n, vocab as usize);
        let want = outputs(reference, &params, &t);
        let got = outputs(optimized, &params, &t);
        assert_eq!(got.len(), want.len(), "{tag}: outputs");
        assert!(want.contains_key("loss") && want.len() > 1, "{tag}: a loss and gradients");
        for (name, w) in &want {
            let c = compare(&got[name], w);
            // Zero in exact arithmetic (softmax attention's key bias) is roundoff whose
            // relative error means nothing (fused cross-entropy rounds differently).
            if w.data.iter().map(|v| v * v).sum::<f64>().sqrt() < 1e-12 {
                assert!(!c.has_nan && c.max_abs <= 1e-14, "{tag} N={n} `{name}`: {c}");
                continue;
            }
            assert!(c.within(TOL), "{tag} N={n} `{name}`: {c}");
        }
    }
}

#[test]
fn every_model_keeps_loss_and_gradients_and_shrinks() {
    let files = model_files();
    assert!(files.len() >= 8, "{} model files", files.len());
    for path in files {
        let tag = path.file_stem().unwrap().to_string_lossy().into_owned();
        let g = elaborate_with(&path, &tiny_sets(&path));
        let reference = run_passes(g.clone(), &[&Autodiff]);
        let optimized = optimize(g);
        assert!(
            optimized.len() < reference.len(),
            "{tag}: {} nodes optimized, {} unoptimized",
            optimized.len(),
            reference.len()
        );
        assert_eq!(optimized.params.len(), reference.params.len());
        assert_same_outputs(&tag, &reference, &optimized);
    }
}

/// The pipeline as registered (with `recognize`) through `dce`: still the same values.
#[test]
fn full_pipeline_through_dce_keeps_values() {
    for path in model_files() {
        let tag = path.file_stem().unwrap().to_string_lossy().into_owned();
        let g = elaborate_with(&path, &tiny_sets(&path));
        let reference = run_passes(g.clone(), &[&Autodiff]);
        let optimized = passes::run_until(g, "dce").unwrap().unwrap_or_else(|d| panic!("{tag}: {}", d.message));
        verify(&optimized).unwrap();
        assert!(optimized.len() < reference.len(), "{tag}");
        assert_same_outputs(&tag, &reference, &optimized);
    }
}

/// Node counts before (elaborate → autodiff) and after dce for tiny T1; printed by
/// `cargo test -p tnc-compiler --test passes_basic -- --nocapture t1_node_counts`.
#[test]
fn t1_node_counts() {
    let path = models().join("transnormer_t1.tn");
    let g = elaborate_with(&path, &tiny_sets(&path));
    let forward = g.len();
    let reference = run_passes(g.clone(), &[&Autodiff]);
    let canonical = run_passes(g.clone(), &[&Canonicalize]);
    let optimized = optimize(g.clone());
    let full = passes::run_until(g, "dce").unwrap().unwrap();
    println!(
        "transnormer_t1 tiny: forward {forward} → canonicalize {}; elaborate+autodiff {} → dce {} \
         (full pipeline with recognize: {})",
        canonical.len(),
        reference.len(),
        optimized.len(),
        full.len()
    );
    assert!(canonical.len() < forward);
    assert!(optimized.len() < reference.len());
}

fn tnl_tiny() -> Graph {
    let sets: Vec<String> = ["vocab=8", "dim=4", "heads=2", "layers=1", "glu_dim=6"].map(String::from).to_vec();
    elaborate_with(&models().join("tnl.tn"), &sets)
}

#[test]
fn snapshot_tnl_after_canonicalize() {
    let g = run_passes(tnl_tiny(), &[&Canonicalize]);
    insta::assert_snapshot!(to_text(&g));
}

#[test]
fn snapshot_tnl_after_dce() {
    let g = optimize(tnl_tiny());
    insta::assert_snapshot!(to_text(&g));
}
