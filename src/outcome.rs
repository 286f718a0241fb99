//! Errors as FHIR `OperationOutcome`s.
//!
//! Every failure the API reports before the first byte of a response goes out as an
//! [`ApiError`]: an HTTP status plus an OperationOutcome body whose `issue[0].code` is one of
//! FHIR's IssueType codes. Handlers return `Result<_, ApiError>` and the HTTP layer renders it.

use serde_json::json;

/// An error answered with an HTTP status and an OperationOutcome body.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    /// FHIR IssueType code (`invalid`, `not-found`, `security`, `exception`, …).
    pub code: &'static str,
    pub diagnostics: String,
    /// Extra response headers (e.g. `Allow` for 405, `WWW-Authenticate` for 401).
    pub headers: Vec<(String, String)>,
    /// FHIRPath-ish locations of the problem (`_count`, `line 7`, `[2]`).
    pub expression: Vec<String>,
    /// Further issues of the same kind: (diagnostics, expression), e.g. more bad lines.
    pub more: Vec<(String, String)>,
}

impl ApiError {
    pub fn new(status: u16, code: &'static str, diagnostics: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            diagnostics: diagnostics.into(),
            headers: Vec::new(),
            expression: Vec::new(),
            more: Vec::new(),
        }
    }

    pub fn bad_request(diagnostics: impl Into<String>) -> Self {
        Self::new(400, "invalid", diagnostics)
    }

    pub fn not_found(diagnostics: impl Into<String>) -> Self {
        Self::new(404, "not-found", diagnostics)
    }

    pub fn method_not_allowed(method: &str, allow: &str) -> Self {
        let mut e = Self::new(
            405,
            "not-supported",
            format!("method {method} is not allowed here; allowed: {allow}"),
        );
        e.headers.push(("allow".into(), allow.into()));
        e
    }

    pub fn unavailable(diagnostics: impl Into<String>) -> Self {
        Self::new(503, "transient", diagnostics)
    }

    pub fn internal(diagnostics: impl Into<String>) -> Self {
        Self::new(500, "exception", diagnostics)
    }

    pub fn with_header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn with_expression(mut self, expression: impl Into<String>) -> Self {
        self.expression.push(expression.into());
        self
    }

    pub fn with_issue(mut self, diagnostics: String, expression: String) -> Self {
        self.more.push((diagnostics, expression));
        self
    }

    fn severity(&self) -> &'static str {
        if self.status >= 500 {
            "fatal"
        } else {
            "error"
        }
    }

    /// The OperationOutcome JSON body.
    pub fn body(&self) -> Vec<u8> {
        let mut issue = json!({
            "severity": self.severity(),
            "code": self.code,
            "diagnostics": self.diagnostics,
        });
        if !self.expression.is_empty() {
            issue["expression"] = json!(self.expression);
        }
        let mut issues = vec![issue];
        for (diagnostics, expression) in &self.more {
            issues.push(json!({
                "severity": self.severity(),
                "code": self.code,
                "diagnostics": diagnostics,
                "expression": [expression],
            }));
        }
        let outcome = json!({
            "resourceType": "OperationOutcome",
            "issue": issues,
        });
        // Serialising a Value built from strings cannot fail.
        serde_json::to_vec(&outcome).unwrap_or_default()
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status, self.code, self.diagnostics)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_operation_outcome() {
        let e = ApiError::bad_request("_count: not a number").with_expression("_count");
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["resourceType"], "OperationOutcome");
        assert_eq!(v["issue"][0]["severity"], "error");
        assert_eq!(v["issue"][0]["code"], "invalid");
        assert_eq!(v["issue"][0]["diagnostics"], "_count: not a number");
        assert_eq!(v["issue"][0]["expression"][0], "_count");
    }

    #[test]
    fn server_errors_are_fatal_and_405_says_allow() {
        assert!(String::from_utf8(ApiError::internal("x").body())
            .unwrap()
            .contains("\"fatal\""));
        let e = ApiError::method_not_allowed("POST", "GET");
        assert_eq!(e.status, 405);
        assert_eq!(e.headers, vec![("allow".to_string(), "GET".to_string())]);
    }
}
