//! Checking one incoming resource before it is written (shared by `PUT /` and `$load`).
//!
//! The JSON text is kept as the client sent it — only its top level is parsed, values stay raw —
//! so decimals like `1.50` and long integers reach PostgreSQL untouched. Client and
//! AccessPolicy are the exceptions: a Client's secret is replaced by its argon2id hash, and a
//! policy is validated (engine, regexes) so that a bad one is refused when stored rather than
//! failing every request later.

use crate::auth;
use crate::encode::top_level_members;
use crate::policy;
use crate::route::valid_type_name;
use serde_json::Value;

/// A resource ready to write: its type, id, and JSON text (still with id/resourceType/meta,
/// which the write strips in SQL).
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    pub type_name: String,
    pub id: String,
    pub json: String,
}

/// Checks a resource's JSON text. `path_type`: the type named by the URL (`/Patient/$load`),
/// which a resource without `resourceType` takes and a resource of another type contradicts.
/// `salt` gives 16 random bytes when a Client secret must be hashed.
pub fn prepare(
    json: String,
    path_type: Option<&str>,
    salt: &mut dyn FnMut() -> Vec<u8>,
) -> Result<Prepared, String> {
    let (type_name, id) = {
        let members = top_level_members(&json).map_err(|e| {
            if e.is_syntax() || e.is_eof() {
                format!("not valid JSON: {e}")
            } else {
                "not a JSON object".to_string()
            }
        })?;
        let field = |name: &str| members.iter().find(|(k, _)| k == name).map(|(_, v)| *v);
        let type_name = match field("resourceType") {
            Some(raw) => {
                let t: String = serde_json::from_str(raw.get())
                    .map_err(|_| "resourceType must be a string".to_string())?;
                if !valid_type_name(&t) {
                    return Err(format!("resourceType {t:?} is not a valid type name"));
                }
                if let Some(p) = path_type {
                    if p != t {
                        return Err(format!(
                            "resourceType {t} does not match the URL's type {p}"
                        ));
                    }
                }
                t
            }
            None => path_type
                .map(str::to_string)
                .ok_or("missing resourceType")?,
        };
        let id: String = match field("id") {
            Some(raw) => {
                serde_json::from_str(raw.get()).map_err(|_| "id must be a string".to_string())?
            }
            None => return Err("missing id".into()),
        };
        check_id(&id)?;
        (type_name, id)
    };
    let json = match type_name.as_str() {
        "Client" => prepare_client(&json, salt)?,
        "AccessPolicy" => {
            let v: Value = serde_json::from_str(&json).map_err(|e| e.to_string())?;
            policy::validate(&v)?;
            json
        }
        _ => json,
    };
    Ok(Prepared {
        type_name,
        id,
        json,
    })
}

/// FHIR ids are `[A-Za-z0-9\-\.]{1,64}`; stored data in the wild is looser, so we accept any
/// printable id up to 255 bytes, but never `/` (it would not be addressable as `/{Type}/{id}`).
pub fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("id must not be empty".into());
    }
    if id.len() > 255 {
        return Err("id longer than 255 bytes".into());
    }
    if id.chars().any(|c| c.is_control() || c == '/') {
        return Err(format!("id {id:?} contains a control character or '/'"));
    }
    Ok(())
}

fn prepare_client(json: &str, salt: &mut dyn FnMut() -> Vec<u8>) -> Result<String, String> {
    let mut v: Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
    let secret = v
        .get("secret")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or("a Client needs a secret (a non-empty string)")?
        .to_string();
    if let Some(g) = v.get("grant_types") {
        let ok = g.as_array().is_some_and(|a| a.iter().all(Value::is_string));
        if !ok {
            return Err("grant_types must be a list of strings".into());
        }
    }
    let hash = auth::hash_secret(&secret, &salt()).map_err(|e| e.diagnostics)?;
    v["secret"] = Value::String(hash);
    Ok(v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prep(json: &str, path_type: Option<&str>) -> Result<Prepared, String> {
        prepare(json.to_string(), path_type, &mut || vec![1u8; 16])
    }

    #[test]
    fn keeps_text_and_finds_type_and_id() {
        let p = prep(
            r#"{"resourceType":"Observation","id":"o1","value":1.50}"#,
            None,
        )
        .unwrap();
        assert_eq!((p.type_name.as_str(), p.id.as_str()), ("Observation", "o1"));
        assert!(p.json.contains("1.50"));
        let p = prep(r#"{"id":"p1"}"#, Some("Patient")).unwrap();
        assert_eq!(p.type_name, "Patient");
    }

    #[test]
    fn refuses_bad_resources_with_reasons() {
        for (json, path, needle) in [
            ("{", None, "not valid JSON"),
            ("[1]", None, "not a JSON object"),
            ("\"x\"", None, "not a JSON object"),
            (r#"{"id":"1"}"#, None, "missing resourceType"),
            (r#"{"resourceType":"Patient"}"#, None, "missing id"),
            (
                r#"{"resourceType":"patient","id":"1"}"#,
                None,
                "not a valid type name",
            ),
            (r#"{"resourceType":7,"id":"1"}"#, None, "must be a string"),
            (
                r#"{"resourceType":"Patient","id":7}"#,
                None,
                "id must be a string",
            ),
            (r#"{"resourceType":"Patient","id":""}"#, None, "empty"),
            (r#"{"resourceType":"Patient","id":"a/b"}"#, None, "'/'"),
            (
                r#"{"resourceType":"Observation","id":"1"}"#,
                Some("Patient"),
                "does not match",
            ),
            (
                r#"{"resourceType":"Client","id":"c"}"#,
                None,
                "needs a secret",
            ),
            (
                r#"{"resourceType":"AccessPolicy","id":"a","engine":"sql"}"#,
                None,
                "not supported",
            ),
            (
                r##"{"resourceType":"AccessPolicy","id":"a","engine":"matcho","matcho":{"uri":"#("}}"##,
                None,
                "bad regex",
            ),
        ] {
            let e = prep(json, path).unwrap_err();
            assert!(e.contains(needle), "{json}: {e}");
        }
    }

    #[test]
    fn client_secret_is_hashed() {
        let p = prep(
            r#"{"resourceType":"Client","id":"c","secret":"s3cret","grant_types":["basic"]}"#,
            None,
        )
        .unwrap();
        assert!(!p.json.contains("s3cret"));
        let v: Value = serde_json::from_str(&p.json).unwrap();
        assert!(v["secret"].as_str().unwrap().starts_with("$argon2id$"));
    }
}
