//! The tnc runtime. It must never depend on LLVM or on the compiler crate: it loads
//! what the compiler wrote and runs it.
//!
//! - [`bundle`]: loading and verifying a bundle ([`Bundle::load`]);
//! - [`executor`]: [`Executor`], which runs a bundle's entry points on any [`Device`]
//!   (sizes, parameters, optimizer state, inputs, outputs, gradients, errors);
//! - [`device`]: the device interface (allocate, copy, bind, launch, synchronize);
//! - [`cpu`]: the CPU device, running `kernels.so` on threads;
//! - [`cuda`] (feature `cuda`, on by default): the CUDA device, running `kernels.ptx`
//!   through the driver API, with CUDA graphs;
//! - [`cublas_plan`]: a library GEMM node as cuBLAS calls (the CUDA device's `--gemm
//!   cublas` bundles);
//! - [`pool`]: the CPU device's worker threads;
//! - [`tensor`]: host tensors in and out.
//!
//! The bundle format and what the compiler must compute bit for bit alike are the
//! `tnc-bundle` crate's, re-exported here under their paths: [`manifest`] (the format,
//! checksums, size polynomials), [`launch_runs`], [`gemm`] and [`bf16_gemm`] (library
//! GEMM nodes), [`init`] (parameter initialization from a seed), [`rng`] (dropout's and
//! initialization's counter-based generator), [`index_bounds`].
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

pub mod bundle;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cublas;
pub mod cublas_plan;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod error;
pub mod executor;
pub mod host_memory;
pub mod pipes;
pub mod pool;
mod profile;
pub mod tensor;

// The bundle format and the numerics shared bit for bit with the compiler live in
// `tnc-bundle`; they are re-exported under their old paths.
pub use tnc_bundle::{bf16_gemm, gemm, index_bounds, init, launch_runs, manifest, rng};

pub use bundle::{Bundle, BundleError};
pub use cpu::CpuDevice;
#[cfg(feature = "cuda")]
pub use cuda::{CudaDevice, DeviceInfo};
pub use device::Device;
pub use error::{ExecError, NO_DRIVER};
pub use executor::Executor;
pub use manifest::{InitSpec, Manifest, Poly, FORMAT_VERSION};
pub use tensor::{Tensor, TensorData};
