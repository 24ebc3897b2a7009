//! The interpreter's value type: a dense row-major tensor of `f64`.
//!
//! Every IR dtype is stored as `f64`: f32 values are exact in f64, i32 values are exact
//! integers, and bools are `0.0`/`1.0`. The graph, not the tensor, knows the dtype, which
//! keeps the reference interpreter a few hundred lines of plain loops.

use std::fmt;

/// How f32-typed values are computed. `F64` is the exact reference used by gradient
/// checks; `F32` rounds every f32-typed result to f32 after each op, so that it models
/// what compiled kernels (which keep f32 between ops) can be compared against.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Precision {
    F32,
    #[default]
    F64,
}

impl Precision {
    /// Round one value as an f32-typed result of an op.
    #[inline]
    pub fn round(self, x: f64) -> f64 {
        match self {
            Precision::F32 => (x as f32) as f64,
            Precision::F64 => x,
        }
    }
}

#[derive(Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

impl Tensor {
    /// A tensor from its shape and row-major data; an error if the sizes disagree.
    pub fn new(shape: Vec<usize>, data: Vec<f64>) -> Result<Tensor, String> {
        let n = checked_numel(&shape)?;
        if n != data.len() {
            return Err(format!("a tensor of shape {shape:?} needs {n} elements, got {}", data.len()));
        }
        Ok(Tensor { shape, data })
    }

    pub fn scalar(x: f64) -> Tensor {
        Tensor { shape: Vec::new(), data: vec![x] }
    }

    pub fn full(shape: Vec<usize>, x: f64) -> Tensor {
        let n = shape.iter().product();
        Tensor { shape, data: vec![x; n] }
    }

    pub fn zeros(shape: Vec<usize>) -> Tensor {
        Tensor::full(shape, 0.0)
    }

    pub fn numel(&self) -> usize {
        self.data.len()
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// The element at a multi-index (`None` if the index is out of range or of the
    /// wrong rank). For tests and debugging; kernels use strides directly.
    pub fn get(&self, index: &[usize]) -> Option<f64> {
        if index.len() != self.shape.len() {
            return None;
        }
        let mut off = 0;
        for (&i, &n) in index.iter().zip(&self.shape) {
            if i >= n {
                return None;
            }
            off = off * n + i;
        }
        self.data.get(off).copied()
    }

    /// The only element of a one-element tensor.
    pub fn item(&self) -> Option<f64> {
        (self.data.len() == 1).then(|| self.data[0])
    }
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: usize = 16;
        write!(f, "Tensor{:?} ", self.shape)?;
        let head: Vec<String> = self.data.iter().take(SHOWN).map(|x| format!("{x}")).collect();
        if self.data.len() > SHOWN {
            write!(f, "[{}, … ({} total)]", head.join(", "), self.data.len())
        } else {
            write!(f, "[{}]", head.join(", "))
        }
    }
}

/// Product of sizes with an overflow check (shapes come from user-controlled symbols).
pub fn checked_numel(shape: &[usize]) -> Result<usize, String> {
    shape
        .iter()
        .try_fold(1usize, |acc, &n| acc.checked_mul(n))
        .ok_or_else(|| format!("the shape {shape:?} has too many elements"))
}

/// Row-major strides of a shape.
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![0; shape.len()];
    let mut acc = 1;
    for i in (0..shape.len()).rev() {
        s[i] = acc;
        acc *= shape[i];
    }
    s
}

/// Visit every multi-index of `shape` in row-major order, keeping `K` linear offsets up
/// to date incrementally (offset `k` advances by `strides[k][axis]` along `axis`). The
/// callback receives the offsets. This is the one loop behind broadcast, permute, slice,
/// pad, concat, reduce and einsum, so none of them allocates per element.
pub fn walk<const K: usize>(shape: &[usize], strides: [&[usize]; K], base: [usize; K], mut f: impl FnMut([usize; K])) {
    if shape.contains(&0) {
        return;
    }
    let rank = shape.len();
    let mut idx = vec![0usize; rank];
    let mut off = base;
    loop {
        f(off);
        // Advance the odometer from the last axis.
        let mut axis = rank;
        loop {
            if axis == 0 {
                return;
            }
            axis -= 1;
            idx[axis] += 1;
            for k in 0..K {
                off[k] += strides[k][axis];
            }
            if idx[axis] < shape[axis] {
                break;
            }
            for k in 0..K {
                off[k] -= strides[k][axis] * shape[axis];
            }
            idx[axis] = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walk_visits_row_major_with_offsets() {
        // Transposed read of a 2x3 tensor: the second offset uses swapped strides.
        let mut seen = Vec::new();
        walk(&[2, 3], [&[3, 1], &[1, 2]], [0, 0], |[a, b]| seen.push((a, b)));
        assert_eq!(seen, vec![(0, 0), (1, 2), (2, 4), (3, 1), (4, 3), (5, 5)]);
        // A scalar is visited once; an empty shape never.
        let mut n = 0;
        walk(&[], [], [], |_: [usize; 0]| n += 1);
        assert_eq!(n, 1);
        walk(&[2, 0], [], [], |_: [usize; 0]| n += 1);
        assert_eq!(n, 1);
    }

    #[test]
    fn construction_checks_sizes() {
        assert!(Tensor::new(vec![2, 2], vec![1.0; 3]).is_err());
        let t = Tensor::new(vec![2, 3], (0..6).map(f64::from).collect()).unwrap();
        assert_eq!(t.get(&[1, 2]), Some(5.0));
        assert_eq!(t.get(&[2, 0]), None);
        assert_eq!(strides(&[2, 3, 4]), vec![12, 4, 1]);
        assert_eq!(Precision::F32.round(0.1), 0.1f32 as f64);
    }
}
