//! `fuse`: group the ops of an optimized forward + backward graph into kernel groups.
//!
//! `fuse` is not a graph-to-graph [`crate::passes::Pass`]: it runs after the whole
//! pipeline and returns a [`FusionPlan`] over the unchanged graph. `tnc ir --after fuse`
//! prints the plan with [`to_text`]; `plan_memory` and `tnc compile --report` consume it.
//!
//! # Cost policy
//!
//! The policy is greedy and structural; every rule below is applied only if the merged
//! group stays acyclic (no path leaves the group and comes back into it).
//!
//! * **Op classes.** `Input`/`Param` are not kernels (they are buffers). Elementwise ops
//!   are `Unary`, `Binary`, `Select`, `Cast`, `Dropout`, the shape ops `Reshape`,
//!   `Broadcast`, `Permute`, `Slice`, `Pad`, `Concat`, the generators `Constant`, `Iota`,
//!   `SizeOf`, and an einsum without summed letters (an outer product is a broadcast
//!   multiply). A reduction over the last axis only is a *row reduction*; any other is
//!   a *general reduction*. Contractions (einsums that sum), `Scan`, `Gather` and
//!   `LinearAttention` are *anchors* (so is any other op, e.g. a fused normal-form op): at most one per group, never merged with another
//!   anchor nor with a reduction.
//! * **Cheap values are recomputed, never stored.** Views (`Reshape`, `Broadcast`,
//!   `Permute`, `Slice`, `Pad`, `Concat`: index arithmetic over their sources) and
//!   index-only values (generators and elementwise ops over generators only: masks,
//!   positions, constants) are recomputed in every group that needs them. Reading a view's
//!   source costs no more bytes than reading the view, so this never adds traffic. The
//!   node is owned by the first group (in execution order) that uses it and listed as
//!   `recomputed` in the others. Nothing else is ever duplicated.
//! * **1. Single-consumer producers fuse into their consumer** (visited from the outputs
//!   back). An elementwise value, a row reduction or a general reduction whose users all
//!   lie in one group (and that is not a graph output) joins that group: its tensor is
//!   never written. Into an anchor this is a *prologue* (the GLU gate `a * act(g)` before
//!   `@ w3`, the one-hot of an embedding gradient, the outer product feeding a scan).
//! * **2. Multi-consumer elementwise values** must be written anyway; their group joins,
//!   in this order of preference, (a) a consumer *row* group (the residual add joins the
//!   norm that reads it), (b) a producer row, elementwise or reduction group, (c) a
//!   producer anchor as *epilogue* (bias add, activation or gate after a projection), (d)
//!   a consumer elementwise group. Each merge saves a launch and a read of the value.
//! * **Domains.** A row group iterates over rows: all its elementwise ops have the row
//!   count as their element count or as the element count of all but their last axis
//!   (so a norm with its residual, gate and bias ops fuses: `mul, reduce_sum, sqrt, add,
//!   div` + the residual add). An anchor's or a general reduction's epilogue has exactly as
//!   many elements as the anchor's (reduction's) result; a prologue is unrestricted.
//!
//! # Estimates
//!
//! FLOPs: one per element for elementwise arithmetic (shape ops and generators are free),
//! one per input element for a reduction, `2·∏ sizes of all letters` for a contraction,
//! one (two with decay) per element for a scan, and for linear attention the chunked
//! algorithm with chunk [`CHUNK`]: `batch·N·(2·C·(d+e) + 4·d·e)` plus its regions; for
//! block attention with blocks of `w` positions `2·rows·w·(d+e)` (backward
//! `2·rows·w·(3d+2e)`) plus its regions, so the softmax baseline (`w = N`) is quadratic in
//! N; for the cross-entropy `2·T·V·D` per logits product (a gradient op: two) plus four
//! per logit. Bytes: every group input read once and every output written once (re-reads
//! of matmul tiles are not modelled). Workspace: linear attention keeps one f32 `d×e`
//! state per batch index. All are polynomials ([`Dim`]) in `B` and `N`.
//!
//! The code: the plan's types (`plan.rs`), the greedy fuser (`fuser.rs`), the cost model
//! (`cost.rs`) and the text form (`print.rs`).

mod cost;
mod fuser;
mod plan;
mod print;

pub use cost::CHUNK;
pub use fuser::{fuse, unfused};
pub use plan::{dtype_bytes, value_bytes, FusionPlan, Group, GroupKind};
pub use print::to_text;

#[cfg(test)]
mod tests;
