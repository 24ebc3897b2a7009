//! The plan's stable text form (`tnc ir --after fuse`).

use super::plan::FusionPlan;
use crate::ir::print::{numbering, op_attrs};
use crate::ir::{Graph, NodeId};
use std::fmt::Write;

/// Stable text form: one block per kernel with its ops in the IR's `%n` numbering.
pub fn to_text(g: &Graph, plan: &FusionPlan) -> String {
    let (_, num) = numbering(g);
    let names = |v: &[NodeId]| v.iter().map(|n| format!("%{}", num[n])).collect::<Vec<_>>().join(", ");
    let mut s = String::new();
    let _ = writeln!(s, "fusion {} {{", g.name);
    let _ = writeln!(s, "  // {} kernels, flops {}, bytes {}", plan.kernels(), plan.total_flops(), plan.total_bytes());
    for (k, grp) in plan.groups.iter().enumerate() {
        let _ = writeln!(
            s,
            "  kernel {k} {} reads({}) writes({}) flops {} bytes {}{}",
            grp.kind.name(),
            names(&grp.inputs),
            names(&grp.outputs),
            grp.flops,
            grp.bytes,
            if grp.workspace.as_const() == Some(0) { String::new() } else { format!(" workspace {}", grp.workspace) }
        );
        let mut all: Vec<(usize, NodeId, bool)> = grp
            .nodes
            .iter()
            .map(|&n| (num[&n], n, false))
            .chain(grp.recomputed.iter().map(|&n| (num[&n], n, true)))
            .collect();
        all.sort();
        for (i, n, re) in all {
            let node = g.node(n);
            let operands: Vec<String> = g.operands(n).iter().map(|o| format!("%{}", num[o])).collect();
            let args = if operands.is_empty() { String::new() } else { format!("({})", operands.join(", ")) };
            let _ = writeln!(
                s,
                "    {}%{i} = {}{}{} : {}",
                if re { "~" } else { "" },
                node.op.kind(),
                op_attrs(&node.op),
                args,
                node.ty
            );
        }
    }
    s.push_str("}\n");
    s
}
