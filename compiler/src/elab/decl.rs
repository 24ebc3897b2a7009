//! Declarations: parameters, buffers and their initializers, and model inputs.

use super::builtins::Builtin;
use super::value::{Callee, InitValue, Value};
use super::{Elaborator, Frame, R};
use crate::ir::dim::shape_to_string;
use crate::ir::{DType, Dim, Graph, Init, NodeId, Op, ParamInfo, TensorType};
use tnc_grammar::ast::*;
use tnc_grammar::diag::did_you_mean;
use tnc_grammar::{Diagnostic, Span};

/// Attributes a parameter may carry.
const KNOWN_ATTRS: &[&str] = &["no_decay"];

impl Elaborator<'_> {
    pub(super) fn declare_tensors(
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
            Some(d) => match DType::from_name(&d.name) {
                Some(t @ (DType::BF16 | DType::F16)) => {
                    Err(Diagnostic::at(format!("inputs and parameters cannot be {}", t.name()), d.span)
                        .with_hint("declare them f32: `--precision bf16` computes products in 16 bits from f32 values"))
                }
                Some(t) => Ok(t),
                None => Err(Diagnostic::at(format!("unknown element type `{}`", d.name), d.span)),
            },
        }
    }

    /// The type of an `input`: names not yet bound become run-time symbols (`B`, `N`).
    pub(super) fn input_type(&mut self, ty: &TypeAnn, frame: &mut Frame) -> R<TensorType> {
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
}

fn is_init_builtin(b: Builtin) -> bool {
    matches!(b, Builtin::Zeros | Builtin::Ones | Builtin::Normal | Builtin::Xavier)
}

fn not_integer_size(d: &Expr, x: f64) -> Diagnostic {
    if x.fract() == 0.0 && x.is_finite() {
        // A whole value that is a float (`--set dim=1e9`, `4.0`, `2.0 ** 10`).
        let whole = crate::ir::op::fmt_f64(x);
        return Diagnostic::at(format!("a size must be an integer, but this is the float {whole}"), d.span)
            .with_hint(format!("write it as an integer: {}", x as i128));
    }
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
