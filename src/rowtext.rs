//! How a row of a `$dump-sql` query reaches the component, and how it becomes a line of
//! COPY's TSV or CSV.
//!
//! Every value crossing Spin's PostgreSQL interface costs a guest allocation and a host call
//! (measured: the bench query's four columns as four text values took 2.5 s outside
//! PostgreSQL for 1M rows, one value per row 0.8 s), so a row comes over as *one* value that
//! PostgreSQL rendered (and Spin can't mangle: no value of the user's query ever reaches Spin
//! in its own type). Two shapes:
//!
//! - [`RowText::Line`] (the usual one): a `bytea` made in SQL from each column's own output
//!   function — exactly what COPY writes for it (bool as `t`, `char(n)` padded, inet without
//!   `/32`, timestamptz in the session's TimeZone, …) — as UTF-8 bytes, fields separated by
//!   the byte 0xFF, a NULL field the single byte 0xFE. Neither byte ever occurs in UTF-8, so
//!   the split needs no escaping in SQL; the component escapes each field for TSV or CSV, or,
//!   when no field needs it (almost every row), copies the line once with its separators
//!   turned into the delimiter. (Databases in `SQL_ASCII`, whose text may hold any byte, take
//!   the record shape.)
//! - [`RowText::Record`]: `ROW(t.*)::text`, PostgreSQL's record syntax, parsed back by
//!   [`for_each_field`]. Used when the query has no columns, or a column of a pseudo-type
//!   (`record`, `anyarray`, …) whose output function can't be named safely.
//!
//! Measured on 1M rows of `select id, txid, ts, resource#>>'{name,0,family}' from patient`,
//! backend CPU of the cursor's FETCHes (best of five or six; this machine drifts ±30%):
//! `ROW(t.*)::text` 2.15 s (`record_out` forms a tuple per row, deforms it again and scans
//! every field for quoting), a tab-separated text line with `\` and tab escaped in SQL 1.70 s
//! (each `replace` call ~90 ns), COPY itself 1.10 s. The line's expression alone (without
//! sending): as text with `replace` 1.71 s, as `bytea` 1.43 s.
//!
//! The column types come from a describe query that never runs the user's query (see
//! [`types_sql`]).

/// The output formats of `$dump-sql`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Tsv,
    Csv,
    Ndjson,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Tsv => "text/tab-separated-values",
            Format::Csv => "text/csv",
            Format::Ndjson => "application/ndjson",
        }
    }
}

/// The shape of the one value per row (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowText {
    Line,
    Record,
}

/// Built-in types whose output is ASCII and never holds a backslash, whatever the settings
/// (DateStyle, IntervalStyle, extra_float_digits): int2/4/8, oid, float4/8, numeric, date,
/// time, timetz, timestamp, timestamptz, interval, uuid.
const PLAIN_TYPES: &[u32] = &[
    20, 21, 23, 26, 700, 701, 1700, 1082, 1083, 1266, 1114, 1184, 1186, 2950,
];
const TEXT: u32 = 25;
const VARCHAR: u32 = 1043;

/// A column of the user's query as the describe query reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnType {
    pub oid: u32,
    /// `pg_type.typtype = 'p'`: a pseudo-type (`record`, `anyarray`, `void`, …).
    pub pseudo: bool,
    /// The type's output function, schema-qualified and quoted.
    pub output: String,
}

/// `head`, the user's query with its columns renamed by position (`(\n<query>\n) q(c1, …,
/// cn)`, so duplicate, empty or awkward names don't matter), then `tail`. Returns the statement
/// and the text before the user's query in it (for error positions).
pub fn positional(head: &str, query: &str, ncols: usize, tail: &str) -> (String, String) {
    let names: Vec<String> = (1..=ncols).map(|i| format!("c{i}")).collect();
    let prefix = format!("{head}(\n");
    let sql = format!("{prefix}{query}\n) q({}){tail}", names.join(", "));
    (sql, prefix)
}

/// The describe query for column types: one text, the server encoding, `|`, then
/// `oid typtype output` per column, `,` between columns. Like the name describe, the user's
/// query runs under `LIMIT 0` on the nullable side of a join with one row, so it never
/// produces a row but `pg_typeof` still sees each column's type. Returns the statement and the
/// text before the user's query in it.
pub fn types_sql(query: &str, ncols: usize) -> (String, String) {
    let typeofs: Vec<String> = (1..=ncols).map(|i| format!("pg_typeof(q.c{i})")).collect();
    let head = format!(
        "SELECT current_setting('server_encoding') || '|' || \
         string_agg(concat(o.t::oid, ' ', ty.typtype, ' ', quote_ident(n.nspname), '.', \
         quote_ident(p.proname)), ',' ORDER BY o.i) \
         FROM (SELECT ARRAY[{}]::oid[] AS ts FROM (SELECT) x LEFT JOIN \
         (SELECT * FROM ",
        typeofs.join(", ")
    );
    let tail = " LIMIT 0) q ON true) d \
         CROSS JOIN LATERAL unnest(d.ts) WITH ORDINALITY AS o(t, i) \
         JOIN pg_catalog.pg_type ty ON ty.oid = o.t \
         JOIN pg_catalog.pg_proc p ON p.oid = ty.typoutput \
         JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace";
    positional(&head, query, ncols, tail)
}

/// The describe's answer: the server encoding and the columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Described {
    pub encoding: String,
    pub columns: Vec<ColumnType>,
}

/// Reads the types describe's text back.
pub fn parse_types(desc: &str, ncols: usize) -> Result<Described, String> {
    let bad = || format!("unexpected column types from PostgreSQL: {desc}");
    let (encoding, cols) = desc.split_once('|').ok_or_else(bad)?;
    let columns = cols
        .split(',')
        .map(|col| {
            let mut it = col.splitn(3, ' ');
            let (Some(oid), Some(typtype), Some(output)) = (it.next(), it.next(), it.next()) else {
                return Err(bad());
            };
            Ok(ColumnType {
                oid: oid.parse().map_err(|_| bad())?,
                pseudo: typtype == "p",
                output: output.to_string(),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if columns.len() == ncols {
        Ok(Described {
            encoding: encoding.to_string(),
            columns,
        })
    } else {
        Err(bad())
    }
}

/// Field separator and NULL marker of a [`RowText::Line`]: bytes that never occur in UTF-8.
const SEP: u8 = 0xFF;
const NULL: u8 = 0xFE;

/// The cursor's select list for [`RowText::Line`] over [`positional`] columns, or `None`
/// when the query needs [`RowText::Record`].
pub fn line_select(d: &Described) -> Option<String> {
    let types = &d.columns;
    if types.is_empty() || types.iter().any(|t| t.pseudo) || d.encoding == "SQL_ASCII" {
        return None;
    }
    let fields: Vec<String> = types
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let c = format!("q.c{}", i + 1);
            let bytes = if PLAIN_TYPES.contains(&t.oid) {
                // ASCII without a backslash, which `byteain` takes as it is: the output
                // function's cstring becomes the bytes in one step (no text in between).
                format!("pg_catalog.byteain({}({c}))", t.output)
            } else {
                let text = match t.oid {
                    TEXT => c,
                    VARCHAR => format!("{c}::text"),
                    _ => format!("{}({c})::text", t.output),
                };
                // `textsend` is the text's bytes as they are, which in a UTF8 database are
                // UTF-8; other encodings convert.
                if d.encoding == "UTF8" {
                    format!("pg_catalog.textsend({text})")
                } else {
                    format!("pg_catalog.convert_to({text}, 'UTF8')")
                }
            };
            // E'' literals read the same whatever standard_conforming_strings says.
            format!("coalesce({bytes}, E'\\\\x{NULL:02x}'::bytea)")
        })
        .collect();
    Some(join_fields(&fields))
}

/// The fields joined by the separator with `||`, as a balanced tree: each level copies the
/// line once (a left-leaning chain copies the growing prefix at every field; `concat_ws`,
/// measured ~10% slower in a text version of this line, looks up each argument's output
/// function on every row and takes at most 100 arguments). `OPERATOR(pg_catalog.||)` so
/// that no operator of the caller's schemas can stand in for it.
fn join_fields(fields: &[String]) -> String {
    if fields.len() == 1 {
        return fields[0].clone();
    }
    let (left, right) = fields.split_at(fields.len() / 2);
    format!(
        "({} OPERATOR(pg_catalog.||) E'\\\\x{SEP:02x}'::bytea OPERATOR(pg_catalog.||) {})",
        join_fields(left),
        join_fields(right)
    )
}

/// Appends one row (PostgreSQL's value for it) to the page in the requested format.
pub fn encode_row(
    out: &mut Vec<u8>,
    format: Format,
    shape: RowText,
    ncols: usize,
    row: &[u8],
    scratch: &mut Vec<u8>,
) -> Result<(), String> {
    let plain = match (format, shape) {
        (Format::Ndjson, _) => {
            out.extend_from_slice(row);
            true
        }
        (_, RowText::Line) => plain_line(out, format, ncols, row)?,
        (_, RowText::Record) => false,
    };
    if !plain {
        field_by_field(out, format, shape, ncols, row, scratch)?;
    }
    out.push(b'\n');
    Ok(())
}

/// Writes a TSV or CSV row field by field, escaping or quoting each as COPY does.
fn field_by_field(
    out: &mut Vec<u8>,
    format: Format,
    shape: RowText,
    ncols: usize,
    row: &[u8],
    scratch: &mut Vec<u8>,
) -> Result<(), String> {
    let sep = if format == Format::Csv { b',' } else { b'\t' };
    let mut first = true;
    let each = |v: Option<&[u8]>| {
        if !std::mem::take(&mut first) {
            out.push(sep);
        }
        match (format, v) {
            (Format::Csv, Some(v)) => csv_field(out, v, ncols == 1),
            (Format::Csv, None) => {}
            (_, Some(v)) => tsv_field(out, v),
            (_, None) => out.extend_from_slice(b"\\N"),
        }
    };
    match shape {
        RowText::Line => for_each_line_field(row, ncols, each),
        RowText::Record => for_each_field(row, ncols, scratch, each),
    }
}

/// Writes a [`RowText::Line`] in one pass when none of its fields needs escaping or quoting
/// and none is NULL (almost every row): the line as it came, each separator turned into the
/// format's delimiter. Returns `false`, having written nothing, when the line needs the
/// field-by-field path. Per line rather than per field because per field, the calls and the
/// short scans cost more than the bytes (13% of the host process's profile of the bench query).
fn plain_line(
    out: &mut Vec<u8>,
    format: Format,
    ncols: usize,
    line: &[u8],
) -> Result<bool, String> {
    // Branch-free scans the compiler vectorises; the separator 0xFF is in neither set.
    let special = match format {
        Format::Csv => line.iter().fold(false, |any, &c| {
            any | (c == b',') | (c == b'"') | (c == b'\n') | (c == b'\r') | (c == NULL)
        }),
        _ => line.iter().fold(false, |any, &c| {
            any | (c < 0x0e) | (c == b'\\') | (c == NULL)
        }),
    };
    // CSV quotes an empty field (unquoted empty is NULL) and a lone `\.`.
    if special || (format == Format::Csv && ncols == 1 && (line.is_empty() || line == b"\\.")) {
        return Ok(false);
    }
    let delimiter = if format == Format::Csv { b',' } else { b'\t' };
    let start = out.len();
    out.extend_from_slice(line);
    let (mut fields, mut field_start, mut empty) = (1, 0, false);
    for i in memchr::memchr_iter(SEP, line) {
        out[start + i] = delimiter;
        empty |= i == field_start;
        field_start = i + 1;
        fields += 1;
    }
    empty |= field_start == line.len();
    if fields != ncols {
        out.truncate(start);
        return Err(format!(
            "unexpected row from PostgreSQL: {fields} fields for {ncols} columns"
        ));
    }
    if empty && format == Format::Csv {
        out.truncate(start);
        return Ok(false);
    }
    Ok(true)
}

/// Calls `f` for each field of a [`RowText::Line`] (`None` for NULL). The line must have
/// `ncols` fields.
pub fn for_each_line_field(
    line: &[u8],
    ncols: usize,
    mut f: impl FnMut(Option<&[u8]>),
) -> Result<(), String> {
    let mut n = 0;
    let mut start = 0;
    // memchr's SIMD search: `slice::split` tests byte by byte.
    for end in memchr::memchr_iter(SEP, line).chain(std::iter::once(line.len())) {
        let field = &line[start..end];
        f(if field == [NULL] { None } else { Some(field) });
        n += 1;
        start = end + 1;
    }
    if n == ncols {
        Ok(())
    } else {
        Err(format!(
            "unexpected row from PostgreSQL: {n} fields for {ncols} columns"
        ))
    }
}

/// A value in COPY's text format: backslash escapes for `\`, and for the control characters
/// COPY escapes (`\b \f \n \r \t \v`); other bytes pass unchanged (UTF-8 stays UTF-8).
pub fn tsv_field(out: &mut Vec<u8>, v: &[u8]) {
    // Most values need no escape: one branch-free pass the compiler vectorises (a quarter of
    // the component's time went here, byte by byte, before).
    let special = v
        .iter()
        .fold(false, |any, &c| any | (c < 0x0e) | (c == b'\\'));
    if !special {
        out.extend_from_slice(v);
        return;
    }
    let mut start = 0;
    for (i, &c) in v.iter().enumerate() {
        let esc = match c {
            b'\\' => b'\\',
            b'\n' => b'n',
            b'\r' => b'r',
            b'\t' => b't',
            0x08 => b'b',
            0x0c => b'f',
            0x0b => b'v',
            _ => continue,
        };
        out.extend_from_slice(&v[start..i]);
        out.push(b'\\');
        out.push(esc);
        start = i + 1;
    }
    out.extend_from_slice(&v[start..]);
}

/// A non-NULL value in COPY's CSV format. COPY quotes only when needed: a delimiter, quote,
/// CR or LF inside, an empty string (unquoted empty is NULL), or `\.` as the only column (it
/// would read as end-of-data). The csv crate can't express "empty but not NULL" per field,
/// hence this.
pub fn csv_field(out: &mut Vec<u8>, v: &[u8], single_column: bool) {
    let quote = v.is_empty()
        || (single_column && v == b"\\.")
        || v.iter().fold(false, |any, &c| {
            any | (c == b',') | (c == b'"') | (c == b'\n') | (c == b'\r')
        });
    if !quote {
        out.extend_from_slice(v);
        return;
    }
    out.push(b'"');
    let mut start = 0;
    for (i, &c) in v.iter().enumerate() {
        if c == b'"' {
            out.extend_from_slice(&v[start..=i]);
            out.push(b'"');
            start = i + 1;
        }
    }
    out.extend_from_slice(&v[start..]);
    out.push(b'"');
}

/// Calls `f(Some(value))` or `f(None)` (NULL) for each field of a record's text output
/// (`(1,,"a ""b""",)`), which must have `ncols` fields. `scratch` holds unescaped quoted
/// fields, reused across rows.
pub fn for_each_field(
    rec: &[u8],
    ncols: usize,
    scratch: &mut Vec<u8>,
    mut f: impl FnMut(Option<&[u8]>),
) -> Result<(), String> {
    let bad = || format!("unexpected record text from PostgreSQL ({ncols} columns)");
    let body = match rec {
        [b'(', body @ .., b')'] => body,
        _ => return Err(bad()),
    };
    if ncols == 0 {
        return if body.is_empty() { Ok(()) } else { Err(bad()) };
    }
    let mut i = 0;
    let mut col = 0;
    loop {
        if body.get(i) == Some(&b'"') {
            scratch.clear();
            i += 1;
            loop {
                match body.get(i) {
                    None => return Err(bad()),
                    Some(b'"') if body.get(i + 1) == Some(&b'"') => {
                        scratch.push(b'"');
                        i += 2;
                    }
                    Some(b'"') => {
                        i += 1;
                        break;
                    }
                    Some(b'\\') => {
                        scratch.push(*body.get(i + 1).ok_or_else(bad)?);
                        i += 2;
                    }
                    Some(_) => {
                        let run =
                            memchr::memchr2(b'"', b'\\', &body[i..]).unwrap_or(body.len() - i);
                        scratch.extend_from_slice(&body[i..i + run]);
                        i += run;
                    }
                }
            }
            f(Some(scratch));
        } else {
            let run = memchr::memchr(b',', &body[i..]).unwrap_or(body.len() - i);
            let v = &body[i..i + run];
            f(if v.is_empty() { None } else { Some(v) });
            i += run;
        }
        col += 1;
        match body.get(i) {
            None => break,
            Some(b',') => i += 1,
            Some(_) => return Err(bad()),
        }
    }
    if col == ncols {
        Ok(())
    } else {
        Err(bad())
    }
}

/// The header line: column names escaped like values.
pub fn header_line(out: &mut Vec<u8>, format: Format, names: &[String]) {
    for (i, name) in names.iter().enumerate() {
        if i > 0 {
            out.push(if format == Format::Csv { b',' } else { b'\t' });
        }
        match format {
            Format::Csv => csv_field(out, name.as_bytes(), names.len() == 1),
            _ => tsv_field(out, name.as_bytes()),
        }
    }
    out.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_fields() {
        let mut scratch = Vec::new();
        let mut got: Vec<Option<String>> = Vec::new();
        for_each_field(br#"(1,,"","a""b\\c",x)"#, 5, &mut scratch, |v| {
            got.push(v.map(|v| String::from_utf8(v.to_vec()).unwrap()))
        })
        .unwrap();
        assert_eq!(
            got,
            vec![
                Some("1".into()),
                None,
                Some("".into()),
                Some("a\"b\\c".into()),
                Some("x".into())
            ]
        );
        let mut n = 0;
        for_each_field(b"()", 0, &mut scratch, |_| n += 1).unwrap();
        assert_eq!(n, 0);
        for_each_field(b"()", 1, &mut scratch, |v| assert!(v.is_none())).unwrap();
        assert!(for_each_field(b"(1,2)", 1, &mut scratch, |_| ()).is_err());
        assert!(for_each_field(b"(\"1)", 1, &mut scratch, |_| ()).is_err());
    }

    #[test]
    fn copy_escaping() {
        let mut out = Vec::new();
        tsv_field(&mut out, b"a\tb\nc\rd\\e\x08\x0c\x0b\x01");
        assert_eq!(out, b"a\\tb\\nc\\rd\\\\e\\b\\f\\v\x01");
        for (v, single, want) in [
            (&b""[..], false, &b"\"\""[..]),
            (b"a,b", false, b"\"a,b\""),
            (b"say \"hi\"", false, b"\"say \"\"hi\"\"\""),
            (b"\\.", true, b"\"\\.\""),
            (b"\\.", false, b"\\."),
            (b" x ", false, b" x "),
        ] {
            let mut out = Vec::new();
            csv_field(&mut out, v, single);
            assert_eq!(out, want);
        }
    }

    #[test]
    fn lines_split_and_encode() {
        // What PostgreSQL sends for (1, e'a\tb\\c\nd', NULL, '\N', ''): fields as they are,
        // 0xFF between them, NULL as 0xFE.
        let line = b"1\xffa\tb\\c\nd\xff\xfe\xff\\N\xff";
        let mut scratch = Vec::new();
        let mut got: Vec<Option<Vec<u8>>> = Vec::new();
        for_each_line_field(line, 5, |v| got.push(v.map(<[u8]>::to_vec))).unwrap();
        assert_eq!(
            got,
            vec![
                Some(b"1".to_vec()),
                Some(b"a\tb\\c\nd".to_vec()),
                None,
                Some(b"\\N".to_vec()),
                Some(Vec::new())
            ]
        );
        assert!(for_each_line_field(b"1\xff2", 3, |_| ()).is_err());
        // One column: an empty line is one empty field; a lone 0xFE is NULL.
        let mut out = Vec::new();
        encode_row(&mut out, Format::Tsv, RowText::Line, 1, b"", &mut scratch).unwrap();
        encode_row(
            &mut out,
            Format::Tsv,
            RowText::Line,
            1,
            b"\xfe",
            &mut scratch,
        )
        .unwrap();
        encode_row(&mut out, Format::Csv, RowText::Line, 1, b"", &mut scratch).unwrap();
        encode_row(
            &mut out,
            Format::Csv,
            RowText::Line,
            1,
            b"\xfe",
            &mut scratch,
        )
        .unwrap();
        assert_eq!(out, b"\n\\N\n\"\"\n\n");
        let mut out = Vec::new();
        encode_row(&mut out, Format::Tsv, RowText::Line, 5, line, &mut scratch).unwrap();
        encode_row(&mut out, Format::Csv, RowText::Line, 5, line, &mut scratch).unwrap();
        assert_eq!(
            out,
            b"1\ta\\tb\\\\c\\nd\t\\N\t\\\\N\t\n1,\"a\tb\\c\nd\",,\\N,\"\"\n"
        );
    }

    #[test]
    fn whole_lines_match_field_by_field() {
        // The one-pass path must write exactly what the per-field path writes, and give way
        // to it whenever a field needs escaping, quoting or is NULL.
        let lines: &[&[u8]] = &[
            b"",
            b"a",
            b"\\.",
            b"a\xffb\xffc",
            b"\xff",
            b"\xffb",
            b"a\xff",
            b"a,b\xffc",
            b"a\"b\xffc",
            b"a\tb\xffc",
            b"a\\b\xffc",
            b"a\rb\xff\xfe",
            b"\xfe\xffx",
            b"caf\xc3\xa9\xff\\N",
        ];
        for &line in lines {
            let ncols = memchr::memchr_iter(SEP, line).count() + 1;
            for format in [Format::Tsv, Format::Csv] {
                // Both encoders append to what the buffer holds.
                type Encoder = fn(
                    &mut Vec<u8>,
                    Format,
                    RowText,
                    usize,
                    &[u8],
                    &mut Vec<u8>,
                ) -> Result<(), String>;
                let encode = |f: Encoder| {
                    let mut out = b"prefix".to_vec();
                    f(
                        &mut out,
                        format,
                        RowText::Line,
                        ncols,
                        line,
                        &mut Vec::new(),
                    )
                    .unwrap();
                    out
                };
                let mut want = encode(field_by_field);
                want.push(b'\n');
                let got = encode(encode_row);
                assert_eq!(got, want, "{format:?} {line:?}");
            }
        }
        // Plain lines take the one-pass path; the others write nothing there.
        let mut out = Vec::new();
        assert!(plain_line(&mut out, Format::Csv, 2, b"a\xffb").unwrap());
        assert_eq!(out, b"a,b");
        for (format, line) in [
            (Format::Csv, &b"a\xff"[..]),
            (Format::Csv, b"\\."),
            (Format::Tsv, b"a\xff\xfe"),
        ] {
            let mut out = Vec::new();
            let ncols = memchr::memchr_iter(SEP, line).count() + 1;
            assert!(!plain_line(&mut out, format, ncols, line).unwrap());
            assert!(out.is_empty());
        }
        assert!(plain_line(&mut Vec::new(), Format::Tsv, 3, b"a\xffb").is_err());
    }

    #[test]
    fn select_lists() {
        let col = |oid, pseudo, output: &str| ColumnType {
            oid,
            pseudo,
            output: output.into(),
        };
        let d = parse_types(
            "UTF8|25 b pg_catalog.textout,16 b pg_catalog.boolout,20 b pg_catalog.int8out",
            3,
        )
        .unwrap();
        assert_eq!(d.encoding, "UTF8");
        assert_eq!(d.columns[1], col(16, false, "pg_catalog.boolout"));
        let sep = " OPERATOR(pg_catalog.||) E'\\\\xff'::bytea OPERATOR(pg_catalog.||) ";
        let null = "E'\\\\xfe'::bytea";
        assert_eq!(
            line_select(&d).unwrap(),
            format!(
                "(coalesce(pg_catalog.textsend(q.c1), {null}){sep}\
                 (coalesce(pg_catalog.textsend(pg_catalog.boolout(q.c2)::text), {null}){sep}\
                 coalesce(pg_catalog.byteain(pg_catalog.int8out(q.c3)), {null})))"
            )
        );
        // The bench's floor row runs this select list for its query (text, bigint,
        // timestamptz, text) outside the component: it must be what `$dump-sql` runs.
        let bench = parse_types(
            "UTF8|25 b pg_catalog.textout,20 b pg_catalog.int8out,\
             1184 b pg_catalog.timestamptz_out,25 b pg_catalog.textout",
            4,
        )
        .unwrap();
        assert_eq!(
            line_select(&bench).unwrap(),
            include_str!("../scripts/bench.d/floor-select.sql").trim_end()
        );
        // Other encodings convert to UTF-8; SQL_ASCII can't promise valid UTF-8 at all.
        let latin1 = parse_types("LATIN1|25 b pg_catalog.textout", 1).unwrap();
        assert_eq!(
            line_select(&latin1).unwrap(),
            format!("coalesce(pg_catalog.convert_to(q.c1, 'UTF8'), {null})")
        );
        let ascii = parse_types("SQL_ASCII|25 b pg_catalog.textout", 1).unwrap();
        assert_eq!(line_select(&ascii), None);
        assert!(parse_types("UTF8|25 b pg_catalog.textout", 2).is_err());
        assert!(parse_types("UTF8|x b f", 1).is_err());
        assert!(parse_types("25 b f", 1).is_err());
        // A pseudo-type column, or no columns at all: the record shape.
        let record = |columns| Described {
            encoding: "UTF8".into(),
            columns,
        };
        assert_eq!(
            line_select(&record(vec![col(2249, true, "pg_catalog.record_out")])),
            None
        );
        assert_eq!(line_select(&record(vec![])), None);
        // A wide query: a balanced tree, every column once.
        let many = record(vec![col(23, false, "pg_catalog.int4out"); 150]);
        let sql = line_select(&many).unwrap();
        assert_eq!(sql.matches("xff").count(), 149);
        assert!((1..=150).all(|i| sql.contains(&format!("int4out(q.c{i}))"))));
        assert_eq!(sql.matches('(').count(), sql.matches(')').count());
        assert_eq!(
            positional("SELECT * FROM ", "select 1, 2", 2, " x"),
            (
                "SELECT * FROM (\nselect 1, 2\n) q(c1, c2) x".to_string(),
                "SELECT * FROM (\n".to_string()
            )
        );
    }
}
