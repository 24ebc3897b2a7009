//! Which values an integer input may hold. A token id indexes an embedding table and
//! names a word of the cross-entropy's vocabulary; an id outside the table is a wrong
//! result waiting to happen (kernels clamp or read past the table, the interpreter
//! errors, a loss against a target ≥ V is finite and meaningless). So every integer input
//! that reaches an index operand — through reshapes, slices, permutations, broadcasts,
//! padding (zeros) or concatenation, which move values without changing them — gets the
//! bounds of the tables it indexes (and of the positions `0..L` it is compared with: a
//! one-hot over L rows, such as the row a decode step writes into its KV cache), and every
//! run checks them before computing anything: the interpreter (`interp::eval`) and every
//! bundle executor (the manifest's `IoEntry::bounds`), both with
//! `tnc_bundle::index_bounds::check_values`.

use super::{Dim, Graph, NodeId, Op};

/// For each input of `g` (in declaration order): the exclusive upper bounds its values
/// must respect (each value `v` must satisfy `0 ≤ v < b` for every `b`); empty when the
/// input indexes nothing.
pub fn input_bounds(g: &Graph) -> Vec<Vec<Dim>> {
    g.inputs.iter().map(|i| if i.ty.dtype == super::DType::I32 { bounds_of(g, i.node) } else { Vec::new() }).collect()
}

fn bounds_of(g: &Graph, input: NodeId) -> Vec<Dim> {
    let mut bounds: Vec<Dim> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![input];
    while let Some(n) = stack.pop() {
        if !seen.insert(n) {
            continue;
        }
        for user in g.users(n) {
            let operands = g.operands(user);
            for (pos, _) in operands.iter().enumerate().filter(|(_, &o)| o == n) {
                let table = |i: usize| g.ty(operands[i]).shape.first().cloned();
                let bound = match &g.node(user).op {
                    // The values themselves, moved.
                    Op::Reshape { .. }
                    | Op::Broadcast { .. }
                    | Op::Permute { .. }
                    | Op::Slice { .. }
                    | Op::Pad { .. }
                    | Op::Concat { .. } => {
                        stack.push(user);
                        None
                    }
                    Op::Gather if pos == 1 => table(0),
                    // Compared with the positions 0..L (a one-hot over L rows, as a decode
                    // step writes its KV cache's row): a value outside selects no row.
                    Op::Binary(super::BinaryOp::Eq) => match &g.node(operands[1 - pos]).op {
                        Op::Iota { len, .. } => Some(len.clone()),
                        _ => None,
                    },
                    Op::ScatterAdd { rows } if pos == 1 => Some(rows.clone()),
                    Op::CrossEntropy(ce)
                    | Op::CrossEntropyGradX(ce)
                    | Op::CrossEntropyGradTable(ce)
                    | Op::CrossEntropyCorrect(ce)
                        if pos == 2 =>
                    {
                        ce.vocab_and_width(&g.ty(operands[1]).shape).map(|(v, _)| v.clone())
                    }
                    _ => None,
                };
                if let Some(b) = bound {
                    if !bounds.contains(&b) {
                        bounds.push(b);
                    }
                }
            }
        }
    }
    bounds
}
