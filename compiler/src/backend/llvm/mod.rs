//! The LLVM back end for CPUs: kernel IR → LLVM IR ([`writer`]) → O3 → a native object,
//! then `cc -shared` links objects into `kernels.so`; and for NVIDIA GPUs ([`ptx`]):
//! kernel IR → LLVM IR + libdevice → O3 → PTX text.
//!
//! LLVM is driven defensively: a diagnostic handler collects errors instead of letting
//! LLVM's default handler exit the process, and every module is verified before it is
//! optimized or compiled (Debian's LLVM has no assertions, so invalid IR could crash
//! code generation). Every failure is an `Err(String)`.

pub mod native_backend;
pub mod nvptx_backend;
pub mod ptx;
pub mod vector_math;
pub mod writer;

use super::target::CpuTarget;
use crate::kernel::Kernel;
use inkwell::context::Context;
use inkwell::llvm_sys::core::{LLVMContextSetDiagnosticHandler, LLVMDisposeMessage};
use inkwell::llvm_sys::core::{LLVMGetDiagInfoDescription, LLVMGetDiagInfoSeverity};
use inkwell::llvm_sys::prelude::LLVMDiagnosticInfoRef;
use inkwell::llvm_sys::LLVMDiagnosticSeverity;
use inkwell::module::Module;
use inkwell::passes::PassBuilderOptions;
use inkwell::targets::{CodeModel, FileType, InitializationConfig, RelocMode, Target, TargetMachine, TargetTriple};
use inkwell::OptimizationLevel;
use std::ffi::{c_void, CStr};
use std::sync::{Mutex, Once};
pub use writer::{Device, FnAttrs};

fn init_targets() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        Target::initialize_x86(&InitializationConfig::default());
        Target::initialize_nvptx(&InitializationConfig::default());
    });
}

/// Errors LLVM reported through the context's diagnostic handler.
type Diagnostics = Mutex<Vec<String>>;

/// Run `f` with a fresh LLVM context whose errors are collected in `Diagnostics` (LLVM's
/// default handler would print them and exit the process); `f` checks them with
/// `check_diagnostics` after each stage.
pub(crate) fn with_context<R>(f: impl FnOnce(&Context, &Diagnostics) -> Result<R, String>) -> Result<R, String> {
    // Declared before the context, so dropped after it.
    let diags: Box<Diagnostics> = Box::new(Mutex::new(Vec::new()));
    let ctx = Context::create();
    // SAFETY: `diags` outlives `ctx`, and the handler only reads it as `Diagnostics`.
    unsafe {
        LLVMContextSetDiagnosticHandler(
            ctx.raw(),
            Some(diagnostic_handler),
            &*diags as *const Diagnostics as *mut c_void,
        )
    };
    f(&ctx, &diags)
}

extern "C" fn diagnostic_handler(info: LLVMDiagnosticInfoRef, sink: *mut c_void) {
    // SAFETY: `sink` is the `Diagnostics` installed with the handler, which outlives the
    // context (see `with_module`); LLVM passes a valid `info`.
    unsafe {
        if LLVMGetDiagInfoSeverity(info) != LLVMDiagnosticSeverity::LLVMDSError {
            return;
        }
        let d = LLVMGetDiagInfoDescription(info);
        let msg = if d.is_null() {
            "unknown LLVM error".to_string()
        } else {
            CStr::from_ptr(d).to_string_lossy().into_owned()
        };
        if !d.is_null() {
            LLVMDisposeMessage(d);
        }
        if let Ok(mut v) = (*(sink as *const Diagnostics)).lock() {
            v.push(msg);
        }
    }
}

/// The common end of both writers: O3 (if `optimize`), then `f` on the verified module,
/// with LLVM's diagnostics checked after each step.
pub(crate) fn finish_module<R>(
    module: &Module,
    tm: &TargetMachine,
    diags: &Diagnostics,
    optimize: bool,
    f: impl FnOnce(&Module, &TargetMachine) -> Result<R, String>,
) -> Result<R, String> {
    if optimize {
        module.run_passes("default<O3>", tm, PassBuilderOptions::create()).map_err(|e| format!("LLVM O3: {e}"))?;
        check_diagnostics(diags)?;
    }
    let r = f(module, tm)?;
    check_diagnostics(diags)?;
    Ok(r)
}

fn check_diagnostics(diags: &Diagnostics) -> Result<(), String> {
    let v = diags.lock().map_err(|_| "LLVM diagnostics lock poisoned".to_string())?;
    if v.is_empty() {
        Ok(())
    } else {
        Err(format!("LLVM: {}", v.join("; ")))
    }
}

/// The target machine for `target`: O3, position-independent code (for a shared object).
pub fn target_machine(target: &CpuTarget) -> Result<TargetMachine, String> {
    init_targets();
    let triple = TargetTriple::create(&target.triple);
    let t = Target::from_triple(&triple).map_err(|e| format!("LLVM target `{}`: {e}", target.triple))?;
    t.create_target_machine(
        &triple,
        &target.cpu,
        &target.features,
        OptimizationLevel::Aggressive,
        RelocMode::PIC,
        CodeModel::Default,
    )
    .ok_or_else(|| format!("LLVM cannot create a target machine for `{}` ({})", target.triple, target.cpu))
}

/// The function attributes kernels get for `target`.
pub fn fn_attrs(target: &CpuTarget) -> FnAttrs {
    FnAttrs {
        cpu: target.cpu.clone(),
        features: target.features.clone(),
        prefer_vector_width: target.has_avx512().then_some(512),
        device: Device::Cpu,
    }
}

/// Build a verified module of `kernels` for `target`, optionally run O3 on it, and hand it
/// with its target machine to `f`.
fn with_module<R>(
    kernels: &[Kernel],
    target: &CpuTarget,
    optimize: bool,
    f: impl FnOnce(&Module, &TargetMachine) -> Result<R, String>,
) -> Result<R, String> {
    let tm = target_machine(target)?;
    with_context(|ctx, diags| {
        let module = ctx.create_module("tnc_kernels");
        module.set_triple(&tm.get_triple());
        module.set_data_layout(&tm.get_target_data().get_data_layout());
        let attrs = fn_attrs(target);
        // Library GEMM nodes run in the runtime's GEMM library: no code here.
        for k in kernels.iter().filter(|k| k.gemm.is_none()) {
            writer::write_kernel(ctx, &module, k, &attrs)?;
        }
        module.verify().map_err(|e| format!("LLVM verifier: {}", e.to_string().trim()))?;
        check_diagnostics(diags)?;
        finish_module(&module, &tm, diags, optimize, f)
    })
}

/// A native object file (ELF) defining one function per kernel, named as the kernel.
pub fn emit_object(kernels: &[Kernel], target: &CpuTarget) -> Result<Vec<u8>, String> {
    with_module(kernels, target, true, |m, tm| {
        let buf = tm.write_to_memory_buffer(m, FileType::Object).map_err(|e| format!("LLVM codegen: {e}"))?;
        Ok(buf.as_slice().to_vec())
    })
}

/// Objects compiled in parallel: kernels are dealt into [`OBJECT_PARTS`] modules of about
/// equal size (by the length of their text), each compiled by [`emit_object`] on its own
/// thread with its own LLVM context. The split does not depend on the machine, so the
/// objects (and the bundle) are the same everywhere; only how many run at once does.
pub fn emit_objects(kernels: &[Kernel], target: &CpuTarget) -> Result<Vec<Vec<u8>>, String> {
    let mut parts: Vec<(usize, Vec<Kernel>)> = vec![(0, Vec::new()); OBJECT_PARTS];
    let mut by_size: Vec<(usize, &Kernel)> =
        kernels.iter().filter(|k| k.gemm.is_none()).map(|k| (crate::kernel::print::to_text(k).len(), k)).collect();
    // Largest first, each into the lightest part: a balanced, deterministic deal.
    by_size.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.name.cmp(&b.1.name)));
    for (size, k) in by_size {
        let lightest = parts.iter_mut().min_by_key(|p| p.0).expect("at least one part");
        lightest.0 += size;
        lightest.1.push(k.clone());
    }
    let mut parts: Vec<Vec<Kernel>> = parts.into_iter().map(|p| p.1).filter(|p| !p.is_empty()).collect();
    if parts.is_empty() {
        parts.push(Vec::new());
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(parts.len()).max(1);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<Mutex<Option<Result<Vec<u8>, String>>>> = parts.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(part) = parts.get(i) else { break };
                let r = emit_object(part, target);
                *results[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
            });
        }
    });
    results
        .into_iter()
        .map(|r| {
            r.into_inner()
                .unwrap_or_else(|e| e.into_inner())
                .unwrap_or_else(|| Err("an object was not compiled".into()))
        })
        .collect()
}

/// How many objects [`emit_objects`] writes (at most).
pub const OBJECT_PARTS: usize = 4;

/// The LLVM IR of `kernels`, after O3 when `optimized`, else as the writer produced it.
pub fn emit_llvm_ir(kernels: &[Kernel], target: &CpuTarget, optimized: bool) -> Result<String, String> {
    with_module(kernels, target, optimized, |m, _| Ok(m.print_to_string().to_string()))
}

/// The assembly LLVM generates for `kernels` (after O3).
pub fn emit_asm(kernels: &[Kernel], target: &CpuTarget) -> Result<String, String> {
    with_module(kernels, target, true, |m, tm| {
        let buf = tm.write_to_memory_buffer(m, FileType::Assembly).map_err(|e| format!("LLVM codegen: {e}"))?;
        Ok(String::from_utf8_lossy(buf.as_slice()).into_owned())
    })
}
