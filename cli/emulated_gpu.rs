//! The emulated GPU: a [`Device`] that runs a CUDA bundle's kernels — the kernel IR its
//! PTX was written from (`kernel-ir.json`) — on the host. It trains and evaluates small
//! models on GPU schedules on machines without a GPU, so CI tests them.
//!
//! Kernels run compiled for the host: block kernels with their threads as loops
//! (`compiler/src/kernel/thread_loops.rs`), through the CPU back end. The first time a kernel is launched at
//! a set of sizes, its first and last [`CHECKED_BLOCKS`] blocks (iterations, for a kernel
//! without blocks) run in the GPU-semantics executor instead (`compiler/src/kernel/gpu_exec.rs`: each block's
//! threads in a random order, shared memory checked for races, out-of-bounds and
//! uninitialized reads, control flow around barriers checked for uniformity), and the
//! blocks between them compiled: blocks never read what other blocks of the launch write,
//! so any split is a valid GPU execution. Both give bit-identical results (tested), so
//! the checks cover every kernel, with its partial edge blocks, at every size a run uses,
//! while training goes at compiled speed. `TNC_EMULATED_CHECK=all` checks every block of
//! every launch (slow: an interpreter).
//!
//! It lives in the `tnc` crate, which depends on both the compiler (the kernel IR, its
//! executor and the code generator) and the runtime (the device interface): neither of
//! those depends on the other, so `tnc-run` has no emulated device.

use std::collections::{HashMap, HashSet};
use std::ffi::c_void;
use tnc_compiler::kernel::exec::{self, Buffer};
use tnc_compiler::kernel::{Access, Kernel};
use tnc_compiler::schedule::run::{to_bytes, to_typed};
use tnc_runtime::cpu::KernelFn;
use tnc_runtime::device::{download_from_host, upload_to_host, Device, Launch};
use tnc_runtime::manifest::{TargetKind, KERNEL_IR_FILE};
use tnc_runtime::{Bundle, BundleError, ExecError};

/// The environment variable that makes every launch run in the GPU-semantics executor.
pub const CHECK_ENV: &str = "TNC_EMULATED_CHECK";
/// Blocks checked at each end of a kernel's first launch at a set of sizes.
pub const CHECKED_BLOCKS: i64 = 2;

/// A buffer's bytes, 8-byte aligned for compiled kernels.
#[derive(Default)]
struct Memory {
    words: Vec<u64>,
    len: usize,
}

impl Memory {
    fn bytes(&self) -> &[u8] {
        // SAFETY: `words` holds at least `len` bytes; u8 has no alignment requirement.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr() as *const u8, self.len) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, and `&mut self` is unique.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr() as *mut u8, self.len) }
    }
}

/// The kernels compiled for the host, and the library that holds them.
struct Compiled {
    functions: Vec<Option<KernelFn>>,
    _lib: libloading::Library,
}

/// A GPU emulated on the host. See the module documentation.
pub struct EmulatedGpu {
    target: String,
    kernels: Vec<Kernel>,
    compiled: Compiled,
    memory: Vec<Memory>,
    entries: HashMap<String, Vec<Launch>>,
    /// Kernels run in the GPU-semantics executor at `checked_at` (the sizes).
    checked: HashSet<usize>,
    checked_at: Vec<(String, i64)>,
    check_all: bool,
}

impl EmulatedGpu {
    /// An emulated GPU for a CUDA bundle: reads its kernel IR and compiles it for the host.
    pub fn new(bundle: &Bundle) -> Result<EmulatedGpu, ExecError> {
        bundle.check_kind(TargetKind::Cuda)?;
        let path = bundle.path(KERNEL_IR_FILE);
        if !bundle.manifest.files.contains_key(KERNEL_IR_FILE) {
            return Err(ExecError::Unsupported(format!(
                "the bundle has no {KERNEL_IR_FILE} (it was written by an older tnc): recompile it to emulate it"
            )));
        }
        let bytes = std::fs::read(&path).map_err(|error| ExecError::Io { path: path.clone(), error })?;
        let mut de = serde_json::Deserializer::from_slice(&bytes);
        // Expressions nest deeper than serde_json's default limit of 128.
        de.disable_recursion_limit();
        let kernels: Vec<Kernel> = serde::Deserialize::deserialize(&mut de).map_err(|e| {
            ExecError::Bundle(BundleError::Invalid(format!("{KERNEL_IR_FILE} is not the kernel IR of tnc: {e}")))
        })?;
        let m = &bundle.manifest;
        let matches = kernels.len() == m.kernels.len()
            && kernels.iter().zip(&m.kernels).all(|(k, e)| k.name == e.name && k.buffers.len() == e.buffers.len());
        if !matches {
            return Err(ExecError::Bundle(BundleError::Invalid(format!(
                "{KERNEL_IR_FILE} does not describe the manifest's kernels"
            ))));
        }
        let compiled = compile_for_host(&kernels)?;
        Ok(EmulatedGpu {
            target: m.target.name.clone(),
            kernels,
            compiled,
            memory: m.buffers.iter().map(|_| Memory::default()).collect(),
            entries: HashMap::new(),
            checked: HashSet::new(),
            checked_at: Vec::new(),
            check_all: std::env::var(CHECK_ENV).is_ok_and(|v| v == "all"),
        })
    }

    /// Runs blocks `ranges` of launch `l` in the GPU-semantics executor.
    fn run_checked(&mut self, l: &Launch, args: &[i64], ranges: &[(i64, i64)]) -> Result<(), ExecError> {
        let k = &self.kernels[l.kernel];
        let mut views: Vec<Buffer> =
            k.buffers.iter().zip(&l.buffers).map(|(decl, &g)| to_typed(self.memory[g].bytes(), decl.elem)).collect();
        for &(begin, end) in ranges.iter().filter(|(b, e)| b < e) {
            exec::run(k, &mut views, args, begin, end)
                .map_err(|message| ExecError::Fault { kernel: k.name.clone(), message })?;
        }
        for ((view, decl), &g) in views.iter().zip(&k.buffers).zip(&l.buffers) {
            if decl.access != Access::Read {
                let m = &mut self.memory[g];
                let bytes = to_bytes(view, m.len);
                m.bytes_mut().copy_from_slice(&bytes);
            }
        }
        Ok(())
    }

    /// Runs a library product (a `--gemm cublas` bundle's) as the CUDA device does — the
    /// cuBLAS calls of its plan — with cuBLAS's semantics on the host, so every plan a
    /// model makes is run and checked (cuBLAS's argument rules, bounds) without a GPU.
    fn run_library(&mut self, l: &Launch) -> Result<(), ExecError> {
        use tnc_runtime::gemm::{SLOT_A, SLOT_B, SLOT_C};
        let k = &self.kernels[l.kernel];
        let (shape, _) = l.gemm.as_ref().expect("a library launch");
        let calls = tnc_runtime::cublas_plan::plan(shape).map_err(|e| {
            ExecError::Unsupported(format!("library kernel `{}`: cuBLAS cannot compute this product ({e})", k.name))
        })?;
        let fault = |message: String| ExecError::Fault { kernel: k.name.clone(), message };
        let floats = |slot: usize| to_typed(self.memory[l.buffers[slot]].bytes(), k.buffers[slot].elem).widened();
        let (Some(a), Some(b), Some(mut c)) = (floats(SLOT_A), floats(SLOT_B), floats(SLOT_C)) else {
            return Err(fault("a library product's buffers hold floats".into()));
        };
        tnc_runtime::cublas_plan::run_on_host(&calls, &a, &b, &mut c).map_err(fault)?;
        let m = &mut self.memory[l.buffers[SLOT_C]];
        let bytes = to_bytes(&Buffer::F32(c), m.len);
        m.bytes_mut().copy_from_slice(&bytes);
        Ok(())
    }

    /// Runs blocks `begin..end` of launch `l` compiled, on the calling thread.
    fn run_compiled(&mut self, l: &Launch, args: &[i64], (begin, end): (i64, i64)) -> Result<(), ExecError> {
        let k = &self.kernels[l.kernel];
        let f = self.compiled.functions[l.kernel]
            .ok_or_else(|| ExecError::Unsupported(format!("kernel `{}` was not compiled for the host", k.name)))?;
        let mut ptrs: Vec<*mut c_void> =
            l.buffers.iter().map(|&g| self.memory[g].words.as_mut_ptr() as *mut c_void).collect();
        if begin < end {
            // SAFETY: `f` has the kernel calling convention; every buffer is as long as the
            // plan sizes it for these sizes (the executor resized them). Bounds are checked
            // by the GPU-semantics executor on the edge blocks of each kernel's first
            // launch at these sizes, and by the interpreter-based tests on every block.
            unsafe { f(ptrs.as_mut_ptr(), args.as_ptr(), begin, end) };
        }
        Ok(())
    }
}

/// Every kernel compiled for this CPU (block kernels with their threads as loops), linked
/// into a shared library in the temporary directory and loaded.
fn compile_for_host(kernels: &[Kernel]) -> Result<Compiled, ExecError> {
    let fail = |m: String| ExecError::Unsupported(format!("compiling the GPU kernels for the host: {m}"));
    let plain: Vec<Kernel> =
        kernels.iter().map(tnc_compiler::kernel::thread_loops::thread_loops).collect::<Result<_, _>>().map_err(fail)?;
    let target = tnc_compiler::backend::Target::Cpu(tnc_compiler::backend::CpuTarget::native().map_err(fail)?);
    // The default code generator of this build writes the host's shared object.
    let backend =
        tnc_compiler::backend::backend_for(&target, tnc_compiler::backend::CodeGen::default()).map_err(fail)?;
    let written = backend.write(&plain, tnc_compiler::backend::Emit::default()).map_err(fail)?;
    let so_bytes = written.file(tnc_runtime::manifest::CPU_KERNELS_FILE);
    let so_bytes = so_bytes.ok_or_else(|| fail("the CPU back end wrote no shared object".into()))?;
    let dir = tempdir().map_err(|e| fail(format!("a temporary directory: {e}")))?;
    let so = dir.join("kernels.so");
    let linked = std::fs::write(&so, so_bytes).map_err(|e| format!("{}: {e}", so.display()));
    // SAFETY: a library tnc just generated; loading runs no initializers of ours.
    let lib = linked.and_then(|()| unsafe { libloading::Library::new(&so) }.map_err(|e| e.to_string()));
    let _ = std::fs::remove_dir_all(&dir);
    let lib = lib.map_err(fail)?;
    let mut functions = Vec::with_capacity(kernels.len());
    for k in kernels {
        functions.push(if k.gemm.is_some() {
            None
        } else {
            // SAFETY: every generated kernel has the `KernelFn` signature.
            let f =
                unsafe { lib.get::<KernelFn>(k.name.as_bytes()) }.map_err(|e| fail(format!("`{}`: {e}", k.name)))?;
            Some(*f)
        });
    }
    Ok(Compiled { functions, _lib: lib })
}

/// A fresh directory under the system's temporary directory.
fn tempdir() -> std::io::Result<std::path::PathBuf> {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("tnc-emulated-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

impl Device for EmulatedGpu {
    fn describe(&self) -> String {
        format!("emulated GPU ({} kernels on the host, each checked with GPU semantics first)", self.target)
    }

    /// Host memory, which holds the emulated device's buffers.
    fn free_bytes(&self) -> Option<usize> {
        tnc_runtime::host_memory::available_bytes().and_then(|b| usize::try_from(b).ok())
    }

    fn resize(&mut self, buffer: usize, len: usize) -> Result<(), ExecError> {
        let m = &mut self.memory[buffer];
        let words = len.div_ceil(8);
        if words > m.words.len() {
            // As on a GPU: a new allocation, zeroed.
            m.words = vec![0; words];
        }
        m.len = len;
        Ok(())
    }

    fn allocated_bytes(&self) -> usize {
        self.memory.iter().map(|m| m.words.len() * 8).sum()
    }

    fn upload(&mut self, buffer: usize, bytes: &[u8]) -> Result<(), ExecError> {
        upload_to_host(self.memory[buffer].bytes_mut(), buffer, bytes)
    }

    fn download(&self, buffer: usize, len: usize) -> Result<Vec<u8>, ExecError> {
        download_from_host(self.memory[buffer].bytes(), buffer, len)
    }

    fn fill(&mut self, buffer: usize, byte: u8) -> Result<(), ExecError> {
        self.memory[buffer].bytes_mut().fill(byte);
        Ok(())
    }

    fn bind(&mut self, entry: &str, launches: Vec<Launch>, sizes: &HashMap<&str, i64>) -> Result<(), ExecError> {
        let mut at: Vec<(String, i64)> = sizes.iter().map(|(s, &v)| (s.to_string(), v)).collect();
        at.sort();
        if at != self.checked_at {
            // New sizes: every kernel is checked again at them.
            self.checked.clear();
            self.checked_at = at;
        }
        self.entries.insert(entry.to_string(), launches);
        Ok(())
    }

    fn launch(&mut self, entry: &str, args: &[i64]) -> Result<(), ExecError> {
        let launches = self.entries.remove(entry).ok_or_else(|| ExecError::Order(format!("`{entry}` is not bound")))?;
        let mut r = Ok(());
        for l in &launches {
            let args: Vec<i64> = args.iter().chain(&l.args).copied().collect();
            r = if l.gemm.is_some() {
                self.run_library(l)
            } else if self.check_all {
                self.run_checked(l, &args, &[(0, l.extent)])
            } else if self.checked.insert(l.kernel) {
                // The edge blocks checked, the ones between them compiled.
                let head = CHECKED_BLOCKS.min(l.extent);
                let tail = (l.extent - CHECKED_BLOCKS).max(head);
                self.run_compiled(l, &args, (head, tail))
                    .and_then(|()| self.run_checked(l, &args, &[(0, head), (tail, l.extent)]))
            } else {
                self.run_compiled(l, &args, (0, l.extent))
            };
            if r.is_err() {
                break;
            }
        }
        self.entries.insert(entry.to_string(), launches);
        r
    }

    fn synchronize(&self) -> Result<(), ExecError> {
        Ok(())
    }
}
