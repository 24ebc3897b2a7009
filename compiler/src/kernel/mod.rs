//! Kernels: the loop-nest IR every back end prints (see `ir.rs`), the GEMM library nodes
//! it may contain (`gemm.rs`; tiled block kernels on GPUs, `gemm_tiles.rs`, with tensor
//! cores where the operands are 16-bit, `mma.rs`), its text form, and a reference executor
//! used to test schedules without a code generator (the emulated GPU device built on it
//! is the `tnc` crate's, `cli/emulated_gpu.rs`).

pub mod blocks;
pub mod exec;
pub mod gemm;
pub mod gemm_tiles;
pub mod gpu_exec;
pub mod interchange;
pub mod ir;
pub mod lanes;
mod machine;
pub mod math;
pub mod mma;
pub mod print;
mod shared_memory;
pub mod split_vector;
pub mod thread_loops;
pub mod valid;
mod value;

pub use ir::*;
