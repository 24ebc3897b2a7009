//! Running a schedule with the reference kernel executor, for tests: the whole program
//! (forward then backward) on host memory, buffers filled with NaN first so that an
//! element no kernel writes shows up as a mismatch.

use super::Schedule;
use crate::interp::Tensor;
use crate::kernel::exec::{self, Buffer};
use crate::kernel::Elem;
use std::collections::HashMap;

/// Evaluate `schedule` with the given size values, inputs and parameters (as f64
/// tensors, converted to f32), and dropout `Some((seed, step))` in training or `None` in
/// evaluation. Returns the outputs by name.
pub fn run(
    s: &Schedule,
    sizes: &HashMap<String, i64>,
    inputs: &[Tensor],
    params: &[Tensor],
    dropout: Option<(u64, u64)>,
) -> Result<HashMap<String, Tensor>, String> {
    let mut args: Vec<i64> = s
        .sizes
        .iter()
        .map(|n| sizes.get(n).copied().ok_or(format!("no value for size `{n}`")))
        .collect::<Result<_, _>>()?;
    let (seed, step) = dropout.unwrap_or((0, 0));
    args.extend([seed as i64, step as i64, i64::from(dropout.is_some())]);
    let value_of = |name: &str| sizes.get(name).copied();
    // Raw bytes, NaN-filled (0xFF bytes are a NaN as f32).
    let mut memory: Vec<Vec<u8>> = s
        .buffers
        .iter()
        .map(|b| {
            let n = b.bytes.eval(&value_of).ok_or("cannot size a buffer")?;
            Ok(vec![0xFFu8; n.max(0) as usize])
        })
        .collect::<Result<_, String>>()?;
    let put = |mem: &mut Vec<u8>, t: &Tensor, int: bool| {
        mem.clear();
        for &v in &t.data {
            if int {
                mem.extend_from_slice(&(v as i32).to_le_bytes());
            } else {
                mem.extend_from_slice(&(v as f32).to_le_bytes());
            }
        }
    };
    for (&b, t) in s.inputs.iter().zip(inputs) {
        // Integer inputs are token ids.
        let int = t.data.iter().all(|v| v.fract() == 0.0) && s.buffers[b].name.as_deref() == Some("tokens");
        put(&mut memory[b], t, int);
    }
    for (&b, t) in s.params.iter().zip(params) {
        put(&mut memory[b], t, false);
    }
    for step in &s.steps {
        let k = &s.kernels[step.kernel];
        let mut views: Vec<Buffer> =
            k.buffers.iter().zip(&step.buffers).map(|(decl, &g)| to_typed(&memory[g], decl.elem)).collect();
        let mut launch_args = args.clone();
        launch_args.extend(&step.args);
        exec::run_all(k, &mut views, &launch_args)?;
        if std::env::var_os("TNC_TRACE_NAN").is_some() {
            for (i, (view, decl)) in views.iter().zip(&k.buffers).enumerate() {
                if let Buffer::F32(v) = view {
                    if decl.access != crate::kernel::Access::Read && v.iter().any(|x| x.is_nan()) {
                        eprintln!(
                            "step {} (kernel {}) leaves NaN in its buffer {i} ({})",
                            step.kernel, k.name, decl.name
                        );
                    }
                }
            }
        }
        for (view, &g) in views.iter().zip(&step.buffers) {
            memory[g] = to_bytes(view, memory[g].len());
        }
    }
    let mut out = HashMap::new();
    for (name, b) in &s.outputs {
        let data: Vec<f64> =
            memory[*b].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64).collect();
        out.insert(name.clone(), Tensor { shape: vec![data.len()], data });
    }
    Ok(out)
}

/// Little-endian bytes of a buffer as the executor's typed buffer.
pub fn to_typed(bytes: &[u8], elem: Elem) -> Buffer {
    match elem {
        Elem::F32 => Buffer::F32(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()),
        Elem::BF16 => Buffer::BF16(bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect()),
        Elem::F16 => Buffer::F16(bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect()),
        Elem::I32 => Buffer::I32(bytes.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()),
        Elem::U8 => Buffer::U8(bytes.to_vec()),
    }
}

/// An executor buffer as `len` little-endian bytes (padded with 0xFF).
pub fn to_bytes(b: &Buffer, len: usize) -> Vec<u8> {
    let mut out: Vec<u8> = match b {
        Buffer::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Buffer::BF16(v) | Buffer::F16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Buffer::I32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Buffer::U8(v) => v.clone(),
    };
    out.resize(len, 0xFF);
    out
}
