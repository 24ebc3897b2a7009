//! The fusion plan: kernel groups, what each reads and writes, and their estimated cost.

use crate::ir::dim::numel;
use crate::ir::{DType, Dim, Graph, NodeId};
use std::collections::HashMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GroupKind {
    /// Elementwise and shape ops only.
    Elementwise,
    /// Reductions over the last axis with the elementwise ops before and after them.
    Row,
    /// A reduction over other axes (e.g. a bias gradient over batch and tokens).
    Reduce,
    /// An einsum that sums over at least one letter (a matmul), with prologue/epilogue.
    Contraction,
    LinearAttention,
    Scan,
    Gather,
    /// Any other op with its own kernel (normal-form ops such as block attention or fused
    /// cross-entropy), named by `Op::kind()`.
    Op(&'static str),
}

impl GroupKind {
    pub fn name(self) -> &'static str {
        match self {
            GroupKind::Elementwise => "elementwise",
            GroupKind::Row => "row",
            GroupKind::Reduce => "reduce",
            GroupKind::Contraction => "contraction",
            GroupKind::LinearAttention => "linear_attention",
            GroupKind::Scan => "scan",
            GroupKind::Gather => "gather",
            GroupKind::Op(name) => name,
        }
    }
}

/// One kernel.
#[derive(Clone, Debug)]
pub struct Group {
    pub kind: GroupKind,
    /// The ops this group owns, in topological order. Every non-leaf node of the graph is
    /// owned by exactly one group.
    pub nodes: Vec<NodeId>,
    /// Cheap ops (views, index-only values) owned by another group and recomputed here.
    pub recomputed: Vec<NodeId>,
    /// Values read from memory (produced by another group, or parameters and inputs).
    pub inputs: Vec<NodeId>,
    /// Values written to memory (read by another group, or graph outputs).
    pub outputs: Vec<NodeId>,
    /// Estimated floating-point operations.
    pub flops: Dim,
    /// Estimated bytes read and written.
    pub bytes: Dim,
    /// Scratch memory the kernel needs while it runs, in bytes.
    pub workspace: Dim,
    /// `op.kind()` of each owned node, parallel to `nodes`.
    pub ops: Vec<&'static str>,
}

impl Group {
    pub fn contains(&self, n: NodeId) -> bool {
        self.nodes.contains(&n)
    }

    /// Owned ops of the given kind name (`"einsum"`, `"reduce_sum"`, …).
    pub fn count_ops(&self, kind_name: &str) -> usize {
        self.ops.iter().filter(|k| **k == kind_name).count()
    }
}

/// Kernel groups in a valid execution order (every group after the groups it reads from).
#[derive(Clone, Debug, Default)]
pub struct FusionPlan {
    pub groups: Vec<Group>,
    pub(super) owner: HashMap<NodeId, usize>,
}

impl FusionPlan {
    /// The index of the group that owns `node` (`None` for parameters and inputs).
    pub fn group_of(&self, node: NodeId) -> Option<usize> {
        self.owner.get(&node).copied()
    }

    pub fn group(&self, index: usize) -> &Group {
        &self.groups[index]
    }

    pub fn groups_with(&self, kind: GroupKind) -> Vec<&Group> {
        self.groups.iter().filter(|g| g.kind == kind).collect()
    }

    /// Owned ops of a kind over all groups (equals the graph's count of that kind).
    pub fn count_ops(&self, kind_name: &str) -> usize {
        self.groups.iter().map(|g| g.count_ops(kind_name)).sum()
    }

    /// Number of kernel launches.
    pub fn kernels(&self) -> usize {
        self.groups.len()
    }

    pub fn total_flops(&self) -> Dim {
        sum(self.groups.iter().map(|g| &g.flops))
    }

    pub fn total_bytes(&self) -> Dim {
        sum(self.groups.iter().map(|g| &g.bytes))
    }
}

fn sum<'a>(ds: impl Iterator<Item = &'a Dim>) -> Dim {
    ds.fold(Dim::constant(0), |a, d| a.checked_add(d).unwrap_or(a))
}

pub fn dtype_bytes(d: DType) -> i64 {
    d.bytes()
}

/// Size in bytes of a node's value.
pub fn value_bytes(g: &Graph, n: NodeId) -> Option<Dim> {
    let t = g.ty(n);
    numel(&t.shape)?.checked_scale(dtype_bytes(t.dtype))
}
