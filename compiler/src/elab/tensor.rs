//! Building graph nodes from values: constants, broadcasting, arithmetic, matmul,
//! indexing, reductions. Shape errors become diagnostics at the expression's span.

use super::value::{TensorRef, Value};
use super::{Elaborator, R};
use crate::ir::dim::shape_to_string;
use crate::ir::{BinaryOp, DType, Dim, EinsumSpec, F64Bits, NodeId, Op, ReduceOp, TensorType, UnaryOp};
use tnc_grammar::ast::BinOp;
use tnc_grammar::{Diagnostic, Span};

impl Elaborator<'_> {
    /// Add a node to the graph being built; type errors point at `span`.
    pub(super) fn node(&mut self, op: Op, operands: &[NodeId], span: Span) -> R<NodeId> {
        if self.graph().len() >= super::MAX_GRAPH_NODES {
            return Err(Diagnostic::at("the model is too large", span)
                .with_label(format!("elaborating this exceeds the budget of {} graph nodes", super::MAX_GRAPH_NODES)));
        }
        // Inside `precision f32 { … }` (here or in a caller) every product is pinned.
        let op = match op {
            Op::Einsum(spec) if self.pinned_blocks > 0 => Op::Einsum(crate::ir::EinsumSpec { pinned: true, ..spec }),
            op => op,
        };
        self.graph_mut().add(op, operands, Some(span)).map_err(|m| Diagnostic::at(m, span))
    }

    pub(super) fn ty(&self, n: NodeId) -> &TensorType {
        self.graph().ty(n)
    }

    pub(super) fn tensor_value(&self, n: NodeId) -> Value {
        Value::Tensor(TensorRef { graph: self.graph_id(), node: n })
    }

    pub(super) fn constant(&mut self, x: f64, dtype: DType, span: Span) -> R<NodeId> {
        self.node(Op::Constant { value: F64Bits::new(x), dtype }, &[], span)
    }

    /// The node of a tensor value, or a constant for a number, where a tensor of element
    /// type `like` is wanted.
    pub(super) fn as_tensor(&mut self, v: &Value, like: Option<DType>, span: Span) -> R<NodeId> {
        match v {
            Value::Tensor(t) => self.own_node(t, span),
            Value::Int(i) => self.constant(*i as f64, like.unwrap_or(DType::F32), span),
            Value::Float(x) => {
                if like == Some(DType::I32) {
                    return Err(Diagnostic::at(format!("`{}` is not an integer", v), span)
                        .with_label("mixed with an i32 tensor")
                        .with_hint("convert the tensor with `float(…)` first"));
                }
                self.constant(*x, DType::F32, span)
            }
            Value::Bool(b) => self.constant(if *b { 1.0 } else { 0.0 }, DType::Bool, span),
            Value::Size(d) => self.node(Op::SizeOf { size: d.clone(), dtype: like.unwrap_or(DType::F32) }, &[], span),
            other => Err(Diagnostic::at(format!("expected a tensor, found {}", other.kind()), span)),
        }
    }

    /// The node of `t` in the graph being built. Initializers are elaborated into graphs
    /// of their own, so a tensor of the model cannot appear in one.
    pub(super) fn own_node(&self, t: &TensorRef, span: Span) -> R<NodeId> {
        if t.graph != self.graph_id() {
            return Err(Diagnostic::at("an initializer can only be computed from constants", span)
                .with_label("this is a tensor of the model, not a constant"));
        }
        Ok(t.node)
    }

    /// The element type of a tensor value (checked as by [`Self::own_node`]), `None` for
    /// other values.
    pub(super) fn tensor_dtype(&self, v: &Value, span: Span) -> R<Option<DType>> {
        match v {
            Value::Tensor(t) => Ok(Some(self.graph().ty(self.own_node(t, span)?).dtype)),
            _ => Ok(None),
        }
    }

    pub(super) fn reshape(&mut self, n: NodeId, shape: Vec<Dim>, span: Span) -> R<NodeId> {
        if self.ty(n).shape == shape {
            return Ok(n);
        }
        self.node(Op::Reshape { shape }, &[n], span)
    }

    pub(super) fn broadcast_to(&mut self, n: NodeId, shape: &[Dim], span: Span) -> R<NodeId> {
        let t = self.ty(n).clone();
        if t.shape == shape {
            return Ok(n);
        }
        let mut padded = vec![Dim::constant(1); shape.len().saturating_sub(t.rank())];
        padded.extend(t.shape.iter().cloned());
        let r = self.reshape(n, padded, span)?;
        self.node(Op::Broadcast { shape: shape.to_vec() }, &[r], span)
    }

    /// NumPy broadcasting of two shapes: align trailing axes; sizes must be equal or 1.
    pub(super) fn broadcast_shapes(&self, a: &[Dim], b: &[Dim]) -> Option<Vec<Dim>> {
        let rank = a.len().max(b.len());
        let one = Dim::constant(1);
        let mut out = Vec::with_capacity(rank);
        for i in 0..rank {
            let da = if i + a.len() >= rank { &a[i + a.len() - rank] } else { &one };
            let db = if i + b.len() >= rank { &b[i + b.len() - rank] } else { &one };
            out.push(if da == db || *db == one {
                da.clone()
            } else if *da == one {
                db.clone()
            } else {
                return None;
            });
        }
        Some(out)
    }

    /// Broadcast operands of an elementwise op against each other.
    pub(super) fn broadcast_all(&mut self, ns: &[(NodeId, Span)], span: Span) -> R<Vec<NodeId>> {
        let mut shape: Vec<Dim> = Vec::new();
        for (i, &(n, s)) in ns.iter().enumerate() {
            let t = self.ty(n).shape.clone();
            shape = self.broadcast_shapes(&shape, &t).ok_or_else(|| {
                let prev = &ns[i - 1];
                Diagnostic::at(
                    format!(
                        "shapes {} and {} cannot be broadcast together",
                        shape_to_string(&shape),
                        shape_to_string(&t)
                    ),
                    span,
                )
                .with_secondary(prev.1, format!("this is {}", shape_to_string(&self.ty(prev.0).shape)))
                .with_secondary(s, format!("this is {}", shape_to_string(&t)))
                .with_note("sizes are compared from the last axis; each pair must be equal or one of them 1")
            })?;
        }
        ns.iter().map(|&(n, _)| self.broadcast_to(n, &shape, span)).collect()
    }

    /// The element type two operands of an arithmetic op agree on.
    fn common_dtype(&self, a: &Value, b: &Value, span: Span, sa: Span, sb: Span) -> R<Option<DType>> {
        let da = self.tensor_dtype(a, sa)?;
        let db = self.tensor_dtype(b, sb)?;
        match (da, db) {
            (Some(x), Some(y)) if x != y => {
                Err(Diagnostic::at(format!("element types {} and {} do not match", x.name(), y.name()), span)
                    .with_secondary(sa, format!("this is {}", x.name()))
                    .with_secondary(sb, format!("this is {}", y.name()))
                    .with_hint("convert with `float(…)` or `int(…)`"))
            }
            (x, y) => Ok(x.or(y)),
        }
    }

    /// A binary operator on values where at least one is a tensor.
    pub(super) fn tensor_binary(
        &mut self,
        op: BinOp,
        a: &Value,
        b: &Value,
        span: Span,
        sa: Span,
        sb: Span,
    ) -> R<Value> {
        if op == BinOp::MatMul {
            let x = self.as_tensor(a, None, sa)?;
            let y = self.as_tensor(b, None, sb)?;
            return self.matmul(x, y, span, sa, sb);
        }
        let dtype = self.common_dtype(a, b, span, sa, sb)?;
        let x = self.as_tensor(a, dtype, sa)?;
        let y = self.as_tensor(b, dtype, sb)?;
        let v = self.broadcast_all(&[(x, sa), (y, sb)], span)?;
        let bop = match op {
            BinOp::Add => BinaryOp::Add,
            BinOp::Sub => BinaryOp::Sub,
            BinOp::Mul => BinaryOp::Mul,
            BinOp::Div => BinaryOp::Div,
            BinOp::Pow => BinaryOp::Pow,
            BinOp::Eq => BinaryOp::Eq,
            BinOp::Ne => BinaryOp::Ne,
            BinOp::Lt => BinaryOp::Lt,
            BinOp::Le => BinaryOp::Le,
            BinOp::Gt => BinaryOp::Gt,
            BinOp::Ge => BinaryOp::Ge,
            BinOp::And => BinaryOp::And,
            BinOp::Or => BinaryOp::Or,
            BinOp::Rem | BinOp::MatMul => {
                return Err(Diagnostic::at(format!("`{}` is not defined on tensors", op.symbol()), span))
            }
        };
        let n = self.node(Op::Binary(bop), &v, span)?;
        Ok(self.tensor_value(n))
    }

    pub(super) fn unary(&mut self, op: UnaryOp, x: NodeId, span: Span) -> R<NodeId> {
        self.node(Op::Unary(op), &[x], span)
    }

    /// `a @ b`: the last axis of `a` with the second-to-last of `b`; leading axes broadcast.
    /// A rank-2 `b` (a weight) is shared by all leading axes of `a`.
    pub(super) fn matmul(&mut self, a: NodeId, b: NodeId, span: Span, sa: Span, sb: Span) -> R<Value> {
        let (ta, tb) = (self.ty(a).clone(), self.ty(b).clone());
        if ta.rank() < 2 || tb.rank() < 2 {
            return Err(Diagnostic::at("`@` needs operands of rank 2 or more", span)
                .with_secondary(sa, format!("this is {}", shape_to_string(&ta.shape)))
                .with_secondary(sb, format!("this is {}", shape_to_string(&tb.shape)))
                .with_hint("use `einsum` for vector products"));
        }
        if ta.shape[ta.rank() - 1] != tb.shape[tb.rank() - 2] {
            return Err(Diagnostic::at(
                format!(
                    "`@` needs the last axis of the left operand to match the second-to-last of the right: {} @ {}",
                    shape_to_string(&ta.shape),
                    shape_to_string(&tb.shape)
                ),
                span,
            )
            .with_secondary(sa, format!("this is {}", shape_to_string(&ta.shape)))
            .with_secondary(sb, format!("this is {}", shape_to_string(&tb.shape))));
        }
        let letters = b"abcdefghijklmnopqrstuvw";
        let (i, k, j) = (b'x', b'y', b'z');
        let (a, b, batch) = if tb.rank() == 2 {
            (a, b, ta.rank() - 2)
        } else {
            let batch =
                self.broadcast_shapes(&ta.shape[..ta.rank() - 2], &tb.shape[..tb.rank() - 2]).ok_or_else(|| {
                    Diagnostic::at("the leading axes of `@`'s operands cannot be broadcast together", span)
                })?;
            let mut sa_full = batch.clone();
            sa_full.extend_from_slice(&ta.shape[ta.rank() - 2..]);
            let mut sb_full = batch.clone();
            sb_full.extend_from_slice(&tb.shape[tb.rank() - 2..]);
            (self.broadcast_to(a, &sa_full, span)?, self.broadcast_to(b, &sb_full, span)?, batch.len())
        };
        if batch > letters.len() {
            return Err(Diagnostic::at("too many axes for `@`", span));
        }
        let lead = &letters[..batch];
        let mut ia = lead.to_vec();
        ia.extend([i, k]);
        let mut ib = if self.ty(b).rank() == 2 { Vec::new() } else { lead.to_vec() };
        ib.extend([k, j]);
        let mut out = lead.to_vec();
        out.extend([i, j]);
        let n =
            self.node(Op::Einsum(EinsumSpec { inputs: vec![ia, ib], output: out, pinned: false }), &[a, b], span)?;
        Ok(self.tensor_value(n))
    }

    /// Resolve a possibly negative axis.
    pub(super) fn axis(&self, axis: i64, rank: usize, span: Span) -> R<usize> {
        let a = if axis < 0 { axis + rank as i64 } else { axis };
        if a < 0 || a >= rank as i64 {
            return Err(Diagnostic::at(format!("axis {axis} is out of range for a tensor of rank {rank}"), span)
                .with_label(format!("valid axes are {} to {}", -(rank as i64), rank as i64 - 1)));
        }
        Ok(a as usize)
    }

    /// A reduction; `keep` leaves the reduced axes in place with size 1.
    pub(super) fn reduce(&mut self, op: ReduceOp, x: NodeId, axes: Vec<usize>, keep: bool, span: Span) -> R<NodeId> {
        let mut axes = axes;
        axes.sort();
        axes.dedup();
        let t = self.ty(x).clone();
        let r = self.node(Op::Reduce { op, axes: axes.clone() }, &[x], span)?;
        if !keep {
            return Ok(r);
        }
        let shape = t
            .shape
            .iter()
            .enumerate()
            .map(|(i, d)| if axes.contains(&i) { Dim::constant(1) } else { d.clone() })
            .collect();
        self.reshape(r, shape, span)
    }

    /// Number of elements over the given axes, as a tensor scalar (for means).
    pub(super) fn count(&mut self, x: NodeId, axes: &[usize], span: Span) -> R<NodeId> {
        let t = self.ty(x).clone();
        let mut n = Dim::constant(1);
        for &a in axes {
            n = n.checked_mul(&t.shape[a]).ok_or_else(|| Diagnostic::at("size overflow", span))?;
        }
        match n.as_const() {
            Some(c) => self.constant(c as f64, DType::F32, span),
            None => self.node(Op::SizeOf { size: n, dtype: DType::F32 }, &[], span),
        }
    }

    /// Slice `start..end` along `axis` where the bounds may be negative (from the end).
    pub(super) fn slice(
        &mut self,
        x: NodeId,
        axis: usize,
        start: Option<Value>,
        end: Option<Value>,
        span: Span,
    ) -> R<NodeId> {
        let size = self.ty(x).shape[axis].clone();
        let bound = |v: Option<Value>, default: Dim| -> R<Dim> {
            match v {
                None => Ok(default),
                Some(Value::Int(i)) if i < 0 => {
                    size.checked_add(&Dim::constant(i)).ok_or_else(|| Diagnostic::at("size overflow", span))
                }
                Some(v) => v
                    .as_dim()
                    .ok_or_else(|| Diagnostic::at(format!("a slice bound must be a size, found {}", v.kind()), span)),
            }
        };
        let s = bound(start, Dim::constant(0))?;
        let e = bound(end, size.clone())?;
        if s == Dim::constant(0) && e == size {
            return Ok(x);
        }
        self.node(Op::Slice { axis, start: s, end: e }, &[x], span)
    }
}
