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

/// Every stage of the whole pipeline after the graph passes (`tnc ir --after NAME --train`)
/// for one CPU target and one GPU target, the tiny TransNormerLLM's training bundle: the
/// kernel groups, the memory plan, the kernels as scheduled, then what each later stage
/// (the target's kernel passes, the optimizer) changed: the kernels it rewrote or added and
/// the launches it added, so that each snapshot shows one stage's work.
#[test]
fn every_stage_of_a_cpu_and_a_gpu_pipeline() {
    use std::collections::{BTreeMap, BTreeSet};
    use tnc_compiler::backend::{backend_for, CodeGen, Target};
    use tnc_compiler::kernel::print;
    use tnc_compiler::pipeline::Pipeline;
    for target in ["x86-64-v3", "sm80"] {
        let backend = backend_for(&Target::parse(target).unwrap(), CodeGen::Llvm).unwrap();
        let pipeline = Pipeline::new(&*backend, true, passes::Policy::F32);
        let lowering = pipeline.names().into_iter().skip_while(|n| *n != "fuse").collect::<Vec<_>>();
        assert!(lowering.len() >= 6, "{target}: {lowering:?}");
        let mut before: Option<(BTreeMap<String, String>, BTreeSet<String>)> = None;
        for stage in lowering {
            let l = pipeline.run_until(tiny("models/tnl.tn", TNL), stage).unwrap_or_else(|d| panic!("{}", d.message));
            let Some(s) = &l.schedule else {
                insta::assert_snapshot!(format!("tnl_train_{target}_after_{stage}"), l.to_text());
                continue;
            };
            let kernels: BTreeMap<String, String> =
                s.kernels.iter().map(|k| (k.name.clone(), print::to_text(k))).collect();
            let launches: BTreeSet<String> = tnc_compiler::schedule::to_text(s)
                .lines()
                .filter(|l| l.starts_with("// launch"))
                .map(|l| l.split_once(": ").map_or(l, |(_, rest)| rest).to_string())
                .collect();
            let text = match &before {
                None => l.to_text(),
                Some((old_kernels, old_launches)) => {
                    let changed: Vec<&String> =
                        kernels.iter().filter(|(n, t)| old_kernels.get(*n) != Some(t)).map(|(_, t)| t).collect();
                    let added: Vec<&String> = launches.difference(old_launches).collect();
                    let mut out = format!(
                        "// {stage}: {} of {} kernels rewritten or added, {} launches added\n",
                        changed.len(),
                        kernels.len(),
                        added.len()
                    );
                    for l in added {
                        out.push_str(&format!("// new launch: {l}\n"));
                    }
                    for t in changed {
                        out.push_str(t);
                    }
                    out
                }
            };
            insta::assert_snapshot!(format!("tnl_train_{target}_after_{stage}"), text);
            before = Some((kernels, launches));
        }
    }
}
