//! The device interface: what a machine that runs bundles must do. Everything above it —
//! sizes, parameters, optimizer state, inputs, outputs, gradients, checkpoints, errors —
//! is written once, in [`crate::Executor`].
//!
//! A device owns one allocation per manifest buffer, addressed by the buffer's index. The
//! executor sizes them ([`Device::resize`]), copies bytes in and out, and runs an entry
//! point in two steps: [`Device::bind`] once per allocation (the device resolves the
//! steps' buffers to its own addresses, launch shapes, argument tables, graphs), then
//! [`Device::launch`] for every run, with the current `sizes ++ scalars`.
//!
//! Implementations: the CPU threads ([`crate::cpu::CpuDevice`]), CUDA
//! ([`crate::cuda::CudaDevice`], feature `cuda`), and the emulated GPU of the compiler crate
//! (`tnc_compiler::emulated`), which runs a GPU bundle's kernel IR with GPU semantics.

use crate::error::ExecError;
use crate::gemm;
use std::collections::HashMap;

/// One step of an entry point at the current sizes: what a device launches.
#[derive(Clone, Debug)]
pub struct Launch {
    /// The kernel (an index into the manifest's kernels).
    pub kernel: usize,
    /// The manifest buffer bound to each of the kernel's slots.
    pub buffers: Vec<usize>,
    /// Parallel iterations: the launch covers `0..extent`.
    pub extent: i64,
    /// The step's own launch arguments, passed after `sizes ++ scalars`.
    pub args: Vec<i64>,
    /// A library GEMM node's shape at the current sizes and its operand type (checked
    /// against the buffers by the executor); `None` for generated code.
    pub gemm: Option<(gemm::Shape, gemm::Operands)>,
}

/// A machine that runs bundles. See the module documentation.
pub trait Device: Send {
    /// One line naming the device, printed at the start of a run
    /// (`cpu: 2 threads`, `cuda:0 NVIDIA H200 (compute capability 9.0, 139.8 GiB)`).
    fn describe(&self) -> String;

    /// Makes buffer `buffer` `len` bytes long. When it must grow, the new allocation is
    /// zeroed and the old contents are lost; bindings of every entry point are then stale
    /// (the executor binds again after resizing).
    fn resize(&mut self, buffer: usize, len: usize) -> Result<(), ExecError>;

    /// Bytes allocated for all buffers.
    fn allocated_bytes(&self) -> usize;

    /// Bytes the device could still allocate, where it knows (a GPU's free memory).
    fn free_bytes(&self) -> Option<usize> {
        None
    }

    /// Copies `bytes` to the start of `buffer` (ordered after everything queued).
    fn upload(&mut self, buffer: usize, bytes: &[u8]) -> Result<(), ExecError>;

    /// The first `len` bytes of `buffer`, after everything queued has run.
    fn download(&self, buffer: usize, len: usize) -> Result<Vec<u8>, ExecError>;

    /// Copies the first `len` bytes of buffer `from` to the start of buffer `to` (ordered
    /// after everything queued); the two are different buffers. This default goes through
    /// the host; a device that can copy in place does.
    fn copy(&mut self, from: usize, to: usize, len: usize) -> Result<(), ExecError> {
        let bytes = self.download(from, len)?;
        self.upload(to, &bytes)
    }

    /// Sets every byte of `buffer` to `byte` (the debug NaN fill uses `0xff`).
    fn fill(&mut self, buffer: usize, byte: u8) -> Result<(), ExecError>;

    /// Prepares `entry`'s launches for the current allocation; `sizes` holds the size
    /// symbols' values. Replaces an earlier binding of `entry`.
    fn bind(&mut self, entry: &str, launches: Vec<Launch>, sizes: &HashMap<&str, i64>) -> Result<(), ExecError>;

    /// Runs (or queues) `entry`'s bound launches in order; `args` is `sizes ++ scalars`.
    fn launch(&mut self, entry: &str, args: &[i64]) -> Result<(), ExecError>;

    /// Waits for everything queued; reports a kernel fault as an error.
    fn synchronize(&self) -> Result<(), ExecError>;
}

/// [`Device::upload`] for a device whose buffer `buffer` is host memory `dst`.
pub fn upload_to_host(dst: &mut [u8], buffer: usize, bytes: &[u8]) -> Result<(), ExecError> {
    let len = dst.len();
    let dst = dst
        .get_mut(..bytes.len())
        .ok_or_else(|| ExecError::Sizes(format!("{} bytes do not fit buffer {buffer} of {len} bytes", bytes.len())))?;
    dst.copy_from_slice(bytes);
    Ok(())
}

/// [`Device::download`] for a device whose buffer `buffer` is host memory `src`.
pub fn download_from_host(src: &[u8], buffer: usize, len: usize) -> Result<Vec<u8>, ExecError> {
    src.get(..len)
        .map(<[u8]>::to_vec)
        .ok_or_else(|| ExecError::Sizes(format!("buffer {buffer} holds {} bytes, {len} were asked for", src.len())))
}
