//! Shared helpers for the host's own tests: building the fixture component, starting hosts,
//! running curl.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use spin_bulk_host::{Host, HostConfig, RequestStat};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn newest_mtime(dir: &Path) -> SystemTime {
    let mut newest = SystemTime::UNIX_EPOCH;
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let meta = entry.metadata().unwrap();
        let m = if meta.is_dir() {
            newest_mtime(&entry.path())
        } else {
            meta.modified().unwrap()
        };
        newest = newest.max(m);
    }
    newest
}

/// The fixture .wasm, (re)built once per test process when missing or older than its sources.
/// A separate target dir: the outer `cargo test` holds the lock on `target/`.
pub fn fixture_wasm() -> PathBuf {
    static WASM: OnceLock<PathBuf> = OnceLock::new();
    WASM.get_or_init(|| {
        let root = workspace_root();
        let target_dir = root.join("target/fixture");
        let wasm = target_dir.join("wasm32-wasip2/release/spin_bulk_fixture.wasm");
        let fixture = root.join("tests/fixture");
        let stale = match std::fs::metadata(&wasm).and_then(|m| m.modified()) {
            Ok(built) => {
                built
                    < newest_mtime(&fixture.join("src")).max(
                        std::fs::metadata(fixture.join("Cargo.toml"))
                            .unwrap()
                            .modified()
                            .unwrap(),
                    )
            }
            Err(_) => true,
        };
        if stale {
            let status = Command::new(env!("CARGO"))
                .current_dir(&root)
                .args([
                    "build",
                    "-p",
                    "spin-bulk-fixture",
                    "--target",
                    "wasm32-wasip2",
                    "--release",
                    "--target-dir",
                ])
                .arg(&target_dir)
                .status()
                .expect("running cargo to build the fixture component");
            assert!(status.success(), "building the fixture component failed");
        }
        wasm
    })
    .clone()
}

pub fn fixture_manifest() -> PathBuf {
    workspace_root().join("tests/fixture/spin.toml")
}

/// DATABASE_URL, or a clear failure: the scripts always provide one.
pub fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| {
        panic!(
            "DATABASE_URL is not set. The PostgreSQL tests of the host need a server, e.g. \
             DATABASE_URL='postgres://postgres@127.0.0.1:55432/postgres?sslmode=disable'"
        )
    })
}

/// "host:port" of DATABASE_URL, for the fixture's allowed_outbound_hosts.
pub fn database_host_port() -> String {
    let config: tokio_postgres::Config = database_url().parse().expect("DATABASE_URL");
    let host = match &config.get_hosts()[0] {
        tokio_postgres::config::Host::Tcp(h) => h.clone(),
        other => panic!("DATABASE_URL must use TCP, got {other:?}"),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}")
}

/// A host running the fixture; `db_url` is a placeholder when no database is needed.
pub fn start_fixture(with_db: bool) -> Host {
    let mut config = HostConfig::new(fixture_wasm(), fixture_manifest());
    if with_db {
        config.variables.insert("db_url".into(), database_url());
        config
            .variables
            .insert("db_host".into(), database_host_port());
    } else {
        config
            .variables
            .insert("db_url".into(), "postgres://unused@127.0.0.1/none".into());
    }
    Host::start(config).expect("starting the host")
}

pub struct CurlResult {
    pub code: i32,
    pub body: String,
    pub stderr: String,
}

pub fn curl(url: &str) -> CurlResult {
    let out = Command::new("curl")
        .args(["-sS", "-N", "--max-time", "30", url])
        .output()
        .expect("running curl");
    CurlResult {
        code: out.status.code().unwrap_or(-1),
        body: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// GET and return the body (asserting curl succeeded).
pub fn get(host: &Host, path_and_query: &str) -> String {
    let r = curl(&format!("{}{}", host.url(), path_and_query));
    assert_eq!(r.code, 0, "curl {path_and_query}: {}", r.stderr);
    r.body
}

/// Percent-encode a query string for the fixture.
pub fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The stats of the first finished request for `path`, waiting briefly (stats are recorded as
/// the body ends, possibly just after curl returns).
pub fn stat_for(host: &Host, path: &str) -> RequestStat {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(s) = host.requests().into_iter().find(|s| s.path == path) {
            return s;
        }
        assert!(Instant::now() < deadline, "no request stats for {path}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
