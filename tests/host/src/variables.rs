//! Application variables and `fermyon:spin/variables@2.0.0`.
//!
//! Resolved once at start, like `spin up`: a required variable without a value, or a template
//! naming an undeclared variable, makes the host refuse to start.

use std::collections::{BTreeMap, HashMap};

use anyhow::{bail, Context, Result};

use crate::manifest::Manifest;

/// The component's variables, already expanded.
#[derive(Debug, Clone, Default)]
pub struct ComponentVariables {
    values: BTreeMap<String, String>,
}

/// Values of the application variables: the provided ones (HostConfig / SPIN_VARIABLE_*) over the
/// manifest defaults.
pub fn resolve_app_variables(
    manifest: &Manifest,
    provided: &HashMap<String, String>,
) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for (name, def) in &manifest.app_variables {
        match provided.get(name).or(def.default.as_ref()) {
            Some(v) => {
                out.insert(name.clone(), v.clone());
            }
            None if def.required => bail!(
                "required application variable {name:?} has no value \
                 (set SPIN_VARIABLE_{} or HostConfig.variables)",
                name.to_uppercase()
            ),
            // Neither required nor defaulted: Spin treats this as a manifest error too, but only
            // when something uses it; `expand` reports it then.
            None => {}
        }
    }
    Ok(out)
}

/// Expand `{{ name }}` references against the application variables.
pub fn expand(template: &str, app: &BTreeMap<String, String>) -> Result<String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .with_context(|| format!("unterminated '{{{{' in template {template:?}"))?;
        let name = after[..end].trim();
        let value = app.get(name).with_context(|| {
            format!("template {template:?} refers to undefined or unset variable {name:?}")
        })?;
        out.push_str(value);
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

impl ComponentVariables {
    pub fn resolve(manifest: &Manifest, app: &BTreeMap<String, String>) -> Result<Self> {
        let mut values = BTreeMap::new();
        for (name, template) in &manifest.component_variables {
            let v =
                expand(template, app).with_context(|| format!("component variable {name:?}"))?;
            values.insert(name.clone(), v);
        }
        Ok(ComponentVariables { values })
    }

    /// What `variables.get` returns, with Spin's error cases.
    pub fn get(&self, name: &str) -> Result<String, VarError> {
        if !valid_name(name) {
            return Err(VarError::InvalidName(format!(
                "invalid variable name {name:?}: must be lower-case letters, digits and '_', \
                 starting with a letter"
            )));
        }
        self.values
            .get(name)
            .cloned()
            .ok_or_else(|| VarError::Undefined(format!("no variable for {name:?}")))
    }
}

/// Spin's rule for variable keys.
fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !name.ends_with('_')
        && !name.contains("__")
}

pub enum VarError {
    InvalidName(String),
    Undefined(String),
}

/// `SPIN_VARIABLE_DB_URL=x` in the environment means `db_url = "x"`, as with `spin up`.
pub fn from_env() -> HashMap<String, String> {
    std::env::vars()
        .filter_map(|(k, v)| {
            k.strip_prefix("SPIN_VARIABLE_")
                .map(|name| (name.to_lowercase(), v))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_templates() {
        let app: BTreeMap<_, _> = [("db_host".to_string(), "127.0.0.1:5432".to_string())].into();
        assert_eq!(
            expand("postgres://{{ db_host }}", &app).unwrap(),
            "postgres://127.0.0.1:5432"
        );
        assert_eq!(expand("{{db_host}}", &app).unwrap(), "127.0.0.1:5432");
        assert!(expand("{{ nope }}", &app).is_err());
    }

    #[test]
    fn names() {
        assert!(valid_name("db_url"));
        assert!(!valid_name("DB_URL"));
        assert!(!valid_name("1a"));
        assert!(!valid_name("a__b"));
    }
}
