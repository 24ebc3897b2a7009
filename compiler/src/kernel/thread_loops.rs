//! A block kernel as a plain kernel: its threads become loops, so the CPU back end can
//! compile a GPU schedule for the host (the emulated GPU's fast path, `cli/emulated_gpu.rs`).
//!
//! The body of a block kernel is uniform structure — the kernel body, and loops or `if`s
//! that contain a barrier (which every thread of a block must reach together) — around
//! barrier-free statements, which each thread runs on its own. The rewrite keeps the
//! uniform structure and runs each run of barrier-free statements for thread 0, 1, …, T−1
//! in a loop, one thread to the end of the run before the next starts: one of the orders
//! a GPU allows between two barriers (for code without races, which the GPU-semantics
//! executor checks, every such order gives the same result). So:
//!
//! - a barrier disappears (the loops on either side of it are the synchronization);
//! - a shared array becomes a local array of the block (one per kernel iteration);
//! - `Expr::Thread` becomes the thread loop's variable;
//! - a variable or local array defined by a statement at the uniform level is visible to
//!   later statements of the same thread, so it becomes a per-thread array (`T` values,
//!   or `T × len` for an array) indexed by the thread; variables defined inside a
//!   barrier-free statement live only within it and stay scalars;
//! - a uniform loop's extent or an `if`'s condition is read from thread 0 (the
//!   GPU-semantics executor checks that every thread agrees).
//!
//! What the rewrite cannot see — races, uninitialized shared memory, thread-dependent
//! control flow around a barrier — is what the GPU-semantics executor checks; the
//! emulated GPU runs every kernel there first.

use super::gpu_exec::has_collective;
use super::ir::{Binary, Elem, Expr, Kernel, LoopKind, Scalar, Stmt, Unary, Var};
use super::mma;
use std::collections::HashMap;

/// `k` with its threads as loops (`k` itself when it is not a block kernel).
pub fn thread_loops(k: &Kernel) -> Result<Kernel, String> {
    let Some(threads) = k.threads else { return Ok(k.clone()) };
    let mut r = Rewrite {
        kernel: k,
        threads: threads as usize,
        next: k.next_var(),
        promoted: HashMap::new(),
        warp_matrices: None,
    };
    let mut types = Types::default();
    types.vars.insert(k.index, Scalar::I64);
    r.collect(&k.body, &mut types).map_err(|e| format!("kernel `{}`: {e}", k.name))?;
    let mut body: Vec<Stmt> = Vec::new();
    let mut promoted: Vec<_> = r.promoted.values().copied().collect();
    promoted.sort_by_key(|p| p.array.0);
    for p in promoted {
        body.push(Stmt::Array { var: p.array, elem: p.elem, len: p.len * r.threads });
    }
    let uniform = r.uniform(&k.body)?;
    if let Some((a, b)) = r.warp_matrices {
        let warps = r.threads / mma::WARP;
        body.push(Stmt::Array { var: a, elem: Scalar::F32, len: warps * mma::M * mma::K });
        body.push(Stmt::Array { var: b, elem: Scalar::F32, len: warps * mma::K * mma::N });
    }
    body.extend(uniform);
    Ok(Kernel { body, threads: None, ..k.clone() })
}

/// A per-thread variable or array's storage: `array[thread · len + i]`.
#[derive(Clone, Copy)]
struct Promoted {
    array: Var,
    elem: Scalar,
    /// 1 for a scalar variable; the array's length for an array.
    len: usize,
    is_array: bool,
    /// The index of the loop that zeroes a thread's array where it is declared.
    zeroing: Var,
}

/// The scalar type of every variable and array seen so far.
#[derive(Default)]
struct Types {
    vars: HashMap<Var, Scalar>,
    arrays: HashMap<Var, Scalar>,
}

impl Types {
    fn of(&self, k: &Kernel, e: &Expr) -> Result<Scalar, String> {
        Ok(match e {
            Expr::F32(_) => Scalar::F32,
            Expr::I64(_) | Expr::Size(_) | Expr::Thread => Scalar::I64,
            Expr::Bool(_) | Expr::DropoutKeep { .. } => Scalar::Bool,
            Expr::Var(v) => *self.vars.get(v).ok_or_else(|| format!("{v} is used before it is defined"))?,
            Expr::Load { buffer, .. } => {
                k.buffers.get(*buffer).ok_or_else(|| format!("buffer {buffer} is not declared"))?.elem.scalar()
            }
            Expr::LoadArray { array, .. } => {
                *self.arrays.get(array).ok_or_else(|| format!("array {array} is used before it is defined"))?
            }
            Expr::Unary(super::ir::Unary::Not, _) => Scalar::Bool,
            Expr::Unary(_, a) => self.of(k, a)?,
            Expr::Binary(op, a, _) => {
                use super::ir::Binary::*;
                match op {
                    Lt | Le | Gt | Ge | Eq | Ne | And | Or => Scalar::Bool,
                    _ => self.of(k, a)?,
                }
            }
            Expr::Select(_, a, _) | Expr::MulAdd(a, _, _) => self.of(k, a)?,
            Expr::Cast(to, _) => *to,
        })
    }

    /// Records what `s` and everything inside it define.
    fn define(&mut self, k: &Kernel, s: &Stmt) -> Result<(), String> {
        match s {
            Stmt::For { var, body, .. } => {
                self.vars.insert(*var, Scalar::I64);
                for s in body {
                    self.define(k, s)?;
                }
            }
            Stmt::Let { var, value } => {
                let t = self.of(k, value)?;
                self.vars.insert(*var, t);
            }
            Stmt::Mut { var, ty, .. } => {
                self.vars.insert(*var, *ty);
            }
            Stmt::Array { var, elem, .. } | Stmt::Shared { var, elem, .. } => {
                self.arrays.insert(*var, *elem);
            }
            Stmt::If { then, otherwise, .. } => {
                for s in then.iter().chain(otherwise) {
                    self.define(k, s)?;
                }
            }
            Stmt::Assign { .. } | Stmt::Store { .. } | Stmt::StoreArray { .. } | Stmt::Barrier | Stmt::Mma { .. } => {}
        }
        Ok(())
    }
}

/// A statement at the uniform level that the block's threads step through together.
fn is_uniform(s: &Stmt) -> bool {
    match s {
        Stmt::For { body, .. } => has_collective(body),
        Stmt::If { then, otherwise, .. } => has_collective(then) || has_collective(otherwise),
        Stmt::Barrier | Stmt::Shared { .. } | Stmt::Mma { .. } => true,
        _ => false,
    }
}

struct Rewrite<'k> {
    kernel: &'k Kernel,
    threads: usize,
    next: u32,
    /// Per-thread storage of every variable and array defined at the uniform level.
    promoted: HashMap<Var, Promoted>,
    /// Each warp's A and B of a warp's matrix product, once one is seen (`warp_products`).
    warp_matrices: Option<(Var, Var)>,
}

impl Rewrite<'_> {
    fn fresh(&mut self) -> Var {
        self.next += 1;
        Var(self.next - 1)
    }

    /// Finds the variables and arrays defined at the uniform level (and every type).
    fn collect(&mut self, body: &[Stmt], types: &mut Types) -> Result<(), String> {
        for s in body {
            match s {
                Stmt::For { var, body, .. } if is_uniform(s) => {
                    types.vars.insert(*var, Scalar::I64);
                    self.collect(body, types)?;
                }
                Stmt::If { then, otherwise, .. } if is_uniform(s) => {
                    self.collect(then, types)?;
                    self.collect(otherwise, types)?;
                }
                _ => {
                    types.define(self.kernel, s)?;
                    let (var, elem, len, is_array) = match s {
                        Stmt::Let { var, .. } | Stmt::Mut { var, .. } => (*var, types.vars[var], 1, false),
                        Stmt::Array { var, elem, len } => (*var, *elem, *len, true),
                        _ => continue,
                    };
                    if self.promoted.contains_key(&var) {
                        return Err(format!("{var} is defined twice at the block level"));
                    }
                    // Integers are i64 in registers whatever their declared width.
                    let elem = if elem == Scalar::I32 { Scalar::I64 } else { elem };
                    let (array, zeroing) = (self.fresh(), self.fresh());
                    self.promoted.insert(var, Promoted { array, elem, len, is_array, zeroing });
                }
            }
        }
        Ok(())
    }

    /// The uniform level: structure kept, barrier-free statements looped over threads.
    fn uniform(&mut self, body: &[Stmt]) -> Result<Vec<Stmt>, String> {
        let mut out = Vec::new();
        let thread0 = Expr::I64(0);
        // Consecutive barrier-free statements share one loop over threads: each thread
        // runs them all before the next starts, an order a GPU allows between collectives
        // (and far less code than a loop per statement).
        let mut run: Vec<&Stmt> = Vec::new();
        for s in body {
            if !is_uniform(s) {
                run.push(s);
                continue;
            }
            self.flush(&mut run, &mut out);
            match s {
                Stmt::Barrier => {}
                Stmt::Mma { input, acc, a, b } => out.extend(self.warp_products(*input, acc, a, b)?),
                Stmt::Shared { var, elem, len } => out.push(Stmt::Array { var: *var, elem: *elem, len: *len }),
                Stmt::For { var, extent, kind, body } => out.push(Stmt::For {
                    var: *var,
                    extent: self.expr(extent, &thread0),
                    kind: *kind,
                    body: self.uniform(body)?,
                }),
                Stmt::If { cond, then, otherwise } => out.push(Stmt::If {
                    cond: self.expr(cond, &thread0),
                    then: self.uniform(then)?,
                    otherwise: self.uniform(otherwise)?,
                }),
                _ => unreachable!("is_uniform"),
            }
        }
        self.flush(&mut run, &mut out);
        Ok(out)
    }

    /// A run of barrier-free statements as one loop over the block's threads.
    fn flush(&mut self, run: &mut Vec<&Stmt>, out: &mut Vec<Stmt>) {
        if run.is_empty() {
            return;
        }
        let t = self.fresh();
        let body = run.drain(..).flat_map(|s| self.thread_stmt(s, &Expr::Var(t))).collect();
        out.push(Stmt::For { var: t, extent: Expr::I64(self.threads as i64), kind: LoopKind::Serial, body });
    }

    /// A warp's matrix product for every warp of the block, as loops over threads: each
    /// thread stores its fragments of A and B, rounded, into its warp's copy of the two
    /// matrices (`kernel::mma`'s layouts), then each thread's accumulators gain the 16
    /// products of their row of A and column of B, k in order, as `mma::warp_product`
    /// adds them. Every fragment is a per-thread variable, since the product is at the
    /// block's uniform level.
    fn warp_products(&mut self, input: Elem, acc: &[Var; 4], a: &[Var; 8], b: &[Var; 4]) -> Result<Vec<Stmt>, String> {
        if !self.threads.is_multiple_of(mma::WARP) {
            return Err(format!("a warp's matrix product in a block of {} threads, not whole warps", self.threads));
        }
        let round = match input {
            Elem::BF16 => Unary::RoundBf16,
            Elem::F16 => Unary::RoundF16,
            other => return Err(format!("a warp's matrix product takes bf16 or f16 inputs, not {other:?}")),
        };
        let storage = |v: &Var| {
            let p = self.promoted.get(v).copied().filter(|p| !p.is_array);
            p.ok_or_else(|| format!("{v} of a warp's matrix product is not a per-thread variable"))
        };
        let acc = acc.iter().map(storage).collect::<Result<Vec<_>, _>>()?;
        let a = a.iter().map(storage).collect::<Result<Vec<_>, _>>()?;
        let b = b.iter().map(storage).collect::<Result<Vec<_>, _>>()?;
        // Each warp's A (16 × 16) and B (16 × 8), row-major, declared once per kernel.
        let (a_size, b_size) = ((mma::M * mma::K) as i64, (mma::K * mma::N) as i64);
        let (am, bm) = match self.warp_matrices {
            Some(m) => m,
            None => {
                let m = (self.fresh(), self.fresh());
                self.warp_matrices = Some(m);
                m
            }
        };
        let (bin, int) = (Expr::binary, Expr::I64);
        let add = |x: Expr, y: Expr| bin(Binary::Add, x, y);
        let mul = |x: Expr, y: Expr| bin(Binary::Mul, x, y);
        // Thread t: its warp, and its lane's base (`mma::lane_base`: group, 2·pair).
        let thread = |t: Var| {
            let lane = bin(Binary::Rem, Expr::Var(t), int(mma::WARP as i64));
            let warp = bin(Binary::Div, Expr::Var(t), int(mma::WARP as i64));
            let group = bin(Binary::Div, lane.clone(), int(4));
            let pair2 = mul(bin(Binary::Rem, lane, int(4)), int(2));
            (warp, group, pair2)
        };
        let value = |p: &Promoted, t: Var| Expr::Unary(round, Box::new(Expr::load_array(p.array, Expr::Var(t))));
        let t = self.fresh();
        let (warp, group, pair2) = thread(t);
        let mut stage = Vec::new();
        for (i, p) in a.iter().enumerate() {
            let (r, c) = mma::a_element(0, i);
            let (row, col) = (add(group.clone(), int(r as i64)), add(pair2.clone(), int(c as i64)));
            let index = add(mul(warp.clone(), int(a_size)), add(mul(row, int(mma::K as i64)), col));
            stage.push(Stmt::StoreArray { array: am, index, value: value(p, t) });
        }
        for (i, p) in b.iter().enumerate() {
            let (r, c) = mma::b_element(0, i);
            let (row, col) = (add(pair2.clone(), int(r as i64)), add(group.clone(), int(c as i64)));
            let index = add(mul(warp.clone(), int(b_size)), add(mul(row, int(mma::N as i64)), col));
            stage.push(Stmt::StoreArray { array: bm, index, value: value(p, t) });
        }
        let threads = int(self.threads as i64);
        let staged = Stmt::For { var: t, extent: threads.clone(), kind: LoopKind::Serial, body: stage };

        let t = self.fresh();
        let (warp, group, pair2) = thread(t);
        let mut products = Vec::new();
        for (i, p) in acc.iter().enumerate() {
            let (r, c) = mma::c_element(0, i);
            let (row, col) = (add(group.clone(), int(r as i64)), add(pair2.clone(), int(c as i64)));
            let (sum, k) = (self.fresh(), self.fresh());
            let x = Expr::load_array(
                am,
                add(mul(warp.clone(), int(a_size)), add(mul(row, int(mma::K as i64)), Expr::Var(k))),
            );
            let y = Expr::load_array(
                bm,
                add(mul(warp.clone(), int(b_size)), add(mul(Expr::Var(k), int(mma::N as i64)), col)),
            );
            products.push(Stmt::Mut { var: sum, ty: Scalar::F32, init: Expr::load_array(p.array, Expr::Var(t)) });
            products.push(Stmt::For {
                var: k,
                extent: int(mma::K as i64),
                kind: LoopKind::Serial,
                body: vec![Stmt::Assign { var: sum, value: add(Expr::Var(sum), mul(x, y)) }],
            });
            products.push(Stmt::StoreArray { array: p.array, index: Expr::Var(t), value: Expr::Var(sum) });
        }
        let multiplied = Stmt::For { var: t, extent: threads, kind: LoopKind::Serial, body: products };
        Ok(vec![staged, multiplied])
    }

    /// Where element `i` of per-thread storage `p` lives for thread `t`.
    fn slot(&self, p: &Promoted, t: &Expr, i: Expr) -> Expr {
        let base = Expr::binary(super::ir::Binary::Mul, t.clone(), Expr::I64(p.len as i64));
        Expr::binary(super::ir::Binary::Add, base, i)
    }

    /// A statement as thread `t` runs it.
    fn thread_stmt(&self, s: &Stmt, t: &Expr) -> Vec<Stmt> {
        let e = |x: &Expr| self.expr(x, t);
        let body = |b: &[Stmt]| b.iter().flat_map(|s| self.thread_stmt(s, t)).collect::<Vec<_>>();
        let store = |p: &Promoted, value: Expr| Stmt::StoreArray {
            array: p.array,
            index: self.slot(p, t, Expr::I64(0)),
            value,
        };
        vec![match s {
            Stmt::For { var, extent, kind, body: b } => {
                Stmt::For { var: *var, extent: e(extent), kind: *kind, body: body(b) }
            }
            Stmt::Let { var, value } | Stmt::Assign { var, value } => match self.promoted.get(var) {
                Some(p) => store(p, e(value)),
                None if matches!(s, Stmt::Let { .. }) => Stmt::Let { var: *var, value: e(value) },
                None => Stmt::Assign { var: *var, value: e(value) },
            },
            Stmt::Mut { var, ty, init } => match self.promoted.get(var) {
                Some(p) => store(p, e(init)),
                None => Stmt::Mut { var: *var, ty: *ty, init: e(init) },
            },
            Stmt::Store { buffer, index, value } => Stmt::Store { buffer: *buffer, index: e(index), value: e(value) },
            Stmt::Array { var, elem, len } => match self.promoted.get(var) {
                // Zeroed when declared, as a GPU thread's array would be by this IR's rule.
                Some(p) => {
                    let i = p.zeroing;
                    let zero = match p.elem {
                        Scalar::F32 => Expr::F32(0.0),
                        Scalar::Bool => Expr::Bool(false),
                        _ => Expr::I64(0),
                    };
                    Stmt::For {
                        var: i,
                        extent: Expr::I64(p.len as i64),
                        kind: LoopKind::Serial,
                        body: vec![Stmt::StoreArray {
                            array: p.array,
                            index: self.slot(p, t, Expr::Var(i)),
                            value: zero,
                        }],
                    }
                }
                None => Stmt::Array { var: *var, elem: *elem, len: *len },
            },
            Stmt::StoreArray { array, index, value } => match self.promoted.get(array) {
                Some(p) => Stmt::StoreArray { array: p.array, index: self.slot(p, t, e(index)), value: e(value) },
                None => Stmt::StoreArray { array: *array, index: e(index), value: e(value) },
            },
            Stmt::If { cond, then, otherwise } => {
                Stmt::If { cond: e(cond), then: body(then), otherwise: body(otherwise) }
            }
            // Under thread-dependent control flow: what the GPU-semantics executor rejects.
            Stmt::Shared { .. } | Stmt::Barrier | Stmt::Mma { .. } => s.clone(),
        }]
    }

    /// An expression as thread `t` evaluates it.
    fn expr(&self, x: &Expr, t: &Expr) -> Expr {
        let e = |y: &Expr| Box::new(self.expr(y, t));
        match x {
            Expr::Thread => t.clone(),
            Expr::Var(v) => match self.promoted.get(v) {
                Some(p) => Expr::load_array(p.array, self.slot(p, t, Expr::I64(0))),
                None => x.clone(),
            },
            Expr::LoadArray { array, index } => match self.promoted.get(array) {
                Some(p) if p.is_array => Expr::load_array(p.array, self.slot(p, t, self.expr(index, t))),
                _ => Expr::LoadArray { array: *array, index: e(index) },
            },
            Expr::F32(_) | Expr::I64(_) | Expr::Bool(_) | Expr::Size(_) => x.clone(),
            Expr::Load { buffer, index } => Expr::Load { buffer: *buffer, index: e(index) },
            Expr::Unary(op, a) => Expr::Unary(*op, e(a)),
            Expr::Binary(op, a, b) => Expr::Binary(*op, e(a), e(b)),
            Expr::Select(c, a, b) => Expr::Select(e(c), e(a), e(b)),
            Expr::MulAdd(a, b, c) => Expr::MulAdd(e(a), e(b), e(c)),
            Expr::Cast(to, a) => Expr::Cast(*to, e(a)),
            Expr::DropoutKeep { seed, salt, index, step, rate } => {
                Expr::DropoutKeep { seed: e(seed), salt: *salt, index: e(index), step: e(step), rate: *rate }
            }
        }
    }
}
