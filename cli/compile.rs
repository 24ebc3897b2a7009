//! `tnc compile FILE --target T [-o out.tnb]`: compile a model into a bundle and print a
//! summary. With `--report`: run the pipeline, fuse, plan memory, and print the kernels
//! with their estimated FLOPs and bytes and the memory plan at the given `B` and `N`.

use crate::{elaborate, Failure, ModelArgs};
use std::fmt::Write;
use tnc_compiler::backend::{backend_for, Target};
use tnc_compiler::fusion::FusionPlan;
use tnc_compiler::ir::Graph;
use tnc_compiler::memory::{eval, mib};
use tnc_compiler::pipeline::Pipeline;
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
    /// Code-generation target: `native`, `x86-64-v3`, `x86-64-v4` (CPUs) or `sm80`,
    /// `sm86`, `sm89`, `sm90`, `sm90a` (NVIDIA GPUs).
    #[arg(long)]
    pub target: Option<String>,
    /// The code generator for a CPU target: `llvm` (vectorized, the default) or
    /// `cranelift` (compiles several times faster, scalar code).
    #[arg(long, value_enum, default_value_t)]
    pub backend: crate::BackendArg,
    /// The bundle directory to write (default: the model's name with `.tnb`).
    #[arg(short = 'o', long = "out")]
    pub out: Option<std::path::PathBuf>,
    /// Also write the LLVM IR (`llvm`; with `--backend cranelift` the Cranelift IR, `.clif`)
    /// or assembly (`asm`) next to the bundle.
    #[arg(long, value_enum, conflicts_with = "report")]
    pub emit: Vec<EmitKind>,
    /// A training bundle: adds AdamW (`accumulate`, `grad_norm` and `step` entry points)
    /// and a per-token accuracy output `correct`, as `tnc train` uses.
    #[arg(long)]
    pub train: bool,
    /// The element type of products' operands.
    #[arg(long, value_enum, default_value_t)]
    pub precision: crate::PrecisionArg,
    /// How a GPU target computes dense products: `tiles` (generated tiled kernels, tensor
    /// cores for bf16; needs only the driver) or `cublas` (cuBLAS calls where cuBLAS can
    /// express the product; the bundle then needs libcublas where it runs, found through
    /// `TNC_CUBLAS` or the library path). CPU targets always call their GEMM library.
    #[arg(long, value_enum, default_value_t)]
    pub gemm: GemmArg,
    #[command(flatten)]
    pub program: crate::ProgramArgs,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GemmArg {
    #[default]
    Tiles,
    Cublas,
}

impl GemmArg {
    pub fn gemm(self) -> tnc_compiler::backend::GpuGemm {
        match self {
            GemmArg::Tiles => tnc_compiler::backend::GpuGemm::Tiles,
            GemmArg::Cublas => tnc_compiler::backend::GpuGemm::Cublas,
        }
    }

    /// Bad usage unless the choice suits `target`: CPUs always call their GEMM library.
    pub fn check(self, target: &Target) -> Result<(), Failure> {
        if self == GemmArg::Tiles || target.is_gpu() {
            return Ok(());
        }
        Err(Failure::usage(
            Diagnostic::error(format!(
                "`--gemm {}` is for GPU targets, and `{}` is a CPU",
                self.gemm().name(),
                target.name()
            ))
            .with_note("a CPU bundle's dense products always call the host's GEMM library"),
        ))
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmitKind {
    Llvm,
    Asm,
}

pub fn run(args: &CompileArgs) -> Result<(), Failure> {
    if !args.report {
        return compile(args);
    }
    // The report is of the target's pipeline through memory planning (the host's when
    // no target is given).
    let target = parse_target(args.target.as_deref().unwrap_or("native"))?;
    args.gemm.check(&target)?;
    let (graph, sources) = elaborate(&args.model)?;
    crate::warn_unfused(&graph, &sources, args.batch, args.seq);
    let backend = backend_for(&target, args.backend.codegen()).map_err(|e| Failure::usage(Diagnostic::error(e)))?;
    let pipeline = Pipeline::new(&*backend, args.train, args.precision.policy()).program(args.program.program());
    let lowered =
        pipeline.run_until(graph, "plan_memory").map_err(|d| Failure { diagnostic: d, sources, status: 1 })?;
    let graph = lowered.graph;
    let plan = lowered.plan.expect("plan_memory runs after fuse");
    let memory = lowered.memory.expect("plan_memory ran");
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

/// A `--target` name, or a usage error listing the valid ones.
pub(crate) fn parse_target(name: &str) -> Result<Target, Failure> {
    Target::parse(name).map_err(|e| Failure::usage(Diagnostic::error(e)))
}

/// Compile to a bundle and print what was made.
fn compile(args: &CompileArgs) -> Result<(), Failure> {
    let Some(target) = args.target.as_deref() else {
        return Err(Failure::usage(
            Diagnostic::error("`tnc compile` needs `--target`")
                .with_note("CPU targets: native, x86-64-v3, x86-64-v4; GPU targets: sm80, sm86, sm89, sm90, sm90a")
                .with_hint("or use `--report` to see the kernels and the memory plan without generating code"),
        ));
    };
    let parsed = parse_target(target)?;
    args.backend.check(target)?;
    args.gemm.check(&parsed)?;
    let started = std::time::Instant::now();
    let (graph, sources) = elaborate(&args.model)?;
    let front = started.elapsed();
    crate::warn_unfused(&graph, &sources, args.batch, args.seq);
    let out = args.out.clone().unwrap_or_else(|| {
        let stem =
            args.model.file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
        std::path::PathBuf::from(format!("{stem}.tnb"))
    });
    let emit = tnc_compiler::driver::Emit {
        llvm: args.emit.contains(&EmitKind::Llvm),
        asm: args.emit.contains(&EmitKind::Asm),
    };
    let opts = tnc_compiler::driver::Options {
        emit,
        train: args.train,
        precision: args.precision.policy(),
        codegen: args.backend.codegen(),
        program: args.program.program(),
        gemm: args.gemm.gemm(),
    };
    let compiled = tnc_compiler::driver::compile(graph, target, &out, opts, vec![("parse + elaborate", front)])
        .map_err(crate::fail)?;
    let mut s = String::new();
    let with = match args.backend {
        crate::BackendArg::Llvm => String::new(),
        other => format!(" with {}", other.codegen().name()),
    };
    let with = match args.gemm {
        GemmArg::Tiles => with,
        GemmArg::Cublas => format!("{with} (cuBLAS for {} products)", library_products(&compiled)),
    };
    let _ = writeln!(s, "compiled {} for {target}{with} into {}", compiled.graph.name, out.display());
    use tnc_compiler::schedule::Entry;
    let launches = |e: Entry| compiled.schedule.steps.iter().filter(|st| st.entry == e).count();
    let optimizer = launches(Entry::Accumulate) + launches(Entry::GradNorm) + launches(Entry::Step);
    let _ = writeln!(
        s,
        "  {} kernels ({} launches: {} forward, {} backward{}) from {} fused groups",
        compiled.schedule.kernels.len(),
        compiled.schedule.steps.len(),
        launches(Entry::Forward),
        launches(Entry::Backward),
        if optimizer > 0 { format!(", {optimizer} optimizer") } else { String::new() },
        compiled.plan.kernels()
    );
    if let Some(n) = compiled.memory.report().eval(args.batch, args.seq) {
        let _ = writeln!(s, "  peak memory at B = {}, N = {}: {:.1} MiB", args.batch, args.seq, mib(n.peak));
        // A CPU bundle that can never run here at these sizes (a huge `--decode-step`
        // context, say) is worth a word now rather than a refusal when it runs.
        let total = tnc_runtime::host_memory::total_bytes().filter(|_| !parsed.is_gpu());
        if let Some(total) = total.filter(|&t| n.peak as u128 > t as u128) {
            eprintln!(
                "warning: at B = {}, N = {} the bundle needs {}, more than this machine's {} of memory",
                args.batch,
                args.seq,
                tnc_runtime::host_memory::human(n.peak as u128),
                tnc_runtime::host_memory::human(total as u128)
            );
        }
    }
    let _ = writeln!(s, "  compile time:");
    let mut total = std::time::Duration::ZERO;
    for (stage, t) in &compiled.stages {
        total += *t;
        let _ = writeln!(s, "    {stage:<18} {:>9.1} ms", t.as_secs_f64() * 1e3);
    }
    let _ = writeln!(s, "    {:<18} {:>9.1} ms", "total", total.as_secs_f64() * 1e3);
    for f in &compiled.extra_files {
        let _ = writeln!(s, "  wrote {}", f.display());
    }
    print!("{s}");
    Ok(())
}

/// How many of the schedule's kernels are library products (cuBLAS calls on a GPU).
fn library_products(compiled: &tnc_compiler::driver::Compiled) -> usize {
    compiled.schedule.kernels.iter().filter(|k| k.gemm.is_some()).count()
}
