//! End to end: every model in `models/` at a tiny size is differentiated, the graph
//! stays valid, and sampled parameter gradients match central differences in f64.

mod common;

use common::*;
use std::collections::HashMap;
use std::path::PathBuf;
use tnc_compiler::autodiff::{differentiate, grad_name, GradOptions};
use tnc_compiler::frontend::{elaborate, Input, Request};
use tnc_compiler::interp::{compare, evaluate, init_params, EvalOptions, Tensor};
use tnc_compiler::ir::verify::verify;
use tnc_compiler::ir::DType;
use tnc_runtime::rng;

const VOCAB: usize = 32;

fn model_files() -> Vec<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models");
    let mut files = Vec::new();
    for dir in [root.clone(), root.join("ablations")] {
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

fn tiny_sets(text: &str) -> Vec<String> {
    let mut sets = vec!["vocab=32", "dim=16", "heads=2", "layers=2", "glu_dim=24"];
    if text.contains("block = ") {
        sets.push("block=4");
    }
    sets.into_iter().map(String::from).collect()
}

#[test]
fn every_model_has_correct_parameter_gradients() {
    let files = model_files();
    assert!(files.len() >= 5, "models: {files:?}");
    for path in files {
        let tag = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&path).unwrap();
        let sets = tiny_sets(&text);
        let (_, g0) = elaborate(Input::Path(&path), &Request { sets: &sets, model: None });
        let g0 = g0.unwrap_or_else(|d| panic!("{tag}: {}", d.message));
        let (_, loss) = g0.outputs.iter().find(|(n, _)| n == "loss").cloned().expect("a loss output");
        let mut g = g0.clone();
        differentiate(&mut g, loss, &GradOptions::default()).unwrap_or_else(|e| panic!("{tag}: {e}"));
        verify(&g).unwrap_or_else(|e| panic!("{tag}: {e}"));

        // B = 2, N = 7 (not a multiple of any block), inputs by dtype.
        let mut inputs = HashMap::new();
        for inp in &g0.inputs {
            let shape: Vec<usize> = inp
                .ty
                .shape
                .iter()
                .map(|d| d.eval(&|s| if s == "B" { Some(2) } else { Some(7) }).unwrap() as usize)
                .collect();
            let v = match inp.ty.dtype {
                DType::I32 => ints(&format!("{tag}/{}", inp.name), &shape, VOCAB),
                _ => normal(&format!("{tag}/{}", inp.name), &shape),
            };
            inputs.insert(inp.name.clone(), v);
        }
        let params = init_params(&g0, 5).unwrap();
        let opts = EvalOptions::default();
        let ev = evaluate(&g, &inputs, &params, &opts).unwrap_or_else(|e| panic!("{tag}: {e}"));
        let loss_at = |ps: &[Tensor]| evaluate(&g0, &inputs, ps, &opts).unwrap().output(&g0, "loss").unwrap().data[0];
        assert!(loss_at(&params).is_finite(), "{tag}: loss is not finite");

        // Three sampled elements of every trainable parameter, checked together.
        let (mut ad, mut fd) = (Vec::new(), Vec::new());
        let mut ps = params.clone();
        for (i, p) in g0.params.iter().enumerate().filter(|(_, p)| p.trainable) {
            let grad = ev.output(&g, &grad_name(&p.name)).unwrap();
            assert_eq!(grad.shape, params[i].shape, "{tag}: {}", p.name);
            for s in 0..3u64 {
                let k = (rng::uniform(9, rng::stable_hash(&p.name), s, 0) * params[i].numel() as f64) as usize;
                let v = params[i].data[k];
                let h = 1e-6 * v.abs().max(1.0);
                ps[i].data[k] = v + h;
                let up = loss_at(&ps);
                ps[i].data[k] = v - h;
                let down = loss_at(&ps);
                ps[i].data[k] = v;
                fd.push((up - down) / (2.0 * h));
                ad.push(grad.data[k]);
            }
        }
        let n = ad.len();
        let c = compare(&Tensor::new(vec![n], ad).unwrap(), &Tensor::new(vec![n], fd).unwrap());
        assert!(c.within(FD_TOL), "{tag}: {c}");
    }
}
