//! The kernel IR's own math as inline Cranelift instructions: `kernel::math`'s exp, sin
//! and cos (SLEEF's algorithms), the roundings to bfloat16 and IEEE half, and dropout's
//! Philox4x32-10 (`tnc_bundle::rng`). Each is the reference executor's sequence of IEEE
//! operations, operation for operation, so that Cranelift's code agrees with it (and
//! with LLVM's) bit for bit; `kernel::math` documents the algorithms.
//!
//! exp, sin, cos and the bf16 rounding are written once for a [`Width`]: one f32, or four
//! lanes of a 128-bit vector (`vector.rs`'s loops), where every comparison is a lane mask
//! and every choice a `bitselect`: the same operations lane by lane, so the same bits.

use crate::kernel::math::{EXP_BOUND, EXP_LN2_HI, EXP_LN2_LO, EXP_POLY, EXP_Q_BOUND, PI_PARTS, SIN_POLY, TRIG_Q_BOUND};
use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::{types, InstBuilder, MemFlagsData, Type, Value};
use cranelift_frontend::FunctionBuilder;

type B<'a, 'b> = &'a mut FunctionBuilder<'b>;

/// What a math function computes on: one f32, or the four lanes of an F32X4.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Width {
    One,
    Four,
}

impl Width {
    pub fn float(self) -> Type {
        match self {
            Width::One => types::F32,
            Width::Four => types::F32X4,
        }
    }

    /// The integers of the same lanes (and of the lane masks a comparison gives).
    pub fn int(self) -> Type {
        match self {
            Width::One => types::I32,
            Width::Four => types::I32X4,
        }
    }
}

/// `x` in every lane.
fn f(b: B, w: Width, x: f32) -> Value {
    let c = b.ins().f32const(x);
    match w {
        Width::One => c,
        Width::Four => b.ins().splat(types::F32X4, c),
    }
}

/// The i32 `k` in every lane (Cranelift wants a narrow constant's bits zero-extended).
fn k(b: B, w: Width, k: i64) -> Value {
    let c = b.ins().iconst(types::I32, k & 0xffff_ffff);
    match w {
        Width::One => c,
        Width::Four => b.ins().splat(types::I32X4, c),
    }
}

/// `c ? x : y`, lane by lane: `c` is a bool (one lane) or a lane mask (all ones or zero).
fn pick(b: B, w: Width, c: Value, x: Value, y: Value) -> Value {
    match w {
        Width::One => b.ins().select(c, x, y),
        Width::Four => {
            let ty = b.func.dfg.value_type(x);
            let c = if b.func.dfg.value_type(c) == ty { c } else { b.ins().bitcast(ty, MemFlagsData::new(), c) };
            b.ins().bitselect(c, x, y)
        }
    }
}

fn bits_of(b: B, w: Width, x: Value) -> Value {
    b.ins().bitcast(w.int(), MemFlagsData::new(), x)
}

fn float_of(b: B, w: Width, bits: Value) -> Value {
    b.ins().bitcast(w.float(), MemFlagsData::new(), bits)
}

/// `x.max(lo).min(hi)` for a clamp whose NaN case is decided elsewhere (Cranelift's
/// `fmax`/`fmin` propagate NaN; Rust's return the bound, and either way the caller's
/// result is NaN or unaffected, see each use).
fn clamp(b: B, w: Width, x: Value, lo: f32, hi: f32) -> Value {
    let (l, h) = (f(b, w, lo), f(b, w, hi));
    let x = b.ins().fmax(x, l);
    b.ins().fmin(x, h)
}

/// `a · b + c`, fused.
fn fma(b: B, x: Value, y: Value, z: Value) -> Value {
    b.ins().fma(x, y, z)
}

/// `2^k` for `−126 ≤ k ≤ 127` (i32 lanes), from its bits.
fn pow2(b: B, w: Width, e: Value) -> Value {
    let bias = k(b, w, 127);
    let biased = b.ins().iadd(e, bias);
    let bits = b.ins().ishl_imm_s(biased, 23);
    float_of(b, w, bits)
}

/// `kernel::math::exp`. For a NaN `x`, `q` is NaN and the clamp gives 0 here (the
/// executor's gives −150); `u` is NaN either way, and so is the result.
pub fn exp(b: B, w: Width, x: Value) -> Value {
    let log2e = f(b, w, std::f32::consts::LOG2_E);
    let scaled = b.ins().fmul(x, log2e);
    let q = b.ins().nearest(scaled);
    let neg_q = b.ins().fneg(q);
    let hi = f(b, w, EXP_LN2_HI);
    let s = fma(b, neg_q, hi, x);
    let lo = f(b, w, EXP_LN2_LO);
    let s = fma(b, neg_q, lo, s);
    let mut u = f(b, w, EXP_POLY[0]);
    for &c in &EXP_POLY[1..] {
        let c = f(b, w, c);
        u = fma(b, u, s, c);
    }
    let ss = b.ins().fmul(s, s);
    let u = fma(b, ss, u, s);
    let one = f(b, w, 1.0);
    let u = b.ins().fadd(one, u);
    let qc = clamp(b, w, q, -EXP_Q_BOUND, EXP_Q_BOUND);
    let qi = b.ins().fcvt_to_sint_sat(w.int(), qc);
    let low = b.ins().sshr_imm_s(qi, 1);
    let high = b.ins().isub(qi, low);
    let (p_low, p_high) = (pow2(b, w, low), pow2(b, w, high));
    let u = b.ins().fmul(u, p_low);
    let u = b.ins().fmul(u, p_high);
    let (bound, neg_bound) = (f(b, w, EXP_BOUND), f(b, w, -EXP_BOUND));
    let under = b.ins().fcmp(FloatCC::LessThan, x, neg_bound);
    let over = b.ins().fcmp(FloatCC::GreaterThan, x, bound);
    let (zero, inf) = (f(b, w, 0.0), f(b, w, f32::INFINITY));
    let r = pick(b, w, over, inf, u);
    pick(b, w, under, zero, r)
}

/// `x − q·(π·scale)`, π in four parts.
fn reduce(b: B, w: Width, x: Value, q: Value, scale: f32) -> Value {
    let neg_q = b.ins().fneg(q);
    let mut d = x;
    for part in PI_PARTS {
        let p = f(b, w, part * scale);
        d = fma(b, neg_q, p, d);
    }
    d
}

/// Whether the integer-valued `q` is odd (a bool, or a lane mask), clamped to ±2^23. A
/// NaN `q` converts to 0 (even) here, to −2^23 (even) in the executor.
fn parity(b: B, w: Width, q: Value) -> Value {
    let qc = clamp(b, w, q, -TRIG_Q_BOUND, TRIG_Q_BOUND);
    let qi = b.ins().fcvt_to_sint_sat(w.int(), qc);
    let one = k(b, w, 1);
    let bit = b.ins().band(qi, one);
    let zero = k(b, w, 0);
    b.ins().icmp(IntCC::NotEqual, bit, zero)
}

/// `d + d³·p(d²)`.
fn sin_poly(b: B, w: Width, d: Value) -> Value {
    let s = b.ins().fmul(d, d);
    let mut u = f(b, w, SIN_POLY[0]);
    for &c in &SIN_POLY[1..] {
        let c = f(b, w, c);
        u = fma(b, u, s, c);
    }
    let ud = b.ins().fmul(u, d);
    fma(b, s, ud, d)
}

/// `kernel::math::sin`.
pub fn sin(b: B, w: Width, x: Value) -> Value {
    let inv_pi = f(b, w, std::f32::consts::FRAC_1_PI);
    let scaled = b.ins().fmul(x, inv_pi);
    let q = b.ins().nearest(scaled);
    let d = reduce(b, w, x, q, 1.0);
    let odd = parity(b, w, q);
    let neg = b.ins().fneg(d);
    let d = pick(b, w, odd, neg, d);
    sin_poly(b, w, d)
}

/// `kernel::math::cos`.
pub fn cos(b: B, w: Width, x: Value) -> Value {
    let inv_pi = f(b, w, std::f32::consts::FRAC_1_PI);
    let scaled = b.ins().fmul(x, inv_pi);
    let half = f(b, w, 0.5);
    let shifted = b.ins().fsub(scaled, half);
    let r = b.ins().nearest(shifted);
    let (two, one) = (f(b, w, 2.0), f(b, w, 1.0));
    let q = fma(b, two, r, one);
    let d = reduce(b, w, x, q, 0.5);
    let qm1 = b.ins().fsub(q, one);
    let h = b.ins().fmul(qm1, half);
    let h = b.ins().nearest(h);
    let plus = parity(b, w, h);
    let neg = b.ins().fneg(d);
    let d = pick(b, w, plus, d, neg);
    sin_poly(b, w, d)
}

/// The bits of `x` rounded to bfloat16 in the upper half of i32 lanes, the lower half
/// zero: `kernel::math::round_bf16`'s integer operations, NaN made quiet.
fn bf16_rounded_bits(b: B, w: Width, x: Value) -> Value {
    let bits = bits_of(b, w, x);
    let upper = k(b, w, 0xffff_0000u32 as i32 as i64);
    let high = b.ins().band(bits, upper);
    let quiet = k(b, w, 0x0040_0000);
    let nan = b.ins().bor(high, quiet);
    let shifted = b.ins().ushr_imm_s(bits, 16);
    let one = k(b, w, 1);
    let lsb = b.ins().band(shifted, one);
    let half = k(b, w, 0x7fff);
    let up = b.ins().iadd(bits, half);
    let up = b.ins().iadd(up, lsb);
    let rounded = b.ins().band(up, upper);
    let is_nan = b.ins().fcmp(FloatCC::Unordered, x, x);
    pick(b, w, is_nan, nan, rounded)
}

/// `kernel::math::round_bf16`: an f32.
pub fn round_bf16(b: B, w: Width, x: Value) -> Value {
    let bits = bf16_rounded_bits(b, w, x);
    float_of(b, w, bits)
}

/// `kernel::math::bf16_bits`: the 16 bits (in an i32) a bf16 store writes.
pub fn bf16_bits(b: B, x: Value) -> Value {
    let bits = bf16_rounded_bits(b, Width::One, x);
    b.ins().ushr_imm_s(bits, 16)
}

/// `kernel::math::f16_bits`, the IEEE conversion to half (to nearest, ties to even) in
/// integer operations, as the `half` crate's: NaN keeps its top payload bits and becomes
/// quiet, beyond 65504 rounds to ±∞, below 2^−14 to a subnormal (`|x|·2^24` rounded to an
/// integer, exact in f32) or zero. The 16 bits in an i32.
pub fn f16_bits(b: B, x: Value) -> Value {
    let bits = bits_of(b, Width::One, x);
    let sign = b.ins().ushr_imm_s(bits, 16);
    let sign = b.ins().band_imm_s(sign, 0x8000);
    let exp = b.ins().band_imm_s(bits, 0x7f80_0000);
    let man = b.ins().band_imm_s(bits, 0x007f_ffff);
    // NaN and ±∞.
    let payload = b.ins().ushr_imm_s(man, 13);
    let is_nan = b.ins().icmp_imm_s(IntCC::NotEqual, man, 0);
    let (quiet, none) = (b.ins().iconst(types::I32, 0x0200), b.ins().iconst(types::I32, 0));
    let quiet = b.ins().select(is_nan, quiet, none);
    let special = b.ins().bor_imm_s(sign, 0x7c00);
    let special = b.ins().bor(special, quiet);
    let special = b.ins().bor(special, payload);
    // The half's biased exponent, as a signed i32.
    let e = b.ins().ushr_imm_s(exp, 23);
    let he = b.ins().iadd_imm_s(e, -112);
    // Normal halves: exponent and mantissa, plus one when the dropped bits are over half
    // an ulp, or exactly half and the kept lowest bit is odd (a carry reaches ±∞).
    let field = b.ins().ishl_imm_s(he, 10);
    let normal = b.ins().bor(sign, field);
    let normal = b.ins().bor(normal, payload);
    let round_bit = b.ins().band_imm_s(man, 0x1000);
    let sticky_or_odd = b.ins().band_imm_s(man, 0x2fff);
    let r1 = b.ins().icmp_imm_s(IntCC::NotEqual, round_bit, 0);
    let r2 = b.ins().icmp_imm_s(IntCC::NotEqual, sticky_or_odd, 0);
    let up = b.ins().band(r1, r2);
    let up = b.ins().uextend(types::I32, up);
    let normal = b.ins().iadd(normal, up);
    // Subnormal halves and zero: |x| in units of 2^−24, rounded to nearest even.
    let ax = b.ins().fabs(x);
    let scale = f(b, Width::One, 16_777_216.0);
    let scaled = b.ins().fmul(ax, scale);
    let units = b.ins().nearest(scaled);
    let units = b.ins().fcvt_to_uint_sat(types::I32, units);
    let sub = b.ins().bor(sign, units);
    let overflow = b.ins().bor_imm_s(sign, 0x7c00);
    let is_special = b.ins().icmp_imm_s(IntCC::Equal, exp, 0x7f80_0000);
    let is_overflow = b.ins().icmp_imm_s(IntCC::SignedGreaterThanOrEqual, he, 31);
    let is_normal = b.ins().icmp_imm_s(IntCC::SignedGreaterThan, he, 0);
    let r = b.ins().select(is_normal, normal, sub);
    let r = b.ins().select(is_overflow, overflow, r);
    b.ins().select(is_special, special, r)
}

/// `kernel::math::f16_value` of the 16 bits in the i32 `h`: exact (normal halves by
/// their bits, subnormals as `mantissa · 2^−24`).
pub fn f16_value(b: B, h: Value) -> Value {
    let sign = b.ins().band_imm_s(h, 0x8000);
    let sign = b.ins().ishl_imm_s(sign, 16);
    let magnitude = b.ins().band_imm_s(h, 0x7fff);
    let exp = b.ins().band_imm_s(h, 0x7c00);
    let man = b.ins().band_imm_s(h, 0x03ff);
    // Normal: the fields moved into place, the exponent rebiased (127 − 15 = 112).
    let moved = b.ins().ishl_imm_s(magnitude, 13);
    let normal = b.ins().iadd_imm_s(moved, 112 << 23);
    // NaN and ±∞: all ones in the exponent, NaN quiet.
    let man_bits = b.ins().ishl_imm_s(man, 13);
    let is_nan = b.ins().icmp_imm_s(IntCC::NotEqual, man, 0);
    let (quiet, none) = (b.ins().iconst(types::I32, 0x0040_0000), b.ins().iconst(types::I32, 0));
    let quiet = b.ins().select(is_nan, quiet, none);
    let special = b.ins().bor_imm_s(man_bits, 0x7f80_0000);
    let special = b.ins().bor(special, quiet);
    // Subnormal (and zero): exact in f32.
    let m = b.ins().fcvt_from_uint(types::F32, man);
    let unit = f(b, Width::One, 2f32.powi(-24));
    let sub = b.ins().fmul(m, unit);
    let sub = bits_of(b, Width::One, sub);
    let is_special = b.ins().icmp_imm_s(IntCC::Equal, exp, 0x7c00);
    let is_sub = b.ins().icmp_imm_s(IntCC::Equal, exp, 0);
    let r = b.ins().select(is_sub, sub, normal);
    let r = b.ins().select(is_special, special, r);
    let r = b.ins().bor(r, sign);
    float_of(b, Width::One, r)
}

/// `tnc_bundle::rng::dropout_keep(seed, salt, index, step, rate)` (an i8 0 or 1):
/// Philox4x32-10 with key = split(seed ^ rotl(salt, 29)·φ64) and counter = (index lo,
/// index hi, step lo, step hi); kept iff (word0 >> 8) ≥ rate·2^24.
pub fn dropout_keep(b: B, seed: Value, salt: u64, index: Value, step: Value, rate: f64) -> Value {
    const M0: u32 = 0xD251_1F53;
    const M1: u32 = 0xCD9E_8D57;
    const W0: u32 = 0x9E37_79B9;
    const W1: u32 = 0xBB67_AE85;
    let t = rate * (1u32 << 24) as f64;
    // (w as f64) >= t  ⇔  w >= ceil(t) for an integer w in [0, 2^24).
    if t.is_nan() || t > ((1u32 << 24) - 1) as f64 {
        return b.ins().iconst(types::I8, 0);
    }
    if t <= 0.0 {
        return b.ins().iconst(types::I8, 1);
    }
    let lo = |b: B, x: Value| b.ins().ireduce(types::I32, x);
    let hi = |b: B, x: Value| {
        let s = b.ins().ushr_imm_s(x, 32);
        b.ins().ireduce(types::I32, s)
    };
    let mix = salt.rotate_left(29).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let key = b.ins().bxor_imm_s(seed, mix as i64);
    let mut k = [lo(b, key), hi(b, key)];
    let mut c = [lo(b, index), hi(b, index), lo(b, step), hi(b, step)];
    let (m0, m1) = (b.ins().iconst(types::I32, M0 as i64), b.ins().iconst(types::I32, M1 as i64));
    for round in 0..10 {
        let (hi0, lo0) = (b.ins().umulhi(c[0], m0), b.ins().imul(c[0], m0));
        let (hi1, lo1) = (b.ins().umulhi(c[2], m1), b.ins().imul(c[2], m1));
        let x0 = b.ins().bxor(hi1, c[1]);
        let x2 = b.ins().bxor(hi0, c[3]);
        c = [b.ins().bxor(x0, k[0]), lo1, b.ins().bxor(x2, k[1]), lo0];
        if round < 9 {
            k = [b.ins().iadd_imm_s(k[0], W0 as i64), b.ins().iadd_imm_s(k[1], W1 as i64)];
        }
    }
    let w = b.ins().ushr_imm_s(c[0], 8);
    b.ins().icmp_imm_s(IntCC::UnsignedGreaterThanOrEqual, w, t.ceil() as i64)
}
