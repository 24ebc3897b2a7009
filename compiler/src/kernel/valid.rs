//! The kernel-IR validator: what every back end may assume of a kernel, checked once,
//! with the type of every expression inferred (naga's `valid/` is the model). The
//! pipeline runs it after every stage that makes or rewrites kernels, in debug builds
//! and so in every test (`pipeline.rs`), so a pass that breaks a kernel is named at the
//! stage that broke it rather than in a writer or at run time.
//!
//! A valid kernel:
//! - uses every variable after its definition (`For`, `Let`, `Mut`, `Array`, `Shared`)
//!   and within its scope (a loop body's or a branch's definitions end with it), with one
//!   type class per variable (f32, integer, bool: the
//!   writers' classes; I32 and I64 are both integers, as in the executor), and assigns
//!   only `Mut` variables or a warp product's accumulators;
//! - gives every operator operands of one class it is defined on (`+` on f32 or
//!   integers, `&&` on bools, `exp` on f32, …), integer indices, loop extents and launch
//!   sizes, bool conditions, and stores values of the buffer's or array's class;
//! - names declared buffers and size arguments only, and never stores into a buffer it
//!   declares read-only;
//! - has an outer extent that depends on sizes alone;
//! - uses threads, shared arrays, barriers and warp products only in a block kernel, and
//!   warp products only on bf16 or f16 inputs with f32 fragments;
//! - as a library GEMM node, has no body and the three buffers A, B, C.
//!
//! Run-time properties (indices within bounds, barriers reached by every thread, no
//! races) are the executors' to check (`exec.rs`, `gpu_exec.rs`).

use super::print;
use super::{Access, Binary, Elem, Expr, Kernel, Scalar, Stmt, Unary, Var};
use std::collections::HashMap;
use std::fmt;

/// The value classes of the kernel IR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    F32,
    Int,
    Bool,
}

impl Class {
    pub fn of(s: Scalar) -> Class {
        match s {
            Scalar::F32 => Class::F32,
            Scalar::I32 | Scalar::I64 => Class::Int,
            Scalar::Bool => Class::Bool,
        }
    }
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Class::F32 => "f32",
            Class::Int => "an integer",
            Class::Bool => "bool",
        })
    }
}

/// How a variable was defined: its class, and whether it may be assigned.
#[derive(Clone, Copy)]
struct Def {
    class: Class,
    mutable: bool,
    /// A local or shared array (read with `LoadArray`), not a scalar: its length.
    array: Option<usize>,
}

struct Validator<'a> {
    kernel: &'a Kernel,
    vars: HashMap<Var, Def>,
    block: bool,
}

/// Check `kernel` (see the module documentation); the error names the kernel.
pub fn validate(kernel: &Kernel) -> Result<(), String> {
    let mut v = Validator { kernel, vars: HashMap::new(), block: kernel.threads.is_some() };
    v.kernel().map_err(|e| format!("kernel `{}`: {e}", kernel.name))
}

/// Check every kernel; the first error.
pub fn validate_all(kernels: &[Kernel]) -> Result<(), String> {
    kernels.iter().try_for_each(validate)
}

impl Validator<'_> {
    fn kernel(&mut self) -> Result<(), String> {
        let k = self.kernel;
        if k.gemm.is_some() {
            if !k.body.is_empty() {
                return Err("a library GEMM node has a body".into());
            }
            if k.buffers.len() != 3 {
                return Err(format!("a library GEMM node has {} buffers, not A, B and C", k.buffers.len()));
            }
            return Ok(());
        }
        if self.class_of_size_expr(&k.extent)? != Class::Int {
            return Err(format!("the extent `{}` is not an integer", print::expr(k, &k.extent)));
        }
        self.define(k.index, Def { class: Class::Int, mutable: false, array: None })?;
        self.block(&k.body)
    }

    /// The class of an expression of sizes and constants (the outer extent, which the
    /// runtime evaluates before any iteration runs).
    fn class_of_size_expr(&mut self, e: &Expr) -> Result<Class, String> {
        let mut bad = None;
        check_sizes_only(e, &mut bad);
        if let Some(what) = bad {
            return Err(format!(
                "the extent `{}` reads {what}; it may depend on sizes only",
                print::expr(self.kernel, e)
            ));
        }
        self.expr(e)
    }

    fn define(&mut self, var: Var, def: Def) -> Result<(), String> {
        if let Some(old) = self.vars.get(&var) {
            if old.class != def.class || old.array != def.array {
                let kind = |d: &Def| match d.array {
                    Some(len) => format!("an array of {len} {}", d.class),
                    None => d.class.to_string(),
                };
                return Err(format!("{var} is redefined as {} (it was {})", kind(&def), kind(old)));
            }
        }
        self.vars.insert(var, def);
        Ok(())
    }

    fn scalar(&self, var: Var) -> Result<Def, String> {
        match self.vars.get(&var) {
            Some(d) if d.array.is_none() => Ok(*d),
            Some(_) => Err(format!("{var} is an array, read as a scalar")),
            None => Err(format!("{var} is used before it is defined")),
        }
    }

    fn array(&self, var: Var) -> Result<Class, String> {
        match self.vars.get(&var) {
            Some(d) if d.array.is_some() => Ok(d.class),
            Some(_) => Err(format!("{var} is a scalar, indexed as an array")),
            None => Err(format!("array {var} is used before it is defined")),
        }
    }

    fn expect(&mut self, e: &Expr, class: Class, what: &str) -> Result<(), String> {
        let got = self.expr(e)?;
        if got != class {
            return Err(format!("{what} must be {class}, got {got}: `{}`", print::expr(self.kernel, e)));
        }
        Ok(())
    }

    fn buffer(&self, buffer: usize) -> Result<(&str, Elem, Access), String> {
        match self.kernel.buffers.get(buffer) {
            Some(b) => Ok((&b.name, b.elem, b.access)),
            None => Err(format!("buffer {buffer} is not declared ({} buffers)", self.kernel.buffers.len())),
        }
    }

    fn block(&mut self, body: &[Stmt]) -> Result<(), String> {
        body.iter().try_for_each(|s| self.stmt(s))
    }

    /// A loop body or a branch: what it defines is not defined after it (a loop may run
    /// no iteration, a branch may not be taken, and the back ends would then disagree:
    /// the executor errs, Cranelift reads 0, LLVM an uninitialized slot).
    fn scoped(&mut self, body: &[Stmt]) -> Result<(), String> {
        let outer = self.vars.clone();
        let r = self.block(body);
        // Keep the outer definitions (and their classes), drop the body's own.
        self.vars.retain(|v, _| outer.contains_key(v));
        r
    }

    fn stmt(&mut self, s: &Stmt) -> Result<(), String> {
        match s {
            Stmt::For { var, extent, kind: _, body } => {
                self.expect(extent, Class::Int, "a loop extent")?;
                self.define(*var, Def { class: Class::Int, mutable: false, array: None })?;
                self.scoped(body)?;
            }
            Stmt::Let { var, value } => {
                let class = self.expr(value)?;
                self.define(*var, Def { class, mutable: false, array: None })?;
            }
            Stmt::Mut { var, ty, init } => {
                let class = Class::of(*ty);
                self.expect(init, class, &format!("the initial value of {var}"))?;
                self.define(*var, Def { class, mutable: true, array: None })?;
            }
            Stmt::Assign { var, value } => {
                let def = self.scalar(*var).map_err(|_| format!("assignment to undefined {var}"))?;
                if !def.mutable {
                    return Err(format!("assignment to {var}, which is not a `var`"));
                }
                self.expect(value, def.class, &format!("a value assigned to {var}"))?;
            }
            Stmt::Store { buffer, index, value } => {
                let (name, elem, access) = self.buffer(*buffer)?;
                let name = name.to_string();
                if access == Access::Read {
                    return Err(format!("a store into `{name}`, which the kernel only reads"));
                }
                self.expect(index, Class::Int, &format!("an index of `{name}`"))?;
                self.expect(value, Class::of(elem.scalar()), &format!("a value stored into `{name}`"))?;
            }
            Stmt::Array { var, elem, len } => {
                self.define(*var, Def { class: Class::of(*elem), mutable: true, array: Some(*len) })?;
            }
            Stmt::StoreArray { array, index, value } => {
                let class = self.array(*array)?;
                self.expect(index, Class::Int, &format!("an index of {array}"))?;
                self.expect(value, class, &format!("a value stored into {array}"))?;
            }
            Stmt::If { cond, then, otherwise } => {
                self.expect(cond, Class::Bool, "an `if` condition")?;
                self.scoped(then)?;
                self.scoped(otherwise)?;
            }
            Stmt::Shared { .. } | Stmt::Barrier | Stmt::Mma { .. } if !self.block => {
                return Err("a shared array, barrier or warp product outside a block kernel".into());
            }
            Stmt::Shared { var, elem, len } => {
                if self.vars.contains_key(var) {
                    return Err(format!("shared array {var} is declared twice"));
                }
                self.define(*var, Def { class: Class::of(*elem), mutable: true, array: Some(*len) })?;
            }
            Stmt::Barrier => {}
            Stmt::Mma { input, acc, a, b } => {
                if !matches!(input, Elem::BF16 | Elem::F16) {
                    return Err(format!("a warp's matrix product takes bf16 or f16 inputs, not {input:?}"));
                }
                for v in a.iter().chain(b) {
                    if self.scalar(*v)?.class != Class::F32 {
                        return Err(format!("the fragment {v} of a warp's matrix product is not f32"));
                    }
                }
                for v in acc {
                    let d = self.scalar(*v)?;
                    if d.class != Class::F32 || !d.mutable {
                        return Err(format!("the accumulator {v} of a warp's matrix product is not an f32 `var`"));
                    }
                }
            }
        }
        Ok(())
    }

    /// The inferred class of `e`.
    fn expr(&mut self, e: &Expr) -> Result<Class, String> {
        let text = |v: &Self| print::expr(v.kernel, e);
        Ok(match e {
            Expr::F32(_) => Class::F32,
            Expr::I64(_) => Class::Int,
            Expr::Bool(_) => Class::Bool,
            Expr::Var(v) => self.scalar(*v)?.class,
            Expr::Size(i) => {
                let n = self.kernel.sizes.len() + self.kernel.scalars.len();
                if *i >= n {
                    return Err(format!("size argument {i} is not declared ({n} sizes and scalars)"));
                }
                Class::Int
            }
            Expr::Thread if !self.block => return Err("`thread` outside a block kernel".into()),
            Expr::Thread => Class::Int,
            Expr::Load { buffer, index } => {
                let (name, elem, _) = self.buffer(*buffer)?;
                let name = name.to_string();
                self.expect(index, Class::Int, &format!("an index of `{name}`"))?;
                Class::of(elem.scalar())
            }
            Expr::LoadArray { array, index } => {
                let class = self.array(*array)?;
                self.expect(index, Class::Int, &format!("an index of {array}"))?;
                class
            }
            Expr::Unary(op, a) => {
                let c = self.expr(a)?;
                let ok = match op {
                    Unary::Not => c == Class::Bool,
                    Unary::Neg | Unary::Abs => c != Class::Bool,
                    _ => c == Class::F32,
                };
                if !ok {
                    return Err(format!("{op:?} of {c}: `{}`", text(self)));
                }
                c
            }
            Expr::Binary(op, x, y) => {
                let (a, b) = (self.expr(x)?, self.expr(y)?);
                if a != b {
                    return Err(format!("{op:?} of {a} and {b}: `{}`", text(self)));
                }
                use Binary::*;
                match (op, a) {
                    (And | Or, Class::Bool) => Class::Bool,
                    (Eq | Ne, _) => Class::Bool,
                    (Lt | Le | Gt | Ge, Class::F32 | Class::Int) => Class::Bool,
                    (Add | Sub | Mul | Div | Rem | Max | Min | Pow, Class::F32 | Class::Int) => a,
                    _ => return Err(format!("{op:?} on {a}: `{}`", text(self))),
                }
            }
            Expr::Select(c, x, y) => {
                self.expect(c, Class::Bool, "a select condition")?;
                let (a, b) = (self.expr(x)?, self.expr(y)?);
                if a != b {
                    return Err(format!("select of {a} and {b}: `{}`", text(self)));
                }
                a
            }
            Expr::MulAdd(x, y, z) => {
                for (operand, what) in [
                    (x, "a fused multiply-add's factor"),
                    (y, "a fused multiply-add's factor"),
                    (z, "a fused multiply-add's addend"),
                ] {
                    self.expect(operand, Class::F32, what)?;
                }
                Class::F32
            }
            Expr::Cast(to, a) => {
                self.expr(a)?;
                Class::of(*to)
            }
            Expr::DropoutKeep { seed, index, step, .. } => {
                self.expect(seed, Class::Int, "a dropout seed")?;
                self.expect(index, Class::Int, "a dropout index")?;
                self.expect(step, Class::Int, "a dropout step")?;
                Class::Bool
            }
        })
    }
}

/// Sets `bad` to what `e` reads beyond sizes and constants (a variable, a buffer, …).
fn check_sizes_only(e: &Expr, bad: &mut Option<&'static str>) {
    match e {
        Expr::F32(_) | Expr::I64(_) | Expr::Bool(_) | Expr::Size(_) => {}
        Expr::Var(_) => *bad = Some("a variable"),
        Expr::Thread => *bad = Some("the thread index"),
        Expr::Load { .. } | Expr::LoadArray { .. } => *bad = Some("memory"),
        Expr::DropoutKeep { .. } => *bad = Some("a dropout decision"),
        Expr::Unary(_, a) | Expr::Cast(_, a) => check_sizes_only(a, bad),
        Expr::Binary(_, a, b) => {
            check_sizes_only(a, bad);
            check_sizes_only(b, bad);
        }
        Expr::Select(c, a, b) | Expr::MulAdd(c, a, b) => {
            check_sizes_only(c, bad);
            check_sizes_only(a, bad);
            check_sizes_only(b, bad);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::{BufferDecl, LoopKind};

    fn v(n: u32) -> Var {
        Var(n)
    }

    fn ld(buffer: usize, index: Expr) -> Expr {
        Expr::Load { buffer, index: Box::new(index) }
    }

    /// `out[i] = x[i] * 2` over `0..n`, with `body` instead when given.
    fn kernel(body: Option<Vec<Stmt>>) -> Kernel {
        let buf = |name: &str, elem, access| BufferDecl { name: name.into(), elem, access };
        Kernel {
            name: "k".into(),
            buffers: vec![buf("x", Elem::F32, Access::Read), buf("out", Elem::F32, Access::Write)],
            sizes: vec!["n".into()],
            scalars: vec![],
            index: v(0),
            extent: Expr::Size(0),
            body: body.unwrap_or_else(|| {
                vec![Stmt::Store {
                    buffer: 1,
                    index: Expr::Var(v(0)),
                    value: Expr::binary(Binary::Mul, ld(0, Expr::Var(v(0))), Expr::F32(2.0)),
                }]
            }),
            gemm: None,
            threads: None,
        }
    }

    fn store(value: Expr) -> Stmt {
        Stmt::Store { buffer: 1, index: Expr::Var(v(0)), value }
    }

    fn rejects(k: Kernel, message: &str) {
        let e = validate(&k).expect_err(message);
        assert!(e.contains(message) && e.starts_with("kernel `k`"), "expected `{message}` in: {e}");
    }

    #[test]
    fn a_well_formed_kernel_is_valid() {
        validate(&kernel(None)).unwrap();
        // A variable defined inside a loop and an accumulator updated across it.
        let body = vec![
            Stmt::Mut { var: v(1), ty: Scalar::F32, init: Expr::F32(0.0) },
            Stmt::For {
                var: v(2),
                extent: Expr::I64(4),
                kind: LoopKind::Serial,
                body: vec![
                    Stmt::Let { var: v(3), value: Expr::Cast(Scalar::F32, Box::new(Expr::Var(v(2)))) },
                    Stmt::Assign { var: v(1), value: Expr::binary(Binary::Add, Expr::Var(v(1)), Expr::Var(v(3))) },
                ],
            },
            store(Expr::Var(v(1))),
        ];
        validate(&kernel(Some(body))).unwrap();
    }

    #[test]
    fn each_rule_names_what_it_found() {
        rejects(kernel(Some(vec![store(Expr::Var(v(9)))])), "v9 is used before it is defined");
        rejects(kernel(Some(vec![store(Expr::I64(1))])), "stored into `out` must be f32, got an integer");
        rejects(kernel(Some(vec![store(ld(0, Expr::F32(0.0)))])), "an index of `x` must be an integer");
        rejects(kernel(Some(vec![store(ld(5, Expr::I64(0)))])), "buffer 5 is not declared");
        rejects(kernel(Some(vec![store(Expr::Size(3))])), "size argument 3 is not declared");
        let mixed = Expr::binary(Binary::Add, Expr::F32(1.0), Expr::I64(1));
        rejects(kernel(Some(vec![store(mixed)])), "Add of f32 and an integer");
        let and = Expr::binary(Binary::And, Expr::F32(1.0), Expr::F32(1.0));
        rejects(kernel(Some(vec![store(and)])), "And on f32");
        rejects(kernel(Some(vec![store(Expr::Unary(Unary::Exp, Box::new(Expr::I64(1))))])), "Exp of an integer");
        let sel = Expr::Select(Box::new(Expr::I64(1)), Box::new(Expr::F32(0.0)), Box::new(Expr::F32(1.0)));
        rejects(kernel(Some(vec![store(sel)])), "a select condition must be bool");
        let redefined =
            vec![Stmt::Let { var: v(1), value: Expr::F32(1.0) }, Stmt::Let { var: v(1), value: Expr::I64(1) }];
        rejects(kernel(Some(redefined)), "v1 is redefined as an integer (it was f32)");
        let assign_let =
            vec![Stmt::Let { var: v(1), value: Expr::F32(1.0) }, Stmt::Assign { var: v(1), value: Expr::F32(2.0) }];
        rejects(kernel(Some(assign_let)), "assignment to v1, which is not a `var`");
        rejects(
            kernel(Some(vec![Stmt::Store { buffer: 0, index: Expr::I64(0), value: Expr::F32(0.0) }])),
            "a store into `x`, which the kernel only reads",
        );
        let cond = Stmt::If { cond: Expr::I64(1), then: vec![], otherwise: vec![] };
        rejects(kernel(Some(vec![cond])), "an `if` condition must be bool");
        rejects(kernel(Some(vec![Stmt::Barrier])), "outside a block kernel");
        rejects(kernel(Some(vec![store(Expr::Cast(Scalar::F32, Box::new(Expr::Thread)))])), "`thread` outside");
        let array_as_scalar = vec![Stmt::Array { var: v(1), elem: Scalar::F32, len: 4 }, store(Expr::Var(v(1)))];
        rejects(kernel(Some(array_as_scalar)), "v1 is an array, read as a scalar");
        let resized = vec![
            Stmt::Array { var: v(1), elem: Scalar::F32, len: 4 },
            Stmt::Array { var: v(1), elem: Scalar::F32, len: 8 },
        ];
        rejects(kernel(Some(resized)), "v1 is redefined as an array of 8 f32 (it was an array of 4 f32)");
        let escapes = vec![
            Stmt::If {
                cond: Expr::Bool(true),
                then: vec![Stmt::Let { var: v(1), value: Expr::F32(1.0) }],
                otherwise: vec![],
            },
            store(Expr::Var(v(1))),
        ];
        rejects(kernel(Some(escapes)), "v1 is used before it is defined");
        let mut k = kernel(None);
        k.extent = Expr::binary(Binary::Mul, Expr::Size(0), ld(0, Expr::I64(0)));
        rejects(k, "may depend on sizes only");
    }

    /// Every kernel of every model's schedules, CPU and GPU, training bundles included,
    /// is valid: the pipeline itself checks them after each stage in debug builds, and this
    /// runs it.
    #[test]
    fn the_pipeline_validates_every_stage() {
        use crate::backend::{backend_for, CodeGen, Target};
        use crate::pipeline::Pipeline;
        let g = tiny_t1();
        assert!(cfg!(debug_assertions), "the validator runs in debug builds, which tests are");
        for target in ["native", "sm80"] {
            let backend = backend_for(&Target::parse(target).unwrap(), CodeGen::Llvm).unwrap();
            let lowered = Pipeline::new(&*backend, true, crate::passes::Policy::Bf16).run(g.clone());
            let s = lowered.unwrap_or_else(|d| panic!("{target}: {}", d.message)).schedule.unwrap();
            validate_all(&s.kernels).unwrap();
        }
    }

    fn tiny_t1() -> crate::ir::Graph {
        let path = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../models/transnormer_t1.tn"));
        let sets = ["vocab=32", "dim=16", "heads=2", "layers=1", "glu_dim=24"].map(String::from);
        let request = crate::frontend::Request { sets: &sets, model: None };
        let (sources, g) = crate::frontend::elaborate(crate::frontend::Input::Path(path), &request);
        g.unwrap_or_else(|d| panic!("{}", d.render(&sources)))
    }

    /// A back end whose kernel pass breaks a kernel: the pipeline names the pass.
    #[test]
    fn a_pass_that_breaks_a_kernel_is_named() {
        use crate::backend::{Backend, Emit, KernelPass, Written};
        use crate::pipeline::Pipeline;
        use crate::schedule::{Schedule, ScheduleOptions};
        struct Breaking;
        impl Backend for Breaking {
            fn schedule_options(&self) -> ScheduleOptions {
                ScheduleOptions::cpu()
            }
            fn kernel_passes(&self) -> Vec<KernelPass> {
                vec![KernelPass {
                    name: "breaks_a_store",
                    run: |s: &mut Schedule| {
                        let k = s.kernels.iter_mut().find(|k| k.gemm.is_none()).expect("a generated kernel");
                        k.body.push(Stmt::Store { buffer: 99, index: Expr::I64(0), value: Expr::F32(0.0) });
                    },
                }]
            }
            fn write(&self, _: &[Kernel], _: Emit) -> Result<Written, String> {
                unreachable!("not written")
            }
        }
        let d = Pipeline::new(&Breaking, false, crate::passes::Policy::F32).run(tiny_t1()).err().expect("refused");
        assert!(
            d.message.contains("stage `breaks_a_store` left an invalid kernel") && d.message.contains("buffer 99"),
            "{}",
            d.message
        );
    }
}
