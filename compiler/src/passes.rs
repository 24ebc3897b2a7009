//! The pipeline, as a list of named passes that can be read top to bottom. `tnc ir
//! --after NAME` runs the pipeline up to and including `NAME`.

use crate::ir::Graph;
use tnc_grammar::Diagnostic;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    /// AST to graph IR (always runs; listed so `--after elaborate` names it).
    Elaborate,
    /// Append the gradient of the output `loss` w.r.t. every trainable parameter.
    Autodiff,
}

impl Pass {
    pub const ALL: &'static [Pass] = &[Pass::Elaborate, Pass::Autodiff];

    pub fn name(self) -> &'static str {
        match self {
            Pass::Elaborate => "elaborate",
            Pass::Autodiff => "autodiff",
        }
    }

    pub fn from_name(name: &str) -> Option<Pass> {
        Pass::ALL.iter().copied().find(|p| p.name() == name)
    }

    fn run(self, g: Graph) -> Result<Graph, Diagnostic> {
        match self {
            Pass::Elaborate => Ok(g),
            Pass::Autodiff => differentiate_loss(g),
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

/// The autodiff pass: gradients of the output named `loss`.
pub fn differentiate_loss(mut g: Graph) -> Result<Graph, Diagnostic> {
    let Some(&(_, loss)) = g.outputs.iter().find(|(n, _)| n == "loss") else {
        return Err(Diagnostic::error(format!("model `{}` has no output named `loss` to differentiate", g.name))
            .with_hint("declare it with `output loss = …`"));
    };
    crate::autodiff::differentiate(&mut g, loss, &crate::autodiff::GradOptions::default()).map_err(|e| {
        let d = Diagnostic::error(e.message);
        match e.span {
            Some(s) => d.or_at(s),
            None => d,
        }
    })?;
    Ok(g)
}
