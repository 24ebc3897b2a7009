//! `prefill`: a prompt through the chunked forward at once, returning the next token's
//! logits (as `next_token` does) and every state the decode step (`decode_step.rs`)
//! carries, as they stand after the prompt's last token. Generation then continues with
//! the step at position `N`, so a long prompt costs the chunked kernels' time rather than
//! one step per token.
//!
//! The states are those the step derives (same names, `next_` + the step's input, and
//! the same shapes), each computed from the forward's values over the whole prompt:
//!
//! - causal linear attention: `S = Σ_m w_m k'_mᵀ v'_m` with `w_m = λ^{N−1−m}` (a constant
//!   decay), `exp(Σ_{j>m} a_j)` (a gate per token, floored as the op floors it) or 1;
//! - block attention in blocks of `w`: the rows of the prompt's last (possibly partial)
//!   block at slots `0 …`, zeros after (rows the causal weights give weight 0);
//! - a KV cache of `C` rows: the prompt's rows, zeros after (the prompt must fit);
//! - a scan along the sequence: its value at the last position.
//!
//! Not part of the default pipeline: `Pipeline::program(Program::Prefill {..})` runs it
//! after `next_token`.

use super::decode_step::{derive, sequence_symbol, Origin, NEXT};
use super::{graph_build, Pass};
use crate::ir::normal_form::{Decay, LOG_GATE_FLOOR};
use crate::ir::{BinaryOp, DType, Dim, Graph, NodeId, Op, UnaryOp};
use tnc_grammar::{Diagnostic, Span};

/// `context`: the rows of a KV cache (as the decode step it feeds has them).
pub struct Prefill {
    pub context: i64,
}

impl Pass for Prefill {
    fn name(&self) -> &'static str {
        "prefill"
    }

    fn run(&self, g: Graph) -> Result<Graph, Diagnostic> {
        let n = Dim::sym(sequence_symbol(&g)?);
        let (step, states) = derive(&g, self.context)?;
        let mut b = Builder { g, n };
        for (name, origin) in states {
            let value = b.final_state(&origin)?;
            let want = step.inputs.iter().find(|i| i.name == name).map(|i| &i.ty);
            if want != Some(b.g.ty(value)) {
                return Err(internal(format!(
                    "the state {name} after the prompt is {}, the step's is {want:?}",
                    b.g.ty(value)
                )));
            }
            b.g.add_output(format!("{NEXT}{name}"), value);
        }
        Ok(b.g)
    }
}

fn internal(e: String) -> Diagnostic {
    Diagnostic::error(format!("internal error: deriving the prefill: {e}"))
}

struct Builder {
    g: Graph,
    /// The prompt's length `N`.
    n: Dim,
}

impl Builder {
    fn add(&mut self, op: Op, operands: &[NodeId], span: Option<Span>) -> Result<NodeId, Diagnostic> {
        self.g.add(op, operands, span).map_err(internal)
    }

    fn final_state(&mut self, origin: &Origin) -> Result<NodeId, Diagnostic> {
        match *origin {
            Origin::LinearAttention(node) => self.linear_attention_state(node),
            Origin::Window { operand, axis, rows, kv_cache } => self.last_window(operand, axis, rows, kv_cache),
            Origin::Scan { node, axis } => {
                let (start, end) = (self.sub(&self.n, 1)?, self.n.clone());
                self.add(Op::Slice { axis, start, end }, &[node], None)
            }
            Origin::ScanInRegion(span) => {
                let d = Diagnostic::error(
                    "no prefill: a scan along the sequence inside an attention's q, k or v (generation can still \
                     feed the prompt through the decode step one token at a time)",
                );
                Err(match span {
                    Some(s) => d.or_at(s),
                    None => d,
                })
            }
        }
    }

    fn sub(&self, d: &Dim, k: i64) -> Result<Dim, Diagnostic> {
        d.checked_add(&Dim::constant(-k)).ok_or_else(|| internal("size overflow".into()))
    }

    fn scalar(&mut self, value: f64) -> Result<NodeId, Diagnostic> {
        graph_build::scalar(&mut self.g, value, DType::F32).map_err(internal)
    }

    fn splat(&mut self, x: NodeId, shape: &[Dim]) -> Result<NodeId, Diagnostic> {
        graph_build::splat(&mut self.g, x, shape).map_err(internal)
    }

    /// `x` with a size-1 axis appended.
    fn unsqueeze_last(&mut self, x: NodeId) -> Result<NodeId, Diagnostic> {
        let shape = [self.g.ty(x).shape.clone(), vec![Dim::constant(1)]].concat();
        self.add(Op::Reshape { shape }, &[x], None)
    }

    /// `Σ_m w_m k'_mᵀ v'_m` over the prompt's positions, per batch index.
    fn linear_attention_state(&mut self, node: NodeId) -> Result<NodeId, Diagnostic> {
        let span = self.g.node(node).span;
        let Op::LinearAttention(a) = self.g.node(node).op.clone() else {
            return Err(internal("a linear attention's state from another op".into()));
        };
        let operands = self.g.operands(node);
        let (_, ka, va, decay) = a.split(&operands);
        let k = a.k.inline(&mut self.g, ka, span).map_err(internal)?;
        let v = a.v.inline(&mut self.g, va, span).map_err(internal)?;
        let kt = self.g.ty(k).clone();
        let r = kt.rank();
        let k = match decay {
            None => k,
            Some(&d) => {
                let w = match a.decay {
                    Decay::PerToken => self.gate_weights(d)?,
                    _ => self.decay_weights(d)?,
                };
                let w = self.unsqueeze_last(w)?;
                let w = self.splat(w, &kt.shape)?;
                self.add(Op::Binary(BinaryOp::Mul), &[k, w], span)?
            }
        };
        let spec = graph_build::batched(r - 2, b"xy", b"xz", b"yz");
        self.add(Op::Einsum(spec), &[k, v], span)
    }

    /// `λ^{N−1−m}` for every position `m`, `[λ's shape…, N]`.
    fn decay_weights(&mut self, lambda: NodeId) -> Result<NodeId, Diagnostic> {
        let lt = self.g.ty(lambda).clone();
        let shape = [lt.shape.clone(), vec![self.n.clone()]].concat();
        let last = self.sub(&self.n, 1)?;
        let last = self.add(Op::SizeOf { size: last, dtype: DType::F32 }, &[], None)?;
        let last = self.splat(last, &[self.n.clone()])?;
        let m = self.add(Op::Iota { len: self.n.clone(), dtype: DType::F32 }, &[], None)?;
        let distance = self.add(Op::Binary(BinaryOp::Sub), &[last, m], None)?;
        let distance = self.splat(distance, &shape)?;
        let lambda = self.unsqueeze_last(lambda)?;
        let lambda = self.splat(lambda, &shape)?;
        self.add(Op::Binary(BinaryOp::Pow), &[lambda, distance], None)
    }

    /// `exp(Σ_{j>m} a_j)` for every position `m` of the log-gates `a [batch…, N]`, each
    /// floored at `LOG_GATE_FLOOR` as the op floors it: the suffix sums shifted by one.
    fn gate_weights(&mut self, gates: NodeId) -> Result<NodeId, Diagnostic> {
        let t = self.g.ty(gates).clone();
        let axis = t.rank() - 1;
        let floor = self.scalar(LOG_GATE_FLOOR)?;
        let floor = self.splat(floor, &t.shape)?;
        let a = self.add(Op::Binary(BinaryOp::Max), &[gates, floor], None)?;
        let suffix = self.add(Op::Scan { axis, reverse: true }, &[a], None)?;
        let later = self.add(Op::Slice { axis, start: Dim::constant(1), end: self.n.clone() }, &[suffix], None)?;
        let later = self.add(Op::Pad { axis, before: Dim::constant(0), after: Dim::constant(1) }, &[later], None)?;
        self.add(Op::Unary(UnaryOp::Exp), &[later], None)
    }

    /// The rows of `operand` along `axis` in the window that holds the prompt's last
    /// position, at slots `0 …`, zeros after: a block of `rows` (`w·⌈N/w⌉ − w …`), or
    /// the KV cache's `rows` from position 0.
    fn last_window(&mut self, operand: NodeId, axis: usize, rows: i64, kv_cache: bool) -> Result<NodeId, Diagnostic> {
        let overflow = || internal("size overflow".into());
        let (start, full) = if kv_cache {
            (Dim::constant(0), Dim::constant(rows))
        } else {
            let full = self.n.ceil_div(rows).and_then(|b| b.checked_scale(rows)).ok_or_else(overflow)?;
            (self.sub(&full, rows)?, full)
        };
        let mut x = operand;
        if start.as_const() != Some(0) {
            x = self.add(Op::Slice { axis, start, end: self.n.clone() }, &[x], None)?;
        }
        let after = full.checked_sub(&self.n).ok_or_else(overflow)?;
        if after.as_const() != Some(0) {
            x = self.add(Op::Pad { axis, before: Dim::constant(0), after }, &[x], None)?;
        }
        Ok(x)
    }
}
