//! The kernel IR's own definitions of math functions that libm would otherwise decide.
//!
//! `exp`, `sin` and `cos` are defined here, as exact sequences of IEEE operations, rather
//! than as "libm's `expf`": the CPU writer emits the same sequences inline
//! (`backend/llvm/vector_math.rs`), so that loops calling them vectorize, and the reference
//! executor computes them with these functions, so that generated code and the executor
//! agree bit for bit. (GPUs call libdevice's `__nv_expf`, `__nv_sinf`, …, 2 ulp; their
//! checks have tolerances.)

/// `eˣ` in f32 to 1.0 ulp, SLEEF's `xexpf`: `q = rint(x / ln 2)`, `s = x − q·ln 2` in two
/// parts (Cody–Waite, the first exact in 16 bits), a degree-7 polynomial for `eˢ` in FMA
/// (Horner) form, then `2^q` applied in two halves, so that subnormal results and those up
/// to the overflow threshold take no intermediate overflow. Below −104 it is 0, above 104
/// +∞; NaN propagates through the arithmetic.
///
/// Every step is an exactly rounded IEEE operation (`mul_add` is a fused multiply-add,
/// `round_ties_even` is `rint` in the default rounding mode): the LLVM version must do
/// exactly these, in this order.
pub fn exp(x: f32) -> f32 {
    let q = (x * std::f32::consts::LOG2_E).round_ties_even();
    let s = q.mul_add(-EXP_LN2_HI, x);
    let s = q.mul_add(-EXP_LN2_LO, s);
    let mut u = EXP_POLY[0];
    for &k in &EXP_POLY[1..] {
        u = u.mul_add(s, k);
    }
    let u = 1.0 + (s * s).mul_add(u, s);
    // NaN goes to a bound (`max`/`min`, like LLVM's `maxnum`/`minnum`, return the other
    // operand; `clamp` would keep the NaN); the bound keeps both halves normal powers of two.
    #[allow(clippy::manual_clamp)]
    let qi = q.max(-EXP_Q_BOUND).min(EXP_Q_BOUND) as i32;
    let low = qi >> 1;
    let u = u * pow2(low) * pow2(qi - low);
    if x < -EXP_BOUND {
        0.0
    } else if x > EXP_BOUND {
        f32::INFINITY
    } else {
        u
    }
}

/// ln 2 in two parts: the first exact in 16 bits, so `q·EXP_LN2_HI` is exact.
pub const EXP_LN2_HI: f32 = 0.693_145_75;
pub const EXP_LN2_LO: f32 = 1.428_606_8e-6;
/// The polynomial's coefficients, highest degree first (then `1 + s + s²·u`).
pub const EXP_POLY: [f32; 6] = [0.000_198_527_62, 0.001_393_043_6, 0.008_333_361, 0.041_666_485, 0.166_666_67, 0.5];
/// Beyond ±this, `exp` is 0 or +∞.
pub const EXP_BOUND: f32 = 104.0;
/// The exponent `q` is clamped to ±this before it is converted to an integer.
pub const EXP_Q_BOUND: f32 = 150.0;

/// `sin x` in f32, SLEEF's `xsinf` (3.5 ulp) with its four-part reduction for every `x`:
/// `q = rint(x/π)`, `d = x − q·π` with π in four parts (`q·PI_A` exact for |q| < 2^16),
/// an odd degree-9 polynomial in FMA form, the sign flipped for odd `q`. Accurate to
/// 3.5 ulp for |x| < 39000 (SLEEF's bound for this reduction); beyond, the reduction
/// loses accuracy gradually, and past 2^23·π, where `q` is clamped, the result is
/// meaningless (so is the f32 argument's phase). ±∞ and NaN give NaN.
pub fn sin(x: f32) -> f32 {
    let q = (x * std::f32::consts::FRAC_1_PI).round_ties_even();
    let d = reduce(x, q, 1.0);
    let odd = parity(q);
    sin_poly(if odd { -d } else { d })
}

/// `cos x` in f32, SLEEF's `xcosf` (3.5 ulp), with [`sin`]'s reduction and limits:
/// `q = 2·rint(x/π − ½) + 1`, `d = x − q·π/2`, then `±sin`-polynomial of `d`.
pub fn cos(x: f32) -> f32 {
    let q = 2.0f32.mul_add((x * std::f32::consts::FRAC_1_PI - 0.5).round_ties_even(), 1.0);
    let d = reduce(x, q, 0.5);
    // q odd; the sign is + when q ≡ 3 (mod 4).
    let plus = parity(((q - 1.0) * 0.5).round_ties_even());
    sin_poly(if plus { d } else { -d })
}

/// π in four parts (SLEEF's `PI_A` … `PI_D`); each of the first three has at most 10
/// significant bits, so `q·part` is exact for the reduction's `q`.
pub const PI_PARTS: [f32; 4] =
    [3.140_625, 0.000_967_025_756_835_937_5, 6.277_114_152_908_325e-7, 1.215_420_125_655_342e-10];
/// `sin`'s odd polynomial `d + d³·(…)`: coefficients of `s = d²`, highest first.
pub const SIN_POLY: [f32; 4] = [2.608_316e-6, -0.000_198_106_9, 0.008_333_079, -0.166_666_6];
/// `q` is clamped to ±this (2^23: every f32 beyond is an integer) before its parity is taken.
pub const TRIG_Q_BOUND: f32 = 8_388_608.0;

/// `x − q·(π·scale)`, π in [`PI_PARTS`] (`scale` is 1 or ½, exact).
fn reduce(x: f32, q: f32, scale: f32) -> f32 {
    let mut d = x;
    for part in PI_PARTS {
        d = q.mul_add(-(part * scale), d);
    }
    d
}

/// Whether the integer-valued `q` is odd (clamped to ±2^23, NaN as 0).
#[allow(clippy::manual_clamp)]
fn parity(q: f32) -> bool {
    (q.max(-TRIG_Q_BOUND).min(TRIG_Q_BOUND) as i32) & 1 != 0
}

/// `d + d³·p(d²)`: `sin d` for |d| ≤ π/2.
fn sin_poly(d: f32) -> f32 {
    let s = d * d;
    let mut u = SIN_POLY[0];
    for &k in &SIN_POLY[1..] {
        u = u.mul_add(s, k);
    }
    s.mul_add(u * d, d)
}

/// `x` rounded to bfloat16 (to nearest, ties to even), as an f32: the upper 16 bits of
/// `x + (0x7fff + the lowest kept bit)` in bits, so a carry rounds up into the exponent
/// (the largest values round to ±∞, as they should). NaN stays a quiet NaN of its sign.
/// The CPU writer computes it with the same integer operations.
pub fn round_bf16(x: f32) -> f32 {
    let bits = x.to_bits();
    if x.is_nan() {
        return f32::from_bits((bits & 0xffff_0000) | 0x0040_0000);
    }
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1));
    f32::from_bits(rounded & 0xffff_0000)
}

/// `x` rounded to IEEE half precision (to nearest, ties to even; subnormal halves
/// included, beyond 65504 ±∞), as an f32: the IEEE conversion, which LLVM's `fptrunc` to
/// `half` and back computes too.
pub fn round_f16(x: f32) -> f32 {
    half::f16::from_f32(x).to_f32()
}

/// The 16 bits of `x` rounded to bfloat16 ([`round_bf16`]).
pub fn bf16_bits(x: f32) -> u16 {
    (round_bf16(x).to_bits() >> 16) as u16
}

/// The f32 value of bfloat16 bits (exact).
pub fn bf16_value(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// The 16 bits of `x` rounded to IEEE half ([`round_f16`]).
pub fn f16_bits(x: f32) -> u16 {
    half::f16::from_f32(x).to_bits()
}

/// The f32 value of IEEE half bits (exact).
pub fn f16_value(bits: u16) -> f32 {
    half::f16::from_bits(bits).to_f32()
}

/// `2^k` for `−126 ≤ k ≤ 127`, from its bits.
fn pow2(k: i32) -> f32 {
    f32::from_bits(((k + 127) as u32) << 23)
}

#[cfg(test)]
mod tests {
    use super::{bf16_bits, bf16_value, cos, exp, f16_bits, f16_value, round_bf16, round_f16, sin};

    /// Rounding to bf16 is the `half` crate's conversion (to nearest, ties to even) bit for
    /// bit, on every kind of value; 16-bit patterns round-trip exactly.
    #[test]
    fn rounding_to_bf16_is_to_nearest_even() {
        let mut samples: Vec<f32> = (0..400_000u32).map(|i| f32::from_bits(i.wrapping_mul(2_654_435_761))).collect();
        samples.extend([
            0.0,
            -0.0,
            1.0,
            1.0 + 2f32.powi(-8),
            1.0 + 2f32.powi(-9),
            3.4e38,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1e-40,
        ]);
        for &x in &samples {
            let (got, want) = (round_bf16(x), half::bf16::from_f32(x).to_f32());
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "bf16({x:e}): {got:e} vs {want:e}"
            );
            assert_eq!(bf16_value(bf16_bits(x)).to_bits(), got.to_bits());
        }
        assert_eq!(round_bf16(1.0 + 2f32.powi(-8)), 1.0, "a tie goes to even");
        assert_eq!(round_bf16(1.0 + 3.0 * 2f32.powi(-8)), 1.0 + 2f32.powi(-6), "a tie goes to even");
        assert_eq!(round_f16(65519.0), 65504.0);
        assert_eq!(round_f16(65520.0), f32::INFINITY);
        assert_eq!(f16_value(f16_bits(0.1)), round_f16(0.1));
    }

    /// The largest distance in ulp between `f` and libm's `g` over `xs`, for results away
    /// from zero (near a zero of sin/cos an absolute error is the meaningful one, checked
    /// separately).
    fn worst_ulp(xs: impl Iterator<Item = f32>, f: fn(f32) -> f32, g: fn(f32) -> f32) -> (u32, f32) {
        let mut worst = (0u32, 0f32);
        for x in xs {
            let (got, want) = (f(x), g(x));
            assert!((got - want).abs() <= 2e-7 * 4.0, "{x}: {got:e} vs libm {want:e}");
            if want.abs() > 1e-3 {
                let u = got.to_bits().abs_diff(want.to_bits());
                if u > worst.0 {
                    worst = (u, x);
                }
            }
        }
        worst
    }

    /// Within 3.5 ulp of libm over SLEEF's range, at every scale from tiny arguments up to
    /// the positions of a 32K-token sequence; ±∞ and NaN give NaN.
    #[test]
    fn sin_and_cos_are_within_four_ulp_of_libm() {
        let xs = || (0..400_000).map(|i| (i as f32 - 200_000.0) * 0.0173).chain((0..100_000).map(|i| i as f32 * 0.39));
        for (name, f, g) in [("sin", sin as fn(f32) -> f32, f32::sin as fn(f32) -> f32), ("cos", cos, f32::cos)] {
            let (ulp, at) = worst_ulp(xs(), f, g);
            assert!(ulp <= 4, "{name}: {ulp} ulp at {at}");
            for x in [f32::INFINITY, f32::NEG_INFINITY, f32::NAN] {
                assert!(f(x).is_nan(), "{name}({x})");
            }
        }
        assert_eq!(sin(0.0), 0.0);
        assert_eq!(cos(0.0), 1.0);
        assert_eq!(sin(1e-20), 1e-20);
    }

    /// Within 1 ulp of libm's `expf` (itself within 0.5 ulp) over the whole range,
    /// including subnormal results, and exact at the special values.
    #[test]
    fn exp_is_within_one_ulp_of_libm() {
        let mut worst = 0u32;
        let mut x = -103.9f32;
        while x < 88.7 {
            let (got, want) = (exp(x), x.exp());
            if want >= f32::MIN_POSITIVE {
                let ulps = got.to_bits().abs_diff(want.to_bits());
                worst = worst.max(ulps);
            } else {
                // Subnormal: within one unit of the last place there is.
                assert!((got - want).abs() <= f32::from_bits(1) * 1.5, "exp({x}) = {got:e}, libm {want:e}");
            }
            x += 0.0137;
        }
        assert!(worst <= 1, "worst {worst} ulp");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(89.0), f32::INFINITY);
        assert_eq!(exp(-110.0), 0.0);
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(1.0), std::f32::consts::E);
    }
}
