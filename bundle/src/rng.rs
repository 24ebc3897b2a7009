//! Counter-based random numbers (Philox4x32-10, Salmon et al., SC'11).
//!
//! A random value is a pure function of (key, counter), so dropout masks and parameter
//! initializations are reproducible on every machine, in any thread order, and a
//! resumed training run draws exactly what an uninterrupted one would. Kernels on CPU
//! and GPU compute the same function.
//!
//! Keys: dropout uses `key = (run seed, salt)` and `counter = (element index, step)`;
//! parameter initialization uses `key = (seed, stable_hash(name))` and
//! `counter = (element index, 0)`.

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

/// Philox4x32 with 10 rounds: four 32-bit random words for a 128-bit counter and 64-bit key.
pub fn philox4x32(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let (mut c, mut k) = (counter, key);
    for _ in 0..10 {
        let p0 = (M0 as u64) * (c[0] as u64);
        let p1 = (M1 as u64) * (c[2] as u64);
        c = [(p1 >> 32) as u32 ^ c[1] ^ k[0], p1 as u32, (p0 >> 32) as u32 ^ c[3] ^ k[1], p0 as u32];
        k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
    }
    c
}

fn split(x: u64) -> [u32; 2] {
    [x as u32, (x >> 32) as u32]
}

/// Four raw words for element `index` of stream (`seed`, `stream`) at `step`.
pub fn words(seed: u64, stream: u64, index: u64, step: u64) -> [u32; 4] {
    let i = split(index);
    let s = split(step);
    let key = split(seed ^ stream.rotate_left(29).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    philox4x32([i[0], i[1], s[0], s[1]], key)
}

/// Uniform in [0, 1) with 53 random bits.
pub fn uniform(seed: u64, stream: u64, index: u64, step: u64) -> f64 {
    let w = words(seed, stream, index, step);
    let bits = ((w[0] as u64) << 21) ^ (w[1] as u64 >> 11);
    (bits & ((1u64 << 53) - 1)) as f64 / (1u64 << 53) as f64
}

/// Standard normal by Box–Muller on two independent uniforms drawn from one Philox call.
pub fn normal(seed: u64, stream: u64, index: u64, step: u64) -> f64 {
    let w = words(seed, stream, index, step);
    let u1 = ((((w[0] as u64) << 21) ^ (w[1] as u64 >> 11)) & ((1u64 << 53) - 1)) as f64 / (1u64 << 53) as f64;
    let u2 = ((((w[2] as u64) << 21) ^ (w[3] as u64 >> 11)) & ((1u64 << 53) - 1)) as f64 / (1u64 << 53) as f64;
    // 1 - u1 is in (0, 1], so the logarithm is finite.
    (-2.0 * (1.0 - u1).ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Dropout keep decision for one element: kept with probability `1 - rate`. Uses the
/// top 24 bits of the first word so f32 GPU kernels can make the same decision exactly.
pub fn dropout_keep(seed: u64, salt: u64, index: u64, step: u64, rate: f64) -> bool {
    let w = words(seed, salt, index, step)[0] >> 8;
    (w as f64) >= rate * (1u32 << 24) as f64
}

/// FNV-1a, 64-bit: a stable hash of names (parameter names, dropout sites) that is the
/// same on every platform and Rust version, unlike `std`'s hasher.
pub fn stable_hash(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn philox_known_answer() {
        // Known-answer vectors from the Random123 distribution (kat_vectors, philox4x32_10).
        assert_eq!(philox4x32([0, 0, 0, 0], [0, 0]), [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]);
        assert_eq!(philox4x32([0xffffffff; 4], [0xffffffff; 2]), [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]);
        assert_eq!(
            philox4x32([0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344], [0xa4093822, 0x299f31d0]),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    #[test]
    fn normal_moments() {
        let n = 200_000;
        let xs: Vec<f64> = (0..n).map(|i| normal(7, 3, i, 0)).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.01, "var {var}");
    }

    #[test]
    fn dropout_rate_is_respected() {
        let n = 100_000;
        let kept = (0..n).filter(|&i| dropout_keep(1, 2, i, 5, 0.1)).count();
        let frac = kept as f64 / n as f64;
        assert!((frac - 0.9).abs() < 0.005, "kept {frac}");
    }

    #[test]
    fn stable_hash_is_fnv1a() {
        assert_eq!(stable_hash(""), 0xcbf29ce484222325);
        assert_eq!(stable_hash("a"), 0xaf63dc4c8601ec8c);
    }
}
