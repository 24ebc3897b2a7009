//! `plan_memory`: liveness-based buffer assignment over a [`FusionPlan`].
//!
//! Execution order is the plan's group order (a topological order of the kernels).
//! Values internal to a group need no buffer; every value a group writes gets one. Sizes
//! are polynomials in `B` and `N` (`numel × dtype bytes`: f32/i32 4, bool 1).
//!
//! * **Lifetimes.** A value lives from the step of the group that writes it to the last
//!   step of a group that reads it. Graph outputs live to the end of the step. A kernel
//!   never writes into a buffer it reads (a buffer freed by the last reader at step `k`
//!   is reusable from step `k + 1`).
//! * **Classes.** Parameters and buffers (one buffer each, live throughout), gradients (the
//!   outputs named `grad.*`, one dedicated buffer each: they live to the end anyway),
//!   activations (inputs, which the caller provides and are never reused, and every other
//!   value a kernel writes), and workspace (a kernel's scratch, live only during it).
//! * **Reuse rule.** An activation (workspace) takes a free activation (workspace) buffer
//!   whose size polynomial is the same as the one it needs; failing that, one whose size
//!   is ≥ the need for all `B, N ≥ 1` by [`Dim::dominates`] (the smallest such at the
//!   reference point `B = 1, N = 2048`); failing that, a new buffer. A buffer keeps the
//!   size it was created with.
//!
//! The planned footprint of each class is the sum of its buffers' sizes, a polynomial in
//! `B` and `N`; the peak is their sum. Because buffers are allocated once for every
//! `(B, N)`, this is what a bundle allocates. [`MemoryPlan::live_peak`] is the smallest
//! footprint any assignment could reach at one `(B, N)` (the most bytes live at once), a
//! lower bound that shows how much the reuse rule leaves on the table.

use crate::fusion::{value_bytes, FusionPlan};
use crate::ir::{Dim, Graph, NodeId, Op};
use std::collections::HashMap;
use std::fmt::Write;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MemClass {
    Activation,
    Parameter,
    Gradient,
    Workspace,
}

impl MemClass {
    pub fn name(self) -> &'static str {
        match self {
            MemClass::Activation => "activations",
            MemClass::Parameter => "parameters",
            MemClass::Gradient => "gradients",
            MemClass::Workspace => "workspace",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Buffer {
    pub bytes: Dim,
    pub class: MemClass,
}

/// One materialized value (or a kernel's workspace, `node` = the group's first node).
#[derive(Clone, Debug)]
pub struct Value {
    pub node: NodeId,
    pub bytes: Dim,
    pub class: MemClass,
    /// First and last step (group index) it is live.
    pub first: usize,
    pub last: usize,
    pub buffer: usize,
}

#[derive(Clone, Debug)]
pub struct MemoryPlan {
    pub buffers: Vec<Buffer>,
    pub values: Vec<Value>,
    pub steps: usize,
    buffer_of: HashMap<NodeId, usize>,
}

/// Planned bytes per class as polynomials in `B` and `N`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryReport {
    pub activations: Dim,
    pub parameters: Dim,
    pub gradients: Dim,
    pub workspace: Dim,
}

/// A [`MemoryReport`] evaluated at one `(B, N)`.
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryNumbers {
    pub batch: i64,
    pub seq: i64,
    pub activations: i64,
    pub parameters: i64,
    pub gradients: i64,
    pub workspace: i64,
    pub peak: i64,
    /// Activation bytes / (B·N).
    pub activation_bytes_per_token: f64,
}

const REFERENCE: (i64, i64) = (1, 2048);

/// Evaluate a size at `B = batch`, `N = seq` (other symbols are unknown: `None`).
pub fn eval(d: &Dim, batch: i64, seq: i64) -> Option<i64> {
    d.eval(&|s| match s {
        "B" => Some(batch),
        "N" => Some(seq),
        _ => None,
    })
}

/// Assign buffers to the values the plan's kernels write, reusing them across
/// non-overlapping lifetimes (see the module documentation for the rules).
pub fn plan_memory(g: &Graph, plan: &FusionPlan) -> Result<MemoryPlan, String> {
    let steps = plan.groups.len();
    let end = steps.saturating_sub(1);
    let overflow = || "size overflow in the memory plan".to_string();
    let grad_outputs: HashMap<NodeId, bool> =
        g.outputs.iter().map(|(name, n)| (*n, name.starts_with("grad."))).collect();
    // Last reader of each value.
    let mut last_read: HashMap<NodeId, usize> = HashMap::new();
    for (k, grp) in plan.groups.iter().enumerate() {
        for &i in &grp.inputs {
            let e = last_read.entry(i).or_insert(k);
            *e = (*e).max(k);
        }
    }
    let mut values: Vec<Value> = Vec::new();
    let mut buffers: Vec<Buffer> = Vec::new();
    let mut buffer_of = HashMap::new();
    // Parameters and inputs: live throughout, never shared.
    for n in g.topo_order() {
        let class = match g.node(n).op {
            Op::Param { .. } => MemClass::Parameter,
            Op::Input { .. } => MemClass::Activation,
            _ => continue,
        };
        let bytes = value_bytes(g, n).ok_or_else(overflow)?;
        buffers.push(Buffer { bytes: bytes.clone(), class });
        buffer_of.insert(n, buffers.len() - 1);
        values.push(Value { node: n, bytes, class, first: 0, last: end, buffer: buffers.len() - 1 });
    }
    let mut free: Vec<usize> = Vec::new();
    let mut release: Vec<Vec<usize>> = vec![Vec::new(); steps + 1];
    let reference = |d: &Dim| eval(d, REFERENCE.0, REFERENCE.1).unwrap_or(i64::MAX);
    let take = |free: &mut Vec<usize>, buffers: &mut Vec<Buffer>, bytes: &Dim, class: MemClass| -> usize {
        let exact = free.iter().position(|&b| buffers[b].class == class && buffers[b].bytes == *bytes);
        let pick = exact.or_else(|| {
            free.iter()
                .enumerate()
                .filter(|(_, &b)| buffers[b].class == class && buffers[b].bytes.dominates(bytes))
                .min_by_key(|(_, &b)| (reference(&buffers[b].bytes), b))
                .map(|(i, _)| i)
        });
        match pick {
            Some(i) => free.remove(i),
            None => {
                buffers.push(Buffer { bytes: bytes.clone(), class });
                buffers.len() - 1
            }
        }
    };
    for (k, grp) in plan.groups.iter().enumerate() {
        free.extend(std::mem::take(&mut release[k]));
        free.sort();
        for &o in &grp.outputs {
            let bytes = value_bytes(g, o).ok_or_else(overflow)?;
            let (class, last) = match grad_outputs.get(&o) {
                Some(true) => (MemClass::Gradient, end),
                Some(false) => (MemClass::Activation, end),
                None => (MemClass::Activation, last_read.get(&o).copied().unwrap_or(k)),
            };
            let b = if class == MemClass::Gradient {
                buffers.push(Buffer { bytes: bytes.clone(), class });
                buffers.len() - 1
            } else {
                take(&mut free, &mut buffers, &bytes, class)
            };
            if !grad_outputs.contains_key(&o) {
                release[last + 1].push(b);
            }
            buffer_of.insert(o, b);
            values.push(Value { node: o, bytes, class, first: k, last, buffer: b });
        }
        if grp.workspace.as_const() != Some(0) {
            let b = take(&mut free, &mut buffers, &grp.workspace, MemClass::Workspace);
            release[k + 1].push(b);
            values.push(Value {
                node: grp.nodes[0],
                bytes: grp.workspace.clone(),
                class: MemClass::Workspace,
                first: k,
                last: k,
                buffer: b,
            });
        }
    }
    Ok(MemoryPlan { buffers, values, steps, buffer_of })
}

impl MemoryPlan {
    /// The buffer holding a materialized value (`None` for values internal to a kernel).
    pub fn buffer_of(&self, node: NodeId) -> Option<usize> {
        self.buffer_of.get(&node).copied()
    }

    /// Planned bytes of one class: the sum of its buffers' sizes.
    pub fn total(&self, class: MemClass) -> Dim {
        self.buffers
            .iter()
            .filter(|b| b.class == class)
            .fold(Dim::constant(0), |a, b| a.checked_add(&b.bytes).unwrap_or(a))
    }

    pub fn report(&self) -> MemoryReport {
        MemoryReport {
            activations: self.total(MemClass::Activation),
            parameters: self.total(MemClass::Parameter),
            gradients: self.total(MemClass::Gradient),
            workspace: self.total(MemClass::Workspace),
        }
    }

    /// The most bytes live at one step at `(B, N)`: a lower bound of any assignment's peak.
    pub fn live_peak(&self, batch: i64, seq: i64) -> Option<i64> {
        let mut delta = vec![0i64; self.steps + 2];
        for v in &self.values {
            let b = eval(&v.bytes, batch, seq)?;
            delta[v.first] += b;
            delta[v.last + 1] -= b;
        }
        let (mut live, mut peak) = (0i64, 0i64);
        for d in delta {
            live += d;
            peak = peak.max(live);
        }
        Some(peak)
    }
}

impl MemoryReport {
    pub fn peak(&self) -> Dim {
        [&self.parameters, &self.gradients, &self.workspace]
            .into_iter()
            .fold(self.activations.clone(), |a, d| a.checked_add(d).unwrap_or(a))
    }

    /// Evaluate at `B = batch`, `N = seq`; `None` on overflow.
    pub fn eval(&self, batch: i64, seq: i64) -> Option<MemoryNumbers> {
        let activations = eval(&self.activations, batch, seq)?;
        let parameters = eval(&self.parameters, batch, seq)?;
        let gradients = eval(&self.gradients, batch, seq)?;
        let workspace = eval(&self.workspace, batch, seq)?;
        Some(MemoryNumbers {
            batch,
            seq,
            activations,
            parameters,
            gradients,
            workspace,
            peak: eval(&self.peak(), batch, seq)?,
            activation_bytes_per_token: activations as f64 / (batch as f64 * seq as f64),
        })
    }

    /// How the peak grows with the sequence length, in words.
    pub fn growth_in_n(&self) -> String {
        match self.peak().degree_in("N") {
            0 => "does not grow with N".into(),
            1 => "grows linearly with N".into(),
            2 => "grows quadratically with N".into(),
            k => format!("grows as N^{k}"),
        }
    }

    /// The `peak …` line, the split with formulas, bytes per token and growth.
    pub fn to_text(&self, batch: i64, seq: i64) -> String {
        let mut s = String::new();
        let Some(v) = self.eval(batch, seq) else {
            return format!("peak: overflow at B = {batch}, N = {seq}\n");
        };
        let _ = writeln!(
            s,
            "peak {} bytes ({:.1} MiB) at B = {batch}, N = {seq}: activations {} + parameters {} + gradients {} + workspace {}",
            v.peak,
            mib(v.peak),
            v.activations,
            v.parameters,
            v.gradients,
            v.workspace
        );
        for (name, d, x) in [
            ("activations", &self.activations, v.activations),
            ("parameters", &self.parameters, v.parameters),
            ("gradients", &self.gradients, v.gradients),
            ("workspace", &self.workspace, v.workspace),
            ("peak", &self.peak(), v.peak),
        ] {
            let _ = writeln!(s, "  {name:<12} {x:>16} bytes ({:>10.1} MiB) = {d}", mib(x));
        }
        let _ = writeln!(s, "activation bytes per token: {:.1}", v.activation_bytes_per_token);
        let _ = writeln!(s, "activation memory {}", self.growth_in_n());
        s
    }
}

pub fn mib(bytes: i64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

#[cfg(test)]
mod tests;
