//! `tnc-run`: runs a compiled bundle with the runtime alone (no compiler, no LLVM), so it
//! can be copied to a machine that has only a GPU driver.
//!
//! ```text
//! tnc-run BUNDLE [--device cpu|cuda] --inputs in.safetensors [--params p.safetensors | --seed S]
//!         --out out.safetensors [--grad] [--threads T] [--debug-nan]
//! tnc-run bench BUNDLE [--device cuda|cpu] --batch B --seq N [--iters K] [--warmup W] [--seed S]
//! ```
//!
//! The first form runs `forward` (and with `--grad` `backward`) and writes every output,
//! and every gradient as `grad.<param>`, to one safetensors file (f32). The second times
//! `forward` and `forward` + `backward` on generated inputs and prints the medians in
//! milliseconds. Exit status 0 on success, 1 on any error, 2 on bad usage.

use clap::{Parser, ValueEnum};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;
use tnc_runtime::manifest::{DType, TargetKind};
use tnc_runtime::{Bundle, Executor, Tensor, TensorData};

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Device {
    Cpu,
    Cuda,
}

/// Run a compiled tnc bundle: forward (and backward) on given inputs.
#[derive(Parser, Debug)]
#[command(
    name = "tnc-run",
    version,
    about = "Run a compiled tnc bundle (runtime only)",
    after_help = "Timing: tnc-run bench BUNDLE [--device cuda|cpu] --batch B --seq N [--iters K]"
)]
struct RunArgs {
    /// The bundle directory (written by `tnc compile`).
    bundle: PathBuf,
    /// Where to run it (default: where the bundle's target runs, `cuda` for a GPU
    /// target, else `cpu`).
    #[arg(long, value_enum)]
    device: Option<Device>,
    /// Input tensors by name (safetensors; f64 and i64 are converted to f32 and i32).
    #[arg(long)]
    inputs: PathBuf,
    /// Parameters by name (safetensors); without it, parameters are initialized from --seed.
    #[arg(long, conflicts_with = "seed")]
    params: Option<PathBuf>,
    /// Seed for parameter initialization (default 0).
    #[arg(long)]
    seed: Option<u64>,
    /// Where to write every output (and with --grad every gradient as `grad.<name>`).
    #[arg(long)]
    out: PathBuf,
    /// Also run backward and write the gradient of every parameter.
    #[arg(long)]
    grad: bool,
    /// CPU worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Fill every buffer an entry point writes with NaN first (finds unwritten outputs).
    #[arg(long)]
    debug_nan: bool,
}

/// Time forward and forward + backward of a bundle on generated inputs.
#[derive(Parser, Debug)]
#[command(name = "tnc-run bench", bin_name = "tnc-run bench")]
struct BenchArgs {
    /// The bundle directory.
    bundle: PathBuf,
    /// Where to run it (default: where the bundle's target runs, `cuda` for a GPU
    /// target, else `cpu`).
    #[arg(long, value_enum)]
    device: Option<Device>,
    /// Batch size B.
    #[arg(long, value_parser = clap::value_parser!(i64).range(1..))]
    batch: i64,
    /// Sequence length N.
    #[arg(long, value_parser = clap::value_parser!(i64).range(1..))]
    seq: i64,
    /// Timed iterations (the median is reported).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    iters: u32,
    /// Untimed iterations first.
    #[arg(long, default_value_t = 2)]
    warmup: u32,
    /// Seed for parameters and generated inputs.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Integer inputs (tokens) are drawn from 0..VOCAB; by default from 0..(the smallest
    /// leading dimension of any rank-2 parameter), which a gather table cannot be below.
    #[arg(long)]
    vocab: Option<i64>,
    /// Only forward (for bundles without backward).
    #[arg(long)]
    forward_only: bool,
    /// CPU worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Launch every kernel on its own instead of replaying CUDA graphs (to measure what
    /// the graphs save).
    #[arg(long)]
    no_graphs: bool,
    /// Input tensors by name (safetensors) instead of generated ones; `--batch` and
    /// `--seq` must describe them.
    #[arg(long)]
    inputs: Option<PathBuf>,
    /// Parameters by name (safetensors); without it, parameters are initialized from --seed.
    #[arg(long)]
    params: Option<PathBuf>,
}

type Error = Box<dyn std::error::Error>;

fn main() -> ExitCode {
    tnc_runtime::pipes::die_on_closed_pipe();
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let result = if args.get(1).is_some_and(|a| a == "bench") {
        let mut rest = vec![args[0].clone()];
        rest.extend(args[2..].iter().cloned());
        match BenchArgs::try_parse_from(rest) {
            Ok(a) => bench(&a),
            Err(e) => return usage(e),
        }
    } else {
        match RunArgs::try_parse_from(args) {
            Ok(a) => run(&a),
            Err(e) => return usage(e),
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

fn usage(e: clap::Error) -> ExitCode {
    let _ = e.print();
    ExitCode::from(if e.use_stderr() { 2 } else { 0 })
}

fn threads(t: Option<usize>) -> usize {
    t.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)).max(1)
}

/// An executor for `bundle` on `device`, naming the device on standard error. CUDA
/// graphs are used when `graphs` and `TNC_CUDA_GRAPHS` (unless `0`) allow.
fn executor(bundle: &Bundle, device: Option<Device>, threads: usize, graphs: bool) -> Result<Executor, Error> {
    let device = device.unwrap_or(default_device(bundle));
    let ex = match device {
        Device::Cpu => Executor::cpu(bundle, threads)?,
        #[cfg(feature = "cuda")]
        Device::Cuda => {
            let graphs = graphs && tnc_runtime::cuda::graphs_from_env();
            Executor::on(bundle, Box::new(tnc_runtime::CudaDevice::new(bundle, graphs)?))?
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda => {
            let _ = graphs;
            return Err("this tnc-run was built without the `cuda` feature".into());
        }
    };
    eprintln!("tnc-run: {}", ex.describe_device());
    Ok(ex)
}

fn run(a: &RunArgs) -> Result<(), Error> {
    let bundle = Bundle::load(&a.bundle)?;
    let file = read_tensors(&a.inputs)?;
    let mut ex = executor(&bundle, a.device, threads(a.threads), true)?;
    ex.set_debug_nan(a.debug_nan);
    match &a.params {
        Some(p) => ex.set_params_from_file(p)?,
        None => ex.set_params_from_seed(a.seed.unwrap_or(0))?,
    }
    let wanted: Vec<String> =
        ex.manifest().inputs.iter().filter(|io| io.entry == "forward").map(|io| io.name.clone()).collect();
    for name in file.keys().filter(|n| !wanted.contains(n)) {
        eprintln!("tnc-run: ignoring `{name}` of {} (not an input of the bundle)", a.inputs.display());
    }
    let mut inputs = Vec::new();
    for name in &wanted {
        let t = file.get(name).ok_or_else(|| {
            format!("{} has no tensor `{name}` (the bundle's inputs are {wanted:?})", a.inputs.display())
        })?;
        // An empty batch or sequence computes a loss over nothing: NaN, never a result.
        if t.shape.contains(&0) {
            return Err(format!("input `{name}` of {} is empty (shape {:?})", a.inputs.display(), t.shape).into());
        }
        inputs.push((name.as_str(), t));
    }
    let t0 = Instant::now();
    ex.forward(&inputs)?;
    let mut out: Vec<(String, Tensor)> = ex.outputs()?.into_iter().collect();
    if a.grad {
        ex.backward(&[])?;
        out.extend(ex.outputs()?.into_iter().filter(|(n, _)| !out.iter().any(|(m, _)| m == n)).collect::<Vec<_>>());
        // Gradients may also be declared as outputs of `backward` under the same names.
        for (n, t) in ex.gradients()? {
            let name = format!("grad.{n}");
            if !out.iter().any(|(m, _)| *m == name) {
                out.push((name, t));
            }
        }
    }
    let elapsed = t0.elapsed();
    write_tensors(&a.out, &out)?;
    for (name, t) in &out {
        if let (1, Some(v)) = (t.len(), t.as_f32()) {
            println!("{name} = {}", v[0]);
        }
    }
    println!("wrote {} tensors to {} ({:.1} ms)", out.len(), a.out.display(), elapsed.as_secs_f64() * 1e3);
    Ok(())
}

fn bench(a: &BenchArgs) -> Result<(), Error> {
    let bundle = Bundle::load(&a.bundle)?;
    let device = a.device.unwrap_or(default_device(&bundle));
    let mut ex = executor(&bundle, Some(device), threads(a.threads), !a.no_graphs)?;
    match &a.params {
        Some(p) => ex.set_params_from_file(p)?,
        None => ex.set_params_from_seed(a.seed)?,
    }
    let m = ex.manifest().clone();
    let env: std::collections::HashMap<&str, i64> = m
        .sizes
        .iter()
        .map(String::as_str)
        .map(|s| {
            (
                s,
                if s == "B" {
                    a.batch
                } else if s == "N" {
                    a.seq
                } else {
                    1
                },
            )
        })
        .collect();
    let vocab = a.vocab.unwrap_or_else(|| {
        m.params.iter().filter(|p| p.shape.len() == 2).map(|p| p.shape[0]).min().unwrap_or(2).max(1)
    });
    // The generated inputs live in host memory first: refuse sizes it cannot hold.
    let input_bytes = m
        .inputs
        .iter()
        .filter(|io| io.entry == "forward")
        .map(|io| io.shape.iter().try_fold(4u128, |acc, d| Some(acc * d.eval(&env).ok()?.max(0) as u128)))
        .try_fold(0u128, |acc, b| Some(acc + b?))
        .unwrap_or(u128::MAX);
    tnc_runtime::host_memory::check_fits(input_bytes, &format!("the inputs at B {} and N {}", a.batch, a.seq))?;
    let mut owned = Vec::new();
    let mut file = a.inputs.as_deref().map(read_tensors).transpose()?;
    for (i, io) in m.inputs.iter().filter(|io| io.entry == "forward").enumerate() {
        let shape = io
            .shape
            .iter()
            .map(|d| d.eval(&env).map(|v| v.max(0) as usize))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("shape of input `{}`: {e}", io.name))?;
        let t = match &mut file {
            Some(f) => {
                let path = a.inputs.as_deref().expect("read").display();
                let t = f.remove(&io.name).ok_or_else(|| format!("{path} has no tensor `{}`", io.name))?;
                if t.shape != shape {
                    return Err(format!(
                        "input `{}` of {path} has shape {:?}, but --batch and --seq give {shape:?}",
                        io.name, t.shape
                    )
                    .into());
                }
                t
            }
            None => generate(io.dtype, shape, a.seed ^ ((i as u64 + 1) << 32), vocab),
        };
        owned.push((io.name.clone(), t));
    }
    let inputs: Vec<(&str, &Tensor)> = owned.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let backward = !a.forward_only && m.entry_points.get("backward").is_some_and(|s| !s.is_empty());
    // The first forward uploads the inputs; later ones reuse them on the device.
    let t = Instant::now();
    ex.forward(&inputs)?;
    eprintln!("tnc-run bench: inputs uploaded, first forward queued ({:.1} ms)", t.elapsed().as_secs_f64() * 1e3);
    let mut fwd = Vec::new();
    let mut both = Vec::new();
    for it in 0..a.warmup + a.iters {
        // Reruns reuse the inputs already on the device; each time waits until it is idle.
        let f = ex.time_ms(&["forward"])?;
        let fb = if backward { ex.time_ms(&["forward", "backward"])? } else { f };
        // Per iteration on stderr, so a run cut short by a timeout still tells something.
        let kind = if it < a.warmup { "warm-up" } else { "iteration" };
        eprintln!("tnc-run bench: {kind} {}: forward {f:.3} ms, forward+backward {fb:.3} ms", it + 1);
        if it >= a.warmup {
            fwd.push(f);
            both.push(fb);
        }
    }
    let sizes = m.sizes.iter().map(|s| format!("{s}={}", env[s.as_str()])).collect::<Vec<_>>().join(" ");
    println!(
        "bench {} {sizes} device={:?} iters={}: forward {:.3} ms, forward+backward {} ms",
        m.model,
        device,
        a.iters,
        median(&mut fwd),
        if backward { format!("{:.3}", median(&mut both)) } else { "n/a".into() }
    );
    let sizes_json = m.sizes.iter().map(|s| format!("\"{s}\": {}", env[s.as_str()])).collect::<Vec<_>>().join(", ");
    let all = |v: &[f64]| v.iter().map(|t| format!("{t:.4}")).collect::<Vec<_>>().join(", ");
    println!(
        "BENCH_JSON {{\"impl\": \"{}\", \"dtype\": \"{}\", \"device\": \"{:?}\", \"model\": {:?}, \
         \"sizes\": {{{sizes_json}}}, \"iters\": {}, \"forward_ms\": {:.4}, \"fwd_bwd_ms\": {}, \
         \"forward_all_ms\": [{}], \"fwd_bwd_all_ms\": [{}], \"launches\": {{\"forward\": {}, \"backward\": {}}}, \
         \"graphs\": {}, \"device_name\": {:?}, \"allocated_bytes\": {}}}",
        // A GPU bundle's library products are cuBLAS calls (`--gemm cublas`).
        if m.target.kind == TargetKind::Cuda && m.kernels.iter().any(|k| k.library) { "tnc+cuBLAS" } else { "tnc" },
        products_dtype(&m),
        device,
        m.model,
        a.iters,
        median(&mut fwd),
        if backward { format!("{:.4}", median(&mut both)) } else { "null".into() },
        all(&fwd),
        if backward { all(&both) } else { String::new() },
        ex.launch_count("forward"),
        if backward { ex.launch_count("backward") } else { 0 },
        device == Device::Cuda && !a.no_graphs,
        ex.describe_device(),
        ex.allocated_bytes(),
    );
    Ok(())
}

/// Where a bundle runs unless told: on the GPU its target names, or on the CPU.
fn default_device(bundle: &Bundle) -> Device {
    match bundle.manifest.target.kind {
        tnc_runtime::manifest::TargetKind::Cuda => Device::Cuda,
        tnc_runtime::manifest::TargetKind::Cpu => Device::Cpu,
    }
}

/// The element type of the bundle's products (`--precision`): `bf16` or `f16` where any
/// kernel reads 16-bit floats, else `f32`.
fn products_dtype(m: &tnc_runtime::manifest::Manifest) -> &'static str {
    let elems = || m.kernels.iter().flat_map(|k| k.buffers.iter().map(|b| b.elem));
    if elems().any(|e| e == DType::BF16) {
        "bf16"
    } else if elems().any(|e| e == DType::F16) {
        "f16"
    } else {
        "f32"
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Generated bench inputs: f32 uniform in [-1, 1), integers in `0..vocab`, bytes 0/1.
/// A fast splitmix64 stream split over threads (the values only need to be plausible).
fn generate(dtype: DType, shape: Vec<usize>, seed: u64, vocab: i64) -> Tensor {
    let n: usize = shape.iter().product();
    let mix = |i: u64| {
        let mut z = seed.wrapping_add(i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    fn fill<T: Send + Default + Clone>(n: usize, f: impl Fn(u64) -> T + Sync) -> Vec<T> {
        let mut v = vec![T::default(); n];
        let t = std::thread::available_parallelism().map(|x| x.get()).unwrap_or(1);
        let chunk = n.div_ceil(t).max(1 << 16);
        std::thread::scope(|s| {
            for (c, part) in v.chunks_mut(chunk).enumerate() {
                let f = &f;
                s.spawn(move || {
                    for (j, x) in part.iter_mut().enumerate() {
                        *x = f((c * chunk + j) as u64);
                    }
                });
            }
        });
        v
    }
    let data = match dtype {
        // Models declare no 16-bit inputs (the elaborator refuses them); the executor's
        // dtype check reports one that a hand-written manifest declares.
        DType::F32 | DType::BF16 | DType::F16 => {
            TensorData::F32(fill(n, |i| (mix(i) >> 40) as f32 / (1u64 << 23) as f32 - 1.0))
        }
        DType::I32 => TensorData::I32(fill(n, |i| (mix(i) % vocab.max(1) as u64) as i32)),
        DType::U8 => TensorData::U8(fill(n, |i| (mix(i) & 1) as u8)),
    };
    Tensor { shape, data }
}

/// Every tensor of a safetensors file, converted to the runtime's element types.
fn read_tensors(path: &Path) -> Result<BTreeMap<String, Tensor>, Error> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| format!("{} is not a safetensors file: {e}", path.display()))?;
    let mut out = BTreeMap::new();
    for (name, t) in st.tensors() {
        let shape = t.shape().to_vec();
        let d = t.data();
        let data = match t.dtype() {
            safetensors::Dtype::F32 => {
                TensorData::F32(d.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect())
            }
            safetensors::Dtype::F64 => {
                TensorData::F32(d.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32).collect())
            }
            safetensors::Dtype::I32 => {
                TensorData::I32(d.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap())).collect())
            }
            safetensors::Dtype::I64 => TensorData::I32(
                d.chunks_exact(8)
                    .map(|c| {
                        let v = i64::from_le_bytes(c.try_into().unwrap());
                        i32::try_from(v)
                            .map_err(|_| format!("tensor `{name}` of {}: {v} does not fit i32", path.display()))
                    })
                    .collect::<Result<_, _>>()?,
            ),
            safetensors::Dtype::U8 | safetensors::Dtype::BOOL => TensorData::U8(d.to_vec()),
            other => return Err(format!("tensor `{name}` of {} has unsupported type {other:?}", path.display()).into()),
        };
        out.insert(name, Tensor { shape, data });
    }
    Ok(out)
}

fn write_tensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<(), Error> {
    for (i, (n, _)) in tensors.iter().enumerate() {
        if tensors[..i].iter().any(|(m, _)| m == n) {
            return Err(format!("two tensors named `{n}` to write to {}", path.display()).into());
        }
    }
    let owned: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, t)| {
            let (dt, bytes) = match &t.data {
                TensorData::F32(v) => (safetensors::Dtype::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
                TensorData::I32(v) => (safetensors::Dtype::I32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
                TensorData::U8(v) => (safetensors::Dtype::U8, v.clone()),
            };
            (n.clone(), dt, t.shape.clone(), bytes)
        })
        .collect();
    let views = owned
        .iter()
        .map(|(n, dt, s, b)| Ok((n.clone(), safetensors::tensor::TensorView::new(*dt, s.clone(), b)?)))
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    safetensors::serialize_to_file(views, None, path).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(())
}
