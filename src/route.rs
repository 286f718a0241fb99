//! Which endpoint a request is for. Only the path decides; method checks happen here too so
//! that every endpoint answers 405 (with `Allow`) the same way.

use crate::http::Request;
use crate::outcome::ApiError;
use percent_encoding::percent_decode_str;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `GET /{Type}/$dump`
    Dump { type_name: String },
    /// `POST /$dump-sql`
    DumpSql,
    /// `POST /$sql` (the read-write DB console)
    Sql,
    /// `POST /$load` and `POST /{Type}/$load`
    Load { type_name: Option<String> },
    /// `GET|POST /$export` (system) and `GET|POST /Patient/$export` (patient compartment)
    ExportKickoff { patient: bool },
    /// `GET|DELETE /$export-status/{job}`
    ExportStatus { job: String },
    /// `GET /$export-file/{job}/{part}`: one output file of a job, streamed on download
    ExportFile { job: String, part: String },
    /// `GET /{Type}/$dump-ranges?parts=N`
    DumpRanges { type_name: String },
    /// `GET /metadata`
    Metadata,
    /// `PUT /`
    Put,
    /// `GET /{Type}/{id}`
    Read { type_name: String, id: String },
    /// `DELETE /{Type}/{id}`
    Delete { type_name: String, id: String },
}

impl Route {
    /// What authorization the endpoint needs beyond authentication.
    pub fn guard(&self) -> crate::auth::Guard {
        match self {
            Route::DumpSql => crate::auth::Guard::Explicit,
            Route::Sql => crate::auth::Guard::Admin,
            _ => crate::auth::Guard::Policy,
        }
    }
}

/// `^[A-Z][A-Za-z0-9]{0,63}$` — a resource type, and so (lower-cased) a table name.
pub fn valid_type_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && b[0].is_ascii_uppercase()
        && b.iter().all(u8::is_ascii_alphanumeric)
}

/// The table that stores a resource type (Aidbox's layout: the lower-cased name).
pub fn table_name(type_name: &str) -> String {
    type_name.to_ascii_lowercase()
}

/// The path with its segments percent-decoded (`/Patient/%24dump` → `/Patient/$dump`).
pub fn decoded_path(req: &Request) -> Result<String, ApiError> {
    Ok(format!("/{}", segments(req)?.join("/")))
}

fn segments(req: &Request) -> Result<Vec<String>, ApiError> {
    req.path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| {
            percent_decode_str(s)
                .decode_utf8()
                .map(|c| c.into_owned())
                .map_err(|_| ApiError::bad_request("the path is not valid UTF-8"))
        })
        .collect()
}

pub fn route(req: &Request) -> Result<Route, ApiError> {
    let segments = segments(req)?;
    let segs: Vec<&str> = segments.iter().map(String::as_str).collect();
    match segs.as_slice() {
        [type_name, "$dump"] => {
            let type_name = resource_type(type_name)?;
            allow(req, &["GET"])?;
            Ok(Route::Dump { type_name })
        }
        ["$dump-sql"] => {
            allow(req, &["POST"])?;
            Ok(Route::DumpSql)
        }
        ["$sql"] => {
            allow(req, &["POST"])?;
            Ok(Route::Sql)
        }
        ["$export"] => {
            allow(req, &["GET", "POST"])?;
            Ok(Route::ExportKickoff { patient: false })
        }
        ["Patient", "$export"] => {
            allow(req, &["GET", "POST"])?;
            Ok(Route::ExportKickoff { patient: true })
        }
        ["$export-status", job] => {
            allow(req, &["GET", "DELETE"])?;
            Ok(Route::ExportStatus {
                job: job.to_string(),
            })
        }
        ["$export-file", job, part] => {
            allow(req, &["GET"])?;
            Ok(Route::ExportFile {
                job: job.to_string(),
                part: part.to_string(),
            })
        }
        ["metadata"] => {
            allow(req, &["GET"])?;
            Ok(Route::Metadata)
        }
        [type_name, "$dump-ranges"] => {
            let type_name = resource_type(type_name)?;
            allow(req, &["GET"])?;
            Ok(Route::DumpRanges { type_name })
        }
        ["$load"] => {
            allow(req, &["POST"])?;
            Ok(Route::Load { type_name: None })
        }
        [type_name, "$load"] => {
            let type_name = resource_type(type_name)?;
            allow(req, &["POST"])?;
            Ok(Route::Load {
                type_name: Some(type_name),
            })
        }
        [] => {
            allow(req, &["PUT"])?;
            Ok(Route::Put)
        }
        [_, op] if op.starts_with('$') => {
            Err(ApiError::not_found(format!("unknown operation {op}")))
        }
        [type_name, id] => {
            let type_name = resource_type(type_name)?;
            allow(req, &["GET", "DELETE"])?;
            let id = id.to_string();
            Ok(if req.method == "GET" {
                Route::Read { type_name, id }
            } else {
                Route::Delete { type_name, id }
            })
        }
        _ => Err(ApiError::not_found(format!("no endpoint at {}", req.path))),
    }
}

fn resource_type(s: &str) -> Result<String, ApiError> {
    if valid_type_name(s) {
        Ok(s.to_string())
    } else {
        Err(ApiError::not_found(format!(
            "{s:?} is not a resource type (expected a name like Patient: a capital letter, then up to 63 letters or digits)"
        )))
    }
}

fn allow(req: &Request, methods: &[&str]) -> Result<(), ApiError> {
    if methods.contains(&req.method.as_str()) {
        Ok(())
    } else {
        Err(ApiError::method_not_allowed(
            &req.method,
            &methods.join(", "),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::BytesBody;

    fn req(method: &str, path: &str) -> Request {
        Request {
            method: method.into(),
            path: path.into(),
            query: String::new(),
            headers: vec![],
            body: Box::new(BytesBody(None)),
        }
    }

    #[test]
    fn type_names() {
        assert!(valid_type_name("Patient"));
        assert!(valid_type_name("MedicationRequest"));
        assert!(valid_type_name(&format!("A{}", "b".repeat(63))));
        assert!(!valid_type_name(&format!("A{}", "b".repeat(64))));
        for bad in [
            "",
            "patient",
            "Pat-ient",
            "Pat ient",
            "Pat;drop",
            "Patient\"",
            "Päti",
        ] {
            assert!(!valid_type_name(bad), "{bad}");
        }
        assert_eq!(table_name("MedicationRequest"), "medicationrequest");
    }

    #[test]
    fn routes_dump_with_plain_or_encoded_dollar() {
        for p in ["/Patient/$dump", "/Patient/%24dump", "/Patient/$dump/"] {
            assert_eq!(
                route(&req("GET", p)).unwrap(),
                Route::Dump {
                    type_name: "Patient".into()
                }
            );
        }
    }

    #[test]
    fn dump_errors() {
        assert_eq!(
            route(&req("POST", "/Patient/$dump")).unwrap_err().status,
            405
        );
        assert_eq!(
            route(&req("GET", "/patient/$dump")).unwrap_err().status,
            404
        );
        assert_eq!(
            route(&req("GET", "/Pa%22tient/$dump")).unwrap_err().status,
            404
        );
        assert_eq!(route(&req("GET", "/nothing")).unwrap_err().status, 404);
    }
}
