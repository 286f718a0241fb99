//! Settings from Spin variables (see `spin.toml` for their defaults and meaning).

use crate::db::{Db, DbError, Param, Platform};
use crate::outcome::ApiError;

#[derive(Debug, Clone)]
pub struct Config {
    pub db_url: String,
    /// Target size of one page (one query, one chunk), in stored bytes.
    pub page_bytes: u64,
    pub statement_timeout_ms: u64,
    /// The secret of the built-in `admin` client; `None` when unset (no admin).
    pub admin_secret: Option<String>,
    /// The longest ndjson line `$load` accepts.
    pub max_line_bytes: u64,
    /// How many component instances share one `$dump` (1: no self requests).
    pub dump_parallel: u64,
}

impl Config {
    pub fn load<P: Platform>(p: &P) -> Result<Config, ApiError> {
        let db_url = p
            .variable("db_url")
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| ApiError::internal("the db_url variable is not set"))?;
        Ok(Config {
            db_url,
            page_bytes: number(p, "page_bytes", 4 << 20, 1024..=(64 << 20))?,
            statement_timeout_ms: number(p, "statement_timeout_ms", 300_000, 0..=86_400_000)?,
            admin_secret: p.variable("admin_secret").filter(|s| !s.is_empty()),
            max_line_bytes: number(p, "max_line_bytes", 16 << 20, 1024..=(256 << 20))?,
            dump_parallel: number(p, "dump_parallel", 2, 1..=crate::dump::MAX_PARTS)?,
        })
    }

    /// Opens a connection, bounds every statement on it by the statement timeout and fixes the
    /// date style.
    /// Spin's pool resets session settings when a connection comes back ("Clean" recycling),
    /// so this runs once per request.
    pub fn connect<P: Platform>(&self, p: &P) -> Result<P::Conn, ApiError> {
        let mut conn = p.connect(&self.db_url).map_err(DbError::into_api)?;
        // One round trip for both settings. DateStyle ISO: the dump parses `timestamp` text.
        conn.query(
            "SELECT set_config('statement_timeout', $1, false), set_config('DateStyle', 'ISO', false)",
            vec![Param::Str(self.statement_timeout_ms.to_string())],
        )
        .map_err(DbError::into_api)?;
        Ok(conn)
    }
}

/// A numeric variable within `range`; its default when undefined or empty.
fn number<P: Platform>(
    p: &P,
    name: &str,
    default: u64,
    range: std::ops::RangeInclusive<u64>,
) -> Result<u64, ApiError> {
    match p.variable(name).filter(|v| !v.trim().is_empty()) {
        None => Ok(default),
        Some(v) => v
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|n| range.contains(n))
            .ok_or_else(|| {
                ApiError::internal(format!(
                    "variable {name}={v:?} must be a number in {}..={}",
                    range.start(),
                    range.end()
                ))
            }),
    }
}
