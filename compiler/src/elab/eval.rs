//! Evaluation of statements, expressions and calls during elaboration.

use super::builtins::{self, dim_value, Builtin};
use super::value::{Callee, Func, InitValue, TensorRef, Value};
use super::{Elaborator, Frame, Override, MAX_CALL_DEPTH, MAX_LOOP_TRIPS, R};
use crate::ir::dim::shape_to_string;
use crate::ir::{DType, Dim, Graph, Init, NodeId, Op, ParamInfo, TensorType, UnaryOp};
use std::collections::HashMap;
use std::rc::Rc;
use tnc_grammar::ast::*;
use tnc_grammar::diag::did_you_mean;
use tnc_grammar::{Diagnostic, Span};

/// Attributes a parameter may carry.
const KNOWN_ATTRS: &[&str] = &["no_decay"];

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
    fn declare_tensors(
        &mut self,
        kind: TensorKind,
        names: &[Ident],
        ty: &TypeAnn,
        init: Option<&Expr>,
        attrs: &[Ident],
        span: Span,
        frame: &mut Frame,
    ) -> R<()> {
        let dtype = self.dtype_of(ty)?;
        let mut shape = Vec::new();
        for d in &ty.shape {
            let v = self.eval(d, frame)?;
            match v {
                Value::Int(i) if i > 0 => shape.push(Dim::constant(i)),
                Value::Int(i) => {
                    return Err(Diagnostic::at(format!("a parameter's size must be positive, got {i}"), d.span))
                }
                Value::Size(s) => {
                    return Err(Diagnostic::at(
                        format!("a parameter's size must be known at compile time, but this is {s}"),
                        d.span,
                    )
                    .with_label("depends on the input's shape")
                    .with_hint("parameters are allocated once; derive their sizes from hyper-parameters"))
                }
                Value::Float(x) => return Err(not_integer_size(d, x)),
                other => return Err(Diagnostic::at(format!("expected a size, found {}", other.kind()), d.span)),
            }
        }
        let numel = shape.iter().try_fold(1i64, |acc, d| acc.checked_mul(d.as_const().unwrap_or(1)));
        if numel.is_none_or(|n| n > 1i64 << 40) {
            return Err(Diagnostic::at("this tensor is too large", ty.span).with_label(shape_to_string(&shape)));
        }
        let mut attr_names = Vec::new();
        for a in attrs {
            if !KNOWN_ATTRS.contains(&a.name.as_str()) {
                let mut d = Diagnostic::at(format!("unknown attribute `@{}`", a.name), a.span).with_note(format!(
                    "known attributes: {}",
                    KNOWN_ATTRS.iter().map(|k| format!("@{k}")).collect::<Vec<_>>().join(", ")
                ));
                if let Some(h) = did_you_mean(&a.name, KNOWN_ATTRS.iter().copied()) {
                    d = d.with_hint(h);
                }
                return Err(d);
            }
            attr_names.push(a.name.clone());
        }
        let t = TensorType::new(dtype, shape);
        let (init, seed) = match init {
            Some(e) => self.initializer(e, &t, frame)?,
            None if kind == TensorKind::Param && t.rank() >= 2 => (Init::Xavier { gain: 1.0 }, None),
            None => (Init::Zeros, None),
        };
        for name in names {
            if frame.vars.contains_key(&name.name) && matches!(frame.vars.get(&name.name), Some(Value::Tensor(_))) {
                // Re-declaring shadows; names stay unique through the scope path below.
            }
            let full = self.qualified(&name.name);
            if let Some(prev) = self.graph().params.iter().find(|p| p.name == full) {
                let mut d = Diagnostic::at(format!("parameter `{full}` is declared twice"), name.span);
                if let Some(s) = prev.span {
                    d = d.with_secondary(s, "first declared here");
                }
                return Err(d);
            }
            let info = ParamInfo {
                name: full,
                ty: t.clone(),
                init: init.clone(),
                trainable: kind == TensorKind::Param,
                attrs: attr_names.clone(),
                seed,
                span: Some(name.span.to(span)),
                node: NodeId::new(0),
            };
            let n = self.graph_mut().add_param(info);
            frame.vars.insert(name.name.clone(), self.tensor_value(n));
        }
        Ok(())
    }

    /// The initializer after `~`: an initializer value, a number, or a tensor computed
    /// from constants (elaborated into a graph of its own).
    fn initializer(&mut self, e: &Expr, t: &TensorType, frame: &mut Frame) -> R<(Init, Option<u64>)> {
        let id = self.next_graph_id;
        self.next_graph_id += 1;
        self.graphs.push((id, Graph::new("init")));
        let v = self.eval(e, frame).and_then(|v| match v {
            // A bare initializer name (`~ xavier`) is a call with no arguments.
            Value::Func(f) if matches!(f.callee, Callee::Builtin(b) if is_init_builtin(b)) => {
                self.call(f, Vec::new(), e.span, None)
            }
            v => Ok(v),
        });
        let (_, mut g) = self.graphs.pop().expect("pushed above");
        match v? {
            Value::Init(InitValue { init, seed }) => Ok((init, seed)),
            Value::Int(i) => Ok((Init::Constant(i as f64), None)),
            Value::Float(x) => Ok((Init::Constant(x), None)),
            Value::Tensor(r) if r.graph == id => {
                let got = g.ty(r.node).clone();
                let mut node = r.node;
                if got.shape != t.shape {
                    let broadcastable = got.rank() <= t.rank()
                        && got
                            .shape
                            .iter()
                            .rev()
                            .zip(t.shape.iter().rev())
                            .all(|(a, b)| a == b || a.as_const() == Some(1));
                    if !broadcastable {
                        return Err(Diagnostic::at(
                            format!(
                                "the initializer has shape {} but the tensor is {}",
                                shape_to_string(&got.shape),
                                shape_to_string(&t.shape)
                            ),
                            e.span,
                        ));
                    }
                    let mut padded = vec![Dim::constant(1); t.rank() - got.rank()];
                    padded.extend(got.shape.iter().cloned());
                    node = g
                        .add(Op::Reshape { shape: padded }, &[node], Some(e.span))
                        .map_err(|m| Diagnostic::at(m, e.span))?;
                    node = g
                        .add(Op::Broadcast { shape: t.shape.clone() }, &[node], Some(e.span))
                        .map_err(|m| Diagnostic::at(m, e.span))?;
                }
                if g.ty(node).dtype != t.dtype {
                    node = g
                        .add(Op::Cast { to: t.dtype }, &[node], Some(e.span))
                        .map_err(|m| Diagnostic::at(m, e.span))?;
                }
                g.add_output("value", node);
                Ok((Init::Computed(Box::new(g)), None))
            }
            Value::Tensor(_) => Err(Diagnostic::at("an initializer can only be computed from constants", e.span)
                .with_label("this is a tensor of the model")
                .with_hint(
                    "use iota, numbers and hyper-parameters; parameters and inputs have no value at initialization",
                )),
            other => Err(Diagnostic::at(format!("expected an initializer, found {}", other.kind()), e.span).with_hint(
                "use zeros, ones, a number, normal(std), uniform(lo, hi), xavier, or an expression of constants",
            )),
        }
    }

    fn dtype_of(&self, ty: &TypeAnn) -> R<DType> {
        match &ty.dtype {
            None => Ok(DType::F32),
            Some(d) => DType::from_name(&d.name)
                .ok_or_else(|| Diagnostic::at(format!("unknown element type `{}`", d.name), d.span)),
        }
    }

    /// The type of an `input`: names not yet bound become run-time symbols (`B`, `N`).
    fn input_type(&mut self, ty: &TypeAnn, frame: &mut Frame) -> R<TensorType> {
        let dtype = self.dtype_of(ty)?;
        let mut shape = Vec::new();
        for d in &ty.shape {
            if let ExprKind::Name(n) = &d.kind {
                if !frame.vars.contains_key(n) {
                    let s = Dim::sym(n.clone());
                    frame.vars.insert(n.clone(), Value::Size(s.clone()));
                    shape.push(s);
                    continue;
                }
            }
            let v = self.eval(d, frame)?;
            match v {
                Value::Int(i) if i > 0 => shape.push(Dim::constant(i)),
                Value::Size(s) => shape.push(s),
                Value::Float(x) => return Err(not_integer_size(d, x)),
                other => return Err(Diagnostic::at(format!("expected a positive size, found {other}"), d.span)),
            }
        }
        Ok(TensorType::new(dtype, shape))
    }

    fn int_of(&mut self, e: &Expr, frame: &mut Frame, what: &str) -> R<i64> {
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
    pub(super) fn call(
        &mut self,
        f: Rc<Func>,
        args: Vec<(Option<Ident>, Value, Span)>,
        span: Span,
        scope_name: Option<&str>,
    ) -> R<Value> {
        self.step(span)?;
        let params: Vec<(String, Option<Span>)> = match &f.callee {
            Callee::User(d) => d.params.iter().map(|p| (p.name.name.clone(), Some(p.name.span))).collect(),
            Callee::Lambda { params, .. } => params.iter().map(|p| (p.name.clone(), Some(p.span))).collect(),
            Callee::Builtin(b) => b.params().iter().map(|(n, _)| (n.to_string(), None)).collect(),
        };
        let has_default = |i: usize| -> bool {
            match &f.callee {
                Callee::User(d) => {
                    d.params[i].default.is_some()
                        || self.fn_overrides.contains_key(&(d.name.name.clone(), d.params[i].name.name.clone()))
                }
                Callee::Lambda { .. } => false,
                Callee::Builtin(b) => !matches!(b.params()[i].1, builtins::ArgDefault::Required),
            }
        };
        // Bind: already-bound keyword arguments, then positional, then keyword.
        let mut slots: Vec<Option<(Value, Span)>> = vec![None; params.len()];
        for (name, v) in &f.bound {
            if let Some(i) = params.iter().position(|(p, _)| p == name) {
                slots[i] = Some((v.clone(), span));
            }
        }
        let positional: Vec<&(Option<Ident>, Value, Span)> = args.iter().filter(|a| a.0.is_none()).collect();
        let mut next = 0;
        for (_, v, s) in &positional {
            while next < slots.len() && slots[next].is_some() {
                next += 1;
            }
            if next >= slots.len() {
                return Err(Diagnostic::at(
                    format!(
                        "`{}` takes {} argument{}, but {} were given",
                        f.name(),
                        params.len(),
                        plural(params.len()),
                        args.len() + f.bound.len()
                    ),
                    *s,
                )
                .with_label("unexpected argument")
                .with_note(format!("its parameters are: {}", names_of(&params))));
            }
            slots[next] = Some((v.clone(), *s));
        }
        for (name, v, s) in args.iter().filter(|a| a.0.is_some()) {
            let name = name.as_ref().expect("filtered");
            let Some(i) = params.iter().position(|(p, _)| *p == name.name) else {
                let mut d = Diagnostic::at(format!("`{}` has no parameter `{}`", f.name(), name.name), name.span)
                    .with_note(format!("its parameters are: {}", names_of(&params)));
                if let Some(h) = did_you_mean(&name.name, params.iter().map(|(p, _)| p.as_str())) {
                    d = d.with_hint(h);
                }
                return Err(d);
            };
            if args.iter().filter(|a| a.0.as_ref().is_some_and(|n| n.name == name.name)).count() > 1 {
                return Err(Diagnostic::at(format!("argument `{}` is given twice", name.name), name.span));
            }
            slots[i] = Some((v.clone(), *s));
        }
        let missing: Vec<usize> = (0..slots.len()).filter(|&i| slots[i].is_none() && !has_default(i)).collect();
        if !missing.is_empty() {
            if positional.is_empty() && !args.is_empty() {
                // Keyword arguments only: a partial application, completed by a later call.
                let mut bound = f.bound.clone();
                for (name, v, _) in &args {
                    let name = name.as_ref().expect("keyword").name.clone();
                    bound.retain(|(n, _)| *n != name);
                    bound.push((name, v.clone()));
                }
                return Ok(Value::Func(Rc::new(Func { callee: clone_callee(&f.callee), bound })));
            }
            let names: Vec<String> = missing.iter().map(|&i| format!("`{}`", params[i].0)).collect();
            let mut d = Diagnostic::at(
                format!("missing argument{} {} in call to `{}`", plural(missing.len()), names.join(", "), f.name()),
                span,
            )
            .with_note(format!("its parameters are: {}", names_of(&params)));
            if let Some(s) = params[missing[0]].1 {
                d = d.with_secondary(s, "declared here");
            }
            return Err(d);
        }
        match &f.callee {
            Callee::Builtin(b) => {
                let mut slots = slots;
                for (slot, (_, default)) in slots.iter_mut().zip(b.params()) {
                    if slot.is_none() {
                        *slot = match default {
                            builtins::ArgDefault::Int(i) => Some((Value::Int(*i), span)),
                            builtins::ArgDefault::Float(x) => Some((Value::Float(*x), span)),
                            builtins::ArgDefault::Bool(v) => Some((Value::Bool(*v), span)),
                            builtins::ArgDefault::Required | builtins::ArgDefault::Unset => None,
                        };
                    }
                }
                self.call_builtin(*b, builtins::Args { values: slots, span })
            }
            Callee::User(decl) => {
                let decl = decl.clone();
                self.call_user(&decl, slots, span, scope_name)
            }
            Callee::Lambda { params, body, captured, .. } => {
                let mut frame = Frame { vars: captured.clone(), is_model: false };
                for (p, slot) in params.iter().zip(slots) {
                    frame.vars.insert(p.name.clone(), slot.expect("all bound").0);
                }
                self.enter_call(span)?;
                let pushed = scope_name.map(|n| self.enter_scope(n)).unwrap_or(0);
                let r = self.eval(body, &mut frame);
                self.leave_call(pushed);
                r
            }
        }
    }

    fn enter_call(&mut self, span: Span) -> R<()> {
        self.call_depth += 1;
        if self.call_depth > MAX_CALL_DEPTH {
            return Err(Diagnostic::at("calls are nested too deeply", span)
                .with_label(format!("more than {MAX_CALL_DEPTH} nested calls"))
                .with_hint("is a function calling itself? Recursion is not supported; use a `for` loop"));
        }
        Ok(())
    }

    fn leave_call(&mut self, pushed: usize) {
        self.call_depth -= 1;
        for _ in 0..pushed {
            self.scope.pop();
        }
    }

    fn call_user(
        &mut self,
        decl: &FnDecl,
        slots: Vec<Option<(Value, Span)>>,
        span: Span,
        scope_name: Option<&str>,
    ) -> R<Value> {
        self.enter_call(span).inspect_err(|_| self.call_depth -= 1)?;
        let pushed = scope_name.map(|n| self.enter_scope(n)).unwrap_or(0);
        let r = self.call_user_inner(decl, slots);
        self.leave_call(pushed);
        r.map_err(|d| {
            // Errors deep inside a function also show where it was called from.
            if d.span.is_some_and(|s| s.file != span.file || !(span.start <= s.start && s.end <= span.end))
                && d.secondary.len() < 3
            {
                d.with_secondary(span, format!("in this call to `{}`", decl.name.name))
            } else {
                d
            }
        })
    }

    fn call_user_inner(&mut self, decl: &FnDecl, slots: Vec<Option<(Value, Span)>>) -> R<Value> {
        let mut frame = Frame { vars: HashMap::new(), is_model: false };
        for (p, slot) in decl.params.iter().zip(slots) {
            let (v, s) = match slot {
                Some(x) => x,
                None => {
                    // Defaults are evaluated in the callee, after the earlier parameters,
                    // so `e = D / heads` can use them. `--set fn.arg=` replaces them.
                    let key = (decl.name.name.clone(), p.name.name.clone());
                    let (expr, mut f2) = match self.fn_overrides.get(&key) {
                        Some(o) => (&o.value, Frame { vars: HashMap::new(), is_model: false }),
                        None => (
                            p.default.as_ref().expect("checked by has_default"),
                            Frame { vars: frame.vars.clone(), is_model: false },
                        ),
                    };
                    let v = self.eval(expr, &mut f2)?;
                    (v, expr.span)
                }
            };
            if let Some(ann) = &p.ty {
                self.check_annotation(&v, s, ann, &p.name, &mut frame)?;
            }
            frame.vars.insert(p.name.name.clone(), v);
        }
        self.eval(&decl.body, &mut frame)
    }

    /// Match an argument against `x: f32[B, N, D]`: unbound names bind to the argument's
    /// sizes, bound names and expressions must equal them.
    fn check_annotation(&mut self, v: &Value, vspan: Span, ann: &TypeAnn, pname: &Ident, frame: &mut Frame) -> R<()> {
        let Value::Tensor(TensorRef { node, .. }) = v else {
            return Err(Diagnostic::at(format!("`{}` must be a tensor, found {}", pname.name, v.kind()), vspan)
                .with_secondary(ann.span, "declared as a tensor here"));
        };
        let t = self.ty(*node).clone();
        if let Some(d) = &ann.dtype {
            if DType::from_name(&d.name) != Some(t.dtype) {
                return Err(Diagnostic::at(format!("`{}` must be {}, found {}", pname.name, d.name, t), vspan)
                    .with_secondary(ann.span, "declared here"));
            }
        }
        if ann.shape.len() != t.rank() {
            return Err(Diagnostic::at(
                format!(
                    "`{}` must have rank {}, but this is {}",
                    pname.name,
                    ann.shape.len(),
                    shape_to_string(&t.shape)
                ),
                vspan,
            )
            .with_secondary(ann.span, "declared here"));
        }
        for (d, actual) in ann.shape.iter().zip(&t.shape) {
            let expected = match &d.kind {
                ExprKind::Name(n) if !frame.vars.contains_key(n) => {
                    frame.vars.insert(n.clone(), dim_value(actual.clone()));
                    continue;
                }
                _ => self.eval(d, frame)?,
            };
            let ok = expected.as_dim().is_some_and(|e| e == *actual);
            if !ok {
                let what = match &d.kind {
                    ExprKind::Name(n) => format!("`{n}` = {expected}"),
                    _ => format!("{expected}"),
                };
                return Err(Diagnostic::at(
                    format!(
                        "shape mismatch for `{}`: expected {} but found {}",
                        pname.name,
                        what,
                        shape_to_string(&t.shape)
                    ),
                    vspan,
                )
                .with_label(format!("this is {}", shape_to_string(&t.shape)))
                .with_secondary(d.span, format!("expected {expected} here")));
            }
        }
        Ok(())
    }

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

fn is_init_builtin(b: Builtin) -> bool {
    matches!(b, Builtin::Zeros | Builtin::Ones | Builtin::Normal | Builtin::Xavier)
}

fn clone_callee(c: &Callee) -> Callee {
    match c {
        Callee::User(d) => Callee::User(d.clone()),
        Callee::Builtin(b) => Callee::Builtin(*b),
        Callee::Lambda { params, body, captured, span } => {
            Callee::Lambda { params: params.clone(), body: body.clone(), captured: captured.clone(), span: *span }
        }
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

fn names_of(params: &[(String, Option<Span>)]) -> String {
    if params.is_empty() {
        return "none".into();
    }
    params.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>().join(", ")
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
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

fn not_integer_size(d: &Expr, x: f64) -> Diagnostic {
    let mut diag =
        Diagnostic::at(format!("a size must be a whole number, but this is {}", crate::ir::op::fmt_f64(x)), d.span);
    if let ExprKind::Binary { op: BinOp::Div, lhs, rhs } = &d.kind {
        diag = diag.with_label("this division is not exact");
        if let (ExprKind::Name(a), ExprKind::Name(b)) = (&lhs.kind, &rhs.kind) {
            diag = diag.with_hint(format!("`{b}` must divide `{a}`"));
        }
    }
    diag
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
            if x % y == 0 {
                Int(x / y)
            } else {
                Float(x as f64 / y as f64)
            }
        }
        BinOp::Rem => {
            if y == 0 {
                return Err(Diagnostic::at("division by zero", sy).with_label("this is 0"));
            }
            Int(x.rem_euclid(y))
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
