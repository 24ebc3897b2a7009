//! The Cranelift back end for x86-64 CPUs (`tnc compile --backend cranelift`): kernel IR →
//! CLIF ([`writer`], with the kernel IR's own math inline, [`math`]) → one native object
//! (`cranelift-object`), linked into `kernels.so` as LLVM's objects are. The bundle is the
//! LLVM native back end's in every other respect (same schedule, same kernel passes, same
//! C ABI, same manifest), so the runtime runs it unchanged; library GEMM nodes run in the
//! runtime's GEMM library, so dense products are as fast as with LLVM.
//!
//! Cranelift compiles several times faster than LLVM at O3 and has no loop vectorizer:
//! the kernel IR's vector loops are written four lanes at a time in 128-bit SIMD
//! ([`vector`]) where the target has SSE4.1 and FMA, one element at a time otherwise.

mod math;
mod vector;
mod writer;

use crate::backend::contract::{timed, Backend, Emit, KernelPass, Written};
use crate::backend::target::CpuTarget;
use crate::bundle::TargetInfo;
use crate::kernel::Kernel;
use crate::schedule::ScheduleOptions;
use cranelift_codegen::ir::{types, AbiParam};
use cranelift_codegen::settings::{self, Configurable};
use cranelift_codegen::{isa, Context};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_module::{Linkage, Module};
use cranelift_object::{ObjectBuilder, ObjectModule};
use tnc_bundle::manifest::TargetKind;

pub struct CraneliftNative {
    cpu: CpuTarget,
}

impl CraneliftNative {
    pub fn new(cpu: CpuTarget) -> CraneliftNative {
        CraneliftNative { cpu }
    }
}

impl Backend for CraneliftNative {
    fn schedule_options(&self) -> ScheduleOptions {
        ScheduleOptions { accumulator_floats: self.cpu.accumulator_floats(), ..ScheduleOptions::cpu() }
    }

    /// The CPU kernel passes, as LLVM's (`backend/cpu_passes.rs`).
    fn kernel_passes(&self) -> Vec<KernelPass> {
        super::cpu_passes::cpu_kernel_passes()
    }

    fn write(&self, kernels: &[Kernel], emit: Emit) -> Result<Written, String> {
        let mut stages = Vec::new();
        let object = timed(&mut stages, "cranelift", || emit_object(kernels, &self.cpu, emit))?;
        let so = timed(&mut stages, "link", || super::link::shared_object(&[object.bytes]))?;
        let mut extras = Vec::new();
        if let Some(clif) = object.clif {
            extras.push(("clif", clif.into_bytes()));
        }
        if let Some(asm) = object.asm {
            extras.push(("s", asm.into_bytes()));
        }
        // Only what Cranelift's code uses: an x86-64-v4 bundle written by Cranelift runs on
        // a host without AVX-512.
        let used: Vec<&str> = enabled_features(&self.cpu).into_iter().map(|(llvm, _)| llvm).collect();
        let cpu_features = (super::target::runtime_names(&used).into_iter())
            .filter(|f| tnc_bundle::cpu_features::host_has_feature(f).is_some())
            .collect();
        Ok(Written {
            info: TargetInfo { name: self.cpu.name.clone(), kind: TargetKind::Cpu, cpu_features },
            files: vec![(tnc_bundle::manifest::CPU_KERNELS_FILE, so)],
            extras,
            stages,
        })
    }
}

/// Cranelift's x86-64 settings for `cpu`: optimized, position-independent (for a shared
/// object), and the instruction-set extensions the target's LLVM features name.
fn target_isa(cpu: &CpuTarget) -> Result<isa::OwnedTargetIsa, String> {
    let mut flags = settings::builder();
    for (name, value) in [("opt_level", "speed"), ("is_pic", "true"), ("enable_verifier", "true")] {
        flags.set(name, value).map_err(|e| format!("Cranelift setting {name}: {e}"))?;
    }
    let mut builder =
        isa::lookup_by_name(&cpu.triple).map_err(|e| format!("Cranelift target `{}`: {e}", cpu.triple))?;
    for (_, cranelift) in enabled_features(cpu) {
        builder.enable(cranelift).map_err(|e| format!("Cranelift setting {cranelift}: {e}"))?;
    }
    builder.finish(settings::Flags::new(flags)).map_err(|e| format!("Cranelift target `{}`: {e}", cpu.triple))
}

/// LLVM's names of x86 features and Cranelift's settings for them. The AVX-512 settings
/// are left out: the vector code is 128 bits wide, and a bundle's recorded features stay
/// what its code needs (an x86-64-v4 bundle runs on a host without AVX-512).
const ISA_FEATURES: [(&str, &str); 11] = [
    ("sse3", "has_sse3"),
    ("ssse3", "has_ssse3"),
    ("sse4.1", "has_sse41"),
    ("sse4.2", "has_sse42"),
    ("popcnt", "has_popcnt"),
    ("avx", "has_avx"),
    ("avx2", "has_avx2"),
    ("fma", "has_fma"),
    ("bmi", "has_bmi1"),
    ("bmi2", "has_bmi2"),
    ("lzcnt", "has_lzcnt"),
];

/// The entries of [`ISA_FEATURES`] that `cpu`'s LLVM features enable.
fn enabled_features(cpu: &CpuTarget) -> Vec<(&'static str, &'static str)> {
    let features: Vec<&str> = cpu.features.split(',').filter_map(|f| f.strip_prefix('+')).collect();
    ISA_FEATURES.into_iter().filter(|(llvm, _)| features.contains(llvm)).collect()
}

/// An object and what `--emit` asked to see of it.
struct Object {
    bytes: Vec<u8>,
    /// The functions in Cranelift's IR (`--emit llvm`'s counterpart).
    clif: Option<String>,
    /// Their machine code, disassembled by Cranelift (`--emit asm`).
    asm: Option<String>,
}

/// One ELF object defining one function per generated kernel, named as the kernel.
fn emit_object(kernels: &[Kernel], cpu: &CpuTarget, emit: Emit) -> Result<Object, String> {
    let isa = target_isa(cpu)?;
    // Four-lane vector loops need SSE4.1's rounding (exp's `nearest`) and fused
    // multiply-adds on vectors (scalar ones fall back to libm's `fmaf`; vector ones cannot).
    let enabled = enabled_features(cpu);
    let simd = ["sse4.1", "fma"].iter().all(|f| enabled.iter().any(|(llvm, _)| llvm == f));
    let builder = ObjectBuilder::new(isa, "tnc_kernels", cranelift_module::default_libcall_names())
        .map_err(|e| format!("Cranelift: {e}"))?;
    let mut module = ObjectModule::new(builder);
    let libm = writer::Libm::declare(&mut module)?;
    let mut sig = module.make_signature();
    sig.params.extend([AbiParam::new(types::I64), AbiParam::new(types::I64)]);
    sig.params.extend([AbiParam::new(types::I64), AbiParam::new(types::I64)]);
    let (mut clif, mut asm) = (emit.llvm.then(String::new), emit.asm.then(String::new));
    let mut ctx = Context::new();
    let mut fctx = FunctionBuilderContext::new();
    // Library GEMM nodes run in the runtime's GEMM library: no code here.
    let mut names = std::collections::HashSet::new();
    for k in kernels.iter().filter(|k| k.gemm.is_none()) {
        if !names.insert(k.name.as_str()) {
            return Err(format!("kernel `{}`: a function of this name is already in the module", k.name));
        }
        let id = module
            .declare_function(&k.name, Linkage::Export, &sig)
            .map_err(|e| format!("kernel `{}`: Cranelift: {e}", k.name))?;
        ctx.clear();
        ctx.func.signature = sig.clone();
        ctx.set_disasm(asm.is_some());
        writer::write_kernel(FunctionBuilder::new(&mut ctx.func, &mut fctx), &mut module, &libm, k, simd)?;
        if let Some(text) = &mut clif {
            text.push_str(&format!("; kernel {}\n{}\n", k.name, ctx.func.display()));
        }
        module.define_function(id, &mut ctx).map_err(|e| format!("kernel `{}`: Cranelift: {e:?}", k.name))?;
        if let (Some(text), Some(code)) = (&mut asm, ctx.compiled_code()) {
            text.push_str(&format!("{}:\n{}\n", k.name, code.vcode.as_deref().unwrap_or("")));
        }
    }
    let product = module.finish();
    let bytes = product.emit().map_err(|e| format!("Cranelift object: {e}"))?;
    Ok(Object { bytes, clif, asm })
}
