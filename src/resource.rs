//! Checking one incoming resource before it is written (shared by `PUT /` and `$load`).
//!
//! The JSON text is kept as the client sent it — only its top level is parsed, values stay raw —
//! so decimals like `1.50` and long integers reach PostgreSQL untouched. What the columns hold
//! (`id`, `resourceType`) and the meta fields the server owns are cut out of the text here, by
//! copying the other members' raw text: in SQL that took three to five jsonb rebuilds per row.
//! Client and AccessPolicy are the exceptions: a Client's secret is replaced by its argon2id
//! hash, and a policy is validated (engine, regexes) so that a bad one is refused when stored
//! rather than failing every request later.

use crate::auth;
use crate::encode::top_level_members;
use crate::policy;
use crate::route::valid_type_name;
use serde_json::value::RawValue;
use serde_json::Value;
use std::borrow::Cow;

/// A resource ready to write: its type, id, and the JSON text to store (without `id`,
/// `resourceType` and the server's meta fields).
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
    json: &str,
    path_type: Option<&str>,
    salt: &mut dyn FnMut() -> Vec<u8>,
) -> Result<Prepared, String> {
    let (type_name, id, stored) = {
        let members = top_level_members(json).map_err(|e| {
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
        (type_name, id, stored_text(&members))
    };
    let json = match type_name.as_str() {
        "Client" => {
            let hashed = prepare_client(&stored, salt)?;
            let members = top_level_members(&hashed).map_err(|e| e.to_string())?;
            stored_text(&members)
        }
        "AccessPolicy" => {
            let v: Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
            policy::validate(&v)?;
            stored
        }
        _ => stored,
    };
    Ok(Prepared {
        type_name,
        id,
        json,
    })
}

/// The members' text as stored: without `id` and `resourceType`, and with `meta` kept only
/// for what the server does not own (`versionId`, `lastUpdated`, `createdAt` come from the
/// columns); an empty or non-object meta is dropped. Values are copied raw. Duplicate keys stay
/// duplicates: jsonb keeps the last one, so the meta we read is the last one too.
fn stored_text(members: &[(Cow<str>, &RawValue)]) -> String {
    let mut out = String::with_capacity(
        members
            .iter()
            .map(|(k, v)| k.len() + v.get().len() + 4)
            .sum::<usize>()
            + 2,
    );
    out.push('{');
    // Built as a `String` from `&str` pieces: no second UTF-8 pass over the document.
    let push = |out: &mut String, key: &Cow<str>, value: &str| {
        if out.len() > 1 {
            out.push(',');
        }
        match key {
            // A key the parser could borrow had no escapes in the text, so it needs none.
            Cow::Borrowed(k) => {
                out.push('"');
                out.push_str(k);
                out.push('"');
            }
            Cow::Owned(k) => out.push_str(&Value::String(k.clone()).to_string()),
        }
        out.push(':');
        out.push_str(value);
    };
    for (key, value) in members {
        if !matches!(key.as_ref(), "id" | "resourceType" | "meta") {
            push(&mut out, key, value.get());
        }
    }
    let meta = members.iter().rev().find(|(k, _)| k == "meta");
    // Not an object: top_level_members refuses it, and the meta is dropped.
    if let Some(fields) = meta.and_then(|(_, v)| top_level_members(v.get()).ok()) {
        let mut inner = String::from("{");
        for (key, value) in &fields {
            if !matches!(key.as_ref(), "versionId" | "lastUpdated" | "createdAt") {
                push(&mut inner, key, value.get());
            }
        }
        if inner.len() > 1 {
            inner.push('}');
            push(&mut out, &Cow::Borrowed("meta"), &inner);
        }
    }
    out.push('}');
    out
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
    // Once per loaded line: ASCII ids (nearly all) are checked byte by byte.
    let bad = if id.is_ascii() {
        id.bytes().any(|b| b < 0x20 || b == 0x7f || b == b'/')
    } else {
        id.chars().any(|c| c.is_control() || c == '/')
    };
    if bad {
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
        prepare(json, path_type, &mut || vec![1u8; 16])
    }

    #[test]
    fn stored_text_leaves_out_what_the_columns_hold() {
        for (input, stored) in [
            (
                r#"{"resourceType":"Patient","id":"p","a":1.50}"#,
                r#"{"a":1.50}"#,
            ),
            (r#"{"id":"p","resourceType":"Patient"}"#, "{}"),
            (
                r#"{"id":"p","meta":{"versionId":"9","lastUpdated":"x","createdAt":"y"},"b":[1]}"#,
                r#"{"b":[1]}"#,
            ),
            (
                r#"{"id":"p","meta":{"versionId":"9","tag":[{"code":"t"}]},"q\"k":"\u00e9"}"#,
                r#"{"q\"k":"\u00e9","meta":{"tag":[{"code":"t"}]}}"#,
            ),
            (r#"{"id":"p","meta":"nope","c":null}"#, r#"{"c":null}"#),
            (
                r#"{"id":"p","meta":{"profile":["a"]},"meta":{"security":[]}}"#,
                r#"{"meta":{"security":[]}}"#,
            ),
            (
                r#"{ "id" : "p" , "n" : 12345678901234567890123 }"#,
                r#"{"n":12345678901234567890123}"#,
            ),
        ] {
            let p = prep(input, Some("Patient")).unwrap();
            assert_eq!(p.json, stored, "{input}");
        }
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
    fn ids_refuse_control_characters_and_slashes() {
        for ok in ["p1", "a-b.c_d", "ünï-cødé", "with space", "q\"uote\\"] {
            assert_eq!(check_id(ok), Ok(()), "{ok:?}");
        }
        for bad in ["", "a/b", "tab\t", "nl\n", "del\u{7f}", "c1\u{85}ü", "ü/"] {
            assert!(check_id(bad).is_err(), "{bad:?}");
        }
        assert!(check_id(&"x".repeat(256)).is_err());
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
        assert!(v.get("id").is_none() && v.get("resourceType").is_none());
    }
}
