//! `tnc compile FILE --report`: run the pipeline, fuse, plan memory, and print the kernels
//! with their estimated FLOPs and bytes and the memory plan at the given `B` and `N`.
//! Code generation does not exist yet: without `--report` the command is a usage error.

use crate::{elaborate, Failure, ModelArgs};
use std::fmt::Write;
use tnc_compiler::fusion::{fuse, FusionPlan};
use tnc_compiler::ir::Graph;
use tnc_compiler::memory::{eval, mib, plan_memory};
use tnc_compiler::passes;
use tnc_grammar::Diagnostic;

#[derive(clap::Args, Debug)]
pub struct CompileArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Print the kernel groups and the memory plan instead of generating code.
    #[arg(long)]
    pub report: bool,
    /// Batch size B at which the report evaluates sizes.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i64).range(1..))]
    pub batch: i64,
    /// Sequence length N at which the report evaluates sizes.
    #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(i64).range(1..))]
    pub seq: i64,
    /// Code-generation target (`sm80`, `x86-64-v4`, `native`, …); not implemented yet.
    #[arg(long)]
    pub target: Option<String>,
}

pub fn run(args: &CompileArgs) -> Result<(), Failure> {
    if !args.report {
        return Err(Failure::usage(
            Diagnostic::error("code generation is not implemented yet")
                .with_hint("use `--report` to see the fused kernels and the memory plan"),
        ));
    }
    let (graph, sources) = elaborate(&args.model)?;
    let last = passes::names().last().copied().unwrap_or("elaborate");
    let graph = passes::run_until(graph, last).expect("the last pass exists").map_err(|d| Failure {
        diagnostic: d,
        sources,
        status: 1,
    })?;
    let internal = |e: String| Failure::usage(Diagnostic::error(format!("internal error: {e}")));
    let plan = fuse(&graph).map_err(internal)?;
    let memory = plan_memory(&graph, &plan).map_err(internal)?;
    let mut s = kernel_report(&graph, &plan, args.batch, args.seq);
    let _ = writeln!(
        s,
        "memory plan: {} buffers for {} values ({} kernels)",
        memory.buffers.len(),
        memory.values.len(),
        plan.kernels()
    );
    s.push_str(&memory.report().to_text(args.batch, args.seq));
    if let Some(live) = memory.live_peak(args.batch, args.seq) {
        let _ = writeln!(s, "most bytes live at once: {live} ({:.1} MiB)", mib(live));
    }
    print!("{s}");
    Ok(())
}

fn kernel_report(g: &Graph, plan: &FusionPlan, b: i64, n: i64) -> String {
    let num = |d: &tnc_compiler::ir::Dim| eval(d, b, n).map(|x| x.to_string()).unwrap_or_else(|| "overflow".into());
    let mut s = String::new();
    let _ = writeln!(s, "model {}: {} kernels at B = {b}, N = {n}", g.name, plan.kernels());
    let _ = writeln!(s, "total: {} flops, {} bytes", num(&plan.total_flops()), num(&plan.total_bytes()));
    for (k, grp) in plan.groups.iter().enumerate() {
        let _ = writeln!(
            s,
            "kernel {k:>4} {:<16} flops {:>14}  bytes {:>12}  ops: {}",
            grp.kind.name(),
            num(&grp.flops),
            num(&grp.bytes),
            grp.ops.join(" ")
        );
    }
    s
}
