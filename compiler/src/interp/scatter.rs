//! `scatter_add`, the adjoint of `gather`: rows of `values [I…, rest…]` are added into
//! row `index[i]` of a zero `[rows, rest…]` tensor. Repeated indices accumulate. An index
//! outside `0..rows` is an error (naming the position), never a dropped or clamped write.

use super::tensor::{checked_numel, Tensor};

pub fn scatter_add(values: &Tensor, index: &Tensor, rows: usize) -> Result<Tensor, String> {
    let k = index.rank();
    if values.rank() < k || values.shape[..k] != index.shape[..] {
        return Err(format!(
            "scatter_add: values {:?} do not start with the index shape {:?}",
            values.shape, index.shape
        ));
    }
    let rest = &values.shape[k..];
    let row = checked_numel(rest)?;
    let mut shape = vec![rows];
    shape.extend_from_slice(rest);
    let mut out = Tensor::zeros(shape);
    for (pos, &i) in index.data.iter().enumerate() {
        if !(i >= 0.0 && i < rows as f64) {
            return Err(format!("scatter_add index {i} at flat position {pos} is out of range for {rows} rows"));
        }
        let r = i as usize;
        for (o, &v) in out.data[r * row..(r + 1) * row].iter_mut().zip(&values.data[pos * row..(pos + 1) * row]) {
            *o += v;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_accumulate_and_bad_indices_are_errors() {
        let values = Tensor::new(vec![2, 2, 1], vec![1., 2., 3., 4.]).unwrap();
        let idx = Tensor::new(vec![2, 2], vec![2., 0., 2., 3.]).unwrap();
        let s = scatter_add(&values, &idx, 5).unwrap();
        assert_eq!(s.shape, vec![5, 1]);
        assert_eq!(s.data, vec![2., 0., 4., 4., 0.]);
        let err = scatter_add(&values, &idx, 3).unwrap_err();
        assert!(err.contains("out of range"), "{err}");
        // A scalar index and rank-0 rows.
        let s = scatter_add(&Tensor::scalar(7.), &Tensor::scalar(1.), 3).unwrap();
        assert_eq!(s.data, vec![0., 7., 0.]);
    }
}
