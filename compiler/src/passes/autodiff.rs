//! The `autodiff` pass: the gradient of the output `loss` w.r.t. every trainable
//! parameter, appended to the same graph (see `crate::autodiff`).

use super::Pass;
use crate::ir::Graph;
use tnc_grammar::Diagnostic;

pub struct Autodiff;

impl Pass for Autodiff {
    fn name(&self) -> &'static str {
        "autodiff"
    }

    fn run(&self, g: Graph) -> Result<Graph, Diagnostic> {
        differentiate_loss(g)
    }
}

/// Gradients of the output named `loss`, as outputs `grad.<parameter>`.
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
