//! Evaluation of statements and expressions during elaboration.

use super::builtins::{dim_value, Builtin};
use super::value::{Callee, Func, Value};
use super::{Elaborator, Frame, Override, MAX_LOOP_TRIPS, R};
use crate::ir::dim::shape_to_string;
use crate::ir::{DType, Dim, UnaryOp};
use std::collections::HashMap;
use std::rc::Rc;
use tnc_grammar::ast::*;
use tnc_grammar::diag::did_you_mean;
use tnc_grammar::{Diagnostic, Span};

impl Elaborator<'_> {
    pub(super) fn elaborate_model(&mut self, model: &FnDecl, overrides: &[&Override]) -> R<()> {
        let mut frame = Frame { vars: HashMap::new(), is_model: true };
        for o in overrides {
            if !model.params.iter().any(|p| p.name.name == o.target) {
                let names: Vec<&str> = model.params.iter().map(|p| p.name.name.as_str()).collect();
                let mut d = Diagnostic::at(
                    format!("`--set {}`: model `{}` has no hyper-parameter `{}`", o.target, model.name.name, o.target),
                    o.span,
                )
                .with_note(format!("its hyper-parameters are: {}", names.join(", ")));
                if let Some(h) = did_you_mean(&o.target, names.iter().copied()) {
                    d = d.with_hint(h);
                }
                return Err(d);
            }
        }
        for p in &model.params {
            let value = match overrides.iter().rev().find(|o| o.target == p.name.name) {
                Some(o) => self.eval(&o.value, &mut Frame { vars: HashMap::new(), is_model: false })?,
                None => match &p.default {
                    Some(e) => self.eval(e, &mut frame)?,
                    None => {
                        return Err(Diagnostic::at(
                            format!("hyper-parameter `{}` of a model needs a default value", p.name.name),
                            p.name.span,
                        )
                        .with_hint(format!("write `{} = …` in the model's parameter list", p.name.name)))
                    }
                },
            };
            frame.vars.insert(p.name.name.clone(), value);
        }
        self.eval(&model.body, &mut frame)?;
        Ok(())
    }

    fn exec_block(&mut self, b: &Block, frame: &mut Frame) -> R<Value> {
        let mut last = Value::Unit;
        for s in &b.stmts {
            last = self.exec_stmt(s, frame)?;
        }
        Ok(last)
    }

    fn exec_stmt(&mut self, s: &Stmt, frame: &mut Frame) -> R<Value> {
        match s {
            Stmt::Expr(e) => self.eval(e, frame),
            Stmt::Assign { name, value, .. } => {
                let v = self.eval(value, frame)?;
                frame.vars.insert(name.name.clone(), v);
                Ok(Value::Unit)
            }
            Stmt::For { var, start, end, body, span } => {
                let lo = self.int_of(start, frame, "a loop bound")?;
                let hi = self.int_of(end, frame, "a loop bound")?;
                // `0..layers` with `layers = -1` would silently build a model without
                // layers: a bound below the start is an error, an empty `n..n` is not.
                if hi < lo {
                    return Err(Diagnostic::at(format!("this loop runs backwards, from {lo} down to {hi}"), end.span)
                        .with_label(format!("the end is {hi}, below the start {lo}"))
                        .with_hint(
                            "a loop `a..b` runs b - a times and needs b ≥ a; check the value given for its bound",
                        ));
                }
                if hi.saturating_sub(lo) > MAX_LOOP_TRIPS {
                    return Err(Diagnostic::at(
                        format!("this loop runs {} times", hi.saturating_sub(lo)),
                        span.to(end.span),
                    )
                    .with_label(format!("the limit is {MAX_LOOP_TRIPS} iterations")));
                }
                let segment = match &end.kind {
                    ExprKind::Name(n) => n.clone(),
                    _ => var.name.clone(),
                };
                for i in lo..hi {
                    self.step(*span)?;
                    frame.vars.insert(var.name.clone(), Value::Int(i));
                    self.scope.push(format!("{segment}.{i}"));
                    let r = self.exec_block(body, frame);
                    self.scope.pop();
                    r?;
                }
                Ok(Value::Unit)
            }
            Stmt::Precision { dtype, body, .. } => {
                if dtype.name != "f32" {
                    return Err(Diagnostic::at(format!("`precision {}` is not supported", dtype.name), dtype.span)
                        .with_label("only `f32` can be pinned")
                        .with_hint(
                            "`precision f32 { … }` keeps the products inside at full precision; \
                             `--precision bf16` narrows the others",
                        ));
                }
                self.pinned_blocks += 1;
                let r = self.exec_block(body, frame);
                self.pinned_blocks -= 1;
                r?;
                Ok(Value::Unit)
            }
            Stmt::Input { name, ty, span } => {
                if !frame.is_model {
                    return Err(Diagnostic::at("`input` can only be declared in a model", *span)
                        .with_hint("pass the tensor to this function as an argument"));
                }
                if self.graph().inputs.iter().any(|i| i.name == name.name) {
                    return Err(Diagnostic::at(format!("input `{}` is declared twice", name.name), name.span));
                }
                let t = self.input_type(ty, frame)?;
                let n = self.graph_mut().add_input(name.name.clone(), t, Some(name.span));
                frame.vars.insert(name.name.clone(), self.tensor_value(n));
                Ok(Value::Unit)
            }
            Stmt::Output { name, value, span } => {
                if !frame.is_model {
                    return Err(Diagnostic::at("`output` can only be declared in a model", *span)
                        .with_hint("return the value from this function instead"));
                }
                if let Some(prev) = self.outputs_seen.get(&name.name) {
                    return Err(Diagnostic::at(format!("output `{}` is declared twice", name.name), name.span)
                        .with_secondary(*prev, "first declared here"));
                }
                let v = self.eval(value, frame)?;
                let n = self.as_tensor(&v, None, value.span)?;
                if name.name == "loss" {
                    let t = self.ty(n);
                    if !t.shape.is_empty() || t.dtype != DType::F32 {
                        return Err(Diagnostic::at(
                            format!("the loss must be an f32 scalar, but this is {t}"),
                            value.span,
                        )
                        .with_hint("reduce it with `mean(…)` or `sum(…)`"));
                    }
                }
                self.outputs_seen.insert(name.name.clone(), name.span);
                self.graph_mut().add_output(name.name.clone(), n);
                frame.vars.insert(name.name.clone(), v);
                Ok(Value::Unit)
            }
            Stmt::Tensor { kind, names, ty, init, attrs, span } => {
                self.declare_tensors(*kind, names, ty, init.as_ref(), attrs, *span, frame)?;
                Ok(Value::Unit)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn int_of(&mut self, e: &Expr, frame: &mut Frame, what: &str) -> R<i64> {
        match self.eval(e, frame)? {
            Value::Int(i) => Ok(i),
            other => Err(Diagnostic::at(
                format!("{what} must be an integer known at compile time, found {}", other.kind()),
                e.span,
            )),
        }
    }

    pub(super) fn eval(&mut self, e: &Expr, frame: &mut Frame) -> R<Value> {
        self.step(e.span)?;
        match &e.kind {
            ExprKind::Int(i) => Ok(Value::Int(*i)),
            ExprKind::Float(x) => Ok(Value::Float(*x)),
            ExprKind::Bool(b) => Ok(Value::Bool(*b)),
            ExprKind::Str(s) => Ok(Value::Str(s.clone())),
            ExprKind::Name(n) => self.lookup(n, e.span, frame),
            ExprKind::List(items) => Ok(Value::List(items.iter().map(|i| self.eval(i, frame)).collect::<R<_>>()?)),
            ExprKind::Block(b) => self.exec_block(b, frame),
            ExprKind::If { branches, otherwise } => {
                for (cond, body) in branches {
                    match self.eval(cond, frame)? {
                        Value::Bool(true) => return self.exec_block(body, frame),
                        Value::Bool(false) => {}
                        other => {
                            return Err(Diagnostic::at(
                                format!(
                                    "the condition of `if` must be a boolean known at compile time, found {}",
                                    other.kind()
                                ),
                                cond.span,
                            )
                            .with_hint("use `where(cond, a, b)` to choose between tensors elementwise"))
                        }
                    }
                }
                match otherwise {
                    Some(b) => self.exec_block(b, frame),
                    None => Ok(Value::Unit),
                }
            }
            ExprKind::Lambda { params, body } => Ok(Value::Func(Rc::new(Func {
                callee: Callee::Lambda {
                    params: params.clone(),
                    body: Rc::new((**body).clone()),
                    captured: frame.vars.clone(),
                    span: e.span,
                },
                bound: Vec::new(),
            }))),
            ExprKind::Unary { op, operand } => {
                let v = self.eval(operand, frame)?;
                self.unary_value(*op, v, e.span, operand.span)
            }
            ExprKind::Binary { op, lhs, rhs } => {
                // `and`/`or` on compile-time booleans short-circuit.
                let a = self.eval(lhs, frame)?;
                if let (BinOp::And, Value::Bool(false)) | (BinOp::Or, Value::Bool(true)) = (op, &a) {
                    return Ok(a);
                }
                let b = self.eval(rhs, frame)?;
                self.binary_value(*op, a, b, e.span, lhs.span, rhs.span)
            }
            ExprKind::Call { callee, args } => {
                let f = self.eval(callee, frame)?;
                let Value::Func(f) = f else {
                    return Err(Diagnostic::at(format!("{} is not a function", f.kind()), callee.span)
                        .with_label(format!("this is {f}")));
                };
                let mut values = Vec::with_capacity(args.len());
                for a in args {
                    values.push((a.name.clone(), self.eval(&a.value, frame)?, a.value.span));
                }
                let scope_name = match &callee.kind {
                    ExprKind::Name(n) => Some(n.as_str()),
                    _ => None,
                };
                self.call(f, values, e.span, scope_name)
            }
            ExprKind::Index { base, items } => {
                let b = self.eval(base, frame)?;
                self.index(b, items, e.span, base.span, frame)
            }
        }
    }

    fn lookup(&self, n: &str, span: Span, frame: &Frame) -> R<Value> {
        if let Some(v) = frame.vars.get(n) {
            return Ok(v.clone());
        }
        if n == "none" {
            return Ok(Value::Unit);
        }
        if let Some(f) = self.program.functions.get(n) {
            return Ok(Value::Func(Rc::new(Func { callee: Callee::User(f.clone()), bound: Vec::new() })));
        }
        if let Some(b) = Builtin::from_name(n) {
            return Ok(Value::Func(Rc::new(Func { callee: Callee::Builtin(b), bound: Vec::new() })));
        }
        let candidates = frame
            .vars
            .keys()
            .map(|s| s.as_str())
            .chain(self.program.functions.keys().map(|s| s.as_str()))
            .chain(Builtin::ALL.iter().map(|b| b.name()));
        let mut d = Diagnostic::at(format!("unknown name `{n}`"), span).with_label("not found in this scope");
        if let Some(h) = did_you_mean(n, candidates) {
            d = d.with_hint(h);
        } else if super::load::STD_SOURCE.contains(&format!("fn {n}(")) && !self.program.functions.contains_key(n) {
            d = d.with_hint(format!("`{n}` is defined in the standard library: add `use std` at the top of the file"));
        }
        Err(d)
    }

    fn unary_value(&mut self, op: UnOp, v: Value, span: Span, sv: Span) -> R<Value> {
        match (op, v) {
            (UnOp::Neg, Value::Int(i)) => i.checked_neg().map(Value::Int).ok_or_else(|| overflow(span)),
            (UnOp::Neg, Value::Float(x)) => Ok(Value::Float(-x)),
            (UnOp::Neg, Value::Size(d)) => Ok(dim_value(d.checked_neg().ok_or_else(|| overflow(span))?)),
            (UnOp::Not, Value::Bool(b)) => Ok(Value::Bool(!b)),
            (op, v @ Value::Tensor(_)) => {
                let n = self.as_tensor(&v, None, sv)?;
                let u = if op == UnOp::Neg { UnaryOp::Neg } else { UnaryOp::Not };
                let r = self.unary(u, n, span)?;
                Ok(self.tensor_value(r))
            }
            (op, v) => Err(Diagnostic::at(
                format!("`{}` cannot be applied to {}", if op == UnOp::Neg { "-" } else { "not" }, v.kind()),
                span,
            )),
        }
    }

    fn binary_value(&mut self, op: BinOp, a: Value, b: Value, span: Span, sa: Span, sb: Span) -> R<Value> {
        use Value::*;
        let mismatch = |a: &Value, b: &Value| {
            Diagnostic::at(format!("`{}` cannot combine {} and {}", op.symbol(), a.kind(), b.kind()), span)
                .with_secondary(sa, format!("this is {}", a.kind()))
                .with_secondary(sb, format!("this is {}", b.kind()))
        };
        match (&a, &b) {
            // `x == none` asks whether an optional argument was given.
            (Unit, _) | (_, Unit) if matches!(op, BinOp::Eq | BinOp::Ne) => {
                Ok(Bool(matches!((&a, &b), (Unit, Unit)) == (op == BinOp::Eq)))
            }
            (List(x), List(y)) if op == BinOp::Add => Ok(List(x.iter().chain(y).cloned().collect())),
            (Tensor(_), _) | (_, Tensor(_)) => self.tensor_binary(op, &a, &b, span, sa, sb),
            (Int(x), Int(y)) => int_binary(op, *x, *y, span, sb),
            (Int(_) | Float(_), Int(_) | Float(_)) => {
                let (x, y) = (as_f64(&a), as_f64(&b));
                Ok(match op {
                    BinOp::Add => Float(x + y),
                    BinOp::Sub => Float(x - y),
                    BinOp::Mul => Float(x * y),
                    BinOp::Div => Float(x / y),
                    BinOp::Rem => Float(x % y),
                    BinOp::Pow => Float(x.powf(y)),
                    BinOp::Eq => Bool(x == y),
                    BinOp::Ne => Bool(x != y),
                    BinOp::Lt => Bool(x < y),
                    BinOp::Le => Bool(x <= y),
                    BinOp::Gt => Bool(x > y),
                    BinOp::Ge => Bool(x >= y),
                    BinOp::And | BinOp::Or | BinOp::MatMul => return Err(mismatch(&a, &b)),
                })
            }
            (Size(_), Int(_) | Size(_)) | (Int(_), Size(_)) => {
                let (x, y) = (a.as_dim().expect("size"), b.as_dim().expect("size"));
                let r = match op {
                    BinOp::Add => x.checked_add(&y),
                    BinOp::Sub => x.checked_sub(&y),
                    BinOp::Mul => x.checked_mul(&y),
                    BinOp::Div => {
                        let Some(k) = y.as_const() else {
                            return Err(Diagnostic::at("a size can only be divided by a constant", sb));
                        };
                        return x.div_exact(k).map(dim_value).ok_or_else(|| {
                            Diagnostic::at(format!("{x} is not divisible by {k}"), span)
                                .with_hint(format!("use `ceil_div({x}, {k})` and pad the tensor to a multiple of {k}"))
                        });
                    }
                    BinOp::Eq => return Ok(Bool(x == y)),
                    BinOp::Ne => return Ok(Bool(x != y)),
                    _ => return Err(mismatch(&a, &b).with_note("sizes known only at run time support + - * / == !=")),
                };
                Ok(dim_value(r.ok_or_else(|| overflow(span))?))
            }
            (Bool(x), Bool(y)) => match op {
                BinOp::And => Ok(Bool(*x && *y)),
                BinOp::Or => Ok(Bool(*x || *y)),
                BinOp::Eq => Ok(Bool(x == y)),
                BinOp::Ne => Ok(Bool(x != y)),
                _ => Err(mismatch(&a, &b)),
            },
            (Str(x), Str(y)) => match op {
                BinOp::Eq => Ok(Bool(x == y)),
                BinOp::Ne => Ok(Bool(x != y)),
                BinOp::Add => Ok(Str(format!("{x}{y}"))),
                _ => Err(mismatch(&a, &b)),
            },
            (Func(f), Func(g)) if matches!(op, BinOp::Eq | BinOp::Ne) => {
                let same =
                    Rc::ptr_eq(f, g) || (f.bound.is_empty() && g.bound.is_empty() && same_callee(&f.callee, &g.callee));
                Ok(Bool(same == (op == BinOp::Eq)))
            }
            _ => Err(mismatch(&a, &b)),
        }
    }

    /// Call a function value. `scope_name` is the name it was called by, which becomes a
    /// segment of the names of the parameters it declares.
    fn index(&mut self, base: Value, items: &[IndexItem], span: Span, sbase: Span, frame: &mut Frame) -> R<Value> {
        if let Value::List(list) = &base {
            let len = list.len() as i64;
            if let [IndexItem::Range { start, end, .. }] = items {
                let mut bound = |e: &Option<Expr>, default: i64, this: &mut Self| -> R<i64> {
                    let k = match e {
                        Some(e) => this.int_of(e, frame, "a list index")?,
                        None => default,
                    };
                    Ok(if k < 0 { (k + len).max(0) } else { k.min(len) })
                };
                let a = bound(start, 0, self)?;
                let b = bound(end, len, self)?;
                return Ok(Value::List(list[a as usize..(b.max(a)) as usize].to_vec()));
            }
            let [IndexItem::At(i)] = items else {
                return Err(Diagnostic::at("a list takes one integer index or a range", span));
            };
            let k = self.int_of(i, frame, "a list index")?;
            let j = if k < 0 { k + len } else { k };
            return list
                .get(j as usize)
                .filter(|_| (0..len).contains(&j))
                .cloned()
                .ok_or_else(|| Diagnostic::at(format!("index {k} is out of range for a list of {len}"), i.span));
        }
        let mut x = self.as_tensor(&base, None, sbase)?;
        let rank = self.ty(x).rank();
        let ellipses = items.iter().filter(|i| matches!(i, IndexItem::Ellipsis(_))).count();
        if ellipses > 1 {
            return Err(Diagnostic::at("only one `...` is allowed in an index", span));
        }
        let explicit = items.len() - ellipses;
        if explicit > rank {
            return Err(Diagnostic::at(format!("{explicit} indices for a tensor of rank {rank}"), span)
                .with_secondary(sbase, format!("this is {}", shape_to_string(&self.ty(x).shape))));
        }
        let mut axis = 0;
        let mut dropped = Vec::new();
        for item in items {
            match item {
                IndexItem::Ellipsis(_) => axis += rank - explicit,
                IndexItem::Range { start, end, span: s } => {
                    let a = match start {
                        Some(e) => Some(self.eval(e, frame)?),
                        None => None,
                    };
                    let b = match end {
                        Some(e) => Some(self.eval(e, frame)?),
                        None => None,
                    };
                    x = self.slice(x, axis, a, b, *s)?;
                    axis += 1;
                }
                IndexItem::At(e) => {
                    let v = self.eval(e, frame)?;
                    let end = match &v {
                        Value::Int(-1) => None,
                        Value::Int(i) if *i < 0 => Some(Value::Int(i + 1)),
                        other => Some(dim_value(
                            other.as_dim().and_then(|d| d.checked_add(&Dim::constant(1))).ok_or_else(|| {
                                Diagnostic::at(format!("an index must be an integer, found {}", other.kind()), e.span)
                            })?,
                        )),
                    };
                    x = self.slice(x, axis, Some(v), end, e.span)?;
                    dropped.push(axis);
                    axis += 1;
                }
            }
        }
        if !dropped.is_empty() {
            let shape = self
                .ty(x)
                .shape
                .iter()
                .enumerate()
                .filter(|(i, _)| !dropped.contains(i))
                .map(|(_, d)| d.clone())
                .collect();
            x = self.reshape(x, shape, span)?;
        }
        Ok(self.tensor_value(x))
    }
}

fn same_callee(a: &Callee, b: &Callee) -> bool {
    match (a, b) {
        (Callee::User(x), Callee::User(y)) => Rc::ptr_eq(x, y),
        (Callee::Builtin(x), Callee::Builtin(y)) => x == y,
        (Callee::Lambda { span: x, .. }, Callee::Lambda { span: y, .. }) => x == y,
        _ => false,
    }
}

fn overflow(span: Span) -> Diagnostic {
    Diagnostic::at("integer overflow", span).with_label("this value does not fit in 64 bits")
}

fn as_f64(v: &Value) -> f64 {
    match v {
        Value::Int(i) => *i as f64,
        Value::Float(x) => *x,
        _ => f64::NAN,
    }
}

fn int_binary(op: BinOp, x: i64, y: i64, span: Span, sy: Span) -> R<Value> {
    use Value::*;
    let ov = || overflow(span);
    Ok(match op {
        BinOp::Add => Int(x.checked_add(y).ok_or_else(ov)?),
        BinOp::Sub => Int(x.checked_sub(y).ok_or_else(ov)?),
        BinOp::Mul => Int(x.checked_mul(y).ok_or_else(ov)?),
        BinOp::Div => {
            if y == 0 {
                return Err(Diagnostic::at("division by zero", sy).with_label("this is 0"));
            }
            // Exact integer division stays an integer (sizes); otherwise it is a number.
            // (`i64::MIN / -1` is the one quotient that does not fit.)
            if x.checked_rem(y).ok_or_else(ov)? == 0 {
                Int(x.checked_div(y).ok_or_else(ov)?)
            } else {
                Float(x as f64 / y as f64)
            }
        }
        BinOp::Rem => {
            if y == 0 {
                return Err(Diagnostic::at("division by zero", sy).with_label("this is 0"));
            }
            Int(x.checked_rem_euclid(y).ok_or_else(ov)?)
        }
        BinOp::Pow => {
            if y >= 0 {
                Int(u32::try_from(y).ok().and_then(|e| x.checked_pow(e)).ok_or_else(ov)?)
            } else {
                Float((x as f64).powf(y as f64))
            }
        }
        BinOp::Eq => Bool(x == y),
        BinOp::Ne => Bool(x != y),
        BinOp::Lt => Bool(x < y),
        BinOp::Le => Bool(x <= y),
        BinOp::Gt => Bool(x > y),
        BinOp::Ge => Bool(x >= y),
        BinOp::And | BinOp::Or | BinOp::MatMul => {
            return Err(Diagnostic::at(format!("`{}` cannot combine two integers", op.symbol()), span))
        }
    })
}
