//! `chatcli config show`: the merged configuration as TOML, each value followed by a comment naming
//! where it came from. Secrets print as `[redacted]` because [`super::Secret`] serializes that way.

use std::fmt::Write as _;

use super::{Loaded, origin};

/// Renders the merged configuration of `loaded`.
pub fn render_show(loaded: &Loaded) -> Result<String, toml::ser::Error> {
    let value = toml::Table::try_from(&loaded.config)?;
    let mut out = String::from(
        "# chatcli merged configuration: each value is followed by its origin\n\
         # (default, file <path>, env <VARIABLE>, flag <--flag>); secrets are redacted.\n",
    );
    if let Some(f) = &loaded.file {
        let _ = writeln!(out, "# config file: {}", f.display());
    }
    render_table(&mut out, loaded, &value, "");
    Ok(out)
}

fn render_table(out: &mut String, loaded: &Loaded, table: &toml::Table, prefix: &str) {
    let path = |k: &str| match prefix {
        "" => k.to_string(),
        p => format!("{p}.{k}"),
    };
    let is_table_array = |v: &toml::Value| matches!(v, toml::Value::Array(a) if a.first().is_some_and(toml::Value::is_table));
    for (k, v) in table {
        if v.is_table() || is_table_array(v) {
            continue;
        }
        let _ = writeln!(out, "{k} = {v}  # {}", origin(&loaded.figment, &path(k)));
    }
    for (k, v) in table {
        if let toml::Value::Table(t) = v {
            let _ = writeln!(out, "\n[{}]", path(k));
            render_table(out, loaded, t, &path(k));
        }
    }
    for (k, v) in table {
        if let (true, toml::Value::Array(items)) = (is_table_array(v), v) {
            for (i, item) in items.iter().enumerate() {
                if let toml::Value::Table(t) = item {
                    let _ = writeln!(out, "\n[[{}]]", path(k));
                    render_table(out, loaded, t, &format!("{}.{i}", path(k)));
                }
            }
        }
    }
}
