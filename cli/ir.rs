//! `tnc ir`: print the graph after a pass.

use crate::{elaborate, Failure, ModelArgs};
use tnc_compiler::ir::print::{to_dot, to_text};
use tnc_compiler::passes;
use tnc_grammar::Diagnostic;

pub fn run(args: &ModelArgs, dot: bool, after: &str) -> Result<(), Failure> {
    // `fuse` runs after the whole pipeline and prints the kernel groups.
    let names: Vec<&str> = passes::names().into_iter().chain(["fuse"]).collect();
    if !names.contains(&after) {
        let mut d = Diagnostic::error(format!("unknown pass `{after}`"))
            .with_note(format!("the passes are, in order: {}", names.join(", ")));
        if let Some(h) = tnc_grammar::diag::did_you_mean(after, names.iter().copied()) {
            d = d.with_hint(h);
        }
        return Err(Failure::usage(d));
    }
    let (graph, sources) = elaborate(args)?;
    let stop = if after == "fuse" { names[names.len() - 2] } else { after };
    let graph = passes::run_until(graph, stop).expect("the name was checked above").map_err(|d| Failure {
        diagnostic: d,
        sources,
        status: 1,
    })?;
    if after == "fuse" {
        let plan = tnc_compiler::fusion::fuse(&graph)
            .map_err(|e| Failure::usage(Diagnostic::error(format!("internal error: {e}"))))?;
        print!("{}", tnc_compiler::fusion::to_text(&graph, &plan));
        return Ok(());
    }
    print!("{}", if dot { to_dot(&graph) } else { to_text(&graph) });
    Ok(())
}
