//! `POST /$load` and `POST /{Type}/$load`: a streamed, all-or-nothing ndjson import.
//!
//! The body is read as a stream (optionally gunzipped on the fly), split into lines, each line
//! checked by [`crate::resource::prepare`] and queued per type; a type's queue is written as one
//! statement when it reaches a row or byte limit ([`crate::store::Tx::write`]: ids and JSON
//! texts as two `text[]` parameters, cast to jsonb in SQL). Memory holds one line and one batch
//! per type, whatever the body's size.
//!
//! Everything happens in one transaction. The first bad line stops all writing and rolls back;
//! parsing goes on (without writing) to report up to [`MAX_ERRORS`] bad lines at once, so a
//! client can fix a file in one round. Transport failures (broken gzip, a body cut short, a
//! client gone) end the load at once.

use crate::config::Config;
use crate::db::{Db, DbError, Platform};
use crate::http::{BodyReader, Reply, Request};
use crate::outcome::ApiError;
use crate::params::Params;
use crate::resource::prepare;
use crate::store::{Mode, Tx};
use serde_json::json;
use std::io::{BufRead, Read};

/// At most this many bad lines are listed in the answer.
pub const MAX_ERRORS: usize = 100;
/// A batch is written when it reaches this many rows…
const BATCH_ROWS: usize = 10_000;
/// …or this many bytes of JSON (summed over all types' queues).
const BATCH_BYTES: usize = 4 << 20;

const NDJSON_TYPES: [&str; 3] = [
    "application/ndjson",
    "application/fhir+ndjson",
    "application/x-ndjson",
];

pub fn load<P: Platform>(
    platform: &P,
    conn: &mut P::Conn,
    req: &mut Request,
    path_type: Option<&str>,
    cfg: &Config,
) -> Result<Reply, ApiError> {
    let mut params = Params::parse(&req.query)?;
    let mode = match params.take("mode")?.as_deref() {
        None | Some("upsert") => Mode::Upsert,
        Some("insert") => Mode::Insert,
        Some(other) => {
            return Err(crate::params::invalid(
                "mode",
                other,
                "expected insert or upsert",
            ))
        }
    };
    params.finish()?;
    let content_type = req.content_type();
    if content_type == "application/json" {
        return load_source(platform, conn, req, path_type, mode, cfg);
    }
    if !NDJSON_TYPES.contains(&content_type.as_str()) {
        return Err(ApiError::new(
            415,
            "not-supported",
            format!(
                "Content-Type {content_type:?} is not supported: send ndjson ({})",
                NDJSON_TYPES.join(", ")
            ),
        ));
    }
    let gzip = match req
        .header("content-encoding")
        .map(|e| e.trim().to_ascii_lowercase())
    {
        None => false,
        Some(e) if e.is_empty() || e == "identity" => false,
        Some(e) if e == "gzip" || e == "x-gzip" => true,
        Some(e) => {
            return Err(ApiError::new(
                415,
                "not-supported",
                format!("Content-Encoding {e} is not supported (gzip is)"),
            ))
        }
    };
    let body = std::mem::replace(&mut req.body, Box::new(crate::http::BytesBody(None)));
    load_stream(platform, conn, body, gzip, path_type, mode, cfg)
}

/// Aidbox's URL form: `{"source": "https://…/Patient.ndjson.gz", "resourceType": "Patient"}`.
/// The file is fetched through Spin's outbound HTTP (the host must be in
/// `allowed_outbound_hosts`, see the `load_source_host` variable) and streamed in like a body;
/// `.gz` or `Content-Encoding: gzip` is decompressed on the fly.
fn load_source<P: Platform>(
    platform: &P,
    conn: &mut P::Conn,
    req: &mut Request,
    path_type: Option<&str>,
    mode: Mode,
    cfg: &Config,
) -> Result<Reply, ApiError> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Source {
        source: String,
        #[serde(rename = "resourceType")]
        resource_type: Option<String>,
    }
    let body = crate::http::read_body(req.body.as_mut(), 64 * 1024)?;
    let src: Source = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!(
            "a JSON body must be {{\"source\": \"<url>\", \"resourceType\": \"<Type>\"}}: {e}"
        ))
    })?;
    let type_name = match (src.resource_type.as_deref(), path_type) {
        (Some(t), Some(p)) if t != p => {
            return Err(ApiError::bad_request(format!(
                "resourceType {t} does not match the URL's type {p}"
            )))
        }
        (Some(t), _) if !crate::route::valid_type_name(t) => {
            return Err(ApiError::bad_request(format!(
                "resourceType {t:?} is not a valid type name"
            )))
        }
        (t, p) => t.or(p),
    };
    let fetched = platform.fetch(&src.source).map_err(|e| {
        ApiError::new(
            502,
            "transient",
            format!("fetching {} failed: {e}", src.source),
        )
    })?;
    if fetched.status != 200 {
        return Err(ApiError::new(
            502,
            "transient",
            format!("fetching {} answered HTTP {}", src.source, fetched.status),
        ));
    }
    let path = src.source.split(['?', '#']).next().unwrap_or("");
    let gzip = fetched.gzip || path.ends_with(".gz");
    load_stream(platform, conn, fetched.body, gzip, type_name, mode, cfg)
}

fn load_stream<P: Platform>(
    platform: &P,
    conn: &mut P::Conn,
    body: Box<dyn BodyReader>,
    gzip: bool,
    path_type: Option<&str>,
    mode: Mode,
    cfg: &Config,
) -> Result<Reply, ApiError> {
    let reader: Box<dyn BufRead> = if gzip {
        Box::new(std::io::BufReader::with_capacity(
            64 * 1024,
            flate2::bufread::MultiGzDecoder::new(BodyRead::new(body)),
        ))
    } else {
        Box::new(BodyRead::new(body))
    };
    let started = std::time::Instant::now();
    let mut load = Loader {
        conn,
        tx: None,
        mode,
        path_type,
        queues: Vec::new(),
        queued_bytes: 0,
        loaded: Vec::new(),
        errors: Vec::new(),
        salt: &mut || platform.random_bytes(16),
    };
    let lines = match load.run(reader, cfg.max_line_bytes as usize) {
        Ok(lines) => lines,
        Err(e) => {
            Tx::rollback(load.conn);
            return Err(e);
        }
    };
    let txid = load.tx.as_ref().map(|t| t.txid);
    if let Some(tx) = load.tx.take() {
        tx.commit(load.conn).map_err(DbError::into_api)?;
    }
    let loaded: serde_json::Map<String, serde_json::Value> = load
        .loaded
        .iter()
        .map(|(t, n)| (t.clone(), json!(n)))
        .collect();
    Ok(Reply::json(
        200,
        &json!({
            "loaded": loaded,
            "lines": lines,
            "txid": txid,
            "ms": started.elapsed().as_millis() as u64,
        }),
    ))
}

/// A line waiting in a batch: (line number, id, json).
type Queued = (u64, String, String);

struct Loader<'a, C: Db> {
    conn: &'a mut C,
    tx: Option<Tx>,
    mode: Mode,
    path_type: Option<&'a str>,
    /// Per type: the queued lines of the next batch.
    queues: Vec<(String, Vec<Queued>)>,
    queued_bytes: usize,
    /// Per type, in first-seen order: resources written (counting repeated ids each time).
    loaded: Vec<(String, u64)>,
    errors: Vec<(u64, String)>,
    salt: &'a mut dyn FnMut() -> Vec<u8>,
}

impl<C: Db> Loader<'_, C> {
    /// Reads every line; returns the number of resource lines. Any error has already stopped
    /// the writing; the caller rolls back.
    fn run(&mut self, mut reader: Box<dyn BufRead>, max_line: usize) -> Result<u64, ApiError> {
        let mut line = Vec::with_capacity(64 * 1024);
        let mut number = 0u64;
        let mut resources = 0u64;
        loop {
            line.clear();
            number += 1;
            let ended = read_line(&mut reader, &mut line, max_line).map_err(|e| match e {
                LineError::TooLong => self.fail(
                    number,
                    format!("line longer than max_line_bytes ({max_line} bytes)"),
                ),
                LineError::Io(why) => transport(number, &why),
            })?;
            if line.is_empty() && ended == Ended::Eof {
                break;
            }
            if ended == Ended::Eof && !is_complete_json(&line) {
                self.errors.push((
                    number,
                    "the body ends in the middle of a line (truncated?)".into(),
                ));
                break;
            }
            let text = match std::str::from_utf8(trim_line(&line)) {
                Ok(t) => t,
                Err(_) => {
                    self.bad(number, "not valid UTF-8".into())?;
                    continue;
                }
            };
            if text.trim().is_empty() {
                continue;
            }
            resources += 1;
            match prepare(text, self.path_type, self.salt) {
                Ok(p) => {
                    if self.errors.is_empty() {
                        self.queue(number, p.type_name, p.id, p.json)?;
                    }
                }
                Err(why) => self.bad(number, why)?,
            }
            if ended == Ended::Eof {
                break;
            }
        }
        if !self.errors.is_empty() {
            return Err(self.report());
        }
        self.flush_all()?;
        Ok(resources)
    }

    /// Records a bad line; once [`MAX_ERRORS`] are known, stops reading.
    fn bad(&mut self, number: u64, why: String) -> Result<(), ApiError> {
        self.errors.push((number, why));
        self.queues.clear();
        self.queued_bytes = 0;
        if self.errors.len() >= MAX_ERRORS {
            return Err(self.report());
        }
        Ok(())
    }

    /// An error that ends reading at once (after the bad lines seen so far).
    fn fail(&mut self, number: u64, why: String) -> ApiError {
        self.errors.push((number, why));
        self.report()
    }

    fn report(&self) -> ApiError {
        let (first_line, first_why) = &self.errors[0];
        let mut e = ApiError::new(
            422,
            "invalid",
            format!(
                "line {first_line}: {first_why}{}; nothing was loaded",
                if self.errors.len() > 1 {
                    format!(" (and {} more bad lines)", self.errors.len() - 1)
                } else {
                    String::new()
                }
            ),
        )
        .with_expression(format!("line {first_line}"));
        for (n, why) in self.errors.iter().skip(1) {
            e = e.with_issue(format!("line {n}: {why}"), format!("line {n}"));
        }
        e
    }

    fn queue(
        &mut self,
        number: u64,
        type_name: String,
        id: String,
        json: String,
    ) -> Result<(), ApiError> {
        self.queued_bytes += json.len() + id.len();
        let i = match self.queues.iter().position(|(t, _)| *t == type_name) {
            Some(i) => i,
            None => {
                self.queues.push((type_name, Vec::new()));
                self.queues.len() - 1
            }
        };
        self.queues[i].1.push((number, id, json));
        if self.queues[i].1.len() >= BATCH_ROWS {
            self.flush(i)?;
        }
        if self.queued_bytes >= BATCH_BYTES {
            self.flush_all()?;
        }
        Ok(())
    }

    fn flush_all(&mut self) -> Result<(), ApiError> {
        for i in 0..self.queues.len() {
            self.flush(i)?;
        }
        self.queued_bytes = 0;
        Ok(())
    }

    fn flush(&mut self, i: usize) -> Result<(), ApiError> {
        let batch = std::mem::take(&mut self.queues[i].1);
        if batch.is_empty() {
            return Ok(());
        }
        let type_name = self.queues[i].0.clone();
        if self.tx.is_none() {
            self.tx = Some(Tx::begin(self.conn).map_err(DbError::into_api)?);
        }
        let bytes: usize = batch.iter().map(|(_, id, j)| id.len() + j.len()).sum();
        self.queued_bytes = self.queued_bytes.saturating_sub(bytes);
        let count = batch.len() as u64;
        // Keep the line numbers of the ids, to name the line when the database refuses one.
        let lines: Vec<(u64, String)> = if self.mode == Mode::Insert {
            batch.iter().map(|(n, id, _)| (*n, id.clone())).collect()
        } else {
            Vec::new()
        };
        let docs = batch.into_iter().map(|(_, id, j)| (id, j)).collect();
        let Some(tx) = self.tx.as_mut() else {
            return Err(ApiError::internal("no transaction"));
        };
        tx.write(self.conn, &type_name, docs, self.mode, false)
            .map_err(|e| self.write_error(e, &type_name, &lines))?;
        match self.loaded.iter_mut().find(|(t, _)| *t == type_name) {
            Some((_, n)) => *n += count,
            None => self.loaded.push((type_name, count)),
        }
        Ok(())
    }

    fn write_error(&self, e: DbError, type_name: &str, lines: &[(u64, String)]) -> ApiError {
        if let DbError::Sql { code, detail, .. } = &e {
            if code == "23505" {
                // "Key (id)=(p1) already exists."
                let id = detail
                    .as_deref()
                    .and_then(|d| d.strip_prefix("Key (id)=("))
                    .and_then(|d| d.strip_suffix(") already exists."));
                if self.mode == Mode::Upsert {
                    // The race of the plain-insert fast path (see `crate::store`).
                    return ApiError::new(
                        409,
                        "conflict",
                        format!(
                            "another transaction wrote {type_name}/{} while this load ran; \
                             nothing was loaded; retry the load",
                            id.unwrap_or("…")
                        ),
                    );
                }
                let line = id.and_then(|id| lines.iter().find(|(_, i)| i == id).map(|(n, _)| *n));
                return match (line, id) {
                    (Some(n), Some(id)) => ApiError::new(
                        409,
                        "duplicate",
                        format!("line {n}: {type_name}/{id} already exists (mode=insert); nothing was loaded"),
                    )
                    .with_expression(format!("line {n}")),
                    _ => ApiError::new(409, "duplicate", format!("{}; nothing was loaded", e.message())),
                };
            }
            if code.starts_with("22") || code.starts_with("23") {
                return ApiError::new(
                    422,
                    "processing",
                    format!(
                        "rejected by the database: {}; nothing was loaded",
                        e.message()
                    ),
                );
            }
        }
        e.into_api()
    }
}

fn transport(number: u64, why: &str) -> ApiError {
    ApiError::bad_request(format!(
        "reading the body failed at line {number}: {why}; nothing was loaded"
    ))
    .with_expression(format!("line {number}"))
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Ended {
    Newline,
    Eof,
}

enum LineError {
    TooLong,
    Io(String),
}

/// Reads one line (without its `\n`) into `line`, refusing lines over `max` bytes without
/// buffering them.
fn read_line(reader: &mut dyn BufRead, line: &mut Vec<u8>, max: usize) -> Result<Ended, LineError> {
    loop {
        let available = reader
            .fill_buf()
            .map_err(|e| LineError::Io(e.to_string()))?;
        if available.is_empty() {
            return Ok(Ended::Eof);
        }
        let (used, done) = match memchr::memchr(b'\n', available) {
            Some(i) => (i + 1, true),
            None => (available.len(), false),
        };
        let take = if done { used - 1 } else { used };
        if line.len() + take > max {
            return Err(LineError::TooLong);
        }
        line.extend_from_slice(&available[..take]);
        reader.consume(used);
        if done {
            return Ok(Ended::Newline);
        }
    }
}

fn trim_line(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// A last line without `\n` is accepted when it is a whole JSON value; otherwise the body was
/// cut short.
fn is_complete_json(line: &[u8]) -> bool {
    serde_json::from_slice::<&serde_json::value::RawValue>(trim_line(line)).is_ok()
        || trim_line(line).iter().all(u8::is_ascii_whitespace)
}

/// The request body as `std::io::BufRead`, so that gzip and line splitting are library code.
struct BodyRead {
    body: Box<dyn BodyReader>,
    chunk: Vec<u8>,
    pos: usize,
}

impl BodyRead {
    fn new(body: Box<dyn BodyReader>) -> Self {
        BodyRead {
            body,
            chunk: Vec::new(),
            pos: 0,
        }
    }
}

impl Read for BodyRead {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let available = self.fill_buf()?;
        let n = available.len().min(buf.len());
        buf[..n].copy_from_slice(&available[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for BodyRead {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        while self.pos >= self.chunk.len() {
            match self.body.next_chunk() {
                Ok(Some(c)) => {
                    self.chunk = c;
                    self.pos = 0;
                }
                Ok(None) => return Ok(&[]),
                Err(e) => return Err(std::io::Error::other(e)),
            }
        }
        Ok(&self.chunk[self.pos..])
    }

    fn consume(&mut self, amt: usize) {
        self.pos = (self.pos + amt).min(self.chunk.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body arriving in tiny pieces: lines and UTF-8 sequences split across chunks.
    struct Pieces(std::collections::VecDeque<Vec<u8>>);
    impl BodyReader for Pieces {
        fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, String> {
            Ok(self.0.pop_front())
        }
    }

    fn lines_of(body: &[u8], piece: usize, max: usize) -> Vec<Result<(String, Ended), String>> {
        let pieces = body.chunks(piece).map(<[u8]>::to_vec).collect();
        let mut r = BodyRead::new(Box::new(Pieces(pieces)));
        let mut out = Vec::new();
        let mut line = Vec::new();
        loop {
            line.clear();
            match read_line(&mut r, &mut line, max) {
                Ok(e) => {
                    if line.is_empty() && e == Ended::Eof {
                        break;
                    }
                    out.push(Ok((String::from_utf8(line.clone()).unwrap(), e)));
                    if e == Ended::Eof {
                        break;
                    }
                }
                Err(LineError::TooLong) => {
                    out.push(Err("too long".into()));
                    break;
                }
                Err(LineError::Io(e)) => {
                    out.push(Err(e));
                    break;
                }
            }
        }
        out
    }

    #[test]
    fn splits_lines_across_tiny_chunks_and_utf8_boundaries() {
        let body = "{\"a\":\"日本\"}\n\n{\"b\":\"é\"}\r\n{\"c\":1}".as_bytes();
        for piece in [1, 2, 3, 5, 64] {
            let got = lines_of(body, piece, 1000);
            assert_eq!(
                got,
                vec![
                    Ok(("{\"a\":\"日本\"}".to_string(), Ended::Newline)),
                    Ok((String::new(), Ended::Newline)),
                    Ok(("{\"b\":\"é\"}\r".to_string(), Ended::Newline)),
                    Ok(("{\"c\":1}".to_string(), Ended::Eof)),
                ],
                "piece {piece}"
            );
        }
    }

    #[test]
    fn refuses_long_lines_without_buffering_them() {
        let body = format!("{}\n", "x".repeat(100));
        assert_eq!(
            lines_of(body.as_bytes(), 7, 99),
            vec![Err("too long".to_string())]
        );
        assert_eq!(lines_of(body.as_bytes(), 7, 100).len(), 1);
    }

    #[test]
    fn a_cut_last_line_is_incomplete() {
        assert!(is_complete_json(b"{\"a\": 1}"));
        assert!(is_complete_json(b"{\"a\": 1}\r"));
        assert!(!is_complete_json(b"{\"a\": 1"));
        assert!(is_complete_json(b"  "));
    }

    #[test]
    fn gzip_stream_decodes_across_pieces() {
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(b"{\"id\":\"1\"}\n{\"id\":\"2\"}\n").unwrap();
        let bytes = gz.finish().unwrap();
        let pieces = bytes.chunks(3).map(<[u8]>::to_vec).collect();
        let mut r = std::io::BufReader::new(flate2::bufread::MultiGzDecoder::new(BodyRead::new(
            Box::new(Pieces(pieces)),
        )));
        let mut text = String::new();
        r.read_to_string(&mut text).unwrap();
        assert_eq!(text, "{\"id\":\"1\"}\n{\"id\":\"2\"}\n");
    }
}
