//! Text to AST. A cheap pre-scan bounds bracket nesting (so that 1 MB of `(` is a
//! diagnostic, not a stack overflow), pest parses, and a Pratt parser builds
//! expressions with this precedence, lowest first:
//!
//! | operators                  | associativity |
//! |----------------------------|---------------|
//! | `or`                       | left          |
//! | `and`                      | left          |
//! | `== != < <= > >=`          | left          |
//! | `+ -`                      | left          |
//! | `* / % @`                  | left          |
//! | prefix `-`, `not`          |               |
//! | `**`                       | right         |
//! | call `f(…)`, index `x[…]`  |               |

use crate::ast::*;
use crate::diag::Diagnostic;
use crate::source::{FileId, Span};
use pest::iterators::Pair;
use pest::pratt_parser::{Assoc, Op, PrattParser};
use pest::Parser;
use std::sync::OnceLock;

#[derive(pest_derive::Parser)]
#[grammar = "tn.pest"]
struct TnParser;

/// Deepest bracket nesting accepted, and deepest expression tree.
pub const MAX_NESTING: usize = 128;
pub const MAX_EXPR_DEPTH: usize = 512;
/// Largest source file accepted (bytes).
pub const MAX_SOURCE_BYTES: usize = 8 << 20;

pub fn parse_file(text: &str, file: FileId) -> Result<File, Diagnostic> {
    prescan(text, file)?;
    let pairs = TnParser::parse(Rule::file, text).map_err(|e| syntax_error(e, file, text))?;
    let mut b = Builder { file };
    let file_pair = pairs.into_iter().next().expect("pest returns the `file` rule");
    let mut items = Vec::new();
    for p in file_pair.into_inner() {
        match p.as_rule() {
            Rule::use_item => items.push(b.use_item(p)?),
            Rule::fn_item => items.push(Item::Fn(b.fn_item(p)?)),
            Rule::model_item => items.push(Item::Model(b.fn_item(p)?)),
            Rule::EOI => {}
            r => unreachable!("unexpected rule {r:?} at top level"),
        }
    }
    Ok(File { items })
}

/// Parse a single expression (used for `--set name=value`).
pub fn parse_expr(text: &str, file: FileId) -> Result<Expr, Diagnostic> {
    prescan(text, file)?;
    let mut pairs = TnParser::parse(Rule::expr, text).map_err(|e| syntax_error(e, file, text))?;
    let p = pairs.next().expect("pest returns the `expr` rule");
    if p.as_span().end() != text.trim_end().len() {
        let end = p.as_span().end();
        return Err(Diagnostic::at("unexpected text after the value", Span::new(file, end..text.len()))
            .with_label("expected the end of the value"));
    }
    Builder { file }.expr(p)
}

fn prescan(text: &str, file: FileId) -> Result<(), Diagnostic> {
    if text.len() > MAX_SOURCE_BYTES {
        return Err(Diagnostic::error(format!(
            "source file is {} bytes; the limit is {} bytes",
            text.len(),
            MAX_SOURCE_BYTES
        )));
    }
    let mut depth = 0usize;
    let mut lambdas = 0usize;
    let mut in_comment = false;
    let bytes = text.as_bytes();
    for (i, &c) in bytes.iter().enumerate() {
        if in_comment {
            in_comment = c != b'\n';
            continue;
        }
        match c {
            b'/' if bytes.get(i + 1) == Some(&b'/') => in_comment = true,
            b'(' | b'[' | b'{' => {
                depth += 1;
                if depth > MAX_NESTING {
                    return Err(Diagnostic::at("brackets are nested too deeply", Span::new(file, i..i + 1))
                        .with_label(format!("more than {MAX_NESTING} levels of nesting"))
                        .with_hint("split the expression with intermediate variables"));
                }
            }
            b')' | b']' | b'}' => depth = depth.saturating_sub(1),
            b'|' => {
                // Each lambda recurses in the parser; bound them like brackets.
                lambdas += 1;
                if lambdas > 2 * 4096 {
                    return Err(Diagnostic::at("too many lambdas in one file", Span::new(file, i..i + 1)));
                }
            }
            _ => {}
        }
    }
    Ok(())
}

fn describe(rule: &Rule) -> &'static str {
    match rule {
        Rule::EOI => "end of file",
        Rule::file => "a file",
        Rule::use_item => "`use`",
        Rule::fn_item => "`fn`",
        Rule::model_item => "`model`",
        Rule::param_list => "a parameter list `(…)`",
        Rule::param => "a parameter",
        Rule::type_ann | Rule::shape => "a shape `[…]`",
        Rule::dtype => "an element type",
        Rule::block => "a block `{ … }`",
        Rule::param_stmt => "`param`",
        Rule::buffer_stmt => "`buffer`",
        Rule::ident_list => "names",
        Rule::init => "an initializer `~ …`",
        Rule::attr => "an attribute `@name`",
        Rule::input_stmt => "`input`",
        Rule::output_stmt => "`output`",
        Rule::for_stmt => "`for`",
        Rule::precision_stmt | Rule::precision_kw => "`precision`",
        Rule::assign_stmt => "an assignment",
        Rule::expr => "an expression",
        Rule::pow | Rule::add | Rule::sub | Rule::mul | Rule::div | Rule::rem | Rule::matmul => "an operator",
        Rule::eq | Rule::ne | Rule::le | Rule::ge | Rule::lt | Rule::gt | Rule::and | Rule::or => "an operator",
        Rule::neg | Rule::not => "an expression",
        Rule::call => "arguments `(…)`",
        Rule::arg => "an argument",
        Rule::index => "an index `[…]`",
        Rule::ellipsis | Rule::range => "an index",
        Rule::if_expr => "`if`",
        Rule::lambda => "a lambda `|x| …`",
        Rule::list => "a list `[…]`",
        Rule::paren => "`(`",
        Rule::float | Rule::int => "a number",
        Rule::string => "a string",
        Rule::boolean => "`true` or `false`",
        Rule::keyword => "a keyword",
        Rule::ident => "a name",
        _ => "something else",
    }
}

fn syntax_error(e: pest::error::Error<Rule>, file: FileId, text: &str) -> Diagnostic {
    use pest::error::{ErrorVariant, InputLocation};
    let start = match e.location {
        InputLocation::Pos(p) => p,
        InputLocation::Span((s, _)) => s,
    };
    // Underline the offending character (nothing at the end of a line or of the file).
    let end = text[start..].chars().next().filter(|c| *c != '\n').map_or(start, |c| start + c.len_utf8());
    let found = match text[start..].chars().next() {
        None => "end of file".to_string(),
        Some('\n') => "end of line".to_string(),
        Some(_) => {
            let word: String = text[start..].chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            if word.is_empty() {
                format!("`{}`", &text[start..end])
            } else {
                format!("`{word}`")
            }
        }
    };
    let mut expected: Vec<&str> = match &e.variant {
        ErrorVariant::ParsingError { positives, .. } => positives.iter().map(describe).collect(),
        ErrorVariant::CustomError { .. } => Vec::new(),
    };
    expected.sort();
    expected.dedup();
    // Many kinds of expression may start here: say "an expression" once instead.
    const STARTS_OF_EXPRESSION: &[&str] = &[
        "`(`",
        "`if`",
        "`true` or `false`",
        "a block `{ … }`",
        "a lambda `|x| …`",
        "a list `[…]`",
        "a name",
        "a number",
        "a string",
    ];
    if expected.iter().filter(|e| STARTS_OF_EXPRESSION.contains(e)).count() >= 3 {
        expected.retain(|e| !STARTS_OF_EXPRESSION.contains(e));
        if !expected.contains(&"an expression") {
            expected.push("an expression");
        }
    }
    let message = format!("syntax error: unexpected {found}");
    let label =
        if expected.is_empty() { "not expected here".to_string() } else { format!("expected {}", join_or(&expected)) };
    let mut d = Diagnostic::at(message, Span::new(file, start..end)).with_label(label);
    if text[start..].starts_with('=') && expected.contains(&"an operator") {
        d = d.with_hint("use `==` to compare; `=` only assigns at the start of a statement");
    }
    if start >= text.trim_end().len() {
        if let Some((open, c)) = unclosed_bracket(text) {
            let close = match c {
                '{' => '}',
                '(' => ')',
                _ => ']',
            };
            d = d
                .with_secondary(Span::new(file, open..open + 1), format!("this `{c}` is never closed"))
                .with_hint(format!("add the missing `{close}`"));
        }
    }
    d
}

/// Where the file's text ends with a bracket still open: the innermost opener whose
/// closing bracket is likeliest missing. Brackets are matched outside comments and
/// strings; when every opener is closed by the count but an opener's closer sits at
/// another indentation than the opener's line (`for … {` at two spaces closed by the
/// model's `}` at none), that opener is the one missing its closer.
fn unclosed_bracket(text: &str) -> Option<(usize, char)> {
    let indent = |at: usize| {
        let line = text[..at].rfind('\n').map_or(0, |i| i + 1);
        text[line..].chars().take_while(|c| *c == ' ' || *c == '\t').count()
    };
    let mut stack: Vec<(usize, char)> = Vec::new();
    let mut suspect: Option<(usize, char)> = None;
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'/' if bytes.get(i + 1) == Some(&b'/') => {
                i = text[i..].find('\n').map_or(bytes.len(), |n| i + n);
                continue;
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                i = text[i + 2..].find("*/").map_or(bytes.len(), |n| i + 2 + n + 2);
                continue;
            }
            b'"' => {
                i = text[i + 1..].find('"').map_or(bytes.len(), |n| i + 1 + n + 1);
                continue;
            }
            c @ (b'{' | b'(' | b'[') => stack.push((i, c as char)),
            b'}' | b')' | b']' => {
                if let Some((open, c)) = stack.pop() {
                    if c == '{' && indent(open) != indent(i) {
                        suspect = Some((open, c));
                    }
                }
            }
            _ => {}
        }
        i += 1;
    }
    suspect.or_else(|| stack.last().copied())
}

fn join_or(items: &[&str]) -> String {
    match items {
        [] => String::new(),
        [a] => a.to_string(),
        [rest @ .., last] => format!("{} or {last}", rest.join(", ")),
    }
}

fn pratt() -> &'static PrattParser<Rule> {
    static P: OnceLock<PrattParser<Rule>> = OnceLock::new();
    P.get_or_init(|| {
        PrattParser::new()
            .op(Op::infix(Rule::or, Assoc::Left))
            .op(Op::infix(Rule::and, Assoc::Left))
            .op(Op::infix(Rule::eq, Assoc::Left)
                | Op::infix(Rule::ne, Assoc::Left)
                | Op::infix(Rule::lt, Assoc::Left)
                | Op::infix(Rule::le, Assoc::Left)
                | Op::infix(Rule::gt, Assoc::Left)
                | Op::infix(Rule::ge, Assoc::Left))
            .op(Op::infix(Rule::add, Assoc::Left) | Op::infix(Rule::sub, Assoc::Left))
            .op(Op::infix(Rule::mul, Assoc::Left)
                | Op::infix(Rule::div, Assoc::Left)
                | Op::infix(Rule::rem, Assoc::Left)
                | Op::infix(Rule::matmul, Assoc::Left))
            .op(Op::prefix(Rule::neg) | Op::prefix(Rule::not))
            .op(Op::infix(Rule::pow, Assoc::Right))
            .op(Op::postfix(Rule::call) | Op::postfix(Rule::index))
    })
}

struct Builder {
    file: FileId,
}

/// An expression with the depth of its tree, so that deep trees are refused while they
/// are built (and never dropped recursively at a dangerous depth).
type Deep = Result<(Expr, usize), Diagnostic>;

fn too_deep(span: Span) -> Diagnostic {
    Diagnostic::at("expression is nested too deeply", span)
        .with_label(format!("more than {MAX_EXPR_DEPTH} levels"))
        .with_hint("split the expression with intermediate variables")
}

impl Builder {
    fn span(&self, p: &Pair<Rule>) -> Span {
        let s = p.as_span();
        Span::new(self.file, s.start()..s.end())
    }

    fn ident(&self, p: Pair<Rule>) -> Ident {
        Ident { name: p.as_str().to_string(), span: self.span(&p) }
    }

    fn use_item(&mut self, p: Pair<Rule>) -> Result<Item, Diagnostic> {
        let span = self.span(&p);
        let target = p.into_inner().next().expect("grammar: use has a target");
        let target = match target.as_rule() {
            Rule::string => {
                let s = target.as_str();
                UseTarget::Path(s[1..s.len() - 1].to_string())
            }
            _ if target.as_str() == "std" => UseTarget::Std,
            _ => {
                return Err(Diagnostic::at(format!("unknown library `{}`", target.as_str()), self.span(&target))
                    .with_label("only `std` is built in")
                    .with_hint(format!("to import a file, write `use \"{}.tn\"`", target.as_str())))
            }
        };
        Ok(Item::Use(Use { target, span }))
    }

    fn fn_item(&mut self, p: Pair<Rule>) -> Result<FnDecl, Diagnostic> {
        let span = self.span(&p);
        let mut inner = p.into_inner();
        let name = self.ident(inner.next().expect("grammar: fn has a name"));
        let mut params = Vec::new();
        let mut body = None;
        for q in inner {
            match q.as_rule() {
                Rule::param_list => params = self.param_list(q)?,
                Rule::block => {
                    let b = self.block(q)?;
                    body = Some(Expr { span: b.span, kind: ExprKind::Block(b) });
                }
                Rule::expr => body = Some(self.expr(q)?),
                r => unreachable!("unexpected {r:?} in fn"),
            }
        }
        let body = body.expect("grammar: fn has a body");
        Ok(FnDecl { name, params, body, span })
    }

    fn param_list(&mut self, p: Pair<Rule>) -> Result<Vec<ParamDecl>, Diagnostic> {
        let mut out = Vec::new();
        for q in p.into_inner() {
            let mut inner = q.into_inner();
            let name = self.ident(inner.next().expect("grammar: param has a name"));
            let mut ty = None;
            let mut default = None;
            for r in inner {
                match r.as_rule() {
                    Rule::type_ann => ty = Some(self.type_ann(r)?),
                    Rule::expr => default = Some(self.expr(r)?),
                    x => unreachable!("unexpected {x:?} in param"),
                }
            }
            out.push(ParamDecl { name, ty, default });
        }
        Ok(out)
    }

    fn type_ann(&mut self, p: Pair<Rule>) -> Result<TypeAnn, Diagnostic> {
        let span = self.span(&p);
        let mut dtype = None;
        let mut shape = Vec::new();
        for q in p.into_inner() {
            match q.as_rule() {
                Rule::dtype => dtype = Some(self.ident(q)),
                Rule::shape => {
                    for e in q.into_inner() {
                        shape.push(self.expr(e)?);
                    }
                }
                r => unreachable!("unexpected {r:?} in type"),
            }
        }
        Ok(TypeAnn { dtype, shape, span })
    }

    fn block(&mut self, p: Pair<Rule>) -> Result<Block, Diagnostic> {
        let span = self.span(&p);
        let mut stmts = Vec::new();
        for q in p.into_inner() {
            stmts.push(self.stmt(q)?);
        }
        Ok(Block { stmts, span })
    }

    fn stmt(&mut self, p: Pair<Rule>) -> Result<Stmt, Diagnostic> {
        let span = self.span(&p);
        let rule = p.as_rule();
        match rule {
            Rule::param_stmt | Rule::buffer_stmt => {
                let kind = if rule == Rule::param_stmt { TensorKind::Param } else { TensorKind::Buffer };
                let mut names = Vec::new();
                let mut ty = None;
                let mut init = None;
                let mut attrs = Vec::new();
                for q in p.into_inner() {
                    match q.as_rule() {
                        Rule::ident_list => names = q.into_inner().map(|i| self.ident(i)).collect(),
                        Rule::type_ann => ty = Some(self.type_ann(q)?),
                        Rule::init => init = Some(self.expr(q.into_inner().next().expect("grammar: init"))?),
                        Rule::attr => attrs.push(self.ident(q.into_inner().next().expect("grammar: attr"))),
                        r => unreachable!("unexpected {r:?} in param"),
                    }
                }
                Ok(Stmt::Tensor { kind, names, ty: ty.expect("grammar: param has a type"), init, attrs, span })
            }
            Rule::input_stmt => {
                let mut inner = p.into_inner();
                let name = self.ident(inner.next().expect("grammar"));
                let ty = self.type_ann(inner.next().expect("grammar"))?;
                Ok(Stmt::Input { name, ty, span })
            }
            Rule::output_stmt => {
                let mut inner = p.into_inner();
                let name = self.ident(inner.next().expect("grammar"));
                let value = self.expr(inner.next().expect("grammar"))?;
                Ok(Stmt::Output { name, value, span })
            }
            Rule::for_stmt => {
                let mut inner = p.into_inner();
                let var = self.ident(inner.next().expect("grammar"));
                let start = self.expr(inner.next().expect("grammar"))?;
                let end = self.expr(inner.next().expect("grammar"))?;
                let body = self.block(inner.next().expect("grammar"))?;
                Ok(Stmt::For { var, start, end, body, span })
            }
            Rule::precision_stmt => {
                let mut inner = p.into_inner();
                let _keyword = inner.next().expect("grammar");
                let dtype = self.ident(inner.next().expect("grammar"));
                let body = self.block(inner.next().expect("grammar"))?;
                Ok(Stmt::Precision { dtype, body, span })
            }
            Rule::assign_stmt => {
                let mut inner = p.into_inner();
                let name = self.ident(inner.next().expect("grammar"));
                let value = self.expr(inner.next().expect("grammar"))?;
                Ok(Stmt::Assign { name, value, span })
            }
            Rule::expr => Ok(Stmt::Expr(self.expr(p)?)),
            r => unreachable!("unexpected statement {r:?}"),
        }
    }

    fn expr(&mut self, p: Pair<Rule>) -> Result<Expr, Diagnostic> {
        Ok(self.expr_deep(p)?.0)
    }

    fn expr_deep(&mut self, p: Pair<Rule>) -> Deep {
        // The closures below all need `self`; pest's PrattParser takes them at once,
        // so they share it through a RefCell.
        let this = std::cell::RefCell::new(self);
        let node = |kind: ExprKind, span: Span, depth: usize| -> Deep {
            if depth > MAX_EXPR_DEPTH {
                return Err(too_deep(span));
            }
            Ok((Expr { kind, span }, depth))
        };
        let result = pratt()
            .map_primary(|p| this.borrow_mut().primary(p))
            .map_prefix(|op, rhs| {
                let (rhs, d) = rhs?;
                let span = this.borrow().span(&op).to(rhs.span);
                let op = if op.as_rule() == Rule::neg { UnOp::Neg } else { UnOp::Not };
                node(ExprKind::Unary { op, operand: Box::new(rhs) }, span, d + 1)
            })
            .map_postfix(|lhs, op| {
                let (lhs, d) = lhs?;
                let mut b = this.borrow_mut();
                let span = lhs.span.to(b.span(&op));
                let kind = match op.as_rule() {
                    Rule::call => ExprKind::Call { callee: Box::new(lhs), args: b.args(op)? },
                    _ => ExprKind::Index { base: Box::new(lhs), items: b.index_items(op)? },
                };
                node(kind, span, d + 1)
            })
            .map_infix(|lhs, op, rhs| {
                let ((lhs, dl), (rhs, dr)) = (lhs?, rhs?);
                let span = lhs.span.to(rhs.span);
                let op = match op.as_rule() {
                    Rule::add => BinOp::Add,
                    Rule::sub => BinOp::Sub,
                    Rule::mul => BinOp::Mul,
                    Rule::div => BinOp::Div,
                    Rule::rem => BinOp::Rem,
                    Rule::matmul => BinOp::MatMul,
                    Rule::pow => BinOp::Pow,
                    Rule::eq => BinOp::Eq,
                    Rule::ne => BinOp::Ne,
                    Rule::lt => BinOp::Lt,
                    Rule::le => BinOp::Le,
                    Rule::gt => BinOp::Gt,
                    Rule::ge => BinOp::Ge,
                    Rule::and => BinOp::And,
                    Rule::or => BinOp::Or,
                    r => unreachable!("unexpected operator {r:?}"),
                };
                node(ExprKind::Binary { op, lhs: Box::new(lhs), rhs: Box::new(rhs) }, span, dl.max(dr) + 1)
            })
            .parse(p.into_inner());
        result
    }

    fn primary(&mut self, p: Pair<Rule>) -> Deep {
        let span = self.span(&p);
        let kind = match p.as_rule() {
            Rule::int => {
                let digits: String = p.as_str().chars().filter(|c| *c != '_').collect();
                let v = digits.parse::<i64>().map_err(|_| {
                    Diagnostic::at("integer literal is too large", span).with_label(format!("larger than {}", i64::MAX))
                })?;
                ExprKind::Int(v)
            }
            Rule::float => {
                let v: f64 = p.as_str().parse().map_err(|_| Diagnostic::at("malformed number", span))?;
                if !v.is_finite() {
                    return Err(
                        Diagnostic::at("number literal is out of range", span).with_label("this overflows to infinity")
                    );
                }
                ExprKind::Float(v)
            }
            Rule::string => {
                let s = p.as_str();
                ExprKind::Str(s[1..s.len() - 1].to_string())
            }
            Rule::boolean => ExprKind::Bool(p.as_str() == "true"),
            Rule::ident => ExprKind::Name(p.as_str().to_string()),
            Rule::paren => {
                // The parentheses belong to the expression: a caret under `(a - 1) / b` starts at `(`.
                let (mut e, depth) = self.expr_deep(p.into_inner().next().expect("grammar: paren"))?;
                e.span = span;
                return Ok((e, depth));
            }
            Rule::list => {
                let mut items = Vec::new();
                for q in p.into_inner() {
                    items.push(self.expr(q)?);
                }
                ExprKind::List(items)
            }
            Rule::block => ExprKind::Block(self.block(p)?),
            Rule::lambda => {
                let mut params = Vec::new();
                let mut body = None;
                for q in p.into_inner() {
                    match q.as_rule() {
                        Rule::ident => params.push(self.ident(q)),
                        _ => body = Some(self.expr(q)?),
                    }
                }
                ExprKind::Lambda { params, body: Box::new(body.expect("grammar: lambda body")) }
            }
            Rule::if_expr => {
                let mut branches = Vec::new();
                let mut otherwise = None;
                let mut inner = p.into_inner().peekable();
                while let Some(q) = inner.next() {
                    match q.as_rule() {
                        Rule::expr => {
                            let cond = self.expr(q)?;
                            let body = self.block(inner.next().expect("grammar: if body"))?;
                            branches.push((cond, body));
                        }
                        _ => otherwise = Some(self.block(q)?),
                    }
                }
                ExprKind::If { branches, otherwise }
            }
            r => unreachable!("unexpected primary {r:?}"),
        };
        Ok((Expr { kind, span }, 1))
    }

    fn args(&mut self, p: Pair<Rule>) -> Result<Vec<Arg>, Diagnostic> {
        let mut out = Vec::new();
        for a in p.into_inner() {
            let mut inner: Vec<Pair<Rule>> = a.into_inner().collect();
            let value = self.expr(inner.pop().expect("grammar: arg value"))?;
            let name = inner.pop().map(|n| self.ident(n));
            out.push(Arg { name, value });
        }
        Ok(out)
    }

    fn index_items(&mut self, p: Pair<Rule>) -> Result<Vec<IndexItem>, Diagnostic> {
        let mut out = Vec::new();
        for q in p.into_inner() {
            let span = self.span(&q);
            out.push(match q.as_rule() {
                Rule::ellipsis => IndexItem::Ellipsis(span),
                Rule::range => {
                    // `a:b` — which side is present is told by the position of the colon.
                    let text = q.as_str();
                    let colon = q.as_span().start() + text.find(':').unwrap_or(0);
                    let mut start = None;
                    let mut end = None;
                    for e in q.into_inner() {
                        if e.as_span().start() < colon {
                            start = Some(self.expr(e)?);
                        } else {
                            end = Some(self.expr(e)?);
                        }
                    }
                    IndexItem::Range { start, end, span }
                }
                _ => IndexItem::At(self.expr(q)?),
            });
        }
        Ok(out)
    }
}
