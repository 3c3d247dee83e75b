-- Prices for cost (issue 12): dollars per instance-hour per instance type
-- and market. Operators edit these rows like instance_profiles. Spot rows
-- are refreshed by the sweep leader from EC2's DescribeSpotPriceHistory
-- (source 'ec2'), except rows an operator pinned with source 'operator'.
-- On-demand prices come only from here: the EC2 API has none.
CREATE TABLE instance_prices (
    instance_type    text NOT NULL CONSTRAINT instance_price_type_not_blank CHECK (btrim(instance_type) <> ''),
    market           text NOT NULL CONSTRAINT instance_price_market_known CHECK (market IN ('spot', 'on-demand')),
    -- `< 1000` also rejects NaN and infinity (they sort above every number).
    dollars_per_hour double precision NOT NULL
                     CONSTRAINT instance_price_range CHECK (dollars_per_hour >= 0 AND dollars_per_hour < 1000),
    source           text NOT NULL DEFAULT 'operator',
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (instance_type, market)
);

CREATE TRIGGER instance_prices_touch BEFORE UPDATE ON instance_prices
    FOR EACH ROW EXECUTE FUNCTION spot_runners_touch_updated_at();

-- us-east-1 Linux on-demand list prices of the first users' types, so a
-- fresh install prices its runners. Other regions: replace them
-- (docs/operations.md, "Prices and the daily spend cap").
INSERT INTO instance_prices (instance_type, market, dollars_per_hour, source) VALUES
    ('c6i.4xlarge', 'on-demand', 0.68, 'seed: us-east-1 list price'),
    ('c6i.8xlarge', 'on-demand', 1.36, 'seed: us-east-1 list price'),
    ('c6a.4xlarge', 'on-demand', 0.612, 'seed: us-east-1 list price'),
    ('c6a.8xlarge', 'on-demand', 1.224, 'seed: us-east-1 list price'),
    ('m6i.4xlarge', 'on-demand', 0.768, 'seed: us-east-1 list price'),
    ('m6i.8xlarge', 'on-demand', 1.536, 'seed: us-east-1 list price')
ON CONFLICT DO NOTHING;

-- The cost report finds the job a reclaim interrupted on a runner.
CREATE INDEX workflow_jobs_interrupted_runner ON workflow_jobs (interrupted_runner)
    WHERE interrupted_runner IS NOT NULL;
