//! Settings that carry credentials: what they print never includes the secret.

use std::fmt;

/// A URL that may hold a password (`rediss://:PASSWORD@host:6380/0`). `Display` and `Debug`
/// show it with the password (and a user name beside it) replaced by `***`, so it can be
/// logged, put in an error or printed by `--help`; [`SecretUrl::expose`] gives the URL itself
/// to the one place that connects with it.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The URL with its credentials, for connecting only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with any credentials replaced by `***`.
    pub fn redacted(&self) -> String {
        redact_url(&self.0)
    }
}

impl From<String> for SecretUrl {
    fn from(url: String) -> Self {
        Self(url)
    }
}

impl From<&str> for SecretUrl {
    fn from(url: &str) -> Self {
        Self(url.to_string())
    }
}

impl std::str::FromStr for SecretUrl {
    type Err = std::convert::Infallible;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        Ok(Self::new(value))
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

/// `url` with the user information of its authority (`user:password@`) replaced by `***@`.
/// Works on text that is not a valid URL too: everything between `scheme://` and the last `@`
/// before the path is hidden.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        // No authority to find: hide everything after an `@`, if any.
        return match url.rfind('@') {
            Some(at) => format!("***{}", &url[at..]),
            None => url.to_string(),
        };
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://***{}", &rest[at..]),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_never_print() {
        for (url, shown) in [
            ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
            (
                "rediss://:hunter2@redis.example:6380/0",
                "rediss://***@redis.example:6380/0",
            ),
            ("redis://admin:hunter2@h/1", "redis://***@h/1"),
            ("redis://a:b@c:hunter2@h:1/0?x=@", "redis://***@h:1/0?x=@"),
            ("not a url :hunter2@h", "***@h"),
        ] {
            let secret: SecretUrl = url.parse().unwrap();
            assert_eq!(secret.to_string(), shown);
            assert_eq!(format!("{secret:?}"), format!("{shown:?}"));
            assert!(!format!("{:?}", Some(secret.clone())).contains("hunter2"));
            assert_eq!(secret.expose(), url);
        }
    }
}
