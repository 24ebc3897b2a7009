//! The pipeline: a list of named graph passes, read top to bottom. Each pass is a type
//! with one `run` method; `tnc ir --after NAME` runs the pipeline up to `NAME` and prints
//! the graph. In debug builds the verifier checks the graph after every pass.

pub mod accuracy;
mod autodiff;
pub mod canonicalize;
pub mod cse;
pub mod dce;
pub mod decode_step;
mod graph_build;
pub mod next_token;
pub mod precision;
pub mod prefill;
mod query_row;
mod recognize;
pub mod simplify;

pub use accuracy::Accuracy;
pub use autodiff::{differentiate_loss, Autodiff};
pub use canonicalize::Canonicalize;
pub use cse::Cse;
pub use dce::Dce;
pub use decode_step::DecodeStep;
pub use next_token::NextToken;
pub use precision::{Policy, Precision};
pub use prefill::Prefill;
pub use recognize::Recognize;
pub use simplify::Simplify;

use crate::ir::{verify::verify, Graph};
use tnc_grammar::Diagnostic;

/// A graph-to-graph pass.
pub trait Pass {
    /// The name `tnc ir --after` knows it by.
    fn name(&self) -> &'static str;
    fn run(&self, g: Graph) -> Result<Graph, Diagnostic>;
}

/// The passes after elaboration, in order, with the default f32 precision.
pub fn pipeline() -> Vec<Box<dyn Pass>> {
    pipeline_with(Policy::F32)
}

/// The passes after elaboration, in order, with the given precision policy.
pub fn pipeline_with(precision: Policy) -> Vec<Box<dyn Pass>> {
    vec![
        Box::new(Canonicalize),
        Box::new(Recognize),
        Box::new(Autodiff),
        Box::new(Simplify),
        Box::new(Cse),
        Box::new(Precision(precision)),
        Box::new(Dce),
    ]
}

/// Every name `--after` accepts: `elaborate` (the graph as elaborated), then the pipeline.
pub fn names() -> Vec<&'static str> {
    std::iter::once("elaborate").chain(pipeline().iter().map(|p| p.name())).collect()
}

/// Run the pipeline (f32) up to and including the pass called `stop` (`elaborate`:
/// none). `None` if there is no such pass.
pub fn run_until(g: Graph, stop: &str) -> Option<Result<Graph, Diagnostic>> {
    run_until_with(g, stop, Policy::F32)
}

/// [`run_until`] with a precision policy.
pub fn run_until_with(mut g: Graph, stop: &str, precision: Policy) -> Option<Result<Graph, Diagnostic>> {
    if stop == "elaborate" {
        return Some(Ok(g));
    }
    let passes = pipeline_with(precision);
    passes.iter().position(|p| p.name() == stop)?;
    for p in passes {
        g = match p.run(g) {
            Ok(g) => g,
            Err(d) => return Some(Err(d)),
        };
        if cfg!(debug_assertions) {
            if let Err(e) = verify(&g) {
                return Some(Err(Diagnostic::error(format!(
                    "internal error: pass `{}` broke the graph: {e}",
                    p.name()
                ))));
            }
        }
        if p.name() == stop {
            break;
        }
    }
    Some(Ok(g))
}
