//! `tnc ir`: print the graph after a pass, the kernel groups after `fuse`, or the kernels
//! after `schedule`.

use crate::{elaborate, Failure, ModelArgs};
use tnc_compiler::ir::print::{to_dot, to_text};
use tnc_compiler::passes;
use tnc_grammar::Diagnostic;

/// Stages after the graph pipeline that `--after` also accepts.
const LOWERING: [&str; 2] = ["fuse", "schedule"];

pub fn run(
    args: &ModelArgs,
    dot: bool,
    after: &str,
    target: Option<&str>,
    precision: passes::Policy,
) -> Result<(), Failure> {
    let graph_passes = passes::names();
    let names: Vec<&str> = graph_passes.iter().copied().chain(LOWERING).collect();
    if !names.contains(&after) {
        let mut d = Diagnostic::error(format!("unknown pass `{after}`"))
            .with_note(format!("the passes are, in order: {}", names.join(", ")));
        if let Some(h) = tnc_grammar::diag::did_you_mean(after, names.iter().copied()) {
            d = d.with_hint(h);
        }
        return Err(Failure::usage(d));
    }
    if let Some(t) = target {
        if after != "schedule" {
            return Err(Failure::usage(Diagnostic::error("`--target` applies to `--after schedule` only")));
        }
        tnc_compiler::driver::check_target(t).map_err(|e| Failure::usage(Diagnostic::error(e)))?;
    }
    let (graph, sources) = elaborate(args)?;
    let stop = if LOWERING.contains(&after) { *graph_passes.last().expect("passes exist") } else { after };
    let graph = passes::run_until_with(graph, stop, precision)
        .expect("the name was checked above")
        .map_err(|d| Failure { diagnostic: d, sources, status: 1 })?;
    let internal = |e: String| Failure {
        diagnostic: Diagnostic::error(format!("internal error: {e}")),
        sources: Default::default(),
        status: 1,
    };
    match after {
        "fuse" => {
            let plan = tnc_compiler::fusion::fuse(&graph).map_err(internal)?;
            print!("{}", tnc_compiler::fusion::to_text(&graph, &plan));
        }
        "schedule" => {
            let plan = tnc_compiler::fusion::fuse(&graph).map_err(internal)?;
            let memory = tnc_compiler::memory::plan_memory(&graph, &plan).map_err(internal)?;
            let s = match target {
                Some(t) => {
                    let opts = tnc_compiler::driver::schedule_options(t);
                    let mut s =
                        tnc_compiler::schedule::schedule_with(&graph, &plan, &memory, &opts).map_err(internal)?;
                    s.kernels = tnc_compiler::driver::target_kernels(&s.kernels, t);
                    s
                }
                None => tnc_compiler::schedule::schedule(&graph, &plan, &memory).map_err(internal)?,
            };
            print!("{}", tnc_compiler::schedule::to_text(&s));
        }
        _ => print!("{}", if dot { to_dot(&graph) } else { to_text(&graph) }),
    }
    Ok(())
}
