//! `spin:postgres/postgres@4.0.0` on tokio-postgres + deadpool, shaped like Spin's factor:
//! allowed-hosts check before connecting, one pool per address (64 connections, recycling
//! "Clean"), one pooled client per `connection` resource for its whole life.

// pg4 errors are large (structured database errors), as the WIT defines them.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio_postgres::config::{Host as PgHost, SslMode};
use tokio_postgres::types::ToSql;
use wasmtime::component::Resource;

use crate::allowed_hosts::AllowedHosts;
use crate::bindings::spin::postgres::postgres::{
    self as pg, DbError, Error, ParameterValue, QueryError, RowSet,
};
use crate::pg_types;
use crate::server::State;

/// Spin's pool size per address.
const POOL_SIZE: usize = 64;
/// Spin caps what one `query` may buffer in the host (`MAX_HOST_BUFFERED_BYTES`).
pub const MAX_RESULT_BYTES: usize = 128 * 1024 * 1024;

/// Pools shared by every instance of one host (keyed by the address string, as in Spin).
#[derive(Default)]
pub struct Pools {
    pools: Mutex<HashMap<String, deadpool_postgres::Pool>>,
}

impl Pools {
    fn get_or_create(&self, address: &str) -> anyhow::Result<deadpool_postgres::Pool> {
        let mut pools = self.pools.lock().unwrap();
        if let Some(p) = pools.get(address) {
            return Ok(p.clone());
        }
        let config: tokio_postgres::Config = address.parse()?;
        // This host has no TLS. With `NoTls`, tokio-postgres connects in plain text for
        // `prefer` (Spin would negotiate TLS when the server offers it) and fails for `require`
        // — so a component can never appear to work here with TLS settings that Spin rejects.
        if config.get_ssl_mode() != SslMode::Disable && config.get_ssl_mode() != SslMode::Prefer {
            anyhow::bail!(
                "this test host does not support TLS (sslmode=require); use sslmode=disable"
            );
        }
        let manager = deadpool_postgres::Manager::from_config(
            config,
            tokio_postgres::NoTls,
            deadpool_postgres::ManagerConfig {
                recycling_method: deadpool_postgres::RecyclingMethod::Clean,
            },
        );
        let pool = deadpool_postgres::Pool::builder(manager)
            .max_size(POOL_SIZE)
            .build()?;
        pools.insert(address.to_string(), pool.clone());
        Ok(pool)
    }
}

/// What a `connection` resource holds. An `Arc` so a query can run without borrowing the
/// resource table across an await; the guest cannot drop the resource while it is blocked in a
/// call on it, so the pooled client goes back to the pool when the resource is dropped.
pub struct PgConnection {
    client: Arc<deadpool_postgres::Object>,
}

/// Spin's allowed-hosts check: every TCP host of the connection string, with its port.
fn ensure_allowed(allowed: &AllowedHosts, address: &str) -> Result<(), Error> {
    let config: tokio_postgres::Config = address
        .parse()
        .map_err(|e: tokio_postgres::Error| Error::ConnectionFailed(e.to_string()))?;
    let ports = config.get_ports();
    for (i, host) in config.get_hosts().iter().enumerate() {
        match host {
            PgHost::Tcp(name) => {
                let port = ports
                    .get(i)
                    .or(if ports.len() == 1 {
                        ports.first()
                    } else {
                        None
                    })
                    .copied()
                    .unwrap_or(5432);
                if !allowed.allows("postgres", name, port) {
                    return Err(Error::ConnectionFailed(format!(
                        "address postgres://{name}:{port} is not permitted: it is not allowed by \
                         the component's allowed_outbound_hosts"
                    )));
                }
            }
            #[cfg(unix)]
            PgHost::Unix(_) => {
                return Err(Error::ConnectionFailed(
                    "Unix sockets are not supported on WebAssembly".into(),
                ))
            }
        }
    }
    Ok(())
}

fn query_failed(e: tokio_postgres::Error) -> Error {
    let as_text = format!("{e:?}");
    Error::QueryFailed(match e.as_db_error() {
        None => QueryError::Text(as_text),
        Some(db) => {
            let mut extras = Vec::new();
            let mut extra = |k: &str, v: Option<String>| {
                if let Some(v) = v {
                    extras.push((k.to_string(), v));
                }
            };
            extra("column", db.column().map(str::to_string));
            extra("constraint", db.constraint().map(str::to_string));
            extra("routine", db.routine().map(str::to_string));
            extra("hint", db.hint().map(str::to_string));
            extra("table", db.table().map(str::to_string));
            extra("datatype", db.datatype().map(str::to_string));
            extra("schema", db.schema().map(str::to_string));
            extra("file", db.file().map(str::to_string));
            extra("line", db.line().map(|l| l.to_string()));
            extra("where_", db.where_().map(str::to_string));
            extra(
                "position",
                db.position().map(|p| match p {
                    tokio_postgres::error::ErrorPosition::Original(n) => n.to_string(),
                    tokio_postgres::error::ErrorPosition::Internal { position, query } => {
                        format!("{position} (internal query: {query})")
                    }
                }),
            );
            QueryError::DbError(DbError {
                as_text,
                severity: db.severity().to_string(),
                code: db.code().code().to_string(),
                message: db.message().to_string(),
                detail: db.detail().map(str::to_string),
                extras,
            })
        }
    })
}

fn params(p: Vec<ParameterValue>) -> Result<Vec<pg_types::SqlParam>, Error> {
    p.into_iter()
        .map(pg_types::to_sql)
        .collect::<anyhow::Result<_>>()
        .map_err(|e| Error::BadParameter(format!("{e:?}")))
}

fn refs(p: &[pg_types::SqlParam]) -> Vec<&(dyn ToSql + Sync)> {
    p.iter()
        .map(|b| b.as_ref() as &(dyn ToSql + Sync))
        .collect()
}

impl State {
    fn add_db_time(&self, started: Instant) {
        let micros = started.elapsed().as_micros() as u64;
        self.db_micros.fetch_add(micros, Ordering::Relaxed);
    }

    fn client(&self, c: &Resource<PgConnection>) -> Result<Arc<deadpool_postgres::Object>, Error> {
        self.table
            .get(c)
            .map(|c| c.client.clone())
            .map_err(|_| Error::ConnectionFailed("no connection found".into()))
    }
}

impl pg::Host for State {}

impl pg::HostConnection for State {
    async fn open(&mut self, address: String) -> Result<Resource<PgConnection>, Error> {
        ensure_allowed(&self.pg.allowed, &address)?;
        let pool = self
            .pg
            .pools
            .get_or_create(&address)
            .map_err(|e| Error::ConnectionFailed(format!("{e:?}")))?;
        let client = pool
            .get()
            .await
            .map_err(|e| Error::ConnectionFailed(format!("{e:?}")))?;
        self.table
            .push(PgConnection {
                client: Arc::new(client),
            })
            .map_err(|_| Error::ConnectionFailed("too many connections".into()))
    }

    async fn query(
        &mut self,
        conn: Resource<PgConnection>,
        statement: String,
        p: Vec<ParameterValue>,
    ) -> Result<RowSet, Error> {
        let client = self.client(&conn)?;
        let p = params(p)?;
        let started = Instant::now();
        let rows = client.query(&statement, &refs(&p)).await;
        self.add_db_time(started);
        let rows = rows.map_err(query_failed)?;
        // Like Spin: column types come from the first row, so an empty result has no columns.
        let Some(first) = rows.first() else {
            return Ok(RowSet {
                columns: vec![],
                rows: vec![],
            });
        };
        let columns = pg_types::columns(first);
        let mut out = Vec::with_capacity(rows.len());
        let mut size = 0usize;
        for row in &rows {
            let mut values = Vec::with_capacity(row.len());
            for i in 0..row.len() {
                let v = pg_types::value(row, i)
                    .map_err(|e| Error::QueryFailed(QueryError::Text(format!("{e:?}"))))?;
                size += pg_types::approx_size(&v);
                values.push(v);
            }
            if size > MAX_RESULT_BYTES {
                return Err(Error::QueryFailed(QueryError::Text(format!(
                    "query result exceeds the host's limit of {MAX_RESULT_BYTES} bytes; \
                     fetch fewer rows at a time"
                ))));
            }
            out.push(values);
        }
        Ok(RowSet { columns, rows: out })
    }

    async fn execute(
        &mut self,
        conn: Resource<PgConnection>,
        statement: String,
        p: Vec<ParameterValue>,
    ) -> Result<u64, Error> {
        let client = self.client(&conn)?;
        let p = params(p)?;
        let started = Instant::now();
        let n = client.execute(&statement, &refs(&p)).await;
        self.add_db_time(started);
        n.map_err(query_failed)
    }

    async fn drop(&mut self, conn: Resource<PgConnection>) -> wasmtime::Result<()> {
        // Dropping the Object hands the client back to its pool.
        self.table.delete(conn)?;
        Ok(())
    }
}

/// Per-host PostgreSQL context shared by all instances.
pub struct PgContext {
    pub allowed: AllowedHosts,
    pub pools: Pools,
}
