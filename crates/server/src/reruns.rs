//! The re-run worker is the reconciler crate's, so `simulate` runs the same
//! code as `serve`; re-exported here for the service and `jobs explain`.

pub use spot_runners_reconciler::reruns::{
    explain_job_survival, survival_lines, RerunReport, RerunWorker,
};
