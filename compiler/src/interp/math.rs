//! Arithmetic kernels of the reference interpreter: elementwise ops, casts, reductions,
//! einsum and scans. All compute in f64; the caller rounds f32-typed results (see
//! [`super::Precision`]). Integer results follow i32 semantics (wrapping, truncating
//! division) so that the interpreter agrees with compiled code on integer index math.

use super::tensor::{strides, walk, Tensor};
use crate::ir::{BinaryOp, DType, EinsumSpec, ReduceOp, UnaryOp};

/// Wrap an integer result to i32, as compiled code would.
fn wrap_i32(v: i64) -> f64 {
    (v as i32) as f64
}

fn sigmoid(x: f64) -> f64 {
    // Two branches so that neither exp overflows for large |x|.
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

pub fn unary(op: UnaryOp, dtype: DType, x: &Tensor) -> Tensor {
    let int = dtype == DType::I32;
    let f = |v: f64| -> f64 {
        match op {
            UnaryOp::Neg if int => wrap_i32((v as i64).wrapping_neg()),
            UnaryOp::Abs if int => wrap_i32((v as i64).abs()),
            UnaryOp::Neg => -v,
            UnaryOp::Abs => v.abs(),
            UnaryOp::Exp => v.exp(),
            UnaryOp::Log => v.ln(),
            UnaryOp::Sqrt => v.sqrt(),
            UnaryOp::Rsqrt => 1.0 / v.sqrt(),
            UnaryOp::Recip => 1.0 / v,
            // Explicit branches: NaN stays NaN, and -0.0 becomes +0.0.
            UnaryOp::Relu => {
                if v > 0.0 || v.is_nan() {
                    v
                } else {
                    0.0
                }
            }
            UnaryOp::Elu => {
                if v > 0.0 {
                    v
                } else {
                    v.exp_m1()
                }
            }
            UnaryOp::Silu => v * sigmoid(v),
            UnaryOp::Sigmoid => sigmoid(v),
            UnaryOp::Tanh => v.tanh(),
            UnaryOp::Sin => v.sin(),
            UnaryOp::Cos => v.cos(),
            UnaryOp::Not => {
                if v != 0.0 {
                    0.0
                } else {
                    1.0
                }
            }
        }
    };
    Tensor { shape: x.shape.clone(), data: x.data.iter().map(|&v| f(v)).collect() }
}

/// `operand_dtype` is the dtype of both operands (inference makes them equal).
pub fn binary(op: BinaryOp, operand_dtype: DType, a: &Tensor, b: &Tensor) -> Result<Tensor, String> {
    if a.shape != b.shape {
        return Err(format!("`{op:?}` got shapes {:?} and {:?}", a.shape, b.shape));
    }
    let int = operand_dtype == DType::I32;
    let bool_ = |c: bool| if c { 1.0 } else { 0.0 };
    let mut data = Vec::with_capacity(a.data.len());
    for (&x, &y) in a.data.iter().zip(&b.data) {
        let v = match op {
            BinaryOp::Add if int => wrap_i32((x as i64).wrapping_add(y as i64)),
            BinaryOp::Sub if int => wrap_i32((x as i64).wrapping_sub(y as i64)),
            BinaryOp::Mul if int => wrap_i32((x as i64).wrapping_mul(y as i64)),
            BinaryOp::Div if int => {
                if y == 0.0 {
                    return Err("integer division by zero".into());
                }
                // Truncating division, as in C and in generated code.
                wrap_i32((x as i32).wrapping_div(y as i32) as i64)
            }
            BinaryOp::Add => x + y,
            BinaryOp::Sub => x - y,
            BinaryOp::Mul => x * y,
            BinaryOp::Div => x / y,
            BinaryOp::Pow => x.powf(y),
            // NaN-propagating, like `torch.maximum`; ties return either (they are equal).
            BinaryOp::Max => {
                if x.is_nan() || y.is_nan() {
                    f64::NAN
                } else if x >= y {
                    x
                } else {
                    y
                }
            }
            BinaryOp::Min => {
                if x.is_nan() || y.is_nan() {
                    f64::NAN
                } else if x <= y {
                    x
                } else {
                    y
                }
            }
            BinaryOp::Lt => bool_(x < y),
            BinaryOp::Le => bool_(x <= y),
            BinaryOp::Gt => bool_(x > y),
            BinaryOp::Ge => bool_(x >= y),
            BinaryOp::Eq => bool_(x == y),
            BinaryOp::Ne => bool_(x != y),
            BinaryOp::And => bool_(x != 0.0 && y != 0.0),
            BinaryOp::Or => bool_(x != 0.0 || y != 0.0),
        };
        data.push(v);
    }
    Ok(Tensor { shape: a.shape.clone(), data })
}

pub fn select(c: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor, String> {
    if c.shape != a.shape || a.shape != b.shape {
        return Err(format!("`where` got shapes {:?}, {:?} and {:?}", c.shape, a.shape, b.shape));
    }
    let data = (0..c.data.len()).map(|i| if c.data[i] != 0.0 { a.data[i] } else { b.data[i] }).collect();
    Ok(Tensor { shape: a.shape.clone(), data })
}

/// Casts: f32 → i32 truncates toward zero and saturates (NaN → 0), anything → bool is
/// `!= 0`, bool → number is 0/1.
pub fn cast(to: DType, x: &Tensor) -> Tensor {
    let f = |v: f64| -> f64 {
        match to {
            // 16-bit floats are rounded by `eval` like every value of their type.
            DType::F32 | DType::BF16 | DType::F16 => v,
            DType::I32 => (v as i32) as f64,
            DType::Bool => {
                if v != 0.0 {
                    1.0
                } else {
                    0.0
                }
            }
        }
    };
    Tensor { shape: x.shape.clone(), data: x.data.iter().map(|&v| f(v)).collect() }
}

/// Reduce the listed axes away. An empty reduction gives 0 (sum), -inf (max), +inf (min).
pub fn reduce(op: ReduceOp, axes: &[usize], x: &Tensor) -> Result<Tensor, String> {
    if let Some(&a) = axes.iter().find(|&&a| a >= x.rank()) {
        return Err(format!("reduction axis {a} out of range for shape {:?}", x.shape));
    }
    let out_shape: Vec<usize> = (0..x.rank()).filter(|i| !axes.contains(i)).map(|i| x.shape[i]).collect();
    let out_st = strides(&out_shape);
    // Output strides seen from the input's axes: zero along reduced axes.
    let mut mapped = Vec::with_capacity(x.rank());
    let mut k = 0;
    for i in 0..x.rank() {
        if axes.contains(&i) {
            mapped.push(0);
        } else {
            mapped.push(out_st[k]);
            k += 1;
        }
    }
    let init = match op {
        ReduceOp::Sum => 0.0,
        ReduceOp::Max => f64::NEG_INFINITY,
        ReduceOp::Min => f64::INFINITY,
    };
    let mut out = Tensor::full(out_shape, init);
    let x_st = strides(&x.shape);
    walk(&x.shape, [&x_st, &mapped], [0, 0], |[i, o]| {
        let v = x.data[i];
        let acc = &mut out.data[o];
        *acc = match op {
            ReduceOp::Sum => *acc + v,
            // NaN-propagating, matching the elementwise max/min.
            ReduceOp::Max if v.is_nan() || v > *acc => v,
            ReduceOp::Min if v.is_nan() || v < *acc => v,
            _ => *acc,
        };
    });
    Ok(out)
}

/// Einsum over one or two operands by a single strided loop over every letter: the
/// output letters first (so the output offset only moves forward), then the summed
/// letters innermost, so each output element is one contiguous accumulation.
pub fn einsum(spec: &EinsumSpec, xs: &[&Tensor]) -> Result<Tensor, String> {
    if xs.is_empty() || xs.len() > 2 || spec.inputs.len() != xs.len() {
        return Err(format!("einsum `{spec}` got {} operands", xs.len()));
    }
    let mut size: [Option<usize>; 26] = [None; 26];
    let letter = |l: u8| -> Result<usize, String> {
        if l.is_ascii_lowercase() {
            Ok((l - b'a') as usize)
        } else {
            Err(format!("einsum `{spec}`: bad index letter"))
        }
    };
    for (letters, t) in spec.inputs.iter().zip(xs) {
        if letters.len() != t.rank() {
            return Err(format!("einsum `{spec}`: operand has shape {:?}", t.shape));
        }
        for (&l, &n) in letters.iter().zip(&t.shape) {
            let slot = &mut size[letter(l)?];
            match slot {
                Some(m) if *m != n => {
                    return Err(format!("einsum `{spec}`: index `{}` has sizes {m} and {n}", l as char))
                }
                _ => *slot = Some(n),
            }
        }
    }
    // Loop order: output letters, then the remaining letters in order of appearance.
    let mut order: Vec<u8> = spec.output.clone();
    for letters in &spec.inputs {
        for &l in letters {
            if !order.contains(&l) {
                order.push(l);
            }
        }
    }
    let mut loop_shape = Vec::with_capacity(order.len());
    for &l in &order {
        loop_shape.push(
            size[letter(l)?]
                .ok_or_else(|| format!("einsum `{spec}`: output index `{}` is in no operand", l as char))?,
        );
    }
    let stride_of = |letters: &[u8], shape: &[usize]| -> Vec<usize> {
        let st = strides(shape);
        order.iter().map(|l| letters.iter().position(|m| m == l).map_or(0, |p| st[p])).collect()
    };
    let out_shape: Vec<usize> = loop_shape[..spec.output.len()].to_vec();
    let out_st = stride_of(&spec.output, &out_shape);
    let a = xs[0];
    let a_st = stride_of(&spec.inputs[0], &a.shape);
    let one = Tensor::scalar(1.0);
    let (b, b_st) = match xs.get(1) {
        Some(b) => (*b, stride_of(&spec.inputs[1], &b.shape)),
        None => (&one, vec![0; order.len()]),
    };
    let mut out = Tensor::zeros(out_shape);
    walk(&loop_shape, [&out_st, &a_st, &b_st], [0, 0, 0], |[o, i, j]| {
        out.data[o] += a.data[i] * b.data[j];
    });
    Ok(out)
}

/// Inclusive scan along `axis`: `s_n = x_n + d_n · s_{n-1}` (plain when `decay` is None),
/// running from the end when `reverse`.
pub fn scan(axis: usize, reverse: bool, x: &Tensor, decay: Option<&Tensor>) -> Result<Tensor, String> {
    if axis >= x.rank() {
        return Err(format!("scan axis {axis} out of range for shape {:?}", x.shape));
    }
    if let Some(d) = decay {
        if d.shape != x.shape {
            return Err(format!("scan decay has shape {:?}, values {:?}", d.shape, x.shape));
        }
    }
    let outer: usize = x.shape[..axis].iter().product();
    let n = x.shape[axis];
    let inner: usize = x.shape[axis + 1..].iter().product();
    let mut out = x.clone();
    for o in 0..outer {
        for i in 0..inner {
            let at = |t: usize| (o * n + t) * inner + i;
            let mut prev: Option<usize> = None;
            for step in 0..n {
                let t = if reverse { n - 1 - step } else { step };
                if let Some(p) = prev {
                    let d = decay.map_or(1.0, |d| d.data[at(t)]);
                    out.data[at(t)] = x.data[at(t)] + d * out.data[p];
                }
                prev = Some(at(t));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(shape: &[usize], data: &[f64]) -> Tensor {
        Tensor::new(shape.to_vec(), data.to_vec()).unwrap()
    }

    #[test]
    fn einsum_matmul_batch_and_sum() {
        let a = t(&[2, 3], &[1., 2., 3., 4., 5., 6.]);
        let b = t(&[3, 2], &[1., 0., 0., 1., 1., 1.]);
        let spec = |i: &[&str], o: &str| EinsumSpec {
            inputs: i.iter().map(|s| s.as_bytes().to_vec()).collect(),
            output: o.as_bytes().to_vec(),
            pinned: false,
        };
        let c = einsum(&spec(&["ij", "jk"], "ik"), &[&a, &b]).unwrap();
        assert_eq!(c.data, vec![4., 5., 10., 11.]);
        // Transposed output, a letter summed in only one operand.
        let c = einsum(&spec(&["ij", "kl"], "ki"), &[&a, &b]).unwrap();
        assert_eq!(c.shape, vec![3, 2]);
        assert_eq!(c.data, vec![6., 15., 6., 15., 12., 30.]);
        // One operand: transpose, and a full sum.
        let c = einsum(&spec(&["ij"], "ji"), &[&a]).unwrap();
        assert_eq!(c.data, vec![1., 4., 2., 5., 3., 6.]);
        let c = einsum(&spec(&["ij"], ""), &[&a]).unwrap();
        assert_eq!(c.data, vec![21.]);
        // Outer product.
        let u = t(&[2], &[1., 2.]);
        let v = t(&[3], &[1., 10., 100.]);
        let c = einsum(&spec(&["i", "j"], "ij"), &[&u, &v]).unwrap();
        assert_eq!(c.data, vec![1., 10., 100., 2., 20., 200.]);
    }

    #[test]
    fn scans_forward_reverse_decayed() {
        let x = t(&[2, 3], &[1., 2., 3., 4., 5., 6.]);
        assert_eq!(scan(1, false, &x, None).unwrap().data, vec![1., 3., 6., 4., 9., 15.]);
        assert_eq!(scan(1, true, &x, None).unwrap().data, vec![6., 5., 3., 15., 11., 6.]);
        assert_eq!(scan(0, false, &x, None).unwrap().data, vec![1., 2., 3., 5., 7., 9.]);
        let d = t(&[2, 3], &[9., 0.5, 0.5, 9., 2., 0.]);
        // Row 0: 1, 2 + 0.5·1 = 2.5, 3 + 0.5·2.5 = 4.25 (d_0 is never used).
        // Row 1: 4, 5 + 2·4 = 13, 6 + 0·13 = 6.
        assert_eq!(scan(1, false, &x, Some(&d)).unwrap().data, vec![1., 2.5, 4.25, 4., 13., 6.]);
        // Reverse: s_2 = 3, s_1 = 2 + 0.5·3 = 3.5, s_0 = 1 + 9·3.5 = 32.5 (d_2 unused).
        assert_eq!(scan(1, true, &x, Some(&d)).unwrap().data[..3], [32.5, 3.5, 3.]);
    }

    #[test]
    fn reductions_and_integer_semantics() {
        let x = t(&[2, 3], &[1., -2., 3., 4., 5., -6.]);
        assert_eq!(reduce(ReduceOp::Sum, &[0], &x).unwrap().data, vec![5., 3., -3.]);
        assert_eq!(reduce(ReduceOp::Max, &[1], &x).unwrap().data, vec![3., 5.]);
        assert_eq!(reduce(ReduceOp::Min, &[0, 1], &x).unwrap().data, vec![-6.]);
        let a = t(&[2], &[7., -7.]);
        let b = t(&[2], &[2., 2.]);
        assert_eq!(binary(BinaryOp::Div, DType::I32, &a, &b).unwrap().data, vec![3., -3.]);
        assert!(binary(BinaryOp::Div, DType::I32, &a, &t(&[2], &[0., 1.])).is_err());
        assert_eq!(cast(DType::I32, &t(&[2], &[2.7, -2.7])).data, vec![2., -2.]);
    }
}
