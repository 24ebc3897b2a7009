//! The optimizer of training bundles (`tnc compile --train`), run by the runtime: two
//! accumulated backward passes, global-norm clipping and one AdamW step, against the same
//! update computed here in f64 from the bundle's own gradients; and the per-token
//! accuracy output `correct` against the interpreter.

mod common;
use common::*;
use std::collections::{BTreeMap, HashMap};
use tnc_compiler::interp::{evaluate, EvalOptions};
use tnc_compiler::{driver, passes};
use tnc_runtime::manifest::{Hyper, OPTIMIZER_HYPER};
use tnc_runtime::{Bundle, Executor, Tensor};

fn scratch(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("tnc-optimizer-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn tokens(b: usize, n: usize, vocab: usize, salt: u64) -> Tensor {
    let t = token_tensor(b, n, vocab, salt);
    Tensor::i32(t.shape.clone(), t.data.iter().map(|&x| x as i32).collect())
}

fn f32s(t: &Tensor) -> Vec<f64> {
    t.as_f32().expect("f32").iter().map(|&x| x as f64).collect()
}

/// A tiny model with every kind of layer the optimizer meets: DiagAttention, linear
/// attention, GLU, and norms with `@no_decay` gains and biases.
const TINY: &str = r#"
use std
model tiny(vocab = 16, dim = 16, heads = 2) {
  input tokens: i32[B, N]
  param embedding: [vocab, dim] ~ normal(dim ** -0.5)
  x = embed(tokens, embedding) + sinusoidal_positions(N, dim)
  x = x + diag_attention(layer_norm(x), heads, block = 4, act = softmax, norm = identity)
  x = x + norm_attention(rms_norm(x), heads, phi = elu1, norm = srms_norm)
  x = x + glu(srms_norm(x), 24)
  output loss = lm_loss(layer_norm(x), embedding, tokens)
}
"#;

/// [`TINY`] with its optimizer, compiled for the host.
fn tiny_training_bundle(tag: &str) -> (std::path::PathBuf, tnc_compiler::ir::Graph) {
    let (sources, g) = elaborate_text("tiny.tn", TINY, &[]);
    let g = g.unwrap_or_else(|d| panic!("{}", d.render(&sources)));
    let dir = scratch(tag);
    driver::compile(g.clone(), "native", &dir, driver::Options { train: true, ..Default::default() }, Vec::new())
        .unwrap();
    (dir, g)
}

const LR: f64 = 3e-3;
const B1: f64 = 0.9;
const B2: f64 = 0.98;
const EPS: f64 = 1e-8;
const WD: f64 = 0.1;

fn hyper(step: i32, accumulated: usize, clip: f64) -> Vec<f32> {
    let mut h = vec![0f32; Hyper::LEN];
    h[Hyper::LearningRate as usize] = LR as f32;
    h[Hyper::Beta1 as usize] = B1 as f32;
    h[Hyper::Beta2 as usize] = B2 as f32;
    h[Hyper::Eps as usize] = EPS as f32;
    h[Hyper::WeightDecay as usize] = WD as f32;
    h[Hyper::BiasCorrection1 as usize] = (1.0 - B1.powi(step)) as f32;
    h[Hyper::BiasCorrection2 as usize] = (1.0 - B2.powi(step)) as f32;
    h[Hyper::GradScale as usize] = (1.0 / accumulated as f64) as f32;
    h[Hyper::ClipNorm as usize] = clip as f32;
    h
}

#[test]
fn two_accumulated_steps_of_clipped_adamw_match_the_update_computed_in_f64() {
    let (dir, g) = tiny_training_bundle("adamw");
    let bundle = Bundle::load_cpu(&dir).unwrap();
    let mut exec = Executor::cpu(&bundle, 2).unwrap();
    exec.set_params_from_seed(3).unwrap();
    let trainable: Vec<String> = g.params.iter().filter(|p| p.trainable).map(|p| p.name.clone()).collect();
    let decays: HashMap<String, bool> =
        g.params.iter().map(|p| (p.name.clone(), !p.attrs.iter().any(|a| a == "no_decay"))).collect();
    assert!(decays.values().any(|d| !d), "the model has no_decay parameters (norm gains)");

    // Host state: parameters and moments in f64.
    let mut params: BTreeMap<String, Vec<f64>> =
        trainable.iter().map(|n| (n.clone(), f32s(&exec.param(n).unwrap()))).collect();
    let mut m: BTreeMap<String, Vec<f64>> = params.iter().map(|(n, p)| (n.clone(), vec![0.0; p.len()])).collect();
    let mut v = m.clone();

    for (step, clip) in [(1, 0.05), (2, 0.0)] {
        // Two backward passes feed one update.
        let mut sum: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for k in 0..2u64 {
            exec.forward(&[("tokens", &tokens(2, 9, 16, 10 * step as u64 + k))]).unwrap();
            exec.backward(&[]).unwrap();
            exec.run("accumulate", &[]).unwrap();
            for (name, gr) in exec.gradients().unwrap() {
                let s = sum.entry(name).or_insert_with(|| vec![0.0; gr.len()]);
                s.iter_mut().zip(f32s(&gr)).for_each(|(a, b)| *a += b);
            }
        }
        exec.set_optimizer_buffer(OPTIMIZER_HYPER, &hyper(step, 2, clip)).unwrap();
        exec.run("grad_norm", &[]).unwrap();
        let h = exec.optimizer_buffer(OPTIMIZER_HYPER).unwrap();
        let norm: f64 = sum.values().flatten().map(|x| (x / 2.0).powi(2)).sum::<f64>().sqrt();
        let got_norm = h[Hyper::GradNorm as usize] as f64;
        assert!((got_norm - norm).abs() <= 1e-5 * norm, "step {step}: global norm {got_norm} vs {norm}");
        for name in &trainable {
            let sq: f64 = sum[name].iter().map(|x| (x / 2.0).powi(2)).sum();
            let got = exec.optimizer_buffer(&format!("grad_sqnorm.{name}")).unwrap()[0] as f64;
            assert!((got - sq).abs() <= 1e-5 * sq + 1e-12, "step {step}: sqnorm of {name}: {got} vs {sq}");
        }
        let factor = if clip > 0.0 && norm > clip { clip / norm } else { 1.0 };
        assert!(step != 1 || factor < 0.5, "the first step exercises clipping (norm {norm})");
        let got_factor = h[Hyper::ClipFactor as usize] as f64;
        assert!((got_factor - factor).abs() <= 1e-5 * factor, "clip factor {got_factor} vs {factor}");
        exec.run("step", &[]).unwrap();

        // The same update in f64.
        let (bc1, bc2) = (1.0 - B1.powi(step), 1.0 - B2.powi(step));
        let mut worst = 0.0f64;
        for name in &trainable {
            let p = params.get_mut(name).unwrap();
            let (mm, vv) = (m.get_mut(name).unwrap(), v.get_mut(name).unwrap());
            for i in 0..p.len() {
                let gi = sum[name][i] / 2.0 * factor;
                mm[i] = B1 * mm[i] + (1.0 - B1) * gi;
                vv[i] = B2 * vv[i] + (1.0 - B2) * gi * gi;
                let upd = (mm[i] / bc1) / ((vv[i] / bc2).sqrt() + EPS);
                let decay = if decays[name] { LR * WD * p[i] } else { 0.0 };
                p[i] -= LR * upd + decay;
            }
            let got = f32s(&exec.param(name).unwrap());
            for (a, b) in got.iter().zip(p.iter()) {
                worst = worst.max((a - b).abs());
            }
            let got_m = exec.optimizer_buffer(&format!("adam_m.{name}")).unwrap();
            for (a, b) in got_m.iter().zip(mm.iter()) {
                assert!((*a as f64 - b).abs() <= 1e-5 * b.abs() + 1e-9, "step {step}: adam_m of {name}");
            }
            assert!(
                exec.optimizer_buffer(&format!("grad_sum.{name}")).unwrap().iter().all(|&x| x == 0.0),
                "step zeroes the gradient sums"
            );
        }
        // Each element moves by about lr; f32 rounding of p (|p| ≤ ~1) is ~1e-7.
        assert!(worst < 2e-6, "step {step}: parameters differ from the f64 AdamW by {worst}");
    }
}

#[test]
fn the_accuracy_output_matches_the_interpreter() {
    let (dir, g) = tiny_training_bundle("correct");
    let bundle = Bundle::load_cpu(&dir).unwrap();
    let mut exec = Executor::cpu(&bundle, 2).unwrap();
    // The optimized graph (where the loss is one fused cross-entropy op), as compiled.
    let optimized = passes::run_until(g, "dce").unwrap().unwrap();
    let reference = passes::Pass::run(&passes::Accuracy, optimized).unwrap();
    assert!(reference.outputs.iter().any(|(n, _)| n == "correct"), "the accuracy pass adds `correct`");
    let params = rounded_to_f32(perturbed_params(&reference, 4));
    for (p, t) in reference.params.iter().zip(&params) {
        let values: Vec<f32> = t.data.iter().map(|&x| x as f32).collect();
        exec.set_param(&p.name, &values).unwrap();
    }
    let toks = token_tensor(3, 11, 16, 77);
    let inputs = HashMap::from([("tokens".to_string(), toks.clone())]);
    let want = evaluate(&reference, &inputs, &params, &EvalOptions::default()).unwrap().outputs(&reference);
    let rt = Tensor::i32(toks.shape.clone(), toks.data.iter().map(|&x| x as i32).collect());
    exec.forward(&[("tokens", &rt)]).unwrap();
    let got = f32s(&exec.output("correct").unwrap());
    let want = &want.iter().find(|(n, _)| n == "correct").expect("correct output").1;
    assert_eq!(want.shape, vec![3, 10]);
    assert_eq!(got.len(), 30);
    assert!(got.iter().all(|&x| x == 0.0 || x == 1.0));
    let hits = got.iter().filter(|&&x| x == 1.0).count();
    assert!(hits > 0 && hits < 30, "a random model is right sometimes, not always ({hits} of 30)");
    assert_eq!(got, want.data, "per-token accuracy");
}
