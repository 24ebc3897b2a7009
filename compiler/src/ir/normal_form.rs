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

/// How much a key at position `m` counts for the output at position `n` in a
/// [`LinearAttention`], beyond the product of features: the weight `w(n, m)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Decay {
    /// `w = 1`.
    None,
    /// `w = λ^{|n−m|}`: one constant `λ` per batch index (the operand has the batch
    /// shape, size-1 axes broadcast), a constant or a buffer: never trained
    /// (TransNormerLLM, RetNet).
    PerHead,
    /// `w = exp(Σ_{j ∈ (min(n,m), max(n,m)]} a_j)`: a log-gate `a` per position (the
    /// operand has the shape `[batch…, N]`, size-1 batch axes broadcast), a value of the
    /// graph and trainable through it (Simple GLA, Mamba2/SSD, HGRN2-style scalar gates):
    /// the recurrence `S_n = exp(a_n) S_{n−1} + k_nᵀ v_n`. Every `a_j` is floored at
    /// [`LOG_GATE_FLOOR`] first, so a gate that underflows to 0 (`a = −∞`) cannot turn
    /// the chunked form's differences of cumulative log-gates into NaN.
    PerToken,
}

/// The least log-gate a [`Decay::PerToken`] attention uses: `e^{−60}` ≈ 1e−26 is 0 to
/// f32 next to any weight of order 1, and a chunk of 64 such gates still sums to a
/// cumulative log-gate (−3,840) whose differences f32 resolves to 2e−4.
pub const LOG_GATE_FLOOR: f64 = -60.0;

/// Linear attention:
///
/// `O[.., n, :] = Σ_{m ∈ dir(n)} w(n, m) ⟨q'[.., n, :], k'[.., m, :]⟩ v'[.., m, :]`
///
/// where `q' = q_region(q operands)`, likewise `k'` and `v'`, all of shape
/// `[batch…, N, d]` (`v'`: `[batch…, N, e]`), and the weight `w` is given by [`Decay`]
/// (1, a constant `λ^{|n−m|}`, or a per-position gate), whose operand comes last.
///
/// Operands, in order: the `q` region's arguments, the `k` region's, the `v` region's,
/// then the decay's (`λ` or the log-gates) unless it is [`Decay::None`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LinearAttention {
    pub direction: Direction,
    pub decay: Decay,
    pub q: Region,
    pub k: Region,
    pub v: Region,
}

impl LinearAttention {
    pub fn operand_count(&self) -> usize {
        self.q.args.len() + self.k.args.len() + self.v.args.len() + usize::from(self.decay != Decay::None)
    }

    /// Split operand types into the three regions' arguments and the decay's operand.
    pub fn split<'a, T>(&self, ops: &'a [T]) -> (&'a [T], &'a [T], &'a [T], Option<&'a T>) {
        let (a, b, c) = (self.q.args.len(), self.k.args.len(), self.v.args.len());
        let decay = if self.decay == Decay::None { None } else { ops.get(a + b + c) };
        (&ops[..a], &ops[a..a + b], &ops[a + b..a + b + c], decay)
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
            let broadcasts = |want: &[super::dim::Dim]| {
                l.dtype == DType::F32
                    && l.rank() == want.len()
                    && l.shape.iter().zip(want).all(|(a, b)| a == b || a.as_const() == Some(1))
            };
            match self.decay {
                Decay::None => {}
                Decay::PerHead if !broadcasts(batch) => {
                    return Err(format!(
                        "the decay must have the batch shape {} (or size 1), got {l}",
                        shape_to_string(batch)
                    ))
                }
                Decay::PerToken => {
                    let positions = &q.shape[..rank - 1];
                    if !broadcasts(positions) || l.shape[rank - 2] != q.shape[rank - 2] {
                        return Err(format!(
                            "the log-gates must have the shape {} (size-1 batch axes broadcast), got {l}",
                            shape_to_string(positions)
                        ));
                    }
                    if self.direction == Direction::Full {
                        return Err("a gated linear attention must be causal or anticausal".into());
                    }
                }
                Decay::PerHead => {}
            }
        }
        Ok(v.clone())
    }
}

/// Softmax or ReLU attention inside independent groups of positions — DiagAttention's
/// blocks, or the whole sequence as one group for vanilla attention:
///
/// `S = q'·k'ᵀ` (over features), `P = weights(S)`, `O = P · v'`
///
/// with `q'`, `k'`: `[batch…, w, d]`, `v'`: `[batch…, w, e]`, `S`, `P`: `[batch…, w, w]`
/// (query position, key position). `weights` is a region of one argument (the scores)
/// holding the scaling, the mask and the activation, so no kind of attention is special.
/// Operands: the `q`, `k`, `v` regions' arguments in order.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BlockAttention {
    pub q: Region,
    pub k: Region,
    pub v: Region,
    pub weights: Region,
}

/// The backward of [`BlockAttention`] as one op: given the same operands and `dO`
/// (last), it returns `[dq' | dk' | dv']` concatenated along the feature axis, computed
/// as `dV = Pᵀ dO`, `dP = dO v'ᵀ`, `dS = weights_vjp(S, dP)`, `dQ = dS k'`, `dK = dSᵀ q'`.
/// `weights_vjp` is the weights region differentiated with the primitive rules.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BlockAttentionGrad {
    pub forward: BlockAttention,
    pub weights_vjp: Region,
}

impl BlockAttention {
    /// Every size in its regions mapped by `f` (`Op::map_dims`).
    pub fn map_dims(&self, f: &dyn Fn(&super::dim::Dim) -> Option<super::dim::Dim>) -> Option<BlockAttention> {
        Some(BlockAttention {
            q: self.q.map_dims(f)?,
            k: self.k.map_dims(f)?,
            v: self.v.map_dims(f)?,
            weights: self.weights.map_dims(f)?,
        })
    }

    pub fn operand_count(&self) -> usize {
        self.q.args.len() + self.k.args.len() + self.v.args.len()
    }

    pub fn split<'a, T>(&self, ops: &'a [T]) -> (&'a [T], &'a [T], &'a [T]) {
        let (a, b) = (self.q.args.len(), self.k.args.len());
        (&ops[..a], &ops[a..a + b], &ops[a + b..self.operand_count()])
    }

    /// The types of q', k', v' and of the scores, checked against each other.
    fn check(&self, ops: &[&TensorType]) -> Result<(TensorType, TensorType, TensorType, TensorType), String> {
        if ops.len() < self.operand_count() {
            return Err(format!("block attention takes {} operands, got {}", self.operand_count(), ops.len()));
        }
        let (qa, ka, va) = self.split(ops);
        for (name, r, a) in [("q", &self.q, qa), ("k", &self.k, ka), ("v", &self.v, va)] {
            r.verify().map_err(|e| format!("the {name} region: {e}"))?;
            for (i, (want, got)) in r.args.iter().zip(a).enumerate() {
                if want != *got {
                    return Err(format!("the {name} region's argument {i} is {want} but the operand is {got}"));
                }
            }
        }
        self.weights.verify().map_err(|e| format!("the weights region: {e}"))?;
        let (q, k, v) = (self.q.result_type().clone(), self.k.result_type().clone(), self.v.result_type().clone());
        let r = q.rank();
        if r < 2 || k.rank() != r || v.rank() != r || q.shape != k.shape || q.shape[..r - 1] != v.shape[..r - 1] {
            return Err(format!(
                "block attention needs q, k of one shape and v matching all but its last axis: {q}, {k}, {v}"
            ));
        }
        let mut s = q.shape[..r - 1].to_vec();
        s.push(q.shape[r - 2].clone());
        let scores = TensorType::new(DType::F32, s);
        if self.weights.args != [scores.clone()] || *self.weights.result_type() != scores {
            return Err(format!("the weights region must map the scores {scores} to a tensor of the same type"));
        }
        Ok((q, k, v, scores))
    }

    pub fn infer(&self, ops: &[&TensorType]) -> Result<TensorType, String> {
        if ops.len() != self.operand_count() {
            return Err(format!("block attention takes {} operands, got {}", self.operand_count(), ops.len()));
        }
        Ok(self.check(ops)?.2)
    }
}

impl BlockAttentionGrad {
    pub fn infer(&self, ops: &[&TensorType]) -> Result<TensorType, String> {
        let f = &self.forward;
        if ops.len() != f.operand_count() + 1 {
            return Err(format!(
                "block attention's backward takes {} operands, got {}",
                f.operand_count() + 1,
                ops.len()
            ));
        }
        let (q, k, v, scores) = f.check(ops)?;
        if ops[f.operand_count()] != &v {
            return Err(format!("the output gradient must be {v}, got {}", ops[f.operand_count()]));
        }
        self.weights_vjp.verify().map_err(|e| format!("the weights VJP region: {e}"))?;
        if self.weights_vjp.args != [scores.clone(), scores.clone()] || *self.weights_vjp.result_type() != scores {
            return Err(format!("the weights VJP region must map (scores, dP) {scores} to dS"));
        }
        let r = q.rank();
        let width = q.shape[r - 1].checked_add(&k.shape[r - 1]).and_then(|x| x.checked_add(&v.shape[r - 1]));
        let mut shape = q.shape[..r - 1].to_vec();
        shape.push(width.ok_or("size overflow")?);
        Ok(TensorType::new(DType::F32, shape))
    }
}
