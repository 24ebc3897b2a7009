//! bf16 matrix products on Intel AMX (Advanced Matrix Extensions, `amx-bf16`): the
//! library GEMM nodes whose operands the precision pass narrowed to bf16, with f32
//! accumulation, on CPUs that have it (Sapphire Rapids and later). Without it the
//! operands are widened to f32 (`gemm.rs`), with the same products and sums in another
//! order.
//!
//! Neither the `gemm` crate nor stable Rust's `std::arch` has AMX, so the instructions
//! are inline assembly: `ldtilecfg`, `tilezero`, `tileloadd`, `tdpbf16ps` (C[16×16] +=
//! A[16×32] · B[32×16], bf16 pairs multiplied exactly and summed in f32), `tilestored`,
//! `tilerelease`. Linux hands a process the tile state only once it asks
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`), which [`available`] does once.
//!
//! A call computes a block of rows of one product. A and B are first packed into
//! zero-padded scratch (A row-major with rows of 32 values per step of k; B in the
//! "VNNI" layout the instruction reads: for each pair of k, the pairs (B[k][n], B[k+1][n])
//! of 32 columns side by side), so any strides and any sizes work. Then for every
//! 32 × 32 block of C, four accumulator tiles (2 × 2 of 16 × 16) take the dot products
//! over k in steps of 32, and are stored to a scratch block copied (or added) into C.
//! The k-steps run in order, and each lane's sum in a fixed order, so results do not
//! depend on the thread split.

#[cfg(target_arch = "x86_64")]
mod imp {
    use std::arch::asm;
    use std::cell::RefCell;
    use std::sync::OnceLock;

    /// The tile configuration (palette 1): eight tiles of 16 rows of 64 bytes.
    #[repr(C, align(64))]
    struct TileConfig {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        colsb: [u16; 16],
        rows: [u8; 16],
    }

    const CONFIG: TileConfig = {
        let mut colsb = [0u16; 16];
        let mut rows = [0u8; 16];
        let mut t = 0;
        while t < 8 {
            colsb[t] = 64;
            rows[t] = 16;
            t += 1;
        }
        TileConfig { palette: 1, start_row: 0, reserved: [0; 14], colsb, rows }
    };

    /// Whether this CPU has AMX-BF16 and the kernel gave this process the tile state.
    pub fn available() -> bool {
        static AVAILABLE: OnceLock<bool> = OnceLock::new();
        *AVAILABLE.get_or_init(|| {
            if std::env::var_os("TNC_NO_AMX").is_some() {
                return false;
            }
            let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
            let (bf16, tile) = (leaf7.edx >> 22 & 1 == 1, leaf7.edx >> 24 & 1 == 1);
            bf16 && tile && request_tile_state()
        })
    }

    /// `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`; false where refused (an
    /// older kernel, or not Linux).
    fn request_tile_state() -> bool {
        if !cfg!(target_os = "linux") {
            return false;
        }
        const SYS_ARCH_PRCTL: i64 = 158;
        const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
        const XFEATURE_XTILEDATA: i64 = 18;
        let ret: i64;
        // SAFETY: a system call that only changes this process's permissions.
        unsafe {
            asm!("syscall", inlateout("rax") SYS_ARCH_PRCTL => ret, in("rdi") ARCH_REQ_XCOMP_PERM,
                 in("rsi") XFEATURE_XTILEDATA, lateout("rcx") _, lateout("r11") _, options(nostack));
        }
        ret == 0
    }

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

    /// One 32 × 32 block of C: `C (+)= A·B` over `kp` values of k (a multiple of 32), A
    /// the block's 32 packed rows (`lda` values apart), B its 32-column packed panel;
    /// C at `cp`, rows `c_stride` bytes apart, read first when `from_c` (else from zero).
    ///
    /// The k-steps are software-pipelined: each tile of A or B is reloaded for the next
    /// step as soon as its last product of this step has issued, so loads overlap the dot
    /// products (tile registers are not renamed). A advances 32 values (64 bytes) a step,
    /// B 16 rows of 128 bytes.
    ///
    /// # Safety
    /// The tiles are configured; `ap`, `bp` hold 32 packed rows and `kp/2` packed rows,
    /// and `cp` has 32 rows of 32 f32 at `c_stride`.
    unsafe fn block(
        (ap, lda): (*const u16, usize),
        bp: *const u16,
        kp: usize,
        (cp, c_stride): (*mut f32, usize),
        from_c: bool,
    ) {
        // SAFETY: as documented.
        unsafe {
            let (c0, c1, c2, c3) = (cp, cp.add(16), cp.byte_add(16 * c_stride), cp.byte_add(16 * c_stride).add(16));
            if from_c {
                asm!(
                    "tileloadd tmm0, [{c0} + {sc}*1]",
                    "tileloadd tmm1, [{c1} + {sc}*1]",
                    "tileloadd tmm2, [{c2} + {sc}*1]",
                    "tileloadd tmm3, [{c3} + {sc}*1]",
                    c0 = in(reg) c0, c1 = in(reg) c1, c2 = in(reg) c2, c3 = in(reg) c3, sc = in(reg) c_stride,
                    options(nostack, readonly),
                );
            } else {
                asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
            }
            asm!(
                "tileloadd tmm4, [{a0} + {sa}*1]",
                "tileloadd tmm6, [{b0} + {sb}*1]",
                "tileloadd tmm5, [{a1} + {sa}*1]",
                "tileloadd tmm7, [{b1} + {sb}*1]",
                "2:",
                "dec {steps}",
                "jz 3f",
                "add {a0}, 64",
                "add {a1}, 64",
                "add {b0}, 2048",
                "add {b1}, 2048",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm4, [{a0} + {sa}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tileloadd tmm6, [{b0} + {sb}*1]",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "tileloadd tmm5, [{a1} + {sa}*1]",
                "tileloadd tmm7, [{b1} + {sb}*1]",
                "jmp 2b",
                "3:",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "tilestored [{c0} + {sc}*1], tmm0",
                "tilestored [{c1} + {sc}*1], tmm1",
                "tilestored [{c2} + {sc}*1], tmm2",
                "tilestored [{c3} + {sc}*1], tmm3",
                a0 = inout(reg) ap => _, a1 = inout(reg) ap.add(16 * lda) => _,
                b0 = inout(reg) bp => _, b1 = inout(reg) bp.add(32) => _,
                steps = inout(reg) kp / 32 => _,
                sa = in(reg) lda * 2, sb = in(reg) 128usize,
                c0 = in(reg) c0, c1 = in(reg) c1, c2 = in(reg) c2, c3 = in(reg) c3, sc = in(reg) c_stride,
                options(nostack),
            );
        }
    }

    /// Values between the starts of two rows of packed A: `kp`, and for a column-major A
    /// a cache line more, so that rows are not a multiple of 4 KB apart (the same L1 set:
    /// its packing writes every row in turn). Rows exactly `kp` apart load faster.
    fn a_row(kp: usize, a: &View<u16>) -> usize {
        if a.rows == 1 && a.cols != 1 {
            kp + 32
        } else {
            kp
        }
    }

    /// A (`m × k`) into `out`, row-major with `kp` columns ([`a_row`] apart) and `mp`
    /// rows, zero-padded. Row-major and column-major views are copied along their
    /// contiguous axis.
    ///
    /// # Safety
    /// `a` reaches `m × k` elements inside its buffer.
    unsafe fn pack_a(out: &mut [u16], (m, k): (usize, usize), (mp, kp): (usize, usize), a: View<u16>) {
        let lda = a_row(kp, &a);
        // SAFETY (every read below): inside A by the contract.
        if a.cols == 1 {
            for r in 0..m {
                let row = unsafe { std::slice::from_raw_parts(a.ptr.offset(r as isize * a.rows), k) };
                out[r * lda..r * lda + k].copy_from_slice(row);
            }
        } else if a.rows == 1 {
            // Column by column: contiguous reads, writes to `m` lines that stay in L1.
            let dst = out.as_mut_ptr();
            for kk in 0..k {
                let col = unsafe { a.ptr.offset(kk as isize * a.cols) };
                for r in 0..m {
                    unsafe { *dst.add(r * lda + kk) = *col.add(r) };
                }
            }
        } else {
            for r in 0..m {
                for kk in 0..k {
                    out[r * lda + kk] = unsafe { *a.ptr.offset(r as isize * a.rows + kk as isize * a.cols) };
                }
            }
        }
        // The padding: the columns past k of every row, the rows past m.
        for r in 0..m {
            out[r * lda + k..(r + 1) * lda].fill(0);
        }
        out[m * lda..mp * lda].fill(0);
    }

    /// B (`k × n`) into `out` in 32-column panels, each `kp/2` rows of 32 pairs
    /// (B[k][n], B[k+1][n]) — the layout `tdpbf16ps` reads — zero-padded to `np` columns
    /// and `kp` values of k.
    ///
    /// # Safety
    /// `b` reaches `k × n` elements inside its buffer.
    unsafe fn pack_b(out: &mut [u16], (k, n): (usize, usize), (np, kp): (usize, usize), b: View<u16>) {
        let panel = kp * 32;
        // Each pair as one u32: B[k][n] low, B[k+1][n] high (little-endian).
        let pairs = |p: usize, kk: usize| -> &mut [u32] {
            let at = p * panel + (kk / 2) * 64;
            // SAFETY: 64 u16 of a 64-byte aligned buffer are 32 aligned u32.
            unsafe { std::slice::from_raw_parts_mut(out.as_ptr().add(at) as *mut u32, 32) }
        };
        // SAFETY (every read below): inside B by the contract.
        let get = |kk: usize, j: usize| unsafe { *b.ptr.offset(kk as isize * b.rows + j as isize * b.cols) };
        for kk in (0..kp).step_by(2) {
            for p in 0..np / 32 {
                let dst = pairs(p, kk);
                let j0 = p * 32;
                let cols = n.saturating_sub(j0).min(32);
                if kk >= k {
                    dst.fill(0);
                    continue;
                }
                if b.cols == 1 {
                    // Two rows side by side.
                    let row = |kk: usize| unsafe {
                        std::slice::from_raw_parts(b.ptr.offset(kk as isize * b.rows + j0 as isize), cols)
                    };
                    let r0 = row(kk);
                    if kk + 1 < k {
                        let r1 = row(kk + 1);
                        for j in 0..cols {
                            dst[j] = r0[j] as u32 | (r1[j] as u32) << 16;
                        }
                    } else {
                        for j in 0..cols {
                            dst[j] = r0[j] as u32;
                        }
                    }
                } else {
                    for (j, d) in dst.iter_mut().enumerate().take(cols) {
                        let high = if kk + 1 < k { get(kk + 1, j0 + j) as u32 } else { 0 };
                        *d = get(kk, j0 + j) as u32 | high << 16;
                    }
                }
                dst[cols..].fill(0);
            }
        }
    }

    /// `C (+)= A·B` for `m × k` A and `k × n` B of bf16 and `m × n` C of f32 (`c.ptr`
    /// writable), on the calling thread. Only call when [`available`].
    ///
    /// # Safety
    /// Every element the views reach for these sizes is inside its buffer, and no other
    /// thread writes the rows of C covered.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gemm(m: usize, n: usize, k: usize, a: View<u16>, b: View<u16>, c: View<f32>, accumulate: bool) {
        if m == 0 || n == 0 {
            return;
        }
        // Packing A transposes it unless it is row-major; packing B is cheap either way.
        // So where A is not row-major, and Bᵀ would be (or is smaller to transpose),
        // compute Cᵀ = Bᵀ·Aᵀ instead: the sums are the same, in the same order.
        let transposes = |x: &View<u16>| x.cols != 1;
        let bt = View { ptr: b.ptr, rows: b.cols, cols: b.rows };
        if transposes(&a) && (!transposes(&bt) || n < m) {
            let at = View { ptr: a.ptr, rows: a.cols, cols: a.rows };
            let ct = View { ptr: c.ptr, rows: c.cols, cols: c.rows };
            // SAFETY: the same elements, reached through transposed views.
            return unsafe { product(n, m, k, bt, at, ct, accumulate) };
        }
        // SAFETY: as for this function.
        unsafe { product(m, n, k, a, b, c, accumulate) }
    }

    /// [`gemm`] in the orientation given.
    ///
    /// # Safety
    /// As for [`gemm`].
    unsafe fn product(m: usize, n: usize, k: usize, a: View<u16>, b: View<u16>, c: View<f32>, accumulate: bool) {
        let (mp, np, kp) = (round_up(m, 32), round_up(n, 32), round_up(k.max(1), 32));
        SCRATCH.with(|s| {
            let s = &mut *s.borrow_mut();
            // SAFETY: the views are inside their buffers for these sizes (the caller's contract).
            unsafe {
                pack_a(sized(&mut s.a, mp * a_row(kp, &a)), (m, k), (mp, kp), a);
                pack_b(sized(&mut s.b, np * kp), (k, n), (np, kp), b);
            }
            let panel = kp * 32;
            // SAFETY: the configuration is valid (palette 1, 8 tiles of 16 × 64 bytes), the
            // tile loads read inside the packed scratch (rows of `a_stride`/`b_stride` bytes,
            // 16 rows from each base), the stores write the 32 × 32 scratch block.
            unsafe {
                asm!("ldtilecfg [{}]", in(reg) &CONFIG as *const TileConfig, options(nostack, readonly));
                for jb in 0..np / 32 {
                    let bp = (s.b.as_ptr() as *const u16).add(jb * panel);
                    for ib in 0..mp / 32 {
                        let lda = a_row(kp, &a);
                        let ap = (s.a.as_ptr() as *const u16).add(ib * 32 * lda);
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
                            (s.c.as_mut_ptr() as *mut f32, 128, false)
                        };
                        block((ap, lda), bp, kp, (cp, c_stride), from_c);
                        if !in_place {
                            let out = c.ptr as *mut f32;
                            // SAFETY: the scratch block is 32 × 32 f32 (64 lines of 64 bytes).
                            let scratch = std::slice::from_raw_parts(s.c.as_ptr() as *const f32, 32 * 32);
                            for r in 0..rows {
                                let block = &scratch[r * 32..r * 32 + cols];
                                for (j, &v) in block.iter().enumerate() {
                                    let at = out.offset((r0 + r) as isize * c.rows + (j0 + j) as isize * c.cols);
                                    *at = if accumulate { *at + v } else { v };
                                }
                            }
                        }
                    }
                }
                asm!("tilerelease", options(nostack, nomem));
            }
        });
    }
}

#[cfg(target_arch = "x86_64")]
pub use imp::{available, gemm, View};

/// No AMX outside x86-64.
#[cfg(not(target_arch = "x86_64"))]
pub fn available() -> bool {
    false
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// Against a naive product of the same bf16 values in f64, on sizes that are not
    /// multiples of the tiles, transposed and strided views, and accumulation. Skipped
    /// (passing) only where the CPU has no AMX, which the message says.
    #[test]
    fn amx_products_match_a_naive_product() {
        if !available() {
            eprintln!("no AMX-BF16 on this CPU: nothing to check here (the widening path is tested in gemm.rs)");
            return;
        }
        // Twice, the second time largest first: the scratch is reused without zeroing, so
        // the packers must write every padding value themselves.
        let shapes = [(1usize, 1usize, 1usize), (17, 33, 31), (32, 32, 32), (45, 70, 100), (64, 16, 257)];
        for &(m, n, k) in shapes.iter().chain(shapes.iter().rev()) {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0).collect();
            let b: Vec<f32> = (0..k * n * 2).map(|i| ((i * 13 % 17) as f32 - 8.0) / 5.0).collect();
            let bits = |v: &[f32]| -> Vec<u16> { v.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect() };
            let (a16, b16) = (bits(&a), bits(&b));
            let val = |x: u16| half::bf16::from_bits(x).to_f32() as f64;
            // Layouts (rows, cols strides) of A (m × k), B (k × n) and C (m × n): row-major
            // everything (C accumulated in place by whole blocks); A transposed with B
            // strided and C column-major (through the scratch block); A transposed, B and C
            // row-major (a weight gradient: computed as Cᵀ = Bᵀ·Aᵀ where n < m).
            let layouts = [
                [(k as isize, 1), (2 * n as isize, 2), (n as isize, 1)],
                [(1, m as isize), (2 * n as isize, 2), (1, m as isize)],
                [(1, m as isize), (n as isize, 1), (n as isize, 1)],
            ];
            for [(ar, ac), (br, bc), (cr, cc)] in layouts {
                let av = View { ptr: a16.as_ptr(), rows: ar, cols: ac };
                let bv = View { ptr: b16.as_ptr(), rows: br, cols: bc };
                for accumulate in [false, true] {
                    let mut c: Vec<f32> = (0..m * n).map(|i| i as f32 * 0.25).collect();
                    let before = c.clone();
                    let cv = View { ptr: c.as_mut_ptr() as *const f32, rows: cr, cols: cc };
                    unsafe { gemm(m, n, k, av, bv, cv, accumulate) };
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
                                "({m}, {n}, {k}) [{r}, {j}]: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}
