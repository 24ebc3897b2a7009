//! The project-wide closeness metric. Every numerical comparison (gradient checks,
//! interpreter vs. compiled kernels, fused vs. unfused ops) goes through [`compare`], so
//! that "close" means one thing everywhere and failures print the same numbers.
//!
//! The relative L2 error `‖a − e‖ / ‖e‖` judges a whole tensor at once: it is not fooled
//! by individually tiny elements (as a per-element relative error is) and scales with the
//! data (as an absolute tolerance does not). `max_abs` is reported to localize outliers.

use super::tensor::Tensor;
use std::fmt;

/// Below this norm the expected tensor is treated as zero, and any difference counts
/// at full size rather than being divided by (almost) nothing.
const TINY: f64 = 1e-300;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Closeness {
    /// `‖actual − expected‖₂ / max(‖expected‖₂, tiny)`; infinite on a shape mismatch.
    pub rel_l2: f64,
    /// Largest elementwise `|actual − expected|`; infinite on a shape mismatch.
    pub max_abs: f64,
    /// Either tensor holds a NaN. Any NaN fails every tolerance.
    pub has_nan: bool,
}

pub fn compare(actual: &Tensor, expected: &Tensor) -> Closeness {
    let has_nan = actual.data.iter().chain(&expected.data).any(|x| x.is_nan());
    if actual.shape != expected.shape {
        return Closeness { rel_l2: f64::INFINITY, max_abs: f64::INFINITY, has_nan };
    }
    let (mut diff2, mut norm2, mut max_abs) = (0.0f64, 0.0f64, 0.0f64);
    for (&a, &e) in actual.data.iter().zip(&expected.data) {
        // Equal infinities are a match, not inf - inf = NaN.
        let d = if a == e { 0.0 } else { (a - e).abs() };
        diff2 += d * d;
        norm2 += e * e;
        max_abs = max_abs.max(d);
    }
    Closeness { rel_l2: diff2.sqrt() / norm2.sqrt().max(TINY), max_abs, has_nan }
}

impl Closeness {
    /// No NaN and a relative L2 error at most `rel_tol`.
    pub fn within(&self, rel_tol: f64) -> bool {
        !self.has_nan && self.rel_l2 <= rel_tol
    }
}

impl fmt::Display for Closeness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rel_l2 = {:.3e}, max_abs = {:.3e}{}",
            self.rel_l2,
            self.max_abs,
            if self.has_nan { ", has NaN" } else { "" }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_definitions() {
        let e = Tensor::new(vec![2], vec![3.0, 4.0]).unwrap();
        let a = Tensor::new(vec![2], vec![3.0, 4.5]).unwrap();
        let c = compare(&a, &e);
        assert!((c.rel_l2 - 0.1).abs() < 1e-15);
        assert_eq!(c.max_abs, 0.5);
        assert!(c.within(0.1) && !c.within(0.09));
        let nan = Tensor::new(vec![2], vec![3.0, f64::NAN]).unwrap();
        assert!(!compare(&nan, &e).within(f64::INFINITY));
        let z = Tensor::zeros(vec![2]);
        assert!(compare(&z, &z).within(0.0));
        assert!(!compare(&a, &z).within(1e6));
        assert!(!compare(&Tensor::zeros(vec![1, 2]), &z).within(1.0));
    }
}
