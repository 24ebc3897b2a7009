//! Kernel IR → Cranelift IR (CLIF): each [`Kernel`] becomes one exported function with the
//! kernel IR's calling convention,
//!
//! ```text
//! void name(void **buffers, const int64_t *sizes, int64_t begin, int64_t end)
//! ```
//!
//! running the body for every `index` in `begin..end`, exactly as the LLVM CPU writer's
//! (`backend/llvm/writer.rs`) and with the same semantics, the reference executor's
//! (`kernel::exec`), f32 for f32:
//! - integers (I32 and I64 alike) are i64 values: a load from an i32 buffer sign-extends, a
//!   cast to I32 truncates to 32 bits and sign-extends back, a store truncates; bools are
//!   i8 0 or 1 (one byte in memory, as in the executor);
//! - float → integer casts saturate (NaN → 0): `fcvt_to_sint_sat`;
//! - f32 `max`/`min` propagate NaN: Cranelift's `fmax`/`fmin` are IEEE 754-2019's
//!   maximum/minimum, as LLVM's `llvm.maximum`;
//! - a fused multiply-add is Cranelift's `fma` (`vfmadd` with the `fma` feature, else a
//!   call to libm's `fmaf`), rounded once as everywhere;
//! - exp, sin, cos, the bf16 and f16 roundings and dropout's Philox are `kernel::math`'s
//!   and `tnc_bundle::rng`'s operation sequences, inlined (`math.rs`); log, pow, tanh and
//!   the float remainder call libm (`logf`, `powf`, `tanhf`, `fmodf`, the functions LLVM
//!   calls too), so the shared object links `-lm`;
//! - `Select` evaluates only the chosen operand when one may trap (a load, an integer
//!   division); otherwise it is a `select`.
//!
//! What the executor reports as an error at run time (an out-of-bounds access, integer
//! division by zero) is undefined in generated code, as in LLVM's; so is `i64::MIN / -1`,
//! which wraps in the executor and traps here (index arithmetic never divides negatives).
//!
//! Block kernels (threads, shared arrays, barriers, warp products) are a GPU's and are
//! refused. Type errors are reported as `Err` naming the kernel, before Cranelift's own
//! verifier runs.

use super::math::{self, Width};
use super::vector::Lanes;
use crate::kernel::print;
use crate::kernel::valid::Class;
use crate::kernel::{Binary, Elem, Expr, Kernel, LoopKind, Scalar, Stmt, Unary, Var};
use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::{types, AbiParam, FuncRef, InstBuilder, MemFlagsData, Type, Value};
use cranelift_codegen::ir::{StackSlot, StackSlotData, StackSlotKind};
use cranelift_codegen::isa::TargetFrontendConfig;
use cranelift_frontend::{FunctionBuilder, Variable};
use cranelift_module::{FuncId, Module};
use std::collections::HashMap;

/// The Cranelift type of a value class (`kernel::valid`): every integer is an i64, as in
/// the reference executor, a bool an i8 0 or 1.
pub(super) fn clif(c: Class) -> Type {
    match c {
        Class::F32 => types::F32,
        Class::Int => types::I64,
        Class::Bool => types::I8,
    }
}

/// Bytes of one element of a local array of a class.
fn array_bytes(c: Class) -> u32 {
    match c {
        Class::F32 => 4,
        Class::Int => 8,
        Class::Bool => 1,
    }
}

/// The libm functions generated code may call, declared once per object.
pub(super) struct Libm {
    ids: HashMap<&'static str, FuncId>,
}

/// `(name, arity)` of every libm function a kernel may call.
const LIBM: [(&str, usize); 4] = [("logf", 1), ("tanhf", 1), ("powf", 2), ("fmodf", 2)];

impl Libm {
    pub(super) fn declare(module: &mut impl Module) -> Result<Libm, String> {
        let mut ids = HashMap::new();
        for (name, arity) in LIBM {
            let mut sig = module.make_signature();
            sig.params.extend((0..arity).map(|_| AbiParam::new(types::F32)));
            sig.returns.push(AbiParam::new(types::F32));
            let id = module
                .declare_function(name, cranelift_module::Linkage::Import, &sig)
                .map_err(|e| format!("Cranelift: declaring `{name}`: {e}"))?;
            ids.insert(name, id);
        }
        Ok(Libm { ids })
    }
}

/// The memory flags of every buffer, table and local array access: aligned to its
/// element, and never trapping (the runtime checked the bounds of what it passes, as for
/// LLVM's code: an out-of-bounds access is the executor's error and undefined here).
pub(super) fn flags() -> MemFlagsData {
    MemFlagsData::trusted()
}

pub(super) struct Fx<'a, 'b, M: Module> {
    pub(super) b: FunctionBuilder<'b>,
    module: &'a mut M,
    libm: &'a Libm,
    calls: HashMap<&'static str, FuncRef>,
    config: TargetFrontendConfig,
    pub(super) kernel: &'a Kernel,
    /// Whether vector loops run four lanes at a time (`vector.rs`).
    pub(super) simd: bool,
    /// Buffer base pointers, loaded once in the entry block.
    buffers: Vec<Value>,
    /// Sizes and scalars, loaded once in the entry block.
    sizes: Vec<Value>,
    pub(super) vars: HashMap<Var, (Variable, Class)>,
    arrays: HashMap<Var, (StackSlot, Class, usize)>,
    /// Inside a vector loop's four-lane body: the values that differ from lane to lane
    /// (the loop index and what depends on it). Uniform values live in `vars`.
    pub(super) lanes: HashMap<Var, Lanes>,
    /// Inside a vector loop: splats of its invariant f32 bindings, made before its steps.
    pub(super) splats: HashMap<Value, Value>,
}

/// Write the body of `kernel` into `b`, whose function has the kernel signature; with
/// `simd`, vector loops run four lanes at a time.
pub(super) fn write_kernel<M: Module>(
    b: FunctionBuilder<'_>,
    module: &mut M,
    libm: &Libm,
    kernel: &Kernel,
    simd: bool,
) -> Result<(), String> {
    let config = module.isa().frontend_config();
    let mut fx = Fx {
        b,
        module,
        libm,
        calls: HashMap::new(),
        config,
        kernel,
        simd,
        buffers: vec![],
        sizes: vec![],
        vars: HashMap::new(),
        arrays: HashMap::new(),
        lanes: HashMap::new(),
        splats: HashMap::new(),
    };
    fx.write().map_err(|e| format!("kernel `{}`: {e}", kernel.name))?;
    fx.b.seal_all_blocks();
    fx.b.finalize(config);
    Ok(())
}

impl<'a, 'b, M: Module> Fx<'a, 'b, M> {
    fn write(&mut self) -> Result<(), String> {
        let k = self.kernel;
        if k.gemm.is_some() {
            return Err("is a library GEMM node, which has no generated code".into());
        }
        if k.threads.is_some() {
            return Err("a block kernel (threads, shared arrays, barriers) runs on GPUs only".into());
        }
        let entry = self.b.create_block();
        self.b.append_block_params_for_function_params(entry);
        self.b.switch_to_block(entry);
        let params = self.b.block_params(entry).to_vec();
        let (table, sizes, begin, end) = (params[0], params[1], params[2], params[3]);
        // Load the buffer and size tables once: stores into the buffers cannot change them.
        for i in 0..k.buffers.len() {
            let p = self.b.ins().load(types::I64, flags(), table, (8 * i) as i32);
            self.buffers.push(p);
        }
        for i in 0..k.sizes.len() + k.scalars.len() {
            let v = self.b.ins().load(types::I64, flags(), sizes, (8 * i) as i32);
            self.sizes.push(v);
        }
        self.emit_loop(k.index, begin, end, &k.body)?;
        self.b.ins().return_(&[]);
        Ok(())
    }

    /// The variable of kernel variable `v` of class `t`, declared on first definition.
    pub(super) fn var(&mut self, v: Var, t: Class) -> Result<Variable, String> {
        if let Some(&(var, old)) = self.vars.get(&v) {
            if old != t {
                return Err(format!("{v} is redefined as {} (it was {})", t, old));
            }
            return Ok(var);
        }
        let var = self.b.declare_var(clif(t));
        self.vars.insert(v, (var, t));
        Ok(var)
    }

    /// `for var in begin..end { body }`.
    pub(super) fn emit_loop(&mut self, var: Var, begin: Value, end: Value, body: &[Stmt]) -> Result<(), String> {
        let slot = self.var(var, Class::Int)?;
        self.counted_loop(begin, end, 1, |fx, i| {
            fx.b.def_var(slot, i);
            fx.block(body)
        })
    }

    /// `i = begin; while i < end { body(i); i += step }`.
    pub(super) fn counted_loop(
        &mut self,
        begin: Value,
        end: Value,
        step: i64,
        mut body: impl FnMut(&mut Self, Value) -> Result<(), String>,
    ) -> Result<(), String> {
        let counter = self.b.declare_var(types::I64);
        let (header, body_bb, exit) = (self.b.create_block(), self.b.create_block(), self.b.create_block());
        self.b.def_var(counter, begin);
        self.b.ins().jump(header, &[]);
        self.b.switch_to_block(header);
        let i = self.b.use_var(counter);
        let more = self.b.ins().icmp(IntCC::SignedLessThan, i, end);
        self.b.ins().brif(more, body_bb, &[], exit, &[]);
        self.b.switch_to_block(body_bb);
        self.b.seal_block(body_bb);
        body(self, i)?;
        let i = self.b.use_var(counter);
        let next = self.b.ins().iadd_imm_s(i, step);
        self.b.def_var(counter, next);
        self.b.ins().jump(header, &[]);
        self.b.seal_block(header);
        self.b.switch_to_block(exit);
        self.b.seal_block(exit);
        Ok(())
    }

    pub(super) fn block(&mut self, body: &[Stmt]) -> Result<(), String> {
        body.iter().try_for_each(|s| self.stmt(s))
    }

    pub(super) fn expect(&mut self, e: &Expr, t: Class, what: &str) -> Result<Value, String> {
        let (v, got) = self.expr(e)?;
        if got != t {
            return Err(format!("{what} must be {}, got {}: `{}`", t, got, print::expr(self.kernel, e)));
        }
        Ok(v)
    }

    pub(super) fn int(&mut self, e: &Expr, what: &str) -> Result<Value, String> {
        self.expect(e, Class::Int, what)
    }

    /// The address of element `index` of buffer `buffer`, and the buffer's element type.
    fn element(&mut self, buffer: usize, index: &Expr) -> Result<(Value, Elem), String> {
        let decl = self.buffer(buffer)?;
        let i = self.int(index, &format!("an index of `{}`", decl.name))?;
        self.element_at(buffer, i)
    }

    /// The declaration of buffer `buffer`.
    pub(super) fn buffer(&self, buffer: usize) -> Result<&'a crate::kernel::BufferDecl, String> {
        let k = self.kernel;
        k.buffers.get(buffer).ok_or_else(|| format!("buffer {buffer} is not declared ({} buffers)", k.buffers.len()))
    }

    /// The address of element `i` (an i64) of buffer `buffer`, and its element type.
    pub(super) fn element_at(&mut self, buffer: usize, i: Value) -> Result<(Value, Elem), String> {
        let elem = self.buffer(buffer)?.elem;
        let base = self.buffers[buffer];
        Ok((self.offset(base, i, elem.bytes() as i64), elem))
    }

    /// `base + i · bytes`.
    fn offset(&mut self, base: Value, i: Value, bytes: i64) -> Value {
        let scaled = if bytes == 1 { i } else { self.b.ins().imul_imm_s(i, bytes) };
        self.b.ins().iadd(base, scaled)
    }

    /// The address of element `index` of local array `array`, and its class.
    fn array_element(&mut self, array: Var, index: &Expr) -> Result<(Value, Class), String> {
        self.array_class(array)?;
        let i = self.int(index, &format!("an index of {array}"))?;
        self.array_element_at(array, i)
    }

    /// The class of local array `array`'s elements.
    pub(super) fn array_class(&self, array: Var) -> Result<Class, String> {
        let found = self.arrays.get(&array);
        found.map(|a| a.1).ok_or_else(|| format!("array {array} is used before it is defined"))
    }

    /// The address of element `i` (an i64) of local array `array`, and its class.
    pub(super) fn array_element_at(&mut self, array: Var, i: Value) -> Result<(Value, Class), String> {
        let (slot, t) = match self.arrays.get(&array) {
            Some(&(slot, t, _)) => (slot, t),
            None => return Err(format!("array {array} is used before it is defined")),
        };
        let base = self.b.ins().stack_addr(types::I64, slot, 0);
        Ok((self.offset(base, i, array_bytes(t) as i64), t))
    }

    /// Store `v` (of the element's class) as a buffer element at `addr`.
    pub(super) fn store_element(&mut self, addr: Value, elem: Elem, v: Value) {
        match elem {
            Elem::F32 => self.b.ins().store(flags(), v, addr, 0),
            Elem::BF16 => {
                let bits = math::bf16_bits(&mut self.b, v);
                self.b.ins().istore16(flags(), bits, addr, 0)
            }
            Elem::F16 => {
                let bits = math::f16_bits(&mut self.b, v);
                self.b.ins().istore16(flags(), bits, addr, 0)
            }
            Elem::I32 => self.b.ins().istore32(flags(), v, addr, 0),
            Elem::U8 => self.b.ins().store(flags(), v, addr, 0),
        };
    }

    /// The buffer element at `addr`, as a value of its class.
    pub(super) fn load_element(&mut self, addr: Value, elem: Elem) -> (Value, Class) {
        let ins = self.b.ins();
        match elem {
            Elem::F32 => (ins.load(types::F32, flags(), addr, 0), Class::F32),
            Elem::BF16 => {
                let h = ins.uload16(types::I32, flags(), addr, 0);
                let bits = self.b.ins().ishl_imm_s(h, 16);
                (self.b.ins().bitcast(types::F32, MemFlagsData::new(), bits), Class::F32)
            }
            Elem::F16 => {
                let h = ins.uload16(types::I32, flags(), addr, 0);
                (math::f16_value(&mut self.b, h), Class::F32)
            }
            Elem::I32 => (ins.sload32(flags(), addr, 0), Class::Int),
            Elem::U8 => {
                let byte = ins.load(types::I8, flags(), addr, 0);
                (self.b.ins().icmp_imm_s(IntCC::NotEqual, byte, 0), Class::Bool)
            }
        }
    }

    pub(super) fn stmt(&mut self, s: &Stmt) -> Result<(), String> {
        match s {
            Stmt::For { var, extent, kind, body } => {
                let n = self.int(extent, "a loop extent")?;
                if *kind == LoopKind::Vector && self.simd {
                    self.vector_loop(*var, n, super::vector::constant(extent), body)?;
                } else {
                    let zero = self.b.ins().iconst(types::I64, 0);
                    self.emit_loop(*var, zero, n, body)?;
                }
            }
            Stmt::Let { var, value } => {
                let (v, t) = self.expr(value)?;
                let var = self.var(*var, t)?;
                self.b.def_var(var, v);
            }
            Stmt::Mut { var, ty, init } => {
                let t = Class::of(*ty);
                let v = self.expect(init, t, &format!("the initial value of {var}"))?;
                let var = self.var(*var, t)?;
                self.b.def_var(var, v);
            }
            Stmt::Assign { var, value } => {
                let &(slot, t) = self.vars.get(var).ok_or_else(|| format!("assignment to undefined {var}"))?;
                let v = self.expect(value, t, &format!("a value assigned to {var}"))?;
                self.b.def_var(slot, v);
            }
            Stmt::Store { buffer, index, value } => {
                let (addr, elem) = self.element(*buffer, index)?;
                let name = &self.kernel.buffers[*buffer].name;
                let v = self.expect(value, Class::of(elem.scalar()), &format!("a value stored into `{name}`"))?;
                self.store_element(addr, elem, v);
            }
            Stmt::Array { var, elem, len } => {
                let t = Class::of(*elem);
                let bytes = u32::try_from(*len).ok().and_then(|n| n.checked_mul(array_bytes(t)));
                let bytes = bytes.ok_or_else(|| format!("array {var} is too long"))?;
                let slot = match self.arrays.get(var) {
                    Some(&(slot, old, old_len)) if old == t && old_len == *len => slot,
                    Some(_) => return Err(format!("array {var} is redefined with another type or length")),
                    None => {
                        let slot =
                            self.b.create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, bytes, 4));
                        self.arrays.insert(*var, (slot, t, *len));
                        slot
                    }
                };
                // Zero-initialized each time the statement runs, as in the executor.
                if bytes > 0 {
                    let base = self.b.ins().stack_addr(types::I64, slot, 0);
                    self.b.emit_small_memset(self.config, base, 0, bytes as u64, array_bytes(t) as u8, flags());
                }
            }
            Stmt::StoreArray { array, index, value } => {
                let (addr, t) = self.array_element(*array, index)?;
                let v = self.expect(value, t, &format!("a value stored into {array}"))?;
                self.b.ins().store(flags(), v, addr, 0);
            }
            Stmt::If { cond, then, otherwise } => {
                let c = self.expect(cond, Class::Bool, "an `if` condition")?;
                let (then_bb, else_bb, merge) = (self.b.create_block(), self.b.create_block(), self.b.create_block());
                self.b.ins().brif(c, then_bb, &[], else_bb, &[]);
                self.b.seal_block(then_bb);
                self.b.seal_block(else_bb);
                self.b.switch_to_block(then_bb);
                self.block(then)?;
                self.b.ins().jump(merge, &[]);
                self.b.switch_to_block(else_bb);
                self.block(otherwise)?;
                self.b.ins().jump(merge, &[]);
                self.b.seal_block(merge);
                self.b.switch_to_block(merge);
            }
            Stmt::Shared { .. } | Stmt::Barrier | Stmt::Mma { .. } => {
                return Err("a shared array, barrier or warp product outside a block kernel".into());
            }
        }
        Ok(())
    }

    pub(super) fn expr(&mut self, e: &Expr) -> Result<(Value, Class), String> {
        Ok(match e {
            Expr::F32(x) => (self.b.ins().f32const(*x), Class::F32),
            Expr::I64(i) => (self.b.ins().iconst(types::I64, *i), Class::Int),
            Expr::Bool(v) => (self.b.ins().iconst(types::I8, *v as i64), Class::Bool),
            Expr::Var(v) => {
                let &(var, t) = self.vars.get(v).ok_or_else(|| format!("{v} is used before it is defined"))?;
                (self.b.use_var(var), t)
            }
            Expr::Thread => return Err("`thread` outside a block kernel".into()),
            Expr::Size(i) => match self.sizes.get(*i) {
                Some(&v) => (v, Class::Int),
                None => {
                    return Err(format!("size argument {i} is not declared ({} sizes and scalars)", self.sizes.len()))
                }
            },
            Expr::Load { buffer, index } => {
                let (addr, elem) = self.element(*buffer, index)?;
                self.load_element(addr, elem)
            }
            Expr::LoadArray { array, index } => {
                let (addr, t) = self.array_element(*array, index)?;
                (self.b.ins().load(clif(t), flags(), addr, 0), t)
            }
            Expr::Unary(op, a) => {
                let (v, t) = self.expr(a)?;
                self.unary(*op, v, t).map_err(|m| format!("{m}: `{}`", print::expr(self.kernel, e)))?
            }
            Expr::Binary(op, x, y) => {
                let (a, ta) = self.expr(x)?;
                let (c, tc) = self.expr(y)?;
                if ta != tc {
                    let text = print::expr(self.kernel, e);
                    return Err(format!("{op:?} of {} and {}: `{text}`", ta, tc));
                }
                self.binary(*op, a, c, ta).map_err(|m| format!("{m}: `{}`", print::expr(self.kernel, e)))?
            }
            Expr::MulAdd(x, y, z) => {
                let a = self.expect(x, Class::F32, "a fused multiply-add's factor")?;
                let c = self.expect(y, Class::F32, "a fused multiply-add's factor")?;
                let d = self.expect(z, Class::F32, "a fused multiply-add's addend")?;
                (self.b.ins().fma(a, c, d), Class::F32)
            }
            Expr::Select(c, x, y) => {
                let cv = self.expect(c, Class::Bool, "a select condition")?;
                if !x.may_trap() && !y.may_trap() {
                    let (a, ta) = self.expr(x)?;
                    let (d, td) = self.expr(y)?;
                    if ta != td {
                        let text = print::expr(self.kernel, e);
                        return Err(format!("select of {} and {}: `{text}`", ta, td));
                    }
                    (self.b.ins().select(cv, a, d), ta)
                } else {
                    self.branching_select(cv, x, y, e)?
                }
            }
            Expr::Cast(to, a) => {
                let (v, t) = self.expr(a)?;
                (self.cast(*to, v, t), Class::of(*to))
            }
            Expr::DropoutKeep { seed, salt, index, step, rate } => {
                let seed = self.int(seed, "a dropout seed")?;
                let index = self.int(index, "a dropout index")?;
                let step = self.int(step, "a dropout step")?;
                (math::dropout_keep(&mut self.b, seed, *salt, index, step, *rate), Class::Bool)
            }
        })
    }

    /// `c ? x : y` evaluating only the chosen operand.
    fn branching_select(&mut self, c: Value, x: &Expr, y: &Expr, e: &Expr) -> Result<(Value, Class), String> {
        let (then_bb, else_bb, merge) = (self.b.create_block(), self.b.create_block(), self.b.create_block());
        self.b.ins().brif(c, then_bb, &[], else_bb, &[]);
        self.b.seal_block(then_bb);
        self.b.seal_block(else_bb);
        self.b.switch_to_block(then_bb);
        let (a, ta) = self.expr(x)?;
        self.b.ins().jump(merge, &[a.into()]);
        self.b.switch_to_block(else_bb);
        let (d, td) = self.expr(y)?;
        if ta != td {
            let text = print::expr(self.kernel, e);
            return Err(format!("select of {} and {}: `{text}`", ta, td));
        }
        self.b.ins().jump(merge, &[d.into()]);
        let r = self.b.append_block_param(merge, clif(ta));
        self.b.seal_block(merge);
        self.b.switch_to_block(merge);
        Ok((r, ta))
    }

    /// A call of libm's `name` on `args`.
    fn libm(&mut self, name: &'static str, args: &[Value]) -> Value {
        let f = match self.calls.get(name) {
            Some(&f) => f,
            None => {
                let f = self.module.declare_func_in_func(self.libm.ids[name], self.b.func);
                self.calls.insert(name, f);
                f
            }
        };
        let call = self.b.ins().call(f, args);
        self.b.inst_results(call)[0]
    }

    pub(super) fn unary(&mut self, op: Unary, v: Value, t: Class) -> Result<(Value, Class), String> {
        match (op, t) {
            (Unary::Not, Class::Bool) => Ok((self.b.ins().bxor_imm_s(v, 1), Class::Bool)),
            (Unary::Neg, Class::Int) => Ok((self.b.ins().ineg(v), Class::Int)),
            // wrapping_abs: abs(i64::MIN) = i64::MIN.
            (Unary::Abs, Class::Int) => Ok((self.b.ins().iabs(v), Class::Int)),
            (Unary::Not, _) => Err(format!("not of {}", t)),
            (_, Class::F32) => {
                let r = match op {
                    Unary::Neg => self.b.ins().fneg(v),
                    Unary::Exp => math::exp(&mut self.b, Width::One, v),
                    Unary::Sin => math::sin(&mut self.b, Width::One, v),
                    Unary::Cos => math::cos(&mut self.b, Width::One, v),
                    Unary::Log => self.libm("logf", &[v]),
                    Unary::Tanh => self.libm("tanhf", &[v]),
                    Unary::Sqrt => self.b.ins().sqrt(v),
                    Unary::Rsqrt => {
                        let (one, s) = (self.b.ins().f32const(1.0), self.b.ins().sqrt(v));
                        self.b.ins().fdiv(one, s)
                    }
                    Unary::Recip => {
                        let one = self.b.ins().f32const(1.0);
                        self.b.ins().fdiv(one, v)
                    }
                    Unary::Abs => self.b.ins().fabs(v),
                    Unary::RoundBf16 => math::round_bf16(&mut self.b, Width::One, v),
                    Unary::RoundF16 => {
                        let bits = math::f16_bits(&mut self.b, v);
                        math::f16_value(&mut self.b, bits)
                    }
                    Unary::Not => unreachable!("handled above"),
                };
                Ok((r, Class::F32))
            }
            _ => Err(format!("{op:?} of {}", t)),
        }
    }

    pub(super) fn binary(&mut self, op: Binary, x: Value, y: Value, t: Class) -> Result<(Value, Class), String> {
        use Binary::*;
        match t {
            Class::F32 => {
                let cmp = |fx: &mut Self, cc| Ok((fx.b.ins().fcmp(cc, x, y), Class::Bool));
                let r = match op {
                    Add => self.b.ins().fadd(x, y),
                    Sub => self.b.ins().fsub(x, y),
                    Mul => self.b.ins().fmul(x, y),
                    Div => self.b.ins().fdiv(x, y),
                    Rem => self.libm("fmodf", &[x, y]),
                    Pow => self.libm("powf", &[x, y]),
                    Max => self.b.ins().fmax(x, y),
                    Min => self.b.ins().fmin(x, y),
                    Lt => return cmp(self, FloatCC::LessThan),
                    Le => return cmp(self, FloatCC::LessThanOrEqual),
                    Gt => return cmp(self, FloatCC::GreaterThan),
                    Ge => return cmp(self, FloatCC::GreaterThanOrEqual),
                    Eq => return cmp(self, FloatCC::Equal),
                    // Rust's `!=` is true when either side is NaN (Cranelift's NotEqual
                    // is unordered-or-unequal).
                    Ne => return cmp(self, FloatCC::NotEqual),
                    And | Or => return Err("logical operation on f32".into()),
                };
                Ok((r, Class::F32))
            }
            Class::Int => {
                let cmp = |fx: &mut Self, cc| Ok((fx.b.ins().icmp(cc, x, y), Class::Bool));
                let r = match op {
                    Add => self.b.ins().iadd(x, y),
                    Sub => self.b.ins().isub(x, y),
                    Mul => self.b.ins().imul(x, y),
                    Div => self.b.ins().sdiv(x, y),
                    Rem => self.b.ins().srem(x, y),
                    Max => self.b.ins().smax(x, y),
                    Min => self.b.ins().smin(x, y),
                    Pow => self.int_pow(x, y),
                    Lt => return cmp(self, IntCC::SignedLessThan),
                    Le => return cmp(self, IntCC::SignedLessThanOrEqual),
                    Gt => return cmp(self, IntCC::SignedGreaterThan),
                    Ge => return cmp(self, IntCC::SignedGreaterThanOrEqual),
                    Eq => return cmp(self, IntCC::Equal),
                    Ne => return cmp(self, IntCC::NotEqual),
                    And | Or => return Err("logical operation on integers".into()),
                };
                Ok((r, Class::Int))
            }
            Class::Bool => {
                let r = match op {
                    And => self.b.ins().band(x, y),
                    Or => self.b.ins().bor(x, y),
                    Eq => self.b.ins().icmp(IntCC::Equal, x, y),
                    Ne => self.b.ins().bxor(x, y),
                    _ => return Err(format!("{op:?} on bools")),
                };
                Ok((r, Class::Bool))
            }
        }
    }

    /// `x.wrapping_pow(y.clamp(0, u32::MAX))` by repeated squaring.
    fn int_pow(&mut self, x: Value, y: Value) -> Value {
        let b = &mut self.b;
        let (zero, max) = (b.ins().iconst(types::I64, 0), b.ins().iconst(types::I64, u32::MAX as i64));
        let lo = b.ins().smax(y, zero);
        let e0 = b.ins().smin(lo, max);
        let one = b.ins().iconst(types::I64, 1);
        let (header, body, exit) = (b.create_block(), b.create_block(), b.create_block());
        for _ in 0..3 {
            b.append_block_param(header, types::I64);
        }
        b.ins().jump(header, &[one.into(), x.into(), e0.into()]);
        b.switch_to_block(header);
        let p = b.block_params(header).to_vec();
        let (acc, base, e) = (p[0], p[1], p[2]);
        b.ins().brif(e, body, &[], exit, &[]);
        b.switch_to_block(body);
        b.seal_block(body);
        let bit = b.ins().band_imm_s(e, 1);
        let prod = b.ins().imul(acc, base);
        let acc2 = b.ins().select(bit, prod, acc);
        let base2 = b.ins().imul(base, base);
        let e2 = b.ins().ushr_imm_s(e, 1);
        b.ins().jump(header, &[acc2.into(), base2.into(), e2.into()]);
        b.seal_block(header);
        b.switch_to_block(exit);
        b.seal_block(exit);
        acc
    }

    pub(super) fn cast(&mut self, to: Scalar, v: Value, from: Class) -> Value {
        let ins = self.b.ins();
        match (to, from) {
            (Scalar::F32, Class::F32) | (Scalar::I64, Class::Int) | (Scalar::Bool, Class::Bool) => v,
            (Scalar::F32, Class::Int) => ins.fcvt_from_sint(types::F32, v),
            (Scalar::F32, Class::Bool) => ins.fcvt_from_uint(types::F32, v),
            (Scalar::I32, Class::F32) => {
                let r = ins.fcvt_to_sint_sat(types::I32, v);
                self.b.ins().sextend(types::I64, r)
            }
            (Scalar::I64, Class::F32) => ins.fcvt_to_sint_sat(types::I64, v),
            (Scalar::I32, Class::Int) => {
                let r = ins.ireduce(types::I32, v);
                self.b.ins().sextend(types::I64, r)
            }
            (Scalar::I32 | Scalar::I64, Class::Bool) => ins.uextend(types::I64, v),
            (Scalar::Bool, Class::Int) => ins.icmp_imm_s(IntCC::NotEqual, v, 0),
            // Rust's `x != 0.0`: NaN is true.
            (Scalar::Bool, Class::F32) => {
                let z = ins.f32const(0.0);
                self.b.ins().fcmp(FloatCC::NotEqual, v, z)
            }
        }
    }
}
