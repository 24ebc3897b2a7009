//! The fused cross-entropy on CPUs: the vocabulary in chunks of [`VOCAB_CHUNK`] words,
//! the logits of one chunk for all tokens computed by a library GEMM into a workspace
//! `Z [T…, w]`, then swept by small element kernels. Memory is `T·w`, linear in the
//! tokens, never `T·V`; the FLOPs (2·T·V·D per pass) go to the GEMM library instead of
//! generated dot products, which ran at ~2 GFLOP/s.
//!
//! Per chunk `c` of words `v₀ … v₀+w`:
//! - logsumexp (forward, once per (x, E, y)): `Z = X·E_cᵀ`, then per token the online
//!   update `m' = max(m, maxⱼ Z)`, `s' = s·e^{m−m'} + Σⱼ e^{Z−m'}`; the last chunk writes
//!   `lse = m' + log s'`;
//! - dX: `Z = X·E_cᵀ`, `P = g·(e^{Z−lse} − [y = v₀+j])` in place, `dX (+)= P·E_c` (the
//!   first chunk writes, the others accumulate). The one-hot term is inside P, so the sum
//!   is taken term by term, as the generic kernel does (no cancellation when p ≈ 1);
//! - dE: Z and P computed again (dX and dE are separate ops, in separate groups; sharing
//!   P would save a third of the backward's logits work), then `dE_c = Pᵀ·X` into the
//!   chunk's rows of dE;
//! - correct: `Z = X·E_cᵀ`, a running maximum per token, then `z_y ≥ max`; on kept
//!   logits (below) no product at all, whichever of loss and accuracy runs first.
//!
//! The loss itself (`lse − z_y`) needs no sweep and keeps its generic kernel.
//!
//! **Kept logits.** Where the program also differentiates the op and keeping the logits
//! of the whole vocabulary (`Z` and `P`, `2·T·V` floats) at most doubles the model's
//! activation memory ([`Shared::keeps`]), the vocabulary is one chunk: the forward's
//! `Z = X·Eᵀ` stays in a buffer of its own, the first gradient op sweeps it once into
//! `P`, and `dX = P·E` and `dE = Pᵀ·X` are one product each. That saves the backward's
//! recomputation of the logits (a third of its cross-entropy FLOPs, twice over: dX and
//! dE sat in separate groups) and its per-chunk launches; a training bundle's accuracy op
//! sweeps the same `Z` instead of a product of its own. A 268K-word vocabulary stays
//! chunked (2 MiB of logits per token).
//!
//! The sweeps' reductions over a row (the maximum, the compensated sum) are serial loops:
//! on CPUs `kernel::lanes` deals them to vector lanes, on GPUs `kernel::blocks` to a
//! block's threads.

use super::cross_entropy::{target, which};
use super::element::{elem_of, Lowering, Source};
use super::emit::{add, bin, mul, sub};
use super::gemm::{layout, library, Layout, Operand};
use super::Sink;
use crate::ir::{CeOp, DType, Dim, Graph, NodeId, TensorType};
use crate::kernel::{Access, Binary, Elem, Expr, Kernel, LoopKind, Scalar, Stmt, Unary};
use std::collections::HashMap;

/// Words per chunk: the logits workspace is `T × VOCAB_CHUNK` floats (8 MiB for 2,048
/// tokens), small enough to stay in a large L2/L3 while each chunk is swept.
pub const VOCAB_CHUNK: i64 = 1024;

/// Letters of the library products: token axes `a, b, …`, the hidden width, a chunk's words.
const WIDTH: u8 = b'y';
const WORD: u8 = b'z';

/// The launch argument holding a chunk's first word: one kernel serves every chunk of a
/// width, the GEMMs too (their views' offsets are polynomials in it). A constant would
/// make 262 kernels of a 268K vocabulary (and, tiled on GPUs, 15 s of LLVM).
const WORD0: &str = "word0";

/// One cross-entropy op's operands, ready for library products.
struct Chunks {
    kind: CeOp,
    tokens: Vec<Dim>,
    /// `X [T…, D]`, contiguous.
    x: Operand,
    /// The table `E [V, D]` (or `[D, V]` when transposed) as laid out in memory.
    table: Layout,
    transposed: bool,
    vocab: i64,
    extent: HashMap<u8, Dim>,
    /// X's and E's element type (f32, or bf16/f16 under `--precision`): the products'
    /// operands, and so `P`'s.
    dtype: DType,
}

impl Chunks {
    fn token_letters(&self) -> Vec<u8> {
        (0..self.tokens.len() as u8).map(|i| b'a' + i).collect()
    }

    /// The chunk's words of the table (from the launch argument [`WORD0`]), as an operand
    /// with letters (word, width).
    fn table_chunk(&self) -> Result<Operand, String> {
        word_chunk(&self.table, self.transposed)
    }

    /// The logits workspace seen as `[T…, w]`.
    fn logits(&self, z: usize, w: i64) -> Result<Operand, String> {
        let mut shape = self.tokens.clone();
        shape.push(Dim::constant(w));
        let mut letters = self.token_letters();
        letters.push(WORD);
        Ok(Operand { layout: Layout::contiguous(z, &shape)?, letters })
    }

    fn extent(&self, w: i64) -> HashMap<u8, Dim> {
        let mut e = self.extent.clone();
        e.insert(WORD, Dim::constant(w));
        e
    }

    /// `(v0, w)` of every chunk.
    fn chunks(&self) -> Vec<(i64, i64)> {
        (0..self.vocab).step_by(VOCAB_CHUNK as usize).map(|v0| (v0, VOCAB_CHUNK.min(self.vocab - v0))).collect()
    }
}

/// Words `v0 ..` of a table-shaped value laid out as `table` (`[V, D]`, or `[D, V]` when
/// transposed), as an operand with letters (word, width).
fn word_chunk(table: &Layout, transposed: bool) -> Result<Operand, String> {
    let (word_axis, letters) = if transposed { (1, vec![WIDTH, WORD]) } else { (0, vec![WORD, WIDTH]) };
    let step = Dim::sym(WORD0).checked_mul(&table.strides[word_axis]).ok_or("size overflow")?;
    let offset = table.offset.checked_add(&step).ok_or("size overflow")?;
    Ok(Operand { layout: Layout { offset, ..table.clone() }, letters })
}

/// Whether `n` is a cross-entropy op these kernels can run: a constant vocabulary and
/// f32 operands.
pub fn applies(g: &Graph, n: NodeId) -> bool {
    vocab_of(g, n).is_some_and(|v| v > 0)
}

/// The vocabulary size of cross-entropy op `n`, if it is a constant.
fn vocab_of(g: &Graph, n: NodeId) -> Option<i64> {
    let (_, transposed) = which(&g.node(n).op)?;
    let table = &g.ty(g.operands(n)[1]).shape;
    (if transposed { &table[1] } else { &table[0] }).as_const()
}

fn prepare(sink: &mut Sink, reads: &HashMap<NodeId, usize>, n: NodeId, name: &str) -> Result<Chunks, String> {
    let g = sink.g;
    let (kind, transposed) = which(&g.node(n).op).ok_or("not a cross-entropy op")?;
    let ops = g.operands(n);
    let x_ty = g.ty(ops[0]).clone();
    let tokens = x_ty.shape[..x_ty.rank() - 1].to_vec();
    let width = x_ty.shape[x_ty.rank() - 1].clone();
    // Operands the library reads in place: X contiguous (the weight-gradient product sums
    // over its tokens), the table as any view; anything else is copied first.
    let mut in_memory = |x: NodeId, contiguous: bool, i: usize| -> Result<Layout, String> {
        let ty = g.ty(x).clone();
        match layout(g, reads, x).filter(|l| !contiguous || l.is_contiguous(&ty.shape)) {
            Some(l) => Ok(l),
            None => {
                let buffer = sink.workspace(&ty)?;
                sink.kernel(|lw| {
                    super::special::materialize(lw, Source::Node(x), &ty, buffer, format!("{name}_in{i}"))
                })?;
                Layout::contiguous(buffer, &ty.shape)
            }
        }
    };
    let x = in_memory(ops[0], true, 0)?;
    let table = in_memory(ops[1], false, 1)?;
    let vocab = vocab_of(g, n).ok_or("the vocabulary size is not a constant")?;
    let mut letters: Vec<u8> = (0..tokens.len() as u8).map(|i| b'a' + i).collect();
    let mut extent: HashMap<u8, Dim> = letters.iter().copied().zip(tokens.iter().cloned()).collect();
    extent.insert(WIDTH, width);
    letters.push(WIDTH);
    let dtype = x_ty.dtype;
    if g.ty(ops[1]).dtype != dtype {
        return Err(format!(
            "the cross-entropy's hidden states are {} and its table {}",
            dtype.name(),
            g.ty(ops[1]).dtype.name()
        ));
    }
    Ok(Chunks { kind, tokens, x: Operand { layout: x, letters }, table, transposed, vocab, extent, dtype })
}

/// What the cross-entropy ops of one program share across their groups.
pub struct Shared {
    /// Activation bytes per token of the memory plan (the budget of [`Shared::keeps`]).
    activation_bytes_per_token: i64,
    /// Kept logits `Z [T…, V]` of each (x, E), and whether a kernel has filled them.
    logits: HashMap<Vec<NodeId>, (usize, bool)>,
    /// `P = g·(softmax − onehot) [T…, V]` of each (x, E, y, g), from the first gradient op.
    probs: HashMap<Vec<NodeId>, usize>,
}

/// Tokens at which per-token memory is compared: large enough that the terms linear in
/// the tokens dominate the memory plan's polynomials.
const PER_TOKEN_AT: i64 = 1 << 16;

impl Shared {
    pub fn new(mem: &crate::memory::MemoryPlan) -> Shared {
        let activations = mem.report().activations;
        let at = |sym: &str| Some(if sym == "B" { 1 } else { PER_TOKEN_AT });
        let activation_bytes_per_token = activations.eval(&at).map_or(0, |b| b / PER_TOKEN_AT);
        Shared { activation_bytes_per_token, logits: HashMap::new(), probs: HashMap::new() }
    }

    /// Whether op `n` keeps the logits of the whole vocabulary: the program also takes a
    /// gradient through the same (x, E), and `Z` and `P` (4 bytes per logit each) at most
    /// double the activation memory per token.
    fn keeps(&self, g: &Graph, n: NodeId, vocab: i64) -> bool {
        let xe = &g.operands(n)[..2];
        let differentiated = g.dag.node_indices().any(|m| {
            matches!(which(&g.node(m).op), Some((CeOp::GradX | CeOp::GradTable, _))) && &g.operands(m)[..2] == xe
        });
        differentiated && vocab.saturating_mul(8) <= self.activation_bytes_per_token
    }
}

/// The kernels of cross-entropy op `n` (not the loss, whose generic kernel reads `lse`),
/// writing its value into global buffer `out`; `lse` is the logsumexp workspace, filled
/// here first when `fill_lse`.
pub fn kernels(
    sink: &mut Sink,
    reads: &HashMap<NodeId, usize>,
    n: NodeId,
    lse: Option<(usize, bool)>,
    shared: &mut Shared,
    out: usize,
    name: &str,
) -> Result<(), String> {
    let fill_lse = matches!(lse, Some((_, true)));
    if let (Some((CeOp::Loss, _)), Some((lse, false))) = (which(&sink.g.node(n).op), lse) {
        // The logsumexp was swept by another op: the loss's generic kernel.
        return sink.kernel(|lw| super::cross_entropy::op_kernel(lw, n, lse, name.to_string()));
    }
    // The accuracy on logits the loss has kept: no product, no copy of the hidden states.
    let kept = shared.logits.get(&sink.g.operands(n)[..2]);
    if let (Some((CeOp::Correct, _)), Some(&(z, true))) = (which(&sink.g.node(n).op), kept) {
        return correct_from_kept_logits(sink, n, z, out, name);
    }
    let ce = prepare(sink, reads, n, name)?;
    let token_count = crate::ir::dim::numel(&ce.tokens).ok_or("size overflow")?;
    let keep = shared.keeps(sink.g, n, ce.vocab);
    let xe = sink.g.operands(n)[..2].to_vec();
    let chunks = if keep { vec![(0, ce.vocab)] } else { ce.chunks() };
    let chunk_width = chunks[0].1;
    let mut z_shape = ce.tokens.clone();
    z_shape.push(Dim::constant(chunk_width));
    let z_ty = TensorType::new(DType::F32, z_shape);
    // Z: the kept logits of (x, E), or a workspace for one chunk.
    let z = match shared.logits.get(&xe) {
        Some(&(z, _)) if keep => z,
        _ => {
            let z = sink.workspace(&z_ty)?;
            if keep {
                shared.logits.insert(xe.clone(), (z, false));
            }
            z
        }
    };
    let token_values = TensorType::new(DType::F32, ce.tokens.clone());
    // Running maximum, sum and its compensation per token between chunks, and the
    // target's logit.
    let mut per_token_workspace = || sink.workspace(&token_values);
    let (m, s, comp, zy) =
        (per_token_workspace()?, per_token_workspace()?, per_token_workspace()?, per_token_workspace()?);
    let elem = elem_of(ce.dtype);
    let logits = |sink: &mut Sink, v0: i64, w: i64, tag: &str| -> Result<(), String> {
        let product = format!("{name}_{tag}_z{v0}");
        let chunk = [(WORD0, v0)];
        let (x, table) = (&ce.x, &ce.table_chunk()?);
        library(sink, &chunk, (x, table, elem), &ce.logits(z, w)?, &ce.extent(w), false, &product)
    };
    // P in the products' element type: in place in Z when that is f32.
    let p_ty = z_ty.with_dtype(ce.dtype);
    // Kept logits that another op of the program (the accuracy) has already computed.
    let filled = keep && shared.logits.get(&xe) == Some(&(z, true));
    if let (Some((lse, _)), true) = (lse, fill_lse) {
        for (c, &(v0, w)) in chunks.iter().enumerate() {
            if !filled {
                logits(sink, v0, w, "lse")?;
            }
            let part = Part { first: c == 0, last: c + 1 == chunks.len() };
            let bufs = [m, s, comp, lse, zy];
            sink.kernel_with_args(&[(WORD0, v0)], |lw| {
                lse_update(lw, n, &ce.tokens, z, w, part, bufs, format!("{name}_lse{c}"))
            })?;
        }
        if keep {
            shared.logits.insert(xe.clone(), (z, true));
        }
    }
    match ce.kind {
        CeOp::GradX | CeOp::GradTable if keep => {
            let lse = lse.ok_or("the gradient needs the logsumexp")?.0;
            let w = ce.vocab;
            let key = sink.g.operands(n)[..4].to_vec();
            let p = match shared.probs.get(&key) {
                Some(&p) => p,
                None => {
                    if shared.logits.get(&xe) != Some(&(z, true)) {
                        logits(sink, 0, w, "grad")?;
                        shared.logits.insert(xe.clone(), (z, true));
                    }
                    let p = sink.workspace(&p_ty)?;
                    sink.kernel_with_args(&[(WORD0, 0)], |lw| {
                        probabilities(lw, n, &ce.tokens, [z, p], (w, elem), lse, format!("{name}_p"))
                    })?;
                    shared.probs.insert(key, p);
                    p
                }
            };
            gradient_product(sink, &ce, n, ce.logits(p, w)?, (0, w), out, false, &format!("{name}_product"))
        }
        CeOp::GradX | CeOp::GradTable => {
            let lse = lse.ok_or("the gradient needs the logsumexp")?.0;
            let p = if ce.dtype == DType::F32 { z } else { sink.workspace(&p_ty)? };
            for (c, &(v0, w)) in chunks.iter().enumerate() {
                logits(sink, v0, w, "grad")?;
                sink.kernel_with_args(&[(WORD0, v0)], |lw| {
                    probabilities(lw, n, &ce.tokens, [z, p], (w, elem), lse, format!("{name}_p{c}"))
                })?;
                let tag = if ce.kind == CeOp::GradX { "dx" } else { "de" };
                gradient_product(sink, &ce, n, ce.logits(p, w)?, (v0, w), out, c > 0, &format!("{name}_{tag}{c}"))?;
            }
            Ok(())
        }
        CeOp::Correct => {
            for (c, &(v0, w)) in chunks.iter().enumerate() {
                logits(sink, v0, w, "max")?;
                let first = c == 0;
                sink.kernel_with_args(&[(WORD0, v0)], |lw| {
                    running_max(lw, n, &ce.tokens, z, w, first, [m, zy], format!("{name}_max{c}"))
                })?;
            }
            if keep {
                shared.logits.insert(xe.clone(), (z, true));
            }
            sink.kernel(|lw| per_token(lw, &token_count, [zy, m], out, hit, format!("{name}_correct")))
        }
        // ℓ = lse − z_y, both from the same logits: exact cancellation when the target
        // dominates (a loss near zero keeps its relative precision).
        CeOp::Loss => {
            let lse = lse.ok_or("the loss needs the logsumexp")?.0;
            sink.kernel(|lw| per_token(lw, &token_count, [lse, zy], out, sub, name.to_string()))
        }
    }
}

/// The accuracy op on the kept logits `Z [T…, V]` of its (x, E), filled by the loss's
/// logsumexp (a training bundle's forward sweeps the loss first, then the accuracy): one
/// sweep for the maximum and the target's logit, then `z_y ≥ max`.
fn correct_from_kept_logits(sink: &mut Sink, n: NodeId, z: usize, out: usize, name: &str) -> Result<(), String> {
    let g = sink.g;
    let x_ty = g.ty(g.operands(n)[0]);
    let tokens = x_ty.shape[..x_ty.rank() - 1].to_vec();
    let vocab = vocab_of(g, n).ok_or("the vocabulary size is not a constant")?;
    let token_count = crate::ir::dim::numel(&tokens).ok_or("size overflow")?;
    let token_values = TensorType::new(DType::F32, tokens.clone());
    let (m, zy) = (sink.workspace(&token_values)?, sink.workspace(&token_values)?);
    sink.kernel_with_args(&[(WORD0, 0)], |lw| {
        running_max(lw, n, &tokens, z, vocab, true, [m, zy], format!("{name}_max"))
    })?;
    sink.kernel(|lw| per_token(lw, &token_count, [zy, m], out, hit, format!("{name}_correct")))
}

/// 1 where the target's logit `zy` reaches the maximum `best`, else 0.
fn hit(zy: Expr, best: Expr) -> Expr {
    Expr::Select(Box::new(bin(Binary::Ge, zy, best)), Box::new(Expr::F32(1.0)), Box::new(Expr::F32(0.0)))
}

/// The gradient op's product for the chunk `(v0, w)` of `P`: `dX (+)= P·E_c` (accumulating
/// after the first chunk), or `dE_c = Pᵀ·X` into the chunk's rows of dE.
#[allow(clippy::too_many_arguments)]
fn gradient_product(
    sink: &mut Sink,
    ce: &Chunks,
    n: NodeId,
    p: Operand,
    (v0, w): (i64, i64),
    out: usize,
    accumulate: bool,
    name: &str,
) -> Result<(), String> {
    let extent = ce.extent(w);
    let chunk = [(WORD0, v0)];
    let out_layout = Layout::contiguous(out, &sink.g.ty(n).shape)?;
    let elem = elem_of(ce.dtype);
    if ce.kind == CeOp::GradX {
        let mut letters = ce.token_letters();
        letters.push(WIDTH);
        let dx = Operand { layout: out_layout, letters };
        library(sink, &chunk, (&p, &ce.table_chunk()?, elem), &dx, &extent, accumulate, name)
    } else {
        let de = word_chunk(&out_layout, ce.transposed)?;
        library(sink, &chunk, (&p, &ce.x, elem), &de, &extent, false, name)
    }
}

#[derive(Clone, Copy)]
struct Part {
    first: bool,
    last: bool,
}

/// One step of a Kahan sum: `sum += term`, `lost` the compensation (negated low part);
/// returns the new (sum, lost).
fn kahan(lw: &mut Lowering, sum: Expr, lost: Expr, term: Expr) -> (Expr, Expr) {
    let term = lw.e.bind(sub(term, lost));
    let next = lw.e.bind(bin(Binary::Add, sum.clone(), term.clone()));
    (next.clone(), sub(sub(next, sum), term))
}

/// `Z[t, j]` of a chunk of width `w` (t the kernel's flat token index).
fn logit_at(lw: &mut Lowering, z: usize, w: i64, j: Expr) -> Expr {
    let zb = lw.e.buffer(z, &format!("b{z}"), Elem::F32, Access::Read);
    let row = lw.e.bind(mul(Expr::Var(lw.e.index), Expr::I64(w)));
    Expr::Load { buffer: zb, index: Box::new(add(row, j)) }
}

fn exp(x: Expr) -> Expr {
    Expr::Unary(Unary::Exp, Box::new(x))
}

/// The online logsumexp update for one chunk: buffers `[m, s, lse, zy]` (the target's
/// logit is kept when it falls in this chunk).
#[allow(clippy::too_many_arguments)]
fn lse_update(
    lw: &mut Lowering,
    n: NodeId,
    tokens: &[Dim],
    z: usize,
    w: i64,
    part: Part,
    [m, s, c, lse, zy]: [usize; 5],
    name: String,
) -> Result<(Kernel, Vec<usize>), String> {
    target_logit(lw, n, tokens, z, w, zy)?;
    let t = Expr::Var(lw.e.index);
    let chunk_max = lw.e.accumulator(0, Scalar::F32, Expr::F32(f32::NEG_INFINITY));
    let j = lw.e.open();
    let zj = logit_at(lw, z, w, Expr::Var(j));
    lw.e.push(Stmt::Assign { var: chunk_max, value: bin(Binary::Max, Expr::Var(chunk_max), zj) });
    lw.e.close(j, Expr::I64(w), LoopKind::Serial);
    let load = |lw: &mut Lowering, b: usize| {
        let buffer = lw.e.buffer(b, &format!("b{b}"), Elem::F32, Access::Read);
        lw.e.bind(Expr::Load { buffer, index: Box::new(t.clone()) })
    };
    // The running maximum, sum and the sum's Kahan compensation from earlier chunks.
    let carried = (!part.first).then(|| (load(lw, m), load(lw, s), load(lw, c)));
    let m_new = match &carried {
        Some((m_old, _, _)) => lw.e.bind(bin(Binary::Max, m_old.clone(), Expr::Var(chunk_max))),
        None => Expr::Var(chunk_max),
    };
    // Kahan-compensated across the whole vocabulary: near convergence one term is ≈ 1
    // and the others tiny, and the loss is the logarithm of their sum ≈ the tiny part,
    // which a plain f32 sum loses. The sum and its compensation carry over from chunk to
    // chunk, both rescaled to the new maximum.
    let sum = lw.e.accumulator(0, Scalar::F32, Expr::F32(0.0));
    let lost = lw.e.accumulator(0, Scalar::F32, Expr::F32(0.0));
    if let Some((m_old, s_old, c_old)) = carried {
        let r = lw.e.bind(exp(sub(m_old, m_new.clone())));
        lw.e.push(Stmt::Assign { var: sum, value: bin(Binary::Mul, s_old, r.clone()) });
        lw.e.push(Stmt::Assign { var: lost, value: bin(Binary::Mul, c_old, r) });
    }
    let j = lw.e.open();
    let zj = logit_at(lw, z, w, Expr::Var(j));
    let (next, lost_next) = kahan(lw, Expr::Var(sum), Expr::Var(lost), exp(sub(zj, m_new.clone())));
    lw.e.push(Stmt::Assign { var: lost, value: lost_next });
    lw.e.push(Stmt::Assign { var: sum, value: next });
    lw.e.close(j, Expr::I64(w), LoopKind::Serial);
    if part.last {
        let b = lw.e.buffer(lse, &format!("b{lse}"), Elem::F32, Access::Write);
        let value = bin(Binary::Add, m_new, Expr::Unary(Unary::Log, Box::new(Expr::Var(sum))));
        lw.e.push(Stmt::Store { buffer: b, index: t, value });
    } else {
        for (b, value) in [(m, m_new), (s, Expr::Var(sum)), (c, Expr::Var(lost))] {
            let buffer = lw.e.buffer(b, &format!("b{b}"), Elem::F32, Access::Write);
            lw.e.push(Stmt::Store { buffer, index: t.clone(), value });
        }
    }
    let extent = lw.e.dim(&crate::ir::dim::numel(tokens).ok_or("size overflow")?)?;
    super::finish(lw, name, extent)
}

/// `zy[t] = Z[t, y_t − v0]` for the tokens whose target is in the chunk `v0 .. v0 + w`
/// (`v0` is the launch argument [`WORD0`]).
fn target_logit(lw: &mut Lowering, n: NodeId, tokens: &[Dim], z: usize, w: i64, zy: usize) -> Result<(), String> {
    let (_, transposed) = which(&lw.g.node(n).op).ok_or("not a cross-entropy op")?;
    let ops = lw.g.operands(n);
    let t_idx = lw.unravel(Expr::Var(lw.e.index), tokens)?;
    let y = target(lw, &ops, transposed, &t_idx)?;
    let v0 = lw.e.size(WORD0)?;
    let j = lw.e.bind(sub(y, v0));
    let inside = bin(Binary::And, bin(Binary::Ge, j.clone(), Expr::I64(0)), bin(Binary::Lt, j.clone(), Expr::I64(w)));
    let value = logit_at(lw, z, w, j);
    let zb = lw.e.buffer(zy, &format!("b{zy}"), Elem::F32, Access::Write);
    let t = Expr::Var(lw.e.index);
    lw.e.push(Stmt::If {
        cond: inside,
        then: vec![Stmt::Store { buffer: zb, index: t, value }],
        otherwise: Vec::new(),
    });
    Ok(())
}

/// `P[t, j] = g_t·(e^{Z[t, j] − lse_t} − [y_t = v0 + j])` (`v0`: [`WORD0`]) for the
/// buffers `[Z, P]`, which may be the same (in place, an f32 `P`), over chunks of `w`
/// words, `P` of element type `p_elem`.
#[allow(clippy::too_many_arguments)]
fn probabilities(
    lw: &mut Lowering,
    n: NodeId,
    tokens: &[Dim],
    [z, p]: [usize; 2],
    (w, p_elem): (i64, Elem),
    lse: usize,
    name: String,
) -> Result<(Kernel, Vec<usize>), String> {
    let (_, transposed) = which(&lw.g.node(n).op).ok_or("not a cross-entropy op")?;
    let ops = lw.g.operands(n);
    let t = lw.unravel(Expr::Var(lw.e.index), tokens)?;
    let g = lw.value(Source::Node(ops[3]), &t)?;
    let g = lw.e.bind(g);
    let y = target(lw, &ops, transposed, &t)?;
    let v0 = lw.e.size(WORD0)?;
    let lse_b = lw.e.buffer(lse, &format!("b{lse}"), Elem::F32, Access::Read);
    let lse_t = lw.e.bind(Expr::Load { buffer: lse_b, index: Box::new(Expr::Var(lw.e.index)) });
    let (zb, pb) = if z == p {
        let b = lw.e.buffer(z, &format!("b{z}"), Elem::F32, Access::ReadWrite);
        (b, b)
    } else {
        let zb = lw.e.buffer(z, &format!("b{z}"), Elem::F32, Access::Read);
        (zb, lw.e.buffer(p, &format!("b{p}"), p_elem, Access::Write))
    };
    let row = lw.e.bind(mul(Expr::Var(lw.e.index), Expr::I64(w)));
    let j = lw.e.open();
    let at = add(row, Expr::Var(j));
    let zj = Expr::Load { buffer: zb, index: Box::new(at.clone()) };
    let hit = Expr::Select(
        Box::new(bin(Binary::Eq, y, add(v0, Expr::Var(j)))),
        Box::new(Expr::F32(1.0)),
        Box::new(Expr::F32(0.0)),
    );
    let value = bin(Binary::Mul, g, bin(Binary::Sub, exp(sub(zj, lse_t)), hit));
    lw.e.push(Stmt::Store { buffer: pb, index: at, value });
    lw.e.close(j, Expr::I64(w), LoopKind::Vector);
    let mut extent = Expr::I64(1);
    for d in tokens {
        extent = mul(extent, lw.e.dim(d)?);
    }
    super::finish(lw, name, extent)
}

/// The running maximum of the logits per token into `m`, and the target's logit into
/// `zy` when the target is in this chunk. Both come from the same `Z`, so a target that
/// is a largest logit compares equal to the maximum (a logit recomputed with another
/// summation order could fall just below it).
#[allow(clippy::too_many_arguments)]
fn running_max(
    lw: &mut Lowering,
    n: NodeId,
    tokens: &[Dim],
    z: usize,
    w: i64,
    first: bool,
    [m, zy]: [usize; 2],
    name: String,
) -> Result<(Kernel, Vec<usize>), String> {
    target_logit(lw, n, tokens, z, w, zy)?;
    let t = Expr::Var(lw.e.index);
    let init = if first {
        Expr::F32(f32::NEG_INFINITY)
    } else {
        let mb = lw.e.buffer(m, &format!("b{m}"), Elem::F32, Access::Read);
        Expr::Load { buffer: mb, index: Box::new(t.clone()) }
    };
    let best = lw.e.accumulator(0, Scalar::F32, init);
    let j = lw.e.open();
    let zj = logit_at(lw, z, w, Expr::Var(j));
    lw.e.push(Stmt::Assign { var: best, value: bin(Binary::Max, Expr::Var(best), zj) });
    lw.e.close(j, Expr::I64(w), LoopKind::Serial);
    let mb = lw.e.buffer(m, &format!("b{m}"), Elem::F32, Access::Write);
    lw.e.push(Stmt::Store { buffer: mb, index: t, value: Expr::Var(best) });
    let extent = lw.e.dim(&crate::ir::dim::numel(tokens).ok_or("size overflow")?)?;
    super::finish(lw, name, extent)
}

/// `out[t] = f(a[t], b[t])` over the tokens.
fn per_token(
    lw: &mut Lowering,
    tokens: &Dim,
    [a, b]: [usize; 2],
    out: usize,
    f: impl Fn(Expr, Expr) -> Expr,
    name: String,
) -> Result<(Kernel, Vec<usize>), String> {
    let t = Expr::Var(lw.e.index);
    let ab = lw.e.buffer(a, &format!("b{a}"), Elem::F32, Access::Read);
    let bb = lw.e.buffer(b, &format!("b{b}"), Elem::F32, Access::Read);
    let load = |buffer| Expr::Load { buffer, index: Box::new(t.clone()) };
    let value = f(load(ab), load(bb));
    let ob = lw.e.buffer(out, &format!("b{out}"), Elem::F32, Access::Write);
    lw.e.push(Stmt::Store { buffer: ob, index: t, value });
    let extent = lw.e.dim(tokens)?;
    super::finish(lw, name, extent)
}
