//! Turning stored rows into output lines.
//!
//! A row of the Aidbox layout keeps `id`, `txid`, `ts`, `cts` in columns and the rest of the
//! resource as jsonb. An exported line is the resource with `resourceType`, `id` and `meta`
//! merged in. PostgreSQL already rendered the jsonb as text (`resource::text`), so the common
//! case is pure byte splicing: our prefix, then the stored text minus its opening brace. Only a
//! resource whose text mentions a top-level key we own (`id`, `resourceType`, `meta`) is parsed —
//! shallowly, borrowing the values as raw JSON — so stored meta fields (profile, tag, security)
//! survive and no key is ever written twice.

use crate::db::{DateTime, Value};
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt;

/// The URL of the `meta.extension` that carries the creation time in FHIR mode (as Aidbox does).
pub const CREATED_AT_URL: &str = "ex:createdAt";

/// The select list that [`LineEncoder::push_row`] reads, for a table aliased or not.
/// Timestamps come as plain UTC timestamps: a bare timestamptz fails the whole query on Spin.
pub fn row_columns(type_name: &str) -> String {
    format!(
        "id, txid, ts AT TIME ZONE 'UTC', cts AT TIME ZONE 'UTC', {}",
        resource_text_sql(type_name)
    )
}

/// The resource as PostgreSQL's own JSON text. A Client's `secret` (a hash) never leaves the
/// database.
pub fn resource_text_sql(type_name: &str) -> &'static str {
    if type_name == "Client" {
        "(resource - 'secret')::text"
    } else {
        "resource::text"
    }
}

/// The per-row columns that become `id` and `meta`.
pub struct RowMeta<'a> {
    pub id: &'a str,
    pub txid: i64,
    pub ts: Instant,
    pub cts: Instant,
}

/// What [`LineEncoder::push_page`] found in a page.
#[derive(Debug, Default, PartialEq)]
pub struct PageLines<'t> {
    /// Lines written.
    pub lines: usize,
    /// Bytes of stored JSON text written (for sizing the next page).
    pub bytes: usize,
    /// The id of the last row of the page (written or left out): the next page's cursor.
    pub last_id: Option<&'t str>,
}

/// Writes ndjson lines for one resource type. Built once per request.
pub struct LineEncoder {
    /// `{"resourceType":"Patient","id":` — the same for every line.
    prefix: Vec<u8>,
    fhir: bool,
    owned_keys: OwnedKeys,
}

impl LineEncoder {
    /// `fhir`: put the creation time in a `meta.extension` entry (valid FHIR) rather than in
    /// Aidbox's `meta.createdAt`.
    pub fn new(resource_type: &str, fhir: bool) -> Self {
        let mut prefix = b"{\"resourceType\":".to_vec();
        push_json_str(&mut prefix, resource_type);
        prefix.extend_from_slice(b",\"id\":");
        LineEncoder {
            prefix,
            fhir,
            owned_keys: OwnedKeys::new(),
        }
    }

    /// Appends the line of a row selected with [`row_columns`] (id, txid, ts, cts, resource).
    /// Returns `Ok(false)` without writing when the resource is NULL.
    pub fn push_row(&self, out: &mut Vec<u8>, row: &[Value]) -> Result<bool, String> {
        let [id, txid, ts, cts, resource, ..] = row else {
            return Err("row has too few columns".into());
        };
        let Value::Str(resource) = resource else {
            return Ok(false);
        };
        let (Value::Str(id), Some(txid), Value::DateTime(ts), Value::DateTime(cts)) =
            (id, txid.as_i64(), ts, cts)
        else {
            return Err("row has unexpected column types".into());
        };
        let meta = RowMeta {
            id,
            txid,
            ts: Instant::new(ts),
            cts: Instant::new(cts),
        };
        self.push_line(out, &meta, resource).map(|()| true)
    }

    /// Appends the lines of one `$dump` page (see `dump::page_sql`): rows joined by `\n`, each
    /// `len\tid\ttxid\tts\tcts\tresource` — the id raw after its byte length (ids may hold
    /// tabs and newlines; nothing else here can), the instants as UTC `timestamp` text, `cts`
    /// empty when it equals `ts`, the resource as PostgreSQL's jsonb text, which never holds a
    /// raw tab or newline. A row left out for its size is just `len\tid`: `left_out` is called
    /// with its id at its position, and writes it (the caller reads it alone).
    pub fn push_page<'t>(
        &self,
        out: &mut Vec<u8>,
        text: &'t str,
        mut left_out: impl FnMut(&mut Vec<u8>, &'t str) -> Result<(), String>,
    ) -> Result<PageLines<'t>, String> {
        let mut page = PageLines::default();
        // Rows written together share their `ts` (bulk writes take one `now()`): an instant is
        // parsed and rendered again only when its text changes (a fifth of the component's time
        // on a page of small rows went to rendering the same instant twice per row).
        let mut instants = InstantCache::default();
        let mut rest = text;
        while !rest.is_empty() {
            let short = || format!("bad page line: {:.80}", rest);
            let (len, after_len) = cut(rest, b'\t').ok_or_else(short)?;
            let len: usize = len.parse().map_err(|_| short())?;
            let id = after_len.get(..len).ok_or_else(short)?;
            let after_id = &after_len[len..];
            page.last_id = Some(id);
            page.lines += 1;
            let Some(fields) = after_id.strip_prefix('\t') else {
                // A left-out row: `len\tid` then the separator or the end.
                rest = match after_id.strip_prefix('\n') {
                    Some(r) => r,
                    None if after_id.is_empty() => after_id,
                    None => return Err(short()),
                };
                left_out(out, id)?;
                continue;
            };
            let end = memchr::memchr(b'\n', fields.as_bytes()).unwrap_or(fields.len());
            let mut f = &fields[..end];
            let mut field = || {
                let (value, after) = cut(f, b'\t')?;
                f = after;
                Some(value)
            };
            let (Some(txid), Some(ts), Some(cts)) = (field(), field(), field()) else {
                return Err(short());
            };
            let resource = f;
            let bad = |what: &str, v: &str| format!("bad {what} {v:?} for id {id:?}");
            let ts_value = instants.get(ts).ok_or_else(|| bad("ts", ts))?;
            let meta = RowMeta {
                id,
                txid: txid.parse().map_err(|_| bad("txid", txid))?,
                ts: ts_value,
                cts: if cts.is_empty() {
                    ts_value
                } else {
                    instants.get(cts).ok_or_else(|| bad("cts", cts))?
                },
            };
            self.push_line(out, &meta, resource)?;
            page.bytes += resource.len();
            rest = fields.get(end + 1..).unwrap_or("");
        }
        Ok(page)
    }

    /// Appends one line (with its `\n`) to `out`. Fails only if the stored resource is not a
    /// JSON object, which the Aidbox layout never produces.
    pub fn push_line(
        &self,
        out: &mut Vec<u8>,
        row: &RowMeta,
        resource: &str,
    ) -> Result<(), String> {
        let body = resource.trim_start();
        if !body.starts_with('{') {
            return Err(format!("resource {:?} is not a JSON object", row.id));
        }
        if self.owned_keys.mentioned_in(body) {
            return self.push_merged(out, row, body);
        }
        out.extend_from_slice(&self.prefix);
        push_json_str(out, row.id);
        out.extend_from_slice(b",\"meta\":{");
        self.push_own_meta(out, row);
        out.push(b'}');
        let rest = body[1..].trim_start();
        if !rest.starts_with('}') {
            out.push(b',');
        }
        out.extend_from_slice(rest.as_bytes());
        out.push(b'\n');
        Ok(())
    }

    /// `"versionId":…,"lastUpdated":…,` and the creation time — without braces.
    fn push_own_meta(&self, out: &mut Vec<u8>, row: &RowMeta) {
        out.extend_from_slice(b"\"versionId\":\"");
        out.extend_from_slice(itoa::Buffer::new().format(row.txid).as_bytes());
        out.extend_from_slice(b"\",\"lastUpdated\":\"");
        out.extend_from_slice(row.ts.as_bytes());
        if self.fhir {
            out.extend_from_slice(b"\",\"extension\":[");
            self.push_created_extension(out, row);
            out.push(b']');
        } else {
            out.extend_from_slice(b"\",\"createdAt\":\"");
            out.extend_from_slice(row.cts.as_bytes());
            out.push(b'"');
        }
    }

    fn push_created_extension(&self, out: &mut Vec<u8>, row: &RowMeta) {
        out.extend_from_slice(b"{\"url\":\"");
        out.extend_from_slice(CREATED_AT_URL.as_bytes());
        out.extend_from_slice(b"\",\"valueInstant\":\"");
        out.extend_from_slice(row.cts.as_bytes());
        out.extend_from_slice(b"\"}");
    }

    /// The slow path: the stored resource has (or may have) its own `id`, `resourceType` or
    /// `meta` at the top level.
    fn push_merged(&self, out: &mut Vec<u8>, row: &RowMeta, body: &str) -> Result<(), String> {
        let members = top_level_members(body)
            .map_err(|e| format!("resource {:?} is not valid JSON: {e}", row.id))?;
        out.extend_from_slice(&self.prefix);
        push_json_str(out, row.id);
        out.extend_from_slice(b",\"meta\":{");
        self.push_own_meta_merged(
            out,
            row,
            members.iter().find(|(k, _)| k == "meta").map(|(_, v)| *v),
        );
        out.push(b'}');
        for (key, value) in &members {
            if matches!(key.as_ref(), "id" | "resourceType" | "meta") {
                continue;
            }
            out.push(b',');
            push_json_str(out, key);
            out.push(b':');
            out.extend_from_slice(value.get().as_bytes());
        }
        out.extend_from_slice(b"}\n");
        Ok(())
    }

    /// Our meta fields, then whatever else the stored meta had (profile, tag, security, …).
    fn push_own_meta_merged(&self, out: &mut Vec<u8>, row: &RowMeta, stored: Option<&RawValue>) {
        let stored: Vec<(Cow<str>, &RawValue)> = stored
            .and_then(|raw| top_level_members(raw.get()).ok())
            .unwrap_or_default();
        if !self.fhir {
            self.push_own_meta(out, row);
        } else {
            // Keep stored extensions other than an older creation time, then add ours.
            out.extend_from_slice(b"\"versionId\":\"");
            out.extend_from_slice(itoa::Buffer::new().format(row.txid).as_bytes());
            out.extend_from_slice(b"\",\"lastUpdated\":\"");
            out.extend_from_slice(row.ts.as_bytes());
            out.extend_from_slice(b"\",\"extension\":[");
            if let Some((_, ext)) = stored.iter().find(|(k, _)| k == "extension") {
                if let Ok(list) = serde_json::from_str::<Vec<&RawValue>>(ext.get()) {
                    for item in list {
                        let is_created = serde_json::from_str::<UrlOnly>(item.get())
                            .is_ok_and(|u| u.url.as_deref() == Some(CREATED_AT_URL));
                        if !is_created {
                            out.extend_from_slice(item.get().as_bytes());
                            out.push(b',');
                        }
                    }
                }
            }
            self.push_created_extension(out, row);
            out.push(b']');
        }
        for (key, value) in &stored {
            let ours = matches!(key.as_ref(), "versionId" | "lastUpdated" | "createdAt")
                || (self.fhir && key == "extension");
            if !ours {
                out.push(b',');
                push_json_str(out, key);
                out.push(b':');
                out.extend_from_slice(value.get().as_bytes());
            }
        }
    }
}

#[derive(serde::Deserialize)]
struct UrlOnly<'a> {
    #[serde(borrow)]
    url: Option<Cow<'a, str>>,
}

/// A cheap over-approximation of "the object has a top-level key we write ourselves": any
/// occurrence of the quoted key followed by a colon. False positives (a nested `"id"`) only
/// cost the slow path, never correctness. SIMD substring search (memchr's `memmem`, simd128 in
/// the component) over the text; measured cheaper than asking PostgreSQL (`resource ?| …`
/// cost the page query ~0.4 µs a row).
struct OwnedKeys {
    finders: [memchr::memmem::Finder<'static>; 3],
}

impl OwnedKeys {
    fn new() -> Self {
        OwnedKeys {
            finders: [
                memchr::memmem::Finder::new(b"\"id\""),
                memchr::memmem::Finder::new(b"\"meta\""),
                memchr::memmem::Finder::new(b"\"resourceType\""),
            ],
        }
    }

    fn mentioned_in(&self, body: &str) -> bool {
        let b = body.as_bytes();
        self.finders.iter().any(|f| {
            let n = f.needle().len();
            f.find_iter(b)
                .any(|at| b[at + n..].iter().find(|c| !c.is_ascii_whitespace()) == Some(&b':'))
        })
    }
}

/// The members of a JSON object in their stored order, values kept as raw JSON text. A key
/// borrows from `json` unless it holds an escape (serde's own `Cow<str>` always allocates).
pub fn top_level_members(json: &str) -> Result<Vec<(Cow<'_, str>, &RawValue)>, serde_json::Error> {
    struct Key<'de>(Cow<'de, str>);
    impl<'de> serde::Deserialize<'de> for Key<'de> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct KeyVisitor;
            impl<'de> Visitor<'de> for KeyVisitor {
                type Value = Key<'de>;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a string")
                }
                fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                    Ok(Key(Cow::Borrowed(v)))
                }
                fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                    Ok(Key(Cow::Owned(v.to_string())))
                }
            }
            d.deserialize_str(KeyVisitor)
        }
    }
    struct Members;
    impl<'de> Visitor<'de> for Members {
        type Value = Vec<(Cow<'de, str>, &'de RawValue)>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
                let value: &'de RawValue = map.next_value()?;
                out.push((key, value));
            }
            Ok(out)
        }
    }
    let mut de = serde_json::Deserializer::from_str(json);
    let members = (&mut de).deserialize_map(Members)?;
    de.end()?;
    Ok(members)
}

/// Parses PostgreSQL's ISO text of a `timestamp` (`2024-01-31 12:05:09.123456`; the session's
/// DateStyle is set to ISO on connect). Years beyond 9999 and BC dates are refused: an RFC 3339
/// instant cannot hold them.
pub fn parse_timestamp(s: &str) -> Option<DateTime> {
    let b = s.as_bytes();
    if b.len() < 19
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b' '
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        let d = b.get(r)?;
        d.iter()
            .all(u8::is_ascii_digit)
            .then(|| d.iter().fold(0, |n, c| n * 10 + u32::from(c - b'0')))
    };
    let mut nanosecond = 0;
    if b.len() > 19 {
        let frac = b.get(20..)?;
        if b[19] != b'.'
            || frac.is_empty()
            || frac.len() > 6
            || !frac.iter().all(u8::is_ascii_digit)
        {
            return None;
        }
        let digits = frac.iter().fold(0u32, |n, c| n * 10 + u32::from(c - b'0'));
        nanosecond = digits * 10u32.pow(9 - frac.len() as u32);
    }
    Some(DateTime {
        year: num(0..4)? as i32,
        month: num(5..7)? as u8,
        day: num(8..10)? as u8,
        hour: num(11..13)? as u8,
        minute: num(14..16)? as u8,
        second: num(17..19)? as u8,
        nanosecond,
    })
}

/// Appends `s` as a JSON string literal.
pub fn push_json_str(out: &mut Vec<u8>, s: &str) {
    if s.bytes().all(|c| c >= 0x20 && c != b'"' && c != b'\\') {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        // serde_json writes into a Vec without failing.
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

/// Splits at the first `byte` (ASCII, so always at a char boundary), without it.
fn cut(s: &str, byte: u8) -> Option<(&str, &str)> {
    let at = memchr::memchr(byte, s.as_bytes())?;
    Some((&s[..at], &s[at + 1..]))
}

/// An RFC 3339 UTC instant, rendered once: `2024-01-31T12:00:00.123Z` (milliseconds) or with
/// microseconds when the value has them, as PostgreSQL stores microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Instant {
    text: [u8; 27],
    len: u8,
}

impl Instant {
    pub fn new(t: &DateTime) -> Instant {
        fn two(out: &mut [u8], v: u8) {
            out[0] = b'0' + v / 10;
            out[1] = b'0' + v % 10;
        }
        let mut b = *b"0000-00-00T00:00:00.000000Z";
        let year = t.year.clamp(0, 9999) as u32;
        b[0] = b'0' + (year / 1000) as u8;
        b[1] = b'0' + (year / 100 % 10) as u8;
        b[2] = b'0' + (year / 10 % 10) as u8;
        b[3] = b'0' + (year % 10) as u8;
        two(&mut b[5..], t.month);
        two(&mut b[8..], t.day);
        two(&mut b[11..], t.hour);
        two(&mut b[14..], t.minute);
        two(&mut b[17..], t.second);
        let micros = t.nanosecond / 1000;
        let (mut value, digits) = if micros % 1000 == 0 {
            (micros / 1000, 3)
        } else {
            (micros, 6)
        };
        for slot in b[20..20 + digits].iter_mut().rev() {
            *slot = b'0' + (value % 10) as u8;
            value /= 10;
        }
        b[20 + digits] = b'Z';
        Instant {
            text: b,
            len: (21 + digits) as u8,
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.text[..usize::from(self.len)]
    }
}

/// The last instant text seen in a page and its rendering.
#[derive(Default)]
struct InstantCache<'t> {
    last: Option<(&'t str, Instant)>,
}

impl<'t> InstantCache<'t> {
    fn get(&mut self, text: &'t str) -> Option<Instant> {
        match self.last {
            Some((seen, instant)) if seen == text => Some(instant),
            _ => {
                let instant = Instant::new(&parse_timestamp(text)?);
                self.last = Some((text, instant));
                Some(instant)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    const TS: DateTime = DateTime {
        year: 2024,
        month: 1,
        day: 31,
        hour: 12,
        minute: 5,
        second: 9,
        nanosecond: 123_456_000,
    };
    const CTS: DateTime = DateTime {
        year: 2023,
        month: 12,
        day: 1,
        hour: 0,
        minute: 0,
        second: 0,
        nanosecond: 0,
    };

    fn line(fhir: bool, id: &str, resource: &str) -> String {
        let enc = LineEncoder::new("Patient", fhir);
        let mut out = Vec::new();
        let row = RowMeta {
            id,
            txid: 42,
            ts: Instant::new(&TS),
            cts: Instant::new(&CTS),
        };
        enc.push_line(&mut out, &row, resource).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn fast_path_splices_text() {
        let l = line(
            false,
            "p1",
            r#"{"name": [{"family": "John"}], "value": 1.50}"#,
        );
        assert_eq!(
            l,
            "{\"resourceType\":\"Patient\",\"id\":\"p1\",\"meta\":{\"versionId\":\"42\",\"lastUpdated\":\"2024-01-31T12:05:09.123456Z\",\"createdAt\":\"2023-12-01T00:00:00.000Z\"},\"name\": [{\"family\": \"John\"}], \"value\": 1.50}\n"
        );
    }

    #[test]
    fn empty_resource_and_escaped_id() {
        let l = line(false, "a\"b\\c\u{e9}", "{}");
        let v: Value = serde_json::from_str(&l).unwrap();
        assert_eq!(v["id"], "a\"b\\c\u{e9}");
        assert_eq!(v.as_object().unwrap().len(), 3);
    }

    #[test]
    fn fhir_mode_uses_extension() {
        let v: Value = serde_json::from_str(&line(true, "p", r#"{"a": 1}"#)).unwrap();
        assert_eq!(
            v["meta"],
            json!({"versionId": "42", "lastUpdated": "2024-01-31T12:05:09.123456Z",
                   "extension": [{"url": "ex:createdAt", "valueInstant": "2023-12-01T00:00:00.000Z"}]})
        );
        assert!(v["meta"].get("createdAt").is_none());
    }

    #[test]
    fn stored_meta_keeps_profile_and_tag_without_duplicate_keys() {
        let stored = r#"{"id": "wrong", "meta": {"tag": [{"code": "t"}], "profile": ["http://p"], "versionId": "old", "lastUpdated": "1999-01-01T00:00:00Z"}, "resourceType": "Wrong", "x": {"id": "nested"}}"#;
        let l = line(false, "p1", stored);
        // No duplicate keys anywhere: parse as an ordered list of members and count.
        let members = top_level_members(l.trim_end()).unwrap();
        let keys: Vec<&str> = members.iter().map(|(k, _)| k.as_ref()).collect();
        assert_eq!(keys, vec!["resourceType", "id", "meta", "x"]);
        let v: Value = serde_json::from_str(&l).unwrap();
        assert_eq!(v["id"], "p1");
        assert_eq!(v["resourceType"], "Patient");
        assert_eq!(v["x"]["id"], "nested");
        assert_eq!(v["meta"]["versionId"], "42");
        assert_eq!(v["meta"]["lastUpdated"], "2024-01-31T12:05:09.123456Z");
        assert_eq!(v["meta"]["tag"], json!([{"code": "t"}]));
        assert_eq!(v["meta"]["profile"], json!(["http://p"]));
        let meta_keys: Vec<String> = top_level_members(v["meta"].to_string().as_str())
            .unwrap()
            .into_iter()
            .map(|(k, _)| k.into_owned())
            .collect();
        assert_eq!(meta_keys.iter().filter(|k| *k == "versionId").count(), 1);
    }

    #[test]
    fn fhir_mode_merges_stored_extensions() {
        let stored = r#"{"meta": {"extension": [{"url": "ex:createdAt", "valueInstant": "old"}, {"url": "other", "valueString": "keep"}], "security": [1]}}"#;
        let v: Value = serde_json::from_str(&line(true, "p", stored)).unwrap();
        assert_eq!(
            v["meta"]["extension"],
            json!([{"url": "other", "valueString": "keep"},
                   {"url": "ex:createdAt", "valueInstant": "2023-12-01T00:00:00.000Z"}])
        );
        assert_eq!(v["meta"]["security"], json!([1]));
    }

    #[test]
    fn nested_id_takes_slow_path_and_keeps_bytes_of_values() {
        let stored = r#"{"contained": [{"id": "c1", "n": 1.50}], "big": 12345678901234567890123}"#;
        let l = line(false, "p", stored);
        assert!(l.contains("1.50"));
        assert!(l.contains("12345678901234567890123"));
    }

    #[test]
    fn instants_render_milliseconds_or_microseconds() {
        let at = |s: &str| {
            String::from_utf8(
                Instant::new(&parse_timestamp(s).unwrap())
                    .as_bytes()
                    .to_vec(),
            )
            .unwrap()
        };
        assert_eq!(at("2024-01-31 12:05:09"), "2024-01-31T12:05:09.000Z");
        assert_eq!(at("2024-01-31 12:05:09.5"), "2024-01-31T12:05:09.500Z");
        assert_eq!(at("2024-01-31 12:05:09.123"), "2024-01-31T12:05:09.123Z");
        assert_eq!(
            at("2024-01-31 12:05:09.1234"),
            "2024-01-31T12:05:09.123400Z"
        );
        assert_eq!(
            at("0001-02-03 04:05:06.000007"),
            "0001-02-03T04:05:06.000007Z"
        );
    }

    /// Each row keeps its own instants when they change from row to row within a page.
    #[test]
    fn page_rows_keep_their_own_instants() {
        let enc = LineEncoder::new("Patient", false);
        let page = "1\ta\t1\t2024-01-01 00:00:00\t\t{}\n\
                    1\tb\t1\t2024-01-01 00:00:00\t2023-05-05 05:05:05.5\t{}\n\
                    1\tc\t1\t2024-02-02 00:00:00.25\t\t{}\n\
                    1\td\t1\t2024-01-01 00:00:00\t\t{}";
        let mut out = Vec::new();
        enc.push_page(&mut out, page, |_, _| Ok(())).unwrap();
        let lines: Vec<Value> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let metas: Vec<(&str, &str)> = lines
            .iter()
            .map(|l| {
                (
                    l["meta"]["lastUpdated"].as_str().unwrap(),
                    l["meta"]["createdAt"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            metas,
            [
                ("2024-01-01T00:00:00.000Z", "2024-01-01T00:00:00.000Z"),
                ("2024-01-01T00:00:00.000Z", "2023-05-05T05:05:05.500Z"),
                ("2024-02-02T00:00:00.250Z", "2024-02-02T00:00:00.250Z"),
                ("2024-01-01T00:00:00.000Z", "2024-01-01T00:00:00.000Z"),
            ]
        );
    }

    #[test]
    fn parses_postgres_timestamp_text() {
        let t = parse_timestamp("2024-01-31 12:05:09.123456").unwrap();
        assert_eq!(t, TS);
        let t = parse_timestamp("2023-12-01 00:00:00").unwrap();
        assert_eq!(t, CTS);
        assert_eq!(
            parse_timestamp("2024-01-31 12:05:09.5").unwrap().nanosecond,
            500_000_000
        );
        for bad in [
            "",
            "2024-01-31T12:05:09",
            "12345-01-01 00:00:00",
            "2024-01-31 12:05:09 BC",
            "2024-01-31 12:05:09.",
            "2024-01-31 12:05:09.1234567",
        ] {
            assert!(parse_timestamp(bad).is_none(), "{bad}");
        }
    }

    fn no_left_out(_: &mut Vec<u8>, id: &str) -> Result<(), String> {
        Err(format!("unexpected left-out row {id}"))
    }

    #[test]
    fn page_lines_match_row_lines() {
        let enc = LineEncoder::new("Patient", false);
        let mut a = Vec::new();
        // An id with a tab, a newline and a quote; cts empty = ts.
        let page =
            "5\tp\t\n\"1\t42\t2024-01-31 12:05:09.123456\t2023-12-01 00:00:00\t{\"a\": 1.50}\n\
                    1\tq\t7\t2024-01-31 12:05:09.123456\t\t{}";
        let got = enc.push_page(&mut a, page, no_left_out).unwrap();
        assert_eq!(
            got,
            PageLines {
                lines: 2,
                bytes: 13,
                last_id: Some("q")
            }
        );
        let mut b = Vec::new();
        for (id, txid, cts, resource) in
            [("p\t\n\"1", 42, CTS, "{\"a\": 1.50}"), ("q", 7, TS, "{}")]
        {
            let row = RowMeta {
                id,
                txid,
                ts: Instant::new(&TS),
                cts: Instant::new(&cts),
            };
            enc.push_line(&mut b, &row, resource).unwrap();
        }
        assert_eq!(String::from_utf8(a).unwrap(), String::from_utf8(b).unwrap());
        for bad in [
            "1\tx\t1\t2024",
            "9\tx\t1\t2024-01-31 12:05:09\t\t{}",
            "x\tx\t1\t2024-01-31 12:05:09\t\t{}",
            "1\tx\tone\t2024-01-31 12:05:09\t\t{}",
            "1\tx\t1\t2024-01-31\t\t{}",
            "1\txy",
        ] {
            assert!(
                enc.push_page(&mut Vec::new(), bad, no_left_out).is_err(),
                "{bad:?}"
            );
        }
        // A stored id goes to the merge path: no duplicate keys.
        let mut c = Vec::new();
        let flagged = "1\tx\t1\t2024-01-31 12:05:09\t\t{\"id\": \"y\"}";
        enc.push_page(&mut c, flagged, no_left_out).unwrap();
        assert_eq!(String::from_utf8(c).unwrap().matches("\"id\"").count(), 1);
    }

    #[test]
    fn left_out_rows_are_written_in_place() {
        let enc = LineEncoder::new("Patient", false);
        let mut out = Vec::new();
        let page = "1\ta\t1\t2024-01-31 12:05:09\t\t{}\n2\tb\n\n1\tc\t1\t2024-01-31 12:05:09\t\t{}\n2\td\n";
        let got = enc
            .push_page(&mut out, page, |out, id| {
                out.extend_from_slice(format!("<{id}>\n").as_bytes());
                Ok(())
            })
            .unwrap();
        assert_eq!(got.lines, 4);
        assert_eq!(got.last_id, Some("d\n"));
        // Left-out rows come back as `<id>` lines (ids may hold a newline), the rest as JSON.
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("{\"resourceType\":\"Patient\",\"id\":\"a\","));
        assert!(text.contains("}\n<b\n>\n{\"resourceType\":\"Patient\",\"id\":\"c\","));
        assert!(text.ends_with("}\n<d\n>\n"));
    }

    #[test]
    fn non_object_is_an_error() {
        let enc = LineEncoder::new("Patient", false);
        let row = RowMeta {
            id: "x",
            txid: 1,
            ts: Instant::new(&TS),
            cts: Instant::new(&CTS),
        };
        assert!(enc.push_line(&mut Vec::new(), &row, "[1]").is_err());
    }

    #[test]
    fn members_borrow_keys_without_escapes() {
        let m = top_level_members(r#"{"a": 1, "b\"c": [2]}"#).unwrap();
        assert!(matches!(m[0].0, Cow::Borrowed("a")));
        assert!(matches!(&m[1].0, Cow::Owned(k) if k == "b\"c"));
        assert_eq!(m[1].1.get(), "[2]");
    }

    #[test]
    fn detects_owned_keys() {
        let k = OwnedKeys::new();
        assert!(k.mentioned_in(r#"{"id": 1}"#));
        assert!(k.mentioned_in(r#"{"a": {"meta" : 1}}"#));
        assert!(k.mentioned_in(r#"{"b": "id", "resourceType":"x"}"#));
        assert!(!k.mentioned_in(r#"{"identifier": [], "resource": "id"}"#));
        assert!(!k.mentioned_in(r#"{"name": "meta"}"#));
        assert!(!k.mentioned_in(r#"{"name": "id""#));
    }
}
