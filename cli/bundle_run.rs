//! `tnc run BUNDLE` and `tnc verify`: compiled bundles through the runtime, with the same
//! inputs and outputs as the interpreter so the two can be compared.

use crate::device::{self, DeviceArg};
use crate::fail;
use crate::Failure;
use std::collections::HashMap;
use std::path::Path;
use tnc_compiler::interp::{self, FileDType, Tensor};
use tnc_grammar::Diagnostic;
use tnc_runtime::manifest::DType;

/// A directory is run as a bundle (one without a manifest is refused as not a bundle);
/// a file as a model.
pub fn is_bundle(path: &Path) -> bool {
    path.is_dir()
}

/// An interpreter tensor (f64) as a runtime tensor of the given element type; an i32
/// input must hold integers that fit (1.5 or NaN is an error, never truncated).
pub fn to_runtime(t: &Tensor, dtype: DType) -> Result<tnc_runtime::Tensor, String> {
    Ok(match dtype {
        DType::I32 => {
            let ints = t.data.iter().map(|&x| {
                let fits = x.fract() == 0.0 && (i32::MIN as f64..=i32::MAX as f64).contains(&x);
                fits.then_some(x as i32).ok_or(x)
            });
            let v = ints.collect::<Result<Vec<i32>, f64>>().map_err(|x| format!("holds {x}, not an i32"))?;
            tnc_runtime::Tensor::i32(t.shape.clone(), v)
        }
        _ => tnc_runtime::Tensor::f32(t.shape.clone(), t.data.iter().map(|&x| x as f32).collect()),
    })
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

/// Load a bundle, bind parameters, run forward (and backward) on `device` (default: where
/// the bundle's target runs), return every output.
pub fn execute(
    dir: &Path,
    device: Option<DeviceArg>,
    inputs: &HashMap<String, Tensor>,
    params: Params<'_>,
    grad: bool,
    threads: usize,
) -> Result<Vec<(String, Tensor)>, Failure> {
    let bundle = device::load(dir)?;
    let device = device.unwrap_or_else(|| DeviceArg::for_target(&bundle.manifest.target.name));
    device.check(&bundle.manifest.target.name)?;
    let mut exec = device::open(&bundle, device, threads)?;
    match params {
        Params::File(p) => exec.set_params_from_file(p).map_err(|e| fail(e.to_string()))?,
        Params::Seed(s) => exec.set_params_from_seed(s).map_err(|e| fail(e.to_string()))?,
        Params::Values(values) => {
            let dir_tmp = std::env::temp_dir().join(format!("tnc-params-{}.safetensors", std::process::id()));
            let refs: Vec<(String, &Tensor)> = values.iter().map(|(n, t)| (n.clone(), t)).collect();
            interp::write_safetensors(&dir_tmp, &refs, FileDType::F32).map_err(fail)?;
            let r = exec.set_params_from_file(&dir_tmp).map_err(|e| fail(e.to_string()));
            let _ = std::fs::remove_file(&dir_tmp);
            r?;
        }
    }
    let manifest = exec.manifest().clone();
    if grad && !manifest.entry_points.get("backward").is_some_and(|s| !s.is_empty()) {
        return Err(Failure::usage(
            Diagnostic::error(format!("{} has no backward pass: it computes no gradients", dir.display())).with_hint(
                "drop `--grad`, or compile the model without `--next-token` / `--decode-step` / `--prefill`",
            ),
        ));
    }
    let expected: Vec<&str> =
        manifest.inputs.iter().filter(|io| io.entry == "forward").map(|io| io.name.as_str()).collect();
    if let Some(extra) = inputs.keys().filter(|n| !expected.contains(&n.as_str())).min() {
        return Err(fail(format!("the bundle has no input `{extra}` (its inputs are {expected:?})")));
    }
    let mut owned = Vec::new();
    for io in manifest.inputs.iter().filter(|io| io.entry == "forward") {
        let t = inputs.get(&io.name).ok_or_else(|| fail(format!("missing input `{}`", io.name)))?;
        // An empty batch or sequence computes a loss over nothing: NaN, never a result.
        if t.shape.contains(&0) {
            return Err(fail(format!("input `{}` is empty (shape {:?})", io.name, t.shape)));
        }
        owned.push((io.name.clone(), to_runtime(t, io.dtype).map_err(|e| fail(format!("input `{}` {e}", io.name)))?));
    }
    let refs: Vec<(&str, &tnc_runtime::Tensor)> = owned.iter().map(|(n, t)| (n.as_str(), t)).collect();
    exec.forward(&refs).map_err(|e| fail(e.to_string()))?;
    if grad {
        exec.backward(&[]).map_err(|e| fail(e.to_string()))?;
    }
    let mut out = Vec::new();
    for io in manifest.outputs.iter().filter(|io| grad || io.entry == "forward") {
        let t = exec.output(&io.name).map_err(|e| fail(e.to_string()))?;
        out.push((io.name.clone(), from_runtime(&t)));
    }
    Ok(out)
}

pub enum Params<'a> {
    File(&'a Path),
    Seed(u64),
    Values(Vec<(String, Tensor)>),
}
