//! The graph IR: a petgraph `StableDiGraph` of [`Node`]s (an [`Op`] and the type of the
//! value it produces) whose edges run from operand to user and carry the operand position.
//! Parameters, buffers, inputs and outputs are listed in side tables.

use super::infer::infer;
use super::op::Op;
use super::types::TensorType;
use petgraph::stable_graph::{NodeIndex, StableDiGraph};
use petgraph::visit::EdgeRef;
use petgraph::Direction;
use std::collections::BinaryHeap;
use tnc_grammar::Span;

pub type NodeId = NodeIndex<u32>;

#[derive(Clone, Debug)]
pub struct Node {
    pub op: Op,
    pub ty: TensorType,
    /// The source expression that produced this node, for diagnostics.
    pub span: Option<Span>,
}

/// How a parameter or buffer gets its initial value.
///
/// `Xavier` is Glorot-uniform: for a shape `[…, fan_in, fan_out]` (the `x @ w`
/// convention) the bound is `gain · sqrt(6 / (fan_in + fan_out))`, with both fans
/// multiplied by the product of any leading axes.
#[derive(Clone, Debug)]
pub enum Init {
    Zeros,
    Ones,
    Constant(f64),
    Normal {
        mean: f64,
        std: f64,
    },
    Uniform {
        lo: f64,
        hi: f64,
    },
    Xavier {
        gain: f64,
    },
    /// Computed by a constant graph with one output and no inputs or parameters,
    /// e.g. LRPE's `θ_i = 10000^(-2i/e)`.
    Computed(Box<Graph>),
}

#[derive(Clone, Debug)]
pub struct ParamInfo {
    /// Stable hierarchical name, e.g. `layers.3.attn.wq` (see docs/naming).
    pub name: String,
    pub ty: TensorType,
    pub init: Init,
    /// `false` for buffers: stored and initialized like parameters, never updated.
    pub trainable: bool,
    /// Free-form attributes such as `no_decay`.
    pub attrs: Vec<String>,
    /// A fixed seed for this tensor's initializer, independent of the run's seed
    /// (LRPE's Householder vector is the same in every run).
    pub seed: Option<u64>,
    pub span: Option<Span>,
    pub node: NodeId,
}

#[derive(Clone, Debug)]
pub struct InputInfo {
    pub name: String,
    pub ty: TensorType,
    pub span: Option<Span>,
    pub node: NodeId,
}

#[derive(Clone, Debug, Default)]
pub struct Graph {
    pub name: String,
    pub dag: StableDiGraph<Node, u8>,
    pub inputs: Vec<InputInfo>,
    pub params: Vec<ParamInfo>,
    pub outputs: Vec<(String, NodeId)>,
}

impl Graph {
    pub fn new(name: impl Into<String>) -> Graph {
        Graph { name: name.into(), ..Graph::default() }
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.dag[id]
    }

    pub fn ty(&self, id: NodeId) -> &TensorType {
        &self.dag[id].ty
    }

    pub fn len(&self) -> usize {
        self.dag.node_count()
    }

    pub fn is_empty(&self) -> bool {
        self.dag.node_count() == 0
    }

    pub fn add_input(&mut self, name: impl Into<String>, ty: TensorType, span: Option<Span>) -> NodeId {
        let index = self.inputs.len() as u32;
        let node = self.dag.add_node(Node { op: Op::Input { index }, ty: ty.clone(), span });
        self.inputs.push(InputInfo { name: name.into(), ty, span, node });
        node
    }

    /// Register a parameter or buffer; `info.node` is filled in.
    pub fn add_param(&mut self, mut info: ParamInfo) -> NodeId {
        let index = self.params.len() as u32;
        let node = self.dag.add_node(Node { op: Op::Param { index }, ty: info.ty.clone(), span: info.span });
        info.node = node;
        self.params.push(info);
        node
    }

    /// Add an op, inferring its type from its operands. The error is a plain message;
    /// callers attach the source span.
    pub fn add(&mut self, op: Op, operands: &[NodeId], span: Option<Span>) -> Result<NodeId, String> {
        let tys: Vec<&TensorType> = operands.iter().map(|&o| &self.dag[o].ty).collect();
        let ty = infer(&op, &tys)?;
        let node = self.dag.add_node(Node { op, ty, span });
        for (pos, &o) in operands.iter().enumerate() {
            self.dag.add_edge(o, node, pos as u8);
        }
        Ok(node)
    }

    pub fn add_output(&mut self, name: impl Into<String>, node: NodeId) {
        self.outputs.push((name.into(), node));
    }

    /// Operands in position order.
    pub fn operands(&self, id: NodeId) -> Vec<NodeId> {
        let mut edges: Vec<(u8, NodeId)> =
            self.dag.edges_directed(id, Direction::Incoming).map(|e| (*e.weight(), e.source())).collect();
        edges.sort_by_key(|&(pos, _)| pos);
        edges.into_iter().map(|(_, n)| n).collect()
    }

    /// Users of a value (each once, in node order).
    pub fn users(&self, id: NodeId) -> Vec<NodeId> {
        let mut u: Vec<NodeId> = self.dag.neighbors_directed(id, Direction::Outgoing).collect();
        u.sort();
        u.dedup();
        u
    }

    /// A topological order that is stable: among ready nodes the lowest index goes first,
    /// so printing the same graph twice gives the same text.
    pub fn topo_order(&self) -> Vec<NodeId> {
        let mut indegree: std::collections::HashMap<NodeId, usize> =
            self.dag.node_indices().map(|n| (n, self.dag.edges_directed(n, Direction::Incoming).count())).collect();
        let mut ready: BinaryHeap<std::cmp::Reverse<NodeId>> =
            indegree.iter().filter(|(_, &d)| d == 0).map(|(&n, _)| std::cmp::Reverse(n)).collect();
        let mut order = Vec::with_capacity(self.dag.node_count());
        while let Some(std::cmp::Reverse(n)) = ready.pop() {
            order.push(n);
            for e in self.dag.edges_directed(n, Direction::Outgoing) {
                let d = indegree.get_mut(&e.target()).expect("edge target is a node");
                *d -= 1;
                if *d == 0 {
                    ready.push(std::cmp::Reverse(e.target()));
                }
            }
        }
        order
    }

    /// Number of trainable parameter elements (sizes of parameters are constants).
    pub fn trainable_parameter_count(&self) -> u128 {
        self.params
            .iter()
            .filter(|p| p.trainable)
            .map(|p| p.ty.shape.iter().map(|d| d.as_const().unwrap_or(0).max(0) as u128).product::<u128>())
            .sum()
    }
}
