//! libpq's password file: `PGPASSFILE`, else `~/.pgpass`.
//!
//! Each line is `hostname:port:database:username:password`; `*` in any of the first four
//! fields matches anything, `\` escapes a `:` or a `\`, lines starting with `#` are
//! comments, and the first matching line wins. As libpq does, a file that the group or
//! others can access is ignored with a warning, and a connection over the default Unix
//! socket directory is looked up as host `localhost`.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// What a connection is looked up by.
#[derive(Clone, Copy, Debug)]
pub struct Lookup<'a> {
    pub host: &'a str,
    pub port: u16,
    pub database: &'a str,
    pub user: &'a str,
}

/// The password file libpq would read: `PGPASSFILE` if set, else `.pgpass` in the home
/// directory (`HOME`, else the user database's entry).
pub fn default_path() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("PGPASSFILE").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(path));
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            nix::unistd::User::from_uid(nix::unistd::geteuid())
                .ok()
                .flatten()
                .map(|u| u.dir)
        })?;
    Some(home.join(".pgpass"))
}

/// The password the file at `path` holds for `lookup`, if it is a private regular file with
/// a matching line. A missing file is no password; an unreadable or too open one is logged.
pub fn password(path: &Path, lookup: Lookup<'_>) -> Option<String> {
    let meta = fs::metadata(path).ok()?;
    if !meta.is_file() {
        return None;
    }
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(
            "password file {} has group or world access and is ignored; permissions should be \
             u=rw (0600) or less",
            path.display()
        );
        return None;
    }
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(err) => {
            tracing::warn!("cannot read password file {}: {err}", path.display());
            return None;
        }
    };
    find(&text, lookup)
}

/// The password of the first line of `text` that matches `lookup`.
fn find(text: &str, lookup: Lookup<'_>) -> Option<String> {
    let port = lookup.port.to_string();
    let wanted = [lookup.host, port.as_str(), lookup.database, lookup.user];
    text.lines()
        .map(|line| line.trim_end_matches('\r'))
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter_map(split)
        .find(|(keys, _)| {
            keys.iter().zip(wanted).all(|(key, value)| match key {
                Key::Any => true,
                Key::Exact(key) => key == value,
            })
        })
        .map(|(_, password)| password)
}

/// One of a line's first four fields.
#[derive(Debug, PartialEq, Eq)]
enum Key {
    /// A bare `*`.
    Any,
    /// Anything else, unescaped (so `\*` is a literal star).
    Exact(String),
}

/// Splits a line into its four keys and the password (the rest of the line, unescaped);
/// `None` for a line with fewer than five fields.
fn split(line: &str) -> Option<([Key; 4], String)> {
    let mut fields = vec![(String::new(), false)];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == ':' && fields.len() < 5 {
            fields.push((String::new(), false));
            continue;
        }
        let (field, escaped) = fields.last_mut().unwrap();
        if c != '\\' {
            field.push(c);
        } else if let Some(next) = chars.next() {
            field.push(next);
            *escaped = true;
        }
    }
    let (password, _) = fields.pop().filter(|_| fields.len() == 4)?;
    let keys: Vec<Key> = fields
        .into_iter()
        .map(|(text, escaped)| match (text.as_str(), escaped) {
            ("*", false) => Key::Any,
            _ => Key::Exact(text),
        })
        .collect();
    Some((keys.try_into().ok()?, password))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup<'a>(host: &'a str, port: u16, database: &'a str, user: &'a str) -> Lookup<'a> {
        Lookup {
            host,
            port,
            database,
            user,
        }
    }

    #[test]
    fn first_matching_line_wins_with_wildcards() {
        let text = "\
# comment:line:that:looks:like-one
db.example:5432:app:alice:first
*:5432:*:alice:second
*:*:*:*:catch-all
";
        assert_eq!(
            find(text, lookup("db.example", 5432, "app", "alice")).as_deref(),
            Some("first")
        );
        assert_eq!(
            find(text, lookup("other", 5432, "postgres", "alice")).as_deref(),
            Some("second")
        );
        assert_eq!(
            find(text, lookup("other", 5433, "postgres", "alice")).as_deref(),
            Some("catch-all")
        );
        assert_eq!(
            find("db:5432:app:alice:x\n", lookup("db", 5432, "app", "bob")),
            None
        );
    }

    #[test]
    fn escapes_and_colons_in_the_password() {
        let text = "host\\:with\\:colons:5432:d\\\\b:u:pa:ss\\:wo\\\\rd\r\n";
        assert_eq!(
            find(text, lookup("host:with:colons", 5432, "d\\b", "u")).as_deref(),
            Some("pa:ss:wo\\rd")
        );
        assert_eq!(split("too:few:fields:here"), None);
        let (keys, _) = split("\\*:*:db:u:p").unwrap();
        assert_eq!(
            keys[0],
            Key::Exact("*".into()),
            "an escaped star is literal"
        );
        assert_eq!(keys[1], Key::Any);
        assert_eq!(find("\\*:*:*:*:p", lookup("h", 1, "d", "u")), None);
        assert_eq!(
            split("a:b:c:d:").map(|(_, p)| p).as_deref(),
            Some(""),
            "an empty password is still a line"
        );
    }

    #[test]
    fn an_open_file_is_ignored_and_a_private_one_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pgpass");
        fs::write(&path, "*:*:*:*:secret\n").unwrap();
        let any = lookup("h", 1, "d", "u");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(password(&path, any), None);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(password(&path, any).as_deref(), Some("secret"));
        assert_eq!(password(&dir.path().join("missing"), any), None);
        assert_eq!(password(dir.path(), any), None, "a directory is not a file");
    }
}
