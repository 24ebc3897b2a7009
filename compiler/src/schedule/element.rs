//! Element expressions: the value of a graph node (or of a node inside a region) at one
//! index, built from the values of its operands. Views (reshape, broadcast, permute,
//! slice, pad, concat) are index arithmetic; reductions and contractions open
//! accumulation loops; values written by other kernels are loads.

use super::emit::{add, bin, div, mul, rem, sub, Emitter};
use crate::ir::{BinaryOp, DType, Dim, Graph, NodeId, Op, ReduceOp, Region, RegionValue, TensorType, UnaryOp};
use crate::kernel::Var;
use crate::kernel::{Access, Binary, Elem, Expr, LoopKind, Scalar, Stmt, Unary};
use std::collections::HashMap;
use std::rc::Rc;

pub fn scalar_of(d: DType) -> Scalar {
    match d {
        DType::F32 | DType::BF16 | DType::F16 => Scalar::F32,
        DType::I32 => Scalar::I32,
        DType::Bool => Scalar::Bool,
    }
}

pub fn elem_of(d: DType) -> Elem {
    match d {
        DType::F32 => Elem::F32,
        DType::BF16 => Elem::BF16,
        DType::F16 => Elem::F16,
        DType::I32 => Elem::I32,
        DType::Bool => Elem::U8,
    }
}

/// Where a value comes from: a graph node, a value inside a region (whose arguments are
/// sources in turn), or a local array a kernel staged.
#[derive(Clone)]
pub enum Source {
    Node(NodeId),
    Region {
        region: Rc<Region>,
        value: RegionValue,
        args: Rc<[Source]>,
    },
    /// A local array holding the trailing `keep` axes of a value of type `ty`, the
    /// leading axes being fixed by the loops around its use: element `idx` is at the
    /// row-major position of `idx[rank − keep..]`. Arrays are rewritten as the loops run,
    /// so reads of them are never hoisted (the array is registered as mutable).
    Array {
        array: Var,
        ty: TensorType,
        keep: usize,
    },
    /// A value of type `ty` that an earlier kernel of the schedule stored in global
    /// buffer `buffer` (a workspace the graph has no node for).
    Buffer {
        buffer: usize,
        ty: TensorType,
    },
}

impl Source {
    /// A region applied to graph nodes.
    pub fn region(region: Rc<Region>, args: &[NodeId]) -> Source {
        let args: Rc<[Source]> = args.iter().map(|&n| Source::Node(n)).collect();
        Source::Region { value: region.result, region, args }
    }

    /// A short key naming the source in memo tables.
    fn key(&self) -> String {
        match self {
            Source::Node(n) => format!("n{}", n.index()),
            Source::Region { region, value, args } => {
                let args: Vec<String> = args.iter().map(Source::key).collect();
                format!("r{:p}/{value:?}({})", Rc::as_ptr(region), args.join(","))
            }
            Source::Array { array, .. } => format!("a{}", array.0),
            Source::Buffer { buffer, .. } => format!("b{buffer}"),
        }
    }
}

pub struct Lowering<'g> {
    pub g: &'g Graph,
    /// Values in memory: node → global buffer id.
    pub stored: &'g HashMap<NodeId, usize>,
    /// Names of global buffers, for readable kernels.
    pub names: &'g dyn Fn(usize) -> String,
    pub e: Emitter,
}

fn key(idx: &[Expr]) -> String {
    format!("{idx:?}")
}

impl<'g> Lowering<'g> {
    pub fn ty(&self, s: &Source) -> TensorType {
        match s {
            Source::Node(n) => self.g.node(*n).ty.clone(),
            Source::Region { region, value, args } => match value {
                RegionValue::Arg(i) => self.ty(&args[*i as usize]),
                RegionValue::Node(j) => region.nodes[*j as usize].ty.clone(),
            },
            Source::Array { ty, .. } | Source::Buffer { ty, .. } => ty.clone(),
        }
    }

    /// Row-major linear index of `idx` in `shape`.
    pub fn linear(&mut self, idx: &[Expr], shape: &[Dim]) -> Result<Expr, String> {
        let mut lin = Expr::I64(0);
        let mut stride = Expr::I64(1);
        for (i, d) in idx.iter().zip(shape).rev() {
            lin = add(lin, mul(i.clone(), stride.clone()));
            let size = self.e.dim(d)?;
            stride = self.e.bind(mul(stride, size));
        }
        Ok(self.e.bind(lin))
    }

    /// Split a linear index into an index of `shape`.
    pub fn unravel(&mut self, lin: Expr, shape: &[Dim]) -> Result<Vec<Expr>, String> {
        let mut out = vec![Expr::I64(0); shape.len()];
        let mut rest = lin;
        for (i, d) in shape.iter().enumerate().rev() {
            let size = self.e.dim(d)?;
            if i == 0 {
                out[i] = rest.clone();
            } else {
                out[i] = self.e.bind(rem(rest.clone(), size.clone()));
                rest = self.e.bind(div(rest, size));
            }
        }
        Ok(out)
    }

    /// The load of a stored node at `idx`.
    pub fn load(&mut self, n: NodeId, idx: &[Expr]) -> Result<Expr, String> {
        let global = self.stored[&n];
        let ty = &self.g.node(n).ty;
        let name = (self.names)(global);
        let b = self.e.buffer(global, &name, elem_of(ty.dtype), Access::Read);
        let lin = self.linear(idx, &ty.shape.clone())?;
        let load = Expr::Load { buffer: b, index: Box::new(lin) };
        Ok(self.e.bind(load))
    }

    /// The value of `s` at `idx`: loaded if it is in memory, else computed.
    pub fn value(&mut self, s: Source, idx: &[Expr]) -> Result<Expr, String> {
        if let Source::Node(n) = s {
            if self.stored.contains_key(&n) {
                return self.load(n, idx);
            }
        }
        self.compute(s, idx)
    }

    /// The value of `s` at `idx` computed from its operands (the value a kernel writes).
    pub fn compute(&mut self, s: Source, idx: &[Expr]) -> Result<Expr, String> {
        match s {
            Source::Node(n) => {
                let k = format!("n{}:{}", n.index(), key(idx));
                if let Some(v) = self.e.memo_get(&k) {
                    return Ok(v);
                }
                let node = self.g.node(n);
                let operands: Vec<Source> = self.g.operands(n).into_iter().map(Source::Node).collect();
                let v = self
                    .op(&node.op, &node.ty, &operands, idx)
                    .map_err(|e| format!("{} ({n:?}): {e}", node.op.kind()))?;
                let v = self.e.bind(v);
                self.e.memo_put(k, v.clone());
                Ok(v)
            }
            Source::Buffer { buffer, ty } => {
                let name = (self.names)(buffer);
                let b = self.e.buffer(buffer, &name, elem_of(ty.dtype), Access::Read);
                let lin = self.linear(idx, &ty.shape)?;
                Ok(self.e.bind(Expr::Load { buffer: b, index: Box::new(lin) }))
            }
            Source::Array { array, ty, keep } => {
                let rank = ty.rank();
                let keep = keep.min(rank).min(idx.len());
                let at = self.linear(&idx[idx.len() - keep..], &ty.shape[rank - keep..])?;
                Ok(Expr::LoadArray { array, index: Box::new(at) })
            }
            Source::Region { region, value, args } => match value {
                RegionValue::Arg(i) => self.value(args[i as usize].clone(), idx),
                RegionValue::Node(j) => {
                    let args_key: Vec<String> = args.iter().map(Source::key).collect();
                    let k = format!("r{:p}/{j}/{}:{}", Rc::as_ptr(&region), args_key.join(","), key(idx));
                    if let Some(v) = self.e.memo_get(&k) {
                        return Ok(v);
                    }
                    let rn = region.nodes[j as usize].clone();
                    let operands: Vec<Source> = rn
                        .operands
                        .iter()
                        .map(|&v| Source::Region { region: region.clone(), value: v, args: args.clone() })
                        .collect();
                    let v = self.op(&rn.op, &rn.ty, &operands, idx)?;
                    let v = self.e.bind(v);
                    self.e.memo_put(k, v.clone());
                    Ok(v)
                }
            },
        }
    }

    fn op(&mut self, op: &Op, ty: &TensorType, xs: &[Source], idx: &[Expr]) -> Result<Expr, String> {
        let s = scalar_of(ty.dtype);
        Ok(match op {
            Op::Constant { value, dtype } => match dtype {
                DType::F32 => Expr::F32(value.get() as f32),
                DType::BF16 => Expr::F32(crate::kernel::math::round_bf16(value.get() as f32)),
                DType::F16 => Expr::F32(crate::kernel::math::round_f16(value.get() as f32)),
                DType::I32 => Expr::Cast(Scalar::I32, Box::new(Expr::I64(value.get() as i64))),
                DType::Bool => Expr::Bool(value.get() != 0.0),
            },
            Op::Iota { .. } => Expr::Cast(s, Box::new(idx[0].clone())),
            Op::SizeOf { size, .. } => Expr::Cast(s, Box::new(self.e.dim(size)?)),
            Op::Unary(u) => {
                let x = self.value(xs[0].clone(), idx)?;
                unary(*u, x, s)
            }
            Op::Binary(b) => {
                let x = self.value(xs[0].clone(), idx)?;
                let y = self.value(xs[1].clone(), idx)?;
                binary(*b, x, y)
            }
            Op::Select => {
                let c = self.value(xs[0].clone(), idx)?;
                let a = self.value(xs[1].clone(), idx)?;
                let b = self.value(xs[2].clone(), idx)?;
                Expr::Select(Box::new(c), Box::new(a), Box::new(b))
            }
            Op::Cast { to } => {
                let x = self.value(xs[0].clone(), idx)?;
                let x = Expr::Cast(scalar_of(*to), Box::new(x));
                match to {
                    DType::BF16 => Expr::Unary(Unary::RoundBf16, Box::new(x)),
                    DType::F16 => Expr::Unary(Unary::RoundF16, Box::new(x)),
                    _ => x,
                }
            }
            Op::Reduce { op, axes } => {
                let input = self.ty(&xs[0]);
                let init = match (op, input.dtype) {
                    (ReduceOp::Sum, DType::F32) => Expr::F32(0.0),
                    (ReduceOp::Max, DType::F32) => Expr::F32(f32::NEG_INFINITY),
                    (ReduceOp::Min, DType::F32) => Expr::F32(f32::INFINITY),
                    (ReduceOp::Sum, _) => Expr::Cast(Scalar::I32, Box::new(Expr::I64(0))),
                    (ReduceOp::Max, _) => Expr::Cast(Scalar::I32, Box::new(Expr::I64(i32::MIN as i64))),
                    (ReduceOp::Min, _) => Expr::Cast(Scalar::I32, Box::new(Expr::I64(i32::MAX as i64))),
                };
                let combine = match op {
                    ReduceOp::Sum => Binary::Add,
                    ReduceOp::Max => Binary::Max,
                    ReduceOp::Min => Binary::Min,
                };
                let extents: Vec<Dim> = axes.iter().map(|&a| input.shape[a].clone()).collect();
                self.accumulate(s, init, combine, idx, &extents, |lw, loops| {
                    let mut full = Vec::with_capacity(input.rank());
                    let (mut k, mut r) = (0, 0);
                    for a in 0..input.rank() {
                        if axes.contains(&a) {
                            full.push(Expr::Var(loops[r]));
                            r += 1;
                        } else {
                            full.push(idx[k].clone());
                            k += 1;
                        }
                    }
                    lw.value(xs[0].clone(), &full)
                })?
            }
            Op::Einsum(spec) => {
                let mut letter_idx: HashMap<u8, Expr> = HashMap::new();
                for (l, i) in spec.output.iter().zip(idx) {
                    letter_idx.insert(*l, i.clone());
                }
                let mut summed: Vec<(u8, Dim)> = Vec::new();
                for (letters, x) in spec.inputs.iter().zip(xs) {
                    let t = self.ty(x);
                    for (l, d) in letters.iter().zip(&t.shape) {
                        if !spec.output.contains(l) && !summed.iter().any(|(s, _)| s == l) {
                            summed.push((*l, d.clone()));
                        }
                    }
                }
                let extents: Vec<Dim> = summed.iter().map(|(_, d)| d.clone()).collect();
                let product = |lw: &mut Lowering<'g>, loops: &[crate::kernel::Var]| -> Result<Expr, String> {
                    let mut map = letter_idx.clone();
                    for ((l, _), v) in summed.iter().zip(loops) {
                        map.insert(*l, Expr::Var(*v));
                    }
                    let mut prod: Option<Expr> = None;
                    for (letters, x) in spec.inputs.iter().zip(xs) {
                        let at: Vec<Expr> = letters.iter().map(|l| map[l].clone()).collect();
                        let v = lw.value(x.clone(), &at)?;
                        prod = Some(match prod {
                            None => v,
                            Some(p) => bin(Binary::Mul, p, v),
                        });
                    }
                    Ok(prod.expect("an einsum has an operand"))
                };
                if summed.is_empty() {
                    product(self, &[])?
                } else {
                    self.accumulate(Scalar::F32, Expr::F32(0.0), Binary::Add, idx, &extents, product)?
                }
            }
            Op::Reshape { shape } => {
                let from = self.ty(&xs[0]).shape;
                let at = match reshape_groups(&from, shape) {
                    // Axis by axis group: an axis the reshape keeps passes its index through
                    // untouched, so row indices stay free of the division and remainder
                    // that would hide them from hoisting (and bloat the code).
                    Some(groups) => {
                        let mut at = Vec::with_capacity(from.len());
                        for (f, t) in groups {
                            if f.len() == 1 && t.len() == 1 {
                                at.push(idx[t.start].clone());
                            } else {
                                let lin = self.linear(&idx[t.clone()], &shape[t])?;
                                at.extend(self.unravel(lin, &from[f])?);
                            }
                        }
                        at
                    }
                    None => {
                        let lin = self.linear(idx, shape)?;
                        self.unravel(lin, &from)?
                    }
                };
                self.value(xs[0].clone(), &at)?
            }
            Op::Broadcast { shape } => {
                let from = self.ty(&xs[0]).shape;
                let at: Vec<Expr> = from
                    .iter()
                    .zip(shape)
                    .zip(idx)
                    .map(
                        |((f, t), i)| {
                            if f.as_const() == Some(1) && t.as_const() != Some(1) {
                                Expr::I64(0)
                            } else {
                                i.clone()
                            }
                        },
                    )
                    .collect();
                self.value(xs[0].clone(), &at)?
            }
            Op::Permute { perm } => {
                let mut at = vec![Expr::I64(0); perm.len()];
                for (i, &p) in perm.iter().enumerate() {
                    at[p] = idx[i].clone();
                }
                self.value(xs[0].clone(), &at)?
            }
            Op::Slice { axis, start, .. } => {
                let mut at = idx.to_vec();
                let mut i = add(idx[*axis].clone(), self.e.dim(start)?);
                if ty.shape[*axis].as_const().is_none_or(|len| len < 1) {
                    // A slice that may be empty (`x[:, 1:]` at N = 1) is read nowhere in
                    // exact terms, but a pad or concat around it still loads from it with
                    // a clamped index (and discards the value): keep that load inside the
                    // sliced tensor.
                    let size = self.e.dim(&self.ty(&xs[0]).shape[*axis].clone())?;
                    i = bin(Binary::Max, bin(Binary::Min, i, sub(size, Expr::I64(1))), Expr::I64(0));
                }
                at[*axis] = self.e.bind(i);
                self.value(xs[0].clone(), &at)?
            }
            Op::Pad { axis, before, .. } => {
                let size = self.ty(&xs[0]).shape[*axis].clone();
                let j = self.e.bind(sub(idx[*axis].clone(), self.e.dim(before)?));
                let n = self.e.dim(&size)?;
                let inside =
                    bin(Binary::And, bin(Binary::Ge, j.clone(), Expr::I64(0)), bin(Binary::Lt, j.clone(), n.clone()));
                let inside = self.e.bind(inside);
                // Clamped so that the load is in bounds even where the value is unused.
                let clamped = bin(Binary::Max, bin(Binary::Min, j, sub(n, Expr::I64(1))), Expr::I64(0));
                let mut at = idx.to_vec();
                at[*axis] = self.e.bind(clamped);
                let v = self.value(xs[0].clone(), &at)?;
                Expr::Select(Box::new(inside), Box::new(v), Box::new(zero(s)))
            }
            Op::Concat { axis } => {
                let mut result: Option<Expr> = None;
                let mut offset = Expr::I64(0);
                let mut parts = Vec::new();
                for x in xs {
                    let size = self.e.dim(&self.ty(x).shape[*axis].clone())?;
                    let j = self.e.bind(sub(idx[*axis].clone(), offset.clone()));
                    let clamped =
                        bin(Binary::Max, bin(Binary::Min, j.clone(), sub(size.clone(), Expr::I64(1))), Expr::I64(0));
                    let mut at = idx.to_vec();
                    at[*axis] = self.e.bind(clamped);
                    let v = self.value(x.clone(), &at)?;
                    parts.push((bin(Binary::Lt, j, size.clone()), v));
                    offset = self.e.bind(add(offset, size));
                }
                for (cond, v) in parts.into_iter().rev() {
                    result = Some(match result {
                        None => v,
                        Some(r) => Expr::Select(Box::new(cond), Box::new(v), Box::new(r)),
                    });
                }
                result.ok_or("concat of nothing")?
            }
            Op::Gather => {
                let index_ty = self.ty(&xs[1]);
                let table = self.ty(&xs[0]);
                let k = index_ty.rank();
                let row = self.value(xs[1].clone(), &idx[..k])?;
                let rows = self.e.dim(&table.shape[0])?;
                // Out-of-range ids are clamped (the interpreter reports them as errors).
                let row = bin(
                    Binary::Max,
                    bin(Binary::Min, Expr::Cast(Scalar::I64, Box::new(row)), sub(rows, Expr::I64(1))),
                    Expr::I64(0),
                );
                let mut at = vec![self.e.bind(row)];
                at.extend(idx[k..].iter().cloned());
                self.value(xs[0].clone(), &at)?
            }
            Op::Dropout { rate, salt } => {
                let x = self.value(xs[0].clone(), idx)?;
                let lin = self.linear(idx, &ty.shape.clone())?;
                let keep = Expr::DropoutKeep {
                    seed: Box::new(self.e.size("seed")?),
                    salt: *salt,
                    index: Box::new(lin),
                    step: Box::new(self.e.size("step")?),
                    rate: rate.get(),
                };
                let scaled = bin(Binary::Mul, x.clone(), Expr::F32((1.0 / (1.0 - rate.get())) as f32));
                let dropped = Expr::Select(Box::new(keep), Box::new(scaled), Box::new(Expr::F32(0.0)));
                // The `train` argument switches dropout on; evaluation passes 0.
                let train = bin(Binary::Ne, self.e.size("train")?, Expr::I64(0));
                Expr::Select(Box::new(train), Box::new(dropped), Box::new(x))
            }
            other => return Err(format!("`{}` must be computed by its own kernel", other.kind())),
        })
    }

    /// `acc = init; for loops… { acc = combine(acc, body) }`, placed at the outermost
    /// level where `idx` is known, so a row's reduction runs once per row.
    /// `acc = init; for x in 0..extent { acc += term(x) }` as a serial loop at the
    /// current level (terms may read local arrays); returns the accumulator.
    pub fn serial_sum(&mut self, init: Expr, extent: Expr, term: impl FnOnce(&mut Lowering<'g>, Expr) -> Expr) -> Expr {
        let level = self.e.depth();
        let acc = self.e.accumulator(level, Scalar::F32, init);
        let x = self.e.open();
        let t = term(self, Expr::Var(x));
        self.e.push(Stmt::Assign { var: acc, value: bin(Binary::Add, Expr::Var(acc), t) });
        self.e.close(x, extent, LoopKind::Serial);
        Expr::Var(acc)
    }

    pub fn accumulate(
        &mut self,
        ty: Scalar,
        init: Expr,
        combine: Binary,
        idx: &[Expr],
        extents: &[Dim],
        body: impl FnOnce(&mut Lowering<'g>, &[crate::kernel::Var]) -> Result<Expr, String>,
    ) -> Result<Expr, String> {
        let level = idx.iter().map(|i| self.e.level_of(i)).max().unwrap_or(0);
        let acc = self.e.accumulator(level, ty, init);
        let saved = self.e.enter(level);
        let mut loops = Vec::new();
        let mut ext = Vec::new();
        for d in extents {
            ext.push(self.e.dim(d)?);
            loops.push(self.e.open());
        }
        let v = body(self, &loops)?;
        if combine == Binary::Add && ty == Scalar::F32 {
            // Compensated (Kahan) summation: f32 sums (a matmul's inner dimension, a mean
            // over tokens) otherwise lose the 1e-4 agreement with the f64 reference that the
            // tests require; plain sums even of 16 terms were measured to break it for an
            // ill-conditioned gradient (t1_all_norm's `bo`). `comp` carries the rounding error of each
            // addition into the next; no fast-math is used, so the code keeps its order.
            let comp = self.e.accumulator(level, Scalar::F32, Expr::F32(0.0));
            let (y, t) = (self.e.fresh(), self.e.fresh());
            self.e.push(Stmt::Let { var: y, value: bin(Binary::Sub, v, Expr::Var(comp)) });
            self.e.push(Stmt::Let { var: t, value: bin(Binary::Add, Expr::Var(acc), Expr::Var(y)) });
            let err = bin(Binary::Sub, bin(Binary::Sub, Expr::Var(t), Expr::Var(acc)), Expr::Var(y));
            self.e.push(Stmt::Assign { var: comp, value: err });
            self.e.push(Stmt::Assign { var: acc, value: Expr::Var(t) });
        } else {
            self.e.push(Stmt::Assign { var: acc, value: bin(combine, Expr::Var(acc), v) });
        }
        for (var, extent) in loops.into_iter().zip(ext).rev() {
            self.e.close(var, extent, LoopKind::Serial);
        }
        self.e.leave(saved);
        self.e.freeze(acc);
        Ok(Expr::Var(acc))
    }
}

fn zero(s: Scalar) -> Expr {
    match s {
        Scalar::F32 => Expr::F32(0.0),
        Scalar::Bool => Expr::Bool(false),
        other => Expr::Cast(other, Box::new(Expr::I64(0))),
    }
}

/// The axes of a reshape from `from` to `to` in groups of equal size (ranges of `from`
/// and of `to`, in order), each group as small as possible: `[B, N, H·d] → [B, N, H, d]`
/// is `B ↔ B`, `N ↔ N`, `H·d ↔ (H, d)`. A size-1 axis is a group alone (an empty range on
/// the other side). `None` when no grouping is found (sizes that never meet, or too large
/// to compare); the caller then linearizes the whole index.
pub fn reshape_groups(from: &[Dim], to: &[Dim]) -> Option<Vec<(std::ops::Range<usize>, std::ops::Range<usize>)>> {
    let one = Dim::constant(1);
    // Sizes are compared at a large value of every symbol to decide which side grows; the
    // groups are then checked to be exactly equal.
    let magnitude = |d: &Dim| d.eval(&|_| Some(1 << 16));
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < from.len() || j < to.len() {
        if i < from.len() && from[i] == one {
            out.push((i..i + 1, j..j));
            i += 1;
            continue;
        }
        if j < to.len() && to[j] == one {
            out.push((i..i, j..j + 1));
            j += 1;
            continue;
        }
        if i >= from.len() || j >= to.len() {
            return None;
        }
        let (i0, j0) = (i, j);
        let (mut pf, mut pt) = (from[i].clone(), to[j].clone());
        i += 1;
        j += 1;
        while pf != pt {
            if magnitude(&pf)? < magnitude(&pt)? {
                pf = pf.checked_mul(from.get(i)?)?;
                i += 1;
            } else {
                pt = pt.checked_mul(to.get(j)?)?;
                j += 1;
            }
        }
        out.push((i0..i, j0..j));
    }
    Some(out)
}

pub fn unary(u: UnaryOp, x: Expr, s: Scalar) -> Expr {
    let f = |v: f32| Expr::F32(v);
    let un = |op: Unary, e: Expr| Expr::Unary(op, Box::new(e));
    match u {
        UnaryOp::Neg => un(Unary::Neg, x),
        UnaryOp::Exp => un(Unary::Exp, x),
        UnaryOp::Log => un(Unary::Log, x),
        UnaryOp::Sqrt => un(Unary::Sqrt, x),
        UnaryOp::Rsqrt => un(Unary::Rsqrt, x),
        UnaryOp::Recip => un(Unary::Recip, x),
        UnaryOp::Abs => un(Unary::Abs, x),
        UnaryOp::Tanh => un(Unary::Tanh, x),
        UnaryOp::Sin => un(Unary::Sin, x),
        UnaryOp::Cos => un(Unary::Cos, x),
        UnaryOp::Not => un(Unary::Not, x),
        UnaryOp::Relu => {
            // NaN stays NaN, as in the interpreter: x where x > 0 or x is NaN, else 0.
            let keep = bin(Binary::Or, bin(Binary::Gt, x.clone(), f(0.0)), bin(Binary::Ne, x.clone(), x.clone()));
            Expr::Select(Box::new(keep), Box::new(x), Box::new(zero(s)))
        }
        UnaryOp::Elu => Expr::Select(
            Box::new(bin(Binary::Gt, x.clone(), f(0.0))),
            Box::new(x.clone()),
            Box::new(bin(Binary::Sub, un(Unary::Exp, x), f(1.0))),
        ),
        UnaryOp::Sigmoid => bin(Binary::Div, f(1.0), bin(Binary::Add, f(1.0), un(Unary::Exp, un(Unary::Neg, x)))),
        UnaryOp::Silu => bin(
            Binary::Mul,
            x.clone(),
            bin(Binary::Div, f(1.0), bin(Binary::Add, f(1.0), un(Unary::Exp, un(Unary::Neg, x)))),
        ),
    }
}

pub fn binary(b: BinaryOp, x: Expr, y: Expr) -> Expr {
    let op = match b {
        BinaryOp::Add => Binary::Add,
        BinaryOp::Sub => Binary::Sub,
        BinaryOp::Mul => Binary::Mul,
        BinaryOp::Div => Binary::Div,
        BinaryOp::Pow => Binary::Pow,
        BinaryOp::Max => Binary::Max,
        BinaryOp::Min => Binary::Min,
        BinaryOp::Lt => Binary::Lt,
        BinaryOp::Le => Binary::Le,
        BinaryOp::Gt => Binary::Gt,
        BinaryOp::Ge => Binary::Ge,
        BinaryOp::Eq => Binary::Eq,
        BinaryOp::Ne => Binary::Ne,
        BinaryOp::And => Binary::And,
        BinaryOp::Or => Binary::Or,
    };
    bin(op, x, y)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dims(s: &[&str]) -> Vec<Dim> {
        s.iter().map(|x| x.parse::<i64>().map(Dim::constant).unwrap_or_else(|_| Dim::sym(*x))).collect()
    }

    #[test]
    fn reshape_groups_pair_the_smallest_equal_runs() {
        let n = Dim::sym("N");
        let hd = |h: &[&str]| dims(h);
        // Heads split off the last axis; B and N pass through.
        let g = reshape_groups(&hd(&["B", "N", "12"]), &hd(&["B", "N", "3", "4"])).unwrap();
        assert_eq!(g, vec![(0..1, 0..1), (1..2, 1..2), (2..3, 2..4)]);
        // Merging tokens, with a size-1 axis inserted.
        let bn = vec![Dim::sym("B").checked_mul(&n).unwrap(), Dim::constant(1), Dim::constant(8)];
        let g = reshape_groups(&hd(&["B", "N", "8"]), &bn).unwrap();
        assert_eq!(g, vec![(0..2, 0..1), (2..2, 1..2), (2..3, 2..3)]);
        // Sizes that never meet.
        assert_eq!(reshape_groups(&hd(&["6", "N"]), &hd(&["4", "N"])), None);
    }
}
