//! The few parts of a Spin manifest (v2) the host needs: application variables, one component's
//! variables / allowed_outbound_hosts / environment, and its HTTP route.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{bail, Context, Result};

/// An application-level `[variables]` entry.
#[derive(Debug, Clone, Default)]
pub struct AppVariable {
    pub default: Option<String>,
    pub required: bool,
    /// Parsed for completeness; this host never prints variable values at all.
    #[allow(dead_code)]
    pub secret: bool,
}

/// What the host needs to know about the component it serves.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub component_id: String,
    pub app_variables: BTreeMap<String, AppVariable>,
    /// Component variable name -> template over application variables.
    pub component_variables: BTreeMap<String, String>,
    /// Templates, expanded later against the application variables.
    pub allowed_outbound_hosts: Vec<String>,
    pub environment: HashMap<String, String>,
    /// The HTTP trigger route (`/...` when the manifest names none for this component).
    pub route: String,
}

impl Manifest {
    pub fn load(path: &Path, component: Option<&str>) -> Result<Manifest> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading manifest {}", path.display()))?;
        Self::parse(&text, component).with_context(|| format!("in manifest {}", path.display()))
    }

    pub fn parse(text: &str, component: Option<&str>) -> Result<Manifest> {
        let doc: toml::Table = toml::from_str(text).context("parsing TOML")?;
        match doc.get("spin_manifest_version") {
            Some(toml::Value::Integer(2)) => {}
            other => bail!("only spin_manifest_version = 2 is supported (found {other:?})"),
        }

        let mut app_variables = BTreeMap::new();
        if let Some(vars) = doc.get("variables") {
            let vars = vars.as_table().context("[variables] must be a table")?;
            for (name, def) in vars {
                let def = def
                    .as_table()
                    .with_context(|| format!("variable {name:?} must be a table"))?;
                let default = match def.get("default") {
                    None => None,
                    Some(toml::Value::String(s)) => Some(s.clone()),
                    Some(v) => bail!("variable {name:?}: default must be a string, got {v}"),
                };
                let flag = |key: &str| def.get(key).and_then(|v| v.as_bool()).unwrap_or(false);
                let (required, secret) = (flag("required"), flag("secret"));
                if required && default.is_some() {
                    // Spin rejects this combination when loading the manifest.
                    bail!("variable {name:?} may not be both required and have a default");
                }
                app_variables.insert(
                    name.clone(),
                    AppVariable {
                        default,
                        required,
                        secret,
                    },
                );
            }
        }

        let components = doc
            .get("component")
            .and_then(|c| c.as_table())
            .context("manifest has no [component.<id>] table")?;
        let (component_id, comp) = match component {
            Some(id) => (
                id.to_string(),
                components
                    .get(id)
                    .with_context(|| format!("no component {id:?} in the manifest"))?,
            ),
            None => {
                let (id, comp) = components
                    .iter()
                    .next()
                    .context("manifest defines no component")?;
                (id.clone(), comp)
            }
        };
        let comp = comp.as_table().context("component must be a table")?;

        let string_map = |key: &str| -> Result<BTreeMap<String, String>> {
            let mut out = BTreeMap::new();
            if let Some(t) = comp.get(key) {
                for (k, v) in t
                    .as_table()
                    .with_context(|| format!("{key} must be a table"))?
                {
                    let v = v
                        .as_str()
                        .with_context(|| format!("{key}.{k} must be a string"))?;
                    out.insert(k.clone(), v.to_string());
                }
            }
            Ok(out)
        };
        let component_variables = string_map("variables")?;
        let environment = string_map("environment")?.into_iter().collect();

        let allowed_outbound_hosts = match comp.get("allowed_outbound_hosts") {
            None => Vec::new(),
            Some(v) => v
                .as_array()
                .context("allowed_outbound_hosts must be an array")?
                .iter()
                .map(|h| {
                    h.as_str()
                        .map(str::to_string)
                        .context("allowed_outbound_hosts entries must be strings")
                })
                .collect::<Result<_>>()?,
        };

        let route = doc
            .get("trigger")
            .and_then(|t| t.get("http"))
            .and_then(|h| h.as_array())
            .and_then(|triggers| {
                triggers.iter().find(|t| {
                    t.get("component").and_then(|c| c.as_str()) == Some(component_id.as_str())
                })
            })
            .and_then(|t| t.get("route"))
            .and_then(|r| r.as_str())
            .unwrap_or("/...")
            .to_string();

        Ok(Manifest {
            component_id,
            app_variables,
            component_variables,
            allowed_outbound_hosts,
            environment,
            route,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_variables_hosts_and_route() {
        let m = Manifest::parse(
            r#"
            spin_manifest_version = 2
            [application]
            name = "x"
            [variables]
            db_url = { required = true, secret = true }
            db_host = { default = "127.0.0.1:5432" }
            [[trigger.http]]
            route = "/api/..."
            component = "bulk"
            [component.bulk]
            source = "x.wasm"
            allowed_outbound_hosts = ["postgres://{{ db_host }}"]
            [component.bulk.variables]
            db_url = "{{ db_url }}"
            "#,
            None,
        )
        .unwrap();
        assert_eq!(m.component_id, "bulk");
        assert!(m.app_variables["db_url"].required);
        assert!(m.app_variables["db_url"].secret);
        assert_eq!(
            m.app_variables["db_host"].default.as_deref(),
            Some("127.0.0.1:5432")
        );
        assert_eq!(m.allowed_outbound_hosts, vec!["postgres://{{ db_host }}"]);
        assert_eq!(m.component_variables["db_url"], "{{ db_url }}");
        assert_eq!(m.route, "/api/...");
    }
}
