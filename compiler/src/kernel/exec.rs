//! The reference executor of kernel IR: runs a kernel on host buffers with f32
//! arithmetic, as generated code would. Tests use it to check schedules against the
//! graph interpreter before any code generator is involved; an out-of-bounds access is
//! an error, not undefined behaviour. A block kernel runs in the GPU-semantics executor
//! (`gpu_exec.rs`); both evaluate with the same machine (`machine.rs`).

use super::ir::*;
use super::machine::Machine;
pub use super::value::Buffer;
use super::value::Slots;
use super::value::Val;

/// Run iterations `begin..end` of `kernel`'s parallel loop. `sizes` holds the size
/// symbols then the extra scalars, in the kernel's order.
pub fn run(kernel: &Kernel, buffers: &mut [Buffer], sizes: &[i64], begin: i64, end: i64) -> Result<(), String> {
    if buffers.len() != kernel.buffers.len() {
        return Err(format!("kernel `{}` takes {} buffers, got {}", kernel.name, kernel.buffers.len(), buffers.len()));
    }
    let mut m = Machine { kernel, buffers, sizes, vars: Slots::default(), arrays: Slots::default(), gpu: None };
    if let Some(g) = &kernel.gemm {
        return m.gemm(g, begin, end).map_err(|e| format!("library kernel `{}`: {e}", kernel.name));
    }
    if let Some(threads) = kernel.threads {
        return super::gpu_exec::run_blocks(&mut m, threads, begin, end);
    }
    for i in begin..end {
        m.vars.insert(kernel.index, Val::I(i));
        m.block(&kernel.body).map_err(|e| format!("kernel `{}`, iteration {i}: {e}", kernel.name))?;
    }
    Ok(())
}

/// Run the whole parallel range.
pub fn run_all(kernel: &Kernel, buffers: &mut [Buffer], sizes: &[i64]) -> Result<(), String> {
    let mut m =
        Machine { kernel, buffers: &mut [], sizes, vars: Slots::default(), arrays: Slots::default(), gpu: None };
    let extent = m.eval(&kernel.extent)?.i()?;
    drop(m);
    run(kernel, buffers, sizes, 0, extent)
}
