//! Parameter initialization from a seed, shared bit for bit by the compiler's reference
//! interpreter and the runtime: element `i` of parameter `name` draws from the
//! counter-based generator keyed by `(seed, stable_hash(name))` at counter `(i, 0)`, so a
//! parameter's values depend only on the seed and its name — not on the order parameters
//! were declared in, nor on other parameters' sizes. `seed` is the parameter's own fixed
//! seed when it has one, else the run's seed (the caller decides).

use crate::manifest::InitSpec;
use crate::rng;
use std::fmt;

/// Why a parameter could not be initialized.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InitError {
    /// The element count overflows `usize`.
    TooLarge(Vec<usize>),
    /// Xavier initialization of a weight of rank < 2.
    XavierRank(Vec<usize>),
    /// Xavier initialization of a weight with no elements along its fans.
    XavierEmpty,
    /// [`InitSpec::Baked`] values live in a file of the bundle, not in the seed.
    Baked { file: String, tensor: String },
}

impl fmt::Display for InitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InitError::TooLarge(s) => write!(f, "shape {s:?} has too many elements"),
            InitError::XavierRank(s) => {
                write!(f, "Xavier initialization needs a weight of rank ≥ 2, got shape {s:?}")
            }
            InitError::XavierEmpty => f.write_str("Xavier initialization of an empty weight"),
            InitError::Baked { file, tensor } => {
                write!(f, "baked initial values (tensor `{tensor}` of `{file}`) are not computed from a seed")
            }
        }
    }
}

impl std::error::Error for InitError {}

/// `sqrt(6 / (fan_in + fan_out))` for a `[…, fan_in, fan_out]` weight, both fans scaled
/// by the product of the leading axes.
pub fn xavier_bound(shape: &[usize]) -> Result<f64, InitError> {
    if shape.len() < 2 {
        return Err(InitError::XavierRank(shape.to_vec()));
    }
    let r = shape.len();
    let lead: usize = shape[..r - 2].iter().product();
    let fans = (shape[r - 2] + shape[r - 1]) as f64 * lead as f64;
    if fans == 0.0 {
        return Err(InitError::XavierEmpty);
    }
    Ok((6.0 / fans).sqrt())
}

/// The initial values (row-major, in f64) of parameter `name` with `shape`.
pub fn init_values(spec: &InitSpec, shape: &[usize], name: &str, seed: u64) -> Result<Vec<f64>, InitError> {
    let n =
        shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(|| InitError::TooLarge(shape.to_vec()))?;
    let stream = rng::stable_hash(name);
    let draw = |f: &dyn Fn(u64) -> f64| -> Vec<f64> { (0..n as u64).map(f).collect() };
    Ok(match spec {
        InitSpec::Zeros => vec![0.0; n],
        InitSpec::Ones => vec![1.0; n],
        InitSpec::Constant(c) => vec![*c; n],
        InitSpec::Normal { mean, std } => draw(&|i| mean + std * rng::normal(seed, stream, i, 0)),
        InitSpec::Uniform { lo, hi } => draw(&|i| lo + (hi - lo) * rng::uniform(seed, stream, i, 0)),
        InitSpec::Xavier { gain } => {
            let bound = gain * xavier_bound(shape)?;
            draw(&|i| bound * (2.0 * rng::uniform(seed, stream, i, 0) - 1.0))
        }
        InitSpec::Baked { file, tensor } => {
            return Err(InitError::Baked { file: file.clone(), tensor: tensor.clone() })
        }
    })
}

/// [`init_values`] rounded to f32 (what f32 parameters of compiled bundles hold).
pub fn init_values_f32(spec: &InitSpec, shape: &[usize], name: &str, seed: u64) -> Result<Vec<f32>, InitError> {
    Ok(init_values(spec, shape, name, seed)?.into_iter().map(|x| x as f32).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_the_documented_draws() {
        let name = "layers.0.attn.wq";
        let h = rng::stable_hash(name);
        let v = init_values(&InitSpec::Normal { mean: 0.5, std: 2.0 }, &[3, 4], name, 9).unwrap();
        assert_eq!(v.len(), 12);
        for (i, x) in v.iter().enumerate() {
            assert_eq!(*x, 0.5 + 2.0 * rng::normal(9, h, i as u64, 0));
        }
        let v = init_values(&InitSpec::Xavier { gain: 1.0 }, &[2, 3, 5], name, 1).unwrap();
        let bound = (6.0f64 / (16.0)).sqrt();
        assert_eq!(v[7], bound * (2.0 * rng::uniform(1, h, 7, 0) - 1.0));
        assert_eq!(init_values(&InitSpec::Constant(2.5), &[2], name, 0).unwrap(), vec![2.5, 2.5]);
        assert_eq!(init_values(&InitSpec::Zeros, &[], name, 0).unwrap(), vec![0.0]);
    }

    #[test]
    fn errors() {
        assert_eq!(init_values(&InitSpec::Xavier { gain: 1.0 }, &[4], "w", 0), Err(InitError::XavierRank(vec![4])));
        assert_eq!(init_values(&InitSpec::Xavier { gain: 1.0 }, &[0, 0], "w", 0), Err(InitError::XavierEmpty));
        assert!(matches!(init_values(&InitSpec::Ones, &[usize::MAX, 2], "w", 0), Err(InitError::TooLarge(_))));
    }
}
