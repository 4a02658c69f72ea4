-- Refused calls are recorded in aggregate (one entry per peer, method and outcome per
-- interval, with how many calls it stands for), and an entry says when a call was answered
-- by replaying its request id's first response.
ALTER TABLE audit_events ADD COLUMN count BIGINT NOT NULL DEFAULT 1;
ALTER TABLE audit_events ADD COLUMN replayed BOOLEAN NOT NULL DEFAULT 0;
