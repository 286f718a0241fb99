//! AccessPolicy evaluation (Aidbox's `allow` and `matcho` engines).
//!
//! A request is described as a JSON object — `{"request-method": "get", "uri": "/Patient/$dump",
//! "params": {...}, "client": {"id": "..."}}` — and a matcho pattern matches it when:
//! - an object pattern: every key of the pattern matches the value's key (subset match);
//! - a string starting with `#`: the rest is a regular expression searched in the string value;
//! - any other string, number, boolean, null: equality;
//! - `{"$one-of": [p1, p2, …]}`: any alternative matches;
//! - an array pattern: each element matches the value's element at the same position.
//!
//! Regexes are validated when a policy is stored (`validate`), so evaluation never meets a bad one.

use regex::Regex;
use serde_json::Value;

/// Whether one policy lets the request through.
///
/// `sensitive`: endpoints that an `allow` policy does not open (`$dump-sql`): only a matcho
/// policy whose pattern names the `uri` explicitly can grant them.
pub fn allows(policy: &Value, request: &Value, sensitive: bool) -> bool {
    match policy.get("engine").and_then(Value::as_str) {
        Some("allow") => !sensitive,
        Some("matcho") => {
            let Some(pattern) = policy.get("matcho") else {
                return false;
            };
            if sensitive && pattern.get("uri").is_none() {
                return false;
            }
            matches(pattern, request)
        }
        _ => false,
    }
}

pub fn matches(pattern: &Value, value: &Value) -> bool {
    match pattern {
        Value::Object(p) => {
            if let Some(alternatives) = p.get("$one-of") {
                return alternatives
                    .as_array()
                    .is_some_and(|alts| alts.iter().any(|alt| matches(alt, value)));
            }
            let Value::Object(v) = value else {
                return false;
            };
            p.iter()
                .all(|(k, sub)| v.get(k).is_some_and(|inner| matches(sub, inner)))
        }
        Value::Array(p) => match value {
            Value::Array(v) => {
                v.len() >= p.len() && p.iter().zip(v).all(|(sub, inner)| matches(sub, inner))
            }
            _ => false,
        },
        Value::String(s) if s.starts_with('#') => match value {
            Value::String(v) => Regex::new(&s[1..]).is_ok_and(|re| re.is_match(v)),
            _ => false,
        },
        other => other == value,
    }
}

/// Checks a policy before it is stored: a known engine, a matcho pattern, valid regexes.
pub fn validate(policy: &Value) -> Result<(), String> {
    match policy.get("engine").and_then(Value::as_str) {
        Some("allow") => Ok(()),
        Some("matcho") => {
            let pattern = policy
                .get("matcho")
                .ok_or("a matcho policy needs a matcho pattern")?;
            check_regexes(pattern)
        }
        Some(other) => Err(format!(
            "engine {other:?} is not supported (supported: allow, matcho)"
        )),
        None => Err("an AccessPolicy needs an engine (allow or matcho)".into()),
    }?;
    if let Some(link) = policy.get("link") {
        let ok = link.as_array().is_some_and(|l| {
            l.iter()
                .all(|r| r.get("id").and_then(Value::as_str).is_some())
        });
        if !ok {
            return Err("link must be a list of references like {id, resourceType: Client}".into());
        }
    }
    Ok(())
}

fn check_regexes(pattern: &Value) -> Result<(), String> {
    match pattern {
        Value::String(s) if s.starts_with('#') => Regex::new(&s[1..])
            .map(|_| ())
            .map_err(|e| format!("bad regex {s:?}: {e}")),
        Value::Object(o) => o.values().try_for_each(check_regexes),
        Value::Array(a) => a.iter().try_for_each(check_regexes),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn request(method: &str, uri: &str) -> Value {
        json!({"request-method": method, "uri": uri, "params": {"_count": "1"}, "client": {"id": "c1"}})
    }

    #[test]
    fn matcho_subset_regex_and_one_of() {
        let dump_only = json!({"engine": "matcho", "matcho": {"request-method": "get", "uri": "#/.*/\\$dump$"}});
        assert!(allows(&dump_only, &request("get", "/Patient/$dump"), false));
        assert!(!allows(
            &dump_only,
            &request("post", "/Patient/$dump"),
            false
        ));
        assert!(!allows(&dump_only, &request("post", "/$dump-sql"), true));
        assert!(!allows(
            &dump_only,
            &request("get", "/Patient/$dump-ranges"),
            false
        ));
        let either = json!({"engine": "matcho", "matcho": {"request-method": {"$one-of": ["get", "put"]}, "client": {"id": "c1"}}});
        assert!(allows(&either, &request("put", "/"), false));
        assert!(!allows(&either, &request("delete", "/Patient/1"), false));
        // `client.id` mismatch.
        let other = json!({"engine": "matcho", "matcho": {"client": {"id": "c2"}}});
        assert!(!allows(&other, &request("get", "/"), false));
        // Arrays match by position; numbers by equality.
        assert!(matches(&json!([1, "#^a"]), &json!([1, "abc", 3])));
        assert!(!matches(&json!([1, "#^a"]), &json!([2, "abc"])));
    }

    #[test]
    fn allow_engine_and_sensitive_endpoints() {
        let allow = json!({"engine": "allow"});
        assert!(allows(&allow, &request("get", "/Patient/$dump"), false));
        assert!(!allows(&allow, &request("post", "/$dump-sql"), true));
        // A matcho policy must name the uri to open a sensitive endpoint.
        let any_post = json!({"engine": "matcho", "matcho": {"request-method": "post"}});
        assert!(!allows(&any_post, &request("post", "/$dump-sql"), true));
        let sql = json!({"engine": "matcho", "matcho": {"uri": "/$dump-sql"}});
        assert!(allows(&sql, &request("post", "/$dump-sql"), true));
        assert!(!allows(
            &json!({"engine": "sql"}),
            &request("get", "/"),
            false
        ));
    }

    #[test]
    fn validation() {
        assert!(validate(&json!({"engine": "allow"})).is_ok());
        assert!(validate(&json!({"engine": "matcho", "matcho": {"uri": "#^/ok$"}})).is_ok());
        assert!(
            validate(&json!({"engine": "matcho", "matcho": {"uri": "#(unclosed"}}))
                .unwrap_err()
                .contains("bad regex")
        );
        assert!(validate(&json!({"engine": "sql"}))
            .unwrap_err()
            .contains("not supported"));
        assert!(validate(&json!({})).is_err());
        assert!(validate(&json!({"engine": "matcho"})).is_err());
        assert!(
            validate(&json!({"engine": "allow", "link": [{"resourceType": "Client"}]})).is_err()
        );
    }
}
