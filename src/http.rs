//! Plain HTTP types between the Spin layer (`crate::spin`) and the handlers.
//!
//! A handler gets a [`Request`] and returns a [`Reply`]. A reply is either complete
//! (`Full`: status, headers, body) or a stream whose status and headers are already decided —
//! every check that can fail with a status has run — and whose body is written page by page
//! through a [`BodyWriter`]. When writing fails after the first byte, the stream returns an
//! error and the Spin layer drops the body without finishing it, so the client sees an
//! incomplete transfer instead of a clean end.

use crate::outcome::ApiError;

pub struct Request {
    pub method: String,
    /// The raw path, still percent-encoded (`/Patient/%24dump`).
    pub path: String,
    /// The raw query string without `?` (empty when absent).
    pub query: String,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: Box<dyn BodyReader>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The media type of the body, lower case, without parameters (`""` when absent).
    pub fn content_type(&self) -> String {
        self.header("content-type")
            .and_then(|c| c.split(';').next())
            .map(|c| c.trim().to_ascii_lowercase())
            .unwrap_or_default()
    }

    /// Whether the client accepts a gzip-encoded response (`Accept-Encoding: gzip`, not `q=0`).
    pub fn accepts_gzip(&self) -> bool {
        self.header("accept-encoding")
            .map(accepts_gzip)
            .unwrap_or(false)
    }
}

fn accepts_gzip(header: &str) -> bool {
    header.split(',').any(|item| {
        let mut parts = item.split(';');
        let coding = parts.next().unwrap_or("").trim();
        if !(coding.eq_ignore_ascii_case("gzip") || coding == "*") {
            return false;
        }
        // `gzip;q=0` means "not gzip".
        !parts.any(|p| {
            let p = p.trim();
            p.strip_prefix("q=")
                .and_then(|q| q.trim().parse::<f32>().ok())
                .is_some_and(|q| q == 0.0)
        })
    })
}

/// The request body, read in pieces as they arrive.
pub trait BodyReader {
    /// The next piece of the body; `Ok(None)` at its end.
    fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, String>;
}

/// A body that is already complete (tests, bodies known to be empty).
pub struct BytesBody(pub Option<Vec<u8>>);

impl BodyReader for BytesBody {
    fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, String> {
        Ok(self.0.take().filter(|b| !b.is_empty()))
    }
}

/// Reads a whole (small) request body, refusing more than `limit` bytes.
pub fn read_body(body: &mut dyn BodyReader, limit: usize) -> Result<Vec<u8>, ApiError> {
    let mut all = Vec::new();
    while let Some(chunk) = body
        .next_chunk()
        .map_err(|e| ApiError::bad_request(format!("reading the request body failed: {e}")))?
    {
        if all.len() + chunk.len() > limit {
            return Err(ApiError::new(
                413,
                "too-costly",
                format!("request body larger than {limit} bytes"),
            ));
        }
        all.extend_from_slice(&chunk);
    }
    Ok(all)
}

/// Where a streaming body goes. Each call is one piece of the HTTP body (one chunk on the wire
/// when the host passes writes straight through, as Spin does).
pub trait BodyWriter {
    fn write(&mut self, bytes: &[u8]) -> Result<(), String>;
}

/// A body produced after the headers are sent. `Err` means: abort the transfer.
pub trait StreamBody {
    fn write_to(self: Box<Self>, out: &mut dyn BodyWriter) -> Result<(), String>;
}

pub enum Reply {
    Full {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    Stream {
        status: u16,
        headers: Vec<(String, String)>,
        body: Box<dyn StreamBody>,
    },
}

impl Reply {
    pub fn json(status: u16, value: &serde_json::Value) -> Reply {
        Reply::Full {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: serde_json::to_vec(value).unwrap_or_default(),
        }
    }

    pub fn empty(status: u16, headers: Vec<(String, String)>) -> Reply {
        Reply::Full {
            status,
            headers,
            body: Vec::new(),
        }
    }

    pub fn status(&self) -> u16 {
        match self {
            Reply::Full { status, .. } | Reply::Stream { status, .. } => *status,
        }
    }
}

impl From<ApiError> for Reply {
    fn from(e: ApiError) -> Reply {
        let mut headers = vec![(
            "content-type".to_string(),
            "application/fhir+json".to_string(),
        )];
        headers.extend(e.headers.iter().cloned());
        Reply::Full {
            status: e.status,
            headers,
            body: e.body(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gzip_negotiation() {
        assert!(accepts_gzip("gzip"));
        assert!(accepts_gzip("gzip, deflate, br, identity"));
        assert!(accepts_gzip("br;q=1.0, GZIP;q=0.5"));
        assert!(accepts_gzip("*"));
        assert!(!accepts_gzip("gzip;q=0"));
        assert!(!accepts_gzip("identity"));
        assert!(!accepts_gzip("deflate, br"));
    }

    #[test]
    fn read_body_enforces_limit() {
        let mut b = BytesBody(Some(vec![1, 2, 3]));
        assert_eq!(read_body(&mut b, 3).unwrap(), vec![1, 2, 3]);
        let mut b = BytesBody(Some(vec![1, 2, 3]));
        assert_eq!(read_body(&mut b, 2).unwrap_err().status, 413);
    }
}
