//! One suite for every device behind the runtime's `Device` interface: the CPU threads
//! and the emulated GPU always, CUDA where a driver and a GPU exist (skipped, and said so,
//! elsewhere). Each runs the same tiny training bundle (compiled for `native` or `sm80`)
//! through the same `Executor` calls, and must give what the interpreter gives:
//!
//! - calls out of order are errors (forward before parameters, backward before forward);
//! - parameters initialized from a seed are the interpreter's, bit for bit;
//! - the loss and every gradient match the f64 interpreter (relative L2 ≤ 1e-4) at two
//!   sets of sizes, so buffers are reallocated and launches bound again;
//! - the debug NaN fill and a rerun change nothing (bit for bit);
//! - the optimizer entry points update the parameters as the CPU device does (1e-6);
//! - parameters survive a round trip through a safetensors file;
//! - bad arguments are errors naming what is wrong, token ids outside the vocabulary too;
//! - a GPU too small for the parameters, or for the activations at given sizes, is
//!   refused with the figures before anything is allocated (a wrapped emulated GPU).

mod common;
use common::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tnc_compiler::backend::GpuGemm;
use tnc_compiler::driver;
use tnc_compiler::interp::{compare, evaluate, init_params, EvalOptions, Tensor};
use tnc_compiler::passes;
use tnc_runtime::manifest::{Hyper, OPTIMIZER_HYPER};
use tnc_runtime::{Bundle, ExecError, Executor};

const SETS: [&str; 6] = ["vocab=16", "dim=16", "heads=2", "layers=2", "glu_dim=24", "block=4"];

fn model() -> tnc_compiler::ir::Graph {
    let sets: Vec<String> = SETS.iter().map(|s| s.to_string()).collect();
    let (sources, g) = elaborate_path(&repo().join("models/tasks/mqar_t2.tn"), &sets);
    g.unwrap_or_else(|d| panic!("{}", d.render(&sources)))
}

/// The training bundle for `target`, compiled once per test process.
fn bundle(target: &str) -> Bundle {
    bundle_with(target, GpuGemm::Tiles)
}

/// The training bundle for `target` with GPU products as `gemm` says.
fn bundle_with(target: &str, gemm: GpuGemm) -> Bundle {
    static DIRS: std::sync::Mutex<Vec<(String, GpuGemm, PathBuf)>> = std::sync::Mutex::new(Vec::new());
    let mut dirs = DIRS.lock().unwrap_or_else(|e| e.into_inner());
    let dir = match dirs.iter().find(|(t, g, _)| t == target && *g == gemm) {
        Some((_, _, d)) => d.clone(),
        None => {
            let d = std::env::temp_dir().join(format!("tnc-devices-{target}-{}-{}", gemm.name(), std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            let opts = driver::Options { train: true, gemm, ..Default::default() };
            driver::compile(model(), target, &d, opts, Vec::new()).unwrap();
            dirs.push((target.to_string(), gemm, d.clone()));
            d
        }
    };
    Bundle::load(&dir).unwrap()
}

/// The sm80 bundle with cuBLAS products (`--gemm cublas`): every dense product a library
/// node with no launch shape of ours, the rest tiles as usual.
fn cublas_bundle() -> Bundle {
    let b = bundle_with("sm80", GpuGemm::Cublas);
    let library: Vec<_> = b.manifest.kernels.iter().filter(|k| k.library).collect();
    assert!(library.len() >= 4, "{} library products", library.len());
    assert!(library.iter().all(|k| k.gpu.is_none() && k.gemm.is_some()));
    assert!(bundle("sm80").manifest.kernels.iter().all(|k| !k.library), "tiles by default");
    b
}

fn cpu() -> Executor {
    Executor::cpu(&bundle("native"), 2).unwrap()
}

fn emulated() -> Executor {
    on_emulated(bundle("sm80"))
}

fn on_emulated(b: Bundle) -> Executor {
    let device = tnc::emulated_gpu::EmulatedGpu::new(&b).unwrap();
    Executor::on(&b, Box::new(device)).unwrap()
}

/// A CUDA executor, or `None` (said on standard error) without a driver or a GPU.
fn cuda() -> Option<Executor> {
    on_cuda(bundle("sm80"))
}

fn on_cuda(b: Bundle) -> Option<Executor> {
    if !tnc_runtime::cuda::driver_present() {
        eprintln!("CUDA skipped: no driver on this host");
        return None;
    }
    match Executor::cuda(&b) {
        Ok(e) => Some(e),
        Err(ExecError::Cuda { message, .. }) if message.contains("no device") => {
            eprintln!("CUDA skipped: {message}");
            None
        }
        // A GPU without libcublas on the library path (PyTorch keeps it in site-packages).
        Err(ExecError::Unsupported(message)) if message.contains("cuBLAS could not be loaded") => {
            eprintln!("CUDA with cuBLAS skipped: {message}");
            None
        }
        Err(e) => panic!("{e}"),
    }
}

fn tokens(b: usize, n: usize) -> (Tensor, tnc_runtime::Tensor) {
    let t = token_tensor(b, n, 16, (b * 31 + n) as u64);
    let rt = tnc_runtime::Tensor::i32(t.shape.clone(), t.data.iter().map(|&x| x as i32).collect());
    (t, rt)
}

fn f64s(t: &tnc_runtime::Tensor) -> Vec<f64> {
    t.as_f32().unwrap().iter().map(|&x| x as f64).collect()
}

fn bits(t: &tnc_runtime::Tensor) -> Vec<u32> {
    t.as_f32().unwrap().iter().map(|x| x.to_bits()).collect()
}

/// Everything the suite checks, on one device.
fn suite(name: &str, mut ex: Executor, scratch: &Path) {
    eprintln!("{name}: {}", ex.describe_device());
    let (_, t) = tokens(2, 5);
    assert!(matches!(ex.forward(&[("tokens", &t)]), Err(ExecError::Order(_))), "{name}: parameters come first");
    ex.set_params_from_seed(3).unwrap();
    assert!(matches!(ex.backward(&[]), Err(ExecError::Order(_))), "{name}: forward comes first");

    // The interpreter's parameters, bit for bit.
    let reference = passes::differentiate_loss(model()).unwrap();
    let params = init_params(&reference, 3).unwrap();
    for (p, want) in reference.params.iter().zip(&params) {
        let got = ex.param(&p.name).unwrap();
        let same = got.as_f32().unwrap().iter().zip(&want.data).all(|(&g, &w)| g == w as f32);
        assert!(same, "{name}: parameter `{}` differs from the interpreter's", p.name);
    }

    for (b, n) in [(2, 5), (3, 9)] {
        let (it, t) = tokens(b, n);
        let inputs = HashMap::from([("tokens".to_string(), it)]);
        let want = evaluate(&reference, &inputs, &params, &EvalOptions::default()).unwrap().outputs(&reference);
        ex.forward(&[("tokens", &t)]).unwrap();
        ex.backward(&[]).unwrap();
        for (out, w) in &want {
            let got = Tensor { shape: w.shape.clone(), data: f64s(&ex.output(out).unwrap()) };
            let c = compare(&got, w);
            assert!(c.within(1e-4) || (c.max_abs < 1e-6 && !c.has_nan), "{name} B={b} N={n} `{out}`: {c:?}");
        }
        // The debug NaN fill and a rerun change nothing.
        let loss = bits(&ex.output("loss").unwrap());
        let grads: Vec<_> = ex.gradients().unwrap().values().map(bits).collect();
        ex.set_debug_nan(true);
        ex.forward(&[("tokens", &t)]).unwrap();
        ex.backward(&[]).unwrap();
        ex.set_debug_nan(false);
        assert_eq!(bits(&ex.output("loss").unwrap()), loss, "{name}: the NaN fill changed the loss");
        let again: Vec<_> = ex.gradients().unwrap().values().map(bits).collect();
        assert_eq!(again, grads, "{name}: the NaN fill changed a gradient");
        ex.rerun("forward").unwrap();
        assert_eq!(bits(&ex.output("loss").unwrap()), loss, "{name}: a rerun changed the loss");
    }
    assert!(ex.allocated_bytes() > 0);

    // Parameters survive a file round trip.
    let file = scratch.join(format!("{name}.safetensors"));
    ex.save_params(&file).unwrap();
    let before = bits(&ex.param("embedding").unwrap());
    ex.set_param("embedding", &vec![0.5; 16 * 16]).unwrap();
    assert_ne!(bits(&ex.param("embedding").unwrap()), before);
    ex.set_params_from_file(&file).unwrap();
    assert_eq!(bits(&ex.param("embedding").unwrap()), before, "{name}: the parameter file round trip");

    // Bad arguments are errors that say what is wrong.
    let e = ex.set_param("embedding", &[1.0; 3]).unwrap_err().to_string();
    assert!(e.contains("embedding") && e.contains("3 f32 values"), "{name}: {e}");
    let bad = tnc_runtime::Tensor::i32(vec![10], vec![0; 10]);
    assert!(matches!(ex.forward(&[("tokens", &bad)]), Err(ExecError::Input { .. })), "{name}: a bad shape");
    // N = 0: the shifted targets would have N − 1 rows.
    let empty = tnc_runtime::Tensor::i32(vec![1, 0], vec![]);
    let e = ex.forward(&[("tokens", &empty)]).unwrap_err().to_string();
    assert!(e.contains("the sizes B = 1, N = 0 are too small for this model"), "{name}: {e}");
    // Token ids outside the vocabulary of 16 (an embedding row, a target word) are refused,
    // not clamped, and so are negative ones.
    for v in [16, -1] {
        let mut ids = vec![3; 10];
        ids[7] = v;
        let bad = tnc_runtime::Tensor::i32(vec![2, 5], ids);
        let e = ex.forward(&[("tokens", &bad)]).unwrap_err().to_string();
        assert!(
            e.contains("tokens") && e.contains(&format!("holds {v} at flat index 7, outside 0..16")),
            "{name}: {e}"
        );
    }
    let e = ex.run("nonsense", &[]).unwrap_err().to_string();
    assert!(e.contains("no entry point `nonsense`"), "{name}: {e}");
    let e = ex.set_optimizer_buffer(OPTIMIZER_HYPER, &[1.0]).unwrap_err().to_string();
    assert!(e.contains("holds"), "{name}: {e}");
}

/// One optimizer step (accumulate, global norm, AdamW) from seed 3 at B = 2, N = 5; the
/// parameters after it.
fn optimizer_step(ex: &mut Executor) -> Vec<(String, Vec<f32>)> {
    ex.set_params_from_seed(3).unwrap();
    let (_, t) = tokens(2, 5);
    ex.forward(&[("tokens", &t)]).unwrap();
    ex.backward(&[]).unwrap();
    ex.run("accumulate", &[]).unwrap();
    let mut h = vec![0f32; Hyper::LEN];
    h[Hyper::LearningRate as usize] = 1e-2;
    h[Hyper::Beta1 as usize] = 0.9;
    h[Hyper::Beta2 as usize] = 0.98;
    // Not the usual 1e-8: with it a step is lr · sign(g) for every gradient much larger
    // than 1e-8, and a gradient that cancels to ~1e-8 (rounded differently by the two
    // devices' summation orders, both correct) flips the step by up to lr. With 1e-4 the
    // step is smooth in g, so 1e-6 compares the optimizer kernels, not rounding noise.
    h[Hyper::Eps as usize] = 1e-4;
    h[Hyper::WeightDecay as usize] = 0.01;
    h[Hyper::BiasCorrection1 as usize] = 0.1;
    h[Hyper::BiasCorrection2 as usize] = 0.02;
    h[Hyper::GradScale as usize] = 1.0;
    h[Hyper::ClipNorm as usize] = 0.5;
    ex.set_optimizer_buffer(OPTIMIZER_HYPER, &h).unwrap();
    ex.run("grad_norm", &[]).unwrap();
    ex.run("step", &[]).unwrap();
    let names: Vec<String> = ex.manifest().params.iter().map(|p| p.name.clone()).collect();
    names.into_iter().map(|n| (n.clone(), ex.param(&n).unwrap().as_f32().unwrap().to_vec())).collect()
}

/// The optimizer step on `ex` agrees with the CPU device's.
fn same_step_as_the_cpu(name: &str, mut ex: Executor) {
    let want = optimizer_step(&mut cpu());
    let got = optimizer_step(&mut ex);
    let mut start = cpu();
    start.set_params_from_seed(3).unwrap();
    let moved = want.iter().filter(|(n, w)| start.param(n).unwrap().as_f32().unwrap() != w.as_slice()).count();
    assert!(moved >= want.len() / 2, "{name}: the step moved only {moved} of {} parameters", want.len());
    for ((n, w), (_, g)) in want.iter().zip(&got) {
        let close = w.iter().zip(g).all(|(a, b)| (a - b).abs() <= 1e-6 * (1.0 + a.abs()));
        assert!(close, "{name}: parameter `{n}` after one optimizer step differs from the CPU's");
    }
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tnc-devices-scratch-{tag}-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&d);
    d
}

#[test]
fn the_cpu_device_passes_the_device_suite() {
    suite("cpu", cpu(), &scratch("cpu"));
}

#[test]
fn the_emulated_gpu_passes_the_device_suite() {
    suite("emulated", emulated(), &scratch("emulated"));
    same_step_as_the_cpu("emulated", emulated());
}

/// `--gemm cublas`: the products are cuBLAS calls, which the emulated GPU runs with
/// cuBLAS's semantics (`cublas_plan::run_on_host`), so every call the plan makes for this
/// model, at both sets of sizes and in every entry point, is checked against cuBLAS's
/// argument rules and gives the interpreter's results.
#[test]
fn the_emulated_gpu_passes_the_device_suite_with_cublas_products() {
    suite("emulated-cublas", on_emulated(cublas_bundle()), &scratch("emulated-cublas"));
    same_step_as_the_cpu("emulated-cublas", on_emulated(cublas_bundle()));
}

#[test]
fn cuda_passes_the_device_suite_where_there_is_a_gpu() {
    if let Some(ex) = cuda() {
        suite("cuda", ex, &scratch("cuda"));
        same_step_as_the_cpu("cuda", cuda().unwrap());
    }
    // With cuBLAS products, where libcublas loads too (it is looked for only then).
    if let Some(ex) = on_cuda(cublas_bundle()) {
        suite("cuda-cublas", ex, &scratch("cuda-cublas"));
        same_step_as_the_cpu("cuda-cublas", on_cuda(cublas_bundle()).unwrap());
    }
}

/// A GPU with little memory: the emulated GPU, reporting `capacity` less what it holds as
/// free, and counting every allocation (shared, so the test sees it after a refusal).
struct SmallGpu {
    inner: tnc::emulated_gpu::EmulatedGpu,
    capacity: usize,
    resizes: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl tnc_runtime::device::Device for SmallGpu {
    fn describe(&self) -> String {
        format!("small gpu ({} bytes)", self.capacity)
    }
    fn resize(&mut self, buffer: usize, len: usize) -> Result<(), ExecError> {
        self.resizes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.resize(buffer, len)
    }
    fn allocated_bytes(&self) -> usize {
        self.inner.allocated_bytes()
    }
    fn free_bytes(&self) -> Option<usize> {
        Some(self.capacity.saturating_sub(self.inner.allocated_bytes()))
    }
    fn upload(&mut self, buffer: usize, bytes: &[u8]) -> Result<(), ExecError> {
        self.inner.upload(buffer, bytes)
    }
    fn download(&self, buffer: usize, len: usize) -> Result<Vec<u8>, ExecError> {
        self.inner.download(buffer, len)
    }
    fn fill(&mut self, buffer: usize, byte: u8) -> Result<(), ExecError> {
        self.inner.fill(buffer, byte)
    }
    fn bind(
        &mut self,
        entry: &str,
        launches: Vec<tnc_runtime::device::Launch>,
        sizes: &HashMap<&str, i64>,
    ) -> Result<(), ExecError> {
        self.inner.bind(entry, launches, sizes)
    }
    fn launch(&mut self, entry: &str, args: &[i64]) -> Result<(), ExecError> {
        self.inner.launch(entry, args)
    }
    fn synchronize(&self) -> Result<(), ExecError> {
        self.inner.synchronize()
    }
}

/// Memory is checked before anything is allocated: a GPU too small for the parameters and
/// optimizer state refuses the bundle with the figures and no allocation; one that holds
/// them but not the activations at large B, N refuses those sizes, allocating nothing more,
/// and still runs at sizes that fit.
#[test]
fn a_gpu_too_small_is_refused_before_allocating() {
    use std::sync::atomic::Ordering::SeqCst;
    let b = bundle("sm80");
    let small = |capacity: usize| {
        let resizes = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let inner = tnc::emulated_gpu::EmulatedGpu::new(&b).unwrap();
        (Box::new(SmallGpu { inner, capacity, resizes: resizes.clone() }), resizes)
    };
    let (device, resizes) = small(1024);
    let err = Executor::on(&b, device).err().expect("1 KiB cannot hold the parameters");
    let msg = err.to_string();
    assert!(
        msg.contains("the model does not fit on small gpu (1024 bytes): its parameters and optimizer state"),
        "{msg}"
    );
    assert_eq!(resizes.load(SeqCst), 0, "nothing was allocated");

    let (device, resizes) = small(1 << 20);
    let mut ex = Executor::on(&b, device).unwrap();
    ex.set_params_from_seed(0).unwrap();
    let held = ex.allocated_bytes();
    let before = resizes.load(SeqCst);
    let (_, t) = tokens(64, 1024);
    let msg = ex.forward(&[("tokens", &t)]).expect_err("B = 64, N = 1024 does not fit in 1 MiB").to_string();
    assert!(msg.contains("its activations at B = 64, N = 1024 need"), "{msg}");
    assert_eq!((resizes.load(SeqCst), ex.allocated_bytes()), (before, held), "nothing more was allocated");
    let (_, t) = tokens(2, 5);
    ex.forward(&[("tokens", &t)]).unwrap();
    ex.backward(&[]).unwrap();
    assert!(ex.output("loss").unwrap().as_f32().unwrap()[0].is_finite());
}
