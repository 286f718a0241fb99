//! spin-bulk: a streaming FHIR bulk API as a Spin component.
//!
//! The request path, step by step (see ARCHITECTURE.md):
//! `spin` (the only module that touches spin-sdk) turns the wasi:http request into an
//! [`http::Request`] → [`auth`] checks the Basic credentials (one query loads the client and its
//! policies) → [`route`] picks the endpoint → [`auth::authorize`] applies the AccessPolicies →
//! the endpoint module (`dump`, `rest`, …) runs and returns an [`http::Reply`] → `spin` writes
//! it, streaming page by page and aborting the body if a page fails.
//!
//! Everything but `spin` is plain Rust that builds and unit-tests natively.

pub mod auth;
pub mod config;
pub mod db;
pub mod dump;
pub mod encode;
pub mod export;
pub mod fanout;
pub mod http;
pub mod load;
pub mod outcome;
pub mod output;
pub mod params;
pub mod policy;
pub mod resource;
pub mod rest;
pub mod route;
pub mod rowtext;
pub mod sql;
pub mod store;

#[cfg(target_arch = "wasm32")]
mod spin;

use auth::Principal;
use db::Platform;
use http::{Reply, Request};
use outcome::ApiError;
use route::Route;
use serde_json::{json, Map, Value};

/// Handles one request. Never panics on bad input: every failure is an [`ApiError`] reply.
pub fn handle<P: Platform>(platform: &P, req: Request) -> Reply
where
    P::Conn: 'static,
{
    match dispatch(platform, req) {
        Ok(reply) => reply,
        Err(e) => e.into(),
    }
}

fn dispatch<P: Platform>(platform: &P, mut req: Request) -> Result<Reply, ApiError>
where
    P::Conn: 'static,
{
    // No endpoint answers without credentials, not even with a 404.
    let (client_id, secret) = auth::credentials(req.header("authorization"))?;
    let cfg = config::Config::load(platform)?;
    let mut conn = cfg.connect(platform)?;
    let principal =
        auth::authenticate(&mut conn, cfg.admin_secret.as_deref(), &client_id, &secret)?;
    let route = route::route(&req)?;
    auth::authorize(
        &principal,
        &request_object(&req, &principal)?,
        route.guard(),
    )?;
    match route {
        Route::Dump { type_name } => {
            let q = dump::DumpQuery::parse(&type_name, &req)?;
            let fanout = fanout::Fanout {
                requests: platform.self_requests(),
                path: req.path.clone(),
                authorization: req.header("authorization").unwrap_or_default().to_string(),
                parts: cfg.dump_parallel,
            };
            dump::start(conn, q, &cfg, Some(fanout))
        }
        Route::DumpSql => sql::dump_sql(conn, &mut req, &cfg),
        Route::Sql => sql::console(&mut conn, &mut req),
        Route::Load { type_name } => {
            load::load(platform, &mut conn, &mut req, type_name.as_deref(), &cfg)
        }
        Route::ExportKickoff { patient } => {
            export::kickoff(&mut conn, &mut req, &principal, patient)
        }
        Route::ExportStatus { job } => export::status(&mut conn, &req, &principal, &job),
        Route::ExportFile { job, part } => export::file(conn, &req, &principal, &job, &part, &cfg),
        Route::DumpRanges { type_name } => export::dump_ranges(&mut conn, &req, &type_name),
        Route::Metadata => export::metadata(&req),
        Route::Put => {
            params::Params::parse(&req.query)?.finish()?;
            rest::put(&mut conn, &mut req, &mut || platform.random_bytes(16))
        }
        Route::Read { type_name, id } => {
            params::Params::parse(&req.query)?.finish()?;
            rest::read(&mut conn, &type_name, &id)
        }
        Route::Delete { type_name, id } => {
            params::Params::parse(&req.query)?.finish()?;
            rest::delete(&mut conn, &type_name, &id)
        }
    }
}

/// The request as AccessPolicies see it (Aidbox's shape): lower-case method, the decoded path
/// as `uri`, the query parameters, and the client.
fn request_object(req: &Request, p: &Principal) -> Result<Value, ApiError> {
    let mut params = Map::new();
    for part in req.query.split('&').filter(|s| !s.is_empty()) {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        params.insert(params::decode(k)?, Value::String(params::decode(v)?));
    }
    Ok(json!({
        "request-method": req.method.to_ascii_lowercase(),
        "uri": route::decoded_path(req)?,
        "params": params,
        "client": {"id": p.client_id},
    }))
}
