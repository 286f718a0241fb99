//! `POST /$dump-sql` and `POST /$sql` end to end: the real component in the test host, real
//! PostgreSQL, real curl. The oracle for TSV/CSV is psql's `COPY (<query>) TO STDOUT`; for
//! ndjson it is `SELECT row_to_json(t)::text FROM (<query>) t` — compared byte for byte.
mod support;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::*;

const SEED: &str = "INSERT INTO patient (id,txid, status, resource) SELECT g.id, g.id, 'created', '{\"name\": [{\"family\": \"John\"}]}' FROM generate_series(1, 100000) AS g (id);";

static BODY_COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// POST `body` with `content_type` (None: no Content-Type at all) as `user`.
fn post_as(
    host: &spin_bulk_host::Host,
    user: &str,
    path: &str,
    content_type: Option<&str>,
    body: &[u8],
    extra: &[&str],
) -> Reply {
    let file = std::env::temp_dir().join(format!(
        "sb-sql-body-{}-{}",
        std::process::id(),
        BODY_COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    ));
    std::fs::write(&file, body).unwrap();
    let ct = match content_type {
        Some(ct) => format!("content-type: {ct}"),
        None => "content-type:".to_string(),
    };
    let data = format!("@{}", file.display());
    let url = format!("{}{}", host.url(), path);
    let mut args = vec!["-u", user, "-X", "POST", "-H", &ct, "--data-binary", &data];
    args.extend_from_slice(extra);
    args.push(&url);
    let r = curl(&args);
    let _ = std::fs::remove_file(&file);
    r
}

fn post(host: &spin_bulk_host::Host, path: &str, ct: Option<&str>, body: &[u8]) -> Reply {
    post_as(host, ADMIN, path, ct, body, &[])
}

/// `$dump-sql` with a JSON body `{"query": q}`.
fn dump(host: &spin_bulk_host::Host, query_string: &str, q: &str) -> Reply {
    let body = serde_json::json!({ "query": q }).to_string();
    post(
        host,
        &format!("/$dump-sql{query_string}"),
        Some("application/json"),
        body.as_bytes(),
    )
}

fn console(host: &spin_bulk_host::Host, body: serde_json::Value) -> Reply {
    post(
        host,
        "/$sql",
        Some("application/json"),
        body.to_string().as_bytes(),
    )
}

/// psql's bytes for `sql` (COPY … TO STDOUT writes the data to stdout verbatim), in UTF-8 as
/// Spin's connections ask for.
fn psql(db: &TestDb, sql: &str) -> Vec<u8> {
    let out = Command::new("psql")
        .env("PGCLIENTENCODING", "UTF8")
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", &db.url, "-c", sql])
        .output()
        .expect("running psql");
    assert!(
        out.status.success(),
        "psql failed on {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// PostgreSQL's own ndjson for a query.
fn ndjson_oracle(db: &TestDb, q: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for row in db
        .client()
        .query(
            &format!("SELECT row_to_json(t.*)::text FROM ({q}) t") as &str,
            &[],
        )
        .unwrap()
    {
        out.extend_from_slice(row.get::<_, String>(0).as_bytes());
        out.push(b'\n');
    }
    out
}

fn assert_ok(r: &Reply, content_type: &str) {
    assert_eq!(
        r.status,
        200,
        "{}",
        String::from_utf8_lossy(&r.body[..r.body.len().min(2000)])
    );
    assert_eq!(r.exit, 0, "curl: {}", r.stderr);
    assert_eq!(r.header("content-type"), Some(content_type));
}

fn show(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(&b[..b.len().min(3000)]);
    s.into_owned()
}

/// Compares all five variants of one query with the oracle.
fn check_all_formats(db: &TestDb, host: &spin_bulk_host::Host, q: &str) {
    let cases: [(&str, String, &str); 5] = [
        (
            "",
            format!("COPY ({q}) TO STDOUT"),
            "text/tab-separated-values",
        ),
        (
            "?_format=tsv&header=true",
            format!("COPY ({q}) TO STDOUT WITH (HEADER true)"),
            "text/tab-separated-values",
        ),
        (
            "?_format=csv",
            format!("COPY ({q}) TO STDOUT WITH (FORMAT csv, HEADER true)"),
            "text/csv",
        ),
        (
            "?_format=csv&header=false",
            format!("COPY ({q}) TO STDOUT WITH (FORMAT csv, HEADER false)"),
            "text/csv",
        ),
        ("?_format=ndjson", String::new(), "application/ndjson"),
    ];
    for (qs, oracle, ct) in cases {
        let want = if oracle.is_empty() {
            ndjson_oracle(db, q)
        } else {
            psql(db, &oracle)
        };
        let r = dump(host, qs, q);
        assert_ok(&r, ct);
        assert!(
            r.body == want,
            "{q} {qs}\n--- got\n{}\n--- want\n{}",
            show(&r.body),
            show(&want)
        );
    }
}

/// The session TimeZone is the database's (not UTC), so timestamptz output must follow it.
fn typed_db() -> TestDb {
    let db = TestDb::new();
    db.exec(&format!(
        r#"ALTER DATABASE "{}" SET timezone = 'America/New_York';
        CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
        CREATE TYPE pair AS (a int, b text);
        CREATE DOMAIN posint AS int CHECK (VALUE > 0);
        CREATE DOMAIN flag AS bool;
        CREATE DOMAIN note AS text;
        CREATE TABLE things (n int, label text, stamp timestamptz, doc jsonb);
        INSERT INTO things VALUES
          (1, 'one', '2024-01-31 12:00:00Z', '{{"b": 1.50, "a": 12345678901234567890123}}'),
          (2, NULL, NULL, NULL),
          (3, e'tab\there', '1999-12-31 23:59:59.999999+14', '[]');"#,
        db.name
    ));
    db
}

const TYPE_QUERIES: &[&str] = &[
    // numeric and integer types
    "select 1::int2 a, 2::int4 b, 3::int8 c, 1.50::numeric d, 'NaN'::numeric e, \
     123456789012345678901234567890.123456789::numeric f, -0.0::numeric g",
    // float specials
    "select 'NaN'::float8 a, 'Infinity'::float8 b, '-Infinity'::float4 c, '-0'::float8 d, \
     0.1::float4 e, 1e300::float8 f, 3.14159265358979::float8 g, 1e-7::float8 h",
    // bool and NULLs
    "select true a, false b, null::bool c, null d, null::text e",
    // text with everything COPY and CSV escape
    r#"select e'tab\there' a, e'new\nline' b, e'cr\rx' c, e'back\\slash' d, 'say "hi"' e, 'a,b' f, 'Ünïcødé ✓ 日本' g, '' h, ' lead ' i, e'\\.' j, '\N' k, e'\x01\x08\x0b\x0c\x7f' l, '(x)' m"#,
    // bytea, json, jsonb
    r#"select '\x00ff10'::bytea a, ''::bytea b, '{"b": 1.50, "a": [1, 2]}'::json c, '{"b": 1.50, "a": 12345678901234567890123}'::jsonb d, '"str\"q"'::json e, e'  {"x"  :\n 1}'::json f"#,
    // date and time types, in the session's TimeZone
    "select '2024-01-31 12:34:56.789+02'::timestamptz a, '2024-01-31 12:34:56'::timestamp b, \
     '2024-02-29'::date c, '23:59:59.5'::time d, '1 year 2 mons 3 days 04:05:06.7'::interval e, \
     '12:00+05'::timetz f, 'infinity'::timestamptz g, '-infinity'::date h, \
     '0044-03-15 BC'::date i",
    // uuid, arrays, ranges
    r#"select 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid a, array[1,2,null]::int[] b, array['a b','c,d','e"f',null,'', 'NULL']::text[] c, array[[1.5,2],[3,4]]::float8[] d, int4range(1,10) e, numrange(1.5, null) f, tstzrange('2024-01-01','2024-02-01') g, '{}'::int[] h, 'empty'::int4range i, array[now()::date - now()::date] j"#,
    // enums, composites
    "select 'ok'::mood a, (1, 'x y')::pair b, (null, '')::pair c, row(1, row(2, 'q\"'))::text d, \
     array['sad', 'happy']::mood[] e, null::pair f",
    // types whose cast to text is not their output function (COPY writes the output): bool
    // `t` not `true`, char(n) keeps its padding, inet drops /32, "char" of a non-ASCII byte
    // is octal; domains over them and over text
    r#"select true a, 'ab'::char(4) b, '10.0.0.1/32'::inet c, '10.0.0.0/8'::cidr d, 'x'::"char" e, 'é'::"char" f, 'nm'::name g, 'ab  '::varchar h, 5::posint i, false::flag j, array[true, null]::bool[] k, e'n\o	te'::note l, null::flag m"#,
    // more built-in types
    "select B'1011'::bit(4) a, B'1'::varbit b, 'a:1 b'::tsvector c, point(1.5, 2) d,      '08:00:2b:01:02:03'::macaddr e, 12.5::money f, '<a>x</a>'::xml g, 'x'::bytea h",
    // pseudo-type columns: anonymous records, anyarray (these take the record path)
    "select row(1, 'a b') a, row() b, 1 c",
    "select s.most_common_vals a, s.attname b from pg_stats s where s.most_common_vals is not null \
     order by s.schemaname, s.tablename, s.attname limit 3",
    // duplicate names, generated names, awkward names, a column named like the wrapper's alias
    r#"select 1 as a, 2 as a, 3, 'x' as "A b", 4 as "t	ab", 5 as "q""uote", 6 as "a,b", 7 as " ", 8 as t, 9 as x"#,
    // a table, with NULLs and jsonb
    "select * from things order by n",
    "select n, stamp, doc, doc->'b' as b, label from things where n > 1 order by n desc",
    // empty results
    "select 1 as a, 'x' as b where false",
    "select * from things where false",
    // zero columns (PostgreSQL allows them)
    "select from generate_series(1, 3)",
    "select",
    "select from things where false",
    // single column: `\.` and empty string vs NULL in CSV
    r#"select e'\\.' as a union all select '' union all select null union all select 'x'"#,
    r#"select '' as "\.""#,
    // other statement shapes
    "values (1, 'a'), (2, null)",
    "table things",
    "with x as (select 1 a, 'b' b) select * from x, x y",
];

#[test]
fn every_type_and_shape_matches_copy_and_row_to_json_byte_for_byte() {
    let db = typed_db();
    let host = serve(&db, &[]);
    for q in TYPE_QUERIES {
        check_all_formats(&db, &host, q);
    }
    // More columns than a PostgreSQL function takes arguments (the line nests concat_ws).
    let wide: Vec<String> = (1..=150)
        .map(|i| format!("{i} n{i}, e'x\\t{i}' t{i}"))
        .collect();
    check_all_formats(&db, &host, &format!("select {}", wide.join(", ")));
}

#[test]
fn databases_in_other_encodings_give_the_same_bytes() {
    // LATIN1 text is converted to UTF-8 for the client; SQL_ASCII passes bytes through (and
    // takes the record shape: its text may hold any byte, 0xFF included).
    for encoding in ["LATIN1", "SQL_ASCII"] {
        let db = TestDb::with_options(&format!(
            "ENCODING '{encoding}' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
        ));
        db.exec(
            "CREATE TABLE t (a text, b int, c bool); \
             INSERT INTO t VALUES ('Ünïcødé ÿ þ', 1, true), (e'tab\\there', NULL, NULL), \
             (NULL, 3, false), ('', 4, true)",
        );
        let host = serve(&db, &[]);
        check_all_formats(&db, &host, "select * from t order by b");
        check_all_formats(&db, &host, "select a, b from t where b > 100");
    }
}

#[test]
fn small_pages_give_the_same_bytes() {
    // A tiny budget makes many FETCHes; the output must not change at page seams.
    let db = typed_db();
    let host = serve(&db, &[("page_bytes", "1024")]);
    check_all_formats(
        &db,
        &host,
        "select g, md5(g::text) h, case when g % 7 = 0 then null else repeat('x', g % 50) end s \
         from generate_series(1, 5000) g",
    );
}

#[test]
fn pages_fit_in_work_mem_and_never_spill_to_a_temporary_file() {
    // A FETCH runs into a tuple store that moves to a temporary file past work_mem. With
    // temp_file_limit = 0 any such file is an error, so a page sized by the byte budget alone
    // (50,000 of these rows, ~7 MB of tuples) would fail the dump; pages sized to work_mem pass.
    let db = TestDb::new();
    db.exec(&format!(
        r#"CREATE TABLE t AS SELECT g, md5(g::text) m, md5((-g)::text) n
             FROM generate_series(1, 200000) g;
           ALTER DATABASE "{0}" SET work_mem = '4MB';
           ALTER DATABASE "{0}" SET temp_file_limit = 0;"#,
        db.name
    ));
    let host = serve(&db, &[]);
    let q = "select g, m, n from t";
    let r = dump(&host, "", q);
    assert_ok(&r, "text/tab-separated-values");
    assert_eq!(r.exit, 0, "the stream ended early: {}", r.stderr);
    assert!(r.body == psql(&db, &format!("COPY ({q}) TO STDOUT")));
}

#[test]
fn trailing_semicolon_and_comments_are_one_statement() {
    let db = typed_db();
    let host = serve(&db, &[]);
    let r = dump(&host, "", "select 1 as a, 'x' as b; -- done\n");
    assert_ok(&r, "text/tab-separated-values");
    assert_eq!(r.text(), "1\tx\n");
    let r = dump(&host, "", "/* c */ select 1 -- the end");
    assert_eq!(r.text(), "1\n");
}

/// A cursor is planned for its first 10% of rows by default (fast-start plans: an index scan
/// for `ORDER BY id`); a dump reads them all, so its query is planned like COPY's. The setting
/// is the transaction's own and does not outlive it.
#[test]
fn the_query_is_planned_for_all_its_rows() {
    let db = typed_db();
    let host = serve(&db, &[]);
    // The first FETCH is one row, the next the other two: both see the setting.
    let q = "select current_setting('cursor_tuple_fraction') from generate_series(1, 3)";
    let r = dump(&host, "", q);
    assert_ok(&r, "text/tab-separated-values");
    assert_eq!(r.text(), "1\n1\n1\n");
    let r = console(
        &host,
        serde_json::json!(["select current_setting('cursor_tuple_fraction') as f"]),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), serde_json::json!([{ "f": "0.1" }]));
}

#[test]
fn a_10_mb_value_and_1m_rows() {
    let db = TestDb::new();
    let host = serve(&db, &[]);
    let big = r#"select repeat(e'x\t', 5000000) || 'end' as big, 1 as n"#;
    let r = dump(&host, "", big);
    assert_ok(&r, "text/tab-separated-values");
    assert!(r.body.len() > 15_000_000);
    assert!(r.body == psql(&db, &format!("COPY ({big}) TO STDOUT")));
    let r = dump(&host, "?_format=csv", big);
    assert!(
        r.body
            == psql(
                &db,
                &format!("COPY ({big}) TO STDOUT WITH (FORMAT csv, HEADER)")
            )
    );

    let million =
        "select g, md5(g::text) m, g * 1.5 f, g % 3 = 0 b from generate_series(1, 1000000) g";
    let r = dump(&host, "", million);
    assert_ok(&r, "text/tab-separated-values");
    assert_eq!(r.body.iter().filter(|&&b| b == b'\n').count(), 1_000_000);
    assert!(r.body == psql(&db, &format!("COPY ({million}) TO STDOUT")));
}

#[test]
fn gzip_is_the_plain_output_compressed() {
    let db = typed_db();
    let host = serve(&db, &[("page_bytes", "4096")]);
    let q = "select g, md5(g::text) from generate_series(1, 20000) g";
    let plain = dump(&host, "?_format=csv", q);
    assert_ok(&plain, "text/csv");
    for (qs, extra) in [
        ("?_format=csv&gzip=true", vec![]),
        ("?_format=csv", vec!["-H", "accept-encoding: gzip"]),
    ] {
        let body = serde_json::json!({ "query": q }).to_string();
        let r = post_as(
            &host,
            ADMIN,
            &format!("/$dump-sql{qs}"),
            Some("application/json"),
            body.as_bytes(),
            &extra,
        );
        assert_ok(&r, "text/csv");
        assert_eq!(r.header("content-encoding"), Some("gzip"));
        let mut text = Vec::new();
        flate2::read::GzDecoder::new(&r.body[..])
            .read_to_end(&mut text)
            .unwrap();
        assert!(text == plain.body, "{qs}");
    }
}

#[test]
fn bodies_yaml_sql_text_and_parameters() {
    let db = typed_db();
    db.exec(SEED);
    let host = serve(&db, &[]);
    // Aidbox's YAML example.
    let r = post(
        &host,
        "/$dump-sql?_format=csv",
        Some("application/yaml"),
        b"query: select id, resource#>>'{name,0,family}' from patient where txid between 99996 and 99999 order by txid\n",
    );
    assert_ok(&r, "text/csv");
    assert_eq!(
        r.text(),
        "id,?column?\n99996,John\n99997,John\n99998,John\n99999,John\n"
    );
    for ct in [
        "application/sql",
        "text/plain; charset=utf-8",
        "text/yaml",
        "application/x-yaml",
    ] {
        let body: &[u8] = if ct.contains("yaml") {
            b"query: select 41 + 1 as n\nparams: []\n"
        } else {
            b"select 41 + 1 as n"
        };
        let r = post(&host, "/$dump-sql", Some(ct), body);
        assert_ok(&r, "text/tab-separated-values");
        assert_eq!(r.text(), "42\n", "{ct}");
    }
    // Parameters resolve like untyped literals: text, timestamptz, integer, jsonb, LIMIT.
    let q = "select id, txid from patient where id = any($1::text[]) and ts > $2 and txid >= $3 \
             and resource @> $4::jsonb and $5 and $6 is null order by txid limit $7";
    let body = serde_json::json!({
        "query": q,
        "params": ["{1,2,3,4}", "2000-01-01T00:00:00Z", 2, "{\"name\": [{\"family\": \"John\"}]}", true, null, 2]
    });
    let r = post(
        &host,
        "/$dump-sql",
        Some("application/json"),
        body.to_string().as_bytes(),
    );
    assert_ok(&r, "text/tab-separated-values");
    assert_eq!(r.text(), "2\t2\n3\t3\n");
    // Exact text: quotes and backslashes inside values, numbers as written.
    let body = r#"{"query": "select $1 as s, $2::numeric as n, $3 || $1 as t", "params": ["it's \\ \"q\"", 1.50, "x"]}"#;
    let r = post(
        &host,
        "/$dump-sql?_format=ndjson",
        Some("application/json"),
        body.as_bytes(),
    );
    assert_ok(&r, "application/ndjson");
    assert_eq!(
        r.text(),
        "{\"s\":\"it's \\\\ \\\"q\\\"\",\"n\":1.50,\"t\":\"xit's \\\\ \\\"q\\\"\"}\n"
    );
    // YAML parameters.
    let r = post(
        &host,
        "/$dump-sql",
        Some("application/yaml"),
        b"query: select count(*) from patient where txid <= $1\nparams:\n  - 10\n",
    );
    assert_eq!(r.text(), "10\n");
}

/// Anything that writes, or is not one valid statement, fails before the first byte with
/// PostgreSQL's message — and the database is unchanged.
#[test]
fn errors_are_operation_outcomes_and_change_nothing() {
    let db = typed_db();
    db.exec(SEED);
    let host = serve(&db, &[]);
    let state = |db: &TestDb| {
        (
            db.scalar_i64("SELECT count(*) FROM patient"),
            db.scalar_i64("SELECT sum(txid)::bigint FROM patient"),
            db.scalar_i64("SELECT last_value FROM transaction_id_seq"),
            db.scalar_i64("SELECT count(*) FROM pg_class WHERE relname = 'evil'"),
            db.scalar_i64("SELECT count(*) FROM things"),
            db.scalar_i64("SELECT count(*) FROM pg_largeobject_metadata"),
        )
    };
    let before = state(&db);
    let cases: &[(&str, u16, &str)] = &[
        (
            "insert into patient (id, txid, status, resource) values ('x', 1, 'created', '{}')",
            400,
            "42601",
        ),
        ("update patient set txid = 0", 400, "42601"),
        ("delete from patient", 400, "42601"),
        ("create table evil (a int)", 400, "42601"),
        ("drop table patient", 400, "42601"),
        ("truncate patient", 400, "42601"),
        ("select * from patient for update", 403, "25006"),
        ("select nextval('transaction_id_seq')", 403, "25006"),
        (
            "select set_config('transaction_read_only', 'off', true)",
            403,
            "25001",
        ),
        (
            "select id, nextval('transaction_id_seq') from patient",
            403,
            "25006",
        ),
        (
            "with d as (delete from patient returning *) select * from d",
            400,
            "0A000",
        ),
        ("select * into evil from patient", 400, "42601"),
        ("selec 1", 400, "42601"),
        ("select 1; delete from patient", 400, "one statement"),
        ("select 1; select 2", 400, "one statement"),
        ("select nope from patient", 400, "42703"),
        ("select * from nowhere", 400, "42P01"),
        // The first page is read before the reply: an error in the first row gets a status.
        (
            "select 1 / (g - 1) from generate_series(1, 5) g",
            400,
            "22012",
        ),
        ("select 'abc'::int", 400, "22P02"),
        ("", 400, "empty"),
        ("  -- just a comment", 400, "empty"),
    ];
    for (q, status, want) in cases {
        for qs in ["", "?_format=csv", "?_format=ndjson"] {
            let r = dump(&host, qs, q);
            assert_eq!(r.status, *status, "{q}: {}", r.text());
            let d = outcome(&r, *status);
            assert!(d.contains(want), "{q}: {d}");
        }
    }
    // Positions point into the caller's query, parameters accounted for.
    let body =
        serde_json::json!({"query": "select $1 as a, nope", "params": ["a long parameter value"]});
    let r = post(
        &host,
        "/$dump-sql",
        Some("application/json"),
        body.to_string().as_bytes(),
    );
    let d = outcome(&r, 400);
    assert!(d.contains("position 17"), "{d}");
    let r = dump(&host, "", "select 1 +");
    let d = outcome(&r, 400);
    assert!(d.contains("position 11"), "{d}");
    // Bodies and parameters that don't fit.
    let bad: &[(Option<&str>, &[u8], u16, &str)] = &[
        (None, b"select 1", 415, "Content-Type"),
        (Some("text/csv"), b"select 1", 415, "Content-Type"),
        (
            Some("application/x-www-form-urlencoded"),
            b"select 1",
            415,
            "Content-Type",
        ),
        (Some("application/json"), b"{\"query\": ", 400, "JSON"),
        (
            Some("application/json"),
            b"[\"select 1\"]",
            400,
            "JSON object",
        ),
        (Some("application/json"), b"{\"query\": 1}", 400, "JSON"),
        (
            Some("application/json"),
            b"{\"query\": \"select 1\", \"x\": 1}",
            400,
            "unknown field",
        ),
        (
            Some("application/json"),
            b"{\"query\": \"select $1\", \"params\": 1}",
            400,
            "list",
        ),
        (
            Some("application/json"),
            b"{\"query\": \"select $1\", \"params\": [[1]]}",
            400,
            "$1 must be",
        ),
        (
            Some("application/json"),
            b"{\"query\": \"select $1\", \"params\": [{}]}",
            400,
            "$1 must be",
        ),
        (
            Some("application/json"),
            b"{\"query\": \"select $2\", \"params\": [1]}",
            400,
            "$2",
        ),
        (
            Some("application/json"),
            b"{\"query\": \"select 1\", \"params\": [1]}",
            400,
            "does not use",
        ),
        (
            Some("application/json"),
            b"{\"query\": \"select $1::int\", \"params\": [\"x\"]}",
            400,
            "22P02",
        ),
        (Some("application/yaml"), b"query: [unclosed\n", 400, "YAML"),
        (Some("application/yaml"), b"params: [1]\n", 400, "query"),
        (Some("application/sql"), b"", 400, "empty"),
    ];
    for (ct, body, status, want) in bad {
        let r = post(&host, "/$dump-sql", *ct, body);
        let d = outcome(&r, *status);
        assert!(
            d.contains(want),
            "{ct:?} {}: {d}",
            String::from_utf8_lossy(body)
        );
    }
    for qs in [
        "?_format=xml",
        "?header=maybe",
        "?_format=ndjson&header=true",
        "?foo=1",
        "?gzip=2",
    ] {
        let r = dump(&host, qs, "select 1");
        outcome(&r, 400);
    }
    // A read-only transaction lets `lo_creat` write a large object; ending the transaction
    // with ROLLBACK keeps it from lasting. One page and several pages end differently.
    for (vars, q) in [
        ("", "select lo_creat(-1)"),
        (
            "",
            "select g, case when g = 1500 then lo_creat(-1) end from generate_series(1, 3000) g",
        ),
    ] {
        let r = dump(&host, vars, q);
        assert_ok(&r, "text/tab-separated-values");
    }
    assert_eq!(state(&db), before, "the database changed");
    assert_no_open_transactions(&db);
}

fn busy_connections(db: &TestDb) -> i64 {
    db.scalar_i64(&format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' AND pid <> pg_backend_pid() \
         AND state <> 'idle'",
        db.name
    ))
}

/// No connection of the component's pool may stay in a transaction (or busy) for long.
fn assert_no_open_transactions(db: &TestDb) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let busy = busy_connections(db);
        if busy == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{busy} connection(s) left active or idle in transaction"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_transaction_always_ends_success_failure_and_disconnect() {
    let db = TestDb::new();
    db.exec(SEED);
    let host = serve(&db, &[("page_bytes", "65536")]);
    // Success.
    let r = dump(&host, "", "select id from patient");
    assert_ok(&r, "text/tab-separated-values");
    assert_eq!(r.lines().len(), 100_000);
    assert_no_open_transactions(&db);
    // Failure before the first byte, and failure mid-stream.
    let r = dump(&host, "", "select nope");
    outcome(&r, 400);
    assert_no_open_transactions(&db);
    let r = dump(
        &host,
        "",
        "select g, 1 / (50000 - g) from generate_series(1, 60000) g",
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.exit, 18, "an error mid-stream must abort the transfer");
    assert_no_open_transactions(&db);
    // The client goes away mid-stream.
    let body = serde_json::json!({
        "query": "select g, repeat('x', 100) from generate_series(1, 10000000) g"
    })
    .to_string();
    let mut child = Command::new("curl")
        .args([
            "-sS",
            "-u",
            ADMIN,
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "--data-binary",
            &body,
            &format!("{}/$dump-sql", host.url()),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut got = vec![0u8; 1 << 20];
    child.stdout.as_mut().unwrap().read_exact(&mut got).unwrap();
    child.kill().unwrap();
    let _ = child.wait();
    assert_no_open_transactions(&db);
    // The pool is healthy afterwards: the next request works (and sees no leftover cursor).
    let r = dump(&host, "", "select count(*) from patient");
    assert_eq!(r.text(), "100000\n");
}

#[test]
fn statement_timeout_before_and_after_the_first_byte() {
    let db = TestDb::new();
    let host = serve(&db, &[("statement_timeout_ms", "1000")]);
    let r = dump(&host, "", "select pg_sleep(3)");
    assert!(outcome(&r, 504).contains("timeout"));
    assert_no_open_transactions(&db);
    // The first page (one row) goes out, a later FETCH times out: the transfer aborts.
    let r = dump(
        &host,
        "",
        "select g, (case when g = 2000 then pg_sleep(3) end) is null from generate_series(1, 3000) g",
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.exit, 18, "a timeout mid-stream must abort the transfer");
    assert_no_open_transactions(&db);
    // The query turns the timeout off in its first row (the first page); the second page
    // sleeps 3 s. Every FETCH is bounded all the same.
    let r = dump(
        &host,
        "",
        "select g, case when g = 1 then set_config('statement_timeout', '0', false) end, \
         (case when g = 3 then pg_sleep(3) end) is null from generate_series(1, 3) g",
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.exit, 18, "the query switched its own timeout off");
    assert_no_open_transactions(&db);
}

#[test]
fn only_admin_or_an_explicit_policy_may_dump_sql_and_only_admin_may_use_the_console() {
    let db = TestDb::new();
    let host = serve(&db, &[]);
    let put = |body: serde_json::Value| {
        let r = post_as(
            &host,
            ADMIN,
            "/",
            Some("application/json"),
            body.to_string().as_bytes(),
            &["-X", "PUT"],
        );
        assert!(
            r.status < 300,
            "PUT /: {} {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
    };
    put(serde_json::json!([
        {"resourceType": "Client", "id": "c", "secret": "s", "grant_types": ["basic"]},
        {"resourceType": "AccessPolicy", "id": "p", "engine": "allow",
         "link": [{"id": "c", "resourceType": "Client"}]}
    ]));
    let q = br#"{"query": "select 1"}"#;
    let r = post_as(&host, "c:s", "/$dump-sql", Some("application/json"), q, &[]);
    outcome(&r, 403);
    let r = post_as(
        &host,
        "c:s",
        "/$sql",
        Some("application/json"),
        br#"["select 1"]"#,
        &[],
    );
    outcome(&r, 403);
    // A matcho policy naming the uri opens $dump-sql (both spellings of `$`), not the console.
    put(serde_json::json!([
        {"resourceType": "AccessPolicy", "id": "p2", "engine": "matcho",
         "matcho": {"uri": "/$dump-sql"},
         "link": [{"id": "c", "resourceType": "Client"}]}
    ]));
    let r = post_as(&host, "c:s", "/$dump-sql", Some("application/json"), q, &[]);
    assert_ok(&r, "text/tab-separated-values");
    assert_eq!(r.text(), "1\n");
    let r = post_as(
        &host,
        "c:s",
        "/%24dump-sql",
        Some("application/json"),
        q,
        &[],
    );
    assert_eq!(r.text(), "1\n");
    let r = post_as(
        &host,
        "c:s",
        "/$sql",
        Some("application/json"),
        br#"["select 1"]"#,
        &[],
    );
    outcome(&r, 403);
    // Without credentials: 401.
    let r = curl(&[
        "-X",
        "POST",
        "-d",
        "select 1",
        &format!("{}/$dump-sql", host.url()),
    ]);
    assert_eq!(r.status, 401);
}

#[test]
fn console_runs_the_seed_and_answers_rows_or_counts() {
    let db = TestDb::new();
    let host = serve(&db, &[]);
    let r = console(&host, serde_json::json!([SEED]));
    assert_ok(&r, "application/json");
    assert_eq!(r.json(), serde_json::json!({"rowsAffected": 100000}));
    let r = console(&host, serde_json::json!(["SELECT count(*) FROM patient"]));
    assert_eq!(r.json(), serde_json::json!([{"count": 100000}]));
    // Rows are PostgreSQL's own JSON: keys in order, duplicates kept, numbers exact, timestamptz.
    let r = console(
        &host,
        serde_json::json!({"query": "select id, txid, 1.50 as n, 2 as n, '2024-01-01 00:00:00Z'::timestamptz as ts, resource from patient where id = $1", "params": ["7"]}),
    );
    assert_eq!(
        r.text(),
        r#"[{"id":"7","txid":7,"n":1.50,"n":2,"ts":"2024-01-01T00:00:00+00:00","resource":{"name": [{"family": "John"}]}}]"#
    );
    // Writes with RETURNING answer rows; without, a count.
    let r = console(
        &host,
        serde_json::json!([
            "update patient set status = 'updated' where txid <= $1 returning id, status",
            2
        ]),
    );
    assert_eq!(
        r.json(),
        serde_json::json!([{"id": "1", "status": "updated"}, {"id": "2", "status": "updated"}])
    );
    let r = console(
        &host,
        serde_json::json!(["with d as (select id from patient where txid > 99990) delete from patient p using d where p.id = d.id"]),
    );
    assert_eq!(r.json(), serde_json::json!({"rowsAffected": 10}));
    let r = console(&host, serde_json::json!(["create table scratch (a int)"]));
    assert_eq!(r.json(), serde_json::json!({"rowsAffected": 0}));
    let r = console(&host, serde_json::json!(["show timezone"]));
    assert_eq!(r.status, 200);
    assert!(r.json()[0]["TimeZone"].is_string(), "{}", r.text());
    let r = console(&host, serde_json::json!(["select 1 where false"]));
    assert_eq!(r.text(), "[]");
    // Errors: PostgreSQL's message and SQLSTATE, nothing run.
    let r = console(&host, serde_json::json!(["select 1; TRUNCATE patient"]));
    assert!(outcome(&r, 400).contains("one statement"));
    let r = console(&host, serde_json::json!(["insert into nowhere values (1)"]));
    assert!(outcome(&r, 400).contains("42P01"));
    let r = console(&host, serde_json::json!({"query": "select $1"}));
    outcome(&r, 400);
    assert_eq!(db.scalar_i64("SELECT count(*) FROM patient"), 99_990);
    let r = console(&host, serde_json::json!(["TRUNCATE patient"]));
    assert_eq!(r.json(), serde_json::json!({"rowsAffected": 0}));
    let r = console(&host, serde_json::json!(["SELECT count(*) FROM patient"]));
    assert_eq!(r.json(), serde_json::json!([{"count": 0}]));
    assert_no_open_transactions(&db);
}

#[test]
fn console_timeout_is_504() {
    let db = TestDb::new();
    let host = serve(&db, &[("statement_timeout_ms", "500")]);
    let r = console(&host, serde_json::json!(["select pg_sleep(2)"]));
    assert!(outcome(&r, 504).contains("timeout"));
    let _ = std::io::stdout().flush();
}
