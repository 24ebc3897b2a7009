//! The CPU device: `kernels.so` run on a pool of threads.
//!
//! Every kernel has the C calling convention
//! `void name(void **buffers, const int64_t *sizes, int64_t begin, int64_t end)` and its
//! iterations write disjoint outputs, so a launch of `0..extent` is split into `threads`
//! contiguous chunks (`[extent·t/T, extent·(t+1)/T)` for thread `t` of `T`) run in
//! parallel, with a barrier between steps. The split depends only on the thread count.
//! The threads are started with the device and kept (`pool.rs`). Library GEMM nodes run
//! in `gemm.rs`, split the same way.
//!
//! `TNC_PROFILE=1` runs the launches one at a time and prints the kernels that took the
//! longest (to standard error), for finding a slow schedule.

use crate::bundle::Bundle;
use crate::device::{Device, Launch as Step};
use crate::error::ExecError;
use crate::gemm;
use crate::manifest::{TargetKind, CPU_KERNELS_FILE};
use crate::pool::Pool;
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::collections::{HashMap, HashSet};
use std::ffi::c_void;
use std::ptr::NonNull;

/// The kernels' C calling convention.
pub type KernelFn = unsafe extern "C" fn(*mut *mut c_void, *const i64, i64, i64);

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

    /// Makes the buffer `len` bytes long, reallocating (zeroed) only when it does not fit;
    /// says whether it reallocated.
    fn resize(&mut self, len: usize) -> Result<bool, ExecError> {
        let grow = len > self.cap || self.cap == 0;
        if grow {
            let cap = len.max(ALIGN);
            let layout = Layout::from_size_align(cap, ALIGN)
                .map_err(|_| ExecError::Sizes(format!("a buffer of {len} bytes is too large")))?;
            // SAFETY: the layout has a non-zero size.
            let p = unsafe { alloc_zeroed(layout) };
            let ptr =
                NonNull::new(p).ok_or_else(|| ExecError::Memory(format!("out of memory allocating {len} bytes")))?;
            self.free();
            *self = Buf { ptr, cap, len };
        }
        self.len = len;
        Ok(grow)
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
    kernel: usize,
    work: Work,
    ptrs: Vec<*mut c_void>,
    extent: i64,
    /// The step's launch arguments, appended to `sizes ++ scalars` (none: the launch
    /// reads `sizes ++ scalars` alone).
    step_args: Vec<i64>,
    /// `sizes ++ scalars ++ step_args` of the current run, for launches with step args.
    args: Option<Vec<i64>>,
}

/// An entry point's launches, shared by the worker threads; kernels only read the
/// pointer arrays.
struct Launches(Vec<Launch>);
// SAFETY: the pointers address the device's buffers, which are not freed or moved while
// bound (a resize that reallocates drops every binding); kernels write disjoint parts
// of them (the calling convention's contract) and never the pointer arrays.
unsafe impl Sync for Launches {}
// SAFETY: as above; the launches own nothing thread-bound.
unsafe impl Send for Launches {}

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

pub use tnc_bundle::split::chunk;

/// CPU threads running a CPU bundle. See the module documentation.
pub struct CpuDevice {
    threads: usize,
    /// The worker threads, kept between entry points.
    pool: Pool,
    /// Resolved kernel entry points (`None` for library nodes and unused kernels).
    kernels: Vec<Option<KernelFn>>,
    /// Every kernel's name, for profiles.
    names: Vec<String>,
    bufs: Vec<Buf>,
    entries: HashMap<String, Launches>,
    profile: bool,
    /// Whether a library GEMM reads bf16 operands (named by [`Device::describe`]).
    bf16_products: bool,
    // Declared last so it is dropped after everything that may point into it.
    _lib: Option<libloading::Library>,
}

impl CpuDevice {
    /// A device for a CPU bundle with `threads` worker threads (at least 1). Checks that
    /// this CPU has the features the bundle was compiled for, loads `kernels.so` and
    /// resolves every kernel.
    pub fn new(bundle: &Bundle, threads: usize) -> Result<CpuDevice, ExecError> {
        bundle.check_kind(TargetKind::Cpu)?;
        bundle.check_host_cpu()?;
        let m = &bundle.manifest;
        // Library GEMM nodes have no symbol; the device calls the GEMM library for them.
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
        let threads = threads.max(1);
        Ok(CpuDevice {
            threads,
            pool: Pool::new(threads),
            kernels,
            names: m.kernels.iter().map(|k| k.name.clone()).collect(),
            bufs: m.buffers.iter().map(|_| Buf::empty()).collect(),
            entries: HashMap::new(),
            profile: std::env::var_os("TNC_PROFILE").is_some(),
            bf16_products: m
                .kernels
                .iter()
                .any(|k| k.library && k.buffers.first().is_some_and(|b| b.elem == crate::manifest::DType::BF16)),
            _lib: lib,
        })
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs the launches one at a time and prints the kernels that took the longest.
    fn profile(&self, entry: &str, launches: &Launches, args: &[i64]) {
        let mut profile = crate::profile::Profile::default();
        for l in &launches.0 {
            let (work, flops) = match &l.work {
                Work::Kernel(f) => (Work::Kernel(*f), None),
                Work::Gemm(s, o) => (Work::Gemm(s.clone(), *o), Some(s.flops())),
            };
            let one = Launches(vec![Launch {
                kernel: l.kernel,
                work,
                ptrs: l.ptrs.clone(),
                extent: l.extent,
                step_args: Vec::new(),
                args: l.args.clone(),
            }]);
            let t = std::time::Instant::now();
            execute(&one, args, &self.pool);
            profile.add(&self.names[l.kernel], t.elapsed().as_secs_f64(), flops);
        }
        for line in profile.report(entry) {
            eprintln!("{line}");
        }
    }
}

impl Device for CpuDevice {
    fn describe(&self) -> String {
        let s = if self.threads == 1 { "" } else { "s" };
        let products = match (self.bf16_products, crate::bf16_gemm::Kernel::detect()) {
            (false, _) => String::new(),
            (true, Some(k)) => format!(", bf16 products on {}", k.name()),
            (true, None) => ", bf16 products widened to f32".to_string(),
        };
        format!("cpu: {} thread{s}{products}", self.threads)
    }

    /// What the machine has available: a run that cannot fit is refused before its
    /// buffers are allocated (`executor::check_fits`), not killed by the allocator later.
    fn free_bytes(&self) -> Option<usize> {
        crate::host_memory::available_bytes().and_then(|b| usize::try_from(b).ok())
    }

    fn resize(&mut self, buffer: usize, len: usize) -> Result<(), ExecError> {
        if self.bufs[buffer].resize(len)? {
            // Bound pointers may address the old allocation.
            self.entries.clear();
        }
        Ok(())
    }

    fn allocated_bytes(&self) -> usize {
        self.bufs.iter().map(|b| b.cap).sum()
    }

    fn upload(&mut self, buffer: usize, bytes: &[u8]) -> Result<(), ExecError> {
        crate::device::upload_to_host(self.bufs[buffer].bytes_mut(), buffer, bytes)
    }

    fn download(&self, buffer: usize, len: usize) -> Result<Vec<u8>, ExecError> {
        crate::device::download_from_host(self.bufs[buffer].bytes(), buffer, len)
    }

    fn copy(&mut self, from: usize, to: usize, len: usize) -> Result<(), ExecError> {
        if from == to || len > self.bufs[from].len.min(self.bufs[to].len) {
            return Err(ExecError::Sizes(format!("cannot copy {len} bytes from buffer {from} to buffer {to}")));
        }
        let (src, dst) = if from < to {
            let (a, b) = self.bufs.split_at_mut(to);
            (&a[from], &mut b[0])
        } else {
            let (a, b) = self.bufs.split_at_mut(from);
            (&b[0], &mut a[to])
        };
        dst.bytes_mut()[..len].copy_from_slice(&src.bytes()[..len]);
        Ok(())
    }

    fn fill(&mut self, buffer: usize, byte: u8) -> Result<(), ExecError> {
        self.bufs[buffer].bytes_mut().fill(byte);
        Ok(())
    }

    fn bind(&mut self, entry: &str, steps: Vec<Step>, _sizes: &HashMap<&str, i64>) -> Result<(), ExecError> {
        let mut launches = Vec::with_capacity(steps.len());
        for s in steps {
            let work = match s.gemm {
                Some((shape, operands)) => Work::Gemm(shape, operands),
                None => Work::Kernel(self.kernels[s.kernel].ok_or_else(|| {
                    ExecError::Unsupported(format!(
                        "kernel `{}` has no code in {CPU_KERNELS_FILE}",
                        self.names[s.kernel]
                    ))
                })?),
            };
            let ptrs = s.buffers.iter().map(|&b| self.bufs[b].ptr.as_ptr() as *mut c_void).collect();
            launches.push(Launch { kernel: s.kernel, work, ptrs, extent: s.extent, step_args: s.args, args: None });
        }
        self.entries.insert(entry.to_string(), Launches(launches));
        Ok(())
    }

    fn launch(&mut self, entry: &str, args: &[i64]) -> Result<(), ExecError> {
        let mut launches = self
            .entries
            .remove(entry)
            .ok_or_else(|| ExecError::Order(format!("`{entry}` is not bound to the current buffers")))?;
        for l in &mut launches.0 {
            if !l.step_args.is_empty() {
                l.args = Some(args.iter().chain(&l.step_args).copied().collect());
            }
        }
        if self.profile {
            self.profile(entry, &launches, args);
        } else {
            execute(&launches, args, &self.pool);
        }
        self.entries.insert(entry.to_string(), launches);
        Ok(())
    }

    fn synchronize(&self) -> Result<(), ExecError> {
        Ok(())
    }
}
