//! The graph after every named pass (`tnc ir --after NAME`) for the tiny TransNormerLLM
//! model and the tiny T1, pinned by snapshots (reviewed by hand when they change).

mod common;
use common::*;
use tnc_compiler::ir::print::to_text;
use tnc_compiler::passes;

fn tiny(model: &str, sets: &[&str]) -> tnc_compiler::ir::Graph {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    let (sources, g) = elaborate_path(&repo().join(model), &sets);
    g.unwrap_or_else(|d| panic!("{}", d.render(&sources)))
}

const TNL: &[&str] = &["vocab=8", "dim=4", "heads=2", "layers=1", "glu_dim=6"];
const T1: &[&str] = &["vocab=8", "dim=4", "heads=2", "layers=2", "glu_dim=6", "block=2"];

#[test]
fn graph_after_each_pass() {
    for (model, sets, tag) in [("models/tnl.tn", TNL, "tnl"), ("models/transnormer_t1.tn", T1, "t1")] {
        for name in passes::names() {
            let g = passes::run_until(tiny(model, sets), name).unwrap().unwrap();
            insta::assert_snapshot!(format!("{tag}_after_{name}"), to_text(&g));
        }
    }
}

/// The tiny TNL with bf16 products: the casts the precision pass adds.
#[test]
fn graph_after_precision_bf16() {
    let g = passes::run_until_with(tiny("models/tnl.tn", TNL), "precision", passes::Policy::Bf16).unwrap().unwrap();
    insta::assert_snapshot!("tnl_after_precision_bf16", to_text(&g));
}

#[test]
fn kernels_after_schedule() {
    let last = *passes::names().last().unwrap();
    let g = passes::run_until(tiny("models/tnl.tn", TNL), last).unwrap().unwrap();
    let s = tnc_compiler::pipeline::scheduled_with(&g, &Default::default()).unwrap();
    insta::assert_snapshot!("tnl_after_schedule", tnc_compiler::schedule::to_text(&s));
}
