//! The tnc runtime. It must never depend on LLVM or on the compiler crate: it loads
//! what the compiler wrote and runs it.
//!
//! - [`manifest`]: the bundle format (`manifest.json`, checksums, size polynomials);
//! - [`launch_runs`]: repeated launches written as runs in `manifest.json`;
//! - [`bundle`]: loading and verifying a bundle ([`Bundle::load`]);
//! - [`executor`]: [`Executor`], which runs a bundle's entry points on any [`Device`]
//!   (sizes, parameters, optimizer state, inputs, outputs, gradients, errors);
//! - [`device`]: the device interface (allocate, copy, bind, launch, synchronize);
//! - [`cpu`]: the CPU device, running `kernels.so` on threads;
//! - [`cuda`] (feature `cuda`, on by default): the CUDA device, running `kernels.ptx`
//!   through the driver API, with CUDA graphs;
//! - [`gemm`]: library GEMM nodes, run with the `gemm` crate (f32) or on AMX
//!   ([`amx`], bf16);
//! - [`init`]: parameter initialization from a seed, shared bit for bit with the
//!   compiler's reference interpreter;
//! - [`pool`]: the CPU device's worker threads;
//! - [`rng`]: the counter-based random generator behind dropout and initialization;
//! - [`tensor`]: host tensors in and out.
//!
//! ```no_run
//! use tnc_runtime::{Bundle, Executor, Tensor};
//! let bundle = Bundle::load("model.bundle")?;
//! let mut exec = Executor::cpu(&bundle, 4)?;
//! exec.set_params_from_seed(0)?;
//! let tokens = Tensor::i32(vec![1, 3], vec![5, 7, 9]);
//! exec.forward(&[("tokens", &tokens)])?;
//! let loss = exec.output("loss")?;
//! exec.backward(&[])?;
//! let grads = exec.gradients()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod bf16_gemm;
pub mod bundle;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod error;
pub mod executor;
pub mod gemm;
pub mod host_memory;
pub mod index_bounds;
pub mod init;
pub mod launch_runs;
pub mod manifest;
pub mod pipes;
pub mod pool;
pub mod rng;
pub mod tensor;

pub use bundle::{Bundle, BundleError};
pub use cpu::CpuDevice;
#[cfg(feature = "cuda")]
pub use cuda::{CudaDevice, DeviceInfo};
pub use device::Device;
pub use error::{ExecError, NO_DRIVER};
pub use executor::Executor;
pub use manifest::{InitSpec, Manifest, Poly, FORMAT_VERSION};
pub use tensor::{Tensor, TensorData};
