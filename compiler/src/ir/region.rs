//! Regions: small graphs of primitive ops carried inside a fused (normal-form) op, such
//! as the feature map φ and LRPE applied to q and k inside linear attention. A region is
//! a function of whole tensors (its arguments are operands of the enclosing op), written
//! with the same `Op`s as the graph, so the interpreter evaluates it like any graph and
//! autodiff differentiates it with the primitive rules. There is deliberately no enum of
//! feature maps or norms: any sub-graph of position-local primitive ops is a region.

use super::graph::{Graph, NodeId};
use super::infer::infer;
use super::op::Op;
use super::types::TensorType;
use std::collections::HashMap;

/// A value inside a region: one of its arguments or one of its nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RegionValue {
    Arg(u32),
    Node(u32),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RegionNode {
    pub op: Op,
    pub operands: Vec<RegionValue>,
    pub ty: TensorType,
}

/// Nodes are in topological order; `result` is the region's value.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Region {
    pub args: Vec<TensorType>,
    pub nodes: Vec<RegionNode>,
    pub result: RegionValue,
}

impl Region {
    /// The identity on one argument.
    pub fn identity(ty: TensorType) -> Region {
        Region { args: vec![ty], nodes: Vec::new(), result: RegionValue::Arg(0) }
    }

    pub fn is_identity(&self) -> bool {
        self.nodes.is_empty() && self.result == RegionValue::Arg(0) && self.args.len() == 1
    }

    pub fn result_type(&self) -> &TensorType {
        match self.result {
            RegionValue::Arg(i) => &self.args[i as usize],
            RegionValue::Node(i) => &self.nodes[i as usize].ty,
        }
    }

    /// Copy the sub-graph that computes `root` from the `boundary` values into a region
    /// whose arguments are the boundary values (in the given order). Every other value
    /// reached must be computed by an op accepted by `allowed` (leaf ops such as constants
    /// and iotas included). Returns `None` if another value is reached.
    pub fn extract(g: &Graph, root: NodeId, boundary: &[NodeId], allowed: &dyn Fn(&Op) -> bool) -> Option<Region> {
        let mut index: HashMap<NodeId, RegionValue> =
            boundary.iter().enumerate().map(|(i, &b)| (b, RegionValue::Arg(i as u32))).collect();
        let mut nodes = Vec::new();
        // Iterative post-order so deep regions cannot overflow the stack.
        let mut stack = vec![(root, false)];
        while let Some((n, expanded)) = stack.pop() {
            if index.contains_key(&n) {
                continue;
            }
            let node = g.node(n);
            if matches!(node.op, Op::Input { .. } | Op::Param { .. }) || !allowed(&node.op) {
                return None;
            }
            let operands = g.operands(n);
            if expanded {
                let operands = operands.iter().map(|o| index[o]).collect();
                nodes.push(RegionNode { op: node.op.clone(), operands, ty: node.ty.clone() });
                index.insert(n, RegionValue::Node(nodes.len() as u32 - 1));
            } else {
                stack.push((n, true));
                for &o in operands.iter().rev() {
                    if !index.contains_key(&o) {
                        stack.push((o, false));
                    }
                }
            }
        }
        Some(Region { args: boundary.iter().map(|&b| g.ty(b).clone()).collect(), nodes, result: index[&root] })
    }

    /// Add the region's nodes to `g`, applied to `args`; returns the node of its result.
    pub fn inline(&self, g: &mut Graph, args: &[NodeId], span: Option<tnc_grammar::Span>) -> Result<NodeId, String> {
        Ok(self.inline_nodes(g, args, span)?.0)
    }

    /// Like [`Region::inline`], also returning every node added, in topological order.
    pub fn inline_nodes(
        &self,
        g: &mut Graph,
        args: &[NodeId],
        span: Option<tnc_grammar::Span>,
    ) -> Result<(NodeId, Vec<NodeId>), String> {
        if args.len() != self.args.len() {
            return Err(format!("a region of {} arguments applied to {}", self.args.len(), args.len()));
        }
        let mut ids: Vec<NodeId> = Vec::with_capacity(self.nodes.len());
        let value = |v: RegionValue, ids: &[NodeId]| match v {
            RegionValue::Arg(i) => args[i as usize],
            RegionValue::Node(i) => ids[i as usize],
        };
        for n in &self.nodes {
            let operands: Vec<NodeId> = n.operands.iter().map(|&v| value(v, &ids)).collect();
            ids.push(g.add(n.op.clone(), &operands, span)?);
        }
        Ok((value(self.result, &ids), ids))
    }

    /// The same region with every size (its types' and its ops') mapped by `f`.
    pub fn map_dims(&self, f: &dyn Fn(&super::dim::Dim) -> Option<super::dim::Dim>) -> Option<Region> {
        let ty = |t: &TensorType| Some(TensorType::new(t.dtype, t.shape.iter().map(f).collect::<Option<_>>()?));
        Some(Region {
            args: self.args.iter().map(ty).collect::<Option<_>>()?,
            nodes: self
                .nodes
                .iter()
                .map(|n| Some(RegionNode { op: n.op.map_dims(f)?, operands: n.operands.clone(), ty: ty(&n.ty)? }))
                .collect::<Option<_>>()?,
            result: self.result,
        })
    }

    /// Check that every node's type is what inference gives.
    pub fn verify(&self) -> Result<(), String> {
        for (i, n) in self.nodes.iter().enumerate() {
            let tys: Vec<&TensorType> = n
                .operands
                .iter()
                .map(|v| match *v {
                    RegionValue::Arg(a) => self.args.get(a as usize).ok_or("bad region argument"),
                    RegionValue::Node(k) if (k as usize) < i => Ok(&self.nodes[k as usize].ty),
                    RegionValue::Node(_) => Err("region nodes are not in topological order"),
                })
                .collect::<Result<_, _>>()?;
            if n.op.is_normal_form() || matches!(n.op, Op::Input { .. } | Op::Param { .. }) {
                return Err(format!("`{}` cannot appear inside a region", n.op.kind()));
            }
            let t = infer(&n.op, &tys)?;
            if t != n.ty {
                return Err(format!("region node {i} ({}) has type {} but its operands give {t}", n.op.kind(), n.ty));
            }
        }
        Ok(())
    }

    /// One line per node, for printing inside the enclosing op.
    pub fn to_text(&self) -> String {
        let v = |x: &RegionValue| match x {
            RegionValue::Arg(i) => format!("$a{i}"),
            RegionValue::Node(i) => format!("$r{i}"),
        };
        let mut s = String::new();
        for (i, n) in self.nodes.iter().enumerate() {
            let ops: Vec<String> = n.operands.iter().map(v).collect();
            s.push_str(&format!(
                "$r{i} = {}{}({}) : {}; ",
                n.op.kind(),
                super::print::op_attrs(&n.op),
                ops.join(", "),
                n.ty
            ));
        }
        s.push_str(&format!("-> {}", v(&self.result)));
        s
    }
}
