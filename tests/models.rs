//! Every model in `models/` elaborates; its IR at a tiny size and its op counts at full
//! size are pinned by snapshots; parameter counts match the paper.

mod common;
use common::*;
use tnc_compiler::ir::print::{op_count_table, to_text};

fn snapshot_name(path: &std::path::Path) -> String {
    let rel = path.strip_prefix(repo().join("models")).unwrap();
    rel.with_extension("").display().to_string().replace('/', "__")
}

#[test]
fn tiny_ir_of_every_model() {
    let files = model_files();
    assert!(files.len() >= 8, "models/ has {} model files", files.len());
    for f in files {
        let (sources, g) = elaborate_path(&f, &tiny_sets(&f));
        let g = g.unwrap_or_else(|d| panic!("{}", d.render(&sources)));
        insta::assert_snapshot!(format!("tiny_ir__{}", snapshot_name(&f)), to_text(&g));
    }
}

#[test]
fn full_size_op_counts() {
    for f in model_files() {
        let (sources, g) = elaborate_path(&f, &[]);
        let g = g.unwrap_or_else(|d| panic!("{}", d.render(&sources)));
        let table = format!("parameters: {}\n{}", g.trainable_parameter_count(), op_count_table(&g));
        insta::assert_snapshot!(format!("op_counts__{}", snapshot_name(&f)), table);
    }
}

fn t1_params(sets: &[&str]) -> u128 {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    let (sources, g) = elaborate_path(&repo().join("models/transnormer_t1.tn"), &sets);
    g.unwrap_or_else(|d| panic!("{}", d.render(&sources))).trainable_parameter_count()
}

#[test]
fn t1_has_about_156m_parameters() {
    let n = t1_params(&[]);
    assert!((155_000_000..=158_000_000).contains(&n), "T1 has {n} parameters");
    // By hand: tied embedding 267744·512, and per layer 4·512² + 4·512 (attention with
    // biases) + 32 (LRPE θ) + 2·512·1365 + 1365·512 + 2·1365 + 512 (GLU with biases).
    let per_layer: u128 = 4 * 512 * 512 + 4 * 512 + 32 + 3 * 512 * 1365 + 2 * 1365 + 512;
    assert_eq!(n, 267_744 * 512 + 6 * per_layer);
}

#[test]
fn t1_with_twelve_layers_grows_by_six_layers() {
    let six = t1_params(&[]);
    let twelve = t1_params(&["layers=12"]);
    let embedding: u128 = 267_744 * 512;
    assert_eq!(twelve - embedding, 2 * (six - embedding), "layers scale linearly");
    assert!((174_000_000..=176_000_000).contains(&twelve), "{twelve}");
}

/// Parameter names of a model at tiny size.
fn names(path: &std::path::Path) -> Vec<String> {
    let (sources, g) = elaborate_path(path, &tiny_sets(path));
    g.unwrap_or_else(|d| panic!("{}", d.render(&sources))).params.iter().map(|p| p.name.clone()).collect()
}

#[test]
fn parameter_names_follow_the_structure() {
    let n = names(&repo().join("models/transnormer_t1.tn"));
    for expected in [
        "embedding",
        "layers.0.attn.wq",
        "layers.0.attn.lrpe.theta",
        "layers.0.attn.lrpe.householder",
        "layers.1.attn.wo",
        "layers.1.glu.w3",
    ] {
        assert!(n.contains(&expected.to_string()), "missing {expected} in {n:?}");
    }
    let unique: std::collections::BTreeSet<_> = n.iter().collect();
    assert_eq!(unique.len(), n.len(), "names are unique");
}

#[test]
fn one_line_ablations_rename_nothing_unrelated() {
    let base = names(&repo().join("models/transnormer_t1.tn"));
    let t1 = std::fs::read_to_string(repo().join("models/transnormer_t1.tn")).unwrap();
    for f in model_files().into_iter().filter(|f| f.to_string_lossy().contains("ablations")) {
        let text = std::fs::read_to_string(&f).unwrap();
        let changed = text.lines().zip(t1.lines()).filter(|(a, b)| a != b).count();
        assert_eq!(changed, 1, "{} differs from T1 in {changed} lines", f.display());
        assert_eq!(text.lines().count(), t1.lines().count(), "{}", f.display());
        let variant = names(&f);
        // Every parameter both models have keeps its name; the only differences are
        // parameters that exist in just one of them (e.g. LRPE's θ without LRPE, the
        // gate's projection with a gate).
        let gate = |n: &str| n.ends_with(".wg") || n.ends_with(".bg");
        for n in &variant {
            if !base.contains(n) {
                assert!(n.contains("lrpe") || gate(n), "{}: new parameter {n}", f.display());
            }
        }
        for n in &base {
            if !variant.contains(n) {
                assert!(n.contains("lrpe"), "{}: lost parameter {n}", f.display());
            }
        }
    }
}

#[test]
fn set_overrides_function_defaults() {
    let path = repo().join("models/transnormer_t1.tn");
    let mut sets = tiny_sets(&path);
    let (_, plain) = elaborate_path(&path, &sets);
    sets.push("srms_norm.eps=0.5".into());
    let (_, tuned) = elaborate_path(&path, &sets);
    let has_half = |g: &tnc_compiler::ir::Graph| to_text(g).contains("const 0.5 ");
    assert!(!has_half(&plain.unwrap()));
    assert!(has_half(&tuned.unwrap()));
}

/// std.tn's GLU puts its activation on the first branch, as the authors' `glu.py` does:
/// `W3(f(W1 x) ⊙ (W2 x))`. With ReLU and a negative first branch the output is 0, where
/// the other convention (f on W2's branch) would not be.
#[test]
fn glu_applies_its_activation_to_the_first_branch() {
    use std::collections::HashMap;
    use tnc_compiler::interp::{evaluate, EvalOptions, Tensor};
    let text = "use std\nmodel m() {\n  input x: [1, 1, 1]\n  y = glu(x, 1, act = relu, bias = false)\n  \
                output loss = sum(y)\n}\n";
    let (sources, g) = elaborate_text("glu.tn", text, &[]);
    let g = g.unwrap_or_else(|d| panic!("{}", d.render(&sources)));
    let names: Vec<&str> = g.params.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["glu.w1", "glu.w2", "glu.w3"]);
    let loss = |w1: f64, w2: f64| {
        let one = |v: f64| Tensor { shape: vec![1, 1], data: vec![v] };
        let params = [one(w1), one(w2), one(3.0)];
        let inputs = HashMap::from([("x".to_string(), Tensor { shape: vec![1, 1, 1], data: vec![2.0] })]);
        let out = evaluate(&g, &inputs, &params, &EvalOptions::default()).unwrap().outputs(&g);
        out.iter().find(|(n, _)| n == "loss").unwrap().1.data[0]
    };
    // relu(2·w1) · (2·w2) · 3
    assert_eq!(loss(1.0, -1.0), -12.0);
    assert_eq!(loss(-1.0, 1.0), 0.0);
}
