//! Contractions as library GEMM nodes (CPU schedules; see `kernel/gemm.rs`).
//!
//! Which: every two-operand einsum that sums over at least one letter shared by both
//! operands and sums no letter of one operand alone — the dense projections, their input
//! gradients and their weight gradients (a sum over all B·N tokens). Why: generated loop
//! nests run these at ~1 GFLOP/s with Kahan-compensated scalar sums, the `gemm` crate at
//! over 100 GFLOP/s per core, and they are most of a training step's FLOPs.
//!
//! How: the einsum's letters fall into four classes — batch (both operands and the
//! output), m (A and output), n (B and output), k (summed) — and each class must become
//! one strided axis of the library call. A class merges when its letters are laid out
//! like one axis (`stride(lᵢ) = stride(lᵢ₊₁)·extent(lᵢ₊₁)`) in every matrix it touches;
//! m and n letters that do not merge become batch loops, k letters must merge. Operands
//! are read in place when they are views (reshape of contiguous data, permute, slice,
//! broadcast) of values already in memory; any other operand is first copied into a
//! contiguous workspace by a kernel of its own.

use super::element::Source;
use super::Sink;
use crate::ir::{DType, Dim, Graph, NodeId, Op};
use crate::kernel::gemm::{BatchAxis, Gemm, Matrix};
use crate::kernel::{Access, BufferDecl, Elem, Expr, Kernel, Var};
use std::collections::HashMap;

/// Where each element of a value lies in a buffer: `offset + Σ index·stride`, in elements.
#[derive(Clone, Debug, PartialEq)]
pub struct Layout {
    pub buffer: usize,
    pub offset: Dim,
    pub strides: Vec<Dim>,
}

impl Layout {
    /// A value of `shape` stored row-major at the start of `buffer`.
    pub fn contiguous(buffer: usize, shape: &[Dim]) -> Result<Layout, String> {
        Ok(Layout { buffer, offset: Dim::constant(0), strides: row_major(shape).ok_or("size overflow")? })
    }

    pub fn is_contiguous(&self, shape: &[Dim]) -> bool {
        self.offset == Dim::constant(0) && row_major(shape).as_ref() == Some(&self.strides)
    }
}

/// One matrix of a library call: a layout and a letter naming each of its axes.
pub struct Operand {
    pub layout: Layout,
    pub letters: Vec<u8>,
}

pub fn row_major(shape: &[Dim]) -> Option<Vec<Dim>> {
    let mut strides = vec![Dim::constant(1); shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1].checked_mul(&shape[i + 1])?;
    }
    Some(strides)
}

/// The layout of `n` if it is a view of a float value in memory (`reads`).
pub fn layout(g: &Graph, reads: &HashMap<NodeId, usize>, n: NodeId) -> Option<Layout> {
    let ty = g.ty(n);
    if !ty.dtype.is_float() {
        return None;
    }
    if let Some(&buffer) = reads.get(&n) {
        return Some(Layout { buffer, offset: Dim::constant(0), strides: row_major(&ty.shape)? });
    }
    let operands = g.operands(n);
    let of = |i: usize| layout(g, reads, operands[i]);
    match &g.node(n).op {
        Op::Reshape { shape } => {
            let l = of(0)?;
            // Only reshapes of contiguous data keep a strided layout this simple.
            (Some(&l.strides) == row_major(&g.ty(operands[0]).shape).as_ref())
                .then(|| Some(Layout { strides: row_major(shape)?, ..l }))?
        }
        Op::Permute { perm } => {
            let l = of(0)?;
            Some(Layout { strides: perm.iter().map(|&p| l.strides[p].clone()).collect(), ..l })
        }
        Op::Slice { axis, start, .. } => {
            let l = of(0)?;
            let offset = l.offset.checked_add(&start.checked_mul(&l.strides[*axis])?)?;
            Some(Layout { offset, ..l })
        }
        Op::Broadcast { shape } => {
            let l = of(0)?;
            let from = &g.ty(operands[0]).shape;
            let strides = (0..shape.len())
                .map(|i| if from[i] != shape[i] { Dim::constant(0) } else { l.strides[i].clone() })
                .collect();
            Some(Layout { strides, ..l })
        }
        _ => None,
    }
}

/// Strides of each letter in one matrix.
type Strides = HashMap<u8, Dim>;

fn strides_of(op: &Operand) -> Strides {
    op.letters.iter().copied().zip(op.layout.strides.iter().cloned()).collect()
}

/// The index of the first letter of the longest suffix of `ls` that is laid out like
/// one axis in every matrix of `ms`.
fn merged_from(ls: &[u8], extent: &HashMap<u8, Dim>, ms: &[&Strides]) -> usize {
    let mut from = ls.len().saturating_sub(1);
    // Grow the run outward while each new outer letter steps over the run exactly.
    while from > 0 {
        let (outer, inner) = (ls[from - 1], ls[from]);
        let fits = ms.iter().all(|s| extent[&inner].checked_mul(&s[&inner]).as_ref() == Some(&s[&outer]));
        if !fits {
            break;
        }
        from -= 1;
    }
    from
}

/// The letters of a product `C = A·B` by class, each in the order its axis is laid out
/// (C's order for batch, m and n; A's for k), letters of extent 1 left out. A letter
/// of one matrix alone is not a product: `None`.
struct Classes {
    batch: Vec<u8>,
    m: Vec<u8>,
    n: Vec<u8>,
    k: Vec<u8>,
}

fn classes(a: &[u8], b: &[u8], c: &[u8], extent: &HashMap<u8, Dim>) -> Option<Classes> {
    let count = |l: &u8| [a, b, c].iter().filter(|x| x.contains(l)).count();
    if a.iter().chain(b).chain(c).any(|l| count(l) < 2) {
        return None;
    }
    let wide = |l: &&u8| extent[*l] != Dim::constant(1);
    let pick = |from: &[u8], f: &dyn Fn(&u8) -> bool| from.iter().filter(wide).filter(|l| f(l)).copied().collect();
    Some(Classes {
        batch: pick(c, &|l| a.contains(l) && b.contains(l)),
        m: pick(c, &|l| a.contains(l) && !b.contains(l)),
        n: pick(c, &|l| b.contains(l) && !a.contains(l)),
        k: pick(a, &|l| b.contains(l) && !c.contains(l)),
    })
}

/// Whether `a · b` sums over letters that form one axis of both (then it is a library
/// product; otherwise an operand must be copied first, or it stays generated code).
fn sum_merges(a: &Operand, b: &Operand, c_letters: &[u8], extent: &HashMap<u8, Dim>) -> bool {
    classes(&a.letters, &b.letters, c_letters, extent)
        .is_some_and(|cl| merged_from(&cl.k, extent, &[&strides_of(a), &strides_of(b)]) == 0)
}

/// An einsum's operand letters, output letters and each letter's extent.
type Letters = (Vec<Vec<u8>>, Vec<u8>, HashMap<u8, Dim>);

/// The einsum's [`Letters`], for a two-operand einsum that sums over at least one letter
/// of both operands, its operands of one float type (f32, bf16 or f16: the library
/// accumulates in f32) and its result f32.
fn einsum_letters(g: &Graph, n: NodeId) -> Option<Letters> {
    let Op::Einsum(spec) = &g.node(n).op else { return None };
    let operands = g.operands(n);
    let (ta, tb) = (g.ty(operands.first()?.to_owned()).dtype, g.ty(*operands.get(1)?).dtype);
    if spec.inputs.len() != 2 || ta != tb || !ta.is_float() || g.ty(n).dtype != DType::F32 {
        return None;
    }
    let mut extent = HashMap::new();
    for (letters, &x) in spec.inputs.iter().zip(&operands) {
        for (l, d) in letters.iter().zip(&g.ty(x).shape) {
            extent.insert(*l, d.clone());
        }
    }
    let cl = classes(&spec.inputs[0], &spec.inputs[1], &spec.output, &extent)?;
    (!cl.k.is_empty()).then(|| (spec.inputs.clone(), spec.output.clone(), extent))
}

/// Whether the scheduler makes einsum `n` a library GEMM: a product with a sum that
/// forms one axis when both operands are contiguous.
pub fn is_library_gemm(g: &Graph, n: NodeId) -> bool {
    let Some((inputs, output, extent)) = einsum_letters(g, n) else { return false };
    let operands = g.operands(n);
    let contiguous = |i: usize| {
        Layout::contiguous(0, &g.ty(operands[i]).shape)
            .ok()
            .map(|layout| Operand { layout, letters: inputs[i].clone() })
    };
    match (contiguous(0), contiguous(1)) {
        (Some(a), Some(b)) => sum_merges(&a, &b, &output, &extent),
        _ => false,
    }
}

/// The library kernel computing einsum `n` into global buffer `out` (contiguous), with
/// copy kernels first for operands that are not suitable strided views of memory.
pub fn einsum(
    sink: &mut Sink,
    reads: &HashMap<NodeId, usize>,
    n: NodeId,
    out: usize,
    name: &str,
) -> Result<(), String> {
    let g = sink.g;
    let (inputs, output, extent) = einsum_letters(g, n).ok_or("not a library GEMM")?;
    let operands = g.operands(n);
    let c = Operand { layout: Layout::contiguous(out, &g.ty(n).shape)?, letters: output };
    let mut ab = Vec::new();
    for (i, &x) in operands.iter().enumerate() {
        let view = layout(g, reads, x).map(|layout| Operand { layout, letters: inputs[i].clone() });
        ab.push(view);
    }
    // Operands that are not views, or (when the sum is not one axis of both views) not
    // contiguous, are copied into contiguous workspaces, which `is_library_gemm` showed
    // to be enough.
    let fits = matches!((&ab[0], &ab[1]), (Some(a), Some(b)) if sum_merges(a, b, &c.letters, &extent));
    for (i, &x) in operands.iter().enumerate() {
        let ty = g.ty(x).clone();
        let keep = ab[i].as_ref().is_some_and(|op| fits || op.layout.is_contiguous(&ty.shape));
        if !keep {
            let buffer = sink.workspace(&ty)?;
            sink.kernel(|lw| super::special::materialize(lw, Source::Node(x), &ty, buffer, format!("{name}_in{i}")))?;
            ab[i] = Some(Operand { layout: Layout::contiguous(buffer, &ty.shape)?, letters: inputs[i].clone() });
        }
    }
    let (Some(a), Some(b)) = (&ab[0], &ab[1]) else { return Err("an operand has no layout".into()) };
    let elem = super::element::elem_of(g.ty(operands[0]).dtype);
    library(sink, &[], (a, b, elem), &c, &extent, false, name)
}

/// The library kernel `C = A·B` (or `C += A·B` with `accumulate`) over the letters of
/// the three operands, A and B of element type `elem` (C is f32), launched in the sink's
/// entry point with launch arguments `args` (the views' polynomials may use them, as
/// sizes).
pub fn library(
    sink: &mut Sink,
    args: &[(&str, i64)],
    (a, b, elem): (&Operand, &Operand, Elem),
    c: &Operand,
    extent: &HashMap<u8, Dim>,
    accumulate: bool,
    name: &str,
) -> Result<(), String> {
    let cl = classes(&a.letters, &b.letters, &c.letters, extent).ok_or("not a matrix product")?;
    let (sa, sb, sc) = (strides_of(a), strides_of(b), strides_of(c));
    if merged_from(&cl.k, extent, &[&sa, &sb]) != 0 {
        return Err("the summed letters are not one axis of both operands".into());
    }
    let lw = sink.lowering_with(args);
    let e = |d: &Dim| lw.e.dim(d);
    let zero = Dim::constant(0);
    let mut batch: Vec<BatchAxis> = Vec::new();
    for x in &cl.batch {
        batch.push(BatchAxis { extent: e(&extent[x])?, a: e(&sa[x])?, b: e(&sb[x])?, c: e(&sc[x])? });
    }
    // One merged axis per class: (extent, stride in each matrix that has the class).
    let mut merge = |ls: &[u8], ms: [Option<&Strides>; 3]| -> Result<(Expr, [Expr; 3]), String> {
        let present: Vec<&Strides> = ms.iter().flatten().copied().collect();
        let from = merged_from(ls, extent, &present);
        let stride = |m: Option<&Strides>, x: Option<&u8>| e(x.and_then(|x| m.map(|m| &m[x])).unwrap_or(&zero));
        // Letters outside the merged run are loops around the product.
        for x in &ls[..from] {
            let s = |m| stride(m, Some(x));
            batch.push(BatchAxis { extent: e(&extent[x])?, a: s(ms[0])?, b: s(ms[1])?, c: s(ms[2])? });
        }
        let run = &ls[from..];
        let mut size = Dim::constant(1);
        for x in run {
            size = size.checked_mul(&extent[x]).ok_or("size overflow")?;
        }
        // The merged axis steps like its innermost letter.
        let s = |m| stride(m, run.last());
        Ok((e(&size)?, [s(ms[0])?, s(ms[1])?, s(ms[2])?]))
    };
    let (m, [am, _, cm]) = merge(&cl.m, [Some(&sa), None, Some(&sc)])?;
    let (n, [_, bn, cn]) = merge(&cl.n, [None, Some(&sb), Some(&sc)])?;
    let (k, [ak, bk, _]) = merge(&cl.k, [Some(&sa), Some(&sb), None])?;
    let matrix = |op: &Operand, rows: Expr, cols: Expr| -> Result<Matrix, String> {
        Ok(Matrix { offset: e(&op.layout.offset)?, rows, cols })
    };
    let gemm = Gemm {
        m: m.clone(),
        n,
        k,
        a: matrix(a, am, ak)?,
        b: matrix(b, bk, bn)?,
        c: matrix(c, cm, cn)?,
        batch,
        accumulate,
    };
    let mut range = m;
    for ax in &gemm.batch {
        range = super::emit::mul(ax.extent.clone(), range);
    }
    let sizes = lw.e.sizes_list();
    drop(lw);
    let n_sym = sizes.iter().take_while(|s| *s != "seed").count();
    let c_access = if accumulate { Access::ReadWrite } else { Access::Write };
    let decl = |name: &str, elem, access| BufferDecl { name: name.into(), elem, access };
    let kernel = Kernel {
        name: name.to_string(),
        buffers: vec![decl("a", elem, Access::Read), decl("b", elem, Access::Read), decl("c", Elem::F32, c_access)],
        sizes: sizes[..n_sym].to_vec(),
        scalars: sizes[n_sym..].to_vec(),
        index: Var(0),
        extent: range,
        body: Vec::new(),
        gemm: Some(gemm),
        threads: None,
    };
    let values = args.iter().map(|a| a.1).collect();
    sink.out.add_with_args(kernel, vec![a.layout.buffer, b.layout.buffer, c.layout.buffer], sink.entry, values);
    Ok(())
}
