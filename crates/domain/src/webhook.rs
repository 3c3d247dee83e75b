//! GitHub webhook signatures (`X-Hub-Signature-256`).

use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;

/// One or more webhook secrets. Several are accepted at once so a secret can
/// be rotated without dropping deliveries signed with the old one.
#[derive(Clone)]
pub struct WebhookSecrets(Vec<SecretString>);

impl std::fmt::Debug for WebhookSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WebhookSecrets([{} redacted])", self.0.len())
    }
}

impl WebhookSecrets {
    /// Parses the comma-separated form of `SPOT_RUNNERS_WEBHOOK_SECRET`.
    /// Blank entries are dropped; `None` when nothing is left.
    pub fn from_list(list: &str) -> Option<Self> {
        let secrets: Vec<SecretString> = list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| SecretString::from(s.to_owned()))
            .collect();
        (!secrets.is_empty()).then_some(Self(secrets))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `sha256=<hex>` for `body` under the first (current) secret.
    pub fn sign(&self, body: &[u8]) -> String {
        sign(self.0[0].expose_secret().as_bytes(), body)
    }

    /// Checks a `X-Hub-Signature-256` header value against every secret, in
    /// constant time per comparison.
    pub fn verify(&self, header: Option<&str>, body: &[u8]) -> bool {
        header
            .and_then(Signature::parse)
            .is_some_and(|sig| self.verify_signature(&sig, body))
    }

    /// Checks an already parsed signature against every secret.
    pub fn verify_signature(&self, signature: &Signature, body: &[u8]) -> bool {
        self.0.iter().any(|secret| {
            let mut mac = mac(secret.expose_secret().as_bytes());
            mac.update(body);
            mac.verify_slice(&signature.0).is_ok()
        })
    }
}

/// A well-formed `X-Hub-Signature-256` value (`sha256=` and 64 hex digits),
/// not yet checked: a request without one can be refused before its body is
/// read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signature([u8; 32]);

impl Signature {
    pub fn parse(header: &str) -> Option<Self> {
        let digits = header.trim().strip_prefix("sha256=")?;
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(digits, &mut bytes).ok()?;
        Some(Self(bytes))
    }
}

fn mac(secret: &[u8]) -> Hmac<Sha256> {
    // HMAC takes keys of any length; this cannot fail.
    #[allow(clippy::expect_used)]
    Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts any key length")
}

/// `sha256=<hex>` of `body` under `secret`, as GitHub computes it.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut m = mac(secret);
    m.update(body);
    format!("sha256={}", hex::encode(m.finalize().into_bytes()))
}

/// The headers GitHub sends with a delivery whose signature is `signature`:
/// for whatever plays GitHub (the simulator, load generators, tests).
/// Names are lowercase, as HTTP/2 and `HeaderName::from_static` want them.
pub fn delivery_headers(
    event: &str,
    delivery_id: &str,
    signature: String,
) -> [(&'static str, String); 5] {
    [
        ("x-github-event", event.to_owned()),
        ("x-github-delivery", delivery_id.to_owned()),
        ("x-hub-signature-256", signature),
        ("content-type", "application/json".to_owned()),
        ("user-agent", "GitHub-Hookshot/spot-runners".to_owned()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GitHub's published example ("Validating webhook deliveries").
    const VECTOR: &str = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";

    #[test]
    fn github_published_vector() {
        assert_eq!(
            sign(b"It's a Secret to Everybody", b"Hello, World!"),
            VECTOR
        );
        let secrets = WebhookSecrets::from_list("It's a Secret to Everybody").unwrap();
        assert!(secrets.verify(Some(VECTOR), b"Hello, World!"));
        assert!(!secrets.verify(Some(VECTOR), b"Hello, World?"));
    }

    #[test]
    fn rotation_accepts_either_secret() {
        let secrets = WebhookSecrets::from_list("new, It's a Secret to Everybody").unwrap();
        assert_eq!(secrets.len(), 2);
        assert!(secrets.verify(Some(VECTOR), b"Hello, World!"));
        assert!(secrets.verify(Some(&sign(b"new", b"x")), b"x"));
        assert!(!secrets.verify(Some(&sign(b"old", b"x")), b"x"));
    }

    #[test]
    fn rejects_missing_or_garbled_headers() {
        let secrets = WebhookSecrets::from_list("s").unwrap();
        let good = sign(b"s", b"x");
        assert!(!secrets.verify(None, b"x"));
        assert!(!secrets.verify(Some(""), b"x"));
        assert!(!secrets.verify(Some(good.trim_start_matches("sha256=")), b"x"));
        assert!(!secrets.verify(Some("sha256=zz"), b"x"));
        assert!(!secrets.verify(Some("sha1=abcd"), b"x"));
        assert!(!secrets.verify(Some(&good[..good.len() - 2]), b"x"));
    }

    #[test]
    fn only_well_formed_signatures_parse() {
        let good = sign(b"s", b"x");
        assert!(Signature::parse(&good).is_some());
        assert!(Signature::parse(&format!(" {good} ")).is_some());
        for bad in [
            "",
            "sha256=",
            "sha1=abcd",
            &good[..good.len() - 2],
            &format!("{good}00"),
            "sha256=zz",
        ] {
            assert_eq!(Signature::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn blank_lists_are_no_secret() {
        assert!(WebhookSecrets::from_list("").is_none());
        assert!(WebhookSecrets::from_list(" , ").is_none());
    }

    #[test]
    fn debug_never_shows_secrets() {
        let secrets = WebhookSecrets::from_list("hunter2").unwrap();
        assert!(!format!("{secrets:?}").contains("hunter2"));
    }
}
