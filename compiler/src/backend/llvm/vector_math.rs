//! f32 math for CPU kernels as straight-line LLVM IR, so that the loop vectorizer can
//! widen it: a call to libm's `expf` or `sinf` cannot be vectorized (LLVM has no vector
//! library configured through the C API), and a kernel whose vector loop calls one runs
//! one element at a time (~2 ns per element here, against ~0.1 ns vectorized).
//!
//! Each function is `kernel::math`'s, operation for operation, so that generated code and
//! the reference executor agree bit for bit; its documentation describes the algorithms.
//! Each is defined once per module with internal linkage and `alwaysinline`; O3 inlines
//! it into the loops before vectorizing them.

use crate::kernel::math::{EXP_BOUND, EXP_LN2_HI, EXP_LN2_LO, EXP_POLY, EXP_Q_BOUND, PI_PARTS, SIN_POLY, TRIG_Q_BOUND};
use crate::kernel::Unary;
use inkwell::attributes::{Attribute, AttributeLoc};
use inkwell::builder::Builder;
use inkwell::context::Context;
use inkwell::intrinsics::Intrinsic;
use inkwell::module::{Linkage, Module};
use inkwell::values::{BasicValueEnum, FloatValue, FunctionValue, IntValue};
use inkwell::FloatPredicate;

/// The module's inline definition of `op` (exp, sin or cos), or `None` for the others.
pub fn function<'ctx>(
    ctx: &'ctx Context,
    module: &Module<'ctx>,
    op: Unary,
) -> Result<Option<FunctionValue<'ctx>>, String> {
    let (name, body): (&str, fn(&Ops<'_, 'ctx>, FloatValue<'ctx>) -> R<'ctx>) = match op {
        Unary::Exp => ("tnc_expf", exp),
        Unary::Sin => ("tnc_sinf", sin),
        Unary::Cos => ("tnc_cosf", cos),
        _ => return Ok(None),
    };
    if let Some(f) = module.get_function(name) {
        return Ok(Some(f));
    }
    let f32t = ctx.f32_type();
    let func = module.add_function(name, f32t.fn_type(&[f32t.into()], false), Some(Linkage::Internal));
    for attr in ["alwaysinline", "nounwind", "willreturn", "nosync", "nofree"] {
        func.add_attribute(
            AttributeLoc::Function,
            ctx.create_enum_attribute(Attribute::get_named_enum_kind_id(attr), 0),
        );
    }
    let ops = Ops { ctx, module, b: ctx.create_builder(), name };
    ops.b.position_at_end(ctx.append_basic_block(func, "entry"));
    let x = func.get_nth_param(0).expect("one parameter").into_float_value();
    let y = body(&ops, x)?;
    ops.b.build_return(Some(&y)).map_err(|e| ops.err(e))?;
    Ok(Some(func))
}

type R<'ctx> = Result<FloatValue<'ctx>, String>;

/// The IEEE operations the algorithms are made of.
struct Ops<'a, 'ctx> {
    ctx: &'ctx Context,
    module: &'a Module<'ctx>,
    b: Builder<'ctx>,
    name: &'static str,
}

impl<'ctx> Ops<'_, 'ctx> {
    fn err(&self, e: inkwell::builder::BuilderError) -> String {
        format!("LLVM builder ({}): {e}", self.name)
    }

    fn c(&self, v: f32) -> FloatValue<'ctx> {
        self.ctx.f32_type().const_float(v as f64)
    }

    fn intrinsic(&self, name: &str, args: &[FloatValue<'ctx>]) -> R<'ctx> {
        let f32t = self.ctx.f32_type().into();
        let f = Intrinsic::find(name)
            .and_then(|i| i.get_declaration(self.module, &[f32t]))
            .ok_or_else(|| format!("LLVM has no intrinsic `{name}`"))?;
        let args: Vec<_> = args.iter().map(|&a| a.into()).collect();
        match self.b.build_call(f, &args, "").map_err(|e| self.err(e))?.try_as_basic_value() {
            inkwell::values::ValueKind::Basic(BasicValueEnum::FloatValue(v)) => Ok(v),
            _ => Err(format!("`{name}` has no f32 result")),
        }
    }

    fn fma(&self, a: FloatValue<'ctx>, x: FloatValue<'ctx>, y: FloatValue<'ctx>) -> R<'ctx> {
        self.intrinsic("llvm.fma", &[a, x, y])
    }

    fn mul(&self, a: FloatValue<'ctx>, x: FloatValue<'ctx>) -> R<'ctx> {
        self.b.build_float_mul(a, x, "").map_err(|e| self.err(e))
    }

    fn add(&self, a: FloatValue<'ctx>, x: FloatValue<'ctx>) -> R<'ctx> {
        self.b.build_float_add(a, x, "").map_err(|e| self.err(e))
    }

    fn neg(&self, a: FloatValue<'ctx>) -> R<'ctx> {
        self.b.build_float_neg(a, "").map_err(|e| self.err(e))
    }

    /// `rint` in the default rounding mode: Rust's `round_ties_even`.
    fn rint(&self, a: FloatValue<'ctx>) -> R<'ctx> {
        self.intrinsic("llvm.rint", &[a])
    }

    /// Horner's rule with FMAs: `((c₀·x + c₁)·x + c₂)…`.
    fn horner(&self, coefficients: &[f32], x: FloatValue<'ctx>) -> R<'ctx> {
        let mut u = self.c(coefficients[0]);
        for &k in &coefficients[1..] {
            u = self.fma(u, x, self.c(k))?;
        }
        Ok(u)
    }

    /// `a` clamped to ±`bound` as an i32, NaN to −bound (Rust's `max`/`min`, LLVM's
    /// `maxnum`/`minnum`), then a plain vector `fptosi` (`fptosi.sat` is scalarized on x86).
    fn clamped_int(&self, a: FloatValue<'ctx>, bound: f32) -> Result<IntValue<'ctx>, String> {
        let a = self.intrinsic("llvm.maxnum", &[a, self.c(-bound)])?;
        let a = self.intrinsic("llvm.minnum", &[a, self.c(bound)])?;
        self.b.build_float_to_signed_int(a, self.ctx.i32_type(), "").map_err(|e| self.err(e))
    }

    fn select_if(
        &self,
        pred: FloatPredicate,
        x: FloatValue<'ctx>,
        bound: f32,
        then: FloatValue<'ctx>,
        otherwise: FloatValue<'ctx>,
    ) -> R<'ctx> {
        let cond = self.b.build_float_compare(pred, x, self.c(bound), "").map_err(|e| self.err(e))?;
        Ok(self.b.build_select(cond, then, otherwise, "").map_err(|e| self.err(e))?.into_float_value())
    }

    /// `-a` where the integer `k` is odd (`odd = true`) or even, else `a`.
    fn negate_by_parity(&self, k: IntValue<'ctx>, when_odd: bool, a: FloatValue<'ctx>) -> R<'ctx> {
        let i32t = self.ctx.i32_type();
        let bit = self.b.build_and(k, i32t.const_int(1, false), "").map_err(|e| self.err(e))?;
        let pred = if when_odd { inkwell::IntPredicate::NE } else { inkwell::IntPredicate::EQ };
        let cond = self.b.build_int_compare(pred, bit, i32t.const_zero(), "").map_err(|e| self.err(e))?;
        let neg = self.neg(a)?;
        Ok(self.b.build_select(cond, neg, a, "").map_err(|e| self.err(e))?.into_float_value())
    }

    /// `2^k` from its bits (`k + 127` in the exponent field).
    fn pow2(&self, k: IntValue<'ctx>) -> R<'ctx> {
        let i32t = self.ctx.i32_type();
        let biased = self.b.build_int_add(k, i32t.const_int(127, false), "").map_err(|e| self.err(e))?;
        let bits = self.b.build_left_shift(biased, i32t.const_int(23, false), "").map_err(|e| self.err(e))?;
        Ok(self.b.build_bit_cast(bits, self.ctx.f32_type(), "").map_err(|e| self.err(e))?.into_float_value())
    }
}

/// `kernel::math::exp`.
fn exp<'ctx>(o: &Ops<'_, 'ctx>, x: FloatValue<'ctx>) -> R<'ctx> {
    let q = o.rint(o.mul(x, o.c(std::f32::consts::LOG2_E))?)?;
    let s = o.fma(q, o.c(-EXP_LN2_HI), x)?;
    let s = o.fma(q, o.c(-EXP_LN2_LO), s)?;
    let u = o.horner(&EXP_POLY, s)?;
    let u = o.add(o.c(1.0), o.fma(o.mul(s, s)?, u, s)?)?;
    let qi = o.clamped_int(q, EXP_Q_BOUND)?;
    let half = o.b.build_right_shift(qi, o.ctx.i32_type().const_int(1, false), true, "").map_err(|e| o.err(e))?;
    let rest = o.b.build_int_sub(qi, half, "").map_err(|e| o.err(e))?;
    let u = o.mul(o.mul(u, o.pow2(half)?)?, o.pow2(rest)?)?;
    let u = o.select_if(FloatPredicate::OLT, x, -EXP_BOUND, o.c(0.0), u)?;
    o.select_if(FloatPredicate::OGT, x, EXP_BOUND, o.c(f32::INFINITY), u)
}

/// `kernel::math::reduce`: `x − q·(π·scale)`.
fn reduce<'ctx>(o: &Ops<'_, 'ctx>, x: FloatValue<'ctx>, q: FloatValue<'ctx>, scale: f32) -> R<'ctx> {
    let mut d = x;
    for part in PI_PARTS {
        d = o.fma(q, o.c(-(part * scale)), d)?;
    }
    Ok(d)
}

/// `kernel::math::sin_poly`.
fn sin_poly<'ctx>(o: &Ops<'_, 'ctx>, d: FloatValue<'ctx>) -> R<'ctx> {
    let s = o.mul(d, d)?;
    let u = o.horner(&SIN_POLY, s)?;
    o.fma(s, o.mul(u, d)?, d)
}

/// `kernel::math::sin`.
fn sin<'ctx>(o: &Ops<'_, 'ctx>, x: FloatValue<'ctx>) -> R<'ctx> {
    let q = o.rint(o.mul(x, o.c(std::f32::consts::FRAC_1_PI))?)?;
    let d = reduce(o, x, q, 1.0)?;
    let d = o.negate_by_parity(o.clamped_int(q, TRIG_Q_BOUND)?, true, d)?;
    sin_poly(o, d)
}

/// `kernel::math::cos`.
fn cos<'ctx>(o: &Ops<'_, 'ctx>, x: FloatValue<'ctx>) -> R<'ctx> {
    let half_turns =
        o.rint(o.b.build_float_sub(o.mul(x, o.c(std::f32::consts::FRAC_1_PI))?, o.c(0.5), "").map_err(|e| o.err(e))?)?;
    let q = o.fma(o.c(2.0), half_turns, o.c(1.0))?;
    let d = reduce(o, x, q, 0.5)?;
    let k = o.rint(o.mul(o.b.build_float_sub(q, o.c(1.0), "").map_err(|e| o.err(e))?, o.c(0.5))?)?;
    let d = o.negate_by_parity(o.clamped_int(k, TRIG_Q_BOUND)?, false, d)?;
    sin_poly(o, d)
}
