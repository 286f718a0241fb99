//! spin-bulk: a streaming FHIR bulk API as a Spin component.
//!
//! The request path, step by step (see ARCHITECTURE.md):
//! `spin` (the only module that touches spin-sdk) turns the wasi:http request into an
//! [`http::Request`] → [`route`] picks the endpoint → the endpoint module (`dump`, …) checks
//! parameters, opens the database through [`db::Platform`] and returns an [`http::Reply`] →
//! `spin` writes it, streaming page by page and aborting the body if a page fails.
//!
//! Everything but `spin` is plain Rust that builds and unit-tests natively.

pub mod config;
pub mod db;
pub mod dump;
pub mod encode;
pub mod http;
pub mod outcome;
pub mod output;
pub mod params;
pub mod route;

#[cfg(target_arch = "wasm32")]
mod spin;

use db::Platform;
use http::{Reply, Request};
use outcome::ApiError;
use route::Route;

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

fn dispatch<P: Platform>(platform: &P, req: Request) -> Result<Reply, ApiError>
where
    P::Conn: 'static,
{
    match route::route(&req)? {
        Route::Dump { type_name } => {
            let q = dump::DumpQuery::parse(&type_name, &req)?;
            let cfg = config::Config::load(platform)?;
            let conn = cfg.connect(platform)?;
            dump::start(conn, q, &cfg)
        }
    }
}
