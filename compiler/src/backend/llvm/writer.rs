//! Kernel IR → LLVM IR: each [`Kernel`] becomes one external function
//!
//! ```text
//! void name(void **buffers, const int64_t *sizes, int64_t begin, int64_t end)
//! ```
//!
//! that runs the kernel body for every `index` in `begin..end` (see `kernel/ir.rs`). It
//! depends only on the kernel IR.
//!
//! The same writer serves CPUs and NVIDIA GPUs ([`Device`]); the GPU differences are few:
//! - a GPU kernel is a `ptx_kernel` (an `.entry`) and runs the body once per thread, for
//!   `index = begin + blockIdx.x · blockDim.x + threadIdx.x` when `index < end`, instead of
//!   looping over `begin..end` (the launch shape is `backend::gpu_launch`);
//! - buffer accesses go through global-address-space pointers (`addrspace(1)`, PTX
//!   `ld.global`/`st.global`): the tables `buffers` and `sizes` are generic pointers (kernel
//!   parameters, as on the CPU) into device memory, cast to the global space once, and so
//!   is every buffer pointer loaded from the table;
//! - local arrays and variables are per-thread allocas (registers after SROA, otherwise
//!   local memory);
//! - transcendental functions (exp, log, sin, cos, tanh, pow) and float remainder call
//!   libdevice (`__nv_expf`, ...), linked in by the PTX back end, since NVPTX has no libm;
//! - `Vector` loops get no vectorization hint (a GPU thread is scalar).
//!
//! Semantics follow the reference executor (`kernel::exec`) exactly, f32 for f32:
//! - integers (I32 and I64 alike) are i64 values, as in the executor: a load from an i32
//!   buffer sign-extends, a cast to I32 truncates to 32 bits and sign-extends back, a
//!   store to an i32 buffer truncates; integer arithmetic wraps;
//! - float → integer casts saturate (NaN → 0), like Rust's `as` (`llvm.fptosi.sat`);
//! - `max`/`min` on f32 propagate NaN (`llvm.maximum`/`llvm.minimum`);
//! - a fused multiply-add is `llvm.fma` (rounded once, as Rust's `mul_add`);
//! - exp, sin and cos are `kernel::math`'s (SLEEF's algorithms), inlined from
//!   `vector_math` so that they vectorize; log, sqrt, pow, fabs are LLVM intrinsics (libm
//!   calls for the transcendental ones), tanh calls libm's `tanhf`, so the shared object
//!   links `-lm`;
//!   rsqrt is `1 / sqrt(x)` and recip `1 / x`, correctly rounded as in the executor;
//! - `Select` evaluates only the chosen operand when an operand may trap (a load, an
//!   integer division), as the executor does; otherwise it is an LLVM `select`;
//! - `DropoutKeep` is Philox4x32-10 inlined, the same function as
//!   `tnc_bundle::rng::dropout_keep`.
//!
//! What the executor reports as an error at run time (an out-of-bounds access, integer
//! division by zero) is undefined behaviour in generated code. Type errors (a store of an
//! f32 into an i32 buffer, an undefined variable, a bool where a number is needed) are
//! reported here, as `Err`, before LLVM sees the function.

use crate::kernel::print;
use crate::kernel::{Binary, Elem, Expr, Kernel, LoopKind, Scalar, Stmt, Unary, Var};
use inkwell::attributes::{Attribute, AttributeLoc};
use inkwell::builder::{Builder, BuilderError};
use inkwell::context::Context;
use inkwell::intrinsics::Intrinsic;
use inkwell::module::{Linkage, Module};
use inkwell::types::{BasicType, BasicTypeEnum};
use inkwell::values::{AsValueRef, BasicValue, BasicValueEnum, FloatValue, FunctionValue, IntValue, PointerValue};
use inkwell::{AddressSpace, FloatPredicate, IntPredicate};
use std::collections::HashMap;

/// Function attributes for the target, set on every kernel (LLVM uses them, not the
/// target machine's defaults, to pick instructions and vector widths).
#[derive(Clone, Debug)]
pub struct FnAttrs {
    pub cpu: String,
    pub features: String,
    /// `prefer-vector-width`, e.g. 512 for AVX-512 (LLVM otherwise stays at 256 bits).
    pub prefer_vector_width: Option<u32>,
    /// What the function is for: a CPU function or a GPU kernel.
    pub device: Device,
}

/// The kind of processor a kernel is written for (see the module documentation for the
/// differences).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    /// A C function looping over `begin..end`; math calls libm.
    Cpu,
    /// An NVPTX kernel (`ptx_kernel`), one thread per iteration; math calls libdevice.
    Nvptx,
}

/// LLVM's `PTX_Kernel` calling convention: the function is a kernel entry point.
const PTX_KERNEL_CC: u32 = 71;

/// The libdevice function for `op`, where the GPU calls one (see [`Device::Nvptx`]).
pub fn libdevice_name(op: Unary) -> Option<&'static str> {
    Some(match op {
        Unary::Exp => "__nv_expf",
        Unary::Log => "__nv_logf",
        Unary::Sin => "__nv_sinf",
        Unary::Cos => "__nv_cosf",
        Unary::Tanh => "__nv_tanhf",
        _ => return None,
    })
}

/// Value classes: every integer is an i64, as in the reference executor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ty {
    F,
    I,
    B,
}

impl Ty {
    fn of(s: Scalar) -> Ty {
        match s {
            Scalar::F32 => Ty::F,
            Scalar::I32 | Scalar::I64 => Ty::I,
            Scalar::Bool => Ty::B,
        }
    }

    fn of_elem(e: Elem) -> Ty {
        Ty::of(e.scalar())
    }

    fn name(self) -> &'static str {
        match self {
            Ty::F => "f32",
            Ty::I => "an integer",
            Ty::B => "bool",
        }
    }
}

fn be(e: BuilderError) -> String {
    format!("LLVM builder: {e}")
}

struct Fx<'a, 'ctx> {
    ctx: &'ctx Context,
    module: &'a Module<'ctx>,
    b: Builder<'ctx>,
    /// Positioned in the entry block, for allocas.
    entry: Builder<'ctx>,
    kernel: &'a Kernel,
    func: FunctionValue<'ctx>,
    device: Device,
    buffers: Vec<PointerValue<'ctx>>,
    sizes: Vec<IntValue<'ctx>>,
    vars: HashMap<Var, (PointerValue<'ctx>, Ty)>,
    arrays: HashMap<Var, (PointerValue<'ctx>, Ty, usize)>,
    /// `Expr::Thread` in a block kernel: `tid.x`.
    thread: Option<IntValue<'ctx>>,
}

/// Append `kernel` to `module` as an external function named `kernel.name`.
pub fn write_kernel<'ctx>(
    ctx: &'ctx Context,
    module: &Module<'ctx>,
    kernel: &Kernel,
    attrs: &FnAttrs,
) -> Result<FunctionValue<'ctx>, String> {
    let err = |e: String| format!("kernel `{}`: {e}", kernel.name);
    if kernel.gemm.is_some() {
        return Err(err("is a library GEMM node, which has no generated code".into()));
    }
    if kernel.name.is_empty() || kernel.name.contains('\0') {
        return Err(err("invalid function name".into()));
    }
    if module.get_function(&kernel.name).is_some() {
        return Err(err("a function of this name is already in the module".into()));
    }
    let ptr = ctx.ptr_type(Default::default());
    let i64t = ctx.i64_type();
    let fn_ty = ctx.void_type().fn_type(&[ptr.into(), ptr.into(), i64t.into(), i64t.into()], false);
    let func = module.add_function(&kernel.name, fn_ty, Some(Linkage::External));
    set_attrs(ctx, func, attrs);
    if attrs.device == Device::Nvptx {
        func.set_call_conventions(PTX_KERNEL_CC);
    }
    let names = ["buffers", "sizes", "begin", "end"];
    for (p, n) in func.get_param_iter().zip(names) {
        p.set_name(n);
    }
    let entry_bb = ctx.append_basic_block(func, "entry");
    let entry = ctx.create_builder();
    entry.position_at_end(entry_bb);
    let b = ctx.create_builder();
    let mut fx = Fx {
        ctx,
        module,
        b,
        entry,
        kernel,
        func,
        device: attrs.device,
        buffers: vec![],
        sizes: vec![],
        vars: HashMap::new(),
        arrays: HashMap::new(),
        thread: None,
    };
    match fx.write() {
        Ok(()) => Ok(func),
        Err(e) => {
            // Leave no half-written function behind.
            unsafe { func.delete() };
            Err(err(e))
        }
    }
}

fn set_attrs<'ctx>(ctx: &'ctx Context, func: FunctionValue<'ctx>, attrs: &FnAttrs) {
    let f = AttributeLoc::Function;
    func.add_attribute(f, ctx.create_string_attribute("target-cpu", &attrs.cpu));
    if !attrs.features.is_empty() {
        func.add_attribute(f, ctx.create_string_attribute("target-features", &attrs.features));
    }
    if let Some(w) = attrs.prefer_vector_width {
        func.add_attribute(f, ctx.create_string_attribute("prefer-vector-width", &w.to_string()));
    }
    let enum_attr = |name: &str| ctx.create_enum_attribute(Attribute::get_named_enum_kind_id(name), 0);
    func.add_attribute(f, enum_attr("nounwind"));
    // The kernel reads the buffer and size tables and never keeps pointers to them.
    for p in 0..2 {
        func.add_attribute(AttributeLoc::Param(p), enum_attr("nocapture"));
        func.add_attribute(AttributeLoc::Param(p), enum_attr("readonly"));
    }
}

impl<'a, 'ctx> Fx<'a, 'ctx> {
    fn llvm_ty(&self, t: Ty) -> BasicTypeEnum<'ctx> {
        match t {
            Ty::F => self.ctx.f32_type().into(),
            Ty::I => self.ctx.i64_type().into(),
            Ty::B => self.ctx.bool_type().into(),
        }
    }

    fn elem_ty(&self, e: Elem) -> BasicTypeEnum<'ctx> {
        match e {
            Elem::F32 => self.ctx.f32_type().into(),
            Elem::BF16 | Elem::F16 => self.ctx.i16_type().into(),
            Elem::I32 => self.ctx.i32_type().into(),
            Elem::U8 => self.ctx.i8_type().into(),
        }
    }

    /// The bits of `x` rounded to bfloat16, in the upper half of an i32 (the lower half
    /// zero): `kernel::math::round_bf16`'s integer operations, NaN made quiet.
    fn bf16_rounded_bits(&self, x: FloatValue<'ctx>) -> Result<IntValue<'ctx>, String> {
        let (b, i32t) = (&self.b, self.ctx.i32_type());
        let k = |v: u32| i32t.const_int(v as u64, false);
        let bits = b.build_bit_cast(x, i32t, "").map_err(be)?.into_int_value();
        let high = b.build_and(bits, k(0xffff_0000), "").map_err(be)?;
        let nan = b.build_or(high, k(0x0040_0000), "").map_err(be)?;
        let lsb = b.build_and(b.build_right_shift(bits, k(16), false, "").map_err(be)?, k(1), "").map_err(be)?;
        let up = b.build_int_add(b.build_int_add(bits, k(0x7fff), "").map_err(be)?, lsb, "").map_err(be)?;
        let rounded = b.build_and(up, k(0xffff_0000), "").map_err(be)?;
        let is_nan = b.build_float_compare(FloatPredicate::UNO, x, x, "").map_err(be)?;
        Ok(b.build_select(is_nan, nan, rounded, "").map_err(be)?.into_int_value())
    }

    /// `x` as an IEEE half (`fptrunc`: to nearest, ties to even).
    fn to_half(&self, x: FloatValue<'ctx>) -> Result<FloatValue<'ctx>, String> {
        self.b.build_float_trunc(x, self.ctx.f16_type(), "").map_err(be)
    }

    /// In-memory type of local array elements (bools as bytes).
    fn array_elem_ty(&self, t: Ty) -> BasicTypeEnum<'ctx> {
        match t {
            Ty::B => self.ctx.i8_type().into(),
            t => self.llvm_ty(t),
        }
    }

    fn i64c(&self, v: i64) -> IntValue<'ctx> {
        self.ctx.i64_type().const_int(v as u64, true)
    }

    fn i32c(&self, v: u32) -> IntValue<'ctx> {
        self.ctx.i32_type().const_int(v as u64, false)
    }

    fn f32c(&self, v: f32) -> FloatValue<'ctx> {
        self.ctx.f32_type().const_float(v as f64)
    }

    fn write(&mut self) -> Result<(), String> {
        let k = self.kernel;
        let ptr = self.ctx.ptr_type(Default::default());
        let i64t = self.ctx.i64_type();
        let mut bufs = self.func.get_nth_param(0).unwrap().into_pointer_value();
        let mut sizes = self.func.get_nth_param(1).unwrap().into_pointer_value();
        let gpu = self.device == Device::Nvptx;
        let global = self.ctx.ptr_type(AddressSpace::from(1u16));
        if gpu {
            // The tables live in device memory: read them with `ld.global`.
            bufs = self.entry.build_address_space_cast(bufs, global, "buffers.global").map_err(be)?;
            sizes = self.entry.build_address_space_cast(sizes, global, "sizes.global").map_err(be)?;
        }
        // Load the buffer and size tables once: stores into the buffers cannot change them.
        for i in 0..k.buffers.len() {
            let p = unsafe { self.entry.build_in_bounds_gep(ptr, bufs, &[self.i64c(i as i64)], "") }.map_err(be)?;
            let mut v = self.entry.build_load(ptr, p, &k.buffers[i].name).map_err(be)?.into_pointer_value();
            if gpu {
                v = self.entry.build_address_space_cast(v, global, "").map_err(be)?;
            }
            self.buffers.push(v);
        }
        for i in 0..k.sizes.len() + k.scalars.len() {
            let name = k.sizes.iter().chain(&k.scalars).nth(i).unwrap();
            let p = unsafe { self.entry.build_in_bounds_gep(i64t, sizes, &[self.i64c(i as i64)], "") }.map_err(be)?;
            let v = self.entry.build_load(i64t, p, name).map_err(be)?;
            self.sizes.push(v.into_int_value());
        }
        let start = self.ctx.append_basic_block(self.func, "start");
        self.b.position_at_end(start);
        let begin = self.func.get_nth_param(2).unwrap().into_int_value();
        let end = self.func.get_nth_param(3).unwrap().into_int_value();
        let index = k.index;
        if k.threads.is_some() && !gpu {
            return Err("a block kernel (threads, shared arrays, barriers) runs on GPUs only".into());
        }
        if gpu {
            self.emit_gpu_index(index, begin, end, k.threads.is_some(), &k.body)?;
        } else {
            self.emit_loop(index, begin, end, None, &k.body)?;
        }
        self.b.build_return(None).map_err(be)?;
        self.entry.build_unconditional_branch(start).map_err(be)?;
        Ok(())
    }

    /// The storage of variable `v` of class `t`, created on first definition.
    fn var_slot(&mut self, v: Var, t: Ty) -> Result<PointerValue<'ctx>, String> {
        if let Some(&(p, old)) = self.vars.get(&v) {
            if old != t {
                return Err(format!("{v} is redefined as {} (it was {})", t.name(), old.name()));
            }
            return Ok(p);
        }
        let p = self.entry.build_alloca(self.llvm_ty(t), &v.to_string()).map_err(be)?;
        self.vars.insert(v, (p, t));
        Ok(p)
    }

    /// The GPU form of the parallel loop, run when `var < end`:
    /// - a thread per iteration: `var = begin + ctaid.x · ntid.x + tid.x` (a launch has
    ///   `ceil((end − begin) / ntid.x)` blocks, so the last one is partly idle);
    /// - a block kernel (`blocks`): `var = begin + ctaid.x`, one block per iteration, with
    ///   `Expr::Thread = tid.x` (a block past `end` leaves whole, so barriers stay uniform).
    fn emit_gpu_index(
        &mut self,
        var: Var,
        begin: IntValue<'ctx>,
        end: IntValue<'ctx>,
        blocks: bool,
        body: &[Stmt],
    ) -> Result<(), String> {
        let slot = self.var_slot(var, Ty::I)?;
        let i64t = self.ctx.i64_type();
        let sreg = |name: &str| -> Result<IntValue<'ctx>, String> {
            let v = self.call(&format!("llvm.nvvm.read.ptx.sreg.{name}"), &[], &[])?.into_int_value();
            self.b.build_int_z_extend(v, i64t, name).map_err(be)
        };
        let (block, thread) = (sreg("ctaid.x")?, sreg("tid.x")?);
        let offset = if blocks {
            self.thread = Some(thread);
            block
        } else {
            let first = self.b.build_int_mul(block, sreg("ntid.x")?, "").map_err(be)?;
            self.b.build_int_add(first, thread, "").map_err(be)?
        };
        let iv = self.b.build_int_add(begin, offset, &var.to_string()).map_err(be)?;
        let body_bb = self.ctx.append_basic_block(self.func, &format!("{var}.body"));
        let exit = self.ctx.append_basic_block(self.func, &format!("{var}.exit"));
        let inside = self.b.build_int_compare(IntPredicate::SLT, iv, end, "").map_err(be)?;
        self.b.build_conditional_branch(inside, body_bb, exit).map_err(be)?;
        self.b.position_at_end(body_bb);
        self.b.build_store(slot, iv).map_err(be)?;
        self.block(body)?;
        self.b.build_unconditional_branch(exit).map_err(be)?;
        self.b.position_at_end(exit);
        Ok(())
    }

    /// `for var in begin..end { body }` with an optional `llvm.loop` hint on the latch.
    fn emit_loop(
        &mut self,
        var: Var,
        begin: IntValue<'ctx>,
        end: IntValue<'ctx>,
        kind: Option<LoopKind>,
        body: &[Stmt],
    ) -> Result<(), String> {
        let slot = self.var_slot(var, Ty::I)?;
        let pre = self.b.get_insert_block().unwrap();
        let header = self.ctx.append_basic_block(self.func, &format!("{var}.header"));
        let body_bb = self.ctx.append_basic_block(self.func, &format!("{var}.body"));
        let exit = self.ctx.append_basic_block(self.func, &format!("{var}.exit"));
        self.b.build_unconditional_branch(header).map_err(be)?;
        self.b.position_at_end(header);
        let i = self.b.build_phi(self.ctx.i64_type(), &var.to_string()).map_err(be)?;
        i.add_incoming(&[(&begin, pre)]);
        let iv = i.as_basic_value().into_int_value();
        let more = self.b.build_int_compare(IntPredicate::SLT, iv, end, "").map_err(be)?;
        self.b.build_conditional_branch(more, body_bb, exit).map_err(be)?;
        self.b.position_at_end(body_bb);
        self.b.build_store(slot, iv).map_err(be)?;
        self.block(body)?;
        let next = self.b.build_int_add(iv, self.i64c(1), "").map_err(be)?;
        let latch = self.b.get_insert_block().unwrap();
        let br = self.b.build_unconditional_branch(header).map_err(be)?;
        i.add_incoming(&[(&next, latch)]);
        if kind == Some(LoopKind::Vector) && self.device == Device::Cpu {
            self.loop_hint(br, "llvm.loop.vectorize.enable")?;
        }
        self.b.position_at_end(exit);
        Ok(())
    }

    /// Attach `!llvm.loop !{self, !{name, i1 true}}` to a loop latch branch.
    fn loop_hint(&self, br: inkwell::values::InstructionValue<'ctx>, name: &str) -> Result<(), String> {
        use inkwell::llvm_sys::core::{LLVMMDNodeInContext2, LLVMMDStringInContext2, LLVMMetadataAsValue};
        use inkwell::llvm_sys::core::{LLVMSetMetadata, LLVMValueAsMetadata};
        use inkwell::llvm_sys::debuginfo::{LLVMMetadataReplaceAllUsesWith, LLVMTemporaryMDNode};
        let c = self.ctx.raw();
        unsafe {
            let s = LLVMMDStringInContext2(c, name.as_ptr().cast(), name.len());
            let t = LLVMValueAsMetadata(self.ctx.bool_type().const_int(1, false).as_value_ref());
            let mut hint = [s, t];
            let hint = LLVMMDNodeInContext2(c, hint.as_mut_ptr(), 2);
            let tmp = LLVMTemporaryMDNode(c, std::ptr::null_mut(), 0);
            let mut ops = [tmp, hint];
            let node = LLVMMDNodeInContext2(c, ops.as_mut_ptr(), 2);
            LLVMMetadataReplaceAllUsesWith(tmp, node);
            let kind = self.ctx.get_kind_id("llvm.loop");
            LLVMSetMetadata(br.as_value_ref(), kind, LLVMMetadataAsValue(c, node));
        }
        Ok(())
    }

    fn block(&mut self, body: &[Stmt]) -> Result<(), String> {
        for s in body {
            self.stmt(s)?;
        }
        Ok(())
    }

    fn expect(&mut self, e: &Expr, t: Ty, what: &str) -> Result<BasicValueEnum<'ctx>, String> {
        let (v, got) = self.expr(e)?;
        if got != t {
            return Err(format!("{what} must be {}, got {}: `{}`", t.name(), got.name(), print::expr(self.kernel, e)));
        }
        Ok(v)
    }

    fn int(&mut self, e: &Expr, what: &str) -> Result<IntValue<'ctx>, String> {
        Ok(self.expect(e, Ty::I, what)?.into_int_value())
    }

    fn buffer(&self, buffer: usize) -> Result<(PointerValue<'ctx>, Elem), String> {
        match self.buffers.get(buffer) {
            Some(&p) => Ok((p, self.kernel.buffers[buffer].elem)),
            None => Err(format!("buffer {buffer} is not declared ({} buffers)", self.kernel.buffers.len())),
        }
    }

    fn array(&self, a: Var) -> Result<(PointerValue<'ctx>, Ty, usize), String> {
        self.arrays.get(&a).copied().ok_or_else(|| format!("array {a} is used before it is defined"))
    }

    fn stmt(&mut self, s: &Stmt) -> Result<(), String> {
        match s {
            Stmt::For { var, extent, kind, body } => {
                let n = self.int(extent, "a loop extent")?;
                self.emit_loop(*var, self.i64c(0), n, Some(*kind), body)?;
            }
            Stmt::Let { var, value } => {
                let (v, t) = self.expr(value)?;
                let slot = self.var_slot(*var, t)?;
                self.b.build_store(slot, v).map_err(be)?;
            }
            Stmt::Mut { var, ty, init } => {
                let t = Ty::of(*ty);
                let v = self.expect(init, t, &format!("the initial value of {var}"))?;
                let slot = self.var_slot(*var, t)?;
                self.b.build_store(slot, v).map_err(be)?;
            }
            Stmt::Assign { var, value } => {
                let &(slot, t) = self.vars.get(var).ok_or_else(|| format!("assignment to undefined {var}"))?;
                let v = self.expect(value, t, &format!("a value assigned to {var}"))?;
                self.b.build_store(slot, v).map_err(be)?;
            }
            Stmt::Store { buffer, index, value } => {
                let (base, elem) = self.buffer(*buffer)?;
                let name = &self.kernel.buffers[*buffer].name;
                let i = self.int(index, &format!("an index of `{name}`"))?;
                let v = self.expect(value, Ty::of_elem(elem), &format!("a value stored into `{name}`"))?;
                let v: BasicValueEnum = match elem {
                    Elem::F32 => v,
                    Elem::BF16 => {
                        let bits = self.bf16_rounded_bits(v.into_float_value())?;
                        let high = self.b.build_right_shift(bits, self.ctx.i32_type().const_int(16, false), false, "");
                        self.b.build_int_truncate(high.map_err(be)?, self.ctx.i16_type(), "").map_err(be)?.into()
                    }
                    Elem::F16 => {
                        let h = self.to_half(v.into_float_value())?;
                        self.b.build_bit_cast(h, self.ctx.i16_type(), "").map_err(be)?
                    }
                    Elem::I32 => {
                        self.b.build_int_truncate(v.into_int_value(), self.ctx.i32_type(), "").map_err(be)?.into()
                    }
                    Elem::U8 => {
                        self.b.build_int_z_extend(v.into_int_value(), self.ctx.i8_type(), "").map_err(be)?.into()
                    }
                };
                let p = unsafe { self.b.build_in_bounds_gep(self.elem_ty(elem), base, &[i], "") }.map_err(be)?;
                let st = self.b.build_store(p, v).map_err(be)?;
                st.set_alignment(elem.bytes() as u32).map_err(|e| e.to_string())?;
            }
            Stmt::Array { var, elem, len } => {
                let t = Ty::of(*elem);
                let ety = self.array_elem_ty(t);
                let p = match self.arrays.get(var) {
                    Some(&(p, old, old_len)) if old == t && old_len == *len => p,
                    Some(_) => return Err(format!("array {var} is redefined with another type or length")),
                    None => {
                        let aty = ety.array_type(u32::try_from(*len).map_err(|_| format!("array {var} is too long"))?);
                        let p = self.entry.build_alloca(aty, &var.to_string()).map_err(be)?;
                        self.arrays.insert(*var, (p, t, *len));
                        p
                    }
                };
                let bytes = ety.size_of().unwrap().const_mul(self.i64c(*len as i64));
                self.b.build_memset(p, 8, self.ctx.i8_type().const_zero(), bytes).map_err(be)?;
            }
            Stmt::Shared { .. } | Stmt::Barrier | Stmt::Mma { .. } if self.thread.is_none() => {
                return Err("a shared array, barrier or warp product outside a block kernel".into());
            }
            Stmt::Mma { input, acc, a, b } => self.mma(*input, acc, a, b)?,
            Stmt::Shared { var, elem, len } => {
                let t = Ty::of(*elem);
                let aty =
                    self.array_elem_ty(t).array_type(u32::try_from(*len).map_err(|_| format!("{var} is too long"))?);
                if self.arrays.contains_key(var) {
                    return Err(format!("shared array {var} is declared twice"));
                }
                let shared = Some(AddressSpace::from(3u16));
                let p = if self.kernel.dynamic_shared_bytes() > 0 {
                    // Beyond the static limit: an offset into the launch's dynamic shared
                    // memory, which every `extern .shared` array of the module addresses
                    // from its start (as CUDA's `extern __shared__`).
                    let (layout, _) = self.kernel.shared_layout();
                    let offset = layout.iter().find(|(v, _)| v == var).map(|&(_, o)| o).ok_or("unlaid shared array")?;
                    let name = "tnc_dynamic_shared";
                    let base = match self.module.get_global(name) {
                        Some(g) => g,
                        None => {
                            let g = self.module.add_global(self.ctx.i8_type().array_type(0), shared, name);
                            g.set_linkage(Linkage::External);
                            g.set_alignment(16);
                            g
                        }
                    };
                    let at = self.i64c(offset as i64);
                    unsafe { self.b.build_in_bounds_gep(self.ctx.i8_type(), base.as_pointer_value(), &[at], "") }
                        .map_err(be)?
                } else {
                    let name = format!("{}.{var}", self.kernel.name);
                    let g = self.module.add_global(aty, shared, &name);
                    g.set_linkage(Linkage::Internal);
                    g.set_initializer(&aty.get_undef());
                    g.set_alignment(16);
                    g.as_pointer_value()
                };
                self.arrays.insert(*var, (p, t, *len));
            }
            Stmt::Barrier => {
                let f = Intrinsic::find("llvm.nvvm.barrier0")
                    .and_then(|i| i.get_declaration(self.module, &[]))
                    .ok_or("LLVM has no intrinsic `llvm.nvvm.barrier0`")?;
                self.b.build_call(f, &[], "").map_err(be)?;
            }
            Stmt::StoreArray { array, index, value } => {
                let (p, t, _) = self.array(*array)?;
                let i = self.int(index, &format!("an index of {array}"))?;
                let mut v = self.expect(value, t, &format!("a value stored into {array}"))?;
                if t == Ty::B {
                    v = self.b.build_int_z_extend(v.into_int_value(), self.ctx.i8_type(), "").map_err(be)?.into();
                }
                let ep = unsafe { self.b.build_in_bounds_gep(self.array_elem_ty(t), p, &[i], "") }.map_err(be)?;
                self.b.build_store(ep, v).map_err(be)?;
            }
            Stmt::If { cond, then, otherwise } => {
                let c = self.expect(cond, Ty::B, "an `if` condition")?.into_int_value();
                let then_bb = self.ctx.append_basic_block(self.func, "then");
                let else_bb = self.ctx.append_basic_block(self.func, "else");
                let merge = self.ctx.append_basic_block(self.func, "endif");
                self.b.build_conditional_branch(c, then_bb, else_bb).map_err(be)?;
                self.b.position_at_end(then_bb);
                self.block(then)?;
                self.b.build_unconditional_branch(merge).map_err(be)?;
                self.b.position_at_end(else_bb);
                self.block(otherwise)?;
                self.b.build_unconditional_branch(merge).map_err(be)?;
                self.b.position_at_end(merge);
            }
        }
        Ok(())
    }

    /// A warp's matrix product: `llvm.nvvm.mma.m16n8k16.row.col.*`, each pair of A's and B's
    /// elements rounded (`cvt.rn`) into one 32-bit register, the even element in the low
    /// half, as `kernel::mma` lays them out.
    fn mma(&mut self, input: Elem, acc: &[Var; 4], a: &[Var; 8], b: &[Var; 4]) -> Result<(), String> {
        if self.device != Device::Nvptx {
            return Err("a warp's matrix product on a CPU (tensor cores are a GPU's)".into());
        }
        let (half, name) = match input {
            Elem::BF16 => (self.ctx.bf16_type(), "llvm.nvvm.mma.m16n8k16.row.col.bf16"),
            Elem::F16 => (self.ctx.f16_type(), "llvm.nvvm.mma.m16n8k16.row.col.f32.f32"),
            other => return Err(format!("a warp's matrix product takes bf16 or f16 inputs, not {other:?}")),
        };
        let pair_ty = half.vec_type(2);
        let mut args: Vec<BasicValueEnum<'ctx>> = Vec::new();
        for pair in a.chunks(2).chain(b.chunks(2)) {
            let mut v = pair_ty.get_undef();
            for (i, var) in pair.iter().enumerate() {
                let x = self.expect(&Expr::Var(*var), Ty::F, "a fragment of a warp's matrix product")?;
                let h = self.b.build_float_trunc(x.into_float_value(), half, "").map_err(be)?;
                v = self
                    .b
                    .build_insert_element(v, h, self.ctx.i32_type().const_int(i as u64, false), "")
                    .map_err(be)?;
            }
            // bf16 pairs travel as i32 registers, f16 pairs as <2 x half> (the intrinsics'
            // signatures in LLVM 19).
            args.push(match input {
                Elem::BF16 => self.b.build_bit_cast(v, self.ctx.i32_type(), "").map_err(be)?,
                _ => v.into(),
            });
        }
        for v in acc {
            args.push(self.expect(&Expr::Var(*v), Ty::F, "an accumulator of a warp's matrix product")?);
        }
        let f32x4 = self.ctx.struct_type(&[self.ctx.f32_type().into(); 4], false);
        let arg_tys: Vec<_> = args.iter().map(|a| a.get_type().into()).collect();
        let f = match self.module.get_function(name) {
            Some(f) => f,
            None => self.module.add_function(name, f32x4.fn_type(&arg_tys, false), None),
        };
        let d = self.call_fn(f, &args)?.into_struct_value();
        for (i, v) in acc.iter().enumerate() {
            let x = self.b.build_extract_value(d, i as u32, "").map_err(be)?;
            let &(slot, _) = self.vars.get(v).ok_or_else(|| format!("accumulator {v} is not defined"))?;
            self.b.build_store(slot, x).map_err(be)?;
        }
        Ok(())
    }

    fn call(
        &self,
        name: &str,
        overloads: &[BasicTypeEnum<'ctx>],
        args: &[BasicValueEnum<'ctx>],
    ) -> Result<BasicValueEnum<'ctx>, String> {
        let f = Intrinsic::find(name)
            .and_then(|i| i.get_declaration(self.module, overloads))
            .ok_or_else(|| format!("LLVM has no intrinsic `{name}`"))?;
        self.call_fn(f, args)
    }

    fn call_fn(&self, f: FunctionValue<'ctx>, args: &[BasicValueEnum<'ctx>]) -> Result<BasicValueEnum<'ctx>, String> {
        let args: Vec<_> = args.iter().map(|&a| a.into()).collect();
        let c = self.b.build_call(f, &args, "").map_err(be)?;
        match c.try_as_basic_value() {
            inkwell::values::ValueKind::Basic(v) => Ok(v),
            _ => Err("call without a result".into()),
        }
    }

    /// An external `float name(float, ...)` with `arity` arguments (libm or libdevice).
    fn extern_f32(&self, name: &str, arity: usize) -> FunctionValue<'ctx> {
        self.module.get_function(name).unwrap_or_else(|| {
            let f32t = self.ctx.f32_type();
            let params = vec![f32t.into(); arity];
            let f = self.module.add_function(name, f32t.fn_type(&params, false), Some(Linkage::External));
            let nounwind = Attribute::get_named_enum_kind_id("nounwind");
            f.add_attribute(AttributeLoc::Function, self.ctx.create_enum_attribute(nounwind, 0));
            f
        })
    }

    fn expr(&mut self, e: &Expr) -> Result<(BasicValueEnum<'ctx>, Ty), String> {
        let b = &self.b;
        Ok(match e {
            Expr::F32(x) => (self.f32c(*x).into(), Ty::F),
            Expr::I64(i) => (self.i64c(*i).into(), Ty::I),
            Expr::Bool(v) => (self.ctx.bool_type().const_int(*v as u64, false).into(), Ty::B),
            Expr::Var(v) => {
                let &(p, t) = self.vars.get(v).ok_or_else(|| format!("{v} is used before it is defined"))?;
                (b.build_load(self.llvm_ty(t), p, &v.to_string()).map_err(be)?, t)
            }
            Expr::Thread => (self.thread.ok_or("`thread` outside a block kernel")?.into(), Ty::I),
            Expr::Size(i) => match self.sizes.get(*i) {
                Some(&v) => (v.into(), Ty::I),
                None => {
                    return Err(format!("size argument {i} is not declared ({} sizes and scalars)", self.sizes.len()))
                }
            },
            Expr::Load { buffer, index } => {
                let (base, elem) = self.buffer(*buffer)?;
                let name = self.kernel.buffers[*buffer].name.clone();
                let i = self.int(index, &format!("an index of `{name}`"))?;
                let b = &self.b;
                let p = unsafe { b.build_in_bounds_gep(self.elem_ty(elem), base, &[i], "") }.map_err(be)?;
                let v = b.build_load(self.elem_ty(elem), p, &name).map_err(be)?;
                v.as_instruction_value().unwrap().set_alignment(elem.bytes() as u32).map_err(|e| e.to_string())?;
                match elem {
                    Elem::F32 => (v, Ty::F),
                    Elem::BF16 => {
                        let wide = b.build_int_z_extend(v.into_int_value(), self.ctx.i32_type(), "").map_err(be)?;
                        let bits =
                            b.build_left_shift(wide, self.ctx.i32_type().const_int(16, false), "").map_err(be)?;
                        (b.build_bit_cast(bits, self.ctx.f32_type(), "").map_err(be)?, Ty::F)
                    }
                    Elem::F16 => {
                        let h = b.build_bit_cast(v, self.ctx.f16_type(), "").map_err(be)?.into_float_value();
                        (b.build_float_ext(h, self.ctx.f32_type(), "").map_err(be)?.into(), Ty::F)
                    }
                    Elem::I32 => {
                        (b.build_int_s_extend(v.into_int_value(), self.ctx.i64_type(), "").map_err(be)?.into(), Ty::I)
                    }
                    Elem::U8 => {
                        let z = self.ctx.i8_type().const_zero();
                        (b.build_int_compare(IntPredicate::NE, v.into_int_value(), z, "").map_err(be)?.into(), Ty::B)
                    }
                }
            }
            Expr::LoadArray { array, index } => {
                let (p, t, _) = self.array(*array)?;
                let i = self.int(index, &format!("an index of {array}"))?;
                let b = &self.b;
                let ety = self.array_elem_ty(t);
                let ep = unsafe { b.build_in_bounds_gep(ety, p, &[i], "") }.map_err(be)?;
                let v = b.build_load(ety, ep, "").map_err(be)?;
                if t == Ty::B {
                    let z = self.ctx.i8_type().const_zero();
                    (b.build_int_compare(IntPredicate::NE, v.into_int_value(), z, "").map_err(be)?.into(), t)
                } else {
                    (v, t)
                }
            }
            Expr::Unary(op, a) => {
                let (v, t) = self.expr(a)?;
                self.unary(*op, v, t).map_err(|m| format!("{m}: `{}`", print::expr(self.kernel, e)))?
            }
            Expr::Binary(op, x, y) => {
                let (a, ta) = self.expr(x)?;
                let (c, tc) = self.expr(y)?;
                if ta != tc {
                    return Err(format!(
                        "{op:?} of {} and {}: `{}`",
                        ta.name(),
                        tc.name(),
                        print::expr(self.kernel, e)
                    ));
                }
                self.binary(*op, a, c, ta).map_err(|m| format!("{m}: `{}`", print::expr(self.kernel, e)))?
            }
            Expr::MulAdd(x, y, z) => {
                let a = self.expect(x, Ty::F, "a fused multiply-add's factor")?;
                let c = self.expect(y, Ty::F, "a fused multiply-add's factor")?;
                let d = self.expect(z, Ty::F, "a fused multiply-add's addend")?;
                let f32t = self.ctx.f32_type().into();
                (self.call("llvm.fma", &[f32t], &[a, c, d])?, Ty::F)
            }
            Expr::Select(c, x, y) => {
                let cv = self.expect(c, Ty::B, "a select condition")?.into_int_value();
                if !x.may_trap() && !y.may_trap() {
                    let (a, ta) = self.expr(x)?;
                    let (d, td) = self.expr(y)?;
                    if ta != td {
                        return Err(format!(
                            "select of {} and {}: `{}`",
                            ta.name(),
                            td.name(),
                            print::expr(self.kernel, e)
                        ));
                    }
                    (self.b.build_select(cv, a, d, "").map_err(be)?, ta)
                } else {
                    let then_bb = self.ctx.append_basic_block(self.func, "sel.then");
                    let else_bb = self.ctx.append_basic_block(self.func, "sel.else");
                    let merge = self.ctx.append_basic_block(self.func, "sel.end");
                    self.b.build_conditional_branch(cv, then_bb, else_bb).map_err(be)?;
                    self.b.position_at_end(then_bb);
                    let (a, ta) = self.expr(x)?;
                    let then_end = self.b.get_insert_block().unwrap();
                    self.b.build_unconditional_branch(merge).map_err(be)?;
                    self.b.position_at_end(else_bb);
                    let (d, td) = self.expr(y)?;
                    let else_end = self.b.get_insert_block().unwrap();
                    self.b.build_unconditional_branch(merge).map_err(be)?;
                    if ta != td {
                        return Err(format!(
                            "select of {} and {}: `{}`",
                            ta.name(),
                            td.name(),
                            print::expr(self.kernel, e)
                        ));
                    }
                    self.b.position_at_end(merge);
                    let phi = self.b.build_phi(self.llvm_ty(ta), "").map_err(be)?;
                    phi.add_incoming(&[(&a, then_end), (&d, else_end)]);
                    (phi.as_basic_value(), ta)
                }
            }
            Expr::Cast(to, a) => {
                let (v, t) = self.expr(a)?;
                (self.cast(*to, v, t)?, Ty::of(*to))
            }
            Expr::DropoutKeep { seed, salt, index, step, rate } => {
                let seed = self.int(seed, "a dropout seed")?;
                let index = self.int(index, "a dropout index")?;
                let step = self.int(step, "a dropout step")?;
                (self.dropout_keep(seed, *salt, index, step, *rate)?.into(), Ty::B)
            }
        })
    }

    fn unary(&self, op: Unary, v: BasicValueEnum<'ctx>, t: Ty) -> Result<(BasicValueEnum<'ctx>, Ty), String> {
        let b = &self.b;
        let f32t: BasicTypeEnum = self.ctx.f32_type().into();
        match (op, t) {
            (Unary::Not, Ty::B) => Ok((b.build_not(v.into_int_value(), "").map_err(be)?.into(), Ty::B)),
            (Unary::Neg, Ty::I) => Ok((b.build_int_neg(v.into_int_value(), "").map_err(be)?.into(), Ty::I)),
            (Unary::Abs, Ty::I) => {
                // wrapping_abs: abs(i64::MIN) = i64::MIN, so not poison.
                let poison = self.ctx.bool_type().const_zero().into();
                Ok((self.call("llvm.abs", &[self.ctx.i64_type().into()], &[v, poison])?, Ty::I))
            }
            (Unary::Not, _) => Err(format!("not of {}", t.name())),
            (_, Ty::F) => {
                let x = v.into_float_value();
                let one = self.f32c(1.0);
                let r: BasicValueEnum = match op {
                    Unary::Neg => b.build_float_neg(x, "").map_err(be)?.into(),
                    _ if self.device == Device::Nvptx && libdevice_name(op).is_some() => {
                        self.call_fn(self.extern_f32(libdevice_name(op).unwrap(), 1), &[v])?
                    }
                    // exp, sin, cos: inline, so that vector loops stay vectorized.
                    _ if let Some(f) = super::vector_math::function(self.ctx, self.module, op)? => {
                        self.call_fn(f, &[v])?
                    }
                    Unary::Log => self.call("llvm.log", &[f32t], &[v])?,
                    Unary::Sqrt => self.call("llvm.sqrt", &[f32t], &[v])?,
                    Unary::Rsqrt => {
                        let s = self.call("llvm.sqrt", &[f32t], &[v])?.into_float_value();
                        b.build_float_div(one, s, "").map_err(be)?.into()
                    }
                    Unary::Recip => b.build_float_div(one, x, "").map_err(be)?.into(),
                    Unary::Abs => self.call("llvm.fabs", &[f32t], &[v])?,
                    Unary::Tanh => self.call_fn(self.extern_f32("tanhf", 1), &[v])?,
                    Unary::Exp | Unary::Sin | Unary::Cos => unreachable!("inline (vector_math)"),
                    Unary::RoundBf16 => b.build_bit_cast(self.bf16_rounded_bits(x)?, f32t, "").map_err(be)?,
                    Unary::RoundF16 => b.build_float_ext(self.to_half(x)?, self.ctx.f32_type(), "").map_err(be)?.into(),
                    Unary::Not => unreachable!("handled above"),
                };
                Ok((r, Ty::F))
            }
            _ => Err(format!("{op:?} of {}", t.name())),
        }
    }

    fn binary(
        &self,
        op: Binary,
        a: BasicValueEnum<'ctx>,
        c: BasicValueEnum<'ctx>,
        t: Ty,
    ) -> Result<(BasicValueEnum<'ctx>, Ty), String> {
        use Binary::*;
        let b = &self.b;
        match t {
            Ty::F => {
                let (x, y) = (a.into_float_value(), c.into_float_value());
                let f32t: BasicTypeEnum = self.ctx.f32_type().into();
                let cmp = |p| -> Result<(BasicValueEnum<'ctx>, Ty), String> {
                    Ok((b.build_float_compare(p, x, y, "").map_err(be)?.into(), Ty::B))
                };
                let gpu = self.device == Device::Nvptx;
                let r: BasicValueEnum = match op {
                    // NVPTX has no exact `frem` (it expands to x − trunc(x/y)·y).
                    Rem if gpu => self.call_fn(self.extern_f32("__nv_fmodf", 2), &[a, c])?,
                    Pow if gpu => self.call_fn(self.extern_f32("__nv_powf", 2), &[a, c])?,
                    Add => b.build_float_add(x, y, "").map_err(be)?.into(),
                    Sub => b.build_float_sub(x, y, "").map_err(be)?.into(),
                    Mul => b.build_float_mul(x, y, "").map_err(be)?.into(),
                    Div => b.build_float_div(x, y, "").map_err(be)?.into(),
                    Rem => b.build_float_rem(x, y, "").map_err(be)?.into(),
                    Max => self.call("llvm.maximum", &[f32t], &[a, c])?,
                    Min => self.call("llvm.minimum", &[f32t], &[a, c])?,
                    Pow => self.call("llvm.pow", &[f32t], &[a, c])?,
                    Lt => return cmp(FloatPredicate::OLT),
                    Le => return cmp(FloatPredicate::OLE),
                    Gt => return cmp(FloatPredicate::OGT),
                    Ge => return cmp(FloatPredicate::OGE),
                    Eq => return cmp(FloatPredicate::OEQ),
                    // Rust's `!=` is true when either side is NaN.
                    Ne => return cmp(FloatPredicate::UNE),
                    And | Or => return Err("logical operation on f32".into()),
                };
                Ok((r, Ty::F))
            }
            Ty::I => {
                let (x, y) = (a.into_int_value(), c.into_int_value());
                let i64t: BasicTypeEnum = self.ctx.i64_type().into();
                let cmp = |p| -> Result<(BasicValueEnum<'ctx>, Ty), String> {
                    Ok((b.build_int_compare(p, x, y, "").map_err(be)?.into(), Ty::B))
                };
                let r: BasicValueEnum = match op {
                    Add => b.build_int_add(x, y, "").map_err(be)?.into(),
                    Sub => b.build_int_sub(x, y, "").map_err(be)?.into(),
                    Mul => b.build_int_mul(x, y, "").map_err(be)?.into(),
                    Div => b.build_int_signed_div(x, y, "").map_err(be)?.into(),
                    Rem => b.build_int_signed_rem(x, y, "").map_err(be)?.into(),
                    Max => self.call("llvm.smax", &[i64t], &[a, c])?,
                    Min => self.call("llvm.smin", &[i64t], &[a, c])?,
                    Pow => self.int_pow(x, y)?.into(),
                    Lt => return cmp(IntPredicate::SLT),
                    Le => return cmp(IntPredicate::SLE),
                    Gt => return cmp(IntPredicate::SGT),
                    Ge => return cmp(IntPredicate::SGE),
                    Eq => return cmp(IntPredicate::EQ),
                    Ne => return cmp(IntPredicate::NE),
                    And | Or => return Err("logical operation on integers".into()),
                };
                Ok((r, Ty::I))
            }
            Ty::B => {
                let (x, y) = (a.into_int_value(), c.into_int_value());
                let r = match op {
                    And => b.build_and(x, y, "").map_err(be)?,
                    Or => b.build_or(x, y, "").map_err(be)?,
                    Eq => b.build_int_compare(IntPredicate::EQ, x, y, "").map_err(be)?,
                    Ne => b.build_xor(x, y, "").map_err(be)?,
                    _ => return Err(format!("{op:?} on bools")),
                };
                Ok((r.into(), Ty::B))
            }
        }
    }

    /// `x.wrapping_pow(y.clamp(0, u32::MAX))` by repeated squaring.
    fn int_pow(&self, x: IntValue<'ctx>, y: IntValue<'ctx>) -> Result<IntValue<'ctx>, String> {
        let i64t = self.ctx.i64_type();
        let lo = self.call("llvm.smax", &[i64t.into()], &[y.into(), self.i64c(0).into()])?;
        let e0 = self.call("llvm.smin", &[i64t.into()], &[lo, self.i64c(u32::MAX as i64).into()])?.into_int_value();
        let b = &self.b;
        let pre = b.get_insert_block().unwrap();
        let header = self.ctx.append_basic_block(self.func, "pow.header");
        let body = self.ctx.append_basic_block(self.func, "pow.body");
        let exit = self.ctx.append_basic_block(self.func, "pow.exit");
        b.build_unconditional_branch(header).map_err(be)?;
        b.position_at_end(header);
        let acc = b.build_phi(i64t, "acc").map_err(be)?;
        let base = b.build_phi(i64t, "base").map_err(be)?;
        let e = b.build_phi(i64t, "exp").map_err(be)?;
        let (accv, basev, ev) = (
            acc.as_basic_value().into_int_value(),
            base.as_basic_value().into_int_value(),
            e.as_basic_value().into_int_value(),
        );
        let more = b.build_int_compare(IntPredicate::NE, ev, self.i64c(0), "").map_err(be)?;
        b.build_conditional_branch(more, body, exit).map_err(be)?;
        b.position_at_end(body);
        let bit = b.build_and(ev, self.i64c(1), "").map_err(be)?;
        let odd = b.build_int_compare(IntPredicate::NE, bit, self.i64c(0), "").map_err(be)?;
        let prod = b.build_int_mul(accv, basev, "").map_err(be)?;
        let acc2 = b.build_select(odd, prod, accv, "").map_err(be)?.into_int_value();
        let base2 = b.build_int_mul(basev, basev, "").map_err(be)?;
        let e2 = b.build_right_shift(ev, self.i64c(1), false, "").map_err(be)?;
        b.build_unconditional_branch(header).map_err(be)?;
        acc.add_incoming(&[(&self.i64c(1), pre), (&acc2, body)]);
        base.add_incoming(&[(&x, pre), (&base2, body)]);
        e.add_incoming(&[(&e0, pre), (&e2, body)]);
        b.position_at_end(exit);
        Ok(accv)
    }

    fn cast(&self, to: Scalar, v: BasicValueEnum<'ctx>, from: Ty) -> Result<BasicValueEnum<'ctx>, String> {
        let b = &self.b;
        let (i64t, i32t, f32t) = (self.ctx.i64_type(), self.ctx.i32_type(), self.ctx.f32_type());
        Ok(match (to, from) {
            (Scalar::F32, Ty::F) | (Scalar::I64, Ty::I) | (Scalar::Bool, Ty::B) => v,
            (Scalar::F32, Ty::I) => b.build_signed_int_to_float(v.into_int_value(), f32t, "").map_err(be)?.into(),
            (Scalar::F32, Ty::B) => b.build_unsigned_int_to_float(v.into_int_value(), f32t, "").map_err(be)?.into(),
            (Scalar::I32, Ty::F) => {
                let r = self.call("llvm.fptosi.sat", &[i32t.into(), f32t.into()], &[v])?.into_int_value();
                b.build_int_s_extend(r, i64t, "").map_err(be)?.into()
            }
            (Scalar::I64, Ty::F) => self.call("llvm.fptosi.sat", &[i64t.into(), f32t.into()], &[v])?,
            (Scalar::I32, Ty::I) => {
                let r = b.build_int_truncate(v.into_int_value(), i32t, "").map_err(be)?;
                b.build_int_s_extend(r, i64t, "").map_err(be)?.into()
            }
            (Scalar::I32 | Scalar::I64, Ty::B) => {
                b.build_int_z_extend(v.into_int_value(), i64t, "").map_err(be)?.into()
            }
            (Scalar::Bool, Ty::I) => {
                b.build_int_compare(IntPredicate::NE, v.into_int_value(), self.i64c(0), "").map_err(be)?.into()
            }
            // Rust's `x != 0.0`: NaN is true.
            (Scalar::Bool, Ty::F) => {
                b.build_float_compare(FloatPredicate::UNE, v.into_float_value(), self.f32c(0.0), "").map_err(be)?.into()
            }
        })
    }

    /// `tnc_bundle::rng::dropout_keep(seed, salt, index, step, rate)`: Philox4x32-10 with
    /// key = split(seed ^ rotl(salt, 29)·φ64) and counter = (index lo, index hi, step lo,
    /// step hi); kept iff (word0 >> 8) ≥ rate·2^24.
    fn dropout_keep(
        &self,
        seed: IntValue<'ctx>,
        salt: u64,
        index: IntValue<'ctx>,
        step: IntValue<'ctx>,
        rate: f64,
    ) -> Result<IntValue<'ctx>, String> {
        const M0: u32 = 0xD251_1F53;
        const M1: u32 = 0xCD9E_8D57;
        const W0: u32 = 0x9E37_79B9;
        const W1: u32 = 0xBB67_AE85;
        let b = &self.b;
        let (i32t, i64t) = (self.ctx.i32_type(), self.ctx.i64_type());
        let lo = |x: IntValue<'ctx>| b.build_int_truncate(x, i32t, "").map_err(be);
        let hi = |x: IntValue<'ctx>| -> Result<IntValue<'ctx>, String> {
            let s = b.build_right_shift(x, i64t.const_int(32, false), false, "").map_err(be)?;
            b.build_int_truncate(s, i32t, "").map_err(be)
        };
        let mix = salt.rotate_left(29).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let key = b.build_xor(seed, i64t.const_int(mix, false), "").map_err(be)?;
        let mut k = [lo(key)?, hi(key)?];
        let mut c = [lo(index)?, hi(index)?, lo(step)?, hi(step)?];
        let wide = |x: IntValue<'ctx>| b.build_int_z_extend(x, i64t, "").map_err(be);
        for round in 0..10 {
            let p0 = b.build_int_mul(wide(c[0])?, i64t.const_int(M0 as u64, false), "").map_err(be)?;
            let p1 = b.build_int_mul(wide(c[2])?, i64t.const_int(M1 as u64, false), "").map_err(be)?;
            let x0 = b.build_xor(hi(p1)?, c[1], "").map_err(be)?;
            let x2 = b.build_xor(hi(p0)?, c[3], "").map_err(be)?;
            c = [b.build_xor(x0, k[0], "").map_err(be)?, lo(p1)?, b.build_xor(x2, k[1], "").map_err(be)?, lo(p0)?];
            if round < 9 {
                k = [
                    b.build_int_add(k[0], self.i32c(W0), "").map_err(be)?,
                    b.build_int_add(k[1], self.i32c(W1), "").map_err(be)?,
                ];
            }
        }
        let w = b.build_right_shift(c[0], self.i32c(8), false, "").map_err(be)?;
        // (w as f64) >= t  ⇔  w >= ceil(t) for an integer w in [0, 2^24).
        let t = rate * (1u32 << 24) as f64;
        let bool_c = |v: bool| self.ctx.bool_type().const_int(v as u64, false);
        Ok(if t.is_nan() {
            bool_c(false)
        } else if t <= 0.0 {
            bool_c(true)
        } else if t > ((1u32 << 24) - 1) as f64 {
            bool_c(false)
        } else {
            b.build_int_compare(IntPredicate::UGE, w, self.i32c(t.ceil() as u32), "keep").map_err(be)?
        })
    }
}
