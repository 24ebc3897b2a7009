//! `tnc verify`: a compiled bundle against the reference interpreter, on random inputs
//! and parameters, forward and every gradient. Prints the closeness of every tensor and
//! exits with status 1 on a mismatch.

use crate::bundle_run::{execute, is_bundle, Params};
use crate::device::DeviceArg;
use crate::{elaborate, fail, Failure, ModelArgs};
use std::collections::HashMap;
use std::path::PathBuf;
use tnc_compiler::interp::{self, compare, EvalOptions, Tensor};
use tnc_compiler::ir::{DType, Graph, Op};
use tnc_grammar::Diagnostic;
use tnc_runtime::rng;

#[derive(clap::Args, Debug)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// When FILE is a bundle: the model it was compiled from (with the same --set).
    #[arg(long)]
    pub source: Option<PathBuf>,
    /// Target to compile for when FILE is a model (default: `native` on the CPU, `sm80`
    /// with `--device cuda` or `--device emulated`).
    #[arg(long)]
    pub target: Option<String>,
    /// Where the bundle runs.
    #[arg(long, value_enum, default_value_t)]
    pub device: DeviceArg,
    /// The code generator when FILE is a model compiled for a CPU: `llvm` or `cranelift`.
    #[arg(long, value_enum, default_value_t)]
    pub backend: crate::BackendArg,
    /// How a model compiled for a GPU computes dense products: `tiles` or `cublas`
    /// (`--device emulated` runs cuBLAS's calls on the host).
    #[arg(long, value_enum, default_value_t)]
    pub gemm: crate::compile::GemmArg,
    #[arg(long, default_value_t = 2, value_parser = crate::count_at_least::<1>)]
    pub batch: usize,
    /// Tokens per sequence (at least 2: a language model's loss predicts token i + 1 from i).
    #[arg(long, default_value_t = 13, value_parser = crate::count_at_least::<2>)]
    pub seq: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Largest relative L2 error accepted per tensor. Default: 1e-4 for f32 kernels
    /// against the f64 interpreter; 1e-2 with 16-bit products, where a value computed in
    /// another order can round to the neighbouring 16-bit number (a relative change of
    /// 2^-8 in bf16), which ill-conditioned gradients amplify. A tensor whose every
    /// element is within 1e-6 of the reference passes whatever its relative error (small
    /// gradients).
    #[arg(long, value_parser = tnc_train::flags::positive)]
    pub tol: Option<f64>,
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// The element type of products' operands. Other than f32, the reference is the
    /// interpreter on the model as compiled (its products' operands rounded the same way),
    /// in f32.
    #[arg(long, value_enum, default_value_t)]
    pub precision: crate::PrecisionArg,
}

/// Rows of the tables an integer input indexes (so random ids stay in range).
fn id_range(g: &Graph, input: usize) -> usize {
    let node = g.inputs[input].node;
    g.dag
        .node_indices()
        .filter(|&n| matches!(g.node(n).op, Op::Gather) && g.operands(n).get(1) == Some(&node))
        .filter_map(|n| g.ty(g.operands(n)[0]).shape[0].as_const())
        .min()
        .unwrap_or(2) as usize
}

pub fn run(args: &VerifyArgs) -> Result<(), Failure> {
    let bundle_given = is_bundle(&args.model.file);
    if bundle_given && args.gemm != crate::compile::GemmArg::Tiles {
        return Err(Failure::usage(
            Diagnostic::error("`--gemm` applies to a model file; a bundle keeps the products it was compiled with")
                .with_hint("compile it with `tnc compile --gemm …`"),
        ));
    }
    let source_args = if bundle_given {
        let Some(src) = &args.source else {
            return Err(Failure::usage(
                Diagnostic::error("verifying a bundle needs the model it was compiled from")
                    .with_hint("pass `--source MODEL.tn` with the same `--set` values"),
            ));
        };
        ModelArgs { file: src.clone(), ..args.model.clone() }
    } else {
        args.model.clone()
    };
    let (graph, _) = elaborate(&source_args)?;
    let bundle_dir = if bundle_given {
        args.model.file.clone()
    } else {
        let dir = std::env::temp_dir().join(format!("tnc-verify-{}.tnb", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let target = args.target.as_deref().unwrap_or(args.device.default_target());
        args.device.check(target)?;
        args.backend.check(target)?;
        args.gemm.check(&crate::compile::parse_target(target)?)?;
        let opts = tnc_compiler::driver::Options {
            precision: args.precision.policy(),
            codegen: args.backend.codegen(),
            gemm: args.gemm.gemm(),
            ..Default::default()
        };
        tnc_compiler::driver::compile(graph.clone(), target, &dir, opts, Vec::new()).map_err(fail)?;
        dir
    };
    let narrowed = args.precision != crate::PrecisionArg::F32;
    let reference = if narrowed {
        let last = tnc_compiler::passes::names().last().copied().unwrap_or("elaborate");
        tnc_compiler::passes::run_until_with(graph, last, args.precision.policy()).expect("the last pass exists")
    } else {
        tnc_compiler::passes::differentiate_loss(graph)
    }
    .map_err(|d| fail(d.message))?;
    // Random inputs and parameters (initial values plus noise, so biases are not zero).
    let mut inputs = HashMap::new();
    for (i, inp) in reference.inputs.iter().enumerate() {
        let shape: Vec<usize> = inp
            .ty
            .shape
            .iter()
            .map(|d| {
                d.eval(&|s| Some(if s == "B" { args.batch as i64 } else { args.seq as i64 })).unwrap_or(1) as usize
            })
            .collect();
        let n: usize = shape.iter().product();
        let stream = rng::stable_hash(&inp.name);
        let data = if inp.ty.dtype == DType::I32 {
            let range = id_range(&reference, i) as f64;
            (0..n).map(|j| (rng::uniform(args.seed, stream, j as u64, 0) * range).floor()).collect()
        } else {
            (0..n).map(|j| rng::normal(args.seed, stream, j as u64, 0)).collect()
        };
        inputs.insert(inp.name.clone(), Tensor::new(shape, data).map_err(fail)?);
    }
    let mut params = interp::init_params(&reference, args.seed).map_err(fail)?;
    for (p, t) in reference.params.iter().zip(params.iter_mut()) {
        let stream = rng::stable_hash(&format!("verify/{}", p.name));
        for (j, v) in t.data.iter_mut().enumerate() {
            *v = ((*v + 0.1 * rng::normal(args.seed, stream, j as u64, 1)) as f32) as f64;
        }
    }
    let precision = if narrowed { interp::Precision::F32 } else { interp::Precision::F64 };
    let eval = EvalOptions { precision, ..EvalOptions::default() };
    let want = interp::evaluate(&reference, &inputs, &params, &eval).map_err(fail)?.outputs(&reference);
    let named: Vec<(String, Tensor)> = reference.params.iter().map(|p| p.name.clone()).zip(params).collect();
    let got: HashMap<String, Tensor> =
        execute(&bundle_dir, Some(args.device), &inputs, Params::Values(named), true, args.threads)?
            .into_iter()
            .collect();
    let tol = args.tol.unwrap_or(if narrowed { 1e-2 } else { 1e-4 });
    let mut bad = 0;
    println!("{:<40} {:>12} {:>12}  verdict", "tensor", "rel L2", "max abs");
    for (name, w) in &want {
        let Some(g) = got.get(name) else {
            println!("{name:<40} missing from the bundle's outputs");
            bad += 1;
            continue;
        };
        let mut g = g.clone();
        g.shape = w.shape.clone();
        let c = compare(&g, w);
        // Small gradients are judged by absolute error: every element within 1e-6.
        let ok = c.within(tol) || (c.max_abs < 1e-6 && !c.has_nan);
        bad += usize::from(!ok);
        println!("{name:<40} {:>12.3e} {:>12.3e}  {}", c.rel_l2, c.max_abs, if ok { "ok" } else { "MISMATCH" });
    }
    if !bundle_given {
        let _ = std::fs::remove_dir_all(&bundle_dir);
    }
    if bad > 0 {
        return Err(fail(format!("{bad} of {} tensors differ by more than {tol} (relative L2)", want.len())));
    }
    println!("all {} tensors match within {tol} (B = {}, N = {})", want.len(), args.batch, args.seq);
    Ok(())
}
