//! The emitter: builds one kernel's statements, placing every computed value at the
//! outermost loop level where all the loop variables it uses are bound. That one rule is
//! loop-invariant code motion and common-subexpression elimination at once: a row's
//! `sum(x²)` lands outside the loop over the row's elements, a broadcast operand's load
//! outside the loop it is broadcast along, and a value used twice is computed once.

use crate::ir::Dim;
use crate::kernel::{Access, BufferDecl, Elem, Expr, LoopKind, Scalar, Stmt, Var};
use std::collections::HashMap;

/// Loop levels set aside while emitting at an outer level.
pub struct Aside {
    levels: Vec<Vec<Stmt>>,
    vars: Vec<(Var, usize)>,
    memo: Vec<(String, (Expr, usize))>,
}

pub struct Emitter {
    next_var: u32,
    /// Statement lists of the open loop levels; level 0 is the kernel body.
    levels: Vec<Vec<Stmt>>,
    var_level: HashMap<Var, usize>,
    /// Values already bound, by a caller-chosen key, with the level they live at.
    memo: HashMap<String, (Expr, usize)>,
    /// Accumulators (declared with `Mut`).
    mutable: std::collections::HashSet<Var>,
    pub buffers: Vec<BufferDecl>,
    buffer_ids: HashMap<usize, usize>,
    /// Global buffer id of each kernel buffer, parallel to `buffers`.
    pub bindings: Vec<usize>,
    sizes: Vec<String>,
    pub index: Var,
}

impl Emitter {
    /// A kernel with the run-time `sizes` (size symbols, then scalars).
    pub fn new(sizes: &[String]) -> Emitter {
        let mut e = Emitter {
            next_var: 0,
            levels: vec![Vec::new()],
            var_level: HashMap::new(),
            memo: HashMap::new(),
            mutable: Default::default(),
            buffers: Vec::new(),
            buffer_ids: HashMap::new(),
            bindings: Vec::new(),
            sizes: sizes.to_vec(),
            index: Var(0),
        };
        e.index = e.fresh();
        e.var_level.insert(e.index, 0);
        e
    }

    pub fn fresh(&mut self) -> Var {
        self.next_var += 1;
        Var(self.next_var - 1)
    }

    pub fn depth(&self) -> usize {
        self.levels.len() - 1
    }

    /// The kernel-local index of global buffer `global`, declaring it on first use.
    pub fn buffer(&mut self, global: usize, name: &str, elem: Elem, access: Access) -> usize {
        if let Some(&i) = self.buffer_ids.get(&global) {
            let b = &mut self.buffers[i];
            if b.access != access {
                b.access = Access::ReadWrite;
            }
            return i;
        }
        self.buffers.push(BufferDecl { name: name.to_string(), elem, access });
        self.bindings.push(global);
        self.buffer_ids.insert(global, self.buffers.len() - 1);
        self.buffers.len() - 1
    }

    /// The run-time arguments, in order.
    pub fn sizes_list(&self) -> Vec<String> {
        self.sizes.clone()
    }

    /// The size symbol `name` as an expression.
    pub fn size(&self, name: &str) -> Result<Expr, String> {
        self.sizes.iter().position(|s| s == name).map(Expr::Size).ok_or_else(|| format!("unknown size `{name}`"))
    }

    /// A size polynomial as an I64 expression.
    pub fn dim(&self, d: &Dim) -> Result<Expr, String> {
        let mut total: Option<Expr> = None;
        for (coeff, atoms) in d.terms() {
            let mut term = if coeff == 1 && !atoms.is_empty() { None } else { Some(Expr::I64(coeff)) };
            for a in atoms {
                let x = match a {
                    crate::ir::dim::Atom::Sym(s) => self.size(s)?,
                    crate::ir::dim::Atom::CeilDiv(p, k) => {
                        let p = self.dim(p)?;
                        div(add(p, Expr::I64(k - 1)), Expr::I64(*k))
                    }
                };
                term = Some(match term {
                    None => x,
                    Some(t) => mul(t, x),
                });
            }
            let term = term.unwrap_or(Expr::I64(coeff));
            total = Some(match total {
                None => term,
                Some(t) => add(t, term),
            });
        }
        Ok(total.unwrap_or(Expr::I64(0)))
    }

    /// The loop level an expression can be computed at. An expression that reads a
    /// mutable variable stays where it is: its value changes as loops run.
    pub fn level_of(&self, e: &Expr) -> usize {
        let mut l = 0;
        let mut reads_mutable = false;
        e.visit_vars(&mut |v| {
            reads_mutable |= self.mutable.contains(&v);
            l = l.max(self.var_level.get(&v).copied().unwrap_or(0));
        });
        if reads_mutable {
            self.depth()
        } else {
            l
        }
    }

    /// Bind `e` to a variable at the outermost level it can live at.
    pub fn bind(&mut self, e: Expr) -> Expr {
        if matches!(e, Expr::Var(_) | Expr::F32(_) | Expr::I64(_) | Expr::Bool(_) | Expr::Size(_)) {
            return e;
        }
        // The same expression bound earlier (and still in scope) is reused.
        let key = format!("={e:?}");
        if let Some((v, _)) = self.memo.get(&key) {
            return v.clone();
        }
        let l = self.level_of(&e);
        let v = self.fresh();
        self.levels[l].push(Stmt::Let { var: v, value: e });
        self.var_level.insert(v, l);
        self.memo.insert(key, (Expr::Var(v), l));
        Expr::Var(v)
    }

    pub fn memo_get(&self, key: &str) -> Option<Expr> {
        self.memo.get(key).map(|(e, _)| e.clone())
    }

    pub fn memo_put(&mut self, key: String, e: Expr) {
        let l = self.level_of(&e);
        self.memo.insert(key, (e, l));
    }

    /// Emit a statement at the current (innermost) level.
    pub fn push(&mut self, s: Stmt) {
        self.levels.last_mut().expect("level 0 always exists").push(s);
    }

    /// Open `for var in 0..extent`; returns the loop variable.
    pub fn open(&mut self) -> Var {
        let v = self.fresh();
        self.levels.push(Vec::new());
        self.var_level.insert(v, self.depth());
        v
    }

    /// Close the innermost loop.
    pub fn close(&mut self, var: Var, extent: Expr, kind: LoopKind) {
        let body = self.levels.pop().expect("a loop is open");
        let d = self.depth();
        self.memo.retain(|_, (_, l)| *l <= d);
        self.var_level.retain(|_, l| *l <= d);
        self.push(Stmt::For { var, extent, kind, body });
    }

    /// Emit into `level` as if it were the innermost level (for loops placed outside the
    /// loops currently open); returns the levels set aside, for [`Emitter::leave`].
    pub fn enter(&mut self, level: usize) -> Aside {
        let levels = self.levels.split_off(level + 1);
        // The set-aside levels' variables and values are out of reach meanwhile.
        let vars: Vec<(Var, usize)> =
            self.var_level.iter().filter(|(_, l)| **l > level).map(|(v, l)| (*v, *l)).collect();
        self.var_level.retain(|_, l| *l <= level);
        let memo: Vec<(String, (Expr, usize))> =
            self.memo.iter().filter(|(_, (_, l))| *l > level).map(|(k, v)| (k.clone(), v.clone())).collect();
        self.memo.retain(|_, (_, l)| *l <= level);
        Aside { levels, vars, memo }
    }

    /// Restore the levels set aside by [`Emitter::enter`].
    pub fn leave(&mut self, aside: Aside) {
        self.levels.extend(aside.levels);
        self.var_level.extend(aside.vars);
        self.memo.extend(aside.memo);
    }

    /// A mutable accumulator declared at `level`.
    pub fn accumulator(&mut self, level: usize, ty: Scalar, init: Expr) -> Var {
        let v = self.fresh();
        self.mutable.insert(v);
        self.levels[level].push(Stmt::Mut { var: v, ty, init });
        self.var_level.insert(v, level);
        v
    }

    /// A zero-initialized local f32 array of `len` elements declared at the current
    /// level. Its contents change as loops run, so nothing that reads it is hoisted.
    pub fn array(&mut self, len: usize) -> Var {
        let v = self.fresh();
        self.mutable.insert(v);
        self.var_level.insert(v, self.depth());
        self.push(Stmt::Array { var: v, elem: Scalar::F32, len });
        v
    }

    /// A block's shared f32 array of `len` elements (block kernels), declared in the
    /// kernel body. Like a local array, nothing that reads it is hoisted.
    pub fn shared(&mut self, len: usize) -> Var {
        let v = self.fresh();
        self.mutable.insert(v);
        self.var_level.insert(v, 0);
        self.levels[0].push(Stmt::Shared { var: v, elem: Scalar::F32, len });
        v
    }

    /// Open `if cond { let var = value; … }` (the condition is given to
    /// [`Emitter::close_if`]): a level of its own, so that everything computed from `var`
    /// — a load at a guarded index — stays below the test.
    pub fn open_if(&mut self, value: Expr) -> Var {
        let v = self.fresh();
        self.levels.push(vec![Stmt::Let { var: v, value }]);
        self.var_level.insert(v, self.depth());
        v
    }

    /// Close the innermost `if` opened by [`Emitter::open_if`].
    pub fn close_if(&mut self, cond: Expr) {
        let then = self.levels.pop().expect("an `if` is open");
        let d = self.depth();
        self.memo.retain(|_, (_, l)| *l <= d);
        self.var_level.retain(|_, l| *l <= d);
        self.push(Stmt::If { cond, then, otherwise: Vec::new() });
    }

    /// An accumulator whose loop has finished: from now on its value no longer changes,
    /// so expressions reading it may be placed at its level again.
    pub fn freeze(&mut self, var: Var) {
        self.mutable.remove(&var);
    }

    /// Take the finished kernel body.
    pub fn finish(mut self) -> (Vec<Stmt>, Vec<BufferDecl>, Vec<usize>, Var) {
        assert_eq!(self.levels.len(), 1, "every loop is closed");
        (self.levels.pop().expect("level 0"), self.buffers, self.bindings, self.index)
    }
}

// Small constructors that fold the trivial cases of index arithmetic.
pub fn add(a: Expr, b: Expr) -> Expr {
    match (&a, &b) {
        (Expr::I64(0), _) => b,
        (_, Expr::I64(0)) => a,
        (Expr::I64(x), Expr::I64(y)) => Expr::I64(x + y),
        _ => Expr::Binary(crate::kernel::Binary::Add, Box::new(a), Box::new(b)),
    }
}

pub fn sub(a: Expr, b: Expr) -> Expr {
    match (&a, &b) {
        (_, Expr::I64(0)) => a,
        (Expr::I64(x), Expr::I64(y)) => Expr::I64(x - y),
        _ => Expr::Binary(crate::kernel::Binary::Sub, Box::new(a), Box::new(b)),
    }
}

pub fn mul(a: Expr, b: Expr) -> Expr {
    match (&a, &b) {
        (Expr::I64(1), _) => b,
        (_, Expr::I64(1)) => a,
        (Expr::I64(0), _) | (_, Expr::I64(0)) => Expr::I64(0),
        (Expr::I64(x), Expr::I64(y)) => Expr::I64(x * y),
        _ => Expr::Binary(crate::kernel::Binary::Mul, Box::new(a), Box::new(b)),
    }
}

pub fn div(a: Expr, b: Expr) -> Expr {
    match (&a, &b) {
        (_, Expr::I64(1)) => a,
        (Expr::I64(x), Expr::I64(y)) if *y != 0 => Expr::I64(x / y),
        _ => Expr::Binary(crate::kernel::Binary::Div, Box::new(a), Box::new(b)),
    }
}

pub fn rem(a: Expr, b: Expr) -> Expr {
    match (&a, &b) {
        (_, Expr::I64(1)) => Expr::I64(0),
        _ => Expr::Binary(crate::kernel::Binary::Rem, Box::new(a), Box::new(b)),
    }
}

pub fn bin(op: crate::kernel::Binary, a: Expr, b: Expr) -> Expr {
    Expr::binary(op, a, b)
}
