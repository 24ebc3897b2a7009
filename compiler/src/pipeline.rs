//! The whole compiler after elaboration, as one list read top to bottom:
//!
//! 1. graph passes (`passes/`): canonicalize, recognize, autodiff, simplify, cse,
//!    precision, dce, and accuracy for a training bundle;
//! 2. lowering: fuse (`fusion/`), plan_memory (`memory/`), schedule (`schedule/`: graph
//!    IR → kernel IR), split_reductions;
//! 3. the target's kernel passes (its [`Backend`]: CPUs interchange, lanes and
//!    split_vector; GPUs tile_gemm and coalesce_rows);
//! 4. optimizer: a training bundle's AdamW entry points (`schedule/optimizer.rs`);
//! 5. the back end's writer (`driver.rs` writes the bundle).
//!
//! The driver, `tnc ir --after NAME`, `tnc compile --report` and the tests run this list;
//! nothing else knows the order. In debug builds (and so in every test) the graph
//! verifier runs after every graph pass, and the kernel-IR validator
//! (`kernel/valid.rs`) after every stage from `schedule` on.

use crate::backend::Backend;
use crate::fusion::{fuse, FusionPlan};
use crate::ir::{verify::verify, Graph};
use crate::memory::{plan_memory, MemoryPlan};
use crate::passes::{self, Pass, Policy};
use crate::schedule::{add_optimizer, schedule_with, split_reductions, Schedule, ScheduleOptions};
use std::time::{Duration, Instant};
use tnc_grammar::Diagnostic;

impl Lowered {
    /// What the last stage made, as text (`tnc ir --after`): the kernels once scheduled,
    /// else the memory plan (at B = 1, N = 2048), else the kernel groups, else the graph.
    pub fn to_text(&self) -> String {
        if let Some(s) = &self.schedule {
            crate::schedule::to_text(s)
        } else if let Some(m) = &self.memory {
            m.report().to_text(PLAN_SIZES.0, PLAN_SIZES.1)
        } else if let Some(plan) = &self.plan {
            crate::fusion::to_text(&self.graph, plan)
        } else {
            crate::ir::print::to_text(&self.graph)
        }
    }
}

/// What a bundle's forward computes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Program {
    /// The model's outputs (a training bundle: and its gradients).
    #[default]
    Model,
    /// `next_token`: the logits after the last position, `logits [B, 1, V]`.
    NextToken,
    /// `next_token`, then `prefill`: those logits and every state of the decode step after
    /// the whole prompt (`passes/prefill.rs`). `context`: the rows of a KV cache.
    Prefill { context: i64 },
    /// `next_token`, then `decode_step`: one token and the states in, its logits and the
    /// new states out (`passes/decode_step.rs`). `context`: the rows of a KV cache.
    DecodeStep { context: i64 },
}

impl Program {
    /// Its name in a bundle's hash and in the bundle cache ("" for the model's).
    pub fn describe(self) -> String {
        match self {
            Program::Model => String::new(),
            Program::NextToken => "next token".into(),
            Program::Prefill { context } => format!("prefill {context}"),
            Program::DecodeStep { context } => format!("decode step {context}"),
        }
    }
}

/// The sizes a memory plan is printed at.
pub const PLAN_SIZES: (i64, i64) = (1, 2048);

/// One step of the pipeline.
enum Stage {
    Graph(Box<dyn Pass>),
    Fuse,
    PlanMemory,
    Schedule,
    SplitReductions,
    Kernels(crate::backend::KernelPass),
    Optimizer,
}

impl Stage {
    fn name(&self) -> &'static str {
        match self {
            Stage::Graph(p) => p.name(),
            Stage::Fuse => "fuse",
            Stage::PlanMemory => "plan_memory",
            Stage::Schedule => "schedule",
            Stage::SplitReductions => "split_reductions",
            Stage::Kernels(k) => k.name,
            Stage::Optimizer => "optimizer",
        }
    }
}

/// How far a program has come: the graph, then its fusion plan, memory plan and
/// schedule as the stages that make them have run.
pub struct Lowered {
    pub graph: Graph,
    pub plan: Option<FusionPlan>,
    pub memory: Option<MemoryPlan>,
    pub schedule: Option<Schedule>,
    /// (stage, time) in pipeline order.
    pub stages: Vec<(&'static str, Duration)>,
}

/// The pipeline for one back end and one set of choices.
pub struct Pipeline {
    stages: Vec<Stage>,
    schedule_options: ScheduleOptions,
}

impl Pipeline {
    /// The stages for `backend`; `train` adds the accuracy output and the optimizer.
    pub fn new(backend: &dyn Backend, train: bool, precision: Policy) -> Pipeline {
        let mut stages: Vec<Stage> = passes::pipeline_with(precision).into_iter().map(Stage::Graph).collect();
        if train {
            stages.push(Stage::Graph(Box::new(passes::Accuracy)));
        }
        stages.extend([Stage::Fuse, Stage::PlanMemory, Stage::Schedule, Stage::SplitReductions]);
        if train {
            stages.push(Stage::Optimizer);
        }
        stages.extend(backend.kernel_passes().into_iter().map(Stage::Kernels));
        Pipeline { stages, schedule_options: backend.schedule_options() }
    }

    /// The same pipeline scheduling with `opts` (tests: small chunks, the generic lowering).
    pub fn with_schedule_options(mut self, opts: ScheduleOptions) -> Pipeline {
        self.schedule_options = opts;
        self
    }

    /// The pipeline of `program`: a generation program's passes in place of `autodiff`,
    /// so the bundle has a forward and no backward.
    pub fn program(mut self, program: Program) -> Pipeline {
        let passes: Vec<Box<dyn Pass>> = match program {
            Program::Model => return self,
            Program::NextToken => vec![Box::new(passes::NextToken)],
            Program::Prefill { context } => vec![Box::new(passes::NextToken), Box::new(passes::Prefill { context })],
            Program::DecodeStep { context } => {
                vec![Box::new(passes::NextToken), Box::new(passes::DecodeStep { context })]
            }
        };
        if let Some(i) = self.stages.iter().position(|s| s.name() == "autodiff") {
            self.stages.splice(i..=i, passes.into_iter().map(Stage::Graph));
        }
        self
    }

    /// The same pipeline without the stage `name` (tests: `recognize`, to exercise the
    /// generic lowering of every op).
    pub fn without(mut self, name: &str) -> Pipeline {
        self.stages.retain(|s| s.name() != name);
        self
    }

    /// Every stage's name, in order, after `elaborate` (the graph as elaborated).
    pub fn names(&self) -> Vec<&'static str> {
        std::iter::once("elaborate").chain(self.stages.iter().map(Stage::name)).collect()
    }

    /// Run every stage.
    pub fn run(&self, g: Graph) -> Result<Lowered, Diagnostic> {
        self.run_until(g, self.stages.last().map_or("elaborate", Stage::name))
    }

    /// Run the stages up to and including `stop` (`elaborate`: none). An unknown name is
    /// an error listing them all.
    pub fn run_until(&self, graph: Graph, stop: &str) -> Result<Lowered, Diagnostic> {
        let names = self.names();
        if !names.contains(&stop) {
            let mut d = Diagnostic::error(format!("unknown stage `{stop}`"))
                .with_note(format!("the stages are, in order: {}", names.join(", ")));
            if let Some(h) = tnc_grammar::diag::did_you_mean(stop, names.iter().copied()) {
                d = d.with_hint(h);
            }
            return Err(d);
        }
        let mut l = Lowered { graph, plan: None, memory: None, schedule: None, stages: Vec::new() };
        if stop == "elaborate" {
            return Ok(l);
        }
        for stage in &self.stages {
            let name = stage.name();
            let started = Instant::now();
            // Lowering errors are the lowering's own words (an op no kernel exists for, a
            // size that overflows); only a broken graph is the compiler's fault.
            match stage {
                Stage::Graph(p) => {
                    let g = std::mem::replace(&mut l.graph, Graph::new(""));
                    l.graph = p.run(g)?;
                    if cfg!(debug_assertions) {
                        verify(&l.graph).map_err(|e| {
                            Diagnostic::error(format!("internal error: pass `{name}` broke the graph: {e}"))
                        })?;
                    }
                }
                Stage::Fuse => l.plan = Some(fuse(&l.graph).map_err(Diagnostic::error)?),
                Stage::PlanMemory => {
                    let plan = l.plan.as_ref().expect("fuse runs before plan_memory");
                    l.memory = Some(plan_memory(&l.graph, plan).map_err(Diagnostic::error)?);
                }
                Stage::Schedule => {
                    let plan = l.plan.as_ref().expect("fuse runs before schedule");
                    let memory = l.memory.as_ref().expect("plan_memory runs before schedule");
                    let s = schedule_with(&l.graph, plan, memory, &self.schedule_options);
                    l.schedule = Some(s.map_err(Diagnostic::error)?);
                }
                Stage::SplitReductions => {
                    let s = l.schedule.as_mut().expect("schedule runs before split_reductions");
                    split_reductions(s, self.schedule_options.token_parts);
                }
                Stage::Kernels(k) => (k.run)(l.schedule.as_mut().expect("schedule runs before kernel passes")),
                Stage::Optimizer => {
                    let s = l.schedule.as_mut().expect("schedule runs before the optimizer");
                    add_optimizer(s, &l.graph).map_err(Diagnostic::error)?;
                }
            }
            l.stages.push((name, started.elapsed()));
            if let (true, Some(s)) = (cfg!(debug_assertions), &l.schedule) {
                crate::kernel::valid::validate_all(&s.kernels).map_err(|e| {
                    Diagnostic::error(format!("internal error: stage `{name}` left an invalid kernel: {e}"))
                })?;
            }
            if name == stop {
                break;
            }
        }
        Ok(l)
    }
}

/// An optimized graph (after the graph passes) through the lowering stages scheduled
/// with `opts` alone, for the tests of one schedule configuration: a GPU's (sm80, through
/// its kernel passes) when `opts.gpu_blocks`, else a CPU's up to `split_reductions` (the
/// CPU kernel passes are tested on their own).
pub fn scheduled_with(optimized: &Graph, opts: &ScheduleOptions) -> Result<Schedule, String> {
    use crate::backend::{backend_for, CodeGen, Target};
    let target = Target::parse(if opts.gpu_blocks { "sm80" } else { "x86-64-v3" })?;
    let backend = backend_for(&target, if opts.gpu_blocks { CodeGen::Llvm } else { CodeGen::default() })?;
    let mut p = Pipeline::new(&*backend, false, Policy::F32).with_schedule_options(opts.clone());
    p.stages.retain(|s| !matches!(s, Stage::Graph(_)));
    let stop = if opts.gpu_blocks { *p.names().last().expect("stages") } else { "split_reductions" };
    let l = p.run_until(optimized.clone(), stop).map_err(|d| d.message)?;
    Ok(l.schedule.expect("the pipeline schedules"))
}
