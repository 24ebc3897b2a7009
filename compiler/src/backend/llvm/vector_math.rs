//! f32 math for CPU kernels as straight-line LLVM IR, so that the loop vectorizer can
//! widen it: a call to libm's `expf` cannot be vectorized (LLVM has no vector library
//! configured through the C API), and a kernel whose vector loop calls it runs one
//! element at a time (~2 ns per element here, against ~0.1 ns vectorized).
//!
//! Each function is defined once per module with internal linkage and `alwaysinline`;
//! O3 inlines it into the loops before vectorizing them.
//!
//! `tnc_expf(x)` is `kernel::math::exp` (SLEEF's `xexpf`, 1.0 ulp), operation for
//! operation, so that generated code and the reference executor agree bit for bit; its
//! documentation describes the algorithm.

use crate::kernel::math::{EXP_BOUND, EXP_LN2_HI, EXP_LN2_LO, EXP_POLY, EXP_Q_BOUND};
use inkwell::attributes::{Attribute, AttributeLoc};
use inkwell::context::Context;
use inkwell::intrinsics::Intrinsic;
use inkwell::module::{Linkage, Module};
use inkwell::values::{BasicValueEnum, FloatValue, FunctionValue, IntValue};
use inkwell::FloatPredicate;

const EXP: &str = "tnc_expf";

/// The module's `tnc_expf`, defined on first use.
pub fn exp<'ctx>(ctx: &'ctx Context, module: &Module<'ctx>) -> Result<FunctionValue<'ctx>, String> {
    if let Some(f) = module.get_function(EXP) {
        return Ok(f);
    }
    let f32t = ctx.f32_type();
    let i32t = ctx.i32_type();
    let func = module.add_function(EXP, f32t.fn_type(&[f32t.into()], false), Some(Linkage::Internal));
    for name in ["alwaysinline", "nounwind", "willreturn", "nosync", "nofree"] {
        func.add_attribute(
            AttributeLoc::Function,
            ctx.create_enum_attribute(Attribute::get_named_enum_kind_id(name), 0),
        );
    }
    let b = ctx.create_builder();
    b.position_at_end(ctx.append_basic_block(func, "entry"));
    let be = |e: inkwell::builder::BuilderError| format!("LLVM builder (tnc_expf): {e}");
    let intrinsic = |name: &str, args: &[BasicValueEnum<'ctx>], overloads: &[inkwell::types::BasicTypeEnum<'ctx>]| {
        let f = Intrinsic::find(name)
            .and_then(|i| i.get_declaration(module, overloads))
            .ok_or_else(|| format!("LLVM has no intrinsic `{name}`"))?;
        let args: Vec<_> = args.iter().map(|&a| a.into()).collect();
        match b.build_call(f, &args, "").map_err(be)?.try_as_basic_value() {
            inkwell::values::ValueKind::Basic(v) => Ok(v),
            _ => Err(format!("`{name}` has no result")),
        }
    };
    let c = |v: f32| f32t.const_float(v as f64);
    let fma = |a: FloatValue<'ctx>, x: FloatValue<'ctx>, y: FloatValue<'ctx>| -> Result<FloatValue<'ctx>, String> {
        Ok(intrinsic("llvm.fma", &[a.into(), x.into(), y.into()], &[f32t.into()])?.into_float_value())
    };
    let x = func.get_nth_param(0).expect("one parameter").into_float_value();
    let q = intrinsic(
        "llvm.rint",
        &[b.build_float_mul(x, c(std::f32::consts::LOG2_E), "").map_err(be)?.into()],
        &[f32t.into()],
    )?
    .into_float_value();
    let s = fma(q, c(-EXP_LN2_HI), x)?;
    let s = fma(q, c(-EXP_LN2_LO), s)?;
    let mut u = c(EXP_POLY[0]);
    for &k in &EXP_POLY[1..] {
        u = fma(u, s, c(k))?;
    }
    let s2 = b.build_float_mul(s, s, "").map_err(be)?;
    let u = b.build_float_add(c(1.0), fma(s2, u, s)?, "").map_err(be)?;
    // u · 2^⌊q/2⌋ · 2^(q − ⌊q/2⌋), q clamped first (so the conversion is a plain vector
    // `fptosi`; `fptosi.sat` is scalarized on x86).
    let clamp = |name: &str, a: FloatValue<'ctx>, bound: f32| -> Result<FloatValue<'ctx>, String> {
        Ok(intrinsic(name, &[a.into(), c(bound).into()], &[f32t.into()])?.into_float_value())
    };
    let q_in_range = clamp("llvm.minnum", clamp("llvm.maxnum", q, -EXP_Q_BOUND)?, EXP_Q_BOUND)?;
    let qi = b.build_float_to_signed_int(q_in_range, i32t, "").map_err(be)?;
    let half = b.build_right_shift(qi, i32t.const_int(1, false), true, "").map_err(be)?;
    let rest = b.build_int_sub(qi, half, "").map_err(be)?;
    let pow2 = |k: IntValue<'ctx>| -> Result<FloatValue<'ctx>, String> {
        let biased = b.build_int_add(k, i32t.const_int(127, false), "").map_err(be)?;
        let bits = b.build_left_shift(biased, i32t.const_int(23, false), "").map_err(be)?;
        Ok(b.build_bit_cast(bits, f32t, "").map_err(be)?.into_float_value())
    };
    let u = b.build_float_mul(u, pow2(half)?, "").map_err(be)?;
    let u = b.build_float_mul(u, pow2(rest)?, "").map_err(be)?;
    let under = b.build_float_compare(FloatPredicate::OLT, x, c(-EXP_BOUND), "").map_err(be)?;
    let over = b.build_float_compare(FloatPredicate::OGT, x, c(EXP_BOUND), "").map_err(be)?;
    let u = b.build_select(under, c(0.0), u, "").map_err(be)?;
    let u = b.build_select(over, c(f32::INFINITY), u.into_float_value(), "").map_err(be)?;
    b.build_return(Some(&u)).map_err(be)?;
    Ok(func)
}
