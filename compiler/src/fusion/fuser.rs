//! The greedy fuser: the policy of the module documentation (`fusion/mod.rs`), applied
//! from the outputs back, every merge kept acyclic.

use super::cost::op_cost;
use super::plan::{value_bytes, FusionPlan, Group, GroupKind};
use crate::ir::dim::numel;
use crate::ir::print::numbering;
use crate::ir::{Dim, Graph, NodeId, Op};
use std::collections::{BTreeSet, BinaryHeap, HashMap};

/// Group the graph's ops into kernels under the policy in the module documentation.
pub fn fuse(g: &Graph) -> Result<FusionPlan, String> {
    Ok(forward_first(g, Fuser::new(g).run(true)?))
}

/// One kernel per op (views and index-only values are still recomputed by their users):
/// the baseline the fused plan is compared with.
pub fn unfused(g: &Graph) -> Result<FusionPlan, String> {
    Ok(forward_first(g, Fuser::new(g).run(false)?))
}

/// Order the groups so that every group writing a value the forward outputs need (the
/// `forward` entry point) comes before every other group (`backward`). The runtime runs
/// the two entry points one after the other, so the memory plan must see this order.
/// It is still a valid execution order: a forward group only reads forward values.
fn forward_first(g: &Graph, mut plan: FusionPlan) -> FusionPlan {
    let mut forward = std::collections::HashSet::new();
    let mut stack: Vec<NodeId> = g.outputs.iter().filter(|(n, _)| !n.starts_with("grad.")).map(|(_, id)| *id).collect();
    while let Some(n) = stack.pop() {
        if forward.insert(n) {
            stack.extend(g.operands(n));
        }
    }
    let (fwd, bwd): (Vec<Group>, Vec<Group>) =
        plan.groups.into_iter().partition(|gr| gr.outputs.iter().any(|n| forward.contains(n)));
    plan.groups = fwd.into_iter().chain(bwd).collect();
    plan.owner.clear();
    for (i, gr) in plan.groups.iter().enumerate() {
        for &n in &gr.nodes {
            plan.owner.insert(n, i);
        }
    }
    plan
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    Leaf,
    /// Recomputed where used: views and index-only values.
    Dup,
    Elementwise,
    RowReduce,
    Reduce,
    Anchor(GroupKind),
}

pub(super) fn is_view(op: &Op) -> bool {
    matches!(
        op,
        Op::Reshape { .. }
            | Op::Broadcast { .. }
            | Op::Permute { .. }
            | Op::Slice { .. }
            | Op::Pad { .. }
            | Op::Concat { .. }
    )
}

pub(super) fn is_outer_product(op: &Op) -> bool {
    match op {
        Op::Einsum(s) => s.inputs.iter().flatten().all(|l| s.output.contains(l)),
        _ => false,
    }
}

pub(super) fn is_elementwise(op: &Op) -> bool {
    is_view(op)
        || is_outer_product(op)
        || matches!(
            op,
            Op::Unary(_)
                | Op::Binary(_)
                | Op::Select
                | Op::Cast { .. }
                | Op::Constant { .. }
                | Op::Iota { .. }
                | Op::SizeOf { .. }
                | Op::Dropout { .. }
        )
}

/// Owned nodes, recomputed nodes, union-find root (`usize::MAX`: a lone Dup node).
type GroupSets = (Vec<usize>, Vec<usize>, usize);

/// Per-group state while merging (indexed by the union-find root).
#[derive(Clone, Debug, Default)]
struct Acc {
    members: Vec<usize>,
    anchor: Option<usize>,
    /// Row count of a row group.
    row: Option<Dim>,
    reduce: Option<usize>,
    max_pos: usize,
}

struct Fuser<'a> {
    g: &'a Graph,
    /// Nodes in stable topological order; internal ids are positions in this order.
    order: Vec<NodeId>,
    pos: HashMap<NodeId, usize>,
    operands: Vec<Vec<usize>>,
    class: Vec<Class>,
    numel: Vec<Dim>,
    /// Element count of all but the last axis.
    prefix: Vec<Dim>,
    /// Effective operands/users: through `Dup` nodes, leaves excluded.
    eff_ops: Vec<Vec<usize>>,
    eff_users: Vec<Vec<usize>>,
    /// The value must be written: a graph output, or read by one through views.
    pinned: Vec<bool>,
    parent: Vec<usize>,
    acc: Vec<Acc>,
    stamp: Vec<u32>,
    generation: u32,
}

impl<'a> Fuser<'a> {
    fn new(g: &'a Graph) -> Fuser<'a> {
        let (order, pos) = numbering(g);
        let n = order.len();
        let operands: Vec<Vec<usize>> =
            order.iter().map(|&id| g.operands(id).iter().map(|o| pos[o]).collect()).collect();
        let mut class = Vec::with_capacity(n);
        let mut index_only = vec![false; n];
        for (i, &id) in order.iter().enumerate() {
            let op = &g.node(id).op;
            index_only[i] = match op {
                Op::Constant { .. } | Op::Iota { .. } | Op::SizeOf { .. } => true,
                Op::Dropout { .. } => false,
                _ => is_elementwise(op) && operands[i].iter().all(|&o| index_only[o]),
            };
            class.push(match op {
                Op::Input { .. } | Op::Param { .. } => Class::Leaf,
                _ if index_only[i] || is_view(op) => Class::Dup,
                _ if is_elementwise(op) => Class::Elementwise,
                Op::Reduce { axes, .. } => {
                    let rank = g.ty(g.operands(id)[0]).rank();
                    if rank >= 1 && axes.as_slice() == [rank - 1] {
                        Class::RowReduce
                    } else {
                        Class::Reduce
                    }
                }
                Op::Scan { .. } => Class::Anchor(GroupKind::Scan),
                Op::Gather => Class::Anchor(GroupKind::Gather),
                Op::LinearAttention(_) => Class::Anchor(GroupKind::LinearAttention),
                Op::Einsum(_) => Class::Anchor(GroupKind::Contraction),
                op => Class::Anchor(GroupKind::Op(op.kind())),
            });
        }
        let one = Dim::constant(1);
        let numel_of = |s: &[Dim]| numel(s).unwrap_or_else(|| Dim::constant(i64::MAX));
        let numels: Vec<Dim> = order.iter().map(|&id| numel_of(&g.ty(id).shape)).collect();
        let prefix: Vec<Dim> = order
            .iter()
            .map(|&id| {
                let s = &g.ty(id).shape;
                if s.is_empty() {
                    one.clone()
                } else {
                    numel_of(&s[..s.len() - 1])
                }
            })
            .collect();
        // Effective operands: look through Dup nodes.
        let mut eff_ops: Vec<Vec<usize>> = vec![Vec::new(); n];
        let mut dup_sources: Vec<Vec<usize>> = vec![Vec::new(); n];
        for i in 0..n {
            let mut out = BTreeSet::new();
            for &o in &operands[i] {
                match class[o] {
                    Class::Leaf => {}
                    Class::Dup => out.extend(dup_sources[o].iter().copied()),
                    _ => {
                        out.insert(o);
                    }
                }
            }
            if class[i] == Class::Dup {
                dup_sources[i] = out.into_iter().collect();
            } else {
                eff_ops[i] = out.into_iter().collect();
            }
        }
        let mut eff_users: Vec<Vec<usize>> = vec![Vec::new(); n];
        for (i, ops) in eff_ops.iter().enumerate() {
            for &o in ops {
                eff_users[o].push(i);
            }
        }
        let mut pinned = vec![false; n];
        for (_, id) in &g.outputs {
            let i = pos[id];
            pinned[i] = true;
            for &s in &dup_sources[i] {
                pinned[s] = true;
            }
        }
        let acc = (0..n)
            .map(|i| Acc {
                members: vec![i],
                anchor: matches!(class[i], Class::Anchor(_)).then_some(i),
                row: (class[i] == Class::RowReduce).then(|| numels[i].clone()),
                reduce: (class[i] == Class::Reduce).then_some(i),
                max_pos: i,
            })
            .collect();
        Fuser {
            g,
            order,
            pos,
            operands,
            class,
            numel: numels,
            prefix,
            eff_ops,
            eff_users,
            pinned,
            parent: (0..n).collect(),
            acc,
            stamp: vec![0; n],
            generation: 0,
        }
    }

    fn grouped(&self, i: usize) -> bool {
        !matches!(self.class[i], Class::Leaf | Class::Dup)
    }

    fn find(&mut self, mut i: usize) -> usize {
        let mut root = i;
        while self.parent[root] != root {
            root = self.parent[root];
        }
        while self.parent[i] != root {
            let next = self.parent[i];
            self.parent[i] = root;
            i = next;
        }
        root
    }

    /// Whether the group `producer` may merge with the group `consumer` (kinds and
    /// domains only; the caller checks cycles).
    fn can_merge(&self, producer: usize, consumer: usize) -> bool {
        let (p, c) = (&self.acc[producer], &self.acc[consumer]);
        if p.anchor.is_some() && c.anchor.is_some() || p.reduce.is_some() && c.reduce.is_some() {
            return false;
        }
        let row = match (&p.row, &c.row) {
            (Some(a), Some(b)) if a != b => return false,
            (a, b) => a.clone().or_else(|| b.clone()),
        };
        let anchor = p.anchor.or(c.anchor);
        let reduce = p.reduce.or(c.reduce);
        if anchor.is_some() && (row.is_some() || reduce.is_some()) || row.is_some() && reduce.is_some() {
            return false;
        }
        if let Some(r) = &row {
            let fits = |m: &usize| match self.class[*m] {
                Class::Elementwise => self.numel[*m] == *r || self.prefix[*m] == *r,
                _ => true,
            };
            if !p.members.iter().chain(&c.members).all(fits) {
                return false;
            }
        }
        // An epilogue covers exactly the anchor's (reduction's) result.
        if let Some(a) = p.anchor.or(p.reduce) {
            if !c.members.iter().all(|m| self.numel[*m] == self.numel[a]) {
                return false;
            }
        }
        true
    }

    /// Is there a path from group `from` to group `to` through a node of neither?
    fn path_between(&mut self, from: usize, to: usize) -> bool {
        self.generation += 1;
        let gen = self.generation;
        let limit = self.acc[to].max_pos;
        let mut stack: Vec<usize> = Vec::new();
        let members = self.acc[from].members.clone();
        for m in members {
            for k in 0..self.eff_users[m].len() {
                let u = self.eff_users[m][k];
                let r = self.find(u);
                if r != from && r != to && u < limit && self.stamp[u] != gen {
                    self.stamp[u] = gen;
                    stack.push(u);
                }
            }
        }
        while let Some(u) = stack.pop() {
            for k in 0..self.eff_users[u].len() {
                let w = self.eff_users[u][k];
                if w > limit || self.stamp[w] == gen {
                    continue;
                }
                self.stamp[w] = gen;
                if self.find(w) == to {
                    return true;
                }
                stack.push(w);
            }
        }
        false
    }

    /// Merge if legal and acyclic; returns whether it merged.
    fn try_merge(&mut self, producer: usize, consumer: usize) -> bool {
        let (p, c) = (self.find(producer), self.find(consumer));
        if p == c || !self.can_merge(p, c) || self.path_between(p, c) || self.path_between(c, p) {
            return false;
        }
        let (keep, gone) = if self.acc[p].members.len() >= self.acc[c].members.len() { (p, c) } else { (c, p) };
        let other = std::mem::take(&mut self.acc[gone]);
        let a = &mut self.acc[keep];
        a.members.extend(other.members);
        a.anchor = a.anchor.or(other.anchor);
        a.row = a.row.take().or(other.row);
        a.reduce = a.reduce.or(other.reduce);
        a.max_pos = a.max_pos.max(other.max_pos);
        self.parent[gone] = keep;
        true
    }

    fn is_pure_elementwise(&self, root: usize) -> bool {
        let a = &self.acc[root];
        a.anchor.is_none() && a.row.is_none() && a.reduce.is_none()
    }

    fn run(mut self, fuse: bool) -> Result<FusionPlan, String> {
        let n = self.order.len();
        if fuse {
            // 1. Single-consumer producers into their consumer, from the outputs back.
            for c in (0..n).rev() {
                if !self.grouped(c) {
                    continue;
                }
                for k in 0..self.eff_ops[c].len() {
                    let p = self.eff_ops[c][k];
                    if matches!(self.class[p], Class::Anchor(_)) || self.pinned[p] {
                        continue;
                    }
                    let cg = self.find(c);
                    let users = self.eff_users[p].clone();
                    if users.iter().all(|&u| self.find(u) == cg) {
                        self.try_merge(p, c);
                    }
                }
            }
            // 2. Multi-consumer elementwise groups, in execution order.
            for i in 0..n {
                if self.class[i] != Class::Elementwise {
                    continue;
                }
                let r = self.find(i);
                if !self.is_pure_elementwise(r) || self.acc[r].members.iter().min() != Some(&i) {
                    continue;
                }
                let members = self.acc[r].members.clone();
                let mut consumers: Vec<usize> = members.iter().flat_map(|&m| self.eff_users[m].clone()).collect();
                let mut producers: Vec<usize> = members.iter().flat_map(|&m| self.eff_ops[m].clone()).collect();
                consumers.sort();
                consumers.dedup();
                producers.sort();
                producers.dedup();
                // (a) consumer rows
                for &u in &consumers {
                    let ur = self.find(u);
                    if self.acc[ur].row.is_some() {
                        self.try_merge(i, u);
                    }
                }
                // (b) producer rows, elementwise groups and reductions
                for &p in &producers {
                    let pr = self.find(p);
                    if self.acc[pr].anchor.is_none() {
                        self.try_merge(p, i);
                    }
                }
                // (c) producer anchors: epilogue
                for &p in &producers {
                    let pr = self.find(p);
                    if self.acc[pr].anchor.is_some() {
                        self.try_merge(p, i);
                    }
                }
                // (d) consumer elementwise groups
                for &u in &consumers {
                    let ur = self.find(u);
                    if self.is_pure_elementwise(ur) {
                        self.try_merge(i, u);
                    }
                }
            }
        }
        self.assemble()
    }

    fn kind_of(&self, root: usize) -> GroupKind {
        let a = &self.acc[root];
        match (a.anchor, &a.row, a.reduce) {
            (Some(x), _, _) => match self.class[x] {
                Class::Anchor(k) => k,
                _ => GroupKind::Contraction,
            },
            (None, Some(_), _) => GroupKind::Row,
            (None, None, Some(_)) => GroupKind::Reduce,
            _ => GroupKind::Elementwise,
        }
    }

    /// Add a group owning `nodes`, with the Dup nodes it reads: owned if no earlier group
    /// owns them, recomputed otherwise.
    fn add_group(&self, nodes: Vec<usize>, root: usize, owner: &mut [Option<usize>], sets: &mut Vec<GroupSets>) {
        let k = sets.len();
        let mut owned = nodes.clone();
        let mut recomputed = Vec::new();
        let mut seen: BTreeSet<usize> = nodes.iter().copied().collect();
        let mut stack: Vec<usize> = nodes.clone();
        while let Some(x) = stack.pop() {
            for &o in &self.operands[x] {
                if self.class[o] == Class::Dup && seen.insert(o) {
                    stack.push(o);
                    match owner[o] {
                        None => {
                            owner[o] = Some(k);
                            owned.push(o);
                        }
                        Some(_) => recomputed.push(o),
                    }
                }
            }
        }
        for &x in &nodes {
            owner[x] = Some(k);
        }
        owned.sort();
        recomputed.sort();
        sets.push((owned, recomputed, root));
    }

    fn assemble(mut self) -> Result<FusionPlan, String> {
        let n = self.order.len();
        // Groups of grouped nodes, ordered topologically (ties: earliest first node).
        let root_of: Vec<usize> = (0..n).map(|i| self.find(i)).collect();
        let mut roots: Vec<usize> = (0..n).filter(|&i| self.grouped(i)).map(|i| root_of[i]).collect();
        roots.sort();
        roots.dedup();
        let gindex: HashMap<usize, usize> = roots.iter().enumerate().map(|(k, &r)| (r, k)).collect();
        let mut members: Vec<Vec<usize>> = roots.iter().map(|&r| self.acc[r].members.clone()).collect();
        for m in &mut members {
            m.sort();
        }
        let mut succ: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); roots.len()];
        let mut indeg = vec![0usize; roots.len()];
        for (k, ms) in members.iter().enumerate() {
            for &m in ms {
                for &o in &self.eff_ops[m] {
                    let from = gindex[&root_of[o]];
                    if from != k && succ[from].insert(k) {
                        indeg[k] += 1;
                    }
                }
            }
        }
        let mut ready: BinaryHeap<std::cmp::Reverse<(usize, usize)>> =
            (0..roots.len()).filter(|&k| indeg[k] == 0).map(|k| std::cmp::Reverse((members[k][0], k))).collect();
        let mut sequence: Vec<usize> = Vec::with_capacity(roots.len());
        while let Some(std::cmp::Reverse((_, k))) = ready.pop() {
            sequence.push(k);
            for &s in &succ[k] {
                indeg[s] -= 1;
                if indeg[s] == 0 {
                    ready.push(std::cmp::Reverse((members[s][0], s)));
                }
            }
        }
        if sequence.len() != roots.len() {
            return Err("internal error: the fusion groups form a cycle".into());
        }
        // Owned and recomputed node sets, with the Dup nodes each group needs.
        let mut owner: Vec<Option<usize>> = vec![None; n];
        let mut sets: Vec<GroupSets> = Vec::new();
        for &k in &sequence {
            self.add_group(members[k].clone(), roots[k], &mut owner, &mut sets);
        }
        // Dup nodes no group reads (graph outputs, dead values): a group of their own.
        for i in (0..n).rev() {
            if self.class[i] == Class::Dup && owner[i].is_none() {
                self.add_group(vec![i], usize::MAX, &mut owner, &mut sets);
            }
        }
        // Inputs and outputs.
        let mut inputs: Vec<Vec<usize>> = Vec::with_capacity(sets.len());
        let mut written = vec![false; n];
        for (owned, recomputed, _) in &sets {
            let inside: BTreeSet<usize> = owned.iter().chain(recomputed).copied().collect();
            let mut ins = BTreeSet::new();
            for &x in &inside {
                for &o in &self.operands[x] {
                    if !inside.contains(&o) {
                        ins.insert(o);
                        written[o] = true;
                    }
                }
            }
            inputs.push(ins.into_iter().collect());
        }
        for (_, id) in &self.g.outputs {
            written[self.pos[id]] = true;
        }
        let g = self.g;
        let ids = |v: &[usize]| -> Vec<NodeId> { v.iter().map(|&i| self.order[i]).collect() };
        let mut groups = Vec::with_capacity(sets.len());
        let mut owner_map = HashMap::new();
        for (k, ((owned, recomputed, root), ins)) in sets.iter().zip(&inputs).enumerate() {
            let kind = if *root == usize::MAX { GroupKind::Elementwise } else { self.kind_of(*root) };
            let outs: Vec<usize> =
                owned.iter().copied().filter(|&x| written[x] && self.class[x] != Class::Leaf).collect();
            let mut flops = Dim::constant(0);
            let mut workspace = Dim::constant(0);
            for &x in owned.iter().chain(recomputed) {
                let (f, w) = op_cost(g, self.order[x]).ok_or("size overflow in the cost estimate")?;
                flops = flops.checked_add(&f).ok_or("size overflow")?;
                workspace = workspace.checked_add(&w).ok_or("size overflow")?;
            }
            let mut bytes = Dim::constant(0);
            for &x in ins.iter().chain(&outs) {
                let b = value_bytes(g, self.order[x]).ok_or("size overflow")?;
                bytes = bytes.checked_add(&b).ok_or("size overflow")?;
            }
            for &x in owned {
                owner_map.insert(self.order[x], k);
            }
            groups.push(Group {
                kind,
                nodes: ids(owned),
                recomputed: ids(recomputed),
                inputs: ids(ins),
                outputs: ids(&outs),
                flops,
                bytes,
                workspace,
                ops: owned.iter().map(|&x| g.node(self.order[x]).op.kind()).collect(),
            });
        }
        Ok(FusionPlan { groups, owner: owner_map })
    }
}
