//! `tnc ir`: print the program after any stage of the pipeline (`pipeline.rs`) — the
//! graph after a graph pass, the kernel groups after `fuse`, the memory plan after
//! `plan_memory`, the kernels after `schedule` and every stage after it.

use crate::{elaborate, Failure, ModelArgs};
use tnc_compiler::backend::{backend_for, CodeGen, Target};
use tnc_compiler::ir::print::{to_dot, to_text};
use tnc_compiler::passes::Policy;
use tnc_compiler::pipeline::Pipeline;
use tnc_grammar::Diagnostic;

/// The sizes a memory plan is printed at.
const PLAN_SIZES: (i64, i64) = (1, 2048);

pub fn run(
    args: &ModelArgs,
    dot: bool,
    after: &str,
    (target, train, precision): (&str, bool, Policy),
) -> Result<(), Failure> {
    let target = Target::parse(target).map_err(|e| Failure::usage(Diagnostic::error(e)))?;
    let backend = backend_for(&target, CodeGen::Llvm).map_err(|e| Failure::usage(Diagnostic::error(e)))?;
    let pipeline = Pipeline::new(&*backend, train, precision);
    let names = pipeline.names();
    if !names.contains(&after) {
        // The pipeline's own error, before elaborating: it lists every stage.
        let mut d = pipeline.run_until(tnc_compiler::ir::Graph::new(""), after).err().expect("an unknown stage");
        if !train && Pipeline::new(&*backend, true, precision).names().contains(&after) {
            d = d.with_hint(format!("`{after}` is a stage of training bundles: add `--train`"));
        }
        return Err(Failure::usage(d));
    }
    let (graph, sources) = elaborate(args)?;
    let l = pipeline.run_until(graph, after).map_err(|d| Failure { diagnostic: d, sources, status: 1 })?;
    if let Some(s) = &l.schedule {
        print!("{}", tnc_compiler::schedule::to_text(s));
    } else if let Some(m) = &l.memory {
        print!("{}", m.report().to_text(PLAN_SIZES.0, PLAN_SIZES.1));
    } else if let Some(plan) = &l.plan {
        print!("{}", tnc_compiler::fusion::to_text(&l.graph, plan));
    } else {
        print!("{}", if dot { to_dot(&l.graph) } else { to_text(&l.graph) });
    }
    Ok(())
}
