//! `tnc check`: elaborate and summarize.

use crate::{elaborate, Failure, ModelArgs};
use std::collections::BTreeMap;
use std::fmt::Write;
use tnc_compiler::ir::print::op_counts;
use tnc_compiler::ir::Graph;

pub fn run(args: &ModelArgs) -> Result<(), Failure> {
    let (g, _) = elaborate(args)?;
    print!("{}", summary(&g, &args.file.display().to_string()));
    Ok(())
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

fn thousands(n: u128) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub fn summary(g: &Graph, file: &str) -> String {
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
    // Training keeps each parameter, its gradient and AdamW's two moments in f32.
    let params = total + buffers;
    let state = total * 16 + buffers * 4;
    let human = tnc_runtime::host_memory::human;
    let _ = writeln!(
        s,
        "memory: {} of parameters; training state {} (f32 parameters, gradients and AdamW moments), plus activations (`tnc compile --report` at given sizes)",
        human(params * 4),
        human(state)
    );
    if let Some(avail) = tnc_runtime::host_memory::available_bytes().filter(|&a| u128::from(a) < state) {
        let _ = writeln!(
            s,
            "warning: training this model needs more than the {} this machine has available",
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
