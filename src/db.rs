//! The database as the rest of the code sees it.
//!
//! Spin's `spin:postgres/postgres@4.0.0` is only reachable inside the component, so the logic
//! talks to this small trait instead; `crate::spin` implements it on `spin_sdk::pg4` by moving
//! values (no copies of row data). Keeping it narrow — `query`, `execute`, nothing else — mirrors
//! what the WIT interface offers, so nothing here can depend on a feature Spin lacks.

use crate::outcome::ApiError;

/// A value as Spin hands it over. Only the shapes the component selects are kept distinct;
/// everything else arrives as `Other` (we cast such columns to `text` in SQL instead).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    /// A `timestamp` (without time zone) — select `ts AT TIME ZONE 'UTC'` to get one.
    DateTime(DateTime),
    Other,
}

impl Value {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }

    pub fn take_string(&mut self) -> Option<String> {
        match std::mem::replace(self, Value::Null) {
            Value::Str(s) => Some(s),
            other => {
                *self = other;
                None
            }
        }
    }
}

/// A calendar date and time of day in UTC, as `spin:postgres` reports a `timestamp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateTime {
    pub year: i32,
    pub month: u8,
    pub day: u8,
    pub hour: u8,
    pub minute: u8,
    pub second: u8,
    pub nanosecond: u32,
}

/// A query parameter. JSON always travels as `Str` and is cast in SQL (`$1::jsonb`): Spin's
/// jsonb parameter goes through `serde_json::Value` and would round numbers through f64.
#[derive(Debug, Clone, PartialEq)]
pub enum Param {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    /// A `text[]` (Spin's `array-str`): how batches of ids and documents travel in one query.
    StrArray(Vec<String>),
}

/// A column of a result: its name and the type Spin announced (`str`, `int64`, `other(json)`, …).
#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    pub name: String,
    pub kind: String,
}

#[derive(Debug, Default)]
pub struct Rows {
    pub columns: Vec<Column>,
    pub rows: Vec<Vec<Value>>,
}

impl Rows {
    /// Whether the first column of the first row is `true` (the answer of an `EXISTS` or
    /// `IS NOT NULL` probe).
    pub fn first_is_true(&self) -> bool {
        matches!(
            self.rows.first().and_then(|r| r.first()),
            Some(Value::Bool(true))
        )
    }
}

/// What can go wrong talking to PostgreSQL, keeping what PostgreSQL said.
#[derive(Debug, Clone, PartialEq)]
pub enum DbError {
    /// The database could not be reached (or Spin refused the address).
    Connect(String),
    /// PostgreSQL answered with an error.
    Sql {
        code: String,
        message: String,
        detail: Option<String>,
        position: Option<String>,
    },
    /// Anything else the host reported (conversion failures, result cap, lost connection).
    Other(String),
}

impl DbError {
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            DbError::Sql { code, .. } => Some(code),
            _ => None,
        }
    }

    /// SQLSTATE class 08 (connection exception) or a host-side failure to reach the server.
    pub fn is_connection(&self) -> bool {
        match self {
            DbError::Connect(_) => true,
            DbError::Sql { code, .. } => code.starts_with("08") || code == "57P01",
            DbError::Other(m) => {
                let m = m.to_ascii_lowercase();
                m.contains("connection") && (m.contains("closed") || m.contains("reset"))
            }
        }
    }

    pub fn message(&self) -> String {
        match self {
            DbError::Connect(m) | DbError::Other(m) => m.clone(),
            DbError::Sql {
                code,
                message,
                detail,
                position,
            } => {
                let mut s = format!("{message} (SQLSTATE {code}");
                if let Some(p) = position {
                    s.push_str(", position ");
                    s.push_str(p);
                }
                s.push(')');
                if let Some(d) = detail {
                    s.push_str(": ");
                    s.push_str(d);
                }
                s
            }
        }
    }

    /// The error as an API answer, for failures before the first byte of a response.
    /// Callers map the SQLSTATEs that mean something specific to them (42P01 → 404) first.
    pub fn into_api(self) -> ApiError {
        match self.sqlstate() {
            _ if self.is_connection() => {
                ApiError::unavailable(format!("database unavailable: {}", self.message()))
            }
            Some("57014") => ApiError::new(
                504,
                "timeout",
                format!("statement timeout: {}", self.message()),
            ),
            _ => ApiError::internal(format!("database error: {}", self.message())),
        }
    }
}

impl std::fmt::Display for DbError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message())
    }
}

/// One open connection (one pooled connection in Spin, held until dropped).
///
/// Parameters are taken by value: the Spin layer moves them into Spin's parameter values, so a
/// batch of documents is never copied on its way out.
pub trait Db {
    fn query(&mut self, sql: &str, params: Vec<Param>) -> Result<Rows, DbError>;
    fn execute(&mut self, sql: &str, params: Vec<Param>) -> Result<u64, DbError>;
}

/// What the component needs from its platform: configuration and connections.
pub trait Platform {
    type Conn: Db;
    /// A Spin variable; `None` when undefined.
    fn variable(&self, name: &str) -> Option<String>;
    fn connect(&self, address: &str) -> Result<Self::Conn, DbError>;
    /// Cryptographically secure random bytes (salts).
    fn random_bytes(&self, n: usize) -> Vec<u8>;
    /// `GET url` through the platform's outbound HTTP (Spin checks `allowed_outbound_hosts`).
    fn fetch(&self, url: &str) -> Result<Fetched, String>;
    /// Requests to this same application (Spin's self requests), for a split `$dump`.
    fn self_requests(&self) -> Box<dyn SelfRequest>;
}

/// Sends requests to this same application.
pub trait SelfRequest {
    /// Sends `GET path_and_query` with this `Authorization` and returns at once: the other
    /// instance works while this one goes on.
    fn send(
        &self,
        path_and_query: &str,
        authorization: &str,
    ) -> Result<Box<dyn PendingResponse>, String>;
}

/// A response still on its way.
pub trait PendingResponse {
    /// Waits for the status and headers; the body then streams.
    fn wait(self: Box<Self>) -> Result<Fetched, String>;
}

/// A fetched response: its status, whether it is gzip-encoded, and its body as a stream.
pub struct Fetched {
    pub status: u16,
    pub gzip: bool,
    pub body: Box<dyn crate::http::BodyReader>,
}

/// A connection that may be inside a read-only transaction (`$dump-sql`'s, a split `$dump`'s
/// snapshot), rolled back when dropped still open — so a connection never goes back to Spin's
/// pool inside a transaction. A read-only transaction always ends with `ROLLBACK`: it has
/// nothing to keep, and a query can do things a read-only transaction lets through
/// (`lo_creat` writes a large object, a `set_config(…, false)` changes the session) that a
/// `COMMIT` would make last.
pub struct ReadTx<C: Db> {
    pub conn: C,
    open: bool,
}

impl<C: Db> ReadTx<C> {
    /// The connection, no transaction yet.
    pub fn new(conn: C) -> ReadTx<C> {
        ReadTx { conn, open: false }
    }

    /// Begins the transaction with `statement` (a `BEGIN … READ ONLY`).
    pub fn begin(&mut self, statement: &str) -> Result<(), DbError> {
        self.conn.execute(statement, Vec::new())?;
        self.open = true;
        Ok(())
    }

    pub fn is_open(&self) -> bool {
        self.open
    }

    /// Ends the transaction, if open, after its last page; a failure here fails the stream.
    pub fn end(&mut self) -> Result<(), DbError> {
        if std::mem::take(&mut self.open) {
            self.conn.execute("ROLLBACK", Vec::new())?;
        }
        Ok(())
    }

    /// Ends the transaction, if open, after a failure: best effort.
    pub fn rollback(&mut self) {
        if std::mem::take(&mut self.open) {
            // If even this fails the connection is broken, and Spin's pool drops broken
            // connections instead of reusing them.
            let _ = self.conn.execute("ROLLBACK", Vec::new());
        }
    }
}

impl<C: Db> Drop for ReadTx<C> {
    fn drop(&mut self) {
        self.rollback();
    }
}

/// Quotes an identifier for SQL. Callers only pass names already validated by
/// [`crate::route::valid_type_name`], so this is belt and braces.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Whether the table named `table` (unquoted; quoted here) exists. Reads the catalog only, so
/// it takes no lock on the table.
pub fn table_exists<C: Db>(conn: &mut C, table: &str) -> Result<bool, DbError> {
    conn.query(
        "SELECT to_regclass($1) IS NOT NULL",
        vec![Param::Str(quote_ident(table))],
    )
    .map(|rows| rows.first_is_true())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_errors_to_statuses() {
        assert_eq!(DbError::Connect("refused".into()).into_api().status, 503);
        let timeout = DbError::Sql {
            code: "57014".into(),
            message: "canceling statement due to statement timeout".into(),
            detail: None,
            position: None,
        };
        assert_eq!(timeout.into_api().status, 504);
        let admin_shutdown = DbError::Sql {
            code: "57P01".into(),
            message: "terminating connection due to administrator command".into(),
            detail: None,
            position: None,
        };
        assert_eq!(admin_shutdown.into_api().status, 503);
        let other = DbError::Sql {
            code: "XX000".into(),
            message: "boom".into(),
            detail: Some("d".into()),
            position: Some("7".into()),
        };
        let api = other.into_api();
        assert_eq!(api.status, 500);
        assert!(api
            .diagnostics
            .contains("boom (SQLSTATE XX000, position 7): d"));
    }

    #[test]
    fn quotes_identifiers() {
        assert_eq!(quote_ident("patient"), "\"patient\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
