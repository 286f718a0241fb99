//! `GET /{Type}/$dump`: every resource of a type as ndjson, streamed page by page.
//!
//! Pages use keyset pagination on the primary key (`id > $last ORDER BY id LIMIT n`): each
//! page is one indexed range scan wherever the dump is, unlike OFFSET, and needs no server-side
//! state between queries. A page is bounded twice:
//! - by rows (`LIMIT n`, with `n` adapted from the sizes seen so far), and
//! - by bytes, inside the query: a running `sum(pg_column_size(resource))` keeps only the rows
//!   that start within the page budget. This holds even when sizes jump (a run of 5 MB
//!   resources after tiny ones), so a result never nears Spin's 128 MiB cap, and the first row
//!   always passes, so a single resource larger than the budget still goes out.
//!
//! The page comes back as ONE row: the lines of the rows that start within the budget,
//! concatenated by PostgreSQL, plus the window's row count and "was it cut by bytes". A cut window
//! or a full `LIMIT` window means there may be more; anything else is the end — no extra query
//! to find out.
//!
//! The first page is read before the response starts, so a missing table (404), an
//! unreachable database (503) or a bad filter still get a real status; after that, a failure
//! aborts the body.

use crate::config::Config;
use crate::db::{quote_ident, Db, Param, Value};
use crate::encode::{resource_text_sql, LineEncoder};
use crate::http::{Reply, Request};
use crate::outcome::ApiError;
use crate::output::{PagedBody, Pages};
use crate::params::Params;
use crate::route::table_name;

/// What to dump, from the path and query.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DumpQuery {
    pub type_name: String,
    /// `_since`: only resources with `ts > since`.
    pub since: Option<String>,
    /// `_until`: only resources with `ts <= until`.
    pub until: Option<String>,
    /// `_count`: at most this many lines.
    pub count: Option<u64>,
    /// `_after`: resume strictly after this id.
    pub after: Option<String>,
    /// `_upto`: stop at this id, inclusive (for parallel ranges).
    pub upto: Option<String>,
    /// `fhir=true`: `application/fhir+ndjson` and the creation time as a meta extension.
    pub fhir: bool,
    pub gzip: bool,
    /// An extra SQL condition ANDed into the page query, e.g. `$export`'s transaction-time
    /// and Patient-compartment rules. Built by the server from constants and database-made
    /// values only, never from request text (it is pasted into SQL as is).
    pub filter: Option<String>,
}

impl DumpQuery {
    pub fn parse(type_name: &str, req: &Request) -> Result<DumpQuery, ApiError> {
        let mut p = Params::parse(&req.query)?;
        let q = DumpQuery {
            type_name: type_name.to_string(),
            since: p.take_instant("_since")?,
            until: p.take_instant("_until")?,
            count: p.take_u64("_count")?,
            after: p.take("_after")?,
            upto: p.take("_upto")?,
            fhir: p.take_bool("fhir")?.unwrap_or(false),
            gzip: p.take_bool("gzip")?.unwrap_or(false) || req.accepts_gzip(),
            filter: None,
        };
        p.finish()?;
        Ok(q)
    }
}

/// Rows per page: from the average stored size seen so far, the page budget, and a floor for
/// the per-row cost that the byte budget does not see (the id, the meta, the host's row
/// structures), so that a table of tiny rows does not make pages of millions of rows.
const MIN_ROW_COST: u64 = 256;
const FIRST_PAGE_ROWS: u64 = 256;
const MAX_PAGE_ROWS: u64 = 50_000;

fn next_limit(budget: u64, rows_seen: u64, bytes_seen: u64) -> u64 {
    if rows_seen == 0 {
        return FIRST_PAGE_ROWS;
    }
    let avg = (bytes_seen / rows_seen).max(MIN_ROW_COST);
    // A little over the budget's worth of rows, so that pages are normally cut by bytes
    // (full-size chunks) rather than by count.
    (budget / avg + budget / avg / 8 + 1).clamp(1, MAX_PAGE_ROWS)
}

/// The page query. `$1` limit, `$2` byte budget, then the filters, then the cursor.
fn page_sql(q: &DumpQuery, with_cursor: bool) -> String {
    let table = table_name(&q.type_name);
    let mut conds: Vec<String> = Vec::new();
    let mut n = 2;
    let mut next = || {
        n += 1;
        n
    };
    if q.since.is_some() {
        conds.push(format!("ts > ${}::text::timestamptz", next()));
    }
    if q.until.is_some() {
        conds.push(format!("ts <= ${}::text::timestamptz", next()));
    }
    if q.upto.is_some() {
        conds.push(format!("id <= ${}", next()));
    }
    if with_cursor || q.after.is_some() {
        conds.push(format!("id > ${}", next()));
    }
    if let Some(f) = &q.filter {
        conds.push(format!("({f})"));
    }
    let filter = if conds.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", conds.join(" AND "))
    };
    // One row per page: PostgreSQL concatenates the page's rows into one text, a line per row
    // (`"id"\ttxid\tts\tcts\tflag\tresource`, the flag from jsonb's own key lookup). Handing Spin one value instead of five per row
    // removes the per-value cost of the component ABI (a guest allocation per string), which
    // dominated the profile. The id comes JSON-escaped (`to_json`), so no line ever holds a raw
    // tab or newline: jsonb's own text never does.
    //
    // `string_agg` has no `ORDER BY`: it reads the subquery's rows in the order its
    // `ORDER BY id LIMIT` produces them (a window function keeps the plan serial, so nothing
    // reorders them), and on PostgreSQL 15 an aggregate `ORDER BY` would sort the page again —
    // a fifth of the query's time, measured. `count(*)` tells whether the LIMIT window was full.
    format!(
        "SELECT string_agg(to_json(id)::text || E'\\t' || txid || E'\\t' \
                           || (ts AT TIME ZONE 'UTC') || E'\\t' || (cts AT TIME ZONE 'UTC') \
                           || CASE WHEN resource ?| ARRAY['id', 'resourceType', 'meta'] \
                                   THEN E'\\t1\\t' ELSE E'\\t0\\t' END \
                           || {resource}, E'\\n') FILTER (WHERE before < $2), \
                count(*), bool_or(before >= $2), sum(size) FILTER (WHERE before < $2) \
         FROM (SELECT id, txid, ts, cts, resource, pg_column_size(resource) AS size, \
                      sum(pg_column_size(resource)) OVER w - pg_column_size(resource) AS before \
               FROM {table} {filter} \
               WINDOW w AS (ORDER BY id ROWS UNBOUNDED PRECEDING) ORDER BY id LIMIT $1) page",
        table = quote_ident(&table),
        resource = resource_text_sql(&q.type_name),
    )
}

/// The page loop's state, kept between queries.
struct Pager<C: Db> {
    conn: C,
    first_sql: String,
    next_sql: String,
    q: DumpQuery,
    budget: u64,
    encoder: LineEncoder,
    cursor: Option<String>,
    remaining: Option<u64>,
    rows_seen: u64,
    bytes_seen: u64,
    done: bool,
}

impl<C: Db> Pager<C> {
    fn params(&self, limit: u64) -> Vec<Param> {
        let mut params = vec![Param::Int(limit as i64), Param::Int(self.budget as i64)];
        for v in [&self.q.since, &self.q.until, &self.q.upto]
            .into_iter()
            .flatten()
        {
            params.push(Param::Str(v.clone()));
        }
        if let Some(c) = self.cursor.as_ref().or(self.q.after.as_ref()) {
            params.push(Param::Str(c.clone()));
        }
        params
    }

    /// Reads the next page and appends its lines to `buf`. Returns the number of lines.
    fn next_page(&mut self, buf: &mut Vec<u8>) -> Result<usize, PageError> {
        if self.done {
            return Ok(0);
        }
        let mut limit = next_limit(self.budget, self.rows_seen, self.bytes_seen);
        if let Some(r) = self.remaining {
            limit = limit.min(r);
        }
        if limit == 0 {
            self.done = true;
            return Ok(0);
        }
        let sql = if self.cursor.is_some() {
            &self.next_sql
        } else {
            &self.first_sql
        };
        let rows = self
            .conn
            .query(sql, self.params(limit))
            .map_err(PageError::Db)?
            .rows;
        // [lines, rows in the window, cut by bytes, bytes] — lines NULL when the window was empty.
        let Some([text, window_rows, cut, bytes]) = rows.first().map(Vec::as_slice) else {
            return Err(PageError::Shape("the page query returned no row".into()));
        };
        let Value::Str(text) = text else {
            self.done = true;
            return Ok(0);
        };
        let mut lines = 0usize;
        let mut last_id = "";
        let mut start = 0;
        // memchr finds the line ends with SIMD; `split` walks the page a word at a time.
        for end in memchr::memchr_iter(b'\n', text.as_bytes()).chain([text.len()]) {
            let line = &text[start..end];
            last_id = self
                .encoder
                .push_page_line(buf, line)
                .map_err(PageError::Shape)?;
            lines += 1;
            start = end + 1;
        }
        // The next page starts after the last id written (decoded once per page).
        self.cursor = Some(
            serde_json::from_str(last_id)
                .map_err(|e| PageError::Shape(format!("bad id {last_id}: {e}")))?,
        );
        self.rows_seen += lines as u64;
        self.bytes_seen += bytes.as_i64().unwrap_or(0).max(0) as u64;
        // A window cut by the byte budget has more rows; so may a full LIMIT window.
        let more = matches!(cut, Value::Bool(true)) || window_rows.as_i64() == Some(limit as i64);
        if let Some(r) = self.remaining.as_mut() {
            *r -= (lines as u64).min(*r);
        }
        self.done = !more || self.remaining == Some(0);
        Ok(lines)
    }
}

enum PageError {
    Db(crate::db::DbError),
    Shape(String),
}

impl PageError {
    fn into_api(self, type_name: &str) -> ApiError {
        match self {
            PageError::Db(e) if e.sqlstate() == Some("42P01") => {
                ApiError::not_found(format!("no table for resource type {type_name}"))
            }
            PageError::Db(e) => e.into_api(),
            PageError::Shape(m) => ApiError::internal(m),
        }
    }

    fn message(&self) -> String {
        match self {
            PageError::Db(e) => e.message(),
            PageError::Shape(m) => m.clone(),
        }
    }
}

/// Starts a dump: everything that can fail with a status happens here, including the first page.
pub fn start<C: Db + 'static>(conn: C, q: DumpQuery, cfg: &Config) -> Result<Reply, ApiError> {
    let mut pager = Pager {
        conn,
        first_sql: page_sql(&q, false),
        next_sql: page_sql(&q, true),
        encoder: LineEncoder::new(&q.type_name, q.fhir),
        budget: cfg.page_bytes,
        cursor: None,
        remaining: q.count,
        rows_seen: 0,
        bytes_seen: 0,
        done: false,
        q,
    };
    let mut first = Vec::new();
    pager
        .next_page(&mut first)
        .map_err(|e| e.into_api(&pager.q.type_name))?;
    let content_type = if pager.q.fhir {
        "application/fhir+ndjson"
    } else {
        "application/ndjson"
    };
    let gzip = pager.q.gzip;
    Ok(PagedBody::reply(pager, first, content_type, gzip))
}

impl<C: Db> Pages for Pager<C> {
    fn done(&self) -> bool {
        self.done
    }

    fn next_page(&mut self, buf: &mut Vec<u8>) -> Result<(), String> {
        Pager::next_page(self, buf).map(drop).map_err(|e| {
            format!(
                "$dump of {} failed mid-stream: {}",
                self.q.type_name,
                e.message()
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_adapt_to_row_size() {
        assert_eq!(next_limit(4 << 20, 0, 0), FIRST_PAGE_ROWS);
        // Tiny rows are floored at MIN_ROW_COST.
        assert_eq!(next_limit(4 << 20, 100, 100 * 40), 18433);
        // 1 KB rows.
        assert_eq!(next_limit(4 << 20, 10, 10 * 1024), 4609);
        // Rows larger than the budget: one per page.
        assert_eq!(next_limit(4 << 20, 1, 5 << 20), 1);
        assert_eq!(next_limit(1 << 30, 1, 1), MAX_PAGE_ROWS);
    }

    #[test]
    fn sql_numbers_parameters_in_order() {
        let q = DumpQuery {
            type_name: "Patient".into(),
            since: Some("2020-01-01T00:00:00Z".into()),
            upto: Some("z".into()),
            ..Default::default()
        };
        let first = page_sql(&q, false);
        assert!(first
            .contains("FROM \"patient\" WHERE ts > $3::text::timestamptz AND id <= $4 WINDOW w"));
        let next = page_sql(&q, true);
        assert!(next.contains("AND id <= $4 AND id > $5 WINDOW w"));
        let plain = page_sql(
            &DumpQuery {
                type_name: "Patient".into(),
                ..Default::default()
            },
            false,
        );
        assert!(plain.contains("FROM \"patient\"  WINDOW w"));
        let filtered = page_sql(
            &DumpQuery {
                type_name: "Patient".into(),
                filter: Some("cts <= now()".into()),
                ..Default::default()
            },
            true,
        );
        assert!(filtered.contains("WHERE id > $3 AND (cts <= now()) WINDOW w"));
    }
}
