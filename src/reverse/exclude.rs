//! `--exclude PATTERN` and `--exclude-from FILE`: what a reverse view
//! leaves out. Patterns follow .gitignore's rules, without negation: a
//! pattern with a `/` before its end is anchored at the top of the
//! plaintext directory, one without matches a name at any depth; a
//! trailing `/` matches directories only; `*` and `?` stop at `/`, `**`
//! crosses it; `[abc]` and `[!abc]` are classes. A directory left out takes
//! everything under it along.

use std::path::{Path, PathBuf};

use glob::{MatchOptions, Pattern};

#[derive(Debug, thiserror::Error)]
pub enum ExcludeError {
    #[error("exclude pattern {pattern:?}{origin}: {reason}")]
    Pattern {
        pattern: String,
        origin: String,
        reason: String,
    },
    #[error("exclude file {path}: {source}")]
    File { path: PathBuf, source: std::io::Error },
}

struct Rule {
    pattern: Pattern,
    /// Matched against the whole path from the top, else against the name.
    anchored: bool,
    dir_only: bool,
}

#[derive(Default)]
pub struct Excludes {
    rules: Vec<Rule>,
}

const OPTIONS: MatchOptions = MatchOptions {
    case_sensitive: true,
    require_literal_separator: true,
    require_literal_leading_dot: false,
};

impl Excludes {
    /// Patterns given on the command line, then the lines of each file
    /// (blank lines and lines starting with `#` skipped).
    pub fn new(patterns: &[String], files: &[PathBuf]) -> Result<Self, ExcludeError> {
        let mut rules = Vec::new();
        for pattern in patterns {
            rules.push(rule(pattern, "")?);
        }
        for path in files {
            let text = std::fs::read_to_string(path).map_err(|source| ExcludeError::File {
                path: path.clone(),
                source,
            })?;
            for (number, line) in text.lines().enumerate() {
                let line = line.trim_end();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                rules.push(rule(line, &format!(" ({}, line {})", path.display(), number + 1))?);
            }
        }
        Ok(Excludes { rules })
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether the entry at `relative` (from the top of the plaintext
    /// directory) is left out. Its parents are not consulted: the view
    /// never reaches an entry of a directory it left out.
    pub fn excludes(&self, relative: &Path, is_dir: bool) -> bool {
        let name = relative.file_name().map(Path::new);
        self.rules.iter().any(|rule| {
            if rule.dir_only && !is_dir {
                return false;
            }
            match (rule.anchored, name) {
                (true, _) => rule.pattern.matches_path_with(relative, OPTIONS),
                (false, Some(name)) => rule.pattern.matches_path_with(name, OPTIONS),
                (false, None) => false,
            }
        })
    }
}

fn rule(text: &str, origin: &str) -> Result<Rule, ExcludeError> {
    let refuse = |reason: &str| ExcludeError::Pattern {
        pattern: text.to_string(),
        origin: origin.to_string(),
        reason: reason.to_string(),
    };
    if text.starts_with('!') {
        return Err(refuse("negated patterns (!) are not supported"));
    }
    let (body, dir_only) = match text.strip_suffix('/') {
        Some(body) => (body, true),
        None => (text, false),
    };
    let anchored = body.contains('/');
    let body = body.strip_prefix('/').unwrap_or(body);
    if body.is_empty() {
        return Err(refuse("the pattern is empty"));
    }
    let pattern = Pattern::new(body).map_err(|e| refuse(&e.to_string()))?;
    Ok(Rule {
        pattern,
        anchored,
        dir_only,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn excludes(patterns: &[&str]) -> Excludes {
        Excludes::new(&patterns.iter().map(|p| p.to_string()).collect::<Vec<_>>(), &[]).unwrap()
    }

    #[test]
    fn patterns_follow_gitignore_rules() {
        let e = excludes(&["*.tmp", "/build", "cache/", "docs/*.pdf", "**/secret"]);
        assert!(e.excludes(Path::new("a.tmp"), false));
        assert!(e.excludes(Path::new("deep/down/a.tmp"), false), "unanchored: any depth");
        assert!(e.excludes(Path::new("build"), true));
        assert!(!e.excludes(Path::new("src/build"), true), "anchored at the top");
        assert!(e.excludes(Path::new("x/cache"), true));
        assert!(
            !e.excludes(Path::new("x/cache"), false),
            "trailing slash: directories only"
        );
        assert!(e.excludes(Path::new("docs/a.pdf"), false));
        assert!(!e.excludes(Path::new("docs/sub/a.pdf"), false), "* stops at /");
        assert!(e.excludes(Path::new("a/b/secret"), false));
        assert!(e.excludes(Path::new("secret"), false));
        assert!(!e.excludes(Path::new("a.tmpx"), false));
    }

    #[test]
    fn bad_patterns_are_named() {
        for bad in ["!keep", "/", "[z-a"] {
            let err = Excludes::new(&[bad.to_string()], &[]).err().expect(bad).to_string();
            assert!(err.contains(bad), "{err}");
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("excludes");
        std::fs::write(&file, "# comment\n\n*.o\n!x\n").unwrap();
        let err = Excludes::new(&[], std::slice::from_ref(&file))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("line 4"), "{err}");
        std::fs::write(&file, "# comment\n\n*.o\n").unwrap();
        assert!(Excludes::new(&[], &[file]).unwrap().excludes(Path::new("a/b.o"), false));
        assert!(Excludes::new(&[], &[dir.path().join("missing")]).is_err());
    }
}
