//! Library GEMM nodes (kernels with `library: true` and a [`GemmEntry`]):
//! the only arithmetic the runtime does itself. The compiler hands dense projections and
//! their gradients to the `gemm` crate because it is an order of magnitude faster than
//! generated loop nests on CPUs (AVX-512 with the crate's `x86-v4` feature).
//!
//! A node computes `C = A · B` for every index of its batch axes, on strided views of its
//! three buffers (slots 0, 1, 2). Its parallel range is `batch × m`: iteration `i` is row
//! `i mod m` of product `i / m`, so a thread's part of the range is a set of row blocks,
//! each one call of the library on a single thread. The split depends only on the thread
//! count and the library never splits over k, so results are bitwise reproducible.

use crate::manifest::{GemmEntry, Poly, PolyError};
use std::collections::HashMap;

/// The buffer slots of a library GEMM kernel.
pub const SLOT_A: usize = 0;
pub const SLOT_B: usize = 1;
pub const SLOT_C: usize = 2;

/// A matrix view with evaluated strides, in elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct View {
    pub offset: i64,
    pub rows: i64,
    pub cols: i64,
}

/// A GEMM node with every size evaluated for one launch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shape {
    /// (extent, stride in A, stride in B, stride in C), outermost first.
    pub batch: Vec<(i64, i64, i64, i64)>,
    pub m: i64,
    pub n: i64,
    pub k: i64,
    pub a: View,
    pub b: View,
    pub c: View,
    /// `C += A·B` instead of `C = A·B`.
    pub accumulate: bool,
}

/// One call of the library: rows `rows` of the product whose matrices start at the
/// element offsets `a`, `b`, `c` (batch offsets included).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Block {
    pub a: i64,
    pub b: i64,
    pub c: i64,
    pub rows: (i64, i64),
}

impl Shape {
    pub fn eval(e: &GemmEntry, env: &HashMap<&str, i64>) -> Result<Shape, PolyError> {
        let v = |p: &Poly| p.eval(env);
        let view = |m: &crate::manifest::MatrixEntry| -> Result<View, PolyError> {
            Ok(View { offset: v(&m.offset)?, rows: v(&m.rows)?, cols: v(&m.cols)? })
        };
        Ok(Shape {
            batch: e
                .batch
                .iter()
                .map(|x| Ok((v(&x.extent)?, v(&x.a)?, v(&x.b)?, v(&x.c)?)))
                .collect::<Result<_, PolyError>>()?,
            m: v(&e.m)?,
            n: v(&e.n)?,
            k: v(&e.k)?,
            a: view(&e.a)?,
            b: view(&e.b)?,
            c: view(&e.c)?,
            accumulate: e.accumulate,
        })
    }

    /// The node's parallel extent, `batch × m` (`None` on overflow).
    pub fn extent(&self) -> Option<i64> {
        self.batch.iter().try_fold(self.m, |acc, b| acc.checked_mul(b.0))
    }

    /// The node's arithmetic, `2 · batch · m · n · k` (a multiply and an add per term).
    pub fn flops(&self) -> f64 {
        2.0 * self.extent().unwrap_or(0) as f64 * self.n as f64 * self.k as f64
    }

    /// Checks that every element the node touches lies inside buffers of `lens` elements
    /// (A, B, C), that nothing is negative, and that no two elements of C coincide (threads
    /// write disjoint rows), so a corrupt manifest is an error, never an access out of
    /// bounds or a data race.
    pub fn check(&self, lens: [usize; 3]) -> Result<(), String> {
        let sizes = [self.m, self.n, self.k];
        if sizes.iter().chain(self.batch.iter().map(|b| &b.0)).any(|&s| s < 0) {
            return Err(format!("negative GEMM size in {self:?}"));
        }
        let extent = self.extent().ok_or_else(|| format!("GEMM extent overflows in {self:?}"))?;
        if extent == 0 || self.n == 0 {
            return Ok(());
        }
        // C's axes (batch, rows, columns), those longer than 1, by stride: each must step
        // past every offset the smaller ones reach, or two indices share an element.
        let mut axes: Vec<(i64, i64)> = self.batch.iter().map(|b| (b.3, b.0)).collect();
        axes.extend([(self.c.rows, self.m), (self.c.cols, self.n)]);
        axes.retain(|&(_, e)| e > 1);
        axes.sort();
        let mut reach = 0i64;
        for (stride, extent) in axes {
            reach = match (stride > reach).then(|| stride.checked_mul(extent - 1)).flatten() {
                Some(span) => reach.checked_add(span).ok_or("GEMM matrix C overflows")?,
                None => return Err(format!("GEMM matrix C writes some elements twice in {self:?}")),
            };
        }
        type Stride = dyn Fn(&(i64, i64, i64, i64)) -> i64;
        let last = |view: View, rows: i64, cols: i64, batch: &Stride| -> Option<i64> {
            let mut end = view.offset;
            for ax in &self.batch {
                end = end.checked_add((ax.0 - 1).checked_mul(batch(ax))?)?;
            }
            if rows > 0 {
                end = end.checked_add((rows - 1).checked_mul(view.rows)?)?;
            }
            if cols > 0 {
                end = end.checked_add((cols - 1).checked_mul(view.cols)?)?;
            }
            Some(end)
        };
        let strides = [self.a, self.b, self.c]
            .iter()
            .flat_map(|v| [v.offset, v.rows, v.cols])
            .chain(self.batch.iter().flat_map(|b| [b.1, b.2, b.3]))
            .collect::<Vec<_>>();
        if strides.iter().any(|&s| s < 0) {
            return Err(format!("negative GEMM stride or offset in {self:?}"));
        }
        let ends = [
            ("A", last(self.a, self.m, self.k, &|b| b.1), lens[0]),
            ("B", last(self.b, self.k, self.n, &|b| b.2), lens[1]),
            ("C", last(self.c, self.m, self.n, &|b| b.3), lens[2]),
        ];
        for (name, end, len) in ends {
            let reads_nothing = self.k == 0 && name != "C";
            match end {
                _ if reads_nothing => {}
                Some(e) if (e as u128) < len as u128 => {}
                _ => return Err(format!("GEMM matrix {name} reaches past its buffer of {len} elements")),
            }
        }
        Ok(())
    }

    /// The library calls that compute iterations `begin..end` of the parallel range.
    pub fn blocks(&self, begin: i64, end: i64) -> Vec<Block> {
        let mut out = Vec::new();
        if self.m <= 0 {
            return out;
        }
        let mut i = begin.max(0);
        let end = end.min(self.extent().unwrap_or(0));
        while i < end {
            let (product, row) = (i / self.m, i % self.m);
            let stop = (end - product * self.m).min(self.m);
            let (a, b, c) = self.batch_offsets(product);
            out.push(Block { a: self.a.offset + a, b: self.b.offset + b, c: self.c.offset + c, rows: (row, stop) });
            i = product * self.m + stop;
        }
        out
    }

    /// Element offsets in A, B and C of product number `flat` (a flat batch index).
    fn batch_offsets(&self, mut flat: i64) -> (i64, i64, i64) {
        let (mut a, mut b, mut c) = (0, 0, 0);
        for &(extent, sa, sb, sc) in self.batch.iter().rev() {
            let i = flat % extent.max(1);
            flat /= extent.max(1);
            a += i * sa;
            b += i * sb;
            c += i * sc;
        }
        (a, b, c)
    }
}

/// Thread `t` of `threads`' part of the node: a contiguous range of its parallel range
/// (`batch × m` rows of C, as for a kernel), except for a single product wider than it is
/// tall, which is split by columns of C (in multiples of 32, AMX's block), so that each
/// thread packs only its part of B (a weight gradient's B is the whole `T × n`). Either
/// way each element of C is one thread's, summed over the whole of k: results do not
/// depend on the split.
///
/// # Safety
/// As for [`run`], for all threads together.
pub unsafe fn run_part(
    shape: &Shape,
    operands: Operands,
    a: *const u8,
    b: *const u8,
    c: *mut f32,
    (t, threads): (usize, usize),
) {
    let split_columns = shape.batch.is_empty() && shape.n > shape.m && threads > 1;
    if !split_columns {
        let (begin, end) = crate::split::chunk(shape.extent().unwrap_or(0), t, threads);
        // SAFETY: as documented; the row ranges are disjoint.
        return unsafe { run(shape, operands, a, b, c, begin, end) };
    }
    let blocks = (shape.n + 31) / 32;
    let (first, last) = crate::split::chunk(blocks, t, threads);
    let (j0, j1) = (first * 32, (last * 32).min(shape.n));
    if j0 >= j1 {
        return;
    }
    let columns = Shape {
        n: j1 - j0,
        b: View { offset: shape.b.offset + j0 * shape.b.cols, ..shape.b },
        c: View { offset: shape.c.offset + j0 * shape.c.cols, ..shape.c },
        ..shape.clone()
    };
    // SAFETY: the columns j0..j1 of B and C are inside the views checked for 0..n.
    unsafe { run(&columns, operands, a, b, c, 0, shape.m) }
}

/// The element type of A and B (C is always f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operands {
    F32,
    /// 16-bit floats, widened exactly to f32 (a product of two bf16 or two f16 values is
    /// exact in f32, so only the order of the sums differs from a 16-bit dot product).
    BF16,
    F16,
}

impl Operands {
    pub fn bytes(self) -> usize {
        match self {
            Operands::F32 => 4,
            Operands::BF16 | Operands::F16 => 2,
        }
    }
}

/// Iterations `begin..end` of the node, on the calling thread: f32 operands with the
/// `gemm` crate in place; 16-bit operands widened to f32 block by block first.
///
/// # Safety
/// `a`, `b`, `c` point to buffers that [`Shape::check`] accepted (in elements of
/// `operands` for A and B, f32 for C), and no other thread writes the rows of C this
/// range covers.
pub unsafe fn run(shape: &Shape, operands: Operands, a: *const u8, b: *const u8, c: *mut f32, begin: i64, end: i64) {
    let native = if operands == Operands::BF16 { crate::bf16_gemm::Kernel::detect() } else { None };
    // SAFETY (each arm): as for this function.
    match (operands, native) {
        (Operands::F32, _) => unsafe { run_f32(shape, a as *const f32, b as *const f32, c, begin, end) },
        #[cfg(target_arch = "x86_64")]
        (_, Some(kernel)) => unsafe { run_bf16(kernel, shape, a as *const u16, b as *const u16, c, begin, end) },
        _ => unsafe { run_widened(shape, operands, a, b, c, begin, end) },
    }
}

/// [`run`] for bf16 operands on `kernel` (`bf16_gemm.rs`), block by block.
///
/// # Safety
/// As for [`run`].
#[cfg(target_arch = "x86_64")]
unsafe fn run_bf16(
    kernel: crate::bf16_gemm::Kernel,
    shape: &Shape,
    a: *const u16,
    b: *const u16,
    c: *mut f32,
    begin: i64,
    end: i64,
) {
    use crate::bf16_gemm::View as V;
    for blk in shape.blocks(begin, end) {
        let rows = (blk.rows.1 - blk.rows.0) as usize;
        // SAFETY: the offsets and strides were checked against the buffers.
        unsafe {
            let a0 = a.offset((blk.a + blk.rows.0 * shape.a.rows) as isize);
            let c0 = c.offset((blk.c + blk.rows.0 * shape.c.rows) as isize);
            crate::bf16_gemm::gemm(
                kernel,
                (rows, shape.n as usize, shape.k as usize),
                V { ptr: a0, rows: shape.a.rows as isize, cols: shape.a.cols as isize },
                V { ptr: b.offset(blk.b as isize), rows: shape.b.rows as isize, cols: shape.b.cols as isize },
                V { ptr: c0 as *const f32, rows: shape.c.rows as isize, cols: shape.c.cols as isize },
                shape.accumulate,
            );
        }
    }
}

thread_local! {
    /// Widened A and B of the current block (reused between calls on a thread).
    static WIDE: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// A 16-bit matrix view (from element `offset`, `rows × cols` with these strides) widened
/// to f32 into `out`, returning the view of the copy: dense, row-major or column-major
/// as the view is (each row or column one contiguous run), else the memory the view spans
/// widened as it lies where that is at most twice the values, else gathered element by
/// element into a dense row-major copy.
///
/// # Safety
/// `p` points to a buffer that holds every element of the view.
unsafe fn widen_view(
    operands: Operands,
    p: *const u8,
    (offset, rows, cols): (i64, i64, i64),
    v: View,
    out: &mut Vec<f32>,
) -> View {
    let (len, span) = (rows * cols, (rows - 1) * v.rows + (cols - 1) * v.cols + 1);
    out.clear();
    if len == 0 {
        return View { offset: 0, rows: cols, cols: 1 };
    }
    let p = p as *const u16;
    // SAFETY: `len` values from `at` are elements of the view.
    let run = |at: i64, len: i64| unsafe { std::slice::from_raw_parts(p.offset(at as isize), len as usize) };
    let widen_run = |src: &[u16], out: &mut Vec<f32>| match operands {
        Operands::BF16 => widen_bf16(src, out),
        _ => out.extend(src.iter().map(|&x| half::f16::from_bits(x).to_f32())),
    };
    out.reserve(len as usize);
    if v.cols == 1 || v.rows == 1 {
        let (lines, along, step) = if v.cols == 1 { (rows, cols, v.rows) } else { (cols, rows, v.cols) };
        for l in 0..lines {
            widen_run(run(offset + l * step, along), out);
        }
        return if v.cols == 1 {
            View { offset: 0, rows: cols, cols: 1 }
        } else {
            View { offset: 0, rows: 1, cols: rows }
        };
    }
    if span <= 2 * len {
        widen_run(run(offset, span), out);
        return View { offset: 0, ..v };
    }
    for r in 0..rows {
        for j in 0..cols {
            // SAFETY: an element of the view.
            out.push(unsafe { widen(operands, p as *const u8, (offset + r * v.rows + j * v.cols) as isize) });
        }
    }
    View { offset: 0, rows: cols, cols: 1 }
}

/// bf16 values (bits) appended to `out` as f32: with AVX-512 16 at a time (the runtime is
/// built for baseline x86-64, so the loop is compiled twice), else one at a time.
fn widen_bf16(src: &[u16], out: &mut Vec<f32>) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        out.reserve(src.len());
        let start = out.len();
        // SAFETY: AVX-512 F is present; the spare capacity holds `src.len()` values, all
        // of which are written before the length is set.
        unsafe {
            widen_bf16_avx512(src, out.as_mut_ptr().add(start));
            out.set_len(start + src.len());
        }
        return;
    }
    out.extend(src.iter().map(|&x| f32::from_bits((x as u32) << 16)));
}

/// # Safety
/// AVX-512 F is present and `dst` has room for `src.len()` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn widen_bf16_avx512(src: &[u16], dst: *mut f32) {
    use std::arch::x86_64::*;
    let whole = src.len() / 16 * 16;
    // SAFETY: each 16 values read lie in `src`, each 16 written in `dst`'s room.
    unsafe {
        for i in (0..whole).step_by(16) {
            let x = _mm256_loadu_si256(src.as_ptr().add(i) as *const __m256i);
            let wide = _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(x));
            _mm512_storeu_si512(dst.add(i) as *mut __m512i, wide);
        }
        for (i, &x) in src.iter().enumerate().skip(whole) {
            *dst.add(i) = f32::from_bits((x as u32) << 16);
        }
    }
}

/// The f32 value of element `i` of a 16-bit buffer.
///
/// # Safety
/// `p` points to at least `i + 1` elements.
unsafe fn widen(operands: Operands, p: *const u8, i: isize) -> f32 {
    // SAFETY: as documented.
    let bits = unsafe { (p as *const u16).offset(i).read_unaligned() };
    match operands {
        Operands::BF16 => f32::from_bits((bits as u32) << 16),
        _ => half::f16::from_bits(bits).to_f32(),
    }
}

/// [`run`] for 16-bit operands without a native kernel: each block's rows of A and its
/// product's B widened to f32 ([`widen_view`]; B once for consecutive blocks of the same
/// product), then the f32 product. Exact products, so only the order of the sums differs
/// from a native bf16 kernel.
///
/// # Safety
/// As for [`run`].
unsafe fn run_widened(
    shape: &Shape,
    operands: Operands,
    a: *const u8,
    b: *const u8,
    c: *mut f32,
    begin: i64,
    end: i64,
) {
    WIDE.with(|wide| {
        let (wa, wb) = &mut *wide.borrow_mut();
        let mut b_of: Option<(i64, View)> = None;
        for blk in shape.blocks(begin, end) {
            let rows = blk.rows.1 - blk.rows.0;
            if rows == 0 || shape.n == 0 {
                continue;
            }
            let b_view = match b_of {
                Some((at, view)) if at == blk.b => view,
                _ => {
                    // SAFETY: the view was checked against B's buffer.
                    let view = unsafe { widen_view(operands, b, (blk.b, shape.k, shape.n), shape.b, wb) };
                    b_of = Some((blk.b, view));
                    view
                }
            };
            let a_first = blk.a + blk.rows.0 * shape.a.rows;
            // SAFETY: the view was checked against A's buffer.
            let a_view = unsafe { widen_view(operands, a, (a_first, rows, shape.k), shape.a, wa) };
            // The block as an f32 product of the widened copies (rows from 0).
            let widened = Shape {
                batch: Vec::new(),
                m: rows,
                a: a_view,
                b: b_view,
                c: View { offset: blk.c + blk.rows.0 * shape.c.rows, ..shape.c },
                ..shape.clone()
            };
            // SAFETY: the copies hold every element their views reach; C's view is the
            // block's rows.
            unsafe { run_f32(&widened, wa.as_ptr(), wb.as_ptr(), c, 0, rows) };
        }
    });
}

/// Iterations `begin..end` of an f32 node with the `gemm` crate, on the calling thread.
///
/// # Safety
/// As for [`run`].
unsafe fn run_f32(shape: &Shape, a: *const f32, b: *const f32, c: *mut f32, begin: i64, end: i64) {
    for blk in shape.blocks(begin, end) {
        let rows = (blk.rows.1 - blk.rows.0) as usize;
        if rows == 0 || shape.n == 0 {
            continue;
        }
        // SAFETY: offsets and strides were checked against the buffers' lengths.
        unsafe {
            let c0 = c.offset((blk.c + blk.rows.0 * shape.c.rows) as isize);
            if shape.k == 0 {
                if shape.accumulate {
                    continue;
                }
                for r in 0..rows as isize {
                    for j in 0..shape.n as isize {
                        *c0.offset(r * shape.c.rows as isize + j * shape.c.cols as isize) = 0.0;
                    }
                }
                continue;
            }
            let a0 = a.offset((blk.a + blk.rows.0 * shape.a.rows) as isize);
            let b0 = b.offset(blk.b as isize);
            // The crate's argument order: sizes, then each matrix as (pointer, column
            // stride, row stride); `dst = alpha·dst + beta·lhs·rhs`, dst read only to
            // accumulate.
            gemm::gemm(
                rows,
                shape.n as usize,
                shape.k as usize,
                c0,
                shape.c.cols as isize,
                shape.c.rows as isize,
                shape.accumulate,
                a0,
                shape.a.cols as isize,
                shape.a.rows as isize,
                b0,
                shape.b.cols as isize,
                shape.b.rows as isize,
                1.0f32,
                1.0f32,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(s: &Shape, a: &[f32], b: &[f32], c: &mut [f32]) {
        for blk in s.blocks(0, s.extent().unwrap()) {
            for r in blk.rows.0..blk.rows.1 {
                for j in 0..s.n {
                    let mut acc = 0.0f64;
                    for k in 0..s.k {
                        let x = a[(blk.a + r * s.a.rows + k * s.a.cols) as usize];
                        let y = b[(blk.b + k * s.b.rows + j * s.b.cols) as usize];
                        acc += x as f64 * y as f64;
                    }
                    c[(blk.c + r * s.c.rows + j * s.c.cols) as usize] = acc as f32;
                }
            }
        }
    }

    /// A batched product with a transposed A and a broadcast B (batch stride 0), split
    /// over three "threads" at ranges that cut through products and rows, against a
    /// naive loop in f64.
    #[test]
    fn split_ranges_match_a_naive_product() {
        let (batch, m, n, k) = (3i64, 5i64, 7i64, 4i64);
        let s = Shape {
            batch: vec![(batch, m * k, 0, m * n)],
            m,
            n,
            k,
            a: View { offset: 0, rows: 1, cols: m },
            b: View { offset: 2, rows: n, cols: 1 },
            c: View { offset: 0, rows: n, cols: 1 },
            accumulate: false,
        };
        let a: Vec<f32> = (0..batch * m * k).map(|i| ((i * 37 % 11) as f32 - 5.0) / 3.0).collect();
        let b: Vec<f32> = (0..k * n + 2).map(|i| ((i * 13 % 7) as f32 - 3.0) / 2.0).collect();
        s.check([a.len(), b.len(), (batch * m * n) as usize]).unwrap();
        let mut want = vec![0.0; (batch * m * n) as usize];
        naive(&s, &a, &b, &mut want);
        let mut got = vec![f32::NAN; want.len()];
        for (begin, end) in [(0, 4), (4, 11), (11, s.extent().unwrap())] {
            unsafe { run(&s, Operands::F32, a.as_ptr().cast(), b.as_ptr().cast(), got.as_mut_ptr(), begin, end) };
        }
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{g} vs {w}");
        }
    }

    /// One product (no batch) of sizes (m, n, k), views (offset, rows, cols) of A, B, C.
    fn product((m, n, k): (i64, i64, i64), views: [(i64, i64, i64); 3]) -> Shape {
        let [a, b, c] = views.map(|(offset, rows, cols)| View { offset, rows, cols });
        Shape { batch: vec![], m, n, k, a, b, c, accumulate: false }
    }

    /// 16-bit operands (bf16 and f16, a transposed A and a strided B) widened to f32: the
    /// same product as the f32 node on the widened values, over split ranges. A is
    /// column-major (widened column by column); B's views: every other element (widened
    /// where it lies, the span twice the values), the first n columns of rows 5n long (row
    /// by row), and every other one of those (too sparse for either: gathered).
    #[test]
    fn sixteen_bit_operands_match_the_widened_product() {
        let (batch, m, n, k) = (2i64, 5i64, 7i64, 9i64);
        let b_views = [
            View { offset: 1, rows: 2 * n, cols: 2 },
            View { offset: 3, rows: 5 * n, cols: 1 },
            View { offset: 0, rows: 5 * n, cols: 2 },
        ];
        for (b_view, operands) in b_views.iter().flat_map(|&v| [(v, Operands::BF16), (v, Operands::F16)]) {
            let s = Shape {
                batch: vec![(batch, m * k, 0, m * n)],
                m,
                n,
                k,
                a: View { offset: 0, rows: 1, cols: m },
                b: b_view,
                c: View { offset: 0, rows: n, cols: 1 },
                accumulate: false,
            };
            let a: Vec<f32> = (0..batch * m * k).map(|i| ((i * 37 % 11) as f32 - 5.0) / 3.0).collect();
            let b: Vec<f32> = (0..5 * k * n + 3).map(|i| ((i * 13 % 7) as f32 - 3.0) / 2.0).collect();
            let narrow = |v: &[f32]| -> Vec<u16> {
                v.iter()
                    .map(|&x| match operands {
                        Operands::BF16 => half::bf16::from_f32(x).to_bits(),
                        _ => half::f16::from_f32(x).to_bits(),
                    })
                    .collect()
            };
            let (a16, b16) = (narrow(&a), narrow(&b));
            let wide = |v: &[u16]| -> Vec<f32> {
                v.iter()
                    .map(|&x| match operands {
                        Operands::BF16 => half::bf16::from_bits(x).to_f32(),
                        _ => half::f16::from_bits(x).to_f32(),
                    })
                    .collect()
            };
            let mut want = vec![0.0; (batch * m * n) as usize];
            naive(&s, &wide(&a16), &wide(&b16), &mut want);
            let mut got = vec![f32::NAN; want.len()];
            for (begin, end) in [(0, 3), (3, s.extent().unwrap())] {
                let (a, b) = (a16.as_ptr().cast(), b16.as_ptr().cast());
                unsafe { run_widened(&s, operands, a, b, got.as_mut_ptr(), begin, end) };
            }
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{operands:?} {b_view:?}: {g} vs {w}");
            }
        }
    }

    /// A product wider than tall is split by columns (blocks of 32) and a tall one by rows:
    /// either way every thread count gives C bit for bit as one thread does, f32 and bf16.
    #[test]
    fn parts_of_any_thread_count_give_the_same_product() {
        for (m, n, k) in [(5i64, 100i64, 37i64), (70, 9, 33), (64, 700, 2048)] {
            let s = product((m, n, k), [(0, k, 1), (0, n, 1), (0, n, 1)]);
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 29 % 13) as f32 - 6.0) / 5.0).collect();
            let b: Vec<f32> = (0..k * n).map(|i| ((i * 17 % 11) as f32 - 5.0) / 3.0).collect();
            let (a16, b16): (Vec<u16>, Vec<u16>) = (
                a.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect(),
                b.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect(),
            );
            for (operands, pa, pb) in [
                (Operands::F32, a.as_ptr().cast(), b.as_ptr().cast()),
                (Operands::BF16, a16.as_ptr().cast(), b16.as_ptr().cast()),
            ] {
                let run_with = |threads: usize| {
                    let mut c = vec![f32::NAN; (m * n) as usize];
                    for t in 0..threads {
                        unsafe { run_part(&s, operands, pa, pb, c.as_mut_ptr(), (t, threads)) };
                    }
                    c
                };
                let one = run_with(1);
                assert!(one.iter().all(|x| x.is_finite()), "{operands:?}: every element written");
                for threads in [2, 3, 5] {
                    let got = run_with(threads);
                    assert!(
                        got.iter().zip(&one).all(|(g, w)| g.to_bits() == w.to_bits()),
                        "{operands:?} {threads} threads"
                    );
                }
            }
        }
    }

    #[test]
    fn out_of_bounds_views_are_errors() {
        let s = product((2, 2, 2), [(0, 2, 1), (1, 2, 1), (0, 2, 1)]);
        assert!(s.check([4, 5, 4]).is_ok());
        let err = s.check([4, 4, 4]).unwrap_err();
        assert!(err.contains("matrix B"), "{err}");
    }

    #[test]
    fn a_c_that_writes_an_element_twice_is_an_error() {
        // Rows one element apart with two columns: rows overlap, threads would race.
        let s = product((3, 2, 2), [(0, 2, 1), (0, 2, 1), (0, 1, 1)]);
        let err = s.check([6, 4, 16]).unwrap_err();
        assert!(err.contains("twice"), "{err}");
        // A batch axis of stride 0 in C, likewise.
        let mut t = product((2, 2, 2), [(0, 2, 1), (0, 2, 1), (0, 2, 1)]);
        t.batch = vec![(3, 4, 0, 0)];
        assert!(t.check([16, 4, 4]).unwrap_err().contains("twice"));
        // Huge batch extents overflow: an error, not a panic.
        t.batch = vec![(i64::MAX, 0, 0, 4)];
        assert!(t.check([16, 4, 4]).unwrap_err().contains("overflows"));
    }

    #[test]
    fn an_empty_sum_writes_zeros() {
        let s = product((2, 3, 0), [(0, 0, 1), (0, 3, 1), (0, 3, 1)]);
        s.check([0, 0, 6]).unwrap();
        let mut c = vec![f32::NAN; 6];
        unsafe { run(&s, Operands::F32, [].as_ptr(), [].as_ptr(), c.as_mut_ptr(), 0, 2) };
        assert_eq!(c, vec![0.0; 6]);
    }
}
