//! The CPU executor: loads `kernels.so`, allocates the planned buffers for the current
//! sizes, binds parameters and inputs, and runs entry points on a pool of threads.
//!
//! Every kernel has the C calling convention
//! `void name(void **buffers, const int64_t *sizes, int64_t begin, int64_t end)` and its
//! iterations write disjoint outputs, so a launch of `0..extent` is split into `threads`
//! contiguous chunks (`[extent·t/T, extent·(t+1)/T)` for thread `t` of `T`) run in
//! parallel, with a barrier between steps. The split depends only on the thread count.
//! The threads are started with the executor and kept (`pool.rs`).

use crate::bundle::{Bundle, BundleError};
use crate::gemm;
use crate::init::init_values_f32;
use crate::manifest::{Access, BufferRole, DType, InitSpec, Manifest, ParamEntry, TargetKind, CPU_KERNELS_FILE};
use crate::pool::Pool;
use crate::tensor::Tensor;
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::c_void;
use std::fmt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

/// The kernels' C calling convention.
pub type KernelFn = unsafe extern "C" fn(*mut *mut c_void, *const i64, i64, i64);

/// The message of [`ExecError::NoDriver`].
pub const NO_DRIVER: &str = "no CUDA driver found (libcuda.so could not be loaded)";

/// Why an executor could not be built or could not run.
#[derive(Debug)]
pub enum ExecError {
    Bundle(BundleError),
    /// `kernels.so` could not be loaded.
    Library {
        path: PathBuf,
        message: String,
    },
    /// A kernel's symbol is missing from `kernels.so`.
    Symbol {
        kernel: String,
        symbol: String,
        message: String,
    },
    /// The bundle needs something this executor does not implement.
    Unsupported(String),
    /// Sizes could not be determined or evaluated.
    Sizes(String),
    /// An input is unknown, missing, or has the wrong shape or type.
    Input {
        name: String,
        message: String,
    },
    /// Parameters could not be set.
    Params(String),
    /// Calls in the wrong order (backward before forward, forward before parameters, …).
    Order(String),
    /// An unknown output or gradient.
    Output(String),
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    /// The CUDA driver library (`libcuda.so`) is not installed on this host.
    NoDriver,
    /// A CUDA driver call failed: what was being done, and the driver's message.
    Cuda {
        what: String,
        message: String,
    },
}

impl fmt::Display for ExecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExecError::Bundle(e) => e.fmt(f),
            ExecError::Library { path, message } => write!(f, "cannot load {}: {message}", path.display()),
            ExecError::Symbol { kernel, symbol, message } => {
                write!(f, "kernel `{kernel}`: symbol `{symbol}` not found in {CPU_KERNELS_FILE}: {message}")
            }
            ExecError::Unsupported(m) => write!(f, "not supported by this executor: {m}"),
            ExecError::Sizes(m) => f.write_str(m),
            ExecError::Input { name, message } => write!(f, "input `{name}`: {message}"),
            ExecError::Params(m) => f.write_str(m),
            ExecError::Order(m) => f.write_str(m),
            ExecError::Output(m) => f.write_str(m),
            ExecError::Io { path, error } => write!(f, "{}: {error}", path.display()),
            ExecError::NoDriver => f.write_str(NO_DRIVER),
            ExecError::Cuda { what, message } => write!(f, "CUDA error {what}: {message}"),
        }
    }
}

impl std::error::Error for ExecError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ExecError::Bundle(e) => Some(e),
            ExecError::Io { error, .. } => Some(error),
            _ => None,
        }
    }
}

impl From<BundleError> for ExecError {
    fn from(e: BundleError) -> ExecError {
        ExecError::Bundle(e)
    }
}

/// A 64-byte aligned, zero-initialized allocation that kernels write through raw pointers.
struct Buf {
    ptr: NonNull<u8>,
    cap: usize,
    len: usize,
}

const ALIGN: usize = 64;

impl Buf {
    fn empty() -> Buf {
        Buf { ptr: NonNull::dangling(), cap: 0, len: 0 }
    }

    /// Makes the buffer `len` bytes long, reallocating (zeroed) only when it does not fit.
    fn resize(&mut self, len: usize) -> Result<(), ExecError> {
        if len > self.cap || self.cap == 0 {
            let cap = len.max(ALIGN);
            let layout = Layout::from_size_align(cap, ALIGN)
                .map_err(|_| ExecError::Sizes(format!("a buffer of {len} bytes is too large")))?;
            // SAFETY: the layout has a non-zero size.
            let p = unsafe { alloc_zeroed(layout) };
            let ptr =
                NonNull::new(p).ok_or_else(|| ExecError::Sizes(format!("out of memory allocating {len} bytes")))?;
            self.free();
            *self = Buf { ptr, cap, len };
        }
        self.len = len;
        Ok(())
    }

    fn free(&mut self) {
        if self.cap > 0 {
            // SAFETY: allocated in `resize` with this layout.
            unsafe { dealloc(self.ptr.as_ptr(), Layout::from_size_align_unchecked(self.cap, ALIGN)) };
            self.cap = 0;
        }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `len <= cap` bytes are allocated (or `len == 0` with a dangling pointer).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, and `&mut self` is unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

// SAFETY: a `Buf` owns its allocation exclusively, like a `Vec<u8>`.
unsafe impl Send for Buf {}

impl Drop for Buf {
    fn drop(&mut self) {
        self.free();
    }
}

/// What a launch runs: generated code from `kernels.so`, or a library GEMM node.
enum Work {
    Kernel(KernelFn),
    Gemm(gemm::Shape, gemm::Operands),
}

/// One kernel launch with everything bound.
struct Launch {
    work: Work,
    ptrs: Vec<*mut c_void>,
    extent: i64,
    /// The run-time arguments with the step's launch arguments appended, when it has any.
    args: Option<Vec<i64>>,
}

/// Launches shared by the worker threads; kernels only read the pointer arrays.
struct Launches(Vec<Launch>);
// SAFETY: the pointers address buffers that outlive the scoped threads; kernels write
// disjoint parts of them (the calling convention's contract) and never the pointer arrays.
unsafe impl Sync for Launches {}

/// Runs `launches` in order on the pool's threads (the calling thread included).
fn execute(launches: &Launches, args: &[i64], pool: &Pool) {
    let threads = pool.threads();
    // Thread `t` of `threads`' part of launch `l`.
    let run = |l: &Launch, t: usize, threads: usize| {
        let args = l.args.as_deref().unwrap_or(args);
        match &l.work {
            Work::Kernel(f) => {
                let (begin, end) = chunk(l.extent, t, threads);
                if begin < end {
                    // SAFETY: `f` has the kernel calling convention; `ptrs` has one pointer
                    // per declared buffer, each sized by the plan for the current sizes.
                    unsafe { f(l.ptrs.as_ptr() as *mut *mut c_void, args.as_ptr(), begin, end) }
                }
            }
            // SAFETY: the shape was checked against these buffers when the launch was
            // bound, and `run_part` gives threads disjoint parts of C.
            Work::Gemm(shape, operands) => unsafe {
                gemm::run_part(
                    shape,
                    *operands,
                    l.ptrs[gemm::SLOT_A] as *const u8,
                    l.ptrs[gemm::SLOT_B] as *const u8,
                    l.ptrs[gemm::SLOT_C] as *mut f32,
                    (t, threads),
                )
            },
        }
    };
    if threads <= 1 {
        for l in &launches.0 {
            run(l, 0, 1);
        }
        return;
    }
    let barrier = std::sync::Barrier::new(threads);
    pool.run(&|t: usize| {
        for l in &launches.0 {
            run(l, t, threads);
            barrier.wait();
        }
    });
}

/// Thread `t`'s contiguous part of `0..extent` when split `threads` ways.
pub fn chunk(extent: i64, t: usize, threads: usize) -> (i64, i64) {
    let at = |i: usize| (extent as i128 * i as i128 / threads as i128) as i64;
    (at(t), at(t + 1))
}

/// Runs a CPU bundle. See the module documentation.
pub struct Executor {
    manifest: Manifest,
    dir: PathBuf,
    threads: usize,
    /// The worker threads, kept between entry points.
    pool: Pool,
    /// Resolved kernel entry points (`None` for kernels no entry point uses).
    kernels: Vec<Option<KernelFn>>,
    bufs: Vec<Buf>,
    /// Current values of `manifest.sizes` (unset until known).
    sizes: Vec<Option<i64>>,
    /// The sizes the buffers are allocated for.
    allocated_for: Option<Vec<i64>>,
    /// Values of `manifest.scalars`.
    scalars: Vec<i64>,
    debug_nan: bool,
    params_set: bool,
    /// Entry points run since the buffers were last (re)allocated.
    ran: HashSet<String>,
    // Declared last so it is dropped after everything that may point into it.
    _lib: Option<libloading::Library>,
}

impl Executor {
    /// An executor for a CPU bundle with `threads` worker threads (at least 1). Loads
    /// `kernels.so`, resolves every kernel, and allocates the parameter buffers.
    pub fn new(bundle: &Bundle, threads: usize) -> Result<Executor, ExecError> {
        bundle.check_kind(TargetKind::Cpu)?;
        bundle.check_host_cpu()?;
        let m = bundle.manifest.clone();
        // Library GEMM nodes have no symbol; the executor calls the GEMM library for them.
        let used: HashSet<usize> =
            m.entry_points.values().flatten().map(|s| s.kernel).filter(|&k| !m.kernels[k].library).collect();
        let mut kernels = vec![None; m.kernels.len()];
        let lib = if used.is_empty() {
            None
        } else {
            let path = bundle.path(CPU_KERNELS_FILE);
            // SAFETY: loading a library runs its initializers; kernels.so is generated by
            // tnc and its checksum was verified by `Bundle::load`.
            let lib = unsafe { libloading::Library::new(&path) }
                .map_err(|e| ExecError::Library { path: path.clone(), message: e.to_string() })?;
            for &i in &used {
                let k = &m.kernels[i];
                // SAFETY: every kernel symbol has the `KernelFn` signature by the format's contract.
                let f: KernelFn = unsafe {
                    *lib.get::<KernelFn>(k.symbol.as_bytes()).map_err(|e| ExecError::Symbol {
                        kernel: k.name.clone(),
                        symbol: k.symbol.clone(),
                        message: e.to_string(),
                    })?
                };
                kernels[i] = Some(f);
            }
            Some(lib)
        };
        let mut bufs: Vec<Buf> = m.buffers.iter().map(|_| Buf::empty()).collect();
        for p in &m.params {
            let e = &m.buffers[p.buffer];
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
            bufs[p.buffer].resize(want)?;
        }
        // Optimizer state is allocated once, zeroed, and kept like the parameters.
        for (i, b) in m.buffers.iter().enumerate().filter(|(_, b)| b.role == BufferRole::Optimizer) {
            let bytes = b.bytes.as_const().filter(|&n| n >= 0).ok_or_else(|| {
                ExecError::Bundle(BundleError::Invalid(format!(
                    "optimizer buffer {i} has size `{}`, not a constant",
                    b.bytes
                )))
            })?;
            bufs[i].resize(bytes as usize)?;
        }
        Ok(Executor {
            sizes: vec![None; m.sizes.len()],
            scalars: vec![0; m.scalars.len()],
            manifest: m,
            dir: bundle.dir.clone(),
            threads: threads.max(1),
            pool: Pool::new(threads.max(1)),
            kernels,
            bufs,
            allocated_for: None,
            debug_nan: false,
            params_set: false,
            ran: HashSet::new(),
            _lib: lib,
        })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// In debug mode every buffer an entry point writes before reading (outputs,
    /// activations, gradients, workspace) is filled with NaN before the entry point runs,
    /// so a kernel that fails to write part of its output shows up.
    pub fn set_debug_nan(&mut self, on: bool) {
        self.debug_nan = on;
    }

    /// Sets a run-time scalar (`seed`, `step`, …) passed to kernels after the sizes.
    pub fn set_scalar(&mut self, name: &str, value: i64) -> Result<(), ExecError> {
        set_scalar(&self.manifest, &mut self.scalars, name, value)
    }

    /// Sets size symbols explicitly (needed only when no input of an entry point has the
    /// symbol as a dimension). Inputs passed later must agree.
    pub fn set_sizes(&mut self, sizes: &[(&str, i64)]) -> Result<(), ExecError> {
        set_sizes(&self.manifest, &mut self.sizes, sizes)
    }

    /// The current value of each size symbol.
    pub fn sizes(&self) -> Vec<(String, Option<i64>)> {
        self.manifest.sizes.iter().cloned().zip(self.sizes.iter().copied()).collect()
    }

    /// Initializes every parameter from `seed` (a parameter's own fixed seed wins) with
    /// the same values as the compiler's interpreter; baked values are read from the bundle.
    pub fn set_params_from_seed(&mut self, seed: u64) -> Result<(), ExecError> {
        let params = self.manifest.params.clone();
        let mut files = HashMap::new();
        for p in &params {
            let values = self.initial_values(p, seed, &mut files)?;
            self.write_param(p, &values);
        }
        self.params_set = true;
        Ok(())
    }

    /// Reads every parameter by name from a safetensors file (f32, or f64 converted),
    /// checking shapes. A non-trainable parameter missing from the file is initialized
    /// when that needs no run seed (a baked value or a fixed seed).
    pub fn set_params_from_file(&mut self, path: impl AsRef<Path>) -> Result<(), ExecError> {
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
                    self.initial_values(p, p.seed.unwrap_or(0), &mut files)?
                }
                Err(_) => {
                    return Err(ExecError::Params(format!("{} has no tensor `{}`", path.display(), p.name)));
                }
            };
            self.write_param(p, &values);
        }
        self.params_set = true;
        Ok(())
    }

    /// Writes every parameter to a safetensors file (f32).
    pub fn save_params(&self, path: impl AsRef<Path>) -> Result<(), ExecError> {
        let values: Vec<(&ParamEntry, Vec<u8>)> =
            self.manifest.params.iter().map(|p| (p, self.bufs[p.buffer].bytes().to_vec())).collect();
        write_params(path.as_ref(), &values)
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
        Ok(Tensor::from_bytes(p.dtype, shape, self.bufs[p.buffer].bytes()))
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

    /// Runs any entry point (`forward`, `backward`, `step`, …).
    pub fn run(&mut self, entry: &str, inputs: &[(&str, &Tensor)]) -> Result<(), ExecError> {
        let steps = self.manifest.entry_points.get(entry).cloned().ok_or_else(|| {
            ExecError::Order(format!(
                "the bundle has no entry point `{entry}` (it has {:?})",
                self.manifest.entry_points.keys().collect::<Vec<_>>()
            ))
        })?;
        if !self.params_set && !self.manifest.params.is_empty() {
            return Err(ExecError::Order(
                "parameters are not set: call set_params_from_seed or set_params_from_file first".into(),
            ));
        }
        let sizes = self.bind_inputs(entry, inputs)?;
        self.allocate(&sizes)?;
        if entry == "backward" && !self.ran.contains("forward") {
            return Err(ExecError::Order("backward needs a forward pass with the same sizes first".into()));
        }
        if entry == "accumulate" && !self.ran.contains("backward") {
            return Err(ExecError::Order("accumulate needs a backward pass first".into()));
        }

        // Debug: NaN into every buffer this entry writes before reading.
        if self.debug_nan {
            let mut first: HashMap<usize, Access> = HashMap::new();
            for s in &steps {
                let k = &self.manifest.kernels[s.kernel];
                for (slot, &b) in k.buffers.iter().zip(&s.buffers) {
                    first.entry(b).or_insert(slot.access);
                }
            }
            for (b, access) in first {
                let role = self.manifest.buffers[b].role;
                if access == Access::Write
                    && !matches!(role, BufferRole::Param | BufferRole::Input | BufferRole::Optimizer)
                {
                    for c in self.bufs[b].bytes_mut().chunks_mut(4) {
                        let n = c.len();
                        c.copy_from_slice(&f32::NAN.to_ne_bytes()[..n]);
                    }
                }
            }
        }

        for &(name, t) in inputs {
            let io = self.manifest.inputs.iter().find(|io| io.name == name && io.entry == entry).expect("checked");
            let src = t.bytes();
            let dst = self.bufs[io.buffer].bytes_mut();
            if src.len() > dst.len() {
                return Err(ExecError::Bundle(BundleError::Invalid(format!(
                    "input `{name}` needs {} bytes, its buffer has {}",
                    src.len(),
                    dst.len()
                ))));
            }
            dst[..src.len()].copy_from_slice(&src);
        }

        let env = self.env(&sizes);
        let mut launches = Vec::with_capacity(steps.len());
        for s in &steps {
            let k = &self.manifest.kernels[s.kernel];
            let extent =
                k.extent.eval(&env).map_err(|e| ExecError::Sizes(format!("extent of kernel `{}`: {e}", k.name)))?;
            if extent < 0 {
                return Err(ExecError::Sizes(format!("kernel `{}` has a negative extent {extent}", k.name)));
            }
            let work = match &k.gemm {
                Some(g) => {
                    // The views may use the step's launch arguments.
                    let mut env = env.clone();
                    env.extend(k.args.iter().map(String::as_str).zip(s.args.iter().copied()));
                    let shape = gemm::Shape::eval(g, &env)
                        .map_err(|e| ExecError::Sizes(format!("GEMM of kernel `{}`: {e}", k.name)))?;
                    let operands = match k.buffers[gemm::SLOT_A].elem {
                        DType::BF16 => gemm::Operands::BF16,
                        DType::F16 => gemm::Operands::F16,
                        _ => gemm::Operands::F32,
                    };
                    let elems = [operands.bytes(), operands.bytes(), 4];
                    let lens =
                        [gemm::SLOT_A, gemm::SLOT_B, gemm::SLOT_C].map(|i| self.bufs[s.buffers[i]].len / elems[i]);
                    shape.check(lens).map_err(|e| {
                        ExecError::Bundle(BundleError::Invalid(format!("library kernel `{}`: {e}", k.name)))
                    })?;
                    if shape.extent() != Some(extent) {
                        return Err(ExecError::Bundle(BundleError::Invalid(format!(
                            "library kernel `{}` has extent {extent}, its GEMM covers {}",
                            k.name,
                            shape.extent().unwrap_or(-1)
                        ))));
                    }
                    Work::Gemm(shape, operands)
                }
                None => Work::Kernel(self.kernels[s.kernel].expect("resolved in new")),
            };
            let ptrs = s.buffers.iter().map(|&b| self.bufs[b].ptr.as_ptr() as *mut c_void).collect();
            let args = (!s.args.is_empty())
                .then(|| sizes.iter().chain(&self.scalars).chain(&s.args).copied().collect::<Vec<i64>>());
            launches.push(Launch { work, ptrs, extent, args });
        }
        let args: Vec<i64> = sizes.iter().chain(&self.scalars).copied().collect();
        if std::env::var_os("TNC_PROFILE").is_some() {
            self.profile(entry, &steps, launches, &args);
        } else {
            execute(&Launches(launches), &args, &self.pool);
        }
        if entry == "forward" {
            self.ran.clear();
        }
        self.ran.insert(entry.to_string());
        Ok(())
    }

    /// Output `name` of the last run of the entry point that produces it.
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
        let bytes = self.bufs[io.buffer].bytes();
        if n > bytes.len() {
            return Err(ExecError::Bundle(BundleError::Invalid(format!(
                "output `{name}` needs {n} bytes, its buffer has {}",
                bytes.len()
            ))));
        }
        Ok(Tensor::from_bytes(io.dtype, shape, &bytes[..n]))
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
    /// parameter name, after `backward`.
    pub fn gradients(&self) -> Result<BTreeMap<String, Tensor>, ExecError> {
        if !self.ran.contains("backward") {
            return Err(ExecError::Order("gradients need a backward pass first".into()));
        }
        let mut out = BTreeMap::new();
        for (i, p) in gradient_buffers(&self.manifest)? {
            let name = p.name.as_str();
            let shape: Vec<usize> = p.shape.iter().map(|&d| d as usize).collect();
            let n = numel(p)? * p.dtype.bytes();
            let bytes = self.bufs[i].bytes();
            if n > bytes.len() {
                return Err(ExecError::Bundle(BundleError::Invalid(format!(
                    "gradient of `{name}` needs {n} bytes, its buffer has {}",
                    bytes.len()
                ))));
            }
            out.insert(name.to_string(), Tensor::from_bytes(p.dtype, shape, &bytes[..n]));
        }
        Ok(out)
    }

    /// Bytes allocated for buffers (parameters, optimizer state, activations, gradients
    /// and workspace) at the current sizes.
    pub fn allocated_bytes(&self) -> usize {
        self.bufs.iter().map(|b| b.cap).sum()
    }

    /// The f32 values of the optimizer buffer `name` (`hyper`, `adam_m.<param>`, …; see
    /// [`BufferRole::Optimizer`]).
    pub fn optimizer_buffer(&self, name: &str) -> Result<Vec<f32>, ExecError> {
        let i = optimizer_buffer_index(&self.manifest, name)?;
        Ok(self.bufs[i].bytes().chunks_exact(4).map(|c| f32::from_ne_bytes(c.try_into().unwrap())).collect())
    }

    /// Overwrites the optimizer buffer `name`; `values` must fill it exactly.
    pub fn set_optimizer_buffer(&mut self, name: &str, values: &[f32]) -> Result<(), ExecError> {
        let i = optimizer_buffer_index(&self.manifest, name)?;
        let dst = self.bufs[i].bytes_mut();
        if dst.len() != values.len() * 4 {
            return Err(ExecError::Params(format!(
                "optimizer buffer `{name}` holds {} values, got {}",
                dst.len() / 4,
                values.len()
            )));
        }
        for (c, v) in dst.chunks_exact_mut(4).zip(values) {
            c.copy_from_slice(&v.to_ne_bytes());
        }
        Ok(())
    }

    /// Overwrites parameter `name` (f32, in row-major order; the length must match).
    pub fn set_param(&mut self, name: &str, values: &[f32]) -> Result<(), ExecError> {
        let p = self
            .manifest
            .params
            .iter()
            .find(|p| p.name == name)
            .cloned()
            .ok_or_else(|| ExecError::Params(format!("the bundle has no parameter `{name}`")))?;
        if numel(&p)? != values.len() || p.dtype != DType::F32 {
            return Err(ExecError::Params(format!(
                "parameter `{name}` has shape {:?} ({}), got {} f32 values",
                p.shape,
                p.dtype,
                values.len()
            )));
        }
        self.write_param(&p, values);
        self.params_set = true;
        Ok(())
    }

    // -----------------------------------------------------------------------------------

    /// `TNC_PROFILE=1`: runs the launches one at a time and prints the kernels that took
    /// the longest (to standard error), for finding a slow schedule.
    fn profile(&self, entry: &str, steps: &[crate::manifest::Step], launches: Vec<Launch>, args: &[i64]) {
        let mut times: HashMap<usize, (usize, f64)> = HashMap::new();
        let total = std::time::Instant::now();
        for (s, l) in steps.iter().zip(launches) {
            let t = std::time::Instant::now();
            execute(&Launches(vec![l]), args, &self.pool);
            let e = times.entry(s.kernel).or_default();
            e.0 += 1;
            e.1 += t.elapsed().as_secs_f64();
        }
        let total = total.elapsed().as_secs_f64();
        let mut v: Vec<_> = times.into_iter().collect();
        v.sort_by(|a, b| b.1 .1.total_cmp(&a.1 .1));
        eprintln!("profile of `{entry}`: {:.3} ms in {} launches", total * 1e3, steps.len());
        for (k, (count, secs)) in v.into_iter().take(200) {
            eprintln!(
                "  {:>10.3} ms {:>5.1}%  {count}× {}",
                secs * 1e3,
                100.0 * secs / total.max(1e-12),
                self.manifest.kernels[k].name
            );
        }
    }

    fn env(&self, sizes: &[i64]) -> HashMap<&str, i64> {
        self.manifest.sizes.iter().map(String::as_str).zip(sizes.iter().copied()).collect()
    }

    /// Checks `inputs` against `entry`'s inputs and returns the sizes they imply.
    fn bind_inputs(&mut self, entry: &str, inputs: &[(&str, &Tensor)]) -> Result<Vec<i64>, ExecError> {
        let sizes = bind_sizes(&self.manifest, &self.sizes, entry, inputs)?;
        self.sizes = sizes.iter().map(|&v| Some(v)).collect();
        Ok(sizes)
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
        for (i, len) in lens.into_iter().enumerate() {
            if !matches!(self.manifest.buffers[i].role, BufferRole::Param | BufferRole::Optimizer) {
                self.bufs[i].resize(len)?;
            }
        }
        self.allocated_for = Some(sizes.to_vec());
        self.ran.clear();
        Ok(())
    }

    fn initial_values(
        &self,
        p: &ParamEntry,
        seed: u64,
        files: &mut HashMap<String, Vec<u8>>,
    ) -> Result<Vec<f32>, ExecError> {
        initial_values(&self.dir, p, seed, files)
    }

    fn write_param(&mut self, p: &ParamEntry, values: &[f32]) {
        let dst = self.bufs[p.buffer].bytes_mut();
        for (c, v) in dst.chunks_exact_mut(4).zip(values) {
            c.copy_from_slice(&v.to_ne_bytes());
        }
    }
}

/// Checks `inputs` against `entry`'s inputs of `m` and returns the sizes they imply:
/// `current` (explicit or previous values) overridden by input dimensions that are a bare
/// size symbol; every input's shape must then evaluate to what was given.
pub(crate) fn bind_sizes(
    m: &Manifest,
    current: &[Option<i64>],
    entry: &str,
    inputs: &[(&str, &Tensor)],
) -> Result<Vec<i64>, ExecError> {
    let expected: Vec<_> = m.inputs.iter().filter(|io| io.entry == entry).collect();
    let mut given: Vec<(&str, &crate::manifest::IoEntry, &Tensor)> = Vec::new();
    for &(name, t) in inputs {
        let Some(io) = expected.iter().find(|io| io.name == name) else {
            return Err(ExecError::Input {
                name: name.into(),
                message: format!(
                    "`{entry}` has no such input (its inputs are {:?})",
                    expected.iter().map(|io| &io.name).collect::<Vec<_>>()
                ),
            });
        };
        if given.iter().any(|g| g.0 == name) {
            return Err(ExecError::Input { name: name.into(), message: "given twice".into() });
        }
        given.push((name, io, t));
        if t.dtype() != io.dtype {
            return Err(ExecError::Input {
                name: name.into(),
                message: format!("has element type {}, expected {}", t.dtype(), io.dtype),
            });
        }
        if t.len() != t.shape.iter().product::<usize>() {
            return Err(ExecError::Input {
                name: name.into(),
                message: format!("has {} values for shape {:?}", t.len(), t.shape),
            });
        }
    }
    if let Some(io) = expected.iter().find(|io| !given.iter().any(|g| g.0 == io.name)) {
        return Err(ExecError::Input { name: io.name.clone(), message: format!("missing (needed by `{entry}`)") });
    }
    let shape_err = |io: &crate::manifest::IoEntry, t: &Tensor, env: Option<&HashMap<&str, i64>>| {
        let decl = io.shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ");
        let vals = env
            .and_then(|env| io.shape.iter().map(|d| d.eval(env).ok()).collect::<Option<Vec<_>>>())
            .map(|v| format!(" = {v:?}"))
            .unwrap_or_default();
        ExecError::Input { name: io.name.clone(), message: format!("has shape {:?}, expected [{decl}]{vals}", t.shape) }
    };
    // Sizes: explicit or previous values, overridden by dimensions that are a bare symbol.
    let mut sizes = current.to_vec();
    let mut from: Vec<Option<&str>> = vec![None; sizes.len()];
    for &(name, io, t) in &given {
        if t.shape.len() != io.shape.len() {
            return Err(shape_err(io, t, None));
        }
        for (d, &v) in io.shape.iter().zip(&t.shape) {
            if let Some(s) = d.as_sym() {
                let Some(i) = m.sizes.iter().position(|x| x == s) else { continue };
                match from[i] {
                    Some(other) if sizes[i] != Some(v as i64) => {
                        return Err(ExecError::Input {
                            name: name.into(),
                            message: format!(
                                "has {s} = {v} (shape {:?}), but input `{other}` has {s} = {}",
                                t.shape,
                                sizes[i].unwrap_or(0)
                            ),
                        });
                    }
                    _ => {
                        sizes[i] = Some(v as i64);
                        from[i] = Some(name);
                    }
                }
            }
        }
    }
    let sizes: Vec<i64> = sizes
        .iter()
        .zip(&m.sizes)
        .map(|(v, s)| {
            v.ok_or_else(|| {
                ExecError::Sizes(format!(
                    "size `{s}` is unknown: no input of `{entry}` has it as a dimension; call set_sizes"
                ))
            })
        })
        .collect::<Result<_, _>>()?;
    let env: HashMap<&str, i64> = m.sizes.iter().map(String::as_str).zip(sizes.iter().copied()).collect();
    for &(_, io, t) in &given {
        let ok = io.shape.iter().zip(&t.shape).all(|(d, &v)| d.eval(&env).ok() == Some(v as i64));
        if !ok {
            return Err(shape_err(io, t, Some(&env)));
        }
    }
    Ok(sizes)
}

/// The initial values of parameter `p`: baked ones read from the bundle in `dir` (files
/// cached in `files`), else drawn from its own seed or `seed`.
pub(crate) fn initial_values(
    dir: &Path,
    p: &ParamEntry,
    seed: u64,
    files: &mut HashMap<String, Vec<u8>>,
) -> Result<Vec<f32>, ExecError> {
    if p.dtype != DType::F32 {
        return Err(ExecError::Unsupported(format!("parameter `{}` has element type {}", p.name, p.dtype)));
    }
    if let InitSpec::Baked { file, tensor } = &p.init {
        if !files.contains_key(file) {
            let path = dir.join(file);
            let bytes = std::fs::read(&path).map_err(|error| ExecError::Io { path: path.clone(), error })?;
            files.insert(file.clone(), bytes);
        }
        let st = safetensors::SafeTensors::deserialize(&files[file])
            .map_err(|e| ExecError::Params(format!("bundle file `{file}` is not a safetensors file: {e}")))?;
        let t = st.tensor(tensor).map_err(|_| {
            ExecError::Params(format!("bundle file `{file}` has no tensor `{tensor}` for `{}`", p.name))
        })?;
        return tensor_values(&t, p, &format!("bundle file `{file}`"));
    }
    let shape: Vec<usize> = p.shape.iter().map(|&d| d as usize).collect();
    init_values_f32(&p.init, &shape, &p.name, p.seed.unwrap_or(seed))
        .map_err(|e| ExecError::Params(format!("parameter `{}`: {e}", p.name)))
}

pub(crate) fn numel(p: &ParamEntry) -> Result<usize, ExecError> {
    p.shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(usize::try_from(d).ok()?))
        .ok_or_else(|| ExecError::Params(format!("parameter `{}` has an invalid shape {:?}", p.name, p.shape)))
}

/// f32 values of a safetensors tensor for parameter `p`, checking its shape.
pub(crate) fn tensor_values(
    t: &safetensors::tensor::TensorView<'_>,
    p: &ParamEntry,
    source: &str,
) -> Result<Vec<f32>, ExecError> {
    let want: Vec<usize> = p.shape.iter().map(|&d| d as usize).collect();
    if t.shape() != want.as_slice() {
        return Err(ExecError::Params(format!(
            "parameter `{}`: {source} has shape {:?}, the model has {want:?}",
            p.name,
            t.shape()
        )));
    }
    let d = t.data();
    match t.dtype() {
        safetensors::Dtype::F32 => Ok(d.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()),
        safetensors::Dtype::F64 => {
            Ok(d.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32).collect())
        }
        // 16-bit floats widen exactly (a checkpoint exported in bf16 or f16).
        safetensors::Dtype::BF16 => {
            Ok(d.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect())
        }
        safetensors::Dtype::F16 => {
            Ok(d.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect())
        }
        other => Err(ExecError::Params(format!(
            "parameter `{}`: {source} stores it as {other:?}; expected F32, F64, BF16 or F16",
            p.name
        ))),
    }
}

/// Writes parameters (each with its native-order bytes) to a safetensors file; shared by
/// the executors.
pub(crate) fn write_params(path: &Path, values: &[(&ParamEntry, Vec<u8>)]) -> Result<(), ExecError> {
    let owned: Vec<(&ParamEntry, Vec<usize>, Vec<u8>)> = values
        .iter()
        .map(|(p, bytes)| (*p, p.shape.iter().map(|&d| d as usize).collect(), le_bytes(p.dtype, bytes)))
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = owned
        .iter()
        .map(|(p, shape, bytes)| {
            let dt = match p.dtype {
                DType::F32 => safetensors::Dtype::F32,
                DType::BF16 => safetensors::Dtype::BF16,
                DType::F16 => safetensors::Dtype::F16,
                DType::I32 => safetensors::Dtype::I32,
                DType::U8 => safetensors::Dtype::U8,
            };
            let view = safetensors::tensor::TensorView::new(dt, shape.clone(), bytes).expect("shape matches buffer");
            (p.name.clone(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, path)
        .map_err(|e| ExecError::Params(format!("cannot write {}: {e}", path.display())))
}

/// Native-order element bytes to little-endian (safetensors' byte order).
pub(crate) fn le_bytes(dtype: DType, bytes: &[u8]) -> Vec<u8> {
    if cfg!(target_endian = "little") || dtype == DType::U8 {
        return bytes.to_vec();
    }
    let n = dtype.bytes();
    bytes.chunks_exact(n).flat_map(|c| c.iter().rev().copied().collect::<Vec<_>>()).collect()
}

/// Set the scalar `name` in `scalars` (in the manifest's order); shared by the executors.
pub(crate) fn set_scalar(manifest: &Manifest, scalars: &mut [i64], name: &str, value: i64) -> Result<(), ExecError> {
    let i = manifest.scalars.iter().position(|s| s == name).ok_or_else(|| {
        ExecError::Sizes(format!("the bundle has no scalar `{name}` (it has {:?})", manifest.scalars))
    })?;
    scalars[i] = value;
    Ok(())
}

/// Set size symbols in `values` (in the manifest's order); shared by the executors.
pub(crate) fn set_sizes(
    manifest: &Manifest,
    values: &mut [Option<i64>],
    sizes: &[(&str, i64)],
) -> Result<(), ExecError> {
    for &(name, v) in sizes {
        let i = manifest.sizes.iter().position(|s| s == name).ok_or_else(|| {
            ExecError::Sizes(format!("the bundle has no size `{name}` (it has {:?})", manifest.sizes))
        })?;
        if v < 0 {
            return Err(ExecError::Sizes(format!("size `{name}` = {v} is negative")));
        }
        values[i] = Some(v);
    }
    Ok(())
}

/// The index of the optimizer buffer called `name`; shared by the executors.
pub(crate) fn optimizer_buffer_index(manifest: &Manifest, name: &str) -> Result<usize, ExecError> {
    manifest.buffers.iter().position(|b| b.role == BufferRole::Optimizer && b.name.as_deref() == Some(name)).ok_or_else(
        || {
            ExecError::Params(format!(
                "the bundle has no optimizer buffer `{name}` (compile it with `tnc compile --train`)"
            ))
        },
    )
}

/// Every gradient buffer (role `grad`) with the parameter it belongs to; shared by the
/// executors.
pub(crate) fn gradient_buffers(manifest: &Manifest) -> Result<Vec<(usize, &ParamEntry)>, ExecError> {
    let mut out = Vec::new();
    for (i, b) in manifest.buffers.iter().enumerate() {
        if b.role != BufferRole::Grad {
            continue;
        }
        let name = b.name.as_deref().ok_or_else(|| {
            ExecError::Bundle(BundleError::Invalid(format!("gradient buffer {i} does not name its parameter")))
        })?;
        let p = manifest.params.iter().find(|p| p.name == name).ok_or_else(|| {
            ExecError::Bundle(BundleError::Invalid(format!("gradient buffer {i} names unknown parameter `{name}`")))
        })?;
        out.push((i, p));
    }
    Ok(out)
}
