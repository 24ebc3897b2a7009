//! `tnc check`: elaborate and summarize, with the memory a training step needs at the
//! requested `B` and `N` (from the memory plan: nothing is compiled or allocated).

use crate::{elaborate, Failure, ModelArgs};
use std::collections::BTreeMap;
use std::fmt::Write;
use tnc_compiler::fusion::fuse;
use tnc_compiler::ir::print::{op_counts, thousands};
use tnc_compiler::ir::Graph;
use tnc_compiler::memory::{plan_memory, MemoryNumbers};
use tnc_compiler::passes;
use tnc_grammar::Diagnostic;

#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Batch size B at which the activation memory is estimated.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i64).range(1..))]
    pub batch: i64,
    /// Sequence length N at which the activation memory is estimated.
    #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(i64).range(1..))]
    pub seq: i64,
    /// The element type of products' operands (bf16 halves most activations).
    #[arg(long, value_enum, default_value_t)]
    pub precision: crate::PrecisionArg,
}

pub fn run(args: &CheckArgs) -> Result<(), Failure> {
    let (g, sources) = elaborate(&args.model)?;
    crate::warn_unfused(&g, &sources, args.batch, args.seq);
    let last = passes::names().last().copied().unwrap_or("elaborate");
    let trained = passes::run_until_with(g.clone(), last, args.precision.policy())
        .expect("the last pass exists")
        .map_err(|d| Failure { diagnostic: d, sources, status: 1 })?;
    let internal = |e: String| Failure::usage(Diagnostic::error(format!("internal error: {e}")));
    let plan = fuse(&trained).map_err(internal)?;
    let step = plan_memory(&trained, &plan).map_err(internal)?.report().eval(args.batch, args.seq);
    let step = Step { batch: args.batch, seq: args.seq, numbers: step };
    print!("{}", summary(&g, &args.model.file.display().to_string(), &step));
    Ok(())
}

/// The memory plan of one training step (forward and backward) at `B`, `N`; `None` when
/// the sizes overflow.
pub struct Step {
    pub batch: i64,
    pub seq: i64,
    pub numbers: Option<MemoryNumbers>,
}

/// Parameters are grouped by top-level block: the first segment of the name, with the
/// layer index kept for loops (`layers.3`).
fn block_of(name: &str) -> String {
    let mut parts = name.split('.');
    let first = parts.next().unwrap_or("");
    match parts.next() {
        Some(second) if second.chars().all(|c| c.is_ascii_digit()) => format!("{first}.{second}"),
        _ => first.to_string(),
    }
}

fn numel(t: &tnc_compiler::ir::TensorType) -> u128 {
    t.shape.iter().map(|d| d.as_const().unwrap_or(0).max(0) as u128).product()
}

/// Bytes of a training run's state, whatever its B and N: training keeps each
/// trainable parameter, its gradient, the gradient sum of accumulation and AdamW's two
/// moments in f32 (20 bytes), and each buffer element in f32.
pub(crate) fn training_state_bytes(g: &Graph) -> u128 {
    let buffers: u128 = g.params.iter().filter(|p| !p.trainable).map(|p| numel(&p.ty)).sum();
    g.trainable_parameter_count() * 20 + buffers * 4
}

pub fn summary(g: &Graph, file: &str, step: &Step) -> String {
    let mut s = String::new();
    let total = g.trainable_parameter_count();
    let buffers: u128 = g.params.iter().filter(|p| !p.trainable).map(|p| numel(&p.ty)).sum();
    let _ = writeln!(s, "model {} ({file})", g.name);
    let _ = writeln!(
        s,
        "parameters: {} trainable ({:.2}M), {} buffer elements",
        thousands(total),
        total as f64 / 1e6,
        thousands(buffers)
    );
    let params = total + buffers;
    let state = training_state_bytes(g);
    let human = tnc_runtime::host_memory::human;
    let _ = writeln!(
        s,
        "memory: {} of parameters; training state {} (f32 parameters, gradients, gradient sums and AdamW moments)",
        human(params * 4),
        human(state)
    );
    let (b, n) = (step.batch, step.seq);
    // The plan counts parameters and gradients; the runtime adds the sums and moments.
    let need = step.numbers.as_ref().map(|v| {
        let bytes = |x: i64| u128::try_from(x).unwrap_or(0);
        (bytes(v.activations) + bytes(v.workspace), bytes(v.peak) + total * 12)
    });
    match need {
        Some((activations, need)) => {
            let _ = writeln!(
                s,
                "training step at B = {b}, N = {n} (--batch, --seq): {} of activations, {} in all",
                human(activations),
                human(need)
            );
        }
        None => {
            let _ = writeln!(s, "training step at B = {b}, N = {n}: the sizes overflow 64 bits");
        }
    }
    let need = need.map_or(u128::MAX, |(_, all)| all);
    if let Some(avail) = tnc_runtime::host_memory::available_bytes().filter(|&a| u128::from(a) < need) {
        let _ = writeln!(
            s,
            "warning: training this model at B = {b}, N = {n} needs more than the {} this machine has available",
            human(avail.into())
        );
    }
    let mut blocks: BTreeMap<String, (usize, u128)> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for p in g.params.iter().filter(|p| p.trainable) {
        let b = block_of(&p.name);
        if !blocks.contains_key(&b) {
            order.push(b.clone());
        }
        let e = blocks.entry(b).or_default();
        e.0 += 1;
        e.1 += numel(&p.ty);
    }
    let width = order.iter().map(|b| b.len()).max().unwrap_or(0);
    for b in &order {
        let (count, n) = blocks[b];
        let _ = writeln!(s, "  {b:<width$}  {:>13}  ({count} tensors)", thousands(n));
    }
    let _ = writeln!(s, "inputs:");
    for i in &g.inputs {
        let _ = writeln!(s, "  {}: {}", i.name, i.ty);
    }
    let _ = writeln!(s, "outputs:");
    for (name, n) in &g.outputs {
        let _ = writeln!(s, "  {name}: {}", g.ty(*n));
    }
    let _ = writeln!(s, "ops: {} in all", thousands(g.len() as u128));
    for (kind, count) in op_counts(g) {
        let _ = writeln!(s, "  {kind:<12} {count:>7}");
    }
    s
}
