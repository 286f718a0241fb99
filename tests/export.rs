//! FHIR Bulk Data `$export`, `$dump-ranges` and `/metadata` end to end: real PostgreSQL, the real
//! component in the test host, real curl.
mod support;

use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use support::*;

type Host = spin_bulk_host::Host;

const ASYNC: &str = "Prefer: respond-async";
const IG: &str = "http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data";

/// Two ordinary clients, `c` and `d`, each allowed everything by its own policy.
const CLIENTS: &str = r#"[
  {"resourceType":"Client","id":"c","secret":"s","grant_types":["basic"]},
  {"resourceType":"AccessPolicy","id":"pc","engine":"allow","link":[{"id":"c","resourceType":"Client"}]},
  {"resourceType":"Client","id":"d","secret":"s","grant_types":["basic"]},
  {"resourceType":"AccessPolicy","id":"pd","engine":"allow","link":[{"id":"d","resourceType":"Client"}]}
]"#;

fn load_sample(db: &TestDb) {
    for t in sample_types() {
        insert_resources(db, &t, &sample(&t));
    }
}

fn add_clients(host: &Host) {
    let r = curl(&[
        "-u",
        ADMIN,
        "-X",
        "PUT",
        "-H",
        "content-type: application/json",
        "--data-binary",
        CLIENTS,
        &format!("{}/", host.url()),
    ]);
    assert!(r.status < 300, "PUT clients: {} {}", r.status, r.text());
}

/// `curl -u user [args…] URL`, where `target` is a path on the host or an absolute URL.
fn req(host: &Host, user: &str, args: &[&str], target: &str) -> Reply {
    let url = if target.starts_with("http") {
        target.to_string()
    } else {
        format!("{}{}", host.url(), target)
    };
    let mut all = vec!["-u", user];
    all.extend_from_slice(args);
    all.push(&url);
    curl(&all)
}

/// Kick-off that must succeed: returns the status URL.
fn kickoff(host: &Host, user: &str, path: &str) -> String {
    let r = req(host, user, &["-H", ASYNC], path);
    assert_eq!(
        r.status,
        202,
        "kick-off {path}: {}",
        String::from_utf8_lossy(&r.body)
    );
    assert!(r.body.is_empty(), "kick-off body must be empty");
    let loc = r
        .header("content-location")
        .expect("Content-Location")
        .to_string();
    assert!(
        loc.starts_with(&format!("{}/$export-status/", host.url())),
        "{loc}"
    );
    loc
}

fn manifest(host: &Host, user: &str, status_url: &str) -> Value {
    let r = req(host, user, &[], status_url);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("content-type"), Some("application/json"));
    let m = r.json();
    assert!(
        m.get("resourceType").is_none(),
        "a manifest is not a resource"
    );
    assert_eq!(m["requiresAccessToken"], json!(true));
    assert!(m["transactionTime"].as_str().unwrap().ends_with('Z'));
    assert!(m["error"].is_array(), "error is always present");
    for o in m["output"].as_array().unwrap() {
        assert!(o.get("count").is_none(), "no count: it could not be exact");
        assert!(o["url"].as_str().unwrap().starts_with(&host.url()));
    }
    m
}

/// Downloads every output file; per type, the lines of its parts in manifest order. Checks
/// each file's headers and that every line is of the entry's type.
fn download(host: &Host, user: &str, m: &Value) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for o in m["output"].as_array().unwrap() {
        let t = o["type"].as_str().unwrap();
        let r = req(host, user, &[], o["url"].as_str().unwrap());
        assert_eq!(r.exit, 0, "{}", r.stderr);
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.header("content-type"), Some("application/fhir+ndjson"));
        let lines = out.entry(t.to_string()).or_default();
        for l in r.lines() {
            let v: Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["resourceType"], t);
            lines.push(l.to_string());
        }
    }
    out
}

/// `$dump?fhir=true` of one type: what the export of that type must equal.
fn dump(host: &Host, t: &str) -> Vec<String> {
    let r = req(host, ADMIN, &[], &format!("/{t}/$dump?fhir=true"));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.lines().into_iter().map(str::to_string).collect()
}

fn ids(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

fn db_now(db: &TestDb) -> String {
    db.client()
        .query_one(
            "SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
            &[],
        )
        .unwrap()
        .get(0)
}

#[test]
fn system_export_of_the_sample_equals_dump_of_every_type() {
    let db = TestDb::new();
    load_sample(&db);
    // Small pages: every file of some size streams as many byte-budgeted pages.
    let host = start(
        &db,
        &[
            ("admin_secret", "test-admin-secret"),
            ("page_bytes", "32768"),
        ],
    );
    add_clients(&host);
    let status = kickoff(&host, ADMIN, "/$export");
    let m = manifest(&host, ADMIN, &status);
    assert_eq!(m["request"], json!(format!("{}/$export", host.url())));
    assert_eq!(m["error"], json!([]));
    let files = download(&host, ADMIN, &m);
    // Every sample type, and nothing else: Client and AccessPolicy are not data.
    let types: BTreeSet<String> = files.keys().cloned().collect();
    assert_eq!(types, sample_types().into_iter().collect::<BTreeSet<_>>());
    let mut total = 0;
    for (t, lines) in &files {
        assert_eq!(lines, &dump(&host, t), "{t}");
        assert_eq!(lines.len(), sample(t).len(), "{t}");
        total += lines.len();
    }
    assert_eq!(total, 17_876);
    // The status can be read again: the same files (nothing changed).
    assert_eq!(manifest(&host, ADMIN, &status)["output"], m["output"]);
}

#[test]
fn patient_export_is_the_patient_compartment() {
    let db = TestDb::new();
    load_sample(&db);
    let host = serve(&db, &[]);
    let status = kickoff(&host, ADMIN, "/Patient/$export");
    let m = manifest(&host, ADMIN, &status);
    assert_eq!(
        m["request"],
        json!(format!("{}/Patient/$export", host.url()))
    );
    let files = download(&host, ADMIN, &m);
    let mut expected = BTreeMap::new();
    for t in sample_types() {
        let table = table_of(&t);
        let sql = if t == "Patient" {
            format!("SELECT id FROM {table} ORDER BY id")
        } else {
            format!(
                "SELECT id FROM {table} WHERE resource #>> '{{subject,reference}}' LIKE 'Patient/%' \
                 OR resource #>> '{{patient,reference}}' LIKE 'Patient/%' ORDER BY id"
            )
        };
        let ids: Vec<String> = db
            .client()
            .query(sql.as_str(), &[])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        if !ids.is_empty() {
            expected.insert(t, ids);
        }
    }
    // Organization and Practitioner have no patient link, so they get no file.
    assert!(!expected.contains_key("Organization") && !expected.contains_key("Practitioner"));
    assert!(expected.len() >= 10, "{:?}", expected.keys());
    let got: BTreeMap<String, Vec<String>> =
        files.iter().map(|(t, l)| (t.clone(), ids(l))).collect();
    assert_eq!(got, expected);
    // A compartment line is the same line as in $dump.
    let obs = dump(&host, "Observation");
    assert!(files["Observation"].iter().all(|l| obs.contains(l)));
}

#[test]
fn type_since_post_parameters_and_the_consistency_rule() {
    let db = TestDb::new();
    for t in ["Patient", "Observation", "Encounter"] {
        insert_resources(&db, t, &sample(t));
    }
    let host = serve(&db, &[]);

    // _type narrows (and orders) the output.
    let m = manifest(
        &host,
        ADMIN,
        &kickoff(&host, ADMIN, "/$export?_type=Observation,Patient"),
    );
    let types: Vec<&str> = m["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, vec!["Observation", "Patient"]);
    // A valid type without a table exports nothing, without failing.
    let m = manifest(
        &host,
        ADMIN,
        &kickoff(&host, ADMIN, "/$export?_type=Medication"),
    );
    assert_eq!(m["output"], json!([]));

    // Touch 3 patients and 1 observation after an instant.
    std::thread::sleep(std::time::Duration::from_millis(20));
    let since = db_now(&db);
    std::thread::sleep(std::time::Duration::from_millis(20));
    let touched: Vec<String> = db
        .client()
        .query(
            "UPDATE patient SET ts = now(), txid = nextval('transaction_id_seq'), \
             resource = resource || '{\"active\": false}' \
             WHERE id IN (SELECT id FROM patient ORDER BY id LIMIT 3) RETURNING id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    db.exec("UPDATE observation SET ts = now() WHERE id = (SELECT min(id) FROM observation)");

    let status = kickoff(
        &host,
        ADMIN,
        &format!("/$export?_type=Patient,Observation,Encounter&_since={since}"),
    );
    // After kick-off: one more patient is modified, one is created.
    std::thread::sleep(std::time::Duration::from_millis(20));
    let late_update: String = db
        .client()
        .query_one(
            "UPDATE patient SET ts = now(), resource = resource || '{\"gender\": \"other\"}' \
             WHERE id = (SELECT max(id) FROM patient) RETURNING id",
            &[],
        )
        .unwrap()
        .get(0);
    insert_resources(
        &db,
        "Patient",
        &[json!({"resourceType": "Patient", "id": "zz-created-late"})],
    );

    let m = manifest(&host, ADMIN, &status);
    let files = download(&host, ADMIN, &m);
    // Encounter: nothing touched, no file.
    assert_eq!(
        files.keys().collect::<Vec<_>>(),
        vec!["Observation", "Patient"]
    );
    assert_eq!(files["Observation"].len(), 1);
    // The patients touched after _since, plus the one modified after transactionTime (with
    // its newer version: SHALL include everything modified up to transactionTime); not the
    // one created after it.
    let mut expected = touched.clone();
    expected.push(late_update.clone());
    expected.sort();
    assert_eq!(ids(&files["Patient"]), expected);
    let late: Value = serde_json::from_str(files["Patient"].last().unwrap()).unwrap();
    assert_eq!(late["gender"], "other");
    let first: Value = serde_json::from_str(&files["Patient"][0]).unwrap();
    assert_eq!(first["active"], json!(false));

    // A full export after the fact includes the late patient, and nothing is lost between
    // the two: every id of the table is in one of the exports.
    let m2 = manifest(
        &host,
        ADMIN,
        &kickoff(&host, ADMIN, "/$export?_type=Patient"),
    );
    let all = download(&host, ADMIN, &m2);
    assert!(ids(&all["Patient"]).contains(&"zz-created-late".to_string()));

    // The same request as POST with a Parameters body.
    let body = json!({"resourceType": "Parameters", "parameter": [
        {"name": "_type", "valueString": "Patient"},
        {"name": "_type", "valueString": "Observation"},
        {"name": "_since", "valueInstant": since},
        {"name": "_outputFormat", "valueString": "application/fhir+ndjson"}
    ]})
    .to_string();
    let r = req(
        &host,
        ADMIN,
        &[
            "-X",
            "POST",
            "-H",
            ASYNC,
            "-H",
            "content-type: application/fhir+json",
            "--data-binary",
            &body,
        ],
        "/$export",
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let status = r.header("content-location").unwrap().to_string();
    let files = download(&host, ADMIN, &manifest(&host, ADMIN, &status));
    assert_eq!(files["Observation"].len(), 1);
    // Now the late patient was created before this transactionTime (and after _since).
    assert_eq!(files["Patient"].len(), 5);
}

#[test]
fn gzip_download_and_absolute_urls_from_the_host_header() {
    let db = TestDb::new();
    insert_resources(&db, "Observation", &sample("Observation"));
    let host = serve(&db, &[]);
    // The status and file URLs are built from the URL the client used.
    let r = req(
        &host,
        ADMIN,
        &["-H", ASYNC, "-H", "Host: fhir.example.org:8080"],
        "/$export",
    );
    assert_eq!(r.status, 202);
    let loc = r.header("content-location").unwrap();
    assert!(
        loc.starts_with("http://fhir.example.org:8080/$export-status/"),
        "{loc}"
    );
    let path = loc.trim_start_matches("http://fhir.example.org:8080");
    let m = req(&host, ADMIN, &["-H", "Host: fhir.example.org:8080"], path).json();
    let url = m["output"][0]["url"].as_str().unwrap();
    assert!(
        url.starts_with("http://fhir.example.org:8080/$export-file/"),
        "{url}"
    );
    let file_path = url
        .trim_start_matches("http://fhir.example.org:8080")
        .to_string();

    let plain = req(&host, ADMIN, &[], &file_path);
    assert_eq!(plain.header("content-encoding"), None);
    // What the SMART bulk-data-client sends.
    let gz = req(
        &host,
        ADMIN,
        &["-H", "Accept-Encoding: gzip, deflate, br, identity"],
        &file_path,
    );
    assert_eq!(gz.exit, 0);
    assert_eq!(gz.header("content-encoding"), Some("gzip"));
    assert!(gz.body.len() * 3 < plain.body.len());
    let mut unzipped = Vec::new();
    flate2::read::GzDecoder::new(&gz.body[..])
        .read_to_end(&mut unzipped)
        .unwrap();
    assert_eq!(unzipped, plain.body);
    assert_eq!(plain.lines().len(), 7513);
}

#[test]
fn delete_forgets_the_job() {
    let db = TestDb::new();
    insert_resources(&db, "Patient", &sample("Patient"));
    let host = serve(&db, &[]);
    let status = kickoff(&host, ADMIN, "/$export");
    let m = manifest(&host, ADMIN, &status);
    let file = m["output"][0]["url"].as_str().unwrap().to_string();
    let r = req(&host, ADMIN, &["-X", "DELETE"], &status);
    assert_eq!(r.status, 202);
    outcome(&req(&host, ADMIN, &[], &status), 404);
    outcome(&req(&host, ADMIN, &[], &file), 404);
    outcome(&req(&host, ADMIN, &["-X", "DELETE"], &status), 404);
    // Unknown jobs and parts.
    let d = outcome(&req(&host, ADMIN, &[], "/$export-status/no-such-job"), 404);
    assert!(d.contains("no-such-job"), "{d}");
    let status = kickoff(&host, ADMIN, "/$export");
    let file_base = status.replace("$export-status", "$export-file");
    // No table for Medication, so no such part; a bad part name.
    outcome(
        &req(&host, ADMIN, &[], &format!("{file_base}/Medication.1")),
        404,
    );
    outcome(
        &req(&host, ADMIN, &[], &format!("{file_base}/Patient.x")),
        404,
    );
    // `{Type}` alone is the whole type.
    let r = req(&host, ADMIN, &[], &format!("{file_base}/Patient"));
    assert_eq!(r.lines().len(), 50);
}

#[test]
fn only_the_client_that_kicked_off_or_admin_may_read() {
    let db = TestDb::new();
    insert_resources(&db, "Patient", &sample("Patient"));
    let host = serve(&db, &[]);
    add_clients(&host);
    // Admin's job: invisible to c (404, as if it did not exist).
    let status = kickoff(&host, ADMIN, "/$export");
    let file = manifest(&host, ADMIN, &status)["output"][0]["url"]
        .as_str()
        .unwrap()
        .to_string();
    outcome(&req(&host, "c:s", &[], &status), 404);
    outcome(&req(&host, "c:s", &[], &file), 404);
    outcome(&req(&host, "c:s", &["-X", "DELETE"], &status), 404);
    // c's job: c and admin may read it, d may not.
    let status = kickoff(&host, "c:s", "/$export");
    let m = manifest(&host, "c:s", &status);
    // Without _type, a client's export leaves out Client and AccessPolicy too.
    let types: Vec<&str> = m["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, vec!["Patient"]);
    assert_eq!(download(&host, "c:s", &m)["Patient"].len(), 50);
    manifest(&host, ADMIN, &status);
    outcome(&req(&host, "d:s", &[], &status), 404);
    outcome(
        &req(&host, "d:s", &[], m["output"][0]["url"].as_str().unwrap()),
        404,
    );
    // Wrong credentials: 401 before anything else.
    assert_eq!(req(&host, "c:wrong", &[], &status).status, 401);
    // Only admin may export Clients and AccessPolicies, and never their secrets.
    outcome(
        &req(&host, "c:s", &["-H", ASYNC], "/$export?_type=Client"),
        403,
    );
    let m = manifest(
        &host,
        ADMIN,
        &kickoff(&host, ADMIN, "/$export?_type=Client,AccessPolicy"),
    );
    let files = download(&host, ADMIN, &m);
    assert_eq!(files["Client"].len(), 2);
    assert_eq!(files["AccessPolicy"].len(), 2);
    assert!(files["Client"].iter().all(|l| !l.contains("secret")));
}

#[test]
fn bad_parameters_are_refused_unless_lenient() {
    let db = TestDb::new();
    insert_resources(&db, "Patient", &sample("Patient"));
    let host = serve(&db, &[]);
    let d = outcome(&req(&host, ADMIN, &[], "/$export"), 400);
    assert!(d.contains("respond-async"), "{d}");
    for (query, needle) in [
        ("_outputFormat=text/csv", "_outputFormat"),
        ("_since=yesterday", "_since"),
        ("_since=2024-01-01T00:00:00", "time zone"),
        ("_since=2024-01-01&_since=2024-01-02", "more than once"),
        ("_typeFilter=Patient%3Factive%3Dtrue", "_typeFilter"),
        ("_elements=id", "_elements"),
        ("_type=patient", "patient"),
        ("patient=Patient/1", "patient"),
        ("_snce=2024-01-01", "_snce"),
    ] {
        let d = outcome(
            &req(&host, ADMIN, &["-H", ASYNC], &format!("/$export?{query}")),
            400,
        );
        assert!(d.contains(needle), "{query}: {d}");
    }
    // Bodies that are not Parameters.
    for body in [
        "{\"resourceType\":\"Patient\"}",
        "not json",
        "{\"resourceType\":\"Parameters\",\"parameter\":{}}",
    ] {
        let r = req(
            &host,
            ADMIN,
            &["-X", "POST", "-H", ASYNC, "--data-binary", body],
            "/$export",
        );
        outcome(&r, 400);
    }
    assert_eq!(
        req(&host, ADMIN, &["-X", "PUT", "-H", ASYNC], "/$export").status,
        405
    );
    // Unknown parameters on status and file URLs are errors too.
    let status = kickoff(&host, ADMIN, "/$export");
    outcome(&req(&host, ADMIN, &[], &format!("{status}?x=1")), 400);

    // Lenient: unsupported parameters are ignored and reported in the error file; bad values
    // of supported ones still fail.
    let lenient = "Prefer: respond-async, handling=lenient";
    outcome(
        &req(&host, ADMIN, &["-H", lenient], "/$export?_since=yesterday"),
        400,
    );
    let status = kickoff_with(
        &host,
        lenient,
        "/$export?_typeFilter=Patient%3Factive%3Dtrue&_elements=id&_type=Patient,bad-type",
    );
    let m = manifest(&host, ADMIN, &status);
    assert_eq!(m["output"].as_array().unwrap().len(), 1);
    let errors = m["error"].as_array().unwrap();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0]["type"], "OperationOutcome");
    let r = req(&host, ADMIN, &[], errors[0]["url"].as_str().unwrap());
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/fhir+ndjson"));
    let issues: Vec<Value> = r
        .lines()
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(issues.len(), 3, "{issues:?}");
    for (i, name) in issues.iter().zip(["_typeFilter", "_elements", "_type"]) {
        assert_eq!(i["resourceType"], "OperationOutcome");
        assert_eq!(i["issue"][0]["expression"][0], name);
    }
    assert_eq!(download(&host, ADMIN, &m)["Patient"].len(), 50);
}

fn kickoff_with(host: &Host, prefer: &str, path: &str) -> String {
    let r = req(host, ADMIN, &["-H", prefer], path);
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    r.header("content-location").unwrap().to_string()
}

#[test]
fn a_client_may_hold_five_exports() {
    let db = TestDb::new();
    let host = serve(&db, &[]);
    add_clients(&host);
    let jobs: Vec<String> = (0..5).map(|_| kickoff(&host, "c:s", "/$export")).collect();
    let r = req(&host, "c:s", &["-H", ASYNC], "/$export");
    outcome(&r, 429);
    let wait: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!(wait > 0 && wait <= 24 * 3600, "{wait}");
    // Others are not affected.
    kickoff(&host, "d:s", "/$export");
    kickoff(&host, ADMIN, "/$export");
    // Deleting a finished job frees a slot.
    assert_eq!(req(&host, "c:s", &["-X", "DELETE"], &jobs[0]).status, 202);
    kickoff(&host, "c:s", "/$export");
    outcome(&req(&host, "c:s", &["-H", ASYNC], "/$export"), 429);
    // Expired jobs do not count (and are gone).
    db.exec("UPDATE bulk_export SET transaction_time = now() - interval '25 hours' WHERE client_id = 'c'");
    outcome(&req(&host, "c:s", &[], &jobs[1]), 404);
    kickoff(&host, "c:s", "/$export");
}

#[test]
fn kickoff_creates_the_job_table_when_missing() {
    let db = TestDb::new();
    insert_resources(&db, "Patient", &sample("Patient"));
    db.exec("DROP TABLE bulk_export");
    let host = serve(&db, &[]);
    outcome(&req(&host, ADMIN, &[], "/$export-status/x"), 404);
    let status = kickoff(&host, ADMIN, "/$export");
    let files = download(&host, ADMIN, &manifest(&host, ADMIN, &status));
    assert_eq!(files["Patient"].len(), 50);
    // The table is not taken for a resource type.
    assert_eq!(files.len(), 1);
}

#[test]
fn a_large_type_is_split_into_parts_of_at_most_100k() {
    let db = TestDb::new();
    db.exec(
        "INSERT INTO patient (id, txid, status, resource) \
         SELECT g, g, 'created', '{\"name\": [{\"family\": \"John\"}]}' \
         FROM generate_series(1, 250001) AS g",
    );
    let host = serve(&db, &[]);
    let m = manifest(&host, ADMIN, &kickoff(&host, ADMIN, "/$export"));
    let outputs = m["output"].as_array().unwrap();
    assert_eq!(outputs.len(), 3, "{m}");
    let mut all = Vec::new();
    let mut sizes = Vec::new();
    for o in outputs {
        assert_eq!(o["type"], "Patient");
        let r = req(&host, ADMIN, &[], o["url"].as_str().unwrap());
        assert_eq!(r.exit, 0);
        sizes.push(r.lines().len());
        all.extend(r.lines().into_iter().map(str::to_string));
    }
    assert_eq!(sizes, vec![100_000, 100_000, 50_001]);
    assert_eq!(all, dump(&host, "Patient"));
    // Exactly 200K: two full parts, no empty third one.
    db.exec("DELETE FROM patient WHERE id = (SELECT max(id) FROM patient)");
    db.exec(
        "DELETE FROM patient WHERE id IN (SELECT id FROM patient ORDER BY id DESC LIMIT 50000)",
    );
    let m = manifest(&host, ADMIN, &kickoff(&host, ADMIN, "/$export"));
    assert_eq!(m["output"].as_array().unwrap().len(), 2, "{m}");
}

/// Fetches every range of `$dump-ranges` with parallel curls and concatenates them in order.
fn parallel_dump(host: &Host, ranges: &Value) -> (Vec<String>, Vec<usize>) {
    let urls: Vec<String> = ranges
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let mut q = Vec::new();
            if let Some(a) = r["after"].as_str() {
                q.push(format!("_after={a}"));
            }
            if let Some(u) = r["upto"].as_str() {
                q.push(format!("_upto={u}"));
            }
            format!("{}/Patient/$dump?{}", host.url(), q.join("&"))
        })
        .collect();
    let handles: Vec<_> = urls
        .into_iter()
        .map(|u| std::thread::spawn(move || curl(&["-u", ADMIN, &u])))
        .collect();
    let mut all = Vec::new();
    let mut sizes = Vec::new();
    for h in handles {
        let r = h.join().unwrap();
        assert_eq!((r.exit, r.status), (0, 200), "{}", r.stderr);
        sizes.push(r.lines().len());
        all.extend(r.lines().into_iter().map(str::to_string));
    }
    (all, sizes)
}

#[test]
fn dump_ranges_split_a_type_for_parallel_dumps() {
    let db = TestDb::new();
    // No autovacuum ANALYZE behind the test's back: the first call must find no statistics.
    db.exec("ALTER TABLE patient SET (autovacuum_enabled = false)");
    db.exec(
        "INSERT INTO patient (id, txid, status, resource) \
         SELECT md5(g::text), g, 'created', '{\"name\": [{\"family\": \"John\"}]}' \
         FROM generate_series(1, 100000) AS g",
    );
    let host = serve(&db, &[]);
    let whole = req(&host, ADMIN, &[], "/Patient/$dump");
    let whole: Vec<String> = whole.lines().into_iter().map(str::to_string).collect();
    assert_eq!(whole.len(), 100_000);

    // Never analyzed: one walk of the primary key index, exact sizes.
    let r = req(&host, ADMIN, &[], "/Patient/$dump-ranges?parts=4");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-ranges-source"), Some("index"));
    let ranges = r.json();
    assert_eq!(ranges.as_array().unwrap().len(), 4);
    assert_eq!(ranges[0]["after"], Value::Null);
    assert_eq!(ranges[3]["upto"], Value::Null);
    for i in 1..4 {
        assert_eq!(ranges[i]["after"], ranges[i - 1]["upto"]);
    }
    let (all, sizes) = parallel_dump(&host, &ranges);
    assert_eq!(sizes, vec![25_000; 4]);
    assert_eq!(all, whole);

    // Analyzed: from the histogram, about equal sizes, still covering everything.
    db.exec("ANALYZE patient");
    let r = req(&host, ADMIN, &[], "/Patient/$dump-ranges?parts=8");
    assert_eq!(r.header("x-ranges-source"), Some("histogram"));
    let ranges = r.json();
    assert_eq!(ranges.as_array().unwrap().len(), 8);
    let (all, sizes) = parallel_dump(&host, &ranges);
    assert_eq!(all, whole);
    for s in &sizes {
        assert!((9_000..=16_000).contains(s), "{sizes:?}");
    }
    // More parts than histogram buckets: back to the index.
    let r = req(&host, ADMIN, &[], "/Patient/$dump-ranges?parts=500");
    assert_eq!(r.header("x-ranges-source"), Some("index"));
    let (all, sizes) = parallel_dump(&host, &r.json());
    assert_eq!(all, whole);
    assert_eq!(sizes.len(), 500);
    assert!(sizes.iter().all(|s| (150..=250).contains(s)), "{sizes:?}");

    // One part; an empty table; errors.
    assert_eq!(
        req(&host, ADMIN, &[], "/Patient/$dump-ranges?parts=1").json(),
        json!([{"after": null, "upto": null}])
    );
    assert_eq!(
        req(&host, ADMIN, &[], "/Observation/$dump-ranges?parts=3").json(),
        json!([{"after": null, "upto": null}])
    );
    outcome(&req(&host, ADMIN, &[], "/Patient/$dump-ranges"), 400);
    outcome(
        &req(&host, ADMIN, &[], "/Patient/$dump-ranges?parts=0"),
        400,
    );
    outcome(
        &req(&host, ADMIN, &[], "/Patient/$dump-ranges?parts=x"),
        400,
    );
    outcome(
        &req(&host, ADMIN, &[], "/Nothing/$dump-ranges?parts=2"),
        404,
    );
}

#[test]
fn metadata_declares_the_bulk_data_operations() {
    let db = TestDb::new();
    let host = serve(&db, &[]);
    let r = req(&host, ADMIN, &[], "/metadata");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/fhir+json"));
    let c = r.json();
    assert_eq!(c["resourceType"], "CapabilityStatement");
    assert_eq!(c["fhirVersion"], "4.0.1");
    assert_eq!(c["status"], "active");
    assert_eq!(c["kind"], "instance");
    assert_eq!(c["instantiates"], json!([IG]));
    let rest = &c["rest"][0];
    assert_eq!(rest["mode"], "server");
    assert_eq!(rest["operation"][0]["name"], "export");
    assert_eq!(
        rest["operation"][0]["definition"],
        "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export"
    );
    assert_eq!(rest["resource"][0]["type"], "Patient");
    assert_eq!(
        rest["resource"][0]["operation"][0]["definition"],
        "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/patient-export"
    );
    assert_eq!(req(&host, ADMIN, &[], "/metadata?_format=json").status, 200);
    assert_eq!(req(&host, ADMIN, &["-X", "POST"], "/metadata").status, 405);
}
