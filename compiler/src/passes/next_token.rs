//! `next_token`: the program text generation runs, in place of `autodiff`: the logits of
//! the token that follows the last position, `logits [B…, 1, V]`, from a language model
//! whose loss is one recognized cross-entropy against a vocabulary table (`lm_loss`).
//!
//! The loss's cross-entropy reads the hidden states of positions `0 … N−2` (position n
//! predicts token n + 1), sliced from those of every position; the pass slices position
//! `N−1` from the same states instead and multiplies it with the table, and the model's
//! outputs become that one (`dce` removes what only the loss needed). Every position
//! before the last runs as in training: the chunked kernels over the whole prompt.
//!
//! Not part of the default pipeline: `Pipeline::program` swaps it in for `autodiff`.

use super::Pass;
use crate::ir::rewrite::dependencies;
use crate::ir::{Dim, EinsumSpec, Graph, Op};
use tnc_grammar::Diagnostic;

/// The output's name.
pub const LOGITS: &str = "logits";

pub struct NextToken;

impl Pass for NextToken {
    fn name(&self) -> &'static str {
        "next_token"
    }

    fn run(&self, mut g: Graph) -> Result<Graph, Diagnostic> {
        let cannot = |why: String| {
            Diagnostic::error(format!("model `{}` cannot generate text: {why}", g.name))
                .with_hint("generation needs `output loss = lm_loss(hidden, table, tokens)` (models/std.tn)")
        };
        let Some(&(_, loss)) = g.outputs.iter().find(|(n, _)| n == "loss") else {
            return Err(cannot("it has no output named `loss`".into()));
        };
        let ces: Vec<_> = dependencies(&g, [loss])
            .into_iter()
            .filter_map(|n| match g.node(n).op {
                Op::CrossEntropy(attrs) => Some((n, attrs)),
                _ => None,
            })
            .collect();
        let [(ce, attrs)] = ces[..] else {
            return Err(cannot(format!("its loss holds {} cross-entropies against a vocabulary, not one", ces.len())));
        };
        let ops = g.operands(ce);
        let (x, table) = (ops[0], ops[1]);
        let span = g.node(ce).span;
        // x = h[…, 0:N−1, :]: the states of every position are h.
        let h = match &g.node(x).op {
            Op::Slice { axis, start, end } if *axis + 2 == g.ty(x).rank() && start.as_const() == Some(0) => {
                let h = g.operands(x)[0];
                let n = &g.ty(h).shape[*axis];
                (end.checked_add(&Dim::constant(1)).as_ref() == Some(n)).then_some((h, *axis, n.clone()))
            }
            _ => None,
        };
        let Some((h, axis, n)) = h else {
            return Err(cannot(
                "its cross-entropy does not read the hidden states of positions 0 … N−2 (position n predicting \
                 token n + 1)"
                    .into(),
            ));
        };
        let internal = |e: String| Diagnostic::error(format!("internal error: deriving the next-token logits: {e}"));
        let start = n.checked_add(&Dim::constant(-1)).ok_or_else(|| internal("size overflow".into()))?;
        let last = g.add(Op::Slice { axis, start, end: n }, &[h], span).map_err(internal)?;
        // `…nd,vd->…nv` (or `…nd,dv->…nv` for an untied projection).
        let lead: Vec<u8> = (0..axis as u8 + 1).map(|i| b'a' + i).collect();
        let (d, v) = (b'y', b'z');
        let x_letters = [lead.clone(), vec![d]].concat();
        let table_letters = if attrs.transposed { vec![d, v] } else { vec![v, d] };
        let spec = EinsumSpec {
            inputs: vec![x_letters, table_letters],
            output: [lead, vec![v]].concat(),
            pinned: attrs.pinned,
        };
        let logits = g.add(Op::Einsum(spec), &[last, table], span).map_err(internal)?;
        g.outputs = vec![(LOGITS.to_string(), logits)];
        Ok(g)
    }
}
