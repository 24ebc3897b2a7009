//! The front end as one call: load a model file with its imports, apply `--set`
//! overrides, elaborate into a verified graph. Deeply nested input recurses deeply in the
//! parser and elaborator, so the work runs on a thread with a large stack; every budget
//! in `elab` keeps it well inside that stack.

use crate::elab;
use crate::ir::Graph;
use std::path::Path;
use tnc_grammar::{Diagnostic, SourceMap};

/// Stack for the front-end thread. Only the pages actually touched are committed.
const FRONTEND_STACK: usize = 1 << 30;

pub struct Request<'a> {
    pub sets: &'a [String],
    pub model: Option<&'a str>,
}

/// Where the model text comes from.
pub enum Input<'a> {
    Path(&'a Path),
    Text { name: &'a str, text: &'a str },
}

/// Elaborate a model. On error the source map is still returned so the diagnostic can be
/// rendered.
pub fn elaborate(input: Input<'_>, req: &Request<'_>) -> (SourceMap, Result<Graph, Diagnostic>) {
    std::thread::scope(|s| {
        let worker = std::thread::Builder::new()
            .name("tnc-frontend".into())
            .stack_size(FRONTEND_STACK)
            .spawn_scoped(s, || elaborate_here(input, req));
        match worker {
            Ok(handle) => handle.join().unwrap_or_else(|_| {
                (
                    SourceMap::new(),
                    Err(Diagnostic::error("internal error: the front end panicked (please report this)")),
                )
            }),
            Err(e) => (SourceMap::new(), Err(Diagnostic::error(format!("cannot start the front-end thread: {e}")))),
        }
    })
}

/// The same on the calling thread (which must have a large enough stack).
pub fn elaborate_here(input: Input<'_>, req: &Request<'_>) -> (SourceMap, Result<Graph, Diagnostic>) {
    let mut sources = SourceMap::new();
    let program = match input {
        Input::Path(p) => elab::load_program(p, &mut sources),
        Input::Text { name, text } => elab::load_program_from_text(name, text, &mut sources),
    };
    let result = program.and_then(|program| {
        let overrides = elab::parse_overrides(req.sets, &mut sources)?;
        elab::elaborate(&program, &overrides, req.model)
    });
    (sources, result)
}

/// True when the diagnostic is about the command line rather than the model file
/// (used for the exit status: 2 for bad usage, 1 for an error in the model).
pub fn is_usage_error(d: &Diagnostic, sources: &SourceMap) -> bool {
    d.span.is_some_and(|s| (s.file.0 as usize) < sources.len() && sources.file(s.file).name == "<command line>")
}
