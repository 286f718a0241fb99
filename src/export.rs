//! FHIR Bulk Data `$export` without storage, `$dump-ranges`, and `/metadata`. Being
//! implemented: see issue 5.

use crate::auth::Principal;
use crate::config::Config;
use crate::db::Db;
use crate::http::{Reply, Request};
use crate::outcome::ApiError;

fn todo() -> ApiError {
    ApiError::new(501, "not-supported", "$export is not implemented yet")
}

pub fn kickoff<C: Db>(
    _conn: &mut C,
    _req: &mut Request,
    _who: &Principal,
    _patient: bool,
) -> Result<Reply, ApiError> {
    Err(todo())
}

pub fn status<C: Db>(
    _conn: &mut C,
    _req: &Request,
    _who: &Principal,
    _job: &str,
) -> Result<Reply, ApiError> {
    Err(todo())
}

pub fn file<C: Db + 'static>(
    _conn: C,
    _req: &Request,
    _who: &Principal,
    _job: &str,
    _part: &str,
    _cfg: &Config,
) -> Result<Reply, ApiError> {
    Err(todo())
}

pub fn dump_ranges<C: Db>(
    _conn: &mut C,
    _req: &Request,
    _type_name: &str,
) -> Result<Reply, ApiError> {
    Err(todo())
}

pub fn metadata(_req: &Request) -> Result<Reply, ApiError> {
    Err(todo())
}
