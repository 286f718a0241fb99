//! The small REST surface around the bulk endpoints: `PUT /` (an atomic bulk upsert, as the
//! seed uses to create Clients and AccessPolicies), `GET /{Type}/{id}` and `DELETE /{Type}/{id}`
//! (so that clients and policies can be inspected and revoked).

use crate::db::{quote_ident, Db, DbError, Param};
use crate::encode::{row_columns, LineEncoder};
use crate::http::{read_body, Reply, Request};
use crate::outcome::ApiError;
use crate::resource::{prepare, Prepared};
use crate::route::table_name;
use crate::store::{Mode, Tx};
use serde_json::Value;

/// `PUT /` bodies are lists of a few resources (clients, policies, seeds); bulk goes to `$load`.
const PUT_BODY_LIMIT: usize = 32 << 20;

/// The entries of a `PUT /` body: a JSON array, or a YAML sequence, by Content-Type.
fn entries(req: &mut Request) -> Result<Vec<String>, ApiError> {
    let content_type = req.content_type();
    let body = read_body(req.body.as_mut(), PUT_BODY_LIMIT)?;
    match content_type.as_str() {
        "application/json" | "application/fhir+json" => {
            // Raw entries keep each resource's text exactly as sent.
            let list: Vec<&serde_json::value::RawValue> =
                serde_json::from_slice(&body).map_err(|e| {
                    ApiError::bad_request(format!("body is not a JSON array of resources: {e}"))
                })?;
            Ok(list.into_iter().map(|r| r.get().to_string()).collect())
        }
        "application/yaml" | "application/x-yaml" | "text/yaml" => {
            let list: Vec<Value> = serde_norway::from_slice(&body).map_err(|e| {
                ApiError::bad_request(format!("body is not a YAML sequence of resources: {e}"))
            })?;
            Ok(list.iter().map(Value::to_string).collect())
        }
        "" => Err(ApiError::new(
            415,
            "not-supported",
            "Content-Type is required: application/json or application/yaml",
        )),
        other => Err(ApiError::new(
            415,
            "not-supported",
            format!(
                "Content-Type {other} is not supported: use application/json or application/yaml"
            ),
        )),
    }
}

/// `PUT /`: every entry is checked first (422 naming the entry), then all are upserted in one
/// transaction; the answer lists the stored resources with id and meta, secrets left out.
pub fn put<C: Db>(
    conn: &mut C,
    req: &mut Request,
    salt: &mut dyn FnMut() -> Vec<u8>,
) -> Result<Reply, ApiError> {
    let mut prepared: Vec<Prepared> = Vec::new();
    for (i, json) in entries(req)?.into_iter().enumerate() {
        let p = prepare(&json, None, salt).map_err(|why| {
            ApiError::new(422, "processing", format!("entry {i}: {why}"))
                .with_expression(format!("[{i}]"))
        })?;
        prepared.push(p);
    }
    // Group by type, keeping the first-seen order of types and entries.
    let mut groups: Vec<(String, Vec<(String, String)>)> = Vec::new();
    for p in &prepared {
        match groups.iter_mut().find(|(t, _)| *t == p.type_name) {
            Some((_, docs)) => docs.push((p.id.clone(), p.json.clone())),
            None => groups.push((p.type_name.clone(), vec![(p.id.clone(), p.json.clone())])),
        }
    }
    let mut tx = Tx::begin(conn).map_err(DbError::into_api)?;
    let mut stored: Vec<(String, String, String)> = Vec::new(); // (type, id, json)
    for (type_name, docs) in groups {
        let rows = match tx.write(conn, &type_name, docs, Mode::Upsert, true) {
            Ok(r) => r,
            Err(e) => {
                Tx::rollback(conn);
                return Err(write_error(e));
            }
        };
        let enc = LineEncoder::new(&type_name, false);
        for row in rows.rows {
            let mut line = Vec::new();
            enc.push_row(&mut line, &row).map_err(ApiError::internal)?;
            let id = row[0].as_str().unwrap_or_default().to_string();
            line.pop(); // the '\n'
            stored.push((
                type_name.clone(),
                id,
                String::from_utf8(line).unwrap_or_default(),
            ));
        }
    }
    tx.commit(conn).map_err(write_error)?;
    // Answer in request order, each resource once.
    let mut out = Vec::with_capacity(stored.len());
    for p in &prepared {
        if let Some(i) = stored
            .iter()
            .position(|(t, id, _)| *t == p.type_name && *id == p.id)
        {
            out.push(stored.swap_remove(i).2);
        }
    }
    Ok(Reply::Full {
        status: 200,
        headers: vec![("content-type".into(), "application/json".into())],
        body: format!("[{}]", out.join(",")).into_bytes(),
    })
}

fn write_error(e: DbError) -> ApiError {
    match e.sqlstate() {
        Some(code) if code.starts_with("22") || code.starts_with("23") => ApiError::new(
            422,
            "processing",
            format!("rejected by the database: {}", e.message()),
        ),
        _ => e.into_api(),
    }
}

/// `GET /{Type}/{id}`.
pub fn read<C: Db>(conn: &mut C, type_name: &str, id: &str) -> Result<Reply, ApiError> {
    let sql = format!(
        "SELECT {} FROM {} WHERE id = $1",
        row_columns(type_name),
        quote_ident(&table_name(type_name))
    );
    let rows = match conn.query(&sql, vec![Param::Str(id.to_string())]) {
        Ok(r) => r,
        Err(e) if e.sqlstate() == Some("42P01") => return Err(not_found(type_name, id)),
        Err(e) => return Err(e.into_api()),
    };
    let row = rows.rows.first().ok_or_else(|| not_found(type_name, id))?;
    let mut body = Vec::new();
    LineEncoder::new(type_name, false)
        .push_row(&mut body, row)
        .map_err(ApiError::internal)?;
    body.pop();
    Ok(Reply::Full {
        status: 200,
        headers: vec![("content-type".into(), "application/json".into())],
        body,
    })
}

/// `DELETE /{Type}/{id}`: 204, or 404 when there was nothing to delete.
pub fn delete<C: Db>(conn: &mut C, type_name: &str, id: &str) -> Result<Reply, ApiError> {
    let sql = format!(
        "DELETE FROM {} WHERE id = $1",
        quote_ident(&table_name(type_name))
    );
    match conn.execute(&sql, vec![Param::Str(id.to_string())]) {
        Ok(0) => Err(not_found(type_name, id)),
        Ok(_) => Ok(Reply::empty(204, Vec::new())),
        Err(e) if e.sqlstate() == Some("42P01") => Err(not_found(type_name, id)),
        Err(e) => Err(e.into_api()),
    }
}

fn not_found(type_name: &str, id: &str) -> ApiError {
    ApiError::not_found(format!("{type_name}/{id} not found"))
}
