//! Loading a model file and its imports into one namespace of functions and models.
//! `use std` loads the standard library compiled into tnc (`models/std.tn`);
//! `use "file.tn"` loads a file relative to the importing one. Each file is loaded once;
//! a cycle of imports is an error that lists the cycle.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use tnc_grammar::ast::{FnDecl, Item, UseTarget};
use tnc_grammar::{Diagnostic, FileId, SourceMap, Span};

/// The standard library, written in the language itself.
pub const STD_SOURCE: &str = include_str!("../../../models/std.tn");

/// Everything visible to elaboration: every function of every loaded file, and the
/// models of the root file.
#[derive(Default)]
pub struct Program {
    pub functions: HashMap<String, Rc<FnDecl>>,
    pub models: Vec<Rc<FnDecl>>,
    pub root: Option<FileId>,
}

struct Loader<'a> {
    sources: &'a mut SourceMap,
    program: Program,
    loaded: HashMap<PathBuf, FileId>,
    /// Files being loaded, for cycle detection.
    stack: Vec<PathBuf>,
}

/// Read a file, reporting unreadable files and invalid UTF-8 as diagnostics.
pub fn read_source(path: &Path, sources: &mut SourceMap, at: Option<Span>) -> Result<FileId, Diagnostic> {
    let bytes = std::fs::read(path).map_err(|e| {
        let d = Diagnostic::error(format!("cannot read `{}`: {e}", path.display()));
        match at {
            Some(s) => d.or_at(s).with_label("imported here"),
            None => d,
        }
    })?;
    match String::from_utf8(bytes) {
        Ok(text) => Ok(sources.add(path.display().to_string(), text)),
        Err(e) => {
            let offset = e.utf8_error().valid_up_to();
            let lossy = String::from_utf8_lossy(e.as_bytes()).into_owned();
            // Offsets before the first bad byte are the same in the lossy text.
            let id = sources.add(path.display().to_string(), lossy);
            Err(Diagnostic::at(format!("`{}` is not valid UTF-8", path.display()), Span::new(id, offset..offset + 1))
                .with_label(format!("invalid byte at offset {offset}"))
                .with_hint("model files must be UTF-8 text"))
        }
    }
}

/// Load the root model file and everything it imports.
pub fn load_program(path: &Path, sources: &mut SourceMap) -> Result<Program, Diagnostic> {
    let root = read_source(path, sources, None)?;
    let mut loader = Loader { sources, program: Program::default(), loaded: HashMap::new(), stack: Vec::new() };
    loader.program.root = Some(root);
    let key = canonical(path);
    loader.load_file(root, key, true)?;
    Ok(loader.program)
}

/// Load a program from text held in memory (tests, fuzzing). Relative imports resolve
/// against the current directory.
pub fn load_program_from_text(name: &str, text: &str, sources: &mut SourceMap) -> Result<Program, Diagnostic> {
    let root = sources.add(name, text);
    let mut loader = Loader { sources, program: Program::default(), loaded: HashMap::new(), stack: Vec::new() };
    loader.program.root = Some(root);
    loader.load_file(root, PathBuf::from(name), true)?;
    Ok(loader.program)
}

fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

impl Loader<'_> {
    fn load_file(&mut self, id: FileId, key: PathBuf, is_root: bool) -> Result<(), Diagnostic> {
        self.loaded.insert(key.clone(), id);
        self.stack.push(key.clone());
        let text = self.sources.file(id).text.clone();
        let file = tnc_grammar::parse::parse_file(&text, id)?;
        for item in file.items {
            match item {
                Item::Use(u) => self.load_use(&u.target, u.span, &key)?,
                Item::Fn(f) => self.define(f)?,
                Item::Model(m) => {
                    if is_root {
                        self.program.models.push(Rc::new(m));
                    }
                }
            }
        }
        self.stack.pop();
        Ok(())
    }

    fn load_use(&mut self, target: &UseTarget, span: Span, from: &Path) -> Result<(), Diagnostic> {
        let (key, text_or_path) = match target {
            UseTarget::Std => (PathBuf::from("<std>"), None),
            UseTarget::Path(p) => {
                let base = from.parent().unwrap_or(Path::new("."));
                let path = base.join(p);
                (canonical(&path), Some(path))
            }
        };
        if let Some(pos) = self.stack.iter().position(|k| *k == key) {
            let cycle: Vec<String> = self.stack[pos..]
                .iter()
                .chain(std::iter::once(&key))
                .map(|p| p.file_name().map_or_else(|| p.display().to_string(), |n| n.to_string_lossy().into_owned()))
                .collect();
            return Err(Diagnostic::at("import cycle", span)
                .with_label("this import closes a cycle")
                .with_note(format!("the cycle is {}", cycle.join(" → ")))
                .with_hint("move the shared functions into a third file that both import"));
        }
        if self.loaded.contains_key(&key) {
            return Ok(());
        }
        let id = match text_or_path {
            None => self.sources.add("<std>", STD_SOURCE),
            Some(path) => read_source(&path, self.sources, Some(span))?,
        };
        self.load_file(id, key, false)
    }

    fn define(&mut self, f: FnDecl) -> Result<(), Diagnostic> {
        if let Some(prev) = self.program.functions.get(&f.name.name) {
            return Err(Diagnostic::at(format!("`{}` is defined twice", f.name.name), f.name.span)
                .with_label("second definition")
                .with_secondary(prev.name.span, "first definition")
                .with_hint("rename one of them"));
        }
        if super::builtins::Builtin::from_name(&f.name.name).is_some() {
            return Err(Diagnostic::at(
                format!("`{}` is a builtin function and cannot be redefined", f.name.name),
                f.name.span,
            ));
        }
        self.program.functions.insert(f.name.name.clone(), Rc::new(f));
        Ok(())
    }
}
