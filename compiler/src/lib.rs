//! tnc's compiler: elaboration of the AST into the graph IR, and (in later stages)
//! passes and code generation. See `../shared/DESIGN.md` for the pipeline.

pub mod autodiff;
pub mod backend;
pub mod bundle;
pub mod driver;
pub mod elab;
pub mod frontend;
pub mod fusion;
pub mod interp;
pub mod ir;
pub mod kernel;
pub mod lint;
pub mod memory;
pub mod passes;
pub mod pipeline;
pub mod schedule;
