//! Checks the test helpers themselves (no component needed): per-test databases, the sample,
//! direct inserts into the Aidbox layout, and curl's reply parsing.
mod support;

use std::io::{Read, Write};
use std::net::TcpListener;

use support::*;

#[test]
fn testdb_is_fresh_has_the_schema_and_is_dropped() {
    let name;
    {
        let db = TestDb::new();
        name = db.name.clone();
        assert!(name.starts_with("sb_test_"), "{name}");
        let mut c = db.client();
        let current: String = c
            .query_one("SELECT current_database()", &[])
            .unwrap()
            .get(0);
        assert_eq!(current, name);
        // Every sample type, plus Patient/Client/AccessPolicy, has its table, and it is empty.
        let mut types = sample_types();
        types.extend(["Patient", "Client", "AccessPolicy"].map(String::from));
        for t in &types {
            let n = db.scalar_i64(&format!("SELECT count(*) FROM {}", table_of(t)));
            assert_eq!(n, 0, "{t}");
        }
        // The schema is idempotent: applying it again is fine.
        db.exec(&std::fs::read_to_string(repo_root().join("schema/schema.sql")).unwrap());
        // The seed from the brief runs unchanged.
        db.exec(
            "INSERT INTO patient (id,txid, status, resource) SELECT g.id, g.id, 'created', \
             '{\"name\": [{\"family\": \"John\"}]}' FROM generate_series(1, 1000) AS g (id);",
        );
        assert_eq!(db.scalar_i64("SELECT count(*) FROM patient"), 1000);
        assert_eq!(
            db.scalar_i64(
                "SELECT count(*) FROM patient WHERE resource_type = 'Patient' AND cts <= now()"
            ),
            1000
        );
        let other = TestDb::new();
        assert_ne!(other.name, db.name);
        assert_eq!(other.scalar_i64("SELECT count(*) FROM patient"), 0);
    }
    let mut admin = postgres::Client::connect(&database_url(), postgres::NoTls).unwrap();
    let left: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_database WHERE datname = $1",
            &[&name],
        )
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "{name} was not dropped");
}

#[test]
fn insert_resources_loads_the_whole_sample_in_aidbox_layout() {
    let db = TestDb::new();
    let types = sample_types();
    assert!(types.len() >= 17, "{types:?}");
    assert!(types.iter().any(|t| t == "Patient"));
    let mut total = 0;
    for t in &types {
        let resources = sample(t);
        assert!(!resources.is_empty(), "{t}");
        insert_resources(&db, t, &resources);
        let table = table_of(t);
        let n = db.scalar_i64(&format!("SELECT count(*) FROM {table}"));
        assert_eq!(n as usize, resources.len(), "{t}");
        let bad = db.scalar_i64(&format!(
            "SELECT count(*) FROM {table} WHERE resource ? 'id' OR resource ? 'resourceType' \
             OR resource ? 'meta' OR resource_type <> '{t}' OR status <> 'created'"
        ));
        assert_eq!(bad, 0, "{t}");
        total += resources.len();
    }
    assert_eq!(total, 17_876, "the sample has 17,876 resources");
    // txids come from the sequence, one per resource, in insertion order.
    assert_eq!(
        db.scalar_i64("SELECT last_value FROM transaction_id_seq"),
        total as i64
    );

    // Body round trip: what is stored equals the sample without id/resourceType/meta.
    let first = &sample("Patient")[0];
    let (id, body) = aidbox_body(first);
    let stored: String = db
        .client()
        .query_one("SELECT resource::text FROM patient WHERE id = $1", &[&id])
        .unwrap()
        .get(0);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&stored).unwrap(),
        body
    );
    let first_txid = db.scalar_i64(&format!("SELECT txid FROM patient WHERE id = '{id}'"));
    let max_txid = db.scalar_i64("SELECT max(txid) FROM patient");
    assert!(first_txid < max_txid);
}

#[test]
fn insert_raw_keeps_decimal_precision() {
    let db = TestDb::new();
    let line = r#"{"resourceType":"Observation","id":"o1","meta":{"versionId":"1"},"valueQuantity":{"value":1.50,"unit":"mg"},"big":12345678901234567890123}"#;
    insert_raw(&db, "Observation", &[line]);
    let stored: String = db
        .client()
        .query_one(
            "SELECT resource::text FROM observation WHERE id = 'o1'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(stored.contains("1.50"), "{stored}");
    assert!(stored.contains("12345678901234567890123"), "{stored}");
    assert!(
        !stored.contains("meta") && !stored.contains("resourceType"),
        "{stored}"
    );
}

#[test]
fn helpers_parse_urls() {
    assert_eq!(
        host_port("postgres://u:p@db:6543/x?sslmode=disable"),
        "db:6543"
    );
    assert_eq!(host_port("postgres://localhost/x"), "localhost:5432");
    assert_eq!(host_port("postgres://u@[::1]:5433/x"), "[::1]:5433");
    assert_eq!(
        url_with_db(
            "postgres://postgres@127.0.0.1:1/postgres?sslmode=disable",
            "sb"
        ),
        "postgres://postgres@127.0.0.1:1/sb?sslmode=disable"
    );
    assert_eq!(url_with_db("postgres://h:1", "sb"), "postgres://h:1/sb");
}

/// A one-shot HTTP server answering with `response`, for checking curl().
fn serve_once(response: &'static [u8]) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf);
        let _ = s.write_all(response);
    });
    format!("http://{addr}/")
}

#[test]
fn curl_reports_status_headers_body_and_exit() {
    let url = serve_once(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+ndjson\r\nTransfer-Encoding: chunked\r\n\r\n\
          8\r\n{\"a\":1}\n\r\n8\r\n{\"b\":2}\n\r\n0\r\n\r\n",
    );
    let r = curl(&[&url]);
    assert_eq!((r.exit, r.status), (0, 200), "{}", r.stderr);
    assert_eq!(r.header("content-type"), Some("application/fhir+ndjson"));
    assert_eq!(r.lines(), vec![r#"{"a":1}"#, r#"{"b":2}"#]);

    // A chunked stream cut off before its last chunk: curl exits 18.
    let url =
        serve_once(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n{\"a\":1}\n\r\n");
    let r = curl(&[&url]);
    assert_eq!((r.exit, r.status), (18, 200), "{}", r.stderr);
    assert_eq!(r.lines(), vec![r#"{"a":1}"#]);

    let url =
        serve_once(b"HTTP/1.1 404 Not Found\r\nContent-Length: 16\r\n\r\n{\"error\":\"nope\"}");
    let r = curl(&[&url]);
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"], "nope");
}
