//! AWS credentials and region, found the way AWS tools find them:
//! environment variables, then the shared credentials/config files (with
//! profiles), then EC2 instance metadata (IMDSv2).

use std::collections::HashMap;
use std::path::PathBuf;

use zeroize::Zeroizing;

use super::KmsError;

const PROVIDER: &str = "aws-kms";

pub struct AwsCredentials {
    pub access_key_id: String,
    pub secret_access_key: Zeroizing<String>,
    pub session_token: Option<Zeroizing<String>>,
    /// Where they came from, for error messages (never the values).
    pub source: String,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn home_file(var: &str, default: &str) -> Option<PathBuf> {
    env(var)
        .map(PathBuf::from)
        .or_else(|| env("HOME").map(|h| PathBuf::from(h).join(default)))
}

/// Sections of an INI file: section name -> key -> value.
fn parse_ini(text: &str) -> HashMap<String, HashMap<String, String>> {
    let mut out: HashMap<String, HashMap<String, String>> = HashMap::new();
    let mut section = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.trim().to_string();
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            out.entry(section.clone())
                .or_default()
                .insert(k.trim().to_string(), v.trim().to_string());
        }
    }
    out
}

fn read_ini(path: Option<PathBuf>) -> HashMap<String, HashMap<String, String>> {
    path.and_then(|p| std::fs::read_to_string(p).ok())
        .map(|t| parse_ini(&t))
        .unwrap_or_default()
}

pub fn profile_name(explicit: Option<&str>) -> String {
    explicit
        .map(str::to_string)
        .or_else(|| env("AWS_PROFILE"))
        .unwrap_or_else(|| "default".to_string())
}

/// The profile's section of the config file (`[default]` or `[profile NAME]`).
fn config_section(profile: &str) -> HashMap<String, String> {
    let config = read_ini(home_file("AWS_CONFIG_FILE", ".aws/config"));
    let name = if profile == "default" {
        "default".to_string()
    } else {
        format!("profile {profile}")
    };
    config.get(&name).cloned().unwrap_or_default()
}

fn from_section(section: &HashMap<String, String>, source: String) -> Option<AwsCredentials> {
    Some(AwsCredentials {
        access_key_id: section.get("aws_access_key_id")?.clone(),
        secret_access_key: Zeroizing::new(section.get("aws_secret_access_key")?.clone()),
        session_token: section.get("aws_session_token").map(|t| Zeroizing::new(t.clone())),
        source,
    })
}

fn imds_endpoint() -> Option<String> {
    if env("AWS_EC2_METADATA_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return None;
    }
    Some(env("AWS_EC2_METADATA_SERVICE_ENDPOINT").unwrap_or_else(|| "http://169.254.169.254".to_string()))
}

/// An IMDSv2 session: a token from PUT, then GETs carrying it.
fn imds_get(path: &str) -> Result<String, String> {
    let base = imds_endpoint().ok_or("instance metadata disabled")?;
    let base = base.trim_end_matches('/');
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(std::time::Duration::from_secs(2)))
        .build()
        .new_agent();
    let mut token_resp = agent
        .put(&format!("{base}/latest/api/token"))
        .header("X-aws-ec2-metadata-token-ttl-seconds", "300")
        .send_empty()
        .map_err(|e| e.to_string())?;
    if !token_resp.status().is_success() {
        return Err(format!("IMDSv2 token request answered {}", token_resp.status()));
    }
    let token = Zeroizing::new(token_resp.body_mut().read_to_string().map_err(|e| e.to_string())?);
    let mut resp = agent
        .get(&format!("{base}{path}"))
        .header("X-aws-ec2-metadata-token", token.as_str())
        .call()
        .map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("instance metadata {path} answered {}", resp.status()));
    }
    resp.body_mut().read_to_string().map_err(|e| e.to_string())
}

fn from_imds() -> Result<AwsCredentials, String> {
    let roles = imds_get("/latest/meta-data/iam/security-credentials/")?;
    let role = roles
        .lines()
        .next()
        .filter(|r| !r.is_empty())
        .ok_or("no IAM role attached to the instance")?;
    let doc = Zeroizing::new(imds_get(&format!("/latest/meta-data/iam/security-credentials/{role}"))?);
    let v: serde_json::Value = serde_json::from_str(&doc).map_err(|e| format!("bad credentials document: {e}"))?;
    let field = |k: &str| {
        v[k].as_str()
            .map(str::to_string)
            .ok_or(format!("credentials document lacks {k}"))
    };
    Ok(AwsCredentials {
        access_key_id: field("AccessKeyId")?,
        secret_access_key: Zeroizing::new(field("SecretAccessKey")?),
        session_token: Some(Zeroizing::new(field("Token")?)),
        source: format!("instance metadata (role {role})"),
    })
}

pub fn credentials(profile: Option<&str>) -> Result<AwsCredentials, KmsError> {
    if let (Some(id), Some(secret)) = (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
        return Ok(AwsCredentials {
            access_key_id: id,
            secret_access_key: Zeroizing::new(secret),
            session_token: env("AWS_SESSION_TOKEN").map(Zeroizing::new),
            source: "environment".into(),
        });
    }
    let profile = profile_name(profile);
    let shared = read_ini(home_file("AWS_SHARED_CREDENTIALS_FILE", ".aws/credentials"));
    if let Some(c) = shared
        .get(&profile)
        .and_then(|s| from_section(s, format!("shared credentials file, profile {profile}")))
    {
        return Ok(c);
    }
    if let Some(c) = from_section(&config_section(&profile), format!("config file, profile {profile}")) {
        return Ok(c);
    }
    from_imds().map_err(|cause| KmsError::Config {
        provider: PROVIDER.into(),
        message: format!(
            "no AWS credentials: none in the environment, none for profile {profile} in the shared files, \
             and instance metadata failed ({cause})"
        ),
    })
}

pub fn region(explicit: Option<&str>, profile: Option<&str>) -> Result<String, KmsError> {
    if let Some(r) = explicit
        .map(str::to_string)
        .or_else(|| env("AWS_REGION"))
        .or_else(|| env("AWS_DEFAULT_REGION"))
    {
        return Ok(r);
    }
    if let Some(r) = config_section(&profile_name(profile)).get("region") {
        return Ok(r.clone());
    }
    imds_get("/latest/meta-data/placement/region").map_err(|cause| KmsError::Config {
        provider: PROVIDER.into(),
        message: format!("no AWS region: set AWS_REGION, region= in the URI, or the profile's region ({cause})"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ini_sections_and_profiles() {
        let ini = parse_ini(
            "[default]\naws_access_key_id = AK\naws_secret_access_key=SK\n\n# c\n[profile dev]\nregion = eu-west-3\n",
        );
        let c = from_section(&ini["default"], "t".into()).unwrap();
        assert_eq!((c.access_key_id.as_str(), c.secret_access_key.as_str()), ("AK", "SK"));
        assert_eq!(ini["profile dev"]["region"], "eu-west-3");
        assert!(from_section(&ini["profile dev"], "t".into()).is_none());
    }
}
