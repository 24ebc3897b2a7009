//! A small graph builder for gradient rules: every node it adds carries the span of the
//! forward node being differentiated, so a type error in a backward op (a bug, or an
//! input the rules cannot handle) points at the source expression it came from.

use super::AutodiffError;
use crate::ir::{BinaryOp, DType, Dim, F64Bits, Graph, NodeId, Op, ReduceOp, UnaryOp};
use tnc_grammar::Span;

pub(crate) type R<T> = Result<T, AutodiffError>;

pub(crate) struct Builder<'g> {
    pub g: &'g mut Graph,
    pub span: Option<Span>,
}

impl Builder<'_> {
    pub fn err(&self, message: impl Into<String>) -> AutodiffError {
        AutodiffError { message: message.into(), span: self.span }
    }

    pub fn add(&mut self, op: Op, operands: &[NodeId]) -> R<NodeId> {
        let kind = op.kind();
        self.g.add(op, operands, self.span).map_err(|e| self.err(format!("building the gradient (`{kind}`): {e}")))
    }

    pub fn shape(&self, x: NodeId) -> Vec<Dim> {
        self.g.ty(x).shape.clone()
    }

    /// A scalar f32 constant.
    pub fn scalar(&mut self, v: f64) -> R<NodeId> {
        self.add(Op::Constant { value: F64Bits::new(v), dtype: DType::F32 }, &[])
    }

    /// An f32 constant of the given shape: a scalar reshaped to all-ones, then broadcast.
    pub fn splat(&mut self, v: f64, shape: &[Dim]) -> R<NodeId> {
        let c = self.scalar(v)?;
        if shape.is_empty() {
            return Ok(c);
        }
        let ones = vec![Dim::constant(1); shape.len()];
        let c = self.add(Op::Reshape { shape: ones }, &[c])?;
        self.add(Op::Broadcast { shape: shape.to_vec() }, &[c])
    }

    /// An f32 constant shaped like `x`.
    pub fn like(&mut self, v: f64, x: NodeId) -> R<NodeId> {
        let s = self.shape(x);
        self.splat(v, &s)
    }

    pub fn un(&mut self, u: UnaryOp, x: NodeId) -> R<NodeId> {
        self.add(Op::Unary(u), &[x])
    }

    pub fn bin(&mut self, b: BinaryOp, x: NodeId, y: NodeId) -> R<NodeId> {
        self.add(Op::Binary(b), &[x, y])
    }

    pub fn mul(&mut self, x: NodeId, y: NodeId) -> R<NodeId> {
        self.bin(BinaryOp::Mul, x, y)
    }

    pub fn sum(&mut self, x: NodeId, y: NodeId) -> R<NodeId> {
        self.bin(BinaryOp::Add, x, y)
    }

    pub fn sub(&mut self, x: NodeId, y: NodeId) -> R<NodeId> {
        self.bin(BinaryOp::Sub, x, y)
    }

    pub fn div(&mut self, x: NodeId, y: NodeId) -> R<NodeId> {
        self.bin(BinaryOp::Div, x, y)
    }

    /// `x * c` for a constant `c`.
    pub fn scale(&mut self, x: NodeId, c: f64) -> R<NodeId> {
        let k = self.like(c, x)?;
        self.mul(x, k)
    }

    /// `x + c` for a constant `c`.
    pub fn shift(&mut self, x: NodeId, c: f64) -> R<NodeId> {
        let k = self.like(c, x)?;
        self.sum(x, k)
    }

    pub fn select(&mut self, c: NodeId, a: NodeId, b: NodeId) -> R<NodeId> {
        self.add(Op::Select, &[c, a, b])
    }

    /// `cond ? g : 0`, and `cond ? 0 : g`: the two halves of a gradient routed by a mask.
    pub fn route(&mut self, cond: NodeId, g: NodeId) -> R<(NodeId, NodeId)> {
        let z = self.like(0.0, g)?;
        let on = self.select(cond, g, z)?;
        let off = self.select(cond, z, g)?;
        Ok((on, off))
    }

    /// `x > 0` as a bool mask (the branch condition of relu, elu and abs).
    pub fn positive(&mut self, x: NodeId) -> R<NodeId> {
        let z = self.like(0.0, x)?;
        self.bin(BinaryOp::Gt, x, z)
    }

    /// Re-insert size-1 axes at the (ascending) `axes` of `full`, then broadcast to
    /// `full`: the adjoint of a reduction over `axes`.
    pub fn expand(&mut self, x: NodeId, axes: &[usize], full: &[Dim]) -> R<NodeId> {
        let kept: Vec<Dim> = full
            .iter()
            .enumerate()
            .map(|(i, d)| if axes.contains(&i) { Dim::constant(1) } else { d.clone() })
            .collect();
        let x = if self.shape(x) == kept { x } else { self.add(Op::Reshape { shape: kept.clone() }, &[x])? };
        if kept == full {
            return Ok(x);
        }
        self.add(Op::Broadcast { shape: full.to_vec() }, &[x])
    }

    pub fn reduce_sum(&mut self, x: NodeId, axes: Vec<usize>) -> R<NodeId> {
        if axes.is_empty() {
            return Ok(x);
        }
        self.add(Op::Reduce { op: ReduceOp::Sum, axes }, &[x])
    }

    pub fn slice(&mut self, x: NodeId, axis: usize, start: Dim, end: Dim) -> R<NodeId> {
        self.add(Op::Slice { axis, start, end }, &[x])
    }

    pub fn pad(&mut self, x: NodeId, axis: usize, before: Dim, after: Dim) -> R<NodeId> {
        self.add(Op::Pad { axis, before, after }, &[x])
    }

    /// Size of `axis` minus one (for shifting a sequence by one step).
    fn axis_minus_one(&self, x: NodeId, axis: usize) -> R<(Dim, Dim)> {
        let n = self.shape(x)[axis].clone();
        let m = n.checked_sub(&Dim::constant(1)).ok_or_else(|| self.err("size overflow"))?;
        Ok((n, m))
    }

    /// `out_m = x_{m+1}` along `axis`, with 0 past the end.
    pub fn shift_next(&mut self, x: NodeId, axis: usize) -> R<NodeId> {
        let (n, _) = self.axis_minus_one(x, axis)?;
        let s = self.slice(x, axis, Dim::constant(1), n)?;
        self.pad(s, axis, Dim::constant(0), Dim::constant(1))
    }

    /// `out_m = x_{m-1}` along `axis`, with 0 before the start.
    pub fn shift_prev(&mut self, x: NodeId, axis: usize) -> R<NodeId> {
        let (_, m) = self.axis_minus_one(x, axis)?;
        let s = self.slice(x, axis, Dim::constant(0), m)?;
        self.pad(s, axis, Dim::constant(1), Dim::constant(0))
    }
}
