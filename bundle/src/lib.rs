//! What tnc's compiler and runtime must agree on: the bundle format, and every
//! computation both make that must give the same bits in each (the compiler's reference
//! interpreter and kernel executor against the runtime's devices). Neither LLVM nor the
//! compiler nor a device is here, so both sides depend on this crate and not on each other.
//!
//! - [`manifest`]: `manifest.json` (entry points, launches, buffers, size polynomials,
//!   parameters, checksums), with [`launch_runs`] for repeated launches;
//! - [`gemm`] and [`bf16_gemm`]: library GEMM nodes (f32 with the `gemm` crate; bf16 on
//!   AMX, AVX512-BF16 or widened), which the compiler's kernel executor runs too;
//! - [`split`]: how a launch's range is split over CPU threads;
//! - [`init`] and [`rng`]: parameter initialization from a seed, and the counter-based
//!   generator behind it and dropout;
//! - [`index_bounds`]: the check of integer inputs used as indices;
//! - [`cpu_features`]: the host's CPU features by the names a manifest records.

pub mod bf16_gemm;
pub mod cpu_features;
pub mod gemm;
pub mod index_bounds;
pub mod init;
pub mod launch_runs;
pub mod manifest;
pub mod rng;
pub mod split;

pub use manifest::{InitSpec, Manifest, Poly, FORMAT_VERSION};
