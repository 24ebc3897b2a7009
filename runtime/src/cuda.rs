//! The CUDA device (feature `cuda`): loads `kernels.ptx` through the driver API (the
//! driver JIT-compiles the PTX; no CUDA toolkit is needed), allocates the planned buffers
//! in GPU memory, and launches each entry point's steps in order on one stream.
//!
//! The driver library is loaded at run time: a host without one gets
//! [`ExecError::NoDriver`] from [`CudaDevice::new`], never a panic or a link failure.
//!
//! # Calling convention
//!
//! Every kernel of `kernels.ptx` is an `.entry` taking `(u64 buffers, u64 sizes, s64 begin,
//! s64 end)`: `buffers` is a device pointer to an array of device pointers, one per kernel
//! buffer slot in the step's order; `sizes` a device pointer to the `i64` values of the
//! manifest's `sizes` followed by its `scalars` (and the step's launch arguments). One
//! thread runs one parallel iteration: `index = begin + blockIdx.x * blockDim.x +
//! threadIdx.x`, returning when `index >= end`. A launch covers `0..extent` with block
//! `(256, 1, 1)` and grid `(ceil(extent / 256), 1, 1)`, unless the kernel's [`GpuLaunch`]
//! gives its own block (and grid polynomials, evaluated at the current sizes) and dynamic
//! shared memory.
//!
//! # Library products
//!
//! A `--gemm cublas` bundle keeps some dense products as library GEMM nodes; each is one or
//! more cuBLAS calls on the same stream ([`crate::cublas`], planned by
//! [`crate::cublas_plan`]), loaded only when a bundle has such nodes.
//!
//! # CUDA graphs
//!
//! A full-size training step is thousands of launches. With graphs on (the default), the
//! first run of an entry point after binding runs eagerly (a warm-up, outside any
//! capture) and is then captured from the stream into a graph (capturing runs nothing),
//! and every later run replays it with one `cuGraphLaunch`. Kernels read their sizes and
//! scalars through device pointers, so a new `step` or `seed` is an upload before the
//! replay, not a new graph; new sizes reallocate the buffers and bind again, which drops
//! the graphs.

use crate::bundle::Bundle;
use crate::cublas::{Cublas, WORKSPACE_BYTES};
use crate::cublas_plan::{self, Call};
use crate::device::{Device, Launch as Step};
use crate::error::ExecError;
use crate::manifest::{GpuLaunch, TargetKind, CUDA_KERNELS_FILE};
use cudarc::driver::{result, sys, DriverError};
use std::collections::{HashMap, HashSet};
use std::ffi::{c_void, CString};
use std::path::Path;

/// Threads per block when the manifest does not say.
pub const DEFAULT_BLOCK: u32 = 256;
/// The environment variable choosing the device ordinal (default 0).
pub const DEVICE_ENV: &str = "TNC_CUDA_DEVICE";
/// The environment variable turning CUDA graphs off (`0`).
pub const GRAPHS_ENV: &str = "TNC_CUDA_GRAPHS";

/// Whether CUDA graphs are on: unless `TNC_CUDA_GRAPHS=0`.
pub fn graphs_from_env() -> bool {
    std::env::var(GRAPHS_ENV).map_or(true, |v| v.trim() != "0")
}

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
    /// fit; says whether it reallocated.
    fn resize(&mut self, len: usize, stream: sys::CUstream) -> Result<bool, ExecError> {
        self.len = len;
        if len <= self.cap && self.cap > 0 {
            return Ok(false);
        }
        let cap = len.max(MIN_ALLOC);
        self.free();
        // SAFETY: plain allocation in the current context.
        let ptr = unsafe { result::malloc_sync(cap) }.map_err(|e| match e.0 {
            sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => {
                ExecError::Memory(format!("out of GPU memory allocating a buffer of {len} bytes"))
            }
            _ => cuda_err(format!("allocating {len} bytes"))(e),
        })?;
        *self = DevBuf { ptr, cap, len };
        // SAFETY: `ptr` has `cap` bytes.
        unsafe { result::memset_d8_async(ptr, 0, cap, stream) }.map_err(cuda_err("zeroing a buffer"))?;
        Ok(true)
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

/// One bound step: a kernel launch or a library product's cuBLAS calls.
struct Launch {
    work: Work,
    extent: i64,
    /// The step's launch arguments, passed after the sizes and scalars.
    args: Vec<i64>,
    /// The kernel's name, for errors.
    name: String,
}

enum Work {
    Kernel {
        function: sys::CUfunction,
        /// Byte offset of this step's pointer array in the entry's pointer table.
        table_offset: usize,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared: u32,
    },
    /// A library GEMM node: its calls, operand type, arithmetic (`2·m·n·k` per product),
    /// and the device addresses of its A, B and C buffers.
    Cublas { calls: Vec<Call>, operands: crate::gemm::Operands, flops: f64, pointers: [u64; 3] },
}

/// A captured entry point, and the argument pointers its launches were captured with.
struct Graph {
    graph: sys::CUgraph,
    exec: sys::CUgraphExec,
    pointers: (u64, u64),
}

impl Graph {
    fn destroy(self) {
        // SAFETY: created by `capture`, destroyed once; the stream is synchronized by the
        // callers before a binding is replaced.
        unsafe {
            let _ = result::graph::exec_destroy(self.exec);
            let _ = result::graph::destroy(self.graph);
        }
    }
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
    graph: Option<Graph>,
}

impl EntryTable {
    fn free(&mut self) {
        self.pointers.free();
        self.args_dev.free();
        if let Some(g) = self.graph.take() {
            g.destroy();
        }
    }
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

/// An NVIDIA GPU running a CUDA bundle. See the module documentation.
pub struct CudaDevice {
    /// Every kernel's name and launch shape.
    kernels: Vec<(String, Option<GpuLaunch>)>,
    functions: Vec<Option<sys::CUfunction>>,
    bufs: Vec<DevBuf>,
    /// Per entry point: the device table of every step's buffer pointers, valid while the
    /// buffers are not reallocated.
    tables: HashMap<String, EntryTable>,
    /// The device copy of `sizes ++ scalars`, and the host values it holds.
    args_dev: DevBuf,
    args_host: Vec<i64>,
    graphs: bool,
    /// `TNC_PROFILE`: every launch timed on its own, the slowest kernels printed.
    profile: bool,
    stream: sys::CUstream,
    module: sys::CUmodule,
    /// cuBLAS and its workspace, when the bundle has library products.
    cublas: Option<Cublas>,
    cublas_workspace: DevBuf,
    // Declared last: dropped after everything above is freed (see `Drop`).
    ctx: Context,
}

// SAFETY: the device owns its context, stream, module and allocations exclusively and
// makes the context current on whichever thread calls it (every method binds it).
unsafe impl Send for CudaDevice {}

impl Drop for CudaDevice {
    fn drop(&mut self) {
        if self.ctx.bind().is_err() {
            return;
        }
        // SAFETY: everything below was created in this context; the stream is drained
        // before memory is freed.
        unsafe {
            let _ = result::stream::synchronize(self.stream);
        }
        // The graphs (which may hold cuBLAS's kernels) first, then the handle, then its
        // workspace and every buffer.
        for t in self.tables.values_mut() {
            t.free();
        }
        self.cublas = None;
        self.cublas_workspace.free();
        for b in &mut self.bufs {
            b.free();
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

impl CudaDevice {
    /// A device for a CUDA bundle on GPU 0 (or `TNC_CUDA_DEVICE`), replaying entry points
    /// as CUDA graphs when `graphs` is on. Loads the driver and `kernels.ptx`, resolves
    /// every kernel, and checks the GPU against the bundle's target.
    pub fn new(bundle: &Bundle, graphs: bool) -> Result<CudaDevice, ExecError> {
        bundle.check_kind(TargetKind::Cuda)?;
        let m = &bundle.manifest;
        let all: HashSet<usize> = m.entry_points.values().flatten().map(|s| s.kernel).collect();
        let products = all.iter().any(|&i| m.kernels[i].library);
        // Library nodes are cuBLAS calls, every other kernel is in the PTX.
        let used: HashSet<usize> = all.into_iter().filter(|&i| !m.kernels[i].library).collect();
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
        let mut ex = CudaDevice {
            kernels: m.kernels.iter().map(|k| (k.name.clone(), k.gpu.clone())).collect(),
            functions: vec![None; m.kernels.len()],
            bufs: m.buffers.iter().map(|_| DevBuf::empty()).collect(),
            tables: HashMap::new(),
            args_dev: DevBuf::empty(),
            args_host: Vec::new(),
            graphs,
            profile: std::env::var_os("TNC_PROFILE").is_some(),
            stream,
            module: std::ptr::null_mut(),
            cublas: None,
            cublas_workspace: DevBuf::empty(),
            ctx,
        };
        if products {
            ex.cublas_workspace.resize(WORKSPACE_BYTES, stream)?;
            // SAFETY: our stream and workspace, freed after the handle (see `Drop`).
            ex.cublas = Some(unsafe { Cublas::new(stream as *mut c_void, ex.cublas_workspace.ptr) }?);
        }
        let manifest = m;
        if !used.is_empty() {
            let path = bundle.path(CUDA_KERNELS_FILE);
            let ptx = std::fs::read(&path).map_err(|error| ExecError::Io { path: path.clone(), error })?;
            ex.module = load_ptx(&ptx, &path)?;
            for &i in &used {
                let k = &manifest.kernels[i];
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
                                k.name, manifest.target.name
                            ),
                            message: format!("{e}"),
                        }
                    })?;
                }
                ex.functions[i] = Some(f);
            }
        }
        Ok(ex)
    }

    /// The GPU this device runs on.
    pub fn info(&self) -> &DeviceInfo {
        &self.ctx.info
    }

    /// Drops every binding (their pointers and graphs).
    fn unbind_all(&mut self) -> Result<(), ExecError> {
        self.synchronize()?;
        for t in self.tables.values_mut() {
            t.free();
        }
        self.tables.clear();
        Ok(())
    }

    /// Queues launches `range` of an entry point on the stream, reading
    /// `sizes ++ scalars` at `base`.
    fn enqueue(
        &self,
        t: &EntryTable,
        range: std::ops::Range<usize>,
        starts: &[Option<usize>],
        base: u64,
    ) -> Result<(), ExecError> {
        for (l, start) in t.launches[range.clone()].iter().zip(&starts[range]) {
            let (function, table_offset, grid, block, shared) = match &l.work {
                Work::Kernel { function, table_offset, grid, block, shared } => {
                    (*function, *table_offset, *grid, *block, *shared)
                }
                Work::Cublas { calls, operands, pointers, .. } => {
                    self.products(&l.name, calls, *operands, *pointers)?;
                    continue;
                }
            };
            if l.extent == 0 || grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
                continue;
            }
            let mut a_buffers: u64 = t.pointers.ptr + table_offset as u64;
            let mut a_sizes: u64 = match start {
                Some(i) => t.args_dev.ptr + (i * 8) as u64,
                None => base,
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
            unsafe { result::launch_kernel(function, grid, block, shared, self.stream, &mut params) }.map_err(|e| {
                cuda_err(format!(
                    "launching kernel `{}` (grid {grid:?}, block {block:?}, extent {})",
                    l.name, l.extent
                ))(e)
            })?;
        }
        Ok(())
    }

    /// Queues a library node's cuBLAS calls; `pointers` are its A, B and C buffers.
    fn products(
        &self,
        name: &str,
        calls: &[Call],
        operands: crate::gemm::Operands,
        pointers: [u64; 3],
    ) -> Result<(), ExecError> {
        let cublas = self.cublas.as_ref().ok_or_else(|| {
            ExecError::Unsupported(format!("library kernel `{name}` needs cuBLAS, which is not loaded"))
        })?;
        for call in calls {
            if call.k > 0 {
                // SAFETY: the executor checked the node's shape against its buffers, whose
                // addresses are those of the current allocation.
                unsafe { cublas.gemm(call, operands, pointers, name) }?;
            } else if !call.accumulate {
                // Nothing to sum: C = 0, without relying on what cuBLAS does with k = 0,
                // which its documentation does not say.
                self.zero(call, pointers[crate::gemm::SLOT_C], name)?;
            }
        }
        Ok(())
    }

    /// Sets the C of a call with k = 0 to zero: for each batch entry, `n` columns of `m`
    /// floats, `ldc` floats apart (C is f32; zero bits are 0.0).
    fn zero(&self, call: &Call, c: u64, name: &str) -> Result<(), ExecError> {
        for p in 0..call.batch as i64 {
            let at = c + ((call.c_offset + p * call.c_stride) as u64) * 4;
            // SAFETY: the executor checked that C holds every element the node writes,
            // which are these.
            unsafe {
                sys::cuMemsetD2D32Async(at, call.ldc as usize * 4, 0, call.m as usize, call.n as usize, self.stream)
            }
            .result()
            .map_err(cuda_err(format!("zeroing the product of kernel `{name}` (k = 0)")))?;
        }
        Ok(())
    }

    /// Runs `entry`'s launches one at a time, each between two events, and prints the
    /// kernels that took the longest (to standard error).
    fn profile(&self, entry: &str, t: &EntryTable, starts: &[Option<usize>]) -> Result<(), ExecError> {
        let flags = sys::CUevent_flags::CU_EVENT_DEFAULT;
        let (start, end) = (
            result::event::create(flags).map_err(cuda_err("creating an event"))?,
            result::event::create(flags).map_err(cuda_err("creating an event"))?,
        );
        let mut profile = crate::profile::Profile::default();
        let r = (|| -> Result<(), ExecError> {
            for (i, l) in t.launches.iter().enumerate() {
                // SAFETY: events created above, recorded on our stream.
                unsafe { result::event::record(start, self.stream) }.map_err(cuda_err("recording an event"))?;
                self.enqueue(t, i..i + 1, starts, self.args_dev.ptr)?;
                unsafe { result::event::record(end, self.stream) }.map_err(cuda_err("recording an event"))?;
                self.synchronize()?;
                let ms = unsafe { result::event::elapsed(start, end) }.map_err(cuda_err("reading an event"))? as f64;
                // The tiled products' arithmetic is not in the manifest: no rate for them.
                let flops = match &l.work {
                    Work::Cublas { flops, .. } => Some(*flops),
                    Work::Kernel { .. } => None,
                };
                profile.add(l.name.as_str(), ms / 1e3, flops);
            }
            Ok(())
        })();
        // SAFETY: created above, no longer recorded.
        unsafe {
            let _ = result::event::destroy(start);
            let _ = result::event::destroy(end);
        }
        r?;
        for line in profile.report(entry) {
            eprintln!("{line}");
        }
        Ok(())
    }

    /// Captures `entry`'s launches into a graph (nothing runs while capturing).
    fn capture(&self, t: &EntryTable, starts: &[Option<usize>]) -> Result<Graph, ExecError> {
        let mode = sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
        // SAFETY: our stream, not capturing.
        unsafe { result::stream::begin_capture(self.stream, mode) }.map_err(cuda_err("capturing a CUDA graph"))?;
        let queued = self.enqueue(t, 0..t.launches.len(), starts, self.args_dev.ptr);
        // SAFETY: capture began above; ending it restores the stream even after an error.
        let graph = unsafe { result::stream::end_capture(self.stream) };
        if let Err(e) = queued {
            if let Ok(g) = graph {
                // SAFETY: captured above, never instantiated.
                unsafe {
                    let _ = result::graph::destroy(g);
                }
            }
            return Err(e);
        }
        let graph = graph.map_err(cuda_err("capturing a CUDA graph"))?;
        // SAFETY: `graph` was just captured.
        match unsafe { result::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0)) } {
            Ok(exec) => Ok(Graph { graph, exec, pointers: (self.args_dev.ptr, t.args_dev.ptr) }),
            Err(e) => {
                unsafe {
                    let _ = result::graph::destroy(graph);
                }
                Err(cuda_err("instantiating a CUDA graph")(e))
            }
        }
    }
}

impl Device for CudaDevice {
    fn describe(&self) -> String {
        let d = &self.ctx.info;
        format!(
            "cuda:{} {} (compute capability {}.{}, {:.1} GiB{}{})",
            d.ordinal,
            d.name,
            d.compute_capability.0,
            d.compute_capability.1,
            d.total_bytes as f64 / (1u64 << 30) as f64,
            if self.graphs { ", CUDA graphs" } else { ", no CUDA graphs" },
            self.cublas.as_ref().map(|c| format!(", products through {}", c.describe)).unwrap_or_default()
        )
    }

    fn resize(&mut self, buffer: usize, len: usize) -> Result<(), ExecError> {
        self.ctx.bind()?;
        if len > self.bufs[buffer].cap || self.bufs[buffer].cap == 0 {
            // The old allocation may still be used by queued kernels and bound tables.
            self.unbind_all()?;
        }
        self.bufs[buffer].resize(len, self.stream)?;
        Ok(())
    }

    fn allocated_bytes(&self) -> usize {
        self.bufs.iter().map(|b| b.cap).sum()
    }

    fn free_bytes(&self) -> Option<usize> {
        self.ctx.bind().ok()?;
        result::mem_get_info().ok().map(|(free, _)| free)
    }

    fn upload(&mut self, buffer: usize, bytes: &[u8]) -> Result<(), ExecError> {
        self.ctx.bind()?;
        let b = &self.bufs[buffer];
        if bytes.len() > b.len {
            return Err(ExecError::Sizes(format!(
                "{} bytes do not fit buffer {buffer} of {} bytes",
                bytes.len(),
                b.len
            )));
        }
        if !bytes.is_empty() {
            // SAFETY: the bytes fit; a copy from pageable memory returns once the source
            // has been staged, so `bytes` may be dropped.
            unsafe { result::memcpy_htod_async(b.ptr, bytes, self.stream) }
                .map_err(cuda_err(format!("copying {} bytes to the GPU", bytes.len())))?;
        }
        Ok(())
    }

    fn copy(&mut self, from: usize, to: usize, len: usize) -> Result<(), ExecError> {
        self.ctx.bind()?;
        let (src, dst) = (&self.bufs[from], &self.bufs[to]);
        if from == to || len > src.len.min(dst.len) {
            return Err(ExecError::Sizes(format!("cannot copy {len} bytes from buffer {from} to buffer {to}")));
        }
        if len > 0 {
            // SAFETY: both allocations hold `len` bytes and are distinct; stream-ordered.
            unsafe { result::memcpy_dtod_async(dst.ptr, src.ptr, len, self.stream) }
                .map_err(cuda_err(format!("copying {len} bytes on the GPU")))?;
        }
        Ok(())
    }

    fn download(&self, buffer: usize, len: usize) -> Result<Vec<u8>, ExecError> {
        self.ctx.bind()?;
        let b = &self.bufs[buffer];
        if len > b.len {
            return Err(ExecError::Sizes(format!("buffer {buffer} holds {} bytes, {len} were asked for", b.len)));
        }
        let mut out = vec![0u8; len];
        if len > 0 {
            // SAFETY: `len` bytes fit the buffer; synchronized below before `out` is read.
            unsafe { result::memcpy_dtoh_async(&mut out, b.ptr, self.stream) }
                .map_err(cuda_err("copying results to the host"))?;
        }
        self.synchronize()?;
        Ok(out)
    }

    fn fill(&mut self, buffer: usize, byte: u8) -> Result<(), ExecError> {
        self.ctx.bind()?;
        let b = &self.bufs[buffer];
        if b.len > 0 {
            // SAFETY: `len` bytes are allocated.
            unsafe { result::memset_d8_async(b.ptr, byte, b.len, self.stream) }
                .map_err(cuda_err("filling a buffer"))?;
        }
        Ok(())
    }

    fn bind(&mut self, entry: &str, steps: Vec<Step>, sizes: &HashMap<&str, i64>) -> Result<(), ExecError> {
        self.ctx.bind()?;
        if let Some(mut old) = self.tables.remove(entry) {
            self.synchronize()?;
            old.free();
        }
        let mut ptrs: Vec<u64> = Vec::new();
        let mut launches = Vec::with_capacity(steps.len());
        for s in steps {
            let (name, gpu) = &self.kernels[s.kernel];
            let work = match &s.gemm {
                Some((shape, operands)) => {
                    let calls = cublas_plan::plan(shape).map_err(|e| {
                        ExecError::Unsupported(format!(
                            "library kernel `{name}`: cuBLAS cannot compute this product ({e}); compile with \
                             `--gemm tiles`"
                        ))
                    })?;
                    let pointers = [crate::gemm::SLOT_A, crate::gemm::SLOT_B, crate::gemm::SLOT_C]
                        .map(|slot| self.bufs[s.buffers[slot]].ptr);
                    Work::Cublas { calls, operands: *operands, flops: shape.flops(), pointers }
                }
                None => {
                    let LaunchShape { grid, block, shared } = launch_shape(name, gpu.as_ref(), s.extent, sizes)?;
                    let function = self.functions[s.kernel].ok_or_else(|| {
                        ExecError::Unsupported(format!("kernel `{name}` has no code in {CUDA_KERNELS_FILE}"))
                    })?;
                    let table_offset = ptrs.len() * 8;
                    ptrs.extend(s.buffers.iter().map(|&b| self.bufs[b].ptr));
                    Work::Kernel { function, table_offset, grid, block, shared }
                }
            };
            launches.push(Launch { work, extent: s.extent, args: s.args, name: name.clone() });
        }
        let mut table = DevBuf::empty();
        table.resize(ptrs.len() * 8, self.stream)?;
        if !ptrs.is_empty() {
            // SAFETY: the table holds `ptrs.len() * 8` bytes; pageable source, staged.
            unsafe { result::memcpy_htod_async(table.ptr, &ptrs, self.stream) }
                .map_err(cuda_err("uploading buffer pointers"))?;
        }
        let t = EntryTable { pointers: table, launches, args_dev: DevBuf::empty(), args_host: Vec::new(), graph: None };
        self.tables.insert(entry.to_string(), t);
        Ok(())
    }

    fn launch(&mut self, entry: &str, args: &[i64]) -> Result<(), ExecError> {
        self.ctx.bind()?;
        let stream = self.stream;
        if self.args_dev.cap == 0 || args != self.args_host {
            // The previous values may still be read by queued kernels: the update is
            // ordered on the stream (from pageable memory, staged before the call returns).
            if self.args_dev.cap != 0 && self.args_dev.cap < args.len() * 8 {
                // Queued kernels and graphs hold the old pointer.
                self.synchronize()?;
                for t in self.tables.values_mut() {
                    if let Some(g) = t.graph.take() {
                        g.destroy();
                    }
                }
            }
            self.args_dev.resize((args.len() * 8).max(8), stream)?;
            self.args_host = args.to_vec();
            if !args.is_empty() {
                // SAFETY: the buffer holds `args.len() * 8` bytes.
                unsafe { result::memcpy_htod_async(self.args_dev.ptr, args, stream) }
                    .map_err(cuda_err("uploading sizes"))?;
            }
        }
        let mut t = self
            .tables
            .remove(entry)
            .ok_or_else(|| ExecError::Order(format!("`{entry}` is not bound to the current buffers")))?;
        let r = (|| {
            // Launches with launch arguments read their own `sizes ++ scalars ++ args`.
            let (per_launch, starts) = launch_arguments(args, t.launches.iter().map(|l| l.args.as_slice()));
            if !per_launch.is_empty() && (t.args_dev.cap == 0 || per_launch != t.args_host) {
                t.args_dev.resize(per_launch.len() * 8, stream)?;
                t.args_host = per_launch;
                // SAFETY: the buffer holds `args_host.len() * 8` bytes; pageable source,
                // staged before the call returns.
                unsafe { result::memcpy_htod_async(t.args_dev.ptr, &t.args_host, stream) }
                    .map_err(cuda_err("uploading launch arguments"))?;
            }
            if self.profile {
                return self.profile(entry, &t, &starts);
            }
            if !self.graphs {
                return self.enqueue(&t, 0..t.launches.len(), &starts, self.args_dev.ptr);
            }
            let pointers = (self.args_dev.ptr, t.args_dev.ptr);
            if t.graph.as_ref().is_some_and(|g| g.pointers != pointers) {
                self.synchronize()?;
                t.graph.take().expect("checked").destroy();
            }
            // Without a graph the run is eager, as PyTorch warms up before capturing:
            // whatever a library or the driver sets up on a first call (cuBLAS's kernels
            // and heuristics, lazily loaded functions) happens outside a capture. The
            // capture follows at once, once that run is done, so that its cost falls on
            // this run too, not on the first one a benchmark times.
            let Some(g) = t.graph.as_ref() else {
                self.enqueue(&t, 0..t.launches.len(), &starts, self.args_dev.ptr)?;
                self.synchronize()?;
                t.graph = Some(self.capture(&t, &starts)?);
                return Ok(());
            };
            // SAFETY: the graph was instantiated in this context; its pointers are live.
            unsafe { result::graph::launch(g.exec, stream) }
                .map_err(cuda_err(format!("launching the CUDA graph of `{entry}`")))
        })();
        self.tables.insert(entry.to_string(), t);
        r
    }

    fn synchronize(&self) -> Result<(), ExecError> {
        self.ctx.bind()?;
        // SAFETY: our stream, alive until drop.
        unsafe { result::stream::synchronize(self.stream) }.map_err(cuda_err("running kernels"))
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
