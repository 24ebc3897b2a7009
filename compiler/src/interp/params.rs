//! Binding named tensors (from a safetensors file) to a graph's parameters and inputs,
//! with errors that name the tensor and both shapes.

use super::tensor::Tensor;
use crate::ir::{DType, Graph};
use std::collections::HashMap;

/// Order `named` tensors as `g.params`. Every parameter and buffer must be present with
/// its exact shape; unknown names are errors too (a typo would otherwise be ignored).
pub fn bind_params(g: &Graph, named: Vec<(String, Tensor)>) -> Result<Vec<Tensor>, String> {
    let mut by_name: HashMap<String, Tensor> = named.into_iter().collect();
    let mut out = Vec::with_capacity(g.params.len());
    for p in &g.params {
        let t = by_name
            .remove(&p.name)
            .ok_or_else(|| format!("the parameter file has no tensor `{}` ({})", p.name, p.ty))?;
        let expected: Vec<usize> = p.ty.shape.iter().map(|d| d.as_const().unwrap_or(-1) as usize).collect();
        if t.shape != expected {
            return Err(format!(
                "parameter `{}` should have shape {:?} but the file has {:?}",
                p.name, expected, t.shape
            ));
        }
        out.push(t);
    }
    if let Some(extra) = by_name.keys().min() {
        return Err(format!("the parameter file has a tensor `{extra}` that the model does not declare"));
    }
    Ok(out)
}

/// Check that every input of `g` is present and not empty; integer inputs must hold
/// integers.
pub fn check_inputs(g: &Graph, inputs: &HashMap<String, Tensor>) -> Result<(), String> {
    for i in &g.inputs {
        let t = inputs.get(&i.name).ok_or_else(|| format!("missing input `{}` ({})", i.name, i.ty))?;
        // An empty batch or sequence computes a loss over nothing: NaN, never a result.
        if t.shape.contains(&0) {
            return Err(format!("input `{}` is empty (shape {:?}; {})", i.name, t.shape, i.ty));
        }
        if i.ty.dtype == DType::I32 && t.data.iter().any(|x| x.fract() != 0.0) {
            return Err(format!("input `{}` must hold integers ({})", i.name, i.ty));
        }
    }
    Ok(())
}
