//! Where a runner's JIT config waits for its instance (DESIGN.md, "Launching
//! on EC2"): an SSM SecureString named
//! `/spot-runners/<controller id>/jit/<runner name>`, created before the
//! launch, granted to the instance once it exists, read and deleted by the
//! boot script. User data carries no secret.

use crate::RunnerState;

/// The parameter's tag naming the one instance allowed to read it; the
/// runner instance policy (`deploy/iam/runner-instance-policy.json`)
/// compares it with the caller's `ec2:SourceInstanceARN`.
pub const TAG_INSTANCE_ARN: &str = "spot-runners:instance-arn";

/// Every JIT config parameter of one deployment lives under this path.
pub fn jit_parameter_path(controller_id: &str) -> String {
    format!("/spot-runners/{controller_id}/jit")
}

/// The parameter holding one runner's JIT config.
pub fn jit_parameter_name(controller_id: &str, runner_name: &str) -> String {
    format!("{}/{runner_name}", jit_parameter_path(controller_id))
}

/// The runner name a parameter under [`jit_parameter_path`] belongs to.
pub fn runner_of_parameter<'a>(controller_id: &str, parameter: &'a str) -> Option<&'a str> {
    let prefix = jit_parameter_path(controller_id);
    parameter
        .strip_prefix(prefix.as_str())?
        .strip_prefix('/')
        .filter(|rest| !rest.is_empty() && !rest.contains('/'))
}

/// Whether a JIT config parameter is left behind and must go, given what
/// the ledger says of its runner (`None`: the ledger has no such runner).
///
/// Until the runner comes online its instance may still need the config
/// (the row is written before the parameter, so a parameter never exists
/// without its row). Once online, the boot script has read it and should
/// have deleted it; a runner that ended (launch failed, reaped, instance
/// gone) will never read it.
pub fn jit_parameter_is_leftover(runner: Option<RunnerState>) -> bool {
    !matches!(
        runner,
        Some(
            RunnerState::Requested
                | RunnerState::Registered
                | RunnerState::Launching
                | RunnerState::Booting
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_contract_and_parse_back() {
        let name = jit_parameter_name("spot-runners", "spot-runners-kani-ab12");
        assert_eq!(
            name,
            "/spot-runners/spot-runners/jit/spot-runners-kani-ab12"
        );
        assert_eq!(
            runner_of_parameter("spot-runners", &name),
            Some("spot-runners-kani-ab12")
        );
        // Another deployment's, or something else under our path.
        assert_eq!(runner_of_parameter("spot-runners-staging", &name), None);
        assert_eq!(
            runner_of_parameter("spot-runners", "/spot-runners/spot-runners/jit/a/b"),
            None
        );
        assert_eq!(
            runner_of_parameter("spot-runners", "/spot-runners/spot-runners/jit/"),
            None
        );
        assert_eq!(
            runner_of_parameter("spot-runners", "/spot-runners/spot-runners/jitx"),
            None
        );
    }

    #[test]
    fn only_runners_not_yet_online_keep_their_config() {
        use RunnerState::*;
        for state in [Requested, Registered, Launching, Booting] {
            assert!(!jit_parameter_is_leftover(Some(state)), "{state}");
        }
        for state in [
            Idle,
            Busy,
            Done,
            Terminating,
            Terminated,
            LaunchFailed,
            BootTimeout,
            IdleTimeout,
            Interrupted,
            Orphaned,
        ] {
            assert!(jit_parameter_is_leftover(Some(state)), "{state}");
        }
        assert!(jit_parameter_is_leftover(None));
    }
}
