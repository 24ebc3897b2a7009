//! End to end: every model in `models/` (ablations included) at a tiny size (width 16,
//! 2 heads, 2 layers, vocab 32, GLU width 24, DiagAttention blocks of 4) is
//! differentiated, the graph stays valid, and at least 200 sampled parameter entries per
//! model and sequence length match central differences in f64. Two lengths, B = 2:
//! N = 5 (a block and one token) and N = 14 (three blocks and two tokens), so block
//! boundaries are crossed and the last block is zero-padded. Every parameter is
//! perturbed away from its initial value so that biases (zero at init) are non-zero.

mod common;

use common::*;
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use tnc_bundle::rng;
use tnc_compiler::autodiff::{differentiate, grad_name, GradOptions};
use tnc_compiler::frontend::{elaborate, Input, Request};
use tnc_compiler::interp::{compare, evaluate, init_params, EvalOptions, Tensor};
use tnc_compiler::ir::verify::verify;
use tnc_compiler::ir::{DType, Graph};

const VOCAB: usize = 32;
const BATCH: usize = 2;
const LENGTHS: [usize; 2] = [5, 14];
/// Sampled entries per model and length; at least this many, spread over every
/// trainable parameter tensor.
const ENTRIES: usize = 200;
/// Each sampled entry: `|autodiff − finite difference| / max(|autodiff|, |finite
/// difference|, GRAD_FLOOR) ≤ ENTRY_TOL`.
const ENTRY_TOL: f64 = 1e-5;
/// Below this size a gradient entry is compared absolutely (to `ENTRY_TOL · GRAD_FLOOR`
/// = 1e-9): the finite difference of a loss near 3.5 carries a rounding error of about
/// 1e-11 (see `STEP`), which no relative tolerance can ask of a gradient of 1e-10.
const GRAD_FLOOR: f64 = 1e-4;
/// The fourth-order central difference `(8 (L(v+h) − L(v−h)) − (L(v+2h) − L(v−2h))) /
/// 12h` with `h = STEP · max(|v|, 1)`: truncation error O(h⁴) is negligible, and the
/// rounding error (≈ 1e-16 · L / h) stays near 1e-11, where the second-order difference
/// with a step small enough for its O(h²) truncation error would leave about 1e-9.
/// The step is small enough not to cross a ReLU kink at any sampled entry.
const STEP: f64 = 1e-5;

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
    common::tiny_sets_of(text)
}

/// Initial values plus deterministic noise on every tensor (biases are zero at init).
fn perturbed_params(g: &Graph, tag: &str) -> Vec<Tensor> {
    let mut ps = init_params(g, 5).unwrap();
    for (info, t) in g.params.iter().zip(&mut ps) {
        let stream = rng::stable_hash(&format!("{tag}/perturb/{}", info.name));
        for (i, x) in t.data.iter_mut().enumerate() {
            *x += 0.1 * rng::normal(11, stream, i as u64, 0);
        }
    }
    ps
}

/// `(parameter index, element)` pairs: three distinct elements of every trainable
/// parameter (all of a smaller one), then uniformly drawn distinct elements of all
/// trainable parameters together until there are at least `ENTRIES`.
fn sample_entries(g: &Graph, params: &[Tensor], salt: u64) -> Vec<(usize, usize)> {
    let trainable: Vec<usize> = (0..g.params.len()).filter(|&i| g.params[i].trainable).collect();
    let total: usize = trainable.iter().map(|&i| params[i].numel()).sum();
    assert!(total >= ENTRIES, "only {total} trainable entries");
    let mut chosen = BTreeSet::new();
    for &i in &trainable {
        let stream = rng::stable_hash(&g.params[i].name);
        let n = params[i].numel();
        let mut s = 0;
        while chosen.iter().filter(|(p, _)| *p == i).count() < 3.min(n) {
            chosen.insert((i, (rng::uniform(9, stream, s, salt) * n as f64) as usize % n));
            s += 1;
        }
    }
    let mut s = 0;
    while chosen.len() < ENTRIES {
        let mut k = (rng::uniform(10, salt, s, 0) * total as f64) as usize % total;
        s += 1;
        for &i in &trainable {
            if k < params[i].numel() {
                chosen.insert((i, k));
                break;
            }
            k -= params[i].numel();
        }
    }
    chosen.into_iter().collect()
}

/// The worst errors over one model and length.
#[derive(Default, Debug)]
struct Errors {
    entries: usize,
    /// Entries whose gradient is below `GRAD_FLOOR` (compared absolutely).
    below_floor: usize,
    rel_l2: f64,
    worst_entry: f64,
}

fn check_model(path: &PathBuf) -> Vec<Errors> {
    let tag = path.file_name().unwrap().to_string_lossy().into_owned();
    let text = std::fs::read_to_string(path).unwrap();
    let sets = tiny_sets(&text);
    let (_, g0) = elaborate(Input::Path(path), &Request { sets: &sets, model: None });
    let g0 = g0.unwrap_or_else(|d| panic!("{tag}: {}", d.message));
    let (_, loss) = g0.outputs.iter().find(|(n, _)| n == "loss").cloned().expect("a loss output");
    let mut g = g0.clone();
    differentiate(&mut g, loss, &GradOptions::default()).unwrap_or_else(|e| panic!("{tag}: {e}"));
    verify(&g).unwrap_or_else(|e| panic!("{tag}: {e}"));
    let params = perturbed_params(&g0, &tag);
    let opts = EvalOptions::default();

    let mut out = Vec::new();
    for n in LENGTHS {
        let at = format!("{tag}, B = {BATCH}, N = {n}");
        let mut inputs = HashMap::new();
        for inp in &g0.inputs {
            let shape: Vec<usize> = inp
                .ty
                .shape
                .iter()
                .map(|d| d.eval(&|s| if s == "B" { Some(BATCH as i64) } else { Some(n as i64) }).unwrap() as usize)
                .collect();
            let key = format!("{tag}/{}/{n}", inp.name);
            let v = match inp.ty.dtype {
                DType::I32 => ints(&key, &shape, VOCAB),
                _ => normal(&key, &shape),
            };
            inputs.insert(inp.name.clone(), v);
        }
        let ev = evaluate(&g, &inputs, &params, &opts).unwrap_or_else(|e| panic!("{at}: {e}"));
        let loss_at = |ps: &[Tensor]| evaluate(&g0, &inputs, ps, &opts).unwrap().output(&g0, "loss").unwrap().data[0];
        let l0 = loss_at(&params);
        assert!(l0.is_finite(), "{at}: loss is not finite");
        assert_eq!(ev.output(&g, "loss").unwrap().data[0], l0, "{at}: the differentiated graph's loss");

        let entries = sample_entries(&g0, &params, n as u64);
        assert!(entries.len() >= ENTRIES, "{at}: {} entries", entries.len());
        let (mut ad, mut fd) = (Vec::new(), Vec::new());
        let mut worst_entry = 0.0f64;
        let mut below_floor = 0;
        let mut ps = params.clone();
        for &(i, k) in &entries {
            let name = &g0.params[i].name;
            let grad = ev.output(&g, &grad_name(name)).unwrap_or_else(|| panic!("{at}: no gradient of `{name}`"));
            assert_eq!(grad.shape, params[i].shape, "{at}: {name}");
            let v = params[i].data[k];
            let h = STEP * v.abs().max(1.0);
            let mut at_offset = |t: f64| {
                ps[i].data[k] = v + t * h;
                let l = loss_at(&ps);
                ps[i].data[k] = v;
                l
            };
            let d1 = at_offset(1.0) - at_offset(-1.0);
            let d2 = at_offset(2.0) - at_offset(-2.0);
            let f = (8.0 * d1 - d2) / (12.0 * h);
            let a = grad.data[k];
            below_floor += usize::from(a.abs().max(f.abs()) < GRAD_FLOOR);
            let rel = (a - f).abs() / a.abs().max(f.abs()).max(GRAD_FLOOR);
            assert!(rel <= ENTRY_TOL, "{at}: `{name}`[{k}]: autodiff {a:e}, finite difference {f:e} (error {rel:.2e})");
            worst_entry = worst_entry.max(rel);
            ad.push(a);
            fd.push(f);
        }
        let m = ad.len();
        let c = compare(&Tensor::new(vec![m], ad).unwrap(), &Tensor::new(vec![m], fd).unwrap());
        assert!(c.within(FD_TOL), "{at}: {c}");
        out.push(Errors { entries: m, below_floor, rel_l2: c.rel_l2, worst_entry });
    }
    out
}

#[test]
fn every_model_has_correct_parameter_gradients() {
    let files = model_files();
    assert!(files.len() >= 8, "models: {files:?}");
    for path in files {
        let errors = check_model(&path);
        assert_eq!(errors.len(), LENGTHS.len());
        for (n, e) in LENGTHS.iter().zip(&errors) {
            eprintln!(
                "{}: N = {n}: {} entries ({} below the floor), relative L2 {:.2e}, worst entry {:.2e}",
                path.file_name().unwrap().to_string_lossy(),
                e.entries,
                e.below_floor,
                e.rel_l2,
                e.worst_entry
            );
        }
    }
}
