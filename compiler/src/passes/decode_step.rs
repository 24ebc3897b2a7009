//! `decode_step`: the recurrent form of a generation program (`next_token`'s), derived
//! from it: one token per sequence in, its next-token logits and every layer's new state
//! out, so a generated token costs the same at position 100 as at position 100,000.
//!
//! The step program reads `tokens [B, 1]` (the token at position `p`), `position i32[1]`
//! (`p`) and the states `state.0 …` (`kv_cache.i` for a KV cache), and returns
//! `logits [B, 1, V]` and `next_state.0 …` (the same shapes; the caller feeds them back,
//! zeros before the first token). Every
//! value is the forward's at one position, evaluated as a one-token sequence (`N := 1`)
//! whose positions are offset by `p` (`iota(N)` is `[p]`, `size(N)` is `p + 1`). Ops that
//! mix positions carry what the earlier positions left:
//!
//! - causal linear attention: its `d×e` state per head, `S ← λS + k'ᵀv'`, `o = q'S`;
//! - block attention (DiagAttention's blocks of `w`, or vanilla attention as one block of
//!   the whole context): the token-dependent operands of the current window (`w` rows,
//!   or `context` rows: the KV cache), the new row written at slot `p mod w`; the op runs
//!   on that window (`N := w`, positions counted from the window's start, as the chunked
//!   form counts them inside a block) and the row at the slot is the output. Rows after
//!   the slot hold an older block's values, which the causal weights give weight 0. Over
//!   a KV cache only the step's query row is scored (`query_row.rs`) where the weights
//!   region allows;
//! - a scan along the sequence (`cumsum`): its running sum.
//!
//! Any other op that reads several positions (a reduction or contraction over the
//! sequence, a shift, a concatenation along it) is refused, naming the op.
//!
//! Not part of the default pipeline: `Pipeline::program(Program::DecodeStep {..})` runs it
//! after `next_token`. `prefill.rs` computes the same states after a whole prompt.

use super::{graph_build, Pass};
use crate::ir::normal_form::{Decay, Direction, LOG_GATE_FLOOR};
use crate::ir::{BinaryOp, DType, Dim, Graph, NodeId, Op, ReduceOp, TensorType, UnaryOp};
use std::collections::{HashMap, HashSet};
use tnc_grammar::{Diagnostic, Span};

/// The input holding the position `p` of the step's token.
pub const POSITION: &str = "position";
/// The prefix of a state input's name (`state.0`); a KV cache (an attention over the
/// whole sequence, `context` rows) is named `kv_cache.3`, and the step can only run at
/// positions below `context` then. The new state is the output `next_` + its name.
pub const STATE: &str = "state.";
pub const KV_CACHE: &str = "kv_cache.";
pub const NEXT: &str = "next_";

/// `context`: the rows of an attention over the whole sequence (its KV cache), the
/// longest context a generation can reach.
pub struct DecodeStep {
    pub context: i64,
}

impl Pass for DecodeStep {
    fn name(&self) -> &'static str {
        "decode_step"
    }

    fn run(&self, g: Graph) -> Result<Graph, Diagnostic> {
        Ok(derive(&g, self.context)?.0)
    }
}

/// The symbol of the sequence length: the last axis of the input `tokens`.
pub(super) fn sequence_symbol(g: &Graph) -> Result<String, Diagnostic> {
    match g.inputs.iter().find(|i| i.name == "tokens").map(|i| i.ty.shape.last().cloned()) {
        Some(Some(n)) if n.symbols().len() == 1 && n.degree_in(&n.symbols()[0]) == 1 => Ok(n.symbols()[0].clone()),
        _ => Err(Diagnostic::error(format!(
            "model `{}` has no decode step: it needs an input `tokens` whose last axis is the sequence",
            g.name
        ))),
    }
}

/// The step program of `g` (a `next_token` program), and each state's name (its input;
/// the output is `next_` + it) with where it comes from in `g`.
pub(super) fn derive(g: &Graph, context: i64) -> Result<(Graph, Vec<(String, Origin)>), Diagnostic> {
    Deriver::new(g, sequence_symbol(g)?, context)?.run()
}

/// What a state of the step holds, in terms of the forward it is derived from: what
/// `prefill` (`passes/prefill.rs`) computes the state after a whole prompt from.
#[derive(Clone, Debug)]
pub(super) enum Origin {
    /// The `d×e` state per head of this causal linear attention.
    LinearAttention(NodeId),
    /// The rows of `operand` (of a block attention) along `axis`, in the last window of
    /// `rows` positions: a block (`kv_cache: false`), or the KV cache of the whole context.
    Window { operand: NodeId, axis: usize, rows: i64, kv_cache: bool },
    /// The running sum of this scan along `axis`.
    Scan { node: NodeId, axis: usize },
    /// A scan inside an attention's region: not a node of the forward.
    ScanInRegion(Option<Span>),
}

struct State {
    /// The input's name (`state.0`).
    name: String,
    /// Its new value in the step.
    value: NodeId,
    origin: Origin,
}

struct Deriver<'a> {
    old: &'a Graph,
    new: Graph,
    seq: String,
    /// The sequence length `N` as a size.
    seq_dim: Dim,
    context: i64,
    token_dependent: HashSet<NodeId>,
    /// Old node → its value at the step's position.
    local: HashMap<NodeId, NodeId>,
    /// (old token-independent node, window length) → its value over that window.
    window: HashMap<(NodeId, i64), NodeId>,
    /// `p`, an i32 scalar.
    position: NodeId,
    states: Vec<State>,
    /// The forward's node being derived, outside attention regions.
    current: Option<NodeId>,
}

fn fail(op: &Op, span: Option<Span>, why: &str) -> Diagnostic {
    let d = Diagnostic::error(format!("no decode step: `{}` {why}", op.kind())).with_hint(
        "a decode step exists for position-wise ops, causal linear attention, block attention (DiagAttention, \
         vanilla attention) and scans along the sequence",
    );
    match span {
        Some(s) => d.or_at(s),
        None => d,
    }
}

const ABSOLUTE_POSITIONS: &str = "reads positions counted from the start of the sequence (or its length) inside \
     blocks of attention; the decode step counts a block's positions from the block's start (as diag_attention's \
     LRPE does)";

fn internal(e: String) -> Diagnostic {
    Diagnostic::error(format!("internal error: deriving the decode step: {e}"))
}

impl<'a> Deriver<'a> {
    fn new(old: &'a Graph, seq: String, context: i64) -> Result<Deriver<'a>, Diagnostic> {
        let mut new = Graph::new(old.name.clone());
        let mut local = HashMap::new();
        for p in &old.params {
            let id = new.add_param(p.clone());
            local.insert(p.node, id);
        }
        for i in &old.inputs {
            let one = Dim::constant(1);
            let shape = i.ty.shape.iter().map(|d| d.substitute(&seq, &one)).collect::<Option<_>>();
            let ty = TensorType::new(i.ty.dtype, shape.ok_or_else(|| internal("size overflow".into()))?);
            local.insert(i.node, new.add_input(i.name.clone(), ty, i.span));
        }
        let p = new.add_input(POSITION, TensorType::new(DType::I32, vec![Dim::constant(1)]), None);
        let position = new.add(Op::Reshape { shape: vec![] }, &[p], None).map_err(internal)?;
        let mut token_dependent = HashSet::new();
        for n in old.topo_order() {
            if matches!(old.node(n).op, Op::Input { .. }) || old.operands(n).iter().any(|o| token_dependent.contains(o))
            {
                token_dependent.insert(n);
            }
        }
        Ok(Deriver {
            old,
            new,
            seq_dim: Dim::sym(seq.clone()),
            seq,
            context,
            token_dependent,
            local,
            window: HashMap::new(),
            position,
            states: Vec::new(),
            current: None,
        })
    }

    fn depends(&self, d: &Dim) -> bool {
        d.degree_in(&self.seq) > 0
    }

    fn at(&self, d: &Dim, n: i64) -> Result<Dim, Diagnostic> {
        d.substitute(&self.seq, &Dim::constant(n)).ok_or_else(|| internal("size overflow".into()))
    }

    /// `op` with its sizes at `N := n`.
    fn sized(&self, op: &Op, n: i64) -> Result<Op, Diagnostic> {
        let n = Dim::constant(n);
        op.map_dims(&|d| d.substitute(&self.seq, &n)).ok_or_else(|| internal("size overflow".into()))
    }

    fn ty_at(&self, t: &TensorType, n: i64) -> Result<TensorType, Diagnostic> {
        Ok(TensorType::new(t.dtype, t.shape.iter().map(|d| self.at(d, n)).collect::<Result<_, _>>()?))
    }

    fn add(&mut self, op: Op, operands: &[NodeId], span: Option<Span>) -> Result<NodeId, Diagnostic> {
        self.new.add(op, operands, span).map_err(internal)
    }

    fn run(mut self) -> Result<(Graph, Vec<(String, Origin)>), Diagnostic> {
        let outputs: Vec<(String, NodeId)> = self.old.outputs.clone();
        let needed = self.needed_locally(outputs.iter().map(|o| o.1).collect());
        for n in self.old.topo_order() {
            if needed.contains(&n) && !self.local.contains_key(&n) {
                self.current = Some(n);
                let v = self.local_node(n)?;
                self.local.insert(n, v);
            }
        }
        for (name, o) in &outputs {
            self.new.add_output(name.clone(), self.local[o]);
        }
        let mut origins = Vec::new();
        for s in std::mem::take(&mut self.states) {
            self.new.add_output(format!("{NEXT}{}", s.name), s.value);
            origins.push((s.name, s.origin));
        }
        Ok((self.new, origins))
    }

    /// The nodes whose value at the step's position is read: every ancestor of `roots`,
    /// except a block attention's operands that are evaluated over its window instead.
    fn needed_locally(&self, roots: Vec<NodeId>) -> HashSet<NodeId> {
        let mut needed = HashSet::new();
        let mut stack = roots;
        while let Some(n) = stack.pop() {
            if !needed.insert(n) {
                continue;
            }
            let block = matches!(self.old.node(n).op, Op::BlockAttention(_));
            for o in self.old.operands(n) {
                let windowed =
                    block && !self.token_dependent.contains(&o) && self.old.ty(o).shape.iter().any(|d| self.depends(d));
                if !windowed {
                    stack.push(o);
                }
            }
        }
        needed
    }

    /// A new state input of type `ty` and its index in `states`, whose value the caller
    /// then sets to the state's update.
    fn state_input(&mut self, ty: TensorType, origin: Origin) -> (NodeId, usize) {
        let i = self.states.len();
        let kv_cache = matches!(origin, Origin::Window { kv_cache: true, .. });
        let name = format!("{}{i}", if kv_cache { KV_CACHE } else { STATE });
        let id = self.new.add_input(name.clone(), ty, None);
        self.states.push(State { name, value: id, origin });
        (id, i)
    }

    /// The value of old node `n` at the step's position (its operands done).
    fn local_node(&mut self, n: NodeId) -> Result<NodeId, Diagnostic> {
        let node = self.old.node(n);
        let ops = self.old.operands(n);
        let span = node.span;
        match &node.op {
            Op::LinearAttention(_) => self.linear_attention(n),
            Op::BlockAttention(_) => self.block_attention(n),
            op => {
                let orig_in: Vec<TensorType> = ops.iter().map(|&o| self.old.ty(o).clone()).collect();
                let new_ops: Vec<NodeId> = ops.iter().map(|o| self.local[o]).collect();
                self.emit(op, &orig_in, &node.ty.clone(), &new_ops, span)
            }
        }
    }

    /// `op` at the step's position, given the types its operands and result have in the
    /// forward (to tell which axes are the sequence) and its operands' local values.
    fn emit(
        &mut self,
        op: &Op,
        orig_in: &[TensorType],
        orig_out: &TensorType,
        ops: &[NodeId],
        span: Option<Span>,
    ) -> Result<NodeId, Diagnostic> {
        let mixes = |why: &str| Err(fail(op, span, why));
        if orig_out.shape.iter().filter(|d| self.depends(d)).count() > 1 {
            return mixes("has two sequence axes (position against position), which only attention may have");
        }
        let seq_axis = |t: &TensorType, axis: usize| self.depends(&t.shape[axis]);
        match op {
            Op::Iota { len, dtype } if self.depends(len) => {
                if *len != self.seq_dim {
                    return mixes("counts over a padded or shifted sequence outside attention");
                }
                let p = self.cast(self.position, *dtype)?;
                self.add(Op::Reshape { shape: vec![Dim::constant(1)] }, &[p], span)
            }
            Op::SizeOf { size, dtype } if self.depends(size) => {
                if *size != self.seq_dim {
                    return mixes("reads a size derived from the sequence length");
                }
                let one = self.scalar(1.0, DType::I32)?;
                let n = self.add(Op::Binary(BinaryOp::Add), &[self.position, one], span)?;
                self.cast(n, *dtype)
            }
            Op::Reduce { axes, .. } if axes.iter().any(|&a| seq_axis(&orig_in[0], a)) => {
                mixes("reduces over the sequence")
            }
            Op::Einsum(spec) => {
                for (letters, t) in spec.inputs.iter().zip(orig_in) {
                    for (l, d) in letters.iter().zip(&t.shape) {
                        if !spec.output.contains(l) && self.depends(d) {
                            return mixes("sums over the sequence");
                        }
                    }
                }
                self.generic(op, ops, span)
            }
            Op::Slice { axis, start, end } if seq_axis(&orig_in[0], *axis) => {
                let (s, e) = (self.at(start, 1)?, self.at(end, 1)?);
                if s.as_const() != Some(0) || e.as_const().is_none_or(|e| e < 1) {
                    return mixes("shifts the sequence (it reads another position than the current one)");
                }
                self.generic(op, ops, span)
            }
            Op::Pad { axis, before, .. }
                if seq_axis(&orig_in[0], *axis) && self.at(before, 1)?.as_const() != Some(0) =>
            {
                mixes("shifts the sequence")
            }
            // `table[:N]` is row p of the table at the step, not row 0 (nor a pad to N).
            Op::Slice { axis, .. } | Op::Pad { axis, .. } if !seq_axis(&orig_in[0], *axis) && seq_axis(orig_out, *axis) => {
                mixes("cuts or pads a tensor of fixed size to the sequence's length (a table of positions): the decode step cannot index it by the step's position yet")
            }
            Op::Concat { axis } if seq_axis(orig_out, *axis) => mixes("joins tensors along the sequence"),
            Op::Reshape { .. } if self.splits_sequence(&orig_in[0], orig_out) => {
                mixes("groups the sequence into blocks outside a recognized attention (positions then meet along an axis the decode step cannot follow)")
            }
            Op::ScatterAdd { rows } if self.depends(rows) => mixes("scatters into sequence positions"),
            Op::Scan { axis, reverse } if seq_axis(&orig_in[0], *axis) => {
                if *reverse {
                    return mixes("runs from the end of the sequence: it has no recurrent form");
                }
                // s = x + d·s_prev.
                let ty = self.new.ty(ops[0]).clone();
                let origin = match self.current {
                    Some(node) => Origin::Scan { node, axis: *axis },
                    None => Origin::ScanInRegion(span),
                };
                let (prev, i) = self.state_input(ty, origin);
                let carried = match ops.get(1) {
                    Some(&d) => self.add(Op::Binary(BinaryOp::Mul), &[d, prev], span)?,
                    None => prev,
                };
                let s = self.add(Op::Binary(BinaryOp::Add), &[ops[0], carried], span)?;
                self.states[i].value = s;
                Ok(s)
            }
            Op::LinearAttention(_) | Op::BlockAttention(_) => mixes("cannot appear here"),
            Op::BlockAttentionGrad(_)
            | Op::CrossEntropy(_)
            | Op::CrossEntropyGradX(_)
            | Op::CrossEntropyGradTable(_)
            | Op::CrossEntropyCorrect(_) => mixes("belongs to training, not to generation"),
            _ => self.generic(op, ops, span),
        }
    }

    /// Whether a reshape from `from` to `to` splits the sequence axis into blocks: its
    /// longest sequence-sized axis gets shorter (sizes compared with every symbol at
    /// 1000: `4·ceil(N/4)` into `ceil(N/4)` does, `[B, N, D]` into `[B·N, D]` does not).
    fn splits_sequence(&self, from: &TensorType, to: &TensorType) -> bool {
        let longest = |t: &TensorType| {
            t.shape.iter().filter(|d| self.depends(d)).filter_map(|d| d.eval(&|_| Some(1000))).max().unwrap_or(0)
        };
        longest(to) < longest(from)
    }

    /// `op` with its sizes at `N := 1`.
    fn generic(&mut self, op: &Op, ops: &[NodeId], span: Option<Span>) -> Result<NodeId, Diagnostic> {
        let op = self.sized(op, 1)?;
        self.add(op, ops, span)
    }

    fn cast(&mut self, x: NodeId, to: DType) -> Result<NodeId, Diagnostic> {
        if self.new.ty(x).dtype == to {
            return Ok(x);
        }
        self.add(Op::Cast { to }, &[x], None)
    }

    fn scalar(&mut self, value: f64, dtype: DType) -> Result<NodeId, Diagnostic> {
        graph_build::scalar(&mut self.new, value, dtype).map_err(internal)
    }

    /// `x` (size-1 axes, or a scalar) broadcast to `shape`.
    fn splat(&mut self, x: NodeId, shape: &[Dim]) -> Result<NodeId, Diagnostic> {
        graph_build::splat(&mut self.new, x, shape).map_err(internal)
    }

    /// `[iota(len) == at]` along `axis` of `shape`, a bool tensor of that shape.
    fn one_hot(&mut self, at: NodeId, len: i64, axis: usize, shape: &[Dim]) -> Result<NodeId, Diagnostic> {
        let iota = self.add(Op::Iota { len: Dim::constant(len), dtype: DType::I32 }, &[], None)?;
        let at = self.splat(at, &[Dim::constant(len)])?;
        let hit = self.add(Op::Binary(BinaryOp::Eq), &[iota, at], None)?;
        let mut along = vec![Dim::constant(1); shape.len()];
        along[axis] = Dim::constant(len);
        let hit = self.add(Op::Reshape { shape: along }, &[hit], None)?;
        self.splat(hit, shape)
    }

    /// A region applied at the step's position.
    fn inline(
        &mut self,
        r: &crate::ir::region::Region,
        args: &[NodeId],
        span: Option<Span>,
    ) -> Result<NodeId, Diagnostic> {
        use crate::ir::region::RegionValue;
        self.current = None;
        let mut ids: Vec<NodeId> = Vec::new();
        for n in &r.nodes {
            let orig_in: Vec<TensorType> = n
                .operands
                .iter()
                .map(|v| match *v {
                    RegionValue::Arg(i) => r.args[i as usize].clone(),
                    RegionValue::Node(i) => r.nodes[i as usize].ty.clone(),
                })
                .collect();
            let ops: Vec<NodeId> = n
                .operands
                .iter()
                .map(|v| match *v {
                    RegionValue::Arg(i) => args[i as usize],
                    RegionValue::Node(i) => ids[i as usize],
                })
                .collect();
            ids.push(self.emit(&n.op, &orig_in, &n.ty, &ops, span)?);
        }
        Ok(match r.result {
            RegionValue::Arg(i) => args[i as usize],
            RegionValue::Node(i) => ids[i as usize],
        })
    }

    /// Causal linear attention as its recurrence: `S ← λS + k'ᵀv'` (a gate: `λ = e^a` of
    /// the step's log-gate), `o = q'S`.
    fn linear_attention(&mut self, n: NodeId) -> Result<NodeId, Diagnostic> {
        let node = self.old.node(n);
        let span = node.span;
        let Op::LinearAttention(a) = &node.op else { unreachable!("called on linear attention") };
        if a.direction != Direction::Causal {
            return Err(fail(
                &node.op,
                span,
                "is not causal: a position reads later ones, so it has no recurrent form",
            ));
        }
        let ops: Vec<NodeId> = self.old.operands(n).iter().map(|o| self.local[o]).collect();
        let (qa, ka, va, decay) = a.split(&ops);
        let (qa, ka, va, decay) = (qa.to_vec(), ka.to_vec(), va.to_vec(), decay.copied());
        let q = self.inline(&a.q, &qa, span)?;
        let k = self.inline(&a.k, &ka, span)?;
        let v = self.inline(&a.v, &va, span)?;
        let (qt, vt) = (self.new.ty(q).clone(), self.new.ty(v).clone());
        let r = qt.rank();
        let batch = &qt.shape[..r - 2];
        let mut state_shape = batch.to_vec();
        state_shape.extend([qt.shape[r - 1].clone(), vt.shape[r - 1].clone()]);
        let (prev, i) = self.state_input(TensorType::new(DType::F32, state_shape.clone()), Origin::LinearAttention(n));
        let spec = |a: &[u8], b: &[u8], out: &[u8]| graph_build::batched(r - 2, a, b, out);
        let (x, d, e) = (b'x', b'y', b'z');
        let kv = self.add(Op::Einsum(spec(&[x, d], &[x, e], &[d, e])), &[k, v], span)?;
        let carried = match decay {
            Some(lambda) => {
                let t = self.new.ty(lambda).clone();
                let l = if a.decay == Decay::PerToken {
                    // The step's log-gate `[batch…, 1]`, floored as the op floors it: its gate.
                    let floor = self.scalar(LOG_GATE_FLOOR, DType::F32)?;
                    let floor = self.splat(floor, &t.shape)?;
                    let x = self.add(Op::Binary(BinaryOp::Max), &[lambda, floor], span)?;
                    let x = self.add(Op::Unary(UnaryOp::Exp), &[x], span)?;
                    let shape = [t.shape[..t.rank() - 1].to_vec(), vec![Dim::constant(1), Dim::constant(1)]].concat();
                    self.add(Op::Reshape { shape }, &[x], span)?
                } else {
                    let shape = [t.shape.clone(), vec![Dim::constant(1), Dim::constant(1)]].concat();
                    self.add(Op::Reshape { shape }, &[lambda], span)?
                };
                let l = self.splat(l, &state_shape)?;
                self.add(Op::Binary(BinaryOp::Mul), &[l, prev], span)?
            }
            None => prev,
        };
        let state = self.add(Op::Binary(BinaryOp::Add), &[carried, kv], span)?;
        self.states[i].value = state;
        self.add(Op::Einsum(spec(&[x, d], &[d, e], &[x, e])), &[q, state], span)
    }

    /// Block attention over the window that holds the step's position.
    fn block_attention(&mut self, n: NodeId) -> Result<NodeId, Diagnostic> {
        let node = self.old.node(n);
        let span = node.span;
        let Op::BlockAttention(a) = &node.op else { unreachable!("called on block attention") };
        let out = node.ty.clone();
        let r = out.rank();
        // The slot axis (r − 2): a block's `w` positions, or the whole sequence.
        let slots = &out.shape[r - 2];
        // `blocked`: a block of w rows, else the whole sequence (a KV cache of `context`).
        let (window, slot, blocked) = if let (Some(w), false) = (slots.as_const(), self.depends(slots)) {
            let wc = self.scalar(w as f64, DType::I32)?;
            let blocks = self.add(Op::Binary(BinaryOp::Div), &[self.position, wc], span)?;
            let start = self.add(Op::Binary(BinaryOp::Mul), &[blocks, wc], span)?;
            (w, self.add(Op::Binary(BinaryOp::Sub), &[self.position, start], span)?, true)
        } else if *slots == self.seq_dim {
            (self.context, self.position, false)
        } else {
            return Err(fail(&node.op, span, "groups positions in a way the decode step does not know"));
        };
        // Inside a window of w rows, positions count from the block's start. Sizes of the
        // sequence (positions from its start, its length) are refused in what the window
        // evaluates, except in the weights (T1's mask of the padding, which the causal mask
        // covers).
        let reads_sequence = |op: &Op| match op {
            Op::Iota { len: d, .. } | Op::SizeOf { size: d, .. } => self.depends(d),
            _ => false,
        };
        if blocked && [&a.q, &a.k, &a.v].iter().any(|r| r.nodes.iter().any(|m| reads_sequence(&m.op))) {
            return Err(fail(&node.op, span, ABSOLUTE_POSITIONS));
        }
        let mut operands = Vec::new();
        let all_operands = self.old.operands(n);
        let q_args = a.q.args.len();
        for (i, &o) in all_operands.iter().enumerate() {
            let t = self.old.ty(o).clone();
            let seq_axes: Vec<usize> = (0..t.rank()).filter(|&i| self.depends(&t.shape[i])).collect();
            if seq_axes.is_empty() {
                operands.push(self.local[&o]);
            } else if !self.token_dependent.contains(&o) {
                operands.push(self.over_window(o, window, blocked)?);
            } else {
                let [axis] = seq_axes[..] else {
                    return Err(fail(&node.op, span, "reads an operand with several sequence axes"));
                };
                if t.shape[axis] != self.seq_dim {
                    return Err(fail(&node.op, span, "reads an operand already padded or grouped into blocks"));
                }
                // The window's rows: the cache with this position's row written at its slot.
                // Queries are read at the slot alone, so an operand only the q region reads
                // needs no cache.
                let cache_ty = self.ty_at(&t, window)?;
                let row = self.splat(self.local[&o], &cache_ty.shape)?;
                let hit = self.one_hot(slot, window, axis, &cache_ty.shape)?;
                let query_only = i < q_args && !all_operands[q_args..].contains(&o);
                let (rest, state) = if query_only {
                    let zero = self.scalar(0.0, cache_ty.dtype)?;
                    (self.splat(zero, &cache_ty.shape)?, None)
                } else {
                    let origin = Origin::Window { operand: o, axis, rows: window, kv_cache: !blocked };
                    let (cache, i) = self.state_input(cache_ty.clone(), origin);
                    (cache, Some(i))
                };
                let rows = self.add(Op::Select, &[hit, row, rest], span)?;
                if let Some(i) = state {
                    self.states[i].value = rows;
                }
                operands.push(rows);
            }
        }
        let op = self.sized(&node.op, window)?;
        let want = self.ty_at(&out, 1)?;
        if !blocked {
            if let Some(row) = self.query_row_attention(n, &op, &operands, slot)? {
                if *self.new.ty(row) == want {
                    return Ok(row);
                }
            }
        }
        let all = self.add(op, &operands, span)?;
        // This position's row, at slot 0 of the one-token forward's layout.
        let all_ty = self.new.ty(all).clone();
        let hit = self.one_hot(slot, window, r - 2, &all_ty.shape)?;
        let zero = self.scalar(0.0, DType::F32)?;
        let zeros = self.splat(zero, &all_ty.shape)?;
        let picked = self.add(Op::Select, &[hit, all, zeros], span)?;
        let row = self.add(Op::Reduce { op: ReduceOp::Sum, axes: vec![r - 2] }, &[picked], span)?;
        let mut shape = all_ty.shape.clone();
        shape[r - 2] = Dim::constant(1);
        let row = self.add(Op::Reshape { shape }, &[row], span)?;
        let after = want.shape[r - 2].checked_add(&Dim::constant(-1)).ok_or_else(|| internal("size".into()))?;
        let local = if after.as_const() == Some(0) {
            row
        } else {
            self.add(Op::Pad { axis: r - 2, before: Dim::constant(0), after }, &[row], span)?
        };
        if *self.new.ty(local) != want {
            return Err(fail(&node.op, span, "groups positions in a way the decode step does not know"));
        }
        Ok(local)
    }

    /// A block attention over a KV cache (`sized`: the op at the window's size, `operands`:
    /// its operands there) for the step's query alone: `q'` at the step's position, the
    /// scores against the window's keys `[…, 1, C]`, that row of the weights region
    /// (`query_row.rs`) and its product with the values: O(C·d) instead of the window's
    /// O(C²·d). `None` when a q operand is not at hand for one position or the weights
    /// region has no row form; the caller then evaluates the whole window.
    fn query_row_attention(
        &mut self,
        n: NodeId,
        sized: &Op,
        operands: &[NodeId],
        slot: NodeId,
    ) -> Result<Option<NodeId>, Diagnostic> {
        let (Op::BlockAttention(a), Op::BlockAttention(at)) = (&self.old.node(n).op, sized) else {
            return Ok(None);
        };
        // A scan in the q region would carry a state of its own: keep the whole window.
        if a.q.nodes.iter().any(|m| matches!(m.op, Op::Scan { .. })) {
            return Ok(None);
        }
        let span = self.old.node(n).span;
        let mut q_args = Vec::new();
        for &o in &self.old.operands(n)[..a.q.args.len()] {
            let whole_sequence = self.old.ty(o).shape.iter().any(|d| self.depends(d));
            match self.local.get(&o) {
                Some(&v) if self.token_dependent.contains(&o) || !whole_sequence => q_args.push(v),
                _ => return Ok(None),
            }
        }
        // What the q region cannot compute at one position, the window can.
        let Ok(q) = self.inline(&a.q, &q_args, span) else { return Ok(None) };
        let (_, ka, va) = at.split(operands);
        let k = at.k.inline(&mut self.new, ka, span).map_err(internal)?;
        let v = at.v.inline(&mut self.new, va, span).map_err(internal)?;
        let r = self.new.ty(q).rank();
        let spec = |x: &[u8], y: &[u8], out: &[u8]| graph_build::batched(r - 2, x, y, out);
        let Ok(scores) = self.new.add(Op::Einsum(spec(b"wy", b"xy", b"wx")), &[q, k], span) else {
            return Ok(None);
        };
        let Some(weights) = super::query_row::query_row(&mut self.new, &at.weights, scores, slot) else {
            return Ok(None);
        };
        Ok(self.new.add(Op::Einsum(spec(b"wx", b"xz", b"wz")), &[weights, v], span).ok())
    }

    /// Token-independent node `n` over a window of `len` positions (`N := len`); `blocked`:
    /// the window is a block, which reads no position counted from the sequence's start.
    fn over_window(&mut self, n: NodeId, len: i64, blocked: bool) -> Result<NodeId, Diagnostic> {
        if let Some(&v) = self.window.get(&(n, len)) {
            return Ok(v);
        }
        let node = self.old.node(n);
        let v = match &node.op {
            Op::Param { .. } => self.local[&n],
            op if op.is_normal_form() => return Err(fail(op, node.span, "cannot feed an attention's window")),
            op @ (Op::Iota { len: d, .. } | Op::SizeOf { size: d, .. }) if blocked && self.depends(d) => {
                return Err(fail(op, node.span, ABSOLUTE_POSITIONS))
            }
            op => {
                let ops = self.old.operands(n);
                let ops: Vec<NodeId> =
                    ops.iter().map(|&o| self.over_window(o, len, blocked)).collect::<Result<_, _>>()?;
                let op = self.sized(op, len)?;
                self.add(op, &ops, node.span)?
            }
        };
        self.window.insert((n, len), v);
        Ok(v)
    }
}
