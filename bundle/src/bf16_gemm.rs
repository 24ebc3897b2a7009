//! bf16 matrix products with f32 accumulation: the library GEMM nodes whose operands
//! the precision pass narrowed to bf16, on CPUs that multiply bf16 natively — Intel AMX
//! (`amx-bf16`, [`amx`]) or else AVX512-BF16 (`vdpbf16ps`, [`avx512`]). Without either
//! the operands are widened to f32 (`gemm.rs`), with the same products and sums in
//! another order. `TNC_BF16_GEMM=amx|avx512|widen` forces a path (to measure or test one
//! on a CPU that has a better one); a path the CPU lacks is not taken.
//!
//! The `gemm` crate has no bf16 kernels that use these instructions, so they are here.
//! A call computes a block of rows of one product. A and B are first packed (`pack.rs`) into
//! zero-padded scratch (A row-major with rows of 32 values per step of k; B in the
//! "VNNI" layout both instructions read: for each pair of k, the pairs (`B[k][n]`,
//! `B[k+1][n]`) of 32 columns side by side), so any strides and any sizes work. Then every
//! 32 × 32 block of C is one call of the kernel's `block`, stored to a scratch block
//! copied (or added) into C unless it can be accumulated in place. The k-steps run in
//! order, and each lane's sum in a fixed order, so results do not depend on the thread
//! split.

#[cfg(target_arch = "x86_64")]
pub mod amx;
#[cfg(target_arch = "x86_64")]
pub mod avx512;
#[cfg(target_arch = "x86_64")]
pub mod pack;

/// The instructions a bf16 product runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    Amx,
    Avx512Bf16,
}

impl Kernel {
    /// The kernel bf16 products run on (`None`: widened to f32), decided once per process:
    /// `TNC_BF16_GEMM` if set (`amx`, `avx512`, `widen`; one the CPU lacks is not taken),
    /// else AMX where the CPU has it, else AVX512-BF16 where it is faster than widening.
    ///
    /// It is not on every CPU that has it: on Intel's (Cooper Lake to Emerald Rapids)
    /// `vdpbf16ps` retires one per two cycles, 64 FLOP, against two f32 FMAs of 32 each
    /// per cycle — measured on an Emerald Rapids VM without AMX: 87 GFLOP/s against 190
    /// on one core, and the widened product 40–76% faster than this kernel on T1's shapes
    /// (`runtime/benches/gemm.rs`). AMD's Zen 4 and 5 issue it as fast as an FMA (twice
    /// the FLOPs), so there it is taken (by the instruction tables; not measured here).
    pub fn detect() -> Option<Kernel> {
        static KERNEL: std::sync::OnceLock<Option<Kernel>> = std::sync::OnceLock::new();
        *KERNEL.get_or_init(|| {
            let forced = std::env::var("TNC_BF16_GEMM").ok();
            let no_amx = std::env::var_os("TNC_NO_AMX").is_some();
            Kernel::all().into_iter().find(|k| match (k, forced.as_deref()) {
                (_, Some(f)) => f == k.flag(),
                (Kernel::Amx, None) => !no_amx,
                (Kernel::Avx512Bf16, None) => fast_dot_products(),
            })
        })
    }

    /// The value of `TNC_BF16_GEMM` that asks for this kernel.
    pub fn flag(self) -> &'static str {
        match self {
            Kernel::Amx => "amx",
            Kernel::Avx512Bf16 => "avx512",
        }
    }

    /// Every kernel this CPU has, best first.
    pub fn all() -> Vec<Kernel> {
        #[cfg(target_arch = "x86_64")]
        {
            [(Kernel::Amx, amx::available()), (Kernel::Avx512Bf16, avx512::available())]
                .into_iter()
                .filter_map(|(k, ok)| ok.then_some(k))
                .collect()
        }
        #[cfg(not(target_arch = "x86_64"))]
        Vec::new()
    }

    /// How the CPU runtime names the kernel (`tnc-run`, benchmarks).
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Amx => "AMX-BF16",
            Kernel::Avx512Bf16 => "AVX512-BF16",
        }
    }
}

/// Whether `vdpbf16ps` is at least as fast as an f32 FMA here: AMD's CPUs (see
/// [`Kernel::detect`]).
fn fast_dot_products() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let leaf0 = std::arch::x86_64::__cpuid(0);
        let vendor = [leaf0.ebx, leaf0.edx, leaf0.ecx].map(u32::to_le_bytes).concat();
        vendor == b"AuthenticAMD"
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

#[cfg(target_arch = "x86_64")]
mod imp {
    use super::pack::{a_row, pack_a, pack_b, unpack_c, Packer};
    use super::{amx, avx512, Kernel};
    use std::cell::RefCell;

    /// A strided matrix of bf16 (bits) or f32 values: element (r, c) at
    /// `ptr + r·rows + c·cols`.
    #[derive(Clone, Copy)]
    pub struct View<T> {
        pub ptr: *const T,
        pub rows: isize,
        pub cols: isize,
    }

    /// 64 bytes: tile rows are loaded fastest from cache-line boundaries (a misaligned
    /// tile load takes three times as long).
    #[derive(Clone, Copy)]
    #[repr(C, align(64))]
    struct Line([u16; 32]);

    /// Scratch of a thread: packed A, packed B, one block of C, in whole cache lines.
    struct Scratch {
        a: Vec<Line>,
        b: Vec<Line>,
        c: [Line; 64],
    }

    thread_local! {
        static SCRATCH: RefCell<Scratch> = const { RefCell::new(Scratch { a: Vec::new(), b: Vec::new(), c: [Line([0; 32]); 64] }) };
    }

    /// `buf` as `len` values, aligned to a cache line, contents unspecified (the packers
    /// write every value, padding included, so nothing is zeroed on every call).
    fn sized(buf: &mut Vec<Line>, len: usize) -> &mut [u16] {
        buf.resize(len.div_ceil(32), Line([0; 32]));
        // SAFETY: `Line` is 32 `u16` with no padding; the lines are contiguous.
        unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr() as *mut u16, len) }
    }

    fn round_up(x: usize, to: usize) -> usize {
        x.div_ceil(to) * to
    }

    /// `C (+)= A·B` for `m × k` A and `k × n` B of bf16 and `m × n` C of f32 (`c.ptr`
    /// writable), on the calling thread, with `kernel` (one of [`Kernel::all`]).
    ///
    /// # Safety
    /// Every element the views reach for these sizes is inside its buffer, and no other
    /// thread writes the rows of C covered.
    pub unsafe fn gemm(
        kernel: Kernel,
        (m, n, k): (usize, usize, usize),
        a: View<u16>,
        b: View<u16>,
        c: View<f32>,
        accumulate: bool,
    ) {
        if m == 0 || n == 0 {
            return;
        }
        // Packing A transposes it unless it is row-major; packing B is cheap either way.
        // So where A is not row-major, and Bᵀ would be (or is smaller to transpose, or as
        // large with Cᵀ row-major, stored in place), compute Cᵀ = Bᵀ·Aᵀ instead: the sums
        // are the same, in the same order.
        let transposes = |x: &View<u16>| x.cols != 1;
        let bt = View { ptr: b.ptr, rows: b.cols, cols: b.rows };
        let row_major_ct = c.rows == 1 && c.cols != 1;
        if transposes(&a) && (!transposes(&bt) || n < m || (n == m && row_major_ct)) {
            let at = View { ptr: a.ptr, rows: a.cols, cols: a.rows };
            let ct = View { ptr: c.ptr, rows: c.cols, cols: c.rows };
            // SAFETY: the same elements, reached through transposed views.
            return unsafe { product(kernel, (n, m, k), bt, at, ct, accumulate) };
        }
        // SAFETY: as for this function.
        unsafe { product(kernel, (m, n, k), a, b, c, accumulate) }
    }

    /// [`gemm`] in the orientation given.
    ///
    /// # Safety
    /// As for [`gemm`].
    unsafe fn product(
        kernel: Kernel,
        (m, n, k): (usize, usize, usize),
        a: View<u16>,
        b: View<u16>,
        c: View<f32>,
        accumulate: bool,
    ) {
        let (mp, np, kp) = (round_up(m, 32), round_up(n, 32), round_up(k.max(1), 32));
        // The whole 32-row blocks of a row-major A whose rows are whole cache lines (k a
        // multiple of 32, rows and start 64-byte aligned) are read in place; copying them
        // was a tenth of packing. Only the rest, a last partial block, is packed (padded).
        let lines = |x: isize| (x as usize).is_multiple_of(64);
        let in_place_a = a.cols == 1 && k % 32 == 0 && lines(a.rows * 2) && lines(a.ptr as isize);
        let whole = if in_place_a { m / 32 } else { 0 };
        SCRATCH.with(|s| {
            let s = &mut *s.borrow_mut();
            // SAFETY: the views are inside their buffers for these sizes (the caller's contract).
            let packer = Packer::detect();
            unsafe {
                let rest = View { ptr: a.ptr.offset((whole * 32) as isize * a.rows), ..a };
                let (m_rest, mp_rest) = (m - whole * 32, mp - whole * 32);
                pack_a(sized(&mut s.a, mp_rest * a_row(kp, &a)), (m_rest, k), (mp_rest, kp), rest, packer);
                pack_b(sized(&mut s.b, np * kp), (k, n), (np, kp), b, packer);
            }
            let panel = kp * 32;
            // SAFETY: `kernel` is one this CPU has (the caller's contract); each block reads
            // 32 rows of A (in place, or packed in the scratch) and one packed panel of B
            // inside the scratch, and writes
            // 32 × 32 f32 of C in place (a whole block inside C) or of the scratch block.
            unsafe {
                if kernel == Kernel::Amx {
                    amx::configure();
                }
                let lda = a_row(kp, &a);
                let (a_base, b_base) = (s.a.as_ptr() as *const u16, s.b.as_ptr() as *const u16);
                let c_scratch = s.c.as_mut_ptr() as *mut f32;
                let block = |ib: usize, jb: usize| {
                    let (ap, lda) = if ib < whole {
                        (a.ptr.offset((ib * 32) as isize * a.rows), a.rows as usize)
                    } else {
                        (a_base.add((ib - whole) * 32 * lda), lda)
                    };
                    let bp = b_base.add(jb * panel);
                    let (r0, j0) = (ib * 32, jb * 32);
                    let (rows, cols) = (32.min(m - r0), 32.min(n - j0));
                    // A whole block of a row-major C is accumulated in place; the
                    // others go through the scratch block.
                    let in_place = c.cols == 1 && rows == 32 && cols == 32;
                    let (cp, c_stride, from_c) = if in_place {
                        (
                            (c.ptr as *mut f32).offset(r0 as isize * c.rows + j0 as isize),
                            c.rows as usize * 4,
                            accumulate,
                        )
                    } else {
                        (c_scratch, 128, false)
                    };
                    match kernel {
                        Kernel::Amx => amx::block((ap, lda), bp, kp, (cp, c_stride), from_c),
                        Kernel::Avx512Bf16 => avx512::block((ap, lda), bp, kp, (cp, c_stride), from_c),
                    }
                    if !in_place {
                        let at = View { ptr: c.ptr.offset(r0 as isize * c.rows + j0 as isize * c.cols), ..c };
                        // SAFETY: the scratch block is 32 × 32 f32 (64 lines of 64 bytes).
                        let scratch = &*(c_scratch as *const [f32; 32 * 32]);
                        unpack_c(scratch, at, (rows, cols), accumulate, packer);
                    }
                };
                // One block of 32 rows of A and one panel of B are the same size
                // (32 · kp values); the block the outer loop holds stays in L1 or L2
                // while the inner loop streams the whole other operand past it, once per
                // outer block. So the smaller packed operand is the one swept (from L2
                // where it fits), and the larger one's blocks are read once each (1.3–1.9× faster on a projection and the GLU's products
                // than always sweeping A, measured on the development VM's AMX, an
                // Intel Xeon with 2 MB of L2 per core; `runtime/benches/gemm.rs`).
                let (row_blocks, panels) = (mp / 32, np / 32);
                if mp * lda >= np * kp {
                    for ib in 0..row_blocks {
                        for jb in 0..panels {
                            block(ib, jb);
                        }
                    }
                } else {
                    for jb in 0..panels {
                        for ib in 0..row_blocks {
                            block(ib, jb);
                        }
                    }
                }
                if kernel == Kernel::Amx {
                    amx::release();
                }
            }
        });
    }
}

#[cfg(target_arch = "x86_64")]
pub use imp::{gemm, View};

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// Every kernel this CPU has against a naive product of the same bf16 values in f64,
    /// on sizes that are not multiples of the tiles, transposed and strided views, and
    /// accumulation. The message says which kernels ran; where the CPU has none, only the
    /// widening path (tested in gemm.rs) exists.
    #[test]
    fn bf16_products_match_a_naive_product() {
        let kernels = Kernel::all();
        eprintln!("bf16 kernels on this CPU: {kernels:?}");
        for kernel in kernels {
            products_match_a_naive_product(kernel);
        }
    }

    fn products_match_a_naive_product(kernel: Kernel) {
        // Twice, the second time largest first: the scratch is reused without zeroing, so
        // the packers must write every padding value themselves.
        // (32, 32, 32) and (70, 33, 64) have a row-major A read in place (but for the last
        // 6 rows of the second); A is stored 64-byte aligned for that.
        let shapes = [(1usize, 1usize, 1usize), (17, 33, 31), (32, 32, 32), (45, 70, 100), (64, 16, 257), (70, 33, 64)];
        for &(m, n, k) in shapes.iter().chain(shapes.iter().rev()) {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0).collect();
            let b: Vec<f32> = (0..k * n * 2).map(|i| ((i * 13 % 17) as f32 - 8.0) / 5.0).collect();
            let bits = |v: &[f32]| -> Vec<u16> { v.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect() };
            let (a16, b16) = (bits(&a), bits(&b));
            #[derive(Clone, Copy)]
            #[repr(C, align(64))]
            struct Line([u16; 32]);
            let mut a_lines = vec![Line([0; 32]); a16.len().div_ceil(32)];
            // SAFETY: the lines are contiguous u16, at least `a16.len()` of them.
            unsafe { std::slice::from_raw_parts_mut(a_lines.as_mut_ptr() as *mut u16, a16.len()) }
                .copy_from_slice(&a16);
            let val = |x: u16| half::bf16::from_bits(x).to_f32() as f64;
            // Layouts (rows, cols strides) of A (m × k), B (k × n) and C (m × n): row-major
            // everything (C accumulated in place by whole blocks); B column-major (a product
            // with a transposed weight); A transposed with B strided and C column-major
            // (through the scratch block); A transposed, B and C row-major (a weight
            // gradient: computed as Cᵀ = Bᵀ·Aᵀ where n < m); A transposed, B row-major and C
            // column-major (a weight gradient stored as the weight is: Cᵀ = Bᵀ·Aᵀ where n ≤ m).
            let layouts = [
                [(k as isize, 1), (2 * n as isize, 2), (n as isize, 1)],
                [(k as isize, 1), (1, k as isize), (n as isize, 1)],
                [(1, m as isize), (2 * n as isize, 2), (1, m as isize)],
                [(1, m as isize), (n as isize, 1), (n as isize, 1)],
                [(1, m as isize), (n as isize, 1), (1, m as isize)],
            ];
            for [(ar, ac), (br, bc), (cr, cc)] in layouts {
                let av = View { ptr: a_lines.as_ptr() as *const u16, rows: ar, cols: ac };
                let bv = View { ptr: b16.as_ptr(), rows: br, cols: bc };
                for accumulate in [false, true] {
                    let mut c: Vec<f32> = (0..m * n).map(|i| i as f32 * 0.25).collect();
                    let before = c.clone();
                    let cv = View { ptr: c.as_mut_ptr() as *const f32, rows: cr, cols: cc };
                    unsafe { gemm(kernel, (m, n, k), av, bv, cv, accumulate) };
                    for r in 0..m {
                        for j in 0..n {
                            let at =
                                |v: isize, w: isize, i: usize, l: usize| (i as isize * v + l as isize * w) as usize;
                            let want: f64 =
                                (0..k).map(|kk| val(a16[at(ar, ac, r, kk)]) * val(b16[at(br, bc, kk, j)])).sum::<f64>()
                                    + if accumulate { before[at(cr, cc, r, j)] as f64 } else { 0.0 };
                            let got = c[at(cr, cc, r, j)] as f64;
                            assert!(
                                (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                                "{kernel:?} ({m}, {n}, {k}) [{r}, {j}]: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}
