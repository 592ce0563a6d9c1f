//! The catalog of plugins, agents and skills offered to clients. This build counts what exists on
//! disk (for `GetServerInfo`); listing, loading and executing arrive with the catalog capability.

use std::path::Path;

/// Counts of what the catalog folders hold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CatalogCounts {
    /// Executable files in the plugins folder.
    pub plugins: i32,
    /// `*.md` files in the agents folder.
    pub agents: i32,
    /// `<name>.md` files and `<name>/SKILL.md` folders in the skills folder.
    pub skills: i32,
}

/// Counts the catalog folders; missing folders count as empty.
pub fn count(plugins: &Path, agents: &Path, skills: &Path) -> CatalogCounts {
    CatalogCounts {
        plugins: count_entries(plugins, |p, m| m.is_file() && is_executable(p, m)),
        agents: count_entries(agents, |p, m| m.is_file() && has_md_ext(p)),
        skills: count_entries(skills, |p, m| {
            (m.is_file() && has_md_ext(p)) || (m.is_dir() && p.join("SKILL.md").is_file())
        }),
    }
}

fn count_entries(dir: &Path, keep: impl Fn(&Path, &std::fs::Metadata) -> bool) -> i32 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let n = entries
        .filter_map(Result::ok)
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter(|e| std::fs::metadata(e.path()).is_ok_and(|m| keep(&e.path(), &m)))
        .count();
    i32::try_from(n).unwrap_or(i32::MAX)
}

fn has_md_ext(p: &Path) -> bool {
    p.extension().is_some_and(|e| e.eq_ignore_ascii_case("md"))
}

fn is_executable(path: &Path, m: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let is_sig = path.extension().is_some_and(|e| e == "sig");
    !is_sig && m.permissions().mode() & 0o111 != 0
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn counts_what_exists() {
        let d = tempfile::tempdir().unwrap();
        let (p, a, s) = (
            d.path().join("plugins"),
            d.path().join("agents"),
            d.path().join("skills"),
        );
        assert_eq!(count(&p, &a, &s), CatalogCounts::default());
        for dir in [&p, &a, &s] {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(p.join("tool"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(p.join("tool"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(p.join("tool.sig"), "x").unwrap();
        std::fs::write(p.join("notes.txt"), "x").unwrap();
        std::fs::write(a.join("one.md"), "---\nname: one\n---\n").unwrap();
        std::fs::write(a.join("two.MD"), "x").unwrap();
        std::fs::write(a.join("skip.txt"), "x").unwrap();
        std::fs::write(s.join("flat.md"), "x").unwrap();
        std::fs::create_dir_all(s.join("deep")).unwrap();
        std::fs::write(s.join("deep/SKILL.md"), "x").unwrap();
        std::fs::create_dir_all(s.join("empty")).unwrap();
        assert_eq!(
            count(&p, &a, &s),
            CatalogCounts {
                plugins: 1,
                agents: 2,
                skills: 2
            }
        );
    }
}
