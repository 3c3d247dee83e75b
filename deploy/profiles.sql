-- Instance profiles for the first users: Kani proofs (medium and slow tiers)
-- and benchmarks. Load with
--   psql "$DATABASE_URL" -f deploy/profiles.sql
-- after `spot-runners migrate`. Re-running it resets these three rows to what
-- is written here (ON CONFLICT ... DO UPDATE), so edit this file, not only the
-- rows, if you want your changes to survive the next load.
--
-- BEFORE LOADING, replace every REPLACE_ME value:
--   image_id            the AMI built from packer/kani-runner-ami.pkr.hcl, or
--                       set it to NULL and image_filter to 'self/kani-runner-*'
--                       (the newest build of this account wins; a rebuild
--                       then needs no edit here)
--   subnet_ids          one subnet per availability zone, tried in turn on
--                       capacity errors ('{}' = the region's default subnet)
--   security_group_ids  egress to GitHub and your registries; no ingress needed
-- and create the instance profile 'spot-runners-runner' (docs/operations.md,
-- "The runners' instance role"): without it no runner can read its JIT config.
-- Left as they are, every launch fails with a malformed-id error from EC2
-- (no instance, no cost) and shows up in spot_runners_launch_errors_total.
--
-- Matching: a job fits a profile when each of its runs-on labels is one of
-- the profile's labels (case-insensitive; self-hosted is implied). Today's
-- workflows ask for
--   [self-hosted, Linux, X64, spot, kani]       -> kani-medium (see below)
--   [self-hosted, Linux, X64, spot, benchmark]  -> benchmark
-- so they need no change beyond dropping the provisioning job.
--
-- Both Kani tiers carry linux, x64, spot and kani, so a plain `kani` job fits
-- both; the higher priority sends it to kani-medium. Each tier also carries
-- its own name as a label, so a workflow can pick one explicitly
-- (runs-on: [self-hosted, Linux, X64, spot, kani, kani-slow]). Because plain
-- `kani` jobs may be long ones that nobody relabelled yet, kani-medium's
-- lifetime also covers a slow (1-2 h) run; the difference between the tiers
-- is how many may run at once and how much room they get.
--
-- Lifetimes are hard caps enforced on the instance itself
-- (user-data/kani-runner-userdata.sh): a job still running then is killed.
-- Keep them well above the longest run, boot time included.

INSERT INTO instance_profiles (
    name, labels, instance_types, image_id, subnet_ids, security_group_ids,
    iam_instance_profile, market, on_demand_fallback, max_instances, min_idle,
    idle_timeout_secs, boot_timeout_secs, max_lifetime_secs, runner_group_id,
    root_volume_gb, repositories, enabled, priority,
    image_filter, threads_per_core, benchmark_tuning
) VALUES
    -- Kani proofs of ~20-40 min, and any plain `kani` job.
    -- c6i.4xlarge (16 vCPU, 32 GiB) first; c6a/m6i of the same size when spot
    -- capacity for it runs out.
    ('kani-medium',
     '{linux,x64,spot,kani,kani-medium}',
     '{c6i.4xlarge,c6a.4xlarge,m6i.4xlarge}',
     'ami-REPLACE_ME',
     '{subnet-REPLACE_ME_AZ_A,subnet-REPLACE_ME_AZ_B,subnet-REPLACE_ME_AZ_C}',
     '{sg-REPLACE_ME}',
     'spot-runners-runner', -- reads its JIT config from SSM; jobs cannot reach it (docs/operations.md)
     'spot', true,
     20, 0,
     300, 600,
     14400,           -- 4 h: room for a slow job sent here with a plain `kani` label
     1,               -- runner group id (1 = Default)
     64,
     NULL,            -- every repository of the org; or e.g. '{my-org/verified-*}'
     true,
     10,              -- above kani-slow: plain `kani` jobs land here
     NULL, NULL,      -- image_filter (image_id above), the types' default SMT
     false),          -- no benchmark tuning: Kani runs on the kernel defaults
    -- Kani proofs of 1-2 h, asked for with the kani-slow label.
    ('kani-slow',
     '{linux,x64,spot,kani,kani-slow}',
     '{c6i.4xlarge,c6a.4xlarge,m6i.4xlarge}',
     'ami-REPLACE_ME',
     '{subnet-REPLACE_ME_AZ_A,subnet-REPLACE_ME_AZ_B,subnet-REPLACE_ME_AZ_C}',
     '{sg-REPLACE_ME}',
     'spot-runners-runner',
     'spot', true,
     10, 0,
     300, 600,
     21600,           -- 6 h
     1,
     100,
     NULL,
     true,
     0,
     NULL, NULL, false),
    -- Benchmarks of 2-3 h. One instance type only: results from different
    -- hardware are not comparable, so no c6a/m6i fallback. On-demand when
    -- spot capacity runs out; set market = 'on-demand' to also rule out spot
    -- interruptions, at about 3.4x the price (docs/operations.md).
    ('benchmark',
     '{linux,x64,spot,benchmark}',
     '{c6i.8xlarge}',
     'ami-REPLACE_ME',
     '{subnet-REPLACE_ME_AZ_A,subnet-REPLACE_ME_AZ_B,subnet-REPLACE_ME_AZ_C}',
     '{sg-REPLACE_ME}',
     'spot-runners-runner',
     'spot', true,
     4, 0,
     300, 600,
     18000,           -- 5 h
     1,
     100,
     NULL,
     true,
     0,
     NULL,
     1,               -- SMT off: 16 cores, one thread each, no sibling noise
     true)            -- governor, turbo, C-states, THP, ASLR, perf at boot;
                      -- jobs print /run/spot-runners/tuning (docs/operations.md)
ON CONFLICT (name) DO UPDATE SET
    labels               = EXCLUDED.labels,
    instance_types       = EXCLUDED.instance_types,
    image_id             = EXCLUDED.image_id,
    subnet_ids           = EXCLUDED.subnet_ids,
    security_group_ids   = EXCLUDED.security_group_ids,
    iam_instance_profile = EXCLUDED.iam_instance_profile,
    market               = EXCLUDED.market,
    on_demand_fallback   = EXCLUDED.on_demand_fallback,
    max_instances        = EXCLUDED.max_instances,
    min_idle             = EXCLUDED.min_idle,
    idle_timeout_secs    = EXCLUDED.idle_timeout_secs,
    boot_timeout_secs    = EXCLUDED.boot_timeout_secs,
    max_lifetime_secs    = EXCLUDED.max_lifetime_secs,
    runner_group_id      = EXCLUDED.runner_group_id,
    root_volume_gb       = EXCLUDED.root_volume_gb,
    repositories         = EXCLUDED.repositories,
    enabled              = EXCLUDED.enabled,
    priority             = EXCLUDED.priority,
    image_filter         = EXCLUDED.image_filter,
    threads_per_core     = EXCLUDED.threads_per_core,
    benchmark_tuning     = EXCLUDED.benchmark_tuning;
