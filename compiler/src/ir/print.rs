//! Stable text form of the graph IR, used by `tnc ir` and by snapshot tests, and the
//! Graphviz DOT form used by `tnc ir --dot`.
//!
//! Values are numbered `%0, %1, …` in a stable topological order, so the text does not
//! depend on petgraph's internal indices.

use super::dim::shape_to_string;
use super::graph::{Graph, Init, NodeId};
use super::op::{fmt_f64, Op};
use std::collections::HashMap;
use std::fmt::Write;

fn attrs(op: &Op, g: &Graph) -> String {
    match op {
        Op::Input { index } => format!(" {}", g.inputs[*index as usize].name),
        Op::Param { index } => format!(" {}", g.params[*index as usize].name),
        _ => op_attrs(op),
    }
}

/// The attributes of an op as printed after its name (`[axis=2]`, `[bnd,de->bne]`).
pub fn op_attrs(op: &Op) -> String {
    match op {
        Op::Input { index } => format!(" #{index}"),
        Op::Param { index } => format!(" #{index}"),
        Op::Constant { value, .. } => format!(" {}", fmt_f64(value.get())),
        Op::Iota { len, .. } => format!("[{len}]"),
        Op::SizeOf { size, .. } => format!("[{size}]"),
        Op::Cast { to } => format!("[{}]", to.name()),
        Op::Reduce { axes, .. } => format!("[{}]", join(axes)),
        Op::Einsum(spec) => format!("[{spec}]"),
        Op::Scan { axis, reverse } => {
            format!("[axis={axis}{}]", if *reverse { ", reverse" } else { "" })
        }
        Op::Reshape { shape } | Op::Broadcast { shape } => shape_to_string(shape),
        Op::Permute { perm } => format!("[{}]", join(perm)),
        Op::Slice { axis, start, end } => format!("[axis={axis}, {start}:{end}]"),
        Op::Pad { axis, before, after } => format!("[axis={axis}, {before}, {after}]"),
        Op::Concat { axis } => format!("[axis={axis}]"),
        Op::ScatterAdd { rows } => format!("[{rows}]"),
        Op::CrossEntropy(ce)
        | Op::CrossEntropyGradX(ce)
        | Op::CrossEntropyGradTable(ce)
        | Op::CrossEntropyCorrect(ce) => ce.attrs(),
        Op::Dropout { rate, salt } => format!("[rate={}, salt={salt:#x}]", fmt_f64(rate.get())),
        Op::BlockAttention(ba) => block_attrs(ba, None),
        Op::BlockAttentionGrad(bg) => block_attrs(&bg.forward, Some(&bg.weights_vjp)),
        Op::LinearAttention(la) => {
            let region = |name: &str, r: &super::region::Region| {
                if r.is_identity() {
                    String::new()
                } else {
                    format!(", {name}: {{ {} }}", r.to_text())
                }
            };
            let direction = match la.direction {
                super::normal_form::Direction::Causal => "causal",
                super::normal_form::Direction::Anticausal => "anticausal",
                super::normal_form::Direction::Full => "full",
            };
            format!(
                "[{direction}{}{}{}{}]",
                match la.decay {
                    super::normal_form::Decay::None => "",
                    super::normal_form::Decay::PerHead => ", decay",
                    super::normal_form::Decay::PerToken => ", gate",
                },
                region("q", &la.q),
                region("k", &la.k),
                region("v", &la.v)
            )
        }
        Op::Unary(_) | Op::Binary(_) | Op::Select | Op::Gather => String::new(),
    }
}

fn region_attr(name: &str, r: &super::region::Region) -> String {
    if r.is_identity() {
        String::new()
    } else {
        format!(", {name}: {{ {} }}", r.to_text())
    }
}

fn block_attrs(ba: &super::normal_form::BlockAttention, vjp: Option<&super::region::Region>) -> String {
    let mut s = format!("[weights: {{ {} }}", ba.weights.to_text());
    s.push_str(&region_attr("q", &ba.q));
    s.push_str(&region_attr("k", &ba.k));
    s.push_str(&region_attr("v", &ba.v));
    if let Some(r) = vjp {
        s.push_str(&format!(", weights_vjp: {{ {} }}", r.to_text()));
    }
    s.push(']');
    s
}

fn join(xs: &[usize]) -> String {
    xs.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(", ")
}

pub fn init_to_string(init: &Init) -> String {
    match init {
        Init::Zeros => "zeros".into(),
        Init::Ones => "ones".into(),
        Init::Constant(c) => fmt_f64(*c),
        Init::Normal { mean, std } => {
            format!("normal(mean={}, std={})", fmt_f64(*mean), fmt_f64(*std))
        }
        Init::Uniform { lo, hi } => format!("uniform({}, {})", fmt_f64(*lo), fmt_f64(*hi)),
        Init::Xavier { gain } => format!("xavier(gain={})", fmt_f64(*gain)),
        Init::Computed(g) => format!("computed({} ops)", g.len()),
    }
}

/// Value names in stable order.
pub fn numbering(g: &Graph) -> (Vec<NodeId>, HashMap<NodeId, usize>) {
    let order = g.topo_order();
    let index = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    (order, index)
}

pub fn to_text(g: &Graph) -> String {
    let (order, num) = numbering(g);
    let mut s = String::new();
    let _ = writeln!(s, "graph {} {{", g.name);
    for p in &g.params {
        let kind = if p.trainable { "param" } else { "buffer" };
        let _ = write!(s, "  {kind} {}: {} ~ {}", p.name, p.ty, init_to_string(&p.init));
        if let Some(seed) = p.seed {
            let _ = write!(s, " seed={seed}");
        }
        for a in &p.attrs {
            let _ = write!(s, " @{a}");
        }
        s.push('\n');
    }
    for n in &order {
        let node = g.node(*n);
        let operands: Vec<String> = g.operands(*n).iter().map(|o| format!("%{}", num[o])).collect();
        let args = if operands.is_empty() { String::new() } else { format!("({})", operands.join(", ")) };
        let _ = writeln!(s, "  %{} = {}{}{} : {}", num[n], node.op.kind(), attrs(&node.op, g), args, node.ty);
    }
    for (name, n) in &g.outputs {
        let _ = writeln!(s, "  output {name} = %{}", num[n]);
    }
    s.push_str("}\n");
    s
}

pub fn to_dot(g: &Graph) -> String {
    let (order, num) = numbering(g);
    let mut s = String::new();
    let _ = writeln!(s, "digraph \"{}\" {{\n  node [shape=box, fontname=monospace];", g.name);
    for n in &order {
        let node = g.node(*n);
        let label =
            format!("%{} = {}{}\\n{}", num[n], node.op.kind(), attrs(&node.op, g), node.ty).replace('"', "\\\"");
        let _ = writeln!(s, "  n{} [label=\"{label}\"];", num[n]);
        for (pos, o) in g.operands(*n).iter().enumerate() {
            let _ = writeln!(s, "  n{} -> n{} [label=\"{pos}\"];", num[o], num[n]);
        }
    }
    for (name, n) in &g.outputs {
        let _ = writeln!(s, "  out_{name} [shape=ellipse, label=\"{name}\"];\n  n{} -> out_{name};", num[n]);
    }
    s.push_str("}\n");
    s
}

/// Number of nodes of each op kind, sorted by kind.
pub fn op_counts(g: &Graph) -> Vec<(&'static str, usize)> {
    let mut counts: std::collections::BTreeMap<&'static str, usize> = Default::default();
    for n in g.dag.node_indices() {
        *counts.entry(g.node(n).op.kind()).or_default() += 1;
    }
    counts.into_iter().collect()
}

pub fn op_count_table(g: &Graph) -> String {
    let mut s = String::new();
    for (k, c) in op_counts(g) {
        let _ = writeln!(s, "{k:<12} {c:>7}");
    }
    let _ = writeln!(s, "{:<12} {:>7}", "total", g.len());
    s
}

/// `n` with commas between groups of three digits (`2,048`), for counts in messages.
pub fn thousands(n: u128) -> String {
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
