//! Code generation from kernel IR (see `../shared/DESIGN.md`, "Kernels and code
//! generation"). The writers depend only on `crate::kernel`, never on the graph IR.
//!
//! - [`contract`]: the [`Backend`] trait every code generator implements (its schedule
//!   options, its kernel passes, its writer), and [`backend_for`] a [`Target`];
//! - [`target`]: `--target` names for CPUs, the LLVM CPU and features they mean, and the
//!   CPU features a bundle needs at run time;
//! - [`llvm`]: kernel IR → LLVM IR → native objects, linked into `kernels.so` by `cc`
//!   ([`link`]), or PTX for NVIDIA GPUs (`--target sm80|sm86|sm89|sm90|sm90a`, [`emit_ptx`], launched
//!   with [`gpu_launch`]'s shape);
//! - [`cranelift`]: kernel IR → Cranelift IR → a native object, linked the same way
//!   (`--backend cranelift`, CPUs only).
//!
//! Each code generator is a cargo feature of this crate, `llvm` and `cranelift`, both on
//! by default: a build without `llvm` needs no LLVM installed and writes CPU code with
//! Cranelift; GPU targets then are an error naming the feature.

pub mod contract;
pub mod cpu_passes;
#[cfg(feature = "cranelift")]
pub mod cranelift;
pub mod link;
#[cfg(feature = "llvm")]
pub mod llvm;
pub mod target;

use crate::kernel::{print, Kernel};
use std::collections::{BTreeMap, HashMap};

pub use contract::{backend_for, Backend, CodeGen, Emit, KernelPass, Written};
pub use link::link_shared;
#[cfg(feature = "llvm")]
pub use llvm::ptx::{emit_nvptx_ir, emit_ptx, gpu_launch, libdevice_path, GPU_BLOCK};
#[cfg(feature = "llvm")]
pub use llvm::{emit_asm, emit_llvm_ir, emit_object, emit_objects};
pub use target::{CpuTarget, GpuGemm, GpuTarget, Target, CPU_TARGETS, GPU_TARGETS};

/// Kernels with duplicates removed: two kernels are identical when their text forms
/// (`kernel::print::to_text`) are equal modulo the kernel name, e.g. the same layer
/// unrolled L times.
#[derive(Clone, Debug)]
pub struct Dedup {
    /// One kernel per distinct text, keeping the first one's name, in first-seen order.
    pub kernels: Vec<Kernel>,
    /// Every input kernel's name → the name of the kernel emitted for it.
    pub names: BTreeMap<String, String>,
}

/// Remove identical kernels (see [`Dedup`]). Kernels with the same name must be
/// identical; otherwise it is an error.
pub fn dedup_kernels(kernels: &[Kernel]) -> Result<Dedup, String> {
    let mut by_text: HashMap<String, String> = HashMap::new();
    let mut text_of: HashMap<&str, String> = HashMap::new();
    let mut out = Dedup { kernels: vec![], names: BTreeMap::new() };
    for k in kernels {
        let text = print::to_text(&Kernel { name: String::new(), ..k.clone() });
        if let Some(prev) = text_of.get(k.name.as_str()) {
            if *prev != text {
                return Err(format!("two different kernels are named `{}`", k.name));
            }
            continue;
        }
        text_of.insert(&k.name, text.clone());
        let target = by_text.entry(text).or_insert_with(|| {
            out.kernels.push(k.clone());
            k.name.clone()
        });
        out.names.insert(k.name.clone(), target.clone());
    }
    Ok(out)
}
