//! Tensors in and out of safetensors files (parameters, checkpoints, reference values).

use super::tensor::Tensor;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::path::Path;

/// The element type to store. Interpreter tensors are f64; `F32` is what bundles use,
/// `F64` keeps reference values exact, `I32` is for token ids (values must be integers
/// in i32 range).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileDType {
    F32,
    F64,
    I32,
}

pub fn write_safetensors(path: &Path, tensors: &[(String, &Tensor)], dtype: FileDType) -> Result<(), String> {
    let file = path.display();
    let mut bufs: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let bytes = match dtype {
            FileDType::F32 => t.data.iter().flat_map(|&x| (x as f32).to_le_bytes()).collect(),
            FileDType::F64 => t.data.iter().flat_map(|&x| x.to_le_bytes()).collect(),
            FileDType::I32 => {
                let mut b = Vec::with_capacity(t.data.len() * 4);
                for &x in &t.data {
                    if x.fract() != 0.0 || x < i32::MIN as f64 || x > i32::MAX as f64 {
                        return Err(format!("{file}: tensor `{name}` holds {x}, which is not an i32"));
                    }
                    b.extend((x as i32).to_le_bytes());
                }
                b
            }
        };
        bufs.push((name.clone(), t.shape.clone(), bytes));
    }
    let st_dtype = match dtype {
        FileDType::F32 => Dtype::F32,
        FileDType::F64 => Dtype::F64,
        FileDType::I32 => Dtype::I32,
    };
    let mut views = Vec::with_capacity(bufs.len());
    for (name, shape, bytes) in &bufs {
        let view =
            TensorView::new(st_dtype, shape.clone(), bytes).map_err(|e| format!("{file}: tensor `{name}`: {e}"))?;
        views.push((name.clone(), view));
    }
    safetensors::serialize_to_file(views, None, path).map_err(|e| format!("{file}: {e}"))
}

/// Parameters from a safetensors file, as bundles take them (`Executor::set_params_from_file`):
/// floats only — F32, F64, or BF16/F16 widened exactly — so that a file the compiled model
/// refuses (integer tensors) is refused by the interpreter too.
pub fn read_params(path: &Path) -> Result<Vec<(String, Tensor)>, String> {
    read_tensors(path, |name, view| match view.dtype() {
        Dtype::BF16 => {
            Ok(view.data().chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64()).collect())
        }
        Dtype::F16 => {
            Ok(view.data().chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64()).collect())
        }
        other => floats(view)
            .ok_or_else(|| format!("parameter `{name}` is stored as {other:?}; expected F32, F64, BF16 or F16")),
    })
}

/// Every tensor of a safetensors file of F32, F64 or I32 tensors, in file order.
pub fn read_safetensors(path: &Path) -> Result<Vec<(String, Tensor)>, String> {
    read_tensors(path, |name, view| match view.dtype() {
        Dtype::I32 => {
            Ok(view.data().chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64).collect())
        }
        other => floats(view)
            .ok_or_else(|| format!("tensor `{name}` has element type {other:?}; only F32, F64 and I32 are supported")),
    })
}

/// An F32 or F64 tensor's values (`None` for any other element type).
fn floats(view: &TensorView<'_>) -> Option<Vec<f64>> {
    let raw = view.data();
    match view.dtype() {
        Dtype::F32 => Some(raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64).collect()),
        Dtype::F64 => Some(
            raw.chunks_exact(8).map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])).collect(),
        ),
        _ => None,
    }
}

/// Every tensor of a safetensors file in file order, its values from `values` (which says
/// which element types the caller takes).
fn read_tensors(
    path: &Path,
    values: impl Fn(&str, &TensorView<'_>) -> Result<Vec<f64>, String>,
) -> Result<Vec<(String, Tensor)>, String> {
    let file = path.display();
    let bytes = std::fs::read(path).map_err(|e| format!("{file}: {e}"))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| format!("{file}: {e}"))?;
    let mut out = Vec::with_capacity(st.len());
    // Keep the order of data offsets (file order) rather than the hash order.
    let mut entries = st.tensors();
    entries.sort_by_key(|(_, v)| v.data().as_ptr() as usize);
    for (name, view) in entries {
        let data = values(&name, &view).map_err(|e| format!("{file}: {e}"))?;
        let t = Tensor::new(view.shape().to_vec(), data).map_err(|e| format!("{file}: tensor `{name}`: {e}"))?;
        out.push((name, t));
    }
    Ok(out)
}
