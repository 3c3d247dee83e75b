//! The parameter store on SSM Parameter Store (`aws-sdk-ssm`): where JIT
//! configs wait for their instance.

use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_ssm::types::{ParameterTier, ParameterType, ResourceTypeForTagging, Tag};
use aws_sdk_ssm::Client;
use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret as _, SecretString};
use spot_runners_domain::ports::{CloudError, CloudErrorKind, ParameterStore, StoredParameter};

use crate::{cloud_error, SetupError};

/// `GetParametersByPath` returns at most 10 parameters a page.
const PAGE: i32 = 10;

/// [`ParameterStore`] on SSM.
pub struct SsmParameterStore {
    client: Client,
}

impl std::fmt::Debug for SsmParameterStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SsmParameterStore").finish_non_exhaustive()
    }
}

impl SsmParameterStore {
    /// Configuration from the standard AWS sources, as for EC2.
    pub async fn from_env() -> Result<Self, SetupError> {
        let config = crate::sdk_config(Duration::from_secs(10), Duration::from_secs(30)).await?;
        Ok(Self::new(Client::new(&config)))
    }

    pub fn new(client: Client) -> Self {
        Self { client }
    }
}

fn tags(pairs: &[(&str, String)]) -> Result<Vec<Tag>, CloudError> {
    pairs
        .iter()
        .map(|(key, value)| {
            Tag::builder()
                .key(*key)
                .value(value)
                .build()
                .map_err(|e| CloudError::new(CloudErrorKind::Invalid, "InvalidTag", e.to_string()))
        })
        .collect()
}

/// SSM names its 5xx differently from EC2; everything else is classified
/// like EC2's codes.
fn ssm_error(err: CloudError) -> CloudError {
    match err.code.as_str() {
        "InternalServerError" => CloudError::new(CloudErrorKind::Transient, err.code, err.message),
        "TooManyUpdates" => CloudError::new(CloudErrorKind::Throttled, err.code, err.message),
        _ => err,
    }
}

#[async_trait]
impl ParameterStore for SsmParameterStore {
    async fn create_secure(&self, name: &str, value: &SecretString) -> Result<(), CloudError> {
        self.client
            .put_parameter()
            .name(name)
            .value(value.expose_secret())
            .r#type(ParameterType::SecureString)
            .overwrite(false)
            // A JIT config is about 3–4 KB; Standard holds up to 4 KB, and
            // Intelligent-Tiering moves a longer one to Advanced instead of
            // failing. It lives for minutes, so Advanced costs next to nothing.
            .tier(ParameterTier::IntelligentTiering)
            .description("spot-runners JIT config; read and deleted by its instance")
            .send()
            .await
            .map(|_| ())
            .map_err(|e| ssm_error(cloud_error(&e)))
    }

    async fn tag(&self, name: &str, pairs: &[(&str, String)]) -> Result<(), CloudError> {
        self.client
            .add_tags_to_resource()
            .resource_type(ResourceTypeForTagging::Parameter)
            .resource_id(name)
            .set_tags(Some(tags(pairs)?))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| ssm_error(cloud_error(&e)))
    }

    async fn delete(&self, name: &str) -> Result<(), CloudError> {
        match self.client.delete_parameter().name(name).send().await {
            Ok(_) => Ok(()),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_parameter_not_found()) =>
            {
                Ok(())
            }
            Err(e) => Err(ssm_error(cloud_error(&e))),
        }
    }

    async fn list(&self, path: &str) -> Result<Vec<StoredParameter>, CloudError> {
        let mut pages = self
            .client
            .get_parameters_by_path()
            .path(path)
            .recursive(true)
            // Names and dates are all the sweep needs; the service never
            // reads a JIT config back.
            .with_decryption(false)
            .into_paginator()
            .page_size(PAGE)
            .send();
        let mut found = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| ssm_error(cloud_error(&e)))?;
            for parameter in page.parameters() {
                let Some(name) = parameter.name().filter(|n| !n.is_empty()) else {
                    continue;
                };
                found.push(StoredParameter {
                    name: name.to_owned(),
                    modified_at: parameter
                        .last_modified_date()
                        .and_then(|t| DateTime::<Utc>::from_timestamp(t.secs(), t.subsec_nanos())),
                });
            }
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spot_runners_domain::ports::PARAMETER_ALREADY_EXISTS;

    #[test]
    fn ssm_codes_classify_like_ec2_ones() {
        let classify = |code: &str| ssm_error(CloudError::from_code(code, "")).kind;
        assert_eq!(classify("InternalServerError"), CloudErrorKind::Transient);
        assert_eq!(classify("TooManyUpdates"), CloudErrorKind::Throttled);
        assert_eq!(classify("ThrottlingException"), CloudErrorKind::Throttled);
        assert_eq!(classify(PARAMETER_ALREADY_EXISTS), CloudErrorKind::Invalid);
        assert_eq!(classify("AccessDeniedException"), CloudErrorKind::Invalid);
    }
}
