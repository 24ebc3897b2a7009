//! `accuracy`: for training and evaluation bundles, an output `correct` next to the loss:
//! for every token scored by the fused cross-entropy, 1 when the target is the model's
//! top prediction, else 0 (`CeOp::Correct`). The trainer averages it over the positions
//! a task scores (e.g. MQAR's answers). Like the loss, it never materializes the logits.
//!
//! Not part of the default pipeline: `tnc compile --train` runs it after the pipeline.
//! A graph without exactly one recognized cross-entropy is left as it is (no accuracy).

use super::Pass;
use crate::ir::{Graph, Op};
use tnc_grammar::Diagnostic;

/// The output's name.
pub const CORRECT: &str = "correct";

pub struct Accuracy;

impl Pass for Accuracy {
    fn name(&self) -> &'static str {
        "accuracy"
    }

    fn run(&self, mut g: Graph) -> Result<Graph, Diagnostic> {
        let losses: Vec<_> = g
            .dag
            .node_indices()
            .filter_map(|n| match &g.node(n).op {
                Op::CrossEntropy(ce) => Some((n, *ce)),
                _ => None,
            })
            .collect();
        let [(loss, ce)] = losses[..] else {
            return Ok(g);
        };
        let operands = g.operands(loss);
        let correct = g
            .add(Op::CrossEntropyCorrect(ce), &operands, None)
            .map_err(|e| Diagnostic::error(format!("internal error: adding the accuracy output: {e}")))?;
        g.add_output(CORRECT, correct);
        Ok(g)
    }
}
