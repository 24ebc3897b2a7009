//! The closed set of graph IR operations.
//!
//! Primitive ops only: everything in `models/std.tn` (feature maps, norms, attention,
//! cross-entropy) is built from these by elaboration. Normal-form ops (linear attention,
//! block attention, fused norm, fused cross-entropy) are added by `recognize` later.
//!
//! Ops derive `Hash`/`Eq` so that CSE compares them structurally. Floating-point
//! constants are stored by bit pattern ([`F64Bits`]): `-0.0` and `0.0` stay distinct
//! (they differ under division), and every NaN is canonicalized to one quiet NaN so that
//! two NaN constants compare equal.

use super::dim::Dim;
use super::types::DType;
use std::fmt;

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct F64Bits(u64);

impl F64Bits {
    pub const CANONICAL_NAN: u64 = 0x7ff8_0000_0000_0000;

    pub fn new(x: f64) -> F64Bits {
        if x.is_nan() {
            F64Bits(Self::CANONICAL_NAN)
        } else {
            F64Bits(x.to_bits())
        }
    }

    pub fn get(self) -> f64 {
        f64::from_bits(self.0)
    }
}

impl fmt::Debug for F64Bits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", fmt_f64(self.get()))
    }
}

/// Shortest text that parses back to the same f64 (`1`, `0.5`, `1e-8`, `-0`, `inf`, `nan`).
pub fn fmt_f64(x: f64) -> String {
    if x.is_nan() {
        "nan".into()
    } else if x.is_infinite() {
        if x > 0.0 {
            "inf".into()
        } else {
            "-inf".into()
        }
    } else {
        let s = format!("{x:?}");
        s.strip_suffix(".0").map(str::to_string).unwrap_or(s)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum UnaryOp {
    Neg,
    Exp,
    Log,
    Sqrt,
    Rsqrt,
    Recip,
    Abs,
    Relu,
    /// `x` for `x > 0`, `exp(x) - 1` otherwise (α = 1).
    Elu,
    /// `x · sigmoid(x)`.
    Silu,
    Sigmoid,
    Tanh,
    Sin,
    Cos,
    /// Logical not (bool only).
    Not,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Pow,
    Max,
    Min,
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
    And,
    Or,
}

impl BinaryOp {
    pub fn is_comparison(self) -> bool {
        matches!(self, BinaryOp::Lt | BinaryOp::Le | BinaryOp::Gt | BinaryOp::Ge | BinaryOp::Eq | BinaryOp::Ne)
    }

    pub fn is_logical(self) -> bool {
        matches!(self, BinaryOp::And | BinaryOp::Or)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ReduceOp {
    Sum,
    Max,
    Min,
}

/// An einsum over one or two operands. Index letters are bytes `a..=z`; each operand
/// lists one letter per axis (no repeated letter within one operand), and every output
/// letter occurs in some operand. Letters absent from the output are summed over.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EinsumSpec {
    pub inputs: Vec<Vec<u8>>,
    pub output: Vec<u8>,
    /// Written inside a `precision f32 { … }` block: the product keeps f32 operands under
    /// any `--precision` (`passes/precision.rs`), and so do the products of its gradient.
    pub pinned: bool,
}

impl fmt::Display for EinsumSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ins: Vec<String> = self.inputs.iter().map(|i| String::from_utf8_lossy(i).into_owned()).collect();
        write!(f, "{}->{}", ins.join(","), String::from_utf8_lossy(&self.output))?;
        if self.pinned {
            write!(f, " f32")?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// A model input; its name and type are in `Graph::inputs[index]`.
    Input {
        index: u32,
    },
    /// A parameter or buffer; see `Graph::params[index]`.
    Param {
        index: u32,
    },
    /// A scalar constant.
    Constant {
        value: F64Bits,
        dtype: DType,
    },
    /// `[0, 1, …, len-1]` as a rank-1 tensor.
    Iota {
        len: Dim,
        dtype: DType,
    },
    /// The run-time value of a size expression (e.g. `N` in a mean over tokens), a scalar.
    SizeOf {
        size: Dim,
        dtype: DType,
    },
    Unary(UnaryOp),
    /// Operands have equal shapes and dtypes (elaboration inserts broadcasts).
    Binary(BinaryOp),
    /// `(cond: bool, a, b)`, equal shapes.
    Select,
    Cast {
        to: DType,
    },
    /// Reduce the listed axes (ascending), removing them.
    Reduce {
        op: ReduceOp,
        axes: Vec<usize>,
    },
    Einsum(EinsumSpec),
    /// Inclusive scan along `axis`: `s_n = x_n + s_{n-1}` (or from the end if `reverse`).
    /// With a second operand `d` of the same shape it is the decayed scan
    /// `s_n = x_n + d_n · s_{n-1}`.
    Scan {
        axis: usize,
        reverse: bool,
    },
    Reshape {
        shape: Vec<Dim>,
    },
    /// Expand size-1 axes to `shape` (same rank).
    Broadcast {
        shape: Vec<Dim>,
    },
    /// Output axis `i` is input axis `perm[i]`.
    Permute {
        perm: Vec<usize>,
    },
    /// Elements `start..end` along `axis`.
    Slice {
        axis: usize,
        start: Dim,
        end: Dim,
    },
    /// Zero padding along `axis`.
    Pad {
        axis: usize,
        before: Dim,
        after: Dim,
    },
    /// Join the operands along `axis`.
    Concat {
        axis: usize,
    },
    /// `(table [V, rest…], index: i32 [I…])` → `[I…, rest…]`.
    Gather,
    /// `(values [I…, rest…], index: i32 [I…])` → `[rows, rest…]`: each row of `values` is
    /// added into row `index[i]` of zeros (repeats accumulate). The adjoint of `Gather`.
    ScatterAdd {
        rows: Dim,
    },
    /// Zero each element with probability `rate` and scale the rest by `1/(1-rate)`,
    /// using the counter-based generator keyed by (run seed, step, `salt`, element index).
    /// Identity in evaluation.
    Dropout {
        rate: F64Bits,
        salt: u64,
    },
    /// Normal form of linear attention (see `normal_form.rs`), created by `recognize`.
    LinearAttention(Box<super::normal_form::LinearAttention>),
    /// Per-token cross-entropy against a vocabulary table, `(x, table, targets)`, and its
    /// two backward ops `(x, table, targets, g)` (see `cross_entropy.rs`).
    CrossEntropy(super::cross_entropy::CrossEntropy),
    CrossEntropyGradX(super::cross_entropy::CrossEntropy),
    CrossEntropyGradTable(super::cross_entropy::CrossEntropy),
    CrossEntropyCorrect(super::cross_entropy::CrossEntropy),
    /// Normal form of softmax/ReLU attention within blocks (see `normal_form.rs`).
    BlockAttention(Box<super::normal_form::BlockAttention>),
    /// Its backward, one op returning `[dq' | dk' | dv']`.
    BlockAttentionGrad(Box<super::normal_form::BlockAttentionGrad>),
}

impl Op {
    /// The same op with every size it carries mapped by `f` (a region's too); `None` if
    /// `f` fails on one.
    pub fn map_dims(&self, f: &dyn Fn(&Dim) -> Option<Dim>) -> Option<Op> {
        let all = |v: &[Dim]| v.iter().map(f).collect::<Option<Vec<_>>>();
        Some(match self {
            Op::Iota { len, dtype } => Op::Iota { len: f(len)?, dtype: *dtype },
            Op::SizeOf { size, dtype } => Op::SizeOf { size: f(size)?, dtype: *dtype },
            Op::Reshape { shape } => Op::Reshape { shape: all(shape)? },
            Op::Broadcast { shape } => Op::Broadcast { shape: all(shape)? },
            Op::Slice { axis, start, end } => Op::Slice { axis: *axis, start: f(start)?, end: f(end)? },
            Op::Pad { axis, before, after } => Op::Pad { axis: *axis, before: f(before)?, after: f(after)? },
            Op::ScatterAdd { rows } => Op::ScatterAdd { rows: f(rows)? },
            Op::LinearAttention(a) => {
                let (q, k, v) = (a.q.map_dims(f)?, a.k.map_dims(f)?, a.v.map_dims(f)?);
                Op::LinearAttention(Box::new(super::normal_form::LinearAttention { q, k, v, ..(**a).clone() }))
            }
            Op::BlockAttention(a) => Op::BlockAttention(Box::new(a.map_dims(f)?)),
            Op::BlockAttentionGrad(a) => Op::BlockAttentionGrad(Box::new(super::normal_form::BlockAttentionGrad {
                forward: a.forward.map_dims(f)?,
                weights_vjp: a.weights_vjp.map_dims(f)?,
            })),
            _ => self.clone(),
        })
    }

    /// Ops created by `recognize` (they cannot appear inside regions).
    pub fn is_normal_form(&self) -> bool {
        matches!(
            self,
            Op::CrossEntropy(_) | Op::CrossEntropyGradX(_) | Op::CrossEntropyGradTable(_) | Op::CrossEntropyCorrect(_)
        ) || matches!(self, Op::LinearAttention(_) | Op::BlockAttention(_) | Op::BlockAttentionGrad(_))
    }

    /// Short, stable name used in printed IR and op-count tables.
    pub fn kind(&self) -> &'static str {
        match self {
            Op::Input { .. } => "input",
            Op::Param { .. } => "param",
            Op::Constant { .. } => "const",
            Op::Iota { .. } => "iota",
            Op::SizeOf { .. } => "sizeof",
            Op::Unary(u) => match u {
                UnaryOp::Neg => "neg",
                UnaryOp::Exp => "exp",
                UnaryOp::Log => "log",
                UnaryOp::Sqrt => "sqrt",
                UnaryOp::Rsqrt => "rsqrt",
                UnaryOp::Recip => "recip",
                UnaryOp::Abs => "abs",
                UnaryOp::Relu => "relu",
                UnaryOp::Elu => "elu",
                UnaryOp::Silu => "silu",
                UnaryOp::Sigmoid => "sigmoid",
                UnaryOp::Tanh => "tanh",
                UnaryOp::Sin => "sin",
                UnaryOp::Cos => "cos",
                UnaryOp::Not => "not",
            },
            Op::Binary(b) => match b {
                BinaryOp::Add => "add",
                BinaryOp::Sub => "sub",
                BinaryOp::Mul => "mul",
                BinaryOp::Div => "div",
                BinaryOp::Pow => "pow",
                BinaryOp::Max => "max",
                BinaryOp::Min => "min",
                BinaryOp::Lt => "lt",
                BinaryOp::Le => "le",
                BinaryOp::Gt => "gt",
                BinaryOp::Ge => "ge",
                BinaryOp::Eq => "eq",
                BinaryOp::Ne => "ne",
                BinaryOp::And => "and",
                BinaryOp::Or => "or",
            },
            Op::Select => "select",
            Op::Cast { .. } => "cast",
            Op::Reduce { op, .. } => match op {
                ReduceOp::Sum => "reduce_sum",
                ReduceOp::Max => "reduce_max",
                ReduceOp::Min => "reduce_min",
            },
            Op::Einsum(_) => "einsum",
            Op::Scan { .. } => "scan",
            Op::Reshape { .. } => "reshape",
            Op::Broadcast { .. } => "broadcast",
            Op::Permute { .. } => "permute",
            Op::Slice { .. } => "slice",
            Op::Pad { .. } => "pad",
            Op::Concat { .. } => "concat",
            Op::Gather => "gather",
            Op::ScatterAdd { .. } => "scatter_add",
            Op::Dropout { .. } => "dropout",
            Op::LinearAttention(_) => "linear_attention",
            Op::CrossEntropy(_) => "cross_entropy",
            Op::CrossEntropyGradX(_) => "cross_entropy_grad_x",
            Op::CrossEntropyGradTable(_) => "cross_entropy_grad_table",
            Op::CrossEntropyCorrect(_) => "cross_entropy_correct",
            Op::BlockAttention(_) => "block_attention",
            Op::BlockAttentionGrad(_) => "block_attention_grad",
        }
    }
}
