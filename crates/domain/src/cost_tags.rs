//! Tags that let Cost Explorer split spend by repository and workflow: set
//! on a runner's instance once an `in_progress` names the runner (only then
//! is it known which job, of which repository, the instance runs).

/// Tag keys (activate them as cost allocation tags in the Billing console).
pub const TAG_REPOSITORY: &str = "spot-runners:repository";
pub const TAG_WORKFLOW: &str = "spot-runners:workflow";

/// EC2 takes tag values of at most 256 Unicode characters.
const MAX_TAG_VALUE_CHARS: usize = 256;

/// The cost tags for a job of `repository` (`owner/repo`) in the workflow
/// named `workflow`. Values are cut to EC2's length limit; a workflow
/// without a name gets no workflow tag.
pub fn cost_tags(repository: &str, workflow: Option<&str>) -> Vec<(&'static str, String)> {
    let mut tags = vec![(TAG_REPOSITORY, tag_value(repository))];
    if let Some(workflow) = workflow.map(str::trim).filter(|w| !w.is_empty()) {
        tags.push((TAG_WORKFLOW, tag_value(workflow)));
    }
    tags
}

fn tag_value(v: &str) -> String {
    v.chars().take(MAX_TAG_VALUE_CHARS).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_and_workflow_become_tags_within_ec2_limits() {
        assert_eq!(
            cost_tags("acme/kani-proofs", Some("Kani / nightly (full)")),
            vec![
                (TAG_REPOSITORY, "acme/kani-proofs".to_owned()),
                (TAG_WORKFLOW, "Kani / nightly (full)".to_owned()),
            ]
        );
        assert_eq!(
            cost_tags("acme/x", Some("  ")),
            vec![(TAG_REPOSITORY, "acme/x".to_owned())]
        );
        assert_eq!(cost_tags("acme/x", None).len(), 1);
        let long = "é".repeat(300);
        let tags = cost_tags("acme/x", Some(&long));
        assert_eq!(tags[1].1.chars().count(), 256);
    }
}
