//! Clients, AccessPolicies, Basic auth and `PUT /` end to end.
mod support;

use serde_json::{json, Value};
use support::*;

const SEED: &str = "INSERT INTO patient (id,txid, status, resource) SELECT g.id, g.id, 'created', '{\"name\": [{\"family\": \"John\"}]}' FROM generate_series(1, 100000) AS g (id);";

/// The seed's YAML, verbatim.
const SEED_YAML: &str = "- resourceType: Client
  id: bulk-client
  secret: secret
  grant_types: ['basic']
- resourceType: AccessPolicy
  id: bulk-client
  engine: allow
  link:
  - {id: 'bulk-client', resourceType: 'Client'}
";

fn put(host: &spin_bulk_host::Host, user: &str, content_type: &str, body: &str) -> Reply {
    curl(&[
        "-u",
        user,
        "-X",
        "PUT",
        "-H",
        &format!("content-type: {content_type}"),
        "--data-binary",
        body,
        &format!("{}/", host.url()),
    ])
}

fn as_user(host: &spin_bulk_host::Host, user: &str, args: &[&str], path: &str) -> Reply {
    let url = format!("{}{}", host.url(), path);
    let mut all = vec!["-u", user];
    all.extend_from_slice(args);
    all.push(&url);
    curl(&all)
}

#[test]
fn the_seed_demo_verbatim() {
    let db = TestDb::new();
    let host = serve(&db, &[]);
    let r = put(&host, ADMIN, "application/yaml", SEED_YAML);
    assert_eq!(r.status, 200, "{}", r.text());
    let stored = r.json();
    assert_eq!(stored.as_array().unwrap().len(), 2);
    assert_eq!(stored[0]["resourceType"], "Client");
    assert_eq!(stored[0]["id"], "bulk-client");
    assert!(
        stored[0].get("secret").is_none(),
        "the secret must not come back"
    );
    assert!(!r.text().contains("argon2"), "not even its hash");
    assert_eq!(stored[1]["resourceType"], "AccessPolicy");
    assert!(stored[1]["meta"]["versionId"].is_string());
    db.exec(SEED);
    let r = as_user(&host, "bulk-client:secret", &[], "/Patient/$dump");
    assert_eq!(r.status, 200);
    assert_eq!(r.exit, 0);
    assert_eq!(r.lines().len(), 100_000);
    // Wrong secret, unknown client, no credentials: the same 401, with a challenge.
    for user in [Some("bulk-client:wrong"), Some("nobody:secret"), None] {
        let r = match user {
            Some(u) => as_user(&host, u, &[], "/Patient/$dump"),
            None => curl(&[&format!("{}/Patient/$dump", host.url())]),
        };
        let why = outcome(&r, 401);
        assert_eq!(
            r.header("www-authenticate"),
            Some("Basic realm=\"spin-bulk\"")
        );
        if user.is_some() {
            assert_eq!(why, "invalid credentials", "no hint whether the id exists");
        }
    }
}

#[test]
fn secrets_are_stored_as_argon2id_and_never_returned() {
    let db = TestDb::new();
    let host = serve(&db, &[]);
    let r = put(&host, ADMIN, "application/yaml", SEED_YAML);
    assert_eq!(r.status, 200);
    let stored: String = db
        .client()
        .query_one(
            "SELECT resource->>'secret' FROM client WHERE id = 'bulk-client'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(stored.starts_with("$argon2id$v=19$"), "{stored}");
    assert!(!stored.contains("secret"));
    for path in [
        "/Client/$dump",
        "/Client/bulk-client",
        "/Client/$dump?fhir=true",
    ] {
        let r = as_user(&host, ADMIN, &[], path);
        assert_eq!(r.status, 200, "{path}");
        assert!(!r.text().contains("secret\""), "{path}: {}", r.text());
        assert!(!r.text().contains("argon2"), "{path}");
    }
}

#[test]
fn no_policy_means_403_and_no_policies_at_all_means_only_admin() {
    let db = TestDb::new();
    let host = serve(&db, &[]);
    let r = put(
        &host,
        ADMIN,
        "application/json",
        r#"[{"resourceType":"Client","id":"lonely","secret":"pw","grant_types":["basic"]}]"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = as_user(&host, "lonely:pw", &[], "/Patient/$dump");
    assert!(outcome(&r, 403).contains("AccessPolicy"));
    // A client without the basic grant cannot use Basic auth.
    put(
        &host,
        ADMIN,
        "application/json",
        r#"[{"resourceType":"Client","id":"nobasic","secret":"pw","grant_types":["client_credentials"]},
            {"resourceType":"AccessPolicy","id":"open","engine":"allow"}]"#,
    );
    outcome(&as_user(&host, "nobasic:pw", &[], "/Patient/$dump"), 401);
    // The unlinked allow policy now applies to every client.
    assert_eq!(
        as_user(&host, "lonely:pw", &[], "/Patient/$dump").status,
        200
    );
    // Admin without admin_secret configured does not exist.
    let db2 = TestDb::new();
    let host2 = start(&db2, &[]);
    outcome(&as_user(&host2, "admin:", &[], "/Patient/$dump"), 401);
}

#[test]
fn matcho_policy_lets_dump_through_and_stops_everything_else() {
    let db = TestDb::new();
    let host = serve(&db, &[]);
    let r = put(
        &host,
        ADMIN,
        "application/json",
        r##"[{"resourceType":"Client","id":"reader","secret":"pw","grant_types":["basic"]},
            {"resourceType":"AccessPolicy","id":"dump-only","engine":"matcho",
             "matcho":{"request-method":"get","uri":"#/.*/\\$dump$"},
             "link":[{"id":"reader","resourceType":"Client"}]}]"##,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    db.exec("INSERT INTO patient (id, txid, status, resource) VALUES ('p1', 1, 'created', '{}')");
    let r = as_user(&host, "reader:pw", &[], "/Patient/$dump");
    assert_eq!((r.status, r.lines().len()), (200, 1));
    assert_eq!(
        as_user(&host, "reader:pw", &[], "/Patient/%24dump").status,
        200
    );
    let forbidden = [
        as_user(
            &host,
            "reader:pw",
            &[
                "-X",
                "POST",
                "-H",
                "content-type: application/sql",
                "-d",
                "select 1",
            ],
            "/$dump-sql",
        ),
        put(&host, "reader:pw", "application/json", "[]"),
        as_user(&host, "reader:pw", &["-X", "DELETE"], "/Patient/p1"),
        as_user(&host, "reader:pw", &[], "/Patient/p1"),
    ];
    for r in forbidden {
        outcome(&r, 403);
    }
    assert_eq!(db.scalar_i64("SELECT count(*) FROM patient"), 1);
}

#[test]
fn put_creates_then_updates_with_new_txids_and_keeps_cts() {
    let db = TestDb::new();
    let host = serve(&db, &[]);
    let r = put(
        &host,
        ADMIN,
        "application/json",
        r#"[{"resourceType":"Patient","id":"p1","birthDate":"2000-01-01","value":1.50},
            {"resourceType":"Observation","id":"o1","status":"final"},
            {"resourceType":"Basic","id":"b1","code":{"text":"new type, new table"}}]"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("1.50"), "decimals are kept: {}", r.text());
    let first = r.json();
    let v1: i64 = first[0]["meta"]["versionId"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let (status, cts1): (String, String) = {
        let row = db
            .client()
            .query_one("SELECT status, cts::text FROM patient WHERE id = 'p1'", &[])
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(status, "created");
    assert_eq!(db.scalar_i64("SELECT count(*) FROM basic"), 1);
    std::thread::sleep(std::time::Duration::from_millis(20));
    let r = put(
        &host,
        ADMIN,
        "application/json",
        r#"[{"resourceType":"Patient","id":"p1","birthDate":"2000-01-02","meta":{"versionId":"999","profile":["http://p"]}}]"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let second = r.json();
    let v2: i64 = second[0]["meta"]["versionId"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(v2 > v1, "a new txid: {v1} then {v2}");
    assert_eq!(second[0]["meta"]["profile"], json!(["http://p"]));
    let row = db
        .client()
        .query_one(
            "SELECT status, cts::text, ts > cts, resource::text FROM patient WHERE id = 'p1'",
            &[],
        )
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "updated");
    assert_eq!(row.get::<_, String>(1), cts1, "cts is kept");
    assert!(row.get::<_, bool>(2));
    let stored: String = row.get(3);
    assert!(
        !stored.contains("\"id\"") && !stored.contains("versionId"),
        "{stored}"
    );
    // GET by id returns the same as the PUT answer.
    let r = as_user(&host, ADMIN, &[], "/Patient/p1");
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), second[0]);
    // DELETE: 204, then 404 for GET and DELETE.
    assert_eq!(
        as_user(&host, ADMIN, &["-X", "DELETE"], "/Patient/p1").status,
        204
    );
    outcome(&as_user(&host, ADMIN, &[], "/Patient/p1"), 404);
    outcome(
        &as_user(&host, ADMIN, &["-X", "DELETE"], "/Patient/p1"),
        404,
    );
    outcome(&as_user(&host, ADMIN, &[], "/Nothing/x"), 404);
}

#[test]
fn put_is_all_or_nothing_and_names_the_bad_entry() {
    let db = TestDb::new();
    let host = serve(&db, &[]);
    let good = r#"{"resourceType":"Patient","id":"a"},{"resourceType":"Patient","id":"b"}"#;
    for (bad, needle) in [
        ("7", "not a JSON object"),
        (r#"{"id":"x"}"#, "missing resourceType"),
        (r#"{"resourceType":"Patient"}"#, "missing id"),
        (
            r#"{"resourceType":"pat;ient","id":"x"}"#,
            "not a valid type name",
        ),
        (r#"{"resourceType":"Client","id":"c"}"#, "needs a secret"),
        (
            r#"{"resourceType":"AccessPolicy","id":"p","engine":"sql"}"#,
            "not supported",
        ),
        (
            r##"{"resourceType":"AccessPolicy","id":"p","engine":"matcho","matcho":{"uri":"#(("}}"##,
            "bad regex",
        ),
    ] {
        let r = put(&host, ADMIN, "application/json", &format!("[{good},{bad}]"));
        let why = outcome(&r, 422);
        assert!(why.starts_with("entry 2: "), "{why}");
        assert!(why.contains(needle), "{why}");
        assert_eq!(db.scalar_i64("SELECT count(*) FROM patient"), 0, "{bad}");
    }
    for (ct, body, status) in [
        ("application/json", "{not json", 400),
        (
            "application/json",
            "{\"resourceType\":\"Patient\",\"id\":\"a\"}",
            400,
        ),
        ("application/yaml", "a: [unclosed", 400),
        ("text/csv", "a,b", 415),
    ] {
        outcome(&put(&host, ADMIN, ct, body), status);
    }
    assert_eq!(db.scalar_i64("SELECT count(*) FROM patient"), 0);
}

#[test]
fn concurrent_puts_of_the_same_id_all_land() {
    let db = TestDb::new();
    let host = serve(&db, &[]);
    let url = host.url();
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let url = url.clone();
            std::thread::spawn(move || {
                let body = format!(r#"[{{"resourceType":"Patient","id":"same","n":{i}}}]"#);
                let r = curl(&[
                    "-u",
                    ADMIN,
                    "-X",
                    "PUT",
                    "-H",
                    "content-type: application/json",
                    "--data-binary",
                    &body,
                    &format!("{url}/"),
                ]);
                assert_eq!(r.status, 200, "{}", r.text());
                r.json()[0]["meta"]["versionId"]
                    .as_str()
                    .unwrap()
                    .parse::<i64>()
                    .unwrap()
            })
        })
        .collect();
    let txids: Vec<i64> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let unique: std::collections::HashSet<_> = txids.iter().collect();
    assert_eq!(unique.len(), 8, "every PUT got its own txid");
    let row = db
        .client()
        .query_one(
            "SELECT txid, (resource->>'n')::int FROM patient WHERE id = 'same'",
            &[],
        )
        .unwrap();
    let (txid, n): (i64, i32) = (row.get(0), row.get(1));
    assert!(txids.contains(&txid));
    assert!((0..8).contains(&n));
    assert_eq!(db.scalar_i64("SELECT count(*) FROM patient"), 1);
}

#[test]
fn malformed_authorization_headers_are_401() {
    let db = TestDb::new();
    let host = serve(&db, &[]);
    for header in ["Basic", "Basic !!!", "Bearer abc", "Basic Zm9vYmFy"] {
        let r = curl(&[
            "-H",
            &format!("Authorization: {header}"),
            &format!("{}/Patient/$dump", host.url()),
        ]);
        outcome(&r, 401);
    }
    let v: Value = as_user(&host, ADMIN, &[], "/Patient/$dump")
        .body
        .is_empty()
        .into();
    assert_eq!(v, json!(true));
}
