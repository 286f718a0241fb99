//! FHIR Bulk Data `$export` without storage or background work, `$dump-ranges`, and
//! `/metadata`.
//!
//! Implements the HL7 FHIR Bulk Data Access IG v2.0.0 flow on a host that has neither
//! background jobs nor file storage:
//!
//! - **Kick-off** (`GET|POST /$export`, `GET|POST /Patient/$export`) validates the request,
//!   records it as one row of `bulk_export` (job id from `gen_random_uuid()`, transactionTime
//!   from the database clock `now()`, the client, the parameters) and answers 202 at once with
//!   `Content-Location: <status URL>`. The table is created on demand, so a database without the
//!   latest `schema/schema.sql` works.
//! - **Status** (`GET /$export-status/{job}`) computes the manifest *now*: a job is never "in
//!   progress", so there is no 202 phase (and no `Retry-After`/`X-Progress`); the answer is
//!   always the complete manifest. `DELETE` forgets the job (202); afterwards status and files
//!   are 404.
//! - **Files** (`GET /$export-file/{job}/{Type}.{n}?_after=…&_upto=…`) stream one part on
//!   download with the `$dump` machinery (keyset pages, byte budget, gzip on `Accept-Encoding`,
//!   an aborted transfer on failure), in FHIR form (`application/fhir+ndjson`).
//!
//! # Consistency rule
//!
//! transactionTime is the kick-off instant (the database's `now()`). A file serves the rows as
//! they are **at download time**, restricted to `cts <= transactionTime` (and to `ts > _since`
//! when given):
//! - every resource that existed at transactionTime is included (the IG's SHALL), with its
//!   newest version if it was modified since (the IG only says SHOULD NOT for those, and
//!   dropping them would break the SHALL: we keep no history to serve the older version);
//! - resources created after transactionTime are left out (the SHOULD NOT), so chaining
//!   exports with `_since=<previous transactionTime>` loses nothing: a resource updated after
//!   an export's transactionTime appears in that export and again in the next one;
//! - a resource deleted before its file is downloaded is missing from it (rows are deleted,
//!   there is no tombstone to report).
//!
//! # Parts and `count`
//!
//! Each type is split into parts of at most [`PART_ROWS`] matching resources by id ranges,
//! `(after, upto]` in the primary key's order, with the same `_after`/`_upto` semantics as
//! `$dump`. The boundaries are computed when the manifest is asked for, with one ordered walk
//! over the matching ids (without `_since` or a compartment: over all ids, an index-only scan
//! of the primary key; a part then holds a few fewer resources if some were created after
//! kick-off, and a type with only such resources gets an empty file). The parts of one manifest
//! always cover the whole id space (the first has no lower bound, the last no upper bound), so
//! whatever changes between the status call and the downloads, every row lands in exactly one
//! part; a part may then hold a few more or fewer rows than when it was cut. For the same
//! reason the manifest has **no `count`**: a count taken at status time would not always equal
//! the lines served, and clients check it. Types with no matching resource get no entry.
//!
//! # Patient compartment
//!
//! `/Patient/$export` exports every Patient, plus, of every other type, the resources whose
//! `subject` or `patient` element references a Patient: `reference` starting with `Patient/`
//! (FHIR form) or `resourceType` equal to `Patient` (Aidbox's form). Other links (e.g.
//! `Encounter.participant`, `Observation.performer`) do not put a resource in the compartment.
//!
//! # Types, limits and access
//!
//! Without `_type`, every table with the Aidbox layout is exported except `Client` and
//! `AccessPolicy` (credentials and authorization rules are not data); only admin may name those
//! two in `_type`. A job belongs to the client that kicked it off: another client gets 404 for
//! its status and files (the same answer as for a job that does not exist, so job ids cannot be
//! probed), admin sees every job. A job lives [`JOB_TTL_HOURS`] hours; a client may hold at most
//! [`MAX_ACTIVE_JOBS`] live (not deleted, not expired) jobs, beyond that kick-off answers 429
//! with `Retry-After` (seconds until its oldest job expires). Clients should `DELETE` a job
//! when done.
//!
//! # `$dump-ranges`
//!
//! `GET /{Type}/$dump-ranges?parts=N` answers N contiguous ranges `[{"after", "upto"}]` for
//! parallel `$dump` calls. They come from the planner's statistics when possible
//! (`pg_stats.histogram_bounds` of `id`: equal-frequency bounds taken at the last ANALYZE,
//! O(1), no table access), otherwise from one walk of the primary key index. The ranges always
//! cover every id, whatever the statistics say; only their balance depends on them.

use crate::auth::Principal;
use crate::config::Config;
use crate::db::{quote_ident, table_exists, Db, DbError, Param, Value};
use crate::dump::{self, DumpQuery};
use crate::http::{read_body, Reply, Request};
use crate::outcome::ApiError;
use crate::params::encode;
use crate::params::{self, Params};
use crate::route::{table_name, valid_type_name};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value as Json};

/// The most resources in one output file.
pub const PART_ROWS: i64 = 100_000;
/// How many live jobs one client may hold.
pub const MAX_ACTIVE_JOBS: i64 = 5;
/// How long a job (its status and files) stays available after kick-off.
pub const JOB_TTL_HOURS: i64 = 24;
/// Types left out of an export without `_type`, and reserved to admin with it.
const PRIVATE_TYPES: [&str; 2] = ["Client", "AccessPolicy"];
/// A kick-off `Parameters` body is small; anything bigger is a mistake.
const KICKOFF_BODY_LIMIT: usize = 1 << 20;
const OUTPUT_FORMATS: [&str; 3] = ["application/fhir+ndjson", "application/ndjson", "ndjson"];
const BULK_IG: &str = "http://hl7.org/fhir/uv/bulkdata";

/// `bulk_export`, as in `schema/schema.sql` (keep in step).
pub const CREATE_TABLE_SQL: &str = "CREATE TABLE IF NOT EXISTS bulk_export (\
    id text PRIMARY KEY DEFAULT gen_random_uuid()::text, \
    client_id text NOT NULL, \
    kind text NOT NULL, \
    request text NOT NULL, \
    params jsonb NOT NULL, \
    transaction_time timestamptz NOT NULL DEFAULT now())";

/// A UTC instant as text with microseconds, as FHIR wants it and PostgreSQL reads it back.
const INSTANT_FORMAT: &str = "'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'";

/// What kick-off recorded, as stored in `bulk_export.params`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct JobParams {
    /// `_type`; `None`: every type except [`PRIVATE_TYPES`].
    types: Option<Vec<String>>,
    /// `_since`, normalised by [`params::instant`].
    since: Option<String>,
    output_format: String,
    /// Parameters ignored under `Prefer: handling=lenient`, reported in the error file.
    ignored: Vec<Ignored>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Ignored {
    name: String,
    value: String,
    why: String,
}

struct Job {
    id: String,
    patient: bool,
    request: String,
    params: JobParams,
    /// transactionTime, formatted with [`INSTANT_FORMAT`].
    transaction_time: String,
}

// ---------------------------------------------------------------------------------------------
// Kick-off

pub fn kickoff<C: Db>(
    conn: &mut C,
    req: &mut Request,
    who: &Principal,
    patient: bool,
) -> Result<Reply, ApiError> {
    let prefer = Prefer::from_request(req);
    if !prefer.respond_async {
        return Err(ApiError::bad_request(
            "$export needs the header Prefer: respond-async",
        ));
    }
    let mut raw = query_pairs(&req.query)?;
    if req.method == "POST" {
        let body = read_body(req.body.as_mut(), KICKOFF_BODY_LIMIT)?;
        if !body.iter().all(u8::is_ascii_whitespace) {
            raw.extend(parameters_body(&body)?);
        }
    }
    let params = JobParams::from_pairs(raw, prefer.lenient)?;
    if let Some(types) = &params.types {
        if !who.admin {
            if let Some(t) = types.iter().find(|t| PRIVATE_TYPES.contains(&t.as_str())) {
                return Err(ApiError::new(
                    403,
                    "forbidden",
                    format!("only admin may export {t}"),
                ));
            }
        }
    }
    let params_json = serde_json::to_string(&params)
        .map_err(|e| ApiError::internal(format!("encoding the job: {e}")))?;
    let kind = if patient { "patient" } else { "system" };
    let request = request_url(req);
    let job = match insert_job(conn, &who.client_id, kind, &request, &params_json) {
        Err(e) if e.sqlstate() == Some("42P01") => {
            create_table(conn)?;
            insert_job(conn, &who.client_id, kind, &request, &params_json)
        }
        other => other,
    }
    .map_err(DbError::into_api)?;
    let Some(job) = job else {
        return Err(too_many(conn, &who.client_id));
    };
    Ok(Reply::empty(
        202,
        vec![(
            "content-location".into(),
            format!("{}/$export-status/{job}", base_url(req)),
        )],
    ))
}

/// Inserts the job unless the client already holds [`MAX_ACTIVE_JOBS`] live ones (`None`).
/// Expired jobs are purged in the same statement; the table stays as small as the live jobs.
/// Two kick-offs racing may both pass the check: the limit is a guard, not an invariant.
fn insert_job<C: Db>(
    conn: &mut C,
    client: &str,
    kind: &str,
    request: &str,
    params: &str,
) -> Result<Option<String>, DbError> {
    let sql = format!(
        "WITH purge AS (DELETE FROM bulk_export \
                        WHERE transaction_time <= now() - interval '{JOB_TTL_HOURS} hours') \
         INSERT INTO bulk_export (client_id, kind, request, params) \
         SELECT $1, $2, $3, $4::text::jsonb \
         WHERE (SELECT count(*) FROM bulk_export WHERE client_id = $1 \
                AND transaction_time > now() - interval '{JOB_TTL_HOURS} hours') < {MAX_ACTIVE_JOBS} \
         RETURNING id"
    );
    let mut rows = conn.query(
        &sql,
        vec![
            Param::Str(client.into()),
            Param::Str(kind.into()),
            Param::Str(request.into()),
            Param::Str(params.into()),
        ],
    )?;
    Ok(rows
        .rows
        .first_mut()
        .and_then(|r| r.first_mut())
        .and_then(Value::take_string))
}

/// Creates `bulk_export` for a database set up before it existed. Two kick-offs may race to
/// create it; the loser's "already exists" is success.
fn create_table<C: Db>(conn: &mut C) -> Result<(), ApiError> {
    match conn.execute(CREATE_TABLE_SQL, Vec::new()) {
        Ok(_) => Ok(()),
        Err(e) if matches!(e.sqlstate(), Some("23505" | "42P07")) => Ok(()),
        Err(e) => Err(e.into_api()),
    }
}

/// 429 with `Retry-After`: the seconds until the client's oldest live job expires.
fn too_many<C: Db>(conn: &mut C, client: &str) -> ApiError {
    let sql = format!(
        "SELECT ceil(extract(epoch FROM min(transaction_time) \
                + interval '{JOB_TTL_HOURS} hours' - now()))::bigint \
         FROM bulk_export WHERE client_id = $1 \
         AND transaction_time > now() - interval '{JOB_TTL_HOURS} hours'"
    );
    let wait = conn
        .query(&sql, vec![Param::Str(client.into())])
        .ok()
        .and_then(|r| {
            r.rows
                .first()
                .and_then(|r| r.first())
                .and_then(Value::as_i64)
        })
        .unwrap_or(60)
        .max(1);
    ApiError::new(
        429,
        "throttled",
        format!(
            "client {client} already has {MAX_ACTIVE_JOBS} exports; DELETE a finished one \
             (its status URL) or wait for the oldest to expire"
        ),
    )
    .with_header("retry-after", wait.to_string())
}

/// The `Prefer` preferences kick-off cares about (all `Prefer` headers, any order).
#[derive(Debug, Default, PartialEq)]
struct Prefer {
    respond_async: bool,
    lenient: bool,
}

impl Prefer {
    fn from_request(req: &Request) -> Prefer {
        let mut p = Prefer::default();
        for (_, value) in req.headers.iter().filter(|(n, _)| n == "prefer") {
            for pref in value.split(',') {
                let token = pref.split(';').next().unwrap_or("").trim();
                let (name, val) = token.split_once('=').unwrap_or((token, ""));
                let (name, val) = (name.trim(), val.trim().trim_matches('"'));
                if name.eq_ignore_ascii_case("respond-async") {
                    p.respond_async = true;
                } else if name.eq_ignore_ascii_case("handling") {
                    p.lenient = val.eq_ignore_ascii_case("lenient");
                }
            }
        }
        p
    }
}

/// The query string as decoded (name, value) pairs, repeats kept.
fn query_pairs(query: &str) -> Result<Vec<(String, String)>, ApiError> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|part| {
            let (k, v) = part.split_once('=').unwrap_or((part, ""));
            Ok((params::decode(k)?, params::decode(v)?))
        })
        .collect()
}

/// The (name, value) pairs of a FHIR `Parameters` body. A primitive `value[x]` (valueString,
/// valueInstant, valueCode, …) gives its text; anything else (valueReference, parts) its JSON,
/// which only the unsupported parameters (`patient`, …) use.
fn parameters_body(body: &[u8]) -> Result<Vec<(String, String)>, ApiError> {
    let bad = |why: &str| ApiError::bad_request(format!("the kick-off body: {why}"));
    let v: Json = serde_json::from_slice(body).map_err(|e| {
        bad(&format!(
            "not JSON ({e}); expected a FHIR Parameters resource"
        ))
    })?;
    if v.get("resourceType").and_then(Json::as_str) != Some("Parameters") {
        return Err(bad("expected a FHIR Parameters resource"));
    }
    let list = match v.get("parameter") {
        None => return Ok(Vec::new()),
        Some(Json::Array(list)) => list,
        Some(_) => return Err(bad("parameter must be an array")),
    };
    list.iter()
        .enumerate()
        .map(|(i, p)| {
            let name = p
                .get("name")
                .and_then(Json::as_str)
                .ok_or_else(|| bad(&format!("parameter[{i}] has no name")))?;
            let value = p
                .as_object()
                .into_iter()
                .flatten()
                .find(|(k, _)| k.starts_with("value"))
                .map(|(_, v)| match v {
                    Json::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .or_else(|| p.get("part").map(Json::to_string))
                .unwrap_or_default();
            Ok((name.to_string(), value))
        })
        .collect()
}

impl JobParams {
    /// Validates the kick-off parameters. Unsupported ones fail with 400, or with `lenient`
    /// are dropped and remembered for the error file. Bad values of supported parameters fail
    /// either way: guessing what a wrong `_since` meant could export the wrong data.
    fn from_pairs(pairs: Vec<(String, String)>, lenient: bool) -> Result<JobParams, ApiError> {
        let mut p = JobParams::default();
        let mut format = None;
        let mut ignored = Vec::new();
        let mut unsupported = |name: &str, value: &str, why: String| {
            if lenient {
                ignored.push(Ignored {
                    name: name.into(),
                    value: value.into(),
                    why,
                });
                Ok(())
            } else {
                Err(ApiError::bad_request(format!(
                    "{why} (send Prefer: handling=lenient to have it ignored)"
                ))
                .with_expression(name))
            }
        };
        for (name, value) in pairs {
            match name.as_str() {
                "_outputFormat" => {
                    if format.replace(value.clone()).is_some() {
                        return Err(repeated(&name));
                    }
                    if !OUTPUT_FORMATS.contains(&value.as_str()) {
                        return Err(params::invalid(
                            &name,
                            &value,
                            "supported: application/fhir+ndjson, application/ndjson, ndjson",
                        ));
                    }
                }
                "_since" => {
                    if p.since.is_some() {
                        return Err(repeated(&name));
                    }
                    let since = params::instant(&value)
                        .map_err(|why| params::invalid(&name, &value, why))?;
                    p.since = Some(since);
                }
                "_type" => {
                    let types = p.types.get_or_insert_with(Vec::new);
                    for t in value.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                        if !valid_type_name(t) {
                            unsupported(&name, t, format!("{t:?} is not a resource type"))?;
                        } else if !types.iter().any(|x| x == t) {
                            types.push(t.to_string());
                        }
                    }
                }
                _ => unsupported(
                    &name,
                    &value,
                    format!("the parameter {name} is not supported"),
                )?,
            }
        }
        p.output_format = format.unwrap_or_else(|| OUTPUT_FORMATS[0].to_string());
        p.ignored = ignored;
        Ok(p)
    }
}

fn repeated(name: &str) -> ApiError {
    ApiError::bad_request(format!("parameter {name} is given more than once")).with_expression(name)
}

/// `scheme://host[:port]` of the URL the client used (`spin-full-url`), plus any path prefix
/// the application is mounted under, so that URLs we hand out work from where the client is.
fn base_url(req: &Request) -> String {
    let full = req.header("spin-full-url").unwrap_or("");
    if let Some(i) = full.find("://") {
        let rest = &full[i + 3..];
        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let origin = &full[..i + 3 + authority_end];
        let path = rest[authority_end..].split(['?', '#']).next().unwrap_or("");
        let prefix = path.strip_suffix(req.path.as_str()).unwrap_or("");
        return format!("{origin}{}", prefix.trim_end_matches('/'));
    }
    format!("http://{}", req.header("host").unwrap_or("localhost"))
}

/// The kick-off URL as the client sent it (the manifest's `request`).
fn request_url(req: &Request) -> String {
    match req.header("spin-full-url") {
        Some(u) if u.contains("://") => u.to_string(),
        _ if req.query.is_empty() => format!("{}{}", base_url(req), req.path),
        _ => format!("{}{}?{}", base_url(req), req.path, req.query),
    }
}

// ---------------------------------------------------------------------------------------------
// Status

pub fn status<C: Db>(
    conn: &mut C,
    req: &Request,
    who: &Principal,
    job: &str,
) -> Result<Reply, ApiError> {
    Params::parse(&req.query)?.finish()?;
    let job = load_job(conn, who, job)?;
    if req.method == "DELETE" {
        conn.execute(
            "DELETE FROM bulk_export WHERE id = $1",
            vec![Param::Str(job.id)],
        )
        .map_err(DbError::into_api)?;
        return Ok(Reply::empty(202, Vec::new()));
    }
    let base = base_url(req);
    let types = job_types(conn, &job)?;
    let mut output = Vec::new();
    for (table, type_name) in &types {
        let Some(bounds) = part_bounds(conn, &job, table, type_name)? else {
            continue;
        };
        for (n, (after, upto)) in ranges(&bounds).into_iter().enumerate() {
            let mut url = format!(
                "{base}/$export-file/{}/{type_name}.{}",
                encode(&job.id),
                n + 1
            );
            let mut sep = '?';
            for (name, v) in [("_after", after), ("_upto", upto)] {
                if let Some(v) = v {
                    url.push(sep);
                    url.push_str(name);
                    url.push('=');
                    url.push_str(&encode(v));
                    sep = '&';
                }
            }
            output.push(json!({"type": type_name, "url": url}));
        }
    }
    let error: Vec<Json> = if job.params.ignored.is_empty() {
        Vec::new()
    } else {
        vec![json!({
            "type": "OperationOutcome",
            "url": format!("{base}/$export-file/{}/error", encode(&job.id)),
        })]
    };
    let manifest = json!({
        "transactionTime": job.transaction_time,
        "request": job.request,
        "requiresAccessToken": true,
        "output": output,
        "error": error,
    });
    let mut reply = Reply::json(200, &manifest);
    if let Reply::Full { headers, .. } = &mut reply {
        // The manifest is recomputed on every call; a cache must not keep one.
        headers.push(("cache-control".into(), "no-store".into()));
    }
    Ok(reply)
}

fn load_job<C: Db>(conn: &mut C, who: &Principal, id: &str) -> Result<Job, ApiError> {
    let missing =
        || ApiError::not_found(format!("no export job {id} (unknown, deleted or expired)"));
    let sql = format!(
        "SELECT client_id, kind, request, params::text, \
                to_char(transaction_time AT TIME ZONE 'UTC', {INSTANT_FORMAT}) \
         FROM bulk_export WHERE id = $1 \
         AND transaction_time > now() - interval '{JOB_TTL_HOURS} hours'"
    );
    let rows = match conn.query(&sql, vec![Param::Str(id.into())]) {
        Ok(r) => r.rows,
        // No table: no job was ever kicked off here.
        Err(e) if e.sqlstate() == Some("42P01") => return Err(missing()),
        Err(e) => return Err(e.into_api()),
    };
    let Some(mut row) = rows.into_iter().next() else {
        return Err(missing());
    };
    let mut text = |i: usize| row.get_mut(i).and_then(Value::take_string);
    let (Some(client), Some(kind), Some(request), Some(params), Some(tt)) =
        (text(0), text(1), text(2), text(3), text(4))
    else {
        return Err(ApiError::internal(format!("export job {id} has a bad row")));
    };
    // Someone else's job is "not found": job ids must not be probeable.
    if client != who.client_id && !who.admin {
        return Err(missing());
    }
    let params: JobParams = serde_json::from_str(&params)
        .map_err(|e| ApiError::internal(format!("export job {id} has bad parameters: {e}")))?;
    Ok(Job {
        id: id.to_string(),
        patient: kind == "patient",
        request,
        params,
        transaction_time: tt,
    })
}

/// The job's (table, type) pairs that exist, in type-name order: the Aidbox-layout tables of
/// the current search path, narrowed to `_type` or stripped of [`PRIVATE_TYPES`].
fn job_types<C: Db>(conn: &mut C, job: &Job) -> Result<Vec<(String, String)>, ApiError> {
    let mut all = resource_tables(conn)?;
    match &job.params.types {
        Some(wanted) => {
            all.retain(|(_, t)| wanted.contains(t));
            all.sort_by_key(|(_, t)| wanted.iter().position(|w| w == t));
        }
        None => all.retain(|(_, t)| !PRIVATE_TYPES.contains(&t.as_str())),
    }
    Ok(all)
}

/// Every table visible on the search path with the Aidbox layout (`id text`, `txid bigint`,
/// `ts`/`cts timestamptz`, `resource jsonb`, `resource_type`), with its type name read from the
/// `resource_type` column's default (`'Patient'::text`). A table whose default is missing or
/// does not name its own type (Aidbox's `patient_history` says 'Patient') is not a type table.
fn resource_tables<C: Db>(conn: &mut C) -> Result<Vec<(String, String)>, ApiError> {
    let sql = "SELECT c.relname::text, pg_get_expr(d.adbin, d.adrelid) \
         FROM pg_class c \
         JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'resource_type' \
                             AND NOT a.attisdropped \
         LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum \
         WHERE c.relkind IN ('r', 'p') AND pg_table_is_visible(c.oid) \
           AND (SELECT count(*) FROM pg_attribute x \
                WHERE x.attrelid = c.oid AND x.attnum > 0 AND NOT x.attisdropped \
                  AND (x.attname, format_type(x.atttypid, x.atttypmod)) IN \
                      (('id', 'text'), ('txid', 'bigint'), ('resource', 'jsonb'), \
                       ('ts', 'timestamp with time zone'), \
                       ('cts', 'timestamp with time zone'))) = 5 \
         ORDER BY c.relname";
    let rows = conn.query(sql, Vec::new()).map_err(DbError::into_api)?.rows;
    let mut out = Vec::new();
    for mut row in rows {
        let (Some(table), Some(default)) = (
            row.get_mut(0).and_then(Value::take_string),
            row.get_mut(1).and_then(Value::take_string),
        ) else {
            continue;
        };
        if let Some(t) = type_from_default(&default) {
            if table_name(&t) == table {
                out.push((table, t));
            }
        }
    }
    out.sort_by(|a, b| a.1.cmp(&b.1));
    Ok(out)
}

/// `'Patient'::text` → `Patient`.
fn type_from_default(expr: &str) -> Option<String> {
    let t = expr
        .strip_prefix('\'')?
        .split_once('\'')
        .map(|(t, _)| t.to_string())?;
    valid_type_name(&t).then_some(t)
}

/// The SQL filter every part of the job's `type_name` shares: the transaction-time rule and,
/// for a Patient export, the compartment rule. Values in it come from the database (the
/// transactionTime text) or are constants.
fn job_filter(job: &Job, type_name: &str) -> String {
    // transaction_time was formatted by PostgreSQL as digits and punctuation only; doubling
    // quotes is belt and braces.
    let mut f = format!(
        "cts <= '{}'::timestamptz",
        job.transaction_time.replace('\'', "''")
    );
    if job.patient && type_name != "Patient" {
        f.push_str(
            " AND (resource #>> '{subject,reference}' LIKE 'Patient/%' \
               OR resource #>> '{patient,reference}' LIKE 'Patient/%' \
               OR resource #>> '{subject,resourceType}' = 'Patient' \
               OR resource #>> '{patient,resourceType}' = 'Patient')",
        );
    }
    f
}

/// The last id of each full part of a type, in id order, or `None` when no resource matches.
/// One ordered walk over the matching ids: `rn = 1` proves there is something; every
/// [`PART_ROWS`]-th id closes a part, unless it is the very last id (no empty final part).
/// Without `_since` or a compartment the walk covers every id (see below), so a type whose
/// rows were all created after kick-off gets a file with no lines.
fn part_bounds<C: Db>(
    conn: &mut C,
    job: &Job,
    table: &str,
    type_name: &str,
) -> Result<Option<Vec<String>>, ApiError> {
    let mut params = Vec::new();
    let conds = match &job.params.since {
        // Nothing narrows the type but the transaction-time rule, which only drops rows
        // created after kick-off: walk every id instead, so that the walk reads the primary
        // key index alone (an index-only scan) rather than every row. Parts then hold at most
        // PART_ROWS resources, a few fewer if some were created since.
        None if !job.patient => "true".to_string(),
        None => job_filter(job, type_name),
        Some(since) => {
            params.push(Param::Str(since.clone()));
            format!(
                "{} AND ts > $1::text::timestamptz",
                job_filter(job, type_name)
            )
        }
    };
    let sql = format!(
        "SELECT id, rn FROM (\
           SELECT id, row_number() OVER w AS rn, lead(id) OVER w IS NULL AS last \
           FROM {table} WHERE {conds} WINDOW w AS (ORDER BY id)) s \
         WHERE rn = 1 OR (rn % {PART_ROWS} = 0 AND NOT last) ORDER BY rn",
        table = quote_ident(table),
    );
    let rows = match conn.query(&sql, params) {
        Ok(r) => r.rows,
        // Dropped since the catalog was read: nothing to export.
        Err(e) if e.sqlstate() == Some("42P01") => return Ok(None),
        Err(e) => return Err(e.into_api()),
    };
    if rows.is_empty() {
        return Ok(None);
    }
    Ok(Some(
        rows.into_iter()
            .filter(|r| r.get(1).and_then(Value::as_i64) != Some(1))
            .filter_map(|mut r| r.get_mut(0).and_then(Value::take_string))
            .collect(),
    ))
}

/// Boundaries b1..bk → `(None, b1], (b1, b2], …, (bk, None)`: contiguous, covering every id.
fn ranges(bounds: &[String]) -> Vec<(Option<&str>, Option<&str>)> {
    let mut out = Vec::with_capacity(bounds.len() + 1);
    let mut after = None;
    for b in bounds {
        out.push((after, Some(b.as_str())));
        after = Some(b.as_str());
    }
    out.push((after, None));
    out
}

// ---------------------------------------------------------------------------------------------
// Files

pub fn file<C: Db + 'static>(
    conn: C,
    req: &Request,
    who: &Principal,
    job: &str,
    part: &str,
    cfg: &Config,
) -> Result<Reply, ApiError> {
    let mut conn = conn;
    let mut p = Params::parse(&req.query)?;
    let after = p.take("_after")?;
    let upto = p.take("_upto")?;
    p.finish()?;
    let job = load_job(&mut conn, who, job)?;
    if part == "error" {
        return Ok(error_file(&job));
    }
    // `{Type}.{n}` (n only names the part; the range is in the query) or `{Type}`.
    let type_name = match part.split_once('.') {
        Some((t, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => t,
        Some(_) => return Err(no_part(part)),
        None => part,
    };
    let in_job = job_types(&mut conn, &job)?
        .into_iter()
        .any(|(_, t)| t == type_name);
    if !in_job {
        return Err(no_part(part));
    }
    let q = DumpQuery {
        type_name: type_name.to_string(),
        since: job.params.since.clone(),
        after,
        upto,
        fhir: true,
        gzip: req.accepts_gzip(),
        filter: Some(job_filter(&job, type_name)),
        ..Default::default()
    };
    dump::start(conn, q, cfg, None)
}

fn no_part(part: &str) -> ApiError {
    ApiError::not_found(format!("this export has no file {part}"))
}

/// The error file: one OperationOutcome line per parameter ignored under lenient handling.
fn error_file(job: &Job) -> Reply {
    let mut body = Vec::new();
    for i in &job.params.ignored {
        let line = json!({
            "resourceType": "OperationOutcome",
            "issue": [{
                "severity": "warning",
                "code": "not-supported",
                "diagnostics": format!("ignored {}={:?}: {}", i.name, i.value, i.why),
                "expression": [i.name],
            }],
        });
        body.extend_from_slice(line.to_string().as_bytes());
        body.push(b'\n');
    }
    Reply::Full {
        status: 200,
        headers: vec![("content-type".into(), "application/fhir+ndjson".into())],
        body,
    }
}

// ---------------------------------------------------------------------------------------------
// $dump-ranges

/// The most ranges one call may ask for.
const MAX_RANGES: u64 = 10_000;

pub fn dump_ranges<C: Db>(conn: &mut C, req: &Request, type_name: &str) -> Result<Reply, ApiError> {
    let mut p = Params::parse(&req.query)?;
    let parts = p
        .take_u64("parts")?
        .ok_or_else(|| ApiError::bad_request("parts is required").with_expression("parts"))?;
    p.finish()?;
    if !(1..=MAX_RANGES).contains(&parts) {
        return Err(params::invalid(
            "parts",
            &parts.to_string(),
            "expected 1 to 10000",
        ));
    }
    let table = table_name(type_name);
    if !table_exists(conn, &table).map_err(DbError::into_api)? {
        return Err(ApiError::not_found(format!(
            "no table for resource type {type_name}"
        )));
    }
    let (bounds, source) = match histogram_bounds(conn, &table, parts)? {
        Some(b) => (b, "histogram"),
        None => (index_bounds(conn, &table, parts)?, "index"),
    };
    let list: Vec<Json> = ranges(&bounds)
        .into_iter()
        .map(|(after, upto)| json!({"after": after, "upto": upto}))
        .collect();
    let mut reply = Reply::json(200, &Json::Array(list));
    if let Reply::Full { headers, .. } = &mut reply {
        headers.push(("x-ranges-source".into(), source.into()));
    }
    Ok(reply)
}

/// `parts - 1` boundaries from the planner's equal-frequency histogram of `id`, or `None`
/// when there is none (never analyzed) or it has fewer buckets than `parts`.
fn histogram_bounds<C: Db>(
    conn: &mut C,
    table: &str,
    parts: u64,
) -> Result<Option<Vec<String>>, ApiError> {
    let rows = conn
        .query(
            "SELECT u.b FROM pg_stats s \
             CROSS JOIN LATERAL unnest(s.histogram_bounds::text::text[]) WITH ORDINALITY AS u(b, n) \
             WHERE s.tablename = $1 AND s.attname = 'id' AND NOT s.inherited \
               AND s.schemaname = (SELECT n.nspname::text FROM pg_class c \
                                   JOIN pg_namespace n ON n.oid = c.relnamespace \
                                   WHERE c.oid = to_regclass($2)) \
             ORDER BY u.n",
            vec![Param::Str(table.into()), Param::Str(quote_ident(table))],
        )
        .map_err(DbError::into_api)?
        .rows;
    let hist: Vec<String> = rows
        .into_iter()
        .filter_map(|mut r| r.get_mut(0).and_then(Value::take_string))
        .collect();
    Ok(pick_bounds(&hist, parts))
}

/// From histogram bounds h0..hm (m buckets of about equal size), the bounds that split them
/// into `parts` groups of about equal size: h[⌊j·m/parts⌋] for j in 1..parts.
fn pick_bounds(hist: &[String], parts: u64) -> Option<Vec<String>> {
    let buckets = hist.len().checked_sub(1)? as u64;
    if buckets < parts || buckets == 0 {
        return None;
    }
    Some(
        (1..parts)
            .map(|j| hist[(j * buckets / parts) as usize].clone())
            .collect(),
    )
}

/// `parts - 1` boundaries from one walk of the primary key index: every `step`-th id, with
/// `step` from the planner's row estimate (exact `count(*)` when there is none).
fn index_bounds<C: Db>(conn: &mut C, table: &str, parts: u64) -> Result<Vec<String>, ApiError> {
    if parts <= 1 {
        return Ok(Vec::new());
    }
    let t = quote_ident(table);
    let n = conn
        .query(
            &format!(
                "SELECT CASE WHEN c.reltuples > 0 THEN c.reltuples::bigint \
                             ELSE (SELECT count(*) FROM {t}) END \
                 FROM pg_class c WHERE c.oid = to_regclass($1)"
            ),
            vec![Param::Str(t.clone())],
        )
        .map_err(DbError::into_api)?
        .rows
        .first()
        .and_then(|r| r.first())
        .and_then(Value::as_i64)
        .unwrap_or(0)
        .max(0) as u64;
    if n < 2 {
        return Ok(Vec::new());
    }
    let step = n.div_ceil(parts).max(1);
    let rows = conn
        .query(
            &format!(
                "SELECT id FROM (SELECT id, row_number() OVER (ORDER BY id) AS rn FROM {t}) s \
                 WHERE rn % $1 = 0 ORDER BY rn LIMIT $2"
            ),
            vec![Param::Int(step as i64), Param::Int(parts as i64 - 1)],
        )
        .map_err(DbError::into_api)?
        .rows;
    Ok(rows
        .into_iter()
        .filter_map(|mut r| r.get_mut(0).and_then(Value::take_string))
        .collect())
}

// ---------------------------------------------------------------------------------------------
// /metadata

pub fn metadata(req: &Request) -> Result<Reply, ApiError> {
    let mut p = Params::parse(&req.query)?;
    // Clients add _format=json; JSON is all we speak.
    let _ = p.take("_format")?;
    p.finish()?;
    let base = base_url(req);
    let statement = json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-26",
        "publisher": "spin-bulk",
        "kind": "instance",
        "instantiates": [format!("{BULK_IG}/CapabilityStatement/bulk-data")],
        "software": {"name": "spin-bulk", "version": env!("CARGO_PKG_VERSION")},
        "implementation": {
            "description": "Streaming FHIR bulk API over an Aidbox-layout PostgreSQL",
            "url": base,
        },
        "fhirVersion": "4.0.1",
        "format": ["json"],
        "rest": [{
            "mode": "server",
            "security": {"description": "HTTP Basic authentication with a Client id and secret"},
            "resource": [{
                "type": "Patient",
                "operation": [{
                    "name": "export",
                    "definition": format!("{BULK_IG}/OperationDefinition/patient-export"),
                }],
            }],
            "operation": [{
                "name": "export",
                "definition": format!("{BULK_IG}/OperationDefinition/export"),
            }],
        }],
    });
    let mut reply = Reply::json(200, &statement);
    if let Reply::Full { headers, .. } = &mut reply {
        headers[0].1 = "application/fhir+json".into();
    }
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::BytesBody;

    fn req(headers: &[(&str, &str)], path: &str) -> Request {
        Request {
            method: "GET".into(),
            path: path.into(),
            query: String::new(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: Box::new(BytesBody(None)),
        }
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn prefer_header() {
        let r = req(&[("prefer", "respond-async, handling=lenient")], "/$export");
        assert_eq!(
            Prefer::from_request(&r),
            Prefer {
                respond_async: true,
                lenient: true
            }
        );
        let r = req(
            &[("prefer", "handling=strict"), ("prefer", "Respond-Async")],
            "/$export",
        );
        assert_eq!(
            Prefer::from_request(&r),
            Prefer {
                respond_async: true,
                lenient: false
            }
        );
        assert_eq!(Prefer::from_request(&req(&[], "/")), Prefer::default());
    }

    #[test]
    fn urls_come_from_spin_full_url() {
        let r = req(
            &[(
                "spin-full-url",
                "https://fhir.example.org:8443/$export?_type=Patient",
            )],
            "/$export",
        );
        assert_eq!(base_url(&r), "https://fhir.example.org:8443");
        assert_eq!(
            request_url(&r),
            "https://fhir.example.org:8443/$export?_type=Patient"
        );
        let r = req(
            &[("spin-full-url", "http://h/api/fhir/Patient/$export")],
            "/Patient/$export",
        );
        assert_eq!(base_url(&r), "http://h/api/fhir");
        let r = req(&[("host", "localhost:3000")], "/$export");
        assert_eq!(base_url(&r), "http://localhost:3000");
    }

    #[test]
    fn kickoff_parameters() {
        let p = JobParams::from_pairs(
            pairs(&[
                ("_type", "Patient, Observation"),
                ("_type", "Patient"),
                ("_since", "2024-01-01"),
                ("_outputFormat", "ndjson"),
            ]),
            false,
        )
        .unwrap();
        assert_eq!(
            p.types,
            Some(vec!["Patient".to_string(), "Observation".to_string()])
        );
        assert_eq!(p.since.as_deref(), Some("2024-01-01T00:00:00Z"));
        assert_eq!(p.output_format, "ndjson");

        let default = JobParams::from_pairs(Vec::new(), false).unwrap();
        assert_eq!(default.types, None);
        assert_eq!(default.output_format, "application/fhir+ndjson");

        for bad in [
            &[("_outputFormat", "text/csv")][..],
            &[("_since", "yesterday")],
            &[("_since", "2024-01-01"), ("_since", "2024-01-02")],
            &[("_typeFilter", "Patient?active=true")],
            &[("_elements", "id")],
            &[("_type", "patient")],
        ] {
            let e = JobParams::from_pairs(pairs(bad), false).unwrap_err();
            assert_eq!(e.status, 400, "{bad:?}");
        }
        // Lenient: unsupported parameters and bad type names are ignored and remembered; bad
        // values of supported parameters still fail.
        let p = JobParams::from_pairs(
            pairs(&[
                ("_typeFilter", "Patient?active=true"),
                ("_type", "Patient,bad-type"),
            ]),
            true,
        )
        .unwrap();
        assert_eq!(p.types, Some(vec!["Patient".to_string()]));
        assert_eq!(p.ignored.len(), 2);
        assert_eq!(p.ignored[0].name, "_typeFilter");
        assert!(JobParams::from_pairs(pairs(&[("_since", "x")]), true).is_err());
    }

    #[test]
    fn parameters_resource_body() {
        let body = br#"{"resourceType":"Parameters","parameter":[
            {"name":"_type","valueString":"Patient"},
            {"name":"_since","valueInstant":"2024-01-01T00:00:00Z"},
            {"name":"patient","valueReference":{"reference":"Patient/1"}}]}"#;
        let p = parameters_body(body).unwrap();
        assert_eq!(p[0], ("_type".to_string(), "Patient".to_string()));
        assert_eq!(p[1].1, "2024-01-01T00:00:00Z");
        assert_eq!(p[2].1, r#"{"reference":"Patient/1"}"#);
        assert!(parameters_body(b"{}").is_err());
        assert!(parameters_body(b"not json").is_err());
        assert!(parameters_body(br#"{"resourceType":"Parameters","parameter":[{}]}"#).is_err());
    }

    #[test]
    fn ranges_cover_everything() {
        let b = vec!["b".to_string(), "d".to_string()];
        assert_eq!(
            ranges(&b),
            vec![(None, Some("b")), (Some("b"), Some("d")), (Some("d"), None)]
        );
        assert_eq!(ranges(&[]), vec![(None, None)]);
    }

    #[test]
    fn histogram_picks() {
        let h: Vec<String> = (0..=100).map(|i| format!("{i:03}")).collect();
        assert_eq!(
            pick_bounds(&h, 4).unwrap(),
            vec!["025".to_string(), "050".into(), "075".into()]
        );
        assert_eq!(pick_bounds(&h, 1).unwrap(), Vec::<String>::new());
        assert_eq!(pick_bounds(&h, 100).unwrap().len(), 99);
        assert!(pick_bounds(&h, 101).is_none());
        assert!(pick_bounds(&[], 2).is_none());
        assert!(pick_bounds(&h[..1], 1).is_none());
    }

    #[test]
    fn type_defaults() {
        assert_eq!(
            type_from_default("'Patient'::text").as_deref(),
            Some("Patient")
        );
        assert_eq!(type_from_default("'x y'::text"), None);
        assert_eq!(type_from_default("now()"), None);
    }

    #[test]
    fn filters() {
        let mut job = Job {
            id: "j".into(),
            patient: false,
            request: String::new(),
            params: JobParams::default(),
            transaction_time: "2024-01-01T00:00:00.000000Z".into(),
        };
        assert_eq!(
            job_filter(&job, "Observation"),
            "cts <= '2024-01-01T00:00:00.000000Z'::timestamptz"
        );
        job.patient = true;
        assert!(job_filter(&job, "Observation").contains("'{subject,reference}' LIKE 'Patient/%'"));
        assert!(!job_filter(&job, "Patient").contains("subject"));
        assert_eq!(encode("a+b/c d"), "a%2Bb%2Fc%20d");
    }
}
