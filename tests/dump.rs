//! `GET /{Type}/$dump` end to end: the real component in the test host, real PostgreSQL, real
//! curl over loopback.
mod support;

use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::Read;
use support::*;

/// The seed from the issue, verbatim.
const SEED: &str = "INSERT INTO patient (id,txid, status, resource) SELECT g.id, g.id, 'created', '{\"name\": [{\"family\": \"John\"}]}' FROM generate_series(1, 100000) AS g (id);";

fn get(host: &spin_bulk_host::Host, path: &str) -> Reply {
    curl(&["-u", ADMIN, &format!("{}{}", host.url(), path)])
}

/// The ids of a table in PostgreSQL's own order for the column (the order $dump promises).
fn ids_in_db_order(db: &TestDb, table: &str) -> Vec<String> {
    db.client()
        .query(&format!("SELECT id FROM {table} ORDER BY id") as &str, &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn parse_lines(r: &Reply) -> Vec<Value> {
    assert!(
        r.body.is_empty() || r.body.ends_with(b"\n"),
        "every line ends with \\n"
    );
    r.lines()
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l}: {e}")))
        .collect()
}

fn assert_ok_stream(r: &Reply, content_type: &str) {
    assert_eq!(r.exit, 0, "curl: {}", r.stderr);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("content-type"), Some(content_type));
    assert_eq!(r.header("transfer-encoding"), Some("chunked"));
    assert_eq!(r.header("content-length"), None);
}

/// The whole `$dump` of patients: a complete ndjson stream holding every row of the table
/// once, in id order. Returns the reply and its parsed lines.
fn dump_every_patient(host: &spin_bulk_host::Host, db: &TestDb, what: &str) -> (Reply, Vec<Value>) {
    let r = get(host, "/Patient/$dump");
    assert_ok_stream(&r, "application/ndjson");
    let lines = parse_lines(&r);
    let ids: Vec<String> = lines
        .iter()
        .map(|l| l["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ids_in_db_order(db, "patient"), "{what}");
    (r, lines)
}

#[test]
fn seed_flow_dumps_100k_patients_in_id_order_with_meta() {
    let db = TestDb::new();
    db.exec(SEED);
    let host = serve(&db, &[]);
    let r = get(&host, "/Patient/$dump");
    assert_ok_stream(&r, "application/ndjson");
    let lines = parse_lines(&r);
    assert_eq!(lines.len(), 100_000);
    let expected_ids = ids_in_db_order(&db, "patient");
    let mut txids = std::collections::HashMap::new();
    for row in db
        .client()
        .query("SELECT id, txid FROM patient", &[])
        .unwrap()
    {
        txids.insert(row.get::<_, String>(0), row.get::<_, i64>(1));
    }
    for (line, id) in lines.iter().zip(&expected_ids) {
        assert_eq!(line["id"], json!(id));
        assert_eq!(line["resourceType"], "Patient");
        assert_eq!(line["name"], json!([{"family": "John"}]));
        assert_eq!(line["meta"]["versionId"], json!(txids[id].to_string()));
        let updated = line["meta"]["lastUpdated"].as_str().unwrap();
        assert!(updated.ends_with('Z') && updated.len() >= 24, "{updated}");
        assert!(line["meta"]["createdAt"].is_string());
    }
    // Several pages went out as several chunks, not one buffered body.
    assert!(host.peak_memory() < 64 << 20, "peak {}", host.peak_memory());
}

#[test]
fn meta_instants_are_the_stored_ts_and_cts_in_utc() {
    let db = TestDb::new();
    db.exec(
        "SET TIME ZONE 'America/New_York';
         INSERT INTO patient (id, txid, status, resource, ts, cts)
         VALUES ('a', 7, 'created', '{}', '2024-02-29 23:59:58.5-05', '2020-01-01 00:00:00+00'),
                ('b', 8, 'updated', '{}', '2024-03-01 00:00:00.123456+00', '2019-06-30 12:00:00+02')",
    );
    let host = serve(&db, &[]);
    let lines = parse_lines(&get(&host, "/Patient/$dump"));
    assert_eq!(
        lines[0]["meta"],
        json!({"versionId": "7", "lastUpdated": "2024-03-01T04:59:58.500Z", "createdAt": "2020-01-01T00:00:00.000Z"})
    );
    assert_eq!(
        lines[1]["meta"],
        json!({"versionId": "8", "lastUpdated": "2024-03-01T00:00:00.123456Z", "createdAt": "2019-06-30T10:00:00.000Z"})
    );
    // fhir=true: valid FHIR (no createdAt), creation time in an extension.
    let r = get(&host, "/Patient/$dump?fhir=true");
    assert_ok_stream(&r, "application/fhir+ndjson");
    let lines = parse_lines(&r);
    assert_eq!(
        lines[0]["meta"],
        json!({"versionId": "7", "lastUpdated": "2024-03-01T04:59:58.500Z",
               "extension": [{"url": "ex:createdAt", "valueInstant": "2020-01-01T00:00:00.000Z"}]})
    );
}

/// Spin's jsonb conversion rounds numbers through f64 and sorts keys; the component must read
/// `resource::text`. If it selected the jsonb column, these exact bytes could not come back.
#[test]
fn numbers_and_text_come_out_exactly_as_postgres_stores_them() {
    let db = TestDb::new();
    db.exec(
        r#"INSERT INTO observation (id, txid, status, resource) VALUES
           ('o1', 1, 'created', '{"valueQuantity": {"value": 1.50, "unit": "mg"}, "big": 12345678901234567890123, "huge": 1e400, "tiny": -1.000e-30, "text": "Zoë 日本語 \"quoted\" back\\slash tab\t end 😀"}')"#,
    );
    let stored: String = db
        .client()
        .query_one("SELECT resource::text FROM observation", &[])
        .unwrap()
        .get(0);
    let host = serve(&db, &[]);
    let r = get(&host, "/Observation/$dump");
    assert_ok_stream(&r, "application/ndjson");
    let line = r.lines()[0].to_string();
    // The stored text, minus its opening brace, is the tail of the line byte for byte.
    assert!(line.ends_with(&stored[1..]), "line {line}\nstored {stored}");
    assert!(line.contains("\"value\": 1.50"));
    assert!(line.contains("12345678901234567890123"));
    assert!(line.contains(&format!("1{}", "0".repeat(400))));
    assert!(line.contains("Zoë 日本語"));
    assert!(line.contains("😀"));
}

#[test]
fn page_boundaries_give_every_row_once_in_order() {
    // The first page is 256 rows; later pages follow the byte budget (1 KiB here, so a few
    // rows per page) — cover counts around both.
    for n in [0usize, 1, 255, 256, 257, 600] {
        let db = TestDb::new();
        if n > 0 {
            db.exec(&format!(
                "INSERT INTO patient (id, txid, status, resource)
                 SELECT 'p' || lpad(g::text, 5, '0'), g, 'created',
                        jsonb_build_object('n', g, 'pad', repeat('x', 50 + g % 200))
                 FROM generate_series(1, {n}) g"
            ));
        }
        let host = serve(&db, &[("page_bytes", "1024")]);
        let (_, lines) = dump_every_patient(&host, &db, &format!("n = {n}"));
        for l in &lines {
            let n: u64 = l["n"].as_u64().unwrap();
            assert_eq!(l["pad"].as_str().unwrap().len() as u64, 50 + n % 200);
        }
    }
}

#[test]
fn large_resources_1kb_1mb_5mb_and_a_row_over_the_budget() {
    let db = TestDb::new();
    // 5 MB is over the default 4 MiB page budget: it must go out alone, not fail.
    db.exec(
        "INSERT INTO patient (id, txid, status, resource)
         SELECT 'd' || g, g, 'created', jsonb_build_object('data', repeat(md5(g::text), s / 32))
         FROM (VALUES (1, 1024), (2, 1048576), (3, 5242880), (4, 1024)) v(g, s)",
    );
    let host = serve(&db, &[]);
    let r = get(&host, "/Patient/$dump");
    assert_ok_stream(&r, "application/ndjson");
    let lines = parse_lines(&r);
    let sizes: Vec<usize> = lines
        .iter()
        .map(|l| l["data"].as_str().unwrap().len())
        .collect();
    assert_eq!(sizes, vec![1024, 1048576, 5242880, 1024]);
}

/// Sizes that jump within a page: rows far over the page's size limit come as their id only and
/// are read alone, in place; every row comes out once, in order, whole.
#[test]
fn size_jumps_within_a_page_keep_every_row_in_order() {
    let db = TestDb::new();
    // 3000 tiny rows, 20 rows of ~100 KB hex text (hardly compressible), 3000 tiny rows,
    // then big and tiny rows alternating.
    db.exec(
        "INSERT INTO patient (id, txid, status, resource)
         SELECT id, 1, 'created', jsonb_build_object('n', n, 'data', data) FROM (
           SELECT 'a' || lpad(g::text, 5, '0') AS id, g AS n, '' AS data FROM generate_series(1, 3000) g
           UNION ALL
           SELECT 'b' || lpad(g::text, 5, '0'), g,
                  (SELECT string_agg(md5(g::text || '/' || i), '') FROM generate_series(1, 3200) i)
           FROM generate_series(1, 20) g
           UNION ALL
           SELECT 'c' || lpad(g::text, 5, '0'), g, '' FROM generate_series(1, 3000) g
           UNION ALL
           SELECT 'd' || lpad(g::text, 5, '0'), g,
                  CASE WHEN g % 2 = 0 THEN repeat(md5(g::text), 2000) ELSE '' END
           FROM generate_series(1, 40) g) v",
    );
    let host = serve(&db, &[("page_bytes", "262144")]);
    let (_, lines) = dump_every_patient(&host, &db, "size jumps");
    let mut c = db.client();
    let sizes: HashMap<String, i64> = c
        .query(
            "SELECT id, length(resource->>'data')::int8 FROM patient",
            &[],
        )
        .unwrap()
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for l in &lines {
        let id = l["id"].as_str().unwrap();
        assert_eq!(l["data"].as_str().unwrap().len() as i64, sizes[id], "{id}");
    }
    assert_eq!(lines.len(), 6060);
}

#[test]
fn awkward_ids_and_stored_meta() {
    let db = TestDb::new();
    let mut c = db.client();
    for id in [
        "ünï-cødé",
        "quo\"te",
        "back\\slash",
        "sp ace",
        "日本",
        "tab\there",
        "new\nline",
        "7\t3",
    ] {
        c.execute(
            "INSERT INTO patient (id, txid, status, resource) VALUES ($1, 1, 'created', '{\"active\": true}')",
            &[&id],
        )
        .unwrap();
    }
    // A stored meta keeps profile and tag; a stored id/resourceType does not produce duplicates.
    c.execute(
        r#"INSERT INTO patient (id, txid, status, resource) VALUES ('zz', 5, 'created',
           '{"id": "wrong", "resourceType": "Wrong", "meta": {"profile": ["http://example.org/p"], "tag": [{"code": "t1"}], "versionId": "999"}, "active": false}')"#,
        &[],
    )
    .unwrap();
    let host = serve(&db, &[]);
    let (r, _) = dump_every_patient(&host, &db, "awkward ids");
    let last_line = r
        .lines()
        .into_iter()
        .find(|l| l.contains("\"zz\""))
        .unwrap();
    // serde_json would silently keep the last of duplicate keys: count them in the text.
    assert_eq!(last_line.matches("\"id\":").count(), 1, "{last_line}");
    assert_eq!(
        last_line.matches("\"resourceType\":").count(),
        1,
        "{last_line}"
    );
    assert_eq!(last_line.matches("\"meta\":").count(), 1, "{last_line}");
    assert_eq!(
        last_line.matches("\"versionId\":").count(),
        1,
        "{last_line}"
    );
    let v: Value = serde_json::from_str(last_line).unwrap();
    assert_eq!(v["id"], "zz");
    assert_eq!(v["resourceType"], "Patient");
    assert_eq!(v["meta"]["versionId"], "5");
    assert_eq!(v["meta"]["profile"], json!(["http://example.org/p"]));
    assert_eq!(v["meta"]["tag"], json!([{"code": "t1"}]));
    assert_eq!(v["active"], false);
}

#[test]
fn parameters_filter_and_resume() {
    let db = TestDb::new();
    db.exec(
        "INSERT INTO patient (id, txid, status, resource, ts)
         SELECT 'p' || lpad(g::text, 3, '0'), g, 'created', jsonb_build_object('n', g),
                timestamptz '2024-01-01 00:00:00+00' + g * interval '1 hour'
         FROM generate_series(1, 300) g",
    );
    let host = serve(&db, &[("page_bytes", "2048")]);
    let ids = |path: &str| -> Vec<String> {
        let r = get(&host, path);
        assert_ok_stream(&r, "application/ndjson");
        parse_lines(&r)
            .iter()
            .map(|l| l["id"].as_str().unwrap().to_string())
            .collect()
    };
    let all = ids("/Patient/$dump");
    assert_eq!(all.len(), 300);
    // _since is exclusive, _until inclusive; a date means midnight UTC; offsets are honoured.
    assert_eq!(ids("/Patient/$dump?_since=2024-01-01T10:00:00Z").len(), 290);
    assert_eq!(ids("/Patient/$dump?_until=2024-01-01T10:00:00Z").len(), 10);
    assert_eq!(
        ids("/Patient/$dump?_since=2024-01-01T10:00:00%2B02:00&_until=2024-01-01T10:00:00Z"),
        vec!["p009", "p010"]
    );
    assert_eq!(ids("/Patient/$dump?_since=2024-01-02").len(), 300 - 24);
    // _count bounds lines, across page boundaries too.
    assert_eq!(ids("/Patient/$dump?_count=0").len(), 0);
    assert_eq!(ids("/Patient/$dump?_count=7"), all[..7].to_vec());
    assert_eq!(ids("/Patient/$dump?_count=299"), all[..299].to_vec());
    assert_eq!(ids("/Patient/$dump?_count=1000"), all);
    // _after resumes strictly after an id; _upto stops at one, inclusive.
    assert_eq!(ids("/Patient/$dump?_after=p100"), all[100..].to_vec());
    assert_eq!(
        ids("/Patient/$dump?_after=p100&_upto=p120"),
        all[100..120].to_vec()
    );
    assert_eq!(
        ids("/Patient/$dump?_after=p100&_count=5"),
        all[100..105].to_vec()
    );
    assert_eq!(ids("/Patient/$dump?_after=zzz").len(), 0);
    // Resuming after every page boundary reassembles the whole dump.
    let mut resumed = ids("/Patient/$dump?_count=111");
    while resumed.len() < all.len() {
        let next = ids(&format!(
            "/Patient/$dump?_count=111&_after={}",
            resumed.last().unwrap()
        ));
        assert!(!next.is_empty());
        resumed.extend(next);
    }
    assert_eq!(resumed, all);
}

#[test]
fn bad_parameters_are_400_operation_outcomes_naming_the_parameter() {
    let db = TestDb::new();
    let host = serve(&db, &[]);
    for (query, needle) in [
        ("_since=yesterday", "_since"),
        ("_since=2024-01-01T10:00:00", "time zone"),
        ("_until=2024-13-01", "_until"),
        ("_count=-1", "_count"),
        ("_count=ten", "_count"),
        ("_count=99999999999999999999999", "_count"),
        ("fhir=yes", "fhir"),
        ("gzip=1", "gzip"),
        ("_snce=2024-01-01", "unknown parameter _snce"),
        ("_count=1&_count=2", "more than once"),
        // A split dump's helper parameters: together, well-formed, never with _count or gzip.
        ("_part=1/2", "go together"),
        ("_part=2/2&_pages=10&_snapshot=00000003-0000001B-1", "_part"),
        ("_part=0/2&_pages=10&_snapshot=00000003-0000001B-1", "_part"),
        (
            "_part=1/17&_pages=10&_snapshot=00000003-0000001B-1",
            "_part",
        ),
        ("_part=1/2&_pages=0&_snapshot=00000003-0000001B-1", "_pages"),
        ("_part=1/2&_pages=10&_snapshot=1'%3Bdrop", "_snapshot"),
        (
            "_part=1/2&_pages=10&_snapshot=00000003-0000001B-1&_count=5",
            "neither _count nor gzip",
        ),
    ] {
        let r = get(&host, &format!("/Patient/$dump?{query}"));
        let diagnostics = outcome(&r, 400);
        assert!(diagnostics.contains(needle), "{query}: {diagnostics}");
        assert_eq!(r.header("content-type"), Some("application/fhir+json"));
    }
}

#[test]
fn unknown_types_missing_tables_and_wrong_methods() {
    let db = TestDb::new();
    let host = serve(&db, &[]);
    // Valid name, no table.
    assert!(outcome(&get(&host, "/Basic/$dump"), 404).contains("Basic"));
    // Not a resource type name at all (never reaches SQL).
    for path in [
        "/patient/$dump",
        "/Pat-ient/$dump",
        "/Patient%3Bdrop/$dump",
        &format!("/P{}/$dump", "a".repeat(64)),
    ] {
        outcome(&get(&host, path), 404);
    }
    // `$` percent-encoded works the same.
    let r = get(&host, "/Patient/%24dump");
    assert_ok_stream(&r, "application/ndjson");
    assert!(r.body.is_empty());
    for method in ["POST", "PUT", "DELETE", "PATCH"] {
        let r = curl(&[
            "-u",
            ADMIN,
            "-X",
            method,
            &format!("{}/Patient/$dump", host.url()),
        ]);
        outcome(&r, 405);
        assert_eq!(r.header("allow"), Some("GET"));
    }
}

#[test]
fn gzip_output_decompresses_to_exactly_the_plain_output() {
    let db = TestDb::new();
    insert_resources(&db, "Observation", &sample("Observation"));
    let host = serve(&db, &[("page_bytes", "65536")]);
    let plain = get(&host, "/Observation/$dump");
    assert_ok_stream(&plain, "application/ndjson");
    for args in [
        vec![
            "-u".to_string(),
            ADMIN.to_string(),
            format!("{}/Observation/$dump?gzip=true", host.url()),
        ],
        vec![
            "-u".to_string(),
            ADMIN.to_string(),
            "-H".to_string(),
            "Accept-Encoding: gzip, deflate, br, identity".to_string(),
            format!("{}/Observation/$dump", host.url()),
        ],
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = curl(&args);
        assert_ok_stream(&r, "application/ndjson");
        assert_eq!(r.header("content-encoding"), Some("gzip"));
        let mut text = Vec::new();
        flate2::read::GzDecoder::new(&r.body[..])
            .read_to_end(&mut text)
            .unwrap();
        assert_eq!(text.len(), plain.body.len());
        assert!(text == plain.body, "gzip and plain differ");
        assert!(
            r.body.len() * 3 < plain.body.len(),
            "gzip should compress JSON"
        );
    }
    // q=0 refuses gzip.
    let r = curl(&[
        "-u",
        ADMIN,
        "-H",
        "Accept-Encoding: gzip;q=0",
        &format!("{}/Observation/$dump", host.url()),
    ]);
    assert_eq!(r.header("content-encoding"), None);
    assert!(r.body == plain.body);
}

/// Every type of the Synthea sample, stored the Aidbox way and dumped back: each line equals
/// its source resource plus meta.
#[test]
fn synthea_sample_round_trips_per_type() {
    let db = TestDb::new();
    let types = sample_types();
    assert_eq!(types.len(), 17);
    for t in &types {
        insert_resources(&db, t, &sample(t));
    }
    let host = serve(&db, &[("page_bytes", "262144")]);
    let mut total = 0;
    for t in &types {
        let r = get(&host, &format!("/{t}/$dump?fhir=true"));
        assert_ok_stream(&r, "application/fhir+ndjson");
        let mut source: std::collections::HashMap<String, Value> = sample(t)
            .into_iter()
            .map(|r| (r["id"].as_str().unwrap().to_string(), r))
            .collect();
        let lines = parse_lines(&r);
        assert_eq!(lines.len(), source.len(), "{t}");
        for mut line in lines {
            let meta = line.as_object_mut().unwrap().remove("meta").unwrap();
            assert!(meta["versionId"].is_string() && meta["lastUpdated"].is_string());
            let id = line["id"].as_str().unwrap().to_string();
            let expected = source
                .remove(&id)
                .unwrap_or_else(|| panic!("{t}/{id} unexpected"));
            assert_eq!(line, expected, "{t}/{id}");
            total += 1;
        }
    }
    assert_eq!(total, 17_876);
}

/// Seeds 100K rows, starts a slow reader (`--limit-rate 200k`, so the dump runs long enough)
/// of the whole `$dump` with small pages, and runs `kill_sql` (`$1` = the database name; it
/// terminates backends and returns how many) every 50 ms until it kills one. Asserts that the
/// client saw a 200 and then an incomplete transfer (curl exit 18: "transfer closed with
/// outstanding read data"), never a complete dump. Returns the database, the host (still
/// serving, so that its pooled connections can be checked), how many `kill_sql` killed, and a
/// connection to the database's cluster.
fn kill_mid_stream(kill_sql: &str) -> (TestDb, spin_bulk_host::Host, i64, postgres::Client) {
    let db = TestDb::new();
    db.exec(SEED);
    let host = serve(&db, &[("page_bytes", "16384")]);
    let url = format!("{}/Patient/$dump", host.url());
    let child = std::process::Command::new("curl")
        .args([
            "-sS",
            "-u",
            ADMIN,
            "--limit-rate",
            "200k",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &url,
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut admin = postgres::Client::connect(&database_url(), postgres::NoTls).unwrap();
    let mut killed = 0;
    for _ in 0..200 {
        std::thread::sleep(std::time::Duration::from_millis(50));
        killed = admin
            .query_one(kill_sql, &[&db.name])
            .unwrap()
            .get::<_, i64>(0);
        if killed > 0 {
            break;
        }
    }
    let out = child.wait_with_output().unwrap();
    if killed > 0 {
        assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
        assert_eq!(
            out.status.code(),
            Some(18),
            "curl must see an incomplete transfer: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    (db, host, killed, admin)
}

/// A connection killed mid-stream must look like a failure to the client, never like a
/// complete dump.
#[test]
fn backend_terminated_mid_stream_aborts_the_transfer() {
    let (_db, _host, killed, _) = kill_mid_stream(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
         WHERE datname = $1 AND query LIKE '%string_agg(octet_length(id)%'
           AND pid <> pg_backend_pid()",
    );
    assert!(killed > 0, "never saw the dump's connection");
}

#[test]
fn database_down_before_the_request_is_503() {
    let db = TestDb::new();
    // A port nobody listens on, allowed by the outbound rule: the connection is refused.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let url = format!("postgres://postgres@127.0.0.1:{port}/x?sslmode=disable");
    let hostport = format!("127.0.0.1:{port}");
    let host = serve(&db, &[("db_url", &url), ("db_host", &hostport)]);
    let r = get(&host, "/Patient/$dump");
    assert!(outcome(&r, 503).contains("database"));
}

#[test]
fn statement_timeout_before_the_first_byte_is_a_status_not_a_stream() {
    let db = TestDb::new();
    db.exec(SEED);
    let host = serve(&db, &[("statement_timeout_ms", "1")]);
    let r = get(&host, "/Patient/$dump");
    // Either the first page already hit the 1 ms timeout (504) or it made it; never a broken 200.
    if r.status != 200 {
        assert!(outcome(&r, 504).contains("timeout"));
    } else {
        assert!(r.exit == 0 || r.exit == 18);
    }
}

#[test]
fn no_connection_is_left_busy_after_dumps() {
    let db = TestDb::new();
    db.exec(SEED);
    let host = serve(&db, &[("page_bytes", "65536")]);
    for _ in 0..3 {
        let r = get(&host, "/Patient/$dump?_count=5000");
        assert_eq!(parse_lines(&r).len(), 5000);
    }
    // Interrupted by the client: curl gives up after the first bytes.
    let r = curl(&[
        "-u",
        ADMIN,
        "--limit-rate",
        "20k",
        "--max-time",
        "1",
        &format!("{}/Patient/$dump", host.url()),
    ]);
    assert_eq!(r.exit, 28, "curl should have timed out: {}", r.stderr);
    // The component notices the client is gone at its next write, after the page query in
    // flight; give it that long (polling), then nothing may be left busy.
    let busy_sql = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' AND pid <> pg_backend_pid()
         AND state NOT IN ('idle')",
        db.name
    );
    let mut busy = -1;
    for _ in 0..100 {
        busy = db.scalar_i64(&busy_sql);
        if busy == 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(busy, 0, "connections left active or idle in transaction");
}

// ---------------------------------------------------------------------------------------------
// Split dumps: the rest of a dump after its first page shared with helper instances (Spin self
// requests) under one snapshot (src/fanout.rs).

/// A host whose manifest is spin.toml without `http://self`: no self requests allowed.
fn serve_without_self_requests(db: &TestDb, vars: &[(&str, &str)]) -> spin_bulk_host::Host {
    let manifest = std::fs::read_to_string(repo_root().join("spin.toml")).unwrap();
    assert!(manifest.contains(r#", "http://self""#));
    let path = std::env::temp_dir().join(format!("spin-bulk-noself-{}.toml", db.name));
    std::fs::write(&path, manifest.replace(r#", "http://self""#, "")).unwrap();
    let mut vars = vars.to_vec();
    vars.push(("admin_secret", "test-admin-secret"));
    start_with_manifest(db, &path, &vars)
}

/// Transactions open on the database, other than the asking connection's.
fn open_transactions(client: &mut postgres::Client, db: &TestDb) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND xact_start IS NOT NULL
             AND pid <> pg_backend_pid()",
            &[&db.name],
        )
        .unwrap()
        .get(0)
}

/// How many instances answered `$dump` requests so far (the main ones and their helpers).
fn dump_instances(host: &spin_bulk_host::Host) -> usize {
    host.requests()
        .iter()
        .filter(|r| r.path.ends_with("/$dump") && r.status == 200)
        .count()
}

/// Rows whose stored resources are under the component's 256-byte floor per row, so that with
/// a 4096-byte page budget every page after the first holds exactly 16 rows.
fn fill_uniform(db: &TestDb, n: usize) {
    db.exec("TRUNCATE patient");
    if n > 0 {
        db.exec(&format!(
            "INSERT INTO patient (id, txid, status, resource)
             SELECT 'u' || lpad(g::text, 6, '0'), g, 'created',
                    jsonb_build_object('n', g, 'pad', repeat('y', 200))
             FROM generate_series(1, {n}) g"
        ));
    }
}

#[test]
fn split_dumps_end_wherever_the_table_ends() {
    let db = TestDb::new();
    let hosts: Vec<(u64, spin_bulk_host::Host)> = [2u64, 3]
        .into_iter()
        .map(|k| {
            let parts = k.to_string();
            (
                k,
                serve(&db, &[("page_bytes", "4096"), ("dump_parallel", &parts)]),
            )
        })
        .collect();
    let n = 16;
    // The end inside and at the edge of each instance's pages, and just after the first page.
    let mut counts = vec![256, 257, 256 + n - 1, 256 + n, 256 + n + 1];
    for pages in 2..=7 {
        counts.extend([256 + pages * n - 1, 256 + pages * n, 256 + pages * n + 1]);
    }
    for count in counts {
        fill_uniform(&db, count);
        for (k, host) in &hosts {
            let before = dump_instances(host);
            let (_, lines) = dump_every_patient(host, &db, &format!("{count} rows, {k} parts"));
            assert_eq!(lines.len(), count);
            // With at least two more pages after the first, the main instance and k - 1
            // helpers answered; with less, the main instance alone.
            let instances = if count - 256 >= 2 * n { *k as usize } else { 1 };
            assert_eq!(dump_instances(host) - before, instances, "{count} rows");
        }
    }
}

#[test]
fn split_dumps_are_byte_identical_to_dumps_alone() {
    let db = TestDb::new();
    // Sizes that vary and jump (rows over a page's size limit are read alone, in the helpers
    // too), awkward ids, a stored meta, timestamps spread for _since/_until.
    db.exec(
        r#"INSERT INTO patient (id, txid, status, resource, ts, cts)
           SELECT CASE WHEN g % 97 = 0 THEN 'q"\' || g || 'é' ELSE 'p' || lpad(g::text, 5, '0') END,
                  g, 'created',
                  CASE WHEN g % 53 = 0 THEN jsonb_build_object('big', repeat('z', 20000), 'n', g)
                       WHEN g % 31 = 0 THEN jsonb_build_object('n', g, 'meta', jsonb_build_object('tag', jsonb_build_array(jsonb_build_object('code', 't'))))
                       ELSE jsonb_build_object('n', g, 'v', 1.50, 'pad', repeat('x', g % 300)) END,
                  timestamptz '2024-01-01 00:00:00+00' + g * interval '1 minute',
                  timestamptz '2023-01-01 00:00:00+00'
           FROM generate_series(1, 3000) g"#,
    );
    let alone = serve(&db, &[("page_bytes", "8192"), ("dump_parallel", "1")]);
    let split2 = serve(&db, &[("page_bytes", "8192"), ("dump_parallel", "2")]);
    let split4 = serve(&db, &[("page_bytes", "8192"), ("dump_parallel", "4")]);
    for query in [
        "",
        "?fhir=true",
        "?_since=2024-01-01T10:00:00Z&_until=2024-01-02T20:00:00Z",
        "?_after=p00400&_upto=p02900",
        "?gzip=true",
    ] {
        let path = format!("/Patient/$dump{query}");
        let expected = get(&alone, &path);
        assert_eq!(expected.exit, 0);
        assert!(expected.body.len() > 50_000, "{query}");
        for host in [&split2, &split4] {
            let r = get(host, &path);
            assert_eq!(r.exit, 0, "{query}: {}", r.stderr);
            if query == "?gzip=true" {
                assert_eq!(gunzip(&r.body), gunzip(&expected.body));
            } else {
                assert_eq!(r.body, expected.body, "{query}");
            }
        }
    }
    assert_eq!(dump_instances(&alone), 5);
    assert_eq!(dump_instances(&split2), 10);
    assert_eq!(dump_instances(&split4), 20);
}

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut out)
        .unwrap();
    out
}

#[test]
fn a_helper_request_under_an_unknown_snapshot_is_400_and_leaves_no_transaction() {
    let db = TestDb::new();
    fill_uniform(&db, 10);
    let host = serve(&db, &[]);
    let r = get(
        &host,
        "/Patient/$dump?_after=u000001&_part=1/2&_pages=10&_snapshot=00000003-0000001B-1",
    );
    assert!(outcome(&r, 400).contains("_snapshot"));
    assert_eq!(
        open_transactions(&mut db.client(), &db),
        0,
        "the helper's transaction was left open"
    );
}

#[test]
fn without_self_requests_a_dump_goes_on_alone() {
    let db = TestDb::new();
    fill_uniform(&db, 2000);
    let host = serve_without_self_requests(&db, &[("page_bytes", "4096")]);
    let (_, lines) = dump_every_patient(&host, &db, "no self requests");
    assert_eq!(lines.len(), 2000);
    assert_eq!(dump_instances(&host), 1);
}

#[test]
fn a_helper_failing_mid_stream_aborts_the_transfer() {
    // The helper's transaction starts after the main instance's (which exports the snapshot
    // first): kill only the later one, once both are there.
    let (db, _host, killed, mut admin) = kill_mid_stream(
        "WITH dump AS (SELECT pid, xact_start FROM pg_stat_activity
                       WHERE datname = $1 AND pid <> pg_backend_pid()
                         AND xact_start IS NOT NULL)
         SELECT count(pg_terminate_backend(pid)) FROM
           (SELECT pid FROM dump WHERE (SELECT count(*) FROM dump) = 2
            ORDER BY xact_start DESC LIMIT 1) helper",
    );
    assert_eq!(
        killed, 1,
        "never saw the main instance's and the helper's transactions"
    );
    // The main instance ended its transaction: nothing is left idle in one.
    let mut idle = -1;
    for _ in 0..100 {
        idle = open_transactions(&mut admin, &db);
        if idle == 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(idle, 0, "a transaction was left open");
}
