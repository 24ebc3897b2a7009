//! Parameter initialization, deterministic across machines: element `i` of parameter `p`
//! draws from the counter-based generator keyed by `(seed, stable_hash(p.name))` at
//! counter `(i, 0)`, so a parameter's values depend only on the seed and its name —
//! not on the order parameters were declared in, nor on other parameters' sizes.

use super::eval::{evaluate, EvalOptions};
use super::tensor::{checked_numel, Tensor};
use crate::ir::{Graph, Init, ParamInfo};
use std::collections::HashMap;
use tnc_bundle::init;
use tnc_bundle::manifest::InitSpec;

/// Initial values of every parameter and buffer of `g`, in `g.params` order.
pub fn init_params(g: &Graph, seed: u64) -> Result<Vec<Tensor>, String> {
    g.params.iter().map(|p| init_param(p, seed)).collect()
}

pub fn init_param(p: &ParamInfo, seed: u64) -> Result<Tensor, String> {
    let shape: Vec<usize> =
        p.ty.shape
            .iter()
            .map(|d| {
                d.as_const()
                    .and_then(|c| usize::try_from(c).ok())
                    .ok_or_else(|| format!("parameter `{}` has a non-constant size `{d}`", p.name))
            })
            .collect::<Result<_, _>>()?;
    let n = checked_numel(&shape).map_err(|e| format!("parameter `{}`: {e}", p.name))?;
    let spec = match &p.init {
        Init::Zeros => InitSpec::Zeros,
        Init::Ones => InitSpec::Ones,
        Init::Constant(c) => InitSpec::Constant(*c),
        Init::Normal { mean, std } => InitSpec::Normal { mean: *mean, std: *std },
        Init::Uniform { lo, hi } => InitSpec::Uniform { lo: *lo, hi: *hi },
        Init::Xavier { gain } => InitSpec::Xavier { gain: *gain },
        Init::Computed(graph) => return computed(p, graph, shape),
    };
    // Shared with the runtime (`tnc_bundle::init`), so bundles initialize bit for bit alike.
    let data = init::init_values(&spec, &shape, &p.name, p.seed.unwrap_or(seed))
        .map_err(|e| format!("parameter `{}`: {e}", p.name))?;
    debug_assert_eq!(data.len(), n);
    Tensor::new(shape, data)
}

/// `sqrt(6 / (fan_in + fan_out))` for a `[…, fan_in, fan_out]` weight, both fans scaled
/// by the product of the leading axes (see [`Init::Xavier`]).
pub fn xavier_bound(shape: &[usize]) -> Result<f64, String> {
    init::xavier_bound(shape).map_err(|e| e.to_string())
}

fn computed(p: &ParamInfo, graph: &Graph, shape: Vec<usize>) -> Result<Tensor, String> {
    if !graph.inputs.is_empty() || !graph.params.is_empty() || graph.outputs.len() != 1 {
        return Err(format!("the initializer of `{}` must be a constant graph with one output", p.name));
    }
    let ev = evaluate(graph, &HashMap::new(), &[], &EvalOptions::default())
        .map_err(|e| format!("initializer of `{}`: {e}", p.name))?;
    let out = ev.get(graph.outputs[0].1).ok_or_else(|| format!("initializer of `{}` has no value", p.name))?;
    if out.shape != shape {
        return Err(format!(
            "the initializer of `{}` gives shape {:?}, the parameter has {shape:?}",
            p.name, out.shape
        ));
    }
    Ok(out.clone())
}
