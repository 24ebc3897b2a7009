//! The normal form of the token cross-entropy against a vocabulary table, and its two
//! backward ops. None of them materializes the `[T…, V]` logits: kernels (and the
//! interpreter's chunked evaluation) sweep the vocabulary in chunks with an online
//! logsumexp, so memory stays `O(T + V·D)` however large V is (DESIGN.md: 268K words).
//!
//! Notation: `x [T…, D]` are the hidden states (any leading token axes `T…`), `E [V, D]`
//! the table (row `E_v` scores word `v`; an untied projection `x @ W` with `W [D, V]` is
//! the same op with `transposed`, `E = Wᵀ`), `y [T…]` the i32 targets, `z_tv = x_t·E_v`
//! the logits, `lse_t = log Σ_v exp(z_tv)` and `p_tv = exp(z_tv − lse_t)` the softmax.
//!
//! - [`CeOp::Loss`]: `(x, E, y) → ℓ [T…]`, `ℓ_t = lse_t − z_{t,y_t}` (per token; a mean
//!   or other reduction stays a primitive op after it).
//! - [`CeOp::GradX`]: `(x, E, y, g [T…]) → [T…, D]`, `g_t · (Σ_v p_tv E_v − E_{y_t})`,
//!   the cotangent of `x` for the cotangent `g` of `ℓ`.
//! - [`CeOp::GradTable`]: `(x, E, y, g) → E's shape`,
//!   `dE_v = Σ_t g_t (p_tv − [y_t = v]) x_t` (stored transposed, `[D, V]`, if `transposed`).
//!
//! A target outside `0..V` is an evaluation error, never a silent zero.

use super::dim::shape_to_string;
use super::types::{DType, TensorType};

/// Which of the three cross-entropy ops.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CeOp {
    Loss,
    GradX,
    GradTable,
    /// `(x, E, y) → c [T…]`, `c_t = 1` when the target's logit is a largest one
    /// (`z_{t,y_t} ≥ max_v z_tv`, ties count as correct), else 0: per-token accuracy for
    /// evaluation. It has no derivative.
    Correct,
}

/// Attributes shared by the three ops.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CrossEntropy {
    /// The table operand is `[D, V]` (an untied output projection `x @ W`) rather than
    /// `[V, D]` (tied embeddings, `einsum("…d,vd->…v")`).
    pub transposed: bool,
    /// The logits product was written inside `precision f32 { … }`: its products keep
    /// f32 operands under any `--precision`.
    pub pinned: bool,
}

impl CrossEntropy {
    /// `(V, D)` from the table's shape.
    pub fn vocab_and_width<'a>(&self, table: &'a [super::Dim]) -> Option<(&'a super::Dim, &'a super::Dim)> {
        match table {
            [a, b] if self.transposed => Some((b, a)),
            [a, b] => Some((a, b)),
            _ => None,
        }
    }

    pub fn infer(&self, which: CeOp, ops: &[&TensorType]) -> Result<TensorType, String> {
        let name = match which {
            CeOp::Loss => "cross_entropy",
            CeOp::GradX => "cross_entropy_grad_x",
            CeOp::GradTable => "cross_entropy_grad_table",
            CeOp::Correct => "cross_entropy_correct",
        };
        let want = if matches!(which, CeOp::Loss | CeOp::Correct) { 3 } else { 4 };
        if ops.len() != want {
            return Err(format!("`{name}` takes {want} operands, got {}", ops.len()));
        }
        let (x, table, y) = (ops[0], ops[1], ops[2]);
        if !x.dtype.is_float() || x.dtype != table.dtype {
            return Err(format!("`{name}` needs float hidden states and table of one type, got {x} and {table}"));
        }
        if y.dtype != DType::I32 {
            return Err(format!("`{name}` needs i32 targets, got {y}"));
        }
        let Some((_, d)) = self.vocab_and_width(&table.shape) else {
            return Err(format!("`{name}` needs a rank-2 table, got {table}"));
        };
        let Some((xd, tokens)) = x.shape.split_last() else {
            return Err(format!("`{name}` needs hidden states of rank ≥ 1, got {x}"));
        };
        if xd != d {
            return Err(format!(
                "`{name}`: the hidden width {xd} differs from the table's {d} (table {}{})",
                shape_to_string(&table.shape),
                if self.transposed { ", transposed" } else { "" }
            ));
        }
        if y.shape != tokens {
            return Err(format!(
                "`{name}`: the targets {} must have the token shape {} of the hidden states",
                shape_to_string(&y.shape),
                shape_to_string(tokens)
            ));
        }
        if !matches!(which, CeOp::Loss | CeOp::Correct) {
            let g = ops[3];
            if g.dtype != DType::F32 || g.shape != tokens {
                return Err(format!("`{name}`: the loss cotangent must be f32{}, got {g}", shape_to_string(tokens)));
            }
        }
        Ok(match which {
            CeOp::Loss | CeOp::Correct => TensorType::new(DType::F32, tokens.to_vec()),
            // Gradients are f32 whatever the operands' precision (`passes/precision.rs`).
            CeOp::GradX => x.with_dtype(DType::F32),
            CeOp::GradTable => table.with_dtype(DType::F32),
        })
    }

    /// Printed attributes.
    pub fn attrs(&self) -> String {
        match (self.transposed, self.pinned) {
            (false, false) => String::new(),
            (true, false) => "[table=dv]".into(),
            (false, true) => "[f32]".into(),
            (true, true) => "[table=dv f32]".into(),
        }
    }
}
