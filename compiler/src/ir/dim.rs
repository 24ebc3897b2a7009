//! Symbolic sizes. A [`Dim`] is a polynomial with integer coefficients over atoms, where an
//! atom is a run-time symbol (`B`, `N`) or `ceil(p / k)` of a polynomial `p` that `k` does
//! not divide. That is enough for everything a TransNormer needs: `D / heads` (exact, checked),
//! padding `N` up to a block (`64*ceil(N/64)`), width doubling (`2*E`), `N - 1` for shifted
//! targets, and products for flattening. Two sizes are equal exactly when their normal
//! forms are equal, so shape checking is structural equality.
//!
//! All arithmetic is checked: an overflow is `None`, which callers report as a diagnostic.

use std::collections::BTreeMap;
use std::fmt;

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Atom {
    Sym(String),
    /// `ceil(p / k)` with `k > 1` and `p` not divisible by `k`.
    CeilDiv(Box<Dim>, i64),
}

/// A monomial is a sorted list of atoms (with repetition); the empty monomial is 1.
type Monomial = Vec<Atom>;

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Dim {
    terms: BTreeMap<Monomial, i64>,
}

impl Dim {
    pub fn constant(c: i64) -> Dim {
        let mut terms = BTreeMap::new();
        if c != 0 {
            terms.insert(Vec::new(), c);
        }
        Dim { terms }
    }

    pub fn sym(name: impl Into<String>) -> Dim {
        Dim::atom(Atom::Sym(name.into()))
    }

    fn atom(a: Atom) -> Dim {
        let mut terms = BTreeMap::new();
        terms.insert(vec![a], 1);
        Dim { terms }
    }

    /// The terms `coefficient · atom · atom …` (the constant has no atoms).
    pub fn terms(&self) -> Vec<(i64, &[Atom])> {
        self.terms.iter().map(|(m, c)| (*c, m.as_slice())).collect()
    }

    /// The value if this size does not depend on any run-time symbol.
    pub fn as_const(&self) -> Option<i64> {
        match self.terms.len() {
            0 => Some(0),
            1 => self.terms.get(&Vec::new()).copied(),
            _ => None,
        }
    }

    pub fn is_const(&self) -> bool {
        self.as_const().is_some()
    }

    pub fn checked_add(&self, other: &Dim) -> Option<Dim> {
        let mut terms = self.terms.clone();
        for (m, c) in &other.terms {
            let e = terms.entry(m.clone()).or_insert(0);
            *e = e.checked_add(*c)?;
            if *e == 0 {
                terms.remove(m);
            }
        }
        Some(Dim { terms })
    }

    pub fn checked_neg(&self) -> Option<Dim> {
        self.checked_scale(-1)
    }

    pub fn checked_sub(&self, other: &Dim) -> Option<Dim> {
        self.checked_add(&other.checked_neg()?)
    }

    pub fn checked_scale(&self, k: i64) -> Option<Dim> {
        if k == 0 {
            return Some(Dim::constant(0));
        }
        let mut terms = BTreeMap::new();
        for (m, c) in &self.terms {
            terms.insert(m.clone(), c.checked_mul(k)?);
        }
        Some(Dim { terms })
    }

    pub fn checked_mul(&self, other: &Dim) -> Option<Dim> {
        let mut out = Dim::constant(0);
        for (ma, ca) in &self.terms {
            for (mb, cb) in &other.terms {
                let mut m: Monomial = ma.iter().chain(mb.iter()).cloned().collect();
                m.sort();
                let mut t = BTreeMap::new();
                t.insert(m, ca.checked_mul(*cb)?);
                out = out.checked_add(&Dim { terms: t })?;
            }
        }
        Some(out)
    }

    /// `self / k` when every coefficient is divisible by `k` (so the result is exact).
    pub fn div_exact(&self, k: i64) -> Option<Dim> {
        if k == 0 {
            return None;
        }
        let mut terms = BTreeMap::new();
        for (m, c) in &self.terms {
            if c % k != 0 {
                return None;
            }
            terms.insert(m.clone(), c / k);
        }
        Some(Dim { terms })
    }

    /// `ceil(self / k)` for `k > 0`. Exact when divisible, folded when constant.
    pub fn ceil_div(&self, k: i64) -> Option<Dim> {
        if k <= 0 {
            return None;
        }
        if let Some(d) = self.div_exact(k) {
            return Some(d);
        }
        if let Some(c) = self.as_const() {
            return Some(Dim::constant(c.checked_add(k - 1)?.div_euclid(k)));
        }
        Some(Dim::atom(Atom::CeilDiv(Box::new(self.clone()), k)))
    }

    /// The degree of this polynomial in the symbol `sym` (`ceil(p/k)` counts as `p`):
    /// `2` for `B*N*N + N`, `0` for a constant.
    pub fn degree_in(&self, sym: &str) -> u32 {
        self.terms
            .keys()
            .map(|m| {
                m.iter()
                    .map(|a| match a {
                        Atom::Sym(s) => u32::from(s == sym),
                        Atom::CeilDiv(d, _) => d.degree_in(sym),
                    })
                    .sum::<u32>()
            })
            .max()
            .unwrap_or(0)
    }

    /// `self ≥ other` for every value of the symbols ≥ 1, proven by a sufficient test:
    /// `self − other` has no negative coefficient (every atom is ≥ 0 there).
    pub fn dominates(&self, other: &Dim) -> bool {
        match self.checked_sub(other) {
            Some(d) => d.terms.values().all(|&c| c >= 0),
            None => false,
        }
    }

    /// The run-time symbols this size mentions.
    pub fn symbols(&self) -> Vec<String> {
        let mut out = Vec::new();
        for m in self.terms.keys() {
            for a in m {
                match a {
                    Atom::Sym(s) => out.push(s.clone()),
                    Atom::CeilDiv(d, _) => out.extend(d.symbols()),
                }
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// This size with the symbol `sym` replaced by `value` (`ceil(N/64)` at `N = 1` is
    /// `1`). `None` on overflow.
    pub fn substitute(&self, sym: &str, value: &Dim) -> Option<Dim> {
        let mut total = Dim::constant(0);
        for (m, c) in &self.terms {
            let mut t = Dim::constant(*c);
            for a in m {
                let v = match a {
                    Atom::Sym(s) if s == sym => value.clone(),
                    Atom::Sym(_) => Dim::atom(a.clone()),
                    Atom::CeilDiv(d, k) => d.substitute(sym, value)?.ceil_div(*k)?,
                };
                t = t.checked_mul(&v)?;
            }
            total = total.checked_add(&t)?;
        }
        Some(total)
    }

    /// Evaluate with run-time values for the symbols. `None` on a missing symbol or overflow.
    pub fn eval(&self, value_of: &dyn Fn(&str) -> Option<i64>) -> Option<i64> {
        let mut total: i64 = 0;
        for (m, c) in &self.terms {
            let mut t = *c;
            for a in m {
                let v = match a {
                    Atom::Sym(s) => value_of(s)?,
                    Atom::CeilDiv(d, k) => {
                        let x = d.eval(value_of)?;
                        x.checked_add(k - 1)?.div_euclid(*k)
                    }
                };
                t = t.checked_mul(v)?;
            }
            total = total.checked_add(t)?;
        }
        Some(total)
    }
}

impl From<i64> for Dim {
    fn from(c: i64) -> Dim {
        Dim::constant(c)
    }
}

impl fmt::Display for Atom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Atom::Sym(s) => write!(f, "{s}"),
            Atom::CeilDiv(d, k) => write!(f, "ceil(({d})/{k})"),
        }
    }
}

impl fmt::Display for Dim {
    /// Terms of higher degree first, the constant last: `B*N`, `64*ceil((N)/64)`, `N - 1`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.terms.is_empty() {
            return write!(f, "0");
        }
        let mut terms: Vec<(&Monomial, &i64)> = self.terms.iter().collect();
        terms.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(b.0)));
        for (i, (m, c)) in terms.iter().enumerate() {
            let (neg, mag) = (**c < 0, c.unsigned_abs());
            if i == 0 {
                if neg {
                    write!(f, "-")?;
                }
            } else {
                write!(f, " {} ", if neg { "-" } else { "+" })?;
            }
            let atoms: Vec<String> = m.iter().map(|a| a.to_string()).collect();
            match (mag, atoms.is_empty()) {
                (_, true) => write!(f, "{mag}")?,
                (1, false) => write!(f, "{}", atoms.join("*"))?,
                (_, false) => write!(f, "{mag}*{}", atoms.join("*"))?,
            }
        }
        Ok(())
    }
}

/// Print a shape as `[B, N, 512]`.
pub fn shape_to_string(shape: &[Dim]) -> String {
    let parts: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    format!("[{}]", parts.join(", "))
}

/// Product of a shape's sizes (`None` on overflow).
pub fn numel(shape: &[Dim]) -> Option<Dim> {
    shape.iter().try_fold(Dim::constant(1), |acc, d| acc.checked_mul(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_normalizes() {
        let n = Dim::sym("N");
        let b = Dim::sym("B");
        let bn = b.checked_mul(&n).unwrap();
        assert_eq!(bn, n.checked_mul(&b).unwrap());
        assert_eq!(bn.to_string(), "B*N");
        let e = n.checked_sub(&Dim::constant(1)).unwrap();
        assert_eq!(e.to_string(), "N - 1");
        assert_eq!(e.checked_add(&Dim::constant(1)).unwrap(), n);
        assert_eq!(Dim::constant(512).div_exact(8), Some(Dim::constant(64)));
        assert_eq!(Dim::constant(512).div_exact(7), None);
    }

    #[test]
    fn ceil_division_for_block_padding() {
        let n = Dim::sym("N");
        let blocks = n.ceil_div(64).unwrap();
        let padded = blocks.checked_scale(64).unwrap();
        assert_eq!(padded.to_string(), "64*ceil((N)/64)");
        // Padded length divided by the block is exact again.
        assert_eq!(padded.div_exact(64), Some(blocks.clone()));
        let v = |s: &str| if s == "N" { Some(130) } else { None };
        assert_eq!(padded.eval(&v), Some(192));
        assert_eq!(Dim::constant(130).ceil_div(64), Some(Dim::constant(3)));
        assert_eq!(n.checked_scale(64).unwrap().ceil_div(64), Some(n));
    }

    #[test]
    fn degree_and_dominance() {
        let n = Dim::sym("N");
        let b = Dim::sym("B");
        let quad = b.checked_mul(&n).unwrap().checked_mul(&n).unwrap().checked_add(&n).unwrap();
        assert_eq!(quad.degree_in("N"), 2);
        assert_eq!(quad.degree_in("B"), 1);
        assert_eq!(Dim::constant(7).degree_in("N"), 0);
        assert_eq!(n.ceil_div(64).unwrap().checked_scale(64).unwrap().degree_in("N"), 1);
        let bn = b.checked_mul(&n).unwrap();
        assert!(bn.dominates(&bn.checked_sub(&b).unwrap()));
        assert!(!bn.checked_sub(&b).unwrap().dominates(&bn));
        assert!(bn.dominates(&bn));
    }

    #[test]
    fn overflow_is_none() {
        let big = Dim::constant(i64::MAX);
        assert_eq!(big.checked_add(&Dim::constant(1)), None);
        assert_eq!(big.checked_mul(&Dim::constant(2)), None);
    }
}
