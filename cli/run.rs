//! `tnc run` and `tnc init` with the reference interpreter.

use crate::bundle_run::{execute, Params};
use crate::{elaborate, fail, Failure, ModelArgs};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tnc_compiler::interp::{self, EvalOptions, FileDType, Precision, Tensor};
use tnc_compiler::passes;
use tnc_grammar::SourceMap;

#[derive(clap::ValueEnum, Clone, Copy, Debug, Default)]
pub enum DTypeArg {
    #[default]
    F32,
    F64,
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Input tensors by name (safetensors).
    #[arg(long)]
    pub inputs: PathBuf,
    /// Parameters by name (safetensors); without it, parameters are initialized from --seed.
    #[arg(long, conflicts_with = "seed")]
    pub params: Option<PathBuf>,
    /// Seed for parameter initialization.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Where to write every output (and with --grad every parameter gradient `grad.<name>`).
    #[arg(long)]
    pub out: PathBuf,
    /// Also compute the gradient of `loss` with respect to every parameter.
    #[arg(long)]
    pub grad: bool,
    /// Arithmetic precision of the interpreter, and the element type written.
    #[arg(long, value_enum, default_value_t)]
    pub dtype: DTypeArg,
    /// CPU threads for a compiled bundle (results are bitwise identical for a given count).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Where a compiled bundle runs (default: where its target runs: the CPU, or CUDA for
    /// a GPU bundle). The interpreter always runs on the CPU.
    #[arg(long, value_enum)]
    pub device: Option<crate::device::DeviceArg>,
    /// With the interpreter: the element type of products' operands (the model is then
    /// run as compiled: the whole pass pipeline, with `precision`).
    #[arg(long, value_enum, default_value_t)]
    pub precision: crate::PrecisionArg,
}

#[derive(clap::Args, Debug)]
pub struct InitArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Seed for parameter initialization.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where to write the parameters and buffers (safetensors).
    #[arg(long)]
    pub out: PathBuf,
    /// Element type written.
    #[arg(long, value_enum, default_value_t)]
    pub dtype: DTypeArg,
}

/// Errors about data files have no place in the model source.
fn file_dtype(d: DTypeArg) -> FileDType {
    match d {
        DTypeArg::F32 => FileDType::F32,
        DTypeArg::F64 => FileDType::F64,
    }
}

fn write(path: &Path, tensors: &[(String, Tensor)], dtype: DTypeArg) -> Result<(), Failure> {
    let refs: Vec<(String, &Tensor)> = tensors.iter().map(|(n, t)| (n.clone(), t)).collect();
    interp::write_safetensors(path, &refs, file_dtype(dtype)).map_err(fail)
}

pub fn run(args: &RunArgs) -> Result<(), Failure> {
    if crate::bundle_run::is_bundle(&args.model.file) {
        if args.precision != crate::PrecisionArg::F32 {
            return Err(Failure::usage(
                tnc_grammar::Diagnostic::error(
                    "`--precision` applies to a model file; a bundle keeps the precision it was compiled with",
                )
                .with_hint("compile it with `tnc compile --precision …`"),
            ));
        }
        let inputs: HashMap<String, Tensor> =
            interp::read_safetensors(&args.inputs).map_err(fail)?.into_iter().collect();
        let params = match &args.params {
            Some(p) => Params::File(p),
            None => Params::Seed(args.seed.unwrap_or(0)),
        };
        let outputs = execute(&args.model.file, args.device, &inputs, params, args.grad, args.threads)?;
        return write_outputs(&args.out, &outputs, args.dtype);
    }
    let (graph, _) = elaborate(&args.model)?;
    let failure = |d| Failure { diagnostic: d, sources: SourceMap::new(), status: 1 };
    let graph = if args.precision != crate::PrecisionArg::F32 {
        // The model as compiled with that precision (gradients included; dropped unless asked).
        let last = passes::names().last().copied().unwrap_or("elaborate");
        let mut g = passes::run_until_with(graph, last, args.precision.policy())
            .expect("the last pass exists")
            .map_err(failure)?;
        if !args.grad {
            g.outputs.retain(|(name, _)| !name.starts_with("grad."));
            tnc_compiler::ir::rewrite::remove_dead(&mut g);
        }
        g
    } else if args.grad {
        passes::differentiate_loss(graph).map_err(failure)?
    } else {
        graph
    };
    let inputs: HashMap<String, Tensor> = interp::read_safetensors(&args.inputs).map_err(fail)?.into_iter().collect();
    interp::check_inputs(&graph, &inputs).map_err(fail)?;
    let params = match &args.params {
        Some(p) => {
            let named = interp::read_params(p).map_err(fail)?;
            interp::bind_params(&graph, named).map_err(|e| fail(format!("{}: {e}", p.display())))?
        }
        None => interp::init_params(&graph, args.seed.unwrap_or(0)).map_err(fail)?,
    };
    let precision = match args.dtype {
        DTypeArg::F32 => Precision::F32,
        DTypeArg::F64 => Precision::F64,
    };
    let opts = EvalOptions { precision, ..EvalOptions::default() };
    let eval = interp::evaluate(&graph, &inputs, &params, &opts).map_err(fail)?;
    write_outputs(&args.out, &eval.outputs(&graph), args.dtype)
}

/// Writes `outputs` to `path` and prints the scalar ones.
fn write_outputs(path: &Path, outputs: &[(String, Tensor)], dtype: DTypeArg) -> Result<(), Failure> {
    write(path, outputs, dtype)?;
    for (name, t) in outputs.iter().filter(|(_, t)| t.numel() == 1) {
        println!("{name} = {}", t.data[0]);
    }
    println!("wrote {} tensors to {}", outputs.len(), path.display());
    Ok(())
}

pub fn init(args: &InitArgs) -> Result<(), Failure> {
    let (graph, _) = elaborate(&args.model)?;
    let params = interp::init_params(&graph, args.seed).map_err(fail)?;
    let named: Vec<(String, Tensor)> = graph.params.iter().map(|p| p.name.clone()).zip(params).collect();
    write(&args.out, &named, args.dtype)?;
    println!("wrote {} parameters and buffers to {}", named.len(), args.out.display());
    Ok(())
}
