//! The warp-level matrix fragments of PTX `mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}`
//! ([`super::Stmt::Mma`]): which elements of A (16 × 16), B (16 × 8) and C/D (16 × 8) each
//! of a warp's 32 lanes holds, and what the product computes. Every consumer of the
//! statement — the GPU-semantics executor, the thread-loop rewrite, the GEMM tiles that
//! load the fragments — takes the layout from here, so a wrong mapping in one of them is
//! a wrong number in a test, not a silent disagreement.
//!
//! From the PTX ISA ("Matrix Fragments for mma.m16n8k16 with floating point type"), with
//! `group = lane / 4` and `pair = lane % 4`:
//!
//! ```text
//! A, element i of 8:  row = group + 8·(i/2 mod 2)   col = 2·pair + i mod 2 + 8·(i/4)
//! B, element i of 4:  row = 2·pair + i mod 2 + 8·(i/2)   col = group
//! C, element i of 4:  row = group + 8·(i/2)         col = 2·pair + i mod 2
//! ```
//!
//! (elements 2j and 2j + 1 of A and B share one 32-bit register, the even one in the low
//! half). The product rounds A and B to the input type (to nearest, ties to even, as
//! `cvt.rn` does when the registers are packed) and adds each element's 16 exact products
//! to C in f32, k in order. Real tensor cores add them in an order (and with an internal
//! precision) PTX leaves open, so a GPU's result may differ from this one by f32 rounding
//! of the sum — never by a misplaced element.

use super::ir::Elem;

/// Lanes in a warp.
pub const WARP: usize = 32;
/// The product's shape: D is M × N, the sum runs over K.
pub const M: usize = 16;
pub const N: usize = 8;
pub const K: usize = 16;

/// Every layout is a lane's base plus the element's offset — `a_element(lane, i) =
/// (group, 2·pair) + a_element(0, i)`, B's base is (2·pair, group), C's (group, 2·pair) —
/// which is how code generators index fragments with a run-time lane.
pub fn lane_base(lane: usize) -> (usize, usize) {
    (lane / 4, 2 * (lane % 4))
}

/// (row, column) of A held in element `i` (0..8) of lane `lane`.
pub fn a_element(lane: usize, i: usize) -> (usize, usize) {
    (lane / 4 + 8 * ((i / 2) % 2), 2 * (lane % 4) + i % 2 + 8 * (i / 4))
}

/// (row, column) of B held in element `i` (0..4) of lane `lane`.
pub fn b_element(lane: usize, i: usize) -> (usize, usize) {
    (2 * (lane % 4) + i % 2 + 8 * (i / 2), lane / 4)
}

/// (row, column) of C and D held in element `i` (0..4) of lane `lane`.
pub fn c_element(lane: usize, i: usize) -> (usize, usize) {
    (lane / 4 + 8 * (i / 2), 2 * (lane % 4) + i % 2)
}

/// The lane and element of A that hold (row, column): the inverse of [`a_element`].
pub fn a_holder(row: usize, col: usize) -> (usize, usize) {
    ((row % 8) * 4 + (col % 8) / 2, col % 2 + 2 * (row / 8) + 4 * (col / 8))
}

/// The lane and element of B that hold (row, column): the inverse of [`b_element`].
pub fn b_holder(row: usize, col: usize) -> (usize, usize) {
    (col * 4 + (row % 8) / 2, row % 2 + 2 * (row / 8))
}

/// `x` as the tensor core reads it: rounded to the input type.
pub fn round_input(input: Elem, x: f32) -> Result<f32, String> {
    match input {
        Elem::BF16 => Ok(super::math::round_bf16(x)),
        Elem::F16 => Ok(super::math::round_f16(x)),
        other => Err(format!("a warp's matrix product takes bf16 or f16 inputs, not {other:?}")),
    }
}

/// One warp's product: every lane's fragments of A and B, and its accumulators (C in,
/// D out).
pub fn warp_product(
    input: Elem,
    a: &[[f32; 8]; WARP],
    b: &[[f32; 4]; WARP],
    acc: &mut [[f32; 4]; WARP],
) -> Result<(), String> {
    let mut am = [[0f32; K]; M];
    let mut bm = [[0f32; N]; K];
    for lane in 0..WARP {
        for (i, &x) in a[lane].iter().enumerate() {
            let (r, c) = a_element(lane, i);
            am[r][c] = round_input(input, x)?;
        }
        for (i, &x) in b[lane].iter().enumerate() {
            let (r, c) = b_element(lane, i);
            bm[r][c] = round_input(input, x)?;
        }
    }
    for (lane, d) in acc.iter_mut().enumerate() {
        for (i, d) in d.iter_mut().enumerate() {
            let (r, c) = c_element(lane, i);
            for k in 0..K {
                *d += am[r][k] * bm[k][c];
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each layout covers its matrix exactly once, and the holders invert it.
    #[test]
    fn every_element_has_one_holder() {
        let mut seen_a = [[0; K]; M];
        let mut seen_b = [[0; N]; K];
        let mut seen_c = [[0; N]; M];
        for lane in 0..WARP {
            for i in 0..8 {
                let (r, c) = a_element(lane, i);
                seen_a[r][c] += 1;
                assert_eq!(a_holder(r, c), (lane, i));
            }
            for i in 0..4 {
                let (r, c) = b_element(lane, i);
                seen_b[r][c] += 1;
                assert_eq!(b_holder(r, c), (lane, i));
                let (r, c) = c_element(lane, i);
                seen_c[r][c] += 1;
            }
        }
        assert!(seen_a.iter().flatten().all(|&n| n == 1));
        assert!(seen_b.iter().flatten().all(|&n| n == 1));
        assert!(seen_c.iter().flatten().all(|&n| n == 1));
    }

    /// The layouts are linear in the lane, as [`lane_base`] says.
    #[test]
    fn layouts_are_a_lane_base_plus_an_offset() {
        let plus = |(a, b): (usize, usize), (c, d): (usize, usize)| (a + c, b + d);
        for lane in 0..WARP {
            let (g, p2) = lane_base(lane);
            for i in 0..8 {
                assert_eq!(a_element(lane, i), plus((g, p2), a_element(0, i)));
            }
            for i in 0..4 {
                assert_eq!(b_element(lane, i), plus((p2, g), b_element(0, i)));
                assert_eq!(c_element(lane, i), plus((g, p2), c_element(0, i)));
            }
        }
    }

    /// Spot values from the PTX ISA's fragment figures: lane 5 (group 1, pair 1) holds A's
    /// (1, 2), (1, 3), (9, 2), (9, 3), (1, 10), …; B's (2, 1), (3, 1), (10, 1), (11, 1); C's
    /// (1, 2), (1, 3), (9, 2), (9, 3).
    #[test]
    fn lane_five_holds_what_ptx_draws() {
        let a: Vec<_> = (0..8).map(|i| a_element(5, i)).collect();
        assert_eq!(a, [(1, 2), (1, 3), (9, 2), (9, 3), (1, 10), (1, 11), (9, 10), (9, 11)]);
        let b: Vec<_> = (0..4).map(|i| b_element(5, i)).collect();
        assert_eq!(b, [(2, 1), (3, 1), (10, 1), (11, 1)]);
        let c: Vec<_> = (0..4).map(|i| c_element(5, i)).collect();
        assert_eq!(c, [(1, 2), (1, 3), (9, 2), (9, 3)]);
    }

    /// The product against a plain one on the assembled matrices, with inputs that are not
    /// bf16 values (so the rounding shows) and a nonzero C.
    #[test]
    fn the_product_is_the_matrix_product_of_rounded_inputs() {
        let av = |r: usize, c: usize| 1.0 + (r * 16 + c) as f32 / 1000.0 + 1e-4;
        let bv = |r: usize, c: usize| (r as f32 - c as f32) / 7.0;
        let (mut a, mut b, mut acc) = ([[0.0; 8]; WARP], [[0.0; 4]; WARP], [[0.0; 4]; WARP]);
        for lane in 0..WARP {
            for i in 0..8 {
                let (r, c) = a_element(lane, i);
                a[lane][i] = av(r, c);
            }
            for i in 0..4 {
                let (r, c) = b_element(lane, i);
                b[lane][i] = bv(r, c);
                let (r, c) = c_element(lane, i);
                acc[lane][i] = (r * 8 + c) as f32;
            }
        }
        warp_product(Elem::BF16, &a, &b, &mut acc).unwrap();
        let rb = super::super::math::round_bf16;
        for lane in 0..WARP {
            for i in 0..4 {
                let (r, c) = c_element(lane, i);
                let mut want = (r * 8 + c) as f32;
                for k in 0..K {
                    want += rb(av(r, k)) * rb(bv(k, c));
                }
                assert_eq!(acc[lane][i], want, "D[{r}][{c}]");
                assert_ne!(rb(av(r, 1)), av(r, 1), "the inputs are not bf16 values");
            }
        }
        assert!(warp_product(Elem::F32, &a, &b, &mut acc).is_err());
    }
}
