//! `schedule`: lower every fused group to kernels of the kernel IR, and the program that
//! runs them — which kernel, on which buffers, in the `forward` or `backward` entry.
//!
//! Each group becomes:
//! - one kernel per op that needs a loop structure of its own (scans and the normal-form
//!   ops: linear attention's chunked scan, block attention, the fused cross-entropy,
//!   scatter-add), writing its value to memory (a workspace buffer when the value is
//!   internal to the group);
//! - one kernel per "row space" of the group's other outputs: the parallel index runs
//!   over all axes but the last, an inner vector loop over the last, and every value is
//!   an element expression of the group's ops (see `element.rs`). Reductions over the
//!   last axis are computed once per row by the emitter's placement rule.
//!
//! Identical kernels (the same layer, unrolled L times) are kept once.

mod block_attention;
mod compose;
mod cross_entropy;
mod cross_entropy_chunks;
mod element;
mod emit;
mod gemm;
mod linear_attention;
pub mod linear_attention_gpu;
pub mod optimizer;
pub(crate) mod row_blocks;
pub mod run;
mod special;
mod split_reduce;
mod threads;

use crate::fusion::FusionPlan;
use crate::ir::{Dim, Graph, NodeId, Op};
use crate::kernel::{print, Access, BufferDecl, Expr, Kernel, LoopKind, Stmt};
use crate::memory::{MemClass, MemoryPlan};
use element::{elem_of, Lowering, Source};
use std::collections::{BTreeSet, HashMap, HashSet};

pub use element::scalar_of;
pub use optimizer::add_optimizer;

/// What a buffer holds, for the manifest and the runtime.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Activation,
    Param,
    Grad,
    Input,
    Output,
    Workspace,
    /// Optimizer state of a training bundle (`optimizer.rs`), kept across steps.
    Optimizer,
}

#[derive(Clone, Debug)]
pub struct BufferInfo {
    pub bytes: Dim,
    pub role: Role,
    pub name: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Entry {
    Forward,
    Backward,
    /// The optimizer's entry points (`optimizer.rs`).
    Accumulate,
    GradNorm,
    Step,
}

impl Entry {
    /// The entry point's name in the manifest.
    pub fn name(self) -> &'static str {
        match self {
            Entry::Forward => "forward",
            Entry::Backward => "backward",
            Entry::Accumulate => "accumulate",
            Entry::GradNorm => "grad_norm",
            Entry::Step => "step",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Step {
    pub kernel: usize,
    /// Global buffer id for each of the kernel's buffers.
    pub buffers: Vec<usize>,
    pub entry: Entry,
    /// Launch arguments appended to the run-time arguments for this launch only: the
    /// kernel's scalars beyond the program's (e.g. a vocabulary chunk's first word, so
    /// one kernel serves every chunk).
    pub args: Vec<i64>,
}

#[derive(Clone, Debug)]
pub struct Schedule {
    pub kernels: Vec<Kernel>,
    pub buffers: Vec<BufferInfo>,
    pub steps: Vec<Step>,
    /// Run-time arguments of every kernel: size symbols then scalars.
    pub sizes: Vec<String>,
    pub scalars: Vec<String>,
    /// The buffer holding each parameter, input and output.
    pub params: Vec<usize>,
    pub inputs: Vec<usize>,
    pub outputs: Vec<(String, usize)>,
    /// Kernels over flat elements, one thread per element, coalesced as they are: the
    /// combiners of split reductions (`split_reduce.rs`) and the optimizer's kernels over
    /// parameter storage (`optimizer.rs`). GPU rewrites leave them as they are.
    pub flat: BTreeSet<usize>,
}

/// Ops that get a kernel of their own.
fn is_special(op: &Op) -> bool {
    matches!(op, Op::Scan { .. }) || op.is_normal_form() || op.kind() == "scatter_add"
}

/// Size symbols of a graph (from its inputs and every shape), sorted.
fn symbols(g: &Graph) -> Vec<String> {
    let mut s: Vec<String> = g.dag.node_weights().flat_map(|n| n.ty.shape.iter().flat_map(|d| d.symbols())).collect();
    s.sort();
    s.dedup();
    s
}

/// Choices of the schedule that do not change what it computes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScheduleOptions {
    /// Tokens per chunk of the linear-attention scan kernels (≥ 1).
    pub chunk: usize,
    /// Dense contractions become library GEMM nodes (`gemm.rs`), and the cross-entropy
    /// sweeps the vocabulary in chunks of them; CPU targets only. Off, contractions are
    /// generated loop nests (with `gpu_blocks`, both are as on CPUs, the library nodes
    /// tiled block kernels).
    pub library_gemm: bool,
    /// GPU block kernels: the linear-attention scan and block attention as thread blocks
    /// staging their operands in shared memory (`linear_attention_gpu.rs`,
    /// `block_attention.rs`), dense products as tiled GEMMs (`kernel/gemm_tiles.rs`), row
    /// kernels as blocks whose threads share each row (`kernel/blocks.rs`), sums over the
    /// tokens into small outputs split over the token range (`split_reduce.rs`). Off,
    /// every kernel runs one parallel iteration per thread.
    pub gpu_blocks: bool,
    /// The most shared memory a block kernel may declare, in bytes (the target's limit per
    /// block; beyond 48 KB it is dynamic shared memory).
    pub shared_limit: usize,
    /// Parts of the token range a sum over the tokens into a small output runs in
    /// (`split_reduce.rs`): enough parallel iterations for every thread (CPU) or SM (GPU).
    pub token_parts: usize,
    /// Floats of accumulators a register-blocked product in a CPU kernel may keep in
    /// registers (`row_blocks.rs`): the target's, half its vector register file.
    pub accumulator_floats: usize,
}

impl Default for ScheduleOptions {
    fn default() -> Self {
        ScheduleOptions {
            chunk: linear_attention::DEFAULT_CHUNK,
            library_gemm: false,
            gpu_blocks: false,
            shared_limit: crate::kernel::STATIC_SHARED_BYTES,
            token_parts: split_reduce::PARTS,
            accumulator_floats: row_blocks::AVX512_ACCUMULATOR_FLOATS,
        }
    }
}

impl ScheduleOptions {
    /// The options for a CPU target.
    pub fn cpu() -> Self {
        ScheduleOptions { library_gemm: true, token_parts: split_reduce::CPU_PARTS, ..Default::default() }
    }

    /// The options for a GPU target, with shared memory up to the static 48 KB (every
    /// target allows more per block: see `LlvmNvptx::schedule_options`).
    pub fn gpu() -> Self {
        ScheduleOptions { gpu_blocks: true, ..Default::default() }
    }
}

/// Workspaces for values that live only inside one group (a GEMM's result that the
/// group's element kernels read), shared by later groups: one free list per size.
#[derive(Default)]
struct Scratch {
    free: HashMap<Dim, Vec<usize>>,
    /// Taken by the current group: (size, buffer, the node it holds).
    taken: Vec<(Dim, usize, NodeId)>,
}

impl Scratch {
    fn take(&mut self, bytes: Dim, n: NodeId, buffers: &mut Vec<BufferInfo>) -> usize {
        let b = self.free.get_mut(&bytes).and_then(Vec::pop).unwrap_or_else(|| {
            buffers.push(BufferInfo { bytes: bytes.clone(), role: Role::Workspace, name: None });
            buffers.len() - 1
        });
        self.taken.push((bytes, b, n));
        b
    }

    /// The group is done: its scratch values are dead.
    fn release(&mut self, stored: &mut HashMap<NodeId, usize>) {
        for (bytes, b, n) in self.taken.drain(..) {
            stored.remove(&n);
            self.free.entry(bytes).or_default().push(b);
        }
    }
}

/// [`schedule_with`] the default options.
pub fn schedule(g: &Graph, plan: &FusionPlan, mem: &MemoryPlan) -> Result<Schedule, String> {
    schedule_with(g, plan, mem, &ScheduleOptions::default())
}

pub fn schedule_with(
    g: &Graph,
    plan: &FusionPlan,
    mem: &MemoryPlan,
    opts: &ScheduleOptions,
) -> Result<Schedule, String> {
    let mut sizes = symbols(g);
    // Dropout's seed and step, and whether to apply it (1 in training, 0 in evaluation).
    let scalars = vec!["seed".to_string(), "step".to_string(), "train".to_string()];
    let all_args: Vec<String> = sizes.iter().chain(&scalars).cloned().collect();
    let mut buffers: Vec<BufferInfo> = mem
        .buffers
        .iter()
        .map(|b| BufferInfo {
            bytes: b.bytes.clone(),
            role: match b.class {
                MemClass::Activation => Role::Activation,
                MemClass::Parameter => Role::Param,
                MemClass::Gradient => Role::Grad,
                MemClass::Workspace => Role::Workspace,
            },
            name: None,
        })
        .collect();
    let mut stored: HashMap<NodeId, usize> = HashMap::new();
    // Workspace entries of the memory plan name a group, not a value: kernels here
    // allocate their own scratch.
    for v in mem.values.iter().filter(|v| v.class != MemClass::Workspace) {
        stored.insert(v.node, v.buffer);
    }
    let buffer_of = |n: NodeId, stored: &HashMap<NodeId, usize>| -> Result<usize, String> {
        stored.get(&n).copied().ok_or_else(|| format!("no buffer for {n:?} ({})", g.node(n).op.kind()))
    };
    let params = g.params.iter().map(|p| buffer_of(p.node, &stored)).collect::<Result<Vec<_>, _>>()?;
    let inputs = g.inputs.iter().map(|i| buffer_of(i.node, &stored)).collect::<Result<Vec<_>, _>>()?;
    let outputs = g
        .outputs
        .iter()
        .map(|(n, id)| Ok((n.clone(), buffer_of(*id, &stored)?)))
        .collect::<Result<Vec<_>, String>>()?;
    for (i, p) in g.params.iter().enumerate() {
        buffers[params[i]].name = Some(p.name.clone());
    }
    for (i, inp) in g.inputs.iter().enumerate() {
        buffers[inputs[i]].role = Role::Input;
        buffers[inputs[i]].name = Some(inp.name.clone());
    }
    for (name, b) in &outputs {
        if !name.starts_with("grad.") {
            buffers[*b].role = Role::Output;
        }
        buffers[*b].name = Some(name.clone());
    }

    // Values the forward entry must produce: everything the non-gradient outputs need.
    let forward: HashSet<NodeId> = {
        let mut seen = HashSet::new();
        let mut stack: Vec<NodeId> =
            g.outputs.iter().filter(|(n, _)| !n.starts_with("grad.")).map(|(_, id)| *id).collect();
        while let Some(n) = stack.pop() {
            if seen.insert(n) {
                stack.extend(g.operands(n));
            }
        }
        seen
    };

    let mut out = Program { kernels: Vec::new(), text: HashMap::new(), steps: Vec::new() };
    // The logsumexp workspace of each cross-entropy's (x, E, y).
    let mut lse_of: HashMap<Vec<NodeId>, usize> = HashMap::new();
    let mut ce_shared = cross_entropy_chunks::Shared::new(mem);
    let mut scratch = Scratch::default();
    for (gi, group) in plan.groups.iter().enumerate() {
        // A group runs in `forward` when it writes a value the forward outputs need; a group
        // that only recomputes forward values for the backward stays in `backward`.
        let entry = if group.outputs.iter().any(|n| forward.contains(n)) { Entry::Forward } else { Entry::Backward };
        // Dense products: library nodes on CPUs, tiled block kernels on GPUs.
        let gemms: HashSet<NodeId> = if opts.library_gemm || opts.gpu_blocks {
            group.nodes.iter().copied().filter(|&n| gemm::is_library_gemm(g, n)).collect()
        } else {
            HashSet::new()
        };
        let special = |n: NodeId| is_special(&g.node(n).op) || gemms.contains(&n);
        // Within the group, its own outputs are computed, never read back: a kernel cannot
        // read what it (or a later kernel of the group) has not written yet.
        let mut reads = stored.clone();
        for n in group.outputs.iter().filter(|&&n| !special(n)) {
            reads.remove(n);
        }
        // Ops with kernels of their own first, each writing its value to memory.
        for &n in group.nodes.iter().filter(|&&n| special(n)) {
            if !stored.contains_key(&n) {
                let bytes = crate::fusion::value_bytes(g, n).ok_or("size overflow")?;
                let b = if gemms.contains(&n) {
                    scratch.take(bytes, n, &mut buffers)
                } else {
                    buffers.push(BufferInfo { bytes, role: Role::Workspace, name: None });
                    buffers.len() - 1
                };
                stored.insert(n, b);
                reads.insert(n, b);
            }
            let mut sink =
                Sink { g, stored: &stored, all_args: &all_args, buffers: &mut buffers, out: &mut out, entry };
            let kind = g.node(n).op.kind();
            let name = format!("g{gi}_{kind}");
            let op = &g.node(n).op;
            let done = if gemms.contains(&n) {
                let out = sink.stored[&n];
                sink.stored = &reads;
                gemm::einsum(&mut sink, &reads, n, out, &format!("g{gi}_gemm"))
            } else if cross_entropy::is_cross_entropy(op) {
                let library = (opts.library_gemm || opts.gpu_blocks).then_some(&reads);
                cross_entropy_kernels(&mut sink, n, &mut lse_of, &mut ce_shared, &name, library)
            } else if special::is_full_block_attention(op) {
                full_attention_kernels(&mut sink, n, &name)
            } else {
                sink.kernel(|lw| special::kernel(lw, n, opts, name.clone()))
            };
            done.map_err(|e| format!("group {gi}: {e}"))?;
        }
        // The other outputs, one kernel per row space.
        let rest: Vec<NodeId> = group.outputs.iter().copied().filter(|&n| !special(n)).collect();
        let mut classes: Vec<(Vec<Dim>, Vec<NodeId>)> = Vec::new();
        for n in rest {
            let shape = &g.ty(n).shape;
            let rows = shape[..shape.len().saturating_sub(1)].to_vec();
            match classes.iter_mut().find(|(r, _)| *r == rows) {
                Some((_, v)) => v.push(n),
                None => classes.push((rows, vec![n])),
            }
        }
        for (ci, (rows, values)) in classes.into_iter().enumerate() {
            let names = |b: usize| format!("b{b}");
            let mut lw = Lowering { g, stored: &reads, names: &names, e: emit::Emitter::new(&all_args) };
            let kernel_name = format!("g{gi}_{}_{ci}", group.kind.name());
            let (kernel, bindings) =
                rows_kernel(&mut lw, &stored, &rows, &values, kernel_name).map_err(|e| format!("group {gi}: {e}"))?;
            drop(lw);
            out.add(kernel, bindings, entry);
        }
        scratch.release(&mut stored);
    }
    sizes.shrink_to_fit();
    let flat = BTreeSet::new();
    Ok(Schedule { kernels: out.kernels, buffers, steps: out.steps, sizes, scalars, params, inputs, outputs, flat })
}

/// Sums over the tokens into small outputs split over the token range in `parts`
/// (`split_reduce.rs`), so that every thread (CPU) or SM (GPU) has work.
pub fn split_reductions(s: &mut Schedule, parts: usize) {
    let combiners = split_reduce::split_reductions(&mut s.kernels, &mut s.steps, &mut s.buffers, parts);
    s.flat.extend(combiners);
}

/// Names of global buffers in kernel text.
fn buffer_name(b: usize) -> String {
    format!("b{b}")
}

/// Where the kernels of a group's special ops go: new workspaces into `buffers`,
/// kernels into `out`, all launched in `entry`.
struct Sink<'a> {
    g: &'a Graph,
    stored: &'a HashMap<NodeId, usize>,
    all_args: &'a [String],
    buffers: &'a mut Vec<BufferInfo>,
    out: &'a mut Program,
    entry: Entry,
}

impl Sink<'_> {
    /// A new workspace buffer for a value of type `ty`.
    fn workspace(&mut self, ty: &crate::ir::TensorType) -> Result<usize, String> {
        let bytes =
            crate::ir::dim::numel(&ty.shape).and_then(|d| d.checked_scale(ty.dtype.bytes())).ok_or("size overflow")?;
        self.buffers.push(BufferInfo { bytes, role: Role::Workspace, name: None });
        Ok(self.buffers.len() - 1)
    }

    /// Lower one kernel with a fresh emitter and add it to the program.
    fn kernel(&mut self, f: impl FnOnce(&mut Lowering) -> Result<(Kernel, Vec<usize>), String>) -> Result<(), String> {
        self.kernel_with_args(&[], f)
    }

    /// [`Sink::kernel`] with launch arguments: `(name, value)` pairs the kernel reads as
    /// sizes named `name` (see [`Step::args`]).
    fn kernel_with_args(
        &mut self,
        args: &[(&str, i64)],
        f: impl FnOnce(&mut Lowering) -> Result<(Kernel, Vec<usize>), String>,
    ) -> Result<(), String> {
        if let Some((clash, _)) = args.iter().find(|(n, _)| self.all_args.iter().any(|a| a == n)) {
            return Err(format!("the launch argument `{clash}` has the name of a size or scalar"));
        }
        let mut lw = self.lowering_with(args);
        let (k, b) = f(&mut lw)?;
        drop(lw);
        self.out.add_with_args(k, b, self.entry, args.iter().map(|a| a.1).collect());
        Ok(())
    }

    /// A lowering context for planning (no kernel is emitted), with the sizes, scalars
    /// and launch arguments `args` as run-time arguments.
    fn lowering_with(&self, args: &[(&str, i64)]) -> Lowering<'_> {
        let mut names = self.all_args.to_vec();
        names.extend(args.iter().map(|(n, _)| n.to_string()));
        Lowering { g: self.g, stored: self.stored, names: &buffer_name, e: emit::Emitter::new(&names) }
    }
}

/// A cross-entropy op's kernels: each token's logsumexp first, into a workspace vector,
/// once per (x, E, y) — the backward ops read the one the forward computed (a forward with
/// the same sizes always runs before a backward, and x, E, y are kept for the backward) —
/// then the op's own kernel. The accuracy op needs no logsumexp. With `library` (the
/// values in memory), the sweeps over the vocabulary are chunks of library GEMMs
/// (`cross_entropy_chunks.rs`).
fn cross_entropy_kernels<'a>(
    sink: &mut Sink<'a>,
    n: NodeId,
    lse_of: &mut HashMap<Vec<NodeId>, usize>,
    shared: &mut cross_entropy_chunks::Shared,
    name: &str,
    library: Option<&'a HashMap<NodeId, usize>>,
) -> Result<(), String> {
    let g = sink.g;
    let op = &g.node(n).op;
    let chunked = library.filter(|_| cross_entropy_chunks::applies(g, n));
    if let Some(reads) = chunked {
        sink.stored = reads;
    }
    let out = sink.stored[&n];
    if !cross_entropy::needs_lse(op) {
        return match chunked {
            Some(reads) => cross_entropy_chunks::kernels(sink, reads, n, None, shared, out, name),
            None => sink.kernel(|lw| cross_entropy::correct_kernel(lw, n, name.to_string())),
        };
    }
    let xey = g.operands(n)[..3].to_vec();
    let (lse, fill) = match lse_of.get(&xey) {
        Some(&lse) => (lse, false),
        None => {
            let x_ty = g.ty(xey[0]);
            let tokens = crate::ir::TensorType::new(crate::ir::DType::F32, x_ty.shape[..x_ty.rank() - 1].to_vec());
            let lse = sink.workspace(&tokens)?;
            lse_of.insert(xey, lse);
            (lse, true)
        }
    };
    if let Some(reads) = chunked {
        return cross_entropy_chunks::kernels(sink, reads, n, Some((lse, fill)), shared, out, name);
    }
    if fill {
        sink.kernel(|lw| cross_entropy::lse_kernel(lw, n, lse, format!("{name}_lse")))?;
    }
    sink.kernel(|lw| cross_entropy::op_kernel(lw, n, lse, name.to_string()))
}

/// Full-sequence block attention: q', k', v' stored into workspaces, then the stages of
/// `special::full_attention_stages`, the last one writing the op's value.
fn full_attention_kernels(sink: &mut Sink, n: NodeId, name: &str) -> Result<(), String> {
    let prologues = special::block_attention_prologues(&sink.lowering_with(&[]), n)?;
    let mut kept = Vec::new();
    for (pi, (source, ty)) in prologues.into_iter().enumerate() {
        let buffer = sink.workspace(&ty)?;
        sink.kernel(|lw| special::materialize(lw, source, &ty, buffer, format!("{name}_in{pi}")))?;
        kept.push((buffer, ty));
    }
    let types: Vec<_> = kept.iter().map(|(_, ty)| ty.clone()).collect();
    let stages = special::full_attention_stages(&sink.lowering_with(&[]), n, &types)?;
    let count = stages.len();
    let mut done: Vec<(usize, crate::ir::TensorType)> = Vec::new();
    for (si, st) in stages.into_iter().enumerate() {
        let ty = st.region.result_type().clone();
        let buffer = if si + 1 == count { sink.stored[&n] } else { sink.workspace(&ty)? };
        let stored_value = |(b, ty): &(usize, crate::ir::TensorType)| Source::Buffer { buffer: *b, ty: ty.clone() };
        let args: std::rc::Rc<[Source]> = st
            .args
            .iter()
            .map(|a| match *a {
                special::StageArg::Prologue(i) => stored_value(&kept[i]),
                special::StageArg::Stage(i) => stored_value(&done[i]),
                special::StageArg::Node(node) => Source::Node(node),
            })
            .collect();
        let region = std::rc::Rc::new(st.region);
        let source = Source::Region { value: region.result, region, args };
        sink.kernel(|lw| special::materialize(lw, source, &ty, buffer, format!("{name}_s{si}")))?;
        done.push((buffer, ty));
    }
    Ok(())
}

/// Kernels deduplicated by text (modulo name) and the steps that launch them.
struct Program {
    kernels: Vec<Kernel>,
    text: HashMap<String, usize>,
    steps: Vec<Step>,
}

impl Program {
    fn add(&mut self, kernel: Kernel, buffers: Vec<usize>, entry: Entry) {
        self.add_with_args(kernel, buffers, entry, Vec::new());
    }

    /// [`Program::add`] with launch arguments (see [`Step::args`]).
    fn add_with_args(&mut self, kernel: Kernel, buffers: Vec<usize>, entry: Entry, args: Vec<i64>) {
        // Identical modulo the kernel's name and its buffers' names (which name the global
        // buffers of one launch; the code only sees slots): the same layer, unrolled.
        let slots = kernel.buffers.iter().enumerate().map(|(i, b)| BufferDecl { name: format!("s{i}"), ..b.clone() });
        let body = print::to_text(&Kernel { name: String::new(), buffers: slots.collect(), ..kernel.clone() });
        let k = *self.text.entry(body).or_insert_with(|| {
            self.kernels.push(kernel);
            self.kernels.len() - 1
        });
        self.steps.push(Step { kernel: k, buffers, entry, args });
    }
}

/// A kernel computing `values` (all with the row space `rows`) element by element.
fn rows_kernel(
    lw: &mut Lowering,
    stored: &HashMap<NodeId, usize>,
    rows: &[Dim],
    values: &[NodeId],
    name: String,
) -> Result<(Kernel, Vec<usize>), String> {
    let g = lw.g;
    let row_idx = lw.unravel(Expr::Var(lw.e.index), rows)?;
    // One inner loop per distinct last-axis size.
    let mut inner: Vec<(Option<Dim>, Vec<NodeId>)> = Vec::new();
    for &n in values {
        let last = g.ty(n).shape.last().cloned().filter(|_| g.ty(n).rank() > 0);
        match inner.iter_mut().find(|(d, _)| *d == last) {
            Some((_, v)) => v.push(n),
            None => inner.push((last, vec![n])),
        }
    }
    for (last, nodes) in inner {
        let (var, extent) = match &last {
            Some(d) => {
                let extent = lw.e.dim(d)?;
                (Some(lw.e.open()), extent)
            }
            None => (None, Expr::I64(1)),
        };
        for n in nodes {
            let mut idx = row_idx.clone();
            if let Some(v) = var {
                idx.push(Expr::Var(v));
            }
            let value = lw.compute(Source::Node(n), &idx)?;
            let global = *stored.get(&n).ok_or("an output has no buffer")?;
            let ty = g.ty(n).clone();
            let b = lw.e.buffer(global, &format!("b{global}"), elem_of(ty.dtype), Access::Write);
            let lin = lw.linear(&idx, &ty.shape)?;
            lw.e.push(Stmt::Store { buffer: b, index: lin, value });
        }
        if let Some(v) = var {
            lw.e.close(v, extent, LoopKind::Vector);
        }
    }
    let mut extent = Expr::I64(1);
    for d in rows {
        extent = emit::mul(extent, lw.e.dim(d)?);
    }
    finish(lw, name, extent)
}

/// Package the emitter's statements as a kernel.
pub(crate) fn finish(lw: &mut Lowering, name: String, extent: Expr) -> Result<(Kernel, Vec<usize>), String> {
    let e = std::mem::replace(&mut lw.e, emit::Emitter::new(&[]));
    let sizes = e.sizes_list();
    let (body, buffers, bindings, index) = e.finish();
    let n_sym = sizes.iter().take_while(|s| *s != "seed").count();
    Ok((
        Kernel {
            name,
            buffers,
            sizes: sizes[..n_sym].to_vec(),
            scalars: sizes[n_sym..].to_vec(),
            index,
            extent,
            body,
            gemm: None,
            threads: None,
        },
        bindings,
    ))
}

/// The program as text: every launch in order, with its entry point and buffers, and each
/// kernel's loop nest the first time it is launched.
pub fn to_text(s: &Schedule) -> String {
    let mut out = String::new();
    let mut printed = HashSet::new();
    for (i, st) in s.steps.iter().enumerate() {
        let k = &s.kernels[st.kernel];
        let args = if st.args.is_empty() { String::new() } else { format!(" with launch arguments {:?}", st.args) };
        out.push_str(&format!("// launch {i}: {} ({:?}) on buffers {:?}{args}\n", k.name, st.entry, st.buffers));
        if printed.insert(st.kernel) {
            out.push_str(&print::to_text(k));
        }
    }
    out
}
