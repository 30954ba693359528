//! The shadow stack: the stack a compiler keeps in a module's linear memory, and how its
//! overflow is told apart from other out-of-bounds accesses.
//!
//! LLVM (C, C++, Rust…) keeps what cannot live in wasm locals — arrays, values whose address is
//! taken — on a stack in linear memory, its pointer in a mutable `i32` global (`__stack_pointer`,
//! global 0 of a module linked by wasm-ld). The engine knows nothing of that stack, so running
//! off its end is not the engine's `StackOverflow` trap. With the stack placed first in memory
//! (`wasm-ld --stack-first`, which Rust's `wasm32-wasip1` target passes by default and this
//! workspace pins), the stack is `[0, top)`, and an overflow takes the stack pointer below 0,
//! where 32-bit arithmetic wraps it: the next access lands just under 4 GiB, beyond any memory
//! the sandbox grants, and faults at once. Without `--stack-first` the stack sits above the
//! module's static data, which an overflow overwrites silently before the pointer reaches 0.
//!
//! What the host sees of such a fault: a trap `MemoryOutOfBounds`, the store's core dump (which
//! holds the module's globals, so the stack pointer's value at the trap) and, when the fault
//! was an access the hardware caught, wasmtime's description of it ("memory fault at wasm
//! address 0x… in linear memory of size 0x…"; a `memory.fill` or `memory.copy` out of bounds has
//! none). The trap is the shadow stack's overflow when the stack pointer has gone below 0 (it
//! reads just under 4 GiB), or when the stack comes first and its pointer is within
//! [`NEAR_ZERO`] of 0 (a function that does not store its frame's pointer back, such as a leaf,
//! faults with its caller's), or when the access itself wrapped to within one stack size of
//! 4 GiB.

use wasmparser::{DataKind, Operator, Parser, Payload, TypeRef, ValType};

/// Where a module's shadow stack lives, read from the module's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShadowStack {
    /// The stack pointer's initial value: the stack's top (it grows down).
    pub top: u32,
    /// Whether the stack lies below every active data segment (`--stack-first`), so that it
    /// spans `[0, top)` and an overflow faults instead of overwriting static data.
    pub first: bool,
}

/// An out-of-bounds access of linear memory, as wasmtime describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryFault {
    /// The wasm address accessed (a 32-bit base plus an offset, so it may exceed 4 GiB).
    pub address: u64,
    /// The size of the linear memory at the time, in bytes.
    pub memory_size: u64,
}

/// 4 GiB: where a 32-bit address that went below 0 wraps to.
const WRAP: u64 = 1 << 32;

/// A stack pointer this close to address 0 at an out-of-bounds trap means the stack ran out.
pub const NEAR_ZERO: u64 = 16 << 10;

impl ShadowStack {
    /// The shadow stack of the module in `bytes`: its global 0 when that is defined by the module
    /// (not imported) as a mutable `i32` initialised by a constant, as wasm-ld lays out
    /// `__stack_pointer`. `None` when the module has no such global, or cannot be parsed.
    pub fn of(bytes: &[u8]) -> Option<ShadowStack> {
        let mut top = None;
        let mut lowest_data: Option<u32> = None;
        for payload in Parser::new(0).parse_all(bytes) {
            match payload.ok()? {
                Payload::ImportSection(imports) => {
                    for import in imports.into_imports() {
                        if matches!(import.ok()?.ty, TypeRef::Global(_)) {
                            return None; // global 0 would be imported, not the stack pointer
                        }
                    }
                }
                Payload::GlobalSection(globals) => {
                    let first = globals.into_iter().next()?.ok()?;
                    if first.ty.content_type != ValType::I32 || !first.ty.mutable {
                        return None;
                    }
                    top = Some(const_i32(first.init_expr)?);
                }
                Payload::DataSection(data) => {
                    for segment in data {
                        if let DataKind::Active { offset_expr, .. } = segment.ok()?.kind {
                            // A segment placed by an expression we cannot evaluate here: treat it
                            // as lying at 0, so the stack does not count as first.
                            let at = const_i32(offset_expr).unwrap_or(0);
                            lowest_data = Some(lowest_data.map_or(at, |l| l.min(at)));
                        }
                    }
                }
                _ => {}
            }
        }
        let top = top?;
        Some(ShadowStack {
            top,
            first: lowest_data.is_none_or(|d| d >= top),
        })
    }

    /// Whether an out-of-bounds trap is this stack overflowing, given the stack pointer's
    /// value at the trap and the faulting access, when known. Returns the explanation for the
    /// run's result.
    pub fn overflow(
        &self,
        stack_pointer: Option<u32>,
        fault: Option<&MemoryFault>,
    ) -> Option<String> {
        let top = u64::from(self.top);
        if top == 0 {
            return None;
        }
        let wrapped = |at: u64| at.abs_diff(WRAP) <= top;
        let pointer = stack_pointer.map(u64::from).and_then(|sp| {
            if sp > top && wrapped(sp) {
                Some(format!(
                    "was {sp:#x} at the trap: {} bytes below address 0",
                    WRAP - sp
                ))
            } else if self.first && sp < NEAR_ZERO.min(top) {
                Some(format!(
                    "was {sp:#x} at the trap: the stack was used up to its last {sp} bytes"
                ))
            } else {
                None
            }
        });
        let access = fault.filter(|f| f.address >= f.memory_size && wrapped(f.address));
        if pointer.is_none() && access.is_none() {
            return None;
        }
        let mut why = String::from(
            "the handler's shadow stack in linear memory overflowed (e.g. unbounded recursion)",
        );
        if let Some(pointer) = pointer {
            why.push_str(&format!("; its stack pointer (global 0) {pointer}"));
        }
        if let Some(f) = access.or(fault) {
            why.push_str(&format!(
                "; the faulting access, at wasm address {:#x}",
                f.address
            ));
            if f.address >= WRAP / 2 {
                why.push_str(", had wrapped below address 0");
            }
        }
        if self.first {
            why.push_str(&format!(
                "; the stack is the {top} bytes at the bottom of linear memory (0x0-{top:#x}), \
                 sized at link time"
            ));
        } else {
            why.push_str(&format!(
                "; the stack lies below {top:#x}, above the module's static data, which the \
                 overflow may have overwritten first (link with --stack-first to fault at once)"
            ));
        }
        Some(why)
    }
}

impl MemoryFault {
    /// The fault wasmtime attached to a trap as context, if any.
    pub fn of(err: &wasmtime::Error) -> Option<MemoryFault> {
        err.chain()
            .find_map(|cause| Self::parse(&cause.to_string()))
    }

    /// Parses wasmtime's description of a fault (its `WasmFault`, which it does not export):
    /// `memory fault at wasm address 0x{address} in linear memory of size 0x{size}`.
    fn parse(text: &str) -> Option<MemoryFault> {
        let rest = text.strip_prefix("memory fault at wasm address 0x")?;
        let (address, size) = rest.split_once(" in linear memory of size 0x")?;
        Some(MemoryFault {
            address: u64::from_str_radix(address, 16).ok()?,
            memory_size: u64::from_str_radix(size, 16).ok()?,
        })
    }
}

/// The value of a constant expression that is exactly `i32.const N`.
fn const_i32(expr: wasmparser::ConstExpr<'_>) -> Option<u32> {
    let mut ops = expr.get_operators_reader();
    let value = match ops.read().ok()? {
        Operator::I32Const { value } => value as u32,
        _ => return None,
    };
    matches!(ops.read().ok()?, Operator::End).then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module(wat: &str) -> Vec<u8> {
        wat::parse_str(wat).unwrap()
    }

    #[test]
    fn a_stack_first_layout_is_read_from_global_0_and_the_data() {
        let m = module(
            r#"(module (memory 2) (global (mut i32) (i32.const 65536))
                 (data (i32.const 65536) "x") (data (i32.const 70000) "y"))"#,
        );
        assert_eq!(
            ShadowStack::of(&m),
            Some(ShadowStack {
                top: 65536,
                first: true
            })
        );
        let data_first = module(
            r#"(module (memory 2) (global (mut i32) (i32.const 70000)) (data (i32.const 1024) "x"))"#,
        );
        assert_eq!(ShadowStack::of(&data_first).map(|s| s.first), Some(false));
    }

    #[test]
    fn modules_without_a_stack_pointer_have_no_shadow_stack() {
        for wat in [
            "(module (memory 1))",
            "(module (global i32 (i32.const 8)))",
            "(module (global (mut i64) (i64.const 8)))",
            "(module (import \"m\" \"g\" (global (mut i32))) (global (mut i32) (i32.const 8)))",
        ] {
            assert_eq!(ShadowStack::of(&module(wat)), None, "{wat}");
        }
        assert_eq!(ShadowStack::of(b"not wasm"), None);
    }

    const STACK: ShadowStack = ShadowStack {
        top: 1 << 20,
        first: true,
    };

    fn fault(address: u64) -> MemoryFault {
        MemoryFault {
            address,
            memory_size: 17 << 16,
        }
    }

    #[test]
    fn a_stack_pointer_below_or_near_zero_is_an_overflow() {
        let msg = STACK.overflow(Some(0xffff_fc00), None).unwrap();
        assert!(msg.contains("shadow stack"), "{msg}");
        assert!(
            msg.contains("0xfffffc00 at the trap: 1024 bytes below address 0"),
            "{msg}"
        );
        assert!(msg.contains("the 1048576 bytes at the bottom"), "{msg}");
        let msg = STACK.overflow(Some(200), None).unwrap();
        assert!(msg.contains("its last 200 bytes"), "{msg}");
        // A stack pointer well inside the stack: some other out-of-bounds access.
        assert_eq!(STACK.overflow(Some(0x8_0000), None), None);
        assert_eq!(STACK.overflow(Some(0x8000_0000), None), None);
        assert_eq!(STACK.overflow(None, None), None);
        assert_eq!(
            STACK.overflow(Some(0x8_0000), Some(&fault(0x2_0000_0000))),
            None
        );
    }

    #[test]
    fn only_accesses_wrapped_within_a_stack_size_of_zero_are_overflows() {
        let msg = STACK.overflow(None, Some(&fault(0xffff_fc00))).unwrap();
        assert!(
            msg.contains("wasm address 0xfffffc00, had wrapped below address 0"),
            "{msg}"
        );
        assert!(STACK.overflow(None, Some(&fault(WRAP + 8))).is_some());
        assert!(STACK
            .overflow(None, Some(&fault(WRAP - (1 << 20))))
            .is_some());
        assert!(STACK
            .overflow(None, Some(&fault(WRAP - (1 << 20) - 1)))
            .is_none());
        assert!(STACK.overflow(None, Some(&fault(0x8000_0000))).is_none());
        assert!(STACK.overflow(None, Some(&fault(18 << 16))).is_none());
        let above_data = ShadowStack {
            first: false,
            ..STACK
        };
        let msg = above_data.overflow(Some(0xffff_fff0), None).unwrap();
        assert!(msg.contains("--stack-first"), "{msg}");
        // Near 0 is the last of a stack that comes first, but may be data under one that does not.
        assert_eq!(above_data.overflow(Some(200), None), None);
    }

    #[test]
    fn wasmtimes_fault_description_is_parsed() {
        assert_eq!(
            MemoryFault::parse(
                "memory fault at wasm address 0xfffff000 in linear memory of size 0x20000"
            ),
            Some(MemoryFault {
                address: 0xffff_f000,
                memory_size: 0x20000
            })
        );
        assert_eq!(MemoryFault::parse("out of bounds memory access"), None);
    }
}
