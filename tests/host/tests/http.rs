//! The HTTP behaviour that must match Spin: stream endings, streaming, request headers,
//! variables, memory accounting.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;

use spin_bulk_host::{Host, HostConfig, Outcome};
use support::*;

const CHUNKS: &str = "chunk 0\nchunk 1\nchunk 2\n";

#[test]
fn finish_ends_the_stream_cleanly() {
    let host = start_fixture(false);
    let r = curl(&format!("{}/finish", host.url()));
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.body, CHUNKS);
    let s = stat_for(&host, "/finish");
    assert_eq!((s.status, s.outcome), (200, Outcome::Finished));
}

#[test]
fn dropping_the_body_aborts_the_transfer() {
    let host = start_fixture(false);
    let r = curl(&format!("{}/drop", host.url()));
    assert_eq!(
        r.code, 18,
        "curl should see a partial transfer: {}",
        r.stderr
    );
    // hyper closes the connection on the body error without flushing what it still buffers,
    // so the tail may be missing (the same stack as Spin's): only a prefix is guaranteed.
    assert!(
        r.body.starts_with("chunk 0\n") && CHUNKS.starts_with(&r.body),
        "{:?}",
        r.body
    );
    assert_eq!(stat_for(&host, "/drop").outcome, Outcome::Aborted);
}

#[test]
fn a_trap_after_the_first_chunks_ends_cleanly_like_spin() {
    let host = start_fixture(false);
    let r = curl(&format!("{}/trap", host.url()));
    assert_eq!(
        r.code, 0,
        "Spin ends a trapped stream cleanly: {}",
        r.stderr
    );
    assert_eq!(r.body, CHUNKS);
    assert_eq!(stat_for(&host, "/trap").outcome, Outcome::Trapped);
}

#[test]
fn each_write_reaches_the_client_before_the_component_finishes() {
    let host = start_fixture(false);
    let mut conn = TcpStream::connect(host.addr()).unwrap();
    write!(
        conn,
        "GET /slow HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        host.addr()
    )
    .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("first") {
        let n = conn.read(&mut buf).unwrap();
        assert!(n > 0, "connection closed before the first chunk");
        seen.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&seen).to_string();
    assert!(
        !head.contains("second"),
        "the first chunk must arrive while the component sleeps"
    );
    assert!(head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked"));
    assert!(
        host.requests().iter().all(|s| s.path != "/slow"),
        "the request must still be running"
    );
    conn.read_to_end(&mut seen).unwrap();
    let all = String::from_utf8_lossy(&seen);
    assert!(all.contains("second"));
    assert!(all.ends_with("0\r\n\r\n"), "clean chunked end: {all:?}");
}

#[test]
fn spin_request_headers() {
    let host = start_fixture(false);
    let body = get(&host, "/headers?x=1");
    let port = host.addr().port();
    for expected in [
        format!("spin-full-url: http://127.0.0.1:{port}/headers?x=1\n"),
        "spin-path-info: /headers\n".to_string(),
        "spin-matched-route: /...\n".to_string(),
        "spin-component-route: \n".to_string(),
        "spin-raw-component-route: /...\n".to_string(),
        "spin-base-path: /\n".to_string(),
        "spin-client-addr: 127.0.0.1:".to_string(),
    ] {
        assert!(body.contains(&expected), "missing {expected:?} in:\n{body}");
    }
}

#[test]
fn variables_resolve_templates_and_report_undefined() {
    let host = start_fixture(false);
    assert_eq!(get(&host, "/var?greeting"), "ok: hello, world\n");
    assert!(get(&host, "/var?db_host").contains("Undefined"));
    assert!(get(&host, "/var?Bad-Name").contains("InvalidName"));

    let mut config = HostConfig::new(fixture_wasm(), fixture_manifest());
    config.variables.insert("db_url".into(), "x".into());
    config.variables.insert("greeting".into(), "hi".into());
    let host = Host::start(config).unwrap();
    assert_eq!(get(&host, "/var?greeting"), "ok: hi, world\n");
}

#[test]
fn a_required_variable_without_value_refuses_to_start() {
    let err = Host::start(HostConfig::new(fixture_wasm(), fixture_manifest()))
        .err()
        .expect("must not start without db_url");
    assert!(format!("{err:#}").contains("db_url"), "{err:#}");
}

#[test]
fn unknown_paths_reach_the_component() {
    let host = start_fixture(false);
    let r = curl(&format!("{}/nope", host.url()));
    assert_eq!(r.code, 0);
    assert_eq!(r.body, "not found\n");
}

#[test]
fn peak_linear_memory_is_recorded() {
    let host = start_fixture(false);
    get(&host, "/finish");
    let small = host.peak_memory();
    assert!(small > 0);
    get(&host, "/mem?64");
    assert!(host.peak_memory() >= 64 << 20, "{}", host.peak_memory());
    assert!(stat_for(&host, "/mem").peak_memory >= 64 << 20);
    host.reset_peak_memory();
    assert_eq!(host.peak_memory(), 0);
    get(&host, "/finish");
    assert!(host.peak_memory() < 64 << 20);
}

#[test]
fn runaway_memory_traps() {
    let host = start_fixture(false);
    let r = curl(&format!("{}/mem?2048", host.url()));
    assert_eq!(r.code, 0);
    assert!(r.body.is_empty(), "{}", r.body);
    let s = stat_for(&host, "/mem");
    assert_eq!((s.status, s.outcome), (500, Outcome::Trapped));
}
