//! The abstract syntax tree. Every node carries the [`Span`] it was parsed from.

use crate::source::Span;

#[derive(Clone, Debug, PartialEq)]
pub struct Ident {
    pub name: String,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct File {
    pub items: Vec<Item>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Item {
    Use(Use),
    Fn(FnDecl),
    Model(FnDecl),
}

#[derive(Clone, Debug, PartialEq)]
pub enum UseTarget {
    /// `use std`: the standard library shipped with tnc.
    Std,
    /// `use "path/to/file.tn"`, relative to the importing file.
    Path(String),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Use {
    pub target: UseTarget,
    pub span: Span,
}

/// A function or a model. A model is a function whose hyper-parameters can be set from the
/// command line and whose body declares inputs and outputs.
#[derive(Clone, Debug, PartialEq)]
pub struct FnDecl {
    pub name: Ident,
    pub params: Vec<ParamDecl>,
    pub body: Expr,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ParamDecl {
    pub name: Ident,
    pub ty: Option<TypeAnn>,
    pub default: Option<Expr>,
}

/// `f32[B, N, D]` or `[B, N, D]`: an optional element type and a shape whose entries are
/// expressions (names bind or check sizes).
#[derive(Clone, Debug, PartialEq)]
pub struct TypeAnn {
    pub dtype: Option<Ident>,
    pub shape: Vec<Expr>,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Block {
    pub stmts: Vec<Stmt>,
    pub span: Span,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TensorKind {
    Param,
    Buffer,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Stmt {
    /// `param wq, wk: [D, D] @no_decay ~ xavier` (or `buffer …`).
    Tensor {
        kind: TensorKind,
        names: Vec<Ident>,
        ty: TypeAnn,
        init: Option<Expr>,
        attrs: Vec<Ident>,
        span: Span,
    },
    Input {
        name: Ident,
        ty: TypeAnn,
        span: Span,
    },
    Output {
        name: Ident,
        value: Expr,
        span: Span,
    },
    For {
        var: Ident,
        start: Expr,
        end: Expr,
        body: Block,
        span: Span,
    },
    /// `precision f32 { … }`: the statements run in the enclosing scope, and every
    /// product computed meanwhile (in called functions too) keeps f32 operands.
    Precision {
        dtype: Ident,
        body: Block,
        span: Span,
    },
    Assign {
        name: Ident,
        value: Expr,
        span: Span,
    },
    Expr(Expr),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    Rem,
    MatMul,
    Pow,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    And,
    Or,
}

impl BinOp {
    pub fn symbol(self) -> &'static str {
        match self {
            BinOp::Add => "+",
            BinOp::Sub => "-",
            BinOp::Mul => "*",
            BinOp::Div => "/",
            BinOp::Rem => "%",
            BinOp::MatMul => "@",
            BinOp::Pow => "**",
            BinOp::Eq => "==",
            BinOp::Ne => "!=",
            BinOp::Lt => "<",
            BinOp::Le => "<=",
            BinOp::Gt => ">",
            BinOp::Ge => ">=",
            BinOp::And => "and",
            BinOp::Or => "or",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnOp {
    Neg,
    Not,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Expr {
    pub kind: ExprKind,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ExprKind {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    Name(String),
    List(Vec<Expr>),
    Call {
        callee: Box<Expr>,
        args: Vec<Arg>,
    },
    Index {
        base: Box<Expr>,
        items: Vec<IndexItem>,
    },
    Unary {
        op: UnOp,
        operand: Box<Expr>,
    },
    Binary {
        op: BinOp,
        lhs: Box<Expr>,
        rhs: Box<Expr>,
    },
    /// `if c1 { … } else if c2 { … } else { … }`; conditions are evaluated at compile time.
    If {
        branches: Vec<(Expr, Block)>,
        otherwise: Option<Block>,
    },
    Block(Block),
    Lambda {
        params: Vec<Ident>,
        body: Box<Expr>,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Arg {
    pub name: Option<Ident>,
    pub value: Expr,
}

#[derive(Clone, Debug, PartialEq)]
pub enum IndexItem {
    /// `...`: as many full axes as needed.
    Ellipsis(Span),
    /// `a:b`, `:b`, `a:`, `:`.
    Range { start: Option<Expr>, end: Option<Expr>, span: Span },
    /// A single position; the axis is dropped.
    At(Expr),
}
