//! The tnc language front end: the pest grammar (`tn.pest`, the reference for the
//! syntax), the AST with source spans, the parser, and diagnostics.

pub mod ast;
pub mod diag;
pub mod parse;
pub mod source;

pub use diag::{Diagnostic, Severity};
pub use source::{FileId, SourceMap, Span};
