//! A fake SSM Parameter Store with the semantics the service relies on:
//! SecureStrings that are never overwritten (`ParameterAlreadyExists`),
//! tags, deletes that succeed for what is already gone, listings by path —
//! and the instance side, which may read a parameter only once it is
//! granted to that instance (the IAM condition on `spot-runners:instance-arn`).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use chrono::Utc;
use secrecy::{ExposeSecret as _, SecretString};
use spot_runners_domain::parameters::TAG_INSTANCE_ARN;
use spot_runners_domain::ports::{
    CloudError, CloudErrorKind, ParameterStore, StoredParameter, PARAMETER_ALREADY_EXISTS,
};

struct Parameter {
    value: SecretString,
    tags: BTreeMap<String, String>,
    modified_at: chrono::DateTime<Utc>,
}

#[derive(Default)]
struct State {
    parameters: BTreeMap<String, Parameter>,
    fail_next: VecDeque<String>,
    fail_tag: VecDeque<String>,
    creates: u64,
    deletes: u64,
}

/// A cheaply cloneable handle; clones share one store.
#[derive(Clone, Default)]
pub struct FakeParameterStore {
    state: Arc<Mutex<State>>,
}

impl FakeParameterStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        crate::lock(&self.state)
    }

    /// The next call (of any kind) fails with this SSM error code.
    pub fn fail_next(&self, code: &str) {
        self.lock().fail_next.push_back(code.to_owned());
    }

    /// The next `tag` fails with this SSM error code.
    pub fn fail_next_tag(&self, code: &str) {
        self.lock().fail_tag.push_back(code.to_owned());
    }

    fn injected(&self) -> Result<(), CloudError> {
        match self.lock().fail_next.pop_front() {
            Some(code) => Err(CloudError::from_code(
                &code,
                "injected by the fake parameter store",
            )),
            None => Ok(()),
        }
    }

    /// Names of the parameters that exist now.
    pub fn names(&self) -> Vec<String> {
        self.lock().parameters.keys().cloned().collect()
    }

    pub fn tags(&self, name: &str) -> BTreeMap<String, String> {
        self.lock()
            .parameters
            .get(name)
            .map(|p| p.tags.clone())
            .unwrap_or_default()
    }

    /// Successful creates and deletes so far.
    pub fn creates(&self) -> u64 {
        self.lock().creates
    }

    pub fn deletes(&self) -> u64 {
        self.lock().deletes
    }

    /// What the boot script does with the instance role: `GetParameter`,
    /// allowed only when the parameter is granted to `instance_arn`.
    pub fn read_as_instance(&self, name: &str, instance_arn: &str) -> Result<String, CloudError> {
        let state = self.lock();
        let Some(p) = state.parameters.get(name) else {
            return Err(not_found(name));
        };
        if p.tags.get(TAG_INSTANCE_ARN).map(String::as_str) != Some(instance_arn) {
            return Err(CloudError::new(
                CloudErrorKind::Invalid,
                "AccessDeniedException",
                format!("{instance_arn} is not allowed to read {name}"),
            ));
        }
        Ok(p.value.expose_secret().to_owned())
    }
}

fn not_found(name: &str) -> CloudError {
    CloudError::new(
        CloudErrorKind::Invalid,
        "ParameterNotFound",
        format!("parameter {name} not found"),
    )
}

#[async_trait]
impl ParameterStore for FakeParameterStore {
    async fn create_secure(&self, name: &str, value: &SecretString) -> Result<(), CloudError> {
        self.injected()?;
        let mut state = self.lock();
        if state.parameters.contains_key(name) {
            return Err(CloudError::new(
                CloudErrorKind::Invalid,
                PARAMETER_ALREADY_EXISTS,
                format!("the parameter {name} already exists"),
            ));
        }
        state.parameters.insert(
            name.to_owned(),
            Parameter {
                value: value.clone(),
                tags: BTreeMap::new(),
                modified_at: Utc::now(),
            },
        );
        state.creates += 1;
        Ok(())
    }

    async fn tag(&self, name: &str, tags: &[(&str, String)]) -> Result<(), CloudError> {
        self.injected()?;
        if let Some(code) = self.lock().fail_tag.pop_front() {
            return Err(CloudError::from_code(
                &code,
                "injected by the fake parameter store",
            ));
        }
        let mut state = self.lock();
        let p = state.parameters.get_mut(name).ok_or_else(|| {
            CloudError::from_code("InvalidResourceId", format!("no parameter {name}"))
        })?;
        for (key, value) in tags {
            p.tags.insert((*key).to_owned(), value.clone());
        }
        Ok(())
    }

    async fn delete(&self, name: &str) -> Result<(), CloudError> {
        self.injected()?;
        let mut state = self.lock();
        if state.parameters.remove(name).is_some() {
            state.deletes += 1;
        }
        Ok(())
    }

    async fn list(&self, path: &str) -> Result<Vec<StoredParameter>, CloudError> {
        self.injected()?;
        let prefix = format!("{}/", path.trim_end_matches('/'));
        Ok(self
            .lock()
            .parameters
            .iter()
            .filter(|(name, _)| name.starts_with(&prefix))
            .map(|(name, p)| StoredParameter {
                name: name.clone(),
                modified_at: Some(p.modified_at),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn secure_strings_are_created_once_granted_and_deleted() {
        let store = FakeParameterStore::new();
        let name = "/spot-runners/ctl/jit/ctl-linux-ab12";
        let secret = SecretString::from("c2VjcmV0");
        store.create_secure(name, &secret).await.unwrap();
        let again = store.create_secure(name, &secret).await.unwrap_err();
        assert_eq!(again.code, PARAMETER_ALREADY_EXISTS);

        let arn = "arn:aws:ec2:us-east-1:123456789012:instance/i-1";
        assert_eq!(
            store.read_as_instance(name, arn).unwrap_err().code,
            "AccessDeniedException"
        );
        store
            .tag(name, &[(TAG_INSTANCE_ARN, arn.to_owned())])
            .await
            .unwrap();
        assert_eq!(store.read_as_instance(name, arn).unwrap(), "c2VjcmV0");
        assert!(store
            .read_as_instance(name, "arn:aws:ec2:us-east-1:123456789012:instance/i-2")
            .is_err());

        let listed = store.list("/spot-runners/ctl/jit").await.unwrap();
        assert_eq!(listed.len(), 1);
        assert!(store.list("/spot-runners/ctl/ji").await.unwrap().is_empty());

        store.delete(name).await.unwrap();
        store.delete(name).await.unwrap();
        assert_eq!(store.deletes(), 1);
        assert!(store.names().is_empty());
        assert_eq!(
            store.read_as_instance(name, arn).unwrap_err().code,
            "ParameterNotFound"
        );
    }
}
