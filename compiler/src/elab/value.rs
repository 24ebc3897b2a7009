//! Values of the elaboration-time language. Elaboration is an interpreter over the AST
//! whose tensor values are nodes of the graph being built; everything else (numbers,
//! sizes, booleans, functions) is known at compile time.

use crate::ir::{Dim, NodeId};
use std::collections::HashMap;
use std::fmt;
use std::rc::Rc;
use tnc_grammar::ast::{Expr, FnDecl, Ident};
use tnc_grammar::Span;

use super::builtins::Builtin;

/// A tensor value: a node of a particular graph (initializer expressions are elaborated
/// into graphs of their own, so the graph is part of the identity).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorRef {
    pub graph: u32,
    pub node: NodeId,
}

#[derive(Clone, Debug)]
pub enum Value {
    Unit,
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    /// A size that depends on run-time symbols (`N`, `64*ceil((N)/64)`); constant sizes are `Int`.
    Size(Dim),
    Tensor(TensorRef),
    List(Vec<Value>),
    Func(Rc<Func>),
    /// An initializer (`xavier`, `normal(0.02)`, …) as written after `~`.
    Init(InitValue),
}

#[derive(Clone, Debug)]
pub struct InitValue {
    pub init: crate::ir::Init,
    pub seed: Option<u64>,
}

#[derive(Debug)]
pub enum Callee {
    User(Rc<FnDecl>),
    Lambda { params: Vec<Ident>, body: Rc<Expr>, captured: HashMap<String, Value>, span: Span },
    Builtin(Builtin),
}

/// A function value, possibly with some arguments already supplied by keyword
/// (`diag_attention(block = 64, act = relu)` is such a partial application).
#[derive(Debug)]
pub struct Func {
    pub callee: Callee,
    pub bound: Vec<(String, Value)>,
}

impl Func {
    pub fn name(&self) -> String {
        match &self.callee {
            Callee::User(d) => d.name.name.clone(),
            Callee::Lambda { .. } => "<lambda>".into(),
            Callee::Builtin(b) => b.name().into(),
        }
    }
}

impl Value {
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Unit => "nothing",
            Value::Int(_) => "an integer",
            Value::Float(_) => "a number",
            Value::Bool(_) => "a boolean",
            Value::Str(_) => "a string",
            Value::Size(_) => "a size",
            Value::Tensor(_) => "a tensor",
            Value::List(_) => "a list",
            Value::Func(_) => "a function",
            Value::Init(_) => "an initializer",
        }
    }

    /// A size: a constant integer or a symbolic size.
    pub fn as_dim(&self) -> Option<Dim> {
        match self {
            Value::Int(i) => Some(Dim::constant(*i)),
            Value::Size(d) => Some(d.clone()),
            _ => None,
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Unit => write!(f, "()"),
            Value::Int(i) => write!(f, "{i}"),
            Value::Float(x) => write!(f, "{}", crate::ir::op::fmt_f64(*x)),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Str(s) => write!(f, "\"{s}\""),
            Value::Size(d) => write!(f, "{d}"),
            Value::Tensor(_) => write!(f, "<tensor>"),
            Value::List(items) => {
                let parts: Vec<String> = items.iter().map(|v| v.to_string()).collect();
                write!(f, "[{}]", parts.join(", "))
            }
            Value::Func(func) => write!(f, "<fn {}>", func.name()),
            Value::Init(i) => write!(f, "<init {}>", crate::ir::print::init_to_string(&i.init)),
        }
    }
}
