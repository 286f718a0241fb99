//! `GET /{Type}/$dump`: every resource of a type as ndjson, streamed page by page.
//!
//! Pages use keyset pagination on the primary key (`id > $last ORDER BY id LIMIT n`): each
//! page is one indexed range scan wherever the dump is, unlike OFFSET, and needs no server-side
//! state between queries. A page is bounded twice:
//! - by rows (`LIMIT n`, with `n` adapted from the line sizes seen so far), and
//! - by bytes: a row whose stored size exceeds `2 × budget / n` comes in the page as its id
//!   only, and is then read alone, at its place. So a page's text stays under two budgets even
//!   when sizes jump (a run of 5 MB resources after tiny ones), a result never nears Spin's
//!   128 MiB cap, and a single resource larger than the budget still goes out.
//!
//! The page comes back as ONE row: the page's lines concatenated by PostgreSQL, plus the
//! window's row count. A full `LIMIT` window means there may be more; anything else is the
//! end — no extra query to find out.
//!
//! The first page is read before the response starts, so a missing table (404), an
//! unreachable database (503) or a bad filter still get a real status; after that, a failure
//! aborts the body.
//!
//! A dump with at least two more pages after its first is shared with helper instances under
//! one snapshot ([`crate::fanout`]); this module's [`Pager`] is the walk every instance runs.

use crate::config::Config;
use crate::db::{quote_ident, Db, Param, ReadTx, Value};
use crate::encode::{resource_text_sql, LineEncoder};
use crate::fanout::{Fanout, HelperPages, MainPages, FRAMES_TYPE};
use crate::http::{Reply, Request};
use crate::outcome::ApiError;
use crate::output::{PagedBody, Pages};
use crate::params::{invalid, Params};
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
    /// `_part`, `_pages`, `_snapshot`: this request is a helper of a split `$dump` (see
    /// [`crate::fanout`]), answering its share of the pages as frames.
    pub part: Option<Part>,
}

/// A helper's share of a split `$dump`: pages of `rows` rows after `_after`, numbered from 1,
/// this instance taking those numbered `index` modulo `of`, all under the exporting
/// transaction's snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct Part {
    pub index: u64,
    pub of: u64,
    pub rows: u64,
    pub snapshot: String,
}

/// The most instances one `$dump` may be split across.
pub const MAX_PARTS: u64 = 16;

impl Part {
    fn parse(p: &mut Params) -> Result<Option<Part>, ApiError> {
        let part = p.take("_part")?;
        let rows = p.take_u64("_pages")?;
        let snapshot = p.take("_snapshot")?;
        let (part, rows, snapshot) = match (part, rows, snapshot) {
            (None, None, None) => return Ok(None),
            (Some(part), Some(rows), Some(snapshot)) => (part, rows, snapshot),
            _ => {
                return Err(ApiError::bad_request(
                    "_part, _pages and _snapshot go together (a split $dump's helper request)",
                ))
            }
        };
        let bad = || invalid("_part", &part, "expected i/k with 1 <= i < k <= 16");
        let (index, of) = part.split_once('/').ok_or_else(bad)?;
        let (index, of) = (
            index.parse::<u64>().map_err(|_| bad())?,
            of.parse::<u64>().map_err(|_| bad())?,
        );
        if !(1 <= index && index < of && of <= MAX_PARTS) {
            return Err(bad());
        }
        if !(1..=MAX_PAGE_ROWS).contains(&rows) {
            return Err(invalid(
                "_pages",
                &rows.to_string(),
                "expected 1 to 50000 rows per page",
            ));
        }
        // Pasted into `SET TRANSACTION SNAPSHOT '…'` (it takes no parameters): PostgreSQL's
        // snapshot names are hex digits and dashes.
        let valid = !snapshot.is_empty()
            && snapshot.len() <= 64
            && snapshot.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
        if !valid {
            return Err(invalid("_snapshot", &snapshot, "not a snapshot name"));
        }
        Ok(Some(Part {
            index,
            of,
            rows,
            snapshot,
        }))
    }
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
            part: Part::parse(&mut p)?,
        };
        p.finish()?;
        if q.part.is_some() && (q.count.is_some() || q.gzip) {
            return Err(ApiError::bad_request(
                "a split $dump's helper request takes neither _count nor gzip",
            ));
        }
        Ok(q)
    }
}

/// Rows per page: from the average line size seen so far, the page budget, and a floor for
/// the per-row cost that the byte budget does not see (the id, the meta, the host's row
/// structures), so that a table of tiny rows does not make pages of millions of rows.
const MIN_ROW_COST: u64 = 256;
const FIRST_PAGE_ROWS: u64 = 256;
const MAX_PAGE_ROWS: u64 = 50_000;
/// A page's text may reach this many times the budget before rows are left out: see
/// [`size_limit`].
const CEILING_BUDGETS: u64 = 2;

fn next_limit(budget: u64, rows_seen: u64, bytes_seen: u64) -> u64 {
    if rows_seen == 0 {
        return FIRST_PAGE_ROWS;
    }
    let avg = (bytes_seen / rows_seen).max(MIN_ROW_COST);
    (budget / avg).clamp(1, MAX_PAGE_ROWS)
}

/// The largest stored row (`pg_column_size`) a page of `limit` rows carries in full: with
/// every row under it, a page stays under `CEILING_BUDGETS` budgets (16 times below Spin's
/// 128 MiB result cap with the default 4 MiB budget, room for jsonb's compression). Larger rows
/// come as their id only and are read alone, so pages stay bounded when sizes jump, and a single
/// row larger than the whole budget still goes out.
fn size_limit(budget: u64, limit: u64) -> u64 {
    budget * CEILING_BUDGETS / limit.max(1)
}

/// Which rows a page query reads, besides the filters.
#[derive(Clone, Copy, PartialEq)]
enum Cursor {
    /// From the start (or from `_after`).
    Start,
    /// `id > $last`.
    After,
    /// `id = $id`: one row left out of a page for its size.
    Exactly,
}

/// The `WHERE` clause: the filters, then the cursor, numbered from `$first + 1`.
fn conditions(q: &DumpQuery, cursor: Cursor, first: usize) -> String {
    let mut conds: Vec<String> = Vec::new();
    let mut n = first;
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
    match cursor {
        Cursor::Exactly => conds.push(format!("id = ${}", next())),
        Cursor::After => conds.push(format!("id > ${}", next())),
        Cursor::Start if q.after.is_some() => conds.push(format!("id > ${}", next())),
        Cursor::Start => {}
    }
    if let Some(f) = &q.filter {
        conds.push(format!("({f})"));
    }
    if conds.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", conds.join(" AND "))
    }
}

/// The skip query of a split dump: the id `$1` rows further on (`OFFSET $1 LIMIT 1`), or no
/// row when fewer are left. Reads the id index only (with a `ts` filter, the heap too), none of
/// the resources.
fn skip_sql(q: &DumpQuery, cursor: Cursor) -> String {
    format!(
        "SELECT id FROM {table} {filter} ORDER BY id OFFSET $1 LIMIT 1",
        table = quote_ident(&table_name(&q.type_name)),
        filter = conditions(q, cursor, 1),
    )
}

/// The page query. `$1` limit, `$2` largest row carried in full, then the filters, then the
/// cursor.
fn page_sql(q: &DumpQuery, cursor: Cursor) -> String {
    let table = table_name(&q.type_name);
    let filter = conditions(q, cursor, 2);
    // One row per page: PostgreSQL concatenates the page's rows into one text, a line per row
    // (`len\tid\ttxid\tts\tcts\tresource`, parsed by `LineEncoder::push_page`). Handing Spin
    // one value instead of five per row removes the per-value cost of the component ABI (a
    // guest allocation per string), which dominated the first profile. The id goes raw after
    // its byte length (cheaper than `to_json`); `cts` is left empty when it equals `ts` (one
    // timestamp to render instead of two); a row over the size limit is just `len\tid`.
    //
    // The size limit replaces a window function (running sum of sizes) that cost ~40% of the
    // page query on small rows: measured 80 -> 40 ms for 18K seed rows, with the other changes.
    //
    // `string_agg` has no `ORDER BY`: it reads the subquery's rows in the order its
    // `ORDER BY id LIMIT` produces them (the plan is serial: nothing reorders them), and on
    // PostgreSQL 15 an aggregate `ORDER BY` would sort the page again. `count(*)` tells whether
    // the LIMIT window was full.
    format!(
        "SELECT string_agg(octet_length(id) || E'\\t' || id || CASE WHEN size <= $2::int8 THEN \
                  E'\\t' || txid || E'\\t' || (ts AT TIME ZONE 'UTC') || E'\\t' \
                  || CASE WHEN cts = ts THEN '' ELSE (cts AT TIME ZONE 'UTC')::text END \
                  || E'\\t' || {resource} ELSE '' END, E'\\n'), \
                count(*) \
         FROM (SELECT id, txid, ts, cts, resource, pg_column_size(resource) AS size \
               FROM {table} {filter} ORDER BY id LIMIT $1) page",
        table = quote_ident(&table),
        resource = resource_text_sql(&q.type_name),
    )
}

/// The page loop's state, kept between queries. Also the walk of a split dump's instances
/// ([`crate::fanout`]): [`Pager::render`] a page of a given size, [`Pager::skip`] past others'.
pub(crate) struct Pager<C: Db> {
    /// In a transaction only in a split dump (its snapshot).
    tx: ReadTx<C>,
    first_sql: String,
    next_sql: String,
    single_sql: String,
    skip_first_sql: String,
    skip_next_sql: String,
    pub(crate) q: DumpQuery,
    budget: u64,
    encoder: LineEncoder,
    cursor: Option<String>,
    remaining: Option<u64>,
    rows_seen: u64,
    bytes_seen: u64,
    done: bool,
}

impl<C: Db> Pager<C> {
    fn new(conn: C, q: DumpQuery, budget: u64) -> Pager<C> {
        Pager {
            tx: ReadTx::new(conn),
            first_sql: page_sql(&q, Cursor::Start),
            next_sql: page_sql(&q, Cursor::After),
            single_sql: page_sql(&q, Cursor::Exactly),
            skip_first_sql: skip_sql(&q, Cursor::Start),
            skip_next_sql: skip_sql(&q, Cursor::After),
            encoder: LineEncoder::new(&q.type_name, q.fhir),
            budget,
            cursor: None,
            remaining: q.count,
            rows_seen: 0,
            bytes_seen: 0,
            done: false,
            q,
        }
    }

    /// The filters' parameters, then the cursor's.
    fn filter_params(&self, params: &mut Vec<Param>, cursor: Option<&str>) {
        for v in [&self.q.since, &self.q.until, &self.q.upto]
            .into_iter()
            .flatten()
        {
            params.push(Param::Str(v.clone()));
        }
        if let Some(c) = cursor {
            params.push(Param::Str(c.to_string()));
        }
    }

    /// `$1` limit, `$2` largest row carried in full, the filters, the cursor.
    fn params(&self, limit: u64, max_size: u64, cursor: Option<&str>) -> Vec<Param> {
        let mut params = vec![
            Param::Int(limit as i64),
            Param::Int(max_size.min(i64::MAX as u64) as i64),
        ];
        self.filter_params(&mut params, cursor);
        params
    }

    /// The SQL and cursor value for the next query: after the last id seen, or from the start.
    fn position<'a>(&'a self, first: &'a str, next: &'a str) -> (&'a str, Option<&'a str>) {
        match &self.cursor {
            Some(c) => (next, Some(c.as_str())),
            None => (first, self.q.after.as_deref()),
        }
    }

    /// Runs a page query: its text (None for an empty window) and the window's row count.
    fn query(
        conn: &mut C,
        sql: &str,
        params: Vec<Param>,
    ) -> Result<(Option<String>, i64), PageError> {
        let rows = conn.query(sql, params).map_err(PageError::Db)?.rows;
        let mut row = rows.into_iter().next().unwrap_or_default().into_iter();
        let (Some(text), Some(window_rows)) = (row.next(), row.next()) else {
            return Err(PageError::Shape("the page query returned no row".into()));
        };
        let text = match text {
            Value::Str(t) => Some(t),
            _ => None,
        };
        Ok((text, window_rows.as_i64().unwrap_or(0)))
    }

    /// Reads the next page in the serial walk (its size from the rows seen so far) and appends
    /// its lines to `buf`.
    fn next_page(&mut self, buf: &mut Vec<u8>) -> Result<(), PageError> {
        if self.done {
            return Ok(());
        }
        let mut limit = next_limit(self.budget, self.rows_seen, self.bytes_seen);
        if let Some(r) = self.remaining {
            limit = limit.min(r);
        }
        if limit == 0 {
            self.done = true;
            return Ok(());
        }
        let window_rows = self.render(buf, limit)?;
        // A full LIMIT window may have more rows after it.
        self.done = window_rows < limit || self.remaining == Some(0);
        Ok(())
    }

    /// Reads the page of (at most) `limit` rows after the cursor, appends its lines to `buf` and
    /// moves the cursor to its last id. Returns the window's row count: fewer than `limit`
    /// means the end.
    pub(crate) fn render(&mut self, buf: &mut Vec<u8>, limit: u64) -> Result<u64, PageError> {
        let (sql, cursor) = self.position(&self.first_sql, &self.next_sql);
        let params = self.params(limit, size_limit(self.budget, limit), cursor);
        let sql = sql.to_string();
        let (text, window_rows) = Self::query(&mut self.tx.conn, &sql, params)?;
        let Some(text) = text else {
            return Ok(0);
        };
        // Rows left out for their size are read alone (no size limit), at their place.
        let single_params = self.params(1, u64::MAX, None);
        let (encoder, conn, single_sql) = (&self.encoder, &mut self.tx.conn, &self.single_sql);
        let mut db_error = None;
        let mut left_out_bytes = 0;
        let page = encoder.push_page(buf, &text, |out, id| {
            let mut params = single_params.clone();
            params.push(Param::Str(id.to_string()));
            let text = match Self::query(conn, single_sql, params) {
                Ok((text, _)) => text,
                Err(PageError::Db(e)) => {
                    db_error = Some(e);
                    return Err(String::new());
                }
                Err(e) => return Err(e.message()),
            };
            // Gone since the page was read (deleted, or no longer matching): skip it.
            let Some(text) = text else { return Ok(()) };
            let single = encoder.push_page(out, &text, |_, _| Err("row left out alone".into()))?;
            left_out_bytes += single.bytes;
            Ok(())
        });
        let page = match (page, db_error) {
            (_, Some(e)) => return Err(PageError::Db(e)),
            (page, None) => page.map_err(PageError::Shape)?,
        };
        let Some(last_id) = page.last_id else {
            return Err(PageError::Shape("empty page text".into()));
        };
        // The next page starts after the last id of this one.
        self.cursor = Some(last_id.to_string());
        self.rows_seen += page.lines as u64;
        self.bytes_seen += (page.bytes + left_out_bytes) as u64;
        if let Some(r) = self.remaining.as_mut() {
            *r -= (page.lines as u64).min(*r);
        }
        Ok(window_rows.max(0) as u64)
    }

    /// Moves the cursor `rows` rows on without reading them (the pages another instance of a
    /// split dump renders). `false` when fewer rows are left: the end is in those pages.
    pub(crate) fn skip(&mut self, rows: u64) -> Result<bool, PageError> {
        match self.nth_next_id(rows)? {
            Some(id) => {
                self.cursor = Some(id);
                Ok(true)
            }
            None => Ok(rows == 0),
        }
    }

    /// Whether at least `rows` rows are left after the cursor (which stays where it is).
    pub(crate) fn has_rows_left(&mut self, rows: u64) -> Result<bool, PageError> {
        Ok(rows == 0 || self.nth_next_id(rows)?.is_some())
    }

    /// The id `rows` rows after the cursor (`None` for 0 rows, or when fewer are left).
    fn nth_next_id(&mut self, rows: u64) -> Result<Option<String>, PageError> {
        if rows == 0 {
            return Ok(None);
        }
        let (sql, cursor) = self.position(&self.skip_first_sql, &self.skip_next_sql);
        let mut params = vec![Param::Int((rows - 1) as i64)];
        self.filter_params(&mut params, cursor);
        let sql = sql.to_string();
        let rows = self
            .tx
            .conn
            .query(&sql, params)
            .map_err(PageError::Db)?
            .rows;
        match rows.into_iter().next().and_then(|r| r.into_iter().next()) {
            Some(Value::Str(id)) => Ok(Some(id)),
            None => Ok(None),
            Some(other) => Err(PageError::Shape(format!(
                "the skip query returned {other:?}"
            ))),
        }
    }

    /// Row count of a page that fills the budget, from what the first page showed.
    pub(crate) fn steady_limit(&self) -> u64 {
        next_limit(self.budget, self.rows_seen, self.bytes_seen)
    }

    pub(crate) fn is_done(&self) -> bool {
        self.done
    }

    /// The last id sent (where the rest of the dump starts).
    pub(crate) fn cursor(&self) -> Option<&str> {
        self.cursor.as_deref()
    }

    /// Opens a `REPEATABLE READ` transaction and exports its snapshot (for the helpers of a
    /// split dump), returning its name.
    pub(crate) fn export_snapshot(&mut self) -> Result<String, PageError> {
        self.begin()?;
        let rows = self
            .tx
            .conn
            .query("SELECT pg_catalog.pg_export_snapshot()", Vec::new())
            .map_err(PageError::Db)?
            .rows;
        match rows.into_iter().next().and_then(|r| r.into_iter().next()) {
            Some(Value::Str(name)) => Ok(name),
            other => Err(PageError::Shape(format!(
                "pg_export_snapshot returned {other:?}"
            ))),
        }
    }

    /// Reads under the snapshot another instance exported (a split dump's helper).
    pub(crate) fn import_snapshot(&mut self, name: &str) -> Result<(), PageError> {
        self.begin()?;
        // The name was checked to be hex digits and dashes (`Part::parse`): the statement
        // takes no parameters.
        self.tx
            .conn
            .execute(&format!("SET TRANSACTION SNAPSHOT '{name}'"), Vec::new())
            .map_err(PageError::Db)?;
        Ok(())
    }

    fn begin(&mut self) -> Result<(), PageError> {
        self.tx
            .begin("BEGIN TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .map_err(PageError::Db)
    }

    /// Ends the transaction, if any, after the last page.
    pub(crate) fn end(&mut self) -> Result<(), PageError> {
        self.tx.end().map_err(PageError::Db)
    }

    /// Ends the transaction, if any, after a failure (best effort).
    pub(crate) fn rollback(&mut self) {
        self.tx.rollback();
    }
}

pub(crate) enum PageError {
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

    pub(crate) fn message(&self) -> String {
        match self {
            PageError::Db(e) => e.message(),
            PageError::Shape(m) => m.clone(),
        }
    }
}

/// Starts a dump: everything that can fail with a status happens here, including the first page.
/// With `fanout`, the rest of a dump larger than its first page is split with helper instances
/// ([`crate::fanout`]); a helper request (`_part`) answers its share as frames.
pub fn start<C: Db + 'static>(
    conn: C,
    q: DumpQuery,
    cfg: &Config,
    fanout: Option<Fanout>,
) -> Result<Reply, ApiError> {
    let type_name = q.type_name.clone();
    let mut pager = Pager::new(conn, q, cfg.page_bytes);
    if pager.q.part.is_some() {
        let snapshot = pager.q.part.as_ref().map(|p| p.snapshot.clone());
        let pages = HelperPages::start(pager).map_err(|e| match e {
            // 22023: no snapshot of that name (its transaction has ended, or never was).
            PageError::Db(db) if db.sqlstate() == Some("22023") => invalid(
                "_snapshot",
                snapshot.as_deref().unwrap_or_default(),
                &format!("cannot read under it: {}", db.message()),
            ),
            e => e.into_api(&type_name),
        })?;
        return Ok(PagedBody::reply(pages, Vec::new(), FRAMES_TYPE, false));
    }
    let mut first = Vec::new();
    pager
        .next_page(&mut first)
        .map_err(|e| e.into_api(&type_name))?;
    let content_type = if pager.q.fhir {
        "application/fhir+ndjson"
    } else {
        "application/ndjson"
    };
    let gzip = pager.q.gzip;
    // `_count` and server-made filters ($export) stay serial: neither is worth splitting.
    let splittable = pager.q.count.is_none() && pager.q.filter.is_none() && !pager.is_done();
    match fanout.filter(|f| f.parts > 1 && splittable) {
        Some(f) => Ok(PagedBody::reply(
            MainPages::new(pager, f),
            first,
            content_type,
            gzip,
        )),
        None => Ok(PagedBody::reply(pager, first, content_type, gzip)),
    }
}

impl<C: Db> Pages for Pager<C> {
    fn done(&self) -> bool {
        self.done
    }

    fn next_page(&mut self, buf: &mut Vec<u8>) -> Result<(), String> {
        Pager::next_page(self, buf).map_err(|e| {
            format!(
                "$dump of {} failed mid-stream: {}",
                self.q.type_name,
                e.message()
            )
        })
    }

    fn finish(&mut self) -> Result<(), String> {
        self.end().map_err(|e| e.message())
    }

    fn abort(&mut self) {
        self.rollback();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_adapt_to_row_size() {
        assert_eq!(next_limit(4 << 20, 0, 0), FIRST_PAGE_ROWS);
        // Tiny rows are floored at MIN_ROW_COST.
        assert_eq!(next_limit(4 << 20, 100, 100 * 40), 16384);
        // 1 KB rows.
        assert_eq!(next_limit(4 << 20, 10, 10 * 1024), 4096);
        // Rows larger than the budget: one per page.
        assert_eq!(next_limit(4 << 20, 1, 5 << 20), 1);
        assert_eq!(next_limit(1 << 30, 1, 1), MAX_PAGE_ROWS);
    }

    #[test]
    fn pages_stay_under_the_ceiling() {
        for limit in [1, 255, 4096, 16384, MAX_PAGE_ROWS] {
            assert!(limit * size_limit(4 << 20, limit) <= 8 << 20);
        }
        // A lone row is carried whole up to twice the budget.
        assert_eq!(size_limit(4 << 20, 1), 8 << 20);
    }

    #[test]
    fn sql_numbers_parameters_in_order() {
        let q = DumpQuery {
            type_name: "Patient".into(),
            since: Some("2020-01-01T00:00:00Z".into()),
            upto: Some("z".into()),
            ..Default::default()
        };
        let first = page_sql(&q, Cursor::Start);
        assert!(first.contains(
            "FROM \"patient\" WHERE ts > $3::text::timestamptz AND id <= $4 ORDER BY id"
        ));
        let next = page_sql(&q, Cursor::After);
        assert!(next.contains("AND id <= $4 AND id > $5 ORDER BY id"));
        let single = page_sql(&q, Cursor::Exactly);
        assert!(single.contains("AND id <= $4 AND id = $5 ORDER BY id"));
        let plain = page_sql(
            &DumpQuery {
                type_name: "Patient".into(),
                ..Default::default()
            },
            Cursor::Start,
        );
        assert!(plain.contains("FROM \"patient\"  ORDER BY id"));
        let filtered = page_sql(
            &DumpQuery {
                type_name: "Patient".into(),
                filter: Some("cts <= now()".into()),
                after: Some("a".into()),
                ..Default::default()
            },
            Cursor::After,
        );
        assert!(filtered.contains("WHERE id > $3 AND (cts <= now()) ORDER BY id"));
    }
}
