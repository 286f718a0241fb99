//! Shared helpers for the integration tests (`tests/*.rs` start with `mod support;`).
//!
//! - [`TestDb`]: a fresh PostgreSQL database per test, with `schema/schema.sql` applied, dropped
//!   at the end. Needs `DATABASE_URL` (an admin URL whose user may CREATE DATABASE): `scripts/test`
//!   provides it, starting a throwaway cluster when none is given.
//! - [`start`]: runs the real component (`target/wasm32-wasip2/release/spin_bulk.wasm`) in the
//!   project's wasmtime host, wired to a [`TestDb`] the way `spin up` would be.
//! - [`curl`]: the real curl, so tests see what a client sees (chunking, exit 18 on an aborted
//!   transfer, gzip bytes as sent).
//! - [`sample`] / [`insert_resources`]: the Synthea sample in `../shared/data/fhir-sample`, written
//!   straight into the Aidbox layout, so dump tests don't depend on the import endpoints.
//!
//! The PostgreSQL client here is the synchronous `postgres` crate: call it from plain `#[test]`s
//! (it runs its own runtime, so not from inside a `#[tokio::test]`; use `spawn_blocking` there).
#![allow(dead_code)]

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use postgres::{Client, NoTls};
use serde_json::Value;

/// The repository root (this package's manifest directory).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The admin connection string for tests, from `DATABASE_URL`.
pub fn database_url() -> String {
    match std::env::var("DATABASE_URL") {
        Ok(url) if !url.trim().is_empty() => url,
        _ => panic!(
            "DATABASE_URL is not set: run scripts/test (it starts a throwaway PostgreSQL), \
             or set DATABASE_URL=postgres://user@host:port/db?sslmode=disable (user needs CREATEDB)"
        ),
    }
}

/// `url` with its database name replaced by `db` (query string kept).
/// Only the URL form (`postgres://…`) is supported.
pub fn url_with_db(url: &str, db: &str) -> String {
    let (base, query) = match url.find('?') {
        Some(i) => (&url[..i], &url[i..]),
        None => (url, ""),
    };
    let scheme_end = base
        .find("://")
        .unwrap_or_else(|| panic!("DATABASE_URL must be a postgres:// URL, got {url:?}"))
        + 3;
    let authority_end = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    format!("{}/{db}{query}", &base[..authority_end])
}

/// `host:port` of a `postgres://` URL (port 5432 when absent): what spin.toml's
/// `allowed_outbound_hosts = ["postgres://{{ db_host }}"]` must allow.
pub fn host_port(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let has_port = if hostport.starts_with('[') {
        hostport.contains("]:")
    } else {
        hostport.contains(':')
    };
    if has_port {
        hostport.to_string()
    } else {
        format!("{hostport}:5432")
    }
}

fn connect(url: &str) -> Client {
    Client::connect(url, NoTls).unwrap_or_else(|e| {
        panic!(
            "connecting to PostgreSQL at {}: {}",
            host_port(url),
            pg_error(&e)
        )
    })
}

static DB_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A fresh database for one test: `sb_test_<pid>_<n>`, schema applied; dropped on `Drop`.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub fn new() -> Self {
        Self::with_options("")
    }

    /// A fresh database created with these `CREATE DATABASE` options (e.g. another encoding).
    pub fn with_options(options: &str) -> Self {
        let admin_url = database_url();
        let name = format!(
            "sb_test_{}_{}",
            std::process::id(),
            DB_COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let mut admin = connect(&admin_url);
        // Two statements, two calls: CREATE DATABASE can't run in the implicit transaction of a
        // multi-statement batch.
        for sql in [
            format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"),
            format!("CREATE DATABASE \"{name}\" {options}"),
        ] {
            admin
                .batch_execute(&sql)
                .unwrap_or_else(|e| panic!("{sql}: {}", pg_error(&e)));
        }
        let db = TestDb {
            url: url_with_db(&admin_url, &name),
            name,
        };
        let schema_path = repo_root().join("schema/schema.sql");
        let schema = std::fs::read_to_string(&schema_path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", schema_path.display()));
        db.exec(&schema);
        db
    }

    /// A new connection to this database.
    pub fn client(&self) -> Client {
        connect(&self.url)
    }

    /// Run one or more statements (simple protocol, no parameters); panics on error.
    pub fn exec(&self, sql: &str) {
        self.client()
            .batch_execute(sql)
            .unwrap_or_else(|e| panic!("{}\n  in: {}", pg_error(&e), abbreviate(sql)));
    }

    /// First column of the single row `sql` returns, as i64 (int2/int4/int8; cast others
    /// with `::bigint`). Panics on error, on NULL, on zero or several rows.
    pub fn scalar_i64(&self, sql: &str) -> i64 {
        let row = self
            .client()
            .query_one(sql, &[])
            .unwrap_or_else(|e| panic!("{}\n  in: {}", pg_error(&e), abbreviate(sql)));
        let ty = row.columns()[0].type_().clone();
        let v: Option<i64> = match ty {
            postgres::types::Type::INT8 => row.get(0),
            postgres::types::Type::INT4 => row.get::<_, Option<i32>>(0).map(i64::from),
            postgres::types::Type::INT2 => row.get::<_, Option<i16>>(0).map(i64::from),
            other => panic!("scalar_i64: column is {other}, cast it to bigint\n  in: {sql}"),
        };
        v.unwrap_or_else(|| panic!("scalar_i64: NULL\n  in: {sql}"))
    }
}

impl Default for TestDb {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Never panic here (a test may already be panicking); FORCE ends the host's pooled
        // connections still open on this database.
        let Ok(url) = std::env::var("DATABASE_URL") else {
            return;
        };
        if let Ok(mut admin) = Client::connect(&url, NoTls) {
            let _ = admin.batch_execute(&format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.name
            ));
        }
    }
}

/// A PostgreSQL error with the server's message, detail and SQLSTATE (the Display of
/// `postgres::Error` alone says only "db error").
pub fn pg_error(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!(
                "{}: {} (SQLSTATE {})",
                db.severity(),
                db.message(),
                db.code().code()
            );
            if let Some(detail) = db.detail() {
                s.push_str(&format!("; detail: {detail}"));
            }
            s
        }
        None => format!("{e:?}"),
    }
}

fn abbreviate(sql: &str) -> String {
    if sql.len() <= 300 {
        return sql.to_string();
    }
    let mut end = 300;
    while !sql.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &sql[..end])
}

/// The release build of the component. Panics when it has not been built.
pub fn wasm_path() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|t| {
            if t.is_absolute() {
                t
            } else {
                repo_root().join(t)
            }
        })
        .unwrap_or_else(|| repo_root().join("target"));
    let path = target.join("wasm32-wasip2/release/spin_bulk.wasm");
    assert!(
        path.is_file(),
        "{} is missing: build it first: scripts/test \
         (or cargo build --target wasm32-wasip2 --release -p spin-bulk)",
        path.display()
    );
    path
}

/// Start the component in the test host, connected to `db` like `spin up` with
/// SPIN_VARIABLE_DB_URL / SPIN_VARIABLE_DB_HOST would be; `vars` adds or overrides variables
/// (e.g. `[("page_bytes", "1024"), ("admin_secret", "s3cret")]`).
pub fn start(db: &TestDb, vars: &[(&str, &str)]) -> spin_bulk_host::Host {
    start_with_manifest(db, &repo_root().join("spin.toml"), vars)
}

/// [`start`] with another manifest than the repository's `spin.toml`.
pub fn start_with_manifest(
    db: &TestDb,
    manifest: &std::path::Path,
    vars: &[(&str, &str)],
) -> spin_bulk_host::Host {
    let mut cfg = spin_bulk_host::HostConfig::new(wasm_path(), manifest.to_path_buf());
    cfg.variables.insert("db_url".to_string(), db.url.clone());
    cfg.variables
        .insert("db_host".to_string(), host_port(&db.url));
    for (k, v) in vars {
        cfg.variables.insert((*k).to_string(), (*v).to_string());
    }
    spin_bulk_host::Host::start(cfg).unwrap_or_else(|e| panic!("starting the host: {e:#}"))
}

/// The built-in admin's credentials in every test host [`serve`] starts (`curl -u ADMIN`).
pub const ADMIN: &str = "admin:test-admin-secret";

/// [`start`] with the admin secret behind [`ADMIN`] set: every request needs credentials.
pub fn serve(db: &TestDb, vars: &[(&str, &str)]) -> spin_bulk_host::Host {
    let mut vars = vars.to_vec();
    vars.push(("admin_secret", "test-admin-secret"));
    start(db, &vars)
}

/// Asserts an OperationOutcome answer with this status; returns its first diagnostics.
pub fn outcome(r: &Reply, status: u16) -> String {
    assert_eq!(r.status, status, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert_eq!(v["resourceType"], "OperationOutcome");
    v["issue"][0]["diagnostics"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

/// What curl reported.
#[derive(Debug, Clone)]
pub struct Reply {
    /// curl's exit code: 0 ok, 18 = transfer closed with data outstanding (an aborted stream),
    /// 7 = could not connect, 28 = timeout, …
    pub exit: i32,
    /// Status of the final response (after any 1xx / redirects), 0 when none arrived.
    pub status: u16,
    /// Headers of the final response, in order, names as sent.
    pub headers: Vec<(String, String)>,
    /// The body as curl wrote it (not decompressed unless `--compressed` was passed).
    pub body: Vec<u8>,
    /// curl's stderr (error messages; empty on success thanks to -sS).
    pub stderr: String,
}

impl Reply {
    /// First header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as UTF-8 (panics otherwise).
    pub fn text(&self) -> &str {
        std::str::from_utf8(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not UTF-8 ({e}); status {}, {} bytes",
                self.status,
                self.body.len()
            )
        })
    }

    /// The body as JSON (panics otherwise, showing the start of the body).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}); status {}: {}",
                self.status,
                abbreviate(&String::from_utf8_lossy(&self.body))
            )
        })
    }

    /// The body's lines (ndjson), without line ends; a final newline adds no empty line.
    pub fn lines(&self) -> Vec<&str> {
        self.text().lines().collect()
    }
}

static CURL_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Run the real curl with `-sS -D <tmpfile>` and `args` (a URL among them), body to stdout.
/// A default `--max-time 300` guards against a hung stream; pass your own to override it.
pub fn curl(args: &[&str]) -> Reply {
    let header_file = std::env::temp_dir().join(format!(
        "sb-curl-{}-{}.headers",
        std::process::id(),
        CURL_COUNTER.fetch_add(1, Ordering::SeqCst)
    ));
    let out = Command::new("curl")
        .arg("-sS")
        .arg("--max-time")
        .arg("300")
        .arg("-D")
        .arg(&header_file)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running curl (is it installed?): {e}"));
    let raw = std::fs::read(&header_file).unwrap_or_default();
    let _ = std::fs::remove_file(&header_file);
    let (status, headers) = parse_headers(&String::from_utf8_lossy(&raw));
    Reply {
        exit: out.status.code().unwrap_or(-1),
        status,
        headers,
        body: out.stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Status and headers of the LAST response block in a `curl -D` dump (skips 100-continue,
/// redirects, and trailers that follow a block).
fn parse_headers(dump: &str) -> (u16, Vec<(String, String)>) {
    let mut status = 0;
    let mut headers = Vec::new();
    for line in dump.lines() {
        let line = line.trim_end_matches('\r');
        if line.starts_with("HTTP/") {
            status = line
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            headers.clear();
        } else if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    (status, headers)
}

/// Folder of the FHIR sample: `$FHIR_SAMPLE_DIR`, else `../shared/data/fhir-sample` beside
/// the repository (where CI and the dev machines lay `shared/`).
pub fn sample_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("FHIR_SAMPLE_DIR") {
        return PathBuf::from(dir);
    }
    let dir = repo_root().join("../shared/data/fhir-sample");
    assert!(
        dir.is_dir(),
        "{} is missing (set FHIR_SAMPLE_DIR to the fhir-sample folder)",
        dir.display()
    );
    dir
}

/// Resource types in the sample (file stems of `*.ndjson`), sorted.
pub fn sample_types() -> Vec<String> {
    let dir = sample_dir();
    let mut types: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .filter_map(|e| {
            let path = e.ok()?.path();
            (path.extension()? == "ndjson")
                .then(|| path.file_stem()?.to_str().map(str::to_string))?
        })
        .collect();
    types.sort();
    types
}

/// The sample's resources of one type, in file order, as full FHIR JSON.
pub fn sample(type_: &str) -> Vec<Value> {
    let path = sample_dir().join(format!("{type_}.ndjson"));
    read_ndjson(&path)
}

/// Parse an ndjson file (blank lines skipped).
pub fn read_ndjson(path: &Path) -> Vec<Value> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("{}:{}: {e}", path.display(), i + 1))
        })
        .collect()
}

/// The Aidbox table of a resource type: its name in lower case. Panics on anything but ASCII
/// letters (the name goes into SQL).
pub fn table_of(type_: &str) -> String {
    assert!(
        !type_.is_empty() && type_.bytes().all(|b| b.is_ascii_alphabetic()),
        "not a resource type: {type_:?}"
    );
    type_.to_ascii_lowercase()
}

/// `(id, body)` of a FHIR resource as Aidbox stores it: body = the JSON without id,
/// resourceType and meta.
pub fn aidbox_body(resource: &Value) -> (String, Value) {
    let id = resource
        .get("id")
        .and_then(Value::as_str)
        .unwrap_or_else(|| {
            panic!(
                "resource without a string id: {}",
                abbreviate(&resource.to_string())
            )
        })
        .to_string();
    let mut body = resource.clone();
    if let Some(obj) = body.as_object_mut() {
        obj.remove("id");
        obj.remove("resourceType");
        obj.remove("meta");
    }
    (id, body)
}

/// Insert resources straight into `type_`'s table in the Aidbox layout: id, txid from
/// transaction_id_seq, status 'created', resource = the JSON without id/resourceType/meta
/// (sent as text and cast with `::jsonb` in SQL). One statement, in the given order.
pub fn insert_resources(db: &TestDb, type_: &str, resources: &[Value]) {
    let table = table_of(type_);
    let mut ids = Vec::with_capacity(resources.len());
    let mut bodies = Vec::with_capacity(resources.len());
    let mut seen = HashSet::new();
    for r in resources {
        let (id, body) = aidbox_body(r);
        assert!(seen.insert(id.clone()), "duplicate {type_} id {id}");
        ids.push(id);
        bodies.push(body.to_string());
    }
    let sql = format!(
        "INSERT INTO {table} (id, txid, status, resource_type, resource) \
         SELECT u.id, nextval('transaction_id_seq'), 'created', $3::text, u.body::jsonb \
         FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS u(id, body, n) ORDER BY u.n"
    );
    db.client()
        .execute(sql.as_str(), &[&ids, &bodies, &type_])
        .unwrap_or_else(|e| {
            panic!(
                "inserting {} {type_} resources: {}",
                resources.len(),
                pg_error(&e)
            )
        });
}

/// The sample's raw ndjson lines of one type (exact text: decimals like `1.50` kept as written,
/// which a `serde_json::Value` would not).
pub fn sample_lines(type_: &str) -> Vec<String> {
    let path = sample_dir().join(format!("{type_}.ndjson"));
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

/// Like [`insert_resources`], from raw JSON text (one resource per string): id, resourceType and
/// meta are stripped in SQL, so the JSON text reaches PostgreSQL's jsonb unchanged (numbers keep
/// their precision).
pub fn insert_raw(db: &TestDb, type_: &str, lines: &[&str]) {
    let table = table_of(type_);
    let sql = format!(
        "INSERT INTO {table} (id, txid, status, resource_type, resource) \
         SELECT u.doc->>'id', nextval('transaction_id_seq'), 'created', $2::text, \
                u.doc - 'id' - 'resourceType' - 'meta' \
         FROM (SELECT l::jsonb AS doc, n FROM unnest($1::text[]) WITH ORDINALITY AS t(l, n)) u \
         ORDER BY u.n"
    );
    db.client()
        .execute(sql.as_str(), &[&lines, &type_])
        .unwrap_or_else(|e| {
            panic!(
                "inserting {} {type_} resources: {}",
                lines.len(),
                pg_error(&e)
            )
        });
}
