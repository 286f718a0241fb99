//! One wasmtime `Engine` per process, and each component compiled once per (path, mtime):
//! tests start many hosts on the same .wasm.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::SystemTime;

use anyhow::{Context, Result};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine};
use wasmtime_wasi_http::p2::bindings::ProxyPre;

use crate::bindings::SpinImports;
use crate::server::State;

pub fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let mut config = Config::new();
        config.wasm_component_model(true);
        // `SPIN_BULK_HOST_PERFMAP=1`: write /tmp/perf-<pid>.map so `perf report` names the
        // component's functions (for profiling the hot path; off by default).
        if std::env::var_os("SPIN_BULK_HOST_PERFMAP").is_some() {
            config.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        // Compiled code is cached on disk too (keyed by content), so separate test binaries do
        // not each pay for Cranelift. Without a usable cache directory it simply compiles.
        if let Ok(cache) = wasmtime::Cache::new(wasmtime::CacheConfig::new()) {
            config.cache(Some(cache));
        }
        Engine::new(&config).expect("creating the wasmtime engine")
    })
}

/// The compiled component for `path`, compiled at most once per modification time.
pub fn component(path: &Path) -> Result<Component> {
    static CACHE: OnceLock<Mutex<HashMap<(PathBuf, SystemTime), Component>>> = OnceLock::new();
    let path = path
        .canonicalize()
        .with_context(|| format!("component {} not found", path.display()))?;
    let mtime = std::fs::metadata(&path)?.modified()?;
    let key = (path.clone(), mtime);
    // Holding the lock while compiling makes concurrent starts wait for one compilation
    // instead of compiling the same bytes several times on a 2-core machine.
    let mut cache = CACHE.get_or_init(Default::default).lock().unwrap();
    if let Some(c) = cache.get(&key) {
        return Ok(c.clone());
    }
    let c = Component::from_file(engine(), &path)
        .map_err(anyhow::Error::from)
        .with_context(|| format!("compiling {}", path.display()))?;
    cache.insert(key, c.clone());
    Ok(c)
}

/// Link everything a Spin HTTP component may import that this host provides: WASI 0.2
/// (no preopens, no network), wasi:http, spin:postgres@4.0.0 and fermyon:spin/variables@2.0.0.
/// A component importing anything else fails here, as it would under a Spin without that
/// feature.
pub fn pre_instantiate(component: &Component) -> Result<ProxyPre<State>> {
    let mut linker = Linker::<State>::new(engine());
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
    SpinImports::add_to_linker::<State, HasSelf<State>>(&mut linker, |s| s)?;
    let pre = linker
        .instantiate_pre(component)
        .map_err(anyhow::Error::from)
        .context("the component imports something this host does not provide")?;
    Ok(ProxyPre::new(pre)?)
}
