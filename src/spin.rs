//! The thin layer on spin-sdk: the only code that touches Spin's interfaces.
//!
//! - [`SpinPlatform`] implements [`Platform`] with Spin variables and `spin_sdk::pg4`
//!   (spin:postgres@4.0.0), moving values out of Spin's row sets without copying their bytes.
//! - [`handle_request`] adapts wasi:http: the request body is read through the raw
//!   `InputStream`, and a streaming response is written through the raw `OutputStream` of
//!   `OutgoingBody::write()`, because spin-sdk's `take_body()` sink finishes the body when
//!   dropped and so cannot report a failure. Here the body is finished only when the stream
//!   succeeded; on failure it is dropped unfinished, which Spin turns into an aborted
//!   transfer (curl exit 18) instead of a response that looks complete.

use crate::db::{
    Column, DateTime, Db, DbError, Fetched, Param, PendingResponse, Platform, Rows, SelfRequest,
    Value,
};
use crate::http::{BodyReader, BodyWriter, Reply, Request};
use spin_sdk::http::{Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam};
use spin_sdk::pg4::{self, DbDataType, DbValue, ParameterValue};
use spin_sdk::wit::wasi::http0_2_0::types::{
    FutureIncomingResponse, IncomingBody, IncomingResponse,
};
use wasi::io::streams::{InputStream, OutputStream, StreamError};

struct SpinPlatform;

struct SpinConn(pg4::Connection);

impl Platform for SpinPlatform {
    type Conn = SpinConn;

    fn variable(&self, name: &str) -> Option<String> {
        spin_sdk::variables::get(name).ok()
    }

    fn connect(&self, address: &str) -> Result<SpinConn, DbError> {
        pg4::Connection::open(address)
            .map(SpinConn)
            .map_err(db_error)
    }

    fn random_bytes(&self, n: usize) -> Vec<u8> {
        wasi::random::random::get_random_bytes(n as u64)
    }

    fn fetch(&self, url: &str) -> Result<Fetched, String> {
        use spin_sdk::wit::wasi::http0_2_0::outgoing_handler;
        use spin_sdk::wit::wasi::http0_2_0::types::{Method, OutgoingRequest, Scheme};
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| format!("{url:?} is not an absolute URL"))?;
        let scheme = match scheme.to_ascii_lowercase().as_str() {
            "http" => Scheme::Http,
            "https" => Scheme::Https,
            other => return Err(format!("scheme {other} is not supported (http, https)")),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, "/"),
        };
        let request = OutgoingRequest::new(Fields::new());
        let set = request.set_method(&Method::Get).is_ok()
            && request.set_scheme(Some(&scheme)).is_ok()
            && request.set_authority(Some(authority)).is_ok()
            && request.set_path_with_query(Some(path)).is_ok();
        if !set {
            return Err(format!("{url:?} is not a valid request URL"));
        }
        let future = outgoing_handler::handle(request, None).map_err(|e| format!("{e:?}"))?;
        fetched(wait_response(future)?)
    }

    fn self_requests(&self) -> Box<dyn SelfRequest> {
        Box::new(SpinSelf)
    }
}

/// Waits for an outbound response's status and headers.
fn wait_response(future: FutureIncomingResponse) -> Result<IncomingResponse, String> {
    future.subscribe().block();
    match future.get() {
        Some(Ok(Ok(r))) => Ok(r),
        Some(Ok(Err(e))) => Err(format!("{e:?}")),
        _ => Err("no response".into()),
    }
}

fn fetched(response: IncomingResponse) -> Result<Fetched, String> {
    let status = response.status();
    let gzip = response
        .headers()
        .get("content-encoding")
        .iter()
        .any(|v| v.eq_ignore_ascii_case(b"gzip"));
    let body = response
        .consume()
        .map_err(|()| "response body unavailable")?;
    let stream = body.stream().ok();
    Ok(Fetched {
        status,
        gzip,
        body: Box::new(IncomingBodyReader {
            stream,
            _body: Some(body),
            _response: Some(response),
        }),
    })
}

/// Spin's self requests: a URL without an authority, allowed by `http://self` in
/// `allowed_outbound_hosts`, reaches this same application. Spin also takes the host `self.alt`
/// for SDKs that cannot leave the authority out, and a recent wasmtime-wasi-http refuses a
/// request without one before Spin sees it; so the relative form is tried first, then
/// `self.alt`.
struct SpinSelf;

fn self_request(
    path_and_query: &str,
    authorization: &str,
    authority: Option<&str>,
) -> Result<FutureIncomingResponse, String> {
    use spin_sdk::wit::wasi::http0_2_0::outgoing_handler;
    use spin_sdk::wit::wasi::http0_2_0::types::{Method, OutgoingRequest, Scheme};
    let headers = fields(&[("authorization".into(), authorization.into())]);
    let request = OutgoingRequest::new(headers);
    let set = request.set_method(&Method::Get).is_ok()
        && request.set_scheme(Some(&Scheme::Http)).is_ok()
        && request.set_authority(authority).is_ok()
        && request.set_path_with_query(Some(path_and_query)).is_ok();
    if !set {
        return Err(format!("{path_and_query:?} is not a valid request path"));
    }
    outgoing_handler::handle(request, None).map_err(|e| format!("{e:?}"))
}

impl SelfRequest for SpinSelf {
    fn send(
        &self,
        path_and_query: &str,
        authorization: &str,
    ) -> Result<Box<dyn PendingResponse>, String> {
        let pending = |future, relative| SpinPending {
            future,
            relative,
            path_and_query: path_and_query.to_string(),
            authorization: authorization.to_string(),
        };
        match self_request(path_and_query, authorization, None) {
            Ok(future) => Ok(Box::new(pending(future, true))),
            Err(_) => {
                let future = self_request(path_and_query, authorization, Some("self.alt"))?;
                Ok(Box::new(pending(future, false)))
            }
        }
    }
}

struct SpinPending {
    future: FutureIncomingResponse,
    /// Sent without an authority: on failure, try `self.alt`.
    relative: bool,
    path_and_query: String,
    authorization: String,
}

impl PendingResponse for SpinPending {
    fn wait(self: Box<Self>) -> Result<Fetched, String> {
        match wait_response(self.future) {
            Ok(r) => fetched(r),
            Err(e) if self.relative => {
                let future =
                    self_request(&self.path_and_query, &self.authorization, Some("self.alt"))
                        .map_err(|e2| format!("{e}; then {e2}"))?;
                fetched(wait_response(future)?)
            }
            Err(e) => Err(e),
        }
    }
}

impl Db for SpinConn {
    fn query(&mut self, sql: &str, params: Vec<Param>) -> Result<Rows, DbError> {
        let set = self.0.query(sql, &parameters(params)).map_err(db_error)?;
        Ok(Rows {
            columns: set
                .columns
                .into_iter()
                .map(|c| Column {
                    kind: kind_name(&c.data_type),
                    name: c.name,
                })
                .collect(),
            rows: set
                .rows
                .into_iter()
                .map(|r| r.into_iter().map(value).collect())
                .collect(),
        })
    }

    fn execute(&mut self, sql: &str, params: Vec<Param>) -> Result<u64, DbError> {
        self.0.execute(sql, &parameters(params)).map_err(db_error)
    }
}

fn parameters(params: Vec<Param>) -> Vec<ParameterValue> {
    params
        .into_iter()
        .map(|p| match p {
            Param::Null => ParameterValue::DbNull,
            Param::Bool(b) => ParameterValue::Boolean(b),
            Param::Int(i) => ParameterValue::Int64(i),
            Param::Float(f) => ParameterValue::Floating64(f),
            Param::Str(s) => ParameterValue::Str(s),
            Param::StrArray(v) => ParameterValue::ArrayStr(v.into_iter().map(Some).collect()),
        })
        .collect()
}

fn value(v: DbValue) -> Value {
    match v {
        DbValue::DbNull => Value::Null,
        DbValue::Boolean(b) => Value::Bool(b),
        DbValue::Int8(i) => Value::Int(i.into()),
        DbValue::Int16(i) => Value::Int(i.into()),
        DbValue::Int32(i) => Value::Int(i.into()),
        DbValue::Int64(i) => Value::Int(i),
        DbValue::Floating32(f) => Value::Float(f.into()),
        DbValue::Floating64(f) => Value::Float(f),
        DbValue::Str(s) => Value::Str(s),
        DbValue::Binary(b) | DbValue::Unsupported(b) => Value::Bytes(b),
        DbValue::Datetime((year, month, day, hour, minute, second, nanosecond)) => {
            Value::DateTime(DateTime {
                year,
                month,
                day,
                hour,
                minute,
                second,
                nanosecond,
            })
        }
        _ => Value::Other,
    }
}

fn kind_name(t: &DbDataType) -> String {
    match t {
        DbDataType::Other(name) => format!("other({name})"),
        other => format!("{other:?}").to_ascii_lowercase(),
    }
}

fn db_error(e: pg4::PgError) -> DbError {
    use pg4::{PgError, QueryError};
    match e {
        PgError::ConnectionFailed(m) => DbError::Connect(m),
        PgError::QueryFailed(QueryError::DbError(d)) => {
            let position = d
                .extras
                .iter()
                .find(|(k, _)| k == "position")
                .map(|(_, v)| v.clone());
            DbError::Sql {
                code: d.code,
                message: d.message,
                detail: d.detail,
                position,
            }
        }
        PgError::QueryFailed(QueryError::Text(m)) => DbError::Other(m),
        PgError::BadParameter(m) => DbError::Other(format!("bad parameter: {m}")),
        PgError::ValueConversionFailed(m) => {
            DbError::Other(format!("value conversion failed: {m}"))
        }
        PgError::Other(m) => DbError::Other(m),
    }
}

/// Reads the request body straight from its wasi stream, a piece at a time.
struct IncomingBodyReader {
    // Field order matters: the stream must be dropped before the body it belongs to.
    stream: Option<InputStream>,
    _body: Option<IncomingBody>,
    /// For a fetched response: the parent of the body, kept alive until the body is done.
    _response: Option<IncomingResponse>,
}

impl BodyReader for IncomingBodyReader {
    fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, String> {
        let Some(stream) = self.stream.as_ref() else {
            return Ok(None);
        };
        loop {
            match stream.blocking_read(64 * 1024) {
                Ok(bytes) if bytes.is_empty() => continue,
                Ok(bytes) => return Ok(Some(bytes)),
                Err(StreamError::Closed) => {
                    self.stream = None;
                    return Ok(None);
                }
                Err(StreamError::LastOperationFailed(e)) => return Err(e.to_debug_string()),
            }
        }
    }
}

/// Writes a streaming body through the raw output stream, waiting for capacity as needed.
struct StreamWriter<'a>(&'a OutputStream);

impl BodyWriter for StreamWriter<'_> {
    fn write(&mut self, mut bytes: &[u8]) -> Result<(), String> {
        let fail = |e: StreamError| match e {
            StreamError::Closed => "the client went away".to_string(),
            StreamError::LastOperationFailed(e) => e.to_debug_string(),
        };
        while !bytes.is_empty() {
            let permitted = self.0.check_write().map_err(fail)?;
            if permitted == 0 {
                self.0.subscribe().block();
                continue;
            }
            let n = (permitted as usize).min(bytes.len());
            self.0.write(&bytes[..n]).map_err(fail)?;
            bytes = &bytes[n..];
        }
        self.0.flush().map_err(fail)
    }
}

fn request(req: IncomingRequest) -> Request {
    let method = req.method().to_string();
    let path_query = req.path_with_query().unwrap_or_else(|| "/".into());
    let (path, query) = match path_query.split_once('?') {
        Some((p, q)) => (p.to_string(), q.to_string()),
        None => (path_query, String::new()),
    };
    let headers = req
        .headers()
        .entries()
        .into_iter()
        .map(|(k, v)| {
            (
                k.to_ascii_lowercase(),
                String::from_utf8_lossy(&v).into_owned(),
            )
        })
        .collect();
    let (body, stream) = match req.consume() {
        Ok(body) => {
            let stream = body.stream().ok();
            (Some(body), stream)
        }
        Err(()) => (None, None),
    };
    Request {
        method,
        path,
        query,
        headers,
        body: Box::new(IncomingBodyReader {
            stream,
            _body: body,
            _response: None,
        }),
    }
}

fn fields(headers: &[(String, String)]) -> Fields {
    let list: Vec<(String, Vec<u8>)> = headers
        .iter()
        .map(|(k, v)| (k.clone(), v.as_bytes().to_vec()))
        .collect();
    Fields::from_list(&list).unwrap_or_else(|_| Fields::new())
}

#[spin_sdk::http_component]
async fn handle_request(req: IncomingRequest, out: ResponseOutparam) {
    let reply = crate::handle(&SpinPlatform, request(req));
    match reply {
        Reply::Full {
            status,
            headers,
            body,
        } => {
            let mut headers = headers;
            headers.push(("content-length".into(), body.len().to_string()));
            let response = OutgoingResponse::new(fields(&headers));
            let _ = response.set_status_code(status);
            let Ok(outgoing) = response.body() else {
                return;
            };
            out.set(response);
            if let Ok(stream) = outgoing.write() {
                let ok = StreamWriter(&stream).write(&body).is_ok();
                drop(stream);
                if ok {
                    let _ = OutgoingBody::finish(outgoing, None);
                }
            }
        }
        Reply::Stream {
            status,
            headers,
            body,
        } => {
            let response = OutgoingResponse::new(fields(&headers));
            let _ = response.set_status_code(status);
            let Ok(outgoing) = response.body() else {
                return;
            };
            out.set(response);
            let Ok(stream) = outgoing.write() else {
                return;
            };
            let result = body.write_to(&mut StreamWriter(&stream));
            drop(stream);
            match result {
                Ok(()) => {
                    let _ = OutgoingBody::finish(outgoing, None);
                }
                Err(e) => {
                    // Dropping `outgoing` unfinished aborts the transfer: the client must not
                    // take a truncated stream for a complete one.
                    eprintln!("spin-bulk: stream aborted: {e}");
                    drop(outgoing);
                }
            }
        }
    }
}
