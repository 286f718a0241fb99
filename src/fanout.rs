//! A `$dump` split across instances of the component, so that one request keeps more than
//! one PostgreSQL backend busy.
//!
//! Why: a component instance is single-threaded and Spin's PostgreSQL calls block, so a
//! serial `$dump` leaves the database idle while the component works and the component idle
//! while the database renders the next page — and the backend renders one page at a time.
//! PostgreSQL's own `COPY (… ORDER BY id)` runs a parallel plan (two workers sorting, the
//! leader merging). Measured on 1M realistic patients: two `$dump` ranges at once reach
//! `COPY`'s time; one serial `$dump` takes 1.65–1.83x.
//!
//! How: after the first page (read before the response starts, as in a serial dump), when at
//! least two more pages follow, the instance that took the request (the *main* one) opens a
//! `REPEATABLE READ` transaction, exports its snapshot, and sends `parts - 1` requests to this
//! same application (Spin's self requests: a relative URL, allowed by `http://self` in
//! `allowed_outbound_hosts`), each answered by a fresh instance (a *helper*) that imports the
//! snapshot. The rest of the table is cut into pages of a fixed number of rows, numbered from
//! 1; page `j` belongs to instance `j mod parts` (the main one has 0). Every instance walks the
//! same page boundaries: it renders its own pages and steps over the others' with an
//! index-only `OFFSET` query — under one snapshot, all instances see the same rows, so the
//! boundaries agree exactly. A helper answers its pages as frames; the main instance writes
//! pages to the client in order, its own and the helpers', rendering its next page before it
//! waits for a helper's, so the backends work at the same time. Memory stays flat: a helper
//! can run at most a page ahead before its writes block.
//!
//! Failure: a helper that cannot start (self requests not allowed, any error status) leaves
//! the main instance dumping alone from where it is. A helper failing mid-stream ends its
//! frames without the end marker, and the main instance aborts its own body. At the end, every
//! helper must say it has nothing more (its end marker), or the dump fails.

use crate::db::{Db, PendingResponse, SelfRequest};
use crate::dump::{PageError, Pager};
use crate::http::BodyReader;
use crate::output::Pages;
use crate::params::encode;

/// The media type of a helper's answer.
pub const FRAMES_TYPE: &str = "application/x-spin-bulk-frames";

/// A page frame: `P`, the page's byte length in 16 hex digits, its row count in 8, `\n`, the
/// page. A fixed-size header, so it can be written before the page is rendered behind it.
const HEADER_LEN: usize = 26;
/// After the last frame: nothing more in this helper's share.
const END: &[u8] = b"E\n";

/// What the main instance needs to start helpers.
pub struct Fanout {
    pub requests: Box<dyn SelfRequest>,
    /// The request's path, as the client sent it (it routes to this component).
    pub path: String,
    /// The client's `Authorization` header: a helper is authorized like the request itself.
    pub authorization: String,
    /// How many instances share the dump (`dump_parallel`), the main one included.
    pub parts: u64,
}

/// One instance's walk over the pages after the first: skip the others' pages, render its
/// own, repeat. Page `j` (from 1) belongs to part `j mod of`; the main instance is part `of`.
struct Walk {
    rows: u64,
    of: u64,
    skip: u64,
    done: bool,
}

impl Walk {
    fn new(part: u64, of: u64, rows: u64) -> Walk {
        Walk {
            rows,
            of,
            skip: (part - 1) * rows,
            done: false,
        }
    }

    /// Renders this instance's next page into `buf`; its row count, 0 when there is none.
    fn next<C: Db>(&mut self, pager: &mut Pager<C>, buf: &mut Vec<u8>) -> Result<u64, PageError> {
        if self.done {
            return Ok(0);
        }
        if !pager.skip(self.skip)? {
            self.done = true;
            return Ok(0);
        }
        self.skip = (self.of - 1) * self.rows;
        let rows = pager.render(buf, self.rows)?;
        if rows < self.rows {
            self.done = true;
        }
        Ok(rows)
    }
}

fn put_header(header: &mut [u8], len: u64, rows: u64) {
    let text = format!("P{len:016x}{rows:08x}\n");
    header[..HEADER_LEN].copy_from_slice(text.as_bytes());
}

/// A helper's pages, as frames (see the module docs).
pub(crate) struct HelperPages<C: Db> {
    pager: Pager<C>,
    walk: Walk,
    done: bool,
}

impl<C: Db> HelperPages<C> {
    /// Imports the snapshot first, so that a failure still gets a status.
    pub(crate) fn start(mut pager: Pager<C>) -> Result<HelperPages<C>, PageError> {
        let part = pager.q.part.clone().expect("a helper request has its part");
        pager.import_snapshot(&part.snapshot)?;
        Ok(HelperPages {
            pager,
            walk: Walk::new(part.index, part.of, part.rows),
            done: false,
        })
    }

    fn fail(&self, e: PageError) -> String {
        format!(
            "$dump of {} (helper) failed mid-stream: {}",
            self.pager.q.type_name,
            e.message()
        )
    }
}

impl<C: Db> Pages for HelperPages<C> {
    fn done(&self) -> bool {
        self.done
    }

    fn next_page(&mut self, buf: &mut Vec<u8>) -> Result<(), String> {
        let start = buf.len();
        buf.resize(start + HEADER_LEN, 0);
        let rows = match self.walk.next(&mut self.pager, buf) {
            Ok(rows) => rows,
            Err(e) => return Err(self.fail(e)),
        };
        if rows == 0 {
            buf.truncate(start);
        } else {
            let len = (buf.len() - start - HEADER_LEN) as u64;
            put_header(&mut buf[start..], len, rows);
        }
        if self.walk.done {
            buf.extend_from_slice(END);
            self.done = true;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), String> {
        self.pager.end().map_err(|e| e.message())
    }

    fn abort(&mut self) {
        self.pager.rollback();
    }
}

/// Reads a helper's frames.
pub struct FrameReader {
    body: Box<dyn BodyReader>,
    pending: Vec<u8>,
    pos: usize,
    /// The end marker was read.
    ended: bool,
}

impl FrameReader {
    pub fn new(body: Box<dyn BodyReader>) -> FrameReader {
        FrameReader {
            body,
            pending: Vec::new(),
            pos: 0,
            ended: false,
        }
    }

    /// Buffers at least `need` unread bytes; `false` at the end of the body.
    fn fill(&mut self, need: usize) -> Result<bool, String> {
        while self.pending.len() - self.pos < need {
            match self.body.next_chunk()? {
                None => return Ok(false),
                Some(chunk) => {
                    self.pending.drain(..self.pos);
                    self.pos = 0;
                    self.pending.extend_from_slice(&chunk);
                }
            }
        }
        Ok(true)
    }

    /// After the last page the dump needed: the end marker must come next, then the body's
    /// clean end (so the helper is done, its transaction ended, before this instance ends).
    pub fn close(&mut self) -> Result<(), String> {
        if self.next(&mut Vec::new())?.is_some() {
            return Err("a helper sent a page after the end of the dump".into());
        }
        if self.pending.len() > self.pos {
            return Err("a helper sent bytes after its end marker".into());
        }
        while let Some(chunk) = self.body.next_chunk()? {
            if !chunk.is_empty() {
                return Err("a helper sent bytes after its end marker".into());
            }
        }
        Ok(())
    }

    /// Appends the next page to `out` and returns its row count; `None` at (and after) the end
    /// marker.
    pub fn next(&mut self, out: &mut Vec<u8>) -> Result<Option<u64>, String> {
        if self.ended {
            return Ok(None);
        }
        let cut = "the helper's stream ended without its end marker";
        if !self.fill(END.len())? {
            return Err(cut.into());
        }
        if &self.pending[self.pos..self.pos + END.len()] == END {
            self.pos += END.len();
            self.ended = true;
            return Ok(None);
        }
        if !self.fill(HEADER_LEN)? {
            return Err(cut.into());
        }
        let header = &self.pending[self.pos..self.pos + HEADER_LEN];
        let hex = |r: std::ops::Range<usize>| {
            std::str::from_utf8(&header[r])
                .ok()
                .and_then(|t| u64::from_str_radix(t, 16).ok())
        };
        let (Some(len), Some(rows)) = (hex(1..17), hex(17..25)) else {
            return Err("a helper sent a malformed frame".into());
        };
        if header[0] != b'P' || header[25] != b'\n' {
            return Err("a helper sent a malformed frame".into());
        }
        self.pos += HEADER_LEN;
        let mut len = len as usize;
        out.reserve(len);
        let n = (self.pending.len() - self.pos).min(len);
        out.extend_from_slice(&self.pending[self.pos..self.pos + n]);
        self.pos += n;
        len -= n;
        while len > 0 {
            let chunk = self.body.next_chunk()?.ok_or(cut)?;
            if chunk.len() <= len {
                out.extend_from_slice(&chunk);
                len -= chunk.len();
            } else {
                out.extend_from_slice(&chunk[..len]);
                self.pending = chunk;
                self.pos = len;
                len = 0;
            }
        }
        Ok(Some(rows))
    }
}

enum Mode {
    /// Helpers not asked yet (the first page has just gone out).
    Start(Fanout),
    /// Dumping alone.
    Serial,
    Split(Split),
    Done,
}

struct Split {
    walk: Walk,
    helpers: Vec<FrameReader>,
    /// The number of the next page to write.
    next: u64,
    /// This instance's next page, rendered while a helper's was awaited, and its row count.
    ahead: Option<(Vec<u8>, u64)>,
    spare: Vec<u8>,
}

/// The main instance's pages: its first page went out before; the rest split with helpers
/// when they start, else read alone.
pub(crate) struct MainPages<C: Db> {
    pager: Pager<C>,
    mode: Mode,
}

impl<C: Db> MainPages<C> {
    pub(crate) fn new(pager: Pager<C>, fanout: Fanout) -> MainPages<C> {
        MainPages {
            pager,
            mode: Mode::Start(fanout),
        }
    }

    /// Exports the snapshot and starts the helpers; `None` (dump alone) when any of that fails.
    fn start_split(&mut self, fanout: &Fanout) -> Result<Option<Split>, PageError> {
        let rows = self.pager.steady_limit();
        let Some(after) = self.pager.cursor().map(str::to_string) else {
            return Ok(None);
        };
        // Less than two more pages: not worth a helper (a self request, a connection, a
        // snapshot: ~4 ms on a small table).
        if !self.pager.has_rows_left(2 * rows)? {
            return Ok(None);
        }
        let snapshot = match self.pager.export_snapshot() {
            Ok(s) => s,
            Err(e) => {
                eprintln!(
                    "spin-bulk: $dump continues alone: no snapshot: {}",
                    e.message()
                );
                self.pager.rollback();
                return Ok(None);
            }
        };
        let q = &self.pager.q;
        let mut query = format!(
            "_after={}&_pages={rows}&_snapshot={snapshot}",
            encode(&after)
        );
        for (name, v) in [
            ("_since", &q.since),
            ("_until", &q.until),
            ("_upto", &q.upto),
        ] {
            if let Some(v) = v {
                query.push_str(&format!("&{name}={}", encode(v)));
            }
        }
        if q.fhir {
            query.push_str("&fhir=true");
        }
        // Send every request before waiting for any: the helpers start together.
        let mut pending: Vec<Box<dyn PendingResponse>> = Vec::new();
        for part in 1..fanout.parts {
            let url = format!("{}?_part={part}/{}&{query}", fanout.path, fanout.parts);
            match fanout.requests.send(&url, &fanout.authorization) {
                Ok(p) => pending.push(p),
                Err(e) => {
                    eprintln!("spin-bulk: $dump continues alone: self request failed: {e}");
                    return Ok(None);
                }
            }
        }
        let mut helpers = Vec::new();
        for p in pending {
            match p.wait() {
                Ok(r) if r.status == 200 => helpers.push(FrameReader::new(r.body)),
                Ok(r) => {
                    eprintln!(
                        "spin-bulk: $dump continues alone: a helper answered {}",
                        r.status
                    );
                    return Ok(None);
                }
                Err(e) => {
                    eprintln!("spin-bulk: $dump continues alone: self request failed: {e}");
                    return Ok(None);
                }
            }
        }
        Ok(Some(Split {
            walk: Walk::new(fanout.parts, fanout.parts, rows),
            helpers,
            next: 1,
            ahead: None,
            spare: Vec::new(),
        }))
    }

    fn split_page(&mut self, buf: &mut Vec<u8>) -> Result<(), String> {
        let Mode::Split(s) = &mut self.mode else {
            unreachable!("split_page outside split mode")
        };
        let of = s.walk.of;
        let owner = s.next % of;
        let fail = |e: PageError| e.message();
        let last = if owner == 0 {
            let rows = match s.ahead.take() {
                Some((mut page, rows)) => {
                    std::mem::swap(buf, &mut page);
                    s.spare = page;
                    rows
                }
                None => s.walk.next(&mut self.pager, buf).map_err(fail)?,
            };
            rows < s.walk.rows
        } else {
            // Render this instance's next page first: the helper's is being rendered meanwhile.
            if s.ahead.is_none() && !s.walk.done {
                let mut page = std::mem::take(&mut s.spare);
                page.clear();
                let rows = s.walk.next(&mut self.pager, &mut page).map_err(fail)?;
                s.ahead = Some((page, rows));
            }
            match s.helpers[owner as usize - 1].next(buf)? {
                None => true,
                Some(rows) => rows < s.walk.rows,
            }
        };
        s.next += 1;
        if last {
            if s.ahead.as_ref().is_some_and(|(_, rows)| *rows > 0) {
                return Err("the split dump's instances disagree on where it ends".into());
            }
            // Every helper must have nothing more: its end marker, not a page.
            for h in &mut s.helpers {
                h.close()?;
            }
            self.mode = Mode::Done;
        }
        Ok(())
    }
}

impl<C: Db> Pages for MainPages<C> {
    fn done(&self) -> bool {
        match self.mode {
            Mode::Done => true,
            Mode::Serial => self.pager.is_done(),
            Mode::Start(_) | Mode::Split(_) => false,
        }
    }

    fn next_page(&mut self, buf: &mut Vec<u8>) -> Result<(), String> {
        if let Mode::Start(_) = self.mode {
            let Mode::Start(fanout) = std::mem::replace(&mut self.mode, Mode::Serial) else {
                unreachable!()
            };
            match self.start_split(&fanout) {
                Ok(Some(split)) => self.mode = Mode::Split(split),
                Ok(None) => {}
                Err(e) => {
                    let name = &self.pager.q.type_name;
                    return Err(format!(
                        "$dump of {name} failed mid-stream: {}",
                        e.message()
                    ));
                }
            }
        }
        let result = match self.mode {
            Mode::Serial => Pages::next_page(&mut self.pager, buf),
            Mode::Split(_) => self.split_page(buf),
            Mode::Start(_) | Mode::Done => Ok(()),
        };
        result.map_err(|e| format!("$dump of {} failed mid-stream: {e}", self.pager.q.type_name))
    }

    fn finish(&mut self) -> Result<(), String> {
        self.pager.end().map_err(|e| e.message())
    }

    fn abort(&mut self) {
        self.pager.rollback();
        self.mode = Mode::Done;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::BytesBody;

    /// A body that hands out its bytes in chunks of a fixed size.
    struct Chunked(Vec<u8>, usize);
    impl BodyReader for Chunked {
        fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, String> {
            if self.0.is_empty() {
                return Ok(None);
            }
            let n = self.1.min(self.0.len());
            Ok(Some(self.0.drain(..n).collect()))
        }
    }

    fn frame(page: &[u8], rows: u64) -> Vec<u8> {
        let mut f = vec![0; HEADER_LEN];
        put_header(&mut f, page.len() as u64, rows);
        f.extend_from_slice(page);
        f
    }

    #[test]
    fn frames_read_back_whatever_the_chunking() {
        let pages: Vec<(Vec<u8>, u64)> = vec![
            (b"{\"a\":1}\n{\"b\":2}\n".to_vec(), 2),
            (vec![b'x'; 100_000], 7),
            (b"E\n".to_vec(), 1),
        ];
        let mut stream = Vec::new();
        for (p, rows) in &pages {
            stream.extend(frame(p, *rows));
        }
        stream.extend_from_slice(END);
        for chunk in [1, 2, 3, 25, 26, 27, 4096, 1 << 20] {
            let mut r = FrameReader::new(Box::new(Chunked(stream.clone(), chunk)));
            for (p, rows) in &pages {
                let mut out = b"kept".to_vec();
                assert_eq!(r.next(&mut out).unwrap(), Some(*rows), "chunk {chunk}");
                assert_eq!(&out[..4], b"kept");
                assert_eq!(&out[4..], &p[..], "chunk {chunk}");
            }
            assert_eq!(r.next(&mut Vec::new()).unwrap(), None);
            // Asked again (the end check after the last page), still the end.
            assert_eq!(r.next(&mut Vec::new()).unwrap(), None);
            r.close().unwrap();
        }
        // Anything after the end marker is an error, not a clean end.
        let mut extra = stream.clone();
        extra.extend_from_slice(b"P");
        let mut r = FrameReader::new(Box::new(Chunked(extra, 4096)));
        for _ in &pages {
            r.next(&mut Vec::new()).unwrap();
        }
        assert!(r.close().is_err());
        // A page where the end should be is an error too.
        let mut r = FrameReader::new(Box::new(Chunked(stream.clone(), 4096)));
        assert!(r.close().is_err());
    }

    #[test]
    fn a_stream_cut_anywhere_is_an_error_not_an_end() {
        let mut stream = frame(b"{\"a\":1}\n", 1);
        stream.extend_from_slice(END);
        for cut in 0..stream.len() - 1 {
            let mut r = FrameReader::new(Box::new(BytesBody(Some(stream[..cut].to_vec()))));
            let mut out = Vec::new();
            let first = r.next(&mut out);
            let failed = match first {
                Err(_) => true,
                Ok(Some(_)) => r.next(&mut out).is_err(),
                Ok(None) => false,
            };
            assert!(failed, "cut at {cut} read as complete");
        }
        let mut bad = frame(b"x", 1);
        bad[0] = b'Q';
        assert!(FrameReader::new(Box::new(BytesBody(Some(bad))))
            .next(&mut Vec::new())
            .is_err());
    }
}
