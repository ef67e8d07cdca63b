-- When a payment for the case was confirmed (by a provider's webhook, processed by the
-- sea_service__context consumer group); NULL while unpaid.
ALTER TABLE cases ADD COLUMN paid_at TEXT;
