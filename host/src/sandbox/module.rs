//! A module made ready to run: the checks before compiling, compiling (or loading from the disk
//! cache) into a [`CompiledModule`], the import/export check, and the in-memory cache.

use std::sync::Arc;
use std::time::Instant;

use lru::LruCache;
use sha2::{Digest, Sha256};
use wasmtime::{ExternType, InstancePre, Module};

use super::cache::Lookup;
use super::engine::compile;
use super::run::RunState;
use super::stack::ShadowStack;
use super::{Sandbox, WASI_MODULE};
use crate::observe::CacheEvent;
use crate::outcome::{RunResult, Status};

/// A module checked and compiled (a handler's code), ready to instantiate cheaply.
pub struct CompiledModule {
    sha256: [u8; 32],
    pub(super) pre: InstancePre<RunState>,
    /// The module's shadow stack in linear memory, if it has one (to recognise its overflow).
    pub(super) shadow_stack: Option<ShadowStack>,
    /// Where the compiled code came from (for logs and benchmarks).
    pub source: CodeSource,
}

impl CompiledModule {
    /// SHA-256 of the module bytes.
    pub fn sha256(&self) -> &[u8; 32] {
        &self.sha256
    }

    /// SHA-256 of the module bytes, hex-encoded.
    pub fn sha256_hex(&self) -> String {
        hex::encode(self.sha256)
    }
}

/// Where a [`CompiledModule`]'s compiled code came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodeSource {
    /// Already in the in-memory cache.
    Memory,
    /// Loaded from a verified disk cache entry.
    Disk,
    /// Compiled now (after a miss, or after a disk entry was discarded).
    Compiled,
}

impl Sandbox {
    pub(super) fn lock_modules(
        &self,
    ) -> std::sync::MutexGuard<'_, LruCache<[u8; 32], Arc<CompiledModule>>> {
        self.inner.modules.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The compiled module for a module hash, if it is in the in-memory cache (a hit counted;
    /// not finding it is not a miss: [`load`](Self::load) decides that).
    pub fn cached(&self, sha256: &[u8; 32]) -> Option<Arc<CompiledModule>> {
        let found = self.lock_modules().get(sha256).cloned();
        if found.is_some() {
            self.cache_event(CacheEvent::Hit);
        }
        found
    }

    fn cache_event(&self, event: CacheEvent) {
        if let Some(observer) = self.inner.observer.get() {
            observer.module_cache(event);
        }
    }

    /// Returns the compiled module for `bytes`: from memory, from the disk cache, or compiled
    /// now. CPU-heavy on a miss (tens of milliseconds); call from a blocking context.
    ///
    /// Errors are `invalid_module` results ready to return to the caller.
    pub fn load(&self, bytes: &[u8]) -> Result<Arc<CompiledModule>, Box<RunResult>> {
        self.precheck(bytes)?;
        let sha256: [u8; 32] = Sha256::digest(bytes).into();
        self.load_hashed(bytes, sha256).map_err(|mut r| {
            r.file_sha256 = Some(hex::encode(sha256));
            r
        })
    }

    /// The cheap checks done before anything else looks at a module's bytes: not empty, not
    /// larger than `max_module_bytes`, the wasm magic and a core-module version.
    pub fn precheck(&self, bytes: &[u8]) -> Result<(), Box<RunResult>> {
        let invalid = |msg: String| Box::new(RunResult::refused(Status::InvalidModule, msg));
        let max = self.inner.config.max_module_bytes;
        if bytes.is_empty() {
            return Err(invalid("the module is empty (0 bytes)".into()));
        }
        if bytes.len() as u64 > max {
            return Err(invalid(format!(
                "the module is {} bytes; the agent accepts modules up to {max} bytes",
                bytes.len()
            )));
        }
        check_header(bytes).map_err(invalid)
    }

    /// [`load`](Self::load) for bytes whose SHA-256 the caller already computed (and verified).
    pub fn load_hashed(
        &self,
        bytes: &[u8],
        sha256: [u8; 32],
    ) -> Result<Arc<CompiledModule>, Box<RunResult>> {
        if let Some(h) = self.lock_modules().get(&sha256) {
            self.cache_event(CacheEvent::Hit);
            return Ok(h.clone());
        }
        let invalid = |msg: String| Box::new(RunResult::refused(Status::InvalidModule, msg));
        check_header(bytes).map_err(invalid)?;
        let _loading = self.inner.loading.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = self.lock_modules().get(&sha256) {
            self.cache_event(CacheEvent::Hit);
            return Ok(h.clone()); // loaded by whoever held the lock before us
        }
        let engine = &self.inner.engine;
        let (module, source) = match self.inner.disk.as_ref().map(|d| d.load(engine, &sha256)) {
            Some(Lookup::Hit(m)) => {
                self.cache_event(CacheEvent::Hit);
                tracing::debug!(sha256 = %hex::encode(sha256), "loaded module from the disk cache");
                (m, CodeSource::Disk)
            }
            _ => {
                self.cache_event(CacheEvent::Miss);
                let started = Instant::now();
                let module = compile(engine, &self.inner.config, bytes).map_err(|e| {
                    invalid(format!(
                        "the module failed to compile: {}",
                        root_message(&e)
                    ))
                })?;
                tracing::debug!(sha256 = %hex::encode(sha256), ms = started.elapsed().as_secs_f64() * 1e3, "compiled module");
                // Compiling frees a lot of small allocations; hand them back to the OS so an idle
                // agent stays small. SAFETY: malloc_trim only releases free heap memory.
                unsafe { libc::malloc_trim(0) };
                self.cache_event(CacheEvent::Compile);
                (module, CodeSource::Compiled)
            }
        };
        self.check_interface(&module).map_err(invalid)?;
        let pre = self
            .inner
            .linker
            .instantiate_pre(&module)
            .map_err(|e| invalid(format!("the module cannot be linked: {e:#}")))?;
        if source == CodeSource::Compiled {
            if let Some(disk) = &self.inner.disk {
                if let Err(e) = disk.store(&sha256, &module) {
                    tracing::warn!(error = %format!("{e:#}"), "could not write the module cache entry");
                }
            }
        }
        let compiled = Arc::new(CompiledModule {
            sha256,
            pre,
            shadow_stack: ShadowStack::of(bytes),
            source,
        });
        self.lock_modules().put(sha256, compiled.clone());
        Ok(compiled)
    }

    /// Refuses modules that import anything the agent does not provide, or export no `_start`.
    fn check_interface(&self, module: &Module) -> Result<(), String> {
        for import in module.imports() {
            let key = (import.module().to_string(), import.name().to_string());
            if !self.inner.provided.contains(&key) {
                let kind = match import.ty() {
                    ExternType::Func(_) => "function",
                    ExternType::Memory(_) => "memory",
                    ExternType::Table(_) => "table",
                    ExternType::Global(_) => "global",
                    _ => "item",
                };
                return Err(format!(
                    "the module imports {kind} `{}::{}`, which the agent does not provide \
                     (handlers may import only {WASI_MODULE} functions)",
                    key.0, key.1
                ));
            }
        }
        match module.get_export("_start") {
            Some(ExternType::Func(f)) if f.params().len() == 0 && f.results().len() == 0 => Ok(()),
            Some(_) => Err("the module's `_start` export is not a function of no arguments".into()),
            None => Err("the module exports no `_start`: handlers are WASI command modules".into()),
        }
    }
}

/// Cheap checks before handing bytes to Cranelift: the wasm magic and a core-module version.
fn check_header(bytes: &[u8]) -> Result<(), String> {
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(
            "not a WebAssembly module (the file does not start with the `\\0asm` magic)".into(),
        );
    }
    match u32::from_le_bytes(bytes[4..8].try_into().expect("8 bytes checked")) {
        1 => Ok(()),
        v if v & 0xffff == 0x0d => Err(
            "this is a WebAssembly component; handlers are core modules (WASI preview 1 commands)"
                .into(),
        ),
        v => Err(format!("unsupported WebAssembly binary version {v:#x}")),
    }
}

/// The innermost message of an error chain (wasmparser's "unexpected end" rather than
/// "failed to parse WebAssembly module").
fn root_message(e: &wasmtime::Error) -> String {
    let all: Vec<String> = e.chain().map(|c| c.to_string()).collect();
    all.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_checks_name_the_problem() {
        assert!(check_header(b"").unwrap_err().contains("magic"));
        assert!(check_header(b"\x7fELF\x02\x01\x01\x00")
            .unwrap_err()
            .contains("magic"));
        assert!(check_header(b"\0asm\x0d\x00\x01\x00")
            .unwrap_err()
            .contains("component"));
        assert!(check_header(b"\0asm\x01\x00\x00\x00").is_ok());
    }
}
