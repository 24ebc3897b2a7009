//! The back-end contract: what a code generator gives the pipeline (`crate::pipeline`).
//! A back end chooses how its target is scheduled, rewrites the scheduled kernels for
//! it, and writes the bundle's files; the pipeline, the manifest and the runtime are
//! the same for every back end. The LLVM native and NVPTX writers are the two
//! implementations today (`llvm/native_backend.rs`, `llvm/nvptx_backend.rs`), and Cranelift's
//! writes CPU code too (`cranelift/`), chosen with [`CodeGen`].

use super::target::Target;
use crate::bundle::TargetInfo;
use crate::kernel::Kernel;
use crate::schedule::{Schedule, ScheduleOptions};
use std::time::Duration;
use tnc_bundle::Manifest;

/// What `--emit` asks for besides the bundle.
#[derive(Clone, Copy, Debug, Default)]
pub struct Emit {
    pub llvm: bool,
    pub asm: bool,
}

/// A target's rewrite of the scheduled program, by name (`tnc ir --after NAME`).
#[derive(Clone, Copy)]
pub struct KernelPass {
    pub name: &'static str,
    pub run: fn(&mut Schedule),
}

/// A back end's output for one schedule.
pub struct Written {
    /// The manifest's target: name, kind, the CPU features it needs.
    pub info: TargetInfo,
    /// The bundle's files besides the manifest and the initial values: (name, bytes).
    pub files: Vec<(&'static str, Vec<u8>)>,
    /// `--emit` extras, written next to the bundle: (suffix, bytes), e.g. `("s", asm)`.
    pub extras: Vec<(&'static str, Vec<u8>)>,
    /// The time of each of the writer's own steps (LLVM, linking), in order.
    pub stages: Vec<(&'static str, Duration)>,
}

impl Written {
    /// The bundle file called `name`, if the back end wrote one.
    pub fn file(&self, name: &str) -> Option<&[u8]> {
        self.files.iter().find(|(n, _)| *n == name).map(|(_, bytes)| bytes.as_slice())
    }
}

/// One code generator for one target.
pub trait Backend {
    /// How the target's programs are scheduled (library GEMMs, block kernels, …).
    fn schedule_options(&self) -> ScheduleOptions;
    /// The target's rewrites of the scheduled kernels, run in this order.
    fn kernel_passes(&self) -> Vec<KernelPass>;
    /// Code for `kernels` (the schedule's, after the kernel passes).
    fn write(&self, kernels: &[Kernel], emit: Emit) -> Result<Written, String>;
    /// Fill in what the manifest's kernels need on this target (a GPU's launch shapes).
    fn complete_manifest(&self, _manifest: &mut Manifest, _kernels: &[Kernel]) -> Result<(), String> {
        Ok(())
    }
}

/// Which code generator writes a CPU target's kernels (`--backend`). GPU targets have
/// one: LLVM's NVPTX back end.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum CodeGen {
    /// LLVM at O3: vectorized, the fastest code (the default where it is built in).
    #[cfg_attr(feature = "llvm", default)]
    Llvm,
    /// Cranelift: compiles several times faster, scalar code (the default of a build
    /// without LLVM).
    #[cfg_attr(not(feature = "llvm"), default)]
    Cranelift,
}

impl CodeGen {
    pub const ALL: [CodeGen; 2] = [CodeGen::Llvm, CodeGen::Cranelift];

    /// The `--backend` name.
    pub fn name(self) -> &'static str {
        match self {
            CodeGen::Llvm => "llvm",
            CodeGen::Cranelift => "cranelift",
        }
    }

    /// A `--backend` name, or an error listing the valid ones.
    pub fn parse(name: &str) -> Result<CodeGen, String> {
        CodeGen::ALL.into_iter().find(|c| c.name() == name).ok_or_else(|| {
            format!("unknown back end `{name}`; expected one of: {}", CodeGen::ALL.map(CodeGen::name).join(", "))
        })
    }
}

/// The back end writing `target`'s code with `codegen`.
pub fn backend_for(target: &Target, codegen: CodeGen) -> Result<Box<dyn Backend>, String> {
    match (target, codegen) {
        (Target::Gpu(_), CodeGen::Cranelift) if !cfg!(feature = "llvm") => Err(missing_feature("llvm", target)),
        (Target::Gpu(gpu), CodeGen::Cranelift) => Err(format!(
            "the Cranelift back end writes CPU code only; `--target {}` is a GPU, which needs `--backend llvm`",
            gpu.name
        )),
        #[cfg(feature = "llvm")]
        (Target::Cpu(cpu), CodeGen::Llvm) => Ok(Box::new(super::llvm::native_backend::LlvmNative::new(cpu.clone()))),
        #[cfg(feature = "llvm")]
        (Target::Gpu(gpu), CodeGen::Llvm) => Ok(Box::new(super::llvm::nvptx_backend::LlvmNvptx::new(gpu.clone()))),
        #[cfg(not(feature = "llvm"))]
        (target, CodeGen::Llvm) => Err(missing_feature("llvm", target)),
        #[cfg(feature = "cranelift")]
        (Target::Cpu(cpu), CodeGen::Cranelift) => Ok(Box::new(super::cranelift::CraneliftNative::new(cpu.clone()))),
        #[cfg(not(feature = "cranelift"))]
        (target, CodeGen::Cranelift) => Err(missing_feature("cranelift", target)),
    }
}

/// The error for a code generator this build of tnc leaves out.
fn missing_feature(feature: &str, target: &Target) -> String {
    let what = if target.is_gpu() { "GPU (PTX) targets need" } else { "this back end needs" };
    format!(
        "this tnc was built without the `{feature}` cargo feature, and {what} it; rebuild with \
         `cargo build --features {feature}` (`{}` was asked for)",
        target.name()
    )
}

/// `f`'s result and the time it took, recorded as stage `name`.
pub(crate) fn timed<T>(
    stages: &mut Vec<(&'static str, Duration)>,
    name: &'static str,
    f: impl FnOnce() -> Result<T, String>,
) -> Result<T, String> {
    let t = std::time::Instant::now();
    let r = f()?;
    stages.push((name, t.elapsed()));
    Ok(r)
}
