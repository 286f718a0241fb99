//! spin:postgres@4.0.0 against a real server (DATABASE_URL), checking Spin's conversions and
//! failure modes through the fixture component.

mod support;

use support::*;

fn pg(host: &spin_bulk_host::Host, sql: &str) -> String {
    get(host, &format!("/pg?{}", enc(sql)))
}

#[test]
fn timestamptz_fails_the_query_like_spin() {
    let host = start_fixture(true);
    let out = pg(&host, "SELECT now() AS t");
    assert!(
        out.starts_with("error: Error::QueryFailed(QueryError::Text("),
        "{out}"
    );
    assert!(
        out.contains("cannot convert between the Rust type")
            && out.contains("NaiveDateTime")
            && out.contains("timestamptz"),
        "{out}"
    );
    // Even a NULL timestamptz: the type is refused before the value is looked at.
    assert!(pg(&host, "SELECT NULL::timestamptz AS t").starts_with("error: "));
}

#[test]
fn casts_that_work_on_spin_work_here() {
    let host = start_fixture(true);
    let out = pg(&host, "SELECT now()::text AS t");
    assert!(
        out.contains("col t DbDataType::Str") && out.contains("val str 20"),
        "{out}"
    );
    let out = pg(
        &host,
        "SELECT TIMESTAMPTZ '2024-05-06 07:08:09.5+00' AT TIME ZONE 'UTC' AS t",
    );
    assert!(out.contains("col t DbDataType::Datetime"), "{out}");
    assert!(
        out.contains("DbValue::Datetime((2024, 5, 6, 7, 8, 9, 500000000))"),
        "{out}"
    );
}

#[test]
fn jsonb_is_lossy_like_spin() {
    let host = start_fixture(true);
    let out = pg(
        &host,
        r#"SELECT '{"b": 1.50, "a": 12345678901234567890123}'::jsonb AS j"#,
    );
    assert!(
        out.contains(r#"val jsonb {"a":1.2345678901234568e+22,"b":1.5}"#),
        "{out}"
    );
    // Text keeps PostgreSQL's own rendering.
    let out = pg(&host, r#"SELECT '{"b": 1.50}'::jsonb::text AS j"#);
    assert!(out.contains(r#"val str {"b": 1.50}"#), "{out}");
}

#[test]
fn column_types_and_values() {
    let host = start_fixture(true);
    let out = pg(
        &host,
        "SELECT true AS b, 1::int2 AS i2, 2::int4 AS i4, 3::int8 AS i8, 1.5::float4 AS f4, \
         2.5::float8 AS f8, 'v'::varchar AS vc, 'c'::char(2) AS bp, '\\x0102'::bytea AS by, \
         1.50::numeric AS n, DATE '2024-01-02' AS d, TIME '03:04:05' AS tm, \
         '00000000-0000-0000-0000-000000000001'::uuid AS u, int4range(1, 5) AS r, \
         ARRAY[1, NULL]::int4[] AS a, ARRAY['x']::text[] AS at, INTERVAL '1 day 2 seconds' AS iv, \
         NULL::text AS nul, 'x'::name AS nm, '{}'::json AS js",
    );
    for expected in [
        "col b DbDataType::Boolean",
        "col i2 DbDataType::Int16",
        "col i4 DbDataType::Int32",
        "col i8 DbDataType::Int64",
        "col f4 DbDataType::Floating32",
        "col f8 DbDataType::Floating64",
        "col vc DbDataType::Str",
        "col bp DbDataType::Str",
        "col by DbDataType::Binary",
        "col n DbDataType::Decimal",
        "col d DbDataType::Date",
        "col tm DbDataType::Time",
        "col u DbDataType::Uuid",
        "col r DbDataType::RangeInt32",
        "col a DbDataType::ArrayInt32",
        "col at DbDataType::ArrayStr",
        "col iv DbDataType::Interval",
        "col nm DbDataType::Other(\"name\")",
        "col js DbDataType::Other(\"json\")",
        "val DbValue::Boolean(true)",
        "val DbValue::Int16(1)",
        "val DbValue::Int64(3)",
        "val DbValue::Floating64(2.5)",
        "val str c ",
        "val DbValue::Binary([1, 2])",
        "val DbValue::Decimal(\"1.50\")",
        "val DbValue::Date((2024, 1, 2))",
        "val DbValue::Time((3, 4, 5, 0))",
        "val DbValue::Uuid(\"00000000-0000-0000-0000-000000000001\")",
        "val DbValue::RangeInt32((Some((1, RangeBoundKind::Inclusive)), Some((5, RangeBoundKind::Exclusive))))",
        "val DbValue::ArrayInt32([Some(1), None])",
        "val DbValue::Interval(Interval { micros: 2000000, days: 1, months: 0 })",
        "val DbValue::DbNull",
        "val DbValue::Unsupported([120])",
        "val DbValue::Unsupported([123, 125])",
    ] {
        assert!(out.contains(expected), "missing {expected:?} in:\n{out}");
    }
}

#[test]
fn empty_results_have_no_columns_like_spin() {
    let host = start_fixture(true);
    assert_eq!(pg(&host, "SELECT 1 AS x WHERE false"), "");
}

#[test]
fn database_errors_are_structured() {
    let host = start_fixture(true);
    let out = pg(&host, "SELECT nosuchcolumn");
    assert!(
        out.starts_with("error: Error::QueryFailed(QueryError::DbError("),
        "{out}"
    );
    assert!(out.contains("code: \"42703\""), "{out}");
    assert!(out.contains("(\"position\", \"8\")"), "{out}");
    // One statement per query (extended protocol).
    let out = pg(&host, "SELECT 1; SELECT 2");
    assert!(out.starts_with("error: Error::QueryFailed("), "{out}");
}

#[test]
fn hosts_outside_allowed_outbound_hosts_are_refused() {
    let host = start_fixture(true);
    let out = get(
        &host,
        &format!(
            "/pg-open?{}",
            enc("postgres://postgres@127.0.0.2:5999/postgres")
        ),
    );
    assert!(out.starts_with("error: Error::ConnectionFailed("), "{out}");
    assert!(out.contains("not permitted"), "{out}");
    let out = get(
        &host,
        &format!("/pg-open?{}", enc("host=127.0.0.1 port=1 user=postgres")),
    );
    assert!(out.contains("not permitted"), "{out}");
}

#[test]
fn a_connection_keeps_its_session_across_calls() {
    let host = start_fixture(true);
    let out = get(&host, "/pg-tx");
    assert!(out.contains("inserted 2"), "{out}");
    assert!(
        out.contains("inside: col count DbDataType::Int32\nval DbValue::Int32(2)"),
        "{out}"
    );
    assert!(
        out.contains("after rollback: col count DbDataType::Int32\nval DbValue::Int32(0)"),
        "{out}"
    );
}

#[test]
fn results_over_128_mib_fail_the_query() {
    let host = start_fixture(true);
    // 130 rows of 1 MiB: above Spin's 128 MiB host buffer cap.
    let out = pg(
        &host,
        "SELECT repeat('x', 1048576) AS big FROM generate_series(1, 130)",
    );
    assert!(
        out.starts_with("error: Error::QueryFailed(QueryError::Text("),
        "{}",
        &out[..out.len().min(300)]
    );
    assert!(out.contains("exceeds"), "{out}");
    // The same shape, small, is fine.
    let out = pg(
        &host,
        "SELECT length(repeat('x', 1048576)) AS n FROM generate_series(1, 3)",
    );
    assert!(out.contains("val DbValue::Int32(1048576)"), "{out}");
}

#[test]
fn a_cursor_drains_page_by_page_and_counts_every_value() {
    let host = start_fixture(true);
    // 1000 rows of 1..4 digits (9 + 90*2 + 900*3 + 1*4 = 2893 bytes) over pages of 300: the
    // last page is short, and a page boundary on the last row ends cleanly too.
    let select = "SELECT g::text FROM generate_series(1, 1000) g";
    assert_eq!(
        get(
            &host,
            &format!("/pg-drain?{}", enc(&format!("300 {select}")))
        ),
        "rows 1000 bytes 2893\n"
    );
    assert_eq!(
        get(
            &host,
            &format!("/pg-drain?{}", enc(&format!("250 {select}")))
        ),
        "rows 1000 bytes 2893\n"
    );
    // bytea values count by their length.
    let out = get(
        &host,
        &format!(
            "/pg-drain?{}",
            enc("7 SELECT pg_catalog.textsend(repeat('x', g)) FROM generate_series(1, 10) g")
        ),
    );
    assert_eq!(out, "rows 10 bytes 55\n");
    // A query that fails is an error, not a short count.
    let out = get(&host, &format!("/pg-drain?{}", enc("5 SELECT 1/0")));
    assert!(out.starts_with("error: "), "{out}");
}
