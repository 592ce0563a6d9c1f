//! `chatcli config show`: the merged configuration as TOML, each value followed by a comment naming
//! where it came from. Secrets print as `[redacted]` because [`super::Secret`] serializes that way.

use std::fmt::Write as _;

use super::{Loaded, origin_of_path};

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
    render_table(&mut out, loaded, &value, "", &[]);
    Ok(out)
}

/// Writes `table`'s values, then its sub-tables, then its arrays of tables. `header` is the TOML
/// name of the table (`llm.providers` for every element of that array), `path` the key's parts with
/// array indices (`llm`, `providers`, `0`) that [`origin_of_path`] needs.
fn render_table(
    out: &mut String,
    loaded: &Loaded,
    table: &toml::Table,
    header: &str,
    path: &[&str],
) {
    let header_of = |k: &str| match header {
        "" => quote_key(k),
        h => format!("{h}.{}", quote_key(k)),
    };
    let path_of = |k| [path, &[k]].concat();
    let is_table_array = |v: &toml::Value| matches!(v, toml::Value::Array(a) if a.first().is_some_and(toml::Value::is_table));
    for (k, v) in table {
        if v.is_table() || is_table_array(v) {
            continue;
        }
        let from = origin_of_path(&loaded.figment, &path_of(k.as_str()));
        let _ = writeln!(out, "{} = {v}  # {from}", quote_key(k));
    }
    for (k, v) in table {
        if let toml::Value::Table(t) = v {
            let _ = writeln!(out, "\n[{}]", header_of(k));
            render_table(out, loaded, t, &header_of(k), &path_of(k.as_str()));
        }
    }
    for (k, v) in table {
        if let (true, toml::Value::Array(items)) = (is_table_array(v), v) {
            for (i, item) in items.iter().enumerate() {
                if let toml::Value::Table(t) = item {
                    let index = i.to_string();
                    let _ = writeln!(out, "\n[[{}]]", header_of(k));
                    let item_path = [path, &[k.as_str(), index.as_str()]].concat();
                    render_table(out, loaded, t, &header_of(k), &item_path);
                }
            }
        }
    }
}

/// A key as TOML writes it: bare when it can be, quoted otherwise (header names such as
/// `HTTP-Referer` are bare, `x.y` or `a b` are not).
fn quote_key(k: &str) -> String {
    let bare = !k.is_empty()
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    match bare {
        true => k.to_string(),
        false => toml::Value::String(k.to_string()).to_string(),
    }
}
