//! Query-string parameters: decoding, the "every parameter must be known" rule, and the value
//! shapes the API accepts (instants, counts, booleans).

use crate::outcome::ApiError;
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// The decoded parameters of one request, consumed by name; whatever is left over is unknown.
pub struct Params {
    pairs: Vec<(String, String)>,
}

/// Decodes one query component: `%XX` escapes, and `+` as a space (HTML form encoding, which
/// curl's `--data-urlencode -G` and browsers produce). Instants therefore accept a space where
/// their offset sign `+` was (see [`instant`]).
pub fn decode(s: &str) -> Result<String, ApiError> {
    let spaced = s.replace('+', " ");
    percent_decode_str(&spaced)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| ApiError::bad_request(format!("query parameter is not valid UTF-8: {s}")))
}

impl Params {
    pub fn parse(query: &str) -> Result<Params, ApiError> {
        let mut pairs = Vec::new();
        for part in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').unwrap_or((part, ""));
            pairs.push((decode(k)?, decode(v)?));
        }
        Ok(Params { pairs })
    }

    /// Takes the value of `name`; a parameter given twice is an error (which one would win is a
    /// guess, and for a bulk export a wrong guess is expensive).
    pub fn take(&mut self, name: &str) -> Result<Option<String>, ApiError> {
        let mut found = None;
        let mut i = 0;
        while i < self.pairs.len() {
            if self.pairs[i].0 == name {
                let (_, v) = self.pairs.remove(i);
                if found.is_some() {
                    return Err(ApiError::bad_request(format!(
                        "parameter {name} is given more than once"
                    ))
                    .with_expression(name));
                }
                found = Some(v);
            } else {
                i += 1;
            }
        }
        Ok(found)
    }

    pub fn take_bool(&mut self, name: &str) -> Result<Option<bool>, ApiError> {
        self.take(name)?
            .map(|v| match v.as_str() {
                "true" | "" => Ok(true),
                "false" => Ok(false),
                _ => Err(invalid(name, &v, "expected true or false")),
            })
            .transpose()
    }

    pub fn take_u64(&mut self, name: &str) -> Result<Option<u64>, ApiError> {
        self.take(name)?
            .map(|v| {
                if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(invalid(name, &v, "expected a non-negative whole number"));
                }
                v.parse::<u64>()
                    .map_err(|_| invalid(name, &v, "number too large"))
            })
            .transpose()
    }

    pub fn take_instant(&mut self, name: &str) -> Result<Option<String>, ApiError> {
        self.take(name)?
            .map(|v| instant(&v).map_err(|why| invalid(name, &v, why)))
            .transpose()
    }

    /// Fails with 400 naming the first parameter nobody took, so that a typo (`_snce`) is an
    /// error instead of a silent full export.
    pub fn finish(self) -> Result<(), ApiError> {
        match self.pairs.first() {
            None => Ok(()),
            Some((k, _)) => {
                Err(ApiError::bad_request(format!("unknown parameter {k}"))
                    .with_expression(k.clone()))
            }
        }
    }
}

/// Percent-encodes a URL query value or path segment (ids may hold `+`, `&`, `/`, …).
pub fn encode(s: &str) -> String {
    const SET: &AsciiSet = &NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    utf8_percent_encode(s, SET).to_string()
}

pub fn invalid(name: &str, value: &str, why: &str) -> ApiError {
    ApiError::bad_request(format!("parameter {name}={value:?}: {why}")).with_expression(name)
}

/// Validates an instant and returns it in a form PostgreSQL's `timestamptz` input accepts.
///
/// Accepted: a FHIR instant `YYYY-MM-DDThh:mm:ss[.fraction](Z|±hh:mm)`, or a date
/// `YYYY-MM-DD` (midnight UTC). A time without a zone is refused: it would silently mean the
/// database session's zone. A space in the offset position is taken as `+` (form decoding turns
/// an unescaped `+` into a space).
pub fn instant(v: &str) -> Result<String, &'static str> {
    let b = v.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|s| s.iter().all(u8::is_ascii_digit));
    if !(digits(0..4)
        && b.get(4) == Some(&b'-')
        && digits(5..7)
        && b.get(7) == Some(&b'-')
        && digits(8..10))
    {
        return Err("expected an instant like 2024-01-31T12:00:00Z or a date like 2024-01-31");
    }
    let num = |r: std::ops::Range<usize>| v[r].parse::<u32>().unwrap_or(0);
    let (month, day) = (num(5..7), num(8..10));
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return Err("month or day out of range");
    }
    if b.len() == 10 {
        return Ok(format!("{v}T00:00:00Z"));
    }
    if !(b.get(10) == Some(&b'T')
        && digits(11..13)
        && b.get(13) == Some(&b':')
        && digits(14..16)
        && b.get(16) == Some(&b':')
        && digits(17..19))
    {
        return Err("expected an instant like 2024-01-31T12:00:00Z");
    }
    if num(11..13) > 23 || num(14..16) > 59 || num(17..19) > 60 {
        return Err("time of day out of range");
    }
    let mut i = 19;
    if b.get(i) == Some(&b'.') {
        let start = i + 1;
        i = start;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start || i - start > 9 {
            return Err("the fraction of a second needs 1 to 9 digits");
        }
    }
    let zone = &v[i..];
    let zb = zone.as_bytes();
    let fixed = match zb.first() {
        Some(b'Z') if zb.len() == 1 => return Ok(v.to_string()),
        Some(b'+' | b'-' | b' ') if zb.len() == 6 && zb[3] == b':' => {
            let ok = zb[1..3].iter().chain(&zb[4..6]).all(u8::is_ascii_digit);
            if !ok {
                return Err("the time zone offset must look like +hh:mm");
            }
            zone.replacen(' ', "+", 1)
        }
        None => return Err("the instant needs a time zone (Z or +hh:mm)"),
        _ => return Err("the time zone offset must be Z or look like +hh:mm"),
    };
    Ok(format!("{}{fixed}", &v[..i]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_decodes() {
        let mut p = Params::parse("a=1&b=x%20y&c&d=%2B+z").unwrap();
        assert_eq!(p.take("a").unwrap().as_deref(), Some("1"));
        assert_eq!(p.take("b").unwrap().as_deref(), Some("x y"));
        assert_eq!(p.take("c").unwrap().as_deref(), Some(""));
        assert_eq!(p.take("d").unwrap().as_deref(), Some("+ z"));
        assert_eq!(p.take("zz").unwrap(), None);
        p.finish().unwrap();
    }

    #[test]
    fn unknown_and_repeated_parameters_fail() {
        let p = Params::parse("_snce=2020-01-01").unwrap();
        let e = p.finish().unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.diagnostics.contains("_snce"));
        let mut p = Params::parse("_count=1&_count=2").unwrap();
        assert!(p
            .take("_count")
            .unwrap_err()
            .diagnostics
            .contains("more than once"));
    }

    #[test]
    fn typed_values() {
        let mut p =
            Params::parse("n=12&m=-1&t=true&f=false&x=yes&big=99999999999999999999999").unwrap();
        assert_eq!(p.take_u64("n").unwrap(), Some(12));
        assert!(p.take_u64("m").is_err());
        assert_eq!(p.take_bool("t").unwrap(), Some(true));
        assert_eq!(p.take_bool("f").unwrap(), Some(false));
        assert!(p.take_bool("x").is_err());
        assert!(p
            .take_u64("big")
            .unwrap_err()
            .diagnostics
            .contains("too large"));
    }

    #[test]
    fn instants() {
        assert_eq!(instant("2024-01-31").unwrap(), "2024-01-31T00:00:00Z");
        assert_eq!(
            instant("2024-01-31T12:00:00Z").unwrap(),
            "2024-01-31T12:00:00Z"
        );
        assert_eq!(
            instant("2024-01-31T12:00:00.123456Z").unwrap(),
            "2024-01-31T12:00:00.123456Z"
        );
        assert_eq!(
            instant("2024-01-31T12:00:00+02:00").unwrap(),
            "2024-01-31T12:00:00+02:00"
        );
        assert_eq!(
            instant("2024-01-31T12:00:00 02:00").unwrap(),
            "2024-01-31T12:00:00+02:00"
        );
        assert_eq!(
            instant("2024-01-31T12:00:00-05:30").unwrap(),
            "2024-01-31T12:00:00-05:30"
        );
        for bad in [
            "yesterday",
            "2024-13-01",
            "2024-01-32",
            "2024-01-31T12:00:00",
            "2024-01-31T25:00:00Z",
            "2024-01-31T12:00Z",
            "2024-01-31T12:00:00.Z",
            "2024-01-31T12:00:00+0200",
            "2024-01-31T12:00:00Zjunk",
            "",
        ] {
            assert!(instant(bad).is_err(), "{bad} should be refused");
        }
    }
}
