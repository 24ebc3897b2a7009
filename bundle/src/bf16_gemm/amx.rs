//! The 32 × 32 block of a bf16 product on Intel AMX (`amx-bf16`, Sapphire Rapids and
//! later): `tdpbf16ps` computes C[16×16] += A[16×32] · B[32×16], bf16 pairs multiplied
//! exactly and summed in f32. Stable Rust's `std::arch` has no AMX, so the instructions
//! are inline assembly: `ldtilecfg`, `tilezero`, `tileloadd`, `tdpbf16ps`, `tilestored`,
//! `tilerelease`. Linux hands a process the tile state only once it asks
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`), which [`available`] does once.

use std::arch::asm;
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
        let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
        let (bf16, tile) = (leaf7.edx >> 22 & 1 == 1, leaf7.edx >> 24 & 1 == 1);
        bf16 && tile && request_tile_state()
    })
}

/// `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`; false where refused (an older
/// kernel, or not Linux).
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

/// Configures the tiles for [`block`] on this thread.
///
/// # Safety
/// [`available`] returned true.
pub unsafe fn configure() {
    // SAFETY: a valid palette-1 configuration, on a CPU with AMX and the tile state granted.
    unsafe { asm!("ldtilecfg [{}]", in(reg) &CONFIG as *const TileConfig, options(nostack, readonly)) };
}

/// Releases the tile state [`configure`] took.
///
/// # Safety
/// [`configure`] ran on this thread.
pub unsafe fn release() {
    // SAFETY: as documented.
    unsafe { asm!("tilerelease", options(nostack, nomem)) };
}

/// One 32 × 32 block of C: `C (+)= A·B` over `kp` values of k (a multiple of 32), A the
/// block's 32 packed rows (`lda` values apart), B its 32-column packed panel; C at `cp`,
/// rows `c_stride` bytes apart, read first when `from_c` (else from zero). Four
/// accumulator tiles (2 × 2 of 16 × 16) take the dot products over k in steps of 32.
///
/// The k-steps are software-pipelined: each tile of A or B is reloaded for the next step
/// as soon as its last product of this step has issued, so loads overlap the dot products
/// (tile registers are not renamed). A advances 32 values (64 bytes) a step, B 16 rows of
/// 128 bytes.
///
/// # Safety
/// The tiles are [`configure`]d; `ap`, `bp` hold 32 packed rows and `kp/2` packed rows,
/// and `cp` has 32 rows of 32 f32 at `c_stride`.
pub unsafe fn block(
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
