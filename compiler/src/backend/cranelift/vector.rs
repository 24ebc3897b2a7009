//! The kernel IR's vector loops in Cranelift's 128-bit SIMD: `for vector i in 0..n` runs
//! four iterations at a time (two such steps per turn of the loop, then one), then the
//! `n mod 4` left over one at a time with the scalar writer's code. Bindings that are the
//! same in every iteration (a row's scale, an element of the other operand) are computed
//! once before the steps ([`split_invariant`]); Cranelift then hoists their splats.
//!
//! A vector loop's iterations are independent (`LoopKind::Vector`), so the four lanes of
//! one step may run side by side. Each value of the four-lane body is a [`Lanes`]:
//! uniform (one scalar, computed once for the four), an integer `base + coef·lane` (the
//! loop index and sums and constant multiples of it: an index with `coef` 1 is a
//! contiguous run, loaded and stored as one vector), four f32 in an F32X4, four bools as
//! an I32X4 lane mask, or four scalars (i64 lanes, which 128 bits do not hold as four).
//! What has no SIMD form (log, tanh, pow, the f16 rounding, dropout's Philox, integer
//! division, a gather or a scatter) runs lane by lane with the scalar writer's code, so
//! every operation is the scalar loop's, lane for lane: the results are the same bits.
//!
//! A `Select` whose operands may trap (a load, an integer division) evaluates, lane by
//! lane, only the operand its condition chooses, as the scalar writer does. Bodies with
//! anything but bindings and stores (nested loops, conditionals, accumulators, local
//! arrays declared inside) are written as scalar loops.

use super::math::{self, Width};
use super::writer::{clif, flags, Fx};
use crate::kernel::print;
use crate::kernel::valid::Class;
use crate::kernel::{Binary, Elem, Expr, Scalar, Stmt, Unary, Var};
use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::{types, InstBuilder, InstructionData, MemFlagsData, Opcode, Value, ValueDef};
use cranelift_module::Module;
use std::collections::HashSet;

/// Lanes of f32 in one 128-bit vector.
const WIDTH: i64 = 4;

/// A value of a vector loop's body: what it is in each of the four lanes.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Lanes {
    /// The same scalar in every lane.
    Uniform(Value, Class),
    /// The integer `base + coef·lane` (`base` an i64).
    Affine { base: Value, coef: i64 },
    /// An F32X4.
    Floats(Value),
    /// Bools as an I32X4 of all-ones (true) and zero lanes.
    Mask(Value),
    /// One scalar per lane (integers).
    Each([Value; 4], Class),
}

impl Lanes {
    fn class(&self) -> Class {
        match *self {
            Lanes::Uniform(_, c) | Lanes::Each(_, c) => c,
            Lanes::Affine { .. } => Class::Int,
            Lanes::Floats(_) => Class::F32,
            Lanes::Mask(_) => Class::Bool,
        }
    }

    fn uniform(&self) -> Option<Value> {
        match *self {
            Lanes::Uniform(v, _) => Some(v),
            _ => None,
        }
    }
}

/// Whether a vector loop's body can run four lanes at a time: only bindings and stores.
fn four_lane_body(body: &[Stmt]) -> bool {
    body.iter().all(|s| matches!(s, Stmt::Let { .. } | Stmt::Store { .. } | Stmt::StoreArray { .. }))
}

/// The value of a loop extent made of integer constants (`64`, `64 % 16`), if it is one.
pub(super) fn constant(e: &Expr) -> Option<i64> {
    match e {
        Expr::I64(c) => Some(*c),
        Expr::Binary(op, a, b) => {
            let (a, b) = (constant(a)?, constant(b)?);
            match op {
                Binary::Add => a.checked_add(b),
                Binary::Sub => a.checked_sub(b),
                Binary::Mul => a.checked_mul(b),
                Binary::Div => a.checked_div(b),
                Binary::Rem => a.checked_rem(b),
                Binary::Min => Some(a.min(b)),
                Binary::Max => Some(a.max(b)),
                _ => None,
            }
        }
        _ => None,
    }
}

/// A vector loop's body over `var` split into the bindings that are the same in every
/// iteration, in order, and the rest. A binding is invariant when it reads neither `var`
/// nor a binding that is not; one that may trap or read memory only if no store comes
/// before it (a store of an earlier lane could change what it reads). A body binding a
/// variable twice is left whole.
fn split_invariant(var: Var, body: &[Stmt]) -> (Vec<&Stmt>, Vec<&Stmt>) {
    let mut bound = HashSet::new();
    if !body.iter().all(|s| !matches!(s, Stmt::Let { var, .. } if !bound.insert(*var))) {
        return (Vec::new(), body.iter().collect());
    }
    let (mut invariant, mut per_step) = (Vec::new(), Vec::new());
    let mut changing = HashSet::from([var]);
    let mut stored = false;
    for s in body {
        match s {
            Stmt::Let { var, value } => {
                let mut reads_changing = false;
                value.visit_vars(&mut |v| reads_changing |= changing.contains(&v));
                if reads_changing || (stored && value.may_trap()) {
                    changing.insert(*var);
                    per_step.push(s);
                } else {
                    invariant.push(s);
                }
            }
            _ => {
                stored = true;
                per_step.push(s);
            }
        }
    }
    (invariant, per_step)
}

/// The flags of a vector access: it never traps (as every access here), and it may be
/// unaligned (buffers and local arrays are aligned to one element).
fn vector_flags() -> MemFlagsData {
    MemFlagsData::new().with_notrap()
}

impl<'a, 'b, M: Module> Fx<'a, 'b, M> {
    /// `for vector var in 0..n { body }`.
    /// `for vector var in 0..n { body }`; `extent` is `n` where it is a constant, so that
    /// the parts of the loop that cannot run are not written.
    pub(super) fn vector_loop(&mut self, var: Var, n: Value, extent: Option<i64>, body: &[Stmt]) -> Result<(), String> {
        let zero = self.b.ins().iconst(types::I64, 0);
        if !four_lane_body(body) {
            return self.emit_loop(var, zero, n, body);
        }
        // Which parts run: whole pairs of steps, one more step, a scalar remainder.
        let (pairs_run, step_runs, rest_runs) = match extent {
            Some(c) if c <= 0 => return Ok(()),
            Some(c) => (c >= 2 * WIDTH, c % (2 * WIDTH) >= WIDTH, c % WIDTH != 0),
            None => (true, true, true),
        };
        let count = self.b.ins().smax(n, zero);
        let whole = self.b.ins().band_imm_s(count, -WIDTH);
        if pairs_run || step_runs {
            let (invariant, per_step) = split_invariant(var, body);
            let pairs = self.b.ins().band_imm_s(count, -2 * WIDTH);
            // The bindings that do not change from one iteration to the next run once,
            // before the first step, where there is one (so a load among them reads what
            // the first iteration would). Steps go two at a time, then one, then the
            // scalar remainder.
            let (steps, rest) = (self.b.create_block(), self.b.create_block());
            let any = self.b.ins().icmp_imm_s(IntCC::SignedGreaterThan, whole, 0);
            self.b.ins().brif(any, steps, &[], rest, &[]);
            self.b.switch_to_block(steps);
            self.b.seal_block(steps);
            invariant.iter().try_for_each(|s| self.stmt(s))?;
            // Their f32 values in every lane, made here once (Cranelift leaves a splat
            // where it is written).
            for s in &invariant {
                if let Stmt::Let { var, .. } = s {
                    if let Some(&(v, Class::F32)) = self.vars.get(var) {
                        let scalar = self.b.use_var(v);
                        let splat = self.b.ins().splat(types::F32X4, scalar);
                        self.splats.insert(scalar, splat);
                    }
                }
            }
            if pairs_run {
                self.counted_loop(zero, pairs, 2 * WIDTH, |fx, i| {
                    fx.four_lanes(var, i, &per_step)?;
                    let next = fx.b.ins().iadd_imm_s(i, WIDTH);
                    fx.four_lanes(var, next, &per_step)
                })?;
            }
            if step_runs {
                self.counted_loop(pairs, whole, WIDTH, |fx, i| fx.four_lanes(var, i, &per_step))?;
            }
            self.splats.clear();
            self.b.ins().jump(rest, &[]);
            self.b.switch_to_block(rest);
            self.b.seal_block(rest);
        }
        if rest_runs {
            self.emit_loop(var, whole, n, body)?;
        }
        Ok(())
    }

    /// One four-lane step of a vector loop over `var`: lanes `i..i + 4`.
    fn four_lanes(&mut self, var: Var, i: Value, body: &[&Stmt]) -> Result<(), String> {
        self.lanes.clear();
        self.lanes.insert(var, Lanes::Affine { base: i, coef: 1 });
        let written = body.iter().try_for_each(|s| self.four_lane_stmt(s));
        self.lanes.clear();
        written
    }

    fn four_lane_stmt(&mut self, s: &Stmt) -> Result<(), String> {
        match s {
            Stmt::Let { var, value } => match self.lanes_of(value)? {
                Lanes::Uniform(v, t) => {
                    self.lanes.remove(var);
                    let x = self.var(*var, t)?;
                    self.b.def_var(x, v);
                }
                varying => {
                    self.lanes.insert(*var, varying);
                }
            },
            Stmt::Store { buffer, index, value } => {
                let decl = self.buffer(*buffer)?;
                let i = self.expect_lanes(index, Class::Int, &format!("an index of `{}`", decl.name))?;
                let what = format!("a value stored into `{}`", decl.name);
                let v = self.expect_lanes(value, Class::of(decl.elem.scalar()), &what)?;
                match i {
                    Lanes::Affine { base, coef: 1 } if decl.elem == Elem::F32 => {
                        let (addr, _) = self.element_at(*buffer, base)?;
                        let x = self.floats(v);
                        self.b.ins().store(vector_flags(), x, addr, 0);
                    }
                    _ => {
                        for j in 0..4 {
                            let (ij, vj) = (self.lane(i, j), self.lane(v, j));
                            let (addr, elem) = self.element_at(*buffer, ij)?;
                            self.store_element(addr, elem, vj);
                        }
                    }
                }
            }
            Stmt::StoreArray { array, index, value } => {
                let t = self.array_class(*array)?;
                let i = self.expect_lanes(index, Class::Int, &format!("an index of {array}"))?;
                let v = self.expect_lanes(value, t, &format!("a value stored into {array}"))?;
                match i {
                    Lanes::Affine { base, coef: 1 } if t == Class::F32 => {
                        let (addr, _) = self.array_element_at(*array, base)?;
                        let x = self.floats(v);
                        self.b.ins().store(vector_flags(), x, addr, 0);
                    }
                    _ => {
                        for j in 0..4 {
                            let (ij, vj) = (self.lane(i, j), self.lane(v, j));
                            let (addr, _) = self.array_element_at(*array, ij)?;
                            self.b.ins().store(flags(), vj, addr, 0);
                        }
                    }
                }
            }
            _ => return Err("a vector loop's four-lane body holds only bindings and stores".into()),
        }
        Ok(())
    }

    fn expect_lanes(&mut self, e: &Expr, t: Class, what: &str) -> Result<Lanes, String> {
        let l = self.lanes_of(e)?;
        if l.class() != t {
            return Err(format!("{what} must be {}, got {}: `{}`", t, l.class(), print::expr(self.kernel, e)));
        }
        Ok(l)
    }

    /// The four lanes of `e`.
    fn lanes_of(&mut self, e: &Expr) -> Result<Lanes, String> {
        Ok(match e {
            Expr::Var(v) if self.lanes.contains_key(v) => self.lanes[v],
            Expr::F32(_) | Expr::I64(_) | Expr::Bool(_) | Expr::Var(_) | Expr::Size(_) | Expr::Thread => {
                let (v, t) = self.expr(e)?;
                Lanes::Uniform(v, t)
            }
            Expr::Load { buffer, index } => {
                let decl = self.buffer(*buffer)?;
                let i = self.expect_lanes(index, Class::Int, &format!("an index of `{}`", decl.name))?;
                match i {
                    Lanes::Uniform(i, _) => {
                        let (addr, elem) = self.element_at(*buffer, i)?;
                        let (v, t) = self.load_element(addr, elem);
                        Lanes::Uniform(v, t)
                    }
                    Lanes::Affine { base, coef: 1 } if decl.elem == Elem::F32 => {
                        let (addr, _) = self.element_at(*buffer, base)?;
                        Lanes::Floats(self.b.ins().load(types::F32X4, vector_flags(), addr, 0))
                    }
                    _ => self.each(|fx, j| {
                        let ij = fx.lane(i, j);
                        let (addr, elem) = fx.element_at(*buffer, ij)?;
                        Ok(fx.load_element(addr, elem))
                    })?,
                }
            }
            Expr::LoadArray { array, index } => {
                let t = self.array_class(*array)?;
                let i = self.expect_lanes(index, Class::Int, &format!("an index of {array}"))?;
                match i {
                    Lanes::Uniform(i, _) => {
                        let (addr, t) = self.array_element_at(*array, i)?;
                        Lanes::Uniform(self.b.ins().load(clif(t), flags(), addr, 0), t)
                    }
                    Lanes::Affine { base, coef: 1 } if t == Class::F32 => {
                        let (addr, _) = self.array_element_at(*array, base)?;
                        Lanes::Floats(self.b.ins().load(types::F32X4, vector_flags(), addr, 0))
                    }
                    _ => self.each(|fx, j| {
                        let ij = fx.lane(i, j);
                        let (addr, t) = fx.array_element_at(*array, ij)?;
                        Ok((fx.b.ins().load(clif(t), flags(), addr, 0), t))
                    })?,
                }
            }
            Expr::Unary(op, a) => {
                let x = self.lanes_of(a)?;
                self.unary_lanes(*op, x).map_err(|m| format!("{m}: `{}`", print::expr(self.kernel, e)))?
            }
            Expr::Binary(op, x, y) => {
                let a = self.lanes_of(x)?;
                let c = self.lanes_of(y)?;
                if a.class() != c.class() {
                    let text = print::expr(self.kernel, e);
                    return Err(format!("{op:?} of {} and {}: `{text}`", a.class(), c.class()));
                }
                self.binary_lanes(*op, a, c).map_err(|m| format!("{m}: `{}`", print::expr(self.kernel, e)))?
            }
            Expr::MulAdd(x, y, z) => {
                let a = self.expect_lanes(x, Class::F32, "a fused multiply-add's factor")?;
                let c = self.expect_lanes(y, Class::F32, "a fused multiply-add's factor")?;
                let d = self.expect_lanes(z, Class::F32, "a fused multiply-add's addend")?;
                match (a.uniform(), c.uniform(), d.uniform()) {
                    (Some(a), Some(c), Some(d)) => Lanes::Uniform(self.b.ins().fma(a, c, d), Class::F32),
                    _ => {
                        let (a, c, d) = (self.floats(a), self.floats(c), self.floats(d));
                        Lanes::Floats(self.b.ins().fma(a, c, d))
                    }
                }
            }
            Expr::Select(_, x, y) if x.may_trap() || y.may_trap() => {
                if self.is_uniform(e) {
                    let (v, t) = self.expr(e)?;
                    Lanes::Uniform(v, t)
                } else {
                    // Lane by lane, each evaluating only what its condition chooses.
                    self.each(|fx, j| {
                        fx.bind_lane(e, j)?;
                        fx.expr(e)
                    })?
                }
            }
            Expr::Select(c, x, y) => {
                let cond = self.expect_lanes(c, Class::Bool, "a select condition")?;
                let (a, d) = (self.lanes_of(x)?, self.lanes_of(y)?);
                if a.class() != d.class() {
                    let text = print::expr(self.kernel, e);
                    return Err(format!("select of {} and {}: `{text}`", a.class(), d.class()));
                }
                self.select_lanes(cond, a, d)
            }
            Expr::Cast(to, a) => {
                let x = self.lanes_of(a)?;
                self.cast_lanes(*to, x)?
            }
            Expr::DropoutKeep { seed, salt, index, step, rate } => {
                let s = self.expect_lanes(seed, Class::Int, "a dropout seed")?;
                let i = self.expect_lanes(index, Class::Int, "a dropout index")?;
                let t = self.expect_lanes(step, Class::Int, "a dropout step")?;
                self.each(|fx, j| {
                    let (s, i, t) = (fx.lane(s, j), fx.lane(i, j), fx.lane(t, j));
                    Ok((math::dropout_keep(&mut fx.b, s, *salt, i, t, *rate), Class::Bool))
                })?
            }
        })
    }

    /// Whether `e` reads nothing that differs between lanes.
    fn is_uniform(&self, e: &Expr) -> bool {
        let mut uniform = true;
        e.visit_vars(&mut |v| uniform &= !self.lanes.contains_key(&v));
        uniform
    }

    /// Give every lane-varying variable `e` reads its lane-`j` value in the scalar
    /// writer's variables, so that the scalar writer computes lane `j` of `e`.
    fn bind_lane(&mut self, e: &Expr, j: usize) -> Result<(), String> {
        let mut read = Vec::new();
        e.visit_vars(&mut |v| read.push(v));
        for v in read {
            if let Some(&l) = self.lanes.get(&v) {
                let x = self.lane(l, j);
                let var = self.var(v, l.class())?;
                self.b.def_var(var, x);
            }
        }
        Ok(())
    }

    /// Lane `j` of `l`, as the scalar writer holds a value of its class.
    fn lane(&mut self, l: Lanes, j: usize) -> Value {
        match l {
            Lanes::Uniform(v, _) => v,
            Lanes::Affine { base, coef } => {
                if j == 0 || coef == 0 {
                    base
                } else {
                    self.b.ins().iadd_imm_s(base, coef.wrapping_mul(j as i64))
                }
            }
            Lanes::Floats(v) => self.b.ins().extractlane(v, j as u8),
            Lanes::Mask(m) => {
                let x = self.b.ins().extractlane(m, j as u8);
                self.b.ins().icmp_imm_s(IntCC::NotEqual, x, 0)
            }
            Lanes::Each(vs, _) => vs[j],
        }
    }

    /// The four results of `f(lane)`, gathered into their class's vector form.
    fn each(&mut self, mut f: impl FnMut(&mut Self, usize) -> Result<(Value, Class), String>) -> Result<Lanes, String> {
        let mut vs = Vec::with_capacity(4);
        let mut class = None;
        for j in 0..4 {
            let (v, t) = f(self, j)?;
            class = Some(t);
            vs.push(v);
        }
        let (vs, t) = ([vs[0], vs[1], vs[2], vs[3]], class.expect("four lanes"));
        Ok(match t {
            Class::F32 => Lanes::Floats(self.build(types::F32X4, vs)),
            Class::Bool => {
                let ms = vs.map(|v| self.bool_mask(v));
                Lanes::Mask(self.build(types::I32X4, ms))
            }
            Class::Int => Lanes::Each(vs, Class::Int),
        })
    }

    /// A vector of `ty` from its lanes.
    fn build(&mut self, ty: types::Type, vs: [Value; 4]) -> Value {
        let mut v = self.b.ins().splat(ty, vs[0]);
        for (j, &x) in vs.iter().enumerate().skip(1) {
            v = self.b.ins().insertlane(v, x, j as u8);
        }
        v
    }

    /// A bool (an i8 0 or 1) as an i32 lane of a mask: all ones or zero.
    fn bool_mask(&mut self, v: Value) -> Value {
        let x = self.b.ins().uextend(types::I32, v);
        self.b.ins().ineg(x)
    }

    /// `l` (of class F32) as an F32X4.
    fn floats(&mut self, l: Lanes) -> Value {
        match l {
            Lanes::Floats(v) => v,
            Lanes::Uniform(v, _) => match self.splats.get(&v) {
                Some(&splat) => splat,
                None => self.b.ins().splat(types::F32X4, v),
            },
            Lanes::Each(vs, _) => self.build(types::F32X4, vs),
            Lanes::Affine { .. } | Lanes::Mask(_) => unreachable!("the caller checked the class"),
        }
    }

    /// `l` (of class Bool) as a lane mask.
    fn mask(&mut self, l: Lanes) -> Value {
        match l {
            Lanes::Mask(m) => m,
            Lanes::Uniform(v, _) => {
                let m = self.bool_mask(v);
                self.b.ins().splat(types::I32X4, m)
            }
            Lanes::Each(vs, _) => {
                let ms = vs.map(|v| self.bool_mask(v));
                self.build(types::I32X4, ms)
            }
            Lanes::Affine { .. } | Lanes::Floats(_) => unreachable!("the caller checked the class"),
        }
    }

    fn splat_f32(&mut self, x: f32) -> Value {
        let c = self.b.ins().f32const(x);
        self.b.ins().splat(types::F32X4, c)
    }

    /// The integer constant `v` is, if it is one.
    fn int_const(&self, v: Value) -> Option<i64> {
        let dfg = &self.b.func.dfg;
        match dfg.value_def(v) {
            ValueDef::Result(inst, _) => match dfg.insts[inst] {
                InstructionData::UnaryImm { opcode: Opcode::Iconst, imm } => Some(imm.bits()),
                _ => None,
            },
            _ => None,
        }
    }

    fn unary_lanes(&mut self, op: Unary, x: Lanes) -> Result<Lanes, String> {
        let t = x.class();
        if let Lanes::Uniform(v, _) = x {
            let (r, t) = self.unary(op, v, t)?;
            return Ok(Lanes::Uniform(r, t));
        }
        let ins_f32 = |fx: &mut Self, v: Value| -> Option<Value> {
            Some(match op {
                Unary::Neg => fx.b.ins().fneg(v),
                Unary::Abs => fx.b.ins().fabs(v),
                Unary::Sqrt => fx.b.ins().sqrt(v),
                Unary::Rsqrt => {
                    let (one, s) = (fx.splat_f32(1.0), fx.b.ins().sqrt(v));
                    fx.b.ins().fdiv(one, s)
                }
                Unary::Recip => {
                    let one = fx.splat_f32(1.0);
                    fx.b.ins().fdiv(one, v)
                }
                Unary::Exp => math::exp(&mut fx.b, Width::Four, v),
                Unary::Sin => math::sin(&mut fx.b, Width::Four, v),
                Unary::Cos => math::cos(&mut fx.b, Width::Four, v),
                Unary::RoundBf16 => math::round_bf16(&mut fx.b, Width::Four, v),
                Unary::Log | Unary::Tanh | Unary::RoundF16 | Unary::Not => return None,
            })
        };
        match (x, op) {
            (Lanes::Floats(v), _) => {
                if let Some(r) = ins_f32(self, v) {
                    return Ok(Lanes::Floats(r));
                }
            }
            (Lanes::Mask(m), Unary::Not) => return Ok(Lanes::Mask(self.b.ins().bnot(m))),
            (Lanes::Affine { base, coef }, Unary::Neg) => {
                return Ok(Lanes::Affine { base: self.b.ins().ineg(base), coef: coef.wrapping_neg() });
            }
            _ => {}
        }
        self.each(|fx, j| {
            let v = fx.lane(x, j);
            fx.unary(op, v, t)
        })
    }

    fn binary_lanes(&mut self, op: Binary, x: Lanes, y: Lanes) -> Result<Lanes, String> {
        use Binary::*;
        let t = x.class();
        if let (Lanes::Uniform(a, _), Lanes::Uniform(c, _)) = (x, y) {
            let (r, t) = self.binary(op, a, c, t)?;
            return Ok(Lanes::Uniform(r, t));
        }
        match t {
            Class::F32 => {
                let cc = match op {
                    Lt => Some(FloatCC::LessThan),
                    Le => Some(FloatCC::LessThanOrEqual),
                    Gt => Some(FloatCC::GreaterThan),
                    Ge => Some(FloatCC::GreaterThanOrEqual),
                    Eq => Some(FloatCC::Equal),
                    Ne => Some(FloatCC::NotEqual),
                    _ => None,
                };
                if matches!(op, Add | Sub | Mul | Div | Max | Min) || cc.is_some() {
                    let (a, c) = (self.floats(x), self.floats(y));
                    let ins = self.b.ins();
                    return Ok(match (op, cc) {
                        (_, Some(cc)) => Lanes::Mask(ins.fcmp(cc, a, c)),
                        (Add, _) => Lanes::Floats(ins.fadd(a, c)),
                        (Sub, _) => Lanes::Floats(ins.fsub(a, c)),
                        (Mul, _) => Lanes::Floats(ins.fmul(a, c)),
                        (Div, _) => Lanes::Floats(ins.fdiv(a, c)),
                        (Max, _) => Lanes::Floats(ins.fmax(a, c)),
                        (Min, _) => Lanes::Floats(ins.fmin(a, c)),
                        _ => unreachable!("matched above"),
                    });
                }
            }
            Class::Int => {
                if let Some(l) = self.affine(op, x, y) {
                    return Ok(l);
                }
            }
            Class::Bool => {
                if matches!(op, And | Or | Eq | Ne) {
                    let (a, c) = (self.mask(x), self.mask(y));
                    let ins = self.b.ins();
                    return Ok(Lanes::Mask(match op {
                        And => ins.band(a, c),
                        Or => ins.bor(a, c),
                        Ne => ins.bxor(a, c),
                        _ => ins.icmp(IntCC::Equal, a, c),
                    }));
                }
            }
        }
        self.each(|fx, j| {
            let (a, c) = (fx.lane(x, j), fx.lane(y, j));
            fx.binary(op, a, c, t)
        })
    }

    /// `x op y` as an affine integer, where it is one: sums and differences of affine and
    /// uniform integers, and an affine integer times a constant.
    fn affine(&mut self, op: Binary, x: Lanes, y: Lanes) -> Option<Lanes> {
        use Lanes::{Affine, Uniform};
        let ins = self.b.ins();
        Some(match (op, x, y) {
            (Binary::Add, Affine { base, coef }, Uniform(u, _))
            | (Binary::Add, Uniform(u, _), Affine { base, coef }) => Affine { base: ins.iadd(base, u), coef },
            (Binary::Add, Affine { base: b1, coef: c1 }, Affine { base: b2, coef: c2 }) => {
                Affine { base: ins.iadd(b1, b2), coef: c1.checked_add(c2)? }
            }
            (Binary::Sub, Affine { base, coef }, Uniform(u, _)) => Affine { base: ins.isub(base, u), coef },
            (Binary::Sub, Uniform(u, _), Affine { base, coef }) => {
                Affine { base: ins.isub(u, base), coef: coef.checked_neg()? }
            }
            (Binary::Sub, Affine { base: b1, coef: c1 }, Affine { base: b2, coef: c2 }) => {
                Affine { base: ins.isub(b1, b2), coef: c1.checked_sub(c2)? }
            }
            (Binary::Mul, Affine { base, coef }, Uniform(u, _))
            | (Binary::Mul, Uniform(u, _), Affine { base, coef }) => {
                let k = self.int_const(u)?;
                let coef = coef.checked_mul(k)?;
                Affine { base: self.b.ins().imul(base, u), coef }
            }
            _ => return None,
        })
    }

    fn select_lanes(&mut self, cond: Lanes, x: Lanes, y: Lanes) -> Lanes {
        let t = x.class();
        match (cond, x, y) {
            (Lanes::Uniform(c, _), Lanes::Uniform(a, _), Lanes::Uniform(d, _)) => {
                Lanes::Uniform(self.b.ins().select(c, a, d), t)
            }
            (_, _, _) if t == Class::Int => {
                let mut r = Vec::with_capacity(4);
                for j in 0..4 {
                    let (c, a, d) = (self.lane(cond, j), self.lane(x, j), self.lane(y, j));
                    r.push(self.b.ins().select(c, a, d));
                }
                Lanes::Each([r[0], r[1], r[2], r[3]], Class::Int)
            }
            (Lanes::Uniform(c, _), _, _) => {
                if t == Class::F32 {
                    let (a, d) = (self.floats(x), self.floats(y));
                    Lanes::Floats(self.b.ins().select(c, a, d))
                } else {
                    let (a, d) = (self.mask(x), self.mask(y));
                    Lanes::Mask(self.b.ins().select(c, a, d))
                }
            }
            _ => {
                let m = self.mask(cond);
                if t == Class::F32 {
                    let (a, d) = (self.floats(x), self.floats(y));
                    let m = self.b.ins().bitcast(types::F32X4, MemFlagsData::new(), m);
                    Lanes::Floats(self.b.ins().bitselect(m, a, d))
                } else {
                    let (a, d) = (self.mask(x), self.mask(y));
                    Lanes::Mask(self.b.ins().bitselect(m, a, d))
                }
            }
        }
    }

    fn cast_lanes(&mut self, to: Scalar, x: Lanes) -> Result<Lanes, String> {
        let from = x.class();
        Ok(match (to, x) {
            (_, Lanes::Uniform(v, t)) => Lanes::Uniform(self.cast(to, v, t), Class::of(to)),
            (Scalar::F32, Lanes::Floats(_)) | (Scalar::Bool, Lanes::Mask(_)) | (Scalar::I64, Lanes::Affine { .. }) => x,
            (Scalar::I64, Lanes::Each(_, Class::Int)) => x,
            // Rust's `x != 0.0`: NaN is true.
            (Scalar::Bool, Lanes::Floats(v)) => {
                let zero = self.splat_f32(0.0);
                Lanes::Mask(self.b.ins().fcmp(FloatCC::NotEqual, v, zero))
            }
            // 1.0 where the mask is all ones: its bits anded with 1.0's.
            (Scalar::F32, Lanes::Mask(m)) => {
                let one = self.b.ins().iconst(types::I32, 1f32.to_bits() as i64);
                let ones = self.b.ins().splat(types::I32X4, one);
                let bits = self.b.ins().band(m, ones);
                Lanes::Floats(self.b.ins().bitcast(types::F32X4, MemFlagsData::new(), bits))
            }
            _ => self.each(|fx, j| {
                let v = fx.lane(x, j);
                Ok((fx.cast(to, v, from), Class::of(to)))
            })?,
        })
    }
}
