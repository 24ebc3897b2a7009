//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use tnc_compiler::frontend::{self, Input, Request};
use tnc_compiler::ir::Graph;
use tnc_grammar::{Diagnostic, SourceMap};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every model file under `models/` (not the standard library), sorted.
pub fn model_files() -> Vec<PathBuf> {
    let mut out = Vec::new();
    for dir in ["models", "models/ablations"] {
        for e in std::fs::read_dir(repo().join(dir)).expect("models/ exists") {
            let p = e.expect("readable").path();
            if p.extension().is_some_and(|x| x == "tn") && p.file_name().is_some_and(|n| n != "std.tn") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The tiny configuration used by snapshot and numerical tests.
pub fn tiny_sets(path: &Path) -> Vec<String> {
    tiny_sets_of(&std::fs::read_to_string(path).expect("model readable"))
}

/// The tiny configuration of a model (its source `text`): small sizes for each of the
/// usual hyper-parameters the model declares (`NAME = ` in its header).
pub fn tiny_sets_of(text: &str) -> Vec<String> {
    const TINY: [(&str, u32); 7] =
        [("vocab", 32), ("dim", 16), ("heads", 2), ("layers", 2), ("glu_dim", 24), ("ffn_dim", 24), ("block", 4)];
    TINY.iter().filter(|(k, _)| text.contains(&format!("{k} = "))).map(|(k, v)| format!("{k}={v}")).collect()
}

pub fn elaborate_path(path: &Path, sets: &[String]) -> (SourceMap, Result<Graph, Diagnostic>) {
    frontend::elaborate(Input::Path(path), &Request { sets, model: None })
}

pub fn elaborate_text(name: &str, text: &str, sets: &[String]) -> (SourceMap, Result<Graph, Diagnostic>) {
    frontend::elaborate(Input::Text { name, text }, &Request { sets, model: None })
}

/// Render an elaboration failure; panics (failing the test) if elaboration succeeded.
pub fn expect_error(result: (SourceMap, Result<Graph, Diagnostic>)) -> String {
    match result {
        (sources, Err(d)) => d.render(&sources),
        (_, Ok(g)) => panic!("expected a diagnostic, but `{}` elaborated", g.name),
    }
}

/// Paths in rendered diagnostics are made relative to the repository.
pub fn relative(s: &str) -> String {
    s.replace(&format!("{}/", repo().display()), "")
}

/// Initial parameters plus deterministic noise on every tensor, so that zero-initialized
/// biases are exercised too.
pub fn perturbed_params(g: &Graph, seed: u64) -> Vec<tnc_compiler::interp::Tensor> {
    let mut params = tnc_compiler::interp::init_params(g, seed).expect("init");
    for (p, t) in g.params.iter().zip(params.iter_mut()) {
        let stream = tnc_runtime::rng::stable_hash(&p.name);
        for (i, v) in t.data.iter_mut().enumerate() {
            *v += 0.1 * tnc_runtime::rng::normal(seed ^ 0x5eed, stream, i as u64, 1);
        }
    }
    params
}

/// `tensors` with every value rounded to f32, so an f32 bundle and the f64 interpreter
/// start from the same parameters.
pub fn rounded_to_f32(mut tensors: Vec<tnc_compiler::interp::Tensor>) -> Vec<tnc_compiler::interp::Tensor> {
    for t in &mut tensors {
        t.data.iter_mut().for_each(|v| *v = (*v as f32) as f64);
    }
    tensors
}

/// Token ids `[b, n]` below `vocab`, deterministic.
pub fn token_tensor(b: usize, n: usize, vocab: usize, salt: u64) -> tnc_compiler::interp::Tensor {
    let data = (0..b * n).map(|i| (tnc_runtime::rng::uniform(salt, 7, i as u64, 0) * vocab as f64).floor()).collect();
    tnc_compiler::interp::Tensor::new(vec![b, n], data).expect("shape")
}
