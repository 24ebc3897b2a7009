//! Data-movement kernels of the reference interpreter: reshape, broadcast, permute,
//! slice, pad, concat, gather and dropout. Sizes arrive already evaluated (symbols bound).

use super::tensor::{checked_numel, strides, walk, Tensor};
use tnc_bundle::rng;

pub fn reshape(x: &Tensor, shape: Vec<usize>) -> Result<Tensor, String> {
    if checked_numel(&shape)? != x.numel() {
        return Err(format!("cannot reshape {:?} to {shape:?}", x.shape));
    }
    Ok(Tensor { shape, data: x.data.clone() })
}

pub fn broadcast(x: &Tensor, shape: Vec<usize>) -> Result<Tensor, String> {
    let ok = x.rank() == shape.len() && x.shape.iter().zip(&shape).all(|(&a, &b)| a == b || a == 1);
    if !ok {
        return Err(format!("cannot broadcast {:?} to {shape:?}", x.shape));
    }
    // Reading with stride 0 along expanded axes repeats the one element.
    let st: Vec<usize> = strides(&x.shape)
        .into_iter()
        .zip(x.shape.iter().zip(&shape))
        .map(|(s, (&a, &b))| if a == 1 && b != 1 { 0 } else { s })
        .collect();
    let mut data = Vec::with_capacity(checked_numel(&shape)?);
    walk(&shape, [&st], [0], |[i]| data.push(x.data[i]));
    Ok(Tensor { shape, data })
}

pub fn permute(x: &Tensor, perm: &[usize]) -> Result<Tensor, String> {
    let mut seen = vec![false; x.rank()];
    if perm.len() != x.rank() || perm.iter().any(|&p| p >= x.rank() || std::mem::replace(&mut seen[p], true)) {
        return Err(format!("{perm:?} is not a permutation for shape {:?}", x.shape));
    }
    let xs = strides(&x.shape);
    let shape: Vec<usize> = perm.iter().map(|&p| x.shape[p]).collect();
    let st: Vec<usize> = perm.iter().map(|&p| xs[p]).collect();
    let mut data = Vec::with_capacity(x.numel());
    walk(&shape, [&st], [0], |[i]| data.push(x.data[i]));
    Ok(Tensor { shape, data })
}

pub fn slice(x: &Tensor, axis: usize, start: i64, end: i64) -> Result<Tensor, String> {
    let n = *x.shape.get(axis).ok_or_else(|| format!("slice axis {axis} out of range for {:?}", x.shape))?;
    if start < 0 || end < start || end as u64 > n as u64 {
        return Err(format!("slice {start}:{end} is out of range for axis {axis} of size {n}"));
    }
    let st = strides(&x.shape);
    let mut shape = x.shape.clone();
    shape[axis] = (end - start) as usize;
    let mut data = Vec::with_capacity(checked_numel(&shape)?);
    walk(&shape, [&st], [start as usize * st[axis]], |[i]| data.push(x.data[i]));
    Ok(Tensor { shape, data })
}

pub fn pad(x: &Tensor, axis: usize, before: i64, after: i64) -> Result<Tensor, String> {
    if axis >= x.rank() || before < 0 || after < 0 {
        return Err(format!("cannot pad axis {axis} of {:?} by ({before}, {after})", x.shape));
    }
    let mut shape = x.shape.clone();
    shape[axis] += (before + after) as usize;
    let ost = strides(&shape);
    let mut out = Tensor::zeros(shape);
    let xst = strides(&x.shape);
    walk(&x.shape, [&xst, &ost], [0, before as usize * ost[axis]], |[i, o]| out.data[o] = x.data[i]);
    Ok(out)
}

pub fn concat(xs: &[&Tensor], axis: usize) -> Result<Tensor, String> {
    let first = xs.first().ok_or("concat needs at least one operand")?;
    if axis >= first.rank() {
        return Err(format!("concat axis {axis} out of range for {:?}", first.shape));
    }
    let mut shape = first.shape.clone();
    shape[axis] = 0;
    for x in xs {
        let same = x.rank() == first.rank() && (0..x.rank()).all(|i| i == axis || x.shape[i] == first.shape[i]);
        if !same {
            return Err(format!("concat along axis {axis}: shapes {:?} and {:?}", first.shape, x.shape));
        }
        shape[axis] += x.shape[axis];
    }
    let ost = strides(&shape);
    let mut out = Tensor::zeros(shape);
    let mut offset = 0;
    for x in xs {
        let xst = strides(&x.shape);
        walk(&x.shape, [&xst, &ost], [0, offset * ost[axis]], |[i, o]| out.data[o] = x.data[i]);
        offset += x.shape[axis];
    }
    Ok(out)
}

/// `table [V, rest…]` indexed by `index [I…]` gives `[I…, rest…]`. An index outside
/// `0..V` is an error (naming the position), never a wrapped or clamped read.
pub fn gather(table: &Tensor, index: &Tensor) -> Result<Tensor, String> {
    let v = *table.shape.first().ok_or("gather needs a table of rank ≥ 1")?;
    let row: usize = table.shape[1..].iter().product();
    let mut shape = index.shape.clone();
    shape.extend_from_slice(&table.shape[1..]);
    let mut data = Vec::with_capacity(checked_numel(&shape)?);
    for (pos, &i) in index.data.iter().enumerate() {
        if !(i >= 0.0 && i < v as f64) {
            return Err(format!("gather index {i} at flat position {pos} is out of range for a table of {v} rows"));
        }
        let r = i as usize;
        data.extend_from_slice(&table.data[r * row..(r + 1) * row]);
    }
    Ok(Tensor { shape, data })
}

/// Training-mode dropout: element `i` (row-major flat index) is kept iff the shared
/// counter-based generator says so, and kept elements are scaled by `1 / (1 - rate)`.
pub fn dropout(x: &Tensor, rate: f64, salt: u64, seed: u64, step: u64) -> Tensor {
    let scale = 1.0 / (1.0 - rate);
    let data = x
        .data
        .iter()
        .enumerate()
        .map(|(i, &v)| if rng::dropout_keep(seed, salt, i as u64, step, rate) { v * scale } else { 0.0 })
        .collect();
    Tensor { shape: x.shape.clone(), data }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iota(shape: &[usize]) -> Tensor {
        let n = shape.iter().product::<usize>();
        Tensor::new(shape.to_vec(), (0..n).map(|i| i as f64).collect()).unwrap()
    }

    #[test]
    fn permute_output_axis_i_is_input_axis_perm_i() {
        // x[i,j,k] = 12i + 4j + k with shape [2,3,4]; y = permute(x, [2,0,1]) has shape
        // [4,2,3] and y[k,i,j] = x[i,j,k].
        let x = iota(&[2, 3, 4]);
        let y = permute(&x, &[2, 0, 1]).unwrap();
        assert_eq!(y.shape, vec![4, 2, 3]);
        assert_eq!(y.get(&[3, 1, 2]), Some(12. + 8. + 3.));
        assert_eq!(y.get(&[1, 0, 1]), Some(4. + 1.));
        assert!(permute(&x, &[0, 0, 1]).is_err());
    }

    #[test]
    fn pad_and_slice_invert_each_other() {
        let x = iota(&[2, 3]);
        let p = pad(&x, 1, 1, 2).unwrap();
        assert_eq!(p.shape, vec![2, 6]);
        assert_eq!(p.data, vec![0., 0., 1., 2., 0., 0., 0., 3., 4., 5., 0., 0.]);
        assert_eq!(slice(&p, 1, 1, 4).unwrap(), x);
        assert_eq!(slice(&x, 0, 1, 2).unwrap().data, vec![3., 4., 5.]);
        assert!(slice(&x, 0, 1, 3).is_err());
    }

    #[test]
    fn gather_rows_and_reject_bad_indices() {
        let table = iota(&[4, 2]);
        let idx = Tensor::new(vec![2, 2], vec![3., 0., 1., 3.]).unwrap();
        let g = gather(&table, &idx).unwrap();
        assert_eq!(g.shape, vec![2, 2, 2]);
        assert_eq!(g.data, vec![6., 7., 0., 1., 2., 3., 6., 7.]);
        let err = gather(&table, &Tensor::new(vec![1], vec![4.]).unwrap()).unwrap_err();
        assert!(err.contains("out of range"), "{err}");
        assert!(gather(&table, &Tensor::new(vec![1], vec![-1.]).unwrap()).is_err());
    }

    #[test]
    fn broadcast_and_concat() {
        let x = Tensor::new(vec![2, 1], vec![1., 2.]).unwrap();
        let b = broadcast(&x, vec![2, 3]).unwrap();
        assert_eq!(b.data, vec![1., 1., 1., 2., 2., 2.]);
        let c = concat(&[&x, &b], 1).unwrap();
        assert_eq!(c.data, vec![1., 1., 1., 1., 2., 2., 2., 2.]);
        assert!(broadcast(&b, vec![2, 4]).is_err());
    }
}
