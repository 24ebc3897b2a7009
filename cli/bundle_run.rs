//! `tnc run BUNDLE` and `tnc verify`: compiled bundles through the runtime, with the same
//! flags as the interpreter path so outputs can be compared.

use crate::fail;
use crate::run::{DTypeArg, RunArgs};
use crate::Failure;
use std::collections::HashMap;
use std::path::Path;
use tnc_compiler::interp::{self, FileDType, Tensor};
use tnc_runtime::manifest::DType;

pub fn is_bundle(path: &Path) -> bool {
    path.is_dir() && path.join("manifest.json").is_file()
}

/// An interpreter tensor (f64) as a runtime tensor of the given element type.
pub fn to_runtime(t: &Tensor, dtype: DType) -> tnc_runtime::Tensor {
    match dtype {
        DType::I32 => tnc_runtime::Tensor::i32(t.shape.clone(), t.data.iter().map(|&x| x as i32).collect()),
        _ => tnc_runtime::Tensor::f32(t.shape.clone(), t.data.iter().map(|&x| x as f32).collect()),
    }
}

/// A runtime tensor as an interpreter tensor.
pub fn from_runtime(t: &tnc_runtime::Tensor) -> Tensor {
    let data: Vec<f64> = match &t.data {
        tnc_runtime::TensorData::F32(v) => v.iter().map(|&x| x as f64).collect(),
        tnc_runtime::TensorData::I32(v) => v.iter().map(|&x| x as f64).collect(),
        tnc_runtime::TensorData::U8(v) => v.iter().map(|&x| x as f64).collect(),
    };
    Tensor { shape: t.shape.clone(), data }
}

/// Where a bundle runs.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Device {
    /// CPU threads (bundles for `native`, `x86-64-v3`, `x86-64-v4`).
    #[default]
    Cpu,
    /// An NVIDIA GPU through the CUDA driver (bundles for `sm80` … `sm90a`).
    Cuda,
}

/// The runtime's executor for either device, behind one interface.
enum Machine {
    Cpu(tnc_runtime::Executor),
    Cuda(Box<tnc_runtime::CudaExecutor>),
}

macro_rules! both {
    ($m:expr, $e:ident => $body:expr) => {
        match $m {
            Machine::Cpu($e) => $body,
            Machine::Cuda($e) => $body,
        }
    };
}

impl Machine {
    fn load(dir: &Path, device: Device, threads: usize) -> Result<Machine, Failure> {
        let at = |e: tnc_runtime::BundleError| fail(format!("{}: {e}", dir.display()));
        Ok(match device {
            Device::Cpu => {
                let bundle = tnc_runtime::Bundle::load_cpu(dir).map_err(at)?;
                Machine::Cpu(tnc_runtime::Executor::new(&bundle, threads).map_err(|e| fail(e.to_string()))?)
            }
            Device::Cuda => {
                let bundle = tnc_runtime::Bundle::load(dir).map_err(at)?;
                Machine::Cuda(Box::new(tnc_runtime::CudaExecutor::new(&bundle).map_err(|e| fail(e.to_string()))?))
            }
        })
    }
}

/// Load a bundle, bind parameters, run forward (and backward), return every output.
pub fn execute(
    dir: &Path,
    device: Device,
    inputs: &HashMap<String, Tensor>,
    params: Params<'_>,
    grad: bool,
    threads: usize,
) -> Result<Vec<(String, Tensor)>, Failure> {
    let mut exec = Machine::load(dir, device, threads)?;
    match params {
        Params::File(p) => both!(&mut exec, x => x.set_params_from_file(p)).map_err(|e| fail(e.to_string()))?,
        Params::Seed(s) => both!(&mut exec, x => x.set_params_from_seed(s)).map_err(|e| fail(e.to_string()))?,
        Params::Values(values) => {
            let dir_tmp = std::env::temp_dir().join(format!("tnc-params-{}.safetensors", std::process::id()));
            let refs: Vec<(String, &Tensor)> = values.iter().map(|(n, t)| (n.clone(), t)).collect();
            interp::write_safetensors(&dir_tmp, &refs, FileDType::F32).map_err(fail)?;
            let r = both!(&mut exec, x => x.set_params_from_file(&dir_tmp)).map_err(|e| fail(e.to_string()));
            let _ = std::fs::remove_file(&dir_tmp);
            r?;
        }
    }
    let manifest = both!(&exec, x => x.manifest().clone());
    let mut owned = Vec::new();
    for io in manifest.inputs.iter().filter(|io| io.entry == "forward") {
        let t = inputs.get(&io.name).ok_or_else(|| fail(format!("missing input `{}`", io.name)))?;
        owned.push((io.name.clone(), to_runtime(t, io.dtype)));
    }
    let refs: Vec<(&str, &tnc_runtime::Tensor)> = owned.iter().map(|(n, t)| (n.as_str(), t)).collect();
    both!(&mut exec, x => x.forward(&refs)).map_err(|e| fail(e.to_string()))?;
    if grad {
        both!(&mut exec, x => x.backward(&[])).map_err(|e| fail(e.to_string()))?;
    }
    let mut out = Vec::new();
    for io in manifest.outputs.iter().filter(|io| grad || io.entry == "forward") {
        let t = both!(&exec, x => x.output(&io.name)).map_err(|e| fail(e.to_string()))?;
        out.push((io.name.clone(), from_runtime(&t)));
    }
    Ok(out)
}

pub enum Params<'a> {
    File(&'a Path),
    Seed(u64),
    Values(Vec<(String, Tensor)>),
}

pub fn run(args: &RunArgs) -> Result<(), Failure> {
    let inputs: HashMap<String, Tensor> = interp::read_safetensors(&args.inputs).map_err(fail)?.into_iter().collect();
    let params = match &args.params {
        Some(p) => Params::File(p),
        None => Params::Seed(args.seed.unwrap_or(0)),
    };
    let outputs = execute(&args.model.file, args.device, &inputs, params, args.grad, args.threads)?;
    let refs: Vec<(String, &Tensor)> = outputs.iter().map(|(n, t)| (n.clone(), t)).collect();
    let dtype = match args.dtype {
        DTypeArg::F32 => FileDType::F32,
        DTypeArg::F64 => FileDType::F64,
    };
    interp::write_safetensors(&args.out, &refs, dtype).map_err(fail)?;
    for (name, t) in outputs.iter().filter(|(_, t)| t.numel() == 1) {
        println!("{name} = {}", t.data[0]);
    }
    println!("wrote {} tensors to {}", outputs.len(), args.out.display());
    Ok(())
}
