//! `POST /$dump-sql` (stream a read-only query as TSV, CSV or ndjson) and `POST /$sql` (the
//! read-write DB console). Being implemented: see issue 3.

use crate::config::Config;
use crate::db::Db;
use crate::http::{Reply, Request};
use crate::outcome::ApiError;

pub fn dump_sql<C: Db + 'static>(
    _conn: C,
    _req: &mut Request,
    _cfg: &Config,
) -> Result<Reply, ApiError> {
    Err(ApiError::new(
        501,
        "not-supported",
        "$dump-sql is not implemented yet",
    ))
}

pub fn console<C: Db>(_conn: &mut C, _req: &mut Request) -> Result<Reply, ApiError> {
    Err(ApiError::new(
        501,
        "not-supported",
        "$sql is not implemented yet",
    ))
}
