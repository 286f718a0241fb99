//! `$load` end to end: streamed ndjson import, all-or-nothing, gzip, line-numbered errors.
mod support;

use serde_json::{json, Value};
use std::io::{Read, Write};
use support::*;

fn load_file(
    host: &spin_bulk_host::Host,
    path: &str,
    file: &std::path::Path,
    extra: &[&str],
) -> Reply {
    load_url(&format!("{}{}", host.url(), path), file, extra)
}

/// POSTs `file` as ndjson to `url` as admin (usable from a thread that doesn't own the host).
fn load_url(url: &str, file: &std::path::Path, extra: &[&str]) -> Reply {
    let data = format!("@{}", file.display());
    let mut args = vec![
        "-u",
        ADMIN,
        "-X",
        "POST",
        "-H",
        "content-type: application/ndjson",
        "--data-binary",
        &data,
    ];
    args.extend_from_slice(extra);
    args.push(url);
    curl(&args)
}

fn load_text(host: &spin_bulk_host::Host, path: &str, body: &str) -> Reply {
    let file = tmp_file(body.as_bytes());
    load_file(host, path, &file, &[])
}

fn tmp_file(bytes: &[u8]) -> std::path::PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let p = std::env::temp_dir().join(format!(
        "sb-load-{}-{}.ndjson",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    ));
    std::fs::write(&p, bytes).unwrap();
    p
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(bytes).unwrap();
    gz.finish().unwrap()
}

fn dump(host: &spin_bulk_host::Host, type_: &str) -> Vec<Value> {
    let r = curl(&["-u", ADMIN, &format!("{}/{type_}/$dump", host.url())]);
    assert_eq!(
        (r.status, r.exit),
        (200, 0),
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    r.lines()
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A checksum of a whole table, to prove a failed load changed nothing.
fn checksum(db: &TestDb, table: &str) -> String {
    db.client()
        .query_one(
            &format!(
                "SELECT count(*)::text || ':' || coalesce(md5(string_agg(id || txid || status || resource::text || ts::text, ',' ORDER BY id)), '')
                 FROM {table}"
            ) as &str,
            &[],
        )
        .unwrap()
        .get(0)
}

#[test]
fn numbers_and_text_survive_a_load_and_a_dump_unchanged() {
    let db = TestDb::new();
    let host = serve(&db, &[]);
    let line = r#"{"resourceType":"Observation","id":"o1","valueQuantity":{"value":1.50},"big":12345678901234567890123,"text":"Zoë 日本語 😀"}"#;
    let r = load_text(&host, "/$load", &format!("{line}\n"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["loaded"], json!({"Observation": 1}));
    let out = curl(&["-u", ADMIN, &format!("{}/Observation/$dump", host.url())]);
    let text = out.text();
    assert!(text.contains("\"value\": 1.50"), "{text}");
    assert!(text.contains("12345678901234567890123"), "{text}");
    assert!(text.contains("Zoë 日本語 😀"), "{text}");
}

#[test]
fn synthea_sample_round_trips_and_reloads_with_new_txids() {
    let db = TestDb::new();
    let host = serve(&db, &[]);
    let types = sample_types();
    let mut first_txids = std::collections::HashMap::new();
    for t in &types {
        let file = sample_dir().join(format!("{t}.ndjson"));
        let r = load_file(&host, &format!("/{t}/$load"), &file, &[]);
        assert_eq!(r.status, 200, "{t}: {}", r.text());
        let expected = sample(t).len();
        assert_eq!(r.json()["loaded"][t], json!(expected), "{t}");
        first_txids.insert(t.clone(), r.json()["txid"].as_i64().unwrap());
    }
    for t in &types {
        let mut source: std::collections::HashMap<String, Value> = sample(t)
            .into_iter()
            .map(|r| (r["id"].as_str().unwrap().to_string(), r))
            .collect();
        let lines = dump(&host, t);
        assert_eq!(lines.len(), source.len(), "{t}");
        for mut line in lines {
            let meta = line.as_object_mut().unwrap().remove("meta").unwrap();
            assert_eq!(meta["versionId"], json!(first_txids[t].to_string()));
            let id = line["id"].as_str().unwrap().to_string();
            assert_eq!(line, source.remove(&id).unwrap(), "{t}/{id}");
        }
    }
    // Loading the same files again: counts unchanged, new txids, status updated.
    for t in &types {
        let file = sample_dir().join(format!("{t}.ndjson"));
        let r = load_file(&host, "/$load", &file, &[]);
        assert_eq!(r.status, 200, "{t}: {}", r.text());
        let table = table_of(t);
        assert_eq!(
            db.scalar_i64(&format!("SELECT count(*) FROM {table}")) as usize,
            sample(t).len()
        );
        let txid = r.json()["txid"].as_i64().unwrap();
        assert!(txid > first_txids[t]);
        assert_eq!(
            db.scalar_i64(&format!(
                "SELECT count(*) FROM {table} WHERE txid <> {txid} OR status <> 'updated'"
            )),
            0
        );
    }
}

#[test]
fn gzip_and_plain_give_the_same_result() {
    let file = sample_dir().join("Condition.ndjson");
    let raw = std::fs::read(&file).unwrap();
    let gz = tmp_file(&gzip(&raw));
    let plain_db = TestDb::new();
    let gz_db = TestDb::new();
    let h1 = serve(&plain_db, &[]);
    let h2 = serve(&gz_db, &[]);
    assert_eq!(load_file(&h1, "/Condition/$load", &file, &[]).status, 200);
    let r = load_file(
        &h2,
        "/Condition/$load",
        &gz,
        &["-H", "content-encoding: gzip"],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let strip = |v: Vec<Value>| -> Vec<Value> {
        v.into_iter()
            .map(|mut l| {
                l.as_object_mut().unwrap().remove("meta");
                l
            })
            .collect()
    };
    assert_eq!(strip(dump(&h1, "Condition")), strip(dump(&h2, "Condition")));
}

#[test]
fn every_error_class_leaves_the_table_unchanged_and_names_the_line() {
    let db = TestDb::new();
    let host = serve(&db, &[("max_line_bytes", "4096")]);
    let good = r#"{"resourceType":"Patient","id":"keep","active":true}"#;
    assert_eq!(load_text(&host, "/$load", &format!("{good}\n")).status, 200);
    let before = checksum(&db, "patient");
    let ok1 = r#"{"resourceType":"Patient","id":"n1"}"#;
    let long = format!(
        r#"{{"resourceType":"Patient","id":"long","x":"{}"}}"#,
        "y".repeat(5000)
    );
    let cases: Vec<(String, &str, &str)> = vec![
        (format!("{ok1}\n{{not json\n"), "line 2", "not valid JSON"),
        (format!("{ok1}\n[1,2]\n"), "line 2", "not a JSON object"),
        (
            format!("{ok1}\n\n{{\"id\":\"x\"}}\n"),
            "line 3",
            "missing resourceType",
        ),
        (
            format!("{ok1}\n{{\"resourceType\":\"Patient\"}}\n"),
            "line 2",
            "missing id",
        ),
        (
            format!("{ok1}\n{{\"resourceType\":\"pat ient\",\"id\":\"x\"}}\n"),
            "line 2",
            "not a valid type name",
        ),
        (
            format!("{ok1}\n{{\"resourceType\":\"Patient\",\"id\":7}}\n"),
            "line 2",
            "id must be a string",
        ),
        (
            format!("{ok1}\n{long}\n"),
            "line 2",
            "longer than max_line_bytes",
        ),
        (
            format!("{ok1}\n{{\"resourceType\":\"Patient\",\"id\":\"cut"),
            "line 2",
            "middle of a line",
        ),
    ];
    for (body, line, needle) in &cases {
        let r = load_text(&host, "/$load", body);
        let why = outcome(&r, 422);
        assert!(why.starts_with(&format!("{line}: ")), "{why}");
        assert!(why.contains(needle), "{why}");
        assert_eq!(checksum(&db, "patient"), before, "{needle}");
    }
    // A type that contradicts the URL.
    let r = load_text(
        &host,
        "/Patient/$load",
        &format!("{ok1}\n{{\"resourceType\":\"Observation\",\"id\":\"o\"}}\n"),
    );
    assert!(outcome(&r, 422).contains("does not match"));
    // Many bad lines are listed together (up to 100).
    let many: String = (0..150)
        .map(|i| format!("{{\"resourceType\":\"Patient\",\"id\":{i}}}\n"))
        .collect();
    let r = load_text(&host, "/$load", &many);
    outcome(&r, 422);
    assert_eq!(r.json()["issue"].as_array().unwrap().len(), 100);
    // Broken gzip.
    let mut broken = gzip(format!("{ok1}\n").repeat(1000).as_bytes());
    let n = broken.len();
    broken[n / 2] ^= 0xff;
    broken.truncate(n - 10);
    let r = load_file(
        &host,
        "/$load",
        &tmp_file(&broken),
        &["-H", "content-encoding: gzip"],
    );
    assert!(r.status == 400 || r.status == 422, "{}", r.text());
    // Not ndjson / unknown mode.
    let r = curl(&[
        "-u",
        ADMIN,
        "-X",
        "POST",
        "-H",
        "content-type: text/csv",
        "-d",
        "a",
        &format!("{}/$load", host.url()),
    ]);
    outcome(&r, 415);
    let r = curl(&[
        "-u",
        ADMIN,
        "-X",
        "POST",
        "-H",
        "content-type: application/ndjson",
        "-d",
        ok1,
        &format!("{}/$load?mode=merge", host.url()),
    ]);
    outcome(&r, 400);
    assert_eq!(checksum(&db, "patient"), before);
}

#[test]
fn one_bad_line_near_the_end_of_100k_writes_nothing() {
    let db = TestDb::new();
    let host = serve(&db, &[]);
    let mut body = String::with_capacity(100_000 * 80);
    for i in 0..100_000 {
        if i == 99_990 {
            body.push_str("{\"resourceType\":\"Patient\",\"id\":\"bad\",\"x\":}\n");
        } else {
            body.push_str(&format!(
                "{{\"resourceType\":\"Patient\",\"id\":\"p{i}\",\"name\":[{{\"family\":\"F{i}\"}}]}}\n"
            ));
        }
    }
    let r = load_text(&host, "/Patient/$load", &body);
    assert!(outcome(&r, 422).starts_with("line 99991: "));
    assert_eq!(db.scalar_i64("SELECT count(*) FROM patient"), 0);
    // The same body without the bad line loads fully.
    let good = body.replace("{\"resourceType\":\"Patient\",\"id\":\"bad\",\"x\":}\n", "");
    let r = load_text(&host, "/Patient/$load", &good);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["loaded"]["Patient"], json!(99_999));
    assert_eq!(db.scalar_i64("SELECT count(*) FROM patient"), 99_999);
}

#[test]
fn repeated_ids_last_wins_and_insert_mode_refuses_existing_ids() {
    let db = TestDb::new();
    let host = serve(&db, &[]);
    let body = "{\"resourceType\":\"Patient\",\"id\":\"a\",\"n\":1}\n{\"resourceType\":\"Patient\",\"id\":\"b\",\"n\":1}\n{\"resourceType\":\"Patient\",\"id\":\"a\",\"n\":2}\n";
    assert_eq!(load_text(&host, "/$load", body).status, 200);
    assert_eq!(
        db.scalar_i64("SELECT (resource->>'n')::int FROM patient WHERE id = 'a'"),
        2
    );
    let before = checksum(&db, "patient");
    let file = tmp_file(b"{\"resourceType\":\"Patient\",\"id\":\"c\"}\n{\"resourceType\":\"Patient\",\"id\":\"b\"}\n");
    let r = load_file(&host, "/$load?mode=insert", &file, &[]);
    let why = outcome(&r, 409);
    assert!(why.contains("line 2") && why.contains("Patient/b"), "{why}");
    assert_eq!(checksum(&db, "patient"), before);
}

/// Batches whose ids are all new are inserted plainly, a batch with an existing id upserts (and
/// so do the table's later batches): whichever way a batch went, existing rows are updated in
/// place and new ones created. 25K lines make three batches; the existing ids sit in the last.
#[test]
fn upserts_update_existing_ids_and_create_new_ones_batch_by_batch() {
    let db = TestDb::new();
    let host = serve(&db, &[]);
    let line =
        |id: &str, n: u32| format!("{{\"resourceType\":\"Patient\",\"id\":\"{id}\",\"n\":{n}}}\n");
    let first: String = ["x1", "x2", "x3"].iter().map(|id| line(id, 1)).collect();
    assert_eq!(load_text(&host, "/$load", &first).status, 200);

    let mut body: String = (0..24_000)
        .map(|i| line(&format!("new-{i:05}"), 2))
        .collect();
    body.push_str(&line("x2", 2));
    body.push_str(&line("fresh", 2));
    let r = load_text(&host, "/$load", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let txid = r.json()["txid"].as_i64().unwrap();
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM patient"),
        3 + 24_000 + 1
    );
    assert_eq!(
        db.scalar_i64(&format!(
            "SELECT count(*) FROM patient WHERE txid = {txid} AND status = 'created' AND resource->>'n' = '2'"
        )),
        24_001
    );
    assert_eq!(
        db.scalar_i64(&format!(
            "SELECT count(*) FROM patient WHERE id = 'x2' AND txid = {txid} AND status = 'updated' AND resource->>'n' = '2'"
        )),
        1
    );
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM patient WHERE id IN ('x1', 'x3') AND status = 'created' AND resource->>'n' = '1'"),
        2
    );
}

/// A table made elsewhere whose `id` has a collation of its own (ICU's root here, where 'B'
/// sorts after 'a'; the database's is C): the existence probe compares in the column's
/// collation, so a batch ['B', 'a'] still finds the stored 'B' and upserts it.
#[test]
fn upserts_probe_ids_in_the_id_columns_own_collation() {
    let db = TestDb::new();
    let host = serve(&db, &[]);
    db.exec(
        "CREATE TABLE thing (id text COLLATE \"und-x-icu\" PRIMARY KEY, txid bigint NOT NULL, \
           cts timestamptz NOT NULL DEFAULT now(), ts timestamptz NOT NULL DEFAULT now(), \
           resource_type text NOT NULL DEFAULT 'Thing', status text NOT NULL, resource jsonb NOT NULL);
         INSERT INTO thing (id, txid, status, resource) VALUES ('B', 1, 'created', '{\"v\": 1}')",
    );
    let r = load_text(
        &host,
        "/Thing/$load",
        "{\"id\":\"B\",\"v\":2}\n{\"id\":\"a\",\"v\":2}\n",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM thing WHERE resource->>'v' = '2'"),
        2
    );
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM thing WHERE id = 'B' AND status = 'updated'"),
        1
    );
}

/// The plain-insert path's one race: another transaction inserts one of the batch's ids after
/// the existence check. The load waits for that transaction, then fails as a whole with 409 and
/// writes nothing; the other writer's row stays as it wrote it.
#[test]
fn a_concurrent_insert_of_the_same_id_fails_the_whole_load_with_409() {
    let db = TestDb::new();
    let host = serve(&db, &[]);
    let mut other = db.client();
    let mut tx = other.transaction().unwrap();
    tx.batch_execute(
        "INSERT INTO patient (id, txid, status, resource) VALUES ('race', 1, 'created', '{\"by\": \"other\"}')",
    )
    .unwrap();

    let url = format!("{}/$load", host.url());
    let loader = std::thread::spawn(move || {
        let file = tmp_file(
            b"{\"resourceType\":\"Patient\",\"id\":\"mine\"}\n{\"resourceType\":\"Patient\",\"id\":\"race\",\"by\":\"load\"}\n",
        );
        load_url(&url, &file, &["--max-time", "60"])
    });
    // The load's INSERT blocks on the uncommitted 'race' row; commit once it waits.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while db.scalar_i64(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE 'INSERT INTO%patient%'",
    ) == 0
    {
        assert!(std::time::Instant::now() < deadline, "the load never waited");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    tx.commit().unwrap();

    let r = loader.join().unwrap();
    let why = outcome(&r, 409);
    assert!(
        why.contains("Patient/race") && why.contains("retry"),
        "{why}"
    );
    assert_eq!(db.scalar_i64("SELECT count(*) FROM patient"), 1);
    assert_eq!(
        db.scalar_i64(
            "SELECT count(*) FROM patient WHERE id = 'race' AND resource->>'by' = 'other'"
        ),
        1
    );
}

/// A body that arrives in tiny chunked pieces, splitting lines and UTF-8 sequences; and a client
/// that disconnects mid-body.
#[test]
fn tiny_chunks_parse_and_a_disconnect_rolls_back() {
    let db = TestDb::new();
    let host = serve(&db, &[]);
    let body = "{\"resourceType\":\"Patient\",\"id\":\"ü1\",\"name\":[{\"family\":\"日本語\"}]}\n{\"resourceType\":\"Patient\",\"id\":\"ü2\"}\n";
    let auth = "Basic YWRtaW46dGVzdC1hZG1pbi1zZWNyZXQ="; // admin:test-admin-secret
    let send = |pieces: &[&[u8]], finish: bool| -> String {
        let mut s = std::net::TcpStream::connect(host.addr()).unwrap();
        write!(
            s,
            "POST /$load HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nContent-Type: application/ndjson\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        for p in pieces {
            write!(s, "{:x}\r\n", p.len()).unwrap();
            s.write_all(p).unwrap();
            s.write_all(b"\r\n").unwrap();
            s.flush().unwrap();
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        if finish {
            s.write_all(b"0\r\n\r\n").unwrap();
        } else {
            s.shutdown(std::net::Shutdown::Write).unwrap();
        }
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        answer
    };
    let bytes = body.as_bytes();
    let pieces: Vec<&[u8]> = bytes.chunks(3).collect();
    let answer = send(&pieces, true);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(db.scalar_i64("SELECT count(*) FROM patient"), 2);
    let family: String = db
        .client()
        .query_one(
            "SELECT resource#>>'{name,0,family}' FROM patient WHERE id = 'ü1'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(family, "日本語");
    // Disconnect after half the body: nothing of it is written.
    let more = "{\"resourceType\":\"Patient\",\"id\":\"x1\"}\n{\"resourceType\":\"Patient\",\"id\":\"x2\"}\n";
    let half: Vec<&[u8]> = vec![&more.as_bytes()[..40]];
    let _ = send(&half, false);
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM patient WHERE id LIKE 'x%'"),
        0
    );
    let idle = db.scalar_i64(&format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' AND state LIKE 'idle in transaction%'",
        db.name
    ));
    assert_eq!(idle, 0);
}

/// A one-file HTTP server on loopback: answers `GET /<name>` with `body`, 404 otherwise; serves
/// until the test ends.
fn file_server(name: &'static str, body: Vec<u8>) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut stream = stream;
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap_or(0) == 1 {
                head.push(byte[0]);
            }
            let head = String::from_utf8_lossy(&head);
            let path = head.split_whitespace().nth(1).unwrap_or("");
            let (status, payload): (&str, &[u8]) = if path == format!("/{name}") {
                ("200 OK", &body)
            } else {
                ("404 Not Found", b"no such file")
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                payload.len()
            );
            let _ = stream.write_all(payload);
        }
    });
    port
}

/// Aidbox's URL form: the file is fetched through Spin's outbound HTTP — only from the origin
/// `load_source_origin` allows — and gunzipped on the fly because its name ends in `.gz`.
#[test]
fn source_url_form_fetches_only_from_the_allowed_origin() {
    let raw = std::fs::read(sample_dir().join("Patient.ndjson")).unwrap();
    let port = file_server("Patient.ndjson.gz", gzip(&raw));
    let origin = format!("http://127.0.0.1:{port}");
    let db = TestDb::new();
    let host = serve(&db, &[("load_source_origin", &origin)]);
    let post = |body: &str| {
        curl(&[
            "-u",
            ADMIN,
            "-H",
            "content-type: application/json",
            "-d",
            body,
            &format!("{}/$load", host.url()),
        ])
    };
    let r = post(&format!(
        r#"{{"source": "{origin}/Patient.ndjson.gz", "resourceType": "Patient"}}"#
    ));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json()["loaded"]["Patient"],
        json!(sample("Patient").len())
    );
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM patient") as usize,
        sample("Patient").len()
    );
    // Missing file at the source, and an origin outside allowed_outbound_hosts: 502, nothing new.
    let before = checksum(&db, "patient");
    let why = outcome(
        &post(&format!(r#"{{"source": "{origin}/nothing.ndjson"}}"#)),
        502,
    );
    assert!(why.contains("404"), "{why}");
    let other = file_server("Patient.ndjson.gz", gzip(&raw));
    let why = outcome(
        &post(&format!(
            r#"{{"source": "http://127.0.0.1:{other}/Patient.ndjson.gz"}}"#
        )),
        502,
    );
    assert!(why.to_lowercase().contains("denied"), "{why}");
    outcome(&post(r#"{"src": "x"}"#), 400);
    assert_eq!(checksum(&db, "patient"), before);
}
