//! Who is calling, and may they do this?
//!
//! Authentication is HTTP Basic. The built-in client `admin` authenticates against the
//! `admin_secret` variable (compared in constant time; unset means there is no admin). Every
//! other client is a `Client` resource whose `secret` is stored only as an argon2id PHC string.
//! One query loads the client's hash together with the AccessPolicies that apply to it (linked
//! to it, or linked to nobody), so authorization costs no second round trip.
//!
//! Failures never say whether the client id exists: a missing client still pays for one hash
//! verification, and every failure is the same 401.

use crate::db::{Db, Param, Value as DbValue};
use crate::outcome::ApiError;
use crate::policy;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use base64::Engine;
use serde_json::Value;
use subtle::ConstantTimeEq;

pub const REALM: &str = "spin-bulk";
pub const ADMIN_ID: &str = "admin";

/// argon2id cost, measured inside the component (wasm in wasmtime, no SIMD path in the argon2
/// crate) on the 2-core machine: m = 8 MiB, t = 2 cost about 35 ms per request; the cost is
/// close to linear in m × t, so m = 6 MiB, t = 1 (RFC 9106 favours t = 1 with the largest m
/// affordable) keeps authentication under the 20 ms budget. Parameters live in each PHC
/// string: raising them later does not invalidate stored secrets.
const M_COST_KIB: u32 = 6 * 1024;
const T_COST: u32 = 1;
const P_COST: u32 = 1;

fn hasher() -> Argon2<'static> {
    // These constants are within argon2's limits, so `new` cannot fail.
    let params = Params::new(M_COST_KIB, T_COST, P_COST, None).unwrap_or_default();
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// Hashes a secret into a PHC string (`$argon2id$v=19$m=…`). `salt` must be 16 random bytes.
pub fn hash_secret(secret: &str, salt: &[u8]) -> Result<String, ApiError> {
    let salt =
        SaltString::encode_b64(salt).map_err(|e| ApiError::internal(format!("salt: {e}")))?;
    hasher()
        .hash_password(secret.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| ApiError::internal(format!("hashing failed: {e}")))
}

fn verify_secret(secret: &str, phc: &str) -> bool {
    PasswordHash::new(phc)
        .map(|h| hasher().verify_password(secret.as_bytes(), &h).is_ok())
        .unwrap_or(false)
}

/// Spends what a verification costs, with the current parameters, when there is no hash to
/// verify (unknown client, or one without a secret): an unknown id must take as long as a wrong
/// secret.
fn spend_a_verification(secret: &str) {
    let _ = hash_secret(secret, b"spin-bulk-nobody");
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Principal {
    pub client_id: String,
    pub admin: bool,
    /// The AccessPolicies that apply to this client (empty for admin, who needs none).
    pub policies: Vec<Value>,
}

pub fn unauthorized(why: &str) -> ApiError {
    ApiError::new(401, "login", why)
        .with_header("www-authenticate", format!("Basic realm=\"{REALM}\""))
}

/// `Authorization: Basic base64(id:secret)`.
pub fn credentials(header: Option<&str>) -> Result<(String, String), ApiError> {
    let header = header.ok_or_else(|| unauthorized("authentication required (HTTP Basic)"))?;
    let (scheme, token) = header
        .trim()
        .split_once(' ')
        .ok_or_else(|| unauthorized("malformed Authorization header"))?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(unauthorized("only HTTP Basic authentication is supported"));
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(token.trim())
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| unauthorized("malformed Basic credentials"))?;
    let (id, secret) = decoded
        .split_once(':')
        .ok_or_else(|| unauthorized("malformed Basic credentials"))?;
    Ok((id.to_string(), secret.to_string()))
}

/// Checks the credentials; loads the client's policies in the same query.
pub fn authenticate<C: Db>(
    conn: &mut C,
    admin_secret: Option<&str>,
    id: &str,
    secret: &str,
) -> Result<Principal, ApiError> {
    let invalid = || unauthorized("invalid credentials");
    if id == ADMIN_ID {
        let ok = admin_secret
            .filter(|s| !s.is_empty())
            .is_some_and(|expected| bool::from(expected.as_bytes().ct_eq(secret.as_bytes())));
        return if ok {
            Ok(Principal {
                client_id: ADMIN_ID.into(),
                admin: true,
                policies: Vec::new(),
            })
        } else {
            Err(invalid())
        };
    }
    let rows = conn.query(
        "SELECT c.resource->>'secret', \
                coalesce(c.resource->'grant_types' @> '[\"basic\"]', false), \
                (SELECT coalesce(jsonb_agg(p.resource ORDER BY p.id), '[]'::jsonb)::text \
                 FROM accesspolicy p \
                 WHERE coalesce(jsonb_array_length(CASE jsonb_typeof(p.resource->'link') \
                                    WHEN 'array' THEN p.resource->'link' END), 0) = 0 \
                    OR p.resource->'link' @> jsonb_build_array(jsonb_build_object('id', c.id))) \
         FROM client c WHERE c.id = $1",
        vec![Param::Str(id.to_string())],
    );
    let row = match rows {
        Ok(mut r) if !r.rows.is_empty() => r.rows.swap_remove(0),
        Ok(_) => {
            spend_a_verification(secret);
            return Err(invalid());
        }
        Err(e) if e.sqlstate() == Some("42P01") => {
            // No client table yet: nobody but admin exists.
            spend_a_verification(secret);
            return Err(invalid());
        }
        Err(e) => return Err(e.into_api()),
    };
    let hash = row.first().and_then(DbValue::as_str).unwrap_or("");
    let basic = matches!(row.get(1), Some(DbValue::Bool(true)));
    if hash.is_empty() {
        spend_a_verification(secret);
        return Err(invalid());
    }
    if !verify_secret(secret, hash) || !basic {
        return Err(invalid());
    }
    let policies = row
        .get(2)
        .and_then(DbValue::as_str)
        .and_then(|t| serde_json::from_str::<Vec<Value>>(t).ok())
        .unwrap_or_default();
    Ok(Principal {
        client_id: id.to_string(),
        admin: false,
        policies,
    })
}

/// How much an endpoint needs beyond a matching policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guard {
    /// Any policy that matches.
    Policy,
    /// Only a matcho policy naming the uri (or admin): `$dump-sql`.
    Explicit,
    /// Only admin: the read-write SQL console.
    Admin,
}

/// 403 unless the principal may make this request.
pub fn authorize(p: &Principal, request: &Value, guard: Guard) -> Result<(), ApiError> {
    if p.admin {
        return Ok(());
    }
    let allowed = match guard {
        Guard::Admin => false,
        Guard::Policy | Guard::Explicit => p
            .policies
            .iter()
            .any(|pol| policy::allows(pol, request, guard == Guard::Explicit)),
    };
    if allowed {
        Ok(())
    } else {
        Err(ApiError::new(
            403,
            "forbidden",
            "no AccessPolicy allows this request for this client",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_basic_credentials() {
        let h = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("bulk-client:se:cret")
        );
        assert_eq!(
            credentials(Some(&h)).unwrap(),
            ("bulk-client".to_string(), "se:cret".to_string())
        );
        for bad in [
            None,
            Some("Bearer x"),
            Some("Basic !!!"),
            Some("Basic"),
            Some("Basic Zm9v"),
        ] {
            let e = credentials(bad).unwrap_err();
            assert_eq!(e.status, 401);
            assert!(e
                .headers
                .iter()
                .any(|(k, v)| k == "www-authenticate" && v.contains("spin-bulk")));
        }
    }

    #[test]
    fn hashes_verify_and_are_phc_argon2id() {
        let phc = hash_secret("secret", &[7u8; 16]).unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=6144,t=1,p=1$"), "{phc}");
        assert!(verify_secret("secret", &phc));
        assert!(!verify_secret("Secret", &phc));
        assert!(!verify_secret("secret", "not a hash"));
        // Hashes made with other parameters still verify: the PHC string carries them.
        let older = Argon2::new(
            Algorithm::Argon2id,
            Version::V0x13,
            Params::new(8192, 2, 1, None).unwrap(),
        )
        .hash_password(b"secret", &SaltString::encode_b64(&[7u8; 16]).unwrap())
        .unwrap()
        .to_string();
        assert!(older.starts_with("$argon2id$v=19$m=8192,t=2,p=1$"));
        assert!(verify_secret("secret", &older));
        assert!(!verify_secret("Secret", &older));
    }

    #[test]
    fn admin_needs_the_configured_secret() {
        struct NoDb;
        impl Db for NoDb {
            fn query(
                &mut self,
                _: &str,
                _: Vec<Param>,
            ) -> Result<crate::db::Rows, crate::db::DbError> {
                unreachable!("admin is checked without the database")
            }
            fn execute(&mut self, _: &str, _: Vec<Param>) -> Result<u64, crate::db::DbError> {
                unreachable!()
            }
        }
        assert!(
            authenticate(&mut NoDb, Some("s3"), "admin", "s3")
                .unwrap()
                .admin
        );
        assert_eq!(
            authenticate(&mut NoDb, Some("s3"), "admin", "s4")
                .unwrap_err()
                .status,
            401
        );
        assert_eq!(
            authenticate(&mut NoDb, None, "admin", "")
                .unwrap_err()
                .status,
            401
        );
        assert_eq!(
            authenticate(&mut NoDb, Some(""), "admin", "")
                .unwrap_err()
                .status,
            401
        );
    }
}
