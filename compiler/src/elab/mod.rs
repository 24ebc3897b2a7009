//! Elaboration: AST to graph IR. Functions are inlined, loops unrolled, `if`s and
//! hyper-parameters evaluated, so the graph contains only tensor operations. Sizes
//! stay symbolic where they depend on inputs (`B`, `N`).
//!
//! Parameter names follow one rule (docs/language.md, "Names"): the path of call sites
//! from the model down, where a call `f(…)` adds the segment `f` (the name it was called
//! by), a loop `for l in 0..layers` adds `layers.<l>` (the loop bound's name, or the
//! loop variable's when the bound is not a plain name), and the declared name comes last.
//! A second call of the same name in one scope adds `f_1`, `f_2`, ….

mod builtins;
mod call;
mod decl;
mod eval;
mod load;
mod tensor;
mod value;

pub use builtins::Builtin;
pub use load::{load_program, load_program_from_text, read_source, Program, STD_SOURCE};

use crate::ir::{verify::verify, Graph};
use std::collections::HashMap;
use std::rc::Rc;
use tnc_grammar::ast::Expr;
use tnc_grammar::{Diagnostic, FileId, SourceMap, Span};
use value::Value;

pub(crate) type R<T> = Result<T, Diagnostic>;

/// Budgets that keep elaboration finite on any input.
pub const MAX_CALL_DEPTH: usize = 64;
pub const MAX_LOOP_TRIPS: i64 = 100_000;
pub const MAX_GRAPH_NODES: usize = 1_000_000;
pub const MAX_STEPS: u64 = 5_000_000;

/// `--set name=value` (a model hyper-parameter) or `--set fn.arg=value` (the default of
/// a function's argument), with the value parsed as an expression.
#[derive(Clone, Debug)]
pub struct Override {
    pub target: String,
    pub value: Expr,
    pub span: Span,
}

/// Parse `--set` arguments into overrides. Their text lives in the source map as
/// `<command line>` so that errors in them get carets too.
pub fn parse_overrides(sets: &[String], sources: &mut SourceMap) -> R<Vec<Override>> {
    let mut out = Vec::new();
    for s in sets {
        let id = sources.add("<command line>", format!("--set {s}"));
        let Some((name, value)) = s.split_once('=') else {
            return Err(Diagnostic::at(
                format!("`--set {s}` needs the form name=value"),
                Span::new(id, 6..6 + s.len()),
            )
            .with_hint("for example `--set layers=12`"));
        };
        let name_span = Span::new(id, 6..6 + name.len());
        let valid = name.split('.').all(|p| !p.is_empty() && p.chars().all(|c| c.is_alphanumeric() || c == '_'));
        if !valid || name.split('.').count() > 2 {
            return Err(Diagnostic::at(format!("`{name}` is not a hyper-parameter name"), name_span)
                .with_hint("use `name=value` for a model hyper-parameter or `function.argument=value`"));
        }
        let offset = 6 + name.len() + 1;
        let padded = format!("{}{}", " ".repeat(offset), value);
        if let Some(first) = out.iter().find(|o: &&Override| o.target == name) {
            return Err(Diagnostic::at(format!("`{name}` is set twice"), name_span)
                .with_secondary(first.span, "set here first")
                .with_hint("keep one `--set` for it"));
        }
        let expr = tnc_grammar::parse::parse_expr(&padded, id)?;
        out.push(Override { target: name.to_string(), value: expr, span: Span::new(id, 6..6 + s.len()) });
    }
    Ok(out)
}

pub(crate) struct Frame {
    pub vars: HashMap<String, Value>,
    /// Inputs and outputs may only be declared in the model's own body.
    pub is_model: bool,
}

pub struct Elaborator<'s> {
    program: &'s Program,
    fn_overrides: HashMap<(String, String), &'s Override>,
    /// The graph being built, and those of initializers being elaborated (a stack).
    graphs: Vec<(u32, Graph)>,
    next_graph_id: u32,
    /// Current position in the naming hierarchy.
    scope: Vec<String>,
    /// How often each full scope path was entered, to disambiguate repeated calls.
    scope_uses: HashMap<String, usize>,
    dropout_sites: usize,
    call_depth: usize,
    /// `--set fn.arg=` overrides some call took its value from, and for the others the
    /// first call that passed the argument itself (an override no call uses changes
    /// nothing, which is an error: an ablation would compare a model with itself).
    used_overrides: std::collections::HashSet<(String, String)>,
    passed_explicitly: HashMap<(String, String), Span>,
    /// `precision f32 { … }` blocks being executed (in this call or a caller's): while
    /// any is, every product is pinned to f32 (`EinsumSpec::pinned`).
    pinned_blocks: usize,
    steps: u64,
    outputs_seen: HashMap<String, Span>,
}

/// Elaborate the model of a loaded program into a verified graph.
pub fn elaborate(program: &Program, overrides: &[Override], model_name: Option<&str>) -> R<Graph> {
    let model = pick_model(program, model_name)?;
    let mut fn_overrides = HashMap::new();
    let mut model_overrides = Vec::new();
    for o in overrides {
        match o.target.split_once('.') {
            Some((f, a)) => {
                let Some(decl) = program.functions.get(f) else {
                    let hint = tnc_grammar::diag::did_you_mean(f, program.functions.keys().map(|s| s.as_str()));
                    let mut d = Diagnostic::at(format!("`--set {}`: there is no function `{f}`", o.target), o.span);
                    if let Some(h) = hint {
                        d = d.with_hint(h);
                    }
                    return Err(d);
                };
                if !decl.params.iter().any(|p| p.name.name == a) {
                    let names: Vec<&str> = decl.params.iter().map(|p| p.name.name.as_str()).collect();
                    return Err(Diagnostic::at(format!("`--set {}`: `{f}` has no argument `{a}`", o.target), o.span)
                        .with_secondary(decl.name.span, format!("`{f}` is defined here"))
                        .with_note(format!("its arguments are: {}", names.join(", "))));
                }
                fn_overrides.insert((f.to_string(), a.to_string()), o);
            }
            None => model_overrides.push(o),
        }
    }
    let mut el = Elaborator {
        program,
        fn_overrides,
        graphs: vec![(0, Graph::new(model.name.name.clone()))],
        next_graph_id: 1,
        scope: Vec::new(),
        scope_uses: HashMap::new(),
        dropout_sites: 0,
        call_depth: 0,
        pinned_blocks: 0,
        used_overrides: Default::default(),
        passed_explicitly: HashMap::new(),
        steps: 0,
        outputs_seen: HashMap::new(),
    };
    el.elaborate_model(&model, &model_overrides)?;
    let mut unused: Vec<(&(String, String), &&Override)> =
        el.fn_overrides.iter().filter(|(k, _)| !el.used_overrides.contains(*k)).collect();
    unused.sort_by_key(|(_, o)| o.span.start);
    if let Some(((f, a), o)) = unused.first() {
        let mut d = Diagnostic::at(format!("`--set {}` changes nothing", o.target), o.span);
        d = match el.passed_explicitly.get(&(f.clone(), a.clone())) {
            Some(&call) => d
                .with_label(format!("every call of `{f}` passes `{a}` itself"))
                .with_secondary(call, format!("this call passes `{a}`"))
                .with_hint(format!(
                    "change the value where it is passed (often a model hyper-parameter), not `{f}`'s default"
                )),
            None => d.with_label(format!("the model never calls `{f}`")),
        };
        return Err(d);
    }
    let (_, graph) = el.graphs.pop().expect("the model graph is at the bottom of the stack");
    if graph.outputs.is_empty() {
        return Err(Diagnostic::at(format!("model `{}` declares no output", model.name.name), model.name.span)
            .with_hint("declare the loss with `output loss = cross_entropy(…)`"));
    }
    verify(&graph).map_err(|e| {
        Diagnostic::at(format!("internal error: elaboration produced an invalid graph: {e}"), model.span)
    })?;
    Ok(graph)
}

fn pick_model(program: &Program, name: Option<&str>) -> R<Rc<tnc_grammar::ast::FnDecl>> {
    let names: Vec<&str> = program.models.iter().map(|m| m.name.name.as_str()).collect();
    match name {
        Some(n) => program.models.iter().find(|m| m.name.name == n).cloned().ok_or_else(|| {
            Diagnostic::error(format!("there is no model `{n}` in this file"))
                .with_note(format!("models here: {}", if names.is_empty() { "none".into() } else { names.join(", ") }))
        }),
        None => match program.models.as_slice() {
            [m] => Ok(m.clone()),
            [] => {
                let root = program.root.unwrap_or(FileId(0));
                Err(Diagnostic::at("this file defines no model", Span::new(root, 0..0))
                    .with_hint("a model file needs `model name(hyper = default, …) { … }`"))
            }
            [first, second, ..] => {
                Err(Diagnostic::at("this file defines several models; choose one with `--model`", second.name.span)
                    .with_label("second model")
                    .with_secondary(first.name.span, "first model")
                    .with_note(format!("models here: {}", names.join(", "))))
            }
        },
    }
}

impl Elaborator<'_> {
    fn graph(&self) -> &Graph {
        &self.graphs.last().expect("graph stack is never empty").1
    }

    fn graph_mut(&mut self) -> &mut Graph {
        &mut self.graphs.last_mut().expect("graph stack is never empty").1
    }

    fn graph_id(&self) -> u32 {
        self.graphs.last().expect("graph stack is never empty").0
    }

    /// Count one elaboration step against the budget (loops, calls, statements).
    fn step(&mut self, span: Span) -> R<()> {
        self.steps += 1;
        if self.steps > MAX_STEPS {
            return Err(Diagnostic::at("elaboration takes too long", span)
                .with_label(format!("stopped after {MAX_STEPS} steps here"))
                .with_hint("check for loops with huge trip counts"));
        }
        Ok(())
    }

    /// Enter a naming scope; returns how many segments were pushed.
    fn enter_scope(&mut self, segment: &str) -> usize {
        let base = self.scope.join(".");
        let key = if base.is_empty() { segment.to_string() } else { format!("{base}.{segment}") };
        let uses = self.scope_uses.entry(key).or_insert(0);
        let name = if *uses == 0 { segment.to_string() } else { format!("{segment}_{uses}") };
        *uses += 1;
        self.scope.push(name);
        1
    }

    fn qualified(&self, name: &str) -> String {
        if self.scope.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.scope.join("."))
        }
    }

    /// A stable salt for a dropout site: its scope path and its order within the model.
    fn dropout_salt(&mut self) -> u64 {
        self.dropout_sites += 1;
        tnc_bundle::rng::stable_hash(&format!("{}#dropout{}", self.scope.join("."), self.dropout_sites))
    }
}
