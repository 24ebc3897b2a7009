//! The pipeline, as a list of named passes that can be read top to bottom. `tnc ir
//! --after NAME` runs the pipeline up to and including `NAME`.

use crate::ir::Graph;
use tnc_grammar::Diagnostic;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    /// AST to graph IR (always runs; listed so `--after elaborate` names it).
    Elaborate,
}

impl Pass {
    pub const ALL: &'static [Pass] = &[Pass::Elaborate];

    pub fn name(self) -> &'static str {
        match self {
            Pass::Elaborate => "elaborate",
        }
    }

    pub fn from_name(name: &str) -> Option<Pass> {
        Pass::ALL.iter().copied().find(|p| p.name() == name)
    }

    fn run(self, g: Graph) -> Result<Graph, Diagnostic> {
        match self {
            Pass::Elaborate => Ok(g),
        }
    }
}

/// Run the passes after elaboration up to and including `stop`.
pub fn run_until(mut g: Graph, stop: Pass) -> Result<Graph, Diagnostic> {
    for &p in Pass::ALL {
        g = p.run(g)?;
        if p == stop {
            break;
        }
    }
    Ok(g)
}
