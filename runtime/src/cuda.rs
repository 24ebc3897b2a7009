//! The CUDA executor (feature `cuda`): loads `kernels.ptx` through the driver API (the
//! driver JIT-compiles the PTX; no CUDA toolkit is needed), allocates the planned buffers
//! on the device, and launches each entry point's steps in order on one stream.
//!
//! The driver library is loaded at run time: a host without one gets
//! [`ExecError::NoDriver`] from [`CudaExecutor::new`], never a panic or a link failure.
//!
//! # Calling convention
//!
//! Every kernel of `kernels.ptx` is an `.entry` taking `(u64 buffers, u64 sizes, s64 begin,
//! s64 end)`: `buffers` is a device pointer to an array of device pointers, one per kernel
//! buffer slot in the step's order; `sizes` a device pointer to the `i64` values of the
//! manifest's `sizes` followed by its `scalars`. One thread runs one parallel iteration:
//! `index = begin + blockIdx.x * blockDim.x + threadIdx.x`, returning when `index >= end`.
//! A launch covers `0..extent` with block `(256, 1, 1)` and grid
//! `(ceil(extent / 256), 1, 1)`, unless the kernel's [`GpuLaunch`] gives its own block
//! (and grid polynomials, evaluated at the current sizes) and dynamic shared memory.
//!
//! Entry points run asynchronously on the executor's stream; reading results
//! ([`CudaExecutor::output`], [`CudaExecutor::gradients`]) or
//! [`CudaExecutor::synchronize`] waits for them and reports any kernel fault.

use crate::bundle::{Bundle, BundleError};
use crate::cpu::{bind_sizes, initial_values, numel, tensor_values, ExecError};
use crate::manifest::{Access, BufferRole, GpuLaunch, InitSpec, Manifest, ParamEntry, TargetKind, CUDA_KERNELS_FILE};
use crate::tensor::Tensor;
use cudarc::driver::{result, sys, DriverError};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{c_void, CString};
use std::path::{Path, PathBuf};

/// Threads per block when the manifest does not say.
pub const DEFAULT_BLOCK: u32 = 256;
/// The environment variable choosing the device ordinal (default 0).
pub const DEVICE_ENV: &str = "TNC_CUDA_DEVICE";

/// Whether the CUDA driver library can be loaded on this host (it says nothing about
/// whether a device is present).
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the driver library by its usual names.
    unsafe { sys::is_culib_present() }
}

/// The driver's name and description of an error (`CUDA_ERROR_…: text`).
fn describe(e: DriverError) -> String {
    let name = e.error_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|_| format!("{:?}", e.0));
    let text = e.error_string().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    if text.is_empty() {
        name
    } else {
        format!("{name}: {text}")
    }
}

fn cuda_err(what: impl Into<String>) -> impl FnOnce(DriverError) -> ExecError {
    let what = what.into();
    move |e| ExecError::Cuda { what, message: describe(e) }
}

/// The device the executor runs on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    /// Compute capability `(major, minor)`.
    pub compute_capability: (i32, i32),
    pub total_bytes: usize,
}

/// Driver initialization and the primary context of one device, made current on the
/// calling thread.
struct Context {
    device: sys::CUdevice,
    ctx: sys::CUcontext,
    info: DeviceInfo,
}

impl Context {
    fn new() -> Result<Context, ExecError> {
        if !driver_present() {
            return Err(ExecError::NoDriver);
        }
        result::init().map_err(cuda_err("initializing the driver"))?;
        let count = result::device::get_count().map_err(cuda_err("counting devices"))?;
        if count <= 0 {
            return Err(ExecError::Cuda {
                what: "choosing a device".into(),
                message: "the CUDA driver is installed but reports no device".into(),
            });
        }
        let ordinal = match std::env::var(DEVICE_ENV) {
            Ok(v) => v.trim().parse::<i32>().ok().filter(|&d| d >= 0).ok_or_else(|| ExecError::Cuda {
                what: "choosing a device".into(),
                message: format!("{DEVICE_ENV}={v:?} is not a device ordinal"),
            })?,
            Err(_) => 0,
        };
        if ordinal >= count {
            return Err(ExecError::Cuda {
                what: "choosing a device".into(),
                message: format!("{DEVICE_ENV}={ordinal}, but this host has {count} device(s)"),
            });
        }
        let device = result::device::get(ordinal).map_err(cuda_err(format!("opening device {ordinal}")))?;
        let attr = |a| unsafe { result::device::get_attribute(device, a) };
        let major = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
            .map_err(cuda_err("querying the compute capability"))?;
        let minor = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)
            .map_err(cuda_err("querying the compute capability"))?;
        let name = result::device::get_name(device).unwrap_or_else(|_| "unknown".into());
        // SAFETY: `device` is a valid handle from `device::get`.
        let total_bytes = unsafe { result::device::total_mem(device) }.unwrap_or(0);
        // SAFETY: as above; released in `Drop`.
        let ctx = unsafe { result::primary_ctx::retain(device) }.map_err(cuda_err("creating a context"))?;
        let c = Context {
            device,
            ctx,
            info: DeviceInfo { ordinal: ordinal as usize, name, compute_capability: (major, minor), total_bytes },
        };
        c.bind()?;
        Ok(c)
    }

    /// Makes the context current on the calling thread.
    fn bind(&self) -> Result<(), ExecError> {
        // SAFETY: `ctx` is the retained primary context, alive until `Drop`.
        unsafe { result::ctx::set_current(self.ctx) }.map_err(cuda_err("binding the context"))
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: retained in `new`; every resource of the executor is freed before this.
        unsafe {
            let _ = result::primary_ctx::release(self.device);
        }
    }
}

/// Device memory: `cap` bytes allocated, `len` in use.
struct DevBuf {
    ptr: sys::CUdeviceptr,
    cap: usize,
    len: usize,
}

/// The smallest allocation (a zero-byte buffer still gets a valid, distinct pointer).
const MIN_ALLOC: usize = 256;

impl DevBuf {
    fn empty() -> DevBuf {
        DevBuf { ptr: 0, cap: 0, len: 0 }
    }

    /// Makes the buffer `len` bytes long, reallocating (and zeroing) only when it does not
    /// fit.
    fn resize(&mut self, len: usize, stream: sys::CUstream) -> Result<(), ExecError> {
        self.len = len;
        if len <= self.cap && self.cap > 0 {
            return Ok(());
        }
        let cap = len.max(MIN_ALLOC);
        self.free();
        // SAFETY: plain allocation in the current context.
        let ptr = unsafe { result::malloc_sync(cap) }.map_err(|e| match e.0 {
            sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => ExecError::Cuda {
                what: "allocating device memory".into(),
                message: format!("out of device memory allocating {len} bytes"),
            },
            _ => cuda_err(format!("allocating {len} bytes"))(e),
        })?;
        *self = DevBuf { ptr, cap, len };
        // SAFETY: `ptr` has `cap` bytes.
        unsafe { result::memset_d8_async(ptr, 0, cap, stream) }.map_err(cuda_err("zeroing a buffer"))
    }

    fn free(&mut self) {
        if self.cap > 0 {
            // SAFETY: allocated by `malloc_sync`, freed once; the stream is synchronized
            // by the caller before buffers are dropped or replaced.
            unsafe {
                let _ = result::free_sync(self.ptr);
            }
            self.cap = 0;
            self.ptr = 0;
        }
    }
}

/// One bound kernel launch.
struct Launch {
    function: sys::CUfunction,
    /// Byte offset of this step's pointer array in the entry's pointer table.
    table_offset: usize,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    shared: u32,
    extent: i64,
    /// The step's launch arguments, passed after the sizes and scalars (`Step::args`).
    args: Vec<i64>,
}

/// An entry point's launches for the current allocation.
struct EntryTable {
    /// Every step's buffer pointers, one array after another.
    pointers: DevBuf,
    launches: Vec<Launch>,
    /// `sizes ++ scalars ++ args` for each launch with launch arguments, one after another
    /// (see [`launch_arguments`]), and the host values the device copy holds.
    args_dev: DevBuf,
    args_host: Vec<i64>,
}

/// The argument arrays of the launches with launch arguments: `base ++ args` for each,
/// one after another, and where each launch's array starts (`None`: the launch reads
/// `base` alone, from the executor's shared copy).
fn launch_arguments<'a>(base: &[i64], launches: impl Iterator<Item = &'a [i64]>) -> (Vec<i64>, Vec<Option<usize>>) {
    let mut all = Vec::new();
    let mut starts = Vec::new();
    for args in launches {
        if args.is_empty() {
            starts.push(None);
        } else {
            starts.push(Some(all.len()));
            all.extend_from_slice(base);
            all.extend_from_slice(args);
        }
    }
    (all, starts)
}

/// Runs a CUDA bundle. See the module documentation.
pub struct CudaExecutor {
    manifest: Manifest,
    dir: PathBuf,
    functions: Vec<Option<sys::CUfunction>>,
    bufs: Vec<DevBuf>,
    /// Per entry point: the device table of every step's buffer pointers, valid while the
    /// buffers are not reallocated.
    tables: HashMap<String, EntryTable>,
    /// The device copy of `sizes ++ scalars`, and the host values it holds.
    args_dev: DevBuf,
    args_host: Vec<i64>,
    sizes: Vec<Option<i64>>,
    allocated_for: Option<Vec<i64>>,
    scalars: Vec<i64>,
    debug_nan: bool,
    params_set: bool,
    /// Entry points run since the buffers were last (re)allocated.
    ran: HashSet<String>,
    /// Entry points whose inputs are on the device for the current allocation.
    bound: HashSet<String>,
    stream: sys::CUstream,
    module: sys::CUmodule,
    // Declared last: dropped after everything above is freed (see `Drop`).
    ctx: Context,
}

// SAFETY: the executor owns its context, stream, module and allocations exclusively and
// makes the context current on whichever thread calls it (every public method binds it).
unsafe impl Send for CudaExecutor {}

impl Drop for CudaExecutor {
    fn drop(&mut self) {
        if self.ctx.bind().is_err() {
            return;
        }
        // SAFETY: everything below was created in this context; the stream is drained
        // before memory is freed.
        unsafe {
            let _ = result::stream::synchronize(self.stream);
        }
        for b in &mut self.bufs {
            b.free();
        }
        for t in self.tables.values_mut() {
            t.pointers.free();
            t.args_dev.free();
        }
        self.args_dev.free();
        unsafe {
            let _ = result::stream::destroy(self.stream);
            if !self.module.is_null() {
                let _ = result::module::unload(self.module);
            }
        }
    }
}

/// Loads PTX text into the current context, returning the JIT's error log on failure.
fn load_ptx(ptx: &[u8], path: &Path) -> Result<sys::CUmodule, ExecError> {
    let src = CString::new(ptx.to_vec()).map_err(|_| ExecError::Library {
        path: path.to_path_buf(),
        message: "the PTX text contains a NUL byte".into(),
    })?;
    let mut log = vec![0u8; 16 * 1024];
    let mut options =
        [sys::CUjit_option::CU_JIT_ERROR_LOG_BUFFER, sys::CUjit_option::CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES];
    let mut values: [*mut c_void; 2] = [log.as_mut_ptr() as *mut c_void, log.len() as *mut c_void];
    let mut module = std::ptr::null_mut();
    // SAFETY: `src` is NUL-terminated PTX; the options point at a live log buffer.
    let r = unsafe {
        sys::cuModuleLoadDataEx(
            &mut module,
            src.as_ptr() as *const c_void,
            options.len() as u32,
            options.as_mut_ptr(),
            values.as_mut_ptr(),
        )
    };
    match r.result() {
        Ok(()) => Ok(module),
        Err(e) => {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            let log = String::from_utf8_lossy(&log[..end]).trim().to_string();
            let message = describe(e);
            Err(ExecError::Library {
                path: path.to_path_buf(),
                message: if log.is_empty() { message } else { format!("{message}\n{log}") },
            })
        }
    }
}

/// `sm80` → 80, `sm_90a` → 90.
fn target_sm(name: &str) -> Option<i32> {
    let digits: String =
        name.strip_prefix("sm")?.trim_start_matches('_').chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

impl CudaExecutor {
    /// An executor for a CUDA bundle on device 0 (or `TNC_CUDA_DEVICE`). Loads the driver
    /// and `kernels.ptx`, resolves every kernel, and allocates the parameter buffers.
    pub fn new(bundle: &Bundle) -> Result<CudaExecutor, ExecError> {
        bundle.check_kind(TargetKind::Cuda)?;
        let m = bundle.manifest.clone();
        let used: HashSet<usize> = m.entry_points.values().flatten().map(|s| s.kernel).collect();
        if let Some(k) = m.kernels.iter().enumerate().find(|(i, k)| k.library && used.contains(i)).map(|(_, k)| k) {
            return Err(ExecError::Unsupported(format!(
                "kernel `{}` is a library (GEMM) node; cuBLAS calls are not implemented yet",
                k.name
            )));
        }
        let ctx = Context::new()?;
        if let Some(sm) = target_sm(&m.target.name) {
            let (ma, mi) = ctx.info.compute_capability;
            if ma * 10 + mi < sm {
                return Err(ExecError::Unsupported(format!(
                    "the bundle targets {} but device {} ({}) has compute capability {ma}.{mi}",
                    m.target.name, ctx.info.ordinal, ctx.info.name
                )));
            }
        }
        let stream =
            result::stream::create(result::stream::StreamKind::NonBlocking).map_err(cuda_err("creating a stream"))?;
        let mut ex = CudaExecutor {
            functions: vec![None; m.kernels.len()],
            bufs: m.buffers.iter().map(|_| DevBuf::empty()).collect(),
            tables: HashMap::new(),
            args_dev: DevBuf::empty(),
            args_host: Vec::new(),
            sizes: vec![None; m.sizes.len()],
            allocated_for: None,
            scalars: vec![0; m.scalars.len()],
            debug_nan: false,
            params_set: false,
            ran: HashSet::new(),
            bound: HashSet::new(),
            dir: bundle.dir.clone(),
            stream,
            module: std::ptr::null_mut(),
            ctx,
            manifest: m,
        };
        if !used.is_empty() {
            let path = bundle.path(CUDA_KERNELS_FILE);
            let ptx = std::fs::read(&path).map_err(|error| ExecError::Io { path: path.clone(), error })?;
            ex.module = load_ptx(&ptx, &path)?;
            for &i in &used {
                let k = &ex.manifest.kernels[i];
                let name = CString::new(k.symbol.clone()).map_err(|_| ExecError::Symbol {
                    kernel: k.name.clone(),
                    symbol: k.symbol.clone(),
                    message: "the name contains a NUL byte".into(),
                })?;
                // SAFETY: `module` is loaded in the current context.
                let f = unsafe { result::module::get_function(ex.module, name) }.map_err(|e| ExecError::Cuda {
                    what: format!("finding kernel `{}` (entry `{}`) in {CUDA_KERNELS_FILE}", k.name, k.symbol),
                    message: format!("{e}"),
                })?;
                // Dynamic shared memory beyond 48 KB needs the function's opt-in (up to the
                // device's limit per block, which the driver checks here).
                let shared = k.gpu.as_ref().map_or(0, |g| g.shared_bytes);
                if shared > 48 * 1024 {
                    let attribute = sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
                    let bytes = i32::try_from(shared).unwrap_or(i32::MAX);
                    // SAFETY: `f` was just resolved in the loaded module.
                    unsafe { result::function::set_function_attribute(f, attribute, bytes) }.map_err(|e| {
                        ExecError::Cuda {
                            what: format!(
                                "kernel `{}` needs {shared} bytes of shared memory per block, more than this GPU \
                                 allows (the bundle is for {}: compile it for this GPU's own target)",
                                k.name, ex.manifest.target.name
                            ),
                            message: format!("{e}"),
                        }
                    })?;
                }
                ex.functions[i] = Some(f);
            }
        }
        let params = ex.manifest.params.clone();
        for p in &params {
            let e = &ex.manifest.buffers[p.buffer];
            let bytes = e.bytes.as_const().ok_or_else(|| {
                ExecError::Unsupported(format!(
                    "parameter `{}` has a buffer of size `{}`, not a constant",
                    p.name, e.bytes
                ))
            })?;
            let want = numel(p)? * p.dtype.bytes();
            if bytes < 0 || bytes as usize != want {
                return Err(ExecError::Bundle(BundleError::Invalid(format!(
                    "parameter `{}` of shape {:?} needs {want} bytes, its buffer has {bytes}",
                    p.name, p.shape
                ))));
            }
            ex.bufs[p.buffer].resize(want, ex.stream)?;
        }
        Ok(ex)
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The device this executor runs on.
    pub fn device(&self) -> &DeviceInfo {
        &self.ctx.info
    }

    /// In debug mode every buffer an entry point writes before reading (outputs,
    /// activations, gradients, workspace) is filled with NaN bytes (`0xff`) before the
    /// entry point runs, so a kernel that fails to write part of its output shows up.
    pub fn set_debug_nan(&mut self, on: bool) {
        self.debug_nan = on;
    }

    /// Sets a run-time scalar (`seed`, `step`, …) passed to kernels after the sizes.
    pub fn set_scalar(&mut self, name: &str, value: i64) -> Result<(), ExecError> {
        crate::cpu::set_scalar(&self.manifest, &mut self.scalars, name, value)
    }

    /// Sets size symbols explicitly (needed only when no input of an entry point has the
    /// symbol as a dimension). Inputs passed later must agree.
    pub fn set_sizes(&mut self, sizes: &[(&str, i64)]) -> Result<(), ExecError> {
        crate::cpu::set_sizes(&self.manifest, &mut self.sizes, sizes)
    }

    /// The current value of each size symbol.
    pub fn sizes(&self) -> Vec<(String, Option<i64>)> {
        self.manifest.sizes.iter().cloned().zip(self.sizes.iter().copied()).collect()
    }

    /// Initializes every parameter from `seed` on the host (the same values as the CPU
    /// executor and the interpreter) and uploads them.
    pub fn set_params_from_seed(&mut self, seed: u64) -> Result<(), ExecError> {
        self.ctx.bind()?;
        let params = self.manifest.params.clone();
        let mut files = HashMap::new();
        for p in &params {
            let values = initial_values(&self.dir, p, seed, &mut files)?;
            self.write_param(p, &values)?;
        }
        self.synchronize()?;
        self.params_set = true;
        Ok(())
    }

    /// Reads every parameter by name from a safetensors file (f32, or f64 converted),
    /// checking shapes, and uploads them. A non-trainable parameter missing from the file
    /// is initialized when that needs no run seed (a baked value or a fixed seed).
    pub fn set_params_from_file(&mut self, path: impl AsRef<Path>) -> Result<(), ExecError> {
        self.ctx.bind()?;
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|error| ExecError::Io { path: path.into(), error })?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| ExecError::Params(format!("{} is not a safetensors file: {e}", path.display())))?;
        let params = self.manifest.params.clone();
        let mut files = HashMap::new();
        for p in &params {
            let values = match st.tensor(&p.name) {
                Ok(t) => tensor_values(&t, p, &path.display().to_string())?,
                Err(_) if !p.trainable && (p.seed.is_some() || matches!(p.init, InitSpec::Baked { .. })) => {
                    initial_values(&self.dir, p, p.seed.unwrap_or(0), &mut files)?
                }
                Err(_) => {
                    return Err(ExecError::Params(format!("{} has no tensor `{}`", path.display(), p.name)));
                }
            };
            self.write_param(p, &values)?;
        }
        self.synchronize()?;
        self.params_set = true;
        Ok(())
    }

    /// Writes every parameter to a safetensors file (f32).
    pub fn save_params(&self, path: impl AsRef<Path>) -> Result<(), ExecError> {
        let mut values = Vec::new();
        for p in &self.manifest.params {
            values.push((p, self.download(p.buffer, numel(p)? * p.dtype.bytes())?));
        }
        crate::cpu::write_params(path.as_ref(), &values)
    }

    /// The current value of parameter `name`.
    pub fn param(&self, name: &str) -> Result<Tensor, ExecError> {
        let p = self
            .manifest
            .params
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| ExecError::Output(format!("the bundle has no parameter `{name}`")))?;
        let shape = p.shape.iter().map(|&d| d as usize).collect();
        Ok(Tensor::from_bytes(p.dtype, shape, &self.download(p.buffer, numel(p)? * p.dtype.bytes())?))
    }

    /// Runs `forward` on the named inputs. Sizes (B, N) are taken from the inputs' shapes.
    pub fn forward(&mut self, inputs: &[(&str, &Tensor)]) -> Result<(), ExecError> {
        self.run("forward", inputs)
    }

    /// Runs `backward` (after `forward` with the same sizes); `inputs` are the backward
    /// entry point's own inputs, usually none.
    pub fn backward(&mut self, inputs: &[(&str, &Tensor)]) -> Result<(), ExecError> {
        if !self.ran.contains("forward") {
            return Err(ExecError::Order("backward needs a forward pass with the same sizes first".into()));
        }
        self.run("backward", inputs)
    }

    /// Runs any entry point (`forward`, `backward`, `step`, …): uploads its inputs and
    /// queues its kernels on the stream (it does not wait for them).
    pub fn run(&mut self, entry: &str, inputs: &[(&str, &Tensor)]) -> Result<(), ExecError> {
        self.ctx.bind()?;
        self.entry_steps(entry)?;
        if !self.params_set && !self.manifest.params.is_empty() {
            return Err(ExecError::Order(
                "parameters are not set: call set_params_from_seed or set_params_from_file first".into(),
            ));
        }
        let sizes = bind_sizes(&self.manifest, &self.sizes, entry, inputs)?;
        self.sizes = sizes.iter().map(|&v| Some(v)).collect();
        self.allocate(&sizes)?;
        if entry == "backward" && !self.ran.contains("forward") {
            return Err(ExecError::Order("backward needs a forward pass with the same sizes first".into()));
        }
        for &(name, t) in inputs {
            let io = self.manifest.inputs.iter().find(|io| io.name == name && io.entry == entry).expect("checked");
            let src = t.bytes();
            let b = &self.bufs[io.buffer];
            if src.len() > b.len {
                return Err(ExecError::Bundle(BundleError::Invalid(format!(
                    "input `{name}` needs {} bytes, its buffer has {}",
                    src.len(),
                    b.len
                ))));
            }
            if !src.is_empty() {
                // SAFETY: `src.len()` bytes fit the buffer; a copy from pageable memory
                // returns once the source has been staged, so `src` may be dropped.
                unsafe { result::memcpy_htod_async(b.ptr, &src, self.stream) }
                    .map_err(cuda_err(format!("uploading input `{name}`")))?;
            }
        }
        self.bound.insert(entry.to_string());
        self.launch_entry(entry)
    }

    /// Runs `entry` again with the inputs it was last given (already on the device), e.g.
    /// to time it. An error if the sizes changed since, or it never ran.
    pub fn rerun(&mut self, entry: &str) -> Result<(), ExecError> {
        self.ctx.bind()?;
        self.entry_steps(entry)?;
        let needs_inputs = self.manifest.inputs.iter().any(|io| io.entry == entry);
        if needs_inputs && !self.bound.contains(entry) {
            return Err(ExecError::Order(format!("`{entry}` has no inputs on the device for the current sizes")));
        }
        if self.allocated_for.is_none() {
            return Err(ExecError::Order(format!("`{entry}` cannot rerun before any entry point ran")));
        }
        if entry == "backward" && !self.ran.contains("forward") {
            return Err(ExecError::Order("backward needs a forward pass with the same sizes first".into()));
        }
        self.launch_entry(entry)
    }

    /// Waits for every queued kernel and copy; reports a kernel fault as an error.
    pub fn synchronize(&self) -> Result<(), ExecError> {
        self.ctx.bind()?;
        // SAFETY: our stream, alive until drop.
        unsafe { result::stream::synchronize(self.stream) }.map_err(cuda_err("running kernels"))
    }

    /// Milliseconds of device time the entry points take, run in order with
    /// [`CudaExecutor::rerun`] and measured with events on the stream.
    pub fn time_ms(&mut self, entries: &[&str]) -> Result<f32, ExecError> {
        self.ctx.bind()?;
        let flags = sys::CUevent_flags::CU_EVENT_DEFAULT;
        let start = result::event::create(flags).map_err(cuda_err("creating an event"))?;
        let end = match result::event::create(flags) {
            Ok(e) => e,
            Err(e) => {
                unsafe {
                    let _ = result::event::destroy(start);
                }
                return Err(cuda_err("creating an event")(e));
            }
        };
        let r = (|| {
            // SAFETY: events created above, recorded on our stream.
            unsafe { result::event::record(start, self.stream) }.map_err(cuda_err("recording an event"))?;
            for e in entries {
                self.rerun(e)?;
            }
            unsafe { result::event::record(end, self.stream) }.map_err(cuda_err("recording an event"))?;
            self.synchronize()?;
            unsafe { result::event::elapsed(start, end) }.map_err(cuda_err("reading an event"))
        })();
        unsafe {
            let _ = result::event::destroy(start);
            let _ = result::event::destroy(end);
        }
        r
    }

    /// Output `name` of the last run of the entry point that produces it (waits for it).
    pub fn output(&self, name: &str) -> Result<Tensor, ExecError> {
        let io = self.manifest.outputs.iter().find(|o| o.name == name).ok_or_else(|| {
            ExecError::Output(format!(
                "the bundle has no output `{name}` (it has {:?})",
                self.manifest.outputs.iter().map(|o| &o.name).collect::<Vec<_>>()
            ))
        })?;
        if !self.ran.contains(&io.entry) {
            return Err(ExecError::Order(format!("output `{name}` is produced by `{}`, which has not run", io.entry)));
        }
        let sizes = self.allocated_for.clone().expect("ran implies allocated");
        let env = self.env(&sizes);
        let shape = io
            .shape
            .iter()
            .map(|d| d.eval(&env).map(|v| v.max(0) as usize))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ExecError::Sizes(format!("shape of output `{name}`: {e}")))?;
        let n: usize = shape.iter().product::<usize>() * io.dtype.bytes();
        if n > self.bufs[io.buffer].len {
            return Err(ExecError::Bundle(BundleError::Invalid(format!(
                "output `{name}` needs {n} bytes, its buffer has {}",
                self.bufs[io.buffer].len
            ))));
        }
        Ok(Tensor::from_bytes(io.dtype, shape, &self.download(io.buffer, n)?))
    }

    /// Every output of the last runs, by name.
    pub fn outputs(&self) -> Result<BTreeMap<String, Tensor>, ExecError> {
        self.manifest
            .outputs
            .iter()
            .filter(|o| self.ran.contains(&o.entry))
            .map(|o| Ok((o.name.clone(), self.output(&o.name)?)))
            .collect()
    }

    /// The gradient of every parameter that has one (buffers of role `grad`), by
    /// parameter name, after `backward` (waits for it).
    pub fn gradients(&self) -> Result<BTreeMap<String, Tensor>, ExecError> {
        if !self.ran.contains("backward") {
            return Err(ExecError::Order("gradients need a backward pass first".into()));
        }
        let mut out = BTreeMap::new();
        for (i, p) in crate::cpu::gradient_buffers(&self.manifest)? {
            let name = p.name.as_str();
            let shape: Vec<usize> = p.shape.iter().map(|&d| d as usize).collect();
            let n = numel(p)? * p.dtype.bytes();
            if n > self.bufs[i].len {
                return Err(ExecError::Bundle(BundleError::Invalid(format!(
                    "gradient of `{name}` needs {n} bytes, its buffer has {}",
                    self.bufs[i].len
                ))));
            }
            out.insert(name.to_string(), Tensor::from_bytes(p.dtype, shape, &self.download(i, n)?));
        }
        Ok(out)
    }

    // -----------------------------------------------------------------------------------

    fn entry_steps(&self, entry: &str) -> Result<&[crate::manifest::Step], ExecError> {
        self.manifest.entry_points.get(entry).map(Vec::as_slice).ok_or_else(|| {
            ExecError::Order(format!(
                "the bundle has no entry point `{entry}` (it has {:?})",
                self.manifest.entry_points.keys().collect::<Vec<_>>()
            ))
        })
    }

    fn env(&self, sizes: &[i64]) -> HashMap<&str, i64> {
        self.manifest.sizes.iter().map(String::as_str).zip(sizes.iter().copied()).collect()
    }

    /// The first `n` bytes of buffer `b`, after everything queued has run.
    fn download(&self, b: usize, n: usize) -> Result<Vec<u8>, ExecError> {
        self.ctx.bind()?;
        let mut out = vec![0u8; n];
        if n > 0 {
            // SAFETY: `n` bytes fit the buffer (checked by callers); synchronized below
            // before `out` is read.
            unsafe { result::memcpy_dtoh_async(&mut out, self.bufs[b].ptr, self.stream) }
                .map_err(cuda_err("copying results to the host"))?;
        }
        self.synchronize()?;
        Ok(out)
    }

    fn write_param(&mut self, p: &ParamEntry, values: &[f32]) -> Result<(), ExecError> {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_ne_bytes()).collect();
        let b = &self.bufs[p.buffer];
        let n = bytes.len().min(b.len);
        if n > 0 {
            // SAFETY: `n` bytes fit; pageable source, staged before the call returns.
            unsafe { result::memcpy_htod_async(b.ptr, &bytes[..n], self.stream) }
                .map_err(cuda_err(format!("uploading parameter `{}`", p.name)))?;
        }
        Ok(())
    }

    /// Sizes every non-parameter buffer for `sizes` (no-op when unchanged).
    fn allocate(&mut self, sizes: &[i64]) -> Result<(), ExecError> {
        if self.allocated_for.as_deref() == Some(sizes) {
            return Ok(());
        }
        let env = self.env(sizes);
        let mut lens = Vec::with_capacity(self.bufs.len());
        for (i, b) in self.manifest.buffers.iter().enumerate() {
            let v = b.bytes.eval(&env).map_err(|e| ExecError::Sizes(format!("size of buffer {i}: {e}")))?;
            let v = usize::try_from(v).map_err(|_| ExecError::Sizes(format!("buffer {i} has negative size {v}")))?;
            lens.push(v);
        }
        // Buffers may be freed below: nothing queued may still use them.
        self.synchronize()?;
        for (i, len) in lens.into_iter().enumerate() {
            if self.manifest.buffers[i].role != BufferRole::Param {
                self.bufs[i].resize(len, self.stream)?;
            }
        }
        // Pointers and launch shapes depend on the sizes: rebuild every table.
        for t in self.tables.values_mut() {
            t.pointers.free();
            t.args_dev.free();
        }
        self.tables.clear();
        self.allocated_for = Some(sizes.to_vec());
        self.ran.clear();
        self.bound.clear();
        Ok(())
    }

    /// The launches of `entry` for the current allocation, building (and uploading) its
    /// pointer table on first use.
    fn prepare(&mut self, entry: &str) -> Result<(), ExecError> {
        if self.tables.contains_key(entry) {
            return Ok(());
        }
        let sizes = self.allocated_for.clone().expect("allocated before launching");
        let env = self.env(&sizes);
        let steps = self.entry_steps(entry)?.to_vec();
        let mut ptrs: Vec<u64> = Vec::new();
        let mut launches = Vec::with_capacity(steps.len());
        for s in &steps {
            let k = &self.manifest.kernels[s.kernel];
            let extent =
                k.extent.eval(&env).map_err(|e| ExecError::Sizes(format!("extent of kernel `{}`: {e}", k.name)))?;
            if extent < 0 {
                return Err(ExecError::Sizes(format!("kernel `{}` has a negative extent {extent}", k.name)));
            }
            let LaunchShape { grid, block, shared } = launch_shape(&k.name, k.gpu.as_ref(), extent, &env)?;
            launches.push(Launch {
                function: self.functions[s.kernel].expect("resolved in new"),
                table_offset: ptrs.len() * 8,
                grid,
                block,
                shared,
                extent,
                args: s.args.clone(),
            });
            ptrs.extend(s.buffers.iter().map(|&b| self.bufs[b].ptr));
        }
        let mut table = DevBuf::empty();
        table.resize(ptrs.len() * 8, self.stream)?;
        if !ptrs.is_empty() {
            // SAFETY: the table holds `ptrs.len() * 8` bytes; pageable source, staged.
            unsafe { result::memcpy_htod_async(table.ptr, &ptrs, self.stream) }
                .map_err(cuda_err("uploading buffer pointers"))?;
        }
        let table = EntryTable { pointers: table, launches, args_dev: DevBuf::empty(), args_host: Vec::new() };
        self.tables.insert(entry.to_string(), table);
        Ok(())
    }

    /// Queues every step of `entry` (inputs already uploaded, buffers allocated).
    fn launch_entry(&mut self, entry: &str) -> Result<(), ExecError> {
        self.prepare(entry)?;
        let sizes = self.allocated_for.clone().expect("allocated before launching");
        let args: Vec<i64> = sizes.iter().chain(&self.scalars).copied().collect();
        if self.args_dev.cap == 0 || args != self.args_host {
            // The previous values may still be read by queued kernels: order the update
            // on the stream (and keep the host copy alive in `args_host`).
            self.args_dev.resize((args.len() * 8).max(8), self.stream)?;
            self.args_host = args;
            if !self.args_host.is_empty() {
                // SAFETY: the buffer holds `args.len() * 8` bytes.
                unsafe { result::memcpy_htod_async(self.args_dev.ptr, &self.args_host, self.stream) }
                    .map_err(cuda_err("uploading sizes"))?;
            }
        }
        if self.debug_nan {
            self.fill_nan(entry)?;
        }
        // Launches with launch arguments read their own `sizes ++ scalars ++ args`.
        let stream = self.stream;
        let base = self.args_host.clone();
        let t = self.tables.get_mut(entry).expect("prepared above");
        let (per_launch, starts) = launch_arguments(&base, t.launches.iter().map(|l| l.args.as_slice()));
        if !per_launch.is_empty() && (t.args_dev.cap == 0 || per_launch != t.args_host) {
            t.args_dev.resize(per_launch.len() * 8, stream)?;
            t.args_host = per_launch;
            // SAFETY: the buffer holds `args_host.len() * 8` bytes. The source is pageable
            // host memory, which the driver stages before the call returns, so replacing
            // `args_host` later cannot change what a queued kernel reads.
            unsafe { result::memcpy_htod_async(t.args_dev.ptr, &t.args_host, stream) }
                .map_err(cuda_err("uploading launch arguments"))?;
        }
        let t = &self.tables[entry];
        let (table, launches) = (&t.pointers, &t.launches);
        for ((l, s), start) in launches.iter().zip(self.entry_steps(entry)?).zip(starts) {
            if l.extent == 0 || l.grid.0 == 0 || l.grid.1 == 0 || l.grid.2 == 0 {
                continue;
            }
            let mut a_buffers: u64 = table.ptr + l.table_offset as u64;
            let mut a_sizes: u64 = match start {
                Some(i) => t.args_dev.ptr + (i * 8) as u64,
                None => self.args_dev.ptr,
            };
            let mut a_begin: i64 = 0;
            let mut a_end: i64 = l.extent;
            let mut params: [*mut c_void; 4] = [
                &mut a_buffers as *mut u64 as *mut c_void,
                &mut a_sizes as *mut u64 as *mut c_void,
                &mut a_begin as *mut i64 as *mut c_void,
                &mut a_end as *mut i64 as *mut c_void,
            ];
            // SAFETY: the function takes (u64, u64, s64, s64) by the calling convention;
            // every pointer it receives addresses live device memory sized by the plan.
            unsafe { result::launch_kernel(l.function, l.grid, l.block, l.shared, self.stream, &mut params) }.map_err(
                |e| {
                    let k = &self.manifest.kernels[s.kernel];
                    cuda_err(format!(
                        "launching kernel `{}` (grid {:?}, block {:?}, extent {})",
                        k.name, l.grid, l.block, l.extent
                    ))(e)
                },
            )?;
        }
        if entry == "forward" {
            self.ran.clear();
        }
        self.ran.insert(entry.to_string());
        Ok(())
    }

    /// NaN bytes into every buffer `entry` writes before reading.
    fn fill_nan(&self, entry: &str) -> Result<(), ExecError> {
        let mut first: HashMap<usize, Access> = HashMap::new();
        for s in self.entry_steps(entry)? {
            let k = &self.manifest.kernels[s.kernel];
            for (slot, &b) in k.buffers.iter().zip(&s.buffers) {
                first.entry(b).or_insert(slot.access);
            }
        }
        for (b, access) in first {
            let role = self.manifest.buffers[b].role;
            let buf = &self.bufs[b];
            if access == Access::Write
                && !matches!(role, BufferRole::Param | BufferRole::Input | BufferRole::Optimizer)
                && buf.len > 0
            {
                // SAFETY: `len` bytes are allocated.
                unsafe { result::memset_d8_async(buf.ptr, 0xff, buf.len, self.stream) }
                    .map_err(cuda_err("filling buffers with NaN"))?;
            }
        }
        Ok(())
    }
}

/// A kernel launch's grid and block dimensions and dynamic shared memory in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchShape {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shared: u32,
}

/// The launch shape of `extent` iterations of a kernel with launch info `gpu`.
pub fn launch_shape(
    kernel: &str,
    gpu: Option<&GpuLaunch>,
    extent: i64,
    env: &HashMap<&str, i64>,
) -> Result<LaunchShape, ExecError> {
    let too_big = |what: &str, v: i64| {
        ExecError::Sizes(format!("kernel `{kernel}`: {what} {v} does not fit a CUDA launch (extent {extent})"))
    };
    let block = gpu.map(|g| g.block).unwrap_or([DEFAULT_BLOCK, 1, 1]);
    if block.contains(&0) || block.iter().map(|&b| b as u64).product::<u64>() > 1024 {
        return Err(ExecError::Sizes(format!("kernel `{kernel}`: block {block:?} is not a valid CUDA block")));
    }
    let grid = match gpu.map(|g| &g.grid) {
        Some(polys) => {
            let mut g = [0u32; 3];
            for (i, p) in polys.iter().enumerate() {
                let v = p.eval(env).map_err(|e| ExecError::Sizes(format!("grid of kernel `{kernel}`: {e}")))?;
                let limit = if i == 0 { i32::MAX as i64 } else { 65535 };
                if !(0..=limit).contains(&v) {
                    return Err(too_big("grid dimension", v));
                }
                g[i] = v as u32;
            }
            g
        }
        None => {
            let per = block[0] as i64;
            let v = (extent + per - 1) / per;
            if v > i32::MAX as i64 {
                return Err(too_big("grid", v));
            }
            [v as u32, 1, 1]
        }
    };
    let shared = gpu.map(|g| g.shared_bytes).unwrap_or(0);
    Ok(LaunchShape { grid: (grid[0], grid[1], grid[2]), block: (block[0], block[1], block[2]), shared })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Poly;

    #[test]
    fn launch_shapes() {
        let env = HashMap::from([("B", 2), ("N", 1000)]);
        let shape = |g, b, s| LaunchShape { grid: g, block: b, shared: s };
        assert_eq!(launch_shape("k", None, 1000, &env).unwrap(), shape((4, 1, 1), (256, 1, 1), 0));
        assert_eq!(launch_shape("k", None, 256, &env).unwrap(), shape((1, 1, 1), (256, 1, 1), 0));
        assert_eq!(launch_shape("k", None, 0, &env).unwrap(), shape((0, 1, 1), (256, 1, 1), 0));
        let g = GpuLaunch {
            block: [128, 2, 1],
            grid: [Poly::sym("B"), Poly::ceil_div(Poly::sym("N"), 64), Poly::constant(1)],
            shared_bytes: 4096,
        };
        assert_eq!(launch_shape("k", Some(&g), 7, &env).unwrap(), shape((2, 16, 1), (128, 2, 1), 4096));
        let bad = GpuLaunch { block: [2048, 1, 1], ..g.clone() };
        assert!(launch_shape("k", Some(&bad), 7, &env).is_err());
        let huge = GpuLaunch { grid: [Poly::constant(1), Poly::constant(70000), Poly::constant(1)], ..g };
        assert!(launch_shape("k", Some(&huge), 7, &env).is_err());
    }

    #[test]
    fn launch_arguments_follow_the_sizes_of_each_launch() {
        let base = [2, 1000, 7, 3, 1];
        let steps: [&[i64]; 4] = [&[], &[0], &[], &[1024]];
        let (all, starts) = launch_arguments(&base, steps.into_iter());
        assert_eq!(starts, vec![None, Some(0), None, Some(6)]);
        assert_eq!(all, vec![2, 1000, 7, 3, 1, 0, 2, 1000, 7, 3, 1, 1024]);
        let (none, starts) = launch_arguments(&base, [&[][..], &[]].into_iter());
        assert!(none.is_empty() && starts == vec![None, None]);
    }

    #[test]
    fn sm_names() {
        assert_eq!(target_sm("sm80"), Some(80));
        assert_eq!(target_sm("sm_90a"), Some(90));
        assert_eq!(target_sm("x86-64-v3"), None);
    }
}
