//! Text for a person or a shell: what comes from the backing directory is
//! shown escaped, paths in commands to copy are quoted.

/// Text from the backing directory, fit for a terminal: control characters
/// (escape sequences, fake line breaks) are shown escaped, never sent.
pub fn printable(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

/// `path` as one word for a POSIX shell, for a command to copy.
pub fn shell_quoted(path: &std::path::Path) -> String {
    let text = path.display().to_string();
    if !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+,:@".contains(&b))
    {
        return text;
    }
    format!("'{}'", printable(&text).replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_in_commands_to_copy_are_one_shell_word() {
        assert_eq!(shell_quoted(std::path::Path::new("/srv/backup.enc")), "/srv/backup.enc");
        assert_eq!(
            shell_quoted(std::path::Path::new("/home/a/My Vault.enc")),
            "'/home/a/My Vault.enc'"
        );
        assert_eq!(shell_quoted(std::path::Path::new("/tmp/it's")), r"'/tmp/it'\''s'");
        assert_eq!(shell_quoted(std::path::Path::new("/tmp/a\nb")), r"'/tmp/a\nb'");
    }
}
