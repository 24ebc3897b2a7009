//! `tnc ir`: print the graph after a pass.

use crate::{elaborate, Failure, ModelArgs};
use tnc_compiler::ir::print::{to_dot, to_text};
use tnc_compiler::passes;
use tnc_grammar::Diagnostic;

pub fn run(args: &ModelArgs, dot: bool, after: &str) -> Result<(), Failure> {
    let names = passes::names();
    if !names.contains(&after) {
        let mut d = Diagnostic::error(format!("unknown pass `{after}`"))
            .with_note(format!("the passes are, in order: {}", names.join(", ")));
        if let Some(h) = tnc_grammar::diag::did_you_mean(after, names.iter().copied()) {
            d = d.with_hint(h);
        }
        return Err(Failure::usage(d));
    }
    let (graph, sources) = elaborate(args)?;
    let graph = passes::run_until(graph, after).expect("the name was checked above").map_err(|d| Failure {
        diagnostic: d,
        sources,
        status: 1,
    })?;
    print!("{}", if dot { to_dot(&graph) } else { to_text(&graph) });
    Ok(())
}
