//! `tnc compile`: an elaborated graph through the pipeline (`pipeline.rs`) and its
//! target's back end (`backend/contract.rs`) to a bundle on disk, with the time each
//! stage took.

use crate::backend::contract::timed;
use crate::backend::{self, Target};
use crate::bundle;
use crate::fusion::FusionPlan;
use crate::ir::Graph;
use crate::memory::MemoryPlan;
use crate::passes;
use crate::pipeline::{Pipeline, Program};
use crate::schedule::Schedule;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use crate::backend::Emit;

/// Choices of `tnc compile` beyond the target.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    pub emit: Emit,
    /// A training bundle: adds the optimizer's entry points (`accumulate`, `grad_norm`,
    /// `step`; see `schedule/optimizer.rs`) and the per-token accuracy output `correct`.
    pub train: bool,
    /// The element type of products' operands (`passes/precision.rs`).
    pub precision: passes::Policy,
    /// The code generator of a CPU target (`--backend`).
    pub codegen: backend::CodeGen,
    /// What the forward computes: the model's outputs, or a generation program (the next
    /// token's logits, the prefill, the decode step; no backward).
    pub program: Program,
    /// How a GPU target computes dense products (`--gemm`); CPU targets always call their
    /// GEMM library, so anything but the default is an error for them.
    pub gemm: backend::GpuGemm,
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

/// Whether `target` names a GPU (`sm80` …) rather than a CPU; an invalid name is neither.
pub fn is_gpu(target: &str) -> bool {
    Target::parse(target).is_ok_and(|t| t.is_gpu())
}

/// Compile `graph` for `target` (a CPU or GPU name) into the bundle directory `out`;
/// `stages` holds the times of what ran before (elaboration).
pub fn compile(
    graph: Graph,
    target: &str,
    out: &Path,
    opts: Options,
    mut stages: Vec<(&'static str, Duration)>,
) -> Result<Compiled, String> {
    let mut target = Target::parse(target)?;
    match &mut target {
        Target::Gpu(gpu) => gpu.gemm = opts.gemm,
        Target::Cpu(cpu) if opts.gemm != backend::GpuGemm::Tiles => {
            return Err(format!(
                "`--gemm {}` is for GPU targets; `{}` is a CPU, whose products always call its GEMM library",
                opts.gemm.name(),
                cpu.name
            ))
        }
        Target::Cpu(_) => {}
    }
    let backend = backend::backend_for(&target, opts.codegen)?;
    let model = model_hash(&graph, &opts);
    if opts.program != Program::Model && opts.train {
        return Err("a generation bundle cannot be a training bundle".into());
    }
    let pipeline = Pipeline::new(&*backend, opts.train, opts.precision).program(opts.program);
    let lowered = pipeline.run(graph).map_err(|d| d.message)?;
    stages.extend(lowered.stages);
    let (graph, sched) = (lowered.graph, lowered.schedule.expect("the pipeline schedules"));
    let (plan, memory) = (lowered.plan.expect("the pipeline fuses"), lowered.memory.expect("and plans memory"));
    let written = backend.write(&sched.kernels, opts.emit)?;
    stages.extend(written.stages);
    let mut extra_files = Vec::new();
    if let Some(parent) = out.parent().filter(|p| !written.extras.is_empty() && !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    }
    for (suffix, bytes) in &written.extras {
        let p = with_suffix(out, suffix);
        std::fs::write(&p, bytes).map_err(|e| format!("cannot write {}: {e}", p.display()))?;
        extra_files.push(p);
    }
    let (mut manifest, baked) = bundle::manifest(&graph, &sched, written.info)?;
    manifest.model_sha256 = Some(model);
    backend.complete_manifest(&mut manifest, &sched.kernels)?;
    let init_bytes = baked_bytes(out, &baked)?;
    let mut files: Vec<(&str, &[u8])> = written.files.iter().map(|(n, b)| (*n, b.as_slice())).collect();
    if let Some(b) = &init_bytes {
        files.push((bundle::INIT_FILE, b));
    }
    timed(&mut stages, "write bundle", || write(out, &manifest, &files))?;
    Ok(Compiled { graph, plan, memory, schedule: sched, stages, extra_files })
}

/// The manifest's `model_sha256`: what a bundle computes whatever its target — the
/// elaborated graph, the precision and whether it trains.
fn model_hash(graph: &Graph, opts: &Options) -> String {
    let text = format!(
        "{}\nprecision {}\ntrain {}\n{}",
        crate::ir::print::to_text(graph),
        opts.precision.name(),
        opts.train,
        match opts.program {
            Program::Model => String::new(),
            p => format!("{}\n", p.describe()),
        }
    );
    tnc_bundle::manifest::sha256_hex(text.as_bytes())
}

fn write(out: &Path, manifest: &tnc_bundle::Manifest, files: &[(&str, &[u8])]) -> Result<(), String> {
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
