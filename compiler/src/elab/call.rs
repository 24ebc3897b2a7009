//! Calls: binding arguments to parameters (positional, keyword, defaults, `--set`
//! overrides), partial application, shape annotations, and the call-depth budget.

use super::builtins::{self, dim_value};
use super::value::{Callee, Func, TensorRef, Value};
use super::{Elaborator, Frame, MAX_CALL_DEPTH, R};
use crate::ir::dim::shape_to_string;
use crate::ir::DType;
use std::collections::HashMap;
use std::rc::Rc;
use tnc_grammar::ast::*;
use tnc_grammar::diag::did_you_mean;
use tnc_grammar::{Diagnostic, Span};

impl Elaborator<'_> {
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
            let key = (decl.name.name.clone(), p.name.name.clone());
            if self.fn_overrides.contains_key(&key) {
                match &slot {
                    None => {
                        self.used_overrides.insert(key.clone());
                    }
                    Some((_, s)) => {
                        self.passed_explicitly.entry(key.clone()).or_insert(*s);
                    }
                }
            }
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
