//! cuBLAS for the library GEMM nodes of `--gemm cublas` GPU bundles (feature `cuda`),
//! loaded at run time like the driver: a bundle without such nodes never touches it, and
//! a host without the library gets an error naming where it was looked for.
//!
//! Our own six-function binding rather than cudarc's `cublas` module: cudarc 0.19 looks
//! for CUDA 12's sonames only (`libcublas.so.12`, …) and panics when none loads, while the
//! GPU machines carry CUDA 13 (`libcublas.so.13`, in PyTorch's `nvidia/cu13/lib`).
//!
//! The handle runs on the device's stream with a workspace of ours, so its calls are
//! captured into CUDA graphs like kernel launches (cuBLAS allocates nothing while a stream
//! captures). Products are computed in f32 (`CUBLAS_COMPUTE_32F`: no TF32 for f32 operands;
//! bf16 and f16 operands on tensor cores with f32 sums), as the generated tiles do.

use crate::cublas_plan::{Call, Op};
use crate::error::ExecError;
use crate::gemm::Operands;
use std::ffi::{c_char, c_int, c_void, CStr};

/// The environment variable naming the cuBLAS library file to load.
pub const CUBLAS_ENV: &str = "TNC_CUBLAS";
/// Library names tried when `TNC_CUBLAS` is unset, newest first.
const NAMES: &[&str] = &["libcublas.so.13", "libcublas.so.12", "libcublas.so"];
/// The workspace cuBLAS may use (NVIDIA recommends 32 MiB on Hopper).
pub const WORKSPACE_BYTES: usize = 32 << 20;

type Handle = *mut c_void;
type Status = c_int;

// cublas_api.h and library_types.h.
const OP_N: c_int = 0;
const OP_T: c_int = 1;
const R_32F: c_int = 0;
const R_16F: c_int = 2;
const R_16BF: c_int = 14;
const COMPUTE_32F: c_int = 68;
const GEMM_DEFAULT: c_int = -1;

type GemmFn = unsafe extern "C" fn(
    Handle,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    *const c_void,
    *const c_void,
    c_int,
    c_int,
    i64,
    *const c_void,
    c_int,
    c_int,
    i64,
    *const c_void,
    *mut c_void,
    c_int,
    c_int,
    i64,
    c_int,
    c_int,
    c_int,
) -> Status;

/// libcublas's functions, loaded once per process and never unloaded: it links the CUDA
/// runtime statically, and unloading it while graphs hold its kernels (or at exit) is a
/// known source of crashes; a second device reuses it.
struct Library {
    create: unsafe extern "C" fn(*mut Handle) -> Status,
    set_stream: unsafe extern "C" fn(Handle, *mut c_void) -> Status,
    set_workspace: unsafe extern "C" fn(Handle, *mut c_void, usize) -> Status,
    version: unsafe extern "C" fn(Handle, *mut c_int) -> Status,
    gemm: GemmFn,
    destroy: unsafe extern "C" fn(Handle) -> Status,
    status_string: unsafe extern "C" fn(Status) -> *const c_char,
    name: String,
    _lib: libloading::Library,
}

impl Library {
    /// The library, loaded on first use; the error says where it was looked for.
    fn get() -> Result<&'static Library, ExecError> {
        static LOADED: std::sync::OnceLock<Result<Library, String>> = std::sync::OnceLock::new();
        LOADED.get_or_init(Library::load).as_ref().map_err(|message| unavailable(message.clone()))
    }

    fn load() -> Result<Library, String> {
        let names: Vec<String> = match std::env::var(CUBLAS_ENV) {
            Ok(path) => vec![path],
            Err(_) => NAMES.iter().map(|s| s.to_string()).collect(),
        };
        let mut errors = Vec::new();
        let mut found = None;
        for name in &names {
            // SAFETY: loading cuBLAS runs its initializers, which only register with the
            // CUDA runtime it links.
            match unsafe { libloading::Library::new(name) } {
                Ok(lib) => {
                    found = Some((name.clone(), lib));
                    break;
                }
                Err(e) => errors.push(format!("{name}: {e}")),
            }
        }
        let Some((name, lib)) = found else {
            return Err(format!("cuBLAS could not be loaded ({})", errors.join("; ")));
        };
        let symbol = |s: &str| format!("{name} has no `{s}`");
        // SAFETY: each symbol is looked up with the signature of cublas_api.h; the function
        // pointers stay valid because the library is never unloaded.
        unsafe {
            Ok(Library {
                create: *lib.get(b"cublasCreate_v2").map_err(|_| symbol("cublasCreate_v2"))?,
                set_stream: *lib.get(b"cublasSetStream_v2").map_err(|_| symbol("cublasSetStream_v2"))?,
                set_workspace: *lib.get(b"cublasSetWorkspace_v2").map_err(|_| symbol("cublasSetWorkspace_v2"))?,
                version: *lib.get(b"cublasGetVersion_v2").map_err(|_| symbol("cublasGetVersion_v2"))?,
                gemm: *lib.get(b"cublasGemmStridedBatchedEx").map_err(|_| symbol("cublasGemmStridedBatchedEx"))?,
                destroy: *lib.get(b"cublasDestroy_v2").map_err(|_| symbol("cublasDestroy_v2"))?,
                status_string: *lib.get(b"cublasGetStatusString").map_err(|_| symbol("cublasGetStatusString"))?,
                name,
                _lib: lib,
            })
        }
    }
}

/// One cuBLAS handle on the device's stream.
pub struct Cublas {
    handle: Handle,
    lib: &'static Library,
    /// `libcublas.so.13 (cuBLAS 13.0.2)`, for the run's first line.
    pub describe: String,
}

fn unavailable(message: String) -> ExecError {
    ExecError::Unsupported(format!(
        "{message}; the bundle was compiled with `--gemm cublas`: set {CUBLAS_ENV} to the path of \
         libcublas.so (PyTorch's CUDA wheels have it under site-packages/nvidia/cu13/lib or \
         nvidia/cublas/lib), add its folder to LD_LIBRARY_PATH, or compile with `--gemm tiles`"
    ))
}

impl Cublas {
    /// Loads the library (once per process), creates a handle in the current context, and
    /// sets its stream and its workspace.
    ///
    /// # Safety
    /// `stream` must be a stream of the current context and `workspace` the address of
    /// [`WORKSPACE_BYTES`] of device memory, both outliving the handle.
    pub unsafe fn new(stream: *mut c_void, workspace: u64) -> Result<Cublas, ExecError> {
        let lib = Library::get()?;
        let mut cublas = Cublas { handle: std::ptr::null_mut(), lib, describe: String::new() };
        let mut handle: Handle = std::ptr::null_mut();
        cublas.check(
            (lib.create)(&mut handle),
            &format!("creating a cuBLAS handle with {} (is the driver as new as this cuBLAS needs?)", lib.name),
        )?;
        cublas.handle = handle;
        // The stream first: setting it resets the handle's workspace.
        cublas.check((lib.set_stream)(handle, stream), "setting cuBLAS's stream")?;
        cublas.check(
            (lib.set_workspace)(handle, workspace as *mut c_void, WORKSPACE_BYTES),
            "setting cuBLAS's workspace",
        )?;
        let mut v: c_int = 0;
        cublas.check((lib.version)(handle, &mut v), "reading cuBLAS's version")?;
        cublas.describe = format!("{} (cuBLAS {}.{}.{})", lib.name, v / 10000, v / 100 % 100, v % 100);
        Ok(cublas)
    }

    fn check(&self, status: Status, what: &str) -> Result<(), ExecError> {
        if status == 0 {
            return Ok(());
        }
        // SAFETY: cublasGetStatusString returns a static string for any status.
        let text = unsafe { CStr::from_ptr((self.lib.status_string)(status)) }.to_string_lossy().into_owned();
        Err(ExecError::Cuda { what: what.to_string(), message: format!("cuBLAS status {status}: {text}") })
    }

    /// Queues `call` on the handle's stream; `pointers` are the device addresses of the
    /// node's A, B and C buffers.
    ///
    /// # Safety
    /// The buffers must hold every element the call touches (the executor checked the
    /// node's shape against their lengths; the plan reads and writes only those elements).
    pub unsafe fn gemm(
        &self,
        call: &Call,
        operands: Operands,
        pointers: [u64; 3],
        name: &str,
    ) -> Result<(), ExecError> {
        let (input, bytes) = match operands {
            Operands::F32 => (R_32F, 4),
            Operands::BF16 => (R_16BF, 2),
            Operands::F16 => (R_16F, 2),
        };
        let op = |o: Op| if o == Op::N { OP_N } else { OP_T };
        let at = |slot: usize, offset: i64| (pointers[slot] + (offset as u64) * bytes) as *const c_void;
        let c = (pointers[crate::gemm::SLOT_C] + (call.c_offset as u64) * 4) as *mut c_void;
        let (alpha, beta) = (1.0f32, if call.accumulate { 1.0f32 } else { 0.0 });
        let status = (self.lib.gemm)(
            self.handle,
            op(call.a.op),
            op(call.b.op),
            call.m,
            call.n,
            call.k,
            &alpha as *const f32 as *const c_void,
            at(call.a.slot, call.a.offset),
            input,
            call.a.ld,
            call.a.stride,
            at(call.b.slot, call.b.offset),
            input,
            call.b.ld,
            call.b.stride,
            &beta as *const f32 as *const c_void,
            c,
            R_32F,
            call.ldc,
            call.c_stride,
            call.batch,
            COMPUTE_32F,
            GEMM_DEFAULT,
        );
        self.check(
            status,
            &format!("cuBLAS GEMM of kernel `{name}` ({}×{}×{}, batch {})", call.m, call.n, call.k, call.batch),
        )
    }
}

impl Drop for Cublas {
    fn drop(&mut self) {
        if !self.handle.is_null() {
            // SAFETY: created in `new`, destroyed once, with the context current (the
            // device binds it before dropping us).
            unsafe {
                let _ = (self.lib.destroy)(self.handle);
            }
        }
    }
}
