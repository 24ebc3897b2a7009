//! The graph IR. See DESIGN.md, "Graph IR".

pub mod cross_entropy;
pub mod dim;
pub mod graph;
pub mod index_bounds;
pub mod infer;
pub mod normal_form;
pub mod op;
pub mod print;
pub mod region;
pub mod rewrite;
pub mod types;
pub mod verify;

pub use cross_entropy::{CeOp, CrossEntropy};
pub use dim::Dim;
pub use graph::{Graph, Init, InputInfo, Node, NodeId, ParamInfo};
pub use normal_form::{BlockAttention, BlockAttentionGrad, Decay, Direction, LinearAttention, LOG_GATE_FLOOR};
pub use op::{BinaryOp, EinsumSpec, F64Bits, Op, ReduceOp, UnaryOp};
pub use region::{Region, RegionValue};
pub use types::{DType, TensorType};
