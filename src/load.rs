//! `POST /$load` and `POST /{Type}/$load`: streamed, atomic ndjson import. Being implemented:
//! see issue 6.

use crate::config::Config;
use crate::db::Platform;
use crate::http::{Reply, Request};
use crate::outcome::ApiError;

pub fn load<P: Platform>(
    _platform: &P,
    _conn: &mut P::Conn,
    _req: &mut Request,
    _type_name: Option<&str>,
    _cfg: &Config,
) -> Result<Reply, ApiError> {
    Err(ApiError::new(
        501,
        "not-supported",
        "$load is not implemented yet",
    ))
}
