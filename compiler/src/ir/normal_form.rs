//! Normal-form ops, created by `recognize`: one op for each fused computation that
//! DESIGN.md calls out, whatever the spelling in the model.

use super::dim::shape_to_string;
use super::region::Region;
use super::types::{DType, TensorType};

/// Which key positions `m` contribute to the output at position `n`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// `m ≤ n`.
    Causal,
    /// `m ≥ n` (the backward of a causal attention runs this way).
    Anticausal,
    /// every `m`.
    Full,
}

/// Linear attention:
///
/// `O[.., n, :] = Σ_{m ∈ dir(n)} λ^{|n−m|} ⟨q'[.., n, :], k'[.., m, :]⟩ v'[.., m, :]`
///
/// where `q' = q_region(q operands)`, likewise `k'` and `v'`, all of shape
/// `[batch…, N, d]` (`v'`: `[batch…, N, e]`), and `λ` is the optional last operand, one
/// decay per batch index (size-1 axes broadcast), a constant or a buffer — never trained.
///
/// Operands, in order: the `q` region's arguments, the `k` region's, the `v` region's,
/// then `λ` if `decay`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LinearAttention {
    pub direction: Direction,
    pub decay: bool,
    pub q: Region,
    pub k: Region,
    pub v: Region,
}

impl LinearAttention {
    pub fn operand_count(&self) -> usize {
        self.q.args.len() + self.k.args.len() + self.v.args.len() + usize::from(self.decay)
    }

    /// Split operand types into the three regions' arguments and the decay.
    pub fn split<'a, T>(&self, ops: &'a [T]) -> (&'a [T], &'a [T], &'a [T], Option<&'a T>) {
        let (a, b, c) = (self.q.args.len(), self.k.args.len(), self.v.args.len());
        (&ops[..a], &ops[a..a + b], &ops[a + b..a + b + c], if self.decay { ops.get(a + b + c) } else { None })
    }

    pub fn infer(&self, ops: &[&TensorType]) -> Result<TensorType, String> {
        if ops.len() != self.operand_count() {
            return Err(format!("linear attention takes {} operands, got {}", self.operand_count(), ops.len()));
        }
        for (name, r) in [("q", &self.q), ("k", &self.k), ("v", &self.v)] {
            r.verify().map_err(|e| format!("the {name} region: {e}"))?;
        }
        let (qa, ka, va, lam) = self.split(ops);
        for (name, r, a) in [("q", &self.q, qa), ("k", &self.k, ka), ("v", &self.v, va)] {
            for (i, (want, got)) in r.args.iter().zip(a).enumerate() {
                if want != *got {
                    return Err(format!("the {name} region's argument {i} is {want} but the operand is {got}"));
                }
            }
        }
        let (q, k, v) = (self.q.result_type(), self.k.result_type(), self.v.result_type());
        let rank = q.rank();
        if rank < 2 || k.rank() != rank || v.rank() != rank {
            return Err(format!("linear attention needs q, k, v of one rank ≥ 2, got {q}, {k}, {v}"));
        }
        if [q, k, v].iter().any(|t| t.dtype != DType::F32) {
            return Err("linear attention needs f32 operands".into());
        }
        if q.shape != k.shape || q.shape[..rank - 1] != v.shape[..rank - 1] {
            return Err(format!(
                "linear attention needs q and k of one shape and v matching all but the last axis: {}, {}, {}",
                shape_to_string(&q.shape),
                shape_to_string(&k.shape),
                shape_to_string(&v.shape)
            ));
        }
        if let Some(l) = lam {
            let batch = &q.shape[..rank - 2];
            let ok = l.dtype == DType::F32
                && l.rank() == batch.len()
                && l.shape.iter().zip(batch).all(|(a, b)| a == b || a.as_const() == Some(1));
            if !ok {
                return Err(format!(
                    "the decay must have the batch shape {} (or size 1), got {l}",
                    shape_to_string(batch)
                ));
            }
        }
        Ok(v.clone())
    }
}
