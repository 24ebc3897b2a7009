//! A rewrite of the kernel IR for GPUs: row kernels become block kernels whose threads
//! share each row's vector loops, so that neighbouring threads touch neighbouring
//! elements (coalesced memory access) instead of each thread walking a row of its own.
//!
//! ```text
//! parallel r in 0..R {                    parallel block r in 0..R, threads 0..T {
//!   let m = f(r)                            let m = f(r)           (every thread)
//!   for vector c in 0..E {          →       for cc in 0..ceil(E/T) {
//!     out[r, c] = g(x[r, c], m)               let c = cc·T + thread
//!   }                                         if c < E { out[r, c] = g(x[r, c], m) }
//! }                                         }
//!                                         }
//! ```
//!
//! A vector loop's iterations are independent by definition (`LoopKind::Vector`), so
//! dealing them to threads is always correct. Row reductions become block reductions:
//!
//! ```text
//! var s = 0; var comp = 0                 var s = 0; var comp = 0
//! for x in 0..E {                         for xx in 0..ceil(E/T) { x = xx·T + thread; if x < E { … } }
//!   … s, comp ← Kahan(s, comp, f(x))  →   red[thread] = s − comp;  barrier
//! }                                       for h = T/2, T/4, …, 1: if thread < h { red[thread] += red[thread + h] }; barrier
//!                                         s = red[0]; comp = 0;  barrier
//! ```
//!
//! for a serial loop at the top of the body that only updates accumulators declared
//! before it, each as `a = a ⊕ e` (⊕ = +, max, min, starting at its identity) or a Kahan
//! sum; each thread then reduces a strided part of the row and one shared array combines
//! the parts. Other reductions (an online logsumexp carrying a maximum and a sum) and
//! lets outside the vector loops are computed by every thread, redundantly but without
//! any communication; a row's own results stored outside any loop (a per-token loss) are
//! stored by thread 0. Kernels that stage values in local arrays (a thread would read
//! another's elements), that store inside other loops, or that read and write one buffer
//! other than element by element in a single vector loop, are left as they are. CPU
//! schedules are not rewritten.

use super::ir::{Binary, Expr, Kernel, LoopKind, Scalar, Stmt, Var};
use std::collections::HashMap;

/// Threads per block at most (four warps).
pub const MAX_THREADS: u32 = 128;

/// `k` as a block kernel when it qualifies (see the module notes), else unchanged.
pub fn coalesce_rows(k: &Kernel) -> Kernel {
    if k.gemm.is_some() || k.threads.is_some() {
        return k.clone();
    }
    let Some(parts) = plan(k) else { return k.clone() };
    let threads = threads_for(&k.body, &parts);
    let mut next = k.next_var();
    let red = Var(next);
    next += 1;
    let mut body = Vec::new();
    for (s, part) in k.body.iter().zip(&parts) {
        match part {
            Part::Deal => body.push(deal(s, threads, &mut next)),
            Part::Reduce(accumulators) => {
                body.push(deal_serial(s, threads, &mut next));
                for &a in accumulators {
                    combine(&mut body, red, a, threads);
                }
            }
            Part::FirstThread => body.push(Stmt::If {
                cond: Expr::Binary(Binary::Eq, Box::new(Expr::Thread), Box::new(Expr::I64(0))),
                then: vec![s.clone()],
                otherwise: Vec::new(),
            }),
            Part::Every => body.push(s.clone()),
        }
    }
    if parts.iter().any(|p| matches!(p, Part::Reduce(_))) {
        body.insert(0, Stmt::Shared { var: red, elem: Scalar::F32, len: threads as usize });
    }
    Kernel { body, threads: Some(threads), ..k.clone() }
}

/// How a top-level statement of a row kernel runs in a block.
enum Part {
    /// A vector loop, its iterations dealt to the threads.
    Deal,
    /// A row reduction, dealt and combined across the block.
    Reduce(Vec<Accumulator>),
    /// Stores of the row's own results outside any loop: one thread does them.
    FirstThread,
    /// Everything else (lets, other reductions): every thread, redundantly.
    Every,
}

/// The part each top-level statement plays, or `None` when the kernel does not qualify:
/// local arrays, stores inside loops that are not vector loops, a buffer both read and
/// written other than element by element in one vector loop (a thread could read what
/// another has overwritten, with no barrier between), or nothing to deal.
fn plan(k: &Kernel) -> Option<Vec<Part>> {
    let mut inits: HashMap<Var, Expr> = HashMap::new();
    let mut parts = Vec::new();
    for s in &k.body {
        if let Stmt::Mut { var, init, .. } = s {
            inits.insert(*var, init.clone());
        }
        let one = std::slice::from_ref(s);
        if uses_arrays(one) {
            return None;
        }
        let fx = Effects::of(one);
        parts.push(match s {
            // Dealt as independent iterations: none may update a variable declared outside.
            Stmt::For { kind: LoopKind::Vector, .. } if fx.outer_assigns().next().is_some() => return None,
            Stmt::For { kind: LoopKind::Vector, .. } => Part::Deal,
            _ => match reduction(s, &inits, true) {
                Some(accumulators) => Part::Reduce(accumulators),
                None if !writes_memory(one) => Part::Every,
                // Only stores: a variable assigned here too would differ between threads.
                None if !has_loop(one) && fx.assigns.is_empty() => Part::FirstThread,
                None => return None,
            },
        });
        // A variable assigned here no longer holds its declared value: a later loop
        // accumulating into it does not start from an identity (a carried sum).
        for (v, _) in &fx.assigns {
            inits.remove(v);
        }
    }
    let in_place: Vec<usize> =
        (0..k.buffers.len()).filter(|&b| k.buffers[b].access == super::ir::Access::ReadWrite).collect();
    for b in in_place {
        let touching: Vec<usize> = (0..parts.len()).filter(|&i| touches(std::slice::from_ref(&k.body[i]), b)).collect();
        if touching.len() > 1 || touching.iter().any(|&i| !matches!(parts[i], Part::Deal)) {
            return None;
        }
    }
    parts.iter().any(|p| matches!(p, Part::Deal | Part::Reduce(_))).then_some(parts)
}

fn has_loop(body: &[Stmt]) -> bool {
    body.iter().any(|s| match s {
        Stmt::For { .. } => true,
        Stmt::If { then, otherwise, .. } => has_loop(then) || has_loop(otherwise),
        _ => false,
    })
}

/// Whether `body` loads from or stores to buffer `b`.
fn touches(body: &[Stmt], b: usize) -> bool {
    fn loads(e: &Expr, b: usize) -> bool {
        match e {
            Expr::Load { buffer, index } => *buffer == b || loads(index, b),
            Expr::F32(_) | Expr::I64(_) | Expr::Bool(_) | Expr::Var(_) | Expr::Size(_) | Expr::Thread => false,
            Expr::LoadArray { index, .. } => loads(index, b),
            Expr::Unary(_, x) | Expr::Cast(_, x) => loads(x, b),
            Expr::Binary(_, x, y) => loads(x, b) || loads(y, b),
            Expr::Select(c, x, y) | Expr::MulAdd(c, x, y) => loads(c, b) || loads(x, b) || loads(y, b),
            Expr::DropoutKeep { seed, index, step, .. } => loads(seed, b) || loads(index, b) || loads(step, b),
        }
    }
    body.iter().any(|s| match s {
        Stmt::Store { buffer, index, value } => *buffer == b || loads(index, b) || loads(value, b),
        Stmt::For { extent, body, .. } => loads(extent, b) || touches(body, b),
        Stmt::If { cond, then, otherwise } => loads(cond, b) || touches(then, b) || touches(otherwise, b),
        Stmt::Let { value, .. } | Stmt::Assign { value, .. } => loads(value, b),
        Stmt::Mut { init, .. } => loads(init, b),
        Stmt::StoreArray { index, value, .. } => loads(index, b) || loads(value, b),
        Stmt::Array { .. } | Stmt::Shared { .. } | Stmt::Barrier | Stmt::Mma { .. } => false,
    })
}

/// An accumulator of a row reduction: the variable, how partial results combine, and
/// the Kahan compensation carried with it (a sum).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Accumulator {
    pub(crate) var: Var,
    pub(crate) op: Binary,
    pub(crate) comp: Option<Var>,
}

/// The accumulators of `s` when it is a serial loop whose only effects are updates of
/// accumulators declared before it (`inits`), each one `a = a ⊕ e` with ⊕ ∈ {+, max, min},
/// or a Kahan sum (`y = e − comp; t = a + y; comp = (t − a) − y; a = t`), and which the
/// loop reads nowhere else. With `from_identity`, each must also start from ⊕'s identity
/// (a Kahan sum and its compensation from 0): partial results of a block's threads each
/// start from the accumulator's value, which must then add nothing.
pub(crate) fn reduction(s: &Stmt, inits: &HashMap<Var, Expr>, from_identity: bool) -> Option<Vec<Accumulator>> {
    let Stmt::For { kind: LoopKind::Serial, body, .. } = s else { return None };
    if writes_memory(body) || uses_arrays(body) {
        return None;
    }
    let fx = Effects::of(body);
    let (lets, reads) = (&fx.lets, &fx.reads);
    let outer: Vec<&(Var, Expr)> = fx.outer_assigns().collect();
    let once = |v: Var| outer.iter().filter(|(w, _)| *w == v).count() == 1;
    let reads_of = |v: Var| reads.get(&v).copied().unwrap_or(0);
    let zero = Expr::F32(0.0);
    let mut found: Vec<Accumulator> = Vec::new();
    let mut comps: Vec<Var> = Vec::new();
    if outer.iter().any(|(v, _)| !inits.contains_key(v) || !once(*v)) {
        return None;
    }
    // Kahan sums: `a = t` with `t = a + y`, `y = e − comp`, `comp = (t − a) − y`.
    for (a, value) in &outer {
        let Expr::Var(t) = value else { continue };
        let Some(Expr::Binary(Binary::Add, x, y)) = lets.get(t) else { return None };
        let (Expr::Var(x), Expr::Var(y)) = (&**x, &**y) else { return None };
        let Some(Expr::Binary(Binary::Sub, _, c)) = lets.get(y) else { return None };
        let Expr::Var(c) = &**c else { return None };
        let expected = Expr::Binary(
            Binary::Sub,
            Box::new(Expr::Binary(Binary::Sub, Box::new(Expr::Var(*t)), Box::new(Expr::Var(*a)))),
            Box::new(Expr::Var(*y)),
        );
        let comp_updated = outer.iter().any(|(v, e)| v == c && *e == expected);
        let zeros = !from_identity || (inits[a] == zero && inits.get(c) == Some(&zero));
        // `t` and `y` feed only this update (not, say, a running sum of their own).
        let private = reads_of(*t) == 2 && reads_of(*y) == 2;
        if x != a || !comp_updated || !zeros || !private || reads_of(*a) != 2 || reads_of(*c) != 1 {
            return None;
        }
        found.push(Accumulator { var: *a, op: Binary::Add, comp: Some(*c) });
        comps.push(*c);
    }
    // Plain updates `a = a ⊕ e`, `a` read once (in its own update), from ⊕'s identity.
    for (a, value) in &outer {
        if comps.contains(a) || found.iter().any(|f| f.var == *a) {
            continue;
        }
        let Expr::Binary(op @ (Binary::Add | Binary::Max | Binary::Min), x, y) = value else { return None };
        let other = if **x == Expr::Var(*a) {
            y
        } else if **y == Expr::Var(*a) {
            x
        } else {
            return None;
        };
        let identity = match op {
            Binary::Add => zero.clone(),
            Binary::Max => Expr::F32(f32::NEG_INFINITY),
            _ => Expr::F32(f32::INFINITY),
        };
        let mut mentions = false;
        other.visit_vars(&mut |v| mentions |= v == *a);
        if mentions || reads_of(*a) != 1 || (from_identity && inits[a] != identity) {
            return None;
        }
        found.push(Accumulator { var: *a, op: *op, comp: None });
    }
    // Every outer variable the loop writes is an accumulator or a compensation.
    let covered = |v: &Var| found.iter().any(|f| f.var == *v) || comps.contains(v);
    (!found.is_empty() && outer.iter().all(|(v, _)| covered(v))).then_some(found)
}

/// What a statement list does with variables (nested statements included). Stores and
/// arrays are not looked at (callers check them).
#[derive(Default)]
struct Effects {
    lets: HashMap<Var, Expr>,
    /// Assignments, in order.
    assigns: Vec<(Var, Expr)>,
    /// Variables declared inside: accumulators and loop indices.
    locals: Vec<Var>,
    /// How often each variable is read.
    reads: HashMap<Var, usize>,
}

impl Effects {
    fn of(body: &[Stmt]) -> Effects {
        let mut fx = Effects::default();
        fx.add(body);
        fx
    }

    /// Assignments to variables declared outside the statements.
    fn outer_assigns(&self) -> impl Iterator<Item = &(Var, Expr)> {
        self.assigns.iter().filter(|(v, _)| !self.locals.contains(v))
    }

    fn read(&mut self, e: &Expr) {
        e.visit_vars(&mut |v| *self.reads.entry(v).or_default() += 1);
    }

    fn add(&mut self, body: &[Stmt]) {
        for s in body {
            match s {
                Stmt::Let { var, value } => {
                    self.read(value);
                    self.lets.insert(*var, value.clone());
                }
                Stmt::Mut { var, init, .. } => {
                    self.read(init);
                    self.locals.push(*var);
                }
                Stmt::Assign { var, value } => {
                    self.read(value);
                    self.assigns.push((*var, value.clone()));
                }
                Stmt::For { var, extent, body, .. } => {
                    self.read(extent);
                    self.locals.push(*var);
                    self.add(body);
                }
                Stmt::If { cond, then, otherwise } => {
                    self.read(cond);
                    self.add(then);
                    self.add(otherwise);
                }
                _ => {}
            }
        }
    }
}

/// The threads' partial results of `a` combined through the shared array `red`: a tree
/// of halvings (T need not be a power of two), every thread then reads the total.
fn combine(body: &mut Vec<Stmt>, red: Var, a: Accumulator, threads: u32) {
    let at = |i: Expr| Expr::load_array(red, i);
    let partial = match a.comp {
        Some(c) => Expr::binary(Binary::Sub, Expr::Var(a.var), Expr::Var(c)),
        None => Expr::Var(a.var),
    };
    body.push(Stmt::StoreArray { array: red, index: Expr::Thread, value: partial });
    body.push(Stmt::Barrier);
    let mut half = threads.next_power_of_two() / 2;
    while half >= 1 {
        let h = Expr::I64(i64::from(half));
        let partner = Expr::binary(Binary::Add, Expr::Thread, h.clone());
        let cond = Expr::binary(
            Binary::And,
            Expr::binary(Binary::Lt, Expr::Thread, h),
            Expr::binary(Binary::Lt, partner.clone(), Expr::I64(i64::from(threads))),
        );
        let value = Expr::binary(a.op, at(Expr::Thread), at(partner));
        body.push(Stmt::If {
            cond,
            then: vec![Stmt::StoreArray { array: red, index: Expr::Thread, value }],
            otherwise: Vec::new(),
        });
        body.push(Stmt::Barrier);
        half /= 2;
    }
    body.push(Stmt::Assign { var: a.var, value: at(Expr::I64(0)) });
    if let Some(c) = a.comp {
        body.push(Stmt::Assign { var: c, value: Expr::F32(0.0) });
    }
    // Nobody writes `red` again before every thread has read the total.
    body.push(Stmt::Barrier);
}

/// A serial reduction loop dealt to the threads like a vector loop.
fn deal_serial(s: &Stmt, threads: u32, next: &mut u32) -> Stmt {
    let Stmt::For { var, extent, body, .. } = s else { return s.clone() };
    deal(&Stmt::For { var: *var, extent: extent.clone(), kind: LoopKind::Vector, body: body.clone() }, threads, next)
}

/// One warp per 32 elements of the widest constant loop it deals (vector loops and
/// reductions), up to [`MAX_THREADS`]; [`MAX_THREADS`] when a loop's extent is only
/// known at run time.
fn threads_for(body: &[Stmt], parts: &[Part]) -> u32 {
    let mut widest = 0i64;
    for (s, part) in body.iter().zip(parts) {
        if let (Stmt::For { extent, .. }, Part::Deal | Part::Reduce(_)) = (s, part) {
            widest = widest.max(match extent {
                Expr::I64(e) => *e,
                _ => i64::from(MAX_THREADS),
            });
        }
    }
    let warps = (widest.clamp(1, i64::from(MAX_THREADS)) + 31) / 32;
    (warps * 32) as u32
}

fn deal(s: &Stmt, threads: u32, next: &mut u32) -> Stmt {
    let Stmt::For { var, extent, kind: LoopKind::Vector, body } = s else { return s.clone() };
    let t = i64::from(threads);
    let round = Var(*next);
    *next += 1;
    let rounds = Expr::binary(Binary::Div, Expr::binary(Binary::Add, extent.clone(), Expr::I64(t - 1)), Expr::I64(t));
    let column = Expr::binary(Binary::Add, Expr::binary(Binary::Mul, Expr::Var(round), Expr::I64(t)), Expr::Thread);
    Stmt::For {
        var: round,
        extent: rounds,
        kind: LoopKind::Serial,
        body: vec![
            Stmt::Let { var: *var, value: column },
            Stmt::If {
                cond: Expr::binary(Binary::Lt, Expr::Var(*var), extent.clone()),
                then: body.clone(),
                otherwise: vec![],
            },
        ],
    }
}

fn writes_memory(body: &[Stmt]) -> bool {
    body.iter().any(|s| match s {
        Stmt::Store { .. } => true,
        Stmt::For { body, .. } => writes_memory(body),
        Stmt::If { then, otherwise, .. } => writes_memory(then) || writes_memory(otherwise),
        _ => false,
    })
}

fn uses_arrays(body: &[Stmt]) -> bool {
    body.iter().any(|s| match s {
        Stmt::Array { .. } | Stmt::StoreArray { .. } | Stmt::Shared { .. } | Stmt::Barrier | Stmt::Mma { .. } => true,
        Stmt::For { extent, body, .. } => reads_array(extent) || uses_arrays(body),
        Stmt::If { cond, then, otherwise } => reads_array(cond) || uses_arrays(then) || uses_arrays(otherwise),
        Stmt::Let { value, .. } | Stmt::Assign { value, .. } => reads_array(value),
        Stmt::Mut { init, .. } => reads_array(init),
        Stmt::Store { index, value, .. } => reads_array(index) || reads_array(value),
    })
}

fn reads_array(e: &Expr) -> bool {
    match e {
        Expr::LoadArray { .. } => true,
        Expr::F32(_) | Expr::I64(_) | Expr::Bool(_) | Expr::Var(_) | Expr::Size(_) | Expr::Thread => false,
        Expr::Load { index, .. } => reads_array(index),
        Expr::Unary(_, a) | Expr::Cast(_, a) => reads_array(a),
        Expr::Binary(_, a, b) => reads_array(a) || reads_array(b),
        Expr::Select(c, a, b) | Expr::MulAdd(c, a, b) => reads_array(c) || reads_array(a) || reads_array(b),
        Expr::DropoutKeep { seed, index, step, .. } => reads_array(seed) || reads_array(index) || reads_array(step),
    }
}
