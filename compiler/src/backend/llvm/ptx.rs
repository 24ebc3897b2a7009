//! The LLVM back end for NVIDIA GPUs: kernel IR → LLVM IR ([`writer`] with
//! [`Device::Nvptx`]) → libdevice linked in → O3 → PTX text, one module holding one
//! `.entry` per kernel.
//!
//! # The GPU schedule
//!
//! The simplest correct mapping of the kernel IR: every kernel keeps the CPU calling
//! convention (`buffers`, `sizes`, `begin`, `end`; the two tables are arrays in device
//! memory) and runs one GPU thread per iteration of its parallel loop,
//! `index = begin + blockIdx.x · blockDim.x + threadIdx.x`, guarded by `index < end`. The
//! launch shape is [`gpu_launch`]: blocks of [`GPU_BLOCK`] = 256 threads (8 warps: a
//! common choice that keeps enough warps per SM to hide latency without limiting
//! occupancy for kernels of up to 64 registers per thread on sm_80…sm_90), and
//! `ceil((end − begin) / 256)` blocks. Kernels carry no `.maxntid`: with it, `ptxas`
//! trades registers for occupancy and spills (measured: the block-attention kernels went
//! from 60 registers and no spills to 48 registers and 236 bytes of spill traffic), and
//! it is not needed for the launch to succeed: `ptxas` never gives a thread more than 255
//! registers (256 once rounded to the allocation unit), and 256 threads × 256 registers
//! is exactly the 64 Ki registers of an SM on sm_80…sm_90, so a 256-thread block always
//! has registers enough. Everything inside an iteration (serial and vector loops, local arrays) runs
//! in the one thread; local arrays are per-thread (registers when SROA can promote them,
//! otherwise local memory).
//!
//! Buffer accesses use global-address-space pointers (`ld.global` / `st.global`).
//!
//! # Numerics
//!
//! NVPTX has no libm (`llvm.exp.f32` and friends abort code generation), so
//! transcendental functions call libdevice (`libdevice.10.bc`, shipped with CUDA and in
//! the `nvidia-cuda-nvcc-cu12` wheel), linked into the module; see [`libdevice_path`].
//! libdevice's accuracy, from the CUDA C Programming Guide (maximum ulp error over the
//! whole range, full-range versions, no `-ftz`, no fast math):
//!
//! | kernel IR    | PTX / libdevice          | max error                                  |
//! |--------------|--------------------------|--------------------------------------------|
//! | exp          | `__nv_expf`              | 2 ulp                                      |
//! | log          | `__nv_logf`              | 1 ulp                                      |
//! | sin, cos     | `__nv_sinf`, `__nv_cosf` | 2 ulp (slow path with Payne–Hanek for large arguments) |
//! | tanh         | `__nv_tanhf`             | 2 ulp                                      |
//! | pow          | `__nv_powf`              | 4 ulp                                      |
//! | float rem    | `__nv_fmodf`             | exact                                      |
//! | sqrt         | `sqrt.rn.f32`            | correctly rounded                          |
//! | rsqrt, recip, `/` | `div.rn.f32` (1 / sqrt) | correctly rounded                       |
//!
//! The fast alternatives are deliberately not used: `ex2.approx.ftz.f32` has ~2 ulp on
//! its own, but `exp(x) = ex2(x · log2 e)` also rounds `x · log2 e`, an error that grows
//! with |x| (about |x| · 2^-24 relative before exponentiation, tens of ulp for |x| ~ 80),
//! and it flushes subnormals. Denormals are kept (no `.ftz`: `nvvm-reflect-ftz` = 0 and
//! no `denormal-fp-math` attribute). NVPTX contracts `a · b + c` into `fma.rn.f32` by
//! default, which rounds once instead of twice: results may differ from the CPU back end
//! and the reference executor in the last bits (more accurate, not less).

use super::writer::{self, Device, FnAttrs};
use super::{check_diagnostics, finish_module, init_targets, with_context};
use crate::backend::target::GpuTarget;
use crate::kernel::Kernel;
use inkwell::module::{FlagBehavior, Linkage, Module};
use inkwell::targets::{CodeModel, FileType, RelocMode, Target, TargetMachine, TargetTriple};
use inkwell::values::BasicMetadataValueEnum;
use inkwell::OptimizationLevel;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Threads per block of every GPU kernel launch (see the module documentation).
pub const GPU_BLOCK: u32 = 256;

/// The launch shape of a kernel over `extent` = `end − begin` iterations: `(grid, block)`
/// with `block` = [`GPU_BLOCK`] threads and `grid` = `ceil(extent / block)` blocks, both
/// along x. An empty range (`extent ≤ 0`) gives `grid` = 0: there is nothing to launch
/// (CUDA rejects an empty grid, so the caller skips the launch).
///
/// # Panics
///
/// If the grid would exceed CUDA's limit of 2³¹ − 1 blocks (an extent beyond 5·10¹¹).
pub fn gpu_launch(extent: i64) -> (u32, u32) {
    let block = GPU_BLOCK as i64;
    let grid = if extent <= 0 { 0 } else { (extent - 1) / block + 1 };
    assert!(grid <= i32::MAX as i64, "a GPU launch over {extent} iterations needs more than 2^31 - 1 blocks");
    (grid as u32, GPU_BLOCK)
}

/// The target machine for `target`: O3, the PTX version pinned by `target.features`.
pub fn target_machine(target: &GpuTarget) -> Result<TargetMachine, String> {
    init_targets();
    let triple = TargetTriple::create(&target.triple);
    let t = Target::from_triple(&triple).map_err(|e| format!("LLVM target `{}`: {e}", target.triple))?;
    t.create_target_machine(
        &triple,
        &target.sm,
        &target.features,
        OptimizationLevel::Aggressive,
        RelocMode::Default,
        CodeModel::Default,
    )
    .ok_or_else(|| format!("LLVM cannot create a target machine for `{}` ({})", target.triple, target.sm))
}

/// The function attributes GPU kernels get for `target`.
pub fn fn_attrs(target: &GpuTarget) -> FnAttrs {
    FnAttrs {
        cpu: target.sm.clone(),
        features: target.features.clone(),
        prefer_vector_width: None,
        device: Device::Nvptx,
    }
}

/// The directory of the `nvidia-cuda-nvcc-cu12` wheel (`.../site-packages/nvidia/cuda_nvcc`,
/// holding `bin/ptxas` and `nvvm/libdevice/libdevice.10.bc`), as `python3` finds it; `None`
/// when python3 or the wheel is missing. Looked up once per process.
pub fn cuda_nvcc_dir() -> Option<PathBuf> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| {
        // `nvidia` is a namespace package: `__file__` is None, `__path__` is the directory.
        let out = Command::new("python3")
            .args(["-c", "import nvidia.cuda_nvcc as m; print(list(m.__path__)[0])"])
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        dir.is_dir().then_some(dir)
    })
    .clone()
}

/// Where `libdevice.10.bc` is: `$TNC_LIBDEVICE` if set (it must exist), else the
/// `nvidia-cuda-nvcc-cu12` wheel's copy (see [`cuda_nvcc_dir`]), else a CUDA toolkit's
/// (`$CUDA_HOME`, `/usr/local/cuda`). An error says how to get it.
pub fn libdevice_path() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("TNC_LIBDEVICE").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("TNC_LIBDEVICE is set to `{}`, which is not a file", p.display()))
        };
    }
    let rel = Path::new("nvvm/libdevice/libdevice.10.bc");
    let mut dirs: Vec<PathBuf> = cuda_nvcc_dir().into_iter().collect();
    dirs.extend(std::env::var_os("CUDA_HOME").filter(|p| !p.is_empty()).map(PathBuf::from));
    dirs.push(PathBuf::from("/usr/local/cuda"));
    dirs.into_iter().map(|d| d.join(rel)).find(|p| p.is_file()).ok_or_else(|| {
        "libdevice (libdevice.10.bc), which GPU kernels need for exp, log, sin, cos, tanh and pow, was not \
         found: install the `nvidia-cuda-nvcc-cu12` wheel (run scripts/setup.sh, or `python3 -m pip install \
         nvidia-cuda-nvcc-cu12`) or set TNC_LIBDEVICE to the file's path"
            .to_string()
    })
}

/// Build the verified, libdevice-linked module of `kernels` for `target`, optionally run
/// O3 on it, and hand it with its target machine to `f`.
fn with_module<R>(
    kernels: &[Kernel],
    target: &GpuTarget,
    optimize: bool,
    f: impl FnOnce(&Module, &TargetMachine) -> Result<R, String>,
) -> Result<R, String> {
    let tm = target_machine(target)?;
    with_context(|ctx, diags| {
        let module = ctx.create_module("tnc_kernels");
        let triple = tm.get_triple();
        let layout = tm.get_target_data().get_data_layout();
        module.set_triple(&triple);
        module.set_data_layout(&layout);
        let attrs = fn_attrs(target);
        let i32t = ctx.i32_type();
        let mut names = HashSet::new();
        // Library GEMM nodes (`--gemm cublas`) have no code: the runtime calls cuBLAS.
        for k in kernels.iter().filter(|k| k.gemm.is_none()) {
            let func = writer::write_kernel(ctx, &module, k, &attrs)?;
            names.insert(k.name.clone());
            // `.entry`: implied by the calling convention too, stated for every reader of
            // NVVM IR. No `.maxntid` (see the module documentation).
            let fp: BasicMetadataValueEnum = func.as_global_value().as_pointer_value().into();
            let node = ctx.metadata_node(&[fp, ctx.metadata_string("kernel").into(), i32t.const_int(1, false).into()]);
            module.add_global_metadata("nvvm.annotations", &node).map_err(|e| format!("LLVM metadata: {e}"))?;
        }
        module.verify().map_err(|e| format!("LLVM verifier: {}", e.to_string().trim()))?;
        check_diagnostics(diags)?;

        // libdevice, when a kernel calls it: `__nvvm_reflect("__CUDA_FTZ")` reads this flag
        // (NVPTX's pipeline runs NVVMReflect); 0 keeps subnormals.
        module.add_basic_value_flag("nvvm-reflect-ftz", FlagBehavior::Override, i32t.const_zero());
        let needs_libdevice = module
            .get_functions()
            .any(|f| f.count_basic_blocks() == 0 && f.get_name().to_str().is_ok_and(|n| n.starts_with("__nv_")));
        if needs_libdevice {
            let path = libdevice_path()?;
            let lib = Module::parse_bitcode_from_path(&path, ctx)
                .map_err(|e| format!("reading libdevice `{}`: {}", path.display(), e.to_string().trim()))?;
            lib.set_triple(&triple);
            lib.set_data_layout(&layout);
            module
                .link_in_module(lib)
                .map_err(|e| format!("linking libdevice `{}`: {}", path.display(), e.to_string().trim()))?;
            // Only the kernels are entry points: the rest is inlined or removed by O3.
            for func in module.get_functions() {
                let name = func.get_name().to_string_lossy();
                if func.count_basic_blocks() > 0 && !names.contains(name.as_ref()) {
                    func.set_linkage(Linkage::Internal);
                }
            }
            module
                .verify()
                .map_err(|e| format!("LLVM verifier (after linking libdevice): {}", e.to_string().trim()))?;
            check_diagnostics(diags)?;
        }
        finish_module(&module, &tm, diags, optimize, f)
    })
}

/// The PTX module of `kernels` for `target`: one `.entry` per generated kernel (library
/// GEMM nodes have none: the runtime calls cuBLAS for them), named as the kernel,
/// with the parameters `(buffers, sizes, begin, end)` of the kernel IR's calling convention
/// (see the module documentation for the launch). Kernels should be deduplicated first
/// (`backend::dedup_kernels`); two kernels of the same name are an error.
pub fn emit_ptx(kernels: &[Kernel], target: &GpuTarget) -> Result<String, String> {
    with_module(kernels, target, true, |m, tm| {
        let buf = tm.write_to_memory_buffer(m, FileType::Assembly).map_err(|e| format!("LLVM codegen: {e}"))?;
        let ptx = String::from_utf8_lossy(buf.as_slice()).into_owned();
        // A call LLVM could not resolve (a libdevice function that is missing, an
        // `__nvvm_reflect` left behind) would only fail when the driver loads the module.
        if let Some(line) = ptx.lines().find(|l| l.trim_start().starts_with(".extern .func")) {
            return Err(format!("the PTX calls an undefined function: `{}`", line.trim()));
        }
        Ok(ptx)
    })
}

/// The LLVM IR of `kernels` for `target` (libdevice linked in when used), after O3 when
/// `optimized`, else as the writer produced it.
pub fn emit_nvptx_ir(kernels: &[Kernel], target: &GpuTarget, optimized: bool) -> Result<String, String> {
    with_module(kernels, target, optimized, |m, _| Ok(m.print_to_string().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launch_shape() {
        assert_eq!(gpu_launch(0), (0, 256));
        assert_eq!(gpu_launch(-3), (0, 256));
        assert_eq!(gpu_launch(1), (1, 256));
        assert_eq!(gpu_launch(256), (1, 256));
        assert_eq!(gpu_launch(257), (2, 256));
        assert_eq!(gpu_launch(1 << 20), (4096, 256));
    }
}
