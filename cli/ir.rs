//! `tnc ir`: print the program after any stage of the pipeline (`pipeline.rs`) — the
//! graph after a graph pass, the kernel groups after `fuse`, the memory plan after
//! `plan_memory`, the kernels after `schedule` and every stage after it.

use crate::{elaborate, Failure, ModelArgs};
use tnc_compiler::backend::{backend_for, CodeGen, Target};
use tnc_compiler::ir::print::to_dot;
use tnc_compiler::passes::Policy;
use tnc_compiler::pipeline::{Pipeline, Program};
use tnc_grammar::Diagnostic;

pub fn run(
    args: &ModelArgs,
    dot: bool,
    after: &str,
    (target, train, program, precision): (&str, bool, Program, Policy),
) -> Result<(), Failure> {
    let target = Target::parse(target).map_err(|e| Failure::usage(Diagnostic::error(e)))?;
    let backend = backend_for(&target, CodeGen::default()).map_err(|e| Failure::usage(Diagnostic::error(e)))?;
    let pipeline = Pipeline::new(&*backend, train, precision).program(program);
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
    match (dot, l.schedule.is_none() && l.memory.is_none() && l.plan.is_none()) {
        (true, true) => print!("{}", to_dot(&l.graph)),
        _ => print!("{}", l.to_text()),
    }
    Ok(())
}
