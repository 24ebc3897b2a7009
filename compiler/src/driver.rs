//! `tnc compile`: the whole pipeline from an elaborated graph to a bundle on disk, with
//! the time each stage took.

use crate::backend::{self, CpuTarget, GpuTarget};
use crate::bundle::{self, TargetInfo};
use crate::fusion::{fuse, FusionPlan};
use crate::ir::Graph;
use crate::memory::{plan_memory, MemoryPlan};
use crate::passes;
use crate::schedule::{add_optimizer, schedule_with, Schedule, ScheduleOptions};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tnc_runtime::manifest::TargetKind;

/// What `--emit` asks for besides the bundle.
#[derive(Clone, Copy, Debug, Default)]
pub struct Emit {
    pub llvm: bool,
    pub asm: bool,
}

/// Choices of `tnc compile` beyond the target.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    pub emit: Emit,
    /// A training bundle: adds the optimizer's entry points (`accumulate`, `grad_norm`,
    /// `step`; see `schedule/optimizer.rs`) and the per-token accuracy output `correct`.
    pub train: bool,
    /// The element type of products' operands (`passes/precision.rs`).
    pub precision: passes::Policy,
}

pub struct Compiled {
    pub graph: Graph,
    pub plan: FusionPlan,
    pub memory: MemoryPlan,
    pub schedule: Schedule,
    /// (stage, time) in pipeline order.
    pub stages: Vec<(&'static str, Duration)>,
    /// Files written besides the bundle (`--emit`).
    pub extra_files: Vec<PathBuf>,
}

fn timed<T>(
    stages: &mut Vec<(&'static str, Duration)>,
    name: &'static str,
    f: impl FnOnce() -> Result<T, String>,
) -> Result<T, String> {
    let t = Instant::now();
    let r = f()?;
    stages.push((name, t.elapsed()));
    Ok(r)
}

/// Optimize, fuse, plan memory and schedule with `sched_opts` (everything before code
/// generation).
pub fn lower(
    graph: Graph,
    (train, precision): (bool, passes::Policy),
    sched_opts: &ScheduleOptions,
    stages: &mut Vec<(&'static str, Duration)>,
) -> Result<(Graph, FusionPlan, MemoryPlan, Schedule), String> {
    let mut g = graph;
    let mut pipeline = passes::pipeline_with(precision);
    if train {
        pipeline.push(Box::new(passes::Accuracy));
    }
    for p in pipeline {
        let t = Instant::now();
        g = p.run(g).map_err(|d| d.message)?;
        stages.push((p.name(), t.elapsed()));
    }
    let plan = timed(stages, "fuse", || fuse(&g))?;
    let memory = timed(stages, "plan_memory", || plan_memory(&g, &plan))?;
    let mut sched = timed(stages, "schedule", || schedule_with(&g, &plan, &memory, sched_opts))?;
    if train {
        timed(stages, "optimizer", || add_optimizer(&mut sched, &g))?;
    }
    Ok((g, plan, memory, sched))
}

/// Whether `target` names a GPU (`sm80` …) rather than a CPU.
/// Whether `target` names a GPU (`sm80` …) rather than a CPU.
pub fn is_gpu(target: &str) -> bool {
    target.starts_with("sm")
}

/// The schedule options of `target`: CPUs hand products to the GEMM library.
pub fn schedule_options(target: &str) -> ScheduleOptions {
    if is_gpu(target) {
        let shared_limit =
            GpuTarget::parse(target).map_or(crate::kernel::STATIC_SHARED_BYTES, |t| t.max_shared_bytes());
        ScheduleOptions { shared_limit, ..ScheduleOptions::gpu() }
    } else {
        ScheduleOptions::cpu()
    }
}

/// The target's rewrites of scheduled kernels: on CPUs reductions over a column loop are
/// interchanged (`kernel/interchange.rs`), then the remaining serial reductions dealt to
/// vector lanes (`kernel/lanes.rs`), and vector loops over merged axes split into
/// contiguous runs (`kernel/split_vector.rs`). GPU schedules come in blocks already
/// (`ScheduleOptions::gpu_blocks`).
pub fn target_kernels(kernels: &[crate::kernel::Kernel], target: &str) -> Vec<crate::kernel::Kernel> {
    use crate::kernel::split_vector::split_vector_loops;
    use crate::kernel::{interchange::interchange_reductions, lanes::deal_reductions};
    if is_gpu(target) {
        kernels.to_vec()
    } else {
        kernels.iter().map(|k| split_vector_loops(&deal_reductions(&interchange_reductions(k)))).collect()
    }
}

/// Check a target name: a CPU (`native`, `x86-64-v3`, `x86-64-v4`) or a GPU (`sm80` …).
pub fn check_target(target: &str) -> Result<(), String> {
    if is_gpu(target) {
        GpuTarget::parse(target).map(|_| ())
    } else {
        CpuTarget::parse(target)
            .map(|_| ())
            .map_err(|e| format!("{e}; GPU targets are: {}", backend::GPU_TARGETS.join(", ")))
    }
}

/// Compile `graph` for `target` (a CPU or GPU name) into the bundle directory `out`.
pub fn compile(
    graph: Graph,
    target: &str,
    out: &Path,
    opts: Options,
    stages: Vec<(&'static str, Duration)>,
) -> Result<Compiled, String> {
    let model = model_hash(&graph, &opts);
    if is_gpu(target) {
        return compile_gpu(graph, target, out, (opts, model), stages);
    }
    let cpu =
        CpuTarget::parse(target).map_err(|e| format!("{e}; GPU targets are: {}", backend::GPU_TARGETS.join(", ")))?;
    compile_cpu(graph, cpu, out, (opts, model), stages)
}

/// The manifest's `model_sha256`: what a bundle computes whatever its target — the
/// elaborated graph, the precision and whether it trains.
fn model_hash(graph: &Graph, opts: &Options) -> String {
    let text =
        format!("{}\nprecision {}\ntrain {}\n", crate::ir::print::to_text(graph), opts.precision.name(), opts.train);
    tnc_runtime::manifest::sha256_hex(text.as_bytes())
}

/// A bundle of PTX for an NVIDIA GPU: one thread per parallel iteration, blocks of
/// `backend::GPU_BLOCK` threads (the launch shape is written in the manifest).
fn compile_gpu(
    graph: Graph,
    target: &str,
    out: &Path,
    (opts, model): (Options, String),
    mut stages: Vec<(&'static str, Duration)>,
) -> Result<Compiled, String> {
    let emit = opts.emit;
    let gpu = GpuTarget::parse(target)?;
    let (graph, plan, memory, mut sched) =
        lower(graph, (opts.train, opts.precision), &schedule_options(target), &mut stages)?;
    sched.kernels = target_kernels(&sched.kernels, target);
    let ptx = timed(&mut stages, "llvm (nvptx)", || backend::emit_ptx(&sched.kernels, &gpu))?;
    let mut extra_files = Vec::new();
    if emit.llvm {
        let p = with_suffix(out, "ll");
        std::fs::write(&p, backend::emit_nvptx_ir(&sched.kernels, &gpu, true)?).map_err(|e| e.to_string())?;
        extra_files.push(p);
    }
    if emit.asm {
        let p = with_suffix(out, "ptx");
        std::fs::write(&p, &ptx).map_err(|e| e.to_string())?;
        extra_files.push(p);
    }
    let info = TargetInfo { name: gpu.name.clone(), kind: TargetKind::Cuda, cpu_features: Vec::new() };
    let (mut manifest, baked) = bundle::manifest(&graph, &sched, info)?;
    manifest.model_sha256 = Some(model);
    for (k, kernel) in manifest.kernels.iter_mut().zip(&sched.kernels) {
        use tnc_runtime::manifest::Poly;
        let one = || Poly::constant(1);
        k.gpu = Some(match kernel.threads {
            // A block kernel: one block of its threads per iteration, with the dynamic
            // shared memory its arrays need beyond the static 48 KB (else they are static,
            // in the PTX).
            Some(t) => tnc_runtime::manifest::GpuLaunch {
                block: [t, 1, 1],
                grid: [k.extent.clone(), one(), one()],
                shared_bytes: u32::try_from(kernel.dynamic_shared_bytes())
                    .map_err(|_| format!("kernel `{}` declares too much shared memory", kernel.name))?,
            },
            // One thread per iteration: grid = ceil(range / block).
            None => tnc_runtime::manifest::GpuLaunch {
                block: [backend::GPU_BLOCK, 1, 1],
                grid: [Poly::ceil_div(k.extent.clone(), backend::GPU_BLOCK as i64), one(), one()],
                shared_bytes: 0,
            },
        });
    }
    let init_bytes = baked_bytes(out, &baked)?;
    // The emulated GPU device runs the kernel IR the PTX was written from.
    let kernel_ir = serde_json::to_vec(&sched.kernels).map_err(|e| format!("cannot serialize the kernels: {e}"))?;
    let mut files: Vec<(&str, &[u8])> =
        vec![("kernels.ptx", ptx.as_bytes()), (tnc_runtime::manifest::KERNEL_IR_FILE, &kernel_ir)];
    if let Some(b) = &init_bytes {
        files.push((bundle::INIT_FILE, b));
    }
    timed(&mut stages, "write bundle", || write(out, &manifest, &files))?;
    Ok(Compiled { graph, plan, memory, schedule: sched, stages, extra_files })
}

fn write(out: &Path, manifest: &tnc_runtime::Manifest, files: &[(&str, &[u8])]) -> Result<(), String> {
    let non_bundle = out.exists()
        && !out.join("manifest.json").exists()
        && out.read_dir().map(|mut d| d.next().is_some()).unwrap_or(false);
    if non_bundle {
        return Err(format!("`{}` exists and is not a bundle; refusing to overwrite it", out.display()));
    }
    manifest.write_bundle(out, files).map_err(|e| format!("cannot write the bundle {}: {e}", out.display()))
}

/// Initial values computed at compile time, as a safetensors file's bytes.
fn baked_bytes(out: &Path, baked: &[(String, crate::interp::Tensor)]) -> Result<Option<Vec<u8>>, String> {
    if baked.is_empty() {
        return Ok(None);
    }
    let tmp = scratch_file(out, "init.safetensors")?;
    let refs: Vec<(String, &crate::interp::Tensor)> = baked.iter().map(|(n, t)| (n.clone(), t)).collect();
    crate::interp::write_safetensors(&tmp, &refs, crate::interp::FileDType::F32)?;
    let b = std::fs::read(&tmp).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_file(&tmp);
    Ok(Some(b))
}

fn compile_cpu(
    graph: Graph,
    cpu: CpuTarget,
    out: &Path,
    (opts, model): (Options, String),
    mut stages: Vec<(&'static str, Duration)>,
) -> Result<Compiled, String> {
    let emit = opts.emit;
    let (graph, plan, memory, sched) =
        lower(graph, (opts.train, opts.precision), &schedule_options(&cpu.name), &mut stages)?;
    let mut extra_files = Vec::new();
    // Reductions inside vector loops turned inside out so LLVM vectorizes them.
    let kernels = target_kernels(&sched.kernels, &cpu.name);
    let objects = timed(&mut stages, "llvm", || backend::emit_objects(&kernels, &cpu))?;
    let scratch = tempdir(out)?;
    let mut obj_paths = Vec::new();
    for (i, object) in objects.iter().enumerate() {
        let path = scratch.join(format!("kernels{i}.o"));
        std::fs::write(&path, object).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        obj_paths.push(path);
    }
    let so_path = scratch.join("kernels.so");
    timed(&mut stages, "link", || backend::link_shared(&obj_paths, &so_path))?;
    let so = std::fs::read(&so_path).map_err(|e| format!("cannot read {}: {e}", so_path.display()))?;
    let _ = std::fs::remove_dir_all(&scratch);
    if emit.llvm {
        let p = with_suffix(out, "ll");
        std::fs::write(&p, backend::emit_llvm_ir(&kernels, &cpu, true)?).map_err(|e| e.to_string())?;
        extra_files.push(p);
    }
    if emit.asm {
        let p = with_suffix(out, "s");
        std::fs::write(&p, backend::emit_asm(&kernels, &cpu)?).map_err(|e| e.to_string())?;
        extra_files.push(p);
    }
    // Features the runtime can check; `native` lists every host feature LLVM knows, some
    // of which no runtime check exists for (they are implied by the checked ones).
    let cpu_features =
        cpu.required_features.iter().filter(|f| tnc_runtime::bundle::host_has_feature(f).is_some()).cloned().collect();
    let info = TargetInfo { name: cpu.name.clone(), kind: TargetKind::Cpu, cpu_features };
    let (mut manifest, baked) = bundle::manifest(&graph, &sched, info)?;
    manifest.model_sha256 = Some(model);
    let init_bytes = baked_bytes(out, &baked)?;
    let mut files: Vec<(&str, &[u8])> = vec![("kernels.so", &so)];
    if let Some(b) = &init_bytes {
        files.push((bundle::INIT_FILE, b));
    }
    timed(&mut stages, "write bundle", || write(out, &manifest, &files))?;
    Ok(Compiled { graph, plan, memory, schedule: sched, stages, extra_files })
}

fn with_suffix(out: &Path, ext: &str) -> PathBuf {
    let mut s = out.as_os_str().to_owned();
    s.push(format!(".{ext}"));
    PathBuf::from(s)
}

fn tempdir(near: &Path) -> Result<PathBuf, String> {
    let d = std::env::temp_dir().join(format!(
        "tnc-compile-{}-{}",
        std::process::id(),
        near.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    ));
    std::fs::create_dir_all(&d).map_err(|e| format!("cannot create {}: {e}", d.display()))?;
    Ok(d)
}

fn scratch_file(near: &Path, name: &str) -> Result<PathBuf, String> {
    Ok(tempdir(near)?.join(name))
}
