//! Functions built into the language. Everything else (feature maps, norms, attention,
//! cross-entropy) is written in `models/std.tn` on top of these.

use super::value::{InitValue, Value};
use super::{Elaborator, R};
use crate::ir::{DType, Dim, EinsumSpec, F64Bits, Init, Op, ReduceOp, UnaryOp};
use tnc_grammar::{Diagnostic, Span};

/// Default value of a builtin's parameter.
#[derive(Clone, Copy, Debug)]
pub enum ArgDefault {
    Required,
    /// `none`: the parameter is optional and has no value.
    Unset,
    Int(i64),
    Float(f64),
    Bool(bool),
}

macro_rules! builtins {
    ($($variant:ident $name:literal ($($p:literal = $d:expr),*) $doc:literal;)*) => {
        /// A builtin function.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Builtin { $($variant),* }

        impl Builtin {
            pub const ALL: &'static [Builtin] = &[$(Builtin::$variant),*];

            pub fn name(self) -> &'static str {
                match self { $(Builtin::$variant => $name),* }
            }

            pub fn params(self) -> &'static [(&'static str, ArgDefault)] {
                use ArgDefault::*;
                match self { $(Builtin::$variant => &[$(($p, $d)),*]),* }
            }

            /// One line for `--help`-style listings.
            pub fn doc(self) -> &'static str {
                match self { $(Builtin::$variant => $doc),* }
            }
        }
    };
}

builtins! {
    Exp "exp" ("x" = Required) "e^x";
    Log "log" ("x" = Required) "natural logarithm";
    Sqrt "sqrt" ("x" = Required) "square root";
    Rsqrt "rsqrt" ("x" = Required) "1 / sqrt(x)";
    Abs "abs" ("x" = Required) "|x|";
    Relu "relu" ("x" = Required) "max(x, 0)";
    Elu "elu" ("x" = Required) "x if x > 0 else exp(x) - 1";
    Silu "silu" ("x" = Required) "x * sigmoid(x)";
    Sigmoid "sigmoid" ("x" = Required) "1 / (1 + exp(-x))";
    Tanh "tanh" ("x" = Required) "hyperbolic tangent";
    Sin "sin" ("x" = Required) "sine";
    Cos "cos" ("x" = Required) "cosine";
    Maximum "maximum" ("a" = Required, "b" = Required) "elementwise maximum";
    Minimum "minimum" ("a" = Required, "b" = Required) "elementwise minimum";
    Where "where" ("cond" = Required, "a" = Required, "b" = Required) "a where cond is true, else b";
    Sum "sum" ("x" = Required, "axis" = Unset, "keep" = Bool(true)) "sum over axes (all if none given)";
    Mean "mean" ("x" = Required, "axis" = Unset, "keep" = Bool(true)) "mean over axes";
    Max "max" ("x" = Required, "axis" = Unset, "keep" = Bool(true)) "maximum over axes";
    Min "min" ("x" = Required, "axis" = Unset, "keep" = Bool(true)) "minimum over axes";
    Cumsum "cumsum" ("x" = Required, "axis" = Required, "reverse" = Bool(false), "decay" = Unset) "inclusive cumulative sum; with decay d: s_n = x_n + d * s_(n-1)";
    Einsum "einsum" ("spec" = Required, "a" = Required, "b" = Unset) "Einstein summation, e.g. einsum(\"bnd,de->bne\", x, w)";
    Reshape "reshape" ("x" = Required, "shape" = Required) "new shape with the same number of elements (one -1 allowed)";
    Permute "permute" ("x" = Required, "axes" = Required) "reorder axes: output axis i is input axis axes[i]";
    Transpose "transpose" ("x" = Required, "a" = Int(-2), "b" = Int(-1)) "swap two axes";
    Unsqueeze "unsqueeze" ("x" = Required, "axis" = Required) "insert an axis of size 1";
    Pad "pad" ("x" = Required, "axis" = Required, "before" = Int(0), "after" = Int(0)) "zero padding along an axis";
    Concat "concat" ("xs" = Required, "axis" = Int(-1)) "join tensors along an axis";
    Gather "gather" ("table" = Required, "index" = Required) "rows of table selected by an i32 index tensor (embedding lookup)";
    Iota "iota" ("n" = Required) "the i32 tensor [0, 1, ..., n-1]";
    Float "float" ("x" = Required) "convert to f32";
    Int "int" ("x" = Required) "convert to i32 (truncating)";
    Size "size" ("x" = Required, "axis" = Required) "the size of an axis";
    Shape "shape" ("x" = Required) "the list of sizes";
    CeilDiv "ceil_div" ("a" = Required, "b" = Required) "ceil(a / b) for sizes";
    Dropout "dropout" ("x" = Required, "rate" = Required) "zero elements with probability rate in training; identity in evaluation";
    Assert "assert" ("cond" = Required, "message" = Required) "stop elaboration with message unless cond is true";
    Zeros "zeros" () "initializer: all zeros";
    Ones "ones" () "initializer: all ones";
    Normal "normal" ("std" = Float(1.0), "mean" = Float(0.0), "seed" = Unset) "initializer: normal distribution";
    Uniform "uniform" ("lo" = Required, "hi" = Required, "seed" = Unset) "initializer: uniform distribution on [lo, hi)";
    Xavier "xavier" ("gain" = Float(1.0), "seed" = Unset) "initializer: Glorot uniform";
}

impl Builtin {
    pub fn from_name(name: &str) -> Option<Builtin> {
        Builtin::ALL.iter().copied().find(|b| b.name() == name)
    }

    fn unary_op(self) -> Option<(UnaryOp, fn(f64) -> f64)> {
        Some(match self {
            Builtin::Exp => (UnaryOp::Exp, f64::exp),
            Builtin::Log => (UnaryOp::Log, f64::ln),
            Builtin::Sqrt => (UnaryOp::Sqrt, f64::sqrt),
            Builtin::Rsqrt => (UnaryOp::Rsqrt, |x| 1.0 / x.sqrt()),
            Builtin::Abs => (UnaryOp::Abs, f64::abs),
            Builtin::Relu => (UnaryOp::Relu, |x| x.max(0.0)),
            Builtin::Elu => (UnaryOp::Elu, |x| if x > 0.0 { x } else { x.exp() - 1.0 }),
            Builtin::Silu => (UnaryOp::Silu, |x| x / (1.0 + (-x).exp())),
            Builtin::Sigmoid => (UnaryOp::Sigmoid, |x| 1.0 / (1.0 + (-x).exp())),
            Builtin::Tanh => (UnaryOp::Tanh, f64::tanh),
            Builtin::Sin => (UnaryOp::Sin, f64::sin),
            Builtin::Cos => (UnaryOp::Cos, f64::cos),
            _ => return None,
        })
    }
}

/// Arguments of a builtin call after binding, by parameter position.
pub struct Args {
    pub values: Vec<Option<(Value, Span)>>,
    pub span: Span,
}

impl Args {
    fn get(&self, i: usize) -> (&Value, Span) {
        match &self.values[i] {
            Some((v, s)) => (v, *s),
            None => (&Value::Unit, self.span),
        }
    }

    fn is_set(&self, i: usize) -> bool {
        self.values[i].is_some()
    }
}

fn expect_int(v: &Value, span: Span, what: &str) -> R<i64> {
    match v {
        Value::Int(i) => Ok(*i),
        other => Err(Diagnostic::at(format!("{what} must be an integer, found {}", other.kind()), span)),
    }
}

fn expect_float(v: &Value, span: Span, what: &str) -> R<f64> {
    match v {
        Value::Int(i) => Ok(*i as f64),
        Value::Float(x) => Ok(*x),
        other => Err(Diagnostic::at(format!("{what} must be a number, found {}", other.kind()), span)),
    }
}

fn expect_bool(v: &Value, span: Span, what: &str) -> R<bool> {
    match v {
        Value::Bool(b) => Ok(*b),
        other => Err(Diagnostic::at(format!("{what} must be `true` or `false`, found {}", other.kind()), span)),
    }
}

fn seed(v: &Value, span: Span) -> R<Option<u64>> {
    match v {
        Value::Unit => Ok(None),
        Value::Int(i) if *i >= 0 => Ok(Some(*i as u64)),
        other => Err(Diagnostic::at(format!("a seed must be a non-negative integer, found {other}"), span)),
    }
}

impl Elaborator<'_> {
    pub(super) fn call_builtin(&mut self, b: Builtin, args: Args) -> R<Value> {
        let span = args.span;
        if let Some((op, fold)) = b.unary_op() {
            let (x, sx) = args.get(0);
            return match x {
                Value::Int(_) | Value::Float(_) => Ok(Value::Float(fold(expect_float(x, sx, "the argument")?))),
                _ => {
                    let n = self.as_tensor(x, Some(DType::F32), sx)?;
                    let r = self.unary(op, n, span)?;
                    Ok(self.tensor_value(r))
                }
            };
        }
        match b {
            Builtin::Maximum | Builtin::Minimum => {
                let ((a, sa), (c, sc)) = (args.get(0), args.get(1));
                if let (Some(x), Some(y)) = (num(a), num(c)) {
                    return Ok(Value::Float(if b == Builtin::Maximum { x.max(y) } else { x.min(y) }));
                }
                let x = self.as_tensor(a, Some(DType::F32), sa)?;
                let y = self.as_tensor(c, Some(DType::F32), sc)?;
                let v = self.broadcast_all(&[(x, sa), (y, sc)], span)?;
                let op = if b == Builtin::Maximum { crate::ir::BinaryOp::Max } else { crate::ir::BinaryOp::Min };
                let r = self.node(Op::Binary(op), &v, span)?;
                Ok(self.tensor_value(r))
            }
            Builtin::Where => {
                let ((c, scond), (a, sa), (x, sx)) = (args.get(0), args.get(1), args.get(2));
                let like = self.tensor_dtype(a, sa)?.or(self.tensor_dtype(x, sx)?);
                let cn = self.as_tensor(c, Some(DType::Bool), scond)?;
                if self.ty(cn).dtype != DType::Bool {
                    return Err(Diagnostic::at("the condition of `where` must be a bool tensor", scond)
                        .with_hint("compare with `>`, `==`, … to get one"));
                }
                let an = self.as_tensor(a, like, sa)?;
                let xn = self.as_tensor(x, like, sx)?;
                let v = self.broadcast_all(&[(cn, scond), (an, sa), (xn, sx)], span)?;
                let r = self.node(Op::Select, &v, span)?;
                Ok(self.tensor_value(r))
            }
            Builtin::Sum | Builtin::Mean | Builtin::Max | Builtin::Min => {
                let (x, sx) = args.get(0);
                let x = self.as_tensor(x, None, sx)?;
                let rank = self.ty(x).rank();
                let (axis, saxis) = args.get(1);
                let axes = self.axes(axis, rank, saxis)?;
                let keep = expect_bool(args.get(2).0, args.get(2).1, "`keep`")? && args.is_set(1);
                let op = match b {
                    Builtin::Max => ReduceOp::Max,
                    Builtin::Min => ReduceOp::Min,
                    _ => ReduceOp::Sum,
                };
                let mut r = self.reduce(op, x, axes.clone(), keep, span)?;
                if b == Builtin::Mean {
                    let n = self.count(x, &axes, span)?;
                    let shape = self.ty(r).shape.clone();
                    let n = self.broadcast_to(n, &shape, span)?;
                    r = self.node(Op::Binary(crate::ir::BinaryOp::Div), &[r, n], span)?;
                }
                Ok(self.tensor_value(r))
            }
            Builtin::Cumsum => {
                let (x, sx) = args.get(0);
                let x = self.as_tensor(x, Some(DType::F32), sx)?;
                let t = self.ty(x).clone();
                let axis = self.axis(expect_int(args.get(1).0, args.get(1).1, "`axis`")?, t.rank(), args.get(1).1)?;
                let reverse = expect_bool(args.get(2).0, args.get(2).1, "`reverse`")?;
                let mut operands = vec![x];
                if args.is_set(3) {
                    let (d, sd) = args.get(3);
                    let d = self.as_tensor(d, Some(DType::F32), sd)?;
                    let d = self.broadcast_to(d, &t.shape, sd).map_err(|e| {
                        e.with_note(format!(
                            "the decay must broadcast to the values' shape {}",
                            crate::ir::dim::shape_to_string(&t.shape)
                        ))
                    })?;
                    operands.push(d);
                }
                let r = self.node(Op::Scan { axis, reverse }, &operands, span)?;
                Ok(self.tensor_value(r))
            }
            Builtin::Einsum => {
                let (spec, sspec) = args.get(0);
                let Value::Str(spec) = spec else {
                    return Err(Diagnostic::at("the einsum spec must be a string such as \"bnd,de->bne\"", sspec));
                };
                let spec =
                    parse_einsum(spec, if args.is_set(2) { 2 } else { 1 }).map_err(|m| Diagnostic::at(m, sspec))?;
                let mut operands = vec![self.as_tensor(args.get(1).0, Some(DType::F32), args.get(1).1)?];
                if args.is_set(2) {
                    operands.push(self.as_tensor(args.get(2).0, Some(DType::F32), args.get(2).1)?);
                }
                let r = self.node(Op::Einsum(spec), &operands, span)?;
                Ok(self.tensor_value(r))
            }
            Builtin::Reshape => {
                let (x, sx) = args.get(0);
                let x = self.as_tensor(x, None, sx)?;
                let (shape, sshape) = args.get(1);
                let shape = self.reshape_target(x, shape, sshape)?;
                let r = self.node(Op::Reshape { shape }, &[x], span)?;
                Ok(self.tensor_value(r))
            }
            Builtin::Permute => {
                let (x, sx) = args.get(0);
                let x = self.as_tensor(x, None, sx)?;
                let rank = self.ty(x).rank();
                let (axes, saxes) = args.get(1);
                let Value::List(items) = axes else {
                    return Err(Diagnostic::at("`axes` must be a list of axes such as [0, 2, 1, 3]", saxes));
                };
                let perm = items
                    .iter()
                    .map(|v| self.axis(expect_int(v, saxes, "an axis")?, rank, saxes))
                    .collect::<R<Vec<_>>>()?;
                let r = self.node(Op::Permute { perm }, &[x], span)?;
                Ok(self.tensor_value(r))
            }
            Builtin::Transpose => {
                let (x, sx) = args.get(0);
                let x = self.as_tensor(x, None, sx)?;
                let rank = self.ty(x).rank();
                let a = self.axis(expect_int(args.get(1).0, args.get(1).1, "an axis")?, rank, args.get(1).1)?;
                let c = self.axis(expect_int(args.get(2).0, args.get(2).1, "an axis")?, rank, args.get(2).1)?;
                let mut perm: Vec<usize> = (0..rank).collect();
                perm.swap(a, c);
                let r = self.node(Op::Permute { perm }, &[x], span)?;
                Ok(self.tensor_value(r))
            }
            Builtin::Unsqueeze => {
                let (x, sx) = args.get(0);
                let x = self.as_tensor(x, None, sx)?;
                let mut shape = self.ty(x).shape.clone();
                let axis =
                    self.axis(expect_int(args.get(1).0, args.get(1).1, "`axis`")?, shape.len() + 1, args.get(1).1)?;
                shape.insert(axis, Dim::constant(1));
                let r = self.node(Op::Reshape { shape }, &[x], span)?;
                Ok(self.tensor_value(r))
            }
            Builtin::Pad => {
                let (x, sx) = args.get(0);
                let x = self.as_tensor(x, None, sx)?;
                let rank = self.ty(x).rank();
                let axis = self.axis(expect_int(args.get(1).0, args.get(1).1, "`axis`")?, rank, args.get(1).1)?;
                let before = self.size_arg(args.get(2))?;
                let after = self.size_arg(args.get(3))?;
                let r = self.node(Op::Pad { axis, before, after }, &[x], span)?;
                Ok(self.tensor_value(r))
            }
            Builtin::Concat => {
                let (xs, sxs) = args.get(0);
                let Value::List(items) = xs else {
                    return Err(Diagnostic::at("`concat` takes a list of tensors, e.g. concat([a, b], -1)", sxs));
                };
                let items = items.clone();
                let ns = items.iter().map(|v| self.as_tensor(v, None, sxs)).collect::<R<Vec<_>>>()?;
                let Some(&first) = ns.first() else {
                    return Err(Diagnostic::at("`concat` needs at least one tensor", sxs));
                };
                let rank = self.ty(first).rank();
                let axis = self.axis(expect_int(args.get(1).0, args.get(1).1, "`axis`")?, rank, args.get(1).1)?;
                let r = self.node(Op::Concat { axis }, &ns, span)?;
                Ok(self.tensor_value(r))
            }
            Builtin::Gather => {
                let t = self.as_tensor(args.get(0).0, None, args.get(0).1)?;
                let i = self.as_tensor(args.get(1).0, Some(DType::I32), args.get(1).1)?;
                let r = self.node(Op::Gather, &[t, i], span)?;
                Ok(self.tensor_value(r))
            }
            Builtin::Iota => {
                let len = self.size_arg(args.get(0))?;
                let r = self.node(Op::Iota { len, dtype: DType::I32 }, &[], span)?;
                Ok(self.tensor_value(r))
            }
            Builtin::Float | Builtin::Int => {
                let (x, sx) = args.get(0);
                let to = if b == Builtin::Float { DType::F32 } else { DType::I32 };
                match (x, to) {
                    (Value::Int(i), DType::F32) => return Ok(Value::Float(*i as f64)),
                    (Value::Float(f), DType::I32) if f.is_finite() && f.abs() < 9.0e15 => {
                        return Ok(Value::Int(f.trunc() as i64))
                    }
                    (Value::Float(_) | Value::Int(_), _) => return Ok(x.clone()),
                    _ => {}
                }
                let n = self.as_tensor(x, None, sx)?;
                if self.ty(n).dtype == to {
                    return Ok(self.tensor_value(n));
                }
                let r = self.node(Op::Cast { to }, &[n], span)?;
                Ok(self.tensor_value(r))
            }
            Builtin::Size => {
                let (x, sx) = args.get(0);
                let x = self.as_tensor(x, None, sx)?;
                let shape = self.ty(x).shape.clone();
                let axis =
                    self.axis(expect_int(args.get(1).0, args.get(1).1, "`axis`")?, shape.len(), args.get(1).1)?;
                Ok(dim_value(shape[axis].clone()))
            }
            Builtin::Shape => {
                let (x, sx) = args.get(0);
                let x = self.as_tensor(x, None, sx)?;
                Ok(Value::List(self.ty(x).shape.iter().cloned().map(dim_value).collect()))
            }
            Builtin::CeilDiv => {
                let a = self.size_arg(args.get(0))?;
                let (bv, sb) = args.get(1);
                let k = expect_int(bv, sb, "the divisor")?;
                if k <= 0 {
                    return Err(Diagnostic::at(format!("the divisor must be positive, got {k}"), sb));
                }
                Ok(dim_value(a.ceil_div(k).ok_or_else(|| Diagnostic::at("size overflow", span))?))
            }
            Builtin::Dropout => {
                let (x, sx) = args.get(0);
                let x = self.as_tensor(x, Some(DType::F32), sx)?;
                let (r, sr) = args.get(1);
                let rate = expect_float(r, sr, "the dropout rate")?;
                if !(0.0..1.0).contains(&rate) {
                    return Err(Diagnostic::at(format!("the dropout rate must be in [0, 1), got {rate}"), sr));
                }
                if rate == 0.0 {
                    return Ok(self.tensor_value(x));
                }
                let salt = self.dropout_salt();
                let n = self.node(Op::Dropout { rate: F64Bits::new(rate), salt }, &[x], span)?;
                Ok(self.tensor_value(n))
            }
            Builtin::Assert => {
                let (c, sc) = args.get(0);
                let (m, _) = args.get(1);
                match c {
                    Value::Bool(true) => Ok(Value::Unit),
                    Value::Bool(false) => {
                        let msg = match m {
                            Value::Str(s) => s.clone(),
                            other => other.to_string(),
                        };
                        Err(Diagnostic::at(msg, span).with_label("assertion failed"))
                    }
                    other => Err(Diagnostic::at(
                        format!("`assert` needs a condition known at compile time, found {}", other.kind()),
                        sc,
                    )),
                }
            }
            Builtin::Zeros => Ok(Value::Init(InitValue { init: Init::Zeros, seed: None })),
            Builtin::Ones => Ok(Value::Init(InitValue { init: Init::Ones, seed: None })),
            Builtin::Normal => {
                let std = expect_float(args.get(0).0, args.get(0).1, "`std`")?;
                let mean = expect_float(args.get(1).0, args.get(1).1, "`mean`")?;
                if std.is_nan() || std < 0.0 {
                    return Err(Diagnostic::at(format!("`std` must be non-negative, got {std}"), args.get(0).1));
                }
                Ok(Value::Init(InitValue {
                    init: Init::Normal { mean, std },
                    seed: seed(args.get(2).0, args.get(2).1)?,
                }))
            }
            Builtin::Uniform => {
                let lo = expect_float(args.get(0).0, args.get(0).1, "`lo`")?;
                let hi = expect_float(args.get(1).0, args.get(1).1, "`hi`")?;
                if lo.is_nan() || hi.is_nan() || lo > hi {
                    return Err(Diagnostic::at(format!("`uniform` needs lo ≤ hi, got {lo} and {hi}"), span));
                }
                Ok(Value::Init(InitValue { init: Init::Uniform { lo, hi }, seed: seed(args.get(2).0, args.get(2).1)? }))
            }
            Builtin::Xavier => {
                let gain = expect_float(args.get(0).0, args.get(0).1, "`gain`")?;
                Ok(Value::Init(InitValue { init: Init::Xavier { gain }, seed: seed(args.get(1).0, args.get(1).1)? }))
            }
            _ => unreachable!("unary builtins are handled above"),
        }
    }

    /// `axis` argument of a reduction: none (all axes), an axis, or a list of axes.
    fn axes(&self, v: &Value, rank: usize, span: Span) -> R<Vec<usize>> {
        match v {
            Value::Unit => Ok((0..rank).collect()),
            Value::Int(a) => Ok(vec![self.axis(*a, rank, span)?]),
            Value::List(items) => {
                items.iter().map(|i| self.axis(expect_int(i, span, "an axis")?, rank, span)).collect()
            }
            other => Err(Diagnostic::at(
                format!("`axis` must be an integer or a list of integers, found {}", other.kind()),
                span,
            )),
        }
    }

    fn size_arg(&self, (v, span): (&Value, Span)) -> R<Dim> {
        let d = v.as_dim().ok_or_else(|| Diagnostic::at(format!("expected a size, found {}", v.kind()), span))?;
        if d.as_const().is_some_and(|c| c < 0) {
            return Err(Diagnostic::at(format!("a size cannot be negative, got {d}"), span));
        }
        Ok(d)
    }

    /// The target of `reshape`, with at most one `-1` inferred from the element count.
    fn reshape_target(&self, x: crate::ir::NodeId, shape: &Value, span: Span) -> R<Vec<Dim>> {
        let Value::List(items) = shape else {
            return Err(Diagnostic::at("the shape must be a list such as [B, N, 8, 64]", span));
        };
        let mut dims = Vec::new();
        let mut infer_at = None;
        for (i, item) in items.iter().enumerate() {
            match item {
                Value::Int(-1) if infer_at.is_none() => {
                    infer_at = Some(i);
                    dims.push(Dim::constant(1));
                }
                v => dims.push(self.size_arg((v, span))?),
            }
        }
        if let Some(i) = infer_at {
            let total =
                crate::ir::dim::numel(&self.ty(x).shape).ok_or_else(|| Diagnostic::at("size overflow", span))?;
            let known = crate::ir::dim::numel(&dims).ok_or_else(|| Diagnostic::at("size overflow", span))?;
            let inferred = known.as_const().filter(|&k| k > 0).and_then(|k| total.div_exact(k)).ok_or_else(|| {
                Diagnostic::at(
                    format!("cannot infer the -1 in this shape: {total} elements into {}", shape_list(&dims, i)),
                    span,
                )
            })?;
            dims[i] = inferred;
        }
        Ok(dims)
    }
}

fn shape_list(dims: &[Dim], infer_at: usize) -> String {
    let parts: Vec<String> =
        dims.iter().enumerate().map(|(i, d)| if i == infer_at { "-1".into() } else { d.to_string() }).collect();
    format!("[{}]", parts.join(", "))
}

fn num(v: &Value) -> Option<f64> {
    match v {
        Value::Int(i) => Some(*i as f64),
        Value::Float(x) => Some(*x),
        _ => None,
    }
}

/// A size as a value: an integer when constant.
pub fn dim_value(d: Dim) -> Value {
    match d.as_const() {
        Some(c) => Value::Int(c),
        None => Value::Size(d),
    }
}

/// `"bhnd,bhne->bhde"` to a spec; whitespace is ignored.
fn parse_einsum(s: &str, operands: usize) -> Result<EinsumSpec, String> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    let (lhs, rhs) =
        s.split_once("->").ok_or_else(|| format!("einsum spec `{s}` needs `->` and the output indices"))?;
    let inputs: Vec<Vec<u8>> = lhs.split(',').map(|p| p.bytes().collect()).collect();
    if inputs.len() != operands {
        return Err(format!("einsum spec `{s}` names {} operands but {operands} were given", inputs.len()));
    }
    for b in inputs.iter().flatten().chain(rhs.as_bytes()) {
        if !b.is_ascii_lowercase() {
            return Err(format!("einsum indices must be lowercase letters; `{}` is not", *b as char));
        }
    }
    Ok(EinsumSpec { inputs, output: rhs.bytes().collect(), pinned: false })
}
