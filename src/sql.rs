//! `POST /$dump-sql` (stream one read-only query as TSV, CSV or ndjson, byte-identical to
//! PostgreSQL's `COPY`) and `POST /$sql` (the read-write DB console).
//!
//! # Text conversion: PostgreSQL renders, we only escape
//! Spin hands most types over as `unsupported` bytes and fails a whole query on a bare
//! timestamptz column, so no value of the user's query may reach Spin in its own type. Every
//! row is rendered by PostgreSQL as *one* value (one value per row, not per column:
//! each value crossing the boundary costs a guest allocation and a host call):
//! - TSV / CSV: a `bytea` line built in SQL from each column's own output function (what COPY
//!   writes: timestamptz in the session's TimeZone, bytea as `\x…`, floats with
//!   `extra_float_digits`, bool as `t`, …) as UTF-8, fields split by the byte 0xFF and NULL as
//!   0xFE (bytes UTF-8 never holds); or, for queries with no columns or a pseudo-typed one,
//!   PostgreSQL's record syntax (`ROW(t.*)::text`). [`crate::rowtext`] builds both and turns
//!   them into COPY's TSV or CSV.
//! - ndjson: `SELECT row_to_json(t.*)::text FROM (<query>) t`, PostgreSQL's own JSON, verbatim.
//!
//! Column names (for the header, and the column count, since `()` is both "no columns" and
//! "one NULL column") come from a *describe* query that never runs the user's query:
//! `SELECT row_to_json(x.*)::text FROM (SELECT q.* FROM (SELECT) o LEFT JOIN
//! (SELECT * FROM (<query>) q LIMIT 0) q ON true) x` yields one row `{"a":null,"a":null,…}`:
//! the names in order, duplicates kept (a `LIMIT 0` never pulls a row from its input, and the
//! outer `x` keeps the row from being a NULL composite). Spin's own column metadata can't be
//! used: it comes from the first row, so an empty result has no columns. A second describe of
//! the same kind reads the columns' types and output functions ([`rowtext::types_sql`]).
//!
//! # Parameters are PostgreSQL literals
//! Spin binds typed parameters and converts each value to the type PostgreSQL inferred for
//! `$n`: a JSON string sent as `str` fails for `ts > $1` (timestamptz) or `id = $1` on an
//! int4 column. So parameters are not bound at all: each `$n` outside strings, quoted
//! identifiers, dollar quotes and comments is replaced by an untyped SQL literal of the
//! value's text (`'…'`, or `E'…'` when it holds a backslash; `NULL` for null; numbers keep
//! their JSON text, e.g. `'1.50'`). An untyped literal resolves from context exactly like
//! `'2024-01-01'` typed into psql: `ts > $1`, `id = $1`, `LIMIT $1`, `$1::jsonb` all work.
//! The only difference from a bound parameter: `SELECT $1` alone is `text`. Error positions
//! are mapped back to the caller's query text.
//!
//! # Streaming and the transaction
//! `BEGIN READ ONLY`, describe, `DECLARE … NO SCROLL CURSOR` (planned for all its rows, as
//! COPY's query is: `cursor_tuple_fraction` 1), then `FETCH n` pages (n from the
//! page byte budget, `work_mem` and the row sizes seen; see [`Sizer`]). The first page is
//! fetched before the reply, so every error of the query itself gets a status. The
//! transaction is ended on every path, always by `ROLLBACK` (a read-only export keeps nothing,
//! and the few writes a read-only transaction lets through, such as `lo_creat`, must not
//! last): after the last page, when a page or a body write (client gone) fails, and by a
//! `Drop` guard for anything else — a connection must never go back to Spin's pool inside a
//! transaction (its "Clean" recycling does not roll back).

use crate::config::Config;
use crate::db::{Db, DbError, Param, ReadTx, Rows, Value};
use crate::http::{read_body, Reply, Request};
use crate::outcome::ApiError;
use crate::output::{PagedBody, Pages};
use crate::params::Params;
use crate::rowtext::{self, encode_row, header_line, Format, RowText};
use serde_json::value::RawValue;

/// Largest request body accepted (a query and its parameters).
const MAX_BODY: usize = 16 << 20;
const CURSOR: &str = "spin_bulk_sql";

// ---------------------------------------------------------------------------------------------
// Request body

/// A query and its parameters (`None` = SQL NULL, `Some(text)` = an untyped literal).
#[derive(Debug, Clone, PartialEq)]
pub struct SqlRequest {
    pub query: String,
    pub params: Vec<Option<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum BodyKind {
    Json,
    Yaml,
    Sql,
}

fn body_kind(req: &Request) -> Result<BodyKind, ApiError> {
    let ct = req.header("content-type").unwrap_or("");
    let media = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match media.as_str() {
        "application/json" => Ok(BodyKind::Json),
        "application/yaml" | "text/yaml" | "application/x-yaml" => Ok(BodyKind::Yaml),
        "application/sql" | "text/plain" => Ok(BodyKind::Sql),
        _ => Err(ApiError::new(
            415,
            "not-supported",
            format!(
                "unsupported Content-Type {ct:?}: send application/json ({{\"query\": …, \"params\": […]}}), \
                 application/yaml, or the query itself as application/sql or text/plain"
            ),
        )),
    }
}

/// Reads the body. `allow_array`: the console's `["<statement>", param1, …]` form.
pub fn parse_body(req: &mut Request, allow_array: bool) -> Result<SqlRequest, ApiError> {
    let kind = body_kind(req)?;
    let bytes = read_body(req.body.as_mut(), MAX_BODY)?;
    let parsed = match kind {
        BodyKind::Json => parse_json(&bytes, allow_array)?,
        BodyKind::Yaml => parse_yaml(&bytes, allow_array)?,
        BodyKind::Sql => SqlRequest {
            query: String::from_utf8(bytes)
                .map_err(|_| ApiError::bad_request("the query is not valid UTF-8"))?,
            params: Vec::new(),
        },
    };
    if parsed.query.contains('\0') || parsed.params.iter().flatten().any(|p| p.contains('\0')) {
        return Err(ApiError::bad_request(
            "the query or a parameter contains a NUL character",
        ));
    }
    Ok(parsed)
}

fn bad_json(e: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request(format!("invalid JSON body: {e}"))
}

fn parse_json(bytes: &[u8], allow_array: bool) -> Result<SqlRequest, ApiError> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        query: String,
        #[serde(default)]
        params: Option<Box<RawValue>>,
    }
    let raw: Box<RawValue> = serde_json::from_slice(bytes).map_err(bad_json)?;
    let text = raw.get().trim_start();
    if text.starts_with('[') && allow_array {
        let items: Vec<Box<RawValue>> = serde_json::from_str(text).map_err(bad_json)?;
        let mut it = items.into_iter();
        let query = match it.next() {
            Some(q) => serde_json::from_str::<String>(q.get()).map_err(|_| {
                ApiError::bad_request(
                    "the first element of the array must be the statement (a string)",
                )
            })?,
            None => {
                return Err(ApiError::bad_request(
                    "empty array: expected [\"<statement>\", params…]",
                ))
            }
        };
        let params = it
            .enumerate()
            .map(|(i, p)| json_scalar(&p, i + 1))
            .collect::<Result<_, _>>()?;
        return Ok(SqlRequest { query, params });
    }
    if !text.starts_with('{') {
        return Err(ApiError::bad_request(if allow_array {
            "expected a JSON object {\"query\": …, \"params\": […]} or an array [\"<statement>\", params…]"
        } else {
            "expected a JSON object {\"query\": …, \"params\": […]}"
        }));
    }
    let body: Body = serde_json::from_str(text).map_err(bad_json)?;
    let params = match body.params {
        None => Vec::new(),
        Some(raw) => {
            let list: Vec<Box<RawValue>> = serde_json::from_str(raw.get()).map_err(|_| {
                ApiError::bad_request("params must be a list").with_expression("params")
            })?;
            list.iter()
                .enumerate()
                .map(|(i, p)| json_scalar(p, i + 1))
                .collect::<Result<_, _>>()?
        }
    };
    Ok(SqlRequest {
        query: body.query,
        params,
    })
}

/// A JSON parameter as literal text. Numbers keep their exact JSON spelling (`1.50`, big
/// integers), which a parsed number would lose.
fn json_scalar(raw: &RawValue, n: usize) -> Result<Option<String>, ApiError> {
    let t = raw.get().trim();
    match t.as_bytes().first() {
        Some(b'"') => serde_json::from_str::<String>(t)
            .map(Some)
            .map_err(bad_json),
        Some(b'n') => Ok(None),
        Some(b't' | b'f' | b'-' | b'0'..=b'9') => Ok(Some(t.to_string())),
        _ => Err(not_scalar(n)),
    }
}

fn not_scalar(n: usize) -> ApiError {
    ApiError::bad_request(format!(
        "parameter ${n} must be a string, number, boolean or null"
    ))
    .with_expression("params")
}

fn parse_yaml(bytes: &[u8], allow_array: bool) -> Result<SqlRequest, ApiError> {
    use serde_norway::Value as Y;
    let bad = |e: &dyn std::fmt::Display| ApiError::bad_request(format!("invalid YAML body: {e}"));
    let doc: Y = serde_norway::from_slice(bytes).map_err(|e| bad(&e))?;
    let scalar = |v: &Y, n: usize| -> Result<Option<String>, ApiError> {
        match v {
            Y::Null => Ok(None),
            Y::Bool(b) => Ok(Some(b.to_string())),
            Y::Number(x) => Ok(Some(x.to_string())),
            Y::String(s) => Ok(Some(s.clone())),
            _ => Err(not_scalar(n)),
        }
    };
    let query_of = |v: &Y| -> Result<String, ApiError> {
        match v {
            Y::String(s) => Ok(s.clone()),
            _ => Err(ApiError::bad_request("query must be a string").with_expression("query")),
        }
    };
    match doc {
        Y::Mapping(m) => {
            let mut query = None;
            let mut params = Vec::new();
            for (k, v) in &m {
                match k.as_str() {
                    Some("query") => query = Some(query_of(v)?),
                    Some("params") => match v {
                        Y::Sequence(list) => {
                            params = list
                                .iter()
                                .enumerate()
                                .map(|(i, p)| scalar(p, i + 1))
                                .collect::<Result<_, _>>()?
                        }
                        Y::Null => {}
                        _ => {
                            return Err(ApiError::bad_request("params must be a list")
                                .with_expression("params"))
                        }
                    },
                    _ => {
                        return Err(ApiError::bad_request(format!(
                            "unknown field {k:?}: expected query and params"
                        )))
                    }
                }
            }
            let query = query.ok_or_else(|| ApiError::bad_request("missing field query"))?;
            Ok(SqlRequest { query, params })
        }
        Y::Sequence(list) if allow_array => {
            let query = list
                .first()
                .ok_or_else(|| ApiError::bad_request("empty list: expected [statement, params…]"))
                .and_then(query_of)?;
            let params = list[1..]
                .iter()
                .enumerate()
                .map(|(i, p)| scalar(p, i + 1))
                .collect::<Result<_, _>>()?;
            Ok(SqlRequest { query, params })
        }
        _ => Err(ApiError::bad_request(
            "expected a mapping with query and params",
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// Scanning the query: one statement, parameters, top-level words

/// The caller's statement, ready to be wrapped: trailing `;` and comments removed, parameters
/// replaced by literals, with what it takes to map PostgreSQL's error positions back.
#[derive(Debug)]
pub struct Statement {
    /// The statement with parameters substituted.
    pub sql: String,
    /// Unquoted words outside strings/comments, lower-cased, with their paren depth.
    words: Vec<(u32, String)>,
    /// (char offset in `sql`, chars in `sql`, char offset in the original, chars in the
    /// original) for each substitution, in order.
    subs: Vec<(usize, usize, usize, usize)>,
}

fn is_ident_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b >= 0x80
}

fn is_ident_char(b: u8) -> bool {
    is_ident_start(b) || b.is_ascii_digit() || b == b'$'
}

fn bad_query(msg: impl Into<String>) -> ApiError {
    ApiError::bad_request(msg).with_expression("query")
}

/// Lexes just enough of PostgreSQL's syntax (with `standard_conforming_strings` on, the
/// default since 9.1) to find parameters, statement ends and keywords outside literals.
pub fn scan(query: &str, params: &[Option<String>]) -> Result<Statement, ApiError> {
    let b = query.as_bytes();
    let mut i = 0;
    let mut depth: u32 = 0;
    let mut end = None; // byte offset of the first top-level `;`
    let mut after_end = false; // anything but comments / white space / `;` after it
    let mut significant = false;
    let mut found: Vec<(usize, usize, usize)> = Vec::new(); // (start, end, n) of `$n`
    let mut words = Vec::new();
    while i < b.len() {
        let c = b[i];
        let start = i;
        match c {
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let mut nest = 0;
                while i < b.len() {
                    if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                        nest += 1;
                        i += 2;
                    } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                        nest -= 1;
                        i += 2;
                        if nest == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
                if nest != 0 {
                    return Err(bad_query("unterminated /* comment in the query"));
                }
                continue;
            }
            c if c.is_ascii_whitespace() => {
                i += 1;
                continue;
            }
            b';' => {
                if end.is_none() {
                    end = Some(i);
                }
                i += 1;
                continue;
            }
            _ => {}
        }
        if end.is_some() {
            after_end = true;
            break;
        }
        significant = true;
        match c {
            b'\'' => i = skip_string(b, i, false)?,
            b'"' => {
                i += 1;
                loop {
                    match b.get(i) {
                        None => {
                            return Err(bad_query("unterminated quoted identifier in the query"))
                        }
                        Some(b'"') if b.get(i + 1) == Some(&b'"') => i += 2,
                        Some(b'"') => {
                            i += 1;
                            break;
                        }
                        _ => i += 1,
                    }
                }
            }
            b'$' => {
                let mut j = i + 1;
                if b.get(j).is_some_and(u8::is_ascii_digit) {
                    while b.get(j).is_some_and(u8::is_ascii_digit) {
                        j += 1;
                    }
                    let n = query[i + 1..j].parse::<usize>().unwrap_or(usize::MAX);
                    found.push((i, j, n));
                    i = j;
                } else {
                    // A dollar quote `$tag$ … $tag$`, or a lone `$`.
                    while b.get(j).is_some_and(|&x| is_ident_char(x) && x != b'$') {
                        j += 1;
                    }
                    let tag_ok =
                        b.get(j) == Some(&b'$') && (j == i + 1 || !b[i + 1].is_ascii_digit());
                    if tag_ok {
                        let tag = &query[i..=j];
                        match query[j + 1..].find(tag) {
                            Some(k) => i = j + 1 + k + tag.len(),
                            None => {
                                return Err(bad_query(
                                    "unterminated dollar-quoted string in the query",
                                ))
                            }
                        }
                    } else {
                        i += 1;
                    }
                }
            }
            b'(' => {
                depth += 1;
                i += 1;
            }
            b')' => {
                depth = depth.saturating_sub(1);
                i += 1;
            }
            c if is_ident_start(c) => {
                while i < b.len() && is_ident_char(b[i]) {
                    i += 1;
                }
                let word = &query[start..i];
                // E'…' takes backslash escapes; U&'…', B'…', X'…' are ordinary quotes.
                if b.get(i) == Some(&b'\'') && word.eq_ignore_ascii_case("e") {
                    i = skip_string(b, i, true)?;
                } else {
                    words.push((depth, word.to_ascii_lowercase()));
                }
            }
            c if c.is_ascii_digit() => {
                // Numbers (1e5, 0x1F, 1_000): never followed by a parameter or a string.
                while i < b.len() && (is_ident_char(b[i]) || b[i] == b'.') && b[i] != b'$' {
                    i += 1;
                }
            }
            _ => i += 1,
        }
    }
    if after_end {
        return Err(bad_query(
            "only one statement is allowed: the query has text after a `;`",
        ));
    }
    if !significant {
        return Err(bad_query("the query is empty"));
    }
    let stmt = &query[..end.unwrap_or(query.len())];
    let stmt = stmt.trim_end();
    // Substitute parameters.
    let mut used = vec![false; params.len()];
    let mut sql = String::with_capacity(
        stmt.len() + params.iter().flatten().map(|p| p.len() + 4).sum::<usize>(),
    );
    let mut subs = Vec::new();
    let (mut last, mut new_chars, mut orig_chars) = (0usize, 0usize, 0usize);
    for &(s, e, n) in &found {
        if s >= stmt.len() {
            break;
        }
        let Some(value) = n.checked_sub(1).and_then(|k| params.get(k)) else {
            if params.is_empty() {
                return Err(bad_query(format!(
                    "the query uses ${n} but no params were given"
                )));
            }
            return Err(bad_query(format!(
                "the query uses ${n} but only {} params were given",
                params.len()
            )));
        };
        used[n - 1] = true;
        let before = &stmt[last..s];
        sql.push_str(before);
        let k = before.chars().count();
        new_chars += k;
        orig_chars += k;
        let lit = literal(value.as_deref());
        let lit_chars = lit.chars().count();
        subs.push((new_chars, lit_chars, orig_chars, e - s));
        sql.push_str(&lit);
        new_chars += lit_chars;
        orig_chars += e - s;
        last = e;
    }
    sql.push_str(&stmt[last..]);
    if let Some(k) = used.iter().position(|u| !u) {
        return Err(ApiError::bad_request(format!(
            "parameter ${} is given but the query does not use it",
            k + 1
        ))
        .with_expression("params"));
    }
    Ok(Statement { sql, words, subs })
}

/// Skips a string literal starting at the quote `b[i]`; returns the offset after it.
fn skip_string(b: &[u8], mut i: usize, backslashes: bool) -> Result<usize, ApiError> {
    i += 1;
    loop {
        match b.get(i) {
            None => return Err(bad_query("unterminated string literal in the query")),
            Some(b'\\') if backslashes => i += 2,
            Some(b'\'') if b.get(i + 1) == Some(&b'\'') => i += 2,
            Some(b'\'') => return Ok(i + 1),
            _ => i += 1,
        }
    }
}

/// An untyped SQL literal. A plain `'…'` is the same whatever `standard_conforming_strings`
/// says as long as it holds no backslash; with one, `E'…'` (escapes always on) keeps it safe.
fn literal(v: Option<&str>) -> String {
    let Some(v) = v else {
        return "NULL".to_string();
    };
    let mut s = String::with_capacity(v.len() + 3);
    if v.contains('\\') {
        s.push('E');
    }
    s.push('\'');
    for ch in v.chars() {
        match ch {
            '\'' => s.push_str("''"),
            '\\' => s.push_str("\\\\"),
            c => s.push(c),
        }
    }
    s.push('\'');
    s
}

impl Statement {
    /// Maps a PostgreSQL error position (1-based chars in the statement sent, which had
    /// `prefix_chars` of our own text before the caller's) to the caller's query.
    fn original_position(&self, pos: &str, prefix_chars: usize) -> Option<usize> {
        let p: usize = pos.trim().split(' ').next()?.parse().ok()?;
        let off = p.checked_sub(prefix_chars + 1)?; // 0-based char offset in `sql`
        if off >= self.sql.chars().count() {
            // In our closing text: the caller's query ended too early ("select 1 +"), so
            // point just past its end, as PostgreSQL would for the query alone.
            let last = self.subs.last().map_or(0, |s| s.2 + s.3);
            let tail = self.sql.chars().count() - self.subs.last().map_or(0, |s| s.0 + s.1);
            return Some(last + tail + 1);
        }
        let mut delta: isize = 0;
        for &(new_at, new_len, orig_at, orig_len) in &self.subs {
            if off < new_at {
                break;
            }
            if off < new_at + new_len {
                return Some(orig_at + 1);
            }
            delta = orig_at as isize + orig_len as isize - (new_at + new_len) as isize;
        }
        Some((off as isize + delta) as usize + 1)
    }

    /// What PostgreSQL said, as an answer before the first byte: the caller's mistakes
    /// (syntax, unknown names, bad values, writes in a read-only transaction) are 4xx with
    /// PostgreSQL's message, SQLSTATE and position in the caller's query.
    fn error(&self, e: DbError, prefix_chars: usize) -> ApiError {
        let DbError::Sql {
            code,
            message,
            detail,
            position,
        } = e
        else {
            return e.into_api();
        };
        let position = position
            .as_deref()
            .and_then(|p| self.original_position(p, prefix_chars))
            .map(|p| p.to_string());
        let e = DbError::Sql {
            code,
            message,
            detail,
            position,
        };
        let code = e.sqlstate().unwrap_or("");
        let status = match code {
            // Read-only transaction, an attempt to leave it (`set_config('transaction_read_only',
            // 'off', …)`), insufficient privilege.
            "25006" | "25001" | "42501" => 403,
            _ if e.is_connection() || code == "57014" => return e.into_api(),
            // Feature not supported, cardinality, data exception, integrity, cursor state,
            // invalid names, syntax or access rule, WITH CHECK, PL/pgSQL raise.
            _ if [
                "0A", "21", "22", "23", "24", "26", "34", "3F", "42", "44", "P0",
            ]
            .iter()
            .any(|c| code.starts_with(c)) =>
            {
                400
            }
            _ => return e.into_api(),
        };
        let mut api = ApiError::new(
            status,
            if status == 403 {
                "forbidden"
            } else {
                "invalid"
            },
            e.message(),
        )
        .with_expression("query");
        if let DbError::Sql {
            position: Some(p), ..
        } = &e
        {
            api = api.with_expression(format!("position {p}"));
        }
        api
    }
}

/// Column names in order, duplicates kept, from the describe query's `{"a":null,…}`.
fn object_keys(json: &str) -> Result<Vec<String>, String> {
    struct Keys(Vec<String>);
    impl<'de> serde::Deserialize<'de> for Keys {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> serde::de::Visitor<'de> for V {
                type Value = Keys;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a JSON object")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut m: A,
                ) -> Result<Keys, A::Error> {
                    let mut keys = Vec::new();
                    while let Some(k) = m.next_key::<String>()? {
                        m.next_value::<serde::de::IgnoredAny>()?;
                        keys.push(k);
                    }
                    Ok(Keys(keys))
                }
            }
            d.deserialize_map(V)
        }
    }
    serde_json::from_str::<Keys>(json)
        .map(|k| k.0)
        .map_err(|e| format!("unexpected column description from PostgreSQL: {e}"))
}

// ---------------------------------------------------------------------------------------------
// $dump-sql

/// Rows per FETCH. A FETCH can't be bounded by bytes, so: start at one row and grow at most
/// 8× per page (an unknown result may hold 10 MB values), aim at `page_bytes` from the average
/// row size, and never ask for more rows than `SAFE_BYTES` of the largest row seen, which keeps
/// a page far below Spin's 128 MiB result cap unless rows suddenly grow by more than that margin
/// (then the query fails and the body aborts; it never truncates silently).
///
/// A page must also fit in `work_mem`: FETCH is a utility statement, and PostgreSQL runs it
/// into a tuple store before sending a row (see `pg_tuple_bytes`); past `work_mem` that store
/// moves to a temporary file, and every row is written out and read back. With the default
/// 4 MB `work_mem` and 4 MiB pages of short rows, about half of every page took that detour
/// (`BufFileWrite`/`BufFileRead` and their system calls were ~8% of the backend's profile).
struct Sizer {
    budget: u64,
    /// The session's `work_mem` in bytes.
    work_mem: u64,
    last: u64,
    rows: u64,
    bytes: u64,
    max_row: u64,
}

const SAFE_BYTES: u64 = 32 << 20;
const MAX_FETCH_ROWS: u64 = 50_000;
const MIN_ROW_COST: u64 = 16;

/// The memory a FETCH's tuple store charges for a row of `bytes` (its one value): PostgreSQL
/// 15 stores it as a minimal tuple (a 16-byte header and the value's 4-byte length before the
/// data) in a chunk rounded up to a power of two below 8 KiB, plus the chunk's 16-byte header
/// and an 8-byte slot in the store's array. Rounding at most doubles a chunk; counting it
/// always is the safe side.
fn pg_tuple_bytes(bytes: u64) -> u64 {
    2 * (bytes + 20) + 24
}

impl Sizer {
    fn new(budget: u64, work_mem: u64) -> Sizer {
        Sizer {
            budget,
            work_mem,
            last: 0,
            rows: 0,
            bytes: 0,
            max_row: 0,
        }
    }

    fn next(&self) -> u64 {
        if self.rows == 0 {
            return 1;
        }
        let avg = (self.bytes / self.rows).max(MIN_ROW_COST);
        (self.budget / avg)
            .min(self.work_mem / pg_tuple_bytes(avg))
            .min(SAFE_BYTES / self.max_row.max(1))
            .min(self.last.saturating_mul(8))
            .clamp(1, MAX_FETCH_ROWS)
    }

    fn saw(&mut self, asked: u64, rows: u64, bytes: u64, max_row: u64) {
        self.last = asked;
        self.rows += rows;
        self.bytes += bytes;
        self.max_row = self.max_row.max(max_row);
    }
}

struct Pager<C: Db> {
    tx: ReadTx<C>,
    format: Format,
    shape: RowText,
    ncols: usize,
    sizer: Sizer,
    /// `statement_timeout_ms`, set again before every FETCH after the first.
    timeout_ms: String,
    scratch: Vec<u8>,
    done: bool,
}

impl<C: Db> Pager<C> {
    /// Fetches the next page into `buf`. `Ok(false)` when the cursor is exhausted.
    fn next_page(&mut self, buf: &mut Vec<u8>) -> Result<(), PageError> {
        if self.done {
            return Ok(());
        }
        if self.sizer.rows > 0 {
            // The statement timeout bounds every FETCH, even after the query itself turned it
            // off for the session (`set_config('statement_timeout', '0', false)` in a row of
            // an earlier page): a FETCH's timer starts from the setting as it is then.
            self.tx
                .conn
                .execute(
                    "SELECT pg_catalog.set_config('statement_timeout', $1, true)",
                    vec![Param::Str(self.timeout_ms.clone())],
                )
                .map_err(PageError::Db)?;
        }
        let n = self.sizer.next();
        let rows = self
            .tx
            .conn
            .query(&format!("FETCH {n} FROM {CURSOR}"), Vec::new())
            .map_err(PageError::Db)?
            .rows;
        let (mut bytes, mut max_row) = (0u64, 0u64);
        for row in &rows {
            // A line is bytea, a record or JSON text.
            let text = match row.first() {
                Some(Value::Bytes(b)) => b.as_slice(),
                Some(Value::Str(t)) => t.as_bytes(),
                _ => {
                    return Err(PageError::Shape(
                        "unexpected row shape from the cursor".into(),
                    ))
                }
            };
            bytes += text.len() as u64;
            max_row = max_row.max(text.len() as u64);
            encode_row(
                buf,
                self.format,
                self.shape,
                self.ncols,
                text,
                &mut self.scratch,
            )
            .map_err(PageError::Shape)?;
        }
        self.sizer.saw(n, rows.len() as u64, bytes, max_row);
        if (rows.len() as u64) < n {
            self.done = true;
        }
        Ok(())
    }
}

enum PageError {
    Db(DbError),
    Shape(String),
}

impl PageError {
    fn message(&self) -> String {
        match self {
            PageError::Db(e) => e.message(),
            PageError::Shape(m) => m.clone(),
        }
    }
}

struct Options {
    format: Format,
    header: bool,
    gzip: bool,
}

fn options(req: &Request) -> Result<Options, ApiError> {
    let mut p = Params::parse(&req.query)?;
    let format = match p.take("_format")?.as_deref() {
        None | Some("tsv") => Format::Tsv,
        Some("csv") => Format::Csv,
        Some("ndjson") => Format::Ndjson,
        Some(other) => {
            return Err(crate::params::invalid(
                "_format",
                other,
                "expected tsv, csv or ndjson",
            ))
        }
    };
    let header = p.take_bool("header")?;
    if format == Format::Ndjson && header == Some(true) {
        return Err(
            ApiError::bad_request("header=true does not apply to ndjson").with_expression("header"),
        );
    }
    let gzip = p.take_bool("gzip")?.unwrap_or(false) || req.accepts_gzip();
    p.finish()?;
    Ok(Options {
        format,
        header: header.unwrap_or(format == Format::Csv),
        gzip,
    })
}

pub fn dump_sql<C: Db + 'static>(
    conn: C,
    req: &mut Request,
    cfg: &Config,
) -> Result<Reply, ApiError> {
    let opts = options(req)?;
    let body = parse_body(req, false)?;
    let stmt = scan(&body.query, &body.params)?;

    let mut tx = ReadTx::new(conn);
    tx.begin("BEGIN TRANSACTION READ ONLY")
        .map_err(DbError::into_api)?;
    // One round trip: read `work_mem` for the sizer, and plan the cursor for all its rows.
    // PostgreSQL plans a cursor for its first `cursor_tuple_fraction` (10%) of rows, picking
    // fast-start plans: `ORDER BY id` over a 1M-row table became an index scan in id order
    // (random heap reads) instead of a scan and a sort, and its FETCH loop took 3.9–6.9 s
    // instead of 2.9–3.1 s. A dump reads every row, as COPY does: plan it like COPY's query.
    let work_mem = tx
        .conn
        .query(
            "SELECT pg_catalog.pg_size_bytes(pg_catalog.current_setting('work_mem')), \
             pg_catalog.set_config('cursor_tuple_fraction', '1', true)",
            Vec::new(),
        )
        .map_err(DbError::into_api)?
        .rows
        .first()
        .and_then(|r| r.first()?.as_i64())
        .ok_or_else(|| ApiError::internal("reading work_mem returned no number"))?;
    let mut names = Vec::new();
    if opts.format != Format::Ndjson {
        let prefix = "SELECT row_to_json(x.*)::text FROM (SELECT q.* FROM (SELECT) o LEFT JOIN \
                      (SELECT * FROM (\n";
        let sql = format!("{prefix}{}\n) q LIMIT 0) q ON true) x", stmt.sql);
        let rows = tx
            .conn
            .query(&sql, Vec::new())
            .map_err(|e| stmt.error(e, prefix.chars().count()))?;
        let desc = single_text(&rows)
            .ok_or_else(|| ApiError::internal("describing the query returned no row"))?;
        names = object_keys(desc).map_err(ApiError::internal)?;
    }
    let (sql, prefix, shape) = cursor_sql(&mut tx.conn, &stmt, opts.format, names.len())?;
    tx.conn
        .execute(&sql, Vec::new())
        .map_err(|e| stmt.error(e, prefix.chars().count()))?;

    let mut pager = Pager {
        tx,
        format: opts.format,
        shape,
        ncols: names.len(),
        sizer: Sizer::new(cfg.page_bytes, work_mem.max(0) as u64),
        timeout_ms: cfg.statement_timeout_ms.to_string(),
        scratch: Vec::new(),
        done: false,
    };
    let mut first = Vec::new();
    if opts.header {
        header_line(&mut first, opts.format, &names);
    }
    // Errors raised while running the query (division by zero, a bad cast, nextval in a
    // read-only transaction, the timeout) surface here, still before the first byte.
    pager.next_page(&mut first).map_err(|e| match e {
        PageError::Db(e) => stmt.error(e, prefix.chars().count()),
        PageError::Shape(m) => ApiError::internal(m),
    })?;
    if pager.done {
        // Everything is in hand: end the transaction now rather than after the client read.
        pager.tx.end().map_err(DbError::into_api)?;
    }

    Ok(PagedBody::reply(
        pager,
        first,
        opts.format.content_type(),
        opts.gzip,
    ))
}

/// The cursor's `DECLARE`, the text before the caller's query in it (for error positions), and
/// the shape of its one value per row (see `rowtext`): a line made from each column's output
/// function when the column types allow it (asking PostgreSQL for them), else PostgreSQL's
/// record syntax; ndjson is `row_to_json`.
fn cursor_sql<C: Db>(
    conn: &mut C,
    stmt: &Statement,
    format: Format,
    ncols: usize,
) -> Result<(String, String, RowText), ApiError> {
    let declare = format!("DECLARE {CURSOR} NO SCROLL CURSOR FOR SELECT");
    let around = |select: &str| {
        let prefix = format!("{declare} {select} FROM (\n");
        (format!("{prefix}{}\n) t", stmt.sql), prefix)
    };
    if format == Format::Ndjson {
        let (sql, prefix) = around("row_to_json(t.*)::text");
        return Ok((sql, prefix, RowText::Record));
    }
    let line = if ncols == 0 {
        None
    } else {
        let (sql, prefix) = rowtext::types_sql(&stmt.sql, ncols);
        let rows = conn
            .query(&sql, Vec::new())
            .map_err(|e| stmt.error(e, prefix.chars().count()))?;
        let desc = single_text(&rows)
            .ok_or_else(|| ApiError::internal("describing the columns returned no row"))?;
        let described = rowtext::parse_types(desc, ncols).map_err(ApiError::internal)?;
        rowtext::line_select(&described)
    };
    Ok(match line {
        Some(select) => {
            let head = format!("{declare} {select} FROM ");
            let (sql, prefix) = rowtext::positional(&head, &stmt.sql, ncols, "");
            (sql, prefix, RowText::Line)
        }
        None => {
            let (sql, prefix) = around("ROW(t.*)::text");
            (sql, prefix, RowText::Record)
        }
    })
}

fn single_text(rows: &Rows) -> Option<&str> {
    rows.rows.first()?.first()?.as_str()
}

impl<C: Db> Pages for Pager<C> {
    fn done(&self) -> bool {
        self.done
    }

    fn next_page(&mut self, buf: &mut Vec<u8>) -> Result<(), String> {
        Pager::next_page(self, buf)
            .map_err(|e| format!("$dump-sql failed mid-stream: {}", e.message()))
    }

    fn finish(&mut self) -> Result<(), String> {
        if self.tx.is_open() {
            self.tx
                .end()
                .map_err(|e| format!("$dump-sql: ending the transaction failed: {e}"))?;
        }
        Ok(())
    }

    fn abort(&mut self) {
        self.tx.rollback();
    }
}

// ---------------------------------------------------------------------------------------------
// $sql console

/// How the console runs a statement.
#[derive(Debug, PartialEq, Eq)]
enum Kind {
    /// SELECT / VALUES / TABLE (with or without WITH): wrapped as a subquery.
    Query,
    /// INSERT / UPDATE / DELETE / MERGE … RETURNING: wrapped as a CTE.
    Returning,
    /// SHOW / EXPLAIN: rows of plain text types, run as they are.
    Plain,
    /// Anything else: `execute`, answering the number of rows affected.
    Command,
}

/// Classifies by the words outside literals: the first word, and for WITH the first
/// top-level statement keyword after the CTEs. A SELECT with a top-level INTO creates a
/// table (a command).
fn kind(stmt: &Statement) -> Kind {
    const MAIN: [&str; 7] = [
        "select", "values", "table", "insert", "update", "delete", "merge",
    ];
    let Some((base, first)) = stmt.words.first() else {
        return Kind::Command;
    };
    let top = || {
        stmt.words
            .iter()
            .filter(|(d, _)| d == base)
            .map(|(_, w)| w.as_str())
    };
    let main = if first == "with" {
        top().find(|w| MAIN.contains(w)).unwrap_or("")
    } else {
        first.as_str()
    };
    match main {
        "select" if top().any(|w| w == "into") => Kind::Command,
        "select" | "values" | "table" => Kind::Query,
        "insert" | "update" | "delete" | "merge" if top().any(|w| w == "returning") => {
            Kind::Returning
        }
        "show" | "explain" => Kind::Plain,
        _ => Kind::Command,
    }
}

pub fn console<C: Db>(conn: &mut C, req: &mut Request) -> Result<Reply, ApiError> {
    Params::parse(&req.query)?.finish()?;
    let body = parse_body(req, true)?;
    let stmt = scan(&body.query, &body.params)?;
    let wrap = |prefix: &str, suffix: &str| {
        (
            prefix.chars().count(),
            format!("{prefix}{}{suffix}", stmt.sql),
        )
    };
    match kind(&stmt) {
        k @ (Kind::Query | Kind::Returning) => {
            let (prefix_chars, sql) = if k == Kind::Query {
                wrap("SELECT row_to_json(t.*)::text FROM (\n", "\n) t")
            } else {
                wrap("WITH t AS (\n", "\n) SELECT row_to_json(t.*)::text FROM t")
            };
            let rows = conn
                .query(&sql, Vec::new())
                .map_err(|e| stmt.error(e, prefix_chars))?;
            let mut body = Vec::with_capacity(
                2 + rows
                    .rows
                    .iter()
                    .map(|r| r.first().and_then(Value::as_str).map_or(4, |s| s.len() + 1))
                    .sum::<usize>(),
            );
            body.push(b'[');
            for (i, row) in rows.rows.iter().enumerate() {
                if i > 0 {
                    body.push(b',');
                }
                let text = row
                    .first()
                    .and_then(Value::as_str)
                    .ok_or_else(|| ApiError::internal("unexpected row shape"))?;
                body.extend_from_slice(text.as_bytes());
            }
            body.push(b']');
            Ok(Reply::Full {
                status: 200,
                headers: vec![("content-type".into(), "application/json".into())],
                body,
            })
        }
        Kind::Plain => {
            let rows = conn
                .query(&stmt.sql, Vec::new())
                .map_err(|e| stmt.error(e, 0))?;
            let list: Vec<serde_json::Value> = rows
                .rows
                .iter()
                .map(|row| {
                    let mut obj = serde_json::Map::new();
                    for (c, v) in rows.columns.iter().zip(row) {
                        obj.insert(c.name.clone(), plain_json(v));
                    }
                    serde_json::Value::Object(obj)
                })
                .collect();
            Ok(Reply::json(200, &serde_json::Value::Array(list)))
        }
        Kind::Command => {
            let n = conn
                .execute(&stmt.sql, Vec::new())
                .map_err(|e| stmt.error(e, 0))?;
            Ok(Reply::json(200, &serde_json::json!({ "rowsAffected": n })))
        }
    }
}

/// A value of SHOW / EXPLAIN output (text, or json for EXPLAIN's JSON format).
fn plain_json(v: &Value) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        Value::Null | Value::Other | Value::DateTime(_) => J::Null,
        Value::Bool(b) => J::Bool(*b),
        Value::Int(i) => J::from(*i),
        Value::Float(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
        Value::Str(s) => J::String(s.clone()),
        Value::Bytes(b) => {
            let s = String::from_utf8_lossy(b);
            serde_json::from_str(&s).unwrap_or_else(|_| J::String(s.into_owned()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(q: &str, p: &[Option<&str>]) -> Result<Statement, ApiError> {
        let p: Vec<Option<String>> = p.iter().map(|x| x.map(str::to_string)).collect();
        scan(q, &p)
    }

    #[test]
    fn substitutes_parameters_outside_literals() {
        let st = s(
            "select $1, '$1', \"$1\", $$ $1 $$, $t$ $1 $t$, e'\\' $1', a$1, -- $1\n /* $1 /* */ */ $2 ;  -- end",
            &[Some("it's"), Some("a\\b")],
        )
        .unwrap();
        assert_eq!(
            st.sql,
            "select 'it''s', '$1', \"$1\", $$ $1 $$, $t$ $1 $t$, e'\\' $1', a$1, -- $1\n /* $1 /* */ */ E'a\\\\b'"
        );
        assert_eq!(s("select $1", &[None]).unwrap().sql, "select NULL");
    }

    #[test]
    fn refuses_bad_statements() {
        for (q, p, want) in [
            ("select 1; select 2", vec![], "one statement"),
            ("  -- nothing\n ;", vec![], "empty"),
            ("select $2", vec![Some("a")], "only 1"),
            ("select $1", vec![], "no params"),
            ("select 1", vec![Some("a")], "does not use"),
            ("select 'abc", vec![], "unterminated"),
        ] {
            let e = s(q, &p).unwrap_err();
            assert_eq!(e.status, 400);
            assert!(e.diagnostics.contains(want), "{q}: {}", e.diagnostics);
        }
        assert_eq!(s("select 1;;  ", &[]).unwrap().sql, "select 1");
    }

    #[test]
    fn maps_positions_back() {
        let st = s("select $1 + x, $2 / y", &[Some("12345"), None]).unwrap();
        assert_eq!(st.sql, "select '12345' + x, NULL / y");
        // "x" in the substituted text is char 18 (1-based); in the original, 13.
        assert_eq!(st.original_position("18", 0), Some(13));
        assert_eq!(st.original_position("28", 10), Some(13));
        // Inside a literal → the `$n`.
        assert_eq!(st.original_position("9", 0), Some(8));
        // "y" after NULL: substituted 28, original 21.
        assert_eq!(st.original_position("28", 0), Some(21));
        // In our own wrapper text: no position before the query, its end after it.
        assert_eq!(st.original_position("3", 5), None);
        assert_eq!(st.original_position("40", 5), Some(22));
    }

    #[test]
    fn sizes_fetches() {
        // work_mem large enough not to matter here.
        let mut z = Sizer::new(4 << 20, 1 << 30);
        assert_eq!(z.next(), 1);
        z.saw(1, 1, 40, 40);
        assert_eq!(z.next(), 8);
        z.saw(8, 8, 320, 40);
        z.saw(64, 64, 64 * 40, 40);
        z.saw(512, 512, 512 * 40, 40);
        z.saw(4096, 4096, 4096 * 40, 40);
        assert_eq!(z.next(), 32768);
        z.saw(32768, 32768, 32768 * 40, 40);
        assert_eq!(z.next(), MAX_FETCH_ROWS);
        // The default 4 MB work_mem bounds a page of 84-byte rows (the bench's) to what its
        // tuple store holds in memory: 4 MiB / 232 bytes per row.
        let mut w = Sizer::new(4 << 20, 4 << 20);
        w.saw(4096, 4096, 4096 * 84, 84);
        assert_eq!(w.next(), (4 << 20) / 232);
        let mut big = Sizer::new(4 << 20, 4 << 20);
        big.saw(1, 1, 10 << 20, 10 << 20);
        assert_eq!(big.next(), 1);
    }

    #[test]
    fn classifies_console_statements() {
        let k = |q: &str| kind(&s(q, &[]).unwrap());
        assert_eq!(k("SELECT count(*) FROM patient"), Kind::Query);
        assert_eq!(k("(select 1)"), Kind::Query);
        assert_eq!(k("values (1)"), Kind::Query);
        assert_eq!(
            k("with a as (insert into x values (1) returning *) select * from a"),
            Kind::Query
        );
        assert_eq!(
            k("with a as (select 1) insert into x select * from a"),
            Kind::Command
        );
        assert_eq!(
            k("with a as (select 1) insert into x select * from a returning id"),
            Kind::Returning
        );
        assert_eq!(
            k("insert into patient (id) select 'returning' from x"),
            Kind::Command
        );
        assert_eq!(k("delete from x returning *"), Kind::Returning);
        assert_eq!(k("select * into y from x"), Kind::Command);
        assert_eq!(k("TRUNCATE patient"), Kind::Command);
        assert_eq!(k("show timezone"), Kind::Plain);
    }

    #[test]
    fn parses_bodies() {
        let j = parse_json(
            br#"{"query": "select $1, $2, $3, $4", "params": ["a", 1.50, true, null]}"#,
            false,
        )
        .unwrap();
        assert_eq!(
            j.params,
            vec![
                Some("a".into()),
                Some("1.50".into()),
                Some("true".into()),
                None
            ]
        );
        assert!(parse_json(br#"{"query": "x", "params": [[1]]}"#, false).is_err());
        assert!(parse_json(br#"{"query": "x", "params": 1}"#, false).is_err());
        assert!(parse_json(br#"{"query": "x", "other": 1}"#, false).is_err());
        assert!(parse_json(br#"["select 1"]"#, false).is_err());
        let a = parse_json(br#"["select $1", "x"]"#, true).unwrap();
        assert_eq!(a.query, "select $1");
        let y = parse_yaml(b"query: select id from patient\nparams: [a, 2]\n", false).unwrap();
        assert_eq!(y.query, "select id from patient");
        assert_eq!(y.params, vec![Some("a".into()), Some("2".into())]);
        assert!(parse_yaml(b"query: [1\n", false).is_err());
    }

    #[test]
    fn keys_keep_duplicates_in_order() {
        assert_eq!(
            object_keys(r#"{"b":null,"a":null,"b":null,"":null}"#).unwrap(),
            vec!["b", "a", "b", ""]
        );
        assert!(object_keys("{}").unwrap().is_empty());
    }
}
