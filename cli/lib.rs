//! `tnc`'s command line: argument parsing and reporting. Each subcommand is a thin layer
//! over the compiler crate.
//!
//! Exit status: 0 on success, 1 on an error in the user's model, 2 on bad usage
//! (unknown flags, malformed `--set`, unknown pass names).

mod ablate;
mod bundle_cache;
mod bundle_run;
mod check;
mod compile;
mod device;
pub mod emulated_gpu;
mod eval;
mod generate;
mod ir;
mod run;
mod tokenizer;
mod train;
mod verify;

use clap::{Parser, Subcommand};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use tnc_compiler::frontend::{self, Input, Request};
use tnc_compiler::ir::Graph;
use tnc_grammar::{Diagnostic, SourceMap};

#[derive(Parser, Debug)]
#[command(
    name = "tnc",
    version,
    about = "Compile TransNormer-style linear-attention models to fused kernels",
    long_about = "tnc compiles a model written in the tnc language (.tn files) into fused kernels.\n\
                  Start with `tnc check models/transnormer_t1.tn`, then look at the graph with `tnc ir`."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Flags shared by every command that reads a model.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// The model file (.tn).
    pub file: PathBuf,
    /// Override a hyper-parameter: `name=value` for the model's, `function.argument=value`
    /// for a function's default. Repeatable. Values are expressions: `dim=256`,
    /// `phi=relu`, `eps=1e-6`.
    #[arg(long = "set", value_name = "NAME=VALUE")]
    pub sets: Vec<String>,
    /// Which model to compile when the file defines several.
    #[arg(long)]
    pub model: Option<String>,
}

/// The element type of products' operands: the projections, the cross-entropy's logits
/// products and their gradients compute from 16-bit operands, accumulating in f32;
/// everything else (norms, softmax, attention states, the loss, parameters and the
/// optimizer) stays f32.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PrecisionArg {
    #[default]
    F32,
    Bf16,
    F16,
}

/// Which program a bundle's forward computes (`tnc compile`, `tnc ir`): the model's
/// outputs unless one of the generation programs is asked for.
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct ProgramArgs {
    /// A generation bundle: the forward maps `tokens [B, N]` to the next token's logits
    /// `logits [B, 1, V]`; no backward. The model's loss must be `lm_loss(…)`.
    #[arg(long, conflicts_with = "train")]
    pub next_token: bool,
    /// A prefill bundle (as `tnc generate` compiles): the forward maps a prompt `tokens
    /// [B, N]` to the next token's logits and every state the decode step carries after
    /// it (`next_state.i`, `next_kv_cache.i`), computed by the chunked kernels. The value
    /// is the rows of a KV cache (softmax attention over the whole sequence).
    #[arg(long, value_name = "CONTEXT", conflicts_with_all = ["train", "next_token"], value_parser = clap::value_parser!(u32).range(1..))]
    pub prefill: Option<u32>,
    /// A decode-step bundle (as `tnc generate` compiles): the forward maps one token per
    /// sequence (`tokens [B, 1]`, `position i32[1]`) and every layer's state (`state.i`,
    /// `kv_cache.i`) to the next token's logits and the new states (`next_state.i` …).
    /// The value is the rows of a KV cache.
    #[arg(long, value_name = "CONTEXT", conflicts_with_all = ["train", "next_token", "prefill"], value_parser = clap::value_parser!(u32).range(1..))]
    pub decode_step: Option<u32>,
}

impl ProgramArgs {
    pub fn program(&self) -> tnc_compiler::pipeline::Program {
        use tnc_compiler::pipeline::Program;
        match (self.next_token, self.prefill, self.decode_step) {
            (_, _, Some(c)) => Program::DecodeStep { context: c.into() },
            (_, Some(c), _) => Program::Prefill { context: c.into() },
            (true, ..) => Program::NextToken,
            _ => Program::Model,
        }
    }
}

impl PrecisionArg {
    pub fn policy(self) -> tnc_compiler::passes::Policy {
        use tnc_compiler::passes::Policy;
        match self {
            PrecisionArg::F32 => Policy::F32,
            PrecisionArg::Bf16 => Policy::Bf16,
            PrecisionArg::F16 => Policy::F16,
        }
    }
}

/// `--backend`: the code generator of a CPU target. LLVM (the default) vectorizes and
/// writes the fastest code; Cranelift compiles several times faster and writes scalar
/// code, which suits quick experiments (the dense products run in the runtime's GEMM
/// library either way). GPU targets are LLVM's.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BackendArg {
    #[cfg_attr(feature = "llvm", default)]
    Llvm,
    #[cfg_attr(not(feature = "llvm"), default)]
    Cranelift,
}

impl BackendArg {
    pub fn codegen(self) -> tnc_compiler::backend::CodeGen {
        use tnc_compiler::backend::CodeGen;
        match self {
            BackendArg::Llvm => CodeGen::Llvm,
            BackendArg::Cranelift => CodeGen::Cranelift,
        }
    }

    /// A usage error, before anything compiles, when `target` cannot be written by this
    /// back end (Cranelift and a GPU).
    pub fn check(self, target: &str) -> Result<(), Failure> {
        let Ok(t) = tnc_compiler::backend::Target::parse(target) else { return Ok(()) };
        tnc_compiler::backend::backend_for(&t, self.codegen())
            .map(|_| ())
            .map_err(|e| Failure::usage(Diagnostic::error(e)))
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Parse, elaborate and type-check a model; print parameters, the memory a training
    /// step needs at `--batch` and `--seq`, inputs, outputs and op counts.
    Check(check::CheckArgs),
    /// Print the program after a stage of the pipeline: the graph IR after a graph pass
    /// (text or Graphviz DOT), the kernel groups after `fuse`, the memory plan after
    /// `plan_memory`, the kernels after `schedule` and every later stage.
    Ir {
        #[command(flatten)]
        model: ModelArgs,
        /// Print Graphviz DOT instead of text (graph stages).
        #[arg(long)]
        dot: bool,
        /// The stage after which to print (an unknown name lists them all, in order).
        #[arg(long, default_value = "elaborate")]
        after: String,
        /// The target whose pipeline runs: `native`, `x86-64-v3`, `x86-64-v4` (library
        /// GEMMs, chunked cross-entropy; kernel passes interchange, lanes, split_vector) or
        /// `sm80` … (thread blocks with shared memory; kernel passes tile_gemm,
        /// coalesce_rows).
        #[arg(long, default_value = "native")]
        target: String,
        /// The pipeline of a training bundle: adds the `accuracy` and `optimizer` stages.
        #[arg(long)]
        train: bool,
        #[command(flatten)]
        program: ProgramArgs,
        /// The element type of products' operands (the `precision` pass).
        #[arg(long, value_enum, default_value_t)]
        precision: PrecisionArg,
    },
    /// Run a model (FILE.tn, with the reference interpreter) or a compiled bundle (a
    /// directory) and write its outputs (and, with --grad, every parameter gradient) as
    /// safetensors.
    Run(run::RunArgs),
    /// Compile a model into a bundle for a CPU or GPU target (`--report`: print the fused
    /// kernels with estimated FLOPs and bytes and the memory plan instead).
    Compile(compile::CompileArgs),
    /// Initialize a model's parameters and buffers from a seed and write them as safetensors.
    Init(run::InitArgs),
    /// Check a compiled bundle (or a model, compiled on the fly) against the reference
    /// interpreter on random inputs: forward and every gradient.
    Verify(verify::VerifyArgs),
    /// Train a model (a .tn file, compiled with `--train` and cached, or a training
    /// bundle) with AdamW on a data source; metrics, checkpoints and a loss plot go to `--out`.
    Train(train::TrainArgs),
    /// Evaluate a training run (its latest checkpoint) or a checkpoint on a data source's
    /// validation split: loss, perplexity, bits per byte/token, accuracy on task answers.
    Eval(eval::EvalArgs),
    /// Generate text with a trained language model (a `tnc train` run or checkpoint):
    /// greedy or sampled (temperature, top-k, top-p, seed), streamed to stdout.
    Generate(generate::GenerateArgs),
    /// Train a model and variants of it with the same seed, data and budget; print a
    /// Markdown table and plot every variant's loss curve.
    Ablate(ablate::AblateArgs),
    /// Subword tokenizers for text data: `tnc tokenizer train FILES --vocab N -o
    /// tokenizer.json`, then `--tokenizer tokenizer.json` on `tnc train` and `tnc eval`.
    #[command(subcommand)]
    Tokenizer(tokenizer::TokenizerCommand),
}

/// Parse arguments and run; returns the process exit status.
pub fn run<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let result = match cli.command {
        Command::Check(args) => check::run(&args),
        Command::Ir { model, dot, after, target, train, program, precision } => {
            ir::run(&model, dot, &after, (&target, train, program.program(), precision.policy()))
        }
        Command::Run(args) => run::run(&args),
        Command::Init(args) => run::init(&args),
        Command::Verify(args) => verify::run(&args),
        Command::Compile(args) => compile::run(&args),
        Command::Train(args) => train::run(&args),
        Command::Eval(args) => eval::run(&args),
        Command::Generate(args) => generate::run(&args),
        Command::Ablate(args) => ablate::run(&args),
        Command::Tokenizer(cmd) => tokenizer::run(&cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            failure.report();
            ExitCode::from(failure.status)
        }
    }
}

/// An error that points into no source (a file, a bundle, a run), exit status 1.
pub(crate) fn fail(message: impl Into<String>) -> Failure {
    Failure { diagnostic: Diagnostic::error(message.into()), sources: SourceMap::new(), status: 1 }
}

/// A clap value parser for counts (batches, sequences, tokens) of at least `MIN`: fewer
/// would compute a loss over nothing (NaN) and report it as a result.
pub(crate) fn count_at_least<const MIN: usize>(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(v) if v >= MIN => Ok(v),
        Ok(_) => Err(format!("must be at least {MIN}")),
        Err(e) => Err(e.to_string()),
    }
}

/// A failed command: the diagnostic, the sources it points into, and the exit status.
pub struct Failure {
    pub diagnostic: Diagnostic,
    pub sources: SourceMap,
    pub status: u8,
}

impl Failure {
    pub fn usage(d: Diagnostic) -> Failure {
        Failure { diagnostic: d, sources: SourceMap::new(), status: 2 }
    }

    fn report(&self) {
        print_diagnostic(&self.diagnostic, &self.sources);
    }
}

/// Print a diagnostic to stderr, in colour on a terminal (unless `NO_COLOR` is set).
pub(crate) fn print_diagnostic(d: &Diagnostic, sources: &SourceMap) {
    let stderr = std::io::stderr();
    if stderr.is_terminal() && std::env::var_os("NO_COLOR").is_none() {
        let mut out = codespan_reporting::term::termcolor::StandardStream::stderr(
            codespan_reporting::term::termcolor::ColorChoice::Always,
        );
        d.emit(sources, &mut out);
    } else {
        eprint!("{}", d.render(sources));
    }
}

/// Warn on stderr about what recognition left unfused (`tnc_compiler::lint`), with its
/// cost per token at `batch`, `seq`. A graph that fails the passes gets its error later.
pub(crate) fn warn_unfused(g: &Graph, sources: &SourceMap, batch: i64, seq: i64) {
    if let Some(Ok(recognized)) = tnc_compiler::passes::run_until(g.clone(), "recognize") {
        for w in tnc_compiler::lint::unfused_state_warnings(&recognized, batch, seq) {
            print_diagnostic(&w, sources);
        }
    }
}

/// Load and elaborate the model named on the command line.
pub fn elaborate(args: &ModelArgs) -> Result<(Graph, SourceMap), Failure> {
    let req = Request { sets: &args.sets, model: args.model.as_deref() };
    let (sources, result) = frontend::elaborate(Input::Path(&args.file), &req);
    match result {
        Ok(g) => Ok((g, sources)),
        Err(d) => {
            let status = if frontend::is_usage_error(&d, &sources) { 2 } else { 1 };
            Err(Failure { diagnostic: d, sources, status })
        }
    }
}
