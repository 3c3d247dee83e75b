-- Retention and per-pass reads that stay on the live part of the ledger.
-- The state lists are written out exactly as the queries in
-- crates/store/src/postgres.rs write them, so the planner can match these
-- partial indexes however many ended rows pile up.

-- Live runners of a controller (plans, gauges, sweeps).
CREATE INDEX runners_live_by_controller ON runners (controller_id, state)
    WHERE state IN ('requested', 'registered', 'launching', 'booting', 'idle', 'busy',
                    'done', 'terminating');

-- Ended runners by age: "ended within the last hour" and retention.
CREATE INDEX runners_ended_by_controller ON runners (controller_id, updated_at)
    WHERE state IN ('terminated', 'launch_failed', 'boot_timeout', 'idle_timeout',
                    'interrupted', 'orphaned');
