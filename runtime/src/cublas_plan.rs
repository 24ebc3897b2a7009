//! How a library GEMM node becomes cuBLAS calls (`--gemm cublas` GPU bundles). Pure
//! arithmetic on a [`Shape`], so it is tested on every host, against [`run_on_host`] (cuBLAS's
//! semantics, which the emulated GPU also computes its library products with); the CUDA
//! device ([`crate::cuda`]) makes the calls.
//!
//! cuBLAS's `cublasGemmStridedBatchedEx` computes, for `p` in `0..batch`,
//!
//! ```text
//! C'[p] (m'×n', column-major, ldc) = op(A'[p]) · op(B'[p])   (+ C'[p] with β = 1)
//! ```
//!
//! where a column-major matrix has element (i, j) at `i + j·ld` and `op` is nothing or a
//! transpose. A node's matrix has element (row, col) at `offset + row·rows + col·cols`, so
//! it is column-major when `rows` is 1 (`ld = cols`) and a transposed column-major matrix
//! when `cols` is 1 (`ld = rows`). C cannot be transposed by `op`: when C is row-major the
//! call computes `Cᵀ = Bᵀ·Aᵀ` instead, with the node's B as cuBLAS's first operand.
//!
//! Batch axes of extent 1 are dropped, neighbours whose strides nest are merged, the
//! longest one is cuBLAS's batch and any others are a loop of calls. An axis of
//! extent 1 may have any stride, so the leading dimensions of degenerate matrices (one row
//! or one column) are chosen to satisfy cuBLAS (`ld ≥ max(1, rows)`).

use crate::gemm::{Shape, SLOT_A, SLOT_B};

/// cuBLAS's `op`: the stored matrix as it is, or transposed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    N,
    T,
}

/// One input operand of a call: which buffer slot of the node it reads (A's or B's), its
/// element offset, leading dimension, `op`, and stride between batch entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Operand {
    pub slot: usize,
    pub offset: i64,
    pub ld: i32,
    pub op: Op,
    pub stride: i64,
}

/// One `cublasGemmStridedBatchedEx` call; offsets and strides in elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Call {
    pub m: i32,
    pub n: i32,
    pub k: i32,
    pub a: Operand,
    pub b: Operand,
    pub c_offset: i64,
    pub ldc: i32,
    pub c_stride: i64,
    pub batch: i32,
    /// β = 1 (`C += A·B`) instead of β = 0.
    pub accumulate: bool,
}

/// A matrix of `r × c` elements with strides `(sr, sc)` as `op(M)` of a column-major `M`:
/// `(op, ld)`, or `None` when it has no unit stride (or its rows overlap, `ld` too small).
fn column_major(r: i64, c: i64, sr: i64, sc: i64) -> Option<(Op, i64)> {
    if sr == 1 || r == 1 {
        // Element (i, j) at i + j·sc: M is r × c itself.
        let ld = if c == 1 { r.max(1) } else { sc };
        if ld >= r.max(1) {
            return Some((Op::N, ld));
        }
    }
    if sc == 1 || c == 1 {
        // Element (i, j) at j + i·sr: M is c × r, the matrix transposed.
        let ld = if r == 1 { c.max(1) } else { sr };
        if ld >= c.max(1) {
            return Some((Op::T, ld));
        }
    }
    None
}

/// An `i64` that cuBLAS's 32-bit arguments must hold.
fn int(what: &str, v: i64) -> Result<i32, String> {
    i32::try_from(v).map_err(|_| format!("{what} = {v} does not fit cuBLAS's 32-bit arguments"))
}

/// The calls that compute `shape` (none when it computes nothing), or why cuBLAS cannot.
pub fn plan(shape: &Shape) -> Result<Vec<Call>, String> {
    let s = shape;
    if s.m == 0 || s.n == 0 || s.batch.iter().any(|b| b.0 == 0) {
        return Ok(Vec::new());
    }
    // The product as cuBLAS sees it: C' = X·Y with C' column-major (op N).
    let direct = column_major(s.m, s.n, s.c.rows, s.c.cols).filter(|c| c.0 == Op::N);
    let transposed = column_major(s.n, s.m, s.c.cols, s.c.rows).filter(|c| c.0 == Op::N);
    // (m', n', C's ld, X = (slot, rows, cols, row stride, col stride), Y likewise)
    let (m, n, ldc, x, y) = match (direct, transposed) {
        (Some((_, ldc)), _) => {
            (s.m, s.n, ldc, (SLOT_A, s.m, s.k, s.a.rows, s.a.cols), (SLOT_B, s.k, s.n, s.b.rows, s.b.cols))
        }
        (None, Some((_, ldc))) => {
            (s.n, s.m, ldc, (SLOT_B, s.n, s.k, s.b.cols, s.b.rows), (SLOT_A, s.k, s.m, s.a.cols, s.a.rows))
        }
        (None, None) => return Err(format!("matrix C has no unit stride ({} and {})", s.c.rows, s.c.cols)),
    };
    let operand = |(slot, r, c, sr, sc): (usize, i64, i64, i64, i64)| -> Result<(usize, Op, i32), String> {
        let name = if slot == SLOT_A { "A" } else { "B" };
        // With k = 0 nothing is read: any valid leading dimension will do.
        let (op, ld) = if s.k == 0 { Some((Op::N, r.max(1))) } else { column_major(r, c, sr, sc) }
            .ok_or_else(|| format!("matrix {name} has no unit stride ({sr} and {sc}) or overlapping rows"))?;
        Ok((slot, op, int(&format!("the leading dimension of {name}"), ld)?))
    };
    let (x, y) = (operand(x)?, operand(y)?);
    // Batch axes: drop extent 1, merge nested neighbours.
    let mut axes: Vec<(i64, i64, i64, i64)> = Vec::new();
    for &ax in s.batch.iter().filter(|b| b.0 != 1) {
        match axes.last_mut() {
            Some(outer)
                if [(outer.1, ax.1), (outer.2, ax.2), (outer.3, ax.3)]
                    .iter()
                    .all(|&(o, i)| Some(o) == i.checked_mul(ax.0)) =>
            {
                *outer = (outer.0 * ax.0, ax.1, ax.2, ax.3);
            }
            _ => axes.push(ax),
        }
    }
    // The longest axis is cuBLAS's batch (fewest calls); the others are loops.
    let longest = (0..axes.len()).max_by_key(|&i| axes[i].0);
    let (count, sa, sb, sc) = longest.map(|i| axes.remove(i)).unwrap_or((1, 0, 0, 0));
    let stride = |slot: usize| if slot == SLOT_A { sa } else { sb };
    let offset = |slot: usize| if slot == SLOT_A { s.a.offset } else { s.b.offset };
    let base = Call {
        m: int("m", m)?,
        n: int("n", n)?,
        k: int("k", s.k)?,
        a: Operand { slot: x.0, offset: offset(x.0), ld: x.2, op: x.1, stride: stride(x.0) },
        b: Operand { slot: y.0, offset: offset(y.0), ld: y.2, op: y.1, stride: stride(y.0) },
        c_offset: s.c.offset,
        ldc: int("the leading dimension of C", ldc)?,
        c_stride: sc,
        batch: int("the batch count", count)?,
        accumulate: s.accumulate,
    };
    // One call per index of the outer axes, each with its offsets.
    let outer: i64 = axes.iter().map(|a| a.0).product();
    let mut calls = Vec::with_capacity(usize::try_from(outer).unwrap_or(0));
    for flat in 0..outer {
        let (mut rest, mut call) = (flat, base);
        for &(extent, da, db, dc) in axes.iter().rev() {
            let i = rest % extent;
            rest /= extent;
            let d = |slot: usize| if slot == SLOT_A { da } else { db };
            call.a.offset += i * d(call.a.slot);
            call.b.offset += i * d(call.b.slot);
            call.c_offset += i * dc;
        }
        calls.push(call);
    }
    Ok(calls)
}

/// cuBLAS's argument rules for `call`: `ld ≥ max(1, rows)` of each stored matrix (the
/// library refuses a call that breaks them), and a batch count of at least one.
pub fn check(call: &Call) -> Result<(), String> {
    let stored = |o: &Operand, rows: i32, cols: i32| match o.op {
        Op::N => rows,
        Op::T => cols,
    };
    let ok = call.a.ld >= stored(&call.a, call.m, call.k).max(1)
        && call.b.ld >= stored(&call.b, call.k, call.n).max(1)
        && call.ldc >= call.m.max(1)
        && call.batch >= 1
        && call.m >= 0
        && call.n >= 0
        && call.k >= 0;
    if ok {
        Ok(())
    } else {
        Err(format!("cuBLAS would refuse {call:?}"))
    }
}

/// The calls run on host slices as cuBLAS defines them (each element's k terms summed in
/// order in f32): the emulated GPU computes `--gemm cublas` products with it, so CI runs
/// every plan a model makes; bounds are checked, an access outside a slice is an error.
pub fn run_on_host(calls: &[Call], a: &[f32], b: &[f32], c: &mut [f32]) -> Result<(), String> {
    let outside = || "a cuBLAS call reaches outside its buffers".to_string();
    for call in calls {
        check(call)?;
        let buf = |o: &Operand| if o.slot == SLOT_A { a } else { b };
        let at = |o: &Operand, p: i64, i: i64, j: i64| -> Option<f32> {
            let (r, c) = match o.op {
                Op::N => (i, j),
                Op::T => (j, i),
            };
            buf(o).get(usize::try_from(o.offset + p * o.stride + r + c * o.ld as i64).ok()?).copied()
        };
        for p in 0..call.batch as i64 {
            for i in 0..call.m as i64 {
                for j in 0..call.n as i64 {
                    let mut sum = 0.0f32;
                    for l in 0..call.k as i64 {
                        sum += at(&call.a, p, i, l).ok_or_else(outside)? * at(&call.b, p, l, j).ok_or_else(outside)?;
                    }
                    let index = usize::try_from(call.c_offset + p * call.c_stride + i + j * call.ldc as i64);
                    let e = index.ok().and_then(|x| c.get_mut(x)).ok_or_else(outside)?;
                    *e = if call.accumulate { *e + sum } else { sum };
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gemm::View;

    /// The node's meaning, straight from the `gemm` module's definition.
    fn node(s: &Shape, a: &[f32], b: &[f32], c: &mut [f32]) {
        let products: i64 = s.batch.iter().map(|x| x.0).product();
        for flat in 0..products {
            let (mut rest, mut o) = (flat, (0, 0, 0));
            for &(e, sa, sb, sc) in s.batch.iter().rev() {
                let i = rest % e;
                rest /= e;
                o = (o.0 + i * sa, o.1 + i * sb, o.2 + i * sc);
            }
            for i in 0..s.m {
                for j in 0..s.n {
                    let mut sum = 0.0f32;
                    for l in 0..s.k {
                        sum += a[(s.a.offset + o.0 + i * s.a.rows + l * s.a.cols) as usize]
                            * b[(s.b.offset + o.1 + l * s.b.rows + j * s.b.cols) as usize];
                    }
                    let e = &mut c[(s.c.offset + o.2 + i * s.c.rows + j * s.c.cols) as usize];
                    *e = if s.accumulate { *e + sum } else { sum };
                }
            }
        }
    }

    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // Small integers: every sum is exact, so the orders of the sums agree.
                ((x >> 40) % 7) as f32 - 3.0
            })
            .collect()
    }

    fn view(offset: i64, rows: i64, cols: i64) -> View {
        View { offset, rows, cols }
    }

    /// The plan's calls, run by the model of cuBLAS, give the node's result exactly
    /// (elements of C the node does not write stay as they were).
    fn agrees(s: Shape) {
        let len = 4096;
        let (a, b) = (values(len, 1), values(len, 2));
        let c0 = values(len, 3);
        s.check([len, len, len]).expect("a valid shape");
        let calls = plan(&s).unwrap_or_else(|e| panic!("{e} for {s:?}"));
        let (mut want, mut got) = (c0.clone(), c0);
        node(&s, &a, &b, &mut want);
        run_on_host(&calls, &a, &b, &mut got).unwrap();
        assert_eq!(got, want, "{s:?} as {calls:?}");
    }

    fn shape(m: i64, n: i64, k: i64, a: View, b: View, c: View) -> Shape {
        Shape { batch: Vec::new(), m, n, k, a, b, c, accumulate: false }
    }

    #[test]
    fn row_major_products_in_every_orientation() {
        let (m, n, k) = (5, 7, 3);
        // x·W, x·Wᵀ, xᵀ·dy (a weight gradient), and column-major C.
        agrees(shape(m, n, k, view(0, k, 1), view(0, n, 1), view(0, n, 1)));
        agrees(shape(m, n, k, view(2, k, 1), view(1, 1, k), view(3, n, 1)));
        agrees(shape(m, n, k, view(0, 1, m), view(0, n, 1), view(0, n, 1)));
        agrees(shape(m, n, k, view(0, 1, m), view(0, 1, k), view(0, 1, m)));
        agrees(shape(m, n, k, view(0, k, 1), view(0, n, 1), view(5, 1, m + 2)));
        // Row-major with padded rows (a slice of a wider matrix).
        agrees(shape(m, n, k, view(1, k + 4, 1), view(0, n + 1, 1), view(0, n + 3, 1)));
    }

    #[test]
    fn accumulating_products_add_to_c() {
        let mut s = shape(4, 6, 5, view(0, 5, 1), view(0, 1, 5), view(0, 6, 1));
        s.accumulate = true;
        agrees(s.clone());
        let calls = plan(&s).unwrap();
        assert!(calls.iter().all(|c| c.accumulate));
    }

    #[test]
    fn degenerate_matrices_get_leading_dimensions_cublas_accepts() {
        // One row, one column, depth one and zero, strides of unused axes arbitrary.
        agrees(shape(1, 9, 4, view(0, 0, 1), view(0, 9, 1), view(0, 0, 1)));
        agrees(shape(6, 1, 4, view(0, 4, 1), view(0, 1, 0), view(0, 1, 0)));
        agrees(shape(6, 5, 1, view(0, 1, 0), view(0, 0, 1), view(0, 5, 1)));
        agrees(shape(1, 1, 7, view(3, 0, 1), view(0, 1, 0), view(9, 0, 0)));
        // k = 0: C = 0 (or unchanged when accumulating), A and B read nothing.
        agrees(shape(3, 4, 0, view(0, 0, 0), view(0, 0, 0), view(0, 4, 1)));
    }

    #[test]
    fn batch_axes_merge_when_they_nest_and_loop_when_they_do_not() {
        // Heads of attention: (batch 2, heads 3) over row-major 4 × 5 · 5 × 6 blocks laid
        // out contiguously: the two axes nest in all three matrices and become one call.
        let (m, n, k) = (4, 5, 6);
        let mut s = shape(m, n, k, view(0, k, 1), view(0, n, 1), view(0, n, 1));
        s.batch = vec![(2, 3 * m * k, 3 * k * n, 3 * m * n), (3, m * k, k * n, m * n)];
        agrees(s.clone());
        assert_eq!(plan(&s).unwrap().len(), 1);
        assert_eq!(plan(&s).unwrap()[0].batch, 6);
        // A weight shared by every batch entry (stride 0 in B) nests too.
        s.batch = vec![(2, 3 * m * k, 0, 3 * m * n), (3, m * k, 0, m * n)];
        agrees(s.clone());
        assert_eq!(plan(&s).unwrap().len(), 1);
        // Heads interleaved in the rows (head stride k, rows 3k apart, batch entries m rows
        // apart): the axes do not nest, and the outer one is a loop of 2 calls.
        let d = 3 * k;
        let mut s = shape(m, n, k, view(0, d, 1), view(0, n, 1), view(0, 3 * n, 1));
        s.batch = vec![(2, m * d, 0, m * 3 * n), (3, k, 0, n)];
        agrees(s.clone());
        let calls = plan(&s).unwrap();
        assert_eq!((calls.len(), calls[0].batch), (2, 3));
        // The longer axis is cuBLAS's batch wherever it is: 2 calls of 5, not 5 calls of 2.
        s.batch = vec![(5, m * d, 0, m * 3 * n), (2, k, 0, n)];
        agrees(s.clone());
        let calls = plan(&s).unwrap();
        assert_eq!((calls.len(), calls[0].batch), (2, 5));
        // An axis of extent 1 changes nothing; an empty one means no call at all.
        s.batch.insert(1, (1, 12345, 678, 9));
        agrees(s.clone());
        s.batch.push((0, 1, 1, 1));
        assert!(plan(&s).unwrap().is_empty());
    }

    #[test]
    fn matrices_without_a_unit_stride_are_refused() {
        let e = plan(&shape(3, 4, 5, view(0, 10, 2), view(0, 4, 1), view(0, 4, 1))).unwrap_err();
        assert!(e.contains("matrix A has no unit stride"), "{e}");
        let e = plan(&shape(3, 4, 5, view(0, 5, 1), view(0, 4, 1), view(0, 8, 2))).unwrap_err();
        assert!(e.contains("matrix C has no unit stride"), "{e}");
        // Rows closer together than a row is long overlap: not a cuBLAS matrix.
        let e = plan(&shape(3, 4, 5, view(0, 2, 1), view(0, 4, 1), view(0, 4, 1))).unwrap_err();
        assert!(e.contains("matrix A"), "{e}");
    }

    #[test]
    fn sizes_past_32_bits_are_refused() {
        let big = 1i64 << 31;
        let e = plan(&shape(2, big, 2, view(0, 2, 1), view(0, big, 1), view(0, big, 1))).unwrap_err();
        assert!(e.contains("does not fit cuBLAS's 32-bit arguments"), "{e}");
    }
}
