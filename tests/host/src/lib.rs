//! The spin-bulk test host: runs a Spin HTTP component (.wasm) the way `spin up` does, for
//! tests and local runs where Spin itself is not available.
//!
//! It provides what spin-bulk imports — WASI 0.2, wasi:http, `spin:postgres/postgres@4.0.0` and
//! `fermyon:spin/variables@2.0.0` — and copies Spin's observable behaviour, rough edges included
//! (see `/work/shared/docs/spin-host-facts.md`): a host that is kinder than Spin would hide
//! product bugs.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::watch;

mod allowed_hosts;
mod engine;
mod manifest;
mod memory;
mod pg_types;
mod postgres;
mod server;
mod variables;

pub use memory::MEMORY_LIMIT;
pub use server::Observer;

mod bindings {
    wasmtime::component::bindgen!({
        path: "../../wit",
        world: "spin-bulk:host/spin-imports",
        imports: { default: async },
        with: {
            "spin:postgres/postgres.connection": crate::postgres::PgConnection,
        },
    });
}

/// How to run a component.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// The component .wasm.
    pub wasm: PathBuf,
    /// spin.toml (manifest v2).
    pub manifest: PathBuf,
    /// Component id in the manifest; None = the first one.
    pub component: Option<String>,
    /// Where to listen (127.0.0.1:0 in tests).
    pub listen: SocketAddr,
    /// Application variable values (lower-case names), as if given via SPIN_VARIABLE_<NAME>.
    pub variables: HashMap<String, String>,
}

impl HostConfig {
    pub fn new(wasm: impl Into<PathBuf>, manifest: impl Into<PathBuf>) -> Self {
        HostConfig {
            wasm: wasm.into(),
            manifest: manifest.into(),
            component: None,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            variables: HashMap::new(),
        }
    }

    /// Add application variables from `SPIN_VARIABLE_*` in the process environment. Values
    /// already in `variables` are kept.
    pub fn with_env(mut self) -> Self {
        for (k, v) in variables::from_env() {
            self.variables.entry(k).or_insert(v);
        }
        self
    }
}

/// How a request's handling ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The handler returned and the body ended cleanly.
    Finished,
    /// The body was aborted (dropped by the guest without `finish`, or the client went away).
    Aborted,
    /// The guest trapped (the client may still have seen a clean end, as with Spin).
    Trapped,
}

impl Outcome {
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Finished => "finished",
            Outcome::Aborted => "aborted",
            Outcome::Trapped => "trapped",
        }
    }
}

/// One finished request.
#[derive(Debug, Clone)]
pub struct RequestStat {
    pub method: String,
    pub path: String,
    pub status: u16,
    /// Wall time from request to the end of the response body.
    pub ms: u64,
    /// Largest linear memory (bytes) the request's instance reached.
    pub peak_memory: usize,
    /// Time spent in PostgreSQL calls (query/execute, host side), in microseconds.
    pub db_micros: u64,
    pub outcome: Outcome,
}

impl RequestStat {
    /// The `--stats` JSON line.
    pub fn to_json(&self) -> String {
        serde_json::json!({
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "ms": self.ms,
            "peak_linear_memory": self.peak_memory,
            "db_ms": self.db_micros as f64 / 1000.0,
            "outcome": self.outcome.as_str(),
        })
        .to_string()
    }
}

/// A running host. Dropping it stops serving and joins its thread.
pub struct Host {
    addr: SocketAddr,
    shared: Arc<server::Shared>,
    stop: Option<watch::Sender<bool>>,
    thread: Option<JoinHandle<()>>,
}

impl Host {
    /// Load, compile (once per wasm path + mtime per process) and start serving on a thread of
    /// its own with a multi-thread tokio runtime. Returns once the listener is bound.
    pub fn start(config: HostConfig) -> Result<Host> {
        Self::start_observed(config, None)
    }

    /// As `start`, calling `observer` for every finished request (the binary logs with it).
    pub fn start_observed(config: HostConfig, observer: Option<Observer>) -> Result<Host> {
        let manifest = manifest::Manifest::load(&config.manifest, config.component.as_deref())?;
        let app = variables::resolve_app_variables(&manifest, &config.variables)?;
        let vars = variables::ComponentVariables::resolve(&manifest, &app)?;
        let allowed = manifest
            .allowed_outbound_hosts
            .iter()
            .map(|t| variables::expand(t, &app))
            .collect::<Result<Vec<_>>>()
            .context("allowed_outbound_hosts")?;
        let allowed = allowed_hosts::AllowedHosts::parse(&allowed)
            .with_context(|| format!("component {:?}", manifest.component_id))?;

        let component = engine::component(&config.wasm)?;
        let pre = engine::pre_instantiate(&component)?;

        let listener = std::net::TcpListener::bind(config.listen)
            .with_context(|| format!("binding {}", config.listen))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;

        let shared = Arc::new(server::Shared {
            pre,
            pg: Arc::new(postgres::PgContext {
                allowed,
                pools: Default::default(),
            }),
            vars: Arc::new(vars),
            env: manifest.environment.clone().into_iter().collect(),
            route: server::Route::new(&manifest.route),
            listen: addr,
            host_peak: Arc::new(AtomicUsize::new(0)),
            stats: Mutex::new(Vec::new()),
            observer,
        });

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("spin-bulk-host")
            .build()?;
        let (stop_tx, stop_rx) = watch::channel(false);
        let serving = shared.clone();
        let thread = std::thread::Builder::new()
            .name("spin-bulk-host".into())
            .spawn(move || {
                runtime.block_on(async move {
                    match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => server::serve(l, serving, stop_rx).await,
                        Err(e) => eprintln!("spin-bulk-host: listener: {e}"),
                    }
                });
                // In-flight requests are cancelled; don't wait long for them.
                runtime.shutdown_timeout(Duration::from_secs(1));
            })?;

        Ok(Host {
            addr,
            shared,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// "http://127.0.0.1:PORT"
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The largest linear memory (bytes) any instance reached since start / the last reset.
    pub fn peak_memory(&self) -> usize {
        self.shared.host_peak.load(Ordering::Relaxed)
    }

    pub fn reset_peak_memory(&self) {
        self.shared.host_peak.store(0, Ordering::Relaxed);
    }

    /// Finished requests so far, in the order they finished.
    pub fn requests(&self) -> Vec<RequestStat> {
        self.shared.stats.lock().unwrap().clone()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
